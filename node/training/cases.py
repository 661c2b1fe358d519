"""Where contoured CTs come from for training and evaluation: generated phantoms, or a
clinic's archive of CT series with the RT Structure Sets its doctors drew.

An archive folder holds one or more RT Structure Sets and, in it or below it, the CT series
they reference (plans, dose grids and other series beside them are left alone). Only contours
a human stands behind become labels: structure sets marked REJECTED are skipped, and so are
ROIs generated AUTOMATIC (this node's own output, or any other auto-contouring) unless their
structure set is APPROVED, so the model never learns from unreviewed machine output.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread

from node.imaging.volume import SeriesError, Volume, load_volume, read_datasets
from node.rtstruct.reader import StructureSetError, read_masks
from node.synth.ct_series import ct_datasets
from node.synth.phantom import make_phantom

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ContouredCT:
    name: str
    volume: Volume
    ctv: np.ndarray  # bool, on the volume's grid


def phantom_cts(seeds: list[int]) -> Iterator[ContouredCT]:
    """Phantoms through their DICOM headers and the Volume loader, as the node would receive them."""
    for seed in seeds:
        phantom = make_phantom(seed)
        yield ContouredCT(f"phantom-{seed}", load_volume(ct_datasets(phantom.hu, phantom.geometry, phantom.patient)), phantom.ctv)


def archive_folders(root: Path) -> list[Path]:
    """Folders under `root` that hold an RT Structure Set (sorted, so folds are reproducible)."""
    return sorted({path.parent for path in root.rglob("*") if path.is_file() and _is_structure_set(path)})


def archive_cts(folders: list[Path], roi_pattern: str) -> Iterator[ContouredCT]:
    """For each structure set in each folder: the CT series it references (a folder may also
    hold other series, dose grids and plans) with its first ROI matching `roi_pattern`."""
    pattern = re.compile(roi_pattern)
    for folder in folders:
        series: dict[str, list[Dataset]] = defaultdict(list)
        for ds in read_datasets(folder.rglob("*")):
            series[str(ds.get("SeriesInstanceUID", ""))].append(ds)
        volumes: dict[str, Volume] = {}
        for path in sorted(p for p in folder.iterdir() if p.is_file() and _is_structure_set(p)):
            rtstruct = dcmread(path)
            if str(rtstruct.get("ApprovalStatus", "")).upper() == "REJECTED":
                log.warning("skipping %s: its ApprovalStatus is REJECTED", path)
                continue
            uid = _referenced_series(rtstruct)
            if uid not in series:
                log.warning("skipping %s: the CT series it references (%s) is not in %s", path, uid, folder)
                continue
            if uid not in volumes:
                try:
                    volumes[uid] = load_volume(series[uid])
                except SeriesError as exc:
                    log.warning("skipping %s: %s", path, exc)
                    continue
            volume = volumes[uid]
            wanted = {n for n, name in _trusted_rois(rtstruct, path).items() if pattern.search(name)}
            try:
                masks = [m for m in read_masks(rtstruct, volume) if m.number in wanted and m.voxel_count]
            except StructureSetError as exc:
                log.warning("skipping %s: %s", path, exc)
                continue
            if not masks:
                log.warning("skipping %s: no contoured ROI that is approved or not AUTOMATIC matches %r", path, roi_pattern)
                continue
            yield ContouredCT(f"{folder.name}:{masks[0].name}", volume, masks[0].mask)


def _referenced_series(rtstruct: Dataset) -> str | None:
    for frame in rtstruct.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for item in study.get("RTReferencedSeriesSequence", []):
                return str(item.SeriesInstanceUID)
    return None


def _trusted_rois(rtstruct: Dataset, path: Path) -> dict[int, str]:
    approved = str(rtstruct.get("ApprovalStatus", "")).upper() == "APPROVED"
    rois = {}
    for item in rtstruct.get("StructureSetROISequence", []):
        if not approved and str(item.get("ROIGenerationAlgorithm", "")).upper() == "AUTOMATIC":
            log.info("not learning from %s ROI %r: generated AUTOMATIC and not approved", path, str(item.ROIName))
        else:
            rois[int(item.ROINumber)] = str(item.ROIName)
    return rois


def _is_structure_set(path: Path) -> bool:
    try:
        return dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality") == "RTSTRUCT"
    except Exception:  # whatever cannot be read is not a structure set to learn from
        return False
