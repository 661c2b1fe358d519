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
import threading
import time
from dataclasses import dataclass
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

from node.config import Config, NodeSection, TlsSection
from node.errors import UserError
from node.store import CallingPeer, InstanceStore, StoreRefused

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

# A-ASSOCIATE-RJ: rejected-permanent, by the service user, with the reason (PS3.8 9.3.4).
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)
_REJECT_CALLED_AE = (0x01, 0x01, 0x07)

# pynetdicom's states (PS3.8 9.2) in which an A-ABORT request is no valid event: idle, awaiting the A-ASSOCIATE-RQ,
# awaiting the close of the connection.
_NOT_ABORTABLE = ("Sta1", "Sta2", "Sta13")
# How often the server closes connections past their negotiation deadline.
_POLL_SECONDS = 0.2
# On a shared listener, how long a receiving process lets the others take a connection first, per
# association it serves already: the busy leave new senders to the idle.
_YIELD_SECONDS = 0.02
# Closed connections: the first per peer and reason is logged, then a count per this long.
_LOG_INTERVAL_SECONDS = 60.0


class _RateLimitedLog:
    """Logs the first closed connection per peer and reason in an interval and counts the rest,
    so a flood of connections makes a few lines, not one each."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._counts: dict[tuple[str, str], tuple[float, int]] = {}  # (peer, reason) -> (logged at, not logged)

    def __call__(self, peer: str, reason: str) -> None:
        logged = self._counts.get((peer, reason))
        if logged is None:
            log.warning("closed connection from %s: %s", peer, reason)
            self._counts[(peer, reason)] = (time.monotonic(), 0)
        else:
            self._counts[(peer, reason)] = (logged[0], logged[1] + 1)

    def flush(self) -> None:
        """Logs the count of each interval that has ended, and forgets it."""
        now = time.monotonic()
        for (peer, reason), (logged_at, count) in list(self._counts.items()):
            if now - logged_at >= self._interval:
                if count:
                    log.warning("closed %d more connections from %s in %.0f s: %s", count, peer, now - logged_at, reason)
                del self._counts[(peer, reason)]


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    address: tuple
    deadline: float  # monotonic; by then the association must be negotiated

    @property
    def peer(self) -> str:
        return self.address[0]


def _hang_up(sock: socket.socket) -> None:
    """Ends a read blocked on the socket (pynetdicom's, on a PDU that never completes); its owner closes it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _NegotiationGuardServer(ThreadedAssociationServer):
    """pynetdicom's server, with a bound on connections that have not negotiated an association.

    pynetdicom gives each connection an association thread that counts against
    `maximum_associations` from the start, and whose reader waits for good on a PDU that never
    completes: 33 half-open connections locked every caller out. Here a connection is handed to
    pynetdicom only while few enough are negotiating, from its peer address and in all; until then
    it waits. It is closed if not negotiated `negotiation_timeout_seconds` after it opened.
    """

    def __init__(self, *args, node: NodeSection, listener: socket.socket | None = None, **kwargs) -> None:
        # The listen backlog (socketserver's default 5): a burst beyond it waits a SYN retry (1 s, 3 s, ...).
        self.request_queue_size = node.max_associations
        self._shared_listener = listener  # opened by `rtnode serve`, accepted on by every receiving process
        super().__init__(*args, **kwargs)
        self._node = node
        self._lock = threading.Lock()  # guards the lists and every start of an association thread
        self._waiting: list[_Connection] = []
        self._negotiating: list[_Connection] = []
        self._log_closed = _RateLimitedLog(_LOG_INTERVAL_SECONDS)
        self.bind(evt.EVT_CONN_OPEN, self._on_conn_open)
        self.bind(evt.EVT_ESTABLISHED, self._on_established)

    def server_bind(self) -> None:
        if self._shared_listener is None:
            super().server_bind()
            return
        self.socket.close()
        self.socket = self._shared_listener
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self._shared_listener is None:
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, tuple]:
        """Wraps a TLS connection without its handshake, which `process_request_thread` does: here, in the one
        accepting thread, a peer that never answers would stall every caller. On a shared listener every
        receiving process is woken: one serving associations already lets an idle one take it first, and
        the loser's accept fails (BlockingIOError), after which socketserver goes back to waiting."""
        if self._shared_listener is not None and (serving := len(self.ae.active_associations)):
            time.sleep(min(_YIELD_SECONDS * serving, _POLL_SECONDS))
        sock, address = self.socket.accept()
        if self.ssl_context:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def process_request_thread(self, request, client_address) -> None:
        """The TLS handshake, in the connection's own thread and within its negotiation deadline; a failed one
        closes only this connection."""
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except OSError as exc:  # ssl.SSLError included
                with self._lock:
                    if any(c.sock is request for c in self._negotiating):  # else `_admit` closed it at the deadline
                        self._log_closed(client_address[0], f"TLS handshake failed: {exc}")
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)

    def process_request(self, request, client_address) -> None:
        """Queues the new connection for `_admit`; refuses it if its peer already has too many queued."""
        connection = _Connection(request, client_address, time.monotonic() + self._node.negotiation_timeout_seconds)
        with self._lock:
            if sum(c.peer == connection.peer for c in self._waiting) >= self._node.max_associations:
                self._log_closed(connection.peer, "more than max_associations connections waiting to negotiate")
                self.shutdown_request(request)
                return
            self._waiting.append(connection)
        self._admit()

    def service_actions(self) -> None:
        super().service_actions()
        self._admit()

    def _admit(self) -> None:
        """Closes connections past their deadline; hands waiting ones, first come first served, to
        pynetdicom while the limits allow."""
        node = self._node
        now = time.monotonic()
        timeout = f"negotiation_timeout_seconds ({node.negotiation_timeout_seconds:g} s)"
        with self._lock:
            # A socket pynetdicom closed (peer gone, association rejected) no longer counts.
            self._negotiating = [c for c in self._negotiating if c.sock.fileno() != -1]
            for conn in [c for c in self._negotiating if now >= c.deadline]:
                self._negotiating.remove(conn)
                self._log_closed(conn.peer, f"no association negotiated within {timeout}")
                _hang_up(conn.sock)
            for conn in list(self._waiting):
                if now >= conn.deadline:
                    self._waiting.remove(conn)
                    self._log_closed(conn.peer, f"waited {timeout} for a turn (max_unnegotiated_per_peer, _connections)")
                    self.shutdown_request(conn.sock)
                elif (
                    len(self._negotiating) < node.max_unnegotiated_connections
                    and sum(c.peer == conn.peer for c in self._negotiating) < node.max_unnegotiated_per_peer
                ):
                    self._waiting.remove(conn)
                    self._negotiating.append(conn)
                    super().process_request(conn.sock, conn.address)
            self._log_closed.flush()

    def _on_conn_open(self, event: Event) -> None:
        """Until negotiated, pynetdicom's ACSE timer (which ends the association thread) runs to the deadline."""
        sock = event.assoc.dul.socket.socket
        with self._lock:
            deadline = next((c.deadline for c in self._negotiating if c.sock is sock), time.monotonic())
        event.assoc.acse_timeout = max(deadline - time.monotonic(), 0.0)

    def _on_established(self, event: Event) -> None:
        event.assoc.acse_timeout = self.ae.acse_timeout  # from now on it bounds only the release handshake
        sock = event.assoc.dul.socket.socket
        with self._lock:
            self._negotiating = [c for c in self._negotiating if c.sock is not sock]
        self._admit()  # now, not at the next poll: a sender's parallel associations wait little

    def server_close(self) -> None:
        """Also closes the connections not yet negotiated: a reader blocked on one would hold up
        pynetdicom's shutdown, which aborts each association and waits for it."""
        with self._lock:
            for conn in self._negotiating:
                _hang_up(conn.sock)
            for conn in self._waiting:
                self.shutdown_request(conn.sock)
            self._negotiating, self._waiting = [], []
        if self._shared_listener is not None:
            self.socket.close()  # no shutdown(): that would stop the other receiving processes' listening too
        else:
            super().server_close()


@dataclass(frozen=True)
class Listeners:
    """Listening sockets `rtnode serve` opened for `node.receivers` processes to accept on (the TLS one when
    `[tls]` is configured): the kernel gives each connection to one of them, whole."""

    plain: socket.socket
    tls: socket.socket | None = None

    @classmethod
    def open(cls, config: Config) -> Listeners:
        node = config.node
        tls = _listening_socket(node.host, config.tls.port, node.max_associations) if config.tls.enabled else None
        return cls(_listening_socket(node.host, node.port, node.max_associations), tls)

    @property
    def sockets(self) -> list[socket.socket]:
        return [self.plain] if self.tls is None else [self.plain, self.tls]

    @classmethod
    def inherited(cls, descriptors: list[int]) -> Listeners:
        """The listeners a receiving process was started with, in the order of `sockets`."""
        return cls(*[socket.socket(fileno=descriptor) for descriptor in descriptors])


def _listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, backlog=backlog)
    listener.setblocking(False)  # every receiving process is woken by a connection; only one accept may succeed
    return listener


def server_context(tls: TlsSection) -> ssl.SSLContext:
    """The TLS listener's context: TLS 1.2 or later (BCP 195), the node's certificate, and client certificates
    checked against `ca_certificates` (required, or only checked when presented)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
    except OSError as exc:  # ssl.SSLError included
        raise UserError(f"[tls] certificate {tls.certificate} with private_key {tls.private_key} cannot be used: {exc}") from exc
    if tls.ca_certificates is not None:
        try:
            context.load_verify_locations(tls.ca_certificates)
        except OSError as exc:
            raise UserError(f"[tls] ca_certificates {tls.ca_certificates} cannot be used: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return context


# OpenSSL's short names for the attributes Python names in full; the others' long and short names are alike.
_SHORT_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "street",
    "domainComponent": "DC",
    "userId": "UID",
    "surname": "SN",
    "givenName": "GN",
}


def _rfc2253_value(value: str) -> str:
    """Escaped as OpenSSL's RFC 2253 output does: specials with a backslash, control and non-ASCII characters as
    their UTF-8 bytes in hex."""
    escaped = []
    for i, char in enumerate(value):
        if char in ',+"\\<>;' or (i == 0 and char in "# ") or (i == len(value) - 1 and char == " "):
            escaped.append("\\" + char)
        elif not " " <= char <= "~":
            escaped.append("".join(f"\\{byte:02X}" for byte in char.encode()))
        else:
            escaped.append(char)
    return "".join(escaped)


def certificate_subject(subject: tuple) -> str:
    """A certificate subject (as `SSLSocket.getpeercert()` gives it) written as
    `openssl x509 -noout -subject -nameopt RFC2253` prints it: most specific first, e.g. "CN=scanner1,O=Radiology"."""
    return ",".join(
        "+".join(f"{_SHORT_NAMES.get(name, name)}={_rfc2253_value(value)}" for name, value in reversed(rdn))
        for rdn in reversed(subject)
    )


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
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu_bytes
        ae.network_timeout = node.network_timeout_seconds
        # The ACSE (ARTIM) timer; pynetdicom's 30 s kept silent connections that long. Until an association is
        # negotiated, _NegotiationGuardServer runs it to the connection's deadline.
        ae.acse_timeout = node.negotiation_timeout_seconds
        ae.dimse_timeout = 60
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
        # As ae.start_server(block=False) does, with our server class (which make_server takes, start_server not).
        server = self._ae.make_server(
            (self._config.node.host, port),
            evt_handlers=handlers,
            ssl_context=ssl_context,
            server_class=_NegotiationGuardServer,
            node=self._config.node,
            listener=listener,
        )
        self._ae._servers.append(server)
        threading.Thread(target=server.serve_forever, args=(_POLL_SECONDS,), name="AcceptorServer", daemon=True).start()
        return server

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
                _hang_up(connection.socket)
            hung_up.append(assoc)
        deadline = time.monotonic() + _POLL_SECONDS * 5
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
            self._store.record_rejection(calling, address, reason)
            self._reject(event, _REJECT_CALLED_AE)
        elif not self._config.security.admits(calling, address, subject):
            reason = f"caller not in security.allowed_callers{certified}"
            log.warning("rejected association from %s@%s: %s", calling, address, reason)
            self._store.record_rejection(calling, address, reason)
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
