"""InstanceStore on real files and a real database (SQLite and PostgreSQL), without the network."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.status import Status
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from node.db.models import Instance
from node.instance_check import StoreRefused
from node.store import CallingPeer, InstanceStore
from node.synth.ct_series import write_cylinder_ct

SENDER = CallingPeer("SCANNER", "127.0.0.1")
EXPLICIT = ExplicitVRLittleEndian


@pytest.fixture
def store(engine, tmp_path):
    return InstanceStore(engine, tmp_path / "incoming"), sessionmaker(engine)


def encoded(ds) -> bytes:
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def slice_ds(tmp_path):
    return dcmread(write_cylinder_ct(tmp_path / "ct", slices=1, rows=16, columns=16)[0])


def test_saved_file_is_the_received_bytes(store, slice_ds):
    instance_store, sessions = store
    data = encoded(slice_ds)
    stored = instance_store.save(data, EXPLICIT, SENDER)
    assert stored.path.read_bytes() == data
    assert stored.path.parts[-3:] == (slice_ds.StudyInstanceUID, slice_ds.SeriesInstanceUID, f"{slice_ds.SOPInstanceUID}.dcm")
    assert not stored.duplicate
    with sessions() as session:
        row = session.scalars(select(Instance)).one()
        assert (row.size_bytes, row.transfer_syntax_uid, row.series.modality) == (len(data), EXPLICIT, "CT")
        assert row.series.study.patient_id == slice_ds.PatientID


def test_missing_uid(store, slice_ds):
    del slice_ds.SeriesInstanceUID
    with pytest.raises(StoreRefused) as info:
        store[0].save(encoded(slice_ds), EXPLICIT, SENDER)
    assert info.value.status == Status.MISSING_UID
    assert "SeriesInstanceUID" in str(info.value)


def test_uid_that_would_escape_the_data_folder_is_refused(store, slice_ds, tmp_path):
    slice_ds.StudyInstanceUID = "../../etc"
    with pytest.raises(StoreRefused) as info:
        store[0].save(encoded(slice_ds), EXPLICIT, SENDER)
    assert info.value.status == Status.INVALID_UID
    assert not (tmp_path / "etc").exists()


@pytest.mark.parametrize("payload", [b"", b"\x00" * 10, b"DICM" * 100, bytes(range(256)) * 8])
def test_undecodable_bytes(store, payload):
    """Bytes that are no dataset cannot be decoded (0xC000); 0xC001 is for a dataset that decodes but lacks a UID.
    `b"DICM" * 100` has the DICM prefix where Part 10 wants it, and no file meta after it."""
    instance_store, sessions = store
    with pytest.raises(StoreRefused) as info:
        instance_store.save(payload, EXPLICIT, SENDER)
    assert info.value.status == Status.CANNOT_DECODE
    assert str(info.value).startswith("dataset cannot be decoded: ")
    with sessions() as session:
        assert session.scalars(select(Instance)).all() == []


def test_database_error_answers_out_of_resources_and_leaves_no_file(store, slice_ds, tmp_path):
    instance_store, sessions = store
    with sessions.kw["bind"].begin() as connection:  # renamed: PostgreSQL refuses to drop a table others refer to
        connection.exec_driver_sql("ALTER TABLE instances RENAME TO instances_gone")
    with pytest.raises(StoreRefused) as info:
        instance_store.save(encoded(slice_ds), EXPLICIT, SENDER)
    assert info.value.status == Status.OUT_OF_RESOURCES
    assert list(Path(tmp_path / "incoming").rglob("*.dcm")) == []


def test_row_whose_file_vanished_is_healed(store, slice_ds):
    instance_store, sessions = store
    first = instance_store.save(encoded(slice_ds), EXPLICIT, SENDER)
    first.path.unlink()
    second = instance_store.save(encoded(slice_ds), EXPLICIT, SENDER)
    assert second.duplicate and second.path.is_file()
    with sessions() as session:
        assert session.scalars(select(Instance.times_received)).one() == 2
