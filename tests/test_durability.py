"""What the receiving side acknowledges is durable (README, Receiving: Durability): a SIGKILL in the middle of an
association loses no instance the sender was answered Success for, and the store makes the file, its folder entry
and its row durable, in that order, before Success is answered."""

from __future__ import annotations

import os
import re
import struct
import threading
from pathlib import Path

import pynetdicom
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import create_engine, text

from node.config import parse_config
from node.harness import LOOPBACK, free_port
from node.scp import StorageSCP
from node.service import open_node_database
from node.store import InstanceStore
from node.synth.ct_series import write_cylinder_ct


def dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's bytes after its file meta: what a C-STORE carries, and what the node keeps as received (the
    file meta before them is the node's own)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    group, element, vr, length, meta_length = struct.unpack_from("<HH2sHI", data, 132)
    assert (group, element, vr, length) == (0x0002, 0x0000, b"UL", 4), "file meta without its group length"
    return data[132 + 12 + meta_length :]


def held_instances(database_url: str) -> dict[str, tuple]:
    """SOP Instance UID -> (path, size_bytes, transfer_syntax_uid, times_received) of each row."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            sql = "select sop_instance_uid, path, size_bytes, transfer_syntax_uid, times_received from instances"
            rows = connection.execute(text(sql))
            return {row[0]: tuple(row[1:]) for row in rows}
    finally:
        engine.dispose()


def test_sigkill_mid_association_loses_nothing_acknowledged(node_factory, database_url, tmp_path, monkeypatch):
    node = node_factory(database_url=database_url, extra_config="local_worker = false").start()
    paths = write_cylinder_ct(tmp_path / "ct", slices=60, rows=64, columns=64)
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)  # each file's dataset bytes, as they are
    kill_after = 10
    acknowledged: list[Path] = []
    errors: list[BaseException] = []
    enough, killed = threading.Event(), threading.Event()

    def send() -> None:
        """Slice after slice, on one association, until the node dies; what happened is kept for the main thread."""
        try:
            ae = AE(ae_title="SCANNER")
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate(LOOPBACK, node.port, ae_title="RTNODE")
            assert assoc.is_established
            for path in paths:
                status = assoc.send_c_store(path)
                if getattr(status, "Status", None) != 0x0000:
                    break  # no answer: the node is gone
                acknowledged.append(path)
                if len(acknowledged) == kill_after:
                    enough.set()
            assoc.abort()
        except BaseException as exc:
            if not killed.is_set():  # a send the kill cut short may raise: that is what is being tested
                errors.append(exc)
        finally:
            enough.set()

    sender = threading.Thread(target=send)
    sender.start()
    assert enough.wait(timeout=60)
    killed.set()
    node.kill()
    sender.join(timeout=60)
    assert not sender.is_alive() and errors == []
    assert kill_after <= len(acknowledged) < len(paths), "the kill did not come in the middle of the association"

    node.start()  # as after a crash: the next start finds what the killed one left
    held = held_instances(node.database_url)
    for sent in acknowledged:
        ds = dcmread(sent, stop_before_pixels=True)
        stored = node.data_dir / "incoming" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert dataset_bytes(stored) == dataset_bytes(sent), f"acknowledged {sent.name} is not on disk as sent"
        assert held.get(ds.SOPInstanceUID) == (str(stored), stored.stat().st_size, ExplicitVRLittleEndian, 1)
    # Beyond those, at most the instance in flight at the kill, stored but never answered.
    assert len(acknowledged) <= len(held) <= len(acknowledged) + 1
    assert list((node.data_dir / "incoming").rglob("*.part")) == []


def test_file_folder_and_row_are_durable_before_success_is_answered(tmp_path, monkeypatch):
    """The real SCP and store in this process, on loopback, with the durable steps recorded as they return: the
    rename of the whole file into place, the fsyncs of the file and of its folder (at once, in either order), the
    database commit, and only then the C-STORE answer."""
    config = parse_config(
        f"""
[node]
ae_title = "RTNODE"
host = "{LOOPBACK}"
port = {free_port()}
data_dir = "{tmp_path / "data"}"
database_url = "sqlite:///{tmp_path / "rtnode.sqlite3"}"

[security]
allowed_callers = [{{ ae_title = "*", host = "{LOOPBACK}" }}]
"""
    )
    assert config.node.fsync
    engine = open_node_database(config)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL: SQLite syncs its log at each commit
    scp = StorageSCP(config, InstanceStore(engine, config.incoming_dir, fsync=config.node.fsync))
    steps: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    real_commit, real_send_msg = engine.dialect.do_commit, DIMSEServiceProvider.send_msg

    def fsync(fd: int) -> None:
        real_fsync(fd)
        steps.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def replace(source, target, **kwargs) -> None:
        real_replace(source, target, **kwargs)
        steps.append(("rename", f"{source} -> {target}"))

    def do_commit(dbapi_connection) -> None:
        real_commit(dbapi_connection)
        steps.append(("commit", ""))

    def send_msg(dimse, primitive, context_id) -> None:
        if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None:  # the node's answer
            steps.append(("answer", f"status 0x{primitive.Status:04X}"))
        real_send_msg(dimse, primitive, context_id)

    path = write_cylinder_ct(tmp_path / "ct", slices=1, rows=32, columns=32)[0]
    ds = dcmread(path, stop_before_pixels=True)
    scp.start()
    try:
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(engine.dialect, "do_commit", do_commit)
        monkeypatch.setattr(DIMSEServiceProvider, "send_msg", send_msg)
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate(LOOPBACK, config.node.port, ae_title="RTNODE")
        assert assoc.is_established
        assert assoc.send_c_store(path).Status == 0x0000
        assoc.release()
    finally:
        monkeypatch.undo()
        scp.stop(grace_seconds=5)
        engine.dispose()

    folder = config.incoming_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID
    final = folder / f"{ds.SOPInstanceUID}.dcm"
    assert steps and steps[0][0] == "rename", steps
    temporary, renamed_to = steps[0][1].split(" -> ")
    assert re.fullmatch(re.escape(f"{folder}/.{final.name}.") + r"\w+\.part", temporary), temporary
    assert renamed_to == str(final)
    assert sorted(steps[1:3]) == [("fsync", str(folder)), ("fsync", str(final))], steps
    assert steps[3:] == [("commit", ""), ("answer", "status 0x0000")], steps
