"""Retention: what the node may forget, and forgetting it honestly.

Received instances go `incoming_days` after their series' latest job ended, job outputs
`outputs_days` after their job ended; above `max_storage_gb` the oldest finished studies go
first (their instances, then outputs) until the data directory is 10% under the ceiling.
Never removed: instances of a series with work in flight (a job queued, running or sending, or
a quiet timer running), outputs with a delivery pending, anything of a protected study.

Rows are marked (committed) before their files are deleted, so no unmarked row ever points at
a missing file; the next run deletes what a killed run left. Runs may overlap (the serve
process's schedule, the worker after each job): every mark and every delete re-checks its
condition in the database, so each row is marked and each file deleted once.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, Engine, exists, func, or_, select, type_coerce, update
from sqlalchemy.orm import Session, aliased

from node.config import Config
from node.db.models import Instance, Job, Series, Study, UTCDateTime, utcnow
from node.errors import UserError
from node.lifecycle.deliveries import delivery_pending
from node.lifecycle.jobs import ACTIVE, mark_outputs_removed

log = logging.getLogger(__name__)

GB = 1_000_000_000  # max_storage_gb counts decimal gigabytes, as disks are sold
TARGET = 0.9  # a ceiling that is reached is left 10% under, so removal does not run after every series
BATCH = 500  # files deleted per transaction: short enough not to hold up the store


def _busy(series_id: int | ColumnElement[int]) -> ColumnElement[bool]:
    """Work in flight on the series: a job queued, running or sending, or a quiet timer running
    (instances newer than its latest job's inputs, or no job yet; see lifecycle.jobs.series_needing_jobs)."""
    job, newer = aliased(Job), aliased(Instance)
    latest_inputs = select(func.max(job.inputs_at)).where(job.series_id == series_id).scalar_subquery()
    return or_(
        ~exists().where(Job.series_id == series_id),
        exists().where(Job.series_id == series_id, Job.status.in_(ACTIVE)),
        exists().where(newer.series_id == series_id, newer.last_received_at > latest_inputs),
    )


def _protected(series_id: int) -> ColumnElement[bool]:
    return exists().where(Series.id == series_id, Study.id == Series.study_id, Study.protected)


@dataclass(frozen=True)
class SeriesRemoval:
    """The instances of one series that a run removes (or, dry, would)."""

    study_instance_uid: str
    series_instance_uid: str
    instances: int
    bytes: int
    reason: str  # the setting that removes them
    series_id: int


@dataclass(frozen=True)
class OutputsRemoval:
    """The output files of one job that a run removes (or, dry, would)."""

    job_id: int
    series_instance_uid: str
    kinds: tuple[str, ...]
    bytes: int
    reason: str
    series_id: int
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class _HeldSeries:
    """A series with instances still held, as retention sees it."""

    removal: SeriesRemoval  # all of its instances still held
    study_id: int
    protected: bool
    busy: bool
    ended: datetime | None  # when its latest job ended

    @property
    def removable(self) -> bool:
        return not self.protected and not self.busy and self.ended is not None


@dataclass(frozen=True)
class _HeldOutputs:
    removal: OutputsRemoval
    protected: bool
    pending: bool  # the job is not finished or a delivery is pending
    ended: datetime | None

    @property
    def removable(self) -> bool:
        return not self.protected and not self.pending and self.ended is not None


@dataclass(frozen=True)
class _Leftovers:
    """What earlier runs marked and did not finish deleting (they were killed, or overlap this one)."""

    instance_ids: list[int]
    output_paths: list[Path]
    bytes: int
    folders: set[Path]  # of everything ever removed: those left empty go


@dataclass(frozen=True)
class PurgeReport:
    dry_run: bool
    series: list[SeriesRemoval]
    outputs: list[OutputsRemoval]
    leftover_files: int  # files of rows an earlier run marked, deleted by this one
    freed_bytes: int  # a dry run: what the real run would free
    held: str | None  # why the ceiling cannot be met, when it cannot

    def summary(self) -> str:
        series_bytes = sum(s.bytes for s in self.series)
        outputs_bytes = sum(o.bytes for o in self.outputs)
        text = (
            f"retention{' (dry run)' if self.dry_run else ''}: {'would remove' if self.dry_run else 'removed'}"
            f" {_count(sum(s.instances for s in self.series), 'instance')} of {len(self.series)} series ({_size(series_bytes)})"
            f" and the outputs of {_count(len(self.outputs), 'job')} ({_size(outputs_bytes)}); {_size(self.freed_bytes)} freed"
        )
        if self.leftover_files:
            text += f", with {self.leftover_files} files an earlier run had marked"
        return text

    def lines(self) -> list[str]:
        """What `rtnode purge` prints: each series and job, the totals, and what holds the ceiling up."""
        lines = [
            f"series {s.series_instance_uid} of study {s.study_instance_uid}: {_count(s.instances, 'instance')},"
            f" {_size(s.bytes)} (retention.{s.reason})"
            for s in self.series
        ]
        lines += [f"job {o.job_id} outputs {', '.join(o.kinds)}: {_size(o.bytes)} (retention.{o.reason})" for o in self.outputs]
        return [*lines, self.summary(), *([self.held] if self.held else [])]


def _count(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _size(count: float) -> str:
    """Bytes in decimal units, as disks (and max_storage_gb) count them."""
    units = ["B", "kB", "MB", "GB"]
    while count >= 1000 and len(units) > 1:
        count, units = count / 1000, units[1:]
    return f"{count:.0f} B" if units[0] == "B" else f"{count:.1f} {units[0]}"


def _existing_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def tree_bytes(root: Path) -> int:
    """The bytes of the files under `root`, as max_storage_gb counts them."""
    return sum(_existing_size(Path(folder, name)) or 0 for folder, _, names in os.walk(root) for name in names)


def _held_series(session: Session) -> list[_HeldSeries]:
    kept = (
        select(Instance.series_id, func.count(Instance.id).label("count"), func.sum(Instance.size_bytes).label("bytes"))
        .where(Instance.removed_at.is_(None))
        .group_by(Instance.series_id)
        .subquery()
    )
    ended = select(Job.series_id, func.max(Job.finished_at).label("ended")).group_by(Job.series_id).subquery()
    rows = session.execute(
        select(
            Series.id, Series.series_instance_uid, Study.id, Study.study_instance_uid, Study.protected, _busy(Series.id),
            type_coerce(ended.c.ended, UTCDateTime()), kept.c.count, kept.c.bytes,
        )
        .join(Study, Study.id == Series.study_id)
        .join(kept, kept.c.series_id == Series.id)
        .outerjoin(ended, ended.c.series_id == Series.id)
        .order_by(Series.id)
    ).all()
    return [
        _HeldSeries(SeriesRemoval(study_uid, series_uid, count, size, "", series_id), study_id, protected, busy, end)
        for series_id, series_uid, study_id, study_uid, protected, busy, end, count, size in rows
    ]


def _held_outputs(session: Session) -> list[_HeldOutputs]:
    rows = session.execute(
        select(
            Job.id, Job.series_id, Series.series_instance_uid, Study.protected, Job.status, delivery_pending(Job.id),
            Job.finished_at, Job.outputs,
        )
        .join(Series, Series.id == Job.series_id)
        .join(Study, Study.id == Series.study_id)
        .where(Job.outputs_removed_at.is_(None))
        .order_by(Job.id)
    ).all()
    held = []
    for job_id, series_id, series_uid, protected, status, pending, finished_at, outputs in rows:
        if outputs:
            paths = tuple(Path(p) for p in outputs.values())
            size = sum(_existing_size(p) or 0 for p in paths)
            removal = OutputsRemoval(job_id, series_uid, tuple(outputs), size, "", series_id, paths)
            held.append(_HeldOutputs(removal, protected, pending or status in ACTIVE, finished_at))
    return held


def _leftovers(session: Session) -> _Leftovers:
    """Marked rows whose files are still there. A series folder that is gone needs no look inside."""
    sample_paths = session.execute(
        select(Instance.series_id, func.min(Instance.path)).where(Instance.removed_at.is_not(None)).group_by(Instance.series_id)
    ).all()
    folders = {Path(path).parent for _, path in sample_paths}
    present = [series_id for series_id, path in sample_paths if Path(path).parent.is_dir()]
    instance_ids, size = [], 0
    marked = select(Instance.id, Instance.path).where(Instance.series_id.in_(present), Instance.removed_at.is_not(None))
    for instance_id, path in session.execute(marked):
        if (found := _existing_size(Path(path))) is not None:
            instance_ids.append(instance_id)
            size += found
    output_paths = []
    for outputs in session.scalars(select(Job.outputs).where(Job.outputs_removed_at.is_not(None))):
        for path in map(Path, outputs.values()):
            folders.add(path.parent)
            if (found := _existing_size(path)) is not None:
                output_paths.append(path)
                size += found
    return _Leftovers(instance_ids, output_paths, size, folders)


def _oldest_studies_first(candidates: list[_HeldSeries]) -> list[list[_HeldSeries]]:
    studies: dict[int, list[_HeldSeries]] = defaultdict(list)
    for series in candidates:
        studies[series.study_id].append(series)
    return sorted(studies.values(), key=lambda study: max(s.ended for s in study))


@dataclass(frozen=True)
class _Plan:
    series: list[SeriesRemoval]
    outputs: list[OutputsRemoval]
    held: str | None = None


def _plan(config: Config, series: list[_HeldSeries], outputs: list[_HeldOutputs], leftovers: _Leftovers) -> _Plan:
    """Ages first; then, over the ceiling, the oldest finished studies' instances, then the oldest outputs."""
    now, policy = utcnow(), config.retention
    old_series = now - timedelta(days=policy.incoming_days)
    old_outputs = now - timedelta(days=policy.outputs_days)
    removable_series = [s for s in series if s.removable]
    removable_outputs = sorted((o for o in outputs if o.removable), key=lambda o: o.ended)
    plan = _Plan(
        [replace(s.removal, reason="incoming_days") for s in removable_series if s.ended <= old_series],
        [replace(o.removal, reason="outputs_days") for o in removable_outputs if o.ended <= old_outputs],
    )
    if policy.max_storage_gb is None:
        return plan
    ceiling = policy.max_storage_gb * GB
    usage = tree_bytes(config.node.data_dir) - leftovers.bytes - sum(r.bytes for r in [*plan.series, *plan.outputs])
    if usage <= ceiling:
        return plan
    target = TARGET * ceiling
    for study in _oldest_studies_first([s for s in removable_series if s.ended > old_series]):
        if usage <= target:
            break
        plan.series.extend(replace(s.removal, reason="max_storage_gb") for s in study)
        usage -= sum(s.removal.bytes for s in study)
    for held in (o for o in removable_outputs if o.ended > old_outputs):
        if usage <= target:
            break
        plan.outputs.append(replace(held.removal, reason="max_storage_gb"))
        usage -= held.removal.bytes
    if usage <= target:
        return plan
    busy = sum(s.removal.bytes for s in series if s.busy and not s.protected)
    pending = sum(o.removal.bytes for o in outputs if o.pending and not o.protected)
    protected = sum(s.removal.bytes for s in series if s.protected) + sum(o.removal.bytes for o in outputs if o.protected)
    held = (
        f"retention: {config.node.data_dir} still holds {_size(usage)} after removing all it may, over"
        f" {_size(target)} (90% of max_storage_gb = {policy.max_storage_gb:g}): {_size(busy)} in series with a job"
        f" queued, running or sending or a quiet timer running, {_size(pending)} in outputs with a delivery pending,"
        f" {_size(protected)} in protected studies, {_size(max(usage - busy - pending - protected, 0))} in other files"
        " (the database, conflicts); receiving goes on until the disk is full"
    )
    return replace(plan, held=held)


def _mark(session: Session, plan: _Plan) -> tuple[list[SeriesRemoval], list[OutputsRemoval], list[int]]:
    """Mark what is still removable now (a series may have got new instances since the plan, a job a
    resend): one guarded UPDATE each, in the caller's transaction; a job's outputs through the lifecycle,
    which tells it in the job's log. Returns what was marked."""
    now = utcnow()
    series, outputs, instance_ids = [], [], []
    for removal in plan.series:
        sid = removal.series_id
        marked = session.execute(
            update(Instance)
            .where(Instance.series_id == sid, Instance.removed_at.is_(None), ~_busy(sid), ~_protected(sid))
            .values(removed_at=now)
            .returning(Instance.id, Instance.size_bytes)
            .execution_options(synchronize_session=False)
        ).all()
        if marked:
            instance_ids += [instance_id for instance_id, _ in marked]
            series.append(replace(removal, instances=len(marked), bytes=sum(size for _, size in marked)))
    for removal in plan.outputs:
        detail = f"{', '.join(removal.kinds)} (retention.{removal.reason})"
        if mark_outputs_removed(session, removal.job_id, now, detail, allowed=~_protected(removal.series_id)):
            outputs.append(removal)
    return series, outputs, instance_ids


@dataclass
class _Deleted:
    files: int = 0
    bytes: int = 0
    folders: set[Path] = field(default_factory=set)

    def unlink(self, path: Path) -> None:
        self.folders.add(path.parent)
        size = _existing_size(path)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        self.files, self.bytes = self.files + 1, self.bytes + (size or 0)


def _delete_instance_files(engine: Engine, instance_ids: list[int], deleted: _Deleted) -> None:
    """Delete the files of rows still marked, a batch per transaction. The store clears the mark of a
    removed instance received again under the same row lock (SQLite: the database's) before it writes the file again,
    so a file received again is never deleted."""
    for start in range(0, len(instance_ids), BATCH):
        with engine.begin() as connection:
            paths = connection.execute(
                update(Instance)
                .where(Instance.id.in_(instance_ids[start : start + BATCH]), Instance.removed_at.is_not(None))
                .values(removed_at=Instance.removed_at)  # locks the rows (SQLite: the database) before the files go
                .returning(Instance.path)
            ).scalars()
            for path in paths:
                deleted.unlink(Path(path))


def _remove_empty(folders: set[Path], roots: tuple[Path, ...]) -> None:
    """Each folder and its parent (a series' study) when empty, deepest first, never the roots."""
    candidates = folders | {folder.parent for folder in folders}
    for folder in sorted(candidates, key=lambda f: len(f.parts), reverse=True):
        if folder not in roots and any(folder.is_relative_to(root) for root in roots) and folder.is_dir():
            try:
                folder.rmdir()
            except OSError:  # not empty
                pass


def purge(engine: Engine, config: Config, *, dry_run: bool = False) -> PurgeReport:
    """Apply the policy now: mark rows, then delete their files (and those earlier runs left).
    A dry run removes nothing and lists what the real run would remove."""
    with Session(engine) as session:
        series, outputs, leftovers = _held_series(session), _held_outputs(session), _leftovers(session)
    plan = _plan(config, series, outputs, leftovers)
    leftover_files = len(leftovers.instance_ids) + len(leftovers.output_paths)
    if dry_run:
        freed = leftovers.bytes + sum(r.bytes for r in [*plan.series, *plan.outputs])
        return PurgeReport(True, plan.series, plan.outputs, leftover_files, freed, plan.held)
    with Session(engine) as session, session.begin():
        marked_series, marked_outputs, instance_ids = _mark(session, plan)
    deleted = _Deleted(folders=set(leftovers.folders))
    _delete_instance_files(engine, leftovers.instance_ids + instance_ids, deleted)
    for path in [*leftovers.output_paths, *(p for removal in marked_outputs for p in removal.paths)]:
        deleted.unlink(path)
    _remove_empty(deleted.folders, (config.incoming_dir, config.jobs_dir))
    report = PurgeReport(False, marked_series, marked_outputs, leftover_files, deleted.bytes, plan.held)
    log.info(report.summary())
    if report.held:
        log.warning(report.held)
    return report


def purge_logged(engine: Engine, config: Config) -> None:
    """For the schedule and the worker: a run that fails is logged and never stops the node."""
    try:
        purge(engine, config)
    except Exception:
        log.exception("retention: the run failed; the next one tries again")


def set_protected(engine: Engine, study_instance_uid: str, protected: bool) -> None:
    """An admin's `rtnode protect`/`unprotect`: retention never removes anything of a protected study."""
    with Session(engine) as session, session.begin():
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).one_or_none()
        if study is None:
            raise UserError(f"no study {study_instance_uid} has been received")
        study.protected = protected
