"""Workers and their leases: who holds a job or a send, and taking back what a worker that is gone held.

Workers on any number of machines share the database: each holds what it took under a lease its
heartbeat renews; what a lost worker held is taken back when the lease runs out, at once when a
restart or the serving process sees the process gone.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from node.db.models import Delivery, Job, WorkerRecord, utcnow
from node.lifecycle.events import add_event
from node.vocabulary import DeliveryStatus, EventKind, JobStatus

MAX_STARTS = 3  # a job that took the worker down this often is failed, not retried forever


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
        row = session.scalars(select(WorkerRecord).where(WorkerRecord.name == worker.name)).first()
        if row is None:
            row = WorkerRecord(name=worker.name, host=worker.host, pid=worker.pid)
            session.add(row)
        row.device, row.started_at, row.heartbeat_at, row.stopped_at, row.current_job_id = worker.device, now, now, None, None
        row.model_problem = ""


def report_unusable_model(engine: Engine, worker: WorkerIdentity, problem: str) -> None:
    """This worker takes no jobs until restarted with a usable model: /healthz and the dashboard say why."""
    with Session(engine) as session, session.begin():
        row = session.scalars(select(WorkerRecord).where(WorkerRecord.name == worker.name)).one()
        row.model_problem = problem


def heartbeat(engine: Engine, worker: WorkerIdentity, lease_seconds: float, stopped: bool = False) -> None:
    """Renew the leases of everything this worker holds; a worker that stops beating loses them."""
    now = utcnow()
    lease = now + timedelta(seconds=lease_seconds)
    with Session(engine) as session, session.begin():
        row = session.scalars(select(WorkerRecord).where(WorkerRecord.name == worker.name)).one()
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
