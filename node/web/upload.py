"""Upload: a CT from a CD or another hospital, as a zip or a folder of files dropped in the browser.

Each file goes through `InstanceStore.save`, the C-STORE path's own durable store (same repeats,
same conflicts, same refusals), and each series that got new instances is then submitted as a
quiet series would be (`node.routing`'s eligibility and routes, `node.lifecycle`). Archives are checked
whole before anything is stored: a corrupt or oversized zip stores nothing.
"""

from __future__ import annotations

import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from io import BytesIO
from typing import BinaryIO

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import Engine

from node.config import Config
from node.errors import UserError
from node.instance_check import StoreRefused
from node.lifecycle.jobs import settle_quiet_series
from node.routing import configured_rule
from node.store import CallingPeer, InstanceStore

# The calling AE title recorded for uploaded instances (instances.calling_ae_title).
UPLOAD_AE_TITLE = "WEB-UPLOAD"
_ZIP_MAGIC = b"PK\x03\x04"
# One upload stored at a time per web process: with each file read whole (as C-STORE holds an instance) and
# within node.max_instance_mb, the memory uploads take is bounded, however many arrive at once.
_ONE_UPLOAD_AT_A_TIME = threading.Lock()


class ArchiveRefused(UserError):
    """The upload as a whole is refused (a corrupt archive, too many files, too large): nothing was stored."""


class FileOutcome(StrEnum):
    """What became of one uploaded file."""

    STORED = "stored"
    REPEATED = "repeated"  # the same instance is held already: counted, not stored twice
    REFUSED = "refused"


@dataclass(frozen=True)
class FileResult:
    name: str
    outcome: FileOutcome
    reason: str = ""
    series_instance_uid: str = ""


@dataclass(frozen=True)
class SeriesSubmitted:
    series_instance_uid: str
    job_id: int | None  # None: no new job (nothing new, or a series of structure sets sent back)
    job_status: str


@dataclass
class UploadReport:
    files: list[FileResult] = field(default_factory=list)
    series: list[SeriesSubmitted] = field(default_factory=list)

    def count(self, outcome: FileOutcome) -> int:
        return sum(f.outcome == outcome for f in self.files)


@dataclass(frozen=True)
class UploadedFile:
    """One file of the request as the browser sent it: its name (a folder upload's relative path) and bytes."""

    name: str
    stream: BinaryIO


def _is_zip(upload: UploadedFile) -> bool:
    head = upload.stream.read(4)
    upload.stream.seek(0)
    return upload.name.lower().endswith(".zip") or head == _ZIP_MAGIC


def _checked_archive(upload: UploadedFile, max_bytes: int) -> zipfile.ZipFile:
    """Open and fully test one archive (every member's CRC); raise ArchiveRefused with the reason."""
    try:
        archive = zipfile.ZipFile(upload.stream)
        members = [m for m in archive.infolist() if not m.is_dir()]
        if any(m.flag_bits & 0x1 for m in members):
            raise ArchiveRefused(f"{upload.name}: the zip is encrypted; nothing was stored")
        if sum(m.file_size for m in members) > max_bytes:
            raise ArchiveRefused(f"{upload.name}: unpacked it is larger than web.max_upload_mb; nothing was stored")
        broken = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError, ValueError) as exc:
        raise ArchiveRefused(f"{upload.name} is not a readable zip archive ({exc}); nothing was stored") from exc
    if broken is not None:
        raise ArchiveRefused(f"{upload.name} is corrupt: member {broken} fails its checksum; nothing was stored")
    return archive


@dataclass(frozen=True)
class _Entry:
    """One file to store, read only once its size is known to be within node.max_instance_mb."""

    name: str
    size: int
    read: Callable[[], bytes]


def _stream_size(stream: BinaryIO) -> int:
    size = stream.seek(0, 2)
    stream.seek(0)
    return size


def _entries(uploads: list[UploadedFile], config: Config) -> Iterator[_Entry]:
    """Every file to store, archives unpacked; all archives are checked before the first file is given."""
    max_bytes = int(config.web.max_upload_mb * 1024 * 1024)
    archives = {id(u): _checked_archive(u, max_bytes) for u in uploads if _is_zip(u)}
    count = sum(len([m for m in a.infolist() if not m.is_dir()]) for a in archives.values()) + len(uploads) - len(archives)
    if count > config.web.max_upload_files:
        raise ArchiveRefused(f"{count} files: more than web.max_upload_files = {config.web.max_upload_files}; nothing was stored")
    if count == 0:
        raise ArchiveRefused("no files in the upload")
    for upload in uploads:
        archive = archives.get(id(upload))
        if archive is None:
            yield _Entry(upload.name, _stream_size(upload.stream), upload.stream.read)
            continue
        for member in archive.infolist():
            if not member.is_dir():
                # zipfile never gives more than a member's recorded size: a bomb cannot outgrow the check below.
                yield _Entry(f"{upload.name}/{member.filename}", member.file_size, partial(archive.read, member))


def _transfer_syntax(data: bytes) -> str:
    """The transfer syntax of a Part 10 file; raises StoreRefused-like reasons as ValueError."""
    try:
        meta = dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).file_meta
    except (InvalidDicomError, ValueError, TypeError, EOFError, OSError, KeyError) as exc:
        raise ValueError(f"not a DICOM file ({exc})") from None
    syntax = str(meta.get("TransferSyntaxUID", ""))
    if not syntax:
        raise ValueError("no file meta information (not a DICOM Part 10 file)")
    if str(meta.get("MediaStorageSOPClassUID", "")) == "1.2.840.10008.1.3.10":
        raise ValueError("a DICOMDIR (the disc's index), not an instance")
    return syntax


def store_upload(engine: Engine, config: Config, uploads: list[UploadedFile], address: str) -> UploadReport:
    """Store every file as C-STORE would, then submit the series that got new instances. Raises ArchiveRefused."""
    store = InstanceStore(engine, config.incoming_dir, fsync=config.node.fsync, max_instance_mb=config.node.max_instance_mb)
    peer = CallingPeer(UPLOAD_AE_TITLE, address)
    report = UploadReport()
    touched: list[str] = []
    max_instance_bytes = int(config.node.max_instance_mb * 1024 * 1024)
    with _ONE_UPLOAD_AT_A_TIME:
        for entry in _entries(uploads, config):
            _store_entry(store, peer, entry, max_instance_bytes, report, touched)
    for uid in touched:
        report.series.append(_submit(engine, config, uid))
    return report


def _store_entry(
    store: InstanceStore, peer: CallingPeer, entry: _Entry, max_instance_bytes: int, report: UploadReport, touched: list[str]
) -> None:
    name = entry.name
    if entry.size > max_instance_bytes:
        report.files.append(
            FileResult(name, FileOutcome.REFUSED, f"{entry.size / 2**20:.0f} MB: larger than node.max_instance_mb; not read")
        )
        return
    data = entry.read()
    try:
        stored = store.save(data, _transfer_syntax(data), peer)
    except ValueError as exc:
        report.files.append(FileResult(name, FileOutcome.REFUSED, str(exc)))
        return
    except StoreRefused as exc:
        report.files.append(FileResult(name, FileOutcome.REFUSED, f"{exc} (status 0x{exc.status:04X})"))
        return
    uid = stored.header.series_instance_uid
    report.files.append(FileResult(name, FileOutcome.REPEATED if stored.duplicate else FileOutcome.STORED, "", uid))
    if uid not in touched:
        touched.append(uid)


def _submit(engine: Engine, config: Config, series_instance_uid: str) -> SeriesSubmitted:
    """What the completion timer does when a series falls quiet: reviews for structure sets sent back, else a job."""
    settled = settle_quiet_series(engine, series_instance_uid, configured_rule(config))
    if settled.reviews is not None:
        return SeriesSubmitted(series_instance_uid, None, "structure sets: reviews pending")
    if settled.job is None:
        return SeriesSubmitted(series_instance_uid, None, "nothing new: no new job")
    return SeriesSubmitted(series_instance_uid, settled.job.id, settled.job.status)
