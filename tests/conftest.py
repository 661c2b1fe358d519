"""Shared fixtures: a real rtnode process on a free loopback port, DCMTK tools, test data."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from node.harness import NodeProcess, free_port
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


def run_tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV)


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
