"""rtnode between two real Orthanc roles (Debian's `orthanc`, run with its own configuration on loopback, no
system service): Orthanc as the PACS pushes a CT series to rtnode through its REST API, and Orthanc as the
destination receives the RT Structure Set, which the test reads back from Orthanc's REST API."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread

from node.harness import LOOPBACK, NodeProcess, destination_toml, free_port
from node.synth.ct_series import ct_datasets, write_series
from node.synth.phantom import make_phantom
from tests.conftest import require_tool

DEBIAN_ORTHANC = Path("/usr/sbin/Orthanc")  # not on PATH for users without /usr/sbin in it
WAIT_SECONDS = 300.0
# Orthanc's log lines start with their level (I, W, E) and the date: "W1128 05:20:59.759417 main.cpp:921] ...".
# Orthanc logs its start-up and shutdown at W ("Orthanc has started"), so only lines after start-up are checked.
LOG_LINE = re.compile(r"^([IWE])\d{4} ")


def orthanc_binary() -> str:
    if shutil.which("Orthanc") is None and os.access(DEBIAN_ORTHANC, os.X_OK):
        return str(DEBIAN_ORTHANC)
    return require_tool("Orthanc")  # skips, or fails under RTNODE_REQUIRE_TOOLS=1


def two_free_ports() -> tuple[int, int]:
    first = free_port()
    while (second := free_port()) == first:
        pass
    return first, second


class Orthanc:
    """One Orthanc process: its JSON configuration (`settings` added to it), index, storage and log file under
    `root`; loopback only."""

    def __init__(self, root: Path, modalities: dict[str, list], settings: dict | None = None) -> None:
        self.root, self.modalities, self.settings = root, modalities, settings or {}
        self.http_port, self.dicom_port = two_free_ports()
        self.log_path = root / "orthanc.log"
        self.process: subprocess.Popen | None = None
        # No proxy for loopback, whatever the environment says.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def start(self, timeout: float = 30.0) -> Orthanc:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "orthanc.json"
        config.write_text(json.dumps({
            "Name": "rtnode-test",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "DicomModalities": self.modalities,
            "Plugins": [],
            **self.settings,
        }, indent=1))
        self.process = subprocess.Popen(
            [orthanc_binary(), "--verbose", f"--logfile={self.log_path}", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.root,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get("/system")
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Orthanc did not answer on port {self.http_port}:\n{self.log()[-3000:]}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        request = urllib.request.Request(f"http://{LOOPBACK}:{self.http_port}{path}", data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", content_type)
        with self.opener.open(request, timeout=120) as response:
            return json.loads(response.read())

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, payload) -> dict | list:
        if isinstance(payload, bytes):
            return self.request("POST", path, payload, "application/dicom")
        return self.request("POST", path, json.dumps(payload).encode())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def warnings_since_start(self) -> list[str]:
        """W and E lines after "Orthanc has started" (Orthanc logs its own start-up and shutdown at W)."""
        lines = self.log().splitlines()
        started = next(i for i, line in enumerate(lines) if line.endswith("] Orthanc has started"))
        return [line for line in lines[started + 1:] if (m := LOG_LINE.match(line)) and m.group(1) in "WE"]

    def rtstruct_series(self) -> list[str]:
        return self.post("/tools/find", {"Level": "Series", "Query": {"Modality": "RTSTRUCT"}})


@pytest.fixture
def orthanc_factory(tmp_path):
    started: list[Orthanc] = []

    def make(name: str, modalities: dict[str, list]) -> Orthanc:
        orthanc = Orthanc(tmp_path / name, modalities)
        started.append(orthanc)
        return orthanc.start()

    yield make
    for orthanc in started:
        orthanc.stop()


def jobs(node: NodeProcess) -> list[dict]:
    result = node.rtnode("jobs", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_orthanc_pushes_ct_and_receives_the_rtstruct(node_factory, orthanc_factory, tmp_path):
    orthanc_binary()  # skip before anything starts when Orthanc is absent
    tps = orthanc_factory("tps", {})  # the destination, before the node that names its port
    node = node_factory(
        sections="[completion]\nquiet_seconds = 3\nmin_slices = 10\n" + destination_toml("orthanc", "ORTHANC", tps.dicom_port),
        allowed_callers=f'[{{ ae_title = "ORTHANC", host = "{LOOPBACK}" }}]',  # Orthanc calls as its DicomAet
    )
    pacs = orthanc_factory("pacs", {"rtnode": ["RTNODE", LOOPBACK, node.port]})
    node.start()

    phantom = make_phantom(40101)
    files = write_series(ct_datasets(phantom.hu, phantom.geometry, phantom.patient), tmp_path / "ct")
    ct = dcmread(files[0], stop_before_pixels=True)
    uploaded = [pacs.post("/instances", path.read_bytes()) for path in files]
    assert {u["Status"] for u in uploaded} == {"Success"}
    (series_id,) = {u["ParentSeries"] for u in uploaded}

    # Orthanc as the PACS: a synchronous C-STORE of the whole series to rtnode.
    pushed = pacs.post("/modalities/rtnode/store", {"Resources": [series_id], "Synchronous": True})
    assert pushed["FailedInstancesCount"] == 0 and pushed["InstancesCount"] == len(files), pushed

    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        current = jobs(node)
        if current and current[0]["status"] in ("done", "failed", "rejected") and tps.rtstruct_series():
            break
        if current and current[0]["status"] in ("failed", "rejected"):
            pytest.fail(f"the job did not succeed: {json.dumps(current, indent=1)}\n{node.log()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no RT Structure Set in Orthanc after {WAIT_SECONDS} s: jobs {json.dumps(current, indent=1)}\n"
                        f"--- node log ---\n{node.log()[-3000:]}\n--- Orthanc log ---\n{tps.log()[-3000:]}")
        time.sleep(1.0)

    (job,) = jobs(node)
    assert job["status"] == "done" and job["instances"] == len(files), job
    (delivery,) = job["deliveries"]
    assert (delivery["destination"], delivery["kind"], delivery["status"]) == ("orthanc", "rtstruct", "done"), delivery

    # Orthanc as the destination: what it filed, read back through its REST API.
    (rtstruct_series,) = tps.rtstruct_series()
    (instance_id,) = tps.get(f"/series/{rtstruct_series}")["Instances"]
    tags = tps.get(f"/instances/{instance_id}/tags?simplify")
    assert tags["Modality"] == "RTSTRUCT" and tags["ApprovalStatus"] == "UNAPPROVED"
    assert tags["StudyInstanceUID"] == ct.StudyInstanceUID and tags["PatientID"] == ct.PatientID
    (frame,) = tags["ReferencedFrameOfReferenceSequence"]
    assert frame["FrameOfReferenceUID"] == ct.FrameOfReferenceUID
    (study,) = frame["RTReferencedStudySequence"]
    (referenced,) = study["RTReferencedSeriesSequence"]
    assert referenced["SeriesInstanceUID"] == ct.SeriesInstanceUID
    assert len(referenced["ContourImageSequence"]) == len(files)
    assert tps.get(f"/instances/{instance_id}/metadata?expand")["RemoteAET"] == "RTNODE"

    # Neither Orthanc warned about anything while it ran: with --verbose the store itself is logged at I
    # ("Incoming Store request from AET RTNODE"); a W or E line after start-up would be about our instances.
    assert "Incoming Store request from AET RTNODE" in tps.log(), tps.log()[-3000:]
    assert "Sending instance" in pacs.log(), pacs.log()[-3000:]
    for orthanc in (pacs, tps):
        assert not orthanc.warnings_since_start(), "\n".join(orthanc.warnings_since_start())
