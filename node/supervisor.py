"""Keeps one `rtnode worker` process beside the receiving process.

Inference runs there, so the SCP's threads never wait on the model. The child dies
with its parent (PR_SET_PDEATHSIG): a killed node never leaves a second worker behind.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class WorkerProcess:
    def __init__(self, config_path: Path) -> None:
        self._command = [sys.executable, "-m", "node", "--config", str(config_path), "worker"]
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(self._command, preexec_fn=_die_with_parent)
        log.info("worker process %d started", self._process.pid)

    def keep_alive(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            log.error("worker process exited with status %s: starting a new one", self._process.returncode)
            self.start()

    def stop(self, timeout: float = 60.0) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
