"""Shared fixtures: a real rtnode process on a free loopback port, DCMTK tools, test data."""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine

from node.db.engine import open_database
from node.harness import DCMTK_ENV, NodeProcess, free_port
from node.imaging.volume import load_series_dir
from node.lifecycle.workers import WorkerIdentity
from node.outputs import OutputPaths, write_outputs
from node.rtstruct.builder import Algorithm
from node.synth.ct_series import write_cylinder_ct

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
# Tools the test command installs; with RTNODE_REQUIRE_TOOLS=1 (set by scripts/test.sh) a missing one fails.
REQUIRE_TOOLS = os.environ.get("RTNODE_REQUIRE_TOOLS") == "1"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if REQUIRE_TOOLS:
            pytest.fail(f"{name} is not installed (the test command installs it)")
        pytest.skip(f"{name} is not installed")
    return path


def require_module(name: str):
    """The Python package the test extras install; with RTNODE_REQUIRE_TOOLS=1 its absence fails the run."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        if REQUIRE_TOOLS:
            pytest.fail(f"{name} cannot be imported ({error}); the test command installs it", pytrace=False)
        pytest.skip(f"{name} is not installed")


def shared_data(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"test data {path} is absent")
    return path


def rtnode(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    """The rtnode command line in a subprocess, from the source tree."""
    return subprocess.run(
        [sys.executable, "-m", "node", *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def wait_until(condition, timeout: float = 10.0) -> None:
    """Polls `condition` until it holds; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def run_tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV)


def assert_log_clean(node: NodeProcess) -> None:
    """Fails on an ERROR record or a traceback in the node's log that the test did not provoke on purpose
    (`allowed_log_problems`): a timer or sender thread that crashed must not pass unnoticed."""
    problems = node.log_problems()
    if problems:
        pytest.fail(f"{node.log_path} holds what went wrong unasked:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def node_factory(tmp_path):
    nodes: list[NodeProcess] = []

    def make(**kwargs) -> NodeProcess:
        node = NodeProcess(root=tmp_path / f"node{len(nodes)}", port=free_port(), **kwargs)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()
    for node in nodes:
        assert_log_clean(node)


@pytest.fixture
def node(node_factory) -> NodeProcess:
    return node_factory().start()



def _departed_worker() -> WorkerIdentity:
    """A worker of this machine whose process is gone, as after a node restart or a kill: its pid is above
    the kernel's `pid_max`, so no process or thread can ever have it (an exited child's pid can be reused)."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    return WorkerIdentity(socket.gethostname(), pid_max + 1, "cpu")


GONE_WORKER = _departed_worker()
# A worker on another machine sharing the database: a restart of this node must leave its job to its lease.
OTHER_MACHINE_WORKER = WorkerIdentity("other-host", 4242, "cuda:0")


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its tools as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class PostgresCluster:
    """A throw-away PostgreSQL cluster of Debian's `postgresql` on a free loopback port, stopped and
    started again at will (a database outage)."""

    def __init__(self) -> None:
        binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not binaries:
            if REQUIRE_TOOLS:
                pytest.fail("postgresql is not installed (the test command installs it)")
            pytest.skip("postgresql is not installed")
        self.bin_dir = binaries[-1].parent
        self.folder = Path(tempfile.mkdtemp(prefix="rtnode-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
        self.data, self.port = self.folder / "data", free_port()
        self._tool("initdb", "-D", self.data, "-A", "trust", "-U", "postgres")

    @property
    def url(self) -> str:
        """The server's URL; a database name is appended to it."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}"

    def _tool(self, name: str, *args) -> None:
        subprocess.run(_as_postgres([str(self.bin_dir / name), *map(str, args)]), check=True, capture_output=True)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off"
        self._tool("pg_ctl", "-D", self.data, "-o", options, "-l", self.folder / "log", "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """`fast` ends every connection, as a restart for maintenance does; `immediate` is a crash."""
        self._tool("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def remove(self) -> None:
        subprocess.run(_as_postgres([str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """A throw-away PostgreSQL cluster for the session. Yields the URL of its server; each test makes a
    database of its own (`new_postgres_database`)."""
    cluster = PostgresCluster()
    cluster.start()
    try:
        yield cluster.url
    finally:
        cluster.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """A fresh, empty database on each engine the node supports: SQLite (the default) and PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db.sqlite3'}"
    return new_postgres_database(request.getfixturevalue("postgres_server"))


def new_postgres_database(server: str) -> str:
    """The URL of a new, empty database on the test PostgreSQL server."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    with create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT").connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    return f"{server}/{name}"


@pytest.fixture
def engine(database_url):
    """The node's database, migrated, on SQLite and on PostgreSQL."""
    engine = open_database(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def rtstruct(tmp_path) -> Path:
    """A small RT Structure Set as the worker writes it, to send."""
    volume = load_series_dir(write_cylinder_ct(tmp_path / "ct", slices=4, rows=16, columns=16)[0].parent)
    mask = np.zeros(volume.shape, dtype=bool)
    mask[1:3, 4:10, 4:10] = True
    path = tmp_path / "rtstruct.dcm"
    write_outputs(volume, mask, OutputPaths(rtstruct=path), Algorithm("test", "1"))
    return path
