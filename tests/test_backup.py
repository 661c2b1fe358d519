"""`rtnode backup` and `rtnode restore`: a backup taken while a series is being pushed is a consistent database
that, restored into a fresh data directory, lists the jobs the node had; a restore never overwrites a database
and refuses a backup whose files are not those its manifest describes."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from node import __version__
from node.backup import DATABASE_COPY, MANIFEST
from node.config import BUNDLED_WEIGHTS
from node.db.engine import alembic_config, open_database
from node.harness import NodeProcess, free_port
from node.pipeline.model_files import model_digest
from node.synth.ct_series import write_cylinder_ct
from tests.conftest import wait_until
from tests.test_loop import jobs, push

# Every series is rejected for too few slices as soon as it is quiet: jobs in the log, and no inference to wait for.
REJECT_EVERY_SERIES = "[completion]\nquiet_seconds = 1.0\nmin_slices = 1000\nrelease_grace_seconds = 0.5\n"


class RepeatedPush(threading.Thread):
    """storescu sends a series again and again until stopped: the node writes to its database all the while."""

    def __init__(self, node: NodeProcess, folder: Path) -> None:
        super().__init__(daemon=True)
        self.node, self.folder = node, folder
        self.pushes = 0
        self.failure: AssertionError | None = None
        self._stop_asked = threading.Event()

    def run(self) -> None:
        while not self._stop_asked.is_set():
            try:
                push(self.node, self.folder, "+sd")
            except AssertionError as failure:
                self.failure = failure
                return
            self.pushes += 1

    def stop(self) -> None:
        self._stop_asked.set()
        self.join(timeout=120)


def instance_count(database: Path) -> int:
    with sqlite3.connect(database, timeout=10) as connection:
        return connection.execute("select count(*) from instances").fetchone()[0]


def fresh_node(root: Path) -> NodeProcess:
    """The configuration of a node that has not run: its data directory holds no database yet."""
    return NodeProcess(root=root, port=free_port())


def test_a_backup_taken_during_a_push_restores_the_job_log(node_factory, tmp_path):
    source = node_factory(sections=REJECT_EVERY_SERIES).start()
    push(source, write_cylinder_ct(tmp_path / "first", slices=20, rows=64, columns=64)[0].parent, "+sd")
    wait_until(lambda: len(jobs(source)) == 1, timeout=60)
    pushing = RepeatedPush(source, write_cylinder_ct(tmp_path / "second", slices=120, rows=64, columns=64)[0].parent)
    pushing.start()
    wait_until(lambda: instance_count(source.database) > 20, timeout=60)  # the second series is arriving
    at_start = jobs(source)
    taken = source.rtnode("backup", str(tmp_path / "backup"))
    still_pushing = pushing.is_alive()
    pushing.stop()
    assert taken.returncode == 0, taken.stderr
    assert still_pushing and pushing.failure is None, pushing.failure

    copy = tmp_path / "backup" / DATABASE_COPY
    with sqlite3.connect(copy) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert instance_count(copy) > 20  # the push was under way when the copy was taken

    target = fresh_node(tmp_path / "fresh")
    restored = target.rtnode("restore", str(tmp_path / "backup"))
    assert restored.returncode == 0, restored.stderr
    restored_jobs = {job["id"]: job for job in jobs(target)}
    later_ids = {job["id"] for job in jobs(source)}
    assert all(restored_jobs.get(job["id"]) == job for job in at_start), (at_start, restored_jobs)  # rejected: final
    assert set(restored_jobs) <= later_ids


@pytest.fixture
def recorded(tmp_path) -> NodeProcess:
    """A node's configuration with a database (migrated, empty) and no node running."""
    node = fresh_node(tmp_path / "node")
    open_database(node.database_url).dispose()
    return node


@pytest.fixture
def backup(recorded, tmp_path) -> Path:
    folder = tmp_path / "backup"
    taken = recorded.rtnode("backup", str(folder))
    assert taken.returncode == 0, taken.stderr
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_manifest_names_version_schema_files_and_model_digests(backup, recorded):
    from alembic.script import ScriptDirectory

    manifest = json.loads((backup / MANIFEST).read_text())
    assert manifest["rtnode_version"] == __version__
    assert manifest["schema_revision"] == ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert [(f["name"], f["sha256"]) for f in manifest["files"]] == [
        (DATABASE_COPY, sha256(backup / DATABASE_COPY)), ("node.toml", sha256(recorded.config_path))
    ]
    assert manifest["models"] == [{"name": "[model]", "path": str(BUNDLED_WEIGHTS), "sha256": model_digest(BUNDLED_WEIGHTS)}]
    assert sorted(p.name for p in backup.iterdir()) == sorted([DATABASE_COPY, "node.toml", MANIFEST])  # no image data
    modes = {stat.S_IMODE(p.stat().st_mode) for p in backup.iterdir()}
    assert (stat.S_IMODE(backup.stat().st_mode), modes) == (0o700, {0o600})  # patient data and passwords


def test_restore_never_overwrites_a_database(backup, recorded):
    before = sha256(recorded.database)
    refused = recorded.rtnode("restore", str(backup))
    assert refused.returncode == 2 and f"{recorded.database} exists" in refused.stderr, refused.stderr
    assert sha256(recorded.database) == before


def test_a_backup_whose_files_differ_from_its_manifest_is_refused(backup, tmp_path):
    copy = backup / DATABASE_COPY
    copy.write_bytes(copy.read_bytes() + b"\0")
    target = fresh_node(tmp_path / "fresh")
    refused = target.rtnode("restore", str(backup))
    assert refused.returncode == 2 and f"{copy} hashes to sha256" in refused.stderr, refused.stderr
    assert not target.database.exists()


def test_backup_goes_only_into_a_new_or_empty_folder(recorded, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "earlier.txt").write_text("kept")
    refused = recorded.rtnode("backup", str(occupied))
    assert refused.returncode == 2 and "is not empty" in refused.stderr, refused.stderr
    assert [p.name for p in occupied.iterdir()] == ["earlier.txt"]


def test_a_postgresql_database_is_left_to_pg_dump(tmp_path):
    node = NodeProcess(
        root=tmp_path / "node", port=free_port(), database_url="postgresql+psycopg://rtnode:secret@db.example.org:5433/rtnode"
    )
    out = tmp_path / "backup"
    taken = node.rtnode("backup", str(out))
    assert taken.returncode == 0, taken.stderr
    command = f"pg_dump --format=custom --file={out / 'rtnode.pgdump'} --dbname=postgresql://rtnode@db.example.org:5433/rtnode"
    assert command in taken.stdout and "secret" not in taken.stdout
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "node.toml"]


def test_a_backup_of_an_earlier_schema_is_upgraded_when_restored(tmp_path):
    from tests.test_upgrade import HEAD, PREVIOUS, database_at, fill_every_table

    source = fresh_node(tmp_path / "node")
    old = database_at(PREVIOUS, source.database_url)
    fill_every_table(old)
    old.dispose()
    taken = source.rtnode("backup", str(tmp_path / "backup"))
    assert taken.returncode == 0, taken.stderr
    target = fresh_node(tmp_path / "fresh")
    restored = target.rtnode("restore", str(tmp_path / "backup"))
    assert restored.returncode == 0 and f"schema {PREVIOUS})" in restored.stdout, restored.stderr
    assert f"upgraded to {HEAD}" in restored.stdout
    assert [job["id"] for job in jobs(target)] == [1]


def test_a_backup_from_a_newer_schema_is_refused(backup, tmp_path):
    manifest = json.loads((backup / MANIFEST).read_text())
    (backup / MANIFEST).write_text(json.dumps({**manifest, "schema_revision": "9999"}))
    target = fresh_node(tmp_path / "fresh")
    refused = target.rtnode("restore", str(backup))
    assert refused.returncode == 2 and "schema 9999, which this rtnode" in refused.stderr, refused.stderr
    assert not target.database.exists()
