"""The sender: C-STOREs each pending delivery to its destination, durably and politely.

Deliveries live in the database, so a restart carries on where it stopped. A failure
that may pass (destination down, out of resources) is retried with exponential backoff
up to `delivery.max_age_seconds`; one that will not (a permanent rejection, a refusal of
the object) fails at once; a failed TLS handshake is retried (a certificate may be being
renewed). A delivery that succeeded is never sent again. What happens
to a delivery after an attempt is `node.lifecycle`'s business; this module only talks DICOM.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time

from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, SegmentationStorage
from pynetdicom import AE
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, STORAGE_SERVICE_CLASS_STATUS, code_to_category
from sqlalchemy import Engine

from node import lifecycle
from node.config import Config, Destination, TlsSection
from node.lifecycle import DeliveryOrder, Outcome, RetryPolicy
from node.vocabulary import OutputKind

log = logging.getLogger(__name__)

SOP_CLASSES = {OutputKind.RTSTRUCT: RTStructureSetStorage, OutputKind.SEG: SegmentationStorage}
_OUT_OF_RESOURCES = "Refused: Out of Resources"
# A-ASSOCIATE-RJ result "rejected-permanent" (PS3.8 9.3.4); "rejected-transient" is 0x02.
_REJECTED_PERMANENT = 0x01


def classify_store_status(code: int | None, destination: str) -> Outcome:
    """A C-STORE response status as an outcome, by pynetdicom's categories: Success and Warning
    are delivered; "Refused: Out of Resources" may pass and is retried; any other failure is not."""
    if code is None:
        return Outcome(False, True, f"no C-STORE response from {destination}")
    category = code_to_category(code)
    if category in (STATUS_SUCCESS, STATUS_WARNING):
        return Outcome(True, False, f"stored by {destination} (status 0x{code:04X})")
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, (category, ""))[1]
    transient = meaning == _OUT_OF_RESOURCES
    described = f" ({meaning})" if meaning else ""
    return Outcome(False, transient, f"{destination} answered C-STORE failure status 0x{code:04X}{described}")


class _TlsClientSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:  # ssl.SSLError included
            self.context.handshake_error = exc
            raise


class _ClientContext(ssl.SSLContext):
    """Keeps why the handshake failed: pynetdicom only logs it and reports an association not established."""

    sslsocket_class = _TlsClientSocket
    handshake_error: OSError | None = None


def client_context(tls: TlsSection) -> _ClientContext:
    """TLS 1.2 or later (BCP 195); the destination's certificate checked against `ca_certificates` (the system's
    CAs without) and its host name; the node's certificate presented when it has one."""
    context = _ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca_certificates is not None:
        context.load_verify_locations(tls.ca_certificates)
    else:
        context.load_default_certs()
    if tls.certificate is not None:
        context.load_cert_chain(tls.certificate, tls.private_key)
    return context


def _destination(config: Config, order: DeliveryOrder) -> Destination:
    """The configured destination of a delivery, for its timeouts and TLS; one removed from the
    configuration since the delivery was queued is sent to as recorded, with default timeouts."""
    configured = {d.name: d for d in config.destinations}
    return configured.get(order.destination) or Destination(
        name=order.destination, ae_title=order.ae_title, host=order.host, port=order.port
    )


def c_store(config: Config, order: DeliveryOrder) -> Outcome:
    peer = f"{order.ae_title}@{order.host}:{order.port}"
    destination = _destination(config, order)
    ae = AE(ae_title=config.node.ae_title)
    ae.connection_timeout = destination.acse_timeout_seconds  # also bounds the TLS handshake
    ae.acse_timeout = destination.acse_timeout_seconds
    ae.dimse_timeout = destination.dimse_timeout_seconds
    ae.network_timeout = destination.network_timeout_seconds
    ae.add_requested_context(SOP_CLASSES[order.kind], ExplicitVRLittleEndian)
    context = None
    if destination.tls:
        try:
            context = client_context(config.tls)
        except OSError as exc:  # ssl.SSLError included
            files = f"ca_certificates {config.tls.ca_certificates}, certificate {config.tls.certificate}"
            return Outcome(False, True, f"cannot send to {peer} over TLS: [tls] {files} cannot be used: {exc}")
    tls_args = (context, order.host) if context else None  # the host name the certificate must name
    assoc = ae.associate(order.host, order.port, ae_title=order.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        if assoc.is_rejected:
            primitive = assoc.acceptor.primitive
            permanent = getattr(primitive, "result", None) == _REJECTED_PERMANENT
            reason = getattr(primitive, "reason_str", "") or "rejected"
            return Outcome(False, not permanent, f"association rejected by {peer}: {reason}")
        if context is not None and context.handshake_error is not None:
            return Outcome(False, True, f"TLS handshake with {peer} failed: {context.handshake_error}")
        return Outcome(False, True, f"cannot reach {peer}" + (" over TLS" if context else ""))
    try:
        status = assoc.send_c_store(str(order.path))
    except (OSError, ValueError) as exc:
        return Outcome(False, True, f"C-STORE to {order.destination} failed: {exc}")
    finally:
        assoc.release()
    return classify_store_status(getattr(status, "Status", None), order.destination)


class Sender:
    def __init__(self, config: Config, engine: Engine) -> None:
        self._config = config
        self._engine = engine
        self._policy = RetryPolicy.from_config(config.delivery)

    def run_forever(self, stop: threading.Event, poll_seconds: float = 0.25) -> None:
        while not stop.is_set():
            if not self.send_due():
                stop.wait(poll_seconds)

    def send_due(self) -> int:
        """Attempt every delivery whose time has come; returns how many were due."""
        due = lifecycle.due_deliveries(self._engine)
        for delivery_id in due:
            order = lifecycle.take_delivery(self._engine, delivery_id)
            if order is None:
                continue
            start = time.perf_counter()
            outcome = c_store(self._config, order)
            lifecycle.record_attempt(self._engine, delivery_id, outcome, time.perf_counter() - start, self._policy)
        return len(due)
