"""A queued job wakes this machine's workers at once instead of at their next poll; a worker that is gone
leaves nothing behind that a wake-up would trip on."""

from __future__ import annotations

import subprocess
import sys
import time

from node.wakeup import WakeListener, wake_workers


def test_a_wake_up_reaches_every_listening_worker_and_skips_those_gone(tmp_path):
    directory = tmp_path / "wake"
    first, second = WakeListener(directory), WakeListener(directory)  # two workers of one process: one file
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (directory / gone.stdout.strip()).write_text("9", encoding="ascii")  # a worker that died without closing
    try:
        assert first.wait(0.05) is False  # nothing queued: the poll interval passes
        wake_workers(directory)
        started = time.monotonic()
        assert second.wait(5.0) is True and time.monotonic() - started < 1.0
        assert not (directory / gone.stdout.strip()).exists()
        wake_workers(directory)
        wake_workers(directory)
        assert second.wait(5.0) is True and second.wait(0.05) is False  # two wake-ups, one look at the queue
    finally:
        first.close()
        second.close()
    assert list(directory.iterdir()) == []
    wake_workers(tmp_path / "never-made")  # no worker has listened here: nothing to do
