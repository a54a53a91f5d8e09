"""The chain's WAN must never hold a door (store/chain.py): a branch whose link to
PostgreSQL silently drops packets (no reset, no error: the TCP connection simply goes
quiet) still answers Identify within the event wait, keeps the access event locally, and
once the link is back the event is in PostgreSQL exactly once and in order, whether the
slow insert reached the database or not.

The link is a TCP relay of the test's own between the store and the shared test
PostgreSQL (a database of the test's own), which can stop forwarding, and stop reading,
without closing anything: what a dropped link looks like to both ends. Timings are
asserted only as "well under the old behaviour" (which waited until TCP gave up, 6 s and
more; behind this relay, whose kernel acknowledges everything, until the link came back).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from facegate_server.domain import AccessEvent, NewAccessEvent
from facegate_server.engines.memory import MemoryEngine
from facegate_server.store.chain import ChainStore

from tests import pg
from tests.test_store_contract import event as contract_event

EVENTUALLY = 20.0
HELD_S = 10.0  # the link comes back by itself after this: a test never hangs


class Link:
    """A TCP relay to `target` whose two directions can be held: data is neither read
    nor forwarded (nor lost: it flows on when released), and no connection is closed."""

    UP, DOWN = 0, 1  # client to server, server to client

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._flowing = (threading.Event(), threading.Event())
        self._lost = threading.Event()  # read, then dropped: swallow()
        for direction in self._flowing:
            direction.set()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._release_timer: threading.Timer | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self.target)
            except OSError:
                return
            with self._lock:
                self._sockets += [client, server]
            for a, b, direction in ((client, server, self.UP), (server, client, self.DOWN)):
                threading.Thread(target=self._pipe, args=(a, b, direction), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, direction: int) -> None:
        flowing = self._flowing[direction]
        try:
            while True:
                flowing.wait()  # held: stop reading
                data = source.recv(65536)
                if not data:
                    break
                if self._lost.is_set():
                    continue  # swallowed: never arrives
                flowing.wait()  # read just as the link was held: keep it until released
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def hold(self, *directions: int) -> None:
        """Stop both directions (or those named); released after HELD_S at the latest."""
        for d in directions or (self.UP, self.DOWN):
            self._flowing[d].clear()
        self._release_timer = threading.Timer(HELD_S, self.release)
        self._release_timer.daemon = True
        self._release_timer.start()

    def swallow(self) -> None:
        """Read everything and deliver nothing, both ways: a peer that acknowledges and
        never answers (a frozen database, a proxy whose upstream died); what was sent
        meanwhile is lost for good. Released after HELD_S at the latest."""
        self._lost.set()
        self._release_timer = threading.Timer(HELD_S, self.release)
        self._release_timer.daemon = True
        self._release_timer.start()

    def release(self) -> None:
        if self._release_timer is not None:
            self._release_timer.cancel()
        self._lost.clear()
        for direction in self._flowing:
            direction.set()

    def close(self) -> None:
        self.release()
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture
def url() -> Iterator[str]:
    with pg.database() as made:
        yield made


@pytest.fixture
def link(url: str) -> Iterator[Link]:
    parts = psycopg.conninfo.conninfo_to_dict(url)
    made = Link((str(parts.get("host") or "127.0.0.1"), int(parts.get("port") or 5432)))
    yield made
    made.close()


def across(link: Link, url: str, copy: Path, **settings: float) -> ChainStore:
    """A chain server's store whose PostgreSQL is across `link` (not yet following)."""
    from facegate_server.store.postgres import PostgresStore

    PostgresStore(url).close()  # the schema, made directly
    parts = psycopg.conninfo.conninfo_to_dict(url)
    relayed = f"postgresql://postgres@127.0.0.1:{link.port}/{parts['dbname']}"
    made = ChainStore(relayed, copy, poll=0.2, retry=0.2, event_wait=0.3, **settings)
    assert made.connected
    return made


@pytest.fixture
def store(tmp_path: Path, url: str, link: Link) -> Iterator[ChainStore]:
    made = across(link, url, tmp_path / "copy.sqlite3")
    made.follow(MemoryEngine())
    yield made
    link.release()
    made.close()


def event(member_id: str) -> NewAccessEvent:
    return contract_event(datetime.now(UTC), member_id)


def timed(store: ChainStore, member_id: str) -> tuple[AccessEvent, float]:
    started = time.monotonic()
    stored = store.record_event(event(member_id))
    return stored, time.monotonic() - started


def logged(url: str) -> list[tuple[str, int]]:
    """(member_id, origin_seq) of every event in PostgreSQL, in event id order (read
    directly, not across the link)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT member_id, origin_seq FROM access_events ORDER BY event_id"
        ).fetchall()
    return [(str(r[0]), int(r[1])) for r in rows]


def assert_once_in_order(url: str, member_ids: list[str]) -> None:
    rows = logged(url)
    assert [m for m, _ in rows] == member_ids  # each once, in the order decided
    seqs = [s for _, s in rows]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_a_silently_dropped_link_does_not_hold_identify_and_the_event_arrives_once(
    store: ChainStore, link: Link, url: str
) -> None:
    first, took = timed(store, "before")
    assert first.event_id > 0  # the link is up: straight into the chain's log

    link.hold()  # packets dropped both ways: nothing reaches PostgreSQL, nothing returns
    held, took = timed(store, "held")
    print(f"record_event over a dropped link answered in {took:.3f} s")
    assert took < 3.0  # the old behaviour: until TCP gave up (6 s and more)
    assert held.event_id == 0  # kept locally
    queued, took = timed(store, "queued")  # behind the one kept: locally, at once
    assert queued.event_id == 0 and took < 3.0
    assert store.state().pending_events == 2
    assert logged(url) == [("before", logged(url)[0][1])]

    link.release()  # the held insert reaches PostgreSQL now, racing the shipping
    pg.wait_for(lambda: store.state().pending_events == 0, EVENTUALLY)
    assert_once_in_order(url, ["before", "held", "queued"])
    after = store.record_event(event("after"))
    assert after.event_id > 0  # nothing pending: straight in again
    assert_once_in_order(url, ["before", "held", "queued", "after"])


def test_an_insert_that_commits_after_the_wait_is_not_shipped_twice(
    tmp_path: Path, link: Link, url: str
) -> None:
    # No follower: the insert takes the connection "before" used (one already open: a
    # new one could not even be opened while answers are held), and shipping is called.
    store = across(link, url, tmp_path / "copy.sqlite3")
    try:
        assert store.record_event(event("before")).event_id > 0
        link.hold(Link.DOWN)  # the insert arrives and commits; its answer never comes back
        held, took = timed(store, "held")
        assert took < 3.0 and held.event_id == 0
        pg.wait_for(lambda: [m for m, _ in logged(url)] == ["before", "held"], EVENTUALLY)
        queued, _ = timed(store, "queued")
        assert queued.event_id == 0

        link.release()
        store.ship()
        assert store.state().pending_events == 0
        assert_once_in_order(url, ["before", "held", "queued"])  # "held": found, not added
    finally:
        link.release()
        store.close()


def test_the_wait_never_outlasts_the_call(store: ChainStore, link: Link, url: str) -> None:
    """With the call's deadline (store/base.py answer_within) nearer than the event wait,
    the event waits only until then; with none left, it is kept locally at once."""
    from facegate_server.store.base import answer_within

    assert store.record_event(event("before")).event_id > 0
    store.event_wait = 30.0  # would hold the call: the deadline bounds it
    link.hold()
    with answer_within(0.5):
        held, took = timed(store, "held")
    assert took < 3.0 and held.event_id == 0
    link.release()
    pg.wait_for(lambda: store.state().pending_events == 0, EVENTUALLY)
    with answer_within(-1.0):  # the call's time is up: no wait at all
        late, _ = timed(store, "late")
    assert late.event_id == 0
    pg.wait_for(lambda: store.state().pending_events == 0, EVENTUALLY)
    assert_once_in_order(url, ["before", "held", "late"])


def test_a_call_that_failed_while_the_link_works_is_no_lasting_outage(store: ChainStore) -> None:
    """A call's failure (an insert cut off late, the pool's timeout) marks the store lost;
    the follower, whose own connection still works, finds it reachable and says so."""
    from facegate_server.errors import StoreUnavailable

    for _ in range(2):  # the follower's rounds: past its own first connection
        seen = store.local.current_at()
        pg.wait_for(lambda seen=seen: store.local.current_at() != seen, EVENTUALLY)
    store._lost(StoreUnavailable(store.name, "an insert gave up"))
    assert not store.connected
    pg.wait_for(lambda: store.connected, EVENTUALLY)
    assert store.record_event(event("after")).event_id > 0


def test_a_database_that_never_answers_is_cut_off_and_the_store_comes_back(
    tmp_path: Path, link: Link, url: str
) -> None:
    """Behind a peer that acknowledges everything and answers nothing, no TCP timeout
    fires: without the watchdog (store/postgres.py) the follower and the insert waited
    for ever, and the store stayed disconnected after the database was back."""
    store = across(link, url, tmp_path / "copy.sqlite3", call_timeout=1.5)
    store.follow(MemoryEngine())
    try:
        assert store.record_event(event("before")).event_id > 0
        link.swallow()
        kept, took = timed(store, "swallowed")
        assert kept.event_id == 0 and took < 3.0  # the door was not held
        pg.wait_for(lambda: not store.connected, EVENTUALLY)  # the call was cut
        link.release()  # new connections work; the old ones' answers are gone for good
        pg.wait_for(lambda: store.connected, EVENTUALLY)
        pg.wait_for(lambda: store.state().pending_events == 0, EVENTUALLY)
        assert store.record_event(event("after")).event_id > 0
        assert_once_in_order(url, ["before", "swallowed", "after"])
    finally:
        link.release()
        store.close()
