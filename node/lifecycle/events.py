"""The job's log: the one place a job event is written (and logged), and a job's end."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from node.db.models import Job, JobEvent, utcnow
from node.vocabulary import EventKind, JobStatus

log = logging.getLogger(__package__)


def add_event(session: Session, job: Job, kind: EventKind, detail: str = "") -> None:
    session.add(JobEvent(job=job, at=utcnow(), event=kind.value, detail=detail))
    log.info("job %s (series %s v%d): %s %s", job.id, job.series.series_instance_uid, job.version, kind.value, detail)


def finish_job(session: Session, job: Job, status: JobStatus, detail: str) -> None:
    """The job ends `done` or `failed` (with `detail` as its error), in its log as that status."""
    job.status, job.finished_at = status, utcnow()
    if status == JobStatus.FAILED:
        job.error = detail
    add_event(session, job, EventKind(status.value), detail)
