"""Every change of state of a job, a delivery or a review, and nowhere else.

Receiving decides *that* a series should be contoured (`submit_series`); the worker
claims jobs in arrival order (`claim_next`), never two running jobs of one series, and
records what it made (`record_outputs`) or why it failed (`fail_job`); the sender takes
pending deliveries (`due_deliveries`, `take_delivery`) and records each attempt's outcome
with backoff (`record_attempt`); an admin queues a delivery again by hand (`resend`); a
restart puts running jobs back in the queue (`recover_after_restart`). Workers on any number of
machines share the database: each holds what it took under a lease its heartbeat renews
(`heartbeat`), and what a lost worker held is taken back when the lease runs out (`expire_leases`). A structure set sent
back becomes a pending review (`submit_reviews`) that the worker classifies and measures
(`record_review`). Each transition is one transaction and an event in the job's log, in words
an admin understands.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path

from pydicom.uid import RTStructureSetStorage
from sqlalchemy import Engine, func, select, type_coerce, update
from sqlalchemy.orm import Session

from node.config import DeliverySection, Destination
from node.db.models import Delivery, Instance, Job, JobEvent, Review, Series, UTCDateTime, utcnow
from node.db.models import Worker as WorkerRow
from node.errors import UserError
from node.vocabulary import DeliveryStatus, EventKind, JobStatus, OutputKind, ReviewKind, ReviewStatus

log = logging.getLogger(__name__)

MAX_STARTS = 3  # a job that took the worker down this often is failed, not retried forever
DELIVERABLE = (OutputKind.RTSTRUCT, OutputKind.SEG)  # the outputs that go to destinations


def fingerprint(sop_instance_uids: Sequence[str]) -> str:
    ordered = sorted(sop_instance_uids)
    return hashlib.sha256(f"{len(ordered)}\n{chr(10).join(ordered)}".encode()).hexdigest()


def add_event(session: Session, job: Job, kind: EventKind, detail: str = "") -> None:
    session.add(JobEvent(job=job, at=utcnow(), event=kind.value, detail=detail))
    log.info("job %s (series %s v%d): %s %s", job.id, job.series.series_instance_uid, job.version, kind.value, detail)


@dataclass(frozen=True)
class Eligibility:
    eligible: bool
    reason: str = ""


EligibilityRule = Callable[[Series, Sequence[Instance]], Eligibility]


def submit_series(engine: Engine, series_instance_uid: str, eligibility_of: EligibilityRule) -> Job | None:
    """Queue (or reject) a new job version for a quiet series, if anything arrived since its last job.

    Slices that arrive while the latest job is still queued join it instead.
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
        if latest is not None and latest.status == JobStatus.QUEUED:
            if latest.input_fingerprint != fingerprint(uids):
                latest.input_uids, latest.input_fingerprint, latest.inputs_at = uids, fingerprint(uids), utcnow()
                add_event(session, latest, EventKind.INPUTS_UPDATED, f"{len(uids)} instances before the job started")
            return latest
        if latest is not None and newest_arrival <= latest.inputs_at:
            return None
        if latest is not None and latest.input_fingerprint == fingerprint(uids):
            latest.inputs_at = utcnow()
            repeat = f"the same {len(uids)} instances again: no new version (rtnode rerun makes one)"
            add_event(session, latest, EventKind.REPEAT, repeat)
            return None
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
        session.add(job)
        session.flush()
        if verdict.eligible:
            add_event(session, job, EventKind.QUEUED, f"{len(uids)} instances of series {series_instance_uid}")
        else:
            add_event(session, job, EventKind.REJECTED, verdict.reason)
        return job


@dataclass(frozen=True)
class WorkerIdentity:
    """Who holds a job or a delivery: unique across the machines that share the database."""

    host: str
    pid: int
    device: str

    @classmethod
    def this_process(cls, device: str) -> WorkerIdentity:
        return cls(socket.gethostname(), os.getpid(), device)

    @property
    def name(self) -> str:
        return f"{self.host}:{self.pid}"


def register_worker(engine: Engine, worker: WorkerIdentity) -> None:
    """A worker's row, new at every start (a process id can come back after a reboot)."""
    now = utcnow()
    with Session(engine) as session, session.begin():
        row = session.scalars(select(WorkerRow).where(WorkerRow.name == worker.name)).first()
        if row is None:
            row = WorkerRow(name=worker.name, host=worker.host, pid=worker.pid)
            session.add(row)
        row.device, row.started_at, row.heartbeat_at, row.stopped_at, row.current_job_id = worker.device, now, now, None, None


def heartbeat(engine: Engine, worker: WorkerIdentity, lease_seconds: float, stopped: bool = False) -> None:
    """Renew the leases of everything this worker holds; a worker that stops beating loses them."""
    now = utcnow()
    lease = now + timedelta(seconds=lease_seconds)
    with Session(engine) as session, session.begin():
        row = session.scalars(select(WorkerRow).where(WorkerRow.name == worker.name)).one()
        row.heartbeat_at = now
        row.current_job_id = session.scalars(
            select(Job.id).where(Job.worker == worker.name, Job.status == JobStatus.RUNNING)
        ).first()
        if stopped:
            row.stopped_at = now
        session.execute(
            update(Job).where(Job.worker == worker.name, Job.status == JobStatus.RUNNING).values(lease_expires_at=lease)
        )
        session.execute(
            update(Delivery)
            .where(Delivery.worker == worker.name, Delivery.attempt_started_at.is_not(None))
            .values(lease_expires_at=lease)
        )


def claim_next(engine: Engine, worker: WorkerIdentity, lease_seconds: float) -> int | None:
    """Take the oldest queued job whose series has none running, under a lease. Rows another
    worker is claiming are skipped (FOR UPDATE SKIP LOCKED on PostgreSQL; SQLite has one writer),
    and the conditional update makes a lost race a miss, never a double run. Returns its id."""
    with Session(engine) as session, session.begin():
        running_series = select(Job.series_id).where(Job.status == JobStatus.RUNNING)
        candidates = session.scalars(
            select(Job)
            .where(Job.status == JobStatus.QUEUED, Job.series_id.not_in(running_series))
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
                _finish(
                    session, job, JobStatus.FAILED, f"the worker stopped {MAX_STARTS} times while running this job: not retried"
                )
                continue
            add_event(session, job, EventKind.STARTED, f"attempt {job.starts} on {worker.name} ({worker.device})")
            return job.id
    return None


def _process_gone(name: str, wait_seconds: float) -> bool:
    """Whether `name` is a worker of this machine whose process has ended (a zombie counts as ended),
    waiting up to `wait_seconds` for a process that was just killed with its parent to go."""
    host, _, pid = name.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def recover_after_restart(engine: Engine) -> int:
    """At start-up, jobs held by workers of this machine that are gone go back to the queue at once
    (the node's own worker dies with it). A node restart is not the job's fault, so that attempt does
    not count toward MAX_STARTS. Jobs of other machines' workers are left to their leases.
    Send attempts that were on the wire are counted as failed attempts. Nothing is deleted."""
    with Session(engine) as session, session.begin():
        running = session.scalars(select(Job).where(Job.status == JobStatus.RUNNING)).all()
        holders = {job.worker for job in running} | set(
            session.scalars(select(Delivery.worker).where(Delivery.attempt_started_at.is_not(None))).all()
        )
        gone = {name for name in holders if not name or _process_gone(name, wait_seconds=5.0)}
        jobs = [job for job in running if job.worker in gone]
        for job in jobs:
            job.status, job.starts = JobStatus.QUEUED, max(job.starts - 1, 0)
            add_event(session, job, EventKind.REQUEUED, "the node restarted while this job ran (not counted as a crash)")
        _count_interrupted_sends(session, gone.__contains__)
        return len(jobs)


def requeue_after_worker_death(engine: Engine, worker_name: str, exit_status: int | None) -> int:
    """A worker process died while the node stayed up: its running job goes back to the queue, and
    this counts toward MAX_STARTS (a job that kills the worker every time must end)."""
    with Session(engine) as session, session.begin():
        jobs = session.scalars(select(Job).where(Job.status == JobStatus.RUNNING, Job.worker == worker_name)).all()
        for job in jobs:
            job.status = JobStatus.QUEUED
            detail = (
                f"the worker process stopped (status {exit_status}) while this job ran on {worker_name}:"
                f" attempt {job.starts} of {MAX_STARTS}"
            )
            add_event(session, job, EventKind.REQUEUED, detail)
        _count_interrupted_sends(session, lambda name: name == worker_name)
        return len(jobs)


def expire_leases(engine: Engine) -> int:
    """Jobs and sends whose worker stopped renewing its lease (killed, machine lost) are taken back,
    so another worker can take them over; like a worker death this counts toward MAX_STARTS."""
    now = utcnow()
    with Session(engine) as session, session.begin():
        jobs = session.scalars(
            select(Job).where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now).with_for_update(skip_locked=True)
        ).all()
        for job in jobs:
            job.status = JobStatus.QUEUED
            detail = f"the lease of worker {job.worker} expired while this job ran: attempt {job.starts} of {MAX_STARTS}"
            add_event(session, job, EventKind.REQUEUED, detail)
        _count_interrupted_sends(session, expired_before=now)
        return len(jobs)


def _count_interrupted_sends(
    session: Session, held_by: Callable[[str], bool] | None = None, expired_before: datetime | None = None
) -> None:
    """An attempt cut off with its worker counts: its delivery waits for the next one as after a failure.
    `held_by` picks the workers whose attempts were cut off (None: any whose lease expired)."""
    query = select(Delivery).where(Delivery.status == DeliveryStatus.PENDING, Delivery.attempt_started_at.is_not(None))
    if expired_before is not None:
        query = query.where(Delivery.lease_expires_at < expired_before)
    for delivery in session.scalars(query).all():
        if held_by is not None and not held_by(delivery.worker):
            continue
        delivery.attempts += 1
        delivery.attempt_started_at = None
        delivery.last_error = "the attempt was cut off: its worker stopped"
        delivery.next_attempt_at = utcnow()
        detail = f"{delivery.kind} to {delivery.destination}: attempt {delivery.attempts}"
        add_event(session, delivery.job, EventKind.SEND_INTERRUPTED, detail)


def rerun(engine: Engine, job_id: int) -> Job:
    """A new version of a job's series from the same instances, on purpose (a fixed model, a lost
    structure set); the usual supersede rules apply when it is contoured."""
    with Session(engine, expire_on_commit=False) as session, session.begin():
        job = session.get(Job, job_id)
        if job is None:
            raise UserError(f"no job {job_id}")
        if job.status == JobStatus.REJECTED:
            raise UserError(f"job {job_id} was rejected ({job.error}); a rerun would be rejected again")
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
        held = session.scalars(select(func.count(Instance.id)).where(inputs)).one()
        if held != len(job.input_uids):
            missing = len(job.input_uids) - held
            raise UserError(f"{missing} of job {job_id}'s input instances are no longer held: it cannot be re-run")
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
        session.add(new)
        session.flush()
        detail = f"asked for by hand: the {len(job.input_uids)} instances of job {job_id} (v{job.version})"
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


@dataclass(frozen=True)
class JobInputs:
    """What a claimed job computes from."""

    job_id: int
    series_instance_uid: str
    version: int
    attempt: int  # how many times a worker has taken the job up, this time included
    paths: list[Path]
    missing: int  # input instances no longer in the database, or removed by retention


def job_inputs(engine: Engine, job_id: int, held_by: str | None = None) -> JobInputs:
    """Raises LeaseLost when `held_by` no longer holds the job (another worker took it over)."""
    with Session(engine) as session:
        job = session.get(Job, job_id)
        _held(job, held_by)
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
        )


def set_model(engine: Engine, job_id: int, name: str, version: str, held_by: str | None = None) -> None:
    """The model a job ran, recorded as soon as it is known (failed jobs keep it too); fenced like the result."""
    with Session(engine) as session, session.begin():
        job = session.get(Job, job_id)
        _held(job, held_by)
        job.model_name, job.model_version = name, version


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {stage: round(seconds, 3) for stage, seconds in timings.items()}


def _finish(session: Session, job: Job, status: JobStatus, detail: str) -> None:
    job.status, job.finished_at = status, utcnow()
    if status == JobStatus.FAILED:
        job.error = detail
    add_event(session, job, EventKind(status.value), detail)


class LeaseLost(Exception):
    """This worker's lease ran out and another worker took the job: what this one made is not recorded."""


def _held(job: Job, held_by: str | None) -> None:
    """Fencing: only the worker that holds a running job records its end (None: a run without leases)."""
    if held_by is not None and (job.status != JobStatus.RUNNING or job.worker != held_by):
        raise LeaseLost(f"job {job.id} is no longer held by {held_by} (now {job.status} on {job.worker})")


def fail_job(engine: Engine, job_id: int, error: str, timings: dict[str, float], held_by: str | None = None) -> None:
    """The job ends `failed` with `error`, a sentence for the job log; its timings so far are kept."""
    with Session(engine) as session, session.begin():
        job = session.get(Job, job_id)
        _held(job, held_by)
        job.timings = _rounded(timings)
        _finish(session, job, JobStatus.FAILED, error)


def new_delivery(job: Job, destination: Destination, kind: OutputKind, path: str, sop_instance_uid: str) -> Delivery:
    """A pending delivery of one output of `job` to one configured destination, due now."""
    now = utcnow()
    ae_title, host, port = destination.address
    return Delivery(
        job=job,
        destination=destination.name,
        ae_title=ae_title,
        host=host,
        port=port,
        kind=kind.value,
        path=path,
        sop_instance_uid=sop_instance_uid,
        status=DeliveryStatus.PENDING,
        attempts=0,
        last_error="",
        next_attempt_at=now,
        created_at=now,
    )


def record_outputs(
    engine: Engine,
    job_id: int,
    outputs: dict[OutputKind, Path],
    sop_instance_uids: dict[OutputKind, str],
    timings: dict[str, float],
    destinations: Sequence[Destination],
    held_by: str | None = None,
) -> None:
    """A contoured job: its files, one delivery per deliverable output and destination, and older
    versions of its series superseded (their pending sends cancelled)."""
    with Session(engine) as session, session.begin():
        job = session.get(Job, job_id)
        _held(job, held_by)
        job.outputs = {kind.value: str(path) for kind, path in outputs.items()}
        job.timings = _rounded(timings)
        add_event(session, job, EventKind.CONTOURED, ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
        for destination in destinations:
            for kind, sop_instance_uid in sop_instance_uids.items():
                session.add(new_delivery(job, destination, kind, str(outputs[kind]), sop_instance_uid))
        _supersede_older(session, job)
        if destinations:
            job.status = JobStatus.SENDING
            add_event(session, job, EventKind.SENDING, ", ".join(d.name for d in destinations))
        else:
            _finish(session, job, JobStatus.DONE, "no destinations configured")


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
        _settle(session, previous)


def _settle(session: Session, job: Job) -> None:
    """A sending job is done when every live delivery is done, failed when one failed for good."""
    if job.status != JobStatus.SENDING:
        return
    live = [d for d in job.deliveries if d.status != DeliveryStatus.SUPERSEDED]
    if any(d.status == DeliveryStatus.PENDING for d in live):
        return
    failed = [d for d in live if d.status == DeliveryStatus.FAILED]
    if failed:
        _finish(session, job, JobStatus.FAILED, "; ".join(f"delivery to {d.destination} failed: {d.last_error}" for d in failed))
    elif live:
        _finish(session, job, JobStatus.DONE, f"delivered to {', '.join(sorted({d.destination for d in live}))}")
    else:
        _finish(session, job, JobStatus.DONE, "superseded by a newer version before delivery")


def resend(engine: Engine, job_id: int, destinations: Sequence[Destination], sop_instance_uid_of: Callable[[str], str]) -> int:
    """Queue new deliveries of a job's outputs by hand; returns how many.

    `sop_instance_uid_of(path)` reads an output file's SOP Instance UID.
    """
    with Session(engine) as session, session.begin():
        job = session.get(Job, job_id)
        if job is None:
            raise UserError(f"no job {job_id}")
        if OutputKind.RTSTRUCT not in job.outputs:
            raise UserError(f"job {job_id} has no RT Structure Set to send (status {job.status})")
        if job.outputs_removed_at is not None:
            removed = f"removed on {job.outputs_removed_at:%Y-%m-%d} by retention"
            raise UserError(f"job {job_id}'s outputs were {removed}: nothing to send")
        kinds = [kind for kind in DELIVERABLE if kind in job.outputs]
        for destination in destinations:
            for kind in kinds:
                path = job.outputs[kind]
                session.add(new_delivery(job, destination, kind, path, sop_instance_uid_of(path)))
        job.status, job.finished_at = JobStatus.SENDING, None
        add_event(session, job, EventKind.RESEND, f"queued by hand to {', '.join(d.name for d in destinations)}")
        return len(kinds) * len(destinations)


@dataclass(frozen=True)
class DeliveryOrder:
    """One pending delivery as the sender needs it: what to send where."""

    id: int
    destination: str
    ae_title: str
    host: str
    port: int
    kind: OutputKind
    path: Path


@dataclass(frozen=True)
class Outcome:
    """How one send attempt ended."""

    delivered: bool
    retry: bool  # only meaningful when not delivered: would waiting help?
    detail: str


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff of failed sends: first retry, doubling, capped; given up after max_age."""

    first_retry_seconds: float
    max_retry_seconds: float
    max_age_seconds: float

    @classmethod
    def from_config(cls, delivery: DeliverySection) -> RetryPolicy:
        return cls(delivery.first_retry_seconds, delivery.max_retry_seconds, delivery.max_age_seconds)

    def backoff(self, attempts: int) -> float:
        """Seconds before the next attempt after `attempts` failed ones."""
        return min(self.first_retry_seconds * 2 ** (attempts - 1), self.max_retry_seconds)

    def next_attempt(self, attempts: int, created_at: datetime, now: datetime) -> datetime | None:
        """When to try again, or None when the delivery has been failing for max_age already."""
        if (now - created_at).total_seconds() >= self.max_age_seconds:
            return None
        return now + timedelta(seconds=self.backoff(attempts))


def due_deliveries(engine: Engine) -> list[int]:
    with Session(engine) as session:
        return list(
            session.scalars(
                select(Delivery.id)
                .where(Delivery.status == DeliveryStatus.PENDING, Delivery.next_attempt_at <= utcnow())
                .order_by(Delivery.id)
            ).all()
        )


def take_delivery(engine: Engine, delivery_id: int, worker: WorkerIdentity, lease_seconds: float) -> DeliveryOrder | None:
    """The delivery, if it is still pending (a newer version may have superseded it meanwhile) and
    no other worker has it on the wire, marked as on the wire by this worker until `record_attempt`."""
    now = utcnow()
    with Session(engine) as session, session.begin():
        taken = session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id, Delivery.status == DeliveryStatus.PENDING, Delivery.attempt_started_at.is_(None))
            .values(attempt_started_at=now, worker=worker.name, lease_expires_at=now + timedelta(seconds=lease_seconds))
        )
        if taken.rowcount != 1:
            return None
        d = session.get(Delivery, delivery_id)
        return DeliveryOrder(d.id, d.destination, d.ae_title, d.host, d.port, OutputKind(d.kind), Path(d.path))


def record_attempt(engine: Engine, delivery_id: int, outcome: Outcome, seconds: float, policy: RetryPolicy) -> None:
    """Count the attempt: delivered, retried later with backoff, or failed for good; then settle the job."""
    with Session(engine) as session, session.begin():
        delivery = session.get(Delivery, delivery_id)
        job = delivery.job
        delivery.attempts += 1
        delivery.attempt_started_at = None
        now = utcnow()
        if outcome.delivered:
            delivery.status, delivery.delivered_at, delivery.last_error = DeliveryStatus.DONE, now, ""
            job.timings = {**job.timings, "send": round(job.timings.get("send", 0) + seconds, 3)}
            add_event(
                session, job, EventKind.DELIVERED, f"{delivery.kind} to {delivery.destination} (attempt {delivery.attempts})"
            )
        else:
            delivery.last_error = outcome.detail
            retry_at = policy.next_attempt(delivery.attempts, delivery.created_at, now) if outcome.retry else None
            if retry_at is not None:
                delivery.next_attempt_at = retry_at
                wait = (retry_at - now).total_seconds()
                add_event(session, job, EventKind.SEND_FAILED, f"{outcome.detail}; retry {delivery.attempts + 1} in {wait:.0f} s")
            else:
                delivery.status = DeliveryStatus.FAILED
                why = (
                    "gave up: delivery.max_age_seconds reached"
                    if outcome.retry
                    else "not retried: this will not improve by waiting"
                )
                add_event(session, job, EventKind.SEND_FAILED, f"{outcome.detail}; {why}")
        _settle(session, job)


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
        detail = f"{finding.kind}: {finding.figures.summary() if finding.figures else finding.reason}"
        if finding.job_id is None:
            log.info("structure set %s: %s", review.sop_instance_uid, detail)
        else:
            job = session.get(Job, finding.job_id)
            add_event(session, job, EventKind.REVIEW_RECEIVED, f"structure set {review.sop_instance_uid}: {detail}")
