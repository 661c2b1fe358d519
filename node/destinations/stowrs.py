"""STOW-RS destinations (`type = "stow-rs"`, DICOMweb, PS3.18 10.5): PACS and archives increasingly take it.
The file is POSTed to `{url}/studies` straight to the URL's host, with a bearer token or HTTP basic auth; the
URL and credentials are read from the configuration at each attempt, never from the database."""

from __future__ import annotations

import base64
import http.client
import json
import secrets
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, model_validator
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from node.addresses import is_loopback
from node.destinations.base import DeliveryOrder, Destination, EchoOutcome, SenderConfig, SendOutcome
from node.transport import client_context

# DICOM JSON keys of a STOW-RS response (PS3.18 10.5.3): Failed SOP Sequence, its items' SOP Instance UID and reason.
_FAILED_SOP_SEQUENCE, _REFERENCED_SOP_INSTANCE_UID, _FAILURE_REASON = "00081198", "00081155", "00081197"
_HTTP_TRANSIENT = (408, 429)  # request timeout, too many requests: waiting helps, as it does for 5xx


def _http_url(value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port == 0 or parts.username is not None:
        raise ValueError("a STOW-RS url is http(s)://host[:port]/path, its credentials in token or username and password")
    if parts.query or parts.fragment:
        raise ValueError("a STOW-RS url has no query or fragment")
    return value.rstrip("/")


class StowRsDestination(Destination):
    """By DICOMweb STOW-RS to `url`."""

    type: Literal["stow-rs"] = "stow-rs"
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 300.0  # the HTTP timeout
    # The DICOMweb service's base URL (https://pacs.example.org/dicom-web; http is sent unencrypted) and optional
    # credentials, a bearer token or HTTP basic auth. Kept here only, never in the database. A missing url is
    # refused by `_complete`, in words.
    url: Annotated[str | None, AfterValidator(_http_url)] = None
    token: Annotated[str | None, Field(repr=False)] = None
    username: str | None = None
    password: Annotated[str | None, Field(repr=False)] = None

    @model_validator(mode="after")
    def _complete(self) -> StowRsDestination:
        if self.url is None:
            raise ValueError("a stow-rs destination needs a url")
        if self.token is not None and self.username is not None:
            raise ValueError("a bearer token or a username and password, not both")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        return self

    @property
    def address(self) -> tuple[str, str, int]:
        """No AE title, and the URL's host and port."""
        parts = urlsplit(self.url)
        return "", parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)

    def send(self, config: SenderConfig, order: DeliveryOrder) -> SendOutcome:
        return stow_rs(config, order, self)

    def echo(self, config: SenderConfig) -> EchoOutcome:
        return stow_rs_echo(config, self)

    @classmethod
    def orphan_detail(cls, order: DeliveryOrder) -> str | None:
        if order.ae_title:
            return None
        return (
            f"{order.destination} is no longer a STOW-RS destination, and a delivery keeps no URL or credentials: "
            "`rtnode resend` queues it anew"
        )

    def warning(self) -> str | None:
        """On http to another machine, patients' data (and credentials) cross the network unencrypted."""
        _, host, _ = self.address
        if urlsplit(self.url).scheme == "http" and not is_loopback(host):
            return f"{self.url} is plain http: patient data and credentials cross the network unencrypted"
        return None


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


def _authorization(destination: StowRsDestination) -> dict[str, str]:
    if destination.token is not None:
        return {"Authorization": f"Bearer {destination.token}"}
    if destination.username is not None:
        pair = base64.b64encode(f"{destination.username}:{destination.password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    return {}


def stow_rs(config: SenderConfig, order: DeliveryOrder, destination: StowRsDestination) -> SendOutcome:
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
    connection = _connection(config, destination)
    if isinstance(connection, SendOutcome):
        return connection
    try:
        connection.request("POST", f"{urlsplit(destination.url).path}/studies", body, headers)
        response = connection.getresponse()
        answer = response.read()
    except (OSError, http.client.HTTPException) as exc:  # refused, unreachable, timed out, TLS handshake failed
        return SendOutcome(False, True, f"STOW-RS to {destination.url} failed: {type(exc).__name__}: {exc}")
    finally:
        connection.close()
    return classify_stow_response(response.status, answer, sop_instance_uid, order.destination)


def _connection(config: SenderConfig, destination: StowRsDestination) -> http.client.HTTPConnection | SendOutcome:
    """A connection to the URL's host, over TLS against [tls] ca_certificates for https; or why there is none."""
    url = urlsplit(destination.url)
    timeout = destination.network_timeout_seconds
    if url.scheme == "http":
        return http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        context = client_context(config.tls)
    except OSError as exc:  # ssl.SSLError included
        files = f"ca_certificates {config.tls.ca_certificates}, certificate {config.tls.certificate}"
        return SendOutcome(False, True, f"cannot send to {destination.url}: [tls] {files} cannot be used: {exc}")
    return http.client.HTTPSConnection(url.hostname, url.port, timeout=timeout, context=context)


def stow_rs_echo(config: SenderConfig, destination: StowRsDestination) -> EchoOutcome:
    """A search for one study (QIDO-RS, `GET {url}/studies?limit=1`) with the credentials a send uses: any answer
    but a refusal of the credentials, a missing resource or a server error shows the service is there (one that
    searches nothing may answer 405)."""
    connection = _connection(config, destination)
    if isinstance(connection, SendOutcome):
        return EchoOutcome(False, connection.detail)
    search = "/studies?limit=1"
    headers = {"Accept": "application/dicom+json", **_authorization(destination)}
    try:
        connection.request("GET", urlsplit(destination.url).path + search, headers=headers)
        status = connection.getresponse().status
    except (OSError, http.client.HTTPException) as exc:  # refused, unreachable, timed out, TLS handshake failed
        return EchoOutcome(False, f"GET {destination.url}{search} failed: {type(exc).__name__}: {exc}")
    finally:
        connection.close()
    if status in (401, 403):
        refused = f"{destination.url} refused the credentials (HTTP {status})"
        return EchoOutcome(False, f"{refused}: check the destination's token, or its username and password")
    if status == 404:
        return EchoOutcome(False, f"no DICOMweb service at {destination.url} (GET {search}: HTTP 404): check its url")
    if status >= 500:
        return EchoOutcome(False, f"{destination.url} answered with a server error (HTTP {status})")
    return EchoOutcome(True, f"{destination.url} answered (HTTP {status})")
