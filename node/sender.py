"""The sender: sends each pending delivery to the destination configured under its name, durably and
politely, by that destination's type (`node.destinations`: C-STORE, DICOMweb STOW-RS).

Deliveries live in the database, so a restart carries on where it stopped. A failure
that may pass (destination down, out of resources) is retried with exponential backoff
up to `delivery.max_age_seconds`; one that will not (a permanent rejection, a refusal of
the object, refused credentials) fails at once; a failed TLS handshake is retried (a certificate
may be being renewed). A delivery that succeeded is never sent again. What happens to a
delivery after an attempt is `node.lifecycle`'s business, and how it is sent its destination
type's; this module takes what is due, finds its destination and records the attempt.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import partial

from sqlalchemy import Engine

from node.config import Config
from node.db.outage import DATABASE_AWAY, Outage
from node.destinations import DeliveryOrder, SendOutcome, orphaned
from node.lifecycle import deliveries
from node.lifecycle.deliveries import RetryPolicy
from node.lifecycle.workers import WorkerIdentity

log = logging.getLogger(__name__)


def send(config: Config, order: DeliveryOrder) -> SendOutcome:
    """One attempt, by the destination configured under the delivery's name. A delivery whose destination was
    removed from the configuration, or cannot send what its row recorded, fails in words (`orphaned`)."""
    destination = next((d for d in config.destinations if d.name == order.destination), None)
    if destination is None or not destination.takes(order):
        return orphaned(order)
    return destination.send(config, order)


def log_destination_warnings(config: Config) -> None:
    """Each destination's warning about its settings, at start-up (STOW-RS on plain http to another machine)."""
    for destination in config.destinations:
        if (warning := destination.warning()) is not None:
            log.warning("destination %s: %s", destination.name, warning)


class Sender:
    def __init__(self, config: Config, engine: Engine, identity: WorkerIdentity) -> None:
        self._config = config
        self._engine = engine
        self._identity = identity
        self._policy = RetryPolicy.from_config(config.delivery)
        log_destination_warnings(config)

    def run_forever(self, stop: threading.Event, poll_seconds: float = 0.25, woken: threading.Event | None = None) -> None:
        """Until asked to stop; while the database is away it waits for it. Between polls it sleeps until
        `woken` is set (this process's worker has just queued deliveries) or the poll is due."""
        outage = Outage(f"sender of {self._identity.name}")
        woken = woken or threading.Event()
        while not stop.is_set():
            try:
                due = self.send_due(outage, stop)
                outage.over()
            except DATABASE_AWAY as error:
                outage.wait(error, stop)
                continue
            if not due and woken.wait(poll_seconds):
                woken.clear()

    def send_due(self, outage: Outage, stop: threading.Event) -> int:
        """Attempt every delivery whose time has come; returns how many were due. An attempt's outcome is
        recorded even when the database went away during the send: it is waited for, not dropped."""
        due = deliveries.due_deliveries(self._engine, self._config.completion.release_grace_seconds)
        for delivery_id in due:
            order = deliveries.take_delivery(self._engine, delivery_id, self._identity, self._config.node.worker_lease_seconds)
            if order is None:
                continue
            start = time.perf_counter()
            outcome = send(self._config, order)
            seconds = time.perf_counter() - start
            outage.until_done(partial(deliveries.record_attempt, self._engine, delivery_id, outcome, seconds, self._policy), stop)
        return len(due)
