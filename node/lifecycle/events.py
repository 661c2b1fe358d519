"""The job's log: the one place a job event is written (and logged), and a job's end."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from node.db.models import Job, JobEvent, utcnow
from node.vocabulary import EventKind, JobStatus

log = logging.getLogger(__package__)

# What an admin's grep for errors and warnings must find: a job that failed; what went wrong but may still end well.
_LOG_LEVELS = {
    EventKind.FAILED: logging.ERROR,
    EventKind.REJECTED: logging.WARNING,
    EventKind.REQUEUED: logging.WARNING,
    EventKind.SEND_FAILED: logging.WARNING,
    EventKind.SEND_INTERRUPTED: logging.WARNING,
}


def add_event(session: Session, job: Job, kind: EventKind, detail: str = "") -> None:
    session.add(JobEvent(job=job, at=utcnow(), event=kind.value, detail=detail))
    level = _LOG_LEVELS.get(kind, logging.INFO)
    log.log(level, "job %s (series %s v%d): %s %s", job.id, job.series.series_instance_uid, job.version, kind.value, detail)


def finish_job(session: Session, job: Job, status: JobStatus, detail: str) -> None:
    """The job ends `done` or `failed` (with `detail` as its error), in its log as that status."""
    job.status, job.finished_at = status, utcnow()
    job.error = detail if status == JobStatus.FAILED else ""  # a resend that reached the destination clears it
    add_event(session, job, EventKind(status.value), detail)
