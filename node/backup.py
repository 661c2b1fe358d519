"""Backup and restore of what a node cannot make again: its database (the job log, reviews, accounts, the
audit trail), its configuration, and the digests of the model files its results came from. Not the image
data: received CT and job outputs are data_dir's, for the site's file backup (retention removes them anyway).

SQLite is copied with its online backup API, which gives a consistent copy while the node writes (a file
copy of a database in WAL mode does not); a PostgreSQL database is pg_dump's to copy, and the backup prints
the command.
"""

from __future__ import annotations

import json
import os
import shlex
import sqlite3
import tempfile
from contextlib import closing
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import URL, make_url

from node import __version__
from node.config import Config
from node.db.engine import alembic_config, open_database
from node.errors import UserError
from node.pipeline.model_files import ModelFileError, file_digest, model_digest
from node.store import fsync_path

MANIFEST = "manifest.json"
DATABASE_COPY = "rtnode.sqlite3"
CONFIG_COPY = "node.toml"
PG_DUMP_FILE = "rtnode.pgdump"
BUILT_IN_MODEL = "[model]"  # the name a backup gives model.weights when no [[models]] are configured
_CHUNK = 1 << 20


class BackupError(UserError):
    """A backup cannot be taken or restored: the folder is in the way, the backup is damaged, or the target exists."""


@dataclass(frozen=True)
class BackupFile:
    name: str  # relative to the backup folder
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class ModelDigest:
    name: str
    path: str
    sha256: str | None  # None: the files were missing when the backup was taken


@dataclass(frozen=True)
class Manifest:
    """What a backup holds, written last: a folder without it is no (complete) backup."""

    rtnode_version: str
    schema_revision: str | None  # the database copy's Alembic revision; None without one (PostgreSQL)
    created_at: str
    files: tuple[BackupFile, ...]
    models: tuple[ModelDigest, ...]

    def file(self, name: str) -> BackupFile | None:
        return next((file for file in self.files if file.name == name), None)

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                raw["rtnode_version"], raw["schema_revision"], raw["created_at"],
                tuple(BackupFile(**file) for file in raw["files"]), tuple(ModelDigest(**model) for model in raw["models"]),
            )  # fmt: skip
        except FileNotFoundError:
            raise BackupError(f"{folder} is no rtnode backup: it has no {MANIFEST}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BackupError(f"{path} is not a backup manifest rtnode can read: {exc}") from None


@dataclass(frozen=True)
class Backup:
    folder: Path
    manifest: Manifest
    pg_dump_command: str | None  # PostgreSQL: the command that copies the database; None when the copy is here


@dataclass(frozen=True)
class Restore:
    database: Path
    manifest: Manifest
    upgraded_to: str | None  # the schema the restored database was brought to, when it was older


def _create_private(path: Path) -> int:
    """A new file of its owner's alone (it holds patient data, or passwords), from the start; an existing one
    is an error, never overwritten."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


def _described(folder: Path, name: str) -> BackupFile:
    path = folder / name
    fsync_path(path)
    return BackupFile(name, file_digest(path), path.stat().st_size)


def _empty_folder(out: Path) -> None:
    """The backup's folder, new or empty, its owner's alone (the copies hold patient data and passwords)."""
    if out.exists() and not out.is_dir():
        raise BackupError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise BackupError(f"{out} is not empty: a backup goes into a new or empty folder, never over another")
    out.mkdir(mode=0o700, exist_ok=True)
    out.chmod(0o700)


def _copy_sqlite(source: Path, target: Path) -> str:
    """A consistent copy of the live database by SQLite's online backup (one step, under one read transaction,
    while writers go on in WAL mode), made a single self-contained file and checked; its schema revision."""
    os.close(_create_private(target))  # an empty file is an empty database
    with closing(sqlite3.connect(source, timeout=30)) as live, closing(sqlite3.connect(target)) as copy:
        live.backup(copy)
        copy.execute("PRAGMA journal_mode=DELETE")
        (verdict,) = copy.execute("PRAGMA integrity_check").fetchone()
        if verdict != "ok":
            raise BackupError(f"the copy of {source} fails SQLite's integrity check ({verdict}): {target} is no good backup")
        (revision,) = copy.execute("SELECT version_num FROM alembic_version").fetchone()
    return revision


def pg_dump_command(database_url: str, out: Path) -> str:
    """The pg_dump command for node.database_url: libpq's URL (no SQLAlchemy driver), without the password,
    which pg_dump takes from ~/.pgpass or $PGPASSWORD rather than from a command line others may see."""
    url = make_url(database_url)
    libpq = URL.create("postgresql", url.username, None, url.host, url.port, url.database, url.query)
    dbname = libpq.render_as_string(hide_password=False)
    return shlex.join(["pg_dump", "--format=custom", f"--file={out / PG_DUMP_FILE}", f"--dbname={dbname}"])


def model_digests(config: Config) -> tuple[ModelDigest, ...]:
    configured = [(entry.name, entry.path) for entry in config.models] or [(BUILT_IN_MODEL, config.model.weights)]
    digests = []
    for name, path in configured:
        try:
            digest = model_digest(path)
        except ModelFileError:
            digest = None
        digests.append(ModelDigest(name, str(path), digest))
    return tuple(digests)


def take_backup(config: Config, config_file: Path, out: Path) -> Backup:
    """The database (SQLite: copied; PostgreSQL: the pg_dump command to run), the configuration file and the
    models' digests into the new or empty folder `out`."""
    database = config.database_file
    if database is not None and not database.is_file():
        raise BackupError(f"no database at {database}: no node has run with this configuration, nothing to back up")
    _empty_folder(out)
    revision = None if database is None else _copy_sqlite(database, out / DATABASE_COPY)
    with os.fdopen(_create_private(out / CONFIG_COPY), "wb") as copy:
        copy.write(config_file.read_bytes())
    names = [CONFIG_COPY] if database is None else [DATABASE_COPY, CONFIG_COPY]
    manifest = Manifest(
        __version__, revision, datetime.now(UTC).isoformat(timespec="seconds"),
        tuple(_described(out, name) for name in names), model_digests(config),
    )  # fmt: skip
    with os.fdopen(_create_private(out / MANIFEST), "w", encoding="utf-8") as written:
        written.write(json.dumps(asdict(manifest), indent=2) + "\n")
    fsync_path(out / MANIFEST)
    fsync_path(out)
    command = pg_dump_command(config.node.database_url, out) if database is None else None
    return Backup(out, manifest, command)


def _verify(folder: Path, manifest: Manifest) -> None:
    for file in manifest.files:
        path = folder / file.name
        if not path.is_file():
            raise BackupError(f"the backup is incomplete: {path} is missing; nothing was restored")
        actual = file_digest(path)
        if actual != file.sha256:
            raise BackupError(
                f"the backup is damaged: {path} hashes to sha256 {actual}, not the manifest's {file.sha256}; nothing was restored"
            )


def _known_revision(revision: str) -> None:
    try:
        known = ScriptDirectory.from_config(alembic_config()).get_revision(revision)
    except CommandError:
        known = None
    if known is None:
        raise BackupError(
            f"the backup's database has schema {revision}, which this rtnode ({__version__}) does not know: "
            "restore it with the rtnode that made it, or a newer one"
        )


def restore_backup(config: Config, backup: Path) -> Restore:
    """The backup's database as the configured one, which must not exist yet (nothing is ever overwritten),
    after every file's digest is checked against the manifest; an older schema is upgraded as at start."""
    manifest = Manifest.read(backup)
    _verify(backup, manifest)
    copy = manifest.file(DATABASE_COPY)
    if copy is None:
        raise BackupError(
            f"{backup} holds no database copy (the node used PostgreSQL): restore the {PG_DUMP_FILE} that pg_dump wrote "
            "with pg_restore --dbname=URL FILE"
        )
    target = config.database_file
    if target is None:
        raise BackupError("node.database_url is a PostgreSQL database: this backup is of SQLite; configure SQLite to restore it")
    _known_revision(manifest.schema_revision)
    for existing in (target, target.with_name(f"{target.name}-wal"), target.with_name(f"{target.name}-journal")):
        if existing.exists():
            raise BackupError(f"{existing} exists: restore goes into a fresh data directory and never overwrites a database")
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".restoring")
    try:
        with os.fdopen(fd, "wb") as handle, (backup / DATABASE_COPY).open("rb") as source:
            while chunk := source.read(_CHUNK):
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, target)  # unlike a rename, fails rather than replace a database made meanwhile
        except FileExistsError:
            raise BackupError(f"{target} appeared while restoring: it was left as it is") from None
    finally:
        os.unlink(temporary)
    fsync_path(target.parent)
    engine = open_database(config.node.database_url, fsync=config.node.fsync)
    engine.dispose()
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    return Restore(target, manifest, head if head != manifest.schema_revision else None)
