"""Reviews: a structure set sent back becomes a pending review, and the worker's finding makes it done."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from pydicom.uid import RTStructureSetStorage
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from node.db.models import Instance, Job, Review, Series, utcnow
from node.lifecycle.events import add_event
from node.vocabulary import EventKind, ReviewKind, ReviewStatus

log = logging.getLogger(__package__)


def submit_reviews(engine: Engine, series_instance_uid: str) -> int | None:
    """A quiet series of RT Structure Sets (a planning system or PACS sending a reviewed set back)
    gets no job: each structure set not seen before becomes a pending review, for the worker to
    match and measure. Returns how many; None when the series holds anything else."""
    with Session(engine) as session, session.begin():
        instances = session.scalars(
            select(Instance).join(Series).where(Series.series_instance_uid == series_instance_uid).order_by(Instance.id)
        ).all()
        if not instances or {i.sop_class_uid for i in instances} != {RTStructureSetStorage}:
            return None
        seen = set(session.scalars(select(Review.instance_id).where(Review.instance_id.in_([i.id for i in instances]))))
        new = [i for i in instances if i.id not in seen]
        for instance in new:
            session.add(
                Review(
                    instance=instance,
                    sop_instance_uid=instance.sop_instance_uid,
                    status=ReviewStatus.PENDING,
                    calling_ae_title=instance.calling_ae_title,
                    received_at=instance.received_at,
                )
            )
            log.info("structure set %s from %s: review pending", instance.sop_instance_uid, instance.calling_ae_title)
        return len(new)


def next_pending_review(engine: Engine) -> int | None:
    with Session(engine) as session:
        return session.scalars(
            select(Review.id).where(Review.status == ReviewStatus.PENDING).order_by(Review.received_at, Review.id).limit(1)
        ).first()


@dataclass(frozen=True)
class ReviewFigures:
    """The reviewed ROI against the auto-contour the job sent, on the job's CT."""

    dice: float
    hd95_mm: float
    surface_dice: float
    surface_tolerance_mm: float
    auto_volume_cm3: float
    reviewed_volume_cm3: float
    added_cm3: float  # reviewed, not in the auto-contour
    removed_cm3: float  # in the auto-contour, not reviewed

    def summary(self) -> str:
        return (
            f"Dice {self.dice:.3f}, HD95 {self.hd95_mm:.1f} mm, surface Dice {self.surface_dice:.3f} at "
            f"{self.surface_tolerance_mm:g} mm, {self.added_cm3:.1f} cm3 added, {self.removed_cm3:.1f} cm3 removed"
        )


@dataclass(frozen=True)
class StructureFigures:
    """One auto structure against the ROI of the same name (case-insensitive) in the reviewed set: what the
    clinic changed of each organ and target, not only of the one target ROI."""

    roi_name: str  # as the auto structure set names it
    dice: float
    hd95_mm: float
    surface_dice: float
    added_cm3: float
    removed_cm3: float
    # Slices (from 0 along the CT) where the outline moved beyond the surface tolerance; and what the job said of
    # the auto structure beforehand (None, []: nothing recorded), to see how well the confidence foretold the edit.
    edited_slices: list[int] = field(default_factory=list)
    confidence: float | None = None
    flagged_slices: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, roi_name: str, figures: ReviewFigures, edited_slices: list[int] = (), recorded: dict | None = None
           ) -> StructureFigures:
        recorded = recorded or {}
        return cls(roi_name, figures.dice, figures.hd95_mm, figures.surface_dice, figures.added_cm3, figures.removed_cm3,
                   list(edited_slices), recorded.get("confidence"), list(recorded.get("flagged_slices") or []))


@dataclass(frozen=True)
class ReviewFinding:
    """What the worker found a received structure set to be."""

    kind: ReviewKind
    reason: str
    job_id: int | None = None
    approval_status: str = ""
    structure_set_label: str = ""
    structure_set_date: str = ""
    roi_name: str = ""
    figures: ReviewFigures | None = None
    structures: tuple[StructureFigures, ...] = ()  # in the auto structure set's ROI order


def record_review(engine: Engine, review_id: int, finding: ReviewFinding) -> None:
    """pending -> done, with what it is, why, and its figures; in the matched job's log too."""
    with Session(engine) as session, session.begin():
        review = session.get(Review, review_id)
        if review.status != ReviewStatus.PENDING:
            return
        review.status, review.kind, review.reason, review.job_id = ReviewStatus.DONE, finding.kind, finding.reason, finding.job_id
        review.approval_status = finding.approval_status[:16]
        review.structure_set_label, review.structure_set_date = finding.structure_set_label[:64], finding.structure_set_date[:8]
        review.roi_name, review.measured_at = finding.roi_name[:64], utcnow()
        if finding.figures is not None:
            for name, value in asdict(finding.figures).items():
                setattr(review, name, value)
        review.structures = [asdict(structure) for structure in finding.structures]
        detail = f"{finding.kind}: {finding.figures.summary() if finding.figures else finding.reason}"
        if finding.job_id is None:
            log.info("structure set %s: %s", review.sop_instance_uid, detail)
        else:
            job = session.get(Job, finding.job_id)
            add_event(session, job, EventKind.REVIEW_RECEIVED, f"structure set {review.sop_instance_uid}: {detail}")
