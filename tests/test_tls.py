"""DICOM over TLS with DCMTK's TLS tools: the node's TLS listener beside the plain one, client
certificates and callers pinned to a certificate subject, and delivery to a TLS storescp.

The certificates come from a throw-away CA made with the openssl command line; a second CA
makes the "wrong" ones. Server certificates name IP:127.0.0.1 and DNS:localhost, which the sender
checks; one from the trusted CA names other hosts. A Python TLS peer stuck at TLS 1.1 stands for
an old system on either side."""

from __future__ import annotations

import re
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import RTStructureSetStorage

from node.config import Config, TlsSection
from node.destinations import DeliveryOrder, Destination
from node.errors import UserError
from node.harness import DCMTK_ENV, LOOPBACK, NodeProcess, free_port, wait_for_port
from node.sender import send
from node.synth.ct_series import write_cylinder_ct
from node.transport import certificate_subject, client_context, server_context
from node.vocabulary import OutputKind
from tests.conftest import require_tool, run_tool, wait_until

# As `openssl x509 -noout -subject -nameopt RFC2253` prints the scanner's certificate: most specific first.
SCANNER_SUBJECT = "CN=scanner1,O=Radiology\\, Inc."


@dataclass(frozen=True)
class Identity:
    key: Path
    certificate: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA the node trusts
    node: Identity  # the node's own (and the trusted planning system's) server certificate
    scanner: Identity  # a client certificate from the trusted CA
    other_scanner: Identity  # from the trusted CA, another subject
    rogue: Identity  # the scanner's subject and IP, from another CA
    misnamed: Identity  # from the trusted CA, naming other hosts than the destination's


def _openssl(*args: str | Path) -> None:
    subprocess.run([require_tool("openssl"), *map(str, args)], check=True, capture_output=True, timeout=30)


LOCAL_NAMES = f"IP:{LOOPBACK},DNS:localhost"


def _issue(
    directory: Path, name: str, subject: str, ca: Identity | None, names: str = LOCAL_NAMES, days: int = 1
) -> Identity:
    """An EC P-256 certificate valid for `days`: self-signed (a CA) when `ca` is None, else a leaf naming `names`
    (its subjectAltName)."""
    identity = Identity(directory / f"{name}.key", directory / f"{name}.pem")
    command = ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", str(days)]
    command += ["-subj", subject, "-keyout", identity.key, "-out", identity.certificate]
    if ca is not None:
        command += ["-CA", ca.certificate, "-CAkey", ca.key]
        command += ["-addext", "basicConstraints=CA:FALSE", "-addext", f"subjectAltName={names}"]
    _openssl(*command)
    return identity


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = _issue(directory, "ca", "/CN=rtnode test CA", None)
    rogue_ca = _issue(directory, "rogue-ca", "/CN=rogue CA", None)
    return Pki(
        ca=ca.certificate,
        node=_issue(directory, "node", "/O=Radiology, Inc./CN=rtnode", ca),
        scanner=_issue(directory, "scanner", "/O=Radiology, Inc./CN=scanner1", ca),
        other_scanner=_issue(directory, "other", "/O=Radiology, Inc./CN=scanner2", ca),
        rogue=_issue(directory, "rogue", "/O=Radiology, Inc./CN=scanner1", rogue_ca),
        misnamed=_issue(directory, "misnamed", "/CN=127.0.0.1", ca, names="IP:127.0.0.2,DNS:tps.elsewhere.example"),
    )


def tls_node(node_factory, pki: Pki, *, require_client_certificate: bool = False, **kwargs) -> tuple[NodeProcess, int]:
    """A started node with a TLS listener on a port of its own; returns it and that port."""
    port = free_port()
    sections = (
        f'[tls]\nport = {port}\ncertificate = "{pki.node.certificate}"\nprivate_key = "{pki.node.key}"\n'
        f'ca_certificates = "{pki.ca}"\nrequire_client_certificate = {str(require_client_certificate).lower()}\n'
    )
    return node_factory(sections=sections, **kwargs).start(), port


def tls_options(pki: Pki, client: Identity | None) -> list[str]:
    """DCMTK's TLS options: the node's CA trusted, `client`'s certificate presented (none: anonymous TLS)."""
    presented = ["+tls", str(client.key), str(client.certificate)] if client else ["+tla"]
    return [*presented, "+cf", str(pki.ca)]


def echo(port: int, *tls: str, calling: str = "ECHOSCU") -> subprocess.CompletedProcess:
    return run_tool(require_tool("echoscu"), *tls, "-aet", calling, "-aec", "RTNODE", LOOPBACK, str(port), timeout=30)


def test_echo_over_tls_beside_the_plain_port(node_factory, pki):
    node, tls_port = tls_node(node_factory, pki)
    assert echo(tls_port, *tls_options(pki, pki.scanner)).returncode == 0
    assert echo(tls_port, *tls_options(pki, None)).returncode == 0  # a client certificate is only checked if given
    assert echo(node.port).returncode == 0
    assert f"and over TLS on port {tls_port}" in node.log()


def test_storescu_over_tls_stores_into_the_database(node_factory, pki, tmp_path):
    node, tls_port = tls_node(node_factory, pki, require_client_certificate=True)
    write_cylinder_ct(tmp_path / "ct", slices=3, rows=32, columns=32)
    storescu = [require_tool("storescu"), *tls_options(pki, pki.scanner), "-aet", "SCANNER", "-aec", "RTNODE", "+sd"]
    result = run_tool(*storescu, LOOPBACK, str(tls_port), str(tmp_path / "ct"))
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(node.database) as connection:
        assert connection.execute("select count(*), min(calling_ae_title) from instances").fetchall() == [(3, "SCANNER")]


def test_a_required_client_certificate_refuses_none_and_a_wrong_one(node_factory, pki):
    node, tls_port = tls_node(node_factory, pki, require_client_certificate=True)
    assert echo(tls_port, *tls_options(pki, None)).returncode != 0
    assert echo(tls_port, *tls_options(pki, pki.rogue)).returncode != 0
    log = node.log()
    assert "closed connection from 127.0.0.1: TLS handshake failed: [SSL: PEER_DID_NOT_RETURN_A_CERTIFICATE]" in log
    assert "closed connection from 127.0.0.1: TLS handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED]" in log
    # The node serves on: over TLS with a good certificate, and plain.
    assert echo(tls_port, *tls_options(pki, pki.scanner)).returncode == 0
    assert echo(node.port).returncode == 0
    assert node.process.poll() is None


def test_a_silent_or_plain_peer_on_the_tls_port_holds_up_nobody(node_factory, pki):
    node, tls_port = tls_node(node_factory, pki, extra_config="negotiation_timeout_seconds = 3")
    with socket.create_connection((LOOPBACK, tls_port)) as silent:  # never starts the handshake
        assert echo(tls_port).returncode != 0  # plain DICOM on the TLS port
        started = time.monotonic()
        assert echo(tls_port, *tls_options(pki, pki.scanner)).returncode == 0
        assert time.monotonic() - started < 3  # not after the silent one's deadline
        silent.settimeout(10)
        assert silent.recv(1) == b""  # closed at the negotiation deadline
    log = node.log()
    assert "closed connection from 127.0.0.1: TLS handshake failed: [SSL: " in log
    assert "closed connection from 127.0.0.1: no TLS handshake within negotiation_timeout_seconds (3 s)" in log



def silent_tls_connections(port: int, sources: list[str]) -> list[socket.socket]:
    """Connections that never send a TLS hello, one from each source address (loopback addresses)."""
    connections = []
    for source in sources:
        connection = socket.socket()
        connection.bind((source, 0))
        connection.connect((LOOPBACK, port))
        connections.append(connection)
    return connections


def test_stalled_tls_handshakes_hold_no_slot_a_caller_needs(node_factory, pki):
    """Silent TLS connections from the caller's own address, beyond every per-peer limit, and a flood from
    40 other addresses: the caller's echo goes through at once, not at their deadline; the oldest beyond
    the bounds are closed."""
    node, tls_port = tls_node(node_factory, pki, extra_config="negotiation_timeout_seconds = 10\nmax_associations = 4")
    own = silent_tls_connections(tls_port, [LOOPBACK] * 6)  # max_unnegotiated_per_peer is 2, max_associations 4
    flood = silent_tls_connections(tls_port, [f"127.0.1.{n}" for n in range(1, 41)])  # 8 x 4 handshakes at most
    try:
        started = time.monotonic()
        result = echo(tls_port, *tls_options(pki, pki.scanner))
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 3, "the caller waited for the stalled handshakes"
        wait_until(lambda: "the oldest closed" in node.log())
        log = node.log()
        assert "closed connection from 127.0.0.1: more than max_associations TLS handshakes pending from it" in log
        assert "too many TLS handshakes pending: the oldest closed" in log
        own[0].settimeout(5)
        assert own[0].recv(1) == b""  # the oldest of one peer's stalled handshakes was closed
    finally:
        for connection in own + flood:
            connection.close()

def test_a_certificate_subject_is_written_as_openssl_prints_it():
    subject = (
        (("countryName", "DE"),),
        (("organizationName", 'Radi, "ology"+x'),),
        (("commonName", "Müller #1 "),),
        (("organizationalUnitName", "a"), ("organizationalUnitName", "b")),
        (("emailAddress", "a@b.c"),),
    )
    # `openssl x509 -noout -subject -nameopt RFC2253` of a certificate with this subject:
    assert certificate_subject(subject) == 'emailAddress=a@b.c,OU=b+OU=a,CN=M\\C3\\BCller #1\\ ,O=Radi\\, \\"ology\\"\\+x,C=DE'


def test_unusable_tls_files_are_named(pki, tmp_path):
    missing = tmp_path / "missing.pem"
    with pytest.raises(UserError, match=re.escape(f"[tls] certificate {missing} with private_key {pki.node.key} cannot")):
        server_context(TlsSection(certificate=missing, private_key=pki.node.key))
    with pytest.raises(UserError, match=re.escape(f"[tls] ca_certificates {pki.node.key} cannot be used")):
        server_context(TlsSection(certificate=pki.node.certificate, private_key=pki.node.key, ca_certificates=pki.node.key))


def test_a_caller_pinned_to_a_certificate_subject(node_factory, pki):
    openssl = [require_tool("openssl"), "x509", "-noout", "-subject", "-nameopt", "RFC2253"]
    printed = subprocess.run([*openssl, "-in", str(pki.scanner.certificate)], capture_output=True, text=True, timeout=30)
    assert printed.stdout.strip() == f"subject={SCANNER_SUBJECT}"  # the form `certificate_subject` is written in
    pinned = f'[{{ ae_title = "SCANNER", host = "{LOOPBACK}", certificate_subject = \'{SCANNER_SUBJECT}\' }}]'
    node, tls_port = tls_node(node_factory, pki, allowed_callers=pinned)
    assert echo(tls_port, *tls_options(pki, pki.scanner), calling="SCANNER").returncode == 0
    assert echo(tls_port, *tls_options(pki, pki.other_scanner), calling="SCANNER").returncode != 0
    assert echo(tls_port, *tls_options(pki, None), calling="SCANNER").returncode != 0
    assert echo(tls_port, *tls_options(pki, pki.rogue), calling="SCANNER").returncode != 0  # the subject, another CA
    assert echo(node.port, calling="SCANNER").returncode != 0  # plain TCP: no certificate, never in
    log = node.log()
    assert (
        "rejected association from SCANNER@127.0.0.1: caller not in security.allowed_callers "
        "(certificate subject 'CN=scanner2,O=Radiology\\, Inc.')"
    ) in log
    assert log.count("rejected association from SCANNER@127.0.0.1") == 3


@pytest.fixture
def tls_storescp(tmp_path):
    """DCMTK storescp over TLS with `identity`'s certificate, requiring a client certificate from the node's CA."""
    processes: list[subprocess.Popen] = []

    def start(pki: Pki, identity: Identity) -> tuple[int, Path]:
        port, directory = free_port(), tmp_path / f"tps{len(processes)}"
        directory.mkdir()
        command = [require_tool("storescp"), "+tls", str(identity.key), str(identity.certificate), "+cf", str(pki.ca)]
        command += ["-aet", "TPS", "-od", str(directory), str(port)]
        processes.append(subprocess.Popen(command, env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for_port(port, timeout=10)
        return port, directory

    yield start
    for process in processes:
        process.kill()
        process.wait(timeout=10)


def _send(pki: Pki, port: int, path: Path, host: str = LOOPBACK):
    tls = TlsSection(certificate=pki.node.certificate, private_key=pki.node.key, ca_certificates=pki.ca)
    destination = Destination(name="tps", ae_title="TPS", host=host, port=port, tls=True, acse_timeout_seconds=10)
    config = Config(tls=tls, destinations=[destination])
    return send(config, DeliveryOrder(1, "tps", "TPS", host, port, OutputKind.RTSTRUCT, path))


@pytest.fixture
def rtstruct(tmp_path) -> Path:
    """Any instance does for the wire: the sender asks for the RT Structure Set context, so claim that class."""
    path = write_cylinder_ct(tmp_path / "ct", slices=1, rows=8, columns=8)[0]
    dataset = dcmread(path)
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    dataset.save_as(path)
    return path


@pytest.mark.parametrize("host", [LOOPBACK, "localhost"])  # an IP address and a DNS name, each in subjectAltName
def test_delivery_to_a_tls_storescp(pki, tls_storescp, rtstruct, host):
    port, received = tls_storescp(pki, pki.node)
    outcome = _send(pki, port, rtstruct, host)
    assert outcome.delivered, outcome
    assert len(list(received.iterdir())) == 1


def test_an_untrusted_destination_certificate_is_retried(pki, tls_storescp, rtstruct):
    port, received = tls_storescp(pki, pki.rogue)
    outcome = _send(pki, port, rtstruct)
    assert not outcome.delivered and outcome.retry, outcome
    assert f"TLS handshake with TPS@127.0.0.1:{port} failed: [SSL: CERTIFICATE_VERIFY_FAILED]" in outcome.detail
    assert list(received.iterdir()) == []


@pytest.mark.parametrize(
    ("host", "mismatch"),
    [
        (LOOPBACK, "IP address mismatch, certificate is not valid for '127.0.0.1'"),
        ("localhost", "Hostname mismatch, certificate is not valid for 'localhost'"),
    ],
)
def test_a_destination_certificate_naming_another_host_is_retried(pki, tls_storescp, rtstruct, host, mismatch):
    """The certificate chains to the trusted CA (its subject's CN is even the address): only its subjectAltName,
    which names other hosts, can refuse it."""
    port, received = tls_storescp(pki, pki.misnamed)
    outcome = _send(pki, port, rtstruct, host)
    assert not outcome.delivered and outcome.retry, outcome
    expected = f"TLS handshake with TPS@{host}:{port} failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
    assert expected + mismatch in outcome.detail, outcome.detail
    assert list(received.iterdir()) == []


def legacy_context(side: int, identity: Identity | None = None, ca: Path | None = None) -> ssl.SSLContext:
    """TLS 1.0 to 1.1 only, at OpenSSL's security level 0, which TLS below 1.2 needs: an old system's peer."""
    context = ssl.SSLContext(side)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl deprecates the TLS 1.0 and 1.1 versions it still speaks
        context.minimum_version, context.maximum_version = ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    if identity is not None:
        context.load_cert_chain(identity.certificate, identity.key)
    if ca is not None:
        context.load_verify_locations(ca)
    return context


@contextmanager
def tls_1_1_server(identity: Identity) -> Iterator[tuple[int, list[str]]]:
    """A TLS server that speaks at most TLS 1.1 on a free port; yields it and, per connection, the TLS version
    negotiated or why the handshake failed."""
    context = legacy_context(ssl.PROTOCOL_TLS_SERVER, identity)
    handshakes: list[str] = []
    listener = socket.create_server((LOOPBACK, 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connection.settimeout(10)
            try:
                with context.wrap_socket(connection, server_side=True) as secured:
                    handshakes.append(secured.version())
            except OSError as exc:  # ssl.SSLError included
                handshakes.append(str(exc))
                connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], handshakes
    finally:
        stop.set()
        thread.join(timeout=10)
        listener.close()


def test_the_sender_refuses_a_destination_below_tls_1_2(pki, rtstruct):
    assert client_context(TlsSection(ca_certificates=pki.ca)).minimum_version == ssl.TLSVersion.TLSv1_2
    with tls_1_1_server(pki.node) as (port, handshakes):
        # The server does speak TLS 1.1 to a client that accepts it, with the trusted certificate for 127.0.0.1.
        client = legacy_context(ssl.PROTOCOL_TLS_CLIENT, ca=pki.ca)
        with client.wrap_socket(socket.create_connection((LOOPBACK, port), timeout=10), server_hostname=LOOPBACK) as secured:
            assert secured.version() == "TLSv1.1"
        outcome = _send(pki, port, rtstruct)
        wait_until(lambda: len(handshakes) == 2)
    assert not outcome.delivered and outcome.retry, outcome
    refused = f"TLS handshake with TPS@127.0.0.1:{port} failed: [SSL: TLSV1_ALERT_PROTOCOL_VERSION]"  # the sender's own alert
    assert refused in outcome.detail, outcome.detail
    assert handshakes[0] == "TLSv1.1"
    assert "[SSL: UNSUPPORTED_PROTOCOL]" in handshakes[1], handshakes


def test_the_node_refuses_a_caller_below_tls_1_2(node_factory, pki):
    node, tls_port = tls_node(node_factory, pki)
    client = legacy_context(ssl.PROTOCOL_TLS_CLIENT, ca=pki.ca)
    with socket.create_connection((LOOPBACK, tls_port), timeout=10) as connection:
        with pytest.raises(ssl.SSLError, match=r"\[SSL: TLSV1_ALERT_PROTOCOL_VERSION\]"):
            client.wrap_socket(connection, server_hostname=LOOPBACK)
    wait_until(lambda: "TLS handshake failed" in node.log())
    assert "closed connection from 127.0.0.1: TLS handshake failed: [SSL: UNSUPPORTED_PROTOCOL]" in node.log()
    assert echo(tls_port, *tls_options(pki, pki.scanner)).returncode == 0  # TLS 1.2 or later is still served
