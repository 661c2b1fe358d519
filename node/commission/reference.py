"""Which RT Structure Set of a past study is the clinical reference a model is measured against: what people
drew or approved. rtnode's own output is never it (a model compared with itself scores 1.0), nor a set whose ROIs
are all AUTOMATIC while it is UNAPPROVED (another machine's), nor a REJECTED one. Of the rest, APPROVED sets come
first, then the newest; the CT it references must be in the study.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom import Dataset

# What node/rtstruct/builder.py writes into every set rtnode makes, and node/outputs.py's auto_contour_series.
RTNODE_MANUFACTURER = "rtnode"
RTNODE_STRUCTURE_SET_NAME = "rtnode auto-contour"
_RTNODE_DESCRIPTION = re.compile(r"^UNAPPROVED auto-?contour", re.IGNORECASE)


@dataclass(frozen=True)
class Reference:
    dataset: Dataset
    ct_series_instance_uid: str

    @property
    def description(self) -> dict:
        ds = self.dataset
        return {
            "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
            "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
            "label": str(ds.get("StructureSetLabel", "")),
            "series_description": str(ds.get("SeriesDescription", "")),
            "manufacturer": str(ds.get("Manufacturer", "")),
            "approval_status": str(ds.get("ApprovalStatus", "")),
            "date": _when(ds)[:8],
        }


def referenced_ct_series(ds: Dataset) -> list[str]:
    return [
        str(item.get("SeriesInstanceUID", ""))
        for frame in ds.get("ReferencedFrameOfReferenceSequence", [])
        for study in frame.get("RTReferencedStudySequence", [])
        for item in study.get("RTReferencedSeriesSequence", [])
    ]


def made_by_rtnode(ds: Dataset) -> bool:
    return (
        str(ds.get("Manufacturer", "")).strip().lower() == RTNODE_MANUFACTURER
        or str(ds.get("StructureSetName", "")).strip().lower() == RTNODE_STRUCTURE_SET_NAME
        or bool(_RTNODE_DESCRIPTION.match(str(ds.get("SeriesDescription", ""))))
    )


def why_not(ds: Dataset, ct_series: set[str]) -> str | None:
    """Why this structure set cannot be the reference; None when it can."""
    label = repr(str(ds.get("StructureSetLabel", "")) or str(ds.get("SeriesDescription", "")) or "unnamed")
    approval = str(ds.get("ApprovalStatus", "")).strip().upper()
    if made_by_rtnode(ds):
        return f"structure set {label} is rtnode's own auto-contour (Manufacturer {str(ds.get('Manufacturer', ''))!r})"
    rois = list(ds.get("StructureSetROISequence", []))
    automatic = rois and all(str(r.get("ROIGenerationAlgorithm", "")).upper() == "AUTOMATIC" for r in rois)
    if automatic and approval != "APPROVED":
        return f"structure set {label} has only AUTOMATIC ROIs and is {approval or 'without ApprovalStatus'}: a machine's"
    if approval == "REJECTED":
        return f"structure set {label} is REJECTED"
    if not rois:
        return f"structure set {label} has no ROI"
    if not set(referenced_ct_series(ds)) & ct_series:
        return f"structure set {label} references no CT series of the study"
    return None


def _when(ds: Dataset) -> str:
    for date, time in (("StructureSetDate", "StructureSetTime"), ("InstanceCreationDate", "InstanceCreationTime"),
                       ("SeriesDate", "SeriesTime")):
        if ds.get(date):
            return f"{ds.get(date)}{str(ds.get(time, '') or '').split('.')[0]:0<6}"
    return ""


def choose_reference(structure_sets: list[Dataset], ct_series: set[str]) -> Reference | str:
    """The reference among the study's structure sets, else why there is none (every set's reason)."""
    usable, reasons = [], []
    for ds in structure_sets:
        reason = why_not(ds, ct_series)
        if reason is None:
            usable.append(ds)
        else:
            reasons.append(reason)
    if not usable:
        return "no usable clinical reference: " + "; ".join(reasons)
    usable.sort(key=lambda ds: (str(ds.get("ApprovalStatus", "")).upper() == "APPROVED", _when(ds)), reverse=True)
    best = usable[0]
    ct = next(uid for uid in referenced_ct_series(best) if uid in ct_series)
    return Reference(best, ct)


def roi_number(ds: Dataset, pattern: re.Pattern) -> tuple[int, str] | None:
    """The first ROI whose name the pattern finds (re.search), with its name."""
    for item in ds.get("StructureSetROISequence", []):
        name = str(item.get("ROIName", ""))
        if pattern.search(name):
            return int(item.ROINumber), name
    return None


def only_roi(ds: Dataset, number: int) -> Dataset:
    """The structure set reduced to one ROI, so another ROI's bad contour cannot spoil this one's reading."""
    subset = Dataset()
    subset.SOPClassUID = ds.SOPClassUID
    subset.StructureSetROISequence = [i for i in ds.StructureSetROISequence if int(i.ROINumber) == number]
    subset.ROIContourSequence = [i for i in ds.get("ROIContourSequence", []) if int(i.ReferencedROINumber) == number]
    return subset
