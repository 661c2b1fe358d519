"""Learning from the clinic's edits: an RT Structure Set sent back to the node (the planning
system or PACS sending the reviewed set) is matched to the job whose auto-contour it reviews,
told apart from machine output, and measured against what that job sent; and the reviewed
cases are exported for training.

Matching goes through the CT series and Frame of Reference the structure set references and
the CT images it names: the newest job of that series made before it arrived, whose inputs hold
every referenced image, when the structure set has that series' Patient ID and Study Instance UID.
The auto-contour is read back from the job's rtstruct.dcm with the same reader as the review, so
both masks lie on the job's CT by the same rules (mask -> RT Structure Set -> mask is exact). The
target ROI (`feedback.target_roi_patterns`) is compared with the auto structure of its name, else
the first the patterns match, else the first; and every auto structure with the reviewed ROI of its name
(case-insensitive), so an edit of an organ at risk is measured as well as one of the CTV. Runs in
the worker process: the receiving side only records that a structure set came
(`lifecycle.reviews.submit_reviews`).
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from node.config import Config, FeedbackSection
from node.db.models import Delivery, Job, Review, Series
from node.imaging.metrics import dice, edited_slices, hd95, surface_dice
from node.imaging.volume import SeriesError, Volume, load_volume, read_datasets
from node.lifecycle.jobs import job_inputs
from node.lifecycle.reviews import ReviewFigures, ReviewFinding, StructureFigures, next_pending_review, record_review
from node.rtstruct.reader import RoiMask, StructureSetError, read_masks, roi_names
from node.vocabulary import OutputKind, ReviewKind

log = logging.getLogger(__name__)


def measure_next(engine: Engine, config: Config) -> bool:
    """Classify and measure the oldest pending review; False when none is pending. Never raises:
    whatever goes wrong is recorded with the review, and the worker goes on."""
    review_id = next_pending_review(engine)
    if review_id is None:
        return False
    try:
        finding = examine(engine, config.feedback, review_id)
    except Exception as exc:  # a bug or an input nobody foresaw must not stop the worker
        log.exception("review %s could not be examined", review_id)
        finding = ReviewFinding(ReviewKind.UNREADABLE, f"internal error while examining it: {exc!r}")
    record_review(engine, review_id, finding)
    return True


def examine(engine: Engine, feedback: FeedbackSection, review_id: int) -> ReviewFinding:
    with Session(engine) as session:
        review = session.get(Review, review_id)
        sop_instance_uid, path, received_at = review.sop_instance_uid, review.instance.path, review.received_at
        removed_at = review.instance.removed_at
    if removed_at is not None:
        removed = f"its file was removed on {removed_at:%Y-%m-%d} by retention before it was read"
        return ReviewFinding(ReviewKind.UNREADABLE, removed)
    try:
        ds = dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        return ReviewFinding(ReviewKind.UNREADABLE, f"the file cannot be read: {exc}")
    finding = _judge(engine, feedback, ds, sop_instance_uid, received_at)
    return replace(
        finding,
        approval_status=str(ds.get("ApprovalStatus", "")),
        structure_set_label=str(ds.get("StructureSetLabel", "")),
        structure_set_date=str(ds.get("StructureSetDate", "")),
    )


@dataclass(frozen=True)
class TargetRoi:
    number: int
    name: str
    automatic: bool  # ROIGenerationAlgorithm AUTOMATIC


def _judge(engine: Engine, feedback: FeedbackSection, ds: Dataset, sop_instance_uid: str, received_at: datetime) -> ReviewFinding:
    with Session(engine) as session:
        own = session.scalars(select(Delivery.job_id).where(Delivery.sop_instance_uid == sop_instance_uid)).first()
        if own is not None:
            reason = f"rtnode's own RT Structure Set of job {own} (the same SOP Instance UID), not a human's review"
            return ReviewFinding(ReviewKind.NOT_A_REVIEW, reason, own)
        job = match_job(session, ds, received_at)
    if isinstance(job, str):
        return ReviewFinding(ReviewKind.UNMATCHED, job)
    approval = str(ds.get("ApprovalStatus", "")).upper()
    targets = target_rois(ds, feedback.target_roi_patterns)
    if not targets:
        names = ", ".join(map(repr, roi_names(ds))) or "none"
        reason = f"no ROI matches feedback.target_roi_patterns {feedback.target_roi_patterns} (its ROIs: {names})"
        return ReviewFinding(ReviewKind.UNREADABLE, reason, job.id)
    human = [t for t in targets if approval == "APPROVED" or not t.automatic]
    if not human:
        status = approval or "without ApprovalStatus"
        reason = f"ROI {targets[0].name!r} was generated AUTOMATIC and the structure set is {status}: not a human's review"
        return ReviewFinding(ReviewKind.NOT_A_REVIEW, reason, job.id, roi_name=targets[0].name)
    return _measure(engine, job.id, ds, human[0], feedback)


def _references(ds: Dataset) -> tuple[dict[str, str], set[str]]:
    """(referenced series UID -> its Frame of Reference UID, the SOP Instance UIDs of the images referenced)."""
    series, images = {}, set()
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for item in study.get("RTReferencedSeriesSequence", []):
                series[str(item.get("SeriesInstanceUID", ""))] = str(frame.get("FrameOfReferenceUID", ""))
                images |= {str(i.ReferencedSOPInstanceUID) for i in item.get("ContourImageSequence", [])}
    for roi in ds.get("ROIContourSequence", []):
        for contour in roi.get("ContourSequence", []):
            images |= {str(i.ReferencedSOPInstanceUID) for i in contour.get("ContourImageSequence", [])}
    return series, images


def match_job(session: Session, ds: Dataset, received_at: datetime) -> Job | str:
    """The job whose auto-contour this structure set reviews, else why there is none."""
    referenced, images = _references(ds)
    if not referenced:
        return "it references no CT series (no RT Referenced Series Sequence)"
    reasons = []
    for series_uid, frame_uid in referenced.items():
        jobs = session.scalars(
            select(Job).join(Series).where(Series.series_instance_uid == series_uid, Job.created_at <= received_at)
            .order_by(Job.version.desc())
        ).all()
        made = [job for job in jobs if OutputKind.RTSTRUCT in job.outputs]
        series = made[0].series if made else None
        if series is None:
            reasons.append(f"no auto-contour for series {series_uid}")
        elif differing := _differing_identity(ds, series):
            reasons.append(f"its {differing} is not that of series {series_uid}: no review of job {made[0].id}")
        elif frame_uid and series.frame_of_reference_uid not in ("", frame_uid):
            reasons.append(f"it is in Frame of Reference {frame_uid}, series {series_uid} in {series.frame_of_reference_uid}")
        elif covering := [job for job in made if images <= set(job.input_uids)]:
            return covering[0]
        else:
            unknown = len(images - set(made[0].input_uids))
            reasons.append(f"it references {unknown} images that no auto-contour of series {series_uid} was made from")
    return "; ".join(reasons)


def _differing_identity(ds: Dataset, series: Series) -> str:
    """Which of Patient ID and Study Instance UID differs from the series' ("" when neither): another
    patient's contours on this CT would be a wrong label in training. Named, not quoted: the reason is logged."""
    if str(ds.get("PatientID", "")).strip() != series.study.patient_id:
        return "Patient ID"
    if str(ds.get("StudyInstanceUID", "")).strip() != series.study.study_instance_uid:
        return "Study Instance UID"
    return ""


def target_rois(ds: Dataset, patterns: list[str]) -> list[TargetRoi]:
    """The ROIs whose name matches one of the patterns (case-insensitive), in the structure set's order."""
    regexes = [re.compile(p, re.IGNORECASE) for p in patterns]
    return [
        TargetRoi(int(item.ROINumber), str(item.ROIName), str(item.get("ROIGenerationAlgorithm", "")).upper() == "AUTOMATIC")
        for item in ds.get("StructureSetROISequence", [])
        if any(r.search(str(item.get("ROIName", ""))) for r in regexes)
    ]


def _only(ds: Dataset, number: int) -> Dataset:
    """The structure set reduced to one ROI: another ROI's bad contour must not spoil this one's reading."""
    subset = Dataset()
    subset.SOPClassUID = ds.SOPClassUID
    subset.StructureSetROISequence = DicomSequence([i for i in ds.StructureSetROISequence if int(i.ROINumber) == number])
    subset.ROIContourSequence = DicomSequence(
        [i for i in ds.get("ROIContourSequence", []) if int(i.ReferencedROINumber) == number]
    )
    return subset


def _measure(engine: Engine, job_id: int, ds: Dataset, target: TargetRoi, feedback: FeedbackSection) -> ReviewFinding:
    def unreadable(reason: str) -> ReviewFinding:
        return ReviewFinding(ReviewKind.UNREADABLE, reason, job_id, roi_name=target.name)

    inputs = job_inputs(engine, job_id)
    if inputs.missing:
        return unreadable(f"{inputs.missing} CT instances of job {job_id} are no longer held: nothing to compare on")
    with Session(engine) as session:
        job = session.get(Job, job_id)
        auto_path, removed_at, version = Path(job.outputs[OutputKind.RTSTRUCT]), job.outputs_removed_at, job.version
        recorded = {_same_name(s["roi_name"]): s for s in job.structures or []}
    if removed_at is not None:
        return unreadable(f"the auto-contour of job {job_id} was removed on {removed_at:%Y-%m-%d} by retention")
    try:
        volume = load_volume(read_datasets(inputs.paths))
        auto_structures = read_masks(dcmread(auto_path), volume)
    except (SeriesError, StructureSetError, InvalidDicomError, OSError) as exc:
        return unreadable(f"the CT or auto-contour of job {job_id} cannot be read: {exc}")
    reviewed = _reviewed_mask(ds, target.number, target.name, volume, job_id)
    if isinstance(reviewed, str):
        return unreadable(reviewed)
    edited = _edited_auto_structure(auto_structures, target.name, feedback.target_roi_patterns)
    figures = _figures(edited.mask, reviewed, volume, feedback.surface_tolerance_mm)
    structures, not_measured = [], []
    for auto, number in _same_names(auto_structures, ds):
        if auto is edited and number == target.number:
            found, reviewed_mask = figures, reviewed  # the target, measured above
        else:
            reviewed_mask = _reviewed_mask(ds, number, auto.name, volume, job_id)
            if isinstance(reviewed_mask, str):
                not_measured.append(f"not measured: {reviewed_mask}")
                continue
            found = _figures(auto.mask, reviewed_mask, volume, feedback.surface_tolerance_mm)
        moved = edited_slices(auto.mask, reviewed_mask, volume.spacing, feedback.surface_tolerance_mm)
        structures.append(StructureFigures.of(auto.name, found, moved, recorded.get(_same_name(auto.name))))
    reason = "; ".join([
        f"ROI {target.name!r} against the auto-contour {edited.name!r} of job {job_id} (v{version})",
        f"structures measured by name: {', '.join(repr(s.roi_name) for s in structures) or 'none'}",
        *not_measured,
    ])
    return ReviewFinding(ReviewKind.REVIEW, reason, job_id, roi_name=target.name, figures=figures, structures=tuple(structures))


def _edited_auto_structure(auto_structures: list[RoiMask], reviewed_name: str, target_patterns: list[str]) -> RoiMask:
    """The auto structure a reviewed target ROI is an edit of: the one of its name (case-insensitive), else the
    first the target patterns match, else the first: a dosimetrist may save the CTV as "CTV_edited"."""
    regexes = [re.compile(p, re.IGNORECASE) for p in target_patterns]
    by_name = [auto for auto in auto_structures if _same_name(auto.name) == _same_name(reviewed_name)]
    by_pattern = [auto for auto in auto_structures if any(r.search(auto.name) for r in regexes)]
    return (by_name or by_pattern or auto_structures)[0]


def _same_name(roi_name: str) -> str:
    """What ROI names are compared by: the case of a name says nothing about the structure."""
    return roi_name.strip().lower()


def _same_names(auto_structures: list[RoiMask], ds: Dataset) -> list[tuple[RoiMask, int]]:
    """Each auto structure the reviewed set has an ROI of the same name for, with that ROI's number (the
    first, when two share the name), in the auto structure set's order."""
    numbers: dict[str, int] = {}
    for item in ds.get("StructureSetROISequence", []):
        numbers.setdefault(_same_name(str(item.get("ROIName", ""))), int(item.ROINumber))
    return [(auto, numbers[_same_name(auto.name)]) for auto in auto_structures if _same_name(auto.name) in numbers]


def _reviewed_mask(ds: Dataset, number: int, name: str, volume: Volume, job_id: int) -> np.ndarray | str:
    """A reviewed ROI's mask on the job's CT, read alone, else why it cannot be measured."""
    try:
        masks = read_masks(_only(ds, number), volume)
    except StructureSetError as exc:
        return f"it cannot be read on the CT of job {job_id}: {exc}"
    if not masks or not masks[0].voxel_count:
        return f"ROI {name!r} has no contour on the CT of job {job_id}"
    return masks[0].mask


def _figures(auto: np.ndarray, reviewed: np.ndarray, volume: Volume, tolerance_mm: float) -> ReviewFigures:
    cm3 = float(np.prod(volume.spacing)) / 1000
    return ReviewFigures(
        dice=dice(auto, reviewed),
        hd95_mm=hd95(auto, reviewed, volume.spacing),
        surface_dice=surface_dice(auto, reviewed, volume.spacing, tolerance_mm),
        surface_tolerance_mm=tolerance_mm,
        auto_volume_cm3=float(auto.sum()) * cm3,
        reviewed_volume_cm3=float(reviewed.sum()) * cm3,
        added_cm3=float((reviewed & ~auto).sum()) * cm3,
        removed_cm3=float((auto & ~reviewed).sum()) * cm3,
    )


@dataclass(frozen=True)
class ExportedCase:
    job_id: int
    folder: Path | None  # None: skipped
    detail: str  # what was written, or why not

    def line(self) -> str:
        return f"wrote {self.folder}: {self.detail}" if self.folder else f"skipped job {self.job_id}: {self.detail}"


def _exportable(approval: str, approved_only: bool) -> bool:
    return approval == "APPROVED" if approved_only else approval != "REJECTED"


def export_training(engine: Engine, out_dir: Path, *, approved_only: bool, since: datetime | None) -> list[ExportedCase]:
    """For each reviewed job, its CT series and its latest review's structure set in a folder of their
    own (OUT_DIR/job-<id>/ct/*.dcm, OUT_DIR/job-<id>/rtstruct.dcm): what `rtnode train --data` reads.
    Structure sets marked REJECTED are never exported; a case folder written before is replaced."""
    query = select(Review).where(Review.kind == ReviewKind.REVIEW).order_by(Review.received_at, Review.id)
    if since is not None:
        query = query.where(Review.received_at >= since)
    cases = []
    with Session(engine) as session:
        latest = {  # a job's later reviews replace its earlier ones
            review.job_id: review
            for review in session.scalars(query)
            if _exportable(review.approval_status.upper(), approved_only)
        }
        for job_id, review in latest.items():
            inputs = job_inputs(engine, job_id)
            if inputs.missing or review.instance.removed_at is not None:
                cases.append(ExportedCase(job_id, None, "its CT or its reviewed structure set is no longer held"))
                continue
            folder = out_dir / f"job-{job_id}"
            shutil.rmtree(folder, ignore_errors=True)
            (folder / "ct").mkdir(parents=True)
            for path in inputs.paths:
                shutil.copyfile(path, folder / "ct" / path.name)
            shutil.copyfile(review.instance.path, folder / "rtstruct.dcm")
            what = f"the {review.approval_status or 'reviewed'} structure set {review.sop_instance_uid}"
            detail = f"{len(inputs.paths)} CT slices and {what} (ROI {review.roi_name!r})"
            cases.append(ExportedCase(job_id, folder, detail))
    return cases
