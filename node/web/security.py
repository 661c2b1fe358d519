"""Who is asking, and may they: session cookies or API tokens, roles, CSRF, and the headers every answer carries."""

from __future__ import annotations

import secrets

from fastapi import Request
from starlette.middleware.base import BaseHTTPMiddleware

from node.web.accounts import Identity, Role, session_identity, token_identity

SESSION_COOKIE = "rtnode_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
# No inline script and no framing: DICOM text that slipped through escaping still could not run.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


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


async def require_csrf(request: Request, identity: Identity) -> None:
    """A state-changing request from a browser session must carry the session's CSRF token (form field or
    header). API tokens come in a header a foreign page cannot set, so they need none."""
    if identity.csrf_token is None:
        return
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        sent = (await request.form()).get(CSRF_FIELD)
    if not isinstance(sent, str) or not secrets.compare_digest(sent, identity.csrf_token):
        raise Forbidden("missing or wrong CSRF token: reload the page and try again")


def same_origin(request: Request) -> bool:
    """A browser's POST names its origin; a login posted from another site is refused (login CSRF)."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return origin == f"{request.url.scheme}://{request.headers.get('host', '')}"


class SecurityHeaders(BaseHTTPMiddleware):
    """CSP, no framing, no sniffing, no referrer to other sites; nothing but static files cached; HSTS under TLS."""

    def __init__(self, app, tls: bool) -> None:
        super().__init__(app)
        self._tls = tls

    async def dispatch(self, request: Request, call_next):
        response = await call_next(request)
        headers = response.headers
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        headers["X-Frame-Options"] = "DENY"
        headers["X-Content-Type-Options"] = "nosniff"
        headers["Referrer-Policy"] = "same-origin"  # no-referrer would make a browser send Origin: null
        headers["Cross-Origin-Opener-Policy"] = "same-origin"
        if not request.url.path.startswith("/static/"):
            headers["Cache-Control"] = "no-store"
        if self._tls:
            headers["Strict-Transport-Security"] = "max-age=31536000"
        return response
