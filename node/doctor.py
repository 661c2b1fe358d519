"""`rtnode doctor`: what an admin checks on the first day and after every change, each check one finding that
says ok, or what is wrong and what to do.

It changes nothing: it makes, migrates and writes no database (a missing one is reported), and sends nothing a
peer keeps: a C-ECHO to each C-STORE destination and to this node's own port, a search of each STOW-RS service,
a TLS handshake and a GET /healthz where this node's listeners may be."""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import shutil
import socket
import sqlite3
import ssl
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from urllib.parse import quote

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from node.config import Config, ConfigError, WebSection, config_path, load_config
from node.db.engine import alembic_config
from node.imaging.dicomfile import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.pipeline.registry import FileState, list_models
from node.retention import GB, tree_bytes
from node.transport import MINIMUM_TLS_VERSION, TlsFiles

# A certificate that expires sooner than this is a problem now: renewing one takes a change request or two.
EXPIRY_MARGIN_DAYS = 30
# How long a check of this node's own listeners waits for an answer: they are on this machine.
LOCAL_TIMEOUT_SECONDS = 5.0
_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_LISTEN = "0A"  # the state of a listening socket in /proc/net/tcp


@dataclass(frozen=True)
class Finding:
    """One check's result: what was checked, whether it is well, and what was found; when not well, what to do."""

    subject: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'PROBLEM':<8} {self.subject}: {self.detail}"


def examine(explicit_config: str | None) -> list[Finding]:
    """Every check, in the order an admin fixes things: nothing else can be checked without a valid configuration."""
    try:
        config = load_config(explicit_config)
    except ConfigError as exc:
        return [Finding("configuration", False, str(exc))]
    return [
        Finding("configuration", True, f"{config_path(explicit_config)} is valid"),
        *port_findings(config),
        *certificate_findings(config),
        database_finding(config),
        disk_finding(config),
        *model_findings(config),
        *destination_findings(config),
    ]


# --- ports -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PortHolder:
    """What answered on a port in use, as this node would."""

    is_this_node: bool
    detail: str


def port_findings(config: Config) -> list[Finding]:
    """Each port the node listens on is free (the node is not running) or held by this node."""
    node, tls, web = config.node, config.tls, config.web
    findings = [_port_finding("node.port", node.host, node.port, partial(_echo_this_node, config))]
    if tls.enabled:
        findings.append(_port_finding("tls.port", node.host, tls.port, partial(_presents_certificate, tls)))
    if web.enabled:
        findings.append(_port_finding("web.port", web.host, web.port, partial(_serves_healthz, web)))
    return findings


def _port_finding(key: str, host: str, port: int, identify: Callable[[str, int], _PortHolder]) -> Finding:
    subject = f"{key} {port}"
    error = _bind_error(host, port)
    if error is None:
        return Finding(subject, True, f"free on {host} (the node is not running): it can listen there")
    if error.errno == errno.EACCES:
        return Finding(subject, False, f"only a privileged process may listen on port {port}: choose a port above 1023")
    if error.errno == errno.EADDRNOTAVAIL:
        return Finding(subject, False, f"{host} is no address of this machine: correct the host it listens on")
    if error.errno != errno.EADDRINUSE:
        return Finding(subject, False, f"cannot listen on {host}:{port}: {error.strerror}")
    holder = identify(_local_address(host), port)
    if holder.is_this_node:
        return Finding(subject, True, f"held by this node: {holder.detail}")
    return Finding(
        subject, False, f"in use by {_process_listening_on(port)}, which is not this node: {holder.detail}; stop it, or set"
        f" {key} to a free port"
    )


def _bind_error(host: str, port: int) -> OSError | None:
    """Why the node could not listen on `host`:`port` now (as it binds: SO_REUSEADDR); None when it could."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc
    return None


def _local_address(host: str) -> str:
    """Where this machine reaches a listener on `host`: a wildcard address is reached on loopback."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def _process_listening_on(port: int) -> str:
    """The process with a listening TCP socket on `port`, from /proc (Linux): those of other users stay hidden."""
    sockets = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        try:
            rows = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for fields in (row.split() for row in rows):
            if fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                sockets.add(f"socket:[{fields[9]}]")
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        try:
            if any(os.readlink(descriptor) in sockets for descriptor in (process / "fd").iterdir()):
                command = (process / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                return f"process {process.name} ({command[:120]})"
        except OSError:  # gone, or another user's
            continue
    return f"a process this user cannot see (`sudo ss -ltnp 'sport = :{port}'` names it)"


def _echo_this_node(config: Config, host: str, port: int) -> _PortHolder:
    """This node answers a C-ECHO to its AE title with rtnode's implementation class UID."""
    called = config.node.ae_title
    ae = AE(ae_title=called)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = LOCAL_TIMEOUT_SECONDS
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called)
    if assoc.is_rejected:
        reason = getattr(assoc.acceptor.primitive, "reason_str", "") or "no reason given"
        return _PortHolder(False, f"it rejected a C-ECHO from {called}@{host} to {called}: {reason}; if that is this node, "
                                  f'allow {{ ae_title = "{called}", host = "{host}" }} in security.allowed_callers')
    if not assoc.is_established:
        return _PortHolder(False, f"it does not answer as a DICOM node: no association with {called}")
    try:
        status = getattr(assoc.send_c_echo(), "Status", None)
        acceptor = assoc.acceptor
    finally:
        assoc.release()
    if acceptor.implementation_class_uid != IMPLEMENTATION_CLASS_UID:
        implementation = acceptor.implementation_version_name or acceptor.implementation_class_uid
        return _PortHolder(False, f"it takes an association to {called}, but is {implementation}, not rtnode")
    if status != 0x0000:
        return _PortHolder(False, f"its C-ECHO answer is status {status}, not success")
    return _PortHolder(True, f"{called} answered C-ECHO ({IMPLEMENTATION_VERSION_NAME})")


def _presents_certificate(tls: TlsFiles, host: str, port: int) -> _PortHolder:
    """The listener's TLS handshake presents this node's certificate (and is shown it, where it asks for one)."""
    certificate = tls.certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = MINIMUM_TLS_VERSION
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # compared below, not verified
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
        ours = ssl.PEM_cert_to_DER_cert(_PEM_CERTIFICATE.search(certificate.read_text()).group())
    except (OSError, AttributeError, ValueError) as exc:  # the certificate's own finding says what is wrong with it
        return _PortHolder(False, f"its certificate cannot be compared with {certificate}: {exc}")
    try:
        with socket.create_connection((host, port), timeout=LOCAL_TIMEOUT_SECONDS) as connection:
            with context.wrap_socket(connection) as tls_connection:
                presented = tls_connection.getpeercert(binary_form=True)
    except OSError as exc:  # ssl.SSLError included
        return _PortHolder(False, f"no TLS handshake: {exc}")
    if presented != ours:
        return _PortHolder(False, f"it presents another certificate than {certificate}")
    return _PortHolder(True, f"it presents {certificate} in its TLS handshake")


def _serves_healthz(web: WebSection, host: str, port: int) -> _PortHolder:
    """The web app answers /healthz with its checks (whatever their status: that is /healthz's business)."""
    if web.tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # who answers is told by what it answers
        connection = http.client.HTTPSConnection(host, port, timeout=LOCAL_TIMEOUT_SECONDS, context=context)
    else:
        connection = http.client.HTTPConnection(host, port, timeout=LOCAL_TIMEOUT_SECONDS)
    named = next((name for name in web.allowed_hosts if not name.startswith("*")), host)  # a Host the app lets in
    try:
        connection.request("GET", "/healthz", headers={"Host": named})
        response = connection.getresponse()
        answer = json.loads(response.read())
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return _PortHolder(False, f"no rtnode web app answers /healthz: {type(exc).__name__}: {exc}")
    finally:
        connection.close()
    if not isinstance(answer, dict) or not {"status", "checks"} <= answer.keys():
        return _PortHolder(False, f"/healthz answered HTTP {response.status}, not as the rtnode web app does")
    failing = [f"{name}: {check.get('detail')}" for name, check in answer["checks"].items() if not check.get("ok")]
    return _PortHolder(True, f"its web app answers /healthz: {'; '.join(failing) or 'ok'}")


# --- certificates ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CertificateDates:
    subject: str
    not_after: datetime


def certificate_findings(config: Config) -> list[Finding]:
    """The certificates the node presents exist, match their keys and do not expire within EXPIRY_MARGIN_DAYS; so
    do the CA certificates it trusts."""
    findings = []
    if config.tls.enabled:
        findings.append(_identity_finding("[tls] certificate", config.tls.certificate, config.tls.private_key))
    if config.tls.ca_certificates is not None:
        findings.append(_ca_finding(config.tls.ca_certificates))
    if config.web.enabled and config.web.tls:
        findings.append(_identity_finding("[web] certificate", config.web.certificate, config.web.private_key))
    return findings


def _identity_finding(key: str, certificate: Path, private_key: Path) -> Finding:
    subject = f"{key} {certificate}"
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certificate, private_key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            return Finding(subject, False, f"does not match its private key {private_key}: configure the key it was issued for")
        return Finding(subject, False, f"cannot be used with private key {private_key}: {exc}")
    except OSError as exc:
        return Finding(subject, False, f"cannot be read with private key {private_key}: {exc.strerror or exc}")
    return _expiry_finding(subject, certificate, "matches its private key")


def _ca_finding(ca_certificates: Path) -> Finding:
    subject = f"[tls] ca_certificates {ca_certificates}"
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(ca_certificates)
    except OSError as exc:  # ssl.SSLError included
        return Finding(subject, False, f"cannot be read as PEM certificates: {exc}")
    return _expiry_finding(subject, ca_certificates, "readable")


def _expiry_finding(subject: str, path: Path, found: str) -> Finding:
    """The earliest expiry of the certificates in `path` (a chain, or a list of CAs)."""
    if shutil.which("openssl") is None:
        return Finding(subject, False, "the openssl command is not installed: install it to check when the certificates expire")
    try:
        dates = [_certificate_dates(block) for block in _PEM_CERTIFICATE.findall(path.read_text())]
    except (OSError, subprocess.SubprocessError, KeyError, ValueError) as exc:
        return Finding(subject, False, f"cannot read when it expires: {exc}")
    if not dates:
        return Finding(subject, False, "holds no PEM certificate")
    first = min(dates, key=lambda d: d.not_after)
    days = (first.not_after - datetime.now(UTC)).total_seconds() / 86400
    when = f"{first.subject} {'expired' if days < 0 else 'expires'} on {first.not_after:%Y-%m-%d %H:%M} UTC"
    if days < 0:
        return Finding(subject, False, f"{when}: renew it")
    if days < EXPIRY_MARGIN_DAYS:
        return Finding(subject, False, f"{when}, in {days:.0f} days (under {EXPIRY_MARGIN_DAYS}): renew it now")
    return Finding(subject, True, f"{found}; {when}, in {days:.0f} days")


def _certificate_dates(pem: str) -> _CertificateDates:
    printed = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-enddate", "-nameopt", "RFC2253"],
        input=pem, capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    fields = dict(line.split("=", 1) for line in printed.splitlines() if "=" in line)
    not_after = datetime.fromtimestamp(ssl.cert_time_to_seconds(fields["notAfter"]), UTC)
    return _CertificateDates(f"'{fields['subject']}'", not_after)


# --- database ----------------------------------------------------------------------------------------------------


def database_finding(config: Config) -> Finding:
    """The database answers, read only, and its schema is at this rtnode's newest migration."""
    url = make_url(config.node.database_url)
    subject = f"database {url.render_as_string(hide_password=True)}"
    database_file = config.database_file
    if database_file is not None:
        if not database_file.is_file():
            return Finding(
                subject, False, f"no SQLite file at {database_file}: no node has run with this configuration here; "
                "`rtnode serve` makes it at its first start (or correct node.database_url)"
            )
        read_only = f"file:{quote(str(database_file))}?mode=ro"
        engine = create_engine("sqlite://", creator=lambda: sqlite3.connect(read_only, uri=True))
    else:
        engine = create_engine(url, connect_args={"connect_timeout": int(LOCAL_TIMEOUT_SECONDS)})
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as exc:
        return Finding(subject, False, f"does not answer: {str(getattr(exc, 'orig', None) or exc).splitlines()[0]}")
    finally:
        engine.dispose()
    scripts = ScriptDirectory.from_config(alembic_config())
    newest = scripts.get_current_head()
    if current == newest:
        return Finding(subject, True, f"answers; its schema is at the newest migration, {newest}")
    if current is None:
        return Finding(subject, False, "holds no rtnode schema: correct node.database_url, or start the node on an empty one")
    if current not in {script.revision for script in scripts.walk_revisions()}:
        return Finding(subject, False, f"its schema is at migration {current}, which this rtnode does not know: a newer"
                                       " rtnode made it; run that version")
    return Finding(
        subject, False, f"migrations not current: its schema is at migration {current}, this rtnode's newest is {newest}: "
        "back it up, then start the node (`rtnode serve` migrates it as it starts)"
    )


# --- disk --------------------------------------------------------------------------------------------------------


def disk_finding(config: Config) -> Finding:
    """The disk of data_dir has room for what retention lets data_dir hold, and more than /healthz's minimum."""
    data_dir = config.node.data_dir
    subject = f"disk of data_dir {data_dir}"
    existing = next(folder for folder in (data_dir, *data_dir.parents) if folder.is_dir())
    free = shutil.disk_usage(existing).free
    minimum = config.web.min_free_disk_gb
    if free < minimum * GB:
        return Finding(subject, False, f"{free / GB:.1f} GB free, under web.min_free_disk_gb = {minimum:g} (where /healthz "
                                       "turns unhealthy): free space, or lower retention's ages so older studies go")
    ceiling = config.retention.max_storage_gb
    if ceiling is None:
        return Finding(subject, True, f"{free / GB:.1f} GB free; no retention.max_storage_gb, so studies go by age only")
    held = tree_bytes(data_dir) if data_dir.is_dir() else 0
    room = (free + held) / GB
    if room < ceiling:
        return Finding(
            subject, False, f"{free / GB:.1f} GB free and {held / GB:.1f} GB in data_dir: {room:.1f} GB in all, under "
            f"retention.max_storage_gb = {ceiling:g}: the disk fills before retention removes a study; lower "
            f"max_storage_gb to {0.9 * room:.0f} or less, or give data_dir a larger disk"
        )
    return Finding(subject, True, f"{free / GB:.1f} GB free and {held / GB:.1f} GB in data_dir: room for "
                                  f"retention.max_storage_gb = {ceiling:g}")


# --- models and destinations -------------------------------------------------------------------------------------


def model_findings(config: Config) -> list[Finding]:
    """Each model's files hash to their configured sha256 (the built-in model's, to its card's)."""
    findings = []
    for model in list_models(config):
        subject = f"model {model.name}"
        if model.files == FileState.MATCHES:
            findings.append(Finding(subject, True, f"the files at {model.path} match their sha256"))
        elif model.files == FileState.MISSING:
            findings.append(Finding(subject, False, f"no model files at {model.path}: correct its path, or copy them there"))
        else:
            findings.append(Finding(
                subject, False, f"the files at {model.path} do not hash to the configured sha256 {model.sha256}: the worker "
                "will not load them; `rtnode models digest PATH` prints theirs, to configure once they are the right ones"
            ))
    return findings


def destination_findings(config: Config) -> list[Finding]:
    """Each destination answers as a send reaches it: C-ECHO, or a DICOMweb search; all at once, each within its own
    timeouts."""
    if not config.destinations:
        return [Finding("destinations", False, "none configured: jobs are contoured, and nothing is sent; add [[destinations]]")]
    with ThreadPoolExecutor(max_workers=len(config.destinations)) as pool:
        outcomes = list(pool.map(lambda destination: destination.echo(config), config.destinations))
    return [
        Finding(f"destination {destination.name}", outcome.answered, outcome.detail)
        for destination, outcome in zip(config.destinations, outcomes, strict=True)
    ]
