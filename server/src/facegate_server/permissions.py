"""Start-up warnings about files other users could read, and credentials sent in clear.

FaceGate still starts (an operator may have reasons, e.g. a group that backs up the data
directory), but each finding is one WARNING log line with the path and the fix:
- the tokens file readable or writable by group or others (hashes of tokens are not the
  tokens, but a writable file lets its writer add an admin): `chmod 600`;
- the data directory open to others (they could read the database by name): `chmod 700`;
- the database file, or its -wal and -shm files (SQLite gives them the database file's
  mode), readable by group or others: members' face embeddings are biometric data;
- bearer tokens accepted without TLS on an address other machines reach: anybody on
  the path reads them.

FaceGate creates the data directory 0700 and the database 0600 itself (store/sqlite.py).
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from facegate_server.config import Settings
from facegate_server.rpc.auth import Callers, is_loopback
from facegate_server.store.sqlite import sqlite_files


@dataclass(frozen=True)
class Finding:
    message: str
    path: str
    fix: str

    def log_fields(self) -> dict[str, str]:
        return {"path": self.path, "fix": self.fix}


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None  # missing (or unreadable): nothing to say here; its reader reports it


def tokens_file(path: Path | None) -> Iterator[Finding]:
    if path is None:
        return
    mode = _mode(Path(path))
    if mode is not None and mode & 0o077:
        yield Finding(
            "the tokens file is readable or writable by other users",
            str(path),
            f"chmod 600 {path}",
        )


def data_files(data_dir: Path, db_path: Path) -> Iterator[Finding]:
    mode = _mode(data_dir)
    if mode is not None and mode & 0o007:
        yield Finding(
            "the data directory is open to other users", str(data_dir), f"chmod 700 {data_dir}"
        )
    for path in sqlite_files(db_path):
        mode = _mode(path)
        if mode is not None and mode & 0o077:
            yield Finding(
                "the database file is readable or writable by other users",
                str(path),
                f"chmod 600 {path}",
            )


def cleartext_tokens(settings: Settings, callers: Callers) -> Iterator[Finding]:
    if callers.tokens and settings.tls_cert is None and not is_loopback(settings.listen):
        yield Finding(
            "bearer tokens are accepted without TLS on an address other machines reach: "
            "they cross the network in clear text",
            settings.listen,
            "set FACEGATE_TLS_CERT and FACEGATE_TLS_KEY (--tls-cert, --tls-key)",
        )


def startup_findings(settings: Settings, callers: Callers) -> list[Finding]:
    """What `facegate serve` warns about when it starts (after the store is open)."""
    return [
        *tokens_file(settings.tokens_file),
        *data_files(settings.data_dir, settings.db_path),
        *cleartext_tokens(settings, callers),
    ]
