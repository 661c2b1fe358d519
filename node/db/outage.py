"""Riding out a database outage: the node's long-running loops wait and try again; they do not die.

A PostgreSQL server restarted for maintenance, a failover, a network cut to the database host:
each ends, and the node must be running when it does. What was acknowledged is already committed,
so waiting loses nothing; only the loops must survive.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError

log = logging.getLogger(__name__)

# What a database that is away (stopped, restarting, unreachable, locked for too long) raises.
DATABASE_AWAY = (OperationalError, InterfaceError)

Result = TypeVar("Result")


class Outage:
    """Waits between tries while the database is away: 0.5 s, doubling to `max_seconds`. Says so once
    when the database goes and once when it is back, not at every try."""

    def __init__(self, who: str, max_seconds: float = 5.0) -> None:
        self._who = who
        self._max_seconds = max_seconds
        self._wait_seconds = 0.0

    @property
    def ongoing(self) -> bool:
        return self._wait_seconds > 0

    def wait(self, error: Exception, stop: threading.Event) -> None:
        if not self.ongoing:
            log.warning("%s: the database is unreachable (%s): trying again until it is back", self._who, describe(error))
        self._wait_seconds = min(self._max_seconds, max(0.5, self._wait_seconds * 2))
        stop.wait(self._wait_seconds)

    def over(self) -> None:
        if self.ongoing:
            log.warning("%s: the database is reachable again", self._who)
            self._wait_seconds = 0.0

    def until_done(self, call: Callable[[], Result], stop: threading.Event) -> Result:
        """`call()`, tried again while the database is away; when asked to stop, the last error is raised."""
        while True:
            try:
                result = call()
            except DATABASE_AWAY as error:
                if stop.is_set():
                    raise
                self.wait(error, stop)
                continue
            self.over()
            return result


def describe(error: Exception) -> str:
    """psycopg's messages run to several lines (the SQL, a link to the docs): the first says what happened."""
    return str(getattr(error, "orig", None) or error).strip().splitlines()[0]
