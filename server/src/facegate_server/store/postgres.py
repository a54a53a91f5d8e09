"""The shared store: one PostgreSQL database for every server of a chain (psycopg 3 and a
connection pool), schema versioned by the `schema_version` table and upgraded by the
migrations below, each in its own transaction, under an advisory lock so that servers
starting together migrate once.

Beside the Store interface it keeps the chain's change log (`member_changes`): every change
of a member (enrolled, photos added or removed, membership updated, deleted) appends a row
in the same transaction, and NOTIFYs `facegate_member_changes`, so that every server's
follower (store/chain.py) copies the change into its local copy of the gallery. Change log
rows are written under one transaction-level advisory lock: their sequence numbers are
committed in order, so a reader that has applied up to n never finds n - 1 committed later.

Embeddings are stored as the 128 float64 values' little-endian bytes, as in SQLite; times
as timestamptz; membership, face quality and engine reports as jsonb.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
import psycopg_pool
from psycopg import sql

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
from facegate_server.errors import (
    LastPhoto,
    MemberAlreadyExists,
    MemberNotFound,
    PhotoNotFound,
    StoreUnavailable,
)
from facegate_server.store.base import Store, embedding_of
from facegate_server.store.codec import (
    membership_from_json,
    membership_json,
    quality_from_json,
    quality_json,
)
from facegate_server.store.reports import reports_from_json, reports_json

log = logging.getLogger(__name__)

EMBEDDING_DTYPE = np.dtype("<f8")
CHANNEL = "facegate_member_changes"
"""The NOTIFY channel of the change log (the payload is the change's seq)."""
_MIGRATION_LOCK = 0x46470001  # pg_advisory_xact_lock keys ("FG" 1, 2 and 3)
_CHANGE_LOCK = 0x46470002
_EVENT_LOCK = 0x46470003  # access events: ids committed in id order

# Each migration takes the schema from version i to i + 1, in one transaction. Append;
# never edit.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE store_meta (
            key   text PRIMARY KEY,
            value text NOT NULL
        )""",
        "INSERT INTO store_meta VALUES ('store_id', replace(gen_random_uuid()::text, '-', ''))",
        """CREATE TABLE members (
            member_id    text COLLATE "C" PRIMARY KEY,
            display_name text NOT NULL,
            create_time  timestamptz NOT NULL,
            update_time  timestamptz NOT NULL,
            membership   jsonb NOT NULL DEFAULT '{}'
        )""",
        """CREATE TABLE faces (
            face_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            member_id         text NOT NULL REFERENCES members(member_id) ON DELETE CASCADE,
            embedding         bytea NOT NULL,
            photo             bytea,
            create_time       timestamptz NOT NULL,
            persisted_face_id text,
            quality           jsonb
        )""",
        "CREATE INDEX faces_by_member ON faces(member_id, face_id)",
        """CREATE TABLE access_events (
            event_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            time              timestamptz NOT NULL,
            turnstile_id      text NOT NULL,
            member_id         text NOT NULL,
            decision          text NOT NULL,
            engine            text NOT NULL,
            confidence        double precision NOT NULL,
            latency_us        bigint NOT NULL,
            reports           jsonb NOT NULL DEFAULT '[]',
            kind              text NOT NULL DEFAULT 'IDENTIFY',
            claimed_member_id text NOT NULL DEFAULT '',
            detail            text NOT NULL DEFAULT '',
            rule              text NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX events_by_member ON access_events(member_id, event_id)",
        "CREATE INDEX events_by_claimed ON access_events(claimed_member_id, event_id)",
        "CREATE INDEX events_by_time ON access_events(time)",
        "CREATE INDEX events_by_decision ON access_events(decision, event_id)",
        """CREATE TABLE cloud_persons (
            person_id   text PRIMARY KEY,
            member_id   text COLLATE "C" NOT NULL,
            deleted     boolean NOT NULL DEFAULT false,
            ready       boolean NOT NULL DEFAULT false,
            pending     boolean NOT NULL DEFAULT false,
            in_training boolean NOT NULL DEFAULT false
        )""",
        "CREATE INDEX cloud_persons_by_member ON cloud_persons(member_id)",
        """CREATE TABLE outbox (
            seq               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            kind              text NOT NULL
                              CHECK (kind IN ('add_face', 'delete_member', 'delete_face')),
            member_id         text NOT NULL,
            face_id           bigint,
            photo             bytea,
            attempts          integer NOT NULL DEFAULT 0,
            last_error        text NOT NULL DEFAULT '',
            parked            text NOT NULL DEFAULT '',
            persisted_face_id text
        )""",
        "CREATE INDEX outbox_by_member ON outbox(member_id)",
    ),
    (
        # The chain (store/chain.py): the ordered log of member changes every server
        # copies into its local gallery, and the origin of events decided offline (the
        # server's id and its own sequence), which makes shipping them idempotent.
        """CREATE TABLE member_changes (
            seq       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            member_id text NOT NULL,
            kind      text NOT NULL CHECK (kind IN
                      ('enrolled', 'photos_added', 'photo_removed', 'updated', 'deleted')),
            time      timestamptz NOT NULL DEFAULT now()
        )""",
        "ALTER TABLE access_events ADD COLUMN origin_server text",
        "ALTER TABLE access_events ADD COLUMN origin_seq bigint",
        "CREATE UNIQUE INDEX events_by_origin ON access_events(origin_server, origin_seq)",
    ),
    (
        # A version of cloud_persons, moved by every statement that writes it, in that
        # statement's transaction: the servers that do not hold the replay lease read this
        # one row, not every person, to know the holder changed them (cloud_people_version).
        "CREATE TABLE cloud_persons_version (version bigint NOT NULL)",
        "INSERT INTO cloud_persons_version VALUES (0)",
        # Its own search_path (FaceGate's schema, as the migration ran): it also runs in
        # sessions with another one (pg_dump's data-only restore sets an empty one).
        """CREATE FUNCTION cloud_persons_changed() RETURNS trigger LANGUAGE plpgsql
        SET search_path FROM CURRENT AS $$
        BEGIN
            UPDATE cloud_persons_version SET version = version + 1;
            RETURN NULL;
        END $$""",
        """CREATE TRIGGER cloud_persons_changed
            AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON cloud_persons
            FOR EACH STATEMENT EXECUTE FUNCTION cloud_persons_changed()""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
VERSION_MARK = "FaceGate schema version"
"""The comment on FaceGate's `schema_version` table: another application's is not it."""
VERSION_TABLE = (
    "CREATE TABLE schema_version (version integer NOT NULL)",
    f"COMMENT ON TABLE schema_version IS '{VERSION_MARK}'",
    "INSERT INTO schema_version VALUES (0)",
)
NOT_FACEGATES = (
    "it is not FaceGate's database; give FaceGate a database of its own"
    " (createdb -O ROLE DATABASE) and name it in --store (FACEGATE_STORE)"
)


class StoreSchemaError(RuntimeError):
    """The database cannot hold FaceGate's schema: another application's, a newer
    FaceGate's, or out of the role's rights. Waiting will not mend it (one line)."""


def _first_line(error: BaseException) -> str:
    return " ".join(str(error).strip().splitlines()[0].split()) if str(error).strip() else ""


def _name(conn: psycopg.Connection[Any]) -> str:
    info = conn.info
    return f"postgresql://{info.host}:{info.port}/{info.dbname}"


def _some(names: Sequence[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _legacy_id(conn: psycopg.Connection[Any]) -> str | None:
    """The store_id of a FaceGate database made before the mark, else None."""
    try:
        with conn.transaction():  # a savepoint
            row = conn.execute("SELECT value FROM store_meta WHERE key = 'store_id'").fetchone()
    except (psycopg.ProgrammingError, psycopg.DataError):
        return None
    return None if row is None else str(row[0])


CONNECTION_DEFAULTS = {
    # A branch's link can die without a reset: notice within seconds, not TCP's minutes.
    "connect_timeout": "3",
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "2",
    "tcp_user_timeout": "6000",
}
IDLE_IN_TRANSACTION_S = 10
"""A FaceGate session idle inside a transaction this long is ended by PostgreSQL: a branch
cut off mid-transaction must not hold the change log's or the event log's lock (every
server's writes wait on it) until the server's TCP keepalive notices, hours later."""
_POOL_NAMES = itertools.count(1)
CALL_TIMEOUT_S = 60.0
"""The longest one call may take before its connection is cut (`Watchdog`): TCP's own
timeouts catch a link that stops acknowledging, not a peer that acknowledges and never
answers (a frozen database, a proxy whose upstream died). Generous: a call moving an
enrolment's photos over a slow WAN must finish."""
FOLLOWER_CALL_TIMEOUT_S = 10.0
"""The same for the chain's follower (store/chain.py), whose calls are small (the change
log, members' embeddings, a batch of events): a frozen database is noticed within it."""
CALL_TIMEOUT: ContextVar[float | None] = ContextVar("facegate_call_timeout", default=None)
"""This thread's own call timeout, when set (the follower's); else the store's."""


class Watchdog:
    """Cuts a connection whose call has outlasted its time: its socket is shut down, so the
    call waiting on it fails at once (psycopg's OperationalError: StoreUnavailable) and the
    pool discards it. One thread for every guarded call, started on first use."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, list[Any]]] = []  # (deadline, n, [conn or None])
        self._n = itertools.count()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None

    @contextmanager
    def guard(self, conn: psycopg.Connection[Any], seconds: float) -> Iterator[None]:
        watched: list[Any] = [conn]
        with self._lock:
            heapq.heappush(self._due, (time.monotonic() + seconds, next(self._n), watched))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="store-watchdog", daemon=True
                )
                self._thread.start()
            self._lock.notify()
        try:
            yield
        finally:
            with self._lock:  # after this, never cut: the connection may serve another call
                watched[0] = None

    def _run(self) -> None:
        with self._lock:
            while True:
                while self._due and self._due[0][2][0] is None:
                    heapq.heappop(self._due)
                if not self._due:
                    self._lock.wait()
                    continue
                deadline, _, watched = self._due[0]
                left = deadline - time.monotonic()
                if left > 0:
                    self._lock.wait(left)
                    continue
                heapq.heappop(self._due)
                conn, watched[0] = watched[0], None
                _cut(conn)


def _cut(conn: psycopg.Connection[Any]) -> None:
    try:
        duplicate = socket.socket(fileno=os.dup(conn.pgconn.socket))
    except (OSError, psycopg.Error):  # closed already
        return
    log.warning("a PostgreSQL call outlasted its time: its connection is cut")
    try:
        duplicate.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        duplicate.close()


WATCHDOG = Watchdog()


def conninfo_with_defaults(url: str) -> str:
    """`url` with the connection parameters above where it does not set them."""
    given = psycopg.conninfo.conninfo_to_dict(url)
    return psycopg.conninfo.make_conninfo(
        url, **{k: v for k, v in CONNECTION_DEFAULTS.items() if k not in given}
    )


def describe(url: str) -> str:
    """The database as logs and errors may name it: host, port and name, no password."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql"
    host = parts.get("host") or "localhost"
    port = parts.get("port") or "5432"
    return f"postgresql://{host}:{port}/{parts.get('dbname') or ''}"


@dataclass(frozen=True)
class MemberChange:
    """One row of the change log."""

    seq: int
    member_id: str
    kind: str


@dataclass(frozen=True)
class StoredMember:
    """A member as the chain copies it: the row and every face, embeddings included."""

    member: Member
    faces: tuple[tuple[int, bytes, bytes | None, datetime, str | None], ...]
    """(face_id, embedding bytes, photo, create_time, quality JSON) in face order."""


class _QuietPool(logging.Filter):
    """On psycopg_pool's logger: its warning at every failed connection attempt of this
    store's pools becomes the store's one warning for the outage (PostgresStore
    _unreachable); the next connection made says it is over (_reachable)."""

    def __init__(self, store: PostgresStore) -> None:
        super().__init__()
        self.store = store
        self.names: set[str] = set()
        logging.getLogger("psycopg.pool").addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if record.levelno < logging.WARNING or not args or args[0] not in self.names:
            return True
        if str(record.msg).startswith("error connecting"):
            self.store._unreachable(str(args[-1]).strip().splitlines()[0] if args else "")
        return False

    def close(self) -> None:
        logging.getLogger("psycopg.pool").removeFilter(self)


def _scalar(cursor: psycopg.Cursor[Any]) -> Any:
    """The first column of the one row a query returns (an aggregate, RETURNING)."""
    row = cursor.fetchone()
    assert row is not None
    return row[0]


def _embedding(blob: bytes) -> Embedding:
    return np.frombuffer(blob, EMBEDDING_DTYPE).astype(np.float64)


class PostgresStore(Store):
    """The Store on PostgreSQL. `url` is a libpq URL or conninfo string; `pool_size` the
    most connections this server holds; `timeout` how long a call waits for one (then
    StoreUnavailable). With `migrate` false, call `migrate()` before any other method."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 8,
        timeout: float = 5.0,
        migrate: bool = True,
        call_timeout: float = CALL_TIMEOUT_S,
    ) -> None:
        self.url = conninfo_with_defaults(url)
        self.name = describe(url)
        self._timeout, self._pool_size = timeout, pool_size
        self.call_timeout = call_timeout
        self._reach_lock = threading.Lock()
        self._out_since: float | None = None  # when connecting first failed, in an outage
        self._quiet = _QuietPool(self)
        self._pool = self._new_pool()
        self._store_id = ""
        self._migrated = threading.Event()
        if migrate:
            try:
                self.migrate()
            except BaseException:
                self.close()
                raise

    def _new_pool(self) -> psycopg_pool.ConnectionPool[Any]:
        # No check of a connection when it is taken (a round trip on every call, 4 ms
        # measured on a loaded machine): a connection the database dropped fails its call
        # once (StoreUnavailable) and is discarded; the chain reopens the pool after an
        # outage (reopen).
        pool: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
            self.url,
            min_size=1,
            max_size=self._pool_size,
            kwargs={"autocommit": True},
            configure=self._configure,
            timeout=self._timeout,
            open=False,
            name=f"facegate-{next(_POOL_NAMES)}",
        )
        self._quiet.names.add(pool.name)
        pool.open(wait=False)
        return pool

    def reopen(self) -> None:
        """Start a fresh pool: after an outage the old one may be backing off its
        reconnections (for many seconds), though the database is back."""
        old, self._pool = self._pool, self._new_pool()
        old.close(timeout=0)
        self._quiet.names.discard(old.name)

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(
            "SET TIME ZONE 'UTC';"
            f" SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_S}s'"
        )
        self._reachable()

    # Reachability, said once each way: the pool retries a lost database with backoff and
    # would warn at every attempt (_QuietPool drops those).
    def _unreachable(self, error: str) -> None:
        with self._reach_lock:
            if self._out_since is not None:
                return
            self._out_since = time.monotonic()
        log.warning(
            "PostgreSQL unreachable; reconnecting quietly",
            extra={"store": self.name, "error": error},
        )

    def _reachable(self) -> None:
        with self._reach_lock:
            since, self._out_since = self._out_since, None
        if since is not None:
            out = time.monotonic() - since
            log.info(
                f"PostgreSQL reachable again after {out:.1f} s",
                extra={"store": self.name, "out_s": round(out, 1)},
            )

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; a lost or unreachable database is StoreUnavailable."""
        try:
            with (
                self._pool.connection(timeout=self._timeout) as conn,
                WATCHDOG.guard(conn, CALL_TIMEOUT.get() or self.call_timeout),
            ):
                yield conn
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as error:
            raise StoreUnavailable(self.name, str(error).strip().splitlines()[0]) from error

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[Any]]:
        with self._conn() as conn, conn.transaction():
            yield conn

    def migrate(self) -> None:
        """Bring the schema up to this FaceGate's version (idempotent, safe to race): every
        migration due in one transaction, so a refusal or a failure leaves nothing behind.
        Raises StoreSchemaError for a database that is not FaceGate's, a schema newer than
        this FaceGate's, or a role that may not create FaceGate's tables."""
        with self._conn() as conn:
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                    version = self._version(conn)
                    if version > SCHEMA_VERSION:
                        raise StoreSchemaError(
                            f"{self.name}: the database's schema version {version} is newer"
                            f" than this FaceGate's ({SCHEMA_VERSION}): upgrade FaceGate"
                        )
                    if version == 0:
                        conn.execute("DROP TABLE IF EXISTS schema_version")  # FaceGate's, empty
                        for statement in VERSION_TABLE:
                            conn.execute(statement.encode())
                    for number in range(version, SCHEMA_VERSION):
                        for statement in MIGRATIONS[number]:
                            conn.execute(statement.encode())
                    if version < SCHEMA_VERSION:
                        conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))
                    self._store_id = str(
                        _scalar(conn.execute("SELECT value FROM store_meta WHERE key = 'store_id'"))
                    )
            except psycopg.errors.InsufficientPrivilege as error:
                raise StoreSchemaError(
                    f"{self.name}: {_first_line(error)}: FaceGate's role needs a database it"
                    " may create tables in: create one owned by it (createdb -O ROLE DATABASE),"
                    " or GRANT CREATE ON SCHEMA public TO ROLE"
                ) from None
            except (psycopg.errors.DuplicateTable, psycopg.errors.DuplicateObject) as error:
                raise StoreSchemaError(
                    f"{self.name}: {_first_line(error)}: {NOT_FACEGATES}"
                ) from None
            except psycopg.errors.InvalidSchemaName as error:  # no schema to create in
                raise StoreSchemaError(f"{self.name}: {_first_line(error)}") from None
        self._migrated.set()

    @staticmethod
    def _version(conn: psycopg.Connection[Any]) -> int:
        """The schema version of the database FaceGate is connected to, in the migration's
        transaction: 0 when it holds nothing of FaceGate's yet. StoreSchemaError when it
        holds another application's tables: a `schema_version` table without FaceGate's
        mark, or tables and no FaceGate version at all."""
        tables = {
            str(row[0])
            for row in conn.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm', 'f')"
                # an extension's (pg_stat_statements' views, PostGIS' table) are nobody's data
                " AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass"
                " AND d.objid = c.oid AND d.deptype = 'e')"
            )
        }
        theirs = sorted(
            t for t in tables if t != "schema_version" and not t.startswith("facegate_")
        )
        if "schema_version" not in tables:
            if theirs:
                raise StoreSchemaError(
                    f"the database {_name(conn)} holds tables ({_some(theirs)}) but no FaceGate"
                    f" schema version: {NOT_FACEGATES}"
                )
            return 0
        marked = _scalar(
            conn.execute("SELECT obj_description('schema_version'::regclass, 'pg_class')")
        )
        try:
            with conn.transaction():  # a savepoint: another application's table may differ
                rows = conn.execute("SELECT version FROM schema_version").fetchall()
        except (psycopg.ProgrammingError, psycopg.DataError):
            rows = []
        version = rows[0][0] if len(rows) == 1 else None
        if not isinstance(version, int):
            version = None
        if version is not None and marked != VERSION_MARK and version > 0:
            # FaceGate's before the mark: recognised by its identity row.
            if "store_meta" not in tables or _legacy_id(conn) is None:
                version = None
        elif version is not None and marked != VERSION_MARK and theirs:
            version = None  # a 0 left by an older FaceGate's failed start, among others' tables
        if version is None:
            raise StoreSchemaError(
                f"the database {_name(conn)} has a schema_version table that is not FaceGate's"
                f" (tables: {_some(theirs)}): {NOT_FACEGATES}"
            )
        return version

    def schema_version(self) -> int:
        with self._conn() as conn:
            row: Any = conn.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0])

    # The change log.
    @staticmethod
    def _changed(conn: psycopg.Connection[Any], member_id: str, kind: str) -> None:
        """Log a member change in the caller's transaction, and wake the followers at its
        commit. The advisory lock (held to the commit) keeps seqs committed in order."""
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CHANGE_LOCK,))
        row: Any = conn.execute(
            "INSERT INTO member_changes (member_id, kind) VALUES (%s, %s) RETURNING seq",
            (member_id, kind),
        ).fetchone()
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(row[0])))

    def changes_after(self, seq: int, limit: int) -> list[MemberChange]:
        """Up to `limit` changes after `seq`, oldest first."""
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT seq, member_id, kind FROM member_changes WHERE seq > %s"
                " ORDER BY seq LIMIT %s",
                (seq, limit),
            ).fetchall()
        return [MemberChange(int(r[0]), str(r[1]), str(r[2])) for r in rows]

    def members_changed_as(self, seq: int, kinds: Sequence[str]) -> list[str]:
        """The members with a change of one of `kinds` logged after `seq`."""
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT DISTINCT member_id FROM member_changes WHERE seq > %s AND kind = ANY(%s)",
                (seq, list(kinds)),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def last_change(self) -> int:
        with self._conn() as conn:
            row: Any = conn.execute("SELECT coalesce(max(seq), 0) FROM member_changes").fetchone()
        return int(row[0])

    def stored_members(self, member_ids: Sequence[str] | None) -> dict[str, StoredMember]:
        """The members named (every member, with None) as they are now, faces included."""
        where, params = (
            ("", ())
            if member_ids is None
            else (
                " WHERE m.member_id = ANY(%s)",
                (list(member_ids),),
            )
        )
        with self._conn() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            members = conn.execute(self._MEMBER_SQL + where, params).fetchall()
            faces = conn.execute(
                "SELECT f.member_id, f.face_id, f.embedding, f.photo, f.create_time,"
                " f.quality::text FROM faces f"
                + where.replace("m.member_id", "f.member_id")
                + " ORDER BY f.face_id",
                params,
            ).fetchall()
        by_member: dict[str, list[Any]] = {}
        for r in faces:
            by_member.setdefault(r[0], []).append(
                (int(r[1]), bytes(r[2]), None if r[3] is None else bytes(r[3]), r[4], r[5])
            )
        return {
            r[0]: StoredMember(self._member(r), tuple(by_member.get(r[0], ()))) for r in members
        }

    def snapshot(self) -> tuple[int, dict[str, StoredMember]]:
        """The last change's seq and every member, read at one instant."""
        with self._conn() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (_CHANGE_LOCK,))
            seq = _scalar(conn.execute("SELECT coalesce(max(seq), 0) FROM member_changes"))
        # The shared lock waited out writers in flight; a later change is logged after seq
        # and applied on top (applying is idempotent: it copies the member as it is then).
        return int(seq), self.stored_members(None)

    # Members.
    def _insert_faces(
        self,
        conn: psycopg.Connection[Any],
        member_id: str,
        templates: Sequence[FaceTemplate],
        now: datetime,
    ) -> None:
        for t in templates:
            row: Any = conn.execute(
                "INSERT INTO faces (member_id, embedding, photo, create_time, quality)"
                " VALUES (%s, %s, %s, %s, %s::jsonb) RETURNING face_id",
                (
                    member_id,
                    np.asarray(embedding_of(t), EMBEDDING_DTYPE).tobytes(),
                    t.photo,
                    now,
                    quality_json(t.quality),
                ),
            ).fetchone()
            if t.cloud_photo is not None:
                conn.execute(
                    "INSERT INTO outbox (kind, member_id, face_id, photo)"
                    " VALUES ('add_face', %s, %s, %s)",
                    (member_id, row[0], t.cloud_photo),
                )

    def create_member(
        self,
        member_id: str,
        display_name: str,
        templates: Sequence[FaceTemplate],
        now: datetime,
        membership: Membership | None = None,
    ) -> Member:
        with self._transaction() as conn:
            try:
                with conn.transaction():
                    conn.execute(
                        "INSERT INTO members (member_id, display_name, create_time,"
                        " update_time, membership) VALUES (%s, %s, %s, %s, %s::jsonb)",
                        (
                            member_id,
                            display_name,
                            now,
                            now,
                            membership_json(membership or Membership()),
                        ),
                    )
            except psycopg.errors.UniqueViolation:
                raise MemberAlreadyExists(member_id) from None
            self._insert_faces(conn, member_id, templates, now)
            self._changed(conn, member_id, "enrolled")
            return self._get(conn, member_id)

    def add_templates(
        self, member_id: str, templates: Sequence[FaceTemplate], now: datetime
    ) -> Member:
        with self._transaction() as conn:
            updated = conn.execute(
                "UPDATE members SET update_time = %s WHERE member_id = %s", (now, member_id)
            )
            if updated.rowcount == 0:
                raise MemberNotFound(member_id)
            self._insert_faces(conn, member_id, templates, now)
            self._changed(conn, member_id, "photos_added")
            return self._get(conn, member_id)

    def update_member(
        self, member_id: str, display_name: str, membership: Membership, now: datetime
    ) -> Member:
        with self._transaction() as conn:
            updated = conn.execute(
                "UPDATE members SET display_name = %s, membership = %s::jsonb,"
                " update_time = %s WHERE member_id = %s",
                (display_name, membership_json(membership), now, member_id),
            )
            if updated.rowcount == 0:
                raise MemberNotFound(member_id)
            self._changed(conn, member_id, "updated")
            return self._get(conn, member_id)

    def update_member_with(
        self,
        member_id: str,
        change: Callable[[Member], tuple[str, Membership]],
        now: datetime,
    ) -> Member:
        """Read the member, `change` it (its new display name and membership), write it
        back: in one transaction, the row locked from the read to the commit, so that two
        servers changing different fields of one member at once both have their way."""
        with self._transaction() as conn:
            row = conn.execute(
                self._MEMBER_SQL + " WHERE m.member_id = %s FOR UPDATE OF m", (member_id,)
            ).fetchone()
            if row is None:
                raise MemberNotFound(member_id)
            display_name, membership = change(self._member(row))
            conn.execute(
                "UPDATE members SET display_name = %s, membership = %s::jsonb,"
                " update_time = %s WHERE member_id = %s",
                (display_name, membership_json(membership), now, member_id),
            )
            self._changed(conn, member_id, "updated")
            return self._get(conn, member_id)

    def photos(self, member_id: str, *, with_bytes: bool = False) -> list[MemberPhoto]:
        photo = "photo" if with_bytes else "NULL::bytea"
        with self._conn() as conn:
            self._get(conn, member_id)
            rows = conn.execute(
                f"SELECT face_id, create_time, quality::text, {photo} FROM faces"
                " WHERE member_id = %s ORDER BY face_id",
                (member_id,),
            ).fetchall()
        return [
            MemberPhoto(
                int(r[0]), r[1], quality_from_json(r[2]), None if r[3] is None else bytes(r[3])
            )
            for r in rows
        ]

    def remove_photo(
        self, member_id: str, photo_id: int, now: datetime, *, cloud: bool = False
    ) -> tuple[Member, FaceTemplate]:
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT 1 FROM members WHERE member_id = %s FOR UPDATE", (member_id,)
            ).fetchone()
            if row is None:
                raise MemberNotFound(member_id)
            row = conn.execute(
                "SELECT embedding, photo, quality::text, persisted_face_id FROM faces"
                " WHERE face_id = %s AND member_id = %s",
                (photo_id, member_id),
            ).fetchone()
            if row is None:
                raise PhotoNotFound(member_id, photo_id)
            count = _scalar(
                conn.execute("SELECT COUNT(*) FROM faces WHERE member_id = %s", (member_id,))
            )
            if count == 1:
                raise LastPhoto(member_id)
            tried = _scalar(
                conn.execute(
                    "SELECT COUNT(*) FROM outbox WHERE kind = 'add_face' AND face_id = %s"
                    " AND attempts > 0",
                    (photo_id,),
                )
            )
            conn.execute("DELETE FROM outbox WHERE kind = 'add_face' AND face_id = %s", (photo_id,))
            conn.execute("DELETE FROM faces WHERE face_id = %s", (photo_id,))
            if cloud and (row[3] is not None or tried):
                conn.execute(
                    "INSERT INTO outbox (kind, member_id, face_id, persisted_face_id)"
                    " VALUES ('delete_face', %s, %s, %s)",
                    (member_id, photo_id, row[3]),
                )
            conn.execute(
                "UPDATE members SET update_time = %s WHERE member_id = %s", (now, member_id)
            )
            self._changed(conn, member_id, "photo_removed")
            member = self._get(conn, member_id)
        removed = FaceTemplate(
            _embedding(bytes(row[0])),
            photo=None if row[1] is None else bytes(row[1]),
            quality=quality_from_json(row[2]),
        )
        return member, removed

    _MEMBER_SQL = """SELECT m.member_id, m.display_name,
        (SELECT COUNT(*) FROM faces f WHERE f.member_id = m.member_id), m.create_time,
        m.update_time, m.membership::text
        FROM members m"""

    @staticmethod
    def _member(row: Any) -> Member:
        return Member(
            row[0],
            row[1],
            int(row[2]),
            row[3],
            row[4],
            membership=membership_from_json(row[5]),
        )

    def _get(self, conn: psycopg.Connection[Any], member_id: str) -> Member:
        row = conn.execute(self._MEMBER_SQL + " WHERE m.member_id = %s", (member_id,)).fetchone()
        if row is None:
            raise MemberNotFound(member_id)
        return self._member(row)

    def get_member(self, member_id: str) -> Member:
        with self._conn() as conn:
            return self._get(conn, member_id)

    def list_members(self, limit: int, after: str = "") -> list[Member]:
        with self._conn() as conn:
            rows = conn.execute(
                self._MEMBER_SQL + " WHERE m.member_id > %s ORDER BY m.member_id LIMIT %s",
                (after, limit),
            ).fetchall()
        return [self._member(r) for r in rows]

    def count_members(self) -> int:
        with self._conn() as conn:
            count = _scalar(conn.execute("SELECT COUNT(*) FROM members"))
        return int(count)

    def delete_member(self, member_id: str, *, cloud: bool = False) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM faces WHERE member_id = %s", (member_id,))
            deleted = conn.execute("DELETE FROM members WHERE member_id = %s", (member_id,))
            if deleted.rowcount == 0:
                raise MemberNotFound(member_id)
            conn.execute(
                "DELETE FROM outbox WHERE member_id = %s AND kind = 'add_face'", (member_id,)
            )
            if cloud:
                conn.execute(
                    "UPDATE cloud_persons SET deleted = true WHERE member_id = %s", (member_id,)
                )
                conn.execute(
                    "INSERT INTO outbox (kind, member_id) VALUES ('delete_member', %s)",
                    (member_id,),
                )
            self._changed(conn, member_id, "deleted")

    def iter_embeddings(self) -> Iterator[tuple[str, Embedding]]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT member_id, embedding FROM faces ORDER BY face_id"
            ).fetchall()
        for member_id, blob in rows:
            yield member_id, _embedding(bytes(blob))

    # The access log.
    _INSERT_EVENT = (
        "INSERT INTO access_events (time, turnstile_id, member_id, decision, engine,"
        " confidence, latency_us, reports, kind, claimed_member_id, detail, rule,"
        " origin_server, origin_seq)"
        " SELECT %s::timestamptz, %s::text, %s::text, %s::text, %s::text, %s::float8,"
        " %s::bigint, %s::jsonb, %s::text, %s::text, %s::text, %s::text, %s::text, %s::bigint"
        # Ids become visible in their order (WatchAccessEvents resumes after the last id a
        # follower saw): the id is drawn under a lock held to the commit, so an event can
        # never commit after one with a higher id. One statement: no extra round trip.
        f" FROM (SELECT pg_advisory_xact_lock({_EVENT_LOCK})) AS in_id_order"
    )

    @staticmethod
    def _event_row(event: NewAccessEvent, origin: tuple[str, int] | None) -> tuple[Any, ...]:
        return (
            event.time,
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
            None if origin is None else origin[0],
            None if origin is None else origin[1],
        )

    def record_event(self, event: NewAccessEvent) -> AccessEvent:
        return self.record_event_from(event, None)

    def record_event_from(
        self, event: NewAccessEvent, origin: tuple[str, int] | None
    ) -> AccessEvent:
        """Append an event, with its origin (server id, local seq) when it has one."""
        with self._conn() as conn:
            row: Any = conn.execute(
                self._INSERT_EVENT + " RETURNING event_id",
                self._event_row(event, origin),
                # Never prepared: preparing is a round trip of its own (on a connection's
                # fifth event, by default), one more that a slow link could hold.
                prepare=False,
            ).fetchone()
        return event.stored(int(row[0]))

    def ship_events(self, origin: str, events: Sequence[tuple[int, NewAccessEvent]]) -> int:
        """Insert events decided at server `origin`, each with its local seq, in order and
        in one transaction; one already there (same origin and seq) is not inserted again.
        How many were new."""
        if not events:
            return 0
        rows = [self._event_row(event, (origin, seq)) for seq, event in events]
        columns = [list(column) for column in zip(*rows, strict=True)]
        with self._conn() as conn:
            # One statement: the event lock is never held across a round trip (a branch
            # shipping over a slow link would hold every other server's events).
            return conn.execute(self._SHIP_EVENTS, columns).rowcount

    _SHIP_EVENTS = (
        "INSERT INTO access_events (time, turnstile_id, member_id, decision, engine,"
        " confidence, latency_us, reports, kind, claimed_member_id, detail, rule,"
        " origin_server, origin_seq)"
        " SELECT e.time, e.turnstile_id, e.member_id, e.decision, e.engine, e.confidence,"
        " e.latency_us, e.reports::jsonb, e.kind, e.claimed_member_id, e.detail, e.rule,"
        " e.origin_server, e.origin_seq"
        f" FROM (SELECT pg_advisory_xact_lock({_EVENT_LOCK})) AS in_id_order,"
        " unnest(%s::timestamptz[], %s::text[], %s::text[], %s::text[], %s::text[],"
        " %s::float8[], %s::bigint[], %s::text[], %s::text[], %s::text[], %s::text[],"
        " %s::text[], %s::text[], %s::bigint[]) WITH ORDINALITY AS e(time, turnstile_id,"
        " member_id, decision, engine, confidence, latency_us, reports, kind,"
        " claimed_member_id, detail, rule, origin_server, origin_seq, n)"
        " ORDER BY e.n"  # ids in the order the events were decided
        " ON CONFLICT (origin_server, origin_seq) DO NOTHING"
    )

    def shipped_through(self, origin: str) -> int:
        """The highest local seq of `origin`'s events already in the log (0: none)."""
        with self._conn() as conn:
            row: Any = conn.execute(
                "SELECT coalesce(max(origin_seq), 0) FROM access_events WHERE origin_server = %s",
                (origin,),
            ).fetchone()
        return int(row[0])

    _EVENT_SQL = (
        "SELECT event_id, time, turnstile_id, member_id, decision, engine, confidence,"
        " latency_us, reports::text, kind, claimed_member_id, detail, rule FROM access_events"
    )

    @staticmethod
    def _where(where: EventFilter) -> tuple[list[sql.Composable], list[Any]]:
        clauses: list[sql.Composable] = []
        params: list[Any] = []
        if where.member_id:
            clauses.append(sql.SQL("(member_id = %s OR claimed_member_id = %s)"))
            params.extend([where.member_id, where.member_id])
        if where.turnstile_id:
            clauses.append(sql.SQL("turnstile_id = %s"))
            params.append(where.turnstile_id)
        if where.start_time is not None:
            clauses.append(sql.SQL("time >= %s"))
            params.append(where.start_time)
        if where.end_time is not None:
            clauses.append(sql.SQL("time < %s"))
            params.append(where.end_time)
        if where.decisions:
            clauses.append(sql.SQL("decision = ANY(%s)"))
            params.append([d.value for d in where.decisions])
        if where.rule is not None:
            clauses.append(sql.SQL("rule = %s"))
            params.append(where.rule.value)
        return clauses, params

    def _events(
        self, clauses: list[sql.Composable], params: list[Any], order: str, limit: int
    ) -> list[AccessEvent]:
        query: sql.Composable = sql.SQL(self._EVENT_SQL)
        if clauses:
            query = query + sql.SQL(" WHERE ") + sql.SQL(" AND ").join(clauses)
        query = query + sql.SQL(f" ORDER BY event_id {order} LIMIT %s")
        with self._conn() as conn:
            rows = conn.execute(query, (*params, limit)).fetchall()
        return [
            AccessEvent(
                event_id=int(r[0]),
                time=r[1],
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

    def list_events(
        self, where: EventFilter, limit: int, before_id: int | None = None
    ) -> list[AccessEvent]:
        clauses, params = self._where(where)
        if before_id is not None:
            clauses.insert(0, sql.SQL("event_id < %s"))
            params.insert(0, before_id)
        return self._events(clauses, params, "DESC", limit)

    def events_after(self, after_id: int, where: EventFilter, limit: int) -> list[AccessEvent]:
        """Up to `limit` events matching `where` with ids above `after_id`, oldest first."""
        clauses, params = self._where(where)
        clauses.insert(0, sql.SQL("event_id > %s"))
        params.insert(0, after_id)
        return self._events(clauses, params, "ASC", limit)

    def delete_events_before(self, cutoff: datetime) -> int:
        """Delete the events older than `cutoff`; how many."""
        with self._conn() as conn:
            return conn.execute("DELETE FROM access_events WHERE time < %s", (cutoff,)).rowcount

    def oldest_event_at(self) -> datetime | None:
        with self._conn() as conn:
            row: Any = conn.execute("SELECT min(time) FROM access_events").fetchone()
        return None if row[0] is None else row[0].astimezone(UTC)

    def store_id(self) -> str:
        self._migrated.wait()
        return self._store_id

    # The outbox.
    _OUTBOX_SQL = (
        "SELECT seq, kind, member_id, face_id, photo, attempts, last_error, parked,"
        " persisted_face_id FROM outbox"
    )

    @staticmethod
    def _entry(row: Any) -> OutboxEntry:
        values = list(row)
        if values[4] is not None:
            values[4] = bytes(values[4])
        return OutboxEntry(*values)

    def outbox(self, limit: int) -> list[OutboxEntry]:
        with self._conn() as conn:
            rows = conn.execute(
                self._OUTBOX_SQL + " WHERE parked = '' ORDER BY seq LIMIT %s", (limit,)
            ).fetchall()
        return [self._entry(r) for r in rows]

    def outbox_depth(self) -> int:
        with self._conn() as conn:
            return int(_scalar(conn.execute("SELECT COUNT(*) FROM outbox WHERE parked = ''")))

    def outbox_members(self) -> set[str]:
        with self._conn() as conn:
            rows = conn.execute("SELECT DISTINCT member_id FROM outbox").fetchall()
        return {str(r[0]) for r in rows}

    def outbox_park(self, seq: int, reason: str) -> None:
        with self._conn() as conn:
            conn.execute(
                "UPDATE outbox SET parked = %s, last_error = %s WHERE seq = %s",
                (reason or "refused", reason, seq),
            )

    _ENTRY_SQL = (
        "SELECT seq, kind, member_id, face_id, NULL::bytea, attempts, last_error, parked"
        " FROM outbox"
    )

    def outbox_parked(self, limit: int) -> list[OutboxEntry]:
        with self._conn() as conn:
            rows = conn.execute(
                self._ENTRY_SQL + " WHERE parked != '' ORDER BY seq LIMIT %s", (limit,)
            ).fetchall()
        return [self._entry(r) for r in rows]

    def outbox_of(self, member_id: str) -> list[OutboxEntry]:
        with self._conn() as conn:
            rows = conn.execute(
                self._ENTRY_SQL + " WHERE member_id = %s ORDER BY seq", (member_id,)
            ).fetchall()
        return [self._entry(r) for r in rows]

    def outbox_parked_count(self) -> int:
        with self._conn() as conn:
            return int(_scalar(conn.execute("SELECT COUNT(*) FROM outbox WHERE parked != ''")))

    def outbox_unpark(self) -> int:
        with self._conn() as conn:
            return conn.execute(
                "UPDATE outbox SET parked = '', attempts = 0 WHERE parked != ''"
            ).rowcount

    def outbox_attempt(self, seq: int, error: str = "") -> None:
        with self._conn() as conn:
            if error:
                conn.execute("UPDATE outbox SET last_error = %s WHERE seq = %s", (error, seq))
            else:
                conn.execute("UPDATE outbox SET attempts = attempts + 1 WHERE seq = %s", (seq,))

    def outbox_done(self, seq: int) -> None:
        with self._conn() as conn:
            conn.execute("DELETE FROM outbox WHERE seq = %s", (seq,))

    # What FaceGate knows of the cloud.
    _PERSON_SQL = "SELECT member_id, person_id, ready, deleted FROM cloud_persons"

    def cloud_person(self, member_id: str) -> CloudPerson | None:
        with self._conn() as conn:
            row = conn.execute(
                self._PERSON_SQL + " WHERE member_id = %s AND NOT deleted", (member_id,)
            ).fetchone()
        return None if row is None else CloudPerson(*row)

    def cloud_people(self) -> list[CloudPerson]:
        with self._conn() as conn:
            rows = conn.execute(self._PERSON_SQL + " ORDER BY member_id").fetchall()
        return [CloudPerson(*r) for r in rows]

    def cloud_people_version(self) -> int | None:
        with self._conn() as conn:
            row = conn.execute("SELECT version FROM cloud_persons_version").fetchone()
        return None if row is None else int(row[0])

    def member_of_person(self, person_id: str) -> str | None:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT c.member_id FROM cloud_persons c JOIN members m USING (member_id)"
                " WHERE c.person_id = %s AND NOT c.deleted",
                (person_id,),
            ).fetchone()
        return None if row is None else str(row[0])

    def save_cloud_person(self, member_id: str, person_id: str) -> None:
        with self._conn() as conn:
            conn.execute(
                "INSERT INTO cloud_persons (person_id, member_id) VALUES (%s, %s)"
                " ON CONFLICT (person_id) DO UPDATE SET member_id = excluded.member_id,"
                " deleted = false, ready = false, pending = false, in_training = false",
                (person_id, member_id),
            )

    def forget_cloud_person(self, person_id: str) -> None:
        with self._conn() as conn:
            conn.execute("DELETE FROM cloud_persons WHERE person_id = %s", (person_id,))

    def save_cloud_face(self, face_id: int, persisted_face_id: str) -> None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE faces SET persisted_face_id = %s WHERE face_id = %s",
                (persisted_face_id, face_id),
            )
            conn.execute(
                "UPDATE cloud_persons SET pending = true WHERE NOT deleted AND member_id ="
                " (SELECT member_id FROM faces WHERE face_id = %s)",
                (face_id,),
            )

    def faces(self, member_id: str, *, photos: bool = True) -> list[StoredFace]:
        photo = "photo" if photos else "NULL::bytea"
        with self._conn() as conn:
            rows = conn.execute(
                f"SELECT face_id, member_id, {photo}, persisted_face_id, photo IS NOT NULL"
                " FROM faces WHERE member_id = %s ORDER BY face_id",
                (member_id,),
            ).fetchall()
        return [
            StoredFace(int(r[0]), r[1], None if r[2] is None else bytes(r[2]), r[3], bool(r[4]))
            for r in rows
        ]

    def face_photo(self, face_id: int) -> bytes | None:
        with self._conn() as conn:
            row = conn.execute("SELECT photo FROM faces WHERE face_id = %s", (face_id,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def training_queued(self) -> None:
        with self._conn() as conn:
            conn.execute(
                "UPDATE cloud_persons SET in_training = true, pending = false WHERE pending"
            )

    def training_succeeded(self) -> None:
        with self._conn() as conn:
            conn.execute(
                "UPDATE cloud_persons SET ready = true, in_training = false WHERE in_training"
            )

    def close(self) -> None:
        self._pool.close()
        self._quiet.close()
