"""Users, browser sessions, API tokens and the audit trail: the web app's rows, and the rules for them.

Passwords are hashed with argon2 (argon2-cffi); session cookies and API tokens are random and only
their sha256 is stored, so a copy of the database logs nobody in.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from node.config import WebSection
from node.db.models import ApiToken, AuditEvent, User, WebSession, utcnow
from node.errors import UserError

_HASHER = PasswordHasher()
# Verified against when the username is unknown, so a wrong name costs as long as a wrong password.
_UNKNOWN_USER_HASH = _HASHER.hash(secrets.token_urlsafe(16))
_USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD_LENGTH = 8
# A session's last_seen_at is written at most this often: the SCP shares the database and its writes come first.
_TOUCH_INTERVAL = timedelta(seconds=30)
# What the session and lockout rules read the time from: the web app's clock, which a test may replace.
Clock = Callable[[], datetime]


class Role(StrEnum):
    ADMIN = "admin"  # everything, the audit trail included
    DOSIMETRIST = "dosimetrist"  # reviews, resends, uploads
    VIEWER = "viewer"  # reads only


# Who may change something: resend a job's outputs, upload a CT.
ACTING_ROLES = (Role.ADMIN, Role.DOSIMETRIST)


class AuditAction(StrEnum):
    LOGIN = "login"
    LOGIN_FAILED = "login failed"
    LOGOUT = "logout"
    VIEW = "view"
    DOWNLOAD = "download"
    RESEND = "resend"
    UPLOAD = "upload"
    REFUSED = "refused"  # a request the role or the CSRF check refused


@dataclass(frozen=True)
class Identity:
    """Who makes a request: from a session cookie (with its CSRF token) or an API token (csrf_token None)."""

    user_id: int
    username: str
    role: Role
    csrf_token: str | None
    session_id: int | None

    def may_act(self) -> bool:
        return self.role in ACTING_ROLES


@dataclass(frozen=True)
class LoginResult:
    identity: Identity | None
    session_token: str | None
    # Seconds the answer waits (the slowdown of repeated failures), and why it failed, for the page.
    delay_seconds: float
    message: str


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _check_new_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"a password has at least {MIN_PASSWORD_LENGTH} characters")


def _user(session: Session, username: str) -> User:
    user = session.scalars(select(User).where(User.username == username)).one_or_none()
    if user is None:
        raise UserError(f"no user {username!r}")
    return user


def add_user(engine: Engine, username: str, role: Role, password: str) -> None:
    if not _USERNAME.match(username):
        raise UserError(f"user name {username!r}: 1 to 64 letters, digits or . _ @ -")
    _check_new_password(password)
    with Session(engine) as session, session.begin():
        if session.scalars(select(User).where(User.username == username)).first() is not None:
            raise UserError(f"user {username!r} exists already (rtnode user passwd changes the password)")
        session.add(User(username=username, password_hash=_HASHER.hash(password), role=role, created_at=utcnow()))


def disable_user(engine: Engine, username: str) -> None:
    """No more logins, and the user's sessions and API tokens end now."""
    with Session(engine) as session, session.begin():
        user = _user(session, username)
        user.disabled = True
        now = utcnow()
        session.execute(update(WebSession).where(WebSession.user_id == user.id, WebSession.ended_at.is_(None))
                        .values(ended_at=now))
        session.execute(update(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None)).values(revoked_at=now))


def set_password(engine: Engine, username: str, password: str) -> None:
    """A new password also lifts a lockout and ends the user's sessions."""
    _check_new_password(password)
    with Session(engine) as session, session.begin():
        user = _user(session, username)
        user.password_hash, user.failed_logins, user.locked_until = _HASHER.hash(password), 0, None
        session.execute(update(WebSession).where(WebSession.user_id == user.id, WebSession.ended_at.is_(None))
                        .values(ended_at=utcnow()))


def create_api_token(engine: Engine, username: str) -> str:
    token = "rtn_" + secrets.token_urlsafe(32)
    with Session(engine) as session, session.begin():
        user = _user(session, username)
        if user.disabled:
            raise UserError(f"user {username!r} is disabled")
        session.add(ApiToken(token_sha256=sha256(token), user_id=user.id, created_at=utcnow()))
    return token


def _identity(user: User, csrf_token: str | None = None, session_id: int | None = None) -> Identity:
    return Identity(user.id, user.username, Role(user.role), csrf_token, session_id)


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def log_in(engine: Engine, web: WebSection, username: str, password: str, address: str, clock: Clock = utcnow) -> LoginResult:
    """Check a password under the slowdown and lockout rules; on success a new session."""
    with Session(engine) as session, session.begin():
        user = session.scalars(select(User).where(User.username == username)).one_or_none()
        if user is None:
            _verify(_UNKNOWN_USER_HASH, password)  # the same argon2 work and wait as a known name's first failures
            return LoginResult(None, None, 0.0, "wrong user name or password")
        now = clock()
        if user.locked_until is not None and user.locked_until > now:
            return LoginResult(None, None, 1.0, f"too many failed logins: locked until {user.locked_until:%H:%M} UTC")
        if user.disabled or not _verify(user.password_hash, password):
            user.failed_logins += 1
            if user.failed_logins >= web.login_lockout_after:
                user.locked_until = now + timedelta(minutes=web.login_lockout_minutes)
                return LoginResult(None, None, 1.0, f"too many failed logins: locked until {user.locked_until:%H:%M} UTC")
            delay = float(max(0, user.failed_logins - web.login_slowdown_after))  # beyond login_slowdown_after
            return LoginResult(None, None, delay, "wrong user name or password")
        user.failed_logins, user.locked_until = 0, None
        if _HASHER.check_needs_rehash(user.password_hash):
            user.password_hash = _HASHER.hash(password)
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        row = WebSession(token_sha256=sha256(token), user=user, csrf_token=csrf, address=address[:64], created_at=now,
                         last_seen_at=now)
        session.add(row)
        session.flush()
        return LoginResult(_identity(user, csrf, row.id), token, 0.0, "")


def session_identity(engine: Engine, token: str, web: WebSection, *, touch: bool = True,
                     clock: Clock = utcnow) -> Identity | None:
    """The user of a live session cookie, or None (unknown, ended, idle too long, too old, user disabled).
    `touch` counts the request as activity (a page's own polling does not keep a session alive)."""
    now = clock()
    with Session(engine) as session:
        row = session.scalars(select(WebSession).where(WebSession.token_sha256 == sha256(token))).one_or_none()
        if row is None or row.ended_at is not None or row.user.disabled:
            return None
        if now - row.last_seen_at > timedelta(minutes=web.session_idle_minutes):
            return None
        if now - row.created_at > timedelta(hours=web.session_max_hours):
            return None
        identity = _identity(row.user, row.csrf_token, row.id)
        if touch and now - row.last_seen_at > _TOUCH_INTERVAL:
            row.last_seen_at = now
            session.commit()
        return identity


def end_session(engine: Engine, session_id: int) -> None:
    with Session(engine) as session, session.begin():
        session.execute(update(WebSession).where(WebSession.id == session_id).values(ended_at=utcnow()))


def token_identity(engine: Engine, token: str) -> Identity | None:
    with Session(engine) as session, session.begin():
        row = session.scalars(select(ApiToken).where(ApiToken.token_sha256 == sha256(token))).one_or_none()
        if row is None or row.revoked_at is not None or row.user.disabled:
            return None
        now = utcnow()
        if row.last_used_at is None or now - row.last_used_at > _TOUCH_INTERVAL:
            row.last_used_at = now
        return _identity(row.user)


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    username: str
    action: str
    target: str
    patient_id: str
    address: str
    outcome: str


def audit(engine: Engine, username: str, action: AuditAction, address: str, target: str = "", patient_id: str = "",
          outcome: str = "") -> None:
    with Session(engine) as session, session.begin():
        session.add(AuditEvent(at=utcnow(), username=username[:64], action=action, target=target, patient_id=patient_id[:64],
                               address=address[:64], outcome=outcome))


def audit_entries(engine: Engine, before_id: int | None = None, username: str = "", limit: int = 200) -> list[AuditEntry]:
    """Newest first, a page at a time (keyset on id)."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(AuditEvent.id < before_id)
    if username:
        query = query.where(AuditEvent.username == username)
    with Session(engine) as session:
        return [AuditEntry(e.id, e.at, e.username, e.action, e.target, e.patient_id, e.address, e.outcome)
                for e in session.scalars(query)]
