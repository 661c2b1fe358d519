"""Job and delivery transitions without a network: the retry schedule, how C-STORE answers are
classified, and each transition of `node.lifecycle` on a real SQLite database."""

from __future__ import annotations

import dataclasses
import threading
import time
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

import node.worker
from node.config import parse_config
from node.db.models import Job, WorkerRecord, utcnow
from node.destinations import Destination, SendOutcome
from node.destinations.cstore import classify_store_status
from node.errors import UserError
from node.lifecycle.deliveries import RetryPolicy, due_deliveries, record_attempt, resend, take_delivery
from node.lifecycle.jobs import Eligibility, LeaseLost, claim_next, fail_job, job_inputs, record_outputs, rerun, submit_series
from node.lifecycle.workers import WorkerIdentity, expire_leases, heartbeat, recover_after_restart, register_worker
from node.outputs import auto_contour_series
from node.rtstruct.builder import Algorithm
from node.store import CallingPeer, InstanceStore
from node.synth.ct_series import ct_datasets, write_cylinder_ct, write_series
from node.synth.phantom import make_phantom
from node.vocabulary import DeliveryStatus, EventKind, JobStatus, OutputKind
from node.worker import Worker as JobWorker
from tests.conftest import GONE_WORKER, OTHER_MACHINE_WORKER

TPS = Destination(name="tps", ae_title="TPS", host="127.0.0.1", port=11112)
POLICY = RetryPolicy(first_retry_seconds=30, max_retry_seconds=300, max_age_seconds=3600)
CREATED = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

# --- the backoff schedule ---------------------------------------------------------------


def any_series(series, instances) -> Eligibility:
    return Eligibility(True)


def test_backoff_starts_at_the_first_retry_and_doubles_up_to_the_cap():
    policy = RetryPolicy(first_retry_seconds=5, max_retry_seconds=60, max_age_seconds=3600)
    assert [policy.backoff(attempts) for attempts in range(1, 8)] == [5, 10, 20, 40, 60, 60, 60]


def test_next_attempt_is_now_plus_the_backoff():
    now = CREATED + timedelta(seconds=10)
    assert POLICY.next_attempt(1, CREATED, now) == now + timedelta(seconds=30)
    assert POLICY.next_attempt(2, CREATED, now) == now + timedelta(seconds=60)
    assert POLICY.next_attempt(20, CREATED, now) == now + timedelta(seconds=300)  # capped


def test_no_next_attempt_once_the_delivery_is_max_age_old():
    just_before = CREATED + timedelta(seconds=3600) - timedelta(microseconds=1)
    assert POLICY.next_attempt(9, CREATED, just_before) == just_before + timedelta(seconds=300)
    assert POLICY.next_attempt(9, CREATED, CREATED + timedelta(seconds=3600)) is None  # exactly at the boundary
    assert POLICY.next_attempt(1, CREATED, CREATED + timedelta(hours=5)) is None


# --- C-STORE answers --------------------------------------------------------------------


@pytest.mark.parametrize("code", [0x0000, 0xB000, 0xB007, 0xB006], ids=lambda c: f"0x{c:04X}")
def test_success_and_warnings_are_delivered(code):
    outcome = classify_store_status(code, "tps")
    assert outcome.delivered, outcome
    assert "tps" in outcome.detail and f"0x{code:04X}" in outcome.detail


@pytest.mark.parametrize("code", [0xA700, 0xA7FF], ids=lambda c: f"0x{c:04X}")
def test_out_of_resources_is_retried(code):
    outcome = classify_store_status(code, "tps")
    assert (outcome.delivered, outcome.retry) == (False, True)
    assert "Refused: Out of Resources" in outcome.detail and f"0x{code:04X}" in outcome.detail


@pytest.mark.parametrize("code", [0xA900, 0xC000, 0x0122, 0xFE00], ids=lambda c: f"0x{c:04X}")
def test_other_failures_are_not_retried(code):
    outcome = classify_store_status(code, "tps")
    assert (outcome.delivered, outcome.retry) == (False, False)
    assert "tps" in outcome.detail and f"0x{code:04X}" in outcome.detail


def test_no_response_is_retried():
    outcome = classify_store_status(None, "tps")
    assert (outcome.delivered, outcome.retry) == (False, True)
    assert "no C-STORE response from tps" in outcome.detail


# --- transitions on SQLite --------------------------------------------------------------


@pytest.fixture
def series(engine, tmp_path) -> tuple[str, list[Path]]:
    """A small CT stored as the SCP stores it: (its Series Instance UID, its files)."""
    files = write_cylinder_ct(tmp_path / "ct", slices=6, rows=16, columns=16)
    store_files(engine, tmp_path, files)
    return dcmread(files[0]).SeriesInstanceUID, files


def store_files(engine, tmp_path: Path, files: list[Path]) -> None:
    store = InstanceStore(engine, tmp_path / "incoming", fsync=False)
    for path in files:
        buffer = BytesIO()
        dcmwrite(buffer, dcmread(path), enforce_file_format=True)
        store.save(buffer.getvalue(), ExplicitVRLittleEndian, CallingPeer("SCANNER", "127.0.0.1"))


def claimed_small_job(engine, tmp_path: Path, worker: WorkerIdentity) -> Job:
    """A job on a stored 6-slice CT of 16x16 pixels, queued and claimed by `worker`."""
    files = write_cylinder_ct(tmp_path / "ct", slices=6, rows=16, columns=16)
    store_files(engine, tmp_path, files)
    job = submit_series(engine, dcmread(files[0]).SeriesInstanceUID, lambda series, instances: Eligibility(True))
    assert claim_next(engine, worker, 60) == job.id
    return job


def running_job(engine, uid: str) -> int:
    job = submit_series(engine, uid, lambda series, instances: Eligibility(True))
    assert job is not None and job.status == JobStatus.QUEUED
    assert claim_next(engine, GONE_WORKER, 60) == job.id
    return job.id


def contoured(engine, tmp_path: Path, job_id: int, destinations=(TPS,)) -> None:
    """record_outputs with small stand-in files for every output."""
    folder = tmp_path / "jobs" / str(job_id)
    folder.mkdir(parents=True)
    outputs = {}
    for kind, name in [(OutputKind.RTSTRUCT, "rtstruct.dcm"), (OutputKind.MASK, "mask.nii.gz"), (OutputKind.QA, "qa.png")]:
        outputs[kind] = folder / name
        outputs[kind].write_bytes(b"stand-in")
    uids = {OutputKind.RTSTRUCT: f"2.25.{job_id}"}
    record_outputs(engine, job_id, outputs, uids, {"load": 0.1, "pass_1": 1.0}, list(destinations))


def job_row(engine, job_id: int) -> Job:
    with Session(engine, expire_on_commit=False) as session:
        job = session.get(Job, job_id)
        _ = job.deliveries, job.events  # loaded before the session closes
        return job


def events(job: Job) -> list[tuple[str, str]]:
    return [(e.event, e.detail) for e in job.events]


def test_contoured_job_with_a_destination_is_sending_with_one_pending_delivery(engine, series, tmp_path):
    job_id = running_job(engine, series[0])
    contoured(engine, tmp_path, job_id)
    job = job_row(engine, job_id)
    assert job.status == JobStatus.SENDING
    assert set(job.outputs) == {OutputKind.RTSTRUCT, OutputKind.MASK, OutputKind.QA}
    (delivery,) = job.deliveries
    assert (delivery.status, delivery.destination, delivery.attempts) == (DeliveryStatus.PENDING, "tps", 0)
    assert delivery.kind == OutputKind.RTSTRUCT
    assert delivery.sop_instance_uid == f"2.25.{job_id}" and delivery.path == job.outputs[OutputKind.RTSTRUCT]
    assert [kind for kind, _ in events(job)][-2:] == [EventKind.CONTOURED, EventKind.SENDING]
    assert due_deliveries(engine) == [delivery.id]
    order = take_delivery(engine, delivery.id, GONE_WORKER, 60)
    assert (order.destination, order.ae_title, order.port, order.kind) == ("tps", "TPS", 11112, OutputKind.RTSTRUCT)


def test_each_simplified_contour_is_an_event_of_the_job(engine, series, tmp_path):
    job_id = running_job(engine, series[0])
    outputs = {OutputKind.RTSTRUCT: tmp_path / "rtstruct.dcm"}
    simplified = ("BODY: slice 2: 2978 -> 1210 points within 0.24 mm",)
    record_outputs(engine, job_id, outputs, {OutputKind.RTSTRUCT: "2.25.1"}, {}, [TPS], simplified=simplified)
    assert (EventKind.CONTOUR_SIMPLIFIED, simplified[0]) in events(job_row(engine, job_id))


def test_contoured_job_without_destinations_is_done(engine, series, tmp_path):
    job_id = running_job(engine, series[0])
    contoured(engine, tmp_path, job_id, destinations=())
    job = job_row(engine, job_id)
    assert job.status == JobStatus.DONE and job.deliveries == [] and job.finished_at is not None
    assert events(job)[-1] == (EventKind.DONE, "no destinations configured")


def test_a_retryable_failure_keeps_the_delivery_pending_until_the_first_retry(engine, series, tmp_path):
    job_id = running_job(engine, series[0])
    contoured(engine, tmp_path, job_id)
    (delivery_id,) = due_deliveries(engine)
    before = utcnow()
    record_attempt(engine, delivery_id, classify_store_status(None, "tps"), 0.5, POLICY)
    after = utcnow()
    job = job_row(engine, job_id)
    (delivery,) = job.deliveries
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, 1)
    assert delivery.last_error == "no C-STORE response from tps"
    first_retry = timedelta(seconds=POLICY.first_retry_seconds)
    assert before + first_retry <= delivery.next_attempt_at <= after + first_retry
    assert events(job)[-1] == (EventKind.SEND_FAILED, "no C-STORE response from tps; retry 2 in 30 s")
    assert job.status == JobStatus.SENDING
    assert due_deliveries(engine) == []  # not due before its next attempt


def test_a_delivered_outcome_makes_delivery_and_job_done(engine, series, tmp_path):
    job_id = running_job(engine, series[0])
    contoured(engine, tmp_path, job_id)
    (delivery_id,) = due_deliveries(engine)
    record_attempt(engine, delivery_id, classify_store_status(None, "tps"), 0.5, POLICY)
    record_attempt(engine, delivery_id, classify_store_status(0x0000, "tps"), 0.25, POLICY)
    job = job_row(engine, job_id)
    (delivery,) = job.deliveries
    assert (delivery.status, delivery.attempts, delivery.last_error) == (DeliveryStatus.DONE, 2, "")
    assert delivery.delivered_at is not None
    assert job.status == JobStatus.DONE and job.finished_at is not None and job.error == ""
    assert job.timings["send"] == 0.25  # only the attempt that delivered
    assert events(job)[-2:] == [(EventKind.DELIVERED, "rtstruct to tps (attempt 2)"), (EventKind.DONE, "delivered to tps")]
    assert take_delivery(engine, delivery_id, GONE_WORKER, 60) is None  # never sent again


def test_a_permanent_failure_fails_the_job_naming_the_destination(engine, series, tmp_path):
    job_id = running_job(engine, series[0])
    contoured(engine, tmp_path, job_id)
    (delivery_id,) = due_deliveries(engine)
    record_attempt(engine, delivery_id, classify_store_status(0xA900, "tps"), 0.5, POLICY)
    job = job_row(engine, job_id)
    (delivery,) = job.deliveries
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.FAILED, 1)
    assert job.status == JobStatus.FAILED
    assert job.error.startswith("delivery to tps failed: tps answered C-STORE failure status 0xA900"), job.error
    assert (EventKind.SEND_FAILED, f"{delivery.last_error}; not retried: this will not improve by waiting") in events(job)
    assert events(job)[-1][0] == EventKind.FAILED


def test_a_retryable_failure_past_max_age_gives_up(engine, series, tmp_path):
    job_id = running_job(engine, series[0])
    contoured(engine, tmp_path, job_id)
    (delivery_id,) = due_deliveries(engine)
    impatient = RetryPolicy(first_retry_seconds=30, max_retry_seconds=300, max_age_seconds=0)
    record_attempt(engine, delivery_id, SendOutcome(False, True, "cannot reach TPS@127.0.0.1:11112"), 0.5, impatient)
    job = job_row(engine, job_id)
    assert job.deliveries[0].status == DeliveryStatus.FAILED and job.status == JobStatus.FAILED
    gave_up = "cannot reach TPS@127.0.0.1:11112; gave up: delivery.max_age_seconds reached"
    assert events(job)[-2] == (EventKind.SEND_FAILED, gave_up)
    assert "delivery to tps failed: cannot reach TPS@127.0.0.1:11112" in job.error


OTHER = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=11114)


def test_a_failed_extra_resend_leaves_a_delivered_job_done(engine, series, tmp_path):
    job_id = running_job(engine, series[0])
    contoured(engine, tmp_path, job_id)
    (first,) = due_deliveries(engine)
    record_attempt(engine, first, classify_store_status(0x0000, "tps"), 0.1, POLICY)
    assert resend(engine, job_id, [OTHER], lambda path: "2.25.1") == 1
    (extra,) = due_deliveries(engine)
    record_attempt(engine, extra, classify_store_status(0xA900, "pacs"), 0.1, POLICY)
    job = job_row(engine, job_id)
    assert [(d.destination, d.status) for d in job.deliveries] == [("tps", DeliveryStatus.DONE), ("pacs", DeliveryStatus.FAILED)]
    assert (job.status, job.error) == (JobStatus.DONE, "")
    (kind, detail) = events(job)[-1]
    assert kind == EventKind.DONE
    assert detail.startswith("delivered to tps before; the resend did not reach all: delivery to pacs failed: pacs answered")


def test_a_resend_that_reaches_the_destination_ends_a_failed_job_done(engine, series, tmp_path):
    job_id = running_job(engine, series[0])
    contoured(engine, tmp_path, job_id)
    (first,) = due_deliveries(engine)
    record_attempt(engine, first, classify_store_status(0xA900, "tps"), 0.1, POLICY)
    assert job_row(engine, job_id).status == JobStatus.FAILED
    resend(engine, job_id, [TPS], lambda path: "2.25.1")
    (again,) = due_deliveries(engine)
    record_attempt(engine, again, classify_store_status(0x0000, "tps"), 0.1, POLICY)
    job = job_row(engine, job_id)
    assert (job.status, job.error) == (JobStatus.DONE, "") and events(job)[-1] == (EventKind.DONE, "delivered to tps")


def test_a_second_version_supersedes_the_first(engine, series, tmp_path):
    uid, files = series
    first = running_job(engine, uid)
    contoured(engine, tmp_path, first)
    second = rerun(engine, first, any_series).id  # a new version (an unchanged re-send would be a repeat)
    assert claim_next(engine, GONE_WORKER, 60) == second
    assert job_row(engine, second).version == 2
    contoured(engine, tmp_path, second)

    old, new = job_row(engine, first), job_row(engine, second)
    assert old.superseded_by == second
    assert [d.status for d in old.deliveries] == [DeliveryStatus.SUPERSEDED]
    assert old.status == JobStatus.DONE and old.error == ""
    assert (EventKind.SUPERSEDED, f"by job {second} (v2)") in events(old)
    assert events(old)[-1] == (EventKind.DONE, "superseded by a newer version before delivery")
    assert new.status == JobStatus.SENDING and [d.status for d in new.deliveries] == [DeliveryStatus.PENDING]
    assert take_delivery(engine, old.deliveries[0].id, GONE_WORKER, 60) is None
    assert due_deliveries(engine) == [new.deliveries[0].id]


def test_a_new_version_supersedes_only_a_version_that_was_delivered(engine, series, tmp_path):
    """The SeriesDescription's "supersedes vN" names what the planning system holds: not a version that
    failed (or was rejected) and sent nothing."""
    model = Algorithm("ctv-unet3d", "0.1.0")
    first = running_job(engine, series[0])
    fail_job(engine, first, "no CTV found", {})
    second = rerun(engine, first, any_series).id
    assert claim_next(engine, GONE_WORKER, 60) == second
    nothing_sent = job_inputs(engine, second).supersedes
    assert nothing_sent is None
    assert auto_contour_series(2, [model], nothing_sent).series_description == "UNAPPROVED auto-contour v2 (ctv-unet3d 0.1.0)"
    contoured(engine, tmp_path, second)
    (delivery,) = due_deliveries(engine)
    record_attempt(engine, delivery, classify_store_status(0x0000, "tps"), 0.1, POLICY)
    third = rerun(engine, second, any_series).id
    assert claim_next(engine, GONE_WORKER, 60) == third
    delivered = job_inputs(engine, third).supersedes
    assert delivered == 2
    description = auto_contour_series(3, [model], delivered).series_description
    assert description == "UNAPPROVED auto-contour v3, supersedes v2 (ctv-unet3d 0.1.0)"


def store_one_more_slice(engine, tmp_path: Path, files: list[Path]) -> None:
    """A new instance of the series, one slice past its last: the series grew."""
    ds = dcmread(files[-1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = len(files) + 1
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + float(ds.SliceThickness)]
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    InstanceStore(engine, tmp_path / "incoming", fsync=False).save(
        buffer.getvalue(), ExplicitVRLittleEndian, CallingPeer("SCANNER", "127.0.0.1")
    )


def reject_every_series(series, instances) -> Eligibility:
    return Eligibility(False, "a route that takes nothing")


@pytest.mark.parametrize("rule", [any_series, reject_every_series], ids=["queued", "rejected"])
def test_a_series_that_grew_after_part_of_its_structure_set_went_out_sends_no_more_of_it(engine, series, tmp_path, rule):
    """Its first version reached one planning system; before it reached the other, a slice more came. The rest
    of what the first version made is withdrawn, whether the grown series gets a job or is rejected, and it is
    never sent again by hand."""
    uid, files = series
    first = running_job(engine, uid)
    contoured(engine, tmp_path, first, destinations=(TPS, OTHER))
    to_tps, _ = due_deliveries(engine)
    record_attempt(engine, to_tps, classify_store_status(0x0000, "tps"), 0.1, POLICY)
    store_one_more_slice(engine, tmp_path, files)
    assert due_deliveries(engine) == []  # held while the series is arriving again
    second = submit_series(engine, uid, rule)
    assert second.version == 2 and len(second.input_uids) == len(files) + 1

    old = job_row(engine, first)
    statuses = [(d.destination, d.status) for d in old.deliveries]
    assert statuses == [("tps", DeliveryStatus.DONE), ("pacs", DeliveryStatus.SUPERSEDED)]
    assert (old.status, old.error) == (JobStatus.DONE, "") and events(old)[-1] == (EventKind.DONE, "delivered to tps")
    withdrawn = f"the series grew: not sent to pacs; job {second.id} (v2) takes its {len(files) + 1} instances"
    assert (EventKind.SUPERSEDED, withdrawn) in events(old)
    assert due_deliveries(engine) == []
    with pytest.raises(UserError, match=f"job {first} was made from {len(files)} instances of a series that has changed since"):
        resend(engine, first, [OTHER], lambda path: "2.25.1")


def test_a_send_on_the_wire_when_its_series_grew_is_not_retried(engine, series, tmp_path):
    uid, files = series
    first = running_job(engine, uid)
    contoured(engine, tmp_path, first)
    (delivery,) = due_deliveries(engine)
    assert take_delivery(engine, delivery, GONE_WORKER, 60) is not None
    store_one_more_slice(engine, tmp_path, files)
    second = submit_series(engine, uid, any_series)
    assert job_row(engine, first).deliveries[0].status == DeliveryStatus.PENDING  # on the wire: left to its sender
    record_attempt(engine, delivery, classify_store_status(None, "tps"), 0.5, POLICY)

    old = job_row(engine, first)
    assert old.deliveries[0].status == DeliveryStatus.SUPERSEDED and old.status == JobStatus.DONE
    assert events(old)[-3:] == [
        (EventKind.SEND_FAILED, "no C-STORE response from tps; not retried"),
        (EventKind.SUPERSEDED, f"the series grew: not sent to tps; job {second.id} (v2) takes its {len(files) + 1} instances"),
        (EventKind.DONE, "superseded by a newer version before delivery"),
    ]
    assert due_deliveries(engine) == []


def test_the_same_instances_again_let_a_sending_job_send_without_running_it_again(engine, series, tmp_path):
    uid, files = series
    first = running_job(engine, uid)
    contoured(engine, tmp_path, first)
    (delivery,) = due_deliveries(engine)
    store_files(engine, tmp_path, files[:1])  # one slice the scanner sent again
    assert due_deliveries(engine) == []
    assert submit_series(engine, uid, any_series) is None
    job = job_row(engine, first)
    assert (job.status, job.starts, job.version) == (JobStatus.SENDING, 1, 1)
    repeat = f"the same {len(files)} instances again: no new version (rtnode rerun makes one)"
    assert events(job)[-1] == (EventKind.REPEAT, repeat)
    assert due_deliveries(engine) == [delivery]


def test_resend_needs_an_rtstruct(engine, series, tmp_path):
    job_id = running_job(engine, series[0])
    with pytest.raises(UserError, match=f"job {job_id} has no RT Structure Set to send"):
        resend(engine, job_id, [TPS], lambda path: "2.25.1")
    with pytest.raises(UserError, match="no job 999"):
        resend(engine, 999, [TPS], lambda path: "2.25.1")

    contoured(engine, tmp_path, job_id, destinations=())
    assert resend(engine, job_id, [TPS], lambda path: "2.25.1") == 1
    job = job_row(engine, job_id)
    assert job.status == JobStatus.SENDING and job.finished_at is None
    assert [(d.status, d.destination, d.sop_instance_uid) for d in job.deliveries] == [(DeliveryStatus.PENDING, "tps", "2.25.1")]
    assert events(job)[-1] == (EventKind.RESEND, "queued by hand to tps")


def test_restart_requeues_running_jobs(engine, series):
    job_id = running_job(engine, series[0])
    assert recover_after_restart(engine) == 1
    job = job_row(engine, job_id)
    assert job.status == JobStatus.QUEUED
    assert events(job)[-1] == (EventKind.REQUEUED, "the node restarted while this job ran (not counted as a crash)")
    assert recover_after_restart(engine) == 0  # nothing running any more
    assert claim_next(engine, GONE_WORKER, 60) == job_id and job_row(engine, job_id).starts == 1


def test_a_restart_requeues_only_jobs_of_this_machines_departed_workers(engine, tmp_path):
    """Workers of other machines, and live workers of this one, keep their jobs across a restart: their
    leases decide. Requeuing them would run a job twice at once."""
    uids = []
    for n in range(3):
        files = write_cylinder_ct(tmp_path / f"ct{n}", slices=6, rows=16, columns=16)
        store_files(engine, tmp_path, files)
        uids.append(dcmread(files[0]).SeriesInstanceUID)
    live_here = WorkerIdentity.this_process("cpu")  # this test's own process: alive
    held = {}
    for uid, worker in zip(uids, [GONE_WORKER, OTHER_MACHINE_WORKER, live_here], strict=True):
        job = submit_series(engine, uid, lambda series, instances: Eligibility(True))
        assert claim_next(engine, worker, 60) == job.id
        held[worker.name] = job.id
    assert recover_after_restart(engine) == 1
    assert job_row(engine, held[GONE_WORKER.name]).status == JobStatus.QUEUED
    for name in (OTHER_MACHINE_WORKER.name, live_here.name):
        job = job_row(engine, held[name])
        assert (job.status, job.worker, job.starts) == (JobStatus.RUNNING, name, 1)
        assert events(job)[-1][0] == EventKind.STARTED
    assert claim_next(engine, WORKER_B, 60) == held[GONE_WORKER.name]
    assert claim_next(engine, WORKER_B, 60) is None  # the other two are still held


def test_a_restart_leaves_a_send_of_another_machine_on_the_wire(engine, series, tmp_path):
    job_id = running_job(engine, series[0])
    contoured(engine, tmp_path, job_id)
    (delivery_id,) = due_deliveries(engine)
    assert take_delivery(engine, delivery_id, OTHER_MACHINE_WORKER, 60) is not None
    recover_after_restart(engine)
    (delivery,) = job_row(engine, job_id).deliveries
    assert (delivery.attempts, delivery.worker) == (0, OTHER_MACHINE_WORKER.name) and delivery.attempt_started_at is not None
    assert take_delivery(engine, delivery_id, WORKER_B, 60) is None  # still on the wire


def test_a_send_cut_off_by_a_restart_counts_as_an_attempt(engine, series, tmp_path):
    job_id = running_job(engine, series[0])
    contoured(engine, tmp_path, job_id)
    (delivery_id,) = due_deliveries(engine)
    assert take_delivery(engine, delivery_id, GONE_WORKER, 60) is not None  # on the wire ... and the node is killed
    recover_after_restart(engine)
    (delivery,) = job_row(engine, job_id).deliveries
    assert (delivery.status, delivery.attempts, delivery.attempt_started_at) == (DeliveryStatus.PENDING, 1, None)
    assert delivery.last_error == "the attempt was cut off: its worker stopped"
    assert events(job_row(engine, job_id))[-1] == (EventKind.SEND_INTERRUPTED, "rtstruct to tps: attempt 1")
    assert due_deliveries(engine) == [delivery_id]  # tried again at once
    take_delivery(engine, delivery_id, GONE_WORKER, 60)
    record_attempt(engine, delivery_id, SendOutcome(True, False, "stored"), 0.1, POLICY)
    (delivery,) = job_row(engine, job_id).deliveries
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.DONE, 2)
    assert recover_after_restart(engine) == 0 and job_row(engine, job_id).deliveries[0].attempts == 2  # nothing to count


def test_rerun_refuses_what_cannot_be_rerun(engine, series):
    job_id = running_job(engine, series[0])
    with pytest.raises(UserError, match=f"job {job_id} of the same series is running"):
        rerun(engine, job_id, any_series)
    with pytest.raises(UserError, match="no job 999"):
        rerun(engine, 999, any_series)


WORKER_A = WorkerIdentity("gpu-a", 101, "cuda:0")
WORKER_B = WorkerIdentity("gpu-b", 202, "cuda:1")


def test_a_job_held_under_a_live_lease_is_not_taken_over(engine, series):
    job = submit_series(engine, series[0], lambda series, instances: Eligibility(True))
    register_worker(engine, WORKER_A)
    assert claim_next(engine, WORKER_A, 60) == job.id
    assert expire_leases(engine) == 0
    assert claim_next(engine, WORKER_B, 60) is None
    assert job_row(engine, job.id).worker == "gpu-a:101"


def test_a_job_whose_lease_ran_out_is_taken_over_and_counted(engine, series):
    job = submit_series(engine, series[0], lambda series, instances: Eligibility(True))
    assert claim_next(engine, WORKER_A, 0.05) == job.id
    time.sleep(0.1)  # worker A stopped beating: killed, or its machine lost
    assert expire_leases(engine) == 1
    assert claim_next(engine, WORKER_B, 60) == job.id
    taken = job_row(engine, job.id)
    assert (taken.worker, taken.starts, taken.status) == ("gpu-b:202", 2, JobStatus.RUNNING)
    assert events(taken)[-2:] == [
        (EventKind.REQUEUED, "the lease of worker gpu-a:101 expired while this job ran: attempt 1 of 3"),
        (EventKind.STARTED, "attempt 2 on gpu-b:202 (cuda:1)"),
    ]


def test_a_heartbeat_keeps_the_lease_and_names_the_current_job(engine, series):
    job = submit_series(engine, series[0], lambda series, instances: Eligibility(True))
    register_worker(engine, WORKER_A)
    assert claim_next(engine, WORKER_A, 0.05) == job.id
    heartbeat(engine, WORKER_A, 60)
    time.sleep(0.1)
    assert expire_leases(engine) == 0
    with Session(engine) as session:
        row = session.scalars(select(WorkerRecord).where(WorkerRecord.name == "gpu-a:101")).one()
        assert (row.current_job_id, row.device, row.stopped_at) == (job.id, "cuda:0", None)


def test_a_delivery_on_the_wire_is_never_taken_by_a_second_worker(engine, series, tmp_path):
    job_id = running_job(engine, series[0])
    contoured(engine, tmp_path, job_id)
    (delivery_id,) = due_deliveries(engine)
    assert take_delivery(engine, delivery_id, WORKER_A, 60) is not None
    assert take_delivery(engine, delivery_id, WORKER_B, 60) is None
    assert expire_leases(engine) == 0 and job_row(engine, job_id).deliveries[0].attempts == 0


def test_a_delivery_whose_sender_lost_its_lease_is_counted_and_sent_by_another(engine, series, tmp_path):
    job_id = running_job(engine, series[0])
    contoured(engine, tmp_path, job_id)
    (delivery_id,) = due_deliveries(engine)
    assert take_delivery(engine, delivery_id, WORKER_A, 0.05) is not None
    time.sleep(0.1)
    expire_leases(engine)
    (delivery,) = job_row(engine, job_id).deliveries
    assert (delivery.attempts, delivery.attempt_started_at) == (1, None)
    assert delivery.last_error == "the attempt was cut off: its worker stopped"
    order = take_delivery(engine, delivery_id, WORKER_B, 60)
    assert order is not None and job_row(engine, job_id).deliveries[0].worker == "gpu-b:202"


def test_a_worker_that_lost_its_lease_cannot_record_its_result(engine, series, tmp_path):
    job = submit_series(engine, series[0], lambda series, instances: Eligibility(True))
    assert claim_next(engine, WORKER_A, 0.05) == job.id
    time.sleep(0.1)  # A is alive but its heartbeat did not come in time
    expire_leases(engine)
    assert claim_next(engine, WORKER_B, 60) == job.id
    with pytest.raises(LeaseLost, match="no longer held by gpu-a:101"):
        fail_job(engine, job.id, "too late", {}, held_by=WORKER_A.name)
    fail_job(engine, job.id, "a sentence", {}, held_by=WORKER_B.name)
    assert (job_row(engine, job.id).status, job_row(engine, job.id).error) == (JobStatus.FAILED, "a sentence")


def test_each_attempt_writes_its_own_folder_and_a_killed_workers_leftovers_are_removed(engine, database_url, tmp_path):
    """A killed worker's half-written attempt is removed by the worker that finishes the job."""
    config, job_id = phantom_job(engine, database_url, tmp_path)
    assert claim_next(engine, WORKER_A, 0.05) == job_id
    left_by_a = config.jobs_dir / str(job_id) / "attempt-1"
    left_by_a.mkdir(parents=True)
    (left_by_a / "rtstruct.dcm").write_bytes(b"half written")
    time.sleep(0.1)
    expire_leases(engine)
    assert claim_next(engine, WORKER_B, 60) == job_id

    JobWorker(config, engine, WorkerIdentity("gpu-b", 202, "cpu")).run_job(job_id)
    done = job_row(engine, job_id)
    assert done.status == JobStatus.DONE, done.error
    rtstruct = config.jobs_dir / str(job_id) / "attempt-2" / "rtstruct.dcm"
    assert done.outputs[OutputKind.RTSTRUCT] == str(rtstruct) and rtstruct.is_file()
    assert not left_by_a.exists()


class Hold:
    """Holds worker A's thread at one point of its job until the test lets it go on."""

    THREAD = "worker-a"

    def __init__(self) -> None:
        self.reached, self.go_on = threading.Event(), threading.Event()

    def here(self) -> None:
        if threading.current_thread().name == self.THREAD:
            self.reached.set()
            if not self.go_on.wait(120):
                raise TimeoutError("the test never let worker A go on")


class HeldPredictor:
    """The real model, held at the start of `predict`: a worker still computing."""

    def __init__(self, predictor, hold: Hold) -> None:
        self.predictor, self.hold = predictor, hold

    def predict(self, volume):
        self.hold.here()
        return self.predictor.predict(volume)


@pytest.mark.parametrize("held_while", ["computing", "about to write"])
def test_a_worker_fenced_mid_job_records_nothing_and_removes_its_own_folder(
    engine, database_url, tmp_path, monkeypatch, held_while
):
    """Two real workers: A loses its lease while it computes (or once its model is recorded, before it
    writes), B takes the job over and finishes it, then A goes on. A's late model, result and files are
    refused or removed; B's outputs stay as they were."""
    config, job_id = phantom_job(engine, database_url, tmp_path)
    worker_a, worker_b = WorkerIdentity("gpu-a", 101, "cpu"), WorkerIdentity("gpu-b", 202, "cpu")
    hold = Hold()
    (model,) = JobWorker(config, engine, worker_a).load_models()
    model = dataclasses.replace(model, version="late")  # a late worker's model would show in the job's row
    if held_while == "computing":
        model = dataclasses.replace(model, predictor=HeldPredictor(model.predictor, hold))
    else:
        write_structure_set = node.worker.write_structure_set

        def held_write_structure_set(*args, **kwargs):
            hold.here()
            return write_structure_set(*args, **kwargs)

        monkeypatch.setattr(node.worker, "write_structure_set", held_write_structure_set)

    class WorkerA(JobWorker):
        def load_models(self):
            return [model]

    assert claim_next(engine, worker_a, 0.05) == job_id
    thread_a = threading.Thread(target=WorkerA(config, engine, worker_a).run_job, args=(job_id,), name=Hold.THREAD)
    thread_a.start()
    try:
        assert hold.reached.wait(60), f"worker A never got to {held_while}"
        time.sleep(0.1)  # A's lease (0.05 s) runs out without a heartbeat
        assert expire_leases(engine) == 1
        assert claim_next(engine, worker_b, 60) == job_id
        JobWorker(config, engine, worker_b).run_job(job_id)
        done = job_row(engine, job_id)
        assert done.status == JobStatus.DONE, done.error
        written_by_b = {path: path.read_bytes() for path in (config.jobs_dir / str(job_id)).rglob("*") if path.is_file()}
        assert {path.parent.name for path in written_by_b} == {"attempt-2"}
    finally:
        hold.go_on.set()
        thread_a.join(120)
    assert not thread_a.is_alive()
    after = job_row(engine, job_id)
    assert (after.status, after.worker) == (JobStatus.DONE, worker_b.name)
    assert (after.outputs, after.timings, events(after)) == (done.outputs, done.timings, events(done))
    assert (after.model_name, after.model_version) == (done.model_name, done.model_version) == ("ctv-unet3d", "0.1.0")
    now_there = {path: path.read_bytes() for path in (config.jobs_dir / str(job_id)).rglob("*") if path.is_file()}
    assert now_there == written_by_b  # A's attempt-1, if it wrote one, is gone again


def phantom_job(engine, database_url: str, tmp_path: Path):
    """A stored phantom CT with a queued job, and a configuration whose jobs folder is under tmp_path."""
    phantom = make_phantom(seed=3)
    files = write_series(ct_datasets(phantom.hu, phantom.geometry, phantom.patient), tmp_path / "phantom")
    store_files(engine, tmp_path, files)
    uid = dcmread(files[0]).SeriesInstanceUID
    config = parse_config(f'[node]\ndata_dir = "{tmp_path / "data"}"\ndatabase_url = "{database_url}"\n')
    return config, submit_series(engine, uid, lambda series, instances: Eligibility(True)).id
