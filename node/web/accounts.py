"""Users, browser sessions, API tokens and the audit trail: the web app's rows, and the rules for them.

Passwords are hashed with argon2 (argon2-cffi); session cookies and API tokens are random and only
their sha256 is stored, so a copy of the database logs nobody in.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine, and_, case, func, literal, or_, select, update
from sqlalchemy.orm import Session

from node.config import WebSection
from node.db.models import ApiToken, AuditEvent, User, WebSession, utcnow
from node.errors import UserError

_HASHER = PasswordHasher()
# Verified against when the username is unknown (same hasher, same parameters), so a wrong name costs the same
# argon2 work as a wrong password.
_UNKNOWN_USER_HASH = _HASHER.hash(secrets.token_urlsafe(16))
WRONG_NAME_OR_PASSWORD = "wrong user name or password"
# A locked name's answer waits this long, as the failure that locked it did.
LOCKED_DELAY_SECONDS = 1.0
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
    PHYSICIST = "physicist"  # reads, and the commissioning reports


# Who may change something: resend a job's outputs, upload a CT.
ACTING_ROLES = (Role.ADMIN, Role.DOSIMETRIST)


class AuditAction(StrEnum):
    LOGIN = "login"
    LOGIN_FAILED = "login failed"
    LOGOUT = "logout"
    VIEW = "view"
    DOWNLOAD = "download"
    RESEND = "resend"
    RELEASE = "release"  # a job held back for low confidence, sent after all
    DISCARD = "discard"  # a held job, never sent
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
    # Refused by the per-address throttle, before any password was checked.
    address_throttled: bool = False


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


def enable_user(engine: Engine, username: str) -> bool:
    """Logins again, the lockout lifted (failures while disabled could never succeed); the sessions and API tokens
    the disable ended stay ended. False when the user was not disabled (nothing changes then)."""
    with Session(engine) as session, session.begin():
        user = _user(session, username)
        if not user.disabled:
            return False
        user.disabled, user.failed_logins, user.locked_until = False, 0, None
        return True


def set_password(engine: Engine, username: str, password: str) -> bool:
    """A new password also lifts a lockout and ends the user's sessions. Allowed on a disabled user, so that the
    old password never works again once `enable_user` lets them in; returns whether the user is disabled."""
    _check_new_password(password)
    with Session(engine) as session, session.begin():
        user = _user(session, username)
        user.password_hash, user.failed_logins, user.locked_until = _HASHER.hash(password), 0, None
        session.execute(update(WebSession).where(WebSession.user_id == user.id, WebSession.ended_at.is_(None))
                        .values(ended_at=utcnow()))
        return user.disabled


def any_user(engine: Engine) -> bool:
    with Session(engine) as session:
        return session.scalars(select(User.id).limit(1)).first() is not None


@dataclass(frozen=True)
class UserSummary:
    """A user as `rtnode user list` shows them."""

    name: str
    role: str
    enabled: bool
    locked_until: datetime | None  # a lockout still running, else None
    last_login: datetime | None  # the newest session's start
    sessions: int  # live browser sessions: not ended, idle or too old
    api_tokens: int  # not revoked

    def to_json(self) -> dict:
        data = asdict(self)
        for key in ("locked_until", "last_login"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


def list_users(engine: Engine, web: WebSection, clock: Clock = utcnow) -> list[UserSummary]:
    """Every user by name, with the counts from three grouped queries (not one per user)."""
    now = clock()
    live = (WebSession.ended_at.is_(None), WebSession.last_seen_at >= now - timedelta(minutes=web.session_idle_minutes),
            WebSession.created_at >= now - timedelta(hours=web.session_max_hours))
    with Session(engine) as session:
        last_login = dict(session.execute(select(WebSession.user_id, func.max(WebSession.created_at))
                                          .group_by(WebSession.user_id)).all())
        sessions = dict(session.execute(select(WebSession.user_id, func.count()).where(*live)
                                        .group_by(WebSession.user_id)).all())
        tokens = dict(session.execute(select(ApiToken.user_id, func.count()).where(ApiToken.revoked_at.is_(None))
                                      .group_by(ApiToken.user_id)).all())
        return [
            UserSummary(user.username, user.role, not user.disabled,
                        user.locked_until if user.locked_until is not None and user.locked_until > now else None,
                        last_login.get(user.id), sessions.get(user.id, 0), tokens.get(user.id, 0))
            for user in session.scalars(select(User).order_by(User.username))
        ]


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


@dataclass(frozen=True)
class FailedLogins:
    """A name's failed logins since its last good one, and the lockout they made: a user's in the users table, a
    name nobody has in `UnknownNames`. Both answer by `refusal`, so no answer tells the two apart."""

    count: int
    locked_until: datetime | None

    def locked(self, now: datetime) -> bool:
        return self.locked_until is not None and self.locked_until > now

    def after_failure(self, web: WebSection, now: datetime) -> FailedLogins:
        """One more failure. Reaching login_lockout_after (or beyond, once a lock has ended) locks the name from now;
        a failure during a lock does not move its end. `_count_user_failure` is the same rule in one UPDATE."""
        count = self.count + 1
        if count >= web.login_lockout_after and not self.locked(now):
            return FailedLogins(count, now + timedelta(minutes=web.login_lockout_minutes))
        return FailedLogins(count, self.locked_until)

    def refusal(self, web: WebSection, now: datetime) -> LoginResult:
        if self.locked(now):
            return LoginResult(None, None, LOCKED_DELAY_SECONDS,
                               f"too many failed logins: locked until {self.locked_until:%H:%M} UTC")
        return LoginResult(None, None, float(max(0, self.count - web.login_slowdown_after)), WRONG_NAME_OR_PASSWORD)


NO_FAILURES = FailedLogins(0, None)


class UnknownNames:
    """The failed logins of names that are no user, counted by the rules the users table counts a user's by, so that
    a name nobody has is answered as a user's is: the same slowdown, the same "locked". In memory (the web app is one
    process), keyed by the name's sha256; only the `MAX_NAMES` most recently tried are kept."""

    MAX_NAMES = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failed: OrderedDict[str, FailedLogins] = OrderedDict()

    def count_failure(self, name: str, web: WebSection, now: datetime) -> FailedLogins:
        key = sha256(name)
        with self._lock:
            failed = self._failed.pop(key, NO_FAILURES).after_failure(web, now)
            self._failed[key] = failed
            if len(self._failed) > self.MAX_NAMES:
                self._failed.popitem(last=False)
            return failed


class AddressThrottle:
    """Failed logins per client address over the last login_lockout_minutes: an address with login_address_limit of
    them is refused, before any password is checked or any name counted, until the oldest of them is that old. Set
    below login_lockout_after, one address alone cannot lock a user out. In memory; addresses with no failure in
    the window are forgotten."""

    def __init__(self, web: WebSection) -> None:
        self._limit = web.login_address_limit
        self._window = timedelta(minutes=web.login_lockout_minutes)
        self._lock = threading.Lock()
        # The latest `_limit` failures of each address; the address whose latest failure is oldest first.
        self._failures: OrderedDict[str, deque[datetime]] = OrderedDict()

    def refused_until(self, address: str, now: datetime) -> datetime | None:
        with self._lock:
            while self._failures and next(iter(self._failures.values()))[-1] <= now - self._window:
                self._failures.popitem(last=False)
            failures = self._failures.get(address)
            if failures is None or len(failures) < self._limit or failures[0] <= now - self._window:
                return None
            return failures[0] + self._window

    def count_failure(self, address: str, now: datetime) -> None:
        with self._lock:
            failures = self._failures.pop(address, None) or deque(maxlen=self._limit)
            failures.append(now)
            self._failures[address] = failures


def _failed_logins_of(engine: Engine, user_id: int) -> FailedLogins:
    with Session(engine) as session:
        row = session.execute(select(User.failed_logins, User.locked_until).where(User.id == user_id)).one()
    return FailedLogins(row.failed_logins, row.locked_until)


def _count_user_failure(engine: Engine, user_id: int, web: WebSection, now: datetime) -> FailedLogins:
    """`FailedLogins.after_failure` as one UPDATE, its result read back: concurrent failures each count (no
    read-modify-write to lose one), and the lock is decided on the count the database holds."""
    count = User.failed_logins + 1
    unlocked = or_(User.locked_until.is_(None), User.locked_until <= now)
    lock_end = literal(now + timedelta(minutes=web.login_lockout_minutes), User.locked_until.type)
    with Session(engine) as session, session.begin():
        row = session.execute(
            update(User).where(User.id == user_id)
            .values(failed_logins=count, locked_until=case((and_(count >= web.login_lockout_after, unlocked), lock_end),
                                                           else_=User.locked_until))
            .returning(User.failed_logins, User.locked_until)
            .execution_options(synchronize_session=False)
        ).one()
    return FailedLogins(row.failed_logins, row.locked_until)


def _open_session(engine: Engine, user_id: int, checked_hash: str, password: str, address: str,
                  now: datetime) -> LoginResult | None:
    """A new session, if the user is at this moment unlocked, enabled and still has the password just checked: the
    count is reset in the same UPDATE that decides, so no failure counted meanwhile is lost and no lock is passed
    by. None when one of them no longer holds."""
    with Session(engine) as session, session.begin():
        opened = session.execute(
            update(User).where(User.id == user_id, User.password_hash == checked_hash, User.disabled.is_(False),
                               or_(User.locked_until.is_(None), User.locked_until <= now))
            .values(failed_logins=0, locked_until=None)
            .execution_options(synchronize_session=False)
        ).rowcount
        if opened != 1:
            return None
        user = session.get(User, user_id)
        if _HASHER.check_needs_rehash(user.password_hash):
            user.password_hash = _HASHER.hash(password)
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        row = WebSession(token_sha256=sha256(token), user=user, csrf_token=csrf, address=address[:64], created_at=now,
                         last_seen_at=now)
        session.add(row)
        session.flush()
        return LoginResult(_identity(user, csrf, row.id), token, 0.0, "")


class Logins:
    """Logging in: the per-address throttle first, then the password under each name's slowdown and lockout. Every
    try past the throttle costs one argon2 check, a name that is no user's included (against a dummy hash), and a
    wrong password counts during a lock too: so the work, the count and the answers never tell a user's name from
    another. One per web app: the throttle and the unknown names' failures live here."""

    def __init__(self, engine: Engine, web: WebSection, clock: Clock = utcnow) -> None:
        self._engine = engine
        self._web = web
        self._clock = clock
        self._addresses = AddressThrottle(web)
        self._unknown_names = UnknownNames()

    def log_in(self, username: str, password: str, address: str) -> LoginResult:
        """On success a new session; else the refusal, which the caller waits `delay_seconds` before giving."""
        now = self._clock()
        if (until := self._addresses.refused_until(address, now)) is not None:
            return LoginResult(None, None, 0.0, f"too many failed logins from this address: try again after "
                                                f"{until:%H:%M} UTC", address_throttled=True)
        with Session(self._engine) as session:
            user = session.execute(select(User.id, User.password_hash, User.disabled)
                                   .where(User.username == username)).one_or_none()
        right = _verify(user.password_hash if user is not None else _UNKNOWN_USER_HASH, password)
        if right and user is not None and not user.disabled:
            if (opened := _open_session(self._engine, user.id, user.password_hash, password, address, now)) is not None:
                return opened
            failed = _failed_logins_of(self._engine, user.id)
            if not failed.locked(now):  # disabled or given a new password since the check: as a wrong one
                failed = _count_user_failure(self._engine, user.id, self._web, now)
            # else the right password, refused by the lock: not counted as a wrong one
        elif user is not None:
            failed = _count_user_failure(self._engine, user.id, self._web, now)
        else:
            failed = self._unknown_names.count_failure(username, self._web, now)
        self._addresses.count_failure(address, now)
        return failed.refusal(self._web, now)


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
