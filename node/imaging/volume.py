"""A CT series as one `Volume`: HU voxels plus the exact geometry and references an output needs.

Everything downstream (model, contours, RT Structure Set) trusts this geometry, so the
loader refuses any series it cannot place exactly, each with its own exception type
and a message naming the slices or UIDs involved.

Memory: `read_datasets` leaves pixel data on disk (deferred) and `load_volume` decodes one
slice at a time into one preallocated array, int16 whenever the rescaled values are whole
numbers that fit (nearly every CT), so a loaded series costs 2 bytes a voxel. A series with
more slices than a caller's `max_slices` is refused from its headers alone, before any pixel
data is read.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale, pixel_array
from pydicom.tag import Tag
from pydicom.uid import EnhancedCTImageStorage

from node.errors import UserError

log = logging.getLogger(__name__)

ORIENTATION_TOLERANCE = 1e-4  # direction cosines
IN_PLANE_TOLERANCE_MM = 0.05  # slice origins off the stack axis by more than this: tilt or shear
GAP_FACTOR = 1.5  # a step over 1.5 x the median slice spacing is a missing slice
PIXEL_DATA = Tag("PixelData")
DEFER_BYTES = 16 * 1024  # read_datasets leaves elements larger than this on disk until used
# Peak memory of a worker job above its idle size, per CT voxel, with the bundled model: about
# 1.3 MB a 512x512 slice at 1,000-2,000 slices (bench/bench_worker_memory.py); for the refusal's estimate.
JOB_BYTES_PER_VOXEL = 5.0
INT16 = np.iinfo(np.int16)


class SeriesError(UserError):
    """A CT series that cannot be turned into a Volume whose geometry is exact."""


class NotCTError(SeriesError):
    pass


class MultiFrameError(SeriesError):
    pass


class TooFewSlicesError(SeriesError):
    pass


class MixedSeriesError(SeriesError):
    """More than one series, or more than one Frame of Reference, or none."""


class MissingUidError(SeriesError):
    """Slices without SOP Instance, Series or Study Instance UID cannot be referenced by an output."""


class InconsistentGeometryError(SeriesError):
    """Slices differ in size, pixel spacing or orientation."""


class NonOrthonormalOrientationError(SeriesError):
    pass


class TiltedStackError(SeriesError):
    """Gantry tilt or a sheared stack: slice origins do not lie on the slice normal."""


class DuplicatePositionError(SeriesError):
    pass


class MissingSlicesError(SeriesError):
    pass


class TooManySlicesError(SeriesError):
    """More slices than the caller's `max_slices` (the worker's `model.max_slices`): refused
    before pixel data is read, so a huge series cannot exhaust the machine's memory."""


@dataclass(frozen=True)
class SliceRef:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True, eq=False)
class Volume:
    """HU voxels as (slice, row, column), slices sorted along the slice normal.

    `positions[k]` is slice k's own ImagePositionPatient: contours are placed with it,
    never with an extrapolated origin, so uneven spacing cannot misplace them.
    """

    hu: np.ndarray  # int16 when the rescaled values are whole numbers within int16, else float32
    positions: np.ndarray  # (slices, 3) mm, patient (LPS) coordinates
    row_direction: np.ndarray  # unit vector along a row (increasing column index)
    column_direction: np.ndarray  # unit vector down a column (increasing row index)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm, as DICOM PixelSpacing
    slices: tuple[SliceRef, ...]
    headers: tuple[Dataset, ...]  # each slice's attributes without pixel data, same order

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.hu.shape

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)

    @property
    def slice_offsets(self) -> np.ndarray:
        """Each slice's position along the normal (mm), increasing."""
        return self.positions @ self.normal

    @property
    def slice_spacing(self) -> float:
        return float(np.median(np.diff(self.slice_offsets)))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(slice, row, column) voxel size in mm, matching the array axes."""
        return (self.slice_spacing, self.pixel_spacing[0], self.pixel_spacing[1])

    @property
    def is_evenly_spaced(self) -> bool:
        return bool(np.allclose(np.diff(self.slice_offsets), self.slice_spacing, atol=1e-3))

    @property
    def affine(self) -> np.ndarray:
        """4x4 map from (slice, row, column, 1) indices to patient mm (exact when evenly spaced)."""
        affine = np.eye(4)
        affine[:3, 0] = self.normal * self.slice_spacing
        affine[:3, 1] = self.column_direction * self.pixel_spacing[0]
        affine[:3, 2] = self.row_direction * self.pixel_spacing[1]
        affine[:3, 3] = self.positions[0]
        return affine

    def to_patient(self, k: int, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Patient coordinates of (row, column) points on slice k, fractional indices allowed."""
        return (
            self.positions[k]
            + np.multiply.outer(columns * self.pixel_spacing[1], self.row_direction)
            + np.multiply.outer(rows * self.pixel_spacing[0], self.column_direction)
        )

    def to_pixel(self, k: int, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, column, distance from slice k's plane) of patient points."""
        delta = points - self.positions[k]
        return (
            delta @ self.column_direction / self.pixel_spacing[0],
            delta @ self.row_direction / self.pixel_spacing[1],
            delta @ self.normal,
        )

    @property
    def study_instance_uid(self) -> str:
        return str(self.headers[0].StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.headers[0].SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.headers[0].FrameOfReferenceUID)


def read_datasets(paths: Iterable[Path], max_slices: int | None = None) -> list[Dataset]:
    """Read DICOM files, skipping non-DICOM files and objects without pixels (an RTSTRUCT beside its CT).

    Pixel data stays on disk until `load_volume` decodes it (pydicom's deferred reading), so the
    datasets cost their headers only. With `max_slices`, more image files than that raise
    TooManySlicesError after reading headers only (see `check_slice_count`).
    """
    files = sorted(path for path in paths if path.is_file())
    if max_slices is not None and len(files) > max_slices:
        check_slice_count(files, max_slices)  # more files than allowed: are they all images?
    datasets = []
    for path in files:
        try:
            ds = dcmread(path, defer_size=DEFER_BYTES)
        except (InvalidDicomError, OSError) as exc:
            log.debug("skipping %s: %s", path, exc)
            continue
        if PIXEL_DATA in ds:
            datasets.append(ds)
        else:
            log.info("skipping %s: %s object without pixel data", path, ds.get("Modality", "?"))
    return datasets


def check_slice_count(files: Sequence[Path], max_slices: int) -> None:
    """Raise TooManySlicesError when more than `max_slices` of `files` are images, reading
    headers only (nothing from the pixel data element on)."""
    headers = []
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        if "Rows" in ds and "Columns" in ds:  # an image; an RT Structure Set beside it has none
            headers.append(ds)
    _refuse_if_too_many(headers, max_slices)


def _refuse_if_too_many(headers: Sequence[Dataset], max_slices: int | None) -> None:
    if max_slices is None or len(headers) <= max_slices:
        return
    series = Counter(str(ds.get("SeriesInstanceUID", "") or "(no UID)") for ds in headers).most_common()
    named = series[0][0] if len(series) == 1 else f"{series[0][0]} (and {len(series) - 1} other series)"
    voxels = sum(int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) for ds in headers)
    need = voxels * JOB_BYTES_PER_VOXEL
    need_text = f"{need / 1e9:.1f} GB" if need >= 1e9 else f"{need / 1e6:.0f} MB"
    raise TooManySlicesError(
        f"series {named} has {len(headers)} slices, more than model.max_slices = {max_slices}: not loaded "
        f"(it would need about {need_text} of memory)"
    )


def load_series_dir(directory: Path, max_slices: int | None = None) -> Volume:
    if not directory.is_dir():
        raise SeriesError(f"{directory} is not a directory")
    datasets = read_datasets(directory.rglob("*"), max_slices)
    if not datasets:
        raise TooFewSlicesError(f"{directory} holds no DICOM image files")
    return load_volume(datasets, max_slices)


def _uids(datasets: Sequence[Dataset], keyword: str) -> list[str]:
    return sorted({str(ds.get(keyword, "") or "") for ds in datasets})


def _short(uid: str) -> str:
    return uid if len(uid) <= 24 else f"...{uid[-20:]}"


def _check_identity(datasets: Sequence[Dataset]) -> None:
    modalities = _uids(datasets, "Modality")
    if modalities != ["CT"]:
        others = ", ".join(m or "(none)" for m in modalities if m != "CT")
        if "CT" in modalities:
            raise NotCTError(f"besides CT images, these files hold {others} objects: give one CT series only")
        raise NotCTError(f"series modality is {others}, not CT")
    multi = [ds for ds in datasets if ds.SOPClassUID == EnhancedCTImageStorage or int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multi:
        raise MultiFrameError(
            f"multi-frame (Enhanced) CT is not supported: {len(multi)} object(s), e.g. SOP Instance "
            f"{multi[0].SOPInstanceUID}; send the series as single-frame CT Image Storage"
        )
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        lacking = [ds for ds in datasets if not str(ds.get(keyword, "") or "").strip()]
        if lacking:
            where = getattr(lacking[0], "filename", None) or "a dataset"
            raise MissingUidError(f"{len(lacking)} of {len(datasets)} slices lack {keyword} (e.g. {where})")
    series = _uids(datasets, "SeriesInstanceUID")
    if len(series) != 1:
        raise MixedSeriesError(f"slices belong to {len(series)} series: {', '.join(map(_short, series))}")
    frames = _uids(datasets, "FrameOfReferenceUID")
    if frames == [""]:
        raise MixedSeriesError(f"series {series[0]} has no Frame of Reference UID: its position in the patient is unknown")
    if len(frames) != 1:
        raise MixedSeriesError(f"series {series[0]} mixes {len(frames)} Frames of Reference: {', '.join(map(_short, frames))}")
    if len(datasets) < 2:
        raise TooFewSlicesError(f"series {series[0]} has {len(datasets)} slice; at least 2 are needed")


def _numbers(values: np.ndarray) -> str:
    """As a person writes them: [128, 128], [0.977, 0.977]."""
    return "[" + ", ".join(f"{value:g}" for value in values.reshape(-1)) + "]"


def _same(values: list, what: str, datasets: Sequence[Dataset], tolerance: float = 0.0) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    differs = np.any(np.abs(array - array[0]) > tolerance, axis=tuple(range(1, array.ndim)))
    if np.any(differs):
        k = int(np.argmax(differs))
        raise InconsistentGeometryError(
            f"slices differ in {what}: {_numbers(array[0])} in SOP Instance {datasets[0].SOPInstanceUID}, "
            f"{_numbers(array[k])} in {datasets[k].SOPInstanceUID}"
        )
    return array[0]


def load_volume(datasets: Sequence[Dataset], max_slices: int | None = None) -> Volume:
    """Sort, check and decode one CT series. Raises a SeriesError subclass when geometry is not exact,
    TooManySlicesError (before decoding anything) when there are more than `max_slices` slices."""
    _refuse_if_too_many(datasets, max_slices)
    _check_identity(datasets)
    _same([(int(ds.Rows), int(ds.Columns)) for ds in datasets], "size (rows, columns)", datasets)
    pixel_spacing = _same([[float(v) for v in ds.PixelSpacing] for ds in datasets], "pixel spacing", datasets, 1e-4)
    orientation = _same(
        [[float(v) for v in ds.ImageOrientationPatient] for ds in datasets], "orientation", datasets, ORIENTATION_TOLERANCE
    )
    row_direction, column_direction = orientation[:3], orientation[3:]
    if (
        abs(np.linalg.norm(row_direction) - 1) > ORIENTATION_TOLERANCE
        or abs(np.linalg.norm(column_direction) - 1) > ORIENTATION_TOLERANCE
        or abs(row_direction @ column_direction) > ORIENTATION_TOLERANCE
    ):
        raise NonOrthonormalOrientationError(f"ImageOrientationPatient {list(orientation)} is not two orthonormal vectors")
    row_direction = row_direction / np.linalg.norm(row_direction)
    column_direction = column_direction / np.linalg.norm(column_direction)
    normal = np.cross(row_direction, column_direction)

    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    order = np.argsort(positions @ normal, kind="stable")
    datasets = [datasets[i] for i in order]
    positions = positions[order]
    offsets = positions @ normal

    steps = np.diff(offsets)
    duplicates = np.flatnonzero(steps < 1e-3)
    if duplicates.size:
        k = int(duplicates[0])
        raise DuplicatePositionError(
            f"slices {datasets[k].SOPInstanceUID} and {datasets[k + 1].SOPInstanceUID} share position "
            f"{offsets[k]:.2f} mm along the slice normal"
        )
    in_plane = positions - positions[0] - np.outer(offsets - offsets[0], normal)
    drift = np.linalg.norm(in_plane, axis=1)
    if drift.max() > IN_PLANE_TOLERANCE_MM:
        k = int(np.argmax(drift))
        raise TiltedStackError(
            f"slice origins are not stacked along the slice normal (gantry tilt or sheared stack): slice "
            f"{datasets[k].SOPInstanceUID} is {drift[k]:.2f} mm off the axis through the first slice"
        )
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > GAP_FACTOR * median)
    if gaps.size:
        described = ", ".join(
            f"between z={positions[k][2]:.1f} and z={positions[k + 1][2]:.1f} mm" for k in gaps
        )
        raise MissingSlicesError(
            f"series {datasets[0].SeriesInstanceUID} has a gap {described} (slice spacing {median:.2f} mm)"
        )

    headers = tuple(_header(ds) for ds in datasets)
    hu = _decode(datasets)
    return Volume(
        hu=hu,
        positions=positions,
        row_direction=row_direction,
        column_direction=column_direction,
        pixel_spacing=(float(pixel_spacing[0]), float(pixel_spacing[1])),
        slices=tuple(SliceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in datasets),
        headers=headers,
    )


def _decode(datasets: Sequence[Dataset]) -> np.ndarray:
    """HU of every slice, decoded one at a time into one array: int16 while every value so far
    is a whole number within int16, float32 (the values exactly as before) from the first that is not."""
    first = datasets[0]
    hu = np.empty((len(datasets), int(first.Rows), int(first.Columns)), dtype=np.int16)
    for k, ds in enumerate(datasets):
        values = _hounsfield(ds)
        if hu.dtype == np.int16 and not _fits_int16(values):
            hu = hu.astype(np.float32)  # slices 0..k-1 convert exactly
        hu[k] = values if hu.dtype == np.int16 else values.astype(np.float32)
    return hu


def _fits_int16(values: np.ndarray) -> bool:
    if values.size == 0:
        return True
    if values.dtype.kind == "f" and not np.array_equal(values, np.rint(values)):
        return False
    return INT16.min <= values.min() and values.max() <= INT16.max


def _pixels(ds: Dataset) -> np.ndarray:
    """The stored values, decoded without keeping them (or, when deferred, the pixel bytes) in `ds`."""
    element = ds.get_item(PIXEL_DATA, keep_deferred=True)
    deferred = element is not None and element.value is None and isinstance(getattr(ds, "filename", None), str)
    return pixel_array(ds.filename if deferred else ds)


def _hounsfield(ds: Dataset) -> np.ndarray:
    """One slice's rescaled values: integers when the rescale is integral, else float64 as pydicom computes them."""
    try:
        pixels = _pixels(ds)
    except Exception as exc:  # decoders raise many types; the message names the slice either way
        raise SeriesError(
            f"cannot decode pixel data of {ds.SOPInstanceUID} (transfer syntax {ds.file_meta.TransferSyntaxUID}): {exc}"
        ) from exc
    rescaled = "ModalityLUTSequence" not in ds and "RescaleSlope" in ds and "RescaleIntercept" in ds
    if rescaled and pixels.dtype.kind in "iu" and pixels.itemsize <= 2:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        if slope.is_integer() and intercept.is_integer() and abs(slope) * 2**16 + abs(intercept) < 2**31:
            # the same numbers as pydicom's float64 pixels * slope + intercept, in integers
            values = pixels.astype(np.int32)
            if slope != 1:
                values *= int(slope)
            if intercept != 0:
                values += int(intercept)
            return values
    return apply_rescale(pixels, ds)


def _header(ds: Dataset) -> Dataset:
    header = Dataset()
    for tag in ds.keys():
        if tag != PIXEL_DATA:  # never touched: a deferred value stays on disk
            header.add(ds[tag])
    header.file_meta = ds.file_meta
    return header
