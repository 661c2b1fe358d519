"""The receiving node against real DCMTK peers on loopback; the tests that read its rows do so on
SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import create_engine, text

from node.harness import LOOPBACK, NodeProcess, free_port
from node.synth.ct_series import write_cylinder_ct
from tests.conftest import DCMTK_ENV, require_tool, run_tool, shared_data, wait_until

# A-ASSOCIATE-RJ fields (PS3.8 9.3.4): the result, its source, and the reasons the service user gives.
REJECTED_PERMANENT = 0x01
SERVICE_USER = 0x01
CALLING_AE_NOT_RECOGNISED = 0x03
CALLED_AE_NOT_RECOGNISED = 0x07


def echo(port: int, calling: str = "ECHOSCU", called: str = "RTNODE") -> subprocess.CompletedProcess:
    return run_tool(require_tool("echoscu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port), timeout=30)


def storescu(port: int, files: list[Path] | Path, *options: str, calling: str = "SCANNER") -> subprocess.CompletedProcess:
    paths = [str(files)] if isinstance(files, Path) else [str(p) for p in files]
    return run_tool(require_tool("storescu"), "-aet", calling, "-aec", "RTNODE", *options, "127.0.0.1", str(port), *paths)


def rejection(port: int, calling: str, called: str = "RTNODE") -> tuple[int, int, int]:
    """The A-ASSOCIATE-RJ a pynetdicom requestor is answered: (result, source, reason)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, port, ae_title=called)
    assert assoc.is_rejected and not assoc.is_established
    answer = assoc.acceptor.primitive
    return answer.result, answer.result_source, answer.diagnostic


def listening(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=1).close()
    except OSError:
        return False
    return True


def send_and_hang_up(port: int, data: bytes) -> None:
    """Sends `data`, then ends the connection cleanly: our half closed first, the node's answer read until it closes
    its own, so no reset can cut the node's read short (which would log otherwise)."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):
            pass


def rows(database_url: str, sql: str) -> list[tuple]:
    """What `sql` reads from the node's database, whichever engine it is on."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql))]
    finally:
        engine.dispose()


@pytest.fixture
def node_on_each_database(node_factory, database_url) -> NodeProcess:
    """A started node on SQLite and on PostgreSQL."""
    return node_factory(database_url=database_url).start()


def stored_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "incoming").rglob("*.dcm"))


def test_echo(node):
    result = echo(node.port)
    assert result.returncode == 0, result.stderr


def test_store_series_identical_files_and_rows(node_on_each_database, tmp_path):
    node = node_on_each_database
    sent = write_cylinder_ct(tmp_path / "ct", slices=50)
    result = storescu(node.port, tmp_path / "ct", "+sd")
    assert result.returncode == 0, result.stderr

    files = stored_files(node.data_dir)
    assert len(files) == 50
    assert rows(node.database_url, "select count(*), sum(times_received) from instances") == [(50, 50)]
    by_uid = {dcmread(p).SOPInstanceUID: p for p in sent}
    for stored_path in files:
        stored = dcmread(stored_path)
        original = dcmread(by_uid[stored.SOPInstanceUID])
        assert stored == original
        assert stored.PixelData == original.PixelData
        assert stored.file_meta.MediaStorageSOPInstanceUID == stored.SOPInstanceUID
    (path, size, ae, peer), *_ = rows(node.database_url, "select path, size_bytes, calling_ae_title, peer_address from instances")
    assert Path(path).stat().st_size == size
    assert (ae, peer) == ("SCANNER", "127.0.0.1")

    listing = json.loads(node.rtnode("studies", "--json").stdout)
    assert [s["instances"] for study in listing for s in study["series"]] == [50]
    assert listing[0]["series"][0]["modality"] == "CT"
    assert listing[0]["series"][0]["series_instance_uid"] == original.SeriesInstanceUID


def test_repeat_is_idempotent(node_on_each_database, tmp_path):
    node = node_on_each_database
    write_cylinder_ct(tmp_path / "ct", slices=5)
    assert storescu(node.port, tmp_path / "ct", "+sd").returncode == 0
    assert storescu(node.port, tmp_path / "ct", "+sd").returncode == 0
    assert len(stored_files(node.data_dir)) == 5
    assert rows(node.database_url, "select count(*), sum(times_received) from instances") == [(5, 10)]


def test_jpeg2000_series_stored_intact(node):
    source = shared_data("abdomen-ct-j2k/CT")
    result = storescu(node.port, source, "+sd", "-xv")
    assert result.returncode == 0, result.stderr
    files = stored_files(node.data_dir)
    originals = {dcmread(p).SOPInstanceUID: dcmread(p) for p in source.iterdir()}
    assert len(files) == len(originals) == 20
    for path in files:
        stored = dcmread(path)
        assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
        assert stored.PixelData == originals[stored.SOPInstanceUID].PixelData
        assert stored.pixel_array.shape == (512, 512)  # decodable: the JPEG 2000 decoder is installed


def test_missing_uids_refused_with_failure_status(node):
    node.allowed_log_problems = (
        r"refused instance [0-9.]+ from SCANNER@127\.0\.0\.1: "
        r"dataset lacks StudyInstanceUID, SeriesInstanceUID \(status 0xC001\)",
    )
    source = shared_data("abdomen-ct-j2k-missing-uids/CT")
    dataset = dcmread(sorted(source.iterdir())[0])
    # A C-STORE request needs the SOP Class/Instance UIDs: a sender takes them from the file meta.
    # The Study and Series UIDs stay empty, as published.
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.4.90")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="RTNODE")
    assert assoc.is_established
    status = assoc.send_c_store(dataset)
    assoc.release()
    assert status.Status == 0xC001
    assert "dataset lacks StudyInstanceUID, SeriesInstanceUID (status 0xC001)" in node.log()
    assert stored_files(node.data_dir) == []
    assert echo(node.port).returncode == 0


def test_unknown_caller_and_wrong_called_title_rejected(node_factory):
    node = node_factory(allowed_callers='[{ ae_title = "SCANNER", host = "127.0.0.1" }]').start()
    assert echo(node.port, calling="SCANNER").returncode == 0

    assert rejection(node.port, "STRANGER") == (REJECTED_PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNISED)
    assert rejection(node.port, "SCANNER", called="NOTRTNODE") == (REJECTED_PERMANENT, SERVICE_USER, CALLED_AE_NOT_RECOGNISED)
    # DCMTK's echoscu reads the same answer.
    stranger = echo(node.port, calling="STRANGER")
    assert stranger.returncode != 0
    assert "Result: Rejected Permanent, Source: Service User" in stranger.stderr, stranger.stderr
    assert "Reason: Calling AE Title Not Recognized" in stranger.stderr, stranger.stderr
    wrong_called = echo(node.port, calling="SCANNER", called="NOTRTNODE")
    assert wrong_called.returncode != 0
    assert "Result: Rejected Permanent, Source: Service User" in wrong_called.stderr, wrong_called.stderr
    assert "Reason: Called AE Title Not Recognized" in wrong_called.stderr, wrong_called.stderr
    log = node.log()
    assert log.count("rejected association from STRANGER@127.0.0.1: caller not in security.allowed_callers") == 2
    assert log.count("rejected association from SCANNER@127.0.0.1: called AE title 'NOTRTNODE' is not ours") == 2
    kept = rows(node.database_url, "select calling_ae_title, address, reason from association_rejections order by id")
    assert kept == [
        ("STRANGER", "127.0.0.1", "caller not in security.allowed_callers"),
        ("SCANNER", "127.0.0.1", "called AE title 'NOTRTNODE' is not ours ('RTNODE')"),
    ] * 2


def test_caller_from_other_host_rejected(node_factory):
    node = node_factory(allowed_callers='[{ ae_title = "*", host = "10.1.2.3" }]').start()
    assert rejection(node.port, "ECHOSCU") == (REJECTED_PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNISED)
    assert "rejected association from ECHOSCU@127.0.0.1" in node.log()


def test_sigkill_after_success_loses_nothing(node_factory, tmp_path):
    node = node_factory().start()
    write_cylinder_ct(tmp_path / "ct", slices=30)
    assert storescu(node.port, tmp_path / "ct", "+sd").returncode == 0
    node.kill()
    assert len(stored_files(node.data_dir)) == 30
    node.start()
    listing = json.loads(node.rtnode("studies", "--json").stdout)
    assert listing[0]["series"][0]["instances"] == 30
    for (path,) in rows(node.database_url, "select path from instances"):
        assert dcmread(path).SOPInstanceUID in path
    assert list((node.data_dir / "incoming").rglob("*.part")) == []


def test_garbage_and_truncated_pdu_do_not_stop_the_node(node):
    node.allowed_log_problems = (
        r"pynetdicom\.dul: Unknown PDU type received '0x(DE|BE)'",
        r"pynetdicom\.dul: The received PDU is shorter than expected \(16 of 206 bytes received\)",
    )
    # Garbage whose every 6-byte PDU header names an unknown PDU type (0xDE, 0xBE): what pynetdicom logs is known.
    send_and_hang_up(node.port, b"\xde\xad\xbe\xef" * 1024)
    # An A-ASSOCIATE-RQ header announcing 200 bytes, then only 10 of them.
    send_and_hang_up(node.port, bytes([0x01, 0x00, 0x00, 0x00, 0x00, 0xC8]) + b"\x00\x01" + b"\x00" * 8)
    assert echo(node.port).returncode == 0


def test_association_never_released_is_dropped(node):
    node.allowed_log_problems = (r"pynetdicom\.association: Network timeout reached",)
    ae = AE(ae_title="HANGER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="RTNODE")
    assert assoc.is_established
    assert echo(node.port).returncode == 0  # others are served meanwhile
    deadline = time.monotonic() + 15
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not assoc.is_established, "idle association was not dropped after network_timeout_seconds"
    assert echo(node.port).returncode == 0


def test_ten_simultaneous_associations(node, tmp_path):
    for i in range(10):
        write_cylinder_ct(tmp_path / f"ct{i}", slices=8, rows=64, columns=64)
    processes = [
        subprocess.Popen(
            [
                require_tool("storescu"),
                "-aet",
                f"SCANNER{i}",
                "-aec",
                "RTNODE",
                "+sd",
                "127.0.0.1",
                str(node.port),
                str(tmp_path / f"ct{i}"),
            ],
            env=DCMTK_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(10)
    ]
    assert [p.wait(timeout=120) for p in processes] == [0] * 10
    assert rows(node.database_url, "select count(*) from instances") == [(80,)]
    assert rows(node.database_url, "select count(distinct calling_ae_title) from instances") == [(10,)]


def test_sigterm_lets_in_flight_association_finish(node, tmp_path):
    paths = write_cylinder_ct(tmp_path / "ct", slices=3, rows=64, columns=64)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="RTNODE")
    assert assoc.is_established
    assert assoc.send_c_store(paths[0]).Status == 0
    node.process.send_signal(15)
    wait_until(lambda: not listening(node.port))
    assert [assoc.send_c_store(p).Status for p in paths[1:]] == [0, 0]
    assoc.release()
    assert node.process.wait(timeout=15) == 0
    assert rows(node.database_url, "select count(*) from instances") == [(3,)]


def test_store_failure_answers_out_of_resources_and_node_keeps_serving(node, tmp_path):
    node.allowed_log_problems = (
        r"refused instance [0-9.]+ from SCANNER@127\.0\.0\.1: cannot write \S+\.dcm: Not a directory \(status 0xA700\)",
    )
    (node.data_dir).mkdir(parents=True, exist_ok=True)
    (node.data_dir / "incoming").write_text("not a directory")  # every file write now fails
    write_cylinder_ct(tmp_path / "ct", slices=2, rows=32, columns=32)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="RTNODE")
    statuses = [assoc.send_c_store(p).Status for p in sorted((tmp_path / "ct").iterdir())]
    assoc.release()
    assert statuses == [0xA700, 0xA700]
    assert rows(node.database_url, "select count(*) from instances") == [(0,)]
    assert "cannot write" in node.log()
    assert echo(node.port).returncode == 0


def test_concurrent_repeats_make_one_row(node_on_each_database, tmp_path):
    node = node_on_each_database
    paths = write_cylinder_ct(tmp_path / "ct", slices=4, rows=32, columns=32)
    statuses: list[list[int]] = []
    errors: list[BaseException] = []

    def send() -> None:
        """Runs in a thread: what it sees is kept for the main thread to assert (an assert here would be lost)."""
        try:
            ae = AE(ae_title="SCANNER")
            ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
            assoc = ae.associate("127.0.0.1", node.port, ae_title="RTNODE")
            try:
                statuses.append([assoc.send_c_store(path).Status for path in paths])
            finally:
                assoc.release()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert statuses == [[0x0000] * 4] * 4
    assert rows(node.database_url, "select count(*), sum(times_received) from instances") == [(4, 16)]
    assert len(stored_files(node.data_dir)) == 4


@pytest.mark.parametrize("taken", ["node.port", "web.port"])
def test_serve_refuses_a_port_in_use_in_one_sentence(tmp_path, taken):
    """Before anything starts: exit 2, the port, its key and the reason (was: exit 70 with an AttributeError for
    the DICOM port; a node running without its web app for the web port)."""
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        if taken == "node.port":
            node = NodeProcess(root=tmp_path / "node", port=port)
        else:
            node = NodeProcess(root=tmp_path / "node", port=free_port(), web_port=port)
        result = node.rtnode("serve")
    assert result.returncode == 2, result.stderr
    said = f"rtnode: cannot listen on {LOOPBACK}:{port} ({taken} in {node.config_path}): Address already in use; "
    assert result.stderr.startswith(said) and "internal error" not in result.stderr, result.stderr
