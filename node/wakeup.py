"""Waking this machine's workers when a job is queued, instead of leaving them to their next poll.

Each worker listens on a UDP port of loopback and writes it to `data_dir/wake/<pid>`; the receiving
process, having queued a job, sends one datagram to every port listed there. A wake-up that is lost (a
worker on another machine, a full socket buffer, a worker that just stopped) costs only the poll
interval: nothing depends on it, and the datagram says nothing but "look at the queue".
"""

from __future__ import annotations

import logging
import os
import select
import socket
from pathlib import Path

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"


class WakeListener:
    """A worker's ear: `wait(timeout)` returns True as soon as someone queued a job, False after `timeout`."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind((LOOPBACK, 0))
        self._socket.setblocking(False)
        self._path = directory / str(os.getpid())
        self._path.write_text(str(self._socket.getsockname()[1]), encoding="ascii")

    def wait(self, timeout: float) -> bool:
        readable, _, _ = select.select([self._socket], [], [], timeout)
        if not readable:
            return False
        while True:  # every wake-up sent so far is answered by this one look at the queue
            try:
                self._socket.recv(16)
            except BlockingIOError:
                return True

    def close(self) -> None:
        self._path.unlink(missing_ok=True)
        self._socket.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wake_workers(directory: Path) -> None:
    """One datagram to each listening worker of this machine; the files of workers gone are removed."""
    if not directory.is_dir():
        return
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.setblocking(False)
        for path in directory.iterdir():
            if not path.name.isdigit() or not _alive(int(path.name)):
                path.unlink(missing_ok=True)
                continue
            try:
                sender.sendto(b"!", (LOOPBACK, int(path.read_text(encoding="ascii"))))
            except (OSError, ValueError) as error:  # a file being written, a full buffer: the poll finds the job
                log.debug("no wake-up for the worker of %s: %s", path, error)
