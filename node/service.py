"""Process wiring: `rtnode serve` (receiving, with one worker process beside it) and
`rtnode worker` (the job worker and the sender), each stopped cleanly by SIGTERM/SIGINT.

The worker is its own process, so inference never stalls the SCP's threads. It dies with
its parent (PR_SET_PDEATHSIG): a killed node never leaves a second worker behind. With
`node.receivers` above 1, `rtnode serve` opens the listening sockets itself and starts that
many minus one `rtnode receive` processes beside it, all accepting on them: pynetdicom runs an
association's Python in one process, so several senders at once are stored on several cores.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine

from node.completion import CompletionTracker
from node.config import Config
from node.db.engine import open_database
from node.db.outage import DATABASE_AWAY, Outage, describe
from node.errors import UserError
from node.lifecycle.jobs import series_needing_jobs
from node.lifecycle.workers import (
    WorkerIdentity,
    expire_leases,
    heartbeat,
    recover_after_restart,
    register_worker,
    report_unusable_model,
    requeue_after_worker_death,
)
from node.pipeline.registry import refuse_unverified_models
from node.retention import purge_logged
from node.scp import StorageSCP
from node.store import InstanceStore
from node.transport import Listeners

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT: the one way every rtnode process is asked to stop."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def open_node_database(config: Config) -> Engine:
    return open_database(config.node.database_url, fsync=config.node.fsync)


class ChildProcess:
    """An rtnode sub-command beside the receiving process; it dies with its parent."""

    def __init__(
        self, config_path: Path, command: str, stop_timeout: float, args: tuple[str, ...] = (), pass_fds: tuple[int, ...] = ()
    ) -> None:
        self._name = command
        self._command = [sys.executable, "-m", "node", "--config", str(config_path), command, *args]
        self._stop_timeout = stop_timeout
        self._pass_fds = pass_fds
        self._process: subprocess.Popen | None = None
        self._started_at = 0.0

    def start(self) -> None:
        self._process = subprocess.Popen(self._command, preexec_fn=_die_with_parent, pass_fds=self._pass_fds)
        self._started_at = time.monotonic()
        log.info("%s process %d started", self._name, self._process.pid)

    def _exited(self) -> tuple[int, int] | None:
        """(pid, exit status) once the process has ended, else None."""
        if self._process is None or self._process.poll() is None:
            return None
        return self._process.pid, self._process.returncode

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=self._stop_timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


class WorkerProcess(ChildProcess):
    """One `rtnode worker` beside the receiving process, restarted when it dies."""

    def __init__(self, config_path: Path) -> None:
        super().__init__(config_path, "worker", stop_timeout=60.0)

    def keep_alive(self) -> tuple[str, int] | None:
        """Start a new worker if the last one died; returns the dead one's worker name and exit status."""
        exited = self._exited()
        if exited is None:
            return None
        name, status = f"{socket.gethostname()}:{exited[0]}", exited[1]
        log.error("worker process %s exited with status %s: starting a new one", name, status)
        self.start()
        return name, status


class RestartedProcess(ChildProcess):
    """Restarted when it dies, unless it dies within its first seconds (a busy port, a bad certificate):
    then it is left down with an error rather than restarted in a loop."""

    STARTUP_SECONDS = 10.0

    def __init__(self, what: str, config_path: Path, command: str, stop_timeout: float, **kwargs) -> None:
        super().__init__(config_path, command, stop_timeout, **kwargs)
        self._what = what

    def keep_alive(self) -> None:
        exited = self._exited()
        if exited is None:
            return
        status, self._process = exited[1], None
        if time.monotonic() - self._started_at < self.STARTUP_SECONDS:
            log.error("%s exited with status %s right after starting (see above): not restarted", self._what, status)
            return
        log.error("%s exited with status %s: starting it again", self._what, status)
        self.start()


class WebProcess(RestartedProcess):
    """`rtnode web` beside the receiving process, so browsers paging slices never slow the SCP."""

    def __init__(self, config_path: Path) -> None:
        super().__init__("the web app", config_path, "web", stop_timeout=10.0)


class ReceiverProcess(RestartedProcess):
    """`rtnode receive`: one more process accepting on the listening sockets `rtnode serve` opened."""

    def __init__(self, config_path: Path, listeners: Listeners, stop_timeout: float) -> None:
        descriptors = tuple(listener.fileno() for listener in listeners.sockets)
        super().__init__(
            "a receiving process",
            config_path,
            "receive",
            stop_timeout,
            args=("--listeners", ",".join(map(str, descriptors))),
            pass_fds=descriptors,
        )


def _retention_schedule(config: Config, engine: Engine) -> BackgroundScheduler:
    """Retention at start-up and every `interval_minutes` (the worker also applies it after each job)."""
    scheduler = BackgroundScheduler(timezone=UTC)
    minutes = config.retention.interval_minutes
    scheduler.add_job(purge_logged, "interval", args=(engine, config), minutes=minutes, next_run_time=datetime.now(UTC))
    scheduler.start()
    return scheduler


def _refuse_ports_in_use(config: Config, config_path: Path) -> None:
    """Every port `serve` listens on is free, or it stops here in one sentence, before it starts anything."""
    wanted = [("node.port", config.node.host, config.node.port)]
    if config.tls.enabled:
        wanted.append(("tls.port", config.node.host, config.tls.port))
    if config.web.enabled:
        wanted.append(("web.port", config.web.host, config.web.port))
    for key, host, port in wanted:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no obstacle
            try:
                probe.bind(address)
            except OSError as exc:
                raise UserError(
                    f"cannot listen on {host}:{port} ({key} in {config_path}): {exc.strerror}; is another rtnode or DICOM"
                    " server running there?"
                ) from None


def serve(config: Config, config_path: Path) -> int:
    """Receive until asked to stop; the worker process runs the jobs."""
    if config.web.enabled and (refusal := config.web.refusal()) is not None:
        raise UserError(refusal)  # before anything listens
    refuse_unverified_models(config)
    _refuse_ports_in_use(config, config_path)
    if (warning := config.node.warning()) is not None:
        log.warning("%s", warning)
    if not config.destinations:
        log.warning("no [[destinations]] in %s: jobs are contoured and end done, but nothing is sent", config_path)
    if config.node.receivers > 1 and not config.node.database_url.startswith("postgresql"):
        raise UserError(
            f"node.receivers = {config.node.receivers} needs PostgreSQL (node.database_url): on SQLite, several receiving "
            "processes' saves were seen to stall together for seconds while their fsyncs ran"
        )
    stop = stop_on_signals()
    engine = open_node_database(config)
    requeued = recover_after_restart(engine)
    if requeued:
        log.info("%d job(s) that were running at the last stop are queued again", requeued)
    tracker = CompletionTracker(config, engine)
    tracker.start(series_needing_jobs(engine))
    worker = WorkerProcess(config_path.resolve()) if config.node.local_worker else None
    if worker is not None:
        worker.start()
    store = _instance_store(config, engine)
    store.remove_orphans()  # before receiving: a write in flight is no orphan
    listeners = Listeners.open(config.node, config.tls) if config.node.receivers > 1 else None
    scp = StorageSCP(config, store, tracker, listeners)
    scp.start()
    stop_timeout = config.node.shutdown_grace_seconds + 10
    receivers = [ReceiverProcess(config_path.resolve(), listeners, stop_timeout) for _ in range(config.node.receivers - 1)]
    for receiver in receivers:
        receiver.start()
    web = WebProcess(config_path.resolve()) if config.web.enabled else None
    if web is not None:
        web.start()
    retention = _retention_schedule(config, engine)
    deaths: list[tuple[str, int]] = []  # dead workers whose jobs are still to be queued again
    outage = Outage("rtnode serve")
    while not stop.wait(1.0):
        died = worker.keep_alive() if worker is not None else None
        if died is not None:
            deaths.append(died)
        try:
            while deaths:
                requeue_after_worker_death(engine, *deaths[0])
                deaths.pop(0)
            outage.over()
        except DATABASE_AWAY as error:
            outage.wait(error, stop)
        if web is not None:
            web.keep_alive()
        for receiver in receivers:
            receiver.keep_alive()
    log.info("stopping: no new associations, waiting for in-flight ones")
    for receiver in receivers:
        receiver.stop()
    scp.stop()
    retention.shutdown()
    tracker.stop()
    if web is not None:
        web.stop()
    if worker is not None:
        worker.stop()
    return 0


def _instance_store(config: Config, engine: Engine) -> InstanceStore:
    return InstanceStore(engine, config.incoming_dir, fsync=config.node.fsync, max_instance_mb=config.node.max_instance_mb)


def receive(config: Config, listeners: Listeners) -> int:
    """One of `rtnode serve`'s receiving processes beyond its own: stores what the associations it
    accepts carry and keeps their series' completion timers, until asked to stop."""
    stop = stop_on_signals()
    engine = open_node_database(config)
    tracker = CompletionTracker(config, engine)
    tracker.start([])  # series pending at start-up are `rtnode serve`'s to time
    scp = StorageSCP(config, _instance_store(config, engine), tracker, listeners)
    scp.start()
    stop.wait()
    scp.stop()
    tracker.stop()
    return 0


def _beat(engine: Engine, identity: WorkerIdentity, lease_seconds: float, stop: threading.Event) -> None:
    """Renew this worker's leases and take back what lost workers held, until asked to stop."""
    outage = Outage(f"heartbeat of {identity.name}")
    while not stop.wait(lease_seconds / 4):
        try:
            heartbeat(engine, identity, lease_seconds)
            expire_leases(engine)
            outage.over()
        except DATABASE_AWAY as error:
            outage.wait(error, stop)  # the leases run out if the database stays away longer than they last


def worker_device_name(asked: str) -> str:
    """What `auto` turns out to be (`cpu`, `cuda`), for the job log, /healthz and /metrics; a device that
    is not there keeps its name: loading the model says why it cannot be used."""
    from node.pipeline.inference import DeviceError, resolve_device

    try:
        return str(resolve_device(asked))
    except DeviceError:
        return asked


def run_worker(config: Config, device: str | None = None) -> int:
    """Jobs in this thread, deliveries in another, a heartbeat in a third, until asked to stop.
    Any number of workers, on any machines sharing the database and data_dir, can run at once."""
    # Imported here, not at the top: `rtnode serve` imports this module and must not load torch.
    from node.sender import Sender
    from node.worker import Worker

    stop = stop_on_signals()
    identity = WorkerIdentity.this_process(worker_device_name(device or config.model.device))
    lease = config.node.worker_lease_seconds
    outage = Outage(f"worker {identity.name}")
    try:  # a worker may start before its database does
        engine = outage.until_done(lambda: open_node_database(config), stop)
        outage.until_done(lambda: (register_worker(engine, identity), expire_leases(engine)), stop)
    except DATABASE_AWAY:
        return 0  # asked to stop before the database came back
    log.info("worker %s on %s", identity.name, identity.device)
    beat = threading.Thread(target=_beat, args=(engine, identity, lease, stop), name="heartbeat", daemon=True)
    beat.start()
    deliveries_queued = threading.Event()  # the worker wakes the sender as soon as a job's deliveries are queued
    sender = threading.Thread(
        target=Sender(config, engine, identity).run_forever, args=(stop,), kwargs={"woken": deliveries_queued},
        name="sender", daemon=True,
    )
    sender.start()
    worker = Worker(config, engine, identity, deliveries_queued)
    try:
        worker.load_models()
        usable = True
    except UserError as exc:
        # Found now, not by the first job: queued jobs wait for a fixed model; reviews and deliveries go on.
        problem = f"the model cannot be used: {exc}"
        log.error("the worker does not take jobs: %s", problem)
        outage.until_done(partial(report_unusable_model, engine, identity, problem), stop)
        usable = False
    worker.run_forever(stop, take_jobs=usable)
    sender.join(timeout=60)
    beat.join(timeout=5)
    try:
        heartbeat(engine, identity, lease, stopped=True)
    except DATABASE_AWAY as error:
        log.warning("worker %s stopped without saying so to the database: %s", identity.name, describe(error))
    return 0
