"""The job log for admins: what arrived, what ran, how long it took, what failed, and how the
clinic edited what was sent (reviews). Read only: changes of state are `node.lifecycle`'s."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, object_session, selectinload

from node.db.models import Job, Review
from node.vocabulary import DeliveryStatus, JobStatus, ReviewKind, RouteMode


def _iso(value) -> str | None:
    return None if value is None else value.isoformat()


def _removed_on(iso_time: str) -> str:
    return f"removed on {iso_time[:10]} by retention"


IN_ORDER = (Review.received_at, Review.id)  # reviews as they came


def job_json(job: Job, *, events: bool = False) -> dict:
    data = {
        "id": job.id,
        "series_instance_uid": job.series.series_instance_uid,
        "study_instance_uid": job.series.study.study_instance_uid,
        "patient_id": job.series.study.patient_id,
        "version": job.version,
        "status": job.status,
        "error": job.error or None,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "worker": job.worker or None,
        "instances": len(job.input_uids),
        "input_fingerprint": job.input_fingerprint,
        "model": {"name": job.model_name, "version": job.model_version} if job.model_name else None,
        "route": job.route,
        "mode": job.mode,
        "models": job.models,
        "destinations": job.destinations,
        "timings": job.timings,
        "outputs": job.outputs,
        "structures": job.structures,
        "outputs_removed_at": _iso(job.outputs_removed_at),
        "superseded_by": job.superseded_by,
        "deliveries": [
            {
                "destination": d.destination,
                "kind": d.kind,
                "status": d.status,
                "attempts": d.attempts,
                "last_error": d.last_error or None,
                "next_attempt_at": _iso(d.next_attempt_at) if d.status == DeliveryStatus.PENDING else None,
                "delivered_at": _iso(d.delivered_at),
                "sop_instance_uid": d.sop_instance_uid,
            }
            for d in job.deliveries
        ],
        "reviews": [
            review_json(r) for r in object_session(job).scalars(select(Review).where(Review.job_id == job.id).order_by(*IN_ORDER))
        ],
    }
    if events:
        data["events"] = [{"at": _iso(e.at), "event": e.event, "detail": e.detail} for e in job.events]
    return data


def list_jobs(engine: Engine, status: JobStatus | None = None, limit: int = 50) -> list[dict]:
    with Session(engine) as session:
        query = select(Job).options(selectinload(Job.deliveries)).order_by(Job.id.desc()).limit(limit)
        if status:
            query = query.where(Job.status == status)
        return [job_json(job) for job in session.scalars(query).all()]


def describe_job(engine: Engine, job_id: int) -> dict | None:
    with Session(engine) as session:
        job = session.get(Job, job_id)
        return None if job is None else job_json(job, events=True)


def summary_line(job: dict) -> str:
    timings = " ".join(f"{k}={v:.2f}s" for k, v in job["timings"].items())
    deliveries = ", ".join(f"{d['destination']}:{d['status']}({d['attempts']})" for d in job["deliveries"]) or "-"
    line = f"#{job['id']:<5} {job['status']:<9} v{job['version']} series ...{job['series_instance_uid'][-24:]}"
    if job["route"]:
        line += f"  route {job['route']}" + (" (shadow)" if job["mode"] == RouteMode.SHADOW else "")
    line += f"  {job['instances']:>4} slices"
    line += f"  {timings or '-'}  deliveries {deliveries}"
    if job["error"]:
        line += f"\n       error: {job['error']}"
    if job["outputs_removed_at"]:
        line += f"\n       outputs {_removed_on(job['outputs_removed_at'])}"
    return line



def detail_lines(job: dict) -> list[str]:
    """`rtnode job ID` as text: the job's fields, timings, outputs, deliveries and events. A field
    without a value (no error, not started yet) is left out rather than printed as None."""
    fields = {key: job[key] for key in ("id", "status", "version", "series_instance_uid", "patient_id", "instances",
                                        "input_fingerprint")}
    fields["model"] = f"{job['model']['name']} {job['model']['version']}" if job["model"] else None
    fields["route"] = f"{job['route']} ({job['mode']})" if job["route"] else None
    fields |= {key: job[key] for key in ("error", "created_at", "started_at", "finished_at", "superseded_by")}
    fields["timings"] = ", ".join(f"{k} {v:.2f}s" for k, v in job["timings"].items())
    lines = [f"{key:<20} {value}" for key, value in fields.items() if value not in (None, "")]
    lines += [f"output {kind:<13} {path}" for kind, path in job["outputs"].items()]
    lines += [f"structure            {structure_line(structure)}" for structure in job["structures"]]
    if job["outputs_removed_at"]:
        lines.append(f"outputs              {_removed_on(job['outputs_removed_at'])}")
    lines += [
        f"delivery             {d['kind']} -> {d['destination']}: {d['status']} after {d['attempts']} attempt(s)"
        + (f": {d['last_error']}" if d["last_error"] else "")
        for d in job["deliveries"]
    ]
    lines += [f"  {e['at']}  {e['event']:<12} {e['detail']}" for e in job["events"]]
    return lines


def structure_line(structure: dict) -> str:
    """One ROI of a job's structure set, in words: its name and type, its model, its volume and slices."""
    model = structure["model"]
    return (
        f"{structure['roi_name']} ({structure['interpreted_type']}) by {model['name']} {model['version']}:"
        f" {structure['volume_cm3']:.1f} cm3, slices {structure['first_slice']}-{structure['last_slice']}"
        + confidence_words(structure)
    )


def confidence_words(structure: dict) -> str:
    """`, confidence 0.82, review slices 31-40, 52` ("" for a job recorded before confidences were)."""
    if structure.get("confidence") is None:
        return ""
    runs: list[list[int]] = []
    for index in sorted(structure.get("flagged_slices") or []):
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    flagged = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)
    return f", confidence {structure['confidence']:.2f}" + (f", review slices {flagged}" if flagged else "")


REVIEW_FIGURES = ("dice", "hd95_mm", "surface_dice", "surface_tolerance_mm", "auto_volume_cm3", "reviewed_volume_cm3",
                  "added_cm3", "removed_cm3")


def review_json(review: Review) -> dict:
    job = review.job
    return {
        "id": review.id,
        "job_id": review.job_id,
        "sop_instance_uid": review.sop_instance_uid,
        "status": review.status,
        "kind": review.kind or None,
        "reason": review.reason or None,
        "approval_status": review.approval_status or None,
        "structure_set_label": review.structure_set_label or None,
        "structure_set_date": review.structure_set_date or None,
        "roi_name": review.roi_name or None,
        "calling_ae_title": review.calling_ae_title,
        **{name: getattr(review, name) for name in REVIEW_FIGURES},
        "structures": review.structures,
        "model": {"name": job.model_name, "version": job.model_version} if job and job.model_name else None,
        "received_at": _iso(review.received_at),
        "measured_at": _iso(review.measured_at),
    }


def list_reviews(engine: Engine) -> list[dict]:
    """Every structure set received back, in the order it came."""
    with Session(engine) as session:
        return [review_json(r) for r in session.scalars(select(Review).order_by(*IN_ORDER))]


@dataclass(frozen=True)
class ModelSummary:
    """How much the clinic changed the contours of one model version: the latest review of each job."""

    model: str
    cases: int
    median_dice: float
    median_surface_dice: float
    minor_edits: int  # cases whose surface Dice reaches feedback.minor_edit_surface_dice
    # How well the confidence foretold the edits, over the reviewed structures that recorded one: the rank
    # correlation of confidence with surface Dice (None: fewer than 3 such structures, or no spread), and of the
    # slices the reviewer edited, how many were flagged (None: none edited).
    rated_structures: int = 0
    confidence_rank_correlation: float | None = None
    edited_slices: int = 0
    edited_slices_flagged: int = 0

    def line(self) -> str:
        share = f"{self.minor_edits} of {self.cases} ({100 * self.minor_edits / self.cases:.0f}%)"
        line = (f"{self.model}: {self.cases} reviewed case{'s' if self.cases != 1 else ''}, median Dice {self.median_dice:.3f}, "
                f"median surface Dice {self.median_surface_dice:.3f}, edited little {share}")
        if self.rated_structures:
            rho = self.confidence_rank_correlation
            plural = "s" if self.rated_structures != 1 else ""
            line += (f"; confidence vs surface Dice over {self.rated_structures} structure{plural}: Spearman "
                     + (f"{rho:+.2f}" if rho is not None else "n/a (too few, or no spread)"))
            if self.edited_slices:
                flagged = f"{self.edited_slices_flagged} of {self.edited_slices}"
                line += f", edited slices flagged {flagged} ({100 * self.edited_slices_flagged / self.edited_slices:.0f}%)"
        return line


def _model(review: dict) -> str:
    return f"{review['model']['name']} {review['model']['version']}" if review["model"] else "unknown model"


def latest_reviews(reviews: list[dict]) -> dict[int, dict]:
    """Job id -> its latest review (kind review), in job order."""
    latest = {r["job_id"]: r for r in reviews if r["kind"] == ReviewKind.REVIEW}
    return dict(sorted(latest.items()))


def model_summaries(reviews: list[dict], minor_edit_surface_dice: float) -> list[ModelSummary]:
    by_model: dict[str, list[dict]] = {}
    for review in latest_reviews(reviews).values():
        by_model.setdefault(_model(review), []).append(review)
    summaries = []
    for model, cases in by_model.items():
        rated = [s for r in cases for s in r["structures"] if s.get("confidence") is not None]
        edited = sum(len(s.get("edited_slices") or []) for s in rated)
        flagged = sum(len(set(s.get("edited_slices") or []) & set(s.get("flagged_slices") or [])) for s in rated)
        summaries.append(ModelSummary(
            model, len(cases), median(r["dice"] for r in cases), median(r["surface_dice"] for r in cases),
            sum(r["surface_dice"] >= minor_edit_surface_dice for r in cases),
            len(rated), spearman([s["confidence"] for s in rated], [s["surface_dice"] for s in rated]), edited, flagged,
        ))
    return summaries


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on the ranks, ties averaged); None for fewer than 3 pairs or a
    constant side."""
    if len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / (sxx * syy) ** 0.5


def structure_figures_line(structure: dict) -> str:
    """One auto structure of a review against the reviewed ROI of its name, in words."""
    return (
        f"{structure['roi_name']}: Dice {structure['dice']:.3f}, HD95 {structure['hd95_mm']:.1f} mm, surface Dice "
        f"{structure['surface_dice']:.3f}, +{structure['added_cm3']:.1f} cm3, -{structure['removed_cm3']:.1f} cm3"
    )


def review_lines(reviews: list[dict], minor_edit_surface_dice: float) -> list[str]:
    """`rtnode reviews` as text: per job the latest review, the other structure sets, a summary per model version."""
    if not reviews:
        return ["no structure sets received back"]
    latest = latest_reviews(reviews)
    lines = ["latest review per job:"] if latest else []
    for job_id, r in latest.items():
        count = sum(other["job_id"] == job_id and other["kind"] == ReviewKind.REVIEW for other in reviews)
        lines.append(
            f"  job {job_id} ({_model(r)}): {r['approval_status'] or 'no ApprovalStatus'} {r['roi_name']!r} from "
            f"{r['calling_ae_title']} at {r['received_at'][:19]}: Dice {r['dice']:.3f}, HD95 {r['hd95_mm']:.1f} mm, surface "
            f"Dice {r['surface_dice']:.3f} at {r['surface_tolerance_mm']:g} mm, {r['auto_volume_cm3']:.1f} -> "
            f"{r['reviewed_volume_cm3']:.1f} cm3 (+{r['added_cm3']:.1f}, -{r['removed_cm3']:.1f})"
            + (f" [{count} reviews]" if count > 1 else "")
        )
        lines += [f"    {structure_figures_line(structure)}" for structure in r["structures"]]
    others = [r for r in reviews if r["kind"] != ReviewKind.REVIEW]
    lines += ["other structure sets received:"] if others else []
    for r in others:
        job = f" (job {r['job_id']})" if r["job_id"] else ""
        lines.append(f"  {r['sop_instance_uid']}{job} from {r['calling_ae_title']}: {r['kind'] or r['status']}"
                     + (f": {r['reason']}" if r["reason"] else ""))
    summaries = model_summaries(reviews, minor_edit_surface_dice)
    lines += [f"per model version (edited little: surface Dice at least {minor_edit_surface_dice:g}):"] if summaries else []
    lines += [f"  {summary.line()}" for summary in summaries]
    return lines
