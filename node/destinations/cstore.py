"""C-STORE destinations (`type = "c-store"`, the default): planning systems import so. Sent by pynetdicom to
the AE title, host and port the delivery recorded, with the configured destination's timeouts and TLS; the
answer's status classified by pynetdicom's categories."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from pydantic import Field
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, SegmentationStorage
from pynetdicom import AE, Association
from pynetdicom.sop_class import Verification
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, STORAGE_SERVICE_CLASS_STATUS, code_to_category

from node.addresses import AETitle, Port
from node.destinations.base import DeliveryOrder, Destination, EchoOutcome, SenderConfig, SendOutcome
from node.imaging.dicomfile import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.transport import client_context
from node.vocabulary import OutputKind

SOP_CLASSES = {OutputKind.RTSTRUCT: RTStructureSetStorage, OutputKind.SEG: SegmentationStorage}
# What an association proposes for its SOP class: the outputs are written in it, and sent as written.
PROPOSED_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian]
_OUT_OF_RESOURCES = "Refused: Out of Resources"
# A-ASSOCIATE-RJ result "rejected-permanent" (PS3.8 9.3.4); "rejected-transient" is 0x02.
_REJECTED_PERMANENT = 0x01


class _UnreachablePeerSaidByTheDelivery(logging.Filter):
    """pynetdicom logs a destination it cannot connect to at ERROR, twice an attempt; the delivery's own line
    says it with the destination's name and the retry (a WARNING), so an admin's grep for errors finds real ones."""

    SAID = ("Association request failed: unable to connect to remote", "TCP Initialisation Error")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.SAID)


logging.getLogger("pynetdicom.transport").addFilter(_UnreachablePeerSaidByTheDelivery())


class CStoreDestination(Destination):
    """By C-STORE to `ae_title`@`host`:`port`."""

    type: Literal["c-store"] = "c-store"
    ae_title: AETitle
    host: str
    port: Port
    # Planning systems can take minutes to import a structure set before they answer the C-STORE.
    acse_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0  # association negotiation (and the TLS handshake)
    dimse_timeout_seconds: Annotated[float, Field(gt=0)] = 300.0  # waiting for the C-STORE response
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 300.0  # silence on the connection
    tls: bool = False  # send over TLS, checking the destination against [tls] ca_certificates

    @property
    def address(self) -> tuple[str, str, int]:
        return self.ae_title, self.host, self.port

    @property
    def url(self) -> None:
        """None: reached by DICOM networking at `address`, not at a URL as a DICOMweb destination is."""
        return None

    def send(self, config: SenderConfig, order: DeliveryOrder) -> SendOutcome:
        return c_store(config, order, self)

    def echo(self, config: SenderConfig) -> EchoOutcome:
        return c_echo(config, self)

    def takes(self, order: DeliveryOrder) -> bool:
        """It sends to the address the delivery recorded: one recorded without an AE title (for STOW-RS) it cannot."""
        return bool(order.ae_title)

    @classmethod
    def orphan_detail(cls, order: DeliveryOrder) -> str | None:
        if not order.ae_title:
            return None
        return (
            f"{order.destination} is no longer a configured destination, so its TLS and timeouts are unknown: not sent; "
            "`rtnode resend` queues it to the configured destinations"
        )


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


def _associate(
    config: SenderConfig, destination: CStoreDestination, address: tuple[str, str, int], sop_class: str
) -> Association | SendOutcome:
    """An association with `address` (AE title, host, port) for `sop_class`, with the destination's timeouts and
    TLS; or the outcome that says why there is none."""
    ae_title, host, port = address
    peer = f"{ae_title}@{host}:{port}"
    ae = AE(ae_title=config.node.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.connection_timeout = destination.acse_timeout_seconds  # also bounds the TLS handshake
    ae.acse_timeout = destination.acse_timeout_seconds
    ae.dimse_timeout = destination.dimse_timeout_seconds
    ae.network_timeout = destination.network_timeout_seconds
    ae.add_requested_context(sop_class, PROPOSED_TRANSFER_SYNTAXES)
    context = None
    if destination.tls:
        try:
            context = client_context(config.tls)
        except OSError as exc:  # ssl.SSLError included
            files = f"ca_certificates {config.tls.ca_certificates}, certificate {config.tls.certificate}"
            return SendOutcome(False, True, f"cannot send to {peer} over TLS: [tls] {files} cannot be used: {exc}")
    tls_args = (context, host) if context else None  # the host name the certificate must name
    assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls_args)
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        permanent = getattr(primitive, "result", None) == _REJECTED_PERMANENT
        reason = getattr(primitive, "reason_str", "") or "rejected"
        return SendOutcome(False, not permanent, f"association rejected by {peer}: {reason}")
    if context is not None and context.handshake_error is not None:
        return SendOutcome(False, True, f"TLS handshake with {peer} failed: {context.handshake_error}")
    return SendOutcome(False, True, f"cannot reach {peer}" + (" over TLS" if context else ""))


def c_store(config: SenderConfig, order: DeliveryOrder, destination: CStoreDestination) -> SendOutcome:
    """One C-STORE to the address the delivery recorded, with the configured destination's timeouts and TLS."""
    assoc = _associate(config, destination, (order.ae_title, order.host, order.port), SOP_CLASSES[order.kind])
    if isinstance(assoc, SendOutcome):
        return assoc
    try:
        status = assoc.send_c_store(str(order.path))
    except (OSError, ValueError) as exc:
        return SendOutcome(False, True, f"C-STORE to {order.destination} failed: {exc}")
    finally:
        assoc.release()
    return classify_store_status(getattr(status, "Status", None), order.destination)


def c_echo(config: SenderConfig, destination: CStoreDestination) -> EchoOutcome:
    """A C-ECHO to the destination's configured address, associating as a C-STORE does."""
    peer = "{}@{}:{}".format(*destination.address)
    assoc = _associate(config, destination, destination.address, Verification)
    if isinstance(assoc, SendOutcome):
        return EchoOutcome(False, assoc.detail)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code is not None and code_to_category(code) == STATUS_SUCCESS:
        return EchoOutcome(True, f"{peer} answered C-ECHO")
    answer = "no C-ECHO response" if code is None else f"C-ECHO status 0x{code:04X}"
    return EchoOutcome(False, f"{peer} associated but gave {answer}")
