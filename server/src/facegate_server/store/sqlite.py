"""The embedded store: one SQLite file (WAL, synchronous=FULL), schema versioned by
`PRAGMA user_version` and upgraded by the migrations below at open.

Times are stored as integer microseconds since the Unix epoch (UTC); embeddings as the
128 float64 values' little-endian bytes. The file is created readable by its owner only.

Deletion leaves nothing behind in the live files: `secure_delete` zeroes freed content,
and after a deletion commits the WAL (which still holds the pages as they were) is
checkpointed into the database and truncated. That purge runs outside the store's lock on
its own connection with a short busy timeout; when another process holds a read
transaction (a backup, the sqlite3 shell) the WAL cannot be reset, and a background timer
retries until it can (SQLite has no event for a reader closing). `purge_pending_since`
says when a purge has been waiting.

A server holds a shared `flock` on `<db>.lock` while the store is open, so that
`facegate restore` (store/backup.py), which takes it exclusively, never replaces the
database under a running server.
"""

from __future__ import annotations

import fcntl
import logging
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
    AccessKind,
    CloudPerson,
    Decision,
    Embedding,
    EngineKind,
    EventFilter,
    FaceTemplate,
    Member,
    MemberPhoto,
    Membership,
    MembershipRule,
    NewAccessEvent,
    OutboxEntry,
    StoredFace,
)
from facegate_server.errors import LastPhoto, MemberAlreadyExists, MemberNotFound, PhotoNotFound
from facegate_server.store.base import Store, embedding_of
from facegate_server.store.codec import (
    membership_from_json,
    membership_json,
    quality_from_json,
    quality_json,
)
from facegate_server.store.reports import reports_from_json, reports_json

EMBEDDING_DTYPE = np.dtype("<f8")

log = logging.getLogger(__name__)

PURGE_BUSY_MS = 100
"""How long a purge attempt waits for a reader or writer before leaving it to the timer."""
PURGE_INTERVAL_S = 1.0
"""How often a pending purge is retried."""

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
    (
        # What each engine did, for decisions that involved more than one (JSON).
        "ALTER TABLE access_events ADD COLUMN reports TEXT NOT NULL DEFAULT '[]'",
        # The cloud's ids for members and faces. A person outlives its member until the
        # outbox has deleted it in the cloud.
        """CREATE TABLE cloud_persons (
            person_id    TEXT PRIMARY KEY,
            member_id    TEXT NOT NULL,
            deleted      INTEGER NOT NULL DEFAULT 0,
            ready        INTEGER NOT NULL DEFAULT 0,
            pending      INTEGER NOT NULL DEFAULT 0,
            in_training  INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID""",
        "CREATE INDEX cloud_persons_by_member ON cloud_persons(member_id)",
        "ALTER TABLE faces ADD COLUMN persisted_face_id TEXT",
        """CREATE TABLE outbox (
            seq        INTEGER PRIMARY KEY AUTOINCREMENT,
            kind       TEXT NOT NULL CHECK (kind IN ('add_face', 'delete_member')),
            member_id  TEXT NOT NULL,
            face_id    INTEGER,
            photo      BLOB,
            attempts   INTEGER NOT NULL DEFAULT 0,
            last_error TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX outbox_by_member ON outbox(member_id)",
    ),
    (
        # Verify (1:1) beside Identify (1:N): what was asked, the member a card claimed,
        # and why, when the decision alone does not say. Older events were all Identify.
        "ALTER TABLE access_events ADD COLUMN kind TEXT NOT NULL DEFAULT 'IDENTIFY'",
        "ALTER TABLE access_events ADD COLUMN claimed_member_id TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE access_events ADD COLUMN detail TEXT NOT NULL DEFAULT ''",
        # A member's events include the verifications that claimed them (a card misused).
        "CREATE INDEX events_by_claimed ON access_events(claimed_member_id, event_id)",
    ),
    (
        # The store's identity, made once: the cloud persons this store makes carry it, so
        # that two stores on one Face API resource never touch each other's persons.
        """CREATE TABLE store_meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        ) WITHOUT ROWID""",
        "INSERT INTO store_meta VALUES ('store_id', lower(hex(randomblob(16))))",
        # An entry the cloud refused for its own sake (a photo it cannot take) is set aside
        # with the reason; the entries behind it keep moving.
        "ALTER TABLE outbox ADD COLUMN parked TEXT NOT NULL DEFAULT ''",
    ),
    (
        # Membership rules (JSON, store/codec.py); '{}' admits as before.
        "ALTER TABLE members ADD COLUMN membership TEXT NOT NULL DEFAULT '{}'",
        # What the local engine measured of each enrolled face (JSON; NULL: not measured).
        "ALTER TABLE faces ADD COLUMN quality TEXT",
        # The membership rule that refused a recognised member ('' none).
        "ALTER TABLE access_events ADD COLUMN rule TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX events_by_decision ON access_events(decision, event_id)",
        # The outbox learns "delete_face" (a removed photo): the kind's CHECK cannot be
        # altered in place, so the table is rebuilt, with the cloud face's id beside it.
        """CREATE TABLE outbox_new (
            seq               INTEGER PRIMARY KEY AUTOINCREMENT,
            kind              TEXT NOT NULL
                              CHECK (kind IN ('add_face', 'delete_member', 'delete_face')),
            member_id         TEXT NOT NULL,
            face_id           INTEGER,
            photo             BLOB,
            attempts          INTEGER NOT NULL DEFAULT 0,
            last_error        TEXT NOT NULL DEFAULT '',
            parked            TEXT NOT NULL DEFAULT '',
            persisted_face_id TEXT
        )""",
        """INSERT INTO outbox_new
            (seq, kind, member_id, face_id, photo, attempts, last_error, parked)
            SELECT seq, kind, member_id, face_id, photo, attempts, last_error, parked
            FROM outbox""",
        "DROP TABLE outbox",
        "ALTER TABLE outbox_new RENAME TO outbox",
        "CREATE INDEX outbox_by_member ON outbox(member_id)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def _us(t: datetime) -> int:
    return round(t.timestamp() * 1_000_000)


def _time(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


def lock_path(path: Path) -> Path:
    """The lock file beside a database: servers hold it shared, a restore exclusively."""
    return path.with_name(path.name + ".lock")


def open_lock(path: Path) -> int:
    """The lock file's descriptor (created readable by its owner only)."""
    return os.open(lock_path(path), os.O_CREAT | os.O_RDWR, 0o600)


def _event_clauses(where: EventFilter) -> tuple[list[str], list[str | int]]:
    """The SQL conditions (and their parameters) of an event filter."""
    clauses: list[str] = []
    params: list[str | int] = []
    if where.member_id:
        clauses.append("(member_id = ? OR claimed_member_id = ?)")
        params.extend([where.member_id, where.member_id])
    if where.turnstile_id:
        clauses.append("turnstile_id = ?")
        params.append(where.turnstile_id)
    if where.start_time is not None:
        clauses.append("time_us >= ?")
        params.append(_us(where.start_time))
    if where.end_time is not None:
        clauses.append("time_us < ?")
        params.append(_us(where.end_time))
    if where.decisions:
        clauses.append(f"decision IN ({', '.join('?' for _ in where.decisions)})")
        params.extend(d.value for d in where.decisions)
    if where.rule is not None:
        clauses.append("rule = ?")
        params.append(where.rule.value)
    return clauses, params


def sqlite_files(database: Path) -> tuple[Path, Path, Path]:
    """A SQLite database in WAL mode: the file, its write-ahead log and shared memory."""
    return (database, Path(f"{database}-wal"), Path(f"{database}-shm"))


class SqliteStore(Store):
    def __init__(self, path: Path, *, purge_interval: float = PURGE_INTERVAL_S) -> None:
        path = Path(path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._held = open_lock(path)
        try:
            fcntl.flock(self._held, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._held)
            raise RuntimeError(f"{path} is being restored (facegate restore): try again") from None
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # The purge's own connection: a checkpoint there waits for no store lock, and
        # gives up after PURGE_BUSY_MS rather than the store's busy timeout.
        self._purge_lock = threading.Lock()
        self._purge_db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._purge_db.execute(f"PRAGMA busy_timeout={PURGE_BUSY_MS}")
        self._purge_interval = purge_interval
        self._purge_since: datetime | None = None
        self._purge_thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        # Deleted rows are overwritten with zeros, not left in free pages (see delete_member).
        self._db.execute("PRAGMA secure_delete=ON")
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise
        _, wal, _ = sqlite_files(path)
        if wal.exists() and wal.stat().st_size > 0:  # left by a crash, maybe after a deletion
            self._purge_wal()

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
        for t in templates:
            face_id = self._db.execute(
                "INSERT INTO faces (member_id, embedding, photo, create_us, quality)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    member_id,
                    np.asarray(embedding_of(t), EMBEDDING_DTYPE).tobytes(),
                    t.photo,
                    now_us,
                    quality_json(t.quality),
                ),
            ).lastrowid
            if t.cloud_photo is not None:
                self._db.execute(
                    "INSERT INTO outbox (kind, member_id, face_id, photo)"
                    " VALUES ('add_face', ?, ?, ?)",
                    (member_id, face_id, t.cloud_photo),
                )

    def create_member(
        self,
        member_id: str,
        display_name: str,
        templates: Sequence[FaceTemplate],
        now: datetime,
        membership: Membership | None = None,
    ) -> Member:
        now_us = _us(now)
        with self._lock, self._transaction():
            try:
                self._db.execute(
                    "INSERT INTO members (member_id, display_name, create_us, update_us,"
                    " membership) VALUES (?, ?, ?, ?, ?)",
                    (
                        member_id,
                        display_name,
                        now_us,
                        now_us,
                        membership_json(membership or Membership()),
                    ),
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

    def update_member(
        self, member_id: str, display_name: str, membership: Membership, now: datetime
    ) -> Member:
        with self._lock, self._transaction():
            updated = self._db.execute(
                "UPDATE members SET display_name = ?, membership = ?, update_us = ?"
                " WHERE member_id = ?",
                (display_name, membership_json(membership), _us(now), member_id),
            )
            if updated.rowcount == 0:
                raise MemberNotFound(member_id)
            return self._get(member_id)

    def photos(self, member_id: str, *, with_bytes: bool = False) -> list[MemberPhoto]:
        photo = "photo" if with_bytes else "NULL"
        with self._lock:
            self._get(member_id)
            rows = self._db.execute(
                f"SELECT face_id, create_us, quality, {photo} FROM faces"
                " WHERE member_id = ? ORDER BY face_id",
                (member_id,),
            ).fetchall()
        return [MemberPhoto(r[0], _time(r[1]), quality_from_json(r[2]), r[3]) for r in rows]

    def remove_photo(
        self, member_id: str, photo_id: int, now: datetime, *, cloud: bool = False
    ) -> tuple[Member, FaceTemplate]:
        with self._lock, self._transaction():
            self._get(member_id)
            row = self._db.execute(
                "SELECT embedding, photo, quality, persisted_face_id FROM faces"
                " WHERE face_id = ? AND member_id = ?",
                (photo_id, member_id),
            ).fetchone()
            if row is None:
                raise PhotoNotFound(member_id, photo_id)
            (count,) = self._db.execute(
                "SELECT COUNT(*) FROM faces WHERE member_id = ?", (member_id,)
            ).fetchone()
            if count == 1:
                raise LastPhoto(member_id)
            (tried,) = self._db.execute(
                "SELECT COUNT(*) FROM outbox WHERE kind = 'add_face' AND face_id = ?"
                " AND attempts > 0",
                (photo_id,),
            ).fetchone()
            self._db.execute(
                "DELETE FROM outbox WHERE kind = 'add_face' AND face_id = ?", (photo_id,)
            )
            self._db.execute("DELETE FROM faces WHERE face_id = ?", (photo_id,))
            if cloud and (row[3] is not None or tried):
                self._db.execute(
                    "INSERT INTO outbox (kind, member_id, face_id, persisted_face_id)"
                    " VALUES ('delete_face', ?, ?, ?)",
                    (member_id, photo_id, row[3]),
                )
            self._db.execute(
                "UPDATE members SET update_us = ? WHERE member_id = ?", (_us(now), member_id)
            )
            member = self._get(member_id)
        self._purge_wal()
        removed = FaceTemplate(
            np.frombuffer(row[0], EMBEDDING_DTYPE).astype(np.float64),
            photo=row[1],
            quality=quality_from_json(row[2]),
        )
        return member, removed

    _MEMBER_SQL = """SELECT m.member_id, m.display_name,
        (SELECT COUNT(*) FROM faces f WHERE f.member_id = m.member_id), m.create_us, m.update_us,
        m.membership
        FROM members m"""

    @staticmethod
    def _member(row: Any) -> Member:
        return Member(
            row[0],
            row[1],
            row[2],
            _time(row[3]),
            _time(row[4]),
            membership=membership_from_json(row[5]),
        )

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

    def count_members(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM members").fetchone()
        return int(count)

    def delete_member(self, member_id: str, *, cloud: bool = False) -> None:
        with self._lock, self._transaction():
            self._db.execute("DELETE FROM faces WHERE member_id = ?", (member_id,))
            deleted = self._db.execute("DELETE FROM members WHERE member_id = ?", (member_id,))
            if deleted.rowcount == 0:
                raise MemberNotFound(member_id)
            self._db.execute(
                "DELETE FROM outbox WHERE member_id = ? AND kind = 'add_face'", (member_id,)
            )
            if cloud:
                self._db.execute(
                    "UPDATE cloud_persons SET deleted = 1 WHERE member_id = ?", (member_id,)
                )
                self._db.execute(
                    "INSERT INTO outbox (kind, member_id) VALUES ('delete_member', ?)",
                    (member_id,),
                )
        self._purge_wal()

    def _purge_wal(self) -> None:
        """Copy the WAL into the database and empty it: the WAL still holds the pages as
        they were before a deletion (the member's embeddings and photos) until then.
        With secure_delete on, the database file keeps nothing of them either.

        Called after the deletion has committed, without the store's lock: when a reader
        holds old pages, the purge is left to the timer (`purge_pending_since`)."""
        with self._purge_lock:
            if self._checkpoint():
                self._purge_since = None
                return
            if self._purge_since is None:
                self._purge_since = datetime.now(UTC)
                log.warning(
                    "deleted data stays in the WAL until another process's read transaction"
                    " ends (a backup, the sqlite3 shell); retrying",
                    extra={"every_s": self._purge_interval},
                )
            if self._purge_thread is None and not self._closing.is_set():
                self._purge_thread = threading.Thread(
                    target=self._purge_later, name="sqlite-purge", daemon=True
                )
                self._purge_thread.start()

    def _checkpoint(self) -> bool:
        """One attempt at checkpointing the whole WAL and truncating it (purge lock held)."""
        try:
            busy, _, _ = self._purge_db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError:  # locked by a writer past the short timeout
            return False
        return bool(busy == 0)

    def _purge_later(self) -> None:
        while not self._closing.wait(self._purge_interval):
            with self._purge_lock:
                if self._purge_since is not None and self._checkpoint():
                    log.info(
                        "deleted data purged from the WAL",
                        extra={
                            "waited_s": round(
                                (datetime.now(UTC) - self._purge_since).total_seconds(), 1
                            )
                        },
                    )
                    self._purge_since = None
                if self._purge_since is None:
                    self._purge_thread = None
                    return

    def purge_pending_since(self) -> datetime | None:
        with self._purge_lock:
            return self._purge_since

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
                " confidence, latency_us, reports, kind, claimed_member_id, detail, rule)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    _us(event.time),
                    event.turnstile_id,
                    event.member_id,
                    event.decision.value,
                    event.engine.value,
                    event.confidence,
                    round(event.latency / timedelta(microseconds=1)),
                    reports_json(event.reports),
                    event.kind.value,
                    event.claimed_member_id,
                    event.detail,
                    event.rule.value if event.rule is not None else "",
                ),
            )
            event_id = cursor.lastrowid
        assert event_id is not None
        return event.stored(event_id)

    def list_events(
        self, where: EventFilter, limit: int, before_id: int | None = None
    ) -> list[AccessEvent]:
        clauses, params = _event_clauses(where)
        if before_id is not None:
            clauses.insert(0, "event_id < ?")
            params.insert(0, before_id)
        return self._select_events(clauses, params, "event_id DESC", limit)

    def events_after(self, after_id: int, where: EventFilter, limit: int) -> list[AccessEvent]:
        clauses, params = _event_clauses(where)
        clauses.insert(0, "event_id > ?")
        params.insert(0, after_id)
        return self._select_events(clauses, params, "event_id", limit)

    def _select_events(
        self, clauses: list[str], params: list[str | int], order: str, limit: int
    ) -> list[AccessEvent]:
        sql = (
            "SELECT event_id, time_us, turnstile_id, member_id, decision, engine, confidence,"
            " latency_us, reports, kind, claimed_member_id, detail, rule FROM access_events"
            + (" WHERE " + " AND ".join(clauses) if clauses else "")
            + f" ORDER BY {order} LIMIT ?"
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
                reports=reports_from_json(r[8]),
                kind=AccessKind(r[9]),
                claimed_member_id=r[10],
                detail=r[11],
                rule=MembershipRule(r[12]) if r[12] else None,
            )
            for r in rows
        ]

    EVENT_BATCH = 2000
    """Events deleted a transaction: the store's lock is let go between batches."""

    def delete_events_before(self, cutoff: datetime) -> int:
        cutoff_us, deleted = _us(cutoff), 0
        while True:
            with self._lock:
                count = self._db.execute(
                    "DELETE FROM access_events WHERE event_id IN (SELECT event_id FROM"
                    " access_events WHERE time_us < ? ORDER BY time_us LIMIT ?)",
                    (cutoff_us, self.EVENT_BATCH),
                ).rowcount
            deleted += count
            if count < self.EVENT_BATCH:
                break
        if deleted:
            self._purge_wal()
        return deleted

    def oldest_event_at(self) -> datetime | None:
        with self._lock:
            (oldest,) = self._db.execute("SELECT MIN(time_us) FROM access_events").fetchone()
        return None if oldest is None else _time(oldest)

    def store_id(self) -> str:
        with self._lock:
            row = self._db.execute("SELECT value FROM store_meta WHERE key = 'store_id'").fetchone()
        return str(row[0])

    _OUTBOX_SQL = (
        "SELECT seq, kind, member_id, face_id, photo, attempts, last_error, parked,"
        " persisted_face_id FROM outbox"
    )

    def outbox(self, limit: int) -> list[OutboxEntry]:
        with self._lock:
            rows = self._db.execute(
                self._OUTBOX_SQL + " WHERE parked = '' ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [OutboxEntry(*row) for row in rows]

    def outbox_depth(self) -> int:
        with self._lock:
            return int(
                self._db.execute("SELECT COUNT(*) FROM outbox WHERE parked = ''").fetchone()[0]
            )

    def outbox_members(self) -> set[str]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT member_id FROM outbox").fetchall()
        return {str(r[0]) for r in rows}

    def outbox_park(self, seq: int, reason: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET parked = ?, last_error = ? WHERE seq = ?",
                (reason or "refused", reason, seq),
            )

    def outbox_parked(self, limit: int) -> list[OutboxEntry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, kind, member_id, face_id, NULL, attempts, last_error, parked"
                " FROM outbox WHERE parked != '' ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [OutboxEntry(*row) for row in rows]

    def outbox_of(self, member_id: str) -> list[OutboxEntry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, kind, member_id, face_id, NULL, attempts, last_error, parked"
                " FROM outbox WHERE member_id = ? ORDER BY seq",
                (member_id,),
            ).fetchall()
        return [OutboxEntry(*row) for row in rows]

    def outbox_parked_count(self) -> int:
        with self._lock:
            return int(
                self._db.execute("SELECT COUNT(*) FROM outbox WHERE parked != ''").fetchone()[0]
            )

    def outbox_unpark(self) -> int:
        with self._lock:
            return self._db.execute(
                "UPDATE outbox SET parked = '', attempts = 0 WHERE parked != ''"
            ).rowcount

    def outbox_attempt(self, seq: int, error: str = "") -> None:
        with self._lock:
            if error:
                self._db.execute("UPDATE outbox SET last_error = ? WHERE seq = ?", (error, seq))
            else:
                self._db.execute("UPDATE outbox SET attempts = attempts + 1 WHERE seq = ?", (seq,))

    def outbox_done(self, seq: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    _PERSON_SQL = "SELECT member_id, person_id, ready, deleted FROM cloud_persons"

    def cloud_person(self, member_id: str) -> CloudPerson | None:
        with self._lock:
            row = self._db.execute(
                self._PERSON_SQL + " WHERE member_id = ? AND deleted = 0", (member_id,)
            ).fetchone()
        return None if row is None else CloudPerson(row[0], row[1], bool(row[2]), bool(row[3]))

    def cloud_people(self) -> list[CloudPerson]:
        with self._lock:
            rows = self._db.execute(self._PERSON_SQL + " ORDER BY member_id").fetchall()
        return [CloudPerson(r[0], r[1], bool(r[2]), bool(r[3])) for r in rows]

    def member_of_person(self, person_id: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT c.member_id FROM cloud_persons c JOIN members m USING (member_id)"
                " WHERE c.person_id = ? AND c.deleted = 0",
                (person_id,),
            ).fetchone()
        return None if row is None else str(row[0])

    def save_cloud_person(self, member_id: str, person_id: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO cloud_persons (person_id, member_id) VALUES (?, ?)",
                (person_id, member_id),
            )

    def forget_cloud_person(self, person_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM cloud_persons WHERE person_id = ?", (person_id,))

    def save_cloud_face(self, face_id: int, persisted_face_id: str) -> None:
        with self._lock, self._transaction():
            self._db.execute(
                "UPDATE faces SET persisted_face_id = ? WHERE face_id = ?",
                (persisted_face_id, face_id),
            )
            self._db.execute(
                "UPDATE cloud_persons SET pending = 1 WHERE deleted = 0 AND member_id ="
                " (SELECT member_id FROM faces WHERE face_id = ?)",
                (face_id,),
            )

    def faces(self, member_id: str, *, photos: bool = True) -> list[StoredFace]:
        photo = "photo" if photos else "NULL"
        with self._lock:
            rows = self._db.execute(
                f"SELECT face_id, member_id, {photo}, persisted_face_id, photo IS NOT NULL"
                " FROM faces WHERE member_id = ? ORDER BY face_id",
                (member_id,),
            ).fetchall()
        return [StoredFace(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def face_photo(self, face_id: int) -> bytes | None:
        with self._lock:
            row = self._db.execute(
                "SELECT photo FROM faces WHERE face_id = ?", (face_id,)
            ).fetchone()
        return None if row is None else row[0]

    def training_queued(self) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE cloud_persons SET in_training = 1, pending = 0 WHERE pending = 1"
            )

    def training_succeeded(self) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE cloud_persons SET ready = 1, in_training = 0 WHERE in_training = 1"
            )

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        with self._purge_lock:  # no purge thread starts once closing is set
            thread = self._purge_thread
        if thread is not None:
            thread.join()
        with self._purge_lock:
            if self._purge_since is not None and not self._checkpoint():
                log.warning("deleted data stays in the WAL until the store next opens")
            self._purge_db.close()
        with self._lock:
            self._db.close()
        os.close(self._held)  # and with it the shared lock


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the block raises."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, error: object, tb: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
