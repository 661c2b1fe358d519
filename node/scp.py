"""The receiving side: a pynetdicom Verification and Storage SCP.

Small event handlers, the AE configured declaratively (after pynetdicom's
`apps/storescp`). Every decision about an association or an instance is logged
with the peer's AE title and address so an admin can tell who sent what. With
`[tls]` configured a second listener speaks DICOM over TLS, with the same guard,
callers and store.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import Protocol

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedPETImageStorage,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
    RTDoseStorage,
    RTImageStorage,
    RTIonPlanStorage,
    RTPlanStorage,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    SpatialRegistrationStorage,
    Verification,
)
from pynetdicom.status import Status
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Engine, insert
from sqlalchemy.exc import SQLAlchemyError

from node.config import Config
from node.db.models import AssociationRejection, utcnow
from node.imaging.dicomfile import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.instance_check import StoreRefused
from node.store import CallingPeer, InstanceStore
from node.transport import POLL_SECONDS, Listeners, certificate_subject, hang_up, server_context, start_server

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES = [
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    PositronEmissionTomographyImageStorage,
    EnhancedPETImageStorage,
    RTStructureSetStorage,
    RTPlanStorage,
    RTIonPlanStorage,
    RTDoseStorage,
    RTImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    SpatialRegistrationStorage,
]

TRANSFER_SYNTAXES = [
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLossless,  # .57, non-hierarchical
    JPEGLosslessSV1,  # .70, first-order prediction
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

# How long the SCP waits for the next DIMSE message of an established association.
DIMSE_TIMEOUT_SECONDS = 60.0

# A-ASSOCIATE-RJ: rejected-permanent, by the service user, with the reason (PS3.8 9.3.4).
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)
_REJECT_CALLED_AE = (0x01, 0x01, 0x07)

# pynetdicom's states (PS3.8 9.2) in which an A-ABORT request is no valid event: idle, awaiting the A-ASSOCIATE-RQ,
# awaiting the close of the connection.
_NOT_ABORTABLE = ("Sta1", "Sta2", "Sta13")


def _record_rejection(engine: Engine, calling_ae_title: str, address: str, reason: str) -> None:
    """Keep an association refused by policy, for the admin and /metrics (nothing was stored)."""
    row = {"at": utcnow(), "calling_ae_title": calling_ae_title[:16], "address": address[:64], "reason": reason}
    try:
        with engine.begin() as connection:
            connection.execute(insert(AssociationRejection), row)
    except SQLAlchemyError:
        log.exception("could not record the rejection of %s@%s", calling_ae_title, address)


def _peer_certificate_subject(event: Event) -> str | None:
    """The subject of the client certificate the TLS handshake verified; None over plain TCP or without one."""
    sock = event.assoc.dul.socket.socket
    certificate = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
    return certificate_subject(certificate["subject"]) if certificate else None


class SeriesObserver(Protocol):
    """Told what arrived on which association (the series-completion tracker)."""

    def instance_stored(self, association_id: int, series_uid: str) -> None: ...

    def association_released(self, association_id: int) -> None: ...

    def association_aborted(self, association_id: int) -> None: ...


class StorageSCP:
    """Accepts associations from allowed callers and stores what they send."""

    def __init__(
        self,
        config: Config,
        store: InstanceStore,
        observer: SeriesObserver | None = None,
        listeners: Listeners | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._observer = observer
        self._listeners = listeners  # None: bind the ports here (one receiving process)
        self._server: ThreadedAssociationServer | None = None
        self._tls_server: ThreadedAssociationServer | None = None
        self._ae = self._make_ae()

    def _make_ae(self) -> AE:
        node = self._config.node
        ae = AE(ae_title=node.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID  # as in the files it writes: `rtnode doctor` knows it so
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu_bytes
        ae.network_timeout = node.network_timeout_seconds
        # The ACSE (ARTIM) timer; pynetdicom's 30 s kept silent connections that long. Until an association is
        # negotiated, node.transport's negotiation guard runs it to the connection's deadline.
        ae.acse_timeout = node.negotiation_timeout_seconds
        ae.dimse_timeout = DIMSE_TIMEOUT_SECONDS
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        return ae

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the SCP is not running")
        return self._server.server_address[1]

    def start(self) -> None:
        """Listen in background threads, over TLS too when `[tls]` has a certificate; returns once the ports are
        bound (the TLS one first, so whoever waits for the plain port finds both)."""
        tls, listeners = self._config.tls, self._listeners
        if tls.enabled:
            self._tls_server = self._listen(tls.port, server_context(tls), listeners.tls if listeners else None)
        self._server = self._listen(self._config.node.port, None, listeners.plain if listeners else None)
        log.info(
            "listening as %s on %s:%d%s (%d storage SOP classes)",
            self._config.node.ae_title,
            self._config.node.host,
            self.port,
            f" and over TLS on port {self._tls_server.server_address[1]}" if self._tls_server else "",
            len(STORAGE_SOP_CLASSES),
        )

    def _listen(
        self, port: int, ssl_context: ssl.SSLContext | None, listener: socket.socket | None
    ) -> ThreadedAssociationServer:
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_RELEASED, self._on_released),
        ]
        return start_server(
            self._ae, self._config.node, port, handlers, closed_log=log, ssl_context=ssl_context, listener=listener
        )

    def stop(self, grace_seconds: float | None = None) -> None:
        """Stop accepting, let in-flight associations finish, then abort what is left."""
        if self._server is None:
            return
        grace = self._config.node.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        for server in (self._server, self._tls_server):
            if server is not None:
                server.shutdown()
        self._server = self._tls_server = None
        deadline = time.monotonic() + grace
        while self._established() and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self._established():
            log.warning("aborting association from %s after %.0f s shutdown grace", assoc.requestor.ae_title, grace)
        self._drop_associations()

    def _drop_associations(self) -> None:
        """Aborts the associations left. Connections whose A-ASSOCIATE-RQ has not come (or that are closing already)
        carry no stores and are hung up instead: pynetdicom's state machine has no A-ABORT in those states and raised
        in the connection's thread (InvalidEventError, Evt15 in Sta2) when `AE.shutdown` aborted them."""
        hung_up = []
        for assoc in self._ae.active_associations:
            if assoc.dul.state_machine.current_state not in _NOT_ABORTABLE:
                assoc.abort()
                continue
            connection = assoc.dul.socket
            if connection is not None and connection.socket is not None:
                hang_up(connection.socket)
            hung_up.append(assoc)
        deadline = time.monotonic() + POLL_SECONDS * 5
        for assoc in hung_up:  # the hang-up brings each to Sta1 (idle), where pynetdicom stops it without an A-ABORT
            while assoc.dul.state_machine.current_state != "Sta1" and time.monotonic() < deadline:
                time.sleep(0.01)
            if assoc.dul.state_machine.current_state == "Sta1":
                assoc.kill()

    def _established(self) -> list:
        return [assoc for assoc in self._ae.active_associations if assoc.is_established]

    def _on_requested(self, event: Event) -> None:
        requestor = event.assoc.requestor
        calling = requestor.primitive.calling_ae_title.strip()
        called = requestor.primitive.called_ae_title.strip()
        address = requestor.address
        subject = _peer_certificate_subject(event)
        certified = f" (certificate subject '{subject}')" if subject else ""
        if called != self._config.node.ae_title:
            reason = f"called AE title {called!r} is not ours ({self._config.node.ae_title!r})"
            log.warning("rejected association from %s@%s: %s", calling, address, reason)
            _record_rejection(self._store.engine, calling, address, reason)
            self._reject(event, _REJECT_CALLED_AE)
        elif not self._config.security.admits(calling, address, subject):
            reason = f"caller not in security.allowed_callers{certified}"
            log.warning("rejected association from %s@%s: %s", calling, address, reason)
            _record_rejection(self._store.engine, calling, address, reason)
            self._reject(event, _REJECT_CALLING_AE)
        else:
            log.debug("association requested by %s@%s%s", calling, address, certified)

    @staticmethod
    def _reject(event: Event, reason: tuple[int, int, int]) -> None:
        # As pynetdicom's own ACSE does: kill() waits until the A-ASSOCIATE-RJ has gone out.
        event.assoc.acse.send_reject(*reason)
        event.assoc.kill()

    def _on_c_echo(self, event: Event) -> int:
        log.debug("C-ECHO from %s@%s", event.assoc.requestor.ae_title, event.assoc.requestor.address)
        return Status.SUCCESS

    def _on_aborted(self, event: Event) -> None:
        requestor = event.assoc.requestor
        # A connection closed before it asked for anything (a port check) is no aborted association.
        level = logging.WARNING if requestor.ae_title else logging.DEBUG
        log.log(level, "association from %s@%s aborted", requestor.ae_title, requestor.address)
        if self._observer:
            self._observer.association_aborted(id(event.assoc))

    def _on_released(self, event: Event) -> None:
        if self._observer:
            try:
                self._observer.association_released(id(event.assoc))
            except Exception:
                log.exception("series completion check failed after association release")

    def _on_c_store(self, event: Event) -> int:
        requestor = event.assoc.requestor
        peer = CallingPeer(ae_title=requestor.ae_title.strip(), address=requestor.address)
        try:
            stored = self._store.save(event.encoded_dataset(), event.context.transfer_syntax, peer)
        except StoreRefused as exc:
            log.error(
                "refused instance %s from %s@%s: %s (status 0x%04X)",
                event.request.AffectedSOPInstanceUID,
                peer.ae_title,
                peer.address,
                exc,
                exc.status,
            )
            return exc.status
        except Exception:
            log.exception("unexpected error storing an instance from %s@%s", peer.ae_title, peer.address)
            return Status.OUT_OF_RESOURCES
        if self._observer:
            self._observer.instance_stored(id(event.assoc), stored.header.series_instance_uid)
        return Status.SUCCESS
