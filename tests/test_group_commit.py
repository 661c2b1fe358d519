"""Group commit: instances arriving together on different associations share a commit, lose nothing."""

from __future__ import annotations

import threading
from io import BytesIO

from pydicom import dcmread
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import event, func, select

from node.db.models import Instance
from node.store import CallingPeer, InstanceStore
from node.synth.ct_series import write_cylinder_ct
from tests.conftest import wait_until

SENDER = CallingPeer("SCANNER", "127.0.0.1")


def _slices(tmp_path, count: int, store: InstanceStore) -> list[bytes]:
    """`count` slices whose saves take different per-UID locks: two UIDs sharing a lock would make
    the second wait for the first's commit, which these tests hold back on purpose."""
    encoded, buckets = [], set()
    for path in write_cylinder_ct(tmp_path / "ct", slices=4 * count, rows=16, columns=16):
        bucket = hash(str(dcmread(path).SOPInstanceUID)) % len(store._uid_locks)
        if bucket not in buckets and len(encoded) < count:
            buckets.add(bucket)
            buffer = BytesIO()
            dcmwrite(buffer, dcmread(path), enforce_file_format=True)
            encoded.append(buffer.getvalue())
    assert len(encoded) == count
    return encoded


def test_instances_arriving_while_a_commit_runs_are_committed_together(engine, tmp_path):
    store = InstanceStore(engine, tmp_path / "incoming")
    commits = []
    event.listen(engine, "commit", lambda connection: commits.append(1))
    slices = _slices(tmp_path, 4, store)
    saved = []

    def save(data: bytes) -> None:
        saved.append(store.save(data, ExplicitVRLittleEndian, SENDER))

    # The database is busy (its lock held, as by a commit in flight): the first arrival waits on it
    # while the other three queue behind it, then those three go in one commit.
    with store._db_lock:
        first = threading.Thread(target=save, args=(slices[0],))
        first.start()
        wait_until(lambda: store._committing)
        others = [threading.Thread(target=save, args=(data,)) for data in slices[1:]]
        for thread in others:
            thread.start()
        wait_until(lambda: len(store._arrivals) == 3)
        commits.clear()
    for thread in [first, *others]:
        thread.join(timeout=30)

    assert len(saved) == 4 and all(s.path.is_file() for s in saved)
    assert len(commits) == 2
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(Instance)).scalar_one() == 4


def test_a_row_the_database_refuses_fails_only_its_own_instance(engine, tmp_path):
    """A group whose commit fails is retried row by row: here one row's UID was taken meanwhile
    by another writer (another node process sharing the database)."""
    store = InstanceStore(engine, tmp_path / "incoming")
    slices = _slices(tmp_path, 3, store)
    taken = dcmread(BytesIO(slices[1])).SOPInstanceUID
    results: dict[int, object] = {}

    def save(index: int) -> None:
        try:
            results[index] = store.save(slices[index], ExplicitVRLittleEndian, SENDER)
        except Exception as exc:  # noqa: BLE001 - the test reads what each arrival got
            results[index] = exc

    with store._db_lock:
        first = threading.Thread(target=save, args=(0,))
        first.start()
        wait_until(lambda: store._committing)
        others = [threading.Thread(target=save, args=(index,)) for index in (1, 2)]
        for thread in others:
            thread.start()
        wait_until(lambda: len(store._arrivals) == 2)
        other_writer = InstanceStore(engine, tmp_path / "elsewhere")
        other_writer.save(slices[1], ExplicitVRLittleEndian, SENDER)
    for thread in [first, *others]:
        thread.join(timeout=30)

    assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)
    assert getattr(results[1], "status", None) == 0xA700  # out of resources: the sender may resend it
    assert not (tmp_path / "incoming").joinpath(*results[0].path.parts[-3:-1], f"{taken}.dcm").exists()
    with engine.connect() as connection:
        uids = connection.execute(select(Instance.sop_instance_uid)).scalars().all()
    assert sorted(uids) == sorted(dcmread(BytesIO(data)).SOPInstanceUID for data in slices)
