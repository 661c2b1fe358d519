"""Series completion: when has a series stopped arriving?

Each stored instance pushes back the end of its series' quiet time
(`completion.quiet_seconds`): a one-shot APScheduler timer per series, set at its first slice,
reads the series' latest arrival when it fires and waits again while the quiet time is not over
(rescheduling a timer per slice cost more than storing the slice; the rows also tell of slices
another receiving process stored). When the quiet time is over, the series gets a job, or, when it is a series
of RT Structure Sets sent back (a reviewed auto-contour, say), a pending review per structure
set for the worker to match and measure: nothing is read here but the database. When an
association is released and the series it carried is geometrically complete
(contiguous, evenly spaced, enough slices), its job is queued at once rather than after the quiet
time: slices that still come (on another association, or to another receiving process) join that job,
no worker takes it while they arrive, and its structure set is sent only once the series has been
quiet for `completion.release_grace_seconds`, so one series still makes one job and one send.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import numpy as np
from apscheduler.schedulers.background import BackgroundScheduler
from pydicom import dcmread
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from node.config import Config
from node.db.models import Instance, Series
from node.db.outage import DATABASE_AWAY, describe
from node.lifecycle.jobs import settle_quiet_series
from node.routing import configured_rule
from node.vocabulary import JobStatus
from node.wakeup import wake_workers

log = logging.getLogger(__name__)

OUTAGE_RETRY_SECONDS = 5.0  # a quiet series whose decision the database could not take is tried again this often


def looks_complete(paths: list[str], min_slices: int) -> bool:
    """Contiguous, evenly spaced single-orientation stack: nothing seems to be missing."""
    if len(paths) < min_slices:
        return False
    positions, orientations = [], set()
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["ImagePositionPatient", "ImageOrientationPatient"])
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            return False
        positions.append([float(v) for v in ds.ImagePositionPatient])
        orientations.add(tuple(round(float(v), 4) for v in ds.ImageOrientationPatient))
    if len(orientations) != 1:
        return False
    iop = np.array(next(iter(orientations)))
    offsets = np.sort(np.asarray(positions) @ np.cross(iop[:3], iop[3:]))
    steps = np.diff(offsets)
    median = float(np.median(steps))
    return median > 0 and bool(np.all(np.abs(steps - median) <= 0.01 * median + 1e-3))


class CompletionTracker:
    def __init__(self, config: Config, engine: Engine) -> None:
        self._config = config
        self._engine = engine
        self._scheduler = BackgroundScheduler(timezone=UTC)
        self._lock = threading.Lock()
        self._carried: dict[int, set[str]] = defaultdict(set)  # association -> series it carried
        self._armed: set[str] = set()  # series whose timer is set

    def start(self, pending_series: list[str]) -> None:
        self._scheduler.start()
        for uid in pending_series:
            self.arm(uid, self._config.completion.quiet_seconds)

    def stop(self) -> None:
        self._scheduler.shutdown(wait=True)

    def arm(self, series_uid: str, delay: float) -> None:
        """The series' timer fires in `delay` seconds, sooner or later than it would have."""
        with self._lock:
            self._armed.add(series_uid)
        self._schedule(series_uid, delay)

    def _schedule(self, series_uid: str, delay: float) -> None:
        now = datetime.now(UTC)
        self._scheduler.add_job(
            self._fire,
            "date",
            run_date=now + timedelta(seconds=delay),
            args=[series_uid, now],
            id=series_uid,
            replace_existing=True,
            misfire_grace_time=None,
        )

    def instance_stored(self, association_id: int, series_uid: str) -> None:
        """Sets the series' timer if none is set; a set one finds this slice's row when it fires."""
        with self._lock:
            self._carried[association_id].add(series_uid)
            armed = series_uid in self._armed
            self._armed.add(series_uid)
        if not armed:
            self._schedule(series_uid, self._config.completion.quiet_seconds)

    def association_released(self, association_id: int) -> None:
        with self._lock:
            carried = self._carried.pop(association_id, set())
        for uid in carried:
            with Session(self._engine) as session:
                paths = session.scalars(select(Instance.path).join(Series).where(Series.series_instance_uid == uid)).all()
            if looks_complete(list(paths), self._config.completion.min_slices):
                log.info(
                    "series %s looks complete after association release: starting now, sent once quiet for %.1f s",
                    uid,
                    self._config.completion.release_grace_seconds,
                )
                self.arm(uid, 0.0)

    def _quiet_left(self, series_uid: str, armed_at: datetime) -> float:
        """Seconds of quiet time still owed to slices of the series stored after this timer was set,
        by this receiving process or another (their rows tell); 0 when none."""
        with Session(self._engine) as session:
            latest = session.scalar(
                select(func.max(Instance.last_received_at)).join(Series).where(Series.series_instance_uid == series_uid)
            )
        if latest is None or latest <= armed_at:
            return 0.0
        return (latest - datetime.now(UTC)).total_seconds() + self._config.completion.quiet_seconds

    def association_aborted(self, association_id: int) -> None:
        with self._lock:
            self._carried.pop(association_id, None)

    def _fire(self, series_uid: str, armed_at: datetime) -> None:
        """A timer that fires while the database is away is set again: the series is decided when it is back."""
        with self._lock:
            self._armed.discard(series_uid)  # before the rows are read: a slice stored after sets a new timer
        try:
            remaining = self._quiet_left(series_uid, armed_at)
            if remaining > 0:  # slices arrived after the timer was set
                self.arm(series_uid, remaining)
                return
            settled = settle_quiet_series(self._engine, series_uid, configured_rule(self._config))
            if settled.job is not None and settled.job.status == JobStatus.QUEUED:
                wake_workers(self._config.wake_dir)
        except DATABASE_AWAY as error:
            log.warning(
                "series %s: the database is unreachable (%s): deciding it again in %.0f s",
                series_uid,
                describe(error),
                OUTAGE_RETRY_SECONDS,
            )
            self.arm(series_uid, OUTAGE_RETRY_SECONDS)
        except Exception:
            log.exception("could not create a job for series %s", series_uid)
