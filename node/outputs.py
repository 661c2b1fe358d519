"""One writer of what a contouring run makes: the RT Structure Set holding every structure the models
found, and beside it the NIfTI mask, the DICOM SEG and the QA picture. The worker, `rtnode contour` and
`rtnode rtstruct` all write through it, so what the node sends and what the CLI writes cannot drift apart.
`ContourReport` words what `rtnode contour` made, or that it found nothing."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from node.imaging.dicomfile import save_dataset
from node.imaging.nifti import write_mask
from node.imaging.qa import Outlined, write_montage
from node.imaging.volume import Volume
from node.pipeline.confidence import StructureConfidence
from node.pipeline.registry import BUILT_IN_COLOR, BUILT_IN_LABEL
from node.pipeline.structures import LabelMap, Structure
from node.rtstruct.builder import Algorithm, Roi, SeriesInfo, build_rtstruct
from node.rtstruct.contours import EmptyMaskError, contours_from_mask
from node.rtstruct.seg import Segment, build_seg
from node.vocabulary import OutputKind


@dataclass(frozen=True)
class OutputPaths:
    """Where each output goes; None: not written."""

    rtstruct: Path
    mask: Path | None = None
    seg: Path | None = None
    qa: Path | None = None

    @classmethod
    def in_directory(cls, directory: Path, *, seg: bool) -> OutputPaths:
        """A job's outputs in its own folder: everything, the SEG when asked for."""
        return cls(
            directory / "rtstruct.dcm", directory / "mask.nii.gz", directory / "seg.dcm" if seg else None, directory / "qa.png"
        )


@dataclass(frozen=True)
class FoundStructure:
    """A structure a model was run for, and the model its ROI names. The mask is made from the model's label
    map each time it is asked for and dropped after use: one whole-CT array per structure would add up over
    an organ model's dozens of labels."""

    structure: Structure
    algorithm: Algorithm
    label_map: LabelMap

    def mask(self) -> np.ndarray:
        return self.label_map.mask(self.structure)


@dataclass(frozen=True)
class WrittenStructure:
    """One ROI of the written structure set, as the job log shows it."""

    roi_name: str
    interpreted_type: str
    color: tuple[int, int, int]
    model: str
    model_version: str
    volume_cm3: float
    first_slice: int  # slice indices in the CT's order along its normal, from 0, as the viewer counts them
    last_slice: int
    confidence: StructureConfidence | None = None  # None: the model gave none

    @classmethod
    def measured(cls, volume: Volume, found: FoundStructure, mask: np.ndarray) -> WrittenStructure:
        occupied = np.flatnonzero(mask.any(axis=(1, 2)))
        structure = found.structure
        return cls(
            structure.roi_name, structure.interpreted_type, structure.color, found.algorithm.name, found.algorithm.version,
            round(float(mask_volume_cm3(volume, mask)), 3), int(occupied[0]), int(occupied[-1]),
            found.label_map.confidence.get(structure.label),
        )

    def to_json(self) -> dict:
        confidence = self.confidence.to_json() if self.confidence is not None else {"confidence": None, "flagged_slices": []}
        return {
            "roi_name": self.roi_name,
            "interpreted_type": self.interpreted_type,
            "color": list(self.color),
            "model": {"name": self.model, "version": self.model_version},
            "volume_cm3": self.volume_cm3,
            "first_slice": self.first_slice,
            "last_slice": self.last_slice,
            **confidence,
        }


@dataclass(frozen=True)
class Outputs:
    paths: dict[OutputKind, Path]
    sop_instance_uids: dict[OutputKind, str]  # of the DICOM outputs
    timings: dict[str, float] = field(default_factory=dict)  # "rtstruct", and "outputs" for the rest
    simplified: tuple[str, ...] = ()  # each contour written with fewer points than traced, and within what
    structures: tuple[WrittenStructure, ...] = ()  # in the structure set's ROI order
    not_found: tuple[str, ...] = ()  # each structure a model found nothing of, left out of the set


def auto_contour_series(version: int, algorithms: Sequence[Algorithm], supersedes: int | None = None) -> SeriesInfo:
    """Label and description of version `version` of a series' auto-contour: UNAPPROVED, the
    models named, and the version it supersedes at the planning system (None: none was delivered)."""
    label = "AUTO_CTV" if version == 1 else f"AUTO_CTV_V{version}"[:16]
    replaced = f", supersedes v{supersedes}" if supersedes is not None else ""
    made_by = ", ".join(algorithm.label for algorithm in algorithms)
    description = f"UNAPPROVED auto-contour v{version}{replaced} ({made_by})"[:64]
    return SeriesInfo(structure_set_label=label, series_description=description)


def _roi_numbers(shape: tuple[int, ...], written: Sequence[FoundStructure]) -> np.ndarray:
    """The NIfTI copy: each voxel holds the ROI Number of its structure (0: none; where structures overlap,
    the later one). With one structure, the binary mask."""
    numbers = np.zeros(shape, dtype=np.uint8)
    for number, found in enumerate(written, start=1):
        numbers[found.mask()] = number
    return numbers


def write_structure_set(
    volume: Volume, found: Sequence[FoundStructure], paths: OutputPaths, series: SeriesInfo = SeriesInfo()
) -> Outputs:
    """One RT Structure Set with every structure that holds a voxel, in the order given, and the other outputs
    asked for. A structure without one is left out and named in `not_found`; raises EmptyMaskError (nothing
    is written) when no structure holds a voxel."""
    start = time.perf_counter()
    rois, written, kept, not_found = [], [], [], []
    for item in found:
        mask = item.mask()
        structure = item.structure
        if not mask.any():
            not_found.append(
                f"{structure.roi_name}: {item.algorithm.label} found nothing of it (label {structure.label});"
                " left out of the structure set"
            )
            continue
        contours = contours_from_mask(volume, mask)
        measured = WrittenStructure.measured(volume, item, mask)
        rois.append(
            Roi(structure.roi_name, contours, structure.color, structure.interpreted_type, item.algorithm,
                observation_description(volume, measured.confidence))
        )
        written.append(measured)
        kept.append(item)
    if not rois:
        several = f"the masks of all {len(found)} structures are empty" if len(found) > 1 else "the mask is empty"
        raise EmptyMaskError(f"{several}: no structure to contour")
    rtstruct = build_rtstruct(volume, rois, series=series)
    save_dataset(rtstruct, paths.rtstruct)
    files = {OutputKind.RTSTRUCT: paths.rtstruct}
    uids = {OutputKind.RTSTRUCT: str(rtstruct.SOPInstanceUID)}
    timings = {"rtstruct": time.perf_counter() - start}

    start = time.perf_counter()
    if paths.mask is not None:
        write_mask(paths.mask, volume, _roi_numbers(volume.shape, kept))
        files[OutputKind.MASK] = paths.mask
    if paths.seg is not None:
        segments = [
            Segment(s.structure.roi_name, s.mask(), s.algorithm, s.structure.interpreted_type, s.structure.color) for s in kept
        ]
        seg = build_seg(volume, segments)
        save_dataset(seg, paths.seg)
        files[OutputKind.SEG] = paths.seg
        uids[OutputKind.SEG] = str(seg.SOPInstanceUID)
    if paths.qa is not None:
        first, last = min(s.first_slice for s in written), max(s.last_slice for s in written)
        write_montage(paths.qa, volume, first, last, (Outlined(s.mask(), s.structure.color) for s in kept))
        files[OutputKind.QA] = paths.qa
    if len(files) > 1:
        timings["outputs"] = time.perf_counter() - start
    simplified = tuple(f"{roi.name}: {reduction.sentence()}" for roi in rois for reduction in roi.contours.reductions)
    return Outputs(files, uids, timings, simplified, tuple(written), tuple(not_found))


def write_outputs(
    volume: Volume,
    mask: np.ndarray,
    paths: OutputPaths,
    algorithm: Algorithm,
    roi_name: str = "CTV",
    series: SeriesInfo = SeriesInfo(),
    confidence: StructureConfidence | None = None,
) -> Outputs:
    """One mask as one CTV (`rtnode rtstruct`, `rtnode contour`), with its confidence where the model gave one.
    Raises EmptyMaskError (nothing is written) when the mask holds no voxel."""
    structure = Structure(BUILT_IN_LABEL, roi_name, "CTV", BUILT_IN_COLOR)
    assessed = {BUILT_IN_LABEL: confidence} if confidence is not None else {}
    labels = LabelMap(np.asarray(mask, dtype=bool).view(np.uint8), {}, assessed)
    return write_structure_set(volume, [FoundStructure(structure, algorithm, labels)], paths, series)


def slice_ranges(slices: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted slice indices as runs: [3, 4, 5, 9] -> [(3, 5), (9, 9)]."""
    runs: list[tuple[int, int]] = []
    for index in sorted(slices):
        if runs and index == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    return runs


def observation_description(volume: Volume, confidence: StructureConfidence | None) -> str | None:
    """The ROI observation's description (ROIObservationDescription, ST): the confidence and the slices to review,
    by their index from 0 along the series and their position along it (mm), as a planning system shows them."""
    if confidence is None:
        return None
    text = f"rtnode confidence {confidence.confidence:.2f} (0-1; not a probability)"
    runs = slice_ranges(confidence.flagged_slices)
    if not runs:
        return text + "; no slice flagged"
    offsets = volume.slice_offsets
    words = [f"{a}-{b} ({offsets[a]:.1f} to {offsets[b]:.1f} mm)" if a != b else f"{a} ({offsets[a]:.1f} mm)" for a, b in runs]
    return (text + "; review slices " + ", ".join(words) + " (slice index from 0 along the series)")[:1024]


def mask_volume_cm3(volume: Volume, mask: np.ndarray) -> float:
    """The mask's volume, from the CT's voxel size."""
    return mask.sum() * np.prod(volume.spacing) / 1000


@dataclass(frozen=True)
class ContourReport:
    """How `rtnode contour` tells of a model's run on one CT: which model, on which device, and
    the seconds of each stage of inference."""

    model: str  # the model card's label
    device: str
    timings: dict[str, float]  # stage -> seconds

    def _timings_text(self) -> str:
        return "  ".join(f"{stage} {seconds:.2f}s" for stage, seconds in self.timings.items())

    def nothing_found(self, ct_dir: Path) -> str:
        return f"no CTV found in {ct_dir} by {self.model}: nothing written ({self._timings_text()})"

    def written(self, path: Path, roi_name: str, volume: Volume, mask: np.ndarray) -> str:
        cm3 = mask_volume_cm3(volume, mask)
        return f"wrote {path}: {roi_name} {cm3:.1f} cm3 by {self.model} on {self.device} ({self._timings_text()})"
