"""What only the PostgreSQL store has: its migrations, its identity across servers, the
chain's change log, idempotent shipping of events decided offline, and the events helpers.
(The Store contract itself runs over it in tests/test_store_contract.py.)"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
import pytest
from facegate_server.domain import Decision, EngineKind, EventFilter, FaceTemplate, NewAccessEvent
from facegate_server.errors import StoreUnavailable
from facegate_server.store.postgres import SCHEMA_VERSION, PostgresStore

from tests import pg

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def template(seed: int) -> FaceTemplate:
    return FaceTemplate(np.random.default_rng(seed).normal(size=128))


def event(t: datetime, member: str = "m-1") -> NewAccessEvent:
    return NewAccessEvent(
        time=t,
        turnstile_id="gate-1",
        member_id=member,
        decision=Decision.GRANTED,
        engine=EngineKind.LOCAL,
        confidence=0.9,
        latency=timedelta(milliseconds=3),
    )


@pytest.fixture
def url() -> Iterator[str]:
    with pg.database() as made:
        yield made


def test_migrations_run_once_and_two_servers_share_one_identity(url: str) -> None:
    first = PostgresStore(url)
    second = PostgresStore(url)  # finds the schema current: migrates nothing
    assert first.schema_version() == second.schema_version() == SCHEMA_VERSION
    assert first.store_id() == second.store_id() != ""
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone() == (1,)
    first.close()
    second.close()


def test_a_newer_schema_is_refused(url: str) -> None:
    PostgresStore(url).close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(RuntimeError, match="newer than this FaceGate"):
        PostgresStore(url)


def test_every_member_change_is_logged_in_order(url: str) -> None:
    store = PostgresStore(url)
    store.create_member("m-1", "Kim", [template(1)], T0)
    store.add_templates("m-1", [template(2)], T0)
    photo = store.photos("m-1")[0].photo_id
    store.remove_photo("m-1", photo, T0)
    store.update_member("m-1", "Kim J", store.get_member("m-1").membership, T0)
    store.delete_member("m-1")
    changes = store.changes_after(0, 100)
    assert [(c.member_id, c.kind) for c in changes] == [
        ("m-1", "enrolled"),
        ("m-1", "photos_added"),
        ("m-1", "photo_removed"),
        ("m-1", "updated"),
        ("m-1", "deleted"),
    ]
    assert [c.seq for c in store.changes_after(changes[1].seq, 2)] == [
        changes[2].seq,
        changes[3].seq,
    ]
    assert store.last_change() == changes[-1].seq
    store.close()


def test_shipped_events_arrive_once_in_order(url: str) -> None:
    store = PostgresStore(url)
    store.record_event(event(T0, "before"))
    batch = [(1, event(T0, "a")), (2, event(T0, "b"))]
    assert store.ship_events("server-1", batch) == 2
    assert store.ship_events("server-1", [*batch, (3, event(T0, "c"))]) == 1  # 1, 2 again
    assert store.ship_events("server-2", [(1, event(T0, "x"))]) == 1  # its own sequence
    assert store.shipped_through("server-1") == 3
    got = store.events_after(0, EventFilter(), 100)
    assert [e.member_id for e in got] == ["before", "a", "b", "c", "x"]
    store.close()


def test_events_after_retention_and_oldest(url: str) -> None:
    store = PostgresStore(url)
    assert store.oldest_event_at() is None
    ids = [store.record_event(event(T0 + timedelta(hours=i), f"m-{i}")).event_id for i in range(5)]
    assert [e.event_id for e in store.events_after(ids[1], EventFilter(), 2)] == ids[2:4]
    only = store.events_after(0, EventFilter(member_id="m-3"), 10)
    assert [e.event_id for e in only] == [ids[3]]
    assert store.oldest_event_at() == T0
    assert store.delete_events_before(T0 + timedelta(hours=2)) == 2
    assert store.oldest_event_at() == T0 + timedelta(hours=2)
    store.close()


def test_an_unreachable_database_is_named_not_a_crash() -> None:
    port = pg.free_port()
    with pytest.raises(StoreUnavailable) as refused:
        PostgresStore(f"postgresql://postgres@127.0.0.1:{port}/x?connect_timeout=1", timeout=1)
    assert f"127.0.0.1:{port}" in refused.value.message
    assert refused.value.reason == "STORE_UNAVAILABLE"


def test_an_event_id_is_never_visible_before_a_lower_one(url: str) -> None:
    """A follower resumes after the last id it saw (WatchAccessEvents), so an event must
    not commit while one with a lower id is still uncommitted: the second insert waits."""
    store = PostgresStore(url)
    try:
        with psycopg.connect(url) as slow:  # a transaction: its insert is not committed yet
            first = slow.execute(
                store._INSERT_EVENT + " RETURNING event_id",
                PostgresStore._event_row(event(T0), None),
            ).fetchone()
            assert first is not None
            done: list[int] = []
            writer = threading.Thread(
                target=lambda: done.append(store.record_event(event(T0, "m-2")).event_id)
            )
            writer.start()
            writer.join(0.5)
            assert done == []  # waits for the lower id's commit
            assert store.events_after(0, EventFilter(), 10) == []
            slow.commit()
        writer.join(30)
        assert done == [first[0] + 1]
        seen = store.events_after(0, EventFilter(), 10)
        assert [e.event_id for e in seen] == [first[0], first[0] + 1]
    finally:
        store.close()
