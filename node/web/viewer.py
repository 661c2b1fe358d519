"""The review viewer's pictures: a job's CT slice by slice with the CTV outline, and coronal and
sagittal views through the CTV, as the routes under /api/jobs/{id}/ serve them.

The outline is read back from the RT Structure Set the job sent (node.rtstruct.reader), not
taken from the job's mask, so the reviewer sees exactly what the planning system got. The CT
and the structure set are loaded once per job (`viewer_for` keeps the last few), so paging a
slice costs a window lookup, a fast PNG encode and a trace of one mask slice: a few
milliseconds for 512x512 (bench/bench_viewer.py).
"""

from __future__ import annotations

import dataclasses
import io
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from scipy import ndimage

from node.errors import UserError
from node.imaging.volume import Volume, load_volume, read_datasets
from node.rtstruct.contours import trace_slice
from node.rtstruct.reader import RoiMask, StructureSetError, read_masks

PNG_COMPRESS_LEVEL = 1  # speed over size: a 512x512 slice encodes in a few ms, served on the local network
OUTLINE_RGB = (255, 48, 48)
OUTLINE_PIXELS = 2  # width of the outline burned into a reformat, in output pixels
# Each cached viewer holds its CT as int16: about 50 MB per 100 slices of 512x512.
VIEWER_CACHE_SIZE = 4


@dataclass(frozen=True)
class WindowPreset:
    """A window (width, level in HU) a reviewer switches between with one button."""

    name: str
    label: str
    width: float
    level: float

    @property
    def lowest(self) -> float:
        return self.level - self.width / 2


PRESETS: dict[str, WindowPreset] = {
    preset.name: preset
    for preset in (
        WindowPreset("soft", "Soft tissue", 400, 40),
        WindowPreset("bone", "Bone", 1800, 400),
        WindowPreset("lung", "Lung", 1500, -600),
    )
}
DEFAULT_PRESET = "soft"
PLANES = ("coronal", "sagittal")


class ViewerRequestError(ValueError):
    """A slice, preset or plane the viewer does not have: the routes answer 404."""


class SliceIndexError(ViewerRequestError, IndexError):
    pass


class UnknownPresetError(ViewerRequestError):
    pass


class UnknownPlaneError(ViewerRequestError):
    pass


class ViewerSourceError(UserError):
    """The job's CT or RT Structure Set is gone (retention) or unreadable: nothing to show."""


@dataclass(frozen=True)
class CtvCentre:
    """The voxel the reformats pass through: the CTV's centre of mass, rounded."""

    slice: int
    row: int
    column: int


@dataclass(frozen=True)
class SliceInfo:
    """What the page needs once, before it asks for any slice (served as JSON)."""

    slice_count: int
    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float]  # (between rows, between columns)
    slice_thickness_mm: float  # SliceThickness of the series, else the spacing
    slice_spacing_mm: float
    z_positions_mm: list[float]  # patient z of each slice, in the viewer's (API's) index order
    roi_name: str
    contour_slices: list[int]
    first_contour_slice: int | None
    last_contour_slice: int | None
    ctv_centre: CtvCentre | None
    presets: list[WindowPreset]
    default_preset: str
    planes: tuple[str, ...]
    last_slice_on_top: bool  # reformats put the most superior slice on top: then slice 0 is at the bottom


@dataclass(frozen=True)
class Outline:
    """The CTV on one slice as closed polygons of [x, y] points in image pixels: x along a row
    (column), y down a column (row), (0, 0) the top-left corner of the first pixel, so an SVG
    with viewBox "0 0 columns rows" lays them on the image. Holes are separate polygons: draw
    them with fill-rule evenodd."""

    index: int
    rows: int
    columns: int
    polygons: list[list[list[float]]]


class JobViewer:
    """One job's CT and its sent structure set's CTV, ready to page through."""

    def __init__(self, ct_paths: Sequence[Path], rtstruct_path: Path, roi_name: str | None = None):
        """`roi_name` None: the structure set's first ROI (a structure set rtnode sends has one)."""
        self.rtstruct_path = Path(rtstruct_path)
        missing = [path for path in map(Path, ct_paths) if not path.is_file()]
        if missing or not ct_paths or not self.rtstruct_path.is_file():
            gone = (
                f"{len(missing)} of {len(ct_paths)} CT files" if missing
                else "the CT files" if not ct_paths
                else f"the RT Structure Set {self.rtstruct_path}"
            )
            raise ViewerSourceError(f"{gone} of this job are no longer held (removed by retention?): nothing to show")
        self.volume: Volume = load_volume(read_datasets(map(Path, ct_paths)))
        try:
            rtstruct = dcmread(self.rtstruct_path)
        except (InvalidDicomError, OSError) as exc:
            raise ViewerSourceError(f"cannot read the RT Structure Set {self.rtstruct_path}: {exc}") from exc
        roi = _chosen_roi(read_masks(rtstruct, self.volume), roi_name, self.rtstruct_path)
        self.roi_name = roi.name
        self._mask_box, self._mask_crop = _crop(roi.mask)
        self._info = self._describe()

    @property
    def slice_count(self) -> int:
        return self.volume.shape[0]

    def slice_info(self) -> dict:
        return dataclasses.asdict(self._info)

    def axial_png(self, index: int, preset: str) -> bytes:
        return _png(_windowed(self.volume.hu[self._checked(index)], _preset(preset)))

    def outline(self, index: int) -> dict:
        k = self._checked(index)
        rows, columns = self.volume.shape[1:]
        polygons: list[list[list[float]]] = []
        if self._mask_box is not None and self._mask_box[0].start <= k < self._mask_box[0].stop:
            _, row_box, column_box = self._mask_box
            for polygon in trace_slice(self._mask_crop[k - self._mask_box[0].start]):
                points = polygon[:, ::-1] + (column_box.start, row_box.start)  # (row, column) -> [x, y]
                polygons.append(points.tolist())
        return dataclasses.asdict(Outline(k, rows, columns, polygons))

    def reformat_png(self, plane: str, preset: str) -> bytes:
        """Coronal or sagittal plane through the CTV centre, the CTV outline burned in, stretched
        so that a millimetre is as long across as down (slices are thicker than pixels are wide)."""
        window = _preset(preset)
        if plane not in PLANES:
            raise UnknownPlaneError(f"no plane {plane!r}; planes are {', '.join(PLANES)}")
        centre = self._info.ctv_centre or CtvCentre(self.slice_count // 2, self.volume.shape[1] // 2, self.volume.shape[2] // 2)
        if plane == "coronal":  # a row of every slice; across it run the columns
            hu, mask = self.volume.hu[:, centre.row, :], self._mask_plane(1, centre.row)
            across_mm = self.volume.pixel_spacing[1]
        else:
            hu, mask = self.volume.hu[:, :, centre.column], self._mask_plane(2, centre.column)
            across_mm = self.volume.pixel_spacing[0]
        if self._info.last_slice_on_top:
            hu, mask = hu[::-1], mask[::-1]
        width = hu.shape[1]
        height = max(1, round(hu.shape[0] * self.volume.slice_spacing / across_mm))
        grey = Image.fromarray(_windowed(hu, window)).resize((width, height), Image.Resampling.BILINEAR)
        inside = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
        rgb = np.repeat(np.asarray(grey)[..., None], 3, axis=2)
        rgb[inside & ~ndimage.binary_erosion(inside, iterations=OUTLINE_PIXELS)] = OUTLINE_RGB
        return _png(rgb)

    def _checked(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int | np.integer) or not 0 <= index < self.slice_count:
            raise SliceIndexError(f"no slice {index!r}: this series has slices 0 to {self.slice_count - 1}")
        return int(index)

    def _mask_plane(self, axis: int, index: int) -> np.ndarray:
        """The CTV mask on the plane `index` of array axis 1 (a row) or 2 (a column), full size."""
        shape = [n for a, n in enumerate(self.volume.shape) if a != axis]
        plane = np.zeros(shape, dtype=bool)
        if self._mask_box is not None and self._mask_box[axis].start <= index < self._mask_box[axis].stop:
            others = tuple(box for a, box in enumerate(self._mask_box) if a != axis)
            plane[others] = np.take(self._mask_crop, index - self._mask_box[axis].start, axis=axis)
        return plane

    def _describe(self) -> SliceInfo:
        volume = self.volume
        contour_slices: list[int] = []
        centre = None
        if self._mask_box is not None:
            occupied = np.flatnonzero(self._mask_crop.any(axis=(1, 2))) + self._mask_box[0].start
            contour_slices = occupied.tolist()
            local = ndimage.center_of_mass(self._mask_crop)
            centre = CtvCentre(*(int(round(c)) + box.start for c, box in zip(local, self._mask_box, strict=True)))
        thickness = volume.headers[0].get("SliceThickness")
        return SliceInfo(
            slice_count=volume.shape[0],
            rows=volume.shape[1],
            columns=volume.shape[2],
            pixel_spacing_mm=volume.pixel_spacing,
            slice_thickness_mm=float(thickness) if thickness not in (None, "") else round(volume.slice_spacing, 4),
            slice_spacing_mm=round(volume.slice_spacing, 4),
            z_positions_mm=[round(float(z), 3) for z in volume.positions[:, 2]],
            roi_name=self.roi_name,
            contour_slices=contour_slices,
            first_contour_slice=contour_slices[0] if contour_slices else None,
            last_contour_slice=contour_slices[-1] if contour_slices else None,
            ctv_centre=centre,
            presets=list(PRESETS.values()),
            default_preset=DEFAULT_PRESET,
            planes=PLANES,
            last_slice_on_top=bool(volume.normal[2] > 0),
        )


def _chosen_roi(masks: list[RoiMask], roi_name: str | None, path: Path) -> RoiMask:
    if not masks:
        raise StructureSetError(f"the RT Structure Set {path} holds no ROI")
    if roi_name is None:
        return masks[0]
    for match in (lambda m: m.name == roi_name, lambda m: m.name.lower() == roi_name.lower()):
        found = [m for m in masks if match(m)]
        if found:
            return found[0]
    raise StructureSetError(f"no ROI named {roi_name!r} in {path}; it has {', '.join(repr(m.name) for m in masks)}")


def _crop(mask: np.ndarray) -> tuple[tuple[slice, slice, slice] | None, np.ndarray]:
    """The mask's bounding box and what lies in it: a CTV fills a small part of a CT, and the
    viewer keeps only that part."""
    if not mask.any():
        return None, np.zeros((0, 0, 0), dtype=bool)
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    return box, mask[box].copy()


def _preset(name: str) -> WindowPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(f"no window preset {name!r}; presets are {', '.join(PRESETS)}") from None


_LUTS: dict[str, np.ndarray] = {}


def _windowed(hu: np.ndarray, window: WindowPreset) -> np.ndarray:
    """HU -> 8-bit grey by the DICOM linear window. An int16 slice goes through a 64 k lookup
    table (one per preset, built on first use): about 1 ms for 512x512."""
    if hu.dtype == np.int16:
        lut = _LUTS.get(window.name)
        if lut is None:
            every_value = np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.float32)
            lut = _LUTS[window.name] = _grey(every_value, window)
        return lut[hu.view(np.uint16)]
    return _grey(hu.astype(np.float32), window)


def _grey(hu: np.ndarray, window: WindowPreset) -> np.ndarray:
    return (np.clip((hu - window.lowest) / window.width, 0, 1) * 255 + 0.5).astype(np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


class ViewerCache:
    """Job viewers by job id, the most recently used kept: loading a CT takes seconds, paging
    must take milliseconds. One load at a time, so ten browsers opening jobs at once cannot
    hold ten CTs in memory while they load; a cached job is served meanwhile."""

    def __init__(self, size: int = VIEWER_CACHE_SIZE):
        self.size = size
        self._viewers: OrderedDict[int, JobViewer] = OrderedDict()
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()

    def get(self, job_id: int, ct_paths: Sequence[Path], rtstruct_path: Path) -> JobViewer:
        viewer = self._cached(job_id, rtstruct_path)
        if viewer is not None:
            return viewer
        with self._load_lock:
            viewer = self._cached(job_id, rtstruct_path)  # loaded by the request this one waited for
            if viewer is None:
                viewer = JobViewer(ct_paths, rtstruct_path)
                with self._lock:
                    self._viewers[job_id] = viewer
                    while len(self._viewers) > self.size:
                        self._viewers.popitem(last=False)
        return viewer

    def _cached(self, job_id: int, rtstruct_path: Path) -> JobViewer | None:
        with self._lock:
            viewer = self._viewers.get(job_id)
            if viewer is None or viewer.rtstruct_path != Path(rtstruct_path):
                return None
            self._viewers.move_to_end(job_id)
            return viewer


_cache = ViewerCache()


def viewer_for(job_id: int, ct_paths: Sequence[Path], rtstruct_path: Path) -> JobViewer:
    """The job's viewer from the process-wide cache, loaded on first use (raises
    ViewerSourceError, SeriesError or StructureSetError, all UserErrors, when it cannot be)."""
    return _cache.get(job_id, ct_paths, rtstruct_path)
