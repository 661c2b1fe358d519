"""A whole `rtnode serve` in a subprocess, on a free loopback port, with its own TOML
configuration, data and database in one folder: the one way `rtnode demo`, the tests and
the benchmarks start a node."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from node.config import BUNDLED_WEIGHTS

LOOPBACK = "127.0.0.1"
# For DCMTK peers (storescu, storescp, echoscu): without TCP_NODELAY they stall ~45 ms per message on Nagle's algorithm.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


# A log record starts with the timestamp of the format `rtnode` logs with (node/cli/__init__.py); other lines continue it.
_RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", re.M)
# An ERROR or CRITICAL record in rtnode's format or uvicorn's ("ERROR:    ..."), or a traceback anywhere.
_PROBLEM = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) |^(ERROR|CRITICAL): |Traceback \(most recent call last\)", re.M)


def log_problems(text: str, allowed: tuple[str, ...] = ()) -> list[str]:
    """The records of a node's log that say something went wrong (an ERROR or CRITICAL line, or a traceback,
    a background thread's included), less those matching one of the `allowed` regular expressions."""
    starts = [m.start() for m in _RECORD_START.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    records = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
    return [
        record.rstrip()
        for record in records
        if _PROBLEM.search(record) and not any(re.search(pattern, record) for pattern in allowed)
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def destination_toml(name: str, ae_title: str, port: int) -> str:
    """One `[[destinations]]` entry on loopback."""
    return f'[[destinations]]\nname = "{name}"\nae_title = "{ae_title}"\nhost = "{LOOPBACK}"\nport = {port}\n'


@dataclass
class NodeProcess:
    """`rtnode serve` with its config (`node.toml`), log (`node.log`), data and database under `root`."""

    root: Path
    port: int
    extra_config: str = ""  # more [node] keys
    sections: str = ""  # more TOML sections ([completion], [[destinations]], ...)
    allowed_callers: str = f'[{{ ae_title = "*", host = "{LOOPBACK}" }}]'
    weights: Path = BUNDLED_WEIGHTS
    device: str = "cpu"
    network_timeout_seconds: float = 3.0
    shutdown_grace_seconds: float = 10.0
    # The web app: off unless given a port (a node per test must not start a browser-facing process each).
    web_port: int | None = None
    web_config: str = ""  # more [web] keys
    database_url: str = ""  # default: SQLite in `root`
    # Regular expressions of the log's ERROR records and tracebacks a test provokes on purpose (see log_problems).
    allowed_log_problems: tuple[str, ...] = ()
    process: subprocess.Popen | None = None
    log_path: Path = field(init=False)
    config_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.database_url = self.database_url or f"sqlite:///{self.database}"
        self.log_path = self.root / "node.log"
        self.config_path = self.root / "node.toml"
        self.config_path.write_text(
            f"""
[node]
ae_title = "RTNODE"
host = "{LOOPBACK}"
port = {self.port}
data_dir = "{self.data_dir}"
database_url = "{self.database_url}"
network_timeout_seconds = {self.network_timeout_seconds}
shutdown_grace_seconds = {self.shutdown_grace_seconds}
{self.extra_config}

[security]
allowed_callers = {self.allowed_callers}

[model]
weights = "{self.weights}"
device = "{self.device}"

[web]
{f"port = {self.web_port}" if self.web_port else "enabled = false"}
{self.web_config}

{self.sections}
"""
        )

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def database(self) -> Path:
        return self.root / "rtnode.sqlite3"

    def start(self, timeout: float = 20.0) -> NodeProcess:
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "node", "--config", str(self.config_path), "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )
        try:
            wait_for_port(self.port, timeout)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"the node did not start listening on port {self.port}:\n{self.log()}") from None
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def log_problems(self) -> list[str]:
        """What went wrong in this node's processes that nobody asked for (`allowed_log_problems`)."""
        return log_problems(self.log(), self.allowed_log_problems)

    def rtnode(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Another rtnode command against this node's configuration."""
        return subprocess.run(
            [sys.executable, "-m", "node", "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )
