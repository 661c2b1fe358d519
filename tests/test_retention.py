"""Retention on a real database (SQLite and PostgreSQL) and real files: what goes when, what never
goes, the ceiling, dry runs, protection, what the reports say afterwards, a store writing again
while retention deletes, and a SIGKILL in mid-removal."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filewriter import dcmwrite
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

import node.cli
from node.config import Config, load_config
from node.db.engine import open_database
from node.db.models import Instance, Job, Series, Study, utcnow
from node.destinations import Destination, SendOutcome
from node.lifecycle.deliveries import RetryPolicy, due_deliveries, record_attempt
from node.lifecycle.jobs import Eligibility, claim_next, record_outputs, rerun, submit_series
from node.retention import _Deleted, purge, set_protected
from node.store import CallingPeer, InstanceStore
from node.synth.ct_series import PatientStudy, write_cylinder_ct
from node.vocabulary import OutputKind
from tests.conftest import GONE_WORKER

REPO = Path(__file__).resolve().parent.parent
TPS = Destination(name="tps", ae_title="TPS", host="127.0.0.1", port=11112)
POLICY = RetryPolicy(first_retry_seconds=30, max_retry_seconds=300, max_age_seconds=3600)
SENDER = CallingPeer("SCANNER", "127.0.0.1")


def any_series(series, instances) -> Eligibility:
    return Eligibility(True)


def write_config(tmp_path: Path, database_url: str, retention: str = "") -> Path:
    """The data directory under tmp_path/data, the database outside it (sizes stay exact)."""
    path = tmp_path / "node.toml"
    path.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\ndatabase_url = "{database_url}"\nfsync = false\n\n[retention]\n{retention}\n'
    )
    return path


class Node:
    """A node's configuration, database and store, without its processes."""

    def __init__(self, tmp_path: Path, database_url: str, retention: str = "") -> None:
        self.tmp_path = tmp_path
        self.config_path = write_config(tmp_path, database_url, retention)
        self.config: Config = load_config(self.config_path)
        self.engine = open_database(self.config.node.database_url, fsync=False)
        self.store = InstanceStore(self.engine, self.config.incoming_dir, fsync=False)
        self._written = 0
        self.sources: dict[str, list[Path]] = {}  # series UID -> the files sent

    def receive(self, slices: int = 6, size: int = 16) -> tuple[str, str, list[Path]]:
        """A CT series received as the SCP stores it: (study UID, series UID, the stored files)."""
        self._written += 1
        patient = PatientStudy()
        files = write_cylinder_ct(self.tmp_path / f"ct{self._written}", slices=slices, rows=size, columns=size, patient=patient)
        for path in files:
            self.resend(path)
        self.sources[patient.series_instance_uid] = files
        stored = [Path(i.path) for i in self.instances(patient.series_instance_uid)]
        return patient.study_instance_uid, patient.series_instance_uid, stored

    def resend(self, path: Path) -> None:
        buffer = BytesIO()
        dcmwrite(buffer, dcmread(path), enforce_file_format=True)
        self.store.save(buffer.getvalue(), ExplicitVRLittleEndian, SENDER)

    def job(self, series_uid: str, destinations=(), output_bytes: int = 100) -> int:
        """A contoured job of the series with stand-in output files: done, or sending to `destinations`."""
        job = submit_series(self.engine, series_uid, lambda series, instances: Eligibility(True))
        assert claim_next(self.engine, GONE_WORKER, 60) == job.id
        folder = self.config.jobs_dir / str(job.id)
        folder.mkdir(parents=True)
        outputs = {kind: folder / name for kind, name in [(OutputKind.RTSTRUCT, "rtstruct.dcm"), (OutputKind.QA, "qa.png")]}
        for path in outputs.values():
            path.write_bytes(b"x" * output_bytes)
        record_outputs(self.engine, job.id, outputs, {OutputKind.RTSTRUCT: f"2.25.{job.id}"}, {}, list(destinations))
        return job.id

    def age(self, job_id: int, days: float) -> None:
        """The job ended `days` ago."""
        with self.engine.begin() as connection:
            connection.execute(update(Job).where(Job.id == job_id).values(finished_at=utcnow() - timedelta(days=days)))

    def instances(self, series_uid: str) -> list[Instance]:
        with Session(self.engine) as session:
            query = select(Instance).join(Series).where(Series.series_instance_uid == series_uid).order_by(Instance.id)
            return list(session.scalars(query))

    def job_row(self, job_id: int) -> Job:
        with Session(self.engine, expire_on_commit=False) as session:
            return session.get(Job, job_id)

    def data_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.config.node.data_dir.rglob("*") if path.is_file())

    def cli(self, capsys, *args: str) -> tuple[int, str, str]:
        status = node.cli.main(["--config", str(self.config_path), *args])
        out, err = capsys.readouterr()
        return status, out, err


@pytest.fixture
def make_node(tmp_path, database_url):
    """A node on each database the node supports, with the given [retention] settings."""
    return lambda retention="": Node(tmp_path, database_url, retention)


def removed(node: Node, series_uid: str, files: list[Path]) -> bool:
    """Every row of the series marked and every file gone, or else none of either."""
    marks = [i.removed_at is not None for i in node.instances(series_uid)]
    present = [path.exists() for path in files]
    assert len(set(marks)) == 1 and len(set(present)) == 1 and marks[0] != present[0], (marks, present)
    return marks[0]


def test_old_finished_series_and_outputs_go_young_ones_stay(make_node):
    node = make_node()
    old_study, old_series, old_files = node.receive()
    _, young_series, young_files = node.receive()
    old_job, young_job = node.job(old_series), node.job(young_series)
    node.age(old_job, 31)
    node.age(young_job, 29)

    report = purge(node.engine, node.config)

    assert [(s.series_instance_uid, s.instances, s.reason) for s in report.series] == [(old_series, 6, "incoming_days")]
    assert report.series[0].bytes == sum(i.size_bytes for i in node.instances(old_series))
    assert [(o.job_id, o.kinds, o.reason) for o in report.outputs] == [(old_job, ("rtstruct", "qa"), "outputs_days")]
    assert report.freed_bytes == report.series[0].bytes + 200
    assert removed(node, old_series, old_files) and not removed(node, young_series, young_files)
    assert not (node.config.incoming_dir / old_study).exists()  # the emptied study and series folders too
    assert not (node.config.jobs_dir / str(old_job)).exists()
    assert node.job_row(old_job).outputs_removed_at is not None and node.job_row(young_job).outputs_removed_at is None
    assert all(Path(p).exists() for p in node.job_row(young_job).outputs.values())
    assert purge(node.engine, node.config).series == []  # nothing twice


def job_log(node: Node, job_id: int) -> list[tuple[str, str]]:
    with Session(node.engine) as session:
        return [(event.event, event.detail) for event in session.get(Job, job_id).events]


def test_removed_outputs_are_told_once_in_their_jobs_log(make_node, caplog):
    node = make_node()
    _, old_series, _ = node.receive()
    _, young_series, _ = node.receive()
    old_job, young_job = node.job(old_series), node.job(young_series)
    node.age(old_job, 31)
    node.age(young_job, 29)
    before = job_log(node, old_job)

    with caplog.at_level(logging.INFO, logger="node.lifecycle"):
        purge(node.engine, node.config, dry_run=True)
        assert job_log(node, old_job) == before  # a dry run changes nothing
        purge(node.engine, node.config)
        purge(node.engine, node.config)  # nothing twice

    assert job_log(node, old_job) == [*before, ("outputs removed", "rtstruct, qa (retention.outputs_days)")]
    assert "outputs removed" not in [event for event, _ in job_log(node, young_job)]
    logged = [r.getMessage() for r in caplog.records if "outputs removed" in r.getMessage()]
    assert logged == [f"job {old_job} (series {old_series} v1): outputs removed rtstruct, qa (retention.outputs_days)"]


def test_outputs_stay_while_a_delivery_is_pending(make_node):
    node = make_node()
    _, series, files = node.receive()
    job_id = node.job(series, destinations=[TPS])
    node.age(job_id, 100)  # as if: the job is sending, its delivery pending
    assert purge(node.engine, node.config).outputs == []
    assert not removed(node, series, files)  # the series' job is not finished either

    (delivery,) = due_deliveries(node.engine)
    record_attempt(node.engine, delivery, SendOutcome(True, False, "stored"), 0.1, POLICY)
    node.age(job_id, 100)
    report = purge(node.engine, node.config)
    assert [o.job_id for o in report.outputs] == [job_id] and removed(node, series, files)


def test_series_with_a_job_queued_running_or_sending_stays(make_node):
    node = make_node()
    _, series, files = node.receive()
    first = node.job(series)
    node.age(first, 100)
    second = rerun(node.engine, first, any_series).id  # queued
    assert purge(node.engine, node.config).series == [] and not removed(node, series, files)
    assert claim_next(node.engine, GONE_WORKER, 60) == second  # running
    assert purge(node.engine, node.config).series == [] and not removed(node, series, files)


def test_a_series_whose_quiet_timer_would_run_stays(make_node):
    node = make_node()
    _, no_job_yet, no_job_files = node.receive()
    _, series, files = node.receive()
    job_id = node.job(series)
    node.age(job_id, 100)
    with node.engine.begin() as connection:  # a slice arrived after the job took its inputs
        connection.execute(update(Instance).where(Instance.path == str(files[0])).values(last_received_at=utcnow()))
    assert purge(node.engine, node.config).series == []
    assert not removed(node, series, files) and not removed(node, no_job_yet, no_job_files)


def test_a_protected_study_stays_until_unprotected(make_node, capsys):
    node = make_node()
    study, series, files = node.receive()
    job_id = node.job(series)
    node.age(job_id, 100)
    assert node.cli(capsys, "protect", study) == (
        0,
        f"study {study} is protected: retention removes none of its instances or outputs\n",
        "",
    )
    report = purge(node.engine, node.config)
    assert (report.series, report.outputs) == ([], []) and not removed(node, series, files)

    assert node.cli(capsys, "unprotect", study)[0] == 0
    report = purge(node.engine, node.config)
    assert [s.series_instance_uid for s in report.series] == [series] and [o.job_id for o in report.outputs] == [job_id]
    assert node.cli(capsys, "protect", "1.2.3") == (2, "", "rtnode: no study 1.2.3 has been received\n")


def test_over_the_ceiling_the_oldest_studies_go_first_until_10_percent_under(make_node):
    node = make_node("max_storage_gb = 0.001\n")  # 1 MB
    received = [node.receive(slices=8, size=128) for _ in range(4)]  # 4 x 273 kB
    for days, (_, series, _) in zip([3, 1, 4, 2], received, strict=True):
        node.age(node.job(series), days)
    assert node.data_bytes() > 1_000_000

    report = purge(node.engine, node.config)

    oldest = received[2][1]
    assert [(s.series_instance_uid, s.reason) for s in report.series] == [(oldest, "max_storage_gb")]
    assert report.outputs == []  # instances first: they were enough
    assert node.data_bytes() <= 900_000 < node.data_bytes() + report.series[0].bytes
    assert [removed(node, series, files) for _, series, files in received] == [False, False, True, False]


def test_when_the_ceiling_cannot_be_met_the_node_says_why_once(make_node, caplog):
    node = make_node("max_storage_gb = 0.001\n")
    protected_study, protected, protected_files = node.receive(slices=16, size=128)  # 546 kB
    _, busy, busy_files = node.receive(slices=16, size=128)  # no job yet: its quiet timer runs
    _, old, old_files = node.receive(slices=8, size=128)
    node.age(node.job(protected), 10)
    old_job = node.job(old, output_bytes=100_000)
    node.age(old_job, 1)  # young: only the ceiling removes it
    set_protected(node.engine, protected_study, True)

    with caplog.at_level(logging.INFO, logger="node.retention"):
        report = purge(node.engine, node.config)

    assert [s.series_instance_uid for s in report.series] == [old] and [o.job_id for o in report.outputs] == [old_job]
    assert removed(node, old, old_files) and not removed(node, busy, busy_files)
    assert not removed(node, protected, protected_files)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [report.held]

    def kb(files: list[Path], extra: int = 0) -> str:
        return f"{(sum(p.stat().st_size for p in files) + extra) / 1000:.1f} kB"

    assert f"still holds {node.data_bytes() / 1e6:.1f} MB after removing all it may, over 900.0 kB" in report.held
    assert "(90% of max_storage_gb = 0.001)" in report.held
    assert f"{kb(busy_files)} in series with a job queued, running or sending or a quiet timer running" in report.held
    assert f"0 B in outputs with a delivery pending, {kb(protected_files, 200)} in protected studies" in report.held
    assert report.held.endswith("in other files (the database, conflicts); receiving goes on until the disk is full")


def snapshot(node: Node) -> tuple[list, list]:
    files = sorted((p, p.stat().st_size) for p in node.config.node.data_dir.rglob("*"))
    with node.engine.connect() as connection:
        rows = connection.execute(select(Instance.id, Instance.removed_at).order_by(Instance.id)).all()
        rows += connection.execute(select(Job.id, Job.outputs_removed_at).order_by(Job.id)).all()
    return files, rows


def test_a_dry_run_removes_nothing_and_lists_what_the_real_run_removes(make_node, capsys):
    node = make_node("max_storage_gb = 0.001\n")
    received = [node.receive(slices=8, size=128) for _ in range(5)]  # 5 x 273 kB
    for days, (_, series, _) in zip([40, 1, 2, 3, 4], received, strict=True):
        node.age(node.job(series), days)
    before = snapshot(node)
    oldest_kb = sum(path.stat().st_size for path in received[0][2]) / 1000

    status, dry, _ = node.cli(capsys, "purge", "--dry-run")
    assert status == 0 and snapshot(node) == before
    status, real, _ = node.cli(capsys, "purge")
    assert status == 0 and snapshot(node) != before

    dry_lines, real_lines = dry.splitlines(), real.splitlines()
    assert dry_lines[:-1] == real_lines[:-1] and len(dry_lines) == 4  # 2 series (age, ceiling), 1 job's outputs, total
    oldest = f"series {received[0][1]} of study {received[0][0]}"
    assert dry_lines[0] == f"{oldest}: 8 instances, {oldest_kb:.1f} kB (retention.incoming_days)"
    assert dry_lines[1].startswith(f"series {received[4][1]} of") and dry_lines[1].endswith("(retention.max_storage_gb)")
    assert dry_lines[2] == f"job {node.job_row(1).id} outputs rtstruct, qa: 200 B (retention.outputs_days)"
    assert dry_lines[3].startswith("retention (dry run): would remove 16 instances of 2 series (")
    assert real_lines[3].startswith("retention: removed 16 instances of 2 series (") and real_lines[3].endswith(" freed")


def test_reports_say_what_retention_removed_and_rerun_refuses(make_node, capsys):
    node = make_node()
    _, series, _ = node.receive()
    _, kept, _ = node.receive()
    job_id = node.job(series)
    node.job(kept)
    node.age(job_id, 31)
    purge(node.engine, node.config)
    today = f"{utcnow():%Y-%m-%d}"

    listing = json.loads(node.cli(capsys, "studies", "--json")[1])
    studies = {s["series"][0]["series_instance_uid"]: s["series"][0] for s in listing}
    assert studies[series]["removed_at"].startswith(today) and studies[series]["instances"] == 6
    assert studies[kept]["removed_at"] is None
    assert f"removed on {today} by retention" in node.cli(capsys, "studies")[1]

    job = json.loads(node.cli(capsys, "job", str(job_id), "--json")[1])
    assert job["outputs_removed_at"].startswith(today) and job["outputs"]  # what was made is still listed
    assert f"outputs              removed on {today} by retention" in node.cli(capsys, "job", str(job_id))[1]
    status, _, err = node.cli(capsys, "rerun", str(job_id))
    assert status == 2
    assert err == f"rtnode: job {job_id}'s input instances were removed on {today} by retention: it cannot be re-run\n"


def test_an_instance_received_again_after_removal_is_stored_again(make_node):
    node = make_node()
    _, series, files = node.receive()
    node.age(node.job(series), 31)
    purge(node.engine, node.config)
    node.resend(node.sources[series][0])

    healed = [i for i in node.instances(series) if i.removed_at is None]
    assert [Path(i.path) for i in healed] == [files[0]] and files[0].exists() and healed[0].times_received == 2
    assert purge(node.engine, node.config).series == []  # its quiet timer runs now
    assert files[0].exists()


def test_an_instance_received_again_while_retention_deletes_files_is_kept(make_node, monkeypatch):
    """Retention deletes a batch's files while its transaction holds the rows (SQLite: the database's
    write lock; PostgreSQL: the rows' locks): the store's clearing of the mark waits for it to commit,
    so the file written again comes after the deletes, never before."""
    node = make_node()
    _, series, files = node.receive()
    node.age(node.job(series), 31)
    resend = threading.Thread(target=node.resend, args=(node.sources[series][0],))
    unlink = _Deleted.unlink

    def unlink_while_resending(deleted: _Deleted, path: Path) -> None:
        if resend.ident is None:  # at the first file
            resend.start()
            time.sleep(0.5)  # the store would write the file again meanwhile, were it not held up
        unlink(deleted, path)

    monkeypatch.setattr(_Deleted, "unlink", unlink_while_resending)
    assert [s.series_instance_uid for s in purge(node.engine, node.config).series] == [series]
    resend.join(timeout=60)

    healed = [i for i in node.instances(series) if i.removed_at is None]
    assert [Path(i.path) for i in healed] == [files[0]] and healed[0].times_received == 2
    assert files[0].exists() and not any(path.exists() for path in files[1:])


def many_removable_instances(node: Node, series_count: int, per_series: int) -> list[Path]:
    """Small instances in finished, old series, rows inserted in bulk: (their files)."""
    paths = []
    with Session(node.engine) as session, session.begin():
        study = Study(study_instance_uid=generate_uid())
        session.add(study)
        for _ in range(series_count):
            series = Series(series_instance_uid=generate_uid(), study=study)
            session.add(series)
            session.flush()
            rows = []
            for number in range(per_series):
                uid = generate_uid()
                path = node.config.incoming_dir / study.study_instance_uid / series.series_instance_uid / f"{uid}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"\0" * 128)
                paths.append(path)
                rows.append(
                    dict(
                        sop_instance_uid=uid,
                        sop_class_uid=CTImageStorage,
                        series_id=series.id,
                        instance_number=number,
                        path=str(path),
                        size_bytes=128,
                        transfer_syntax_uid=ExplicitVRLittleEndian,
                        calling_ae_title="SCANNER",
                        peer_address="127.0.0.1",
                        received_at=utcnow(),
                        times_received=1,
                        last_received_at=utcnow(),
                    )
                )
            session.execute(insert(Instance), rows)
    with Session(node.engine) as session:
        uids = session.scalars(select(Series.series_instance_uid).order_by(Series.id)).all()
    for uid in uids:
        node.age(node.job(uid), 100)
    return paths


def assert_no_unmarked_row_points_at_a_missing_file(node: Node) -> tuple[int, int]:
    """Returns how many marked instance rows and job outputs still have their files."""
    with Session(node.engine) as session:
        instances = session.execute(select(Instance.path, Instance.removed_at)).all()
        jobs = session.execute(select(Job.outputs, Job.outputs_removed_at)).all()
    outputs = [(path, removed_at) for paths, removed_at in jobs for path in paths.values()]
    for path, removed_at in instances + outputs:
        assert removed_at is not None or Path(path).exists(), f"{path} is gone but its row is not marked"
    return sum(1 for path, removed_at in instances + outputs if removed_at is not None and Path(path).exists()), len(outputs)


def test_a_purge_killed_in_mid_removal_leaves_only_marked_rows_behind_and_the_next_run_finishes(make_node):
    node = make_node()
    paths = many_removable_instances(node, series_count=20, per_series=150)
    first = paths[0]
    command = [sys.executable, "-m", "node", "--config", str(node.config_path), "purge"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while first.exists() and time.monotonic() < deadline:
        pass
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not first.exists(), "the purge deleted nothing within a minute"

    left, outputs = assert_no_unmarked_row_points_at_a_missing_file(node)
    assert left > 0, "the kill came after the purge had finished: nothing left for the next run to finish"

    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"with {left} files an earlier run had marked" in result.stdout
    assert assert_no_unmarked_row_points_at_a_missing_file(node) == (0, outputs)
    assert not any(path.exists() for path in paths)
    assert list(node.config.incoming_dir.iterdir()) == [] and list(node.config.jobs_dir.iterdir()) == []


def test_a_serving_node_applies_retention_on_its_schedule(node_factory):
    node = node_factory(sections="[retention]\nincoming_days = 1\noutputs_days = 1\ninterval_minutes = 0.02\n").start()
    engine = open_database(node.database_url, fsync=False)
    store = InstanceStore(engine, node.data_dir / "incoming", fsync=False)
    files = write_cylinder_ct(node.root / "ct", slices=6, rows=16, columns=16)
    for path in files:
        buffer = BytesIO()
        dcmwrite(buffer, dcmread(path), enforce_file_format=True)
        store.save(buffer.getvalue(), ExplicitVRLittleEndian, SENDER)
    series = dcmread(files[0]).SeriesInstanceUID
    job = submit_series(engine, series, lambda s, i: Eligibility(False, "not for this test"))  # never reaches the worker
    with engine.begin() as connection:
        connection.execute(update(Job).where(Job.id == job.id).values(finished_at=utcnow() - timedelta(days=2)))
    size = sum(path.stat().st_size for path in (node.data_dir / "incoming").rglob("*.dcm"))

    deadline = time.monotonic() + 60
    while "retention: removed 6 instances" not in node.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    expected = f"retention: removed 6 instances of 1 series ({size / 1000:.1f} kB) and the outputs of 0 jobs (0 B);"
    assert expected in node.log(), node.log()
    assert not list((node.data_dir / "incoming").rglob("*.dcm"))
    (study,) = json.loads(node.rtnode("studies", "--json").stdout)
    assert study["series"][0]["removed_at"] is not None
    assert node.stop() == 0
