"""Shared fixtures: a real rtnode process on a free loopback port, DCMTK tools, test data."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from node.synth.ct_series import PatientStudy, SeriesGeometry, ct_datasets, uniform_positions, write_series

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
# Tools the test command installs; with RTNODE_REQUIRE_TOOLS=1 (set by scripts/test.sh) a missing one fails.
REQUIRE_TOOLS = os.environ.get("RTNODE_REQUIRE_TOOLS") == "1"
# Without TCP_NODELAY DCMTK stalls ~45 ms per message on Nagle's algorithm.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if REQUIRE_TOOLS:
            pytest.fail(f"{name} is not installed (the test command installs it)")
        pytest.skip(f"{name} is not installed")
    return path


def shared_data(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"test data {path} is absent")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def run_tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV)


@dataclass
class NodeProcess:
    """`rtnode serve` in a subprocess with its own config, data and database under tmp_path."""

    root: Path
    port: int
    extra_config: str = ""  # more [node] keys
    sections: str = ""  # more TOML sections ([completion], [[destinations]], ...)
    allowed_callers: str = '[{ ae_title = "*", host = "127.0.0.1" }]'
    process: subprocess.Popen | None = None
    log_path: Path = field(init=False)
    config_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_path = self.root / "node.log"
        self.config_path = self.root / "node.toml"
        self.config_path.write_text(
            f"""
[node]
ae_title = "RTNODE"
host = "127.0.0.1"
port = {self.port}
data_dir = "{self.root / 'data'}"
database_url = "sqlite:///{self.root / 'rtnode.sqlite3'}"
network_timeout_seconds = 3
shutdown_grace_seconds = 10
{self.extra_config}

[security]
allowed_callers = {self.allowed_callers}

[model]
weights = "{REPO / 'weights' / 'ctv-unet3d.safetensors'}"
device = "cpu"

{self.sections}
"""
        )

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def database(self) -> Path:
        return self.root / "rtnode.sqlite3"

    def start(self) -> NodeProcess:
        log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "node", "--config", str(self.config_path), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.stop()
            raise AssertionError(f"node did not start:\n{self.log()}") from None
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

    def rtnode(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "node", "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.root,
        )


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


@pytest.fixture
def node(node_factory) -> NodeProcess:
    return node_factory().start()


def phantom_hu(slices: int, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """A water cylinder in air with some noise: enough structure for I/O tests."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0:rows, 0:columns]
    inside = ((r - rows / 2) / (rows * 0.4)) ** 2 + ((c - columns / 2) / (columns * 0.45)) ** 2 < 1
    hu = np.where(inside, 20.0, -1000.0)[None].repeat(slices, axis=0)
    return hu + rng.normal(0, 10, hu.shape)


def write_ct(
    out_dir: Path,
    slices: int = 50,
    rows: int = 128,
    columns: int = 128,
    *,
    spacing: float = 2.5,
    pixel_spacing: tuple[float, float] = (1.5, 1.5),
    patient: PatientStudy | None = None,
) -> list[Path]:
    geometry = SeriesGeometry(
        pixel_spacing=pixel_spacing,
        slice_positions=uniform_positions(slices, spacing),
        origin=(-columns * pixel_spacing[1] / 2, -rows * pixel_spacing[0] / 2, -100.0),
    )
    return write_series(ct_datasets(phantom_hu(slices, rows, columns), geometry, patient), out_dir)
