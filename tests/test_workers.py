"""Several workers on one PostgreSQL database: one `rtnode serve` without a worker of its own and
three `rtnode worker` processes, nine series pushed at once, one worker SIGKILLed mid-job."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from pydicom import dcmread
from sqlalchemy import create_engine, text

from node.harness import destination_toml, free_port, log_problems
from tests.conftest import new_postgres_database
from tests.test_loop import QUIET, Receiver, jobs, phantom_series, push

SERIES = 9


def running_on(database, pid: int) -> str | None:
    """The name of the worker with this process id, once it holds a running job."""
    with database.connect() as connection:
        holders = connection.execute(text("select worker from jobs where status = 'running'")).scalars().all()
    return next((name for name in holders if name.endswith(f":{pid}")), None)


def test_three_workers_share_nine_series_and_one_killed_mid_job_loses_nothing(node_factory, postgres_server, tmp_path):
    url = new_postgres_database(postgres_server)
    tps = Receiver(tmp_path / "tps", free_port())
    sections = f"[completion]\nquiet_seconds = {QUIET}\nmin_slices = 10\nrelease_grace_seconds = 1.0\n"
    sections += "[delivery]\nfirst_retry_seconds = 1.0\nmax_retry_seconds = 2.0\n"
    sections += destination_toml("tps", "TPS", tps.port)
    node = node_factory(
        database_url=url, extra_config="worker_lease_seconds = 6\nlocal_worker = false", sections=sections
    ).start()
    tps.start()
    command = [sys.executable, "-m", "node", "worker", "--config", str(node.config_path)]
    logs = [(tmp_path / f"worker{i}.log").open("w") for i in range(3)]
    workers = [subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    database = create_engine(url)
    try:
        folders = [tmp_path / f"ct{seed}" for seed in range(SERIES)]
        for seed, folder in enumerate(folders):
            phantom_series(folder, seed=seed)
        with ThreadPoolExecutor(SERIES) as pool:
            list(pool.map(lambda folder: push(node, folder, "+sd"), folders))

        victim, victim_name = workers[0], None
        deadline = time.monotonic() + 240
        while victim_name is None and time.monotonic() < deadline:
            victim_name = running_on(database, victim.pid)
            time.sleep(0.05)
        assert victim_name is not None, "the extra worker never took a job"
        victim.kill()
        victim.wait()

        deadline = time.monotonic() + 480
        while time.monotonic() < deadline:
            current = jobs(node)
            if len(current) == SERIES and all(job["status"] == "done" for job in current):
                break
            time.sleep(1)
        assert sorted(job["status"] for job in current) == ["done"] * SERIES, json.dumps(current, indent=1)
        assert len({job["series_instance_uid"] for job in current}) == SERIES
        assert all(job["version"] == 1 and job["worker"] for job in current)
        assert len({job["worker"] for job in current}) >= 2  # the work was shared
        detail = [json.loads(node.rtnode("job", str(job["id"]), "--json").stdout) for job in current]
        expired = [d for d in detail if any(f"lease of worker {victim_name} expired" in e["detail"] for e in d["events"])]
        assert len(expired) == 1 and expired[0]["worker"] != victim_name  # taken over by another worker
        time.sleep(2)
        uids = [dcmread(path).SOPInstanceUID for path in tps.files()]
        assert len(uids) == SERIES and len(set(uids)) == SERIES  # each structure set sent exactly once
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
        for log in logs:
            log.close()
        tps.stop()
        database.dispose()
    for i in range(3):
        assert log_problems((tmp_path / f"worker{i}.log").read_text()) == [], f"worker{i}.log"
