"""One writer of what a contouring run makes: the RT Structure Set, and beside it the NIfTI
mask, the DICOM SEG and the QA picture. The worker, `rtnode contour` and `rtnode rtstruct`
all write through it, so what the node sends and what the CLI writes cannot drift apart.
`ContourReport` words what `rtnode contour` made, or that it found nothing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from node.imaging.dicomfile import save_dataset
from node.imaging.nifti import write_mask
from node.imaging.qa import write_montage
from node.imaging.volume import Volume
from node.rtstruct.builder import Algorithm, Roi, SeriesInfo, build_rtstruct
from node.rtstruct.contours import contours_from_mask
from node.rtstruct.seg import build_seg
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
class Outputs:
    paths: dict[OutputKind, Path]
    sop_instance_uids: dict[OutputKind, str]  # of the DICOM outputs
    timings: dict[str, float] = field(default_factory=dict)  # "rtstruct", and "outputs" for the rest
    simplified: tuple[str, ...] = ()  # each contour written with fewer points than traced, and within what


def auto_contour_series(version: int, algorithm: Algorithm, supersedes: int | None = None) -> SeriesInfo:
    """Label and description of version `version` of a series' auto-contour: UNAPPROVED, the
    model named, and the version it supersedes at the planning system (None: none was delivered)."""
    label = "AUTO_CTV" if version == 1 else f"AUTO_CTV_V{version}"[:16]
    replaced = f", supersedes v{supersedes}" if supersedes is not None else ""
    description = f"UNAPPROVED auto-contour v{version}{replaced} ({algorithm.label})"[:64]
    return SeriesInfo(structure_set_label=label, series_description=description)


def write_outputs(
    volume: Volume,
    mask: np.ndarray,
    paths: OutputPaths,
    algorithm: Algorithm,
    roi_name: str = "CTV",
    series: SeriesInfo = SeriesInfo(),
) -> Outputs:
    """Raises EmptyMaskError (nothing is written) when the mask holds no voxel."""
    start = time.perf_counter()
    contours = contours_from_mask(volume, mask)
    rtstruct = build_rtstruct(volume, [Roi(roi_name, contours)], algorithm, series)
    save_dataset(rtstruct, paths.rtstruct)
    written = {OutputKind.RTSTRUCT: paths.rtstruct}
    uids = {OutputKind.RTSTRUCT: str(rtstruct.SOPInstanceUID)}
    timings = {"rtstruct": time.perf_counter() - start}

    start = time.perf_counter()
    if paths.mask is not None:
        write_mask(paths.mask, volume, mask)
        written[OutputKind.MASK] = paths.mask
    if paths.seg is not None:
        seg = build_seg(volume, mask, algorithm, label=roi_name)
        save_dataset(seg, paths.seg)
        written[OutputKind.SEG] = paths.seg
        uids[OutputKind.SEG] = str(seg.SOPInstanceUID)
    if paths.qa is not None:
        write_montage(paths.qa, volume, mask)
        written[OutputKind.QA] = paths.qa
    if len(written) > 1:
        timings["outputs"] = time.perf_counter() - start
    simplified = tuple(f"{roi_name}: {reduction.sentence()}" for reduction in contours.reductions)
    return Outputs(written, uids, timings, simplified)


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
