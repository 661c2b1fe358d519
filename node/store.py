"""Durable storage of received instances: bytes on disk first, then a committed row.

The SCP answers Success only after `InstanceStore.save` returns, so everything it
acknowledged survives a SIGKILL the next instant: the file was written under a
temporary name, fsynced and renamed into place, and its row committed.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom.status import Status
from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from node.db.models import Instance, Series, Study, utcnow

log = logging.getLogger(__name__)

_instances = Instance.__table__
_series = Series.__table__
_studies = Study.__table__

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# C-STORE failure statuses (PS3.4 B.2.3), named in pynetdicom's Status as its documentation
# shows. The 0xC0xx codes are ours within "Cannot Understand", so a PACS log tells them apart.
Status.add("OUT_OF_RESOURCES", 0xA700)
Status.add("CANNOT_DECODE", 0xC000)
Status.add("MISSING_UID", 0xC001)
Status.add("INVALID_UID", 0xC002)

_HEADER_TAGS = [
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "PatientID",
    "PatientName",
    "StudyDate",
    "StudyDescription",
    "AccessionNumber",
    "SeriesNumber",
    "SeriesDescription",
    "InstanceNumber",
]


class StoreRefused(Exception):
    """The instance cannot be accepted; `status` is the DICOM failure status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class CallingPeer:
    """Who sent an instance: the calling AE title and the peer's IP address."""

    ae_title: str
    address: str


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes the database keeps about one instance, read without its pixels."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    patient_id: str
    patient_name: str
    study_date: str
    study_description: str
    accession_number: str
    series_number: int | None
    series_description: str
    instance_number: int | None


@dataclass(frozen=True)
class StoredInstance:
    header: InstanceHeader
    path: Path
    duplicate: bool


def _text(ds, keyword: str, limit: int = 64) -> str:
    """A stripped string cut to its column's length, so over-long values cannot fail a commit."""
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()[:limit]


def _int(ds, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def read_header(encoded: bytes) -> InstanceHeader:
    """Parse the identifying attributes of a Part 10 byte stream; raise StoreRefused if unusable."""
    try:
        ds = dcmread(BytesIO(encoded), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        uids = {
            keyword: _text(ds, keyword, 1024)
            for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        }
        header_fields = {
            "frame_of_reference_uid": _text(ds, "FrameOfReferenceUID"),
            "modality": _text(ds, "Modality", 16),
            "patient_id": _text(ds, "PatientID"),
            "patient_name": _text(ds, "PatientName", 324),
            "study_date": _text(ds, "StudyDate", 8),
            "study_description": _text(ds, "StudyDescription"),
            "accession_number": _text(ds, "AccessionNumber", 16),
            "series_number": _int(ds, "SeriesNumber"),
            "series_description": _text(ds, "SeriesDescription"),
            "instance_number": _int(ds, "InstanceNumber"),
        }
    except (InvalidDicomError, ValueError, TypeError, EOFError, OSError, KeyError, NotImplementedError) as exc:
        raise StoreRefused(Status.CANNOT_DECODE, f"dataset cannot be decoded: {exc}") from exc
    missing = [keyword for keyword, value in uids.items() if not value]
    if missing:
        raise StoreRefused(Status.MISSING_UID, f"dataset lacks {', '.join(missing)}")
    invalid = [f"{keyword}={value!r}" for keyword, value in uids.items() if len(value) > 64 or not _UID.match(value)]
    if invalid:
        raise StoreRefused(Status.INVALID_UID, f"dataset has malformed UIDs: {', '.join(invalid)}")
    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        **header_fields,
    )


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, *, fsync: bool) -> None:
    """Write-to-temporary then rename: readers never see a half-written file under `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_directory(path.parent)


class InstanceStore:
    """Files under `<data_dir>/incoming/<study>/<series>/<sop>.dcm`, rows in the database."""

    def __init__(self, engine: Engine, incoming_dir: Path, *, fsync: bool = True) -> None:
        self._engine = engine
        self._incoming_dir = incoming_dir
        self._fsync = fsync
        # SQLite has one writer at a time anyway; serialising here avoids get-or-create races.
        self._db_lock = threading.Lock()
        # Committed series rows by UID: a series' slices then cost one INSERT each.
        self._series_ids: dict[str, int] = {}

    def path_for(self, header: InstanceHeader) -> Path:
        return (
            self._incoming_dir / header.study_instance_uid / header.series_instance_uid / f"{header.sop_instance_uid}.dcm"
        )

    def save(self, encoded: bytes, transfer_syntax_uid: str, peer: CallingPeer) -> StoredInstance:
        """Store one Part 10 byte stream; return only when it is durable. Raises StoreRefused."""
        header = read_header(encoded)
        path = self.path_for(header)
        try:
            if self._count_repeat(header, peer):
                return StoredInstance(header, path, duplicate=True)
            write_durably(path, encoded, fsync=self._fsync)
        except OSError as exc:
            raise StoreRefused(Status.OUT_OF_RESOURCES, f"cannot write {path}: {exc.strerror or exc}") from exc
        except SQLAlchemyError as exc:
            raise StoreRefused(Status.OUT_OF_RESOURCES, f"database error: {exc}") from exc
        try:
            duplicate = self._record(header, path, len(encoded), transfer_syntax_uid, peer)
        except SQLAlchemyError as exc:
            path.unlink(missing_ok=True)
            raise StoreRefused(Status.OUT_OF_RESOURCES, f"database error: {exc}") from exc
        return StoredInstance(header, path, duplicate=duplicate)

    def _count_repeat(self, header: InstanceHeader, peer: CallingPeer) -> bool:
        """True when this SOP Instance is already held (file and row): count it, write nothing."""
        with self._db_lock, self._engine.connect() as connection:
            row = connection.execute(
                select(_instances.c.id, _instances.c.path).where(
                    _instances.c.sop_instance_uid == header.sop_instance_uid
                )
            ).first()
            if row is None or not Path(row.path).is_file():
                return False  # read-only: rolled back on close, no commit to sync
            self._mark_repeat(connection, row.id, row.path, header, peer)
            connection.commit()
            return True

    @staticmethod
    def _mark_repeat(connection: Connection, instance_id: int, path: str, header: InstanceHeader, peer: CallingPeer) -> None:
        times = connection.execute(
            update(_instances)
            .where(_instances.c.id == instance_id)
            .values(times_received=_instances.c.times_received + 1, last_received_at=utcnow(), path=path)
            .returning(_instances.c.times_received)
        ).scalar_one()
        log.info(
            "repeat of SOP Instance %s from %s@%s (received %d times)",
            header.sop_instance_uid,
            peer.ae_title,
            peer.address,
            times,
        )

    def _record(self, header: InstanceHeader, path: Path, size: int, transfer_syntax_uid: str, peer: CallingPeer) -> bool:
        now = utcnow()
        with self._db_lock, self._engine.begin() as connection:
            series_id = self._series_id(connection, header)
            existing = connection.execute(
                select(_instances.c.id).where(_instances.c.sop_instance_uid == header.sop_instance_uid)
            ).scalar()
            if existing is not None:  # the row survived but its file had gone: file rewritten above
                self._mark_repeat(connection, existing, str(path), header, peer)
                return True
            connection.execute(
                insert(_instances).values(
                    sop_instance_uid=header.sop_instance_uid,
                    sop_class_uid=header.sop_class_uid,
                    series_id=series_id,
                    instance_number=header.instance_number,
                    path=str(path),
                    size_bytes=size,
                    transfer_syntax_uid=transfer_syntax_uid,
                    calling_ae_title=peer.ae_title,
                    peer_address=peer.address,
                    received_at=now,
                    times_received=1,
                    last_received_at=now,
                )
            )
            return False

    def _series_id(self, connection: Connection, header: InstanceHeader) -> int:
        uid = header.series_instance_uid
        if uid in self._series_ids:
            return self._series_ids[uid]
        series_id = connection.execute(select(_series.c.id).where(_series.c.series_instance_uid == uid)).scalar()
        if series_id is not None:
            self._series_ids[uid] = series_id  # committed earlier, so safe to remember
            return series_id
        return connection.execute(
            insert(_series)
            .values(
                series_instance_uid=uid,
                study_id=self._study_id(connection, header),
                modality=header.modality,
                series_number=header.series_number,
                series_description=header.series_description,
                frame_of_reference_uid=header.frame_of_reference_uid,
            )
            .returning(_series.c.id)
        ).scalar_one()

    @staticmethod
    def _study_id(connection: Connection, header: InstanceHeader) -> int:
        uid = header.study_instance_uid
        study_id = connection.execute(select(_studies.c.id).where(_studies.c.study_instance_uid == uid)).scalar()
        if study_id is not None:
            return study_id
        return connection.execute(
            insert(_studies)
            .values(
                study_instance_uid=uid,
                patient_id=header.patient_id,
                patient_name=header.patient_name,
                study_date=header.study_date,
                study_description=header.study_description,
                accession_number=header.accession_number,
            )
            .returning(_studies.c.id)
        ).scalar_one()
