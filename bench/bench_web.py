"""The web app's speed: the dashboard's first page with 100,000 jobs in the database, and C-ECHO
latency at the SCP while ten browser-like clients page the viewer's slices (the web app's own
process must not slow receiving). Optionally the README's screenshots, taken by Playwright.

    .venv/bin/python bench/bench_web.py [--jobs 100000] [--clients 10] [--seconds 20] [--screenshots docs/screenshots]

Prints medians and 95th percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import insert

from node.db.engine import open_database
from node.db.models import Job, Series, Study
from node.harness import LOOPBACK, NodeProcess, destination_toml, free_port, wait_for_port
from node.synth.ct_series import ct_datasets
from node.synth.phantom import make_phantom
from node.web.accounts import Role, add_user

PASSWORD = "bench-password-1"
STATUSES = ["done"] * 90 + ["failed"] * 4 + ["rejected"] * 4 + ["queued", "running"]


@dataclass(frozen=True)
class Figures:
    median_ms: float
    p95_ms: float
    count: int

    def line(self, what: str) -> str:
        return f"{what:<58} median {self.median_ms:7.1f} ms   p95 {self.p95_ms:7.1f} ms   (n={self.count})"


def figures(seconds: list[float]) -> Figures:
    ordered = sorted(seconds)
    return Figures(1000 * statistics.median(ordered), 1000 * ordered[int(0.95 * (len(ordered) - 1))], len(ordered))


def fill_jobs(database_url: str, count: int) -> None:
    """`count` jobs over as many series, 100 series a study, in bulk."""
    engine = open_database(database_url, fsync=False)
    now = datetime.now(UTC)
    with engine.begin() as connection:
        connection.execute(insert(Study), [
            {"id": s + 1, "study_instance_uid": f"1.2.826.0.1.{s}", "patient_id": f"P{s:06d}", "patient_name": f"Patient^{s}",
             "study_date": "20261128", "study_description": "Pelvis CT"} for s in range(count // 100 + 1)])
        connection.execute(insert(Series), [
            {"id": k + 1, "series_instance_uid": f"1.2.826.0.2.{k}", "study_id": k // 100 + 1, "modality": "CT",
             "series_description": f"Pelvis {k}"} for k in range(count)])
        connection.execute(insert(Job), [
            {"series_id": k + 1, "version": 1, "status": STATUSES[k % len(STATUSES)], "input_uids": [],
             "input_fingerprint": f"{k:064x}", "inputs_at": now, "created_at": now - timedelta(seconds=count - k),
             "timings": {"pass_1": 5.0}, "outputs": {}} for k in range(count)])
    engine.dispose()


def logged_in_client(url: str, username: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=60)
    response = client.post("/login", data={"username": username, "password": PASSWORD})
    if response.status_code != 303:
        raise SystemExit(f"login failed: {response.status_code} {response.text[:200]}")
    return client


def timed(client: httpx.Client, path: str, repeats: int) -> Figures:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        response = client.get(path)
        seconds.append(time.perf_counter() - start)
        response.raise_for_status()
    return figures(seconds)


def bench_dashboard(jobs: int, work: Path) -> list[str]:
    root = work / "dashboard"
    node = NodeProcess(root=root, port=free_port(), web_port=free_port())
    print(f"filling {jobs} jobs ...", flush=True)
    fill_jobs(node.database_url, jobs)
    add_user(open_database(node.database_url, fsync=False), "admin", Role.ADMIN, PASSWORD)
    web = subprocess.Popen([sys.executable, "-m", "node", "--config", str(node.config_path), "web"], cwd=root)
    try:
        wait_for_port(node.web_port, 60)
        client = logged_in_client(f"http://{LOOPBACK}:{node.web_port}", "admin")
        client.get("/")  # warm
        return [
            timed(client, "/", 20).line(f"dashboard first page (HTML, {jobs} jobs)"),
            timed(client, "/api/dashboard", 20).line("dashboard poll (JSON: figures + first page)"),
            timed(client, f"/?before={jobs // 2}", 20).line("a page in the middle (keyset)"),
            timed(client, "/?status=failed", 20).line("filtered by status"),
            timed(client, "/?patient=P000123", 10).line("filtered by patient"),
            timed(client, "/?text=Pelvis%2099999", 10).line("filtered by text (no index: a scan)"),
        ]
    finally:
        web.terminate()
        web.wait()


def c_echo_seconds(port: int) -> float:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    start = time.perf_counter()
    assoc = ae.associate(LOOPBACK, port, ae_title="RTNODE")
    if not assoc.is_established:
        raise SystemExit("C-ECHO association refused")
    status = assoc.send_c_echo()
    assoc.release()
    elapsed = time.perf_counter() - start
    if status.Status != 0:
        raise SystemExit(f"C-ECHO answered {status.Status:#06x}")
    return elapsed


def echo_for(port: int, seconds: float) -> list[float]:
    samples, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append(c_echo_seconds(port))
        time.sleep(0.1)
    return samples


def page_slices(url: str, job_id: int, count: int, stop: threading.Event, latencies: list[float]) -> None:
    """One browser's worth of paging: each slice's picture and outline, one after the other, as autoplay fetches them."""
    client = logged_in_client(url, "admin")
    index = 0
    while not stop.is_set():
        start = time.perf_counter()
        client.get(f"/api/jobs/{job_id}/slices/{index}.png", params={"preset": "soft"}).raise_for_status()
        client.get(f"/api/jobs/{job_id}/slices/{index}/outline").raise_for_status()
        latencies.append(time.perf_counter() - start)
        index = (index + 1) % count


def push_phantom(port: int) -> None:
    phantom = make_phantom(50_000)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(LOOPBACK, port, ae_title="RTNODE")
    for ds in ct_datasets(phantom.hu, phantom.geometry, phantom.patient):
        assoc.send_c_store(ds)
    assoc.release()


def wait_for_done(client: httpx.Client, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = client.get("/api/jobs").json()
        if jobs and jobs[0]["status"] == "done":
            return jobs[0]
        time.sleep(1)
    raise SystemExit("the phantom's job did not finish")


def bench_echo_under_load(clients: int, seconds: float, work: Path, screenshots: Path | None) -> list[str]:
    tps = work / "tps"
    from node.demo import Receiver

    receiver = Receiver(tps)
    receiver.start()
    node = NodeProcess(root=work / "node", port=free_port(), web_port=free_port(),
                       sections="[completion]\nquiet_seconds = 2.0\n\n" + destination_toml("tps", "TPS", receiver.port))
    add_user(open_database(node.database_url, fsync=False), "admin", Role.ADMIN, PASSWORD)
    node.start(timeout=60)
    url = f"http://{LOOPBACK}:{node.web_port}"
    try:
        wait_for_port(node.web_port, 60)
        push_phantom(node.port)
        client = logged_in_client(url, "admin")
        job = wait_for_done(client)
        count = client.get(f"/api/jobs/{job['id']}/slices").json()["slice_count"]
        idle = figures(echo_for(node.port, seconds / 2))
        stop, latencies = threading.Event(), []
        threads = [threading.Thread(target=page_slices, args=(url, job["id"], count, stop, latencies)) for _ in range(clients)]
        for thread in threads:
            thread.start()
        time.sleep(2)  # every client paging
        loaded = figures(echo_for(node.port, seconds))
        stop.set()
        for thread in threads:
            thread.join()
        lines = [
            idle.line("C-ECHO (associate, echo, release), web app idle"),
            loaded.line(f"C-ECHO while {clients} clients page slices"),
            figures(latencies).line(f"slice picture + outline, each of {clients} clients"),
            f"{'slices served in all':<58} {len(latencies) / seconds:7.1f} per second",
        ]
        if screenshots is not None:
            take_screenshots(url, job["id"], screenshots)
        return lines
    finally:
        node.stop()
        receiver.stop()


def take_screenshots(url: str, job_id: int, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(base_url=url, viewport={"width": 1400, "height": 900})
        page.goto("/login")
        page.fill("input[name=username]", "admin")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_selector("#job-rows")
        page.screenshot(path=str(out / "dashboard.png"), full_page=True)
        page.goto(f"/jobs/{job_id}")
        page.screenshot(path=str(out / "job.png"), full_page=True)
        page.goto(f"/jobs/{job_id}/viewer")
        page.wait_for_selector("#viewer[data-ready=true]")
        page.locator("#first-contour").click()
        page.wait_for_timeout(300)
        for _ in range(8):
            page.keyboard.press("ArrowDown")
        page.wait_for_timeout(800)
        page.screenshot(path=str(out / "viewer.png"), full_page=True)
        browser.close()
    print(f"screenshots in {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long C-ECHO is measured under load")
    parser.add_argument("--screenshots", type=Path, help="also take the README's screenshots into this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rtnode-bench-web-") as folder:
        lines = bench_dashboard(args.jobs, Path(folder))
        lines += bench_echo_under_load(args.clients, args.seconds, Path(folder), args.screenshots)
    print("\n".join(re.sub(r"\s+$", "", line) for line in lines))


if __name__ == "__main__":
    main()
