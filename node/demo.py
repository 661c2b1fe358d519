"""`rtnode demo`: the whole loop on one machine, with nothing but the set-up.

A node with a temporary configuration, a local receiver standing in for the planning
system, a generated phantom CT pushed by C-STORE, and the RT Structure Set coming back.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, RTStructureSetStorage

from node.db.engine import make_engine
from node.imaging.metrics import dice, hd95
from node.imaging.nifti import read_mask
from node.imaging.volume import load_series_dir
from node.joblog import list_jobs, summary_line
from node.synth.ct_series import ct_datasets, write_series
from node.synth.phantom import make_phantom

DEMO_SEED = 50_000  # far from the bundled weights' training seeds


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Receiver:
    """A pynetdicom Storage SCP for RT Structure Sets: the stand-in planning system."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.received = threading.Event()
        self.port = _free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self._ae = AE(ae_title="TPS")
        self._ae.add_supported_context(RTStructureSetStorage)

    def _store(self, event) -> int:
        path = self.directory / f"RS.{event.request.AffectedSOPInstanceUID}.dcm"
        path.write_bytes(event.encoded_dataset())
        self.received.set()
        return 0x0000

    def start(self) -> None:
        self._ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def stop(self) -> None:
        self._ae.shutdown()


def _wait_for_port(port: int, timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the node did not start listening on port {port}")


def run_demo(workdir: Path | None, weights: Path, timeout: float = 600.0) -> int:
    root = workdir or Path(tempfile.mkdtemp(prefix="rtnode-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    receiver = Receiver(root / "tps")
    receiver.start()
    port = _free_port()
    config = root / "node.toml"
    config.write_text(
        f"""[node]
ae_title = "RTNODE"
host = "127.0.0.1"
port = {port}
data_dir = "{root / 'data'}"
database_url = "sqlite:///{root / 'rtnode.sqlite3'}"

[completion]
quiet_seconds = 3.0

[model]
weights = "{weights.resolve()}"

[[destinations]]
name = "tps"
ae_title = "TPS"
host = "127.0.0.1"
port = {receiver.port}
"""
    )
    print(f"demo folder: {root}")
    log = (root / "node.log").open("w")
    node = subprocess.Popen([sys.executable, "-m", "node", "--config", str(config), "serve"], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, 60)
        print(f"node listening as RTNODE on 127.0.0.1:{port}; stand-in planning system TPS on port {receiver.port}")
        phantom = make_phantom(DEMO_SEED)
        datasets = ct_datasets(phantom.hu, phantom.geometry, phantom.patient)
        write_series(datasets, root / "ct")
        print(f"generated phantom CT: {len(datasets)} slices {phantom.hu.shape[1]}x{phantom.hu.shape[2]} in {root / 'ct'}")

        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="RTNODE")
        if not assoc.is_established:
            raise RuntimeError("the node refused the demo's association")
        statuses = {assoc.send_c_store(ds).Status for ds in datasets}
        assoc.release()
        sent_at = time.perf_counter()
        if statuses != {0}:
            raise RuntimeError(f"C-STORE answered {sorted(statuses)}")
        print(f"sent {len(datasets)} slices by C-STORE; waiting for the RT Structure Set ...")

        if not receiver.received.wait(timeout):
            print(f"rtnode demo: no RT Structure Set arrived within {timeout:.0f} s; see {root / 'node.log'}", file=sys.stderr)
            return 1
        latency = time.perf_counter() - sent_at
        time.sleep(0.5)  # let the sender record the delivery
        (job,) = list_jobs(make_engine(f"sqlite:///{root / 'rtnode.sqlite3'}"), limit=1)
        received = sorted(receiver.directory.iterdir())[-1]
        print(f"RT Structure Set received {latency:.1f} s after the last slice was acknowledged")
        print(summary_line(job))
        print(f"RT Structure Set at the planning system: {received}")
        print(f"job outputs: {job['outputs']['rtstruct']}\nQA picture:  {job['outputs']['qa']}")
        volume = load_series_dir(root / "ct")
        mask = read_mask(Path(job["outputs"]["mask"]), volume)
        print(f"against the phantom's ground truth: Dice {dice(mask, phantom.ctv):.3f}, HD95 {hd95(mask, phantom.ctv, volume.spacing):.1f} mm")
        rs = dcmread(received)
        print(f"ApprovalStatus {rs.ApprovalStatus}; ROI {rs.StructureSetROISequence[0].ROIName!r} by "
              f"{rs.StructureSetROISequence[0].ROIGenerationDescription}")
        return 0
    finally:
        node.terminate()
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
        receiver.stop()
        log.close()
