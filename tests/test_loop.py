"""The whole loop with real peers: DCMTK storescu as the scanner, DCMTK storescp as the planning system;
repeats, reruns, restarts and crashes included."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from node.config import BUNDLED_WEIGHTS
from node.harness import DCMTK_ENV, NodeProcess, free_port, wait_for_port
from node.synth.ct_series import PatientStudy, SeriesGeometry, ct_datasets, uniform_positions, write_series
from node.synth.phantom import make_phantom
from node.vocabulary import DeliveryStatus, JobStatus
from tests.conftest import require_tool, run_tool

QUIET = 3.0


class Receiver:
    """DCMTK storescp standing in for the treatment planning system."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory, self.port = directory, port
        self.process: subprocess.Popen | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def start(self) -> Receiver:
        self.process = subprocess.Popen(
            [require_tool("storescp"), "-aet", "TPS", "+uf", "-od", str(self.directory), str(self.port)],
            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait()

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.is_file())


@pytest.fixture
def tps(tmp_path):
    receiver = Receiver(tmp_path / "tps", free_port())
    yield receiver
    receiver.stop()


@pytest.fixture
def loop_node(node_factory, tps):
    def make(allowed_log_problems: tuple[str, ...] = (), models: str = "", **completion) -> NodeProcess:
        """`models`: [[models]] entries (TOML) in place of the built-in model alone."""
        settings = {"quiet_seconds": QUIET, "min_slices": 10, "release_grace_seconds": 1.0, **completion}
        sections = "[completion]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
        sections += "[delivery]\nfirst_retry_seconds = 1.0\nmax_retry_seconds = 2.0\n"
        sections += f'[[destinations]]\nname = "tps"\nae_title = "TPS"\nhost = "127.0.0.1"\nport = {tps.port}\n'
        return node_factory(sections=sections + models, allowed_log_problems=allowed_log_problems)

    return make


def phantom_series(directory: Path, seed: int) -> list[Path]:
    phantom = make_phantom(seed)
    return write_series(ct_datasets(phantom.hu, phantom.geometry, phantom.patient), directory)


def push(node: NodeProcess, files, *options: str) -> None:
    paths = [str(p) for p in files] if isinstance(files, list) else [str(files)]
    storescu = require_tool("storescu")
    result = run_tool(storescu, "-aet", "SCANNER", "-aec", "RTNODE", *options, "127.0.0.1", str(node.port), *paths)
    assert result.returncode == 0, result.stderr


def jobs(node: NodeProcess) -> list[dict]:
    result = node.rtnode("jobs", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def peek(node: NodeProcess) -> list[dict]:
    """The job rows straight from SQLite: fast enough to catch a job while it runs."""
    if not node.database.exists():
        return []
    with sqlite3.connect(node.database, timeout=10) as connection:
        rows = connection.execute(
            "select id, status, version, input_uids, error, superseded_by from jobs order by id desc"
        ).fetchall()
        deliveries = connection.execute("select job_id, status, attempts from deliveries order by id").fetchall()
    return [
        {
            "id": job_id, "status": status, "version": version, "instances": len(json.loads(uids)), "error": error,
            "superseded_by": superseded_by,
            "deliveries": [{"status": s, "attempts": a} for j, s, a in deliveries if j == job_id],
        }
        for job_id, status, version, uids, error, superseded_by in rows
    ]


def wait_for(node: NodeProcess, predicate, timeout: float = 180.0, what: str = "condition") -> list[dict]:
    """Poll the job rows until `predicate(rows)` holds; returns the rows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            current = peek(node)
        except sqlite3.OperationalError:
            current = []
        if predicate(current):
            return current
        time.sleep(0.1)
    raise AssertionError(
        f"timed out waiting for {what}: jobs {json.dumps(jobs(node), indent=1)}\n--- node log ---\n{node.log()[-5000:]}"
    )


def node_running_a_job(loop_node, tps, tmp_path: Path, seed: int, allowed_log_problems: tuple[str, ...] = ()) -> NodeProcess:
    """A node (and the TPS) with a phantom series pushed, once its job has started."""
    node = loop_node(allowed_log_problems).start()
    tps.start()
    phantom_series(tmp_path / "ct", seed=seed)
    push(node, tmp_path / "ct", "+sd")
    wait_for(node, lambda j: j and j[0]["status"] == "running", what="the job to run")
    return node


def settled(current: list[dict], count: int = 1) -> bool:
    return len(current) >= count and all(j["status"] in ("done", "failed", "rejected") for j in current)


def test_pushed_series_comes_back_as_rtstruct(loop_node, tps, tmp_path):
    node = loop_node().start()
    tps.start()
    sent = phantom_series(tmp_path / "ct", seed=40001)
    push(node, tmp_path / "ct", "+sd")
    wait_for(node, settled, what="the job to finish")
    (job,) = jobs(node)
    assert job["status"] == "done", job
    for stage in ("load", "preprocess", "pass_1", "pass_2", "postprocess", "rtstruct", "outputs", "send"):
        assert stage in job["timings"], stage
    assert job["deliveries"] == [dict(job["deliveries"][0], destination="tps", status="done", attempts=1)]
    assert Path(job["outputs"]["qa"]).stat().st_size > 1000

    (received,) = tps.files()
    rs = dcmread(received)
    assert rs.Modality == "RTSTRUCT" and rs.ApprovalStatus == "UNAPPROVED"
    (frame,) = rs.ReferencedFrameOfReferenceSequence
    images = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence
    assert {i.ReferencedSOPInstanceUID for i in images} == {dcmread(p).SOPInstanceUID for p in sent}
    validation = subprocess.run([require_tool("dciodvfy"), str(received)], capture_output=True, text=True)
    assert not [line for line in validation.stderr.splitlines() if line.startswith("Error")]

    detail = json.loads(node.rtnode("job", str(job["id"]), "--json").stdout)
    assert [e["event"] for e in detail["events"]][:2] == ["queued", "started"] and detail["events"][-1]["event"] == "done"

    resent = node.rtnode("resend", str(job["id"]))
    assert resent.returncode == 0, resent.stderr
    wait_for(node, lambda j: settled(j) and len(j[0]["deliveries"]) == 2, what="the resend")
    assert len(tps.files()) == 2 and {dcmread(p).SOPInstanceUID for p in tps.files()} == {rs.SOPInstanceUID}


def test_series_over_three_associations_makes_one_job_and_sends_one_structure_set_of_all_its_slices(loop_node, tps, tmp_path):
    """Each third looks complete when its association is released, so a job starts at once; what it makes of fewer
    slices is never sent (it waits for the series to be quiet for the grace); the one job runs again with all."""
    node = loop_node(release_grace_seconds=2.0).start()
    tps.start()
    files = phantom_series(tmp_path / "ct", seed=40002)
    thirds = np.array_split(np.array(files, dtype=object), 3)
    for part in thirds:
        push(node, list(part))
        time.sleep(1.0)  # shorter than the quiet time (3 s) and the grace (2 s)
    wait_for(node, settled, what="the job to finish")
    current = jobs(node)
    assert len(current) == 1 and current[0]["instances"] == len(files) and current[0]["status"] == "done"
    (sent,) = tps.files()
    (referenced,) = dcmread(sent).ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence
    assert len(referenced.ContourImageSequence) == len(files)


def events_of(node: NodeProcess, job_id: int) -> list[str]:
    with sqlite3.connect(node.database, timeout=10) as connection:
        return [e for (e,) in connection.execute("select event from job_events where job_id = ? order by id", (job_id,))]


def test_unchanged_resend_is_a_repeat_and_rerun_makes_version_two_that_supersedes(loop_node, tps, tmp_path):
    node = loop_node().start()
    tps.start()
    phantom_series(tmp_path / "ct", seed=40003)
    push(node, tmp_path / "ct", "+sd")
    first = wait_for(node, lambda j: settled(j) and j[0]["status"] == "done", what="version 1")[0]
    push(node, tmp_path / "ct", "+sd")  # the same instances again
    deadline = time.monotonic() + 60
    while "repeat" not in events_of(node, first["id"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert events_of(node, first["id"])[-1] == "repeat" and len(jobs(node)) == 1
    result = node.rtnode("rerun", str(first["id"]))
    assert result.returncode == 0, result.stderr
    wait_for(node, lambda j: settled(j, 2), what="version 2")
    newest, oldest = jobs(node)
    assert (oldest["version"], newest["version"]) == (1, 2)
    assert newest["status"] == "done" and oldest["superseded_by"] == newest["id"]
    assert newest["input_fingerprint"] == oldest["input_fingerprint"]
    descriptions = sorted(dcmread(p).SeriesDescription for p in tps.files())
    assert len(descriptions) == 2 and "v2, supersedes v1" in descriptions[-1]


def test_receiver_down_then_up_delivers_exactly_once(loop_node, tps, tmp_path):
    """The attempts while the planning system is down are WARNINGs of the delivery, no ERROR (the log check)."""
    node = loop_node().start()
    phantom_series(tmp_path / "ct", seed=40004)
    push(node, tmp_path / "ct", "+sd")
    wait_for(node, lambda j: j and j[0]["deliveries"] and j[0]["deliveries"][0]["attempts"] >= 2, what="failed attempts")
    tps.start()
    wait_for(node, settled, what="delivery")
    (job,) = jobs(node)
    assert job["status"] == "done"
    (delivery,) = job["deliveries"]
    assert delivery["status"] == "done" and delivery["attempts"] >= 3
    time.sleep(2)
    assert len(tps.files()) == 1


def test_sigkill_during_inference_then_restart(loop_node, tps, tmp_path):
    node = node_running_a_job(loop_node, tps, tmp_path, seed=40005)
    node.kill()
    time.sleep(1)
    node.start()
    wait_for(node, settled, what="the job after restart")
    (job,) = jobs(node)
    assert job["status"] == "done"
    detail = json.loads(node.rtnode("job", str(job["id"]), "--json").stdout)
    assert "requeued" in [e["event"] for e in detail["events"]]
    time.sleep(2)
    assert len(tps.files()) == 1


def small_series(
    directory: Path, *, slices: int = 24, modality_mr: bool = False, localizer: bool = False, gap: bool = False
) -> list[Path]:
    geometry = SeriesGeometry(pixel_spacing=(1.5, 1.5), slice_positions=uniform_positions(slices, 3.0), origin=(-96, -96, -40))
    datasets = ct_datasets(np.full((slices, 128, 128), -1000.0), geometry, PatientStudy())
    if gap:
        del datasets[slices // 2]
    for ds in datasets:
        if modality_mr:
            ds.Modality = "MR"
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        if localizer:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    return write_series(datasets, directory)


def test_rejections_failures_and_the_next_series(loop_node, tps, tmp_path):
    failed = (r"node.lifecycle: job \d+ .*: failed slices differ in size \(rows, columns\): \[128, 128\] in SOP Instance",
              r"node.lifecycle: job \d+ .*: failed series \S+ has a gap between z=-7.0 and z=-1.0 mm")
    node = loop_node(failed).start()
    tps.start()
    push(node, small_series(tmp_path / "mr", modality_mr=True))
    push(node, small_series(tmp_path / "scout", localizer=True))
    push(node, small_series(tmp_path / "gap", gap=True))
    broken = small_series(tmp_path / "broken")
    odd = dcmread(broken[5])
    odd.Rows, odd.Columns = 64, 64
    odd.PixelData = odd.PixelData[: 64 * 64 * 2]
    odd.save_as(broken[5])
    push(node, broken)
    wait_for(node, lambda j: settled(j, 4), what="four series to settle")
    phantom_series(tmp_path / "ct", seed=40006)
    push(node, tmp_path / "ct", "+sd")
    wait_for(node, lambda j: settled(j, 5), what="the good series after the bad ones")
    current = jobs(node)
    by_status = {}
    for job in current:
        by_status.setdefault(job["status"], []).append(job)
    assert len(by_status["rejected"]) == 2
    reasons = " ".join(j["error"] for j in by_status["rejected"])
    assert "is MR" in reasons and "not CT Image" in reasons and "localizer" in reasons
    failed = " ".join(j["error"] for j in by_status["failed"])
    assert "has a gap between z=" in failed and "slice spacing 3.00 mm" in failed
    assert "slices differ in size" in failed
    assert [j["status"] for j in current if j["instances"] > 24] == ["done"]


def test_echo_stays_fast_while_a_job_runs(loop_node, tps, tmp_path):
    node = node_running_a_job(loop_node, tps, tmp_path, seed=40007)
    echoscu = require_tool("echoscu")
    times = []
    for _ in range(5):
        start = time.perf_counter()
        result = subprocess.run([echoscu, "-aec", "RTNODE", "127.0.0.1", str(node.port)], env=DCMTK_ENV, capture_output=True)
        times.append(time.perf_counter() - start)
        assert result.returncode == 0
    assert jobs(node)[0]["status"] in ("running", "sending", "done")
    # One pass of the model takes seconds on this CPU: an echo that waited for the job would take longer than this.
    assert max(times) < 1.0, times


def test_demo_runs_the_whole_loop(tmp_path):
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "node", "demo", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RT Structure Set received" in result.stdout
    with sqlite3.connect(workdir / "rtnode.sqlite3") as connection:
        (job,) = connection.execute("select id, status, error, outputs from jobs").fetchall()
        deliveries = connection.execute(
            "select job_id, destination, kind, status, attempts, sop_instance_uid from deliveries"
        ).fetchall()
    job_id, status, error, outputs = job
    assert (status, error) == (JobStatus.DONE, ""), result.stdout
    (received,) = (workdir / "tps").iterdir()
    rs = dcmread(received)
    assert deliveries == [(job_id, "tps", "rtstruct", DeliveryStatus.DONE, 1, rs.SOPInstanceUID)]
    assert rs.ApprovalStatus == "UNAPPROVED"
    qa = Path(json.loads(outputs)["qa"])
    assert qa == workdir / "data" / "jobs" / "1" / "attempt-1" / "qa.png" and qa.is_file()
    assert re.search(rf"the node and its web app have stopped; {re.escape(str(workdir))} holds \d+ MB", result.stdout)

    again = subprocess.run(  # a second demo in the same folder is a new series with a job of its own
        [sys.executable, "-m", "node", "demo", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    with sqlite3.connect(workdir / "rtnode.sqlite3") as connection:
        assert connection.execute("select id, version, status from jobs order by id").fetchall() == [
            (1, 1, JobStatus.DONE), (2, 1, JobStatus.DONE)
        ]
    assert len(list((workdir / "tps").iterdir())) == 2


# --- restarts and crashes: a node killed while a job runs is not the job's fault; a worker that
# dies under a job three times fails it; unusable weights are found at start-up, receiving goes on


def worker_pid(node: NodeProcess, timeout: float = 30.0) -> int:
    """The `rtnode worker` child of the node process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{node.process.pid}/task/{node.process.pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise AssertionError(f"no worker process under {node.process.pid}")


def starts(node: NodeProcess) -> int:
    """How often the node's one job has been taken up by a worker."""
    with sqlite3.connect(node.database, timeout=10) as connection:
        return connection.execute("select count(*) from job_events where event = 'started'").fetchone()[0]


def test_node_killed_three_times_while_a_job_runs_still_finishes_it(loop_node, tps, tmp_path):
    node = node_running_a_job(loop_node, tps, tmp_path, seed=40010)
    for attempt in range(2, 5):
        node.kill()  # the worker dies with it
        node.start()
        wait_for(node, lambda j, n=attempt: starts(node) == n and j[0]["status"] == "running", what=f"attempt {attempt}")
    node.kill()
    node.start()
    wait_for(node, settled, what="the job after the restarts")
    (job,) = jobs(node)
    assert job["status"] == "done", job
    detail = json.loads(node.rtnode("job", str(job["id"]), "--json").stdout)
    requeued = [e["detail"] for e in detail["events"] if e["event"] == "requeued"]
    assert requeued == ["the node restarted while this job ran (not counted as a crash)"] * 4


def test_a_worker_that_dies_under_a_job_three_times_fails_it(loop_node, tps, tmp_path):
    died = (r"node.service: worker process \S+ exited with status -9: starting a new one",
            r"node.lifecycle: job 1 .*: failed the worker stopped 3 times while running this job: not retried")
    node = node_running_a_job(loop_node, tps, tmp_path, seed=40011, allowed_log_problems=died)
    for attempt in range(1, 4):
        wait_for(node, lambda j, n=attempt: starts(node) == n and j[0]["status"] == "running", what=f"attempt {attempt}")
        os.kill(worker_pid(node), signal.SIGKILL)  # the node stays up
    wait_for(node, settled, what="the job to fail")
    (job,) = jobs(node)
    assert job["status"] == "failed" and "the worker stopped 3 times while running this job" in job["error"], job
    assert len(re.findall(r"worker process \S+ exited with status -9", node.log())) == 3


def test_unusable_weights_are_found_at_start_up_and_receiving_goes_on(node_factory, tmp_path):
    weights = tmp_path / "weights" / BUNDLED_WEIGHTS.name
    weights.parent.mkdir()
    shutil.copy(BUNDLED_WEIGHTS.with_suffix(".json"), weights.with_suffix(".json"))
    damaged = bytearray(BUNDLED_WEIGHTS.read_bytes())
    damaged[-100] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    unusable = (r"the worker does not take jobs: the model cannot be used: weights \S+ do not match their model card",)
    sections = "[completion]\nquiet_seconds = 1.0\nmin_slices = 10\n"
    node = node_factory(weights=weights, sections=sections, allowed_log_problems=unusable).start()
    deadline = time.monotonic() + 60
    while "the worker does not take jobs" not in node.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "the worker does not take jobs: the model cannot be used: weights" in node.log()
    assert "do not match their model card" in node.log()
    with sqlite3.connect(node.database) as connection:  # what /healthz and the dashboard report
        (problem,) = connection.execute("select model_problem from workers where stopped_at is null").fetchone()
    assert problem.startswith("the model cannot be used: weights ") and "do not match their model card" in problem
    assert run_tool(require_tool("echoscu"), "-aec", "RTNODE", "127.0.0.1", str(node.port)).returncode == 0
    phantom_series(tmp_path / "ct", seed=40012)
    push(node, tmp_path / "ct", "+sd")
    wait_for(node, lambda j: len(j) == 1, what="the job")
    time.sleep(3)
    assert [j["status"] for j in peek(node)] == ["queued"]  # waits for usable weights, not failed
