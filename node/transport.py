"""Sockets and TLS for DICOM, both ways: the listening sockets and the server that bounds connections
still negotiating an association (the SCP's), the TLS contexts of the listener and of a client (the
sender's), and certificate subjects as OpenSSL prints them.

Nothing here touches the configuration, the database or the lifecycle: its functions take plain values and
what they need of the `[node]` and `[tls]` sections, named by the protocols below (`node.config`'s sections have
it), so the destination types and the configuration above them may all use it.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pynetdicom import AE, evt
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.transport import ThreadedAssociationServer

from node.errors import UserError

# How often the server closes connections past their negotiation deadline.
POLL_SECONDS = 0.2
# On a shared listener, how long a receiving process lets the others take a connection first, per
# association it serves already: the busy leave new senders to the idle.
_YIELD_SECONDS = 0.02
# Closed connections: the first per peer and reason is logged, then a count per this long.
_LOG_INTERVAL_SECONDS = 60.0
# TLS handshakes pending at once, per association allowed (`max_associations` from any one address).
HANDSHAKES_PER_ASSOCIATION = 8
# Both ways, as BCP 195 (RFC 9325) asks: nothing older than TLS 1.2.
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2


class ListenerSettings(Protocol):
    """What listening needs of the `[node]` section: where, and the limits on connections still negotiating."""

    host: str
    port: int
    max_associations: int
    negotiation_timeout_seconds: float
    max_unnegotiated_connections: int
    max_unnegotiated_per_peer: int


class TlsFiles(Protocol):
    """The node's TLS identity and trust, from the `[tls]` section: its certificate (chain) and key, and the CAs
    it trusts (PEM files; None: none)."""

    certificate: Path | None
    private_key: Path | None
    ca_certificates: Path | None


class ServerTls(TlsFiles, Protocol):
    """What the TLS listener needs of the `[tls]` section besides the files."""

    port: int
    require_client_certificate: bool

    @property
    def enabled(self) -> bool: ...


class _RateLimitedLog:
    """Logs the first closed connection per peer and reason in an interval and counts the rest,
    so a flood of connections makes a few lines, not one each."""

    def __init__(self, log: logging.Logger, interval: float) -> None:
        self._log = log
        self._interval = interval
        self._counts: dict[tuple[str, str], tuple[float, int]] = {}  # (peer, reason) -> (logged at, not logged)

    def __call__(self, peer: str, reason: str) -> None:
        logged = self._counts.get((peer, reason))
        if logged is None:
            self._log.warning("closed connection from %s: %s", peer, reason)
            self._counts[(peer, reason)] = (time.monotonic(), 0)
        else:
            self._counts[(peer, reason)] = (logged[0], logged[1] + 1)

    def flush(self) -> None:
        """Logs the count of each interval that has ended, and forgets it."""
        now = time.monotonic()
        for (peer, reason), (logged_at, count) in list(self._counts.items()):
            if now - logged_at >= self._interval:
                if count:
                    self._log.warning("closed %d more connections from %s in %.0f s: %s", count, peer, now - logged_at, reason)
                del self._counts[(peer, reason)]


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    address: tuple
    deadline: float  # monotonic; by then the association must be negotiated

    @property
    def peer(self) -> str:
        return self.address[0]


def hang_up(sock: socket.socket) -> None:
    """Ends a read blocked on the socket (pynetdicom's, on a PDU that never completes); its owner closes it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Handshakes:
    """The TLS handshakes of new connections, all in one thread, none holding a slot to negotiate.

    A peer that opens TLS connections and never finishes the handshake (stalled, or hostile) costs a
    descriptor and an entry here, not one of the few slots for connections negotiating an association:
    only a connection whose handshake is done joins the queue for those. The entries are bounded: past
    `per_peer` from one address, or `total` in all, the oldest goes first (a real caller's handshake
    takes milliseconds). Each must be done by its connection's negotiation deadline."""

    def __init__(
        self,
        per_peer: int,
        total: int,
        done: Callable[[_Connection], None],
        closed: Callable[[str, str], None],
        timeout_seconds: float,
    ) -> None:
        self._per_peer, self._total = per_peer, total
        self._done, self._closed = done, closed
        self._timeout = f"negotiation_timeout_seconds ({timeout_seconds:g} s)"
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._arrived: list[_Connection] = []  # handed over by the accepting thread
        self._pending: dict[socket.socket, _Connection] = {}  # oldest first; only this class's thread touches it
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="TLSHandshakes", daemon=True)
        self._thread.start()

    def add(self, connection: _Connection) -> None:
        with self._lock:
            self._arrived.append(connection)
        self._wake_writer.send(b"\0")

    def close(self) -> None:
        self._stopped.set()
        self._wake_writer.send(b"\0")
        self._thread.join(timeout=5)
        with self._lock:
            left = [*self._pending.values(), *self._arrived]
            self._pending, self._arrived = {}, []
        for connection in left:
            connection.sock.close()
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()

    def _run(self) -> None:
        while not self._stopped.is_set():
            for key, _ in self._selector.select(timeout=POLL_SECONDS):
                if key.fileobj is self._wake_reader:
                    self._wake_reader.recv(4096)
                elif key.fileobj in self._pending:
                    self._step(self._pending[key.fileobj])
            with self._lock:
                arrived, self._arrived = self._arrived, []
            for connection in arrived:
                self._admit(connection)
            now = time.monotonic()
            for connection in [c for c in self._pending.values() if now >= c.deadline]:
                self._drop(connection, f"no TLS handshake within {self._timeout}")

    def _admit(self, connection: _Connection) -> None:
        from_peer = [c for c in self._pending.values() if c.peer == connection.peer]
        if len(from_peer) >= self._per_peer:
            self._drop(from_peer[0], "more than max_associations TLS handshakes pending from it: the oldest closed")
        if len(self._pending) >= self._total:
            self._drop(next(iter(self._pending.values())), "too many TLS handshakes pending: the oldest closed")
        connection.sock.setblocking(False)
        self._pending[connection.sock] = connection
        self._selector.register(connection.sock, selectors.EVENT_READ)
        self._step(connection)  # the client's hello may be here already

    def _step(self, connection: _Connection) -> None:
        sock = connection.sock
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._selector.modify(sock, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._selector.modify(sock, selectors.EVENT_WRITE)
            return
        except OSError as exc:  # ssl.SSLError included
            self._drop(connection, f"TLS handshake failed: {exc}")
            return
        self._forget(connection)
        sock.setblocking(True)
        self._done(connection)

    def _forget(self, connection: _Connection) -> None:
        del self._pending[connection.sock]
        self._selector.unregister(connection.sock)

    def _drop(self, connection: _Connection, reason: str) -> None:
        self._forget(connection)
        self._closed(connection.peer, reason)
        hang_up(connection.sock)
        connection.sock.close()


class _NegotiationGuardServer(ThreadedAssociationServer):
    """pynetdicom's server, with a bound on connections that have not negotiated an association.

    pynetdicom gives each connection an association thread that counts against
    `maximum_associations` from the start, and whose reader waits for good on a PDU that never
    completes: 33 half-open connections locked every caller out. Here a connection is handed to
    pynetdicom only while few enough are negotiating, from its peer address and in all; until then
    it waits. It is closed if not negotiated `negotiation_timeout_seconds` after it opened. Closed
    connections are logged to `closed_log`, the receiving side's logger.
    """

    def __init__(
        self, *args, node: ListenerSettings, closed_log: logging.Logger, listener: socket.socket | None = None, **kwargs
    ) -> None:
        # The listen backlog (socketserver's default 5): a burst beyond it waits a SYN retry (1 s, 3 s, ...).
        self.request_queue_size = node.max_associations
        self._shared_listener = listener  # opened by `rtnode serve`, accepted on by every receiving process
        # Before the base class binds: a port in use makes it call server_close, which needs these.
        self._lock = threading.Lock()  # guards the lists and every start of an association thread
        self._waiting: list[_Connection] = []
        self._negotiating: list[_Connection] = []
        self._handshakes: _Handshakes | None = None
        super().__init__(*args, **kwargs)
        self._node = node
        self._log_closed = _RateLimitedLog(closed_log, _LOG_INTERVAL_SECONDS)
        if self.ssl_context:
            self._handshakes = _Handshakes(
                per_peer=node.max_associations,
                total=HANDSHAKES_PER_ASSOCIATION * node.max_associations,
                done=self._queue,
                closed=self._closed_during_handshake,
                timeout_seconds=node.negotiation_timeout_seconds,
            )
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
        """Wraps a TLS connection without its handshake, which `_Handshakes` does: here, in the one
        accepting thread, a peer that never answers would stall every caller. On a shared listener every
        receiving process is woken: one serving associations already lets an idle one take it first, and
        the loser's accept fails (BlockingIOError), after which socketserver goes back to waiting."""
        if self._shared_listener is not None and (serving := len(self.ae.active_associations)):
            time.sleep(min(_YIELD_SECONDS * serving, POLL_SECONDS))
        sock, address = self.socket.accept()
        if self.ssl_context:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def process_request(self, request, client_address) -> None:
        """A TLS connection shakes hands first (`_Handshakes`); then, as a plain one, it queues for `_admit`."""
        connection = _Connection(request, client_address, time.monotonic() + self._node.negotiation_timeout_seconds)
        if self._handshakes is not None:
            self._handshakes.add(connection)
        else:
            self._queue(connection)

    def _closed_during_handshake(self, peer: str, reason: str) -> None:
        with self._lock:
            self._log_closed(peer, reason)

    def _queue(self, connection: _Connection) -> None:
        """Queues the connection for `_admit`; refuses it if its peer already has too many queued."""
        with self._lock:
            if sum(c.peer == connection.peer for c in self._waiting) >= self._node.max_associations:
                self._log_closed(connection.peer, "more than max_associations connections waiting to negotiate")
                self.shutdown_request(connection.sock)
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
                hang_up(conn.sock)
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
        if self._handshakes is not None:
            self._handshakes.close()
        with self._lock:
            for conn in self._negotiating:
                hang_up(conn.sock)
            for conn in self._waiting:
                self.shutdown_request(conn.sock)
            self._negotiating, self._waiting = [], []
        if self._shared_listener is not None:
            self.socket.close()  # no shutdown(): that would stop the other receiving processes' listening too
        else:
            super().server_close()


def start_server(
    ae: AE,
    node: ListenerSettings,
    port: int,
    handlers: list[EventHandlerType],
    *,
    closed_log: logging.Logger,
    ssl_context: ssl.SSLContext | None = None,
    listener: socket.socket | None = None,
) -> ThreadedAssociationServer:
    """Serves `ae` on `node.host`:`port`, or on `listener` (shared by the receiving processes), behind the
    negotiation guard, in a background thread; returns once the port is bound."""
    # As ae.start_server(block=False) does, with our server class (which make_server takes, start_server not).
    server = ae.make_server(
        (node.host, port),
        evt_handlers=handlers,
        ssl_context=ssl_context,
        server_class=_NegotiationGuardServer,
        node=node,
        closed_log=closed_log,
        listener=listener,
    )
    ae._servers.append(server)
    threading.Thread(target=server.serve_forever, args=(POLL_SECONDS,), name="AcceptorServer", daemon=True).start()
    return server


@dataclass(frozen=True)
class Listeners:
    """Listening sockets `rtnode serve` opened for `node.receivers` processes to accept on (the TLS one when
    `[tls]` is configured): the kernel gives each connection to one of them, whole."""

    plain: socket.socket
    tls: socket.socket | None = None

    @classmethod
    def open(cls, node: ListenerSettings, tls: ServerTls) -> Listeners:
        tls_listener = _listening_socket(node.host, tls.port, node.max_associations) if tls.enabled else None
        return cls(_listening_socket(node.host, node.port, node.max_associations), tls_listener)

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


def server_context(tls: ServerTls) -> ssl.SSLContext:
    """The TLS listener's context: TLS 1.2 or later (BCP 195), the node's certificate, and client certificates
    checked against `ca_certificates` (required, or only checked when presented)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_TLS_VERSION
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


def client_context(tls: TlsFiles) -> _ClientContext:
    """TLS 1.2 or later (BCP 195); the destination's certificate checked against `ca_certificates` (the system's
    CAs without) and its host name; the node's certificate presented when it has one."""
    context = _ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = MINIMUM_TLS_VERSION
    if tls.ca_certificates is not None:
        context.load_verify_locations(tls.ca_certificates)
    else:
        context.load_default_certs()
    if tls.certificate is not None:
        context.load_cert_chain(tls.certificate, tls.private_key)
    return context
