"""One outbox replayer for a chain: a lease with an expiry and a fencing token.

Several FaceGate servers on one PostgreSQL share one outbox and one Azure group; exactly one
of them may replay the outbox to the cloud at a time. A session advisory lock would not do:
it is held for as long as its connection lives, and a holder that is stopped (SIGSTOP, a VM
paused) or cut off keeps it until TCP gives up, minutes later. Here the right to write is
a row with an expiry, renewed on a timer well inside it, and a token that grows on each
takeover:

- `acquire()` takes the lease when it has lapsed (or renews it when it is ours), in one
  statement timed by the database's clock (`now()`), never the servers': it answers the
  token, or None when another server holds it;
- `check(token)` (one round trip) before every cloud write: the row still carries our
  token and has at least `margin` seconds to run, so that a write begun now ends before
  the lease could pass to another server; a write after a failed check is not made;
- `release(token)` lets the next server take over at once (a clean stop).

Azure cannot check a token itself, so the fencing is "check, then write": a holder frozen
between its check and its write (a window of one statement) could still write once after
losing the lease; the replay is idempotent for that case (cloud/sync.py looks for the
member's person and the face's tag before creating them).

`LocalLease` is the single-server default (SQLite): always held, token 1, no database.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

REPLAYER = "cloud-replayer"
"""The lease's name for the outbox replayer (one row per lease in facegate_lease)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS facegate_lease (
    name text PRIMARY KEY,
    holder text NOT NULL,
    token bigint NOT NULL,
    expires_at timestamptz NOT NULL
)
"""

_ACQUIRE = """
INSERT INTO facegate_lease AS l (name, holder, token, expires_at)
VALUES (%(name)s, %(holder)s, 1, now() + make_interval(secs => %(ttl)s))
ON CONFLICT (name) DO UPDATE SET
    holder = excluded.holder,
    token = CASE WHEN l.holder = excluded.holder THEN l.token ELSE l.token + 1 END,
    expires_at = excluded.expires_at
WHERE l.holder = excluded.holder OR l.expires_at < now()
RETURNING token
"""

_CHECK = """
SELECT 1 FROM facegate_lease
WHERE name = %(name)s AND holder = %(holder)s AND token = %(token)s
  AND expires_at > now() + make_interval(secs => %(margin)s)
"""

_RELEASE = """
UPDATE facegate_lease SET expires_at = now() - interval '1 microsecond'
WHERE name = %(name)s AND holder = %(holder)s AND token = %(token)s
"""


def ensure_schema(conn: Any) -> None:
    """Create the lease table if it is not there (idempotent; a psycopg 3 connection, in a
    transaction of its own or, within the caller's, a savepoint). The PostgreSQL store's
    migrations call it; a `PostgresLease` calls it on first use."""
    with conn.transaction():
        # Servers starting together would race CREATE TABLE IF NOT EXISTS (a unique
        # violation in pg_type): one at a time.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('facegate_lease'))")
        conn.execute(SCHEMA)


def holder_name() -> str:
    """This process's name as a holder: host, pid and a random part (a restarted server is
    a new holder, so it takes over with a new token)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease(Protocol):
    name: str
    holder: str
    ttl: float
    answered: bool
    """Whether the database answered the last call (an acquire's None is then another's
    lease, else nobody knows whose)."""

    def acquire(self) -> int | None:
        """Take the lease, or renew it when it is ours: the token, or None (another holds it)."""
        ...

    def check(self, token: int) -> bool:
        """True when the lease is still ours with `token`: made before every cloud write."""
        ...

    def release(self, token: int) -> None:
        """Give the lease up (a clean stop), so another server takes over at once."""
        ...

    def close(self) -> None: ...


class LocalLease:
    """One server alone (SQLite): the lease is always held, with token 1."""

    ttl = 0.0

    def __init__(self, name: str = REPLAYER) -> None:
        self.name = name
        self.holder = "local"
        self.answered = True

    def acquire(self) -> int | None:
        return 1

    def check(self, token: int) -> bool:
        return True

    def release(self, token: int) -> None:
        pass

    def close(self) -> None:
        pass


class PostgresLease:
    """The lease as a row of `facegate_lease` in PostgreSQL (psycopg 3, a small pool).

    `ttl`: how long a holder that stops renewing keeps the lease (takeover comes within
    `ttl` plus one renewal period of the next server). `margin`: the time a check wants
    left on the lease (longer than a cloud write can take). Any database error counts as
    "not held": a holder cut off from PostgreSQL stops writing."""

    def __init__(
        self,
        url: str,
        *,
        name: str = REPLAYER,
        holder: str | None = None,
        ttl: float = 15.0,
        margin: float = 0.0,
        connect_timeout: float = 3.0,
    ) -> None:
        from psycopg_pool import ConnectionPool

        if margin >= ttl:
            raise ValueError(f"the lease's margin ({margin} s) must be below its ttl ({ttl} s)")
        self.name = name
        self.holder = holder or holder_name()
        self.ttl = ttl
        self.margin = margin
        timeout_ms = max(1000, int(connect_timeout * 1000))
        self._call_timeout = 2 * timeout_ms / 1000
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=2,
            open=False,
            timeout=connect_timeout,
            kwargs={
                "autocommit": True,
                "connect_timeout": max(1, round(connect_timeout)),
                # A statement the server or the network does not answer fails in time:
                # a holder must not wait on a dead link past its own lease.
                "options": f"-c statement_timeout={timeout_ms}",
                "tcp_user_timeout": timeout_ms,
                "keepalives_idle": 5,
                "keepalives_interval": 2,
                "keepalives_count": 2,
                "application_name": "facegate-lease",
            },
        )
        self._pool.open(wait=False)
        self._schema = False
        self.answered = True

    def _run(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]] | None:
        """The statement's rows (none for a statement that returns none, as release's
        UPDATE); None when the database could not answer."""
        import psycopg
        import psycopg_pool

        from facegate_server.store.postgres import WATCHDOG

        try:
            # A peer that acknowledges and never answers (a frozen database) fails it too.
            with self._pool.connection() as conn, WATCHDOG.guard(conn, self._call_timeout):
                if not self._schema:
                    ensure_schema(conn)
                    self._schema = True
                cursor = conn.execute(sql, params)
                # fetchall() raises on a statement without a result (release's UPDATE):
                # that is no failure of the database.
                rows = cursor.fetchall() if cursor.description is not None else []
            self.answered = True
            return rows
        except (psycopg.Error, psycopg_pool.PoolTimeout) as error:
            self.answered = False
            log.warning(
                "lease: the database did not answer",
                extra={"lease": self.name, "error": str(error).strip()[:200]},
            )
            return None

    def acquire(self) -> int | None:
        rows = self._run(_ACQUIRE, {"name": self.name, "holder": self.holder, "ttl": self.ttl})
        return int(rows[0][0]) if rows else None

    def check(self, token: int) -> bool:
        rows = self._run(
            _CHECK,
            {"name": self.name, "holder": self.holder, "token": token, "margin": self.margin},
        )
        return bool(rows)

    def release(self, token: int) -> None:
        self._run(_RELEASE, {"name": self.name, "holder": self.holder, "token": token})

    def close(self) -> None:
        self._pool.close()


class LeaseKeeper:
    """Renews a lease on a timer (every third of its ttl by default), apart from the
    replayer's own ticks, which a slow cloud call can hold up for seconds. `token` is the
    last answer: None while another server holds the lease."""

    def __init__(
        self,
        lease: Lease,
        every: float | None = None,
        on_change: Callable[[int | None], None] | None = None,
    ) -> None:
        self.lease = lease
        self.every = every if every is not None else max(0.05, lease.ttl / 3)
        self._on_change = on_change
        self._lock = threading.Lock()
        self._token: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> int | None:
        with self._lock:
            return self._token

    def renew(self) -> int | None:
        """One acquire-or-renew now; the token."""
        token = self.lease.acquire()
        with self._lock:
            before, self._token = self._token, token
        if token != before:
            if token is None:
                log.warning("cloud replayer lease lost", extra={"lease": self.lease.name})
            else:
                log.info(
                    "cloud replayer lease taken",
                    extra={"lease": self.lease.name, "holder": self.lease.holder, "token": token},
                )
            if self._on_change is not None:
                self._on_change(token)
        return token

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lease", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.renew()
            except Exception:  # keep renewing whatever happened
                log.exception("lease renewal failed")
            self._stop.wait(self.every)

    def stop(self, *, release: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        token = self.token
        if release and token is not None:
            self.lease.release(token)
        with self._lock:
            self._token = None
