"""A database outage is waited out: PostgreSQL stopped and started again under a running node and a
standalone worker. Nothing acknowledged is lost, no process dies, a series whose completion timer
fired during the outage is contoured after it, and a job cut off by it runs again."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, text

from node.harness import DCMTK_ENV, LOOPBACK, destination_toml, free_port, log_problems
from tests.conftest import PostgresCluster, new_postgres_database, require_tool
from tests.test_loop import Receiver, phantom_series, push

QUIET = 3.0
OUTAGE_SECONDS = 8.0


@pytest.fixture
def cluster():
    cluster = PostgresCluster()
    cluster.start()
    yield cluster
    cluster.remove()


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def job_rows(database) -> list[tuple]:
    with database.connect() as connection:
        return connection.execute(text("select id, status from jobs order by id")).all()


def events(database, job_id: int) -> list[str]:
    with database.connect() as connection:
        query = text("select detail from job_events where job_id = :id order by id")
        return connection.execute(query, {"id": job_id}).scalars().all()


def all_done(database, count: int) -> bool:
    rows = job_rows(database)
    return len(rows) == count and all(status == "done" for _, status in rows)


def echo(port: int) -> int:
    return subprocess.run(
        [require_tool("echoscu"), "-aet", "SCANNER", "-aec", "RTNODE", LOOPBACK, str(port)],
        env=DCMTK_ENV, capture_output=True, timeout=30,
    ).returncode


def test_postgresql_stopped_and_started_again_loses_nothing_and_everything_catches_up(
    node_factory, cluster, tmp_path, request
):
    url = new_postgres_database(cluster.url)
    tps = Receiver(tmp_path / "tps", free_port()).start()
    request.addfinalizer(tps.stop)
    sections = f"[completion]\nquiet_seconds = {QUIET}\nmin_slices = 10\nrelease_grace_seconds = {QUIET}\n"
    sections += "[delivery]\nfirst_retry_seconds = 1.0\nmax_retry_seconds = 2.0\n"
    sections += destination_toml("tps", "TPS", tps.port)
    node = node_factory(database_url=url, extra_config="local_worker = false", sections=sections).start()
    worker_log = tmp_path / "worker.log"
    with worker_log.open("w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "node", "worker", "--config", str(node.config_path)], stdout=log, stderr=subprocess.STDOUT
        )
    request.addfinalizer(lambda: (worker.kill(), worker.wait()))
    database = create_engine(url, pool_pre_ping=True)  # its connections do not survive the outage either
    request.addfinalizer(database.dispose)

    # A timer that fires during the outage: the series is stored and acknowledged, then the database goes.
    first = phantom_series(tmp_path / "ct1", seed=1)
    push(node, tmp_path / "ct1", "+sd")
    cluster.stop()
    wait_until(lambda: "the database is unreachable" in node.log(), QUIET + 10, "the timer to meet the outage")
    assert echo(node.port) == 0  # verification goes on without the database
    time.sleep(OUTAGE_SECONDS)
    assert node.process.poll() is None and worker.poll() is None
    cluster.start()
    wait_until(lambda: all_done(database, 1), 180, "the series timed during the outage to be contoured and sent")
    with database.connect() as connection:
        stored = connection.execute(text("select count(*) from instances")).scalar_one()
    assert stored == len(first)  # every acknowledged slice is there

    # A job running when the database goes: its attempt is given back and runs again, not counted as a crash.
    phantom_series(tmp_path / "ct2", seed=2)
    push(node, tmp_path / "ct2", "+sd")
    job_id = wait_until(lambda: next((i for i, s in job_rows(database) if s == "running"), None), 60, "a job to run")
    cluster.stop()
    time.sleep(OUTAGE_SECONDS)
    assert node.process.poll() is None and worker.poll() is None
    cluster.start()
    wait_until(lambda: all_done(database, 2), 180, "the cut-off job to run again and be sent")
    details = events(database, job_id)
    assert any("database was unreachable while this job ran" in d for d in details), details

    sent = {dcmread(path).SOPInstanceUID for path in wait_until(lambda: len(tps.files()) == 2 and tps.files(), 30, "sends")}
    assert len(sent) == 2  # each structure set reached the planning system once
    assert worker.poll() is None and node.process.poll() is None
    text_of_worker_log = worker_log.read_text()
    assert "the database is reachable again" in text_of_worker_log
    assert log_problems(text_of_worker_log) == [], text_of_worker_log[-3000:]
