"""Deliveries: the durable send queue of a job's outputs, each attempt's outcome with backoff, and
the sending job that ends when its last live delivery does."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, Engine, exists, select, update
from sqlalchemy.orm import Session

from node.config import DeliverySection
from node.db.models import Delivery, Instance, Job, utcnow
from node.destinations import DeliveryOrder, Destination, SendOutcome
from node.errors import UserError
from node.lifecycle.events import add_event, finish_job
from node.lifecycle.workers import WorkerIdentity
from node.vocabulary import DeliveryStatus, EventKind, JobStatus, OutputKind, RouteMode

DELIVERABLE = (OutputKind.RTSTRUCT, OutputKind.SEG)  # the outputs that go to destinations


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


def delivery_pending(job_id: int | ColumnElement[int]) -> ColumnElement[bool]:
    """SQL: a delivery of the job still waits to be sent (its outputs are still needed)."""
    return exists().where(Delivery.job_id == job_id, Delivery.status == DeliveryStatus.PENDING)


def settle_sending_job(session: Session, job: Job) -> None:
    """A sending job is done when each destination has each output, failed when one failed for good. A job
    that was done already (a resend by hand) is done again however the extra send ends: its contour reached
    the planning system before, and the failed delivery says what did not."""
    if job.status != JobStatus.SENDING:
        return
    live = [d for d in job.deliveries if d.status != DeliveryStatus.SUPERSEDED]
    if any(d.status == DeliveryStatus.PENDING for d in live):
        return
    delivered = {(d.destination, d.kind) for d in live if d.status == DeliveryStatus.DONE}
    failed = [d for d in live if d.status == DeliveryStatus.FAILED and (d.destination, d.kind) not in delivered]
    failures = "; ".join(f"delivery to {d.destination} failed: {d.last_error}" for d in failed)
    reached = f"delivered to {', '.join(sorted({destination for destination, _ in delivered}))}"
    if failed and any(event.event == EventKind.DONE for event in job.events):
        finish_job(session, job, JobStatus.DONE, f"{reached} before; the resend did not reach all: {failures}")
    elif failed:
        finish_job(session, job, JobStatus.FAILED, failures)
    elif live:
        finish_job(session, job, JobStatus.DONE, reached)
    else:
        finish_job(session, job, JobStatus.DONE, "superseded by a newer version before delivery")


def resend(
    engine: Engine, job_id: int, destinations: Sequence[Destination], sop_instance_uid_of: Callable[[str], str],
    live_routes: Collection[str] = (),
) -> int:
    """Queue new deliveries of a job's outputs by hand, to those of `destinations` its route sends to; returns
    how many. A shadow job's outputs are sent only once its route is among `live_routes` (an admin switched it
    to live).

    `sop_instance_uid_of(path)` reads an output file's SOP Instance UID.
    """
    with Session(engine) as session, session.begin():
        job = session.get(Job, job_id)
        if job is None:
            raise UserError(f"no job {job_id}")
        if job.mode == RouteMode.SHADOW and job.route not in live_routes:
            raise UserError(
                f"job {job_id} ran in shadow on route {job.route}: nothing of it is sent until the route is live"
                " (mode = \"live\" in its [[routes]] entry)"
            )
        named = job.destinations
        destinations = [d for d in destinations if named is None or d.name in named]
        if not destinations:
            raise UserError(f"job {job_id}'s route {job.route} sends to {named}, none of the destinations asked for")
        if OutputKind.RTSTRUCT not in job.outputs:
            raise UserError(f"job {job_id} has no RT Structure Set to send (status {job.status})")
        if job.outputs_removed_at is not None:
            removed = f"removed on {job.outputs_removed_at:%Y-%m-%d} by retention"
            raise UserError(f"job {job_id}'s outputs were {removed}: nothing to send")
        queued = queue_outputs(session, job, destinations, sop_instance_uid_of)
        job.status, job.finished_at = JobStatus.SENDING, None
        add_event(session, job, EventKind.RESEND, f"queued by hand to {', '.join(d.name for d in destinations)}")
        return queued


def queue_outputs(
    session: Session, job: Job, destinations: Sequence[Destination], sop_instance_uid_of: Callable[[str], str]
) -> int:
    """A new delivery of each deliverable output the job made to each destination; how many. Refused for a job
    whose series grew into a newer version: its structure set is of fewer instances than the series holds."""
    newer = outgrown_by(session, job)
    if newer is not None:
        raise UserError(
            f"job {job.id} was made from {len(job.input_uids)} instances of a series that has changed since: job"
            f" {newer.id} (v{newer.version}, {newer.status}) took its {len(newer.input_uids)}; this one is not sent again"
        )
    kinds = [kind for kind in DELIVERABLE if kind in job.outputs]
    for destination in destinations:
        for kind in kinds:
            path = job.outputs[kind]
            session.add(new_delivery(job, destination, kind, path, sop_instance_uid_of(path)))
    return len(kinds) * len(destinations)


def outgrown_by(session: Session, job: Job) -> Job | None:
    """The newest later version of the job's series made from other instances (the series grew or changed after
    the job took its inputs), or None. What such a job made is never sent again."""
    return session.scalars(
        select(Job)
        .where(Job.series_id == job.series_id, Job.version > job.version, Job.input_fingerprint != job.input_fingerprint)
        .order_by(Job.version.desc())
        .limit(1)
    ).first()


def withdraw_unsent(session: Session, job: Job, newer: Job) -> None:
    """The series grew after `job` took its inputs and `newer` took the series: the job's deliveries not yet sent
    (and not on the wire) are withdrawn, so no planning system gets a structure set of the shorter series."""
    withdrawn = [d for d in job.deliveries if d.status == DeliveryStatus.PENDING and d.attempt_started_at is None]
    for delivery in withdrawn:
        delivery.status = DeliveryStatus.SUPERSEDED
    if withdrawn:
        to = ", ".join(sorted({d.destination for d in withdrawn}))
        taken = f"job {newer.id} (v{newer.version}) takes its {len(newer.input_uids)} instances"
        add_event(session, job, EventKind.SUPERSEDED, f"the series grew: not sent to {to}; {taken}")
    settle_sending_job(session, job)


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


def arrived_after_inputs() -> ColumnElement[bool]:
    """A job whose series received instances after its inputs were taken: it is not started, and what it made is
    not sent, until the series is quiet again and its inputs are taken anew (or a newer version supersedes it).
    So a job started as soon as a series looked complete never sends the structure set of a shorter series."""
    return exists().where(
        Instance.series_id == Job.series_id, Instance.last_received_at > Job.inputs_at, Instance.removed_at.is_(None)
    )


def due_deliveries(engine: Engine, quiet_seconds: float = 0.0) -> list[int]:
    """Pending deliveries whose time has come, of jobs whose series has received nothing for `quiet_seconds`
    (completion.release_grace_seconds: a job started as soon as a series looked complete is sent only once
    no further slice of it came within that time) and nothing since the job took its inputs."""
    now = utcnow()
    still_arriving = exists().where(
        Instance.series_id == Job.series_id, Instance.last_received_at > now - timedelta(seconds=quiet_seconds),
        Instance.removed_at.is_(None),
    )
    with Session(engine) as session:
        return list(
            session.scalars(
                select(Delivery.id)
                .join(Job, Job.id == Delivery.job_id)
                .where(Delivery.status == DeliveryStatus.PENDING, Delivery.next_attempt_at <= now, ~arrived_after_inputs(),
                       ~still_arriving)
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


def record_attempt(engine: Engine, delivery_id: int, outcome: SendOutcome, seconds: float, policy: RetryPolicy) -> None:
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
            newer = outgrown_by(session, job) if retry_at is not None else None
            if newer is not None:
                add_event(session, job, EventKind.SEND_FAILED, f"{outcome.detail}; not retried")
                withdraw_unsent(session, job, newer)
            elif retry_at is not None:
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
        settle_sending_job(session, job)
