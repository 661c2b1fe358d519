"""The web app as people use it: a real `rtnode serve` (SCP, worker, web process), DCMTK storescu as
the scanner, DCMTK storescp as the planning system, and Debian's Chromium driven by Playwright.

One node serves the whole module; each test logs in afresh in its own browser context and makes
what it needs itself (the phantom pushed once is made by whichever test needs it first), so any
one of them passes alone and in any order."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom import dcmread

from node.harness import LOOPBACK, NodeProcess, free_port, wait_for_port
from node.synth.ct_series import PatientStudy, SeriesGeometry, ct_datasets, uniform_positions, write_series
from node.synth.phantom import make_phantom
from tests.conftest import assert_log_clean, require_module, require_tool
from tests.test_loop import Receiver, push

playwright_api = require_module("playwright.sync_api")
expect = playwright_api.expect

PASSWORD = "correct-horse-1"
# audrey and val act only in the audit trail's test, so what it finds there is its own.
USERS = {"ada": "admin", "dora": "dosimetrist", "vic": "viewer", "lou": "dosimetrist", "audrey": "dosimetrist",
         "val": "viewer"}
# DICOM text and a user name that would run if a page ever rendered them as HTML.
XSS_PATIENT = "<script>alert(1)</script>"
XSS_SERIES = "<img src=x onerror=alert(2)>"
XSS_USER = '"><svg onload=alert(3)>'
SETTLED = ("done", "failed", "rejected")
# The shared phantom with the XSS names, and the one the dashboard's test pushes when the shared one exists already.
SHARED_SEED, DASHBOARD_SEED = 60_004, 60_001  # the shared one has slices flagged for review (viewer test)
# What in a page could run script: a <script> without src, an on* attribute, a javascript: URL (the live DOM, so
# whatever the page's own scripts added counts too).
RUNNABLE_MARKUP = r"""() => {
  const found = [];
  for (const script of document.querySelectorAll("script:not([src])")) found.push("a <script> without src");
  for (const element of document.querySelectorAll("*")) {
    for (const attribute of element.attributes) {
      if (attribute.name.startsWith("on") || /^\s*javascript:/i.test(attribute.value)) {
        found.push(`<${element.localName} ${attribute.name}="${attribute.value}">`);
      }
    }
  }
  return found;
}"""


@dataclass
class Site:
    node: NodeProcess
    tps: Receiver
    url: str
    token: str
    root: Path
    pushed_job: int | None = None

    def api(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=30)

    def job(self, job_id: int) -> dict:
        response = self.api(f"/api/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_for_job(self, job_id: int, statuses=SETTLED, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in statuses:
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not {statuses} after {timeout} s: {job}\n{self.node.log()[-4000:]}")


def rtnode_with_input(node: NodeProcess, *args: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", "--config", str(node.config_path), *args], input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=node.root)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    require_tool("storescu")
    root = tmp_path_factory.mktemp("web")
    tps = Receiver(root / "tps", free_port()).start()
    sections = (
        "[completion]\nquiet_seconds = 2.0\nmin_slices = 10\nrelease_grace_seconds = 1.0\n"
        "[delivery]\nfirst_retry_seconds = 1.0\nmax_retry_seconds = 2.0\n"
        f'[[destinations]]\nname = "tps"\nae_title = "TPS"\nhost = "{LOOPBACK}"\nport = {tps.port}\n'
    )
    web_port = free_port()
    node = NodeProcess(root=root / "node", port=free_port(), sections=sections, web_port=web_port,
                       web_config="login_slowdown_after = 2\nlogin_lockout_after = 3\nlogin_lockout_minutes = 5\n"
                       "login_address_limit = 100\n")  # every browser here logs in from loopback
    for name, role in USERS.items():
        added = rtnode_with_input(node, "user", "add", name, "--role", role, stdin=PASSWORD + "\n")
        assert added.returncode == 0, added.stderr
    token = node.rtnode("token", "create", "ada").stdout.strip()
    node.start(timeout=60)
    wait_for_port(web_port, 60)
    yield Site(node, tps, f"http://{LOOPBACK}:{web_port}", token, root)
    node.stop()
    tps.stop()
    assert_log_clean(node)


@pytest.fixture(scope="module")
def browser():
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        require_tool("chromium")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        yield launched
        launched.close()


def log_in(browser, site: Site, username: str, password: str = PASSWORD):
    """A fresh browser context that has posted the login form as `username`."""
    context = browser.new_context(base_url=site.url, accept_downloads=True)
    page = context.new_page()
    page.goto("/")
    assert "/login" in page.url
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    return page


def logged_in(browser, site: Site, username: str):
    page = log_in(browser, site, username)
    page.wait_for_selector("h1:has-text('Dashboard')")
    return page


def csrf_token(page) -> str:
    return page.get_attribute("form.logout input[name=csrf_token]", "value")


def phantom_dir(directory: Path, seed: int, **patient) -> list[Path]:
    phantom = make_phantom(seed)
    return write_series(ct_datasets(phantom.hu, phantom.geometry, replace(phantom.patient, **patient)), directory)


def push_xss_phantom(site: Site, seed: int) -> int:
    """Push a phantom whose patient name and series description are XSS_PATIENT and XSS_SERIES by storescu, as a
    scanner would, into the folder `pushed-SEED`; returns its new job."""
    before = {job["id"] for job in site.api("/api/jobs").json()}
    phantom_dir(site.root / f"pushed-{seed}", seed, patient_name=XSS_PATIENT, series_description=XSS_SERIES)
    push(site.node, site.root / f"pushed-{seed}", "+sd")
    return wait_for_new_job(site, before)


def pushed_job(site: Site) -> int:
    """The job of the shared phantom (XSS names), pushed by whichever test needs it first."""
    if site.pushed_job is None:
        site.pushed_job = push_xss_phantom(site, SHARED_SEED)
    return site.pushed_job


def runnable_markup(page) -> list[str]:
    return page.evaluate(RUNNABLE_MARKUP)


def page_text(page) -> str:
    """What the page shows a person: its text, never its markup."""
    return page.evaluate("document.body.textContent")


def wait_for_new_job(site: Site, before: set[int], timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [job["id"] for job in site.api("/api/jobs").json() if job["id"] not in before]
        if new:
            return max(new)
        time.sleep(0.3)
    raise AssertionError(f"no new job after {timeout} s:\n{site.node.log()[-4000:]}")


def test_login_and_logout(browser, site):
    page = logged_in(browser, site, "ada")
    assert page.text_content("header .who") == "ada (admin)"
    page.click("form.logout button")
    page.wait_for_selector("h1:has-text('Log in')")
    page.goto("/studies")
    assert "/login" in page.url  # the session ended
    page.context.close()


def test_wrong_password_is_refused_with_a_message(browser, site):
    page = log_in(browser, site, "dora", "not-the-password")
    assert page.text_content("[role=alert]") == "wrong user name or password"
    assert "/login" in page.url
    page.context.close()


def test_repeated_failures_lock_the_account(browser, site):
    for _ in range(3):
        page = log_in(browser, site, "lou", "guessing-wrong")
        message = page.text_content("[role=alert]")
        page.context.close()
    assert message.startswith("too many failed logins: locked until")
    page = log_in(browser, site, "lou", PASSWORD)  # even the right password, until the lock ends
    assert page.text_content("[role=alert]").startswith("too many failed logins")
    page.context.close()


def test_cookie_flags(browser, site):
    page = logged_in(browser, site, "vic")
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "rtnode_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert not cookie["secure"]  # plain HTTP on loopback here; under TLS it is Secure (test_web_app.py)
    assert page.evaluate("document.cookie") == ""  # out of reach of script
    page.context.close()


def test_a_pushed_series_appears_without_reload_and_reaches_done(browser, site):
    page = logged_in(browser, site, "ada")
    page.evaluate("window.__sameDocument = true")
    if site.pushed_job is None:  # the shared phantom, pushed while the dashboard is open
        job_id = pushed_job(site)
    else:  # a test before pushed it already: a series of this test's own
        job_id = push_xss_phantom(site, DASHBOARD_SEED)
    row = page.locator(f"#job-rows tr[data-job='{job_id}']")
    row.wait_for(timeout=30_000)
    page.wait_for_selector(f"#job-rows tr[data-job='{job_id}'] .status-done", timeout=300_000)
    assert page.evaluate("window.__sameDocument") is True  # updated in place, never reloaded
    assert XSS_PATIENT in row.inner_text() and XSS_SERIES in row.inner_text()  # shown as text, written by the script
    assert runnable_markup(page) == []
    assert int(page.text_content("#job-counts td[data-status=done]")) >= 1
    page.context.close()


def test_job_page_shows_timings_events_and_deliveries(browser, site):
    job_id = pushed_job(site)
    job = site.wait_for_job(job_id)
    page = logged_in(browser, site, "vic")
    page.goto(f"/jobs/{job_id}")
    assert page.text_content("#patient-name") == XSS_PATIENT and XSS_SERIES in page.text_content("#series-description")
    timings = page.inner_text("#timings")
    assert "pass_1" in timings and "preprocess" in timings
    events = page.inner_text("#events")
    assert "queued" in events and "contoured" in events and "done" in events
    deliveries = page.inner_text("#deliveries")
    assert "tps" in deliveries and "done" in deliveries
    assert job["input_fingerprint"] in page.inner_text("body")
    assert "v1 (this job)" in page.inner_text("#versions")
    assert runnable_markup(page) == []
    page.context.close()


def test_a_viewer_can_neither_resend_nor_upload(browser, site):
    job_id = pushed_job(site)
    page = logged_in(browser, site, "vic")
    assert page.locator("nav a:has-text('Upload')").count() == 0
    page.goto(f"/jobs/{job_id}")
    assert page.locator("#resend").count() == 0
    token = csrf_token(page)
    refused = page.request.post(f"/jobs/{job_id}/resend", form={"csrf_token": token}, max_redirects=0)
    assert refused.status == 403
    assert page.request.get("/upload").status == 403
    upload = page.request.post("/api/upload", multipart={"files": {"name": "a.dcm", "mimeType": "application/dicom",
                                                                   "buffer": b"x"}}, headers={"X-CSRF-Token": token})
    assert upload.status == 403
    page.context.close()


def test_viewer_pages_slices_by_keyboard_autoplay_and_presets(browser, site):
    job_id = pushed_job(site)
    site.wait_for_job(job_id)
    page = logged_in(browser, site, "dora")
    page.goto(f"/jobs/{job_id}/viewer")
    page.wait_for_selector("#viewer[data-ready=true]", timeout=60_000)
    page.wait_for_selector('#slice-image[data-index]:not([data-index=""])', timeout=30_000)  # the first slice is shown
    image = page.locator("#slice-image")

    def shown() -> int:
        return int(image.get_attribute("data-index"))

    start = shown()
    page.keyboard.press("ArrowDown")
    expect(image).to_have_attribute("data-index", str(start + 1))
    assert page.text_content("#slice-number") == str(start + 2)  # slice numbers count from 1
    assert page.text_content("#z-position") != "–" and "mm" in page.text_content("#thickness")

    soft = image.get_attribute("src")
    page.click("#preset-bone")
    expect(image).to_have_attribute("data-preset", "bone")
    assert image.get_attribute("src") != soft  # another picture of the same slice

    page.keyboard.press("Home")
    expect(image).to_have_attribute("data-index", "0")
    page.keyboard.press("Space")
    expect(page.locator("#autoplay-state")).to_have_text("playing")
    started = time.monotonic()
    while shown() < 3 and time.monotonic() - started < 5:
        page.wait_for_timeout(50)
    assert shown() >= 3, "autoplay did not advance"
    page.keyboard.press("Space")
    assert page.text_content("#autoplay-state") == "stopped"
    stopped_at = shown()
    page.wait_for_timeout(800)
    assert shown() == stopped_at  # autoplay stopped
    page.keyboard.press("End")
    expect(image).to_have_attribute("data-index", str(int(page.text_content("#slice-count")) - 1))
    # the slices flagged for review: a mark each on the strip beside the slider, and F (or the button) goes to the
    # next one, from the last slice round to the first
    flagged = sorted({i for s in site.api(f"/api/jobs/{job_id}").json()["structures"] for i in s["flagged_slices"]})
    marks = [int(mark.get_attribute("data-slice")) for mark in page.locator("#flagged-strip .flag-mark").all()]
    assert marks == flagged
    if flagged:
        page.keyboard.press("f")
        expect(image).to_have_attribute("data-index", str(flagged[0]))
        page.click("#next-flagged")
        expect(image).to_have_attribute("data-index", str(flagged[1] if len(flagged) > 1 else flagged[0]))
    else:
        assert page.locator("#next-flagged").is_disabled()
    assert runnable_markup(page) == []
    page.goto(f"/jobs/{job_id}/viewer?slice=5")  # the job page links each structure's first flagged slice so
    page.wait_for_selector("#viewer[data-ready=true]", timeout=60_000)
    expect(image).to_have_attribute("data-index", "5")
    page.context.close()


def test_downloaded_structure_set_is_byte_identical(browser, site):
    job_id = pushed_job(site)
    job = site.wait_for_job(job_id)
    page = logged_in(browser, site, "dora")
    page.goto(f"/jobs/{job_id}")
    with page.expect_download() as download:
        page.click("#downloads a:has-text('rtstruct')")
    assert Path(download.value.path()).read_bytes() == Path(job["outputs"]["rtstruct"]).read_bytes()
    assert download.value.suggested_filename == f"job-{job_id}-rtstruct.dcm"
    page.context.close()


def test_resend_makes_a_delivery_the_planning_system_receives(browser, site):
    job_id = pushed_job(site)
    delivered = len(site.wait_for_job(job_id)["deliveries"])  # the first delivery, and any resend of other tests
    received = len(site.tps.files())
    page = logged_in(browser, site, "dora")
    page.goto(f"/jobs/{job_id}")
    page.click("#resend")
    page.wait_for_selector("p.notice:has-text('Queued 1 delivery')")
    deadline = time.monotonic() + 60
    while len(site.tps.files()) <= received and time.monotonic() < deadline:
        time.sleep(0.3)
    assert len(site.tps.files()) == received + 1
    job = site.wait_for_job(job_id)
    assert [d["status"] for d in job["deliveries"]] == ["done"] * (delivered + 1)
    page.context.close()


def zipped_phantom(directory: Path, seed: int) -> Path:
    paths = phantom_dir(directory / "ct", seed, patient_id="UPLOAD-1", patient_name="Upload^Test")
    archive = directory / "cd.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in paths:
            out.write(path, f"DICOM/{path.name}")
    return archive


def test_a_zipped_phantom_uploaded_in_the_browser_becomes_a_done_job(browser, site):
    archive = zipped_phantom(site.root / "upload", 60_002)
    page = logged_in(browser, site, "dora")
    page.click("nav a:has-text('Upload')")
    page.set_input_files("#upload-files", str(archive))
    page.click("#upload-submit")
    page.wait_for_selector("#upload-report", timeout=120_000)
    with zipfile.ZipFile(archive) as members:
        count = len(members.namelist())
    assert page.locator("#upload-files-report tr.outcome-stored").count() == count
    link = page.locator("#upload-series a")
    job_id = int(link.inner_text().removeprefix("job #"))
    assert site.wait_for_job(job_id)["status"] == "done"
    assert runnable_markup(page) == []
    link.click()
    assert page.text_content("#patient-id") == "UPLOAD-1"
    page.context.close()


def test_a_corrupt_zip_is_refused_with_its_message(browser, site):
    broken = site.root / "broken.zip"
    good = zipped_phantom(site.root / "broken", 60_003).read_bytes()
    broken.write_bytes(good[: len(good) // 3])
    studies_before = site.api("/api/studies").json()
    page = logged_in(browser, site, "dora")
    page.goto("/upload")
    page.set_input_files("#upload-files", str(broken))
    page.click("#upload-submit")
    message = page.text_content("#upload-error")
    assert "broken.zip is not a readable zip archive" in message and "nothing was stored" in message
    assert runnable_markup(page) == []
    assert site.api("/api/studies").json() == studies_before
    page.context.close()


def test_a_post_without_csrf_token_is_refused(browser, site):
    job_id = pushed_job(site)
    page = logged_in(browser, site, "dora")
    assert page.request.post(f"/jobs/{job_id}/resend", max_redirects=0).status == 403
    assert page.request.post(f"/jobs/{job_id}/resend", form={"csrf_token": "forged"}, max_redirects=0).status == 403
    assert page.request.post("/logout", max_redirects=0).status == 403
    page.goto("/")
    assert "Dashboard" in page.text_content("h1")  # still logged in
    page.context.close()


def raw_get(site: Site, path: str) -> str:
    """An HTTP request with the path exactly as written: clients resolve ../ before sending, attackers do not."""
    host, port = site.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {site.token}\r\n"
                     "Connection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.decode(errors="replace")


def test_dot_dot_in_a_download_path_is_refused(site):
    job_id = pushed_job(site)
    for path in (f"/api/jobs/{job_id}/files/../../../../../../etc/passwd", f"/api/jobs/{job_id}/files/..%2F..%2Fnode.toml",
                 f"/api/jobs/{job_id}/files/%2e%2e%2f%2e%2e%2f%2e%2e%2fnode.toml"):
        answer = raw_get(site, path)
        assert answer.startswith("HTTP/1.1 404"), answer[:200]
        assert "root:" not in answer and "[node]" not in answer


def test_dicom_text_shows_as_text_and_no_page_holds_runnable_markup(browser, site):
    job_id = pushed_job(site)
    site.wait_for_job(job_id)
    stranger = log_in(browser, site, XSS_USER, "whatever-1")  # a failed login: the name goes to the audit trail
    assert "/login" in stranger.url and runnable_markup(stranger) == []  # the login page, the name in its form
    stranger.goto("/login")
    assert runnable_markup(stranger) == []
    stranger.context.close()
    page = logged_in(browser, site, "ada")
    # Every page the app serves (test_web_app.py checks that this is all of them), and the text each must show.
    shown = {"/": (XSS_PATIENT, XSS_SERIES), f"/jobs/{job_id}": (XSS_PATIENT, XSS_SERIES), "/studies": (XSS_PATIENT, XSS_SERIES),
             f"/jobs/{job_id}/viewer": (), "/audit": (XSS_USER,), "/upload": (), "/api/": (), "/jobs/999999": ()}
    for path, texts in shown.items():
        page.goto(path)
        page.wait_for_load_state("networkidle")
        if path.endswith("/viewer"):
            page.wait_for_selector("#viewer[data-ready=true]", timeout=60_000)
        assert runnable_markup(page) == [], path
        text = page_text(page)
        for shown_text in texts:
            assert shown_text in text, (path, shown_text)
    page.context.close()


def test_api_tokens_health_and_metrics(site):
    job_id = pushed_job(site)
    site.wait_for_job(job_id)
    files = sorted((site.root / f"pushed-{SHARED_SEED}").iterdir())
    pushed = [dcmread(path, stop_before_pixels=True) for path in files]
    jobs = site.api("/api/jobs").json()
    assert jobs == json.loads(site.node.rtnode("jobs", "--json").stdout)
    (job,) = [job for job in jobs if job["id"] == job_id]
    # The job holds what storescu pushed, and what the node made of it.
    assert (job["series_instance_uid"], job["study_instance_uid"], job["patient_id"]) == (
        pushed[0].SeriesInstanceUID, pushed[0].StudyInstanceUID, pushed[0].PatientID)
    assert (job["version"], job["status"], job["error"], job["instances"]) == (1, "done", None, len(files))
    assert Path(job["outputs"]["rtstruct"]).is_file() and job["model"]["name"]
    assert [(d["destination"], d["kind"], d["status"]) for d in job["deliveries"][:1]] == [("tps", "rtstruct", "done")]
    assert site.job(job_id) == json.loads(site.node.rtnode("job", str(job_id), "--json").stdout)
    assert httpx.get(site.url + "/api/jobs", timeout=10).status_code == 401
    health = httpx.get(site.url + "/healthz", timeout=10)
    body = health.json()
    assert (body["status"], health.status_code) == ("ok", 200), body  # the worker beats, the SCP listens
    assert body["checks"]["scp"]["ok"] and body["checks"]["database"]["ok"] and body["checks"]["disk"]["ok"]
    metrics = httpx.get(site.url + "/metrics", timeout=10).text
    names = {line.split("{")[0].split(" ")[0] for line in metrics.splitlines() if line and not line.startswith("#")}
    assert names and all(name.startswith("rtnode_") for name in names)
    assert re.search(r'^rtnode_jobs\{status="done"\} [1-9]', metrics, re.M)
    assert re.search(r"^rtnode_instances_received_total [1-9]", metrics, re.M)
    assert re.search(r"^rtnode_inference_seconds_count [1-9]", metrics, re.M)
    assert re.search(r"^rtnode_associations_rejected_total \d", metrics, re.M)


def test_the_audit_trail_names_who_did_what(browser, site):
    """What audrey and val (users of this test alone) and a stranger did appears, each with its target."""
    job_id = pushed_job(site)
    site.wait_for_job(job_id)
    stranger = log_in(browser, site, "mallory", "guessing-1")
    stranger.context.close()
    audrey = logged_in(browser, site, "audrey")
    token = csrf_token(audrey)
    assert audrey.request.get(f"/api/jobs/{job_id}/files/rtstruct").ok
    assert audrey.request.post(f"/api/jobs/{job_id}/resend", headers={"X-CSRF-Token": token}).ok
    notes = {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not DICOM"}
    assert audrey.request.post("/api/upload", multipart={"files": notes}, headers={"X-CSRF-Token": token}).ok
    assert audrey.locator("nav a:has-text('Audit')").count() == 0
    assert audrey.request.get("/audit").status == 403
    audrey.context.close()
    val = logged_in(browser, site, "val")
    val.goto(f"/jobs/{job_id}")
    val.context.close()
    site.wait_for_job(job_id)  # the resend delivered, so that no later test counts it

    page = logged_in(browser, site, "ada")
    page.goto("/audit")
    rows = [row.split("\t")[1:] for row in page.inner_text("#audit tbody").splitlines()]
    patient = site.job(job_id)["patient_id"]
    for expected in (["mallory", "login failed", "", "", LOOPBACK, "wrong user name or password"],
                     ["audrey", "login", "", "", LOOPBACK, ""],
                     ["audrey", "download", f"job {job_id} rtstruct", patient, LOOPBACK, ""],
                     ["audrey", "resend", f"job {job_id}", patient, LOOPBACK, "1 delivery(ies) queued to tps"],
                     ["audrey", "upload", "1 file(s)", "", LOOPBACK, "0 stored, 0 repeated, 1 refused"],
                     ["audrey", "refused", "GET /audit", "", LOOPBACK, "role dosimetrist may not do this (needs admin)"],
                     ["val", "view", f"job {job_id}", patient, LOOPBACK, ""]):
        assert expected in rows, expected
    page.context.close()


def small_series(directory: Path, slices: int) -> list[Path]:
    """A few small CT slices of a series of their own (fewer than completion.min_slices: it is not contoured)."""
    hu = np.full((slices, 16, 16), -1000, dtype=np.int16)
    geometry = SeriesGeometry(pixel_spacing=(1.0, 1.0), slice_positions=uniform_positions(slices, 2.5))
    return write_series(ct_datasets(hu, geometry, PatientStudy(patient_id="REPORT-1")), directory)


def test_upload_report_lists_each_file(browser, site):
    """Stored, repeated and refused, each with its reason, for files dropped without a zip."""
    paths = small_series(site.root / "report", 2)
    notes = site.root / "notes.txt"
    notes.write_text("not DICOM")
    page = logged_in(browser, site, "dora")
    for expected in ({"stored": 2, "repeated": 0}, {"stored": 0, "repeated": 2}):  # the same files twice
        page.goto("/upload")
        page.set_input_files("#upload-files", [str(p) for p in paths] + [str(notes)])
        page.click("#upload-submit")
        page.wait_for_selector("#upload-report")
        assert runnable_markup(page) == []
        for outcome, count in expected.items():
            assert page.locator(f"#upload-files-report tr.outcome-{outcome}").count() == count, outcome
        refused = page.inner_text("#upload-files-report tr.outcome-refused")
        assert "notes.txt" in refused and "not a DICOM file" in refused
    page.context.close()
