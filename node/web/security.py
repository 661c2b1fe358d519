"""Who is asking, and may they: session cookies or API tokens, roles, CSRF, the host names and form sizes
accepted, and the headers every answer carries."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import HTTPException, Request
from starlette.datastructures import FormData, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.config import WebSection
from node.web.accounts import Identity, Role, session_identity, token_identity

SESSION_COOKIE = "rtnode_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
# No inline script and no framing: DICOM text that slipped through escaping still could not run.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# A commissioning report (node/commission/report.py) is one self-contained page: inline styles, PNG data URIs, no
# script and nothing fetched; sandboxed, so that no text in it could act even if its escaping failed.
REPORT_CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'; sandbox"
)
REPORT_PATH_PREFIX = "/commissioning/reports/"


class LoginRequired(Exception):
    """No valid session or token: pages redirect to /login, the API answers 401."""


class Forbidden(Exception):
    """Logged in, but the role (or a missing CSRF token) does not allow this request."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def identify(request: Request, *, touch: bool = True) -> Identity:
    """The caller: an API token wins over a session cookie. Raises LoginRequired."""
    state = request.app.state.web
    token = bearer_token(request)
    identity = None
    if token is not None:
        identity = token_identity(state.engine, token)
    elif cookie := request.cookies.get(SESSION_COOKIE):
        identity = session_identity(state.engine, cookie, state.config.web, touch=touch, clock=state.clock)
    if identity is None:
        raise LoginRequired()
    return identity


def require_role(identity: Identity, *roles: Role) -> None:
    if identity.role not in roles:
        raise Forbidden(f"role {identity.role} may not do this (needs {' or '.join(roles)})")


@dataclass(frozen=True)
class FormLimits:
    """How much of a form is read: the stated length is checked before a byte of the body is (411 without one, 413
    over `max_bytes`), then the files, the fields and each field's size as it is parsed (400)."""

    max_bytes: int
    max_files: int
    max_fields: int = 16
    max_part_size: int = 4 * 1024  # a field that is not a file


# A login, a logout, a resend: a few short fields and no file. Read before (login) or just after authentication, so
# a stranger's 2 GB form is refused unread.
SMALL_FORM = FormLimits(max_bytes=16 * 1024, max_files=0)


async def read_form(request: Request, limits: FormLimits) -> FormData:
    """The request's form within `limits`. Starlette keeps the first parse of a request: every later `read_form` (or
    `request.form()`) of it gets that one, so the first read must be given the route's limits."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise HTTPException(411, "a form needs a Content-Length")
    if int(length) > limits.max_bytes:
        raise HTTPException(413, f"a form of {int(length)} bytes: this one takes at most {limits.max_bytes}")
    return await request.form(max_files=limits.max_files, max_fields=limits.max_fields,
                              max_part_size=limits.max_part_size)


async def require_csrf(request: Request, identity: Identity, form_limits: FormLimits = SMALL_FORM) -> None:
    """A state-changing request from a browser session must carry the session's CSRF token (form field or
    header). API tokens come in a header a foreign page cannot set, so they need none. A form is read within
    `form_limits`: the route's own, since the form this reads is the one the route gets."""
    if identity.csrf_token is None:
        return
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        sent = (await read_form(request, form_limits)).get(CSRF_FIELD)
    if not isinstance(sent, str) or not secrets.compare_digest(sent, identity.csrf_token):
        raise Forbidden("missing or wrong CSRF token: reload the page and try again")


# What `allowed_host_names` adds to web.host when web.allowed_hosts is empty: this machine as a browser on it names it.
LOOPBACK_HOST_NAMES = ("localhost", "127.0.0.1", "::1")


def _as_in_host_header(name: str) -> str:
    """An IPv6 address in brackets, as the Host and Origin headers write it; names in lower case."""
    name = name.lower()
    return f"[{name.strip('[]')}]" if ":" in name else name


def allowed_host_names(web: WebSection) -> tuple[str, ...]:
    """The host names a request may name: web.allowed_hosts, else web.host and the loopback names. In Starlette's
    TrustedHostMiddleware's form ("*.example.org" for every subdomain)."""
    names = web.allowed_hosts or [web.host, *LOOPBACK_HOST_NAMES]
    return tuple(dict.fromkeys(_as_in_host_header(name) for name in names))


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    host = _as_in_host_header(host)
    return any(host == name or (name.startswith("*.") and host.endswith(name[1:])) for name in allowed)


def same_origin(request: Request, allowed_hosts: Sequence[str]) -> bool:
    """A browser's POST names its origin: it must be this site, by a host name in `allowed_hosts` whatever Host the
    request names. A login posted from another site is refused (login CSRF), and so is one from a site whose name
    was pointed at this machine (DNS rebinding)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser, or one too old to say: nothing a foreign page can make
    parts = urlsplit(origin)
    try:
        port = parts.port
    except ValueError:
        return False
    return (parts.scheme == request.url.scheme and parts.hostname is not None
            and host_allowed(parts.hostname, allowed_hosts) and port == request.url.port)


class SecurityHeaders:
    """CSP, no framing, no sniffing, no referrer to other sites; nothing but static files cached; HSTS under TLS.
    Plain ASGI, so that it can wrap the whole app (`WebApp`), Starlette's own 500 answer included."""

    def __init__(self, app: ASGIApp, tls: bool) -> None:
        self._app = app
        self._tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                report = scope["path"].startswith(REPORT_PATH_PREFIX)
                headers["Content-Security-Policy"] = REPORT_CONTENT_SECURITY_POLICY if report else CONTENT_SECURITY_POLICY
                headers["X-Frame-Options"] = "DENY"
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "same-origin"  # no-referrer would make a browser send Origin: null
                headers["Cross-Origin-Opener-Policy"] = "same-origin"
                if not static:
                    headers["Cache-Control"] = "no-store"
                if self._tls:
                    headers["Strict-Transport-Security"] = "max-age=31536000"
            await send(message)

        await self._app(scope, receive, send_with_headers)
