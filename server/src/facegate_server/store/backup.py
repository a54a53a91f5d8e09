"""Backups of the SQLite store, and restoring one (`facegate backup`, `facegate restore`).

A backup is taken with SQLite's online backup API from a connection of its own (this
process, not the server's): one read transaction copies a consistent snapshot while the
server keeps reading and writing (WAL). The copy is a single file (rollback journal
mode, no -wal beside it), readable by its owner only, checked with `integrity_check`
and renamed into place only when complete.

A restore replaces a stopped server's database. It refuses while anything has the
database open: a server holds `<db>.lock` shared (store/sqlite.py) and the restore takes
it exclusively; beyond that, an exclusive SQLite lock on the old database fails while
any process (an older server, the sqlite3 shell) has it open. The backup is checked
first (a FaceGate store of a known schema version, integrity ok), copied beside the
database, then renamed over it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from facegate_server.store.replica import COPY_FILE
from facegate_server.store.sqlite import SCHEMA_VERSION, open_lock


class BackupError(Exception):
    """A backup or restore refused or failed; the message says why, for the operator."""


@dataclass(frozen=True)
class BackupInfo:
    path: Path
    schema_version: int
    store_id: str
    members: int
    faces: int
    events: int
    size: int


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_private_file(path: Path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


@contextlib.contextmanager
def _connect(path: Path, mode: str) -> Iterator[sqlite3.Connection]:
    """A connection that never creates a database (`mode` rw or ro)."""
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode={mode}", uri=True)
    except sqlite3.Error as error:
        raise BackupError(f"cannot open {path}: {error}") from None
    try:
        yield db
    finally:
        db.close()


def describe(path: Path) -> BackupInfo:
    """Check that `path` is a FaceGate database this version can open, intact; what it holds."""
    if not path.is_file():
        raise BackupError(f"{path}: no such file")
    with _connect(path, "ro") as db:
        try:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as error:
            raise BackupError(f"{path} is not a SQLite database ({error})") from None
        try:
            return _check(db, path, version, tables)
        except sqlite3.DatabaseError as error:
            raise BackupError(f"{path} is damaged ({error})") from None


def _check(db: sqlite3.Connection, path: Path, version: int, tables: set[str]) -> BackupInfo:
    """The FaceGate checks, then integrity; what the database holds."""
    if not {"store_meta", "members", "faces", "access_events"} <= tables:
        raise BackupError(f"{path} is not a FaceGate database (its tables are not FaceGate's)")
    if not 1 <= version <= SCHEMA_VERSION:
        raise BackupError(
            f"{path} has schema version {version}; this FaceGate knows 1 to {SCHEMA_VERSION}"
            + (": upgrade FaceGate" if version > SCHEMA_VERSION else "")
        )
    row = db.execute("SELECT value FROM store_meta WHERE key = 'store_id'").fetchone()
    if row is None:
        raise BackupError(f"{path} is not a FaceGate database (it has no store id)")
    problems = [r[0] for r in db.execute("PRAGMA integrity_check(10)")]
    if problems != ["ok"]:
        raise BackupError(f"{path} is damaged (integrity_check: {'; '.join(problems)})")
    (members,) = db.execute("SELECT COUNT(*) FROM members").fetchone()
    (faces,) = db.execute("SELECT COUNT(*) FROM faces").fetchone()
    (events,) = db.execute("SELECT COUNT(*) FROM access_events").fetchone()
    return BackupInfo(path, version, str(row[0]), members, faces, events, path.stat().st_size)


def backup(db_path: Path, dest: Path) -> BackupInfo:
    """Copy the live database at `db_path` to the new file `dest` (never overwritten)."""
    if not db_path.is_file():
        if (db_path.parent / COPY_FILE).is_file():  # a chain server's: PostgreSQL holds it
            raise BackupError(
                f"no FaceGate database at {db_path}: this server's store is PostgreSQL "
                "(its data dir holds only the local copy); back that up with PostgreSQL's "
                "tools, pg_dump or pg_basebackup (README: Backups)"
            )
        raise BackupError(f"no FaceGate database at {db_path}")
    if dest.exists():
        raise BackupError(f"{dest} exists: name a new file (backups are never overwritten)")
    if not dest.parent.is_dir():
        raise BackupError(f"{dest.parent}: no such directory")
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    _new_private_file(partial)
    try:
        with _connect(db_path, "rw") as source:
            source.execute("PRAGMA busy_timeout=5000")
            with contextlib.closing(sqlite3.connect(partial)) as copy:
                try:
                    # One step: one read transaction, so one consistent snapshot. The
                    # server's writers carry on (WAL); its purges wait for the end.
                    source.backup(copy)
                except sqlite3.Error as error:
                    raise BackupError(f"cannot back up {db_path}: {error}") from None
                copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        info = describe(partial)
        _fsync(partial)
        os.replace(partial, dest)
        _fsync(dest.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return replace(info, path=dest)


def restore(source: Path, db_path: Path) -> BackupInfo:
    """Replace the database at `db_path` (its server stopped) with the backup `source`."""
    info = describe(source)
    db_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = open_lock(db_path)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(
                f"a FaceGate server is running on {db_path.parent} (it holds"
                f" {db_path.name}.lock): stop it, then restore"
            ) from None
        if db_path.exists():
            _close_old(db_path)
        partial = db_path.with_name(f".{db_path.name}.restore-{os.getpid()}")
        _new_private_file(partial)
        try:
            with (
                _connect(source, "ro") as src,
                contextlib.closing(sqlite3.connect(partial)) as copy,
            ):
                src.backup(copy)
                copy.execute("PRAGMA journal_mode=DELETE")
            _fsync(partial)
            for leftover in ("-wal", "-shm", "-journal"):
                db_path.with_name(db_path.name + leftover).unlink(missing_ok=True)
            os.replace(partial, db_path)
            _fsync(db_path.parent)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    finally:
        os.close(lock)
    return info


def _close_old(db_path: Path) -> None:
    """Take the old database exclusively (refused while any process has it open), and
    fold its WAL in so that none is left beside the database that replaces it."""
    db = sqlite3.connect(db_path, isolation_level=None, timeout=0)
    try:
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute("BEGIN EXCLUSIVE")
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.OperationalError:
        raise BackupError(
            f"another process has {db_path} open (a FaceGate server, the sqlite3 shell):"
            " stop it, then restore"
        ) from None
    except sqlite3.DatabaseError:
        pass  # not a database at all: it is replaced as it is
    finally:
        db.close()
