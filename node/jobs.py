"""The jobs table: the durable hand-off between receiving, the worker and the sender.

Receiving decides *that* a series should be contoured (`submit_series`); the worker
takes jobs in arrival order (`claim_next`), never two running jobs of one series; a
restart puts running jobs back in the queue (`recover_after_restart`). Every change
is an event in the job's log, in words an admin understands.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from sqlalchemy import Engine, func, select, type_coerce, update
from sqlalchemy.orm import Session

from node.models import Delivery, Instance, Job, JobEvent, Series, UTCDateTime, utcnow

log = logging.getLogger(__name__)

MAX_STARTS = 3  # a job that took the worker down this often is failed, not retried forever

QUEUED, RUNNING, SENDING, DONE, FAILED, REJECTED = "queued", "running", "sending", "done", "failed", "rejected"


def fingerprint(sop_instance_uids: list[str]) -> str:
    ordered = sorted(sop_instance_uids)
    return hashlib.sha256(f"{len(ordered)}\n{chr(10).join(ordered)}".encode()).hexdigest()


def add_event(session: Session, job: Job, event: str, detail: str = "") -> None:
    session.add(JobEvent(job=job, at=utcnow(), event=event, detail=detail))
    log.info("job %s (series %s v%d): %s %s", job.id, job.series.series_instance_uid, job.version, event, detail)


@dataclass(frozen=True)
class Eligibility:
    eligible: bool
    reason: str = ""


def submit_series(engine: Engine, series_instance_uid: str, eligibility_of) -> Job | None:
    """Queue (or reject) a new job version for a quiet series, if anything arrived since its last job.

    `eligibility_of(series, instances)` says whether the series may be contoured at all.
    """
    with Session(engine, expire_on_commit=False) as session, session.begin():
        series = session.scalars(select(Series).where(Series.series_instance_uid == series_instance_uid)).one_or_none()
        if series is None:
            return None
        instances = session.scalars(select(Instance).where(Instance.series_id == series.id)).all()
        if not instances:
            return None
        latest = session.scalars(select(Job).where(Job.series_id == series.id).order_by(Job.version.desc()).limit(1)).first()
        newest_arrival = max(i.last_received_at for i in instances)
        uids = sorted(i.sop_instance_uid for i in instances)
        if latest is not None and latest.status == QUEUED:
            if latest.input_fingerprint != fingerprint(uids):
                latest.input_uids, latest.input_fingerprint, latest.inputs_at = uids, fingerprint(uids), utcnow()
                add_event(session, latest, "inputs updated", f"{len(uids)} instances before the job started")
            return latest
        if latest is not None and newest_arrival <= latest.inputs_at:
            return None
        verdict = eligibility_of(series, instances)
        job = Job(
            series=series,
            version=(latest.version + 1) if latest else 1,
            status=QUEUED if verdict.eligible else REJECTED,
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
            add_event(session, job, "queued", f"{len(uids)} instances of series {series_instance_uid}")
        else:
            add_event(session, job, "rejected", verdict.reason)
        return job


def claim_next(engine: Engine) -> int | None:
    """Mark the oldest queued job running, skipping series with a job running already. Returns its id."""
    with Session(engine) as session, session.begin():
        running_series = select(Job.series_id).where(Job.status == RUNNING)
        candidates = session.scalars(
            select(Job).where(Job.status == QUEUED, Job.series_id.not_in(running_series)).order_by(Job.id).limit(1)
        ).all()
        for job in candidates:
            claimed = session.execute(
                update(Job).where(Job.id == job.id, Job.status == QUEUED).values(status=RUNNING, started_at=utcnow(), starts=Job.starts + 1)
            )
            if claimed.rowcount != 1:
                continue
            session.refresh(job)
            if job.starts > MAX_STARTS:
                job.status, job.finished_at = FAILED, utcnow()
                job.error = f"the worker stopped {MAX_STARTS} times while running this job: not retried"
                add_event(session, job, "failed", job.error)
                continue
            add_event(session, job, "started", f"attempt {job.starts}")
            return job.id
    return None


def recover_after_restart(engine: Engine) -> int:
    """Running jobs go back to the queue: the process that ran them is gone. Nothing is deleted."""
    with Session(engine) as session, session.begin():
        jobs = session.scalars(select(Job).where(Job.status == RUNNING)).all()
        for job in jobs:
            job.status = QUEUED
            add_event(session, job, "requeued", "the node restarted while this job ran")
        return len(jobs)


def series_needing_jobs(engine: Engine) -> list[str]:
    """Series with instances newer than their latest job (or no job): their timers died with the process."""
    with Session(engine) as session:
        latest_job = select(Job.series_id, func.max(Job.inputs_at).label("created")).group_by(Job.series_id).subquery()
        newest = select(Instance.series_id, func.max(Instance.last_received_at).label("arrived")).group_by(Instance.series_id).subquery()
        rows = session.execute(
            select(
                Series.series_instance_uid,
                type_coerce(newest.c.arrived, UTCDateTime()),
                type_coerce(latest_job.c.created, UTCDateTime()),
            )
            .join(newest, newest.c.series_id == Series.id)
            .outerjoin(latest_job, latest_job.c.series_id == Series.id)
        ).all()
    return [uid for uid, arrived, created in rows if created is None or arrived > created]


def new_delivery(job: Job, destination, kind: str, path: str, sop_instance_uid: str) -> Delivery:
    """A pending delivery of one output of `job` to one configured destination, due now."""
    now = utcnow()
    return Delivery(
        job=job, destination=destination.name, ae_title=destination.ae_title, host=destination.host, port=destination.port,
        kind=kind, path=path, sop_instance_uid=sop_instance_uid, status="pending", attempts=0, last_error="",
        next_attempt_at=now, created_at=now,
    )


def settle(session: Session, job: Job) -> None:
    """A sending job is done when every live delivery is done, failed when one failed for good."""
    if job.status != SENDING:
        return
    live = [d for d in job.deliveries if d.status != "superseded"]
    if any(d.status == "pending" for d in live):
        return
    failed = [d for d in live if d.status == "failed"]
    job.finished_at = utcnow()
    if failed:
        job.status = FAILED
        job.error = "; ".join(f"delivery to {d.destination} failed: {d.last_error}" for d in failed)
        add_event(session, job, "failed", job.error)
    elif live:
        job.status = DONE
        add_event(session, job, "done", f"delivered to {', '.join(sorted({d.destination for d in live}))}")
    else:
        job.status = DONE
        add_event(session, job, "done", "superseded by a newer version before delivery")
