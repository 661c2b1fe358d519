"""/healthz and /metrics: read from the database and the machine at the moment they are asked,
because receiving, contouring and sending run in other processes than the web app."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from node.config import Config
from node.db.models import AssociationRejection, Conflict, Delivery, Instance, Job, JobEvent
from node.vocabulary import EventKind, JobStatus
from node.web.queries import free_disk_gb, live_workers


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Health:
    status: str  # ok | unhealthy
    checks: list[Check]

    def to_json(self) -> dict:
        return {"status": self.status, "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in self.checks}}


def _scp_address(config: Config) -> tuple[str, int]:
    host = config.node.host
    return ("127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host), config.node.port


def _scp_check(config: Config) -> Check:
    host, port = _scp_address(config)
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return Check("scp", True, f"listening on {host}:{port}")
    except OSError as exc:
        return Check("scp", False, f"nothing answers on {host}:{port}: {exc.strerror or exc}")


def _database_and_worker_checks(engine: Engine, config: Config) -> list[Check]:
    try:
        with Session(engine) as session:
            session.execute(text("SELECT 1"))
            workers = live_workers(session)
    except SQLAlchemyError as exc:
        return [Check("database", False, f"unreachable: {type(exc).__name__}"), Check("worker", False, "unknown: no database")]
    limit = config.web.max_heartbeat_age_seconds
    fresh = [w for w in workers if w.heartbeat_age_seconds <= limit]
    if fresh and all(w.model_problem for w in fresh):
        worker = Check("worker", False, "no worker takes jobs: " + "; ".join(f"{w.name}: {w.model_problem}" for w in fresh))
    elif fresh:
        worker = Check("worker", True, "; ".join(
            f"{w.name} on {w.device}, heartbeat {w.heartbeat_age_seconds:.0f} s ago"
            + (f", running job {w.current_job_id}" if w.current_job_id else ", idle")
            + (f", takes no jobs: {w.model_problem}" if w.model_problem else "") for w in fresh))
    elif workers:
        age = min(w.heartbeat_age_seconds for w in workers)
        worker = Check("worker", False, f"last heartbeat {age:.0f} s ago (limit {limit:g} s)")
    else:
        worker = Check("worker", False, "no worker has reported a heartbeat")
    return [Check("database", True, "reachable"), worker]


def _destinations_check(config: Config) -> Check:
    if not config.destinations:
        return Check("destinations", False, "none configured: jobs are contoured and end done, but nothing is sent")
    return Check("destinations", True, ", ".join(destination.name for destination in config.destinations))


def health(engine: Engine, config: Config) -> Health:
    """SCP listening, a worker with a recent heartbeat, the database answering, enough free disk, somewhere to send."""
    free = free_disk_gb(config.node.data_dir)
    disk = Check("disk", free >= config.web.min_free_disk_gb,
                 f"{free:.1f} GB free under data_dir (minimum {config.web.min_free_disk_gb:g} GB)")
    checks = [_scp_check(config), *_database_and_worker_checks(engine, config), disk, _destinations_check(config)]
    return Health("ok" if all(c.ok for c in checks) else "unhealthy", checks)


@dataclass(frozen=True)
class Figures:
    instances_received: int
    instances_held: int
    conflicts: int
    associations_rejected: int
    jobs_by_status: dict[str, int]
    inference_count: int
    inference_seconds: float
    delivery_failures: int
    deliveries_by_status: dict[str, int]


def figures(engine: Engine) -> Figures:
    with Session(engine) as session:
        received = session.scalar(select(func.coalesce(func.sum(Instance.times_received), 0)))
        held = session.scalar(select(func.count()).select_from(Instance).where(Instance.removed_at.is_(None)))
        conflicts = session.scalar(select(func.count()).select_from(Conflict))
        rejected = session.scalar(select(func.count()).select_from(AssociationRejection))
        by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        deliveries = dict(session.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all())
        failures = session.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.event == EventKind.SEND_FAILED))
        contoured = session.scalars(select(Job.timings).where(Job.model_name != "", Job.started_at.is_not(None)))
        passes = [sum(v for k, v in timings.items() if k.startswith("pass_")) for timings in contoured]
    inferred = [seconds for seconds in passes if seconds > 0]
    return Figures(received, held, conflicts, rejected, {s.value: by_status.get(s.value, 0) for s in JobStatus}, len(inferred),
                   sum(inferred), failures, deliveries)


class DatabaseCollector(Collector):
    """The node's figures as Prometheus metrics, computed at scrape time (cached for a few seconds)."""

    def __init__(self, engine: Engine, config: Config, cache_seconds: float = 5.0) -> None:
        self._engine = engine
        self._config = config
        self._cache_seconds = cache_seconds
        self._cached: tuple[float, Figures] | None = None

    def _figures(self) -> Figures:
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > self._cache_seconds:
            self._cached = (now, figures(self._engine))
        return self._cached[1]

    def collect(self) -> Iterator:
        f = self._figures()
        yield CounterMetricFamily("rtnode_instances_received", "Instances received, repeats included", value=f.instances_received)
        yield GaugeMetricFamily("rtnode_instances_held", "Instances held (not removed by retention)", value=f.instances_held)
        yield CounterMetricFamily("rtnode_conflicts", "Instances refused as conflicts",
                                  value=f.conflicts)
        yield CounterMetricFamily("rtnode_associations_rejected", "Associations refused by policy (AE title, allowed callers)",
                                  value=f.associations_rejected)
        jobs = GaugeMetricFamily("rtnode_jobs", "Jobs by status", labels=["status"])
        for status, count in f.jobs_by_status.items():
            jobs.add_metric([status], count)
        yield jobs
        yield GaugeMetricFamily("rtnode_queue_depth", "Jobs queued", value=f.jobs_by_status.get(JobStatus.QUEUED, 0))
        yield SummaryMetricFamily("rtnode_inference_seconds", "Seconds of model passes per contoured job",
                                  count_value=f.inference_count, sum_value=f.inference_seconds)
        yield CounterMetricFamily("rtnode_delivery_failures", "Failed delivery attempts", value=f.delivery_failures)
        deliveries = GaugeMetricFamily("rtnode_deliveries", "Deliveries by status", labels=["status"])
        for status, count in f.deliveries_by_status.items():
            deliveries.add_metric([status], count)
        yield deliveries
        with Session(self._engine) as session:
            workers = live_workers(session)
        heartbeat = GaugeMetricFamily("rtnode_worker_heartbeat_age_seconds", "Seconds since each worker's heartbeat",
                                      labels=["worker", "device"])
        for worker in workers:
            heartbeat.add_metric([worker.name, worker.device], worker.heartbeat_age_seconds)
        yield heartbeat
        yield GaugeMetricFamily("rtnode_free_disk_bytes", "Free disk under data_dir",
                                value=free_disk_gb(self._config.node.data_dir) * 1e9)
