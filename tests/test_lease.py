"""The cloud replayer's lease (cloud/lease.py) on the real PostgreSQL: one holder at a time,
takeover with a larger token when the holder stops renewing, and the old holder's checks
failing afterwards (fencing)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from facegate_server.cloud.lease import LeaseKeeper, LocalLease, PostgresLease, ensure_schema

from tests.cloud import wait_for
from tests.pg import database


@pytest.fixture
def db() -> Iterator[str]:
    with database() as url:
        yield url


def lease(url: str, holder: str, ttl: float = 2.0, **options: float) -> PostgresLease:
    return PostgresLease(url, holder=holder, ttl=ttl, **options)


def test_one_holder_at_a_time(db: str) -> None:
    a, b = lease(db, "a"), lease(db, "b")
    try:
        token = a.acquire()
        assert token == 1
        assert b.acquire() is None  # a holds it
        assert a.acquire() == token  # a renewal keeps the token
        assert a.check(token)
        assert not b.check(token)  # the token is a's, not b's
        assert not a.check(token + 1)
    finally:
        a.close()
        b.close()


def test_a_holder_that_stops_renewing_is_taken_over_and_fenced(db: str) -> None:
    a, b = lease(db, "a", ttl=1.0), lease(db, "b", ttl=1.0)
    try:
        first = a.acquire()
        assert first is not None and b.acquire() is None
        # a stops renewing (as if stopped); b asks on its timer and gets it within seconds.
        started = time.monotonic()
        wait_for(lambda: b.acquire() is not None, timeout=10)
        taken = time.monotonic() - started
        second = b.acquire()
        assert second is not None and second > first
        assert taken >= 0.5  # not before a's lease ran out (1 s, measured by the database)
        assert not a.check(first)  # a's writes are refused from now on
        assert a.acquire() is None  # and a cannot take it back while b renews
        assert b.check(second)
    finally:
        a.close()
        b.close()


def test_release_hands_over_at_once(db: str, caplog: pytest.LogCaptureFixture) -> None:
    a, b = lease(db, "a", ttl=30.0), lease(db, "b", ttl=30.0)
    try:
        token = a.acquire()
        assert token is not None and b.acquire() is None
        with caplog.at_level(logging.WARNING, logger="facegate_server.cloud.lease"):
            a.release(token)
        # Its UPDATE returns no rows: no warning that the database did not answer (a clean
        # stop logged one, "the last operation didn't produce records").
        assert not caplog.records, [r.getMessage() for r in caplog.records]
        assert not a.check(token)
        assert b.acquire() == token + 1
    finally:
        a.close()
        b.close()


def test_a_check_wants_the_margin_left(db: str) -> None:
    """A write begun after a check must end before the lease could pass on."""
    a = lease(db, "a", ttl=2.0, margin=1.5)
    try:
        token = a.acquire()
        assert token is not None and a.check(token)
        wait_for(lambda: not a.check(token), timeout=10)  # less than 1.5 s left: refused
        assert a.acquire() == token and a.check(token)  # renewed: allowed again
    finally:
        a.close()


def test_ensure_schema_is_idempotent(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        ensure_schema(conn)
        ensure_schema(conn)
        columns = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_name = 'facegate_lease' ORDER BY ordinal_position"
        ).fetchall()
    assert columns == [
        ("name", "text"),
        ("holder", "text"),
        ("token", "bigint"),
        ("expires_at", "timestamp with time zone"),
    ]


def test_an_unreachable_database_is_not_held() -> None:
    with socket_closed() as port:
        cut = PostgresLease(
            f"postgresql://postgres@127.0.0.1:{port}/x", holder="a", connect_timeout=1.0
        )
        try:
            assert cut.acquire() is None
            assert not cut.check(1)
        finally:
            cut.close()


def test_the_local_lease_is_always_held() -> None:
    local = LocalLease()
    token = local.acquire()
    assert token == 1 and local.check(token)


def test_the_keeper_renews_on_its_timer(db: str) -> None:
    a, b = lease(db, "a", ttl=1.0), lease(db, "b", ttl=1.0)
    keeper = LeaseKeeper(a, every=0.2)
    keeper.start()
    try:
        wait_for(lambda: keeper.token is not None)
        time.sleep(2.5)  # past the ttl twice over: still a's, renewed
        assert b.acquire() is None
        assert keeper.token == 1
    finally:
        keeper.stop(release=True)
        a.close()
    assert b.acquire() == 2  # released on stop: b at once
    b.close()


HOLDER = textwrap.dedent(
    """
    import sys, time
    from facegate_server.cloud.lease import PostgresLease
    lease = PostgresLease(sys.argv[1], holder="stopped", ttl=1.0)
    while True:
        token = lease.acquire()
        print(token, token is not None and lease.check(token), flush=True)
        time.sleep(0.2)
    """
)


def test_a_sigstopped_holder_is_taken_over_and_its_checks_fail_after(db: str) -> None:
    """A real process holding the lease is stopped (SIGSTOP): another takes over within
    seconds with a larger token; continued, the old holder finds it has lost it."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, db], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        lines.extend(iter(process.stdout.readline, ""))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    other = lease(db, "other", ttl=1.0)
    try:
        wait_for(lambda: any(line.split() == ["1", "True"] for line in lines), timeout=30)
        assert other.acquire() is None
        process.send_signal(signal.SIGSTOP)
        wait_for(lambda: other.acquire() is not None, timeout=10)
        token = other.acquire()
        assert token is not None and token > 1
        seen = len(lines)
        process.send_signal(signal.SIGCONT)
        wait_for(lambda: len(lines) >= seen + 3, timeout=10)
        after = [line.split() for line in lines[seen + 1 :]]  # the first may predate the stop
        assert after and all(line == ["None", "False"] for line in after), after
        assert other.check(token)
    finally:
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait(timeout=10)
        reader.join(timeout=10)
        assert process.stdout is not None
        process.stdout.close()
        other.close()


class socket_closed:
    """A loopback port nothing listens on."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        pass
