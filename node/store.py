"""Durable storage of received instances: bytes on disk first, then a committed row.

The SCP answers Success only after `InstanceStore.save` returns, so everything it
acknowledged survives a SIGKILL (or a power cut) the next instant: the file was written
whole under a temporary name and renamed into place, the file and its folder fsynced (at
once: overlapping fsyncs share one flush of the disk), and only then its row committed.

Whatever `save` refuses, it refuses before answering, with a failure status the sender
sees, and leaves nothing behind (no file, no row): what `node.instance_check` finds unusable
in the bytes, and what cannot be written. An instance whose SOP Instance UID is held with
other content is kept aside as a conflict.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pynetdicom.status import Status
from sqlalchemy import Connection, Engine, Row, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from node.db.models import Conflict, Instance, Series, Study, utcnow
from node.instance_check import InstanceHeader, StoreRefused, read_header, split_part10

log = logging.getLogger(__name__)

_instances = Instance.__table__
_series = Series.__table__
_studies = Study.__table__
_conflicts = Conflict.__table__


@dataclass(frozen=True)
class CallingPeer:
    """Who sent an instance: the calling AE title and the peer's IP address."""

    ae_title: str
    address: str


@dataclass(frozen=True)
class StoredInstance:
    header: InstanceHeader
    path: Path
    duplicate: bool


def _other_dataset(held_path: str, received: bytes) -> bool:
    """Whether the held file carries other dataset bytes than `received` (its file meta is ours,
    not the sender's, so it is left out); a file that has gone cannot tell, so no."""
    path = Path(held_path)
    if not path.is_file():
        return False
    held = path.read_bytes()
    return memoryview(held)[split_part10(held)[1] :] != memoryview(received)[split_part10(received)[1] :]


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so a rename or a new file in it survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_beside(path: Path) -> tuple[int, str]:
    """A new temporary file in `path`'s folder, made if need be, and made again if retention removed
    it as empty between the two steps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")


def write_durably(path: Path, data: bytes, *, fsync: bool) -> None:
    """Write-to-temporary then rename: readers never see a half-written file under `path`."""
    fd, temporary = _temporary_beside(path)
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
        fsync_path(path.parent)


def write_in_place(path: Path, data: bytes) -> int:
    """Write-to-temporary then rename, fsyncing nothing: returns the file's descriptor, open, for the
    caller to fsync together with the folder (both at once, so they can share one flush of the disk)
    and to close. Readers never see a half-written file under `path`."""
    fd, temporary = _temporary_beside(path)
    try:
        with os.fdopen(fd, "wb", closefd=False) as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        os.close(fd)
        Path(temporary).unlink(missing_ok=True)
        raise
    return fd


@dataclass(eq=False)
class _Arrival:
    """A new instance whose file is written and renamed into place (`fd`: the file, open), waiting
    for the fsyncs of the file and its folder and for its row."""

    header: InstanceHeader
    path: Path
    size: int
    transfer_syntax_uid: str
    peer: CallingPeer
    fd: int
    committed: bool = False
    error: BaseException | None = None


class InstanceStore:
    """Files under `<data_dir>/incoming/<study>/<series>/<sop>.dcm`, rows in the database;
    conflicting instances under `<data_dir>/conflicts/<sop>/<n>.dcm`."""

    def __init__(self, engine: Engine, incoming_dir: Path, *, fsync: bool = True, max_instance_mb: float = 256.0) -> None:
        self._engine = engine
        self._incoming_dir = incoming_dir
        self._conflicts_dir = incoming_dir.parent / "conflicts"
        self._fsync = fsync
        self._max_instance_bytes = int(max_instance_mb * 1024 * 1024)
        # SQLite has one writer at a time anyway; serialising here avoids get-or-create races.
        self._db_lock = threading.Lock()
        # Saves of one SOP Instance UID take turns, so a repeat or a conflict is judged against
        # what is held, never against a write in flight; other UIDs still go in parallel.
        self._uid_locks = [threading.Lock() for _ in range(64)]
        # Committed series rows by UID: a series' slices then cost one INSERT each.
        self._series_ids: dict[str, int] = {}
        # Group commit: arrivals wait here while one of their threads commits the group before them.
        self._arrived = threading.Condition()
        self._arrivals: list[_Arrival] = []
        self._committing = False
        # The committing thread's helpers: a group's fsyncs (its files and their folders) run at once.
        self._syncer = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")

    @property
    def engine(self) -> Engine:
        """The database the instances are recorded in (the SCP records its rejections there too)."""
        return self._engine

    def path_for(self, header: InstanceHeader) -> Path:
        return self._incoming_dir / header.study_instance_uid / header.series_instance_uid / f"{header.sop_instance_uid}.dcm"

    def remove_orphans(self) -> int:
        """Delete the temporary files of writes a killed process never finished (never
        acknowledged, so nothing is lost); call before receiving. Returns how many."""
        orphans = [path for folder in (self._incoming_dir, self._conflicts_dir) for path in folder.rglob(".*.dcm.*.part")]
        for path in orphans:
            path.unlink(missing_ok=True)
        if orphans:
            log.info("removed %d temporary file(s) left by writes interrupted at the last stop", len(orphans))
        return len(orphans)

    def save(self, encoded: bytes, transfer_syntax_uid: str, peer: CallingPeer) -> StoredInstance:
        """Store one Part 10 byte stream; return only when it is durable. Raises StoreRefused."""
        header = read_header(encoded, self._max_instance_bytes)
        path = self.path_for(header)
        with self._uid_locks[hash(header.sop_instance_uid) % len(self._uid_locks)]:
            try:
                held = self._held(header.sop_instance_uid)
                if held is not None:
                    self._refuse_conflict(held, header, encoded, transfer_syntax_uid, peer)
                    kept = held.path
                    if held.removed_at is not None or not Path(kept).is_file():  # removed by retention, or lost: restore it
                        if held.removed_at is not None:
                            self._unmark_removed(held.id)
                        write_durably(path, encoded, fsync=self._fsync)
                        kept = str(path)
                    self._count_repeat(held.id, kept, header, peer)
                    return StoredInstance(header, Path(kept), duplicate=True)
                fd = write_in_place(path, encoded)
            except OSError as exc:
                raise StoreRefused(Status.OUT_OF_RESOURCES, f"cannot write {path}: {exc.strerror or exc}") from exc
            except SQLAlchemyError as exc:
                raise StoreRefused(Status.OUT_OF_RESOURCES, f"database error: {exc}") from exc
            try:
                self._commit(_Arrival(header, path, len(encoded), transfer_syntax_uid, peer, fd))
            except OSError as exc:
                path.unlink(missing_ok=True)
                raise StoreRefused(Status.OUT_OF_RESOURCES, f"cannot write {path}: {exc.strerror or exc}") from exc
            except SQLAlchemyError as exc:
                path.unlink(missing_ok=True)
                raise StoreRefused(Status.OUT_OF_RESOURCES, f"database error: {exc}") from exc
            finally:
                os.close(fd)
        return StoredInstance(header, path, duplicate=False)

    def _commit(self, arrival: _Arrival) -> None:
        """Makes the arrival's file, folder entry and row durable together with those of the instances
        that arrived meanwhile on other associations: the fsyncs of their files and folders at once, one
        fsync per folder and one database commit for the group instead of one each (group commit).
        Returns once its row is committed; else raises why."""
        with self._arrived:
            self._arrivals.append(arrival)
            while not (arrival.committed or arrival.error):
                if self._committing:
                    self._arrived.wait()
                    continue
                group, self._arrivals, self._committing = self._arrivals, [], True
                self._arrived.release()
                try:
                    self._commit_group(group)
                except BaseException as exc:
                    for waiting in group:
                        waiting.error = waiting.error or exc
                    raise
                finally:
                    self._arrived.acquire()
                    self._committing = False
                    self._arrived.notify_all()
        if not arrival.committed:
            raise arrival.error

    def _commit_group(self, group: list[_Arrival]) -> None:
        """Files and folders first, then rows: a row never names a file whose bytes or entry a power
        loss could undo. A group the database refuses is retried row by row: one bad row fails only
        its instance, and a row whose new study or series another writer (the web upload) inserted
        meanwhile finds it."""
        if self._fsync:
            self._sync(group)
            group = [arrival for arrival in group if arrival.error is None]
        try:
            self._record(group)
        except SQLAlchemyError:
            for arrival in group:
                try:
                    self._record([arrival])
                except SQLAlchemyError as row_exc:
                    arrival.error = row_exc

    def _sync(self, group: list[_Arrival]) -> None:
        """fsync the group's files and their folders, all at once: a filesystem commits its journal and
        flushes the disk once for fsyncs that overlap, where one after another each costs a flush. Returns
        when all have returned; a file that cannot be synced fails its own instance, a folder all of them."""
        files = [self._syncer.submit(os.fsync, arrival.fd) for arrival in group]
        folders = [self._syncer.submit(fsync_path, folder) for folder in {arrival.path.parent for arrival in group}]
        for arrival, done in zip(group, files, strict=True):
            if (error := done.exception()) is not None:
                arrival.error = error
        for done in folders:
            done.result()

    def _held(self, sop_instance_uid: str) -> Row | None:
        """The row of the instance held under this UID, with its study and series UIDs, or None."""
        with self._engine.connect() as connection:
            return connection.execute(
                select(
                    _instances.c.id,
                    _instances.c.path,
                    _instances.c.transfer_syntax_uid,
                    _instances.c.removed_at,
                    _series.c.series_instance_uid,
                    _studies.c.study_instance_uid,
                )
                .join(_series, _series.c.id == _instances.c.series_id)
                .join(_studies, _studies.c.id == _series.c.study_id)
                .where(_instances.c.sop_instance_uid == sop_instance_uid)
            ).first()

    def _refuse_conflict(
        self, held: Row, header: InstanceHeader, encoded: bytes, transfer_syntax_uid: str, peer: CallingPeer
    ) -> None:
        """Keep aside and refuse an instance reusing a held UID in another study or series, or
        with other dataset bytes (compared within one transfer syntax: the same instance
        re-encoded is a repeat). The held instance is never overwritten."""
        if (header.study_instance_uid, header.series_instance_uid) != (held.study_instance_uid, held.series_instance_uid):
            reason = f"held in study {held.study_instance_uid} series {held.series_instance_uid}"
        elif transfer_syntax_uid == held.transfer_syntax_uid and _other_dataset(held.path, encoded):
            reason = "held in the same series with other content"
        else:
            return
        kept_at = self._keep_conflict(held.id, header, encoded, reason, peer)
        raise StoreRefused(
            Status.DUPLICATE_SOP_INSTANCE,
            f"conflict: SOP Instance UID already {reason}; this one claims study {header.study_instance_uid}"
            f" series {header.series_instance_uid}, kept aside at {kept_at}",
        )

    def _keep_conflict(self, instance_id: int, header: InstanceHeader, encoded: bytes, reason: str, peer: CallingPeer) -> Path:
        """Write the conflicting bytes durably to the next free `<n>.dcm` and commit its row;
        the series it claims gets its rows too, so `rtnode studies` lists the conflict there."""
        folder = self._conflicts_dir / header.sop_instance_uid
        number = 1
        while (folder / f"{number}.dcm").exists():
            number += 1
        path = folder / f"{number}.dcm"
        write_durably(path, encoded, fsync=self._fsync)
        try:
            series_ids: dict[str, int] = {}
            with self._db_lock, self._engine.begin() as connection:
                self._series_id(connection, header, series_ids)
                connection.execute(
                    insert(_conflicts).values(
                        sop_instance_uid=header.sop_instance_uid,
                        sop_class_uid=header.sop_class_uid,
                        study_instance_uid=header.study_instance_uid,
                        series_instance_uid=header.series_instance_uid,
                        instance_id=instance_id,
                        reason=reason,
                        path=str(path),
                        size_bytes=len(encoded),
                        calling_ae_title=peer.ae_title,
                        peer_address=peer.address,
                        received_at=utcnow(),
                    )
                )
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    def _unmark_removed(self, instance_id: int) -> None:
        """An instance retention removed is received again: clear its mark before the file is written,
        as retention deletes only files of rows still marked (checked under a lock on the row; SQLite: the database).
        Arriving now also starts its series' quiet timer, so retention does not mark it again."""
        with self._db_lock, self._engine.begin() as connection:
            connection.execute(
                update(_instances).where(_instances.c.id == instance_id).values(removed_at=None, last_received_at=utcnow())
            )

    def _count_repeat(self, instance_id: int, path: str, header: InstanceHeader, peer: CallingPeer) -> None:
        """An instance already held (or its lost file restored): count it, store nothing new."""
        with self._db_lock, self._engine.begin() as connection:
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

    def _record(self, group: list[_Arrival]) -> None:
        """The rows of `group`, in one transaction; each arrival is marked committed after it."""
        if not group:
            return
        now = utcnow()
        series_ids: dict[str, int] = {}
        with self._db_lock:
            with self._engine.begin() as connection:
                rows = [
                    {
                        "sop_instance_uid": arrival.header.sop_instance_uid,
                        "sop_class_uid": arrival.header.sop_class_uid,
                        "series_id": self._series_id(connection, arrival.header, series_ids),
                        "instance_number": arrival.header.instance_number,
                        "path": str(arrival.path),
                        "size_bytes": arrival.size,
                        "transfer_syntax_uid": arrival.transfer_syntax_uid,
                        "calling_ae_title": arrival.peer.ae_title,
                        "peer_address": arrival.peer.address,
                        "received_at": now,
                        "times_received": 1,
                        "last_received_at": now,
                    }
                    for arrival in group
                ]
                connection.execute(insert(_instances), rows)
            self._series_ids.update(series_ids)  # committed now, so safe to remember
        for arrival in group:
            arrival.committed = True

    def _series_id(self, connection: Connection, header: InstanceHeader, learned: dict[str, int]) -> int:
        """The series row's id, inserted with its study's if new; `learned` collects what the caller may
        remember once its transaction commits (a rolled-back insert must not be remembered)."""
        uid = header.series_instance_uid
        if uid in self._series_ids:
            return self._series_ids[uid]
        if uid in learned:
            return learned[uid]
        series_id = connection.execute(select(_series.c.id).where(_series.c.series_instance_uid == uid)).scalar()
        if series_id is None:
            series_id = connection.execute(
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
        learned[uid] = series_id
        return series_id

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
