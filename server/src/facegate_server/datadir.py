"""The data directory as `facegate serve` holds it: one server at a time, and the kind of
server it was made for.

A server's identity lives in its data dir (the chain's server id, the origin of its
events, is made with its local copy), so two servers on one data dir would be one server
twice: `facegate serve` holds an exclusive lock on `serve.lock` there (fcntl.flock: the
kernel drops it when the process ends, however it ends) and writes its pid in it.

A data dir made for a chain holds `gallery-copy.sqlite3` (store/replica.py), one of a
server of its own `facegate.sqlite3`: started with the other kind's settings, a server
would serve an empty gallery, so `check_kind` refuses.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from pathlib import Path

LOCK_FILE = "serve.lock"
COPY_FILE = "gallery-copy.sqlite3"  # store/replica.py's (not imported: it imports numpy)
DB_FILE = "facegate.sqlite3"  # config.py's Settings.db_path


class DataDirRefused(RuntimeError):
    """The data dir cannot be served: in use, or made for the other kind of server."""


class DataDirLock:
    """The exclusive hold of one data dir, until `release` (or the process ends)."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode("ascii", "replace").strip()
            os.close(self._fd)
            self._fd = None
            by = f" (pid {holder})" if holder.isdigit() else ""
            raise DataDirRefused(
                f"the data dir {data_dir} is in use by another facegate serve{by}: each server"
                " needs a data dir of its own (--data-dir, FACEGATE_DATA_DIR)"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the last descriptor drops the lock
            self._fd = None


def member_count(path: Path) -> int | None:
    """How many members the SQLite database at `path` holds (read-only); None when there
    is no such file or it is not a FaceGate database."""
    if not path.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return int(db.execute("SELECT count(*) FROM members").fetchone()[0])
    except sqlite3.Error:
        return None


def check_kind(data_dir: Path, chain: bool) -> str:
    """Refuse (DataDirRefused) a data dir made for the other kind of server when serving it
    would serve an empty gallery; a warning ("" for none) where the dir holds both."""
    copy, database = data_dir / COPY_FILE, data_dir / DB_FILE
    members = member_count(database)
    if not chain and copy.exists():
        if not members:
            raise DataDirRefused(
                f"the data dir {data_dir} is a chain server's ({COPY_FILE}: its local copy of"
                " the shared gallery) and has no members of its own: start it with --store"
                " postgresql://... (FACEGATE_STORE), or give a server of its own a new data dir"
            )
        return (
            f"the data dir {data_dir} also holds a chain server's {COPY_FILE}: serving its own"
            f" {DB_FILE} ({members} members), not the chain's"
        )
    if chain and members:
        return (
            f"the data dir {data_dir} holds {DB_FILE} with {members} members, which a chain"
            " server does not use (it serves the shared store's members): enrol them through"
            " the chain, or start without --store to serve them"
        )
    return ""


def copy_made(data_dir: Path) -> bool:
    """Whether the data dir holds a chain server's local copy made from its store (one
    that reached the store at least once), read-only: nothing is created."""
    path = data_dir / COPY_FILE
    if not path.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT value FROM replica_meta WHERE key = 'central_id'").fetchone()
    except sqlite3.Error:
        return False
    return bool(row and row[0])
