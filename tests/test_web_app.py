"""The web app in-process (Starlette's TestClient over the real app, a real database, real argon2,
real DICOM files): the security rules that need no browser. The tests on the `site` fixture run on
SQLite and on PostgreSQL; the others, whose subject is not the database, on SQLite only. The
browser tests against a real `rtnode serve` are in test_web_browser.py."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.config import parse_config
from node.db.engine import open_database
from node.db.models import AuditEvent, Instance, Job, Series, Study, User, utcnow
from node.harness import LOOPBACK, free_port, wait_for_port
from node.service import WebProcess
from node.synth.ct_series import PatientStudy, SeriesGeometry, ct_datasets, uniform_positions, write_series
from node.web.accounts import Role, add_user, create_api_token
from node.web.app import create_app
from tests.conftest import REPO, require_tool

PASSWORD = "correct-horse-1"
TEMPLATES = REPO / "node" / "web" / "templates"


def make_config(root: Path, web: str = "", tls: bool = False, database_url: str | None = None):
    """A configuration under `root`; its database is `database_url`, else SQLite in the data directory."""
    tls_keys = f'certificate = "{root / "web.crt"}"\nprivate_key = "{root / "web.key"}"\n' if tls else ""
    database = f'database_url = "{database_url}"\n' if database_url else ""
    return parse_config(
        f'[node]\ndata_dir = "{root / "data"}"\n{database}fsync = false\n[completion]\nmin_slices = 10\n'
        f"[web]\nlogin_slowdown_after = 2\nlogin_lockout_after = 4\n{tls_keys}{web}\n"
    )


@pytest.fixture
def site(tmp_path, database_url, engine):
    """A configuration and its migrated database (SQLite, PostgreSQL) with one user per role."""
    config = make_config(tmp_path, database_url=database_url)
    for role in Role:
        add_user(engine, role.value, role, PASSWORD)
    return config, engine


def client(config, engine, https: bool = False) -> TestClient:
    return TestClient(
        create_app(config, engine), base_url="https://testserver" if https else "http://testserver", follow_redirects=False
    )


def logged_in(config, engine, username: str, https: bool = False) -> tuple[TestClient, str]:
    """A client with a session, and the session's CSRF token read from the page as a browser would."""
    web = client(config, engine, https)
    response = web.post("/login", data={"username": username, "password": PASSWORD})
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
    assert anonymous.get("/healthz").json()["status"] in ("ok", "unhealthy")  # no login, no patient data
    assert anonymous.get("/login?next=//evil.example/").text.count('value="/"') == 1  # no open redirect


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


def test_sessions_expire_when_idle_and_end_at_logout(tmp_path):
    config = make_config(tmp_path, "session_idle_minutes = 0.02")  # 1.2 s
    engine = open_database(config.node.database_url, fsync=False)
    add_user(engine, "dora", Role.DOSIMETRIST, PASSWORD)
    web, csrf = logged_in(config, engine, "dora")
    assert web.get("/").status_code == 200
    time.sleep(1.5)
    assert web.get("/").status_code == 303

    web, csrf = logged_in(config, engine, "dora")
    assert web.post("/logout").status_code == 403  # no CSRF token
    assert web.post("/logout", data={"csrf_token": csrf}).status_code == 303
    assert web.get("/").status_code == 303


def test_failed_logins_are_slowed_then_locked(site):
    config, engine = site
    web = client(config, engine)
    timings = []
    for _ in range(3):
        start = time.monotonic()
        response = web.post("/login", data={"username": "viewer", "password": "wrong-password"})
        timings.append(time.monotonic() - start)
        assert response.status_code == 401 and "wrong user name or password" in response.text
    assert timings[0] < 0.9 and timings[1] >= 0.9 and timings[2] >= 1.9  # slowdown after 2 failures
    locked = web.post("/login", data={"username": "viewer", "password": "wrong-password"})
    assert "locked until" in locked.text
    assert "locked until" in web.post("/login", data={"username": "viewer", "password": PASSWORD}).text
    assert ("viewer", "login failed") in audit_actions(engine)
    unknown = web.post("/login", data={"username": "nobody", "password": "x"})
    assert unknown.status_code == 401 and "wrong user name or password" in unknown.text  # the same words


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


def test_api_jobs_are_the_command_lines_objects(site):
    config, engine = site
    add_job(engine, {})
    token = create_api_token(engine, "viewer")
    api = client(config, engine)
    from node.joblog import list_jobs

    assert api.get("/api/jobs", headers={"Authorization": f"Bearer {token}"}).json() == list_jobs(engine)
    assert api.get("/api/openapi.json", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_the_web_process_does_not_load_torch():
    code = "import node.web.app, node.web.server, sys; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_sessions_end_at_their_maximum_age_even_when_used(tmp_path):
    config = make_config(tmp_path, "session_max_hours = 0.0004")  # 1.44 s
    engine = open_database(config.node.database_url, fsync=False)
    add_user(engine, "dora", Role.DOSIMETRIST, PASSWORD)
    web, _ = logged_in(config, engine, "dora")
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert web.get("/").status_code == 200
        time.sleep(0.2)
    time.sleep(0.8)
    assert web.get("/").status_code == 303


def web_process(tmp_path: Path, web: str) -> tuple[subprocess.Popen, int, Path]:
    """`rtnode web` alone (as `rtnode serve` starts it), on a free port, logging to a file."""
    port = free_port()
    config_path = tmp_path / "node.toml"
    config_path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n[web]\nport = {port}\n{web}\n')
    log = tmp_path / "web.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "node", "--config", str(config_path), "web"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
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
        assert httpx.get(f"http://{LOOPBACK}:{port}/healthz", timeout=10).status_code in (200, 503)
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
    node = node_factory(web_port=free_port()).start(timeout=60)
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
