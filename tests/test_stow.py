"""STOW-RS destinations (DICOMweb, PS3.18 10.5) beside C-STORE: the configuration, how an HTTP answer is
classified, HTTPS against a throw-away CA, and delivery to a real Orthanc with Debian's DicomWeb plugin, by
the sender's transport and by a whole `rtnode serve`."""

from __future__ import annotations

import json
import logging
import sqlite3
import ssl
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydicom import dcmread

from node.config import Config, ConfigError, TlsSection, parse_config
from node.destinations import DeliveryOrder, Destination
from node.destinations.stowrs import classify_stow_response, stow_rs
from node.harness import LOOPBACK
from node.sender import log_destination_warnings as warn_of_plain_http
from node.sender import send
from node.vocabulary import OutputKind
from tests import test_tls
from tests.conftest import REQUIRE_TOOLS
from tests.test_loop import jobs, phantom_series, push, settled, wait_for
from tests.test_orthanc import Orthanc, orthanc_binary

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian's orthanc-dicomweb
USER, PASSWORD = "rtnode", "s3cret-of-rtnode"
UID = "1.2.3.4"


def failed_sop(uid: str, reason: int | None) -> bytes:
    """A DICOM JSON STOW-RS response whose Failed SOP Sequence lists `uid`."""
    item = {"00081155": {"vr": "UI", "Value": [uid]}}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return json.dumps({"00081198": {"vr": "SQ", "Value": [item]}}).encode()


@pytest.mark.parametrize(
    ("status", "body", "delivered", "retry", "says"),
    [
        (200, b"", True, False, "stored by pacs (HTTP 200)"),
        (200, failed_sop("9.9", 0x0110), True, False, "stored"),  # another instance failed
        (202, failed_sop("9.9", 0x0110), True, False, "HTTP 202"),
        (200, failed_sop(UID, 0x0110), False, False, "did not store the instance (HTTP 200, failure reason 0x0110)"),
        (202, failed_sop(UID, 0xA700), False, True, "failure reason 0xA700"),
        (409, failed_sop(UID, 0xA700), False, True, "HTTP 409"),  # out of resources: may pass
        (409, failed_sop(UID, None), False, False, "no failure reason"),
        (409, b"<NativeDicomModel/>", False, False, "HTTP 409"),
        (401, b"", False, False, "pacs refused the credentials (HTTP 401)"),
        (403, b"", False, False, "refused the credentials (HTTP 403)"),
        (400, b'{"Message": "Bad request"}', False, False, 'HTTP 400: {"Message": "Bad request"}'),
        (415, b"", False, False, "HTTP 415"),
        (429, b"", False, True, "HTTP 429"),
        (500, b"", False, True, "HTTP 500"),
        (503, b"busy\n", False, True, "HTTP 503: busy"),
    ],
)
def test_stow_rs_answers_are_classified(status, body, delivered, retry, says):
    outcome = classify_stow_response(status, body, UID, "pacs")
    assert (outcome.delivered, outcome.retry) == (delivered, retry), outcome
    assert says in outcome.detail


def test_a_stow_rs_destination_in_toml():
    config = parse_config(
        '[[destinations]]\nname = "pacs"\ntype = "stow-rs"\nurl = "http://127.0.0.1:8042/dicom-web/"\n'
        f'username = "{USER}"\npassword = "{PASSWORD}"\nnetwork_timeout_seconds = 20\n'
        '[[destinations]]\nname = "archive"\ntype = "stow-rs"\nurl = "https://archive.example.org/wado"\ntoken = "t0k"\n'
        '[[destinations]]\nname = "tps"\nae_title = "TPS"\nhost = "10.0.0.9"\nport = 104\n'
    )
    pacs, archive, tps = config.destinations
    assert (pacs.type, pacs.url, pacs.username, pacs.password) == ("stow-rs", "http://127.0.0.1:8042/dicom-web", USER, PASSWORD)
    assert pacs.address == ("", "127.0.0.1", 8042) and archive.address == ("", "archive.example.org", 443)
    assert (tps.type, tps.address, tps.url) == ("c-store", ("TPS", "10.0.0.9", 104), None)  # no type: C-STORE as before
    assert PASSWORD not in repr(config) and "t0k" not in repr(config)


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        ('type = "stow-rs"', "a stow-rs destination needs a url"),
        ('type = "stow-rs"\nurl = "ftp://pacs/dicom-web"', "destinations.0.url = 'ftp://pacs/dicom-web'"),
        ('type = "stow-rs"\nurl = "https://u:p@pacs/dicom-web"', "its credentials in token or username and password"),
        ('type = "stow-rs"\nurl = "https://pacs/dicom-web?x=1"', "no query or fragment"),
        ('type = "stow-rs"\nurl = "https://pacs:99999/dicom-web"', "destinations.0.url"),
        ('type = "stow-rs"\nurl = "https://pacs"\nhost = "pacs"\nport = 443', "host, port: not a key of a stow-rs destination"),
        ('type = "stow-rs"\nurl = "https://pacs"\ntls = true', "tls: not a key of a stow-rs destination"),
        ('type = "stow-rs"\nurl = "https://pacs"\ntoken = "t"\nusername = "u"\npassword = "p"', "not both"),
        ('type = "stow-rs"\nurl = "https://pacs"\nusername = "u"', "username and password go together"),
        ('ae_title = "TPS"\nhost = "h"\nport = 104\nurl = "https://pacs"', "url: not a key of a c-store destination"),
        ('ae_title = "TPS"\nhost = "h"\nport = 104\ntype = "dicomweb"', "destinations.0.type = 'dicomweb'"),
    ],
)
def test_a_destination_takes_the_keys_of_its_type(keys, says):
    with pytest.raises(ConfigError) as info:
        parse_config(f'[[destinations]]\nname = "pacs"\n{keys}\n')
    assert says in str(info.value)


def test_a_destination_in_error_is_not_echoed_with_its_password():
    with pytest.raises(ConfigError) as info:
        parse_config(f'[[destinations]]\nname = "pacs"\ntype = "stow-rs"\nusername = "{USER}"\npassword = "{PASSWORD}"\n')
    assert str(info.value).endswith("destinations.0: Value error, a stow-rs destination needs a url")
    assert PASSWORD not in str(info.value)


def test_plain_http_to_another_host_is_warned_of(caplog):
    def stow(name: str, url: str) -> Destination:
        return Destination(name=name, type="stow-rs", url=url)

    config = Config(destinations=[
        stow("far", "http://10.0.0.9:8042/dicom-web"), stow("local", "http://localhost:8042/dicom-web"),
        stow("safe", "https://10.0.0.9/dicom-web"), Destination(name="tps", ae_title="TPS", host="10.0.0.9", port=104),
    ])
    with caplog.at_level(logging.WARNING, logger="node.sender"):
        warn_of_plain_http(config)
    assert [r.getMessage() for r in caplog.records] == [
        "destination far: http://10.0.0.9:8042/dicom-web is plain http: patient data and credentials cross the network"
        " unencrypted"
    ]


def order(rtstruct: Path, port: int, ae_title: str = "") -> DeliveryOrder:
    return DeliveryOrder(1, "pacs", ae_title, LOOPBACK, port, OutputKind.RTSTRUCT, rtstruct)


def test_a_delivery_to_a_stow_rs_destination_no_longer_configured_is_not_retried(rtstruct):
    outcome = send(Config(), order(rtstruct, 8042))
    assert not outcome.delivered and not outcome.retry
    assert "pacs is no longer a STOW-RS destination" in outcome.detail


class FakeStow:
    """An HTTPS STOW-RS service on loopback that keeps each request and answers 200 after `delay` seconds."""

    def __init__(self, identity: test_tls.Identity, delay: float = 0.0) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the name http.server calls)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                fake.requests.append((self.path, dict(self.headers), body))
                time.sleep(delay)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(identity.certificate, identity.key)
        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_stow(tmp_path):
    ca = test_tls._issue(tmp_path, "ca", "/CN=rtnode test CA", None)
    started: list[FakeStow] = []

    def start(delay: float = 0.0) -> FakeStow:
        started.append(FakeStow(test_tls._issue(tmp_path, "pacs", "/CN=pacs", ca), delay))
        return started[-1]

    yield ca.certificate, start
    for fake in started:
        fake.close()


def stow_to(port: int, rtstruct: Path, ca: Path | None, timeout: float = 10.0, **credentials):
    destination = Destination(
        name="pacs", type="stow-rs", url=f"https://{LOOPBACK}:{port}/dicom-web", network_timeout_seconds=timeout, **credentials
    )
    return stow_rs(Config(tls=TlsSection(ca_certificates=ca), destinations=[destination]), order(rtstruct, port), destination)


def test_stow_rs_over_https_checks_the_certificate_against_ca_certificates(fake_stow, rtstruct):
    ca, start = fake_stow
    pacs = start()
    outcome = stow_to(pacs.port, rtstruct, ca, token="t0k")
    assert outcome.delivered, outcome
    ((path, headers, body),) = pacs.requests
    assert path == "/dicom-web/studies"
    assert headers["Accept"] == "application/dicom+json" and headers["Authorization"] == "Bearer t0k"
    content_type = headers["Content-Type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    boundary = content_type.rsplit("=", 1)[1].encode()
    part = b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + rtstruct.read_bytes()
    assert body == part + b"\r\n--" + boundary + b"--\r\n"

    untrusted = stow_to(pacs.port, rtstruct, None)  # the system's CAs do not know the test CA
    assert not untrusted.delivered and untrusted.retry, untrusted
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.detail and len(pacs.requests) == 1


def test_a_stow_rs_answer_slower_than_the_network_timeout_is_retried(fake_stow, rtstruct):
    ca, start = fake_stow
    outcome = stow_to(start(delay=3.0).port, rtstruct, ca, timeout=1.0)
    assert not outcome.delivered and outcome.retry, outcome
    assert "timed out" in outcome.detail


def dicomweb_plugin() -> Path:
    orthanc_binary()  # skips, or fails under RTNODE_REQUIRE_TOOLS=1, without Orthanc
    if not DICOMWEB_PLUGIN.exists():
        if REQUIRE_TOOLS:
            pytest.fail(f"{DICOMWEB_PLUGIN} is absent (the test command installs orthanc-dicomweb)")
        pytest.skip(f"{DICOMWEB_PLUGIN} is absent (Debian's orthanc-dicomweb)")
    return DICOMWEB_PLUGIN


@pytest.fixture
def pacs(tmp_path):
    """Orthanc with the DicomWeb plugin on /dicom-web/, HTTP basic auth required."""
    orthanc = Orthanc(tmp_path / "pacs", {}, {
        "Plugins": [str(dicomweb_plugin())],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
    })
    passwords = urllib.request.HTTPPasswordMgrWithPriorAuth()
    passwords.add_password(None, f"http://{LOOPBACK}:{orthanc.http_port}/", USER, PASSWORD, is_authenticated=True)
    orthanc.opener.add_handler(urllib.request.HTTPBasicAuthHandler(passwords))
    yield orthanc.start()
    orthanc.stop()


def stow_to_orthanc(orthanc: Orthanc, rtstruct: Path, password: str = PASSWORD):
    url = f"http://{LOOPBACK}:{orthanc.http_port}/dicom-web"
    destination = Destination(name="pacs", type="stow-rs", url=url, username=USER, password=password, network_timeout_seconds=10)
    return send(Config(destinations=[destination]), order(rtstruct, orthanc.http_port))


def test_stow_rs_to_orthanc(pacs, rtstruct):
    outcome = stow_to_orthanc(pacs, rtstruct)
    assert outcome.delivered and outcome.detail == "stored by pacs (HTTP 200)", outcome
    (instance,) = pacs.get("/instances")
    tags = pacs.get(f"/instances/{instance}/tags?simplify")
    assert (tags["Modality"], tags["SOPInstanceUID"]) == ("RTSTRUCT", dcmread(rtstruct).SOPInstanceUID)
    assert stow_to_orthanc(pacs, rtstruct).delivered  # sent again (rtnode resend): stored once, still a success
    assert pacs.get("/instances") == [instance]

    refused = stow_to_orthanc(pacs, rtstruct, password="wrong")
    assert not refused.delivered and not refused.retry, refused
    assert refused.detail.startswith("pacs refused the credentials (HTTP 401)")

    pacs.stop()
    down = stow_to_orthanc(pacs, rtstruct)
    assert not down.delivered and down.retry, down
    assert "ConnectionRefusedError" in down.detail


def test_serve_delivers_by_stow_rs_to_orthanc(node_factory, pacs, tmp_path):
    node = node_factory(
        sections="[completion]\nquiet_seconds = 3\nmin_slices = 10\n"
        f'[[destinations]]\nname = "pacs"\ntype = "stow-rs"\nurl = "http://{LOOPBACK}:{pacs.http_port}/dicom-web"\n'
        f'username = "{USER}"\npassword = "{PASSWORD}"\n'
    ).start()
    phantom_series(tmp_path / "ct", seed=40201)
    push(node, tmp_path / "ct", "+sd")
    wait_for(node, settled, what="the job to finish")

    (job,) = jobs(node)
    assert job["status"] == "done", job
    (delivery,) = job["deliveries"]
    assert [delivery[key] for key in ("destination", "kind", "status", "attempts")] == ["pacs", "rtstruct", "done", 1]
    (series,) = pacs.rtstruct_series()
    (instance,) = pacs.get(f"/series/{series}")["Instances"]
    sent = dcmread(job["outputs"]["rtstruct"])
    assert pacs.get(f"/instances/{instance}/tags?simplify")["SOPInstanceUID"] == sent.SOPInstanceUID

    # The row says where it went; the credentials stay in the configuration, out of the database and the log.
    with sqlite3.connect(node.database) as connection:
        assert connection.execute("select ae_title, host, port from deliveries").fetchall() == [("", LOOPBACK, pacs.http_port)]
    node.stop()
    for path in [node.log_path, *node.root.glob("rtnode.sqlite3*")]:
        assert PASSWORD.encode() not in path.read_bytes(), path
