"""What the pages show, read from the database: the dashboard's figures, a page of the job list
(keyset paging, so the 2,000th page costs what the first does), one job with its series' version
chain, and the studies with each series' latest job."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, func, or_, select
from sqlalchemy.orm import Session

from node.config import Config
from node.db.models import Delivery, Job, Series, Study, WorkerRecord
from node.errors import UserError
from node.inventory import StudySummary, list_studies
from node.joblog import describe_job
from node.vocabulary import DeliveryStatus, JobStatus

JOB_PAGE_SIZE = 50


@dataclass(frozen=True)
class JobFilter:
    """The dashboard's filters; empty strings filter nothing."""

    status: str = ""
    patient: str = ""  # part of the patient's ID or name
    date: str = ""  # YYYY-MM-DD: jobs created that day (UTC)
    text: str = ""  # part of the patient, study or series description, a UID, or the error
    confidence_below: str = ""  # a number 0-1: jobs with a structure of lower confidence

    def __post_init__(self) -> None:
        if self.status and self.status not in set(JobStatus):
            raise UserError(f"status {self.status!r}: one of {', '.join(JobStatus)}")
        if self.confidence_below:
            self.below()

    def below(self) -> float:
        try:
            value = float(self.confidence_below)
        except ValueError:
            value = -1.0
        if not 0 <= value <= 1:
            raise UserError(f"confidence below {self.confidence_below!r}: expected a number from 0 to 1")
        return value
        if self.date:
            self.day()

    def day(self) -> datetime:
        try:
            return datetime.strptime(self.date, "%Y-%m-%d").replace(tzinfo=UTC)
        except ValueError:
            raise UserError(f"date {self.date!r}: expected YYYY-MM-DD") from None


@dataclass(frozen=True)
class JobRow:
    id: int
    status: str
    version: int
    patient_id: str
    patient_name: str
    study_date: str
    series_description: str
    modality: str
    instances: int
    created_at: str
    finished_at: str | None
    error: str
    mode: str  # shadow: contoured and kept, nothing sent
    confidence: float | None  # the lowest of its structures' (None: none recorded)


@dataclass(frozen=True)
class JobPage:
    rows: list[JobRow]
    next_before: int | None  # the cursor of the next (older) page; None on the last page


def lowest_confidence(structures: list[dict] | None) -> float | None:
    known = [s["confidence"] for s in structures or () if s.get("confidence") is not None]
    return min(known) if known else None


def _low_confidence(session: Session, query, job_filter: JobFilter, size: int) -> list:
    """The rows of `query` (newest first, `size + 1` at a time) whose lowest confidence is below the filter's: the
    structures are a JSON column, read batch by batch until the page is full or the jobs run out."""
    below, found, last = job_filter.below(), [], None
    while len(found) <= size:
        batch = session.execute(query if last is None else query.where(Job.id < last)).all()
        lowest = [(row, lowest_confidence(row[0].structures)) for row in batch]
        found += [row for row, value in lowest if value is not None and value < below]
        if len(batch) <= size:
            break
        last = batch[-1][0].id
    return found[: size + 1]


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def job_page(engine: Engine, job_filter: JobFilter, before: int | None = None, size: int = JOB_PAGE_SIZE) -> JobPage:
    """Newest first; `before` is the id the previous page ended at."""
    query = (
        select(Job, Series, Study)
        .join(Series, Job.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .order_by(Job.id.desc())
        .limit(size + 1)
    )
    if before is not None:
        query = query.where(Job.id < before)
    if job_filter.status:
        query = query.where(Job.status == job_filter.status)
    if job_filter.patient:
        pattern = _like(job_filter.patient)
        query = query.where(or_(Study.patient_id.ilike(pattern, escape="\\"), Study.patient_name.ilike(pattern, escape="\\")))
    if job_filter.date:
        day = job_filter.day()
        query = query.where(Job.created_at >= day, Job.created_at < day + timedelta(days=1))
    if job_filter.text:
        pattern = _like(job_filter.text)
        columns = (Study.patient_id, Study.patient_name, Study.study_description, Series.series_description,
                   Series.series_instance_uid, Study.study_instance_uid, Job.error)
        query = query.where(or_(*(column.ilike(pattern, escape="\\") for column in columns)))
    with Session(engine) as session:
        found = _low_confidence(session, query, job_filter, size) if job_filter.confidence_below else session.execute(query).all()
    rows = [
        JobRow(
            id=job.id, status=job.status, version=job.version, patient_id=study.patient_id, patient_name=study.patient_name,
            study_date=study.study_date, series_description=series.series_description, modality=series.modality,
            instances=len(job.input_uids), created_at=job.created_at.isoformat(),
            finished_at=job.finished_at.isoformat() if job.finished_at else None, error=job.error, mode=job.mode,
            confidence=lowest_confidence(job.structures),
        )
        for job, series, study in found[:size]
    ]
    return JobPage(rows, rows[-1].id if len(found) > size else None)


@dataclass(frozen=True)
class WorkerState:
    name: str
    device: str
    current_job_id: int | None
    heartbeat_at: str
    heartbeat_age_seconds: float
    model_problem: str  # why it takes no jobs, "" when it takes them


@dataclass(frozen=True)
class DestinationState:
    name: str
    address: str
    pending: int
    failed: int


@dataclass(frozen=True)
class Overview:
    """The dashboard's head: jobs by status, queue depth, workers, destinations, free disk."""

    jobs_by_status: dict[str, int]
    queue_depth: int
    workers: list[WorkerState]
    destinations: list[DestinationState]
    free_disk_gb: float


def free_disk_gb(path: Path) -> float:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free / 1e9


def live_workers(session: Session) -> list[WorkerState]:
    now = datetime.now(UTC)
    return [
        WorkerState(
            w.name, w.device, w.current_job_id, w.heartbeat_at.isoformat(), (now - w.heartbeat_at).total_seconds(),
            w.model_problem,
        )
        for w in session.scalars(
            select(WorkerRecord).where(WorkerRecord.stopped_at.is_(None)).order_by(WorkerRecord.heartbeat_at.desc())
        )
    ]


def overview(engine: Engine, config: Config) -> Overview:
    with Session(engine) as session:
        by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        deliveries = session.execute(
            select(Delivery.destination, Delivery.status, func.count())
            .where(Delivery.status.in_([DeliveryStatus.PENDING, DeliveryStatus.FAILED]))
            .group_by(Delivery.destination, Delivery.status)
        ).all()
        workers = live_workers(session)
    counts = {(name, status): count for name, status, count in deliveries}
    destinations = []
    for destination in config.destinations:
        ae_title, host, port = destination.address
        address = destination.url or f"{ae_title}@{host}:{port}"
        destinations.append(DestinationState(destination.name, address, counts.get((destination.name, DeliveryStatus.PENDING), 0),
                                             counts.get((destination.name, DeliveryStatus.FAILED), 0)))
    return Overview(
        jobs_by_status={status.value: by_status.get(status.value, 0) for status in JobStatus},
        queue_depth=by_status.get(JobStatus.QUEUED.value, 0),
        workers=workers,
        destinations=destinations,
        free_disk_gb=round(free_disk_gb(config.node.data_dir), 1),
    )


@dataclass(frozen=True)
class ChainLink:
    """One version of the series' jobs: v2 supersedes v1."""

    id: int
    version: int
    status: str
    superseded_by: int | None
    created_at: str


@dataclass(frozen=True)
class JobDetail:
    job: dict  # node.joblog.describe_job: what `rtnode job ID --json` prints
    patient_name: str
    study_date: str
    study_description: str
    series_description: str
    series_number: int | None
    modality: str
    chain: list[ChainLink]


def job_detail(engine: Engine, job_id: int) -> JobDetail | None:
    job = describe_job(engine, job_id)
    if job is None:
        return None
    with Session(engine) as session:
        series = session.scalars(select(Series).where(Series.series_instance_uid == job["series_instance_uid"])).one()
        chain = [
            ChainLink(j.id, j.version, j.status, j.superseded_by, j.created_at.isoformat())
            for j in session.scalars(select(Job).where(Job.series_id == series.id).order_by(Job.version))
        ]
        study = series.study
        return JobDetail(job, study.patient_name, study.study_date, study.study_description, series.series_description,
                         series.series_number, series.modality, chain)


def patient_of_job(engine: Engine, job_id: int) -> str | None:
    """The job's patient ID (for the audit trail), or None when there is no such job."""
    with Session(engine) as session:
        return session.scalar(select(Study.patient_id).join(Series).join(Job).where(Job.id == job_id))


@dataclass(frozen=True)
class SeriesJob:
    """The latest job of a series, as the studies page shows it: rejected ones with their reason."""

    id: int
    version: int
    status: str
    error: str


@dataclass(frozen=True)
class StudiesView:
    studies: list[StudySummary]
    latest_jobs: dict[str, SeriesJob]  # series instance UID -> its latest job


def studies_view(engine: Engine) -> StudiesView:
    latest = select(func.max(Job.id)).group_by(Job.series_id)
    with Session(engine) as session:
        rows = session.execute(select(Job, Series.series_instance_uid).join(Series).where(Job.id.in_(latest))).all()
    jobs = {uid: SeriesJob(job.id, job.version, job.status, job.error) for job, uid in rows}
    return StudiesView(list_studies(engine), jobs)
