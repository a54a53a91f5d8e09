"""The embedded store: one SQLite file (WAL, synchronous=FULL), schema versioned by
`PRAGMA user_version` and upgraded by the migrations below at open.

Times are stored as integer microseconds since the Unix epoch (UTC); embeddings as the
128 float64 values' little-endian bytes. The file is created readable by its owner only.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from facegate_server.domain import (
    AccessEvent,
    Decision,
    Embedding,
    EngineKind,
    EventFilter,
    FaceTemplate,
    Member,
    NewAccessEvent,
)
from facegate_server.errors import MemberAlreadyExists, MemberNotFound
from facegate_server.store.base import Store

EMBEDDING_DTYPE = np.dtype("<f8")

# Each migration takes the schema from version i to i + 1. Append; never edit.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE members (
            member_id    TEXT PRIMARY KEY,
            display_name TEXT NOT NULL,
            create_us    INTEGER NOT NULL,
            update_us    INTEGER NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE faces (
            face_id    INTEGER PRIMARY KEY,
            member_id  TEXT NOT NULL REFERENCES members(member_id) ON DELETE CASCADE,
            embedding  BLOB NOT NULL,
            photo      BLOB,
            create_us  INTEGER NOT NULL
        )""",
        "CREATE INDEX faces_by_member ON faces(member_id)",
        """CREATE TABLE access_events (
            event_id     INTEGER PRIMARY KEY AUTOINCREMENT,
            time_us      INTEGER NOT NULL,
            turnstile_id TEXT NOT NULL,
            member_id    TEXT NOT NULL,
            decision     TEXT NOT NULL,
            engine       TEXT NOT NULL,
            confidence   REAL NOT NULL,
            latency_us   INTEGER NOT NULL
        )""",
        "CREATE INDEX events_by_member ON access_events(member_id, event_id)",
        "CREATE INDEX events_by_time ON access_events(time_us)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def _us(t: datetime) -> int:
    return round(t.timestamp() * 1_000_000)


def _time(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


class SqliteStore(Store):
    def __init__(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the database's schema version {version} is newer than this FaceGate's "
                    f"({SCHEMA_VERSION}): upgrade FaceGate"
                )
            for number in range(version, SCHEMA_VERSION):
                with self._transaction():
                    for statement in MIGRATIONS[number]:
                        self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {number + 1}")

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _insert_faces(self, member_id: str, templates: Sequence[FaceTemplate], now_us: int) -> None:
        self._db.executemany(
            "INSERT INTO faces (member_id, embedding, photo, create_us) VALUES (?, ?, ?, ?)",
            [
                (member_id, np.asarray(t.embedding, EMBEDDING_DTYPE).tobytes(), t.photo, now_us)
                for t in templates
            ],
        )

    def create_member(
        self, member_id: str, display_name: str, templates: Sequence[FaceTemplate], now: datetime
    ) -> Member:
        now_us = _us(now)
        with self._lock, self._transaction():
            try:
                self._db.execute(
                    "INSERT INTO members VALUES (?, ?, ?, ?)",
                    (member_id, display_name, now_us, now_us),
                )
            except sqlite3.IntegrityError:
                raise MemberAlreadyExists(member_id) from None
            self._insert_faces(member_id, templates, now_us)
            return self._get(member_id)

    def add_templates(
        self, member_id: str, templates: Sequence[FaceTemplate], now: datetime
    ) -> Member:
        now_us = _us(now)
        with self._lock, self._transaction():
            updated = self._db.execute(
                "UPDATE members SET update_us = ? WHERE member_id = ?", (now_us, member_id)
            )
            if updated.rowcount == 0:
                raise MemberNotFound(member_id)
            self._insert_faces(member_id, templates, now_us)
            return self._get(member_id)

    _MEMBER_SQL = """SELECT m.member_id, m.display_name,
        (SELECT COUNT(*) FROM faces f WHERE f.member_id = m.member_id), m.create_us, m.update_us
        FROM members m"""

    @staticmethod
    def _member(row: Any) -> Member:
        return Member(row[0], row[1], row[2], _time(row[3]), _time(row[4]))

    def _get(self, member_id: str) -> Member:
        row = self._db.execute(self._MEMBER_SQL + " WHERE m.member_id = ?", (member_id,)).fetchone()
        if row is None:
            raise MemberNotFound(member_id)
        return self._member(row)

    def get_member(self, member_id: str) -> Member:
        with self._lock:
            return self._get(member_id)

    def list_members(self, limit: int, after: str = "") -> list[Member]:
        with self._lock:
            rows = self._db.execute(
                self._MEMBER_SQL + " WHERE m.member_id > ? ORDER BY m.member_id LIMIT ?",
                (after, limit),
            ).fetchall()
        return [self._member(r) for r in rows]

    def delete_member(self, member_id: str) -> None:
        with self._lock, self._transaction():
            self._db.execute("DELETE FROM faces WHERE member_id = ?", (member_id,))
            if (
                self._db.execute("DELETE FROM members WHERE member_id = ?", (member_id,)).rowcount
                == 0
            ):
                raise MemberNotFound(member_id)

    def iter_embeddings(self) -> Iterator[tuple[str, Embedding]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT member_id, embedding FROM faces ORDER BY face_id"
            ).fetchall()
        for member_id, blob in rows:
            yield member_id, np.frombuffer(blob, EMBEDDING_DTYPE).astype(np.float64)

    def record_event(self, event: NewAccessEvent) -> AccessEvent:
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO access_events (time_us, turnstile_id, member_id, decision, engine,"
                " confidence, latency_us) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    _us(event.time),
                    event.turnstile_id,
                    event.member_id,
                    event.decision.value,
                    event.engine.value,
                    event.confidence,
                    round(event.latency / timedelta(microseconds=1)),
                ),
            )
            event_id = cursor.lastrowid
        assert event_id is not None
        fields = {k: getattr(event, k) for k in NewAccessEvent.__dataclass_fields__}
        return AccessEvent(**fields, event_id=event_id)

    def list_events(
        self, where: EventFilter, limit: int, before_id: int | None = None
    ) -> list[AccessEvent]:
        clauses: list[str] = []
        params: list[str | int] = []
        if before_id is not None:
            clauses.append("event_id < ?")
            params.append(before_id)
        if where.member_id:
            clauses.append("member_id = ?")
            params.append(where.member_id)
        if where.turnstile_id:
            clauses.append("turnstile_id = ?")
            params.append(where.turnstile_id)
        if where.start_time is not None:
            clauses.append("time_us >= ?")
            params.append(_us(where.start_time))
        if where.end_time is not None:
            clauses.append("time_us < ?")
            params.append(_us(where.end_time))
        sql = (
            "SELECT event_id, time_us, turnstile_id, member_id, decision, engine, confidence,"
            " latency_us FROM access_events"
            + (" WHERE " + " AND ".join(clauses) if clauses else "")
            + " ORDER BY event_id DESC LIMIT ?"
        )
        with self._lock:
            rows = self._db.execute(sql, (*params, limit)).fetchall()
        return [
            AccessEvent(
                event_id=r[0],
                time=_time(r[1]),
                turnstile_id=r[2],
                member_id=r[3],
                decision=Decision(r[4]),
                engine=EngineKind(r[5]),
                confidence=r[6],
                latency=timedelta(microseconds=r[7]),
            )
            for r in rows
        ]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the block raises."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, error: object, tb: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
