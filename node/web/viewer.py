"""The review viewer's pictures: a job's CT slice by slice with the outline of every structure in
its colour, and coronal and sagittal views through the first structure (the CTV), as the routes
under /api/jobs/{id}/ serve them.

The structures are read back from the RT Structure Set the job sent (node.rtstruct.reader): their
names, their ROI Display Colors and their contours, not taken from the job's masks or its
database record, so the reviewer sees exactly what the planning system got, and a job from before
several structures (its record names none) shows its one ROI the same way. The CT and the
structure set are loaded once per job (`viewer_for` keeps the last few), so paging a slice costs a
window lookup, a fast PNG encode and a trace of the mask slices of the structures on it: a few
milliseconds for 512x512 (bench/bench_viewer.py).
"""

from __future__ import annotations

import dataclasses
import io
import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from scipy import ndimage

from node.errors import UserError
from node.imaging.volume import Volume, load_volume, read_datasets
from node.rtstruct.contours import trace_slice
from node.rtstruct.reader import RoiMask, StructureSetError, read_masks

PNG_COMPRESS_LEVEL = 1  # speed over size: a 512x512 slice encodes in a few ms, served on the local network
DEFAULT_RGB = (255, 48, 48)  # for an ROI whose ROI Display Color is missing or not three numbers 0-255
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


class UnknownStructureError(ViewerRequestError):
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
class StructureInfo:
    """One ROI of the structure set as the legend shows it. Slices count from 0 here, as the API's
    indices do; the page shows them from 1, as it shows the slice number."""

    index: int  # its place in the structure set: what outlines and a reformat's `hide` call it
    roi_name: str
    color: tuple[int, int, int]  # its ROI Display Color, checked to be three integers 0-255
    first_contour_slice: int | None  # None: the ROI has no contour on this CT
    last_contour_slice: int | None


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
    structures: list[StructureInfo]  # in the structure set's order
    contour_slices: list[int]  # the slices with a contour of any structure
    first_contour_slice: int | None
    last_contour_slice: int | None
    ctv_centre: CtvCentre | None  # the first contoured structure's: rtnode writes the target model's structures first
    presets: list[WindowPreset]
    default_preset: str
    planes: tuple[str, ...]
    last_slice_on_top: bool  # reformats put the most superior slice on top: then slice 0 is at the bottom


@dataclass(frozen=True)
class StructureOutline:
    """One structure on one slice as closed polygons of [x, y] points in image pixels: x along a
    row (column), y down a column (row), (0, 0) the top-left corner of the first pixel, so an SVG
    with viewBox "0 0 columns rows" lays them on the image. Holes are separate polygons: draw
    them with fill-rule evenodd."""

    structure: int  # StructureInfo.index
    polygons: list[list[list[float]]]


@dataclass(frozen=True)
class Outline:
    """Every structure with a contour on one slice, in the structure set's order: one request per
    slice whatever the number of structures, and the page shows or hides each without asking again."""

    index: int
    rows: int
    columns: int
    structures: list[StructureOutline]


class CroppedStructure:
    """One ROI's mask kept as its bounding box and what lies in it: a structure fills a small part
    of a CT, and the viewer keeps only that part of each."""

    def __init__(self, index: int, roi: RoiMask, color: tuple[int, int, int]):
        self.index, self.roi_name, self.color = index, roi.name, color
        self.box, self.crop = _crop(roi.mask)

    def polygons(self, k: int) -> list[list[list[float]]]:
        """The outline on slice `k` as [x, y] polygons (see StructureOutline)."""
        if self.box is None or not self.box[0].start <= k < self.box[0].stop:
            return []
        _, row_box, column_box = self.box
        return [
            (polygon[:, ::-1] + (column_box.start, row_box.start)).tolist()  # (row, column) -> [x, y]
            for polygon in trace_slice(self.crop[k - self.box[0].start])
        ]

    def plane(self, shape: tuple[int, int], axis: int, index: int) -> np.ndarray:
        """The mask on the plane `index` of array axis 1 (a row) or 2 (a column), full size."""
        plane = np.zeros(shape, dtype=bool)
        if self.box is not None and self.box[axis].start <= index < self.box[axis].stop:
            others = tuple(box for a, box in enumerate(self.box) if a != axis)
            plane[others] = np.take(self.crop, index - self.box[axis].start, axis=axis)
        return plane

    def contour_slices(self) -> list[int]:
        if self.box is None:
            return []
        return (np.flatnonzero(self.crop.any(axis=(1, 2))) + self.box[0].start).tolist()

    def centre(self) -> CtvCentre | None:
        if self.box is None:
            return None
        local = ndimage.center_of_mass(self.crop)
        return CtvCentre(*(int(round(c)) + box.start for c, box in zip(local, self.box, strict=True)))

    def info(self) -> StructureInfo:
        slices = self.contour_slices()
        return StructureInfo(
            self.index, self.roi_name, self.color, slices[0] if slices else None, slices[-1] if slices else None
        )


class JobViewer:
    """One job's CT and every structure of its sent structure set, ready to page through."""

    def __init__(self, ct_paths: Sequence[Path], rtstruct_path: Path):
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
        rois = read_masks(rtstruct, self.volume)
        if not rois:
            raise StructureSetError(f"the RT Structure Set {self.rtstruct_path} holds no ROI")
        colors = _display_colors(rtstruct)
        self.structures = [
            CroppedStructure(index, roi, colors.get(roi.number, DEFAULT_RGB)) for index, roi in enumerate(rois)
        ]
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
        drawn = [StructureOutline(s.index, polygons) for s in self.structures if (polygons := s.polygons(k))]
        return dataclasses.asdict(Outline(k, rows, columns, drawn))

    def reformat_png(self, plane: str, preset: str, hidden: Collection[int] = ()) -> bytes:
        """Coronal or sagittal plane through the CTV centre, the outline of each structure but the
        `hidden` ones burned in its colour (a later structure over an earlier one), stretched so that
        a millimetre is as long across as down (slices are thicker than pixels are wide)."""
        window = _preset(preset)
        if plane not in PLANES:
            raise UnknownPlaneError(f"no plane {plane!r}; planes are {', '.join(PLANES)}")
        unknown = sorted(set(hidden) - {s.index for s in self.structures})
        if unknown:
            raise UnknownStructureError(f"no structure {unknown[0]}; structures are 0 to {len(self.structures) - 1}")
        centre = self._info.ctv_centre or CtvCentre(self.slice_count // 2, self.volume.shape[1] // 2, self.volume.shape[2] // 2)
        axis, index = (1, centre.row) if plane == "coronal" else (2, centre.column)  # a row of every slice, or a column
        hu = np.take(self.volume.hu, index, axis=axis)
        across_mm = self.volume.pixel_spacing[1] if plane == "coronal" else self.volume.pixel_spacing[0]
        flip = slice(None, None, -1 if self._info.last_slice_on_top else 1)
        width = hu.shape[1]
        height = max(1, round(hu.shape[0] * self.volume.slice_spacing / across_mm))
        grey = Image.fromarray(_windowed(hu[flip], window)).resize((width, height), Image.Resampling.BILINEAR)
        rgb = np.repeat(np.asarray(grey)[..., None], 3, axis=2)
        for structure in self.structures:
            mask = structure.plane(hu.shape, axis, index)
            if structure.index in hidden or not mask.any():
                continue
            inside = np.asarray(Image.fromarray(mask[flip]).resize((width, height), Image.Resampling.NEAREST))
            rgb[inside & ~ndimage.binary_erosion(inside, iterations=OUTLINE_PIXELS)] = structure.color
        return _png(rgb)

    def _checked(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int | np.integer) or not 0 <= index < self.slice_count:
            raise SliceIndexError(f"no slice {index!r}: this series has slices 0 to {self.slice_count - 1}")
        return int(index)

    def _describe(self) -> SliceInfo:
        volume = self.volume
        contour_slices = sorted({k for structure in self.structures for k in structure.contour_slices()})
        thickness = volume.headers[0].get("SliceThickness")
        return SliceInfo(
            slice_count=volume.shape[0],
            rows=volume.shape[1],
            columns=volume.shape[2],
            pixel_spacing_mm=volume.pixel_spacing,
            slice_thickness_mm=float(thickness) if thickness not in (None, "") else round(volume.slice_spacing, 4),
            slice_spacing_mm=round(volume.slice_spacing, 4),
            z_positions_mm=[round(float(z), 3) for z in volume.positions[:, 2]],
            structures=[structure.info() for structure in self.structures],
            contour_slices=contour_slices,
            first_contour_slice=contour_slices[0] if contour_slices else None,
            last_contour_slice=contour_slices[-1] if contour_slices else None,
            ctv_centre=next(filter(None, (structure.centre() for structure in self.structures)), None),
            presets=list(PRESETS.values()),
            default_preset=DEFAULT_PRESET,
            planes=PLANES,
            last_slice_on_top=bool(volume.normal[2] > 0),
        )


def _display_colors(rtstruct: Dataset) -> dict[int, tuple[int, int, int]]:
    """Each ROI's ROI Display Color by ROI Number, only where it is three integers 0-255: the page
    writes a colour into a style, so nothing but three such numbers ever reaches it."""
    colors = {}
    for item in rtstruct.get("ROIContourSequence", []):
        try:
            number, values = int(item.ReferencedROINumber), [float(v) for v in item.get("ROIDisplayColor") or []]
        except (AttributeError, TypeError, ValueError):
            continue
        if len(values) == 3 and all(v.is_integer() and 0 <= v <= 255 for v in values):
            colors[number] = (int(values[0]), int(values[1]), int(values[2]))
    return colors


def _crop(mask: np.ndarray) -> tuple[tuple[slice, slice, slice] | None, np.ndarray]:
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
