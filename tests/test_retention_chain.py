"""Retention on a chain (retention.py): the servers share one access log in PostgreSQL, and
one of them deletes old events, the holder of the `event-retention` lease; another takes
over when it stops (at once when it stops cleanly, once the lease lapses when it crashes).
A server alone deletes always (tests/test_backup.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from facegate_server.cloud.lease import PostgresLease
from facegate_server.engines.memory import MemoryEngine
from facegate_server.retention import LEASE, Retention, chain_lease
from facegate_server.store import MemoryStore

from tests import pg
from tests.helpers import running_server
from tests.test_store_contract import event

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
OLD = NOW - timedelta(days=40)


@pytest.fixture
def url() -> Iterator[str]:
    with pg.database() as made:
        yield made


def retention(store: MemoryStore, url: str, holder: str, interval: float = 3600.0) -> Retention:
    lease = PostgresLease(url, name=LEASE, holder=holder, ttl=2 * interval)
    return Retention(store, 30, clock=lambda: NOW, interval=interval, lease=lease)


def test_one_server_deletes_and_another_takes_over_when_it_stops(url: str) -> None:
    store = MemoryStore()  # the shared log (what it is does not matter here)
    a, b = retention(store, url, "a"), retention(store, url, "b")
    try:
        store.record_event(event(OLD))
        assert a.run_once() == 1 and a.held
        store.record_event(event(OLD))
        assert b.run_once() == 0 and b.held is False  # a holds the lease: b leaves it
        assert store.oldest_event_at() == OLD
        assert a.run_once() == 1  # renewed at each run
        store.record_event(event(OLD))
        a.stop()  # released: b at its next run
        assert b.run_once() == 1 and b.held
        assert store.oldest_event_at() is None
    finally:
        a.stop()
        b.stop()


def test_a_crashed_holder_is_taken_over_once_its_lease_lapses(url: str) -> None:
    store = MemoryStore()
    a, b = retention(store, url, "a", interval=0.5), retention(store, url, "b", interval=0.5)
    try:
        assert a.run_once() == 0 and a.held
        a.lease.close()  # a crashes: no release, no more runs
        store.record_event(event(OLD))

        def taken() -> bool:
            return b.run_once() == 1

        took = pg.wait_for(taken, timeout=30, interval=0.1)
        assert b.held and took >= 0.5  # not before a's lease (2 intervals: 1 s) lapsed
    finally:
        b.stop()


def test_a_server_alone_or_without_retention_takes_no_lease() -> None:
    assert chain_lease("", 30, 3600) is None
    assert chain_lease("postgresql://postgres@127.0.0.1/x", 0, 3600) is None


def test_two_chain_servers_delete_old_events_once(tmp_path: Path, url: str) -> None:
    """`build_server` gives a chain's servers the lease: one of two deletes, and when it
    stops the other does."""
    with ExitStack() as stack:
        servers = [
            stack.enter_context(
                running_server(
                    tmp_path / name,
                    engine=MemoryEngine(),
                    store=url,
                    wall_clock=lambda: NOW,
                    event_retention_days=30,
                )
            )
            for name in ("a", "b")
        ]
        runs = [s.retention for s in servers if s.retention is not None]
        assert len(runs) == 2
        # Each ran once at start: one took the lease, the other left it.
        pg.wait_for(lambda: all(r.held is not None for r in runs), timeout=30)
        assert sorted(bool(r.held) for r in runs) == [False, True]
        holder, other = runs if runs[0].held else runs[::-1]
        for server in servers:
            server.store.record_event(event(OLD))
        assert (holder.run_once(), other.run_once()) == (2, 0)
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT holder FROM facegate_lease WHERE name = %s", (LEASE,)
            ).fetchone()
        assert row is not None and row[0] == holder.lease.holder

        servers[0].store.record_event(event(OLD))
        holder.stop()  # its server stops (releasing the lease): the other deletes now
        assert other.run_once() == 1 and other.held


def test_a_store_away_postpones_retention_by_a_minute_not_an_hour(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A chain server started while its database is away: the run is tried again soon (one
    warning line, no traceback), not at the next hourly run."""
    import threading

    from facegate_server import retention as module
    from facegate_server.errors import StoreUnavailable

    class Away(MemoryStore):
        calls = 0
        done = threading.Event()

        def delete_events_before(self, cutoff: datetime) -> int:
            Away.calls += 1
            if Away.calls == 1:
                raise StoreUnavailable("postgresql://db:5432/gym", "connection refused")
            Away.done.set()
            return 0

    monkeypatch.setattr(module, "RETRY_S", 0.05)
    running = Retention(Away(), 30, clock=lambda: NOW, interval=3600.0)
    running.start()
    try:
        assert Away.done.wait(10), "not tried again"
    finally:
        running.stop()
    assert Away.calls == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith("retention postponed: the store postgresql://db:5432/gym") for m in messages
    )
    assert not any(r.exc_info for r in caplog.records)


def test_a_lease_the_database_does_not_answer_for_is_not_taken_for_anothers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nobody knows who holds the lease while its database does not answer: retention says
    it is postponed (and tries again in a minute), not that another server deletes."""
    import logging

    from facegate_server.retention import LeaseUnanswered

    caplog.set_level(logging.INFO)
    lease = PostgresLease(
        f"postgresql://postgres@127.0.0.1:{pg.free_port()}/gone", name=LEASE, connect_timeout=1
    )
    away = Retention(MemoryStore(), 30, clock=lambda: NOW, lease=lease)
    try:
        with pytest.raises(LeaseUnanswered, match="did not answer for the event-retention lease"):
            away.run_once()
        assert away.held is None
        assert not any("another server" in r.getMessage() for r in caplog.records)
    finally:
        lease.close()
