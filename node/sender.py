"""The sender: C-STOREs each pending delivery to its destination, durably and politely.

Deliveries live in the database, so a restart carries on where it stopped. A failure
that may pass (destination down, out of resources) is retried with exponential
backoff up to `delivery.max_age_seconds`; one that will not (a permanent rejection, a
refusal of the object) fails at once. A delivery that succeeded is never sent again.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from pynetdicom import AE
from pynetdicom.sop_class import RTStructureSetStorage, SegmentationStorage
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from node.config import Config
from node.jobs import add_event, settle
from node.models import Delivery, utcnow

log = logging.getLogger(__name__)

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
SOP_CLASSES = {"rtstruct": RTStructureSetStorage, "seg": SegmentationStorage}


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    retry: bool  # only meaningful when not delivered
    detail: str


def c_store(config: Config, delivery: Delivery) -> Outcome:
    ae = AE(ae_title=config.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(SOP_CLASSES[delivery.kind], EXPLICIT_VR_LITTLE_ENDIAN)
    assoc = ae.associate(delivery.host, delivery.port, ae_title=delivery.ae_title)
    if not assoc.is_established:
        if assoc.is_rejected:
            primitive = assoc.acceptor.primitive
            permanent = getattr(primitive, "result", None) == 0x01
            reason = getattr(primitive, "reason_str", "") or "rejected"
            return Outcome(False, not permanent, f"association rejected by {delivery.ae_title}@{delivery.host}:{delivery.port}: {reason}")
        return Outcome(False, True, f"cannot reach {delivery.ae_title}@{delivery.host}:{delivery.port}")
    try:
        status = assoc.send_c_store(delivery.path)
    except (OSError, ValueError) as exc:
        return Outcome(False, True, f"C-STORE to {delivery.destination} failed: {exc}")
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        return Outcome(False, True, f"no C-STORE response from {delivery.destination}")
    if code == 0x0000 or 0xB000 <= code <= 0xBFFF:
        return Outcome(True, False, f"stored by {delivery.destination} (status 0x{code:04X})")
    transient = 0xA700 <= code <= 0xA7FF
    return Outcome(False, transient, f"{delivery.destination} answered C-STORE failure status 0x{code:04X}")


class Sender:
    def __init__(self, config: Config, engine: Engine) -> None:
        self._config = config
        self._engine = engine

    def run_forever(self, stop: threading.Event, poll_seconds: float = 0.25) -> None:
        while not stop.is_set():
            if not self.send_due():
                stop.wait(poll_seconds)

    def send_due(self) -> int:
        """Attempt every delivery whose time has come; returns how many were attempted."""
        with Session(self._engine) as session:
            due = session.scalars(
                select(Delivery.id).where(Delivery.status == "pending", Delivery.next_attempt_at <= utcnow()).order_by(Delivery.id)
            ).all()
        for delivery_id in due:
            self._attempt(delivery_id)
        return len(due)

    def _attempt(self, delivery_id: int) -> None:
        with Session(self._engine) as session:
            delivery = session.get(Delivery, delivery_id)
            if delivery.status != "pending":
                return
            start = time.perf_counter()
            outcome = c_store(self._config, delivery)
            elapsed = time.perf_counter() - start
        with Session(self._engine) as session, session.begin():
            delivery = session.get(Delivery, delivery_id)
            job = delivery.job
            delivery.attempts += 1
            now = utcnow()
            if outcome.delivered:
                delivery.status, delivery.delivered_at, delivery.last_error = "done", now, ""
                job.timings = {**job.timings, "send": round(job.timings.get("send", 0) + elapsed, 3)}
                add_event(session, job, "delivered", f"{delivery.kind} to {delivery.destination} (attempt {delivery.attempts})")
            else:
                delivery.last_error = outcome.detail
                age = (now - delivery.created_at).total_seconds()
                if outcome.retry and age < self._config.delivery.max_age_seconds:
                    backoff = min(
                        self._config.delivery.first_retry_seconds * 2 ** (delivery.attempts - 1), self._config.delivery.max_retry_seconds
                    )
                    delivery.next_attempt_at = now + timedelta(seconds=backoff)
                    add_event(session, job, "send failed", f"{outcome.detail}; retry {delivery.attempts + 1} in {backoff:.0f} s")
                else:
                    delivery.status = "failed"
                    why = "not retried: this will not improve by waiting" if not outcome.retry else "gave up: delivery.max_age_seconds reached"
                    add_event(session, job, "send failed", f"{outcome.detail}; {why}")
            settle(session, job)
