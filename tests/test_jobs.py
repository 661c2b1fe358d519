"""Job bookkeeping on a real SQLite database: versions, fingerprints, claiming, restart recovery."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy.orm import Session

from node.completion import looks_complete
from node.db.models import Job
from node.destinations import Destination
from node.errors import UserError
from node.lifecycle.jobs import claim_next, fingerprint, job_inputs, record_outputs, rerun, series_needing_jobs, submit_series
from node.lifecycle.workers import recover_after_restart, requeue_after_worker_death
from node.routing import eligibility
from node.store import CallingPeer, InstanceStore
from node.synth.ct_series import write_cylinder_ct
from node.vocabulary import JobStatus, OutputKind
from tests.conftest import GONE_WORKER

SENDER = CallingPeer("SCANNER", "127.0.0.1")
TPS = Destination(name="tps", ae_title="TPS", host="127.0.0.1", port=11112)


def five_slices_or_more(series, instances):
    return eligibility(series, instances, min_slices=5)


def store_files(engine, tmp_path: Path, files: list[Path]) -> None:
    store = InstanceStore(engine, tmp_path / "incoming", fsync=False)
    for path in files:
        buffer = BytesIO()
        dcmwrite(buffer, dcmread(path), enforce_file_format=True)
        store.save(buffer.getvalue(), ExplicitVRLittleEndian, SENDER)


def submit(engine, uid: str) -> Job | None:
    return submit_series(engine, uid, five_slices_or_more)


def set_status(engine, job_id: int, status: str) -> None:
    with Session(engine) as session, session.begin():
        session.get(Job, job_id).status = status


def test_versions_follow_arrivals(engine, tmp_path):
    files = write_cylinder_ct(tmp_path / "ct", slices=8, rows=16, columns=16)
    uid = dcmread(files[0]).SeriesInstanceUID
    store_files(engine, tmp_path, files[:6])
    assert series_needing_jobs(engine) == [uid]
    first = submit(engine, uid)
    assert (first.version, first.status, len(first.input_uids)) == (1, JobStatus.QUEUED, 6)
    assert series_needing_jobs(engine) == []

    store_files(engine, tmp_path, files[6:])  # late slices while still queued: the same job takes them
    same = submit(engine, uid)
    assert same.id == first.id and len(same.input_uids) == 8
    assert same.input_fingerprint == fingerprint([dcmread(p).SOPInstanceUID for p in files])

    assert submit(engine, uid) is not None and submit(engine, uid).id == first.id  # nothing new: no new job
    assert claim_next(engine, GONE_WORKER, 60) == first.id
    set_status(engine, first.id, JobStatus.DONE)
    assert submit(engine, uid) is None

    store_files(engine, tmp_path, files[:2])  # an unchanged re-send after done: a repeat, no new version
    assert submit(engine, uid) is None
    with Session(engine) as session:
        assert session.get(Job, first.id).events[-1].event == "repeat"
    assert series_needing_jobs(engine) == []  # recorded once, not again at the next start

    second = rerun(engine, first.id, five_slices_or_more)  # on purpose
    assert (second.version, second.status, second.input_fingerprint) == (2, JobStatus.QUEUED, same.input_fingerprint)
    with pytest.raises(UserError, match=f"job {second.id} of the same series is queued"):
        rerun(engine, first.id, five_slices_or_more)


def test_late_slices_join_a_running_job_which_runs_again_and_never_records_the_shorter_series(engine, tmp_path):
    files = write_cylinder_ct(tmp_path / "ct", slices=6, rows=16, columns=16)
    uid = dcmread(files[0]).SeriesInstanceUID
    store_files(engine, tmp_path, files[:5])
    first = submit(engine, uid)
    assert claim_next(engine, GONE_WORKER, 60) == first.id
    read = job_inputs(engine, first.id, held_by=GONE_WORKER.name)
    assert len(read.paths) == 5
    store_files(engine, tmp_path, files[5:])  # a late slice while the job runs on five
    shorter = {OutputKind.RTSTRUCT: tmp_path / "rs.dcm"}
    held = record_outputs(engine, first.id, shorter, {OutputKind.RTSTRUCT: "2.25.1"}, {}, [TPS], held_by=GONE_WORKER.name,
                          computed_from=read.fingerprint)
    assert held is False  # what it made of five is not recorded, and nothing is sent
    with Session(engine) as session:
        job = session.get(Job, first.id)
        assert (job.status, job.outputs, job.deliveries, job.starts) == (JobStatus.QUEUED, {}, [], 0)
    assert claim_next(engine, GONE_WORKER, 60) is None  # not while the series is arriving
    assert submit(engine, uid).id == first.id  # quiet again: the same job takes all six
    assert claim_next(engine, GONE_WORKER, 60) == first.id
    again = job_inputs(engine, first.id, held_by=GONE_WORKER.name)
    assert len(again.paths) == 6

    store_files(engine, tmp_path, files[5:])  # the same slice again, while it runs: quiet, it joins; the inputs are
    assert submit(engine, uid).id == first.id  # unchanged, so the run's result stands
    assert record_outputs(engine, first.id, shorter, {OutputKind.RTSTRUCT: "2.25.1"}, {}, [TPS], held_by=GONE_WORKER.name,
                          computed_from=again.fingerprint)


def test_node_restarts_requeue_without_counting_but_worker_deaths_count(engine, tmp_path):
    files = write_cylinder_ct(tmp_path / "ct", slices=6, rows=16, columns=16)
    uid = dcmread(files[0]).SeriesInstanceUID
    store_files(engine, tmp_path, files)
    job = submit(engine, uid)
    for _ in range(5):  # the node killed again and again while the job runs: not the job's fault
        assert claim_next(engine, GONE_WORKER, 60) == job.id
        assert recover_after_restart(engine) == 1
    for _ in range(3):  # the worker process dies under it while the node stays up
        assert claim_next(engine, GONE_WORKER, 60) == job.id
        assert requeue_after_worker_death(engine, GONE_WORKER.name, -9) == 1
    assert claim_next(engine, GONE_WORKER, 60) is None
    with Session(engine) as session:
        crashed = session.get(Job, job.id)
        assert crashed.status == "failed" and "stopped 3 times" in crashed.error
        details = [e.detail for e in crashed.events if e.event == "requeued"]
        assert details.count("the node restarted while this job ran (not counted as a crash)") == 5
        assert [d for d in details if d.startswith("the worker process stopped (status -9)")][-1].endswith("attempt 3 of 3")


def test_eligibility_and_completeness(engine, tmp_path):
    files = write_cylinder_ct(tmp_path / "ct", slices=6, rows=16, columns=16)
    store_files(engine, tmp_path, files)
    uid = dcmread(files[0]).SeriesInstanceUID
    rejected = submit_series(engine, uid, lambda s, i: eligibility(s, i, min_slices=20))
    assert rejected.status == "rejected" and "6 slices, fewer than completion.min_slices = 20" in rejected.error
    assert looks_complete([str(p) for p in files], min_slices=5)
    assert not looks_complete([str(p) for p in files[:2] + files[3:]], min_slices=5)
    assert not looks_complete([str(p) for p in files], min_slices=10)
