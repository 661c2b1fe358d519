"""Jobs: a quiet series made into a job version (or reviews), claimed by one worker at a time under a
lease, ended with its outputs and their deliveries or with why it failed, superseded by a newer
version, re-run by hand, and its outputs marked removed by retention."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, Engine, func, select, type_coerce, update
from sqlalchemy.orm import Session

from node.db.models import Delivery, Instance, Job, Review, Series, UTCDateTime, utcnow
from node.destinations import Destination
from node.errors import UserError
from node.lifecycle.deliveries import (
    arrived_after_inputs,
    delivery_pending,
    new_delivery,
    queue_outputs,
    settle_sending_job,
    withdraw_unsent,
)
from node.lifecycle.events import add_event, finish_job
from node.lifecycle.reviews import submit_reviews
from node.lifecycle.workers import MAX_STARTS, WorkerIdentity
from node.routing import Eligibility, EligibilityRule
from node.vocabulary import DeliveryStatus, EventKind, JobStatus, OutputKind, RouteMode

# work in flight (a held job waits for an admin): its inputs and outputs are needed
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SENDING, JobStatus.HELD)


def fingerprint(sop_instance_uids: Sequence[str]) -> str:
    ordered = sorted(sop_instance_uids)
    return hashlib.sha256(f"{len(ordered)}\n{chr(10).join(ordered)}".encode()).hexdigest()


def submit_series(engine: Engine, series_instance_uid: str, eligibility_of: EligibilityRule) -> Job | None:
    """Queue (or reject) a new job version for a quiet series, if anything arrived since its last job.

    Slices that arrive while the latest job is still queued join it instead; while it runs, it runs again
    with them (what it made of fewer is never sent).
    """
    with Session(engine, expire_on_commit=False) as session, session.begin():
        series = session.scalars(select(Series).where(Series.series_instance_uid == series_instance_uid)).one_or_none()
        if series is None:
            return None
        held = select(Instance).where(Instance.series_id == series.id, Instance.removed_at.is_(None))
        instances = session.scalars(held).all()  # instances removed by retention are no input any more
        if not instances:
            return None
        latest = session.scalars(select(Job).where(Job.series_id == series.id).order_by(Job.version.desc()).limit(1)).first()
        newest_arrival = max(i.last_received_at for i in instances)
        uids = sorted(i.sop_instance_uid for i in instances)
        if latest is not None and latest.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            if latest.input_fingerprint != fingerprint(uids):
                latest.input_uids, latest.input_fingerprint = uids, fingerprint(uids)
                when = "while it ran: it runs again with them, and what it made so far is not sent" \
                    if latest.status == JobStatus.RUNNING else "before the job started"
                add_event(session, latest, EventKind.INPUTS_UPDATED, f"{len(uids)} instances {when}")
            latest.inputs_at = utcnow()  # the series is quiet: the job may start (again)
            return latest
        if latest is not None and newest_arrival <= latest.inputs_at:
            return None
        if latest is not None and latest.input_fingerprint == fingerprint(uids):
            latest.inputs_at = utcnow()  # what it made is of these very instances: its held sends may go
            repeat = f"the same {len(uids)} instances again: no new version (rtnode rerun makes one)"
            add_event(session, latest, EventKind.REPEAT, repeat)
            return None
        if latest is not None and latest.status == JobStatus.SENDING and _unsent_cancelled(session, latest):
            latest.input_uids, latest.input_fingerprint, latest.inputs_at = uids, fingerprint(uids), utcnow()
            latest.status, latest.starts = JobStatus.QUEUED, max(latest.starts - 1, 0)
            detail = f"{len(uids)} instances before its structure set was sent: nothing sent; it runs again with them"
            add_event(session, latest, EventKind.INPUTS_UPDATED, detail)
            return latest
        verdict = eligibility_of(series, instances)
        job = Job(
            series=series,
            version=(latest.version + 1) if latest else 1,
            status=JobStatus.QUEUED if verdict.eligible else JobStatus.REJECTED,
            error="" if verdict.eligible else verdict.reason,
            input_uids=uids,
            input_fingerprint=fingerprint(uids),
            inputs_at=utcnow(),
            created_at=utcnow(),
            finished_at=None if verdict.eligible else utcnow(),
        )
        _route(series, job, verdict)
        session.add(job)
        session.flush()
        if latest is not None and latest.status == JobStatus.SENDING:
            withdraw_unsent(session, latest, job)
        if verdict.eligible:
            add_event(session, job, EventKind.QUEUED, f"{len(uids)} instances of series {series_instance_uid}{_routed(job)}")
        else:
            add_event(session, job, EventKind.REJECTED, verdict.reason)
        return job


def _unsent_cancelled(session: Session, job: Job) -> bool:
    """A contoured job none of whose deliveries was ever attempted (they waited for its series to be quiet): they
    are cancelled, and True. False, with nothing changed, once any went out or is on the wire."""
    attempted = session.scalar(
        select(func.count(Delivery.id)).where(
            Delivery.job_id == job.id,
            Delivery.status.in_([DeliveryStatus.DONE, DeliveryStatus.FAILED]) | (Delivery.attempts > 0)
            | Delivery.attempt_started_at.is_not(None),
        )
    )
    if attempted:
        return False
    session.execute(
        update(Delivery)
        .where(Delivery.job_id == job.id, Delivery.status == DeliveryStatus.PENDING, Delivery.attempt_started_at.is_(None))
        .values(status=DeliveryStatus.SUPERSEDED)
        .execution_options(synchronize_session=False)
    )
    return True


def _route(series: Series, job: Job, verdict: Eligibility) -> None:
    """The series and its new job take the decision's route: its name, and what it names."""
    series.route, series.route_reason = (verdict.route.route if verdict.route else None), verdict.route_reason
    if verdict.eligible and verdict.route is not None:
        decision = verdict.route
        job.route, job.mode = decision.route, decision.mode
        job.models = list(decision.models) if decision.models is not None else None
        job.destinations = list(decision.destinations) if decision.destinations is not None else None


def _routed(job: Job) -> str:
    """The route of a queued job, for its log."""
    if job.route is None:
        return ""
    return f", route {job.route}" + (" (shadow: nothing will be sent)" if job.mode == RouteMode.SHADOW else "")


@dataclass(frozen=True)
class SettledSeries:
    """What a quiet series became: pending reviews of the structure sets it holds, or else a job."""

    reviews: int | None = None  # structure sets that became pending reviews; None: not a series of structure sets
    job: Job | None = None  # queued, rejected, or the queued one its new instances joined; None: nothing new


def settle_quiet_series(engine: Engine, series_instance_uid: str, eligibility_of: EligibilityRule) -> SettledSeries:
    """The one decision on a series that stopped arriving, for the completion timer and an upload alike:
    a series of structure sets sent back becomes pending reviews, any other series a job."""
    reviews = submit_reviews(engine, series_instance_uid)
    if reviews is not None:
        return SettledSeries(reviews=reviews)
    return SettledSeries(job=submit_series(engine, series_instance_uid, eligibility_of))


def claim_next(engine: Engine, worker: WorkerIdentity, lease_seconds: float) -> int | None:
    """Take the oldest queued job whose series has none running and is not arriving still, under a lease. Rows another
    worker is claiming are skipped (FOR UPDATE SKIP LOCKED on PostgreSQL; SQLite has one writer),
    and the conditional update makes a lost race a miss, never a double run. Returns its id."""
    with Session(engine) as session, session.begin():
        running_series = select(Job.series_id).where(Job.status == JobStatus.RUNNING)
        candidates = session.scalars(
            select(Job)
            .where(Job.status == JobStatus.QUEUED, Job.series_id.not_in(running_series), ~arrived_after_inputs())
            .order_by(Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).all()
        for job in candidates:
            now = utcnow()
            claimed = session.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == JobStatus.QUEUED)
                .values(
                    status=JobStatus.RUNNING,
                    started_at=now,
                    starts=Job.starts + 1,
                    worker=worker.name,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                )
            )
            if claimed.rowcount != 1:
                continue
            session.refresh(job)
            if job.starts > MAX_STARTS:
                finish_job(
                    session, job, JobStatus.FAILED, f"the worker stopped {MAX_STARTS} times while running this job: not retried"
                )
                continue
            add_event(session, job, EventKind.STARTED, f"attempt {job.starts} on {worker.name} ({worker.device})")
            return job.id
    return None


def rerun(engine: Engine, job_id: int, eligibility_of: EligibilityRule) -> Job:
    """A new version of a job's series from the same instances, on purpose (a fixed model, a lost
    structure set, changed routes): decided again as a quiet series is, so today's routes choose its
    models and destinations; the usual supersede rules apply when it is contoured."""
    with Session(engine, expire_on_commit=False) as session, session.begin():
        job = session.get(Job, job_id)
        if job is None:
            raise UserError(f"no job {job_id}")
        busy = session.scalars(
            select(Job).where(Job.series_id == job.series_id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
        ).first()
        if busy is not None:
            raise UserError(f"job {busy.id} of the same series is {busy.status}: wait for it to finish")
        inputs = Instance.sop_instance_uid.in_(job.input_uids)
        removed_at = session.scalars(select(func.max(Instance.removed_at)).where(inputs)).one()
        if removed_at is not None:
            removed = f"removed on {removed_at:%Y-%m-%d} by retention"
            raise UserError(f"job {job_id}'s input instances were {removed}: it cannot be re-run")
        instances = session.scalars(select(Instance).where(inputs)).all()
        if len(instances) != len(job.input_uids):
            missing = len(job.input_uids) - len(instances)
            raise UserError(f"{missing} of job {job_id}'s input instances are no longer held: it cannot be re-run")
        verdict = eligibility_of(job.series, instances)
        if not verdict.eligible:
            raise UserError(f"job {job_id} would be rejected again: {verdict.reason}")
        latest = session.scalars(select(func.max(Job.version)).where(Job.series_id == job.series_id)).one()
        now = utcnow()
        new = Job(
            series=job.series,
            version=latest + 1,
            status=JobStatus.QUEUED,
            error="",
            input_uids=list(job.input_uids),
            input_fingerprint=job.input_fingerprint,
            inputs_at=now,
            created_at=now,
        )
        _route(job.series, new, verdict)
        session.add(new)
        session.flush()
        detail = f"asked for by hand: the {len(job.input_uids)} instances of job {job_id} (v{job.version}){_routed(new)}"
        add_event(session, new, EventKind.RERUN, detail)
        return new


def series_needing_jobs(engine: Engine) -> list[str]:
    """Series with instances newer than their latest job (or no job): their timers died with the process.
    A series of structure sets whose every instance has its review needs nothing."""
    with Session(engine) as session:
        unreviewed = select(Instance.series_id).outerjoin(Review, Review.instance_id == Instance.id).where(Review.id.is_(None))
        latest_job = select(Job.series_id, func.max(Job.inputs_at).label("created")).group_by(Job.series_id).subquery()
        newest = (
            select(Instance.series_id, func.max(Instance.last_received_at).label("arrived"))
            .group_by(Instance.series_id)
            .subquery()
        )
        rows = session.execute(
            select(
                Series.series_instance_uid,
                type_coerce(newest.c.arrived, UTCDateTime()),
                type_coerce(latest_job.c.created, UTCDateTime()),
            )
            .join(newest, newest.c.series_id == Series.id)
            .outerjoin(latest_job, latest_job.c.series_id == Series.id)
            .where(Series.id.in_(unreviewed))
        ).all()
    return [uid for uid, arrived, created in rows if created is None or arrived > created]


class LeaseLost(Exception):
    """This worker's lease ran out and another worker took the job: what this one made is not recorded."""


def _require_holder(job: Job, held_by: str | None) -> None:
    """Fencing: only the worker that holds a running job records its end (None: a run without leases)."""
    if held_by is not None and (job.status != JobStatus.RUNNING or job.worker != held_by):
        raise LeaseLost(f"job {job.id} is no longer held by {held_by} (now {job.status} on {job.worker})")


@dataclass(frozen=True)
class JobInputs:
    """What a claimed job computes from."""

    job_id: int
    series_instance_uid: str
    version: int
    attempt: int  # how many times a worker has taken the job up, this time included
    paths: list[Path]
    missing: int  # input instances no longer in the database, or removed by retention
    supersedes: int | None  # the version of the series' latest earlier RT Structure Set a destination received
    models: tuple[str, ...] | None = None  # the route's models; None: every configured model
    fingerprint: str = ""  # of the inputs read: the job's own may change while it runs (more slices)


def _latest_delivered_version(session: Session, job: Job) -> int | None:
    """What a new version replaces at the planning system: an earlier version that was rejected, failed
    or never reached a destination replaces nothing there."""
    return session.scalars(
        select(func.max(Job.version))
        .join(Delivery, Delivery.job_id == Job.id)
        .where(
            Job.series_id == job.series_id, Job.version < job.version,
            Delivery.kind == OutputKind.RTSTRUCT, Delivery.status == DeliveryStatus.DONE,
        )
    ).one()


def job_inputs(engine: Engine, job_id: int, held_by: str | None = None) -> JobInputs:
    """Raises LeaseLost when `held_by` no longer holds the job (another worker took it over)."""
    with Session(engine) as session:
        job = session.get(Job, job_id)
        _require_holder(job, held_by)
        paths = session.scalars(
            select(Instance.path).where(Instance.sop_instance_uid.in_(job.input_uids), Instance.removed_at.is_(None))
        ).all()
        return JobInputs(
            job.id,
            job.series.series_instance_uid,
            job.version,
            job.starts,
            [Path(p) for p in paths],
            len(job.input_uids) - len(paths),
            _latest_delivered_version(session, job),
            tuple(job.models) if job.models is not None else None,
            job.input_fingerprint,
        )


def set_model(engine: Engine, job_id: int, name: str, version: str, held_by: str | None = None) -> None:
    """The model a job ran, recorded as soon as it is known (failed jobs keep it too); fenced like the result."""
    with Session(engine) as session, session.begin():
        job = session.get(Job, job_id)
        _require_holder(job, held_by)
        job.model_name, job.model_version = name, version


def give_back(engine: Engine, job_id: int, held_by: str, detail: str) -> bool:
    """A worker that cannot finish an attempt through no fault of the job puts it back in the queue; the
    attempt does not count toward MAX_STARTS. A job no longer held by `held_by` is left alone."""
    with Session(engine) as session, session.begin():
        job = session.get(Job, job_id)
        if job.status != JobStatus.RUNNING or job.worker != held_by:
            return False
        job.status, job.starts = JobStatus.QUEUED, max(job.starts - 1, 0)
        add_event(session, job, EventKind.REQUEUED, detail)
        return True


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {stage: round(seconds, 3) for stage, seconds in timings.items()}


def fail_job(engine: Engine, job_id: int, error: str, timings: dict[str, float], held_by: str | None = None) -> None:
    """The job ends `failed` with `error`, a sentence for the job log; its timings so far are kept."""
    with Session(engine) as session, session.begin():
        job = session.get(Job, job_id)
        _require_holder(job, held_by)
        job.timings = _rounded(timings)
        finish_job(session, job, JobStatus.FAILED, error)


def record_outputs(
    engine: Engine,
    job_id: int,
    outputs: dict[OutputKind, Path],
    sop_instance_uids: dict[OutputKind, str],
    timings: dict[str, float],
    destinations: Sequence[Destination],
    held_by: str | None = None,
    simplified: Sequence[str] = (),
    structures: Sequence[dict] = (),
    not_found: Sequence[str] = (),
    hold: str | None = None,
    computed_from: str | None = None,
) -> bool:
    """A contoured job: its files, one delivery per deliverable output and destination, and older
    versions of its series superseded (their pending sends cancelled). `simplified` names each contour
    written with fewer points than traced, for the reviewer; `structures` are the structure set's ROIs as
    `rtnode job --json` shows them; `not_found` names each structure a model found nothing of. `hold` (why, a
    sentence) holds a job that would be sent back as `held`, with no delivery, until `release` or `discard`.

    False, and nothing recorded, when the series grew while the job ran (its inputs are no longer
    `computed_from`, or instances arrived after them): the job is queued again, to run when the series is quiet.
    """
    with Session(engine) as session, session.begin():
        job = session.get(Job, job_id)
        _require_holder(job, held_by)
        grew = computed_from is not None and computed_from != job.input_fingerprint
        if grew or session.scalar(select(arrived_after_inputs().where(Job.id == job.id))):
            job.status, job.starts = JobStatus.QUEUED, max(job.starts - 1, 0)
            detail = "more instances of the series arrived while it ran: nothing of this run is sent; it runs again with them"
            add_event(session, job, EventKind.REQUEUED, detail)
            return False
        destinations = routed_destinations(job, destinations)
        job.outputs = {kind.value: str(path) for kind, path in outputs.items()}
        job.timings = _rounded(timings)
        job.structures = list(structures)
        add_event(session, job, EventKind.CONTOURED, ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
        for sentence in not_found:
            add_event(session, job, EventKind.STRUCTURE_NOT_FOUND, sentence)
        for sentence in simplified:
            add_event(session, job, EventKind.CONTOUR_SIMPLIFIED, sentence)
        for destination in destinations if not hold else ():
            for kind, sop_instance_uid in sop_instance_uids.items():
                session.add(new_delivery(job, destination, kind, str(outputs[kind]), sop_instance_uid))
        _supersede_older(session, job)
        if destinations and hold:
            job.status = JobStatus.HELD
            add_event(session, job, EventKind.HELD, hold)
        elif destinations:
            job.status = JobStatus.SENDING
            add_event(session, job, EventKind.SENDING, ", ".join(d.name for d in destinations))
        elif job.mode == RouteMode.SHADOW:
            finish_job(session, job, JobStatus.DONE, f"shadow route {job.route}: contoured and kept, nothing sent")
        else:
            finish_job(session, job, JobStatus.DONE, "no destinations configured")
        return True


def _held(session: Session, job_id: int, *, releasing: bool) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise UserError(f"no job {job_id}")
    if job.status != JobStatus.HELD:
        raise UserError(f"job {job_id} is {job.status}, not held: only a held job is released or discarded")
    if releasing and job.superseded_by is not None:
        raise UserError(f"job {job_id} is superseded by job {job.superseded_by}: discard it, or release that one")
    return job


def release(
    engine: Engine, job_id: int, destinations: Sequence[Destination], sop_instance_uid_of: Callable[[str], str], who: str
) -> int:
    """A held job is sent after all, by an admin's decision: its deliveries queued as contouring would have;
    returns how many. `sop_instance_uid_of(path)` reads an output file's SOP Instance UID."""
    with Session(engine) as session, session.begin():
        job = _held(session, job_id, releasing=True)
        destinations = routed_destinations(job, destinations)
        if not destinations:
            raise UserError(f"job {job_id}: none of the destinations it would go to is configured")
        queued = queue_outputs(session, job, destinations, sop_instance_uid_of)
        job.status = JobStatus.SENDING
        add_event(session, job, EventKind.RELEASED, f"by {who}: sent to {', '.join(d.name for d in destinations)}")
        return queued


def discard(engine: Engine, job_id: int, who: str, reason: str = "") -> None:
    """A held job is not sent: it ends failed, saying who discarded it and why."""
    with Session(engine) as session, session.begin():
        job = _held(session, job_id, releasing=False)
        sentence = f"held back for low confidence and discarded by {who}" + (f": {reason}" if reason else "") + "; nothing sent"
        add_event(session, job, EventKind.DISCARDED, f"by {who}")
        finish_job(session, job, JobStatus.FAILED, sentence)


def routed_destinations(job: Job, destinations: Sequence[Destination]) -> list[Destination]:
    """Of the configured destinations, those the job's route sends to: none for a shadow job."""
    if job.mode == RouteMode.SHADOW:
        return []
    return [d for d in destinations if job.destinations is None or d.name in job.destinations]


def _supersede_older(session: Session, job: Job) -> None:
    older = session.scalars(
        select(Job).where(Job.series_id == job.series_id, Job.version < job.version, Job.superseded_by.is_(None))
    ).all()
    for previous in older:
        if not previous.outputs:
            continue
        previous.superseded_by = job.id
        add_event(session, previous, EventKind.SUPERSEDED, f"by job {job.id} (v{job.version})")
        for delivery in previous.deliveries:
            if delivery.status == DeliveryStatus.PENDING:
                delivery.status = DeliveryStatus.SUPERSEDED
        settle_sending_job(session, previous)


def mark_outputs_removed(session: Session, job_id: int, at: datetime, detail: str, allowed: ColumnElement[bool]) -> bool:
    """Retention is about to delete a finished job's outputs: they are marked removed (in the caller's
    transaction, before the files go) and that goes in the job's log. One guarded UPDATE, so runs that
    overlap mark a job once: False when it is marked already, not finished, has a delivery pending, or
    `allowed` (the caller's own condition, checked in the same statement) no longer holds."""
    marked = session.execute(
        update(Job)
        .where(
            Job.id == job_id, Job.outputs_removed_at.is_(None), Job.finished_at.is_not(None),
            Job.status.not_in(ACTIVE), ~delivery_pending(job_id), allowed,
        )
        .values(outputs_removed_at=at)
        .execution_options(synchronize_session=False)
    )
    if not marked.rowcount:
        return False
    add_event(session, session.get(Job, job_id), EventKind.OUTPUTS_REMOVED, detail)
    return True
