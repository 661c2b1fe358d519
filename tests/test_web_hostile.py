"""The web app against a hostile caller, as issue #24 found it: the login raced, user names told apart by time
and answer, one address locking a user out, a stranger's form filling the disk, numbers that overflowed into a 500
(without the security headers), the upload form capped below its documented limit, any Host let in. Real app, real
databases (SQLite and PostgreSQL where the database is the subject), real argon2, real threads, a real `rtnode web`
process where bytes on disk are measured."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session
from starlette.requests import Request

from node.config import ConfigError, parse_config
from node.db.engine import open_database
from node.db.models import AuditEvent, User
from node.harness import LOOPBACK, free_port
from node.web.accounts import Role, add_user
from node.web.app import create_app
from node.web.dependencies import MAX_ROW_ID
from node.web.routes.api import MAX_JOBS_LISTED
from node.web.security import CONTENT_SECURITY_POLICY, allowed_host_names, same_origin
from node.web.upload import FileOutcome, UploadedFile, store_upload
from tests.test_web_app import (  # noqa: F401 (site: a fixture)
    PASSWORD,
    FakeClock,
    add_job,
    client,
    logged_in,
    make_config,
    site,
    small_series,
    web_process,
)

SECURITY_HEADERS = {"content-security-policy": CONTENT_SECURITY_POLICY, "x-frame-options": "DENY",
                    "x-content-type-options": "nosniff", "cache-control": "no-store"}


def from_address(app, address: str) -> TestClient:
    """A client of `app` (its throttle and memory shared with every other client of it) from `address`."""
    return TestClient(app, base_url="http://localhost", client=(address, 50000), follow_redirects=False)


def failed_logins(engine, username: str) -> int:
    with Session(engine) as session:
        return session.scalar(select(User.failed_logins).where(User.username == username))


def test_simultaneous_logins_count_every_failure_and_the_lock_holds(site):  # noqa: F811
    """41 logins at once from 41 addresses, 40 wrong and the right one 30th (as the issue raced them): every wrong
    one is counted, and the right one gets in only if fewer than login_lockout_after wrong ones came before it."""
    config, engine = site
    lockout_after = 5
    config = make_config(config.node.data_dir.parent, database_url=config.node.database_url,
                         failed_logins=f"login_slowdown_after = 2\nlogin_lockout_after = {lockout_after}\n")
    app = create_app(config, engine)
    wrong, right_at = 40, 29
    passwords = [PASSWORD if i == right_at else f"wrong-guess-{i}" for i in range(wrong + 1)]
    clients = [from_address(app, f"10.24.0.{i + 1}") for i in range(wrong + 1)]
    start = threading.Barrier(wrong + 1)
    statuses: list[int | None] = [None] * (wrong + 1)

    def attempt(i: int) -> None:
        start.wait()
        statuses[i] = clients[i].post("/login", data={"username": "admin", "password": passwords[i]}).status_code

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(wrong + 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert statuses.count(401) >= wrong and set(statuses) <= {303, 401}, statuses

    counted = failed_logins(engine, "admin")
    print(f"right one: {statuses[right_at]}, failed_logins {counted}")
    if statuses[right_at] == 303:  # it came first or early: the count restarted at it, and counts every wrong one after
        assert wrong - counted < lockout_after, f"got in after {wrong - counted} wrong passwords"
    else:  # it came during the lock: refused, and not counted as a wrong one
        assert counted == wrong
    with Session(engine) as session:
        audited = session.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "login failed"))
    assert audited == wrong + (statuses[right_at] != 303)


def timed_login(web: TestClient, username: str, password: str = "a-wrong-guess") -> tuple[float, int, str]:
    """(seconds, status, the page with the name in its form taken out)."""
    started = time.perf_counter()
    response = web.post("/login", data={"username": username, "password": password})
    return time.perf_counter() - started, response.status_code, response.text.replace(username, "NAME")


def test_a_name_nobody_has_gets_the_same_answers_after_the_same_work(tmp_path):
    """Users' names and names nobody has, tried in turn: each try answered with the same page and status after about
    as long (argon2 and the slowdown's waits alike), through to "locked". Three of each, and the fastest of the three
    compared, so that another process's load on the machine does not count."""
    config = make_config(tmp_path, "login_address_limit = 100",
                         failed_logins="login_slowdown_after = 1\nlogin_lockout_after = 3\n")
    engine = open_database(config.node.database_url, fsync=False)
    users, strangers = ["ursula", "ulrich", "ulrike"], ["nobody", "nobodx", "nobodz"]
    for name in users:
        add_user(engine, name, Role.VIEWER, PASSWORD)
    web = client(config, engine, clock=FakeClock())  # one clock: the same "locked until"
    for attempt in range(1, 5):  # wrong, wrong and slowed, wrong and locking, locked
        known, unknown = [], []
        for user, stranger in zip(users, strangers, strict=True):
            known.append(timed_login(web, user))
            unknown.append(timed_login(web, stranger))
        assert {answer[1:] for answer in known + unknown} == {known[0][1:]}, attempt  # one status, one page
        known_seconds, unknown_seconds = min(t for t, *_ in known), min(t for t, *_ in unknown)
        ratio = unknown_seconds / known_seconds
        print(f"attempt {attempt}: known {known_seconds:.3f} s, unknown {unknown_seconds:.3f} s, ratio {ratio:.2f}")
        assert 0.5 < ratio < 2, (attempt, known, unknown)
    assert "too many failed logins: locked until 08:15 UTC" in known[0][2]
    assert timed_login(web, "ursula", PASSWORD)[1] == 401  # locked: the right password too ...
    assert failed_logins(engine, "ursula") == 4  # ... which is not counted as a wrong one


def test_one_address_is_throttled_before_it_can_lock_a_user_out(tmp_path):
    """login_address_limit below login_lockout_after: a caller elsewhere fails until its address is refused, even
    with the right password; the user, from another address, logs in all the while. The refusal ends with its window."""
    config = make_config(tmp_path, "login_address_limit = 3")  # login_lockout_after = 4, login_lockout_minutes = 15
    engine = open_database(config.node.database_url, fsync=False)
    add_user(engine, "ada", Role.ADMIN, PASSWORD)
    clock = FakeClock()
    app = create_app(config, engine, clock)
    remote, local = from_address(app, "203.0.113.7"), from_address(app, "127.0.0.1")
    for _ in range(3):
        assert remote.post("/login", data={"username": "ada", "password": "a-wrong-guess"}).status_code == 401
    for password in ("a-wrong-guess", PASSWORD):
        refused = remote.post("/login", data={"username": "ada", "password": password})
        assert refused.status_code == 429, refused.text
        assert "too many failed logins from this address: try again after 08:15 UTC" in refused.text
    assert remote.post("/login", data={"username": "other", "password": "x"}).status_code == 429  # any name
    assert failed_logins(engine, "ada") == 3  # the refused tries were never checked: below the lock
    assert local.post("/login", data={"username": "ada", "password": PASSWORD}).status_code == 303

    clock.advance(minutes=15)
    assert remote.post("/login", data={"username": "ada", "password": "a-wrong-guess"}).status_code == 401


def test_a_strangers_big_login_form_is_refused_before_it_is_written_anywhere(tmp_path):
    """`rtnode web` with its temporary files in a folder of its own: a 50 MB multipart login is answered 413 and the
    process writes nothing (its write count in /proc, which spooling would raise by the 50 MB)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    process, port, _ = web_process(tmp_path, "", env={**os.environ, "TMPDIR": str(spool)})
    try:
        def bytes_written() -> int:
            counters = dict(line.split(": ") for line in Path(f"/proc/{process.pid}/io").read_text().splitlines())
            return int(counters["wchar"])

        size, boundary = 50 * 1024 * 1024, "rtnode-test-boundary"
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="username"; filename="fill.bin"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        written_before = bytes_written()
        with socket.create_connection((LOOPBACK, port), timeout=60) as connection:
            connection.sendall(f"POST /login HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nContent-Type: multipart/form-data; "
                               f"boundary={boundary}\r\nContent-Length: {len(head) + size + len(tail)}\r\n\r\n".encode()
                               + head)
            try:  # the whole body, as a careless or hostile client sends it whatever the answer
                for _ in range(size // 65536):
                    connection.sendall(bytes(65536))
                connection.sendall(tail)
            except OSError:
                pass  # the server may close before it is all sent
            answer = connection.recv(65536)
        time.sleep(0.5)
        written = bytes_written() - written_before
        print(f"a 50 MB login form: {written} bytes written by the web process")
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert written < 64 * 1024 and list(spool.iterdir()) == []
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_every_form_read_before_a_login_is_small(tmp_path):
    config = make_config(tmp_path)
    engine = open_database(config.node.database_url, fsync=False)
    web = client(config, engine)
    too_long = web.post("/login", data={"username": "ada", "password": "x" * 20_000})  # over 16 KiB in all
    assert too_long.status_code == 413
    assert web.post("/login", data={"username": "ada", "password": "x" * 5_000}).status_code == 400  # a field > 4 KiB
    with_file = web.post("/login", data={"username": "ada"}, files={"password": ("a.bin", b"x")})
    assert with_file.status_code == 400  # no file in a login
    unstated = web.post("/login", content=iter([b"username=ada&password=x"]),
                        headers={"Content-Type": "application/x-www-form-urlencoded"})  # chunked: no stated length
    assert unstated.status_code == 411


def test_numbers_beyond_a_row_id_or_the_job_list_are_refused_not_overflowed(site):  # noqa: F811
    config, engine = site
    job_id = add_job(engine, {})
    web, csrf = logged_in(config, engine, "dosimetrist")
    huge = "99999999999999999999"
    page = web.get(f"/jobs/{huge}")
    assert page.status_code == 422 and "less than or equal to 2147483647" in page.text  # a page for a person
    for path in (f"/api/jobs/{huge}", f"/api/jobs/{MAX_ROW_ID + 1}", "/api/jobs/0", f"/api/jobs/{huge}/files/rtstruct",
                 f"/api/jobs/{huge}/slices", f"/?before={huge}", f"/api/dashboard?before={huge}", "/api/jobs?limit=1e20",
                 f"/api/jobs?limit={huge}", "/api/jobs?limit=-1", "/api/jobs?limit=0",
                 f"/api/jobs?limit={MAX_JOBS_LISTED + 1}"):
        assert web.get(path).status_code == 422, path
    assert web.post(f"/api/jobs/{huge}/resend", headers={"X-CSRF-Token": csrf}).status_code == 422
    assert web.get(f"/api/jobs/{MAX_ROW_ID}").status_code == 404  # in range: no such job
    assert [job["id"] for job in web.get(f"/api/jobs?limit={MAX_JOBS_LISTED}").json()] == [job_id]


def test_a_500_carries_the_security_headers(tmp_path):
    """The database unreachable: the login page cannot be made (500), and the answer is still framed by nobody."""
    config = make_config(tmp_path)
    nowhere = create_engine(f"postgresql+psycopg://rtnode@{LOOPBACK}:{free_port()}/rtnode")  # no server on that port
    web = TestClient(create_app(config, nowhere), base_url="http://localhost", raise_server_exceptions=False)
    failed = web.get("/login")
    assert failed.status_code == 500
    assert {name: failed.headers.get(name) for name in SECURITY_HEADERS} == SECURITY_HEADERS


def test_the_upload_form_takes_more_than_starlettes_1000_files(tmp_path):
    """The browser's form (its CSRF token a field, so the CSRF check reads the form first) with 1,001 files, under
    the documented max_upload_files = 5000: every file is looked at (none is DICOM: each refused with its reason)."""
    config = make_config(tmp_path)
    engine = open_database(config.node.database_url, fsync=False)
    add_user(engine, "dora", Role.DOSIMETRIST, PASSWORD)
    web, csrf = logged_in(config, engine, "dora")
    files = [("files", (f"note-{i}.txt", b"not DICOM")) for i in range(1001)]
    response = web.post("/upload", files=files, data={"csrf_token": csrf})
    assert response.status_code == 200, response.text[-500:]
    assert response.text.count("not a DICOM file") == 1001


def test_only_the_configured_host_names_are_let_in(tmp_path):
    """Host is checked (DNS rebinding): the defaults are web.host and the loopback names; web.allowed_hosts
    replaces them. A login's Origin must be one of them, whatever Host says."""
    config = make_config(tmp_path)
    engine = open_database(config.node.database_url, fsync=False)
    add_user(engine, "ada", Role.ADMIN, PASSWORD)
    web = TestClient(create_app(config, engine), base_url="http://localhost", follow_redirects=False)
    for host in ("localhost", "127.0.0.1", "[::1]", "LOCALHOST:8443"):
        assert web.get("/login", headers={"Host": host}).status_code == 200, host
    evil = web.post("/login", data={"username": "ada", "password": PASSWORD},
                    headers={"Host": "evil.example", "Origin": "http://evil.example"})  # as the issue posted it
    assert evil.status_code == 400 and "rtnode_session" not in evil.headers.get("set-cookie", "")
    assert evil.headers["x-frame-options"] == "DENY"
    other_port = web.post("/login", data={"username": "ada", "password": PASSWORD},
                          headers={"Origin": "http://localhost:3000"})  # another site on this machine
    assert other_port.status_code == 403
    assert web.post("/login", data={"username": "ada", "password": PASSWORD},
                    headers={"Origin": "http://localhost"}).status_code == 303

    named = make_config(tmp_path, 'allowed_hosts = ["rtnode.example.org", "*.radiotherapy.example.org"]')
    assert allowed_host_names(named.web) == ("rtnode.example.org", "*.radiotherapy.example.org")
    web = TestClient(create_app(named, engine), base_url="http://rtnode.example.org", follow_redirects=False)
    assert web.get("/login").status_code == 200
    assert web.get("/login", headers={"Host": "node.radiotherapy.example.org"}).status_code == 200
    assert web.get("/login", headers={"Host": "localhost"}).status_code == 400
    assert web.post("/login", data={"username": "ada", "password": PASSWORD},
                    headers={"Origin": "http://rtnode.example.org"}).status_code == 303
    with pytest.raises(ConfigError, match="allowed_hosts"):
        make_config(tmp_path, 'allowed_hosts = ["*"]')


def test_the_same_origin_check_reads_the_allowed_hosts_not_the_requests_host():
    """The check alone, Host and Origin both naming a stranger (what Host checking refuses before it)."""
    def request(host: str, origin: str) -> Request:
        return Request({"type": "http", "method": "POST", "path": "/login", "scheme": "http", "server": (host, 80),
                        "headers": [(b"host", host.encode()), (b"origin", origin.encode())]})

    allowed = allowed_host_names(parse_config('[web]\nhost = "127.0.0.1"\n').web)
    assert not same_origin(request("evil.example", "http://evil.example"), allowed)
    assert same_origin(request("127.0.0.1:8443", "http://127.0.0.1:8443"), allowed)
    assert not same_origin(request("127.0.0.1:8443", "https://127.0.0.1:8443"), allowed)  # another scheme
    assert not same_origin(request("127.0.0.1:8443", "null"), allowed)



def test_a_zip_member_beyond_max_instance_mb_is_refused_unread_and_memory_stays_bounded(tmp_path):
    """Issue #24: a 190 kB zip whose one member unpacks to 190 MB cost the web process 388 MB. A member larger
    than node.max_instance_mb (C-STORE's own bound) is now refused from its recorded size, never read; the
    rest of the archive is stored."""
    config = make_config(tmp_path, node="max_instance_mb = 8.0")
    engine = open_database(config.node.database_url)
    paths = small_series(tmp_path / "ct", slices=12)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("CD/bomb.dcm", b"\0" * (64 * 2**20))  # 64 kB packed
        for path in paths:
            archive.write(path, f"CD/DICOM/{path.name}")
    buffer.seek(0)
    tracemalloc.start()
    try:
        report = store_upload(engine, config, [UploadedFile("cd.zip", buffer)], LOOPBACK)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    refused = {f.name: f.reason for f in report.files if f.outcome == FileOutcome.REFUSED}
    assert refused == {"cd.zip/CD/bomb.dcm": "64 MB: larger than node.max_instance_mb; not read"}
    assert report.count(FileOutcome.STORED) == len(paths)
    assert peak < 16 * 2**20, f"storing the upload allocated {peak / 2**20:.0f} MB at its peak"
