"""The sender: sends each pending delivery to its destination, durably and politely, by
C-STORE or by DICOMweb STOW-RS (the destination's `type`).

Deliveries live in the database, so a restart carries on where it stopped. A failure
that may pass (destination down, out of resources) is retried with exponential backoff
up to `delivery.max_age_seconds`; one that will not (a permanent rejection, a refusal of
the object, refused credentials) fails at once; a failed TLS handshake is retried (a certificate
may be being renewed). A delivery that succeeded is never sent again. What happens to a
delivery after an attempt is `node.lifecycle`'s business; this module only talks DICOM and HTTP.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import secrets
import threading
import time
from urllib.parse import urlsplit

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, SegmentationStorage
from pynetdicom import AE
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, STORAGE_SERVICE_CLASS_STATUS, code_to_category
from sqlalchemy import Engine

from node.config import Config, Destination, is_loopback
from node.lifecycle import deliveries
from node.lifecycle.deliveries import DeliveryOrder, RetryPolicy, SendOutcome
from node.lifecycle.workers import WorkerIdentity
from node.transport import client_context
from node.vocabulary import OutputKind

log = logging.getLogger(__name__)

SOP_CLASSES = {OutputKind.RTSTRUCT: RTStructureSetStorage, OutputKind.SEG: SegmentationStorage}
_OUT_OF_RESOURCES = "Refused: Out of Resources"
# A-ASSOCIATE-RJ result "rejected-permanent" (PS3.8 9.3.4); "rejected-transient" is 0x02.
_REJECTED_PERMANENT = 0x01
# DICOM JSON keys of a STOW-RS response (PS3.18 10.5.3): Failed SOP Sequence, its items' SOP Instance UID and reason.
_FAILED_SOP_SEQUENCE, _REFERENCED_SOP_INSTANCE_UID, _FAILURE_REASON = "00081198", "00081155", "00081197"
_HTTP_TRANSIENT = (408, 429)  # request timeout, too many requests: waiting helps, as it does for 5xx


def classify_store_status(code: int | None, destination: str) -> SendOutcome:
    """A C-STORE response status as an outcome, by pynetdicom's categories: Success and Warning
    are delivered; "Refused: Out of Resources" may pass and is retried; any other failure is not."""
    if code is None:
        return SendOutcome(False, True, f"no C-STORE response from {destination}")
    category = code_to_category(code)
    if category in (STATUS_SUCCESS, STATUS_WARNING):
        return SendOutcome(True, False, f"stored by {destination} (status 0x{code:04X})")
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, (category, ""))[1]
    transient = meaning == _OUT_OF_RESOURCES
    described = f" ({meaning})" if meaning else ""
    return SendOutcome(False, transient, f"{destination} answered C-STORE failure status 0x{code:04X}{described}")


def _failed_sop(body: bytes, sop_instance_uid: str) -> tuple[bool, int | None]:
    """Whether a DICOM JSON STOW-RS response lists the instance in its Failed SOP Sequence, and the failure reason."""
    try:
        answer = json.loads(body)
        answer = answer[0] if isinstance(answer, list) else answer
        items = answer.get(_FAILED_SOP_SEQUENCE, {}).get("Value") or []
        item = next(i for i in items if i.get(_REFERENCED_SOP_INSTANCE_UID, {}).get("Value") == [sop_instance_uid])
    except (ValueError, TypeError, AttributeError, IndexError, StopIteration):  # not listed, or no DICOM JSON at all
        return False, None
    try:
        reason = item[_FAILURE_REASON]["Value"][0]
    except (KeyError, TypeError, IndexError):
        reason = None
    return True, reason if isinstance(reason, int) else None


def classify_stow_response(status: int, body: bytes, sop_instance_uid: str, destination: str) -> SendOutcome:
    """A STOW-RS answer (PS3.18 10.5.3) as an outcome. The instance failed when the Failed SOP Sequence lists it,
    whatever the status (some servers answer 200 so); a failure reason 0xA7xx (out of resources) may pass and is
    retried. Otherwise 200 and 202 (stored with warnings) are delivered; 5xx, 408 and 429 are retried; 401 and 403
    (the credentials refused), 409 (a conflict) and other 4xx will not improve by waiting."""
    failed, reason = _failed_sop(body, sop_instance_uid)
    if failed:
        why = f"failure reason 0x{reason:04X}" if reason is not None else "no failure reason"
        retry = reason is not None and reason >> 8 == 0xA7
        return SendOutcome(False, retry, f"{destination} did not store the instance (HTTP {status}, {why})")
    if status in (200, 202):
        return SendOutcome(True, False, f"stored by {destination} (HTTP {status})")
    if status in (401, 403):
        refused = f"{destination} refused the credentials (HTTP {status})"
        return SendOutcome(False, False, f"{refused}: check the destination's token, or its username and password")
    excerpt = " ".join(body[:200].decode(errors="replace").split())
    retry = status >= 500 or status in _HTTP_TRANSIENT
    return SendOutcome(False, retry, f"{destination} answered STOW-RS with HTTP {status}" + (f": {excerpt}" if excerpt else ""))


def c_store(config: Config, order: DeliveryOrder, destination: Destination) -> SendOutcome:
    """One C-STORE to the address the delivery recorded, with the configured destination's timeouts and TLS."""
    peer = f"{order.ae_title}@{order.host}:{order.port}"
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
            return SendOutcome(False, True, f"cannot send to {peer} over TLS: [tls] {files} cannot be used: {exc}")
    tls_args = (context, order.host) if context else None  # the host name the certificate must name
    assoc = ae.associate(order.host, order.port, ae_title=order.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        if assoc.is_rejected:
            primitive = assoc.acceptor.primitive
            permanent = getattr(primitive, "result", None) == _REJECTED_PERMANENT
            reason = getattr(primitive, "reason_str", "") or "rejected"
            return SendOutcome(False, not permanent, f"association rejected by {peer}: {reason}")
        if context is not None and context.handshake_error is not None:
            return SendOutcome(False, True, f"TLS handshake with {peer} failed: {context.handshake_error}")
        return SendOutcome(False, True, f"cannot reach {peer}" + (" over TLS" if context else ""))
    try:
        status = assoc.send_c_store(str(order.path))
    except (OSError, ValueError) as exc:
        return SendOutcome(False, True, f"C-STORE to {order.destination} failed: {exc}")
    finally:
        assoc.release()
    return classify_store_status(getattr(status, "Status", None), order.destination)


def _authorization(destination: Destination) -> dict[str, str]:
    if destination.token is not None:
        return {"Authorization": f"Bearer {destination.token}"}
    if destination.username is not None:
        pair = base64.b64encode(f"{destination.username}:{destination.password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    return {}


def stow_rs(config: Config, order: DeliveryOrder, destination: Destination) -> SendOutcome:
    """POST the Part 10 file to `{url}/studies` as one multipart/related part (PS3.18 10.5). Straight to the
    URL's host: no proxy from the environment, and no redirect followed (a redirected POST becomes a GET
    that would look delivered)."""
    try:
        data = order.path.read_bytes()
        sop_instance_uid = read_file_meta_info(order.path).MediaStorageSOPInstanceUID
    except (OSError, InvalidDicomError, AttributeError) as exc:
        return SendOutcome(False, False, f"cannot read {order.path}: {exc}")
    boundary = secrets.token_hex(16)
    part = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    body = part + data + f"\r\n--{boundary}--\r\n".encode()
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
        **_authorization(destination),
    }
    url = urlsplit(destination.url)
    timeout = destination.network_timeout_seconds
    if url.scheme == "https":
        try:
            context = client_context(config.tls)
        except OSError as exc:  # ssl.SSLError included
            files = f"ca_certificates {config.tls.ca_certificates}, certificate {config.tls.certificate}"
            return SendOutcome(False, True, f"cannot send to {destination.url}: [tls] {files} cannot be used: {exc}")
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            url.hostname, url.port, timeout=timeout, context=context
        )
    else:
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        connection.request("POST", f"{url.path}/studies", body, headers)
        response = connection.getresponse()
        answer = response.read()
    except (OSError, http.client.HTTPException) as exc:  # refused, unreachable, timed out, TLS handshake failed
        return SendOutcome(False, True, f"STOW-RS to {destination.url} failed: {type(exc).__name__}: {exc}")
    finally:
        connection.close()
    return classify_stow_response(response.status, answer, sop_instance_uid, order.destination)


def send(config: Config, order: DeliveryOrder) -> SendOutcome:
    """One attempt, by the transport of the destination configured under the delivery's name."""
    configured = next((d for d in config.destinations if d.name == order.destination), None)
    if configured is not None and configured.type == "stow-rs":
        return stow_rs(config, order, configured)
    if not order.ae_title:  # queued for a STOW-RS destination that is no longer configured so
        return SendOutcome(False, False, f"{order.destination} is no longer a STOW-RS destination, and a delivery keeps no URL "
                       "or credentials: `rtnode resend` queues it anew")
    if configured is None:  # sending as recorded could drop the TLS the destination had
        return SendOutcome(False, False, f"{order.destination} is no longer a configured destination, so its TLS and timeouts "
                       "are unknown: not sent; `rtnode resend` queues it to the configured destinations")
    return c_store(config, order, configured)


def warn_of_plain_http(config: Config) -> None:
    """A STOW-RS destination on http to another machine sends patients' data (and credentials) unencrypted."""
    for destination in config.destinations:
        if destination.type == "stow-rs" and urlsplit(destination.url).scheme == "http":
            _, host, _ = destination.address
            if not is_loopback(host):
                log.warning("destination %s: %s is plain http: patient data and credentials cross the network unencrypted",
                            destination.name, destination.url)


class Sender:
    def __init__(self, config: Config, engine: Engine, identity: WorkerIdentity) -> None:
        self._config = config
        self._engine = engine
        self._identity = identity
        self._policy = RetryPolicy.from_config(config.delivery)
        warn_of_plain_http(config)

    def run_forever(self, stop: threading.Event, poll_seconds: float = 0.25) -> None:
        while not stop.is_set():
            if not self.send_due():
                stop.wait(poll_seconds)

    def send_due(self) -> int:
        """Attempt every delivery whose time has come; returns how many were due."""
        due = deliveries.due_deliveries(self._engine)
        for delivery_id in due:
            order = deliveries.take_delivery(self._engine, delivery_id, self._identity, self._config.node.worker_lease_seconds)
            if order is None:
                continue
            start = time.perf_counter()
            outcome = send(self._config, order)
            deliveries.record_attempt(self._engine, delivery_id, outcome, time.perf_counter() - start, self._policy)
        return len(due)
