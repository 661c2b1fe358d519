"""Several receiving processes (`node.receivers`, PostgreSQL only): senders pushing at once are stored
whole, a killed one comes back, and a series spread over associations that different processes took
makes one job."""

from __future__ import annotations

import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO

from pydicom import dcmread
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.completion import CompletionTracker
from node.config import parse_config
from node.db.models import Job
from node.harness import NodeProcess
from node.lifecycle.jobs import claim_next
from node.lifecycle.workers import WorkerIdentity
from node.store import CallingPeer, InstanceStore
from node.synth.ct_series import write_cylinder_ct
from tests.conftest import new_postgres_database, wait_until
from tests.test_loop import jobs, push

SENDER = CallingPeer("SCANNER", "127.0.0.1")
COMPLETION = "[completion]\nquiet_seconds = 3.0\nmin_slices = 10\nrelease_grace_seconds = 2.0\n"


def receiving_children(node: NodeProcess) -> list[int]:
    """The `rtnode receive` processes `rtnode serve` started."""
    found = subprocess.run(["pgrep", "-P", str(node.process.pid), "-f", "node .* receive"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def test_two_processes_store_four_series_pushed_at_once_and_a_killed_one_comes_back(node_factory, postgres_server, tmp_path):
    url = new_postgres_database(postgres_server)
    killed = (r"node.service: a receiving process exited with status -9: starting it again",)
    node = node_factory(
        database_url=url, extra_config="receivers = 2\nlocal_worker = false", sections=COMPLETION, allowed_log_problems=killed
    ).start()
    started = time.monotonic()
    wait_until(lambda: len(receiving_children(node)) == 1)
    folders = [tmp_path / f"ct{n}" for n in range(5)]
    for folder in folders:
        write_cylinder_ct(folder, slices=24, rows=64, columns=64)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda folder: push(node, folder, "+sd"), folders[:4]))

    wait_until(lambda: len(jobs(node)) == 4, timeout=30)
    series = {dcmread(next(folder.iterdir())).SeriesInstanceUID for folder in folders[:4]}
    assert {job["series_instance_uid"] for job in jobs(node)} == series
    assert all(job["instances"] == 24 and job["version"] == 1 for job in jobs(node))

    (child,) = receiving_children(node)
    time.sleep(max(0.0, started + 11 - time.monotonic()))  # past the start-up window in which it is not restarted
    subprocess.run(["kill", f"-{signal.SIGKILL.value}", str(child)], check=True)
    wait_until(lambda: receiving_children(node) not in ([], [child]), timeout=15)
    push(node, folders[4], "+sd")
    wait_until(lambda: len(jobs(node)) == 5, timeout=30)
    errors = [line for line in node.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith("a receiving process exited with status -9: starting it again")


def test_several_receiving_processes_need_postgresql(node_factory):
    node = node_factory(extra_config="receivers = 2")
    result = node.rtnode("serve", timeout=30)
    assert result.returncode == 2
    assert "node.receivers = 2 needs PostgreSQL (node.database_url)" in result.stderr


def test_a_process_times_the_slices_other_processes_store(engine, database_url, tmp_path):
    """Two receiving processes' completion trackers on one database: the first saw half a series and
    its association end, so it queues a job at once; while the second still stores the rest, no worker
    may take that job. When the series is quiet, the one job holds every slice, wherever they came from."""
    config = parse_config(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\ndatabase_url = "{database_url}"\n'
        "[completion]\nquiet_seconds = 1.5\nmin_slices = 10\nrelease_grace_seconds = 0.5\n"
    )
    store = InstanceStore(engine, tmp_path / "incoming", fsync=False)
    files = write_cylinder_ct(tmp_path / "ct", slices=30, rows=16, columns=16)
    uid = dcmread(files[0]).SeriesInstanceUID
    worker = WorkerIdentity("host", 1, "cpu")
    first, second = CompletionTracker(config, engine), CompletionTracker(config, engine)
    first.start([])
    second.start([])
    try:
        for path in files[:15]:
            store.save(encoded(path), ExplicitVRLittleEndian, SENDER)
            first.instance_stored(1, uid)
        first.association_released(1)  # 15 contiguous slices look complete: a job is queued at once
        wait_until(lambda: job_count(engine) == 1, timeout=10)
        for path in files[15:]:
            store.save(encoded(path), ExplicitVRLittleEndian, SENDER)
            second.instance_stored(2, uid)
            assert claim_next(engine, worker, 60) is None, "a worker took the job while its series still arrived"
            time.sleep(0.1)
        second.association_released(2)
        wait_until(lambda: claim_next(engine, worker, 60) is not None, timeout=10)
        time.sleep(2.0)  # both timers have fired by now
        with Session(engine) as session:
            (job,) = session.scalars(select(Job)).all()
            assert len(job.input_uids) == 30
    finally:
        first.stop()
        second.stop()


def encoded(path) -> bytes:
    buffer = BytesIO()
    dcmwrite(buffer, dcmread(path), enforce_file_format=True)
    return buffer.getvalue()


def job_count(engine) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(Job))
