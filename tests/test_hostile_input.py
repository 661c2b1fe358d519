"""Crafted datasets against the store and a real `rtnode serve` (issue #14): deep nesting, a
deflate bomb, incomplete pixel data, 4 GB lengths, reused SOP Instance UIDs, path-like UIDs,
a huge PatientName, temporary files a killed node left behind.

Each refusal must answer a failure status, log one line naming the peer and store nothing.
The datasets are built byte by byte here, and sent as they are (pynetdicom's chunked sending
reads the file's dataset bytes without decoding them).
"""

from __future__ import annotations

import json
import sqlite3
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import pynetdicom
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from pynetdicom.status import Status
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from node.db.models import Conflict, Instance
from node.instance_check import StoreRefused
from node.inventory import list_studies, study_lines
from node.store import CallingPeer, InstanceStore
from node.synth.ct_series import write_cylinder_ct
from tests.conftest import require_tool, run_tool

SENDER = CallingPeer("SCANNER", "127.0.0.1")
UNDEFINED = 0xFFFFFFFF


# --- crafting ---------------------------------------------------------------------------------


def dataset_bytes(ds: Dataset) -> bytes:
    """`ds` encoded as Explicit VR Little Endian, without file meta."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def part10(ds: Dataset, body: bytes, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """Preamble, file meta for `ds` and `transfer_syntax`, then `body` exactly as given."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)
    return buffer.getvalue() + body


def element(group: int, number: int, vr: bytes, length: int) -> bytes:
    """The header of an element with a 32-bit length (OB, OW, SQ, ...), explicit VR little endian."""
    return struct.pack("<HH2sHI", group, number, vr, 0, length)


def item(length: int, data: bytes = b"", tag: int = 0xE000) -> bytes:
    return struct.pack("<HHI", 0xFFFE, tag, length) + data


def with_pixels(ds: Dataset, pixel_element: bytes) -> bytes:
    """`ds` without its pixel data, then `pixel_element` as given (PixelData is the last tag)."""
    ds.pop(0x7FE00010, None)
    return dataset_bytes(ds) + pixel_element


def nested(ds: Dataset, depth: int) -> bytes:
    """`ds` with `depth` undefined-length sequences, one in the other, before its UIDs."""
    opening = element(0x0008, 0x0006, b"SQ", UNDEFINED) + item(UNDEFINED)
    closing = item(0, tag=0xE00D) + item(0, tag=0xE0DD)
    return dataset_bytes(ds[:0x00080006]) + opening * depth + closing * depth + dataset_bytes(ds[0x00080007:])


def encapsulated(ds: Dataset, fragments: list[bytes], frames: int = 1, delimited: bool = True) -> bytes:
    """`ds` as RLE Lossless with these fragments after an empty Basic Offset Table (not decoded here)."""
    ds.NumberOfFrames = frames
    pixels = element(0x7FE0, 0x0010, b"OB", UNDEFINED) + item(0) + b"".join(fragments)
    return part10(ds, with_pixels(ds, pixels + (item(0, tag=0xE0DD) if delimited else b"")), RLELossless)


def write_deflate_bomb(path: Path, ds: Dataset, inflated_mib: int) -> Path:
    """A Deflated Explicit VR file whose consistent pixel data inflates to `inflated_mib` MiB of
    zeros (about a thousandth of that on disk), compressed as a stream so this test holds none of it."""
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 4096, inflated_mib * 128, 16, 16, 15
    head = with_pixels(ds, element(0x7FE0, 0x0010, b"OW", inflated_mib << 20))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    with path.open("wb") as handle:
        handle.write(part10(ds, compressor.compress(head), DeflatedExplicitVRLittleEndian))
        for _ in range(inflated_mib):
            handle.write(compressor.compress(zeros))
        handle.write(compressor.flush())
    return path


def ct_slice(folder: Path, rows: int = 16, columns: int = 16) -> Dataset:
    return dcmread(write_cylinder_ct(folder, slices=1, rows=rows, columns=columns)[0])


# --- against the store ------------------------------------------------------------------------


class StoreUnderTest(NamedTuple):
    """A store capped at 1 MiB, sessions on its database, and the data directory its files go under."""

    instances: InstanceStore
    sessions: sessionmaker
    data_dir: Path


@pytest.fixture
def store(engine, tmp_path) -> StoreUnderTest:
    return StoreUnderTest(
        InstanceStore(engine, tmp_path / "incoming", fsync=False, max_instance_mb=1), sessionmaker(engine), tmp_path
    )


@pytest.fixture
def slice_ds(tmp_path):
    return ct_slice(tmp_path / "ct")


def stored_as_received(store: StoreUnderTest, data: bytes, transfer_syntax: str) -> None:
    """Save `data`, which must be accepted: the file holds exactly these bytes and its row describes it."""
    saved = store.instances.save(data, transfer_syntax, SENDER)
    assert not saved.duplicate
    assert saved.path.read_bytes() == data
    uid = saved.header.sop_instance_uid
    assert saved.path.name == f"{uid}.dcm"
    with store.sessions() as session:
        row = session.scalars(select(Instance).where(Instance.sop_instance_uid == uid)).one()
        described = (row.path, row.size_bytes, row.transfer_syntax_uid, row.times_received)
        assert described == (str(saved.path), len(data), transfer_syntax, 1)
        assert (row.calling_ae_title, row.peer_address) == (SENDER.ae_title, SENDER.address)
        assert row.series.series_instance_uid == saved.header.series_instance_uid


def refused(store: StoreUnderTest, data: bytes) -> StoreRefused:
    """Save `data`, which must be refused with nothing stored (no file, no row); return the refusal."""
    with pytest.raises(StoreRefused) as info:
        store.instances.save(data, ExplicitVRLittleEndian, SENDER)
    with store.sessions() as session:
        assert session.scalars(select(Instance)).all() == []
    assert [*store.data_dir.glob("incoming/**/*.dcm"), *store.data_dir.glob("conflicts/**/*.dcm")] == []
    return info.value


def test_deeply_nested_sequences_cannot_be_decoded(store, slice_ds):
    refusal = refused(store, part10(slice_ds, nested(slice_ds, 1000)))
    assert refusal.status == Status.CANNOT_DECODE == 0xC000
    assert "nested too deeply" in str(refusal)


def test_shallow_nesting_is_accepted(store, slice_ds):
    stored_as_received(store, part10(slice_ds, nested(slice_ds, 20)), ExplicitVRLittleEndian)


def test_deflated_instance_under_the_cap_is_stored_as_received(store, slice_ds):
    body = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = part10(slice_ds, body.compress(dataset_bytes(slice_ds)) + body.flush(), DeflatedExplicitVRLittleEndian)
    stored = store.instances.save(data, DeflatedExplicitVRLittleEndian, SENDER)
    assert stored.path.read_bytes() == data


def test_deflate_bomb_over_the_cap_is_refused(store, slice_ds, tmp_path):
    bomb = write_deflate_bomb(tmp_path / "bomb.dcm", slice_ds, inflated_mib=8)
    assert bomb.stat().st_size < 20_000
    refusal = refused(store, bomb.read_bytes())
    assert refusal.status == Status.INSTANCE_TOO_LARGE == 0xC003
    assert "node.max_instance_mb" in str(refusal)


def test_uncompressed_instance_over_the_cap_is_refused(store, tmp_path):
    big = ct_slice(tmp_path / "big", rows=1024, columns=1024)  # 2 MiB of pixels, the cap is 1 MiB
    assert refused(store, part10(big, dataset_bytes(big))).status == Status.INSTANCE_TOO_LARGE


def native(ds: Dataset, claimed: int, present: int) -> bytes:
    """`ds` with a native PixelData claiming `claimed` bytes, of which `present` follow."""
    return part10(ds, with_pixels(ds, element(0x7FE0, 0x0010, b"OW", claimed) + bytes(present)))


@pytest.mark.parametrize(
    ("claimed", "present", "why"),
    [
        (512, 256, "claims 512 bytes but the dataset ends after 256"),  # half a 16 x 16 x 16-bit slice, cut off
        (256, 256, "has 256 bytes; Rows x Columns x SamplesPerPixel x frames x BitsAllocated needs 512"),
        (0xFFFFFFF0, 512, "claims 4294967280 bytes"),  # 4 GB
    ],
)
def test_incomplete_native_pixel_data_is_refused(store, slice_ds, claimed, present, why):
    refusal = refused(store, native(slice_ds, claimed, present))
    assert refusal.status == Status.INCOMPLETE_PIXEL_DATA == 0xC004
    assert why in str(refusal)


def test_any_instance_whose_pixel_data_claims_more_than_is_there_is_refused(store, slice_ds):
    """Not only an image's: without Rows, 4 GB claimed with 64 bytes present was once stored (issue #24)."""
    del slice_ds.Rows
    refusal = refused(store, native(slice_ds, 0xFFFFFFF0, 64))
    assert refusal.status == Status.INCOMPLETE_PIXEL_DATA
    assert "pixel data claims 4294967280 bytes but the dataset ends after 64" in str(refusal)


def test_whole_pixel_data_of_an_instance_that_is_no_image_is_stored(store, slice_ds):
    del slice_ds.Rows
    stored_as_received(store, native(slice_ds, 64, 64), ExplicitVRLittleEndian)
    slice_ds.SOPInstanceUID = generate_uid()
    stored_as_received(store, native(slice_ds, 0, 0), ExplicitVRLittleEndian)  # empty: pydicom hands it back decoded


def test_empty_pixel_data_pydicom_hands_back_decoded_is_refused_as_incomplete(store, slice_ds):
    """An empty value comes back from pydicom as a decoded DataElement, which has no length: a real MR
    file of a malformed-file corpus was answered 0xA700 with a traceback (issue #24)."""
    refusal = refused(store, native(slice_ds, 0, 0))
    assert refusal.status == Status.INCOMPLETE_PIXEL_DATA
    assert "pixel data has 0 bytes; Rows x Columns x SamplesPerPixel x frames x BitsAllocated needs 512" in str(refusal)


def test_pixel_data_that_pydicom_reads_as_a_sequence_cannot_be_decoded(store, slice_ds):
    """VR UN of undefined length is read as a sequence of items: a decoded DataElement whose value is no bytes."""
    pixels = element(0x7FE0, 0x0010, b"UN", UNDEFINED) + item(0) + item(0) + item(0, tag=0xE0DD)
    refusal = refused(store, part10(slice_ds, with_pixels(slice_ds, pixels), RLELossless))
    assert refusal.status == Status.CANNOT_DECODE
    assert "pixel data reads as a sequence of items (VR SQ, or UN of undefined length), not bytes" in str(refusal)


def test_other_element_claiming_4_gb_hides_the_pixels_and_is_refused(store, slice_ds):
    private = element(0x0029, 0x1010, b"OB", 0xFFFFFFF0) + bytes(64)
    refusal = refused(store, part10(slice_ds, with_pixels(slice_ds, private + element(0x7FE0, 0x0010, b"OW", 512) + bytes(512))))
    assert refusal.status == Status.INCOMPLETE_PIXEL_DATA and "missing or cut short" in str(refusal)


def test_pixel_data_sizes_follow_frames_bits_and_padding(store, slice_ds):
    slice_ds.Rows, slice_ds.Columns, slice_ds.BitsAllocated, slice_ds.BitsStored, slice_ds.HighBit = 3, 3, 1, 1, 0
    slice_ds.NumberOfFrames = 2
    assert refused(store, native(slice_ds, 2, 2)).status == Status.INCOMPLETE_PIXEL_DATA  # 18 bits need 3 bytes
    stored_as_received(store, native(slice_ds, 4, 4), ExplicitVRLittleEndian)  # 3 bytes, padded to even
    slice_ds.SOPInstanceUID = generate_uid()
    slice_ds.BitsAllocated, slice_ds.BitsStored, slice_ds.HighBit, slice_ds.NumberOfFrames = 8, 8, 7, 1
    stored_as_received(store, native(slice_ds, 10, 10), ExplicitVRLittleEndian)  # 9 bytes, padded


def test_image_without_pixel_data_is_refused(store, slice_ds):
    del slice_ds.PixelData
    refusal = refused(store, part10(slice_ds, dataset_bytes(slice_ds)))
    assert refusal.status == Status.INCOMPLETE_PIXEL_DATA and "missing or cut short" in str(refusal)


@pytest.mark.parametrize(
    ("fragments", "frames", "delimited"),
    [
        ([], 1, True),  # no fragment at all
        ([item(1000, b"\x00" * 100)], 1, True),  # a fragment cut short, the delimiter after it
        ([item(1000, b"\x00" * 100)], 1, False),  # the stream ends inside the fragment
        ([item(4, b"\x00" * 4)] * 2, 3, True),  # fewer fragments than frames
    ],
)
def test_incomplete_encapsulated_pixel_data_is_refused(store, slice_ds, fragments, frames, delimited):
    refusal = refused(store, encapsulated(slice_ds, fragments, frames, delimited))
    assert refusal.status == Status.INCOMPLETE_PIXEL_DATA


def test_whole_encapsulated_fragments_are_accepted(store, slice_ds):
    stored_as_received(store, encapsulated(slice_ds, [item(4, b"\x00" * 4)] * 3, frames=3), RLELossless)


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_path_like_uids_are_refused(store, slice_ds, keyword, tmp_path):
    setattr(slice_ds, keyword, "../../escaped")
    assert refused(store, part10(slice_ds, dataset_bytes(slice_ds))).status == Status.INVALID_UID
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "escaped").exists()


def test_huge_patient_name_is_text_cut_to_its_column(store, slice_ds):
    instance_store, sessions, _ = store
    slice_ds.PatientName = "A" * 100_000  # too long for PN's 16-bit length: written as UN, read back as bytes
    instance_store.save(part10(slice_ds, dataset_bytes(slice_ds)), ExplicitVRLittleEndian, SENDER)
    [study] = list_studies(sessions.kw["bind"])
    assert study.patient_name == "A" * 324
    assert "b'" not in study_lines([study])[0]


def test_reused_uid_kept_aside_and_listed_under_the_series_it_claims(store, slice_ds, tmp_path):
    instance_store, sessions, _ = store
    original = part10(slice_ds, dataset_bytes(slice_ds))
    held = instance_store.save(original, ExplicitVRLittleEndian, SENDER)
    assert instance_store.save(original, ExplicitVRLittleEndian, SENDER).duplicate  # identical: a repeat

    slice_ds.StudyInstanceUID, slice_ds.SeriesInstanceUID = generate_uid(), generate_uid()
    elsewhere = part10(slice_ds, dataset_bytes(slice_ds))
    with pytest.raises(StoreRefused) as info:
        instance_store.save(elsewhere, ExplicitVRLittleEndian, CallingPeer("OTHER", "127.0.0.9"))
    assert info.value.status == Status.DUPLICATE_SOP_INSTANCE == 0x0111
    kept = tmp_path / "conflicts" / slice_ds.SOPInstanceUID / "1.dcm"
    assert kept.read_bytes() == elsewhere and held.path.read_bytes() == original
    assert f"kept aside at {kept}" in str(info.value)

    with sessions() as session:
        conflict = session.scalars(select(Conflict)).one()
        assert (conflict.series_instance_uid, conflict.calling_ae_title, conflict.size_bytes) == (
            slice_ds.SeriesInstanceUID,
            "OTHER",
            len(elsewhere),
        )
        assert conflict.instance.path == str(held.path)
        assert session.scalars(select(Instance.times_received)).one() == 2
    first, claimed = list_studies(sessions.kw["bind"])
    assert (first.series[0].instances, first.series[0].conflicts) == (1, [])
    assert claimed.study_instance_uid == slice_ds.StudyInstanceUID
    assert claimed.series[0].instances == 0 and claimed.series[0].first_received_at is None
    assert claimed.series[0].conflicts[0].kept_at == str(kept)
    text = "\n".join(study_lines([first, claimed]))
    assert f"conflict {slice_ds.SOPInstanceUID} from OTHER" in text and "0 instances" in text


# --- against a real node ----------------------------------------------------------------------


def send(port: int, paths: list[Path], transfer_syntax: str, monkeypatch) -> list[int]:
    """C-STORE each file's dataset bytes as they are, on one association; the statuses answered."""
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="RTNODE")
    assert assoc.is_established
    statuses = [assoc.send_c_store(path).Status for path in paths]
    assoc.release()
    return statuses


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def rows(database: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(database) as connection:
        return connection.execute(sql).fetchall()


def stored_files(node) -> list[Path]:
    return sorted((node.data_dir / "incoming").rglob("*.dcm"))


def peak_memory_kib(pid: int) -> int:
    """The process' peak resident memory (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def refusal_logged(detail: str) -> str:
    """The log record of an instance refused on purpose, as a pattern for `allowed_log_problems`."""
    return rf"node\.scp: refused instance [0-9.]+ from SCANNER@127\.0\.0\.1: {detail}"


def test_crafted_instances_refused_each_with_one_log_line(node, tmp_path, monkeypatch):
    node.allowed_log_problems = (
        refusal_logged(r"dataset cannot be decoded: sequences nested too deeply \(status 0xC000\)"),
        refusal_logged(r"pixel data claims (512|4294967280) bytes but the dataset ends after (256|512|64) \(status 0xC004\)"),
        refusal_logged(r"pixel data has 0 bytes; Rows x Columns x .* needs 512 \(status 0xC004\)"),
    )
    ds = ct_slice(tmp_path / "ct")
    no_rows = ct_slice(tmp_path / "no-rows")
    del no_rows.Rows
    crafted = {
        "nested": part10(ds, nested(ds, 1000)),
        "half a slice": native(ds, 512, 256),
        "4 GB": native(ds, 0xFFFFFFF0, 512),
        "4 GB, no Rows": native(no_rows, 0xFFFFFFF0, 64),
        "empty, decoded by pydicom": native(ds, 0, 0),
    }
    paths = [write(tmp_path / f"crafted{i}.dcm", data) for i, data in enumerate(crafted.values())]
    before = len(node.log().splitlines())
    assert send(node.port, paths, ExplicitVRLittleEndian, monkeypatch) == [0xC000, 0xC004, 0xC004, 0xC004, 0xC004]
    new_lines = node.log().splitlines()[before:]
    refusals = [line for line in new_lines if "refused instance" in line]
    assert len(refusals) == 5 and all("from SCANNER@127.0.0.1" in line for line in refusals)
    assert "sequences nested too deeply (status 0xC000)" in refusals[0]
    assert len(new_lines) <= 6, new_lines  # the refusals and, at most, one line about the association
    assert stored_files(node) == [] and rows(node.database, "select count(*) from instances") == [(0,)]


def test_deflate_bomb_refused_with_bounded_memory(node_factory, tmp_path, monkeypatch):
    node = node_factory(
        extra_config="max_instance_mb = 1",
        allowed_log_problems=(
            refusal_logged(r"instance exceeds node\.max_instance_mb once decoded \(over 1048576 bytes\) \(status 0xC003\)"),
        ),
    ).start()
    warm_up = ct_slice(tmp_path / "warm")
    warm_up_file = write(tmp_path / "warm.dcm", part10(warm_up, dataset_bytes(warm_up)))
    assert send(node.port, [warm_up_file], ExplicitVRLittleEndian, monkeypatch) == [0]
    bomb = write_deflate_bomb(tmp_path / "bomb.dcm", ct_slice(tmp_path / "ct"), inflated_mib=128)
    assert bomb.stat().st_size < 300_000
    peak_before = peak_memory_kib(node.process.pid)
    assert send(node.port, [bomb], DeflatedExplicitVRLittleEndian, monkeypatch) == [0xC003]
    assert peak_memory_kib(node.process.pid) - peak_before < 32 * 1024  # the bomb inflates to 128 MiB
    assert "exceeds node.max_instance_mb once decoded" in node.log()
    assert len(stored_files(node)) == 1


def test_reused_uid_answers_duplicate_and_shows_in_studies(node, tmp_path, monkeypatch):
    node.allowed_log_problems = (
        refusal_logged(
            r"conflict: SOP Instance UID already held in (study [0-9.]+ series [0-9.]+|the same series with other content);"
            r" this one claims study [0-9.]+ series [0-9.]+, kept aside at \S+/[12]\.dcm \(status 0x0111\)"
        ),
    )
    paths = write_cylinder_ct(tmp_path / "ct", slices=2, rows=16, columns=16)
    storescu = [require_tool("storescu"), "-aet", "SCANNER", "-aec", "RTNODE", "127.0.0.1", str(node.port)]
    assert run_tool(*storescu, *map(str, paths)).returncode == 0
    uid = dcmread(paths[0]).SOPInstanceUID

    other_study = dcmread(paths[0])
    other_study.StudyInstanceUID, other_study.SeriesInstanceUID = generate_uid(), generate_uid()
    same_slice = dcmread(paths[1])  # the same series, another slice
    same_slice.SOPInstanceUID = uid
    crafted = [write(tmp_path / f"{i}.dcm", part10(ds, dataset_bytes(ds))) for i, ds in enumerate([other_study, same_slice])]
    assert send(node.port, crafted, ExplicitVRLittleEndian, monkeypatch) == [0x0111, 0x0111]
    assert run_tool(*storescu, str(paths[0])).returncode == 0  # identical: still a repeat

    kept = node.data_dir / "conflicts" / uid
    assert sorted(p.name for p in kept.iterdir()) == ["1.dcm", "2.dcm"]
    assert dcmread(kept / "1.dcm").SeriesInstanceUID == other_study.SeriesInstanceUID
    assert rows(node.database, "select count(*), sum(times_received) from instances") == [(2, 3)]
    assert rows(node.database, "select count(*) from conflicts") == [(2,)]
    refusals = [line for line in node.log().splitlines() if "refused instance" in line]
    assert len(refusals) == 2 and all(f"{uid} from SCANNER@127.0.0.1: conflict:" in line for line in refusals)

    listing = json.loads(node.rtnode("studies", "--json").stdout)
    first, claimed = listing
    series, claimed_series = first["series"][0], claimed["series"][0]
    kept_keys = {"series_instance_uid", "modality", "series_number", "description", "instances"}
    listed_keys = {"first_received_at", "last_received_at", "conflicts", "removed_at", "route", "route_reason"}
    assert set(series) == kept_keys | listed_keys
    assert series["instances"] == 2 and [c["kept_at"] for c in series["conflicts"]] == [str(kept / "2.dcm")]
    assert claimed["study_instance_uid"] == other_study.StudyInstanceUID
    assert claimed_series["instances"] == 0 and claimed_series["first_received_at"] is None
    [conflict] = claimed_series["conflicts"]
    assert set(conflict) == {"sop_instance_uid", "reason", "kept_at", "received_at", "calling_ae_title"}
    assert [conflict[key] for key in ("sop_instance_uid", "kept_at", "calling_ae_title")] == [uid, str(kept / "1.dcm"), "SCANNER"]
    assert f"conflict {uid} from SCANNER" in node.rtnode("studies").stdout


def test_start_up_removes_temporary_files_of_interrupted_writes(node_factory):
    node = node_factory()
    series = node.data_dir / "incoming" / "1.2.3" / "1.2.3.4"
    series.mkdir(parents=True)
    orphans = [
        series / ".1.2.3.4.5.dcm.k3j_x9.part",
        node.data_dir / "conflicts" / "1.2.3.4.5" / ".1.dcm.a8b2c1.part",
    ]
    orphans[1].parent.mkdir(parents=True)
    for path in [*orphans, series / "1.2.3.4.6.dcm"]:
        path.write_bytes(b"\x00" * 64)
    node.start()
    assert [path for path in orphans if path.exists()] == []
    assert (series / "1.2.3.4.6.dcm").exists()
    assert "removed 2 temporary file(s) left by writes interrupted at the last stop" in node.log()
