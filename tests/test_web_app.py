"""The web app in-process (Starlette's TestClient over the real app, a real database, real argon2,
real DICOM files): the security rules that need no browser. The tests on the `site` fixture run on
SQLite and on PostgreSQL; the others, whose subject is not the database, on SQLite only. The
browser tests against a real `rtnode serve` are in test_web_browser.py."""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from PIL import Image
from pydicom import dcmread
from sqlalchemy import create_engine, func, select, update
from sqlalchemy.orm import Session

from node.config import parse_config
from node.db.engine import open_database
from node.db.models import AuditEvent, Delivery, Instance, Job, JobEvent, Series, Study, User, WorkerRecord, utcnow
from node.harness import LOOPBACK, destination_toml, free_port, wait_for_port
from node.imaging.volume import load_series_dir
from node.lifecycle.workers import WorkerIdentity, heartbeat, register_worker, report_unusable_model
from node.outputs import FoundStructure, OutputPaths, write_structure_set
from node.pipeline.structures import LabelMap, Structure
from node.rtstruct.builder import Algorithm
from node.scp import StorageSCP
from node.service import WebProcess
from node.store import InstanceStore
from node.synth.ct_series import PatientStudy, SeriesGeometry, ct_datasets, uniform_positions, write_series
from node.web.accounts import Role, add_user, create_api_token
from node.web.app import create_app
from tests.conftest import REPO, require_tool

PASSWORD = "correct-horse-1"
TEMPLATES = REPO / "node" / "web" / "templates"


FAILED_LOGINS = "login_slowdown_after = 2\nlogin_lockout_after = 4\n"


def config_text(root: Path, web: str = "", tls: bool = False, database_url: str | None = None, node: str = "",
                failed_logins: str = FAILED_LOGINS, destinations: str = "") -> str:
    """The TOML of a configuration under `root`; its database is `database_url`, else SQLite in the data directory."""
    tls_keys = f'certificate = "{root / "web.crt"}"\nprivate_key = "{root / "web.key"}"\n' if tls else ""
    database = f'database_url = "{database_url}"\n' if database_url else ""
    return (
        f'[node]\ndata_dir = "{root / "data"}"\n{database}fsync = false\n{node}\n[completion]\nmin_slices = 10\n'
        f"[web]\n{failed_logins}{tls_keys}{web}\n{destinations}"
    )


def make_config(root: Path, web: str = "", tls: bool = False, database_url: str | None = None, node: str = "",
                failed_logins: str = FAILED_LOGINS, destinations: str = ""):
    return parse_config(config_text(root, web, tls, database_url, node, failed_logins, destinations))


@pytest.fixture
def site(tmp_path, database_url, engine):
    """A configuration and its migrated database (SQLite, PostgreSQL) with one user per role."""
    config = make_config(tmp_path, database_url=database_url)
    for role in Role:
        add_user(engine, role.value, role, PASSWORD)
    return config, engine


class FakeClock:
    """The web app's clock, moved by the test: session ages and lockouts reach their limits exactly, without sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def client(config, engine, https: bool = False, clock=utcnow) -> TestClient:
    """A browser on the node's machine: it names the web app `localhost`, one of the default web.allowed_hosts."""
    return TestClient(
        create_app(config, engine, clock), base_url="https://localhost" if https else "http://localhost",
        follow_redirects=False,
    )


def logged_in(config, engine, username: str, https: bool = False, clock=utcnow,
              password: str = PASSWORD) -> tuple[TestClient, str]:
    """A client with a session, and the session's CSRF token read from the page as a browser would."""
    web = client(config, engine, https, clock)
    response = web.post("/login", data={"username": username, "password": password})
    assert response.status_code == 303, response.text
    page = web.get("/").text
    return web, re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def small_series(directory: Path, slices: int = 12, patient: PatientStudy | None = None) -> list[Path]:
    hu = np.full((slices, 32, 32), -1000, dtype=np.int16)
    hu[:, 8:24, 8:24] = 40
    geometry = SeriesGeometry(pixel_spacing=(1.0, 1.0), slice_positions=uniform_positions(slices, 2.5))
    return write_series(ct_datasets(hu, geometry, patient or PatientStudy()), directory)


def zipped(paths: list[Path]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in paths:
            archive.write(path, f"CD/DICOM/{path.name}")
    return buffer.getvalue()


def audit_actions(engine) -> list[tuple[str, str]]:
    with Session(engine) as session:
        return [(e.username, e.action) for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]


def test_plain_http_beyond_loopback_is_refused_at_start_up_unless_insecure_http(tmp_path):
    assert make_config(tmp_path).web.refusal() is None  # loopback by default
    assert make_config(tmp_path, 'host = "::1"').web.refusal() is None
    refusal = make_config(tmp_path, 'host = "0.0.0.0"').web.refusal()
    assert refusal and "insecure_http" in refusal and "certificate" in refusal
    assert make_config(tmp_path, 'host = "0.0.0.0"', tls=True).web.refusal() is None
    insecure = make_config(tmp_path, 'host = "0.0.0.0"\ninsecure_http = true').web
    assert insecure.refusal() is None and "plain HTTP" in insecure.warning()

    config_path = tmp_path / "node.toml"
    config_path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\nport = 11999\n[web]\nhost = "0.0.0.0"\n')
    result = subprocess.run(
        [sys.executable, "-m", "node", "--config", str(config_path), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "web.host = '0.0.0.0' is not a loopback address" in result.stderr


def test_users_from_the_command_line_with_argon2_hashes(tmp_path):
    config_path = tmp_path / "node.toml"
    config_path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n')

    def rtnode(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "node", "--config", str(config_path), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert rtnode("user", "add", "alice", "--role", "dosimetrist", stdin=PASSWORD + "\n").returncode == 0
    assert rtnode("user", "add", "alice", "--role", "viewer", stdin=PASSWORD + "\n").returncode == 2  # exists
    assert "role 'boss'" in rtnode("user", "add", "bob", "--role", "boss", stdin=PASSWORD + "\n").stderr
    assert "at least 8" in rtnode("user", "add", "bob", "--role", "viewer", stdin="short\n").stderr
    token = rtnode("token", "create", "alice")
    assert token.returncode == 0 and token.stdout.strip().startswith("rtn_")

    config = parse_config(config_path.read_text())
    engine = open_database(config.node.database_url, fsync=False)
    with Session(engine) as session:
        user = session.scalars(select(User)).one()
    assert user.password_hash.startswith("$argon2id$") and PASSWORD not in user.password_hash
    api = client(config, engine)
    bearer = {"Authorization": f"Bearer {token.stdout.strip()}"}
    assert api.get("/api/jobs", headers=bearer).status_code == 200

    assert rtnode("user", "passwd", "alice", stdin="another-pass-2\n").returncode == 0
    assert client(config, engine).post("/login", data={"username": "alice", "password": PASSWORD}).status_code == 401
    assert client(config, engine).post("/login", data={"username": "alice", "password": "another-pass-2"}).status_code == 303
    assert rtnode("user", "disable", "alice").returncode == 0
    assert client(config, engine).post("/login", data={"username": "alice", "password": "another-pass-2"}).status_code == 401
    assert api.get("/api/jobs", headers=bearer).status_code == 401  # a disabled user's tokens end with it


def configured(root: Path, failed_logins: str = FAILED_LOGINS) -> tuple[Path, object, object]:
    """A configuration file (for the command line), the configuration and its migrated database."""
    config_path = root / "node.toml"
    config_path.write_text(config_text(root, failed_logins=failed_logins))
    config = parse_config(config_path.read_text())
    return config_path, config, open_database(config.node.database_url, fsync=False)


def rtnode_cli(config_path: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """The `rtnode` command in its own process, as an admin runs it beside the web app."""
    result = subprocess.run([sys.executable, "-m", "node", "--config", str(config_path), *args], input=stdin,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def refused(web: TestClient) -> bool:
    """The client's session is over: the pages send it to the login, the API answers 401."""
    page, api = web.get("/"), web.get("/api/jobs")
    return page.status_code == 303 and page.headers["location"].startswith("/login") and api.status_code == 401


# Two failures lock an account, without the slowdown's waiting.
LOCK_AT_TWO = "login_slowdown_after = 5\nlogin_lockout_after = 2\n"


def test_user_passwd_ends_every_session_of_the_user_and_lifts_the_lockout(tmp_path):
    config_path, config, engine = configured(tmp_path, LOCK_AT_TWO)
    add_user(engine, "alice", Role.DOSIMETRIST, PASSWORD)
    add_user(engine, "bob", Role.VIEWER, PASSWORD)
    sessions = [logged_in(config, engine, "alice")[0] for _ in range(2)]  # two browsers
    bystander, _ = logged_in(config, engine, "bob")
    anonymous = client(config, engine)
    for _ in range(2):
        assert anonymous.post("/login", data={"username": "alice", "password": "a-guess-123"}).status_code == 401
    assert "locked until" in anonymous.post("/login", data={"username": "alice", "password": PASSWORD}).text
    assert [refused(web) for web in sessions] == [False, False]  # a lockout stops logins, not the sessions

    rtnode_cli(config_path, "user", "passwd", "alice", stdin="another-pass-2\n")
    assert [refused(web) for web in sessions] == [True, True]
    assert bystander.get("/").status_code == 200  # another user's session goes on
    logged_in(config, engine, "alice", password="another-pass-2")  # at once: the lockout is lifted
    wrong = anonymous.post("/login", data={"username": "alice", "password": PASSWORD})
    assert wrong.status_code == 401 and "wrong user name or password" in wrong.text


def test_a_lockout_ends_login_lockout_minutes_after_it_began(tmp_path):
    _, config, engine = configured(tmp_path, LOCK_AT_TWO)  # login_lockout_minutes = 15
    add_user(engine, "alice", Role.DOSIMETRIST, PASSWORD)
    clock = FakeClock()
    web = client(config, engine, clock=clock)
    for _ in range(2):
        web.post("/login", data={"username": "alice", "password": "a-guess-123"})
    clock.advance(minutes=15, microseconds=-1)
    assert "locked until 08:15 UTC" in web.post("/login", data={"username": "alice", "password": PASSWORD}).text
    clock.advance(microseconds=1)
    logged_in(config, engine, "alice", clock=clock)


def test_user_disable_ends_the_sessions_and_tokens_and_refuses_logins(tmp_path):
    config_path, config, engine = configured(tmp_path)
    add_user(engine, "alice", Role.DOSIMETRIST, PASSWORD)
    add_user(engine, "bob", Role.VIEWER, PASSWORD)
    sessions = [logged_in(config, engine, "alice")[0] for _ in range(2)]
    bystander, _ = logged_in(config, engine, "bob")
    bearer = {"Authorization": f"Bearer {create_api_token(engine, 'alice')}"}
    assert client(config, engine).get("/api/jobs", headers=bearer).status_code == 200

    rtnode_cli(config_path, "user", "disable", "alice")
    assert [refused(web) for web in sessions] == [True, True]
    assert client(config, engine).get("/api/jobs", headers=bearer).status_code == 401
    login = client(config, engine).post("/login", data={"username": "alice", "password": PASSWORD})
    assert login.status_code == 401 and "rtnode_session" not in login.headers.get("set-cookie", "")
    assert bystander.get("/").status_code == 200


def test_every_page_needs_a_login_and_the_api_answers_401(site):
    config, engine = site
    anonymous = client(config, engine)
    for page in ("/", "/studies", "/upload", "/audit", "/jobs/1", "/jobs/1/viewer"):
        response = anonymous.get(page)
        assert response.status_code == 303 and response.headers["location"].startswith("/login"), page
    for path in (
        "/api/",
        "/api/jobs",
        "/api/jobs/1",
        "/api/jobs/1/files/rtstruct",
        "/api/studies",
        "/api/dashboard",
        "/api/jobs/1/slices",
        "/api/jobs/1/slices/0.png",
    ):
        assert anonymous.get(path).status_code == 401, path
    assert anonymous.get("/api/jobs", headers={"Authorization": "Bearer rtn_made-up"}).status_code == 401
    assert anonymous.get("/login?next=//evil.example/").text.count('value="/"') == 1  # no open redirect


HEALTH_CHECKS = {"scp", "worker", "database", "disk", "destinations"}
TPS = destination_toml("tps", "TPS", 11113)


@dataclass
class Monitored:
    """What /healthz looks at, each part real: the SCP listening in this process on the configured port, a worker
    registered (its heartbeat is now), the database, data_dir."""

    root: Path
    config: object
    engine: object
    scp: StorageSCP
    worker: WorkerIdentity

    @property
    def scp_address(self) -> str:
        return f"{LOOPBACK}:{self.config.node.port}"

    def healthz(self, web: str = "", engine=None, destinations: str = TPS) -> tuple[int, dict]:
        """/healthz without a login, from the web app on this node's configuration (more [web] keys) and database."""
        node = f'host = "{LOOPBACK}"\nport = {self.config.node.port}'
        config = make_config(self.root, web, node=node, destinations=destinations)
        response = client(config, engine or self.engine).get("/healthz")
        return response.status_code, response.json()


@pytest.fixture
def monitored(tmp_path):
    port = free_port()
    config = make_config(tmp_path, node=f'host = "{LOOPBACK}"\nport = {port}')
    engine = open_database(config.node.database_url, fsync=False)
    scp = StorageSCP(config, InstanceStore(engine, config.incoming_dir, fsync=False))
    scp.start()
    worker = WorkerIdentity.this_process("cpu")
    register_worker(engine, worker)
    yield Monitored(tmp_path, config, engine, scp, worker)
    scp.stop(grace_seconds=0)
    engine.dispose()


def failing_checks(status_code: int, body: dict) -> set[str]:
    """The names of the checks that failed, once the answer is shown to be 503 "unhealthy" with all five checks."""
    assert set(body["checks"]) == HEALTH_CHECKS, body
    assert (status_code, body["status"]) == (503, "unhealthy"), body
    return {name for name, check in body["checks"].items() if not check["ok"]}


def test_healthz_answers_200_ok_when_all_five_checks_pass(monitored):
    status_code, body = monitored.healthz()
    assert (status_code, body["status"]) == (200, "ok"), body
    checks = body["checks"]
    assert set(checks) == HEALTH_CHECKS and all(check["ok"] for check in checks.values()), body
    assert checks["scp"]["detail"] == f"listening on {monitored.scp_address}"
    assert re.fullmatch(rf"{re.escape(monitored.worker.name)} on cpu, heartbeat \d+ s ago, idle", checks["worker"]["detail"])
    assert checks["database"]["detail"] == "reachable"
    assert re.fullmatch(r"\d+\.\d GB free under data_dir \(minimum 1 GB\)", checks["disk"]["detail"])
    assert checks["destinations"]["detail"] == "tps"


def test_healthz_is_503_without_destinations(monitored):
    status_code, body = monitored.healthz(destinations="")
    assert failing_checks(status_code, body) == {"destinations"}
    assert body["checks"]["destinations"]["detail"] == "none configured: jobs are contoured and end done, but nothing is sent"


def test_healthz_is_503_when_the_scp_does_not_listen(monitored):
    monitored.scp.stop(grace_seconds=0)
    status_code, body = monitored.healthz()
    assert failing_checks(status_code, body) == {"scp"}
    assert body["checks"]["scp"]["detail"].startswith(f"nothing answers on {monitored.scp_address}: ")


def test_healthz_is_503_when_the_workers_heartbeat_is_stale(monitored):
    with Session(monitored.engine) as session, session.begin():  # the worker last beat ten minutes ago
        session.execute(update(WorkerRecord).values(heartbeat_at=utcnow() - timedelta(minutes=10)))
    status_code, body = monitored.healthz()
    assert failing_checks(status_code, body) == {"worker"}
    assert re.fullmatch(r"last heartbeat 60\d s ago \(limit 60 s\)", body["checks"]["worker"]["detail"])
    # The same heartbeat within a longer limit is recent enough.
    assert monitored.healthz("max_heartbeat_age_seconds = 900")[0] == 200


def test_healthz_is_503_when_no_worker_beats(monitored):
    heartbeat(monitored.engine, monitored.worker, lease_seconds=60, stopped=True)  # as the worker does when it stops
    status_code, body = monitored.healthz()
    assert failing_checks(status_code, body) == {"worker"}
    assert body["checks"]["worker"]["detail"] == "no worker has reported a heartbeat"


def test_healthz_is_503_when_no_worker_can_use_its_model(monitored):
    report_unusable_model(monitored.engine, monitored.worker, "the model cannot be used: weights do not match their card")
    status_code, body = monitored.healthz()
    assert failing_checks(status_code, body) == {"worker"}
    detail = f"no worker takes jobs: {monitored.worker.name}: the model cannot be used: weights do not match their card"
    assert body["checks"]["worker"]["detail"] == detail


def test_healthz_is_503_when_the_database_is_unreachable(monitored):
    nowhere = create_engine(f"postgresql+psycopg://rtnode@{LOOPBACK}:{free_port()}/rtnode")  # no server on that port
    status_code, body = monitored.healthz(engine=nowhere)
    assert failing_checks(status_code, body) == {"database", "worker"}
    assert body["checks"]["database"]["detail"] == "unreachable: OperationalError"
    assert body["checks"]["worker"]["detail"] == "unknown: no database"


def test_healthz_is_503_when_data_dir_has_too_little_free_disk(monitored):
    minimum = math.ceil(2 * shutil.disk_usage(monitored.config.node.data_dir).free / 1e9)  # twice what the disk has
    status_code, body = monitored.healthz(f"min_free_disk_gb = {minimum}")
    assert failing_checks(status_code, body) == {"disk"}
    assert re.fullmatch(rf"\d+\.\d GB free under data_dir \(minimum {minimum} GB\)", body["checks"]["disk"]["detail"])


def test_cookie_flags_and_security_headers(site):
    config, engine = site
    web = client(config, engine)
    response = web.post("/login", data={"username": "admin", "password": PASSWORD})
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    page = web.get("/")
    assert page.headers["content-security-policy"].startswith("default-src 'self'; script-src 'self';")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    assert not re.search(r"<script(?![^>]*\bsrc=)", page.text), "inline script"
    assert web.get("/static/app.css").headers.get("cache-control") != "no-store"

    tls_config = make_config(Path(config.node.data_dir).parent, tls=True, database_url=config.node.database_url)
    secure = client(tls_config, engine, https=True).post("/login", data={"username": "admin", "password": PASSWORD})
    assert "Secure" in secure.headers["set-cookie"] and "HttpOnly" in secure.headers["set-cookie"]


def test_no_template_marks_text_safe():
    for template in TEMPLATES.glob("*.html"):
        text = template.read_text()
        assert "|safe" not in text.replace(" ", "") and "autoescape false" not in text, template.name
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), f"inline script in {template.name}"
        assert not re.search(r"\son[a-z]+=", text), f"inline event handler in {template.name}"


# DICOM text, names and queries that would run if a page ever took them for markup.
XSS_PATIENT = "<script>alert(1)</script>"
XSS_SERIES = "<img src=x onerror=alert(2)>"
XSS_USER = '"><svg onload=alert(3)>'
XSS_FILE = "<iframe src=javascript:alert(4)>.dcm"
XSS_QUERY = "'><script>alert(5)</script>"


class PageParts(HTMLParser):
    """A page taken apart as a browser would: its text (what a person reads), and whatever in its markup could run
    script: a <script> without src, an on* attribute, a javascript: URL."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.runnable: list[str] = []
        self._text: list[str] = []
        self._inside_script = False
        self.feed(html)
        self.close()

    @property
    def text(self) -> str:
        return "".join(self._text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self._inside_script = True
            if not dict(attrs).get("src"):
                self.runnable.append("a <script> without src")
        for name, value in attrs:
            if name.startswith("on"):
                self.runnable.append(f"<{tag} {name}={value!r}>")
            if value and value.strip().lower().startswith("javascript:"):
                self.runnable.append(f"<{tag} {name}={value!r}>")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._inside_script = False

    def handle_data(self, data: str) -> None:
        if not self._inside_script:
            self._text.append(data)


def html_page_routes(app) -> set[str]:
    """The path of every page the app serves as HTML (its included routers walked as FastAPI flattens them)."""
    return {context.path for context in iter_route_contexts(app.routes)
            if isinstance(route := context.original_route, APIRoute) and "GET" in route.methods
            and route.response_class is HTMLResponse}


# The first route passes the series over, quoting its description; the second takes it.
ROUTES = '[[routes]]\nname = "pelvis"\n[routes.match]\nseries_description = "^pelvis"\n[[routes]]\nname = "any-ct"\n'
PASSED_OVER = f"pelvis: SeriesDescription '{XSS_SERIES}' does not match /^pelvis/."


def test_every_page_shows_dicom_text_as_text_and_holds_no_inline_script(tmp_path):
    config = make_config(tmp_path, destinations=ROUTES)
    engine = open_database(config.node.database_url, fsync=False)
    add_user(engine, "ada", Role.ADMIN, PASSWORD)
    add_user(engine, "vic", Role.VIEWER, PASSWORD)
    anonymous = client(config, engine)
    failed = anonymous.post("/login", data={"username": XSS_USER, "password": "wrong-password"})  # into the audit trail
    admin, csrf = logged_in(config, engine, "ada")
    paths = small_series(tmp_path / "ct", patient=PatientStudy(patient_name=XSS_PATIENT, series_description=XSS_SERIES))
    upload = admin.post("/api/upload", files=[("files", ("cd.zip", zipped(paths)))], headers={"X-CSRF-Token": csrf})
    (job_id,) = [series["job_id"] for series in upload.json()["series"]]
    viewer, _ = logged_in(config, engine, "vic")

    # (the route, the answer, the text it must show as text)
    pages = [
        ("/login", anonymous.get("/login?next=/studies"), ()),
        ("/login", failed, ()),
        ("/", admin.get("/"), (XSS_PATIENT, XSS_SERIES)),
        ("/", admin.get("/", params={"text": XSS_QUERY, "patient": XSS_QUERY}), ()),
        ("/jobs/{job_id}", admin.get(f"/jobs/{job_id}"), (XSS_PATIENT, XSS_SERIES)),
        ("/jobs/{job_id}/viewer", admin.get(f"/jobs/{job_id}/viewer"), ()),
        ("/studies", admin.get("/studies"), (XSS_PATIENT, XSS_SERIES, "any-ct", PASSED_OVER)),
        ("/upload", admin.get("/upload"), ()),
        ("/upload", admin.post("/upload", files=[("files", (XSS_FILE, b"not DICOM"))], data={"csrf_token": csrf}),
         (XSS_FILE,)),
        ("/audit", admin.get("/audit"), (XSS_USER,)),
        ("/commissioning", admin.get("/commissioning"), ()),
        ("/commissioning/reports/{report_id}", admin.get("/commissioning/reports/0123456789abcdef"), ()),
        ("/api/", admin.get("/api/"), ()),
        ("an error page", admin.get("/jobs/999999"), ()),
        ("an error page", viewer.get("/audit"), ()),
    ]
    assert {route for route, _, _ in pages} - {"an error page"} == html_page_routes(anonymous.app)  # every page
    for route, response, shown in pages:
        assert response.headers["content-type"].startswith("text/html"), (route, response.status_code)
        parts = PageParts(response.text)
        assert parts.runnable == [], (route, parts.runnable)
        for text in shown:
            assert text in parts.text, (route, text)
    assert [response.status_code for route, response, _ in pages if route == "an error page"] == [404, 403]


def test_a_session_ends_after_session_idle_minutes_without_a_request(site):
    config, engine = site  # session_idle_minutes = 30
    clock = FakeClock()
    web, _ = logged_in(config, engine, "dosimetrist", clock=clock)
    clock.advance(minutes=30)
    assert web.get("/").status_code == 200  # idle exactly the limit: still alive, and this request counts
    clock.advance(minutes=20)
    assert web.get("/api/dashboard").status_code == 200  # the dashboard's own polling: served, but not activity
    clock.advance(minutes=10, microseconds=1)
    assert web.get("/").status_code == 303 and web.get("/").headers["location"] == "/login?next=%2F"
    assert web.get("/api/jobs").status_code == 401
    assert web.get("/api/dashboard").status_code == 401


def test_a_session_ends_session_max_hours_after_the_login_however_busy(site):
    config, engine = site  # session_max_hours = 12, session_idle_minutes = 30
    clock = FakeClock()
    web, _ = logged_in(config, engine, "viewer", clock=clock)
    for _ in range(24):  # a request every half hour: never idle too long
        clock.advance(minutes=30)
        assert web.get("/studies").status_code == 200
    # Twelve hours after the login, to the microsecond: still alive; one microsecond later, ended.
    clock.advance(microseconds=1)
    assert web.get("/studies").status_code == 303
    assert web.get("/api/studies").status_code == 401
    other, _ = logged_in(config, engine, "viewer", clock=clock)  # a new login starts a new twelve hours
    assert other.get("/studies").status_code == 200


def test_a_session_ends_at_logout(tmp_path):
    config = make_config(tmp_path)
    engine = open_database(config.node.database_url, fsync=False)
    add_user(engine, "dora", Role.DOSIMETRIST, PASSWORD)
    web, csrf = logged_in(config, engine, "dora")
    assert web.post("/logout").status_code == 403  # no CSRF token
    assert web.post("/logout", data={"csrf_token": csrf}).status_code == 303
    assert web.get("/").status_code == 303


def test_failed_logins_are_slowed_then_locked(site):
    config, engine = site
    config = make_config(config.node.data_dir.parent, "login_address_limit = 100", database_url=config.node.database_url)
    web = client(config, engine)  # every login from one address, which this test lets go on failing
    timings = []
    for _ in range(3):
        start = time.monotonic()
        response = web.post("/login", data={"username": "viewer", "password": "wrong-password"})
        timings.append(time.monotonic() - start)
        assert response.status_code == 401 and "wrong user name or password" in response.text
    assert timings[0] < 0.9 and timings[1] < 0.9 and timings[2] >= 0.9  # beyond 2 failures, a second more each
    locked = web.post("/login", data={"username": "viewer", "password": "wrong-password"})
    assert "locked until" in locked.text
    assert "locked until" in web.post("/login", data={"username": "viewer", "password": PASSWORD}).text
    assert ("viewer", "login failed") in audit_actions(engine)


def test_login_posted_from_another_site_is_refused(site):
    config, engine = site
    response = client(config, engine).post(
        "/login", data={"username": "admin", "password": PASSWORD}, headers={"Origin": "https://evil.example"}
    )
    assert response.status_code == 403


def add_job(engine, outputs: dict, patient_id: str = "P1") -> int:
    with Session(engine) as session, session.begin():
        study = Study(study_instance_uid="1.2.3", patient_id=patient_id, patient_name="Doe^Jane")
        series = Series(series_instance_uid="1.2.3.4", study=study, modality="CT")
        job = Job(series=series, version=1, status="done", inputs_at=utcnow(), created_at=utcnow(), outputs=outputs)
        session.add(job)
        session.flush()
        return job.id


def test_downloads_only_what_the_job_recorded_under_its_folder(site, tmp_path):
    config, engine = site
    jobs_dir = config.jobs_dir / "1"
    jobs_dir.mkdir(parents=True)
    (jobs_dir / "rtstruct.dcm").write_bytes(b"structure set bytes")
    outside = tmp_path / "secret.txt"
    outside.write_text("not for download")
    job_id = add_job(engine, {"rtstruct": str(jobs_dir / "rtstruct.dcm"), "qa": str(outside)})
    web, _ = logged_in(config, engine, "viewer")
    response = web.get(f"/api/jobs/{job_id}/files/rtstruct")
    assert response.status_code == 200 and response.content == b"structure set bytes"
    assert response.headers["content-type"] == "application/dicom"
    assert web.get(f"/api/jobs/{job_id}/files/qa").status_code == 404  # recorded, but outside the jobs folder
    assert web.get(f"/api/jobs/{job_id}/files/mask").status_code == 404  # not made
    # (httpx resolves a literal ../ before sending; test_web_browser.py sends it raw to a real server.)
    for hostile in ("..%2F..%2Fnode.toml", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "rtstruct%00", "rtstruct%2F..%2F..%2Fsecret.txt"):
        response = web.get(f"/api/jobs/{job_id}/files/{hostile}")
        assert response.status_code == 404 and b"root:" not in response.content, hostile
    assert ("viewer", "download") in audit_actions(engine)
    with Session(engine) as session:
        assert session.scalar(select(AuditEvent.patient_id).where(AuditEvent.action == "download")) == "P1"


def test_the_viewer_shows_every_structure_of_the_sent_set_though_the_job_names_none(tmp_path):
    """A job whose record names no structure (as every job before several structures) is viewed from
    its RT Structure Set: each ROI with its colour and slices, its outlines, the reformats without the
    hidden ones; the view audited."""
    config = make_config(tmp_path)
    engine = open_database(config.node.database_url, fsync=False)
    add_user(engine, "vic", Role.VIEWER, PASSWORD)
    add_user(engine, "ada", Role.ADMIN, PASSWORD)
    admin, csrf = logged_in(config, engine, "ada")
    paths = small_series(tmp_path / "ct")
    upload = admin.post("/api/upload", files=[("files", ("cd.zip", zipped(paths)))], headers={"X-CSRF-Token": csrf})
    (job_id,) = [series["job_id"] for series in upload.json()["series"]]
    volume = load_series_dir(tmp_path / "ct")
    boxes = {"CTV": (slice(2, 8), (255, 0, 128)), "Bladder": (slice(5, 10), (0, 255, 0)), "Rectum": (slice(6, 11), (0, 0, 255))}
    found = []
    for name, (slices, color) in boxes.items():
        mask = np.zeros(volume.shape, dtype=np.uint8)
        mask[slices, 10:22, 10:22] = 1
        found.append(FoundStructure(Structure(1, name, "ORGAN", color), Algorithm("oar", "1"), LabelMap(mask)))
    rtstruct = config.jobs_dir / str(job_id) / "rtstruct.dcm"
    rtstruct.parent.mkdir(parents=True)
    write_structure_set(volume, found, OutputPaths(rtstruct=rtstruct))
    with Session(engine) as session, session.begin():
        session.execute(update(Job).where(Job.id == job_id).values(outputs={"rtstruct": str(rtstruct)}))
    viewer, _ = logged_in(config, engine, "vic")
    assert viewer.get(f"/api/jobs/{job_id}").json()["structures"] == []

    info = viewer.get(f"/api/jobs/{job_id}/slices").json()
    assert [(s["roi_name"], s["color"], s["first_contour_slice"], s["last_contour_slice"]) for s in info["structures"]] == [
        ("CTV", [255, 0, 128], 2, 7), ("Bladder", [0, 255, 0], 5, 9), ("Rectum", [0, 0, 255], 6, 10)
    ]
    outline = viewer.get(f"/api/jobs/{job_id}/slices/6/outline").json()
    assert [drawn["structure"] for drawn in outline["structures"]] == [0, 1, 2]

    def colours(response: httpx.Response) -> set[tuple[int, int, int]]:
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        pixels = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).reshape(-1, 3)
        return {tuple(int(v) for v in pixel) for pixel in np.unique(pixels, axis=0) if len(set(pixel)) > 1}

    reformat = f"/api/jobs/{job_id}/reformat/coronal.png"
    assert colours(viewer.get(reformat)) <= {(255, 0, 128), (0, 255, 0), (0, 0, 255)}
    assert (0, 0, 255) in colours(viewer.get(reformat))  # the last drawn over the others where they meet
    assert colours(viewer.get(reformat, params=[("hide", 2)])) == {(255, 0, 128), (0, 255, 0)}
    assert colours(viewer.get(reformat, params=[("hide", 0), ("hide", 1), ("hide", 2)])) == set()
    assert viewer.get(reformat, params={"hide": 3}).status_code == 404
    with Session(engine) as session:
        viewed = session.scalars(select(AuditEvent.target).where(AuditEvent.username == "vic", AuditEvent.action == "view"))
        assert f"slices of job {job_id}" in viewed.all()


def test_roles_and_csrf_guard_every_change(site):
    config, engine = site
    job_id = add_job(engine, {})
    viewer, viewer_csrf = logged_in(config, engine, "viewer")
    assert viewer.get("/upload").status_code == 403
    assert viewer.post(f"/jobs/{job_id}/resend", data={"csrf_token": viewer_csrf}).status_code == 403
    assert viewer.post("/api/upload", files={"files": ("a.dcm", b"x")}, headers={"X-CSRF-Token": viewer_csrf}).status_code == 403
    assert ">Upload<" not in viewer.get("/").text

    dosimetrist, csrf = logged_in(config, engine, "dosimetrist")
    assert dosimetrist.post(f"/api/jobs/{job_id}/resend").status_code == 403  # no CSRF token
    assert dosimetrist.post(f"/api/jobs/{job_id}/resend", headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert dosimetrist.post("/api/upload", files={"files": ("a.dcm", b"x")}).status_code == 403
    # With the token the request gets through to the job itself (no destinations here: said so).
    allowed = dosimetrist.post(f"/api/jobs/{job_id}/resend", headers={"X-CSRF-Token": csrf})
    assert allowed.status_code == 400 and "no destinations" in allowed.json()["detail"]
    # An API token needs no CSRF token: a foreign page cannot set the Authorization header.
    token = create_api_token(engine, "dosimetrist")
    bearer = {"Authorization": f"Bearer {token}"}
    assert client(config, engine).post(f"/api/jobs/{job_id}/resend", headers=bearer).status_code == 400
    assert ("viewer", "refused") in audit_actions(engine)


def test_audit_page_is_for_admins(site):
    config, engine = site
    dosimetrist, _ = logged_in(config, engine, "dosimetrist")
    assert dosimetrist.get("/audit").status_code == 403
    admin, _ = logged_in(config, engine, "admin")
    page = admin.get("/audit")
    assert page.status_code == 200 and "login" in page.text and "dosimetrist" in page.text


def test_upload_stores_like_c_store_and_submits_the_series(site, tmp_path):
    config, engine = site
    web, csrf = logged_in(config, engine, "dosimetrist")
    paths = small_series(tmp_path / "ct")
    archive = zipped(paths)
    files = [("files", ("cd.zip", archive, "application/zip")), ("files", ("notes.txt", b"not dicom", "text/plain"))]
    report = web.post("/api/upload", files=files, headers={"X-CSRF-Token": csrf}).json()
    outcomes = {f["name"].rsplit("/", 1)[-1]: f["outcome"] for f in report["files"]}
    assert sum(o == "stored" for o in outcomes.values()) == len(paths) and outcomes["notes.txt"] == "refused"
    assert "not a DICOM file" in next(f["reason"] for f in report["files"] if f["name"] == "notes.txt")
    (series,) = report["series"]
    assert series["job_status"] == "queued" and series["job_id"]
    stored = Path(config.incoming_dir).rglob("*.dcm")
    assert sorted(p.read_bytes() for p in stored) == sorted(p.read_bytes() for p in paths)  # bytes as uploaded

    again = web.post("/api/upload", files=[("files", ("cd.zip", archive, "application/zip"))], headers={"X-CSRF-Token": csrf})
    assert {f["outcome"] for f in again.json()["files"]} == {"repeated"}
    with Session(engine) as session:
        assert session.scalar(select(func.max(Instance.times_received))) == 2
        assert session.scalar(select(Instance.calling_ae_title).limit(1)) == "WEB-UPLOAD"
    assert ("dosimetrist", "upload") in audit_actions(engine)


def test_a_bad_archive_is_refused_whole(site, tmp_path):
    config, engine = site
    web, csrf = logged_in(config, engine, "admin")
    paths = small_series(tmp_path / "ct")
    good = zipped(paths)
    corrupt = bytearray(good)
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 64] = b"\0" * 64  # a member's bytes damaged: its CRC fails
    bad = [("truncated.zip", good[: len(good) // 2]), ("corrupt.zip", bytes(corrupt)), ("junk.zip", b"PK\x03\x04junk")]
    for name, data in bad:
        files = [("files", ("first.zip", good, "application/zip")), ("files", (name, data, "application/zip"))]
        response = web.post("/upload", files=files, data={"csrf_token": csrf})
        assert response.status_code == 400, name
        assert "nothing was stored" in response.text and name in response.text
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0


def test_uploads_over_the_size_limit_are_refused(tmp_path):
    config = make_config(tmp_path, "max_upload_mb = 0.01")
    engine = open_database(config.node.database_url, fsync=False)
    add_user(engine, "dora", Role.DOSIMETRIST, PASSWORD)
    web, csrf = logged_in(config, engine, "dora")
    response = web.post("/api/upload", files={"files": ("big.zip", b"\0" * 20_000)}, headers={"X-CSRF-Token": csrf})
    assert response.status_code == 400 and "max_upload_mb" in response.json()["detail"]


# The keys of `rtnode jobs --json` and GET /api/jobs (README, "The job log"); `rtnode job ID --json` adds "events".
JOB_KEYS = {"id", "series_instance_uid", "study_instance_uid", "patient_id", "version", "status", "error", "created_at",
            "started_at", "finished_at", "instances", "input_fingerprint", "model", "timings", "outputs", "outputs_removed_at",
            "superseded_by", "deliveries", "reviews", "worker", "structures", "route", "mode", "models", "destinations"}
DELIVERY_KEYS = {"destination", "kind", "status", "attempts", "last_error", "next_attempt_at", "delivered_at", "sop_instance_uid"}
EVENT_KEYS = {"at", "event", "detail"}


def at(minute: int) -> datetime:
    return datetime(2026, 2, 3, 9, minute, 30, 250_000, tzinfo=UTC)


def add_finished_job(engine) -> int:
    """A job as a worker leaves it after a run whose outputs retention removed since: every field set, to known values."""
    with Session(engine) as session, session.begin():
        study = Study(study_instance_uid="1.2.826.0.1.3680043.10.7", patient_id="JOBLOG-2", patient_name="Doe^Jane")
        series = Series(series_instance_uid="1.2.826.0.1.3680043.10.7.1", study=study, modality="CT")
        job = Job(series=series, version=2, status="done", error="", input_uids=["1.2.3.1", "1.2.3.2", "1.2.3.3"],
                  input_fingerprint="ab" * 32, inputs_at=at(0), model_name="ctv-unet", model_version="2026.1",
                  timings={"load": 0.5, "pass_1": 2.25}, outputs={"rtstruct": "/data/jobs/7/rtstruct.dcm"}, superseded_by=None,
                  worker="host-a:4242", outputs_removed_at=at(9), created_at=at(1), started_at=at(2), finished_at=at(3),
                  route="gyn", mode="live", models=["ctv-unet"], destinations=["tps-done", "tps-pending"])
        session.add(job)
        for status, attempts, error, next_at, delivered in (("done", 1, "", at(4), at(4)),
                                                           ("pending", 2, "association rejected", at(6), None)):
            session.add(Delivery(job=job, destination=f"tps-{status}", ae_title="TPS", host=LOOPBACK, port=104, kind="rtstruct",
                                 path="/data/jobs/7/rtstruct.dcm", sop_instance_uid="1.2.3.99", status=status,
                                 attempts=attempts, last_error=error, next_attempt_at=next_at, created_at=at(3),
                                 delivered_at=delivered))
        session.add(JobEvent(job=job, at=at(1), event="queued", detail="3 instances"))
        session.add(JobEvent(job=job, at=at(3), event="done", detail=""))
        session.flush()
        return job.id


def test_the_job_log_json_is_the_jobs_as_made_with_the_documented_keys(site, tmp_path):
    """GET /api/jobs, `rtnode jobs --json`, GET /api/jobs/ID and `rtnode job ID --json` against what the test made."""
    config, engine = site
    config_path = tmp_path / "node.toml"
    config_path.write_text(config_text(tmp_path, database_url=config.node.database_url))
    # One job made as the node makes them: a series uploaded, then submitted.
    patient = PatientStudy(patient_id="JOBLOG-1")
    paths = small_series(tmp_path / "ct", patient=patient)
    uids = sorted(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in paths)
    web, csrf = logged_in(config, engine, "dosimetrist")
    made_from, upload = utcnow(), web.post("/api/upload", files=[("files", ("cd.zip", zipped(paths)))],
                                           headers={"X-CSRF-Token": csrf})
    made_by = utcnow()
    (queued_id,) = [series["job_id"] for series in upload.json()["series"]]
    finished_id = add_finished_job(engine)

    api, bearer = client(config, engine), {"Authorization": f"Bearer {create_api_token(engine, 'viewer')}"}
    listed = api.get("/api/jobs", headers=bearer).json()
    assert [job["id"] for job in listed] == [finished_id, queued_id]  # newest first
    for job in listed:
        assert set(job) == JOB_KEYS, sorted(set(job) ^ JOB_KEYS)
        assert all(set(delivery) == DELIVERY_KEYS for delivery in job["deliveries"]), job["deliveries"]
    finished, queued = listed
    assert made_from <= datetime.fromisoformat(queued["created_at"]) <= made_by
    assert queued == {
        "id": queued_id, "series_instance_uid": patient.series_instance_uid, "study_instance_uid": patient.study_instance_uid,
        "patient_id": "JOBLOG-1", "version": 1, "status": "queued", "error": None, "created_at": queued["created_at"],
        "started_at": None, "finished_at": None, "worker": None, "instances": len(paths),
        "input_fingerprint": hashlib.sha256(f"{len(uids)}\n{chr(10).join(uids)}".encode()).hexdigest(), "model": None,
        "timings": {}, "outputs": {}, "outputs_removed_at": None, "superseded_by": None, "deliveries": [], "reviews": [],
        "structures": [], "route": None, "mode": "live", "models": None, "destinations": None,
    }
    assert finished == {
        "id": finished_id, "series_instance_uid": "1.2.826.0.1.3680043.10.7.1", "study_instance_uid": "1.2.826.0.1.3680043.10.7",
        "patient_id": "JOBLOG-2", "version": 2, "status": "done", "error": None, "created_at": at(1).isoformat(),
        "started_at": at(2).isoformat(), "finished_at": at(3).isoformat(), "worker": "host-a:4242", "instances": 3,
        "input_fingerprint": "ab" * 32, "model": {"name": "ctv-unet", "version": "2026.1"},
        "timings": {"load": 0.5, "pass_1": 2.25}, "outputs": {"rtstruct": "/data/jobs/7/rtstruct.dcm"},
        "outputs_removed_at": at(9).isoformat(), "superseded_by": None, "reviews": [], "structures": [],
        "route": "gyn", "mode": "live", "models": ["ctv-unet"], "destinations": ["tps-done", "tps-pending"],
        "deliveries": [
            {"destination": "tps-done", "kind": "rtstruct", "status": "done", "attempts": 1, "last_error": None,
             "next_attempt_at": None, "delivered_at": at(4).isoformat(), "sop_instance_uid": "1.2.3.99"},
            {"destination": "tps-pending", "kind": "rtstruct", "status": "pending", "attempts": 2,
             "last_error": "association rejected", "next_attempt_at": at(6).isoformat(), "delivered_at": None,
             "sop_instance_uid": "1.2.3.99"},
        ],
    }
    assert json.loads(rtnode_cli(config_path, "jobs", "--json").stdout) == listed
    assert api.get("/api/jobs?status=queued", headers=bearer).json() == [queued]
    assert json.loads(rtnode_cli(config_path, "jobs", "--status", "done", "--limit", "1", "--json").stdout) == [finished]

    described = api.get(f"/api/jobs/{finished_id}", headers=bearer).json()
    assert set(described) == JOB_KEYS | {"events"}
    assert described == {**finished, "events": [{"at": at(1).isoformat(), "event": "queued", "detail": "3 instances"},
                                                {"at": at(3).isoformat(), "event": "done", "detail": ""}]}
    assert json.loads(rtnode_cli(config_path, "job", str(finished_id), "--json").stdout) == described
    described = api.get(f"/api/jobs/{queued_id}", headers=bearer).json()
    (event,) = described.pop("events")
    assert set(event) == EVENT_KEYS and made_from <= datetime.fromisoformat(event["at"]) <= made_by
    assert (event["event"], event["detail"]) == ("queued", f"{len(paths)} instances of series {patient.series_instance_uid}")
    assert described == queued
    assert api.get("/api/openapi.json", headers=bearer).status_code == 200


def test_the_web_process_does_not_load_torch():
    code = "import node.web.app, node.web.server, sys; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def web_process(tmp_path: Path, web: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int, Path]:
    """`rtnode web` alone (as `rtnode serve` starts it), on a free port, logging to a file; `env` in place of ours."""
    port = free_port()
    config_path = tmp_path / "node.toml"
    config_path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\nport = {free_port()}\n[web]\nport = {port}\n{web}\n')
    log = tmp_path / "web.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "node", "--config", str(config_path), "web"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=env,
        )
    wait_for_port(port, 60)
    return process, port, log


def test_tls_serves_https_with_secure_cookies(tmp_path):
    openssl = require_tool("openssl")
    key, certificate = tmp_path / "web.key", tmp_path / "web.crt"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=rtnode",
            "-days",
            "1",
            "-addext",
            f"subjectAltName=IP:{LOOPBACK}",
            "-keyout",
            key,
            "-out",
            certificate,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    process, port, _ = web_process(tmp_path, f'certificate = "{certificate}"\nprivate_key = "{key}"')
    try:
        config = parse_config((tmp_path / "node.toml").read_text())
        add_user(open_database(config.node.database_url, fsync=False), "ada", Role.ADMIN, PASSWORD)
        with httpx.Client(base_url=f"https://{LOOPBACK}:{port}", verify=str(certificate), timeout=30) as https:
            login = https.post("/login", data={"username": "ada", "password": PASSWORD})
            assert login.status_code == 303 and "Secure" in login.headers["set-cookie"]
            assert login.headers["strict-transport-security"].startswith("max-age=")
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://{LOOPBACK}:{port}/healthz", timeout=5)  # no plain HTTP beside it
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_insecure_http_beyond_loopback_is_warned_at_start(tmp_path):
    process, port, log = web_process(tmp_path, 'host = "0.0.0.0"\ninsecure_http = true')
    try:
        health = httpx.get(f"http://{LOOPBACK}:{port}/healthz", timeout=10)  # the web app alone: no SCP, no worker
        assert failing_checks(health.status_code, health.json()) == {"scp", "worker", "destinations"}
        assert health.json()["checks"]["worker"]["detail"] == "no worker has reported a heartbeat"
        assert "serves plain HTTP on 0.0.0.0" in log.read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append((int(stat.parent.name), (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except (OSError, IndexError, ValueError):
            continue
    return found


def test_serve_runs_the_web_app_in_its_own_process_and_restarts_it(node_factory):
    # The kill below is on purpose: the one ERROR record it makes is the restart's.
    restart = r"ERROR +\[\d+\] node\.service: the web app exited with status -9: starting it again$"
    node = node_factory(web_port=free_port(), allowed_log_problems=(restart,)).start(timeout=60)
    wait_for_port(node.web_port, 60)
    (web_pid,) = [pid for pid, command in children(node.process.pid) if command.rstrip().endswith(" web")]
    time.sleep(WebProcess.STARTUP_SECONDS + 0.5)  # a death after the start-up seconds is restarted
    subprocess.run(["kill", "-9", str(web_pid)], check=True)
    deadline = time.monotonic() + 60
    restarted: list[int] = []
    while time.monotonic() < deadline and not restarted:
        restarted = [pid for pid, command in children(node.process.pid) if command.rstrip().endswith(" web") and pid != web_pid]
        time.sleep(0.2)
    assert restarted, node.log()[-3000:]
    wait_for_port(node.web_port, 60)
    assert httpx.get(f"http://{LOOPBACK}:{node.web_port}/healthz", timeout=10).json()["checks"]["scp"]["ok"]
    assert "the web app exited with status -9: starting it again" in node.log()
