"""A CT series as one `Volume`: HU voxels plus the exact geometry and references an output needs.

Everything downstream (model, contours, RT Structure Set) trusts this geometry, so the
loader refuses any series it cannot place exactly, each with its own exception type
and a message naming the slices or UIDs involved.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale
from pydicom.uid import EnhancedCTImageStorage

from node.errors import UserError

log = logging.getLogger(__name__)

ORIENTATION_TOLERANCE = 1e-4  # direction cosines
IN_PLANE_TOLERANCE_MM = 0.05  # slice origins off the stack axis by more than this: tilt or shear
GAP_FACTOR = 1.5  # a step over 1.5 x the median slice spacing is a missing slice


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

    hu: np.ndarray
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


def read_datasets(paths: Iterable[Path]) -> list[Dataset]:
    """Read DICOM files, skipping non-DICOM files and objects without pixels (an RTSTRUCT beside its CT)."""
    datasets = []
    for path in sorted(paths):
        if not path.is_file():
            continue
        try:
            ds = dcmread(path)
        except (InvalidDicomError, OSError) as exc:
            log.debug("skipping %s: %s", path, exc)
            continue
        if "PixelData" in ds:
            datasets.append(ds)
        else:
            log.info("skipping %s: %s object without pixel data", path, ds.get("Modality", "?"))
    return datasets


def load_series_dir(directory: Path) -> Volume:
    if not directory.is_dir():
        raise SeriesError(f"{directory} is not a directory")
    datasets = read_datasets(directory.rglob("*"))
    if not datasets:
        raise TooFewSlicesError(f"{directory} holds no DICOM image files")
    return load_volume(datasets)


def _uids(datasets: Sequence[Dataset], keyword: str) -> list[str]:
    return sorted({str(ds.get(keyword, "") or "") for ds in datasets})


def _short(uid: str) -> str:
    return uid if len(uid) <= 24 else f"...{uid[-20:]}"


def _check_identity(datasets: Sequence[Dataset]) -> None:
    modalities = _uids(datasets, "Modality")
    if modalities != ["CT"]:
        raise NotCTError(f"series modality is {', '.join(m or '(none)' for m in modalities)}, not CT")
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


def _same(values: list, what: str, datasets: Sequence[Dataset], tolerance: float = 0.0) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    differs = np.any(np.abs(array - array[0]) > tolerance, axis=tuple(range(1, array.ndim)))
    if np.any(differs):
        k = int(np.argmax(differs))
        raise InconsistentGeometryError(
            f"slices differ in {what}: {list(array[0])} in SOP Instance {datasets[0].SOPInstanceUID}, "
            f"{list(array[k])} in {datasets[k].SOPInstanceUID}"
        )
    return array[0]


def load_volume(datasets: Sequence[Dataset]) -> Volume:
    """Sort, check and decode one CT series. Raises a SeriesError subclass when geometry is not exact."""
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

    hu = np.stack([_hounsfield(ds) for ds in datasets])
    headers = tuple(_header(ds) for ds in datasets)
    return Volume(
        hu=hu,
        positions=positions,
        row_direction=row_direction,
        column_direction=column_direction,
        pixel_spacing=(float(pixel_spacing[0]), float(pixel_spacing[1])),
        slices=tuple(SliceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in datasets),
        headers=headers,
    )


def _hounsfield(ds: Dataset) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # decoders raise many types; the message names the slice either way
        raise SeriesError(
            f"cannot decode pixel data of {ds.SOPInstanceUID} (transfer syntax {ds.file_meta.TransferSyntaxUID}): {exc}"
        ) from exc
    return apply_rescale(pixels, ds).astype(np.float32)


def _header(ds: Dataset) -> Dataset:
    header = Dataset()
    for element in ds:
        if element.keyword != "PixelData":
            header.add(element)
    header.file_meta = ds.file_meta
    return header
