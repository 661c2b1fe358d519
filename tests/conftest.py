"""Shared fixtures: a real rtnode process on a free loopback port, DCMTK tools, test data."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from node.harness import DCMTK_ENV, NodeProcess, free_port
from node.lifecycle import WorkerIdentity

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



def _departed_worker() -> WorkerIdentity:
    """A worker of this machine whose process has exited, as after a node restart or a kill."""
    process = subprocess.Popen(["true"])
    process.wait()
    return WorkerIdentity(socket.gethostname(), process.pid, "cpu")


GONE_WORKER = _departed_worker()
