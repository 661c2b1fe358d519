"""`rtnode demo`: the whole loop on one machine, with nothing but the set-up.

A node with a temporary configuration, a local receiver standing in for the planning
system, a generated phantom CT pushed by C-STORE, and the RT Structure Set coming back.
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.status import Status

from node.db.engine import make_engine
from node.harness import LOOPBACK, NodeProcess, destination_toml, free_port
from node.imaging.metrics import dice, hd95
from node.imaging.nifti import read_mask
from node.imaging.volume import load_series_dir
from node.joblog import list_jobs, summary_line
from node.synth.ct_series import ct_datasets, write_series
from node.synth.phantom import make_phantom
from node.vocabulary import JobStatus

DEMO_SEED = 50_000  # far from the bundled weights' training seeds


class Receiver:
    """A pynetdicom Storage SCP for RT Structure Sets: the stand-in planning system."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.received = threading.Event()
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self._ae = AE(ae_title="TPS")
        self._ae.add_supported_context(RTStructureSetStorage)

    def _store(self, event) -> int:
        path = self.directory / f"RS.{event.request.AffectedSOPInstanceUID}.dcm"
        path.write_bytes(event.encoded_dataset())
        self.received.set()
        return Status.SUCCESS

    def start(self) -> None:
        self._ae.start_server((LOOPBACK, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def stop(self) -> None:
        self._ae.shutdown()


def _wait_for_structure_set(receiver: Receiver, engine, timeout: float) -> str | None:
    """Waits until the planning system has the structure set; returns why not instead, as soon as the
    job has ended without one (failed, rejected) or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not receiver.received.wait(0.5):
        jobs = list_jobs(engine, limit=1)
        if jobs and jobs[0]["status"] in (JobStatus.FAILED, JobStatus.REJECTED):
            return f"job {jobs[0]['id']} {jobs[0]['status']}: {jobs[0]['error']}"
        if time.monotonic() > deadline:
            return f"no RT Structure Set arrived within {timeout:.0f} s"
    return None


def _folder_size_mb(root: Path) -> float:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file()) / 1e6


def _settled_job(engine, timeout: float = 30.0) -> dict:
    """The demo's job once the sender has recorded the delivery (it stores, then records)."""
    deadline = time.monotonic() + timeout
    while True:
        (job,) = list_jobs(engine, limit=1)
        if job["status"] != JobStatus.SENDING or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


@dataclass(frozen=True)
class DemoAccount:
    username: str
    password: str


def _throwaway_account(node: NodeProcess) -> DemoAccount:
    """An admin for this demo's database only: rtnode has no default account, so the demo makes one and prints it."""
    account = DemoAccount(f"demo-{secrets.token_hex(3)}", secrets.token_urlsafe(12))
    result = subprocess.run(
        [sys.executable, "-m", "node", "--config", str(node.config_path), "user", "add", account.username, "--role", "admin"],
        input=account.password + "\n", capture_output=True, text=True, timeout=120, cwd=node.root,
    )
    if result.returncode != 0:
        raise RuntimeError(f"could not create the demo account: {result.stderr.strip()}")
    return account


def run_demo(workdir: Path | None, weights: Path, timeout: float = 600.0) -> int:
    root = workdir or Path(tempfile.mkdtemp(prefix="rtnode-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    receiver = Receiver(root / "tps")
    receiver.start()
    node = NodeProcess(
        root=root,
        port=free_port(),
        sections="[completion]\nquiet_seconds = 3.0\n\n" + destination_toml("tps", "TPS", receiver.port),
        weights=weights.resolve(),
        device="auto",
        network_timeout_seconds=60.0,
        shutdown_grace_seconds=30.0,
        web_port=free_port(),
    )
    print(f"demo folder: {root}")
    try:
        account = _throwaway_account(node)
        node.start(timeout=60)
        print(f"node listening as RTNODE on {LOOPBACK}:{node.port}; stand-in planning system TPS on port {receiver.port}")
        print(f"web app, while the demo runs: http://{LOOPBACK}:{node.web_port}/ (throw-away account "
              f"{account.username!r}, password {account.password!r}, role admin; it goes with the demo folder)")
        phantom = make_phantom(DEMO_SEED)
        # A study and series of their own each run: a second demo in the same folder is a new series, not
        # the same one again with other slices.
        patient = dataclasses.replace(phantom.patient, study_instance_uid=generate_uid(), series_instance_uid=generate_uid())
        datasets = ct_datasets(phantom.hu, phantom.geometry, patient)
        shutil.rmtree(root / "ct", ignore_errors=True)
        write_series(datasets, root / "ct")
        print(f"generated phantom CT: {len(datasets)} slices {phantom.hu.shape[1]}x{phantom.hu.shape[2]} in {root / 'ct'}")

        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate(LOOPBACK, node.port, ae_title="RTNODE")
        if not assoc.is_established:
            raise RuntimeError("the node refused the demo's association")
        statuses = {assoc.send_c_store(ds).Status for ds in datasets}
        assoc.release()
        sent_at = time.perf_counter()
        if statuses != {0}:
            raise RuntimeError(f"C-STORE answered {sorted(statuses)}")
        print(f"sent {len(datasets)} slices by C-STORE; waiting for the RT Structure Set ...")

        engine = make_engine(node.database_url)
        why_not = _wait_for_structure_set(receiver, engine, timeout)
        if why_not is not None:
            print(f"rtnode demo: {why_not}; see {node.log_path}", file=sys.stderr)
            return 1
        latency = time.perf_counter() - sent_at
        job = _settled_job(engine)
        received = sorted(receiver.directory.iterdir())[-1]
        print(f"RT Structure Set received {latency:.1f} s after the last slice was acknowledged")
        print(summary_line(job))
        print(f"RT Structure Set at the planning system: {received}")
        print(f"job outputs: {job['outputs']['rtstruct']}\nQA picture:  {job['outputs']['qa']}")
        volume = load_series_dir(root / "ct")
        mask = read_mask(Path(job["outputs"]["mask"]), volume)
        agreement = f"Dice {dice(mask, phantom.ctv):.3f}, HD95 {hd95(mask, phantom.ctv, volume.spacing):.1f} mm"
        print(f"against the phantom's ground truth: {agreement}")
        rs = dcmread(received)
        print(f"ApprovalStatus {rs.ApprovalStatus}; ROI {rs.StructureSetROISequence[0].ROIName!r} by "
              f"{rs.StructureSetROISequence[0].ROIGenerationDescription}")
        return 0
    finally:
        node.stop()
        receiver.stop()
        print(f"the node and its web app have stopped; {root} holds {_folder_size_mb(root):.0f} MB"
              " (received CT, outputs, database): remove it when done")
