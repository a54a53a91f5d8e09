"""Live entry events (WatchAccessEvents): the stored events, then each new one; resumed
after a reconnect or a restart with nothing lost or repeated; followers hold no thread,
so turnstiles are served whatever number follow; auth and limits apply to the stream."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from facegate_client import FaceGateClient
from facegate_client.errors import FaceGateError, ResourceExhausted, Unavailable
from facegate_server.app import FaceGateServer
from facegate_server.domain import Decision, EngineKind, EventFilter, NewAccessEvent
from facegate_server.engines.memory import MemoryEngine
from facegate_server.feed import EventBell, EventFeed
from facegate_server.rpc import auth
from facegate_server.store import MemoryStore, SqliteStore

from tests.helpers import FakeClock, details, image_bytes, running_server

KIM = image_bytes(64, 64, color="red")
STRANGER = image_bytes(64, 64, color="blue")
WAIT = 30.0  # generous: the machine is shared; a lost event fails by this deadline


def target(server: FaceGateServer) -> str:
    return f"127.0.0.1:{server.port}"


def enrol_kim(server: FaceGateServer) -> None:
    with FaceGateClient(target(server), timeout=WAIT) as client:
        client.enroll("m-1", [KIM], display_name="Kim")


def enter(server: FaceGateServer, frame: bytes = KIM, turnstile: str = "gate-1") -> int:
    """One Identify; the id of the event it wrote (the newest of the log)."""
    with FaceGateClient(target(server), timeout=WAIT, identify_timeout=WAIT) as client:
        client.identify(frame, turnstile)
        return client.list_access_events(page_size=1).events[0].event_id


class Follower:
    """A WatchAccessEvents stream read by a thread into a queue."""

    def __init__(self, address: str, after: int = 0, **request: object) -> None:
        self.channel = grpc.insecure_channel(address)
        stub = pb_grpc.FaceGateServiceStub(self.channel)
        self.call = stub.WatchAccessEvents(
            pb.WatchAccessEventsRequest(after_event_id=after, **request),  # type: ignore[arg-type]
            timeout=120,
        )
        self.events: queue.Queue[pb.AccessEvent] = queue.Queue()
        self.ended: grpc.RpcError | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.events.put(response.event)
        except grpc.RpcError as error:
            self.ended = error
        finally:
            self.done.set()

    def take(self, n: int) -> list[pb.AccessEvent]:
        return [self.events.get(timeout=WAIT) for _ in range(n)]

    def nothing_more(self) -> bool:
        return self.events.empty()

    def close(self) -> None:
        self.call.cancel()
        self.done.wait(WAIT)
        self.channel.close()


@contextmanager
def following(address: str, after: int = 0, **request: object) -> Iterator[Follower]:
    follower = Follower(address, after, **request)
    try:
        yield follower
    finally:
        follower.close()


def test_stored_events_then_new_ones_then_resumed_after_the_last(tmp_path: Path) -> None:
    with running_server(tmp_path, engine=MemoryEngine()) as server:
        enrol_kim(server)
        stored = [enter(server), enter(server, STRANGER), enter(server)]
        with following(target(server)) as follower:
            first = follower.take(3)
            assert [e.event_id for e in first] == stored
            assert [e.decision for e in first] == [
                pb.DECISION_GRANTED,
                pb.DECISION_DENIED_UNKNOWN_FACE,
                pb.DECISION_GRANTED,
            ]
            assert first[0].member_id == "m-1" and first[0].turnstile_id == "gate-1"
            new = enter(server, turnstile="gate-2")
            [live] = follower.take(1)
            assert (live.event_id, live.turnstile_id) == (new, "gate-2")
        # Gone; meanwhile two more entries. Back with the last id seen: exactly those two.
        missed = [enter(server), enter(server, STRANGER)]
        with following(target(server), after=live.event_id) as again:
            assert [e.event_id for e in again.take(2)] == missed
            time.sleep(0.3)  # anything repeated or extra would be here by now
            assert again.nothing_more()


def test_filters_apply_to_the_stream(tmp_path: Path) -> None:
    with running_server(tmp_path, engine=MemoryEngine()) as server:
        enrol_kim(server)
        with (
            following(target(server), member_id="m-1") as kims,
            following(target(server), decisions=[pb.DECISION_DENIED_UNKNOWN_FACE]) as denials,
            following(target(server), turnstile_id="gate-2") as gate2,
        ):
            ids = [enter(server), enter(server, STRANGER), enter(server, KIM, "gate-2")]
            assert [e.event_id for e in kims.take(2)] == [ids[0], ids[2]]
            assert [e.event_id for e in denials.take(1)] == [ids[1]]
            assert [e.event_id for e in gate2.take(1)] == [ids[2]]
            time.sleep(0.3)
            assert kims.nothing_more() and denials.nothing_more() and gate2.nothing_more()


def test_bad_requests_are_refused_precisely(tmp_path: Path) -> None:
    with (
        running_server(tmp_path, engine=MemoryEngine()) as server,
        grpc.insecure_channel(target(server)) as channel,
    ):
        stub = pb_grpc.FaceGateServiceStub(channel)
        for request, field in (
            (pb.WatchAccessEventsRequest(after_event_id=-1), "after_event_id"),
            (pb.WatchAccessEventsRequest(turnstile_id="no spaces"), "turnstile_id"),
            (pb.WatchAccessEventsRequest(decisions=[pb.DECISION_UNSPECIFIED]), "decisions[0]"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.WatchAccessEvents(request, timeout=WAIT))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert details(caught.value)[1][0][0] == field


def test_turnstiles_are_served_with_more_followers_than_threads(tmp_path: Path) -> None:
    with running_server(tmp_path, engine=MemoryEngine()) as server:
        door = server.rpc.lanes["door"]  # Identify's threads
        threads = door.threads
        slots = door.slots.limit  # threads + queue: every call the pool would take
        enrol_kim(server)
        followers = [Follower(target(server)) for _ in range(slots + 6)]
        try:
            deadline = time.monotonic() + WAIT
            assert server.feed is not None
            while server.feed.followers < len(followers) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.feed.followers == len(followers) > slots > threads
            # Turnstiles: more concurrent Identify calls than threads, all answered.
            with futures.ThreadPoolExecutor(threads + 4) as pool:
                list(pool.map(lambda _: enter(server), range(threads + 4)))
            with FaceGateClient(target(server)) as client:
                ids = sorted(e.event_id for e in client.list_access_events(page_size=100).events)
            assert len(ids) == threads + 4
            assert door.slots.used == server.rpc.slots.used == 0  # followers take no slot
            for follower in followers:
                got = [e.event_id for e in follower.take(len(ids))]  # in id order
                assert got == ids
        finally:
            for follower in followers:
                follower.close()


def test_stop_ends_followers_at_once_and_a_restart_resumes_them(tmp_path: Path) -> None:
    with running_server(tmp_path, engine=MemoryEngine()) as server:
        enrol_kim(server)
        before = [enter(server), enter(server)]
        follower = Follower(target(server))
        seen = [e.event_id for e in follower.take(2)]
        assert seen == before
        started = time.monotonic()
        server.stop(grace=60)  # followers end first: this must not wait out the grace
        stopped_in = time.monotonic() - started
        server.stop = lambda grace: None  # type: ignore[method-assign]  # stopped already
    assert follower.done.wait(WAIT)
    assert stopped_in < 30
    assert follower.ended is not None
    assert follower.ended.code() == grpc.StatusCode.UNAVAILABLE
    assert details(follower.ended)[0] == "SERVER_STOPPING"
    follower.close()

    with running_server(tmp_path, engine=MemoryEngine()) as again:
        after = [enter(again), enter(again, STRANGER)]
        assert min(after) > max(seen)  # ids go on from the stored log
        with following(target(again), after=seen[-1]) as resumed:
            assert [e.event_id for e in resumed.take(2)] == after
            time.sleep(0.3)
            assert resumed.nothing_more()


def test_events_written_by_another_process_arrive_within_the_poll(tmp_path: Path) -> None:
    with (
        running_server(tmp_path, engine=MemoryEngine(), follow_poll_s=0.2) as server,
        following(target(server)) as follower,
    ):
        other = SqliteStore(tmp_path / "facegate.sqlite3")  # the server's own file
        try:
            written = other.record_event(
                NewAccessEvent(
                    time=datetime.now(UTC),
                    turnstile_id="gate-9",
                    member_id="",
                    decision=Decision.DENIED_NO_FACE,
                    engine=EngineKind.LOCAL,
                    confidence=0.0,
                    latency=timedelta(milliseconds=5),
                )
            )
        finally:
            other.close()
        [event] = follower.take(1)  # no bell rang in this server: the poll found it
        assert (event.event_id, event.turnstile_id) == (written.event_id, "gate-9")


def test_too_many_followers_are_refused_with_a_retry_delay(tmp_path: Path) -> None:
    with (
        running_server(tmp_path, engine=MemoryEngine(), max_followers=2) as server,
        following(target(server)),
        following(target(server)),
    ):
        assert server.feed is not None
        deadline = time.monotonic() + WAIT
        while server.feed.followers < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        with (
            FaceGateClient(target(server)) as client,
            pytest.raises(ResourceExhausted) as refused,
        ):
            next(client.watch_events())
        assert refused.value.reason == "FOLLOWERS_LIMIT"
        assert refused.value.retry_delay is not None and refused.value.retry_delay > 0


def test_starting_streams_is_rate_limited_per_caller(tmp_path: Path) -> None:
    clock = FakeClock()
    with running_server(
        tmp_path, engine=MemoryEngine(), clock=clock, follow_rate=1.0, follow_burst=2
    ) as server:
        request = pb.WatchAccessEventsRequest(after_event_id=0)
        with grpc.insecure_channel(target(server)) as channel:
            stub = pb_grpc.FaceGateServiceStub(channel)
            calls = [stub.WatchAccessEvents(request, timeout=WAIT) for _ in range(2)]
            try:
                assert server.feed is not None
                deadline = time.monotonic() + WAIT
                while server.feed.followers < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)  # both admitted before the third asks
                refused = stub.WatchAccessEvents(request, timeout=WAIT)
                with pytest.raises(grpc.RpcError) as caught:
                    next(refused)
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert details(caught.value)[0] == "RATE_LIMITED"
                clock.advance(1.0)  # one more start a second
                with following(target(server)) as admitted:
                    enrol_kim(server)
                    new = enter(server)
                    assert [e.event_id for e in admitted.take(1)] == [new]
            finally:
                for call in calls:
                    call.cancel()


TOKENS = {"crm": "fg_backend_token", "gate-1": "fg_turnstile_token", "ops": "fg_admin_token"}
CALLERS = "\n".join(
    f"{role} {name} {auth.token_hash(TOKENS[name])}"
    for role, name in (("backend", "crm"), ("turnstile", "gate-1"), ("admin", "ops"))
)


def test_the_stream_needs_a_backend_or_admin_caller(tmp_path: Path) -> None:
    with running_server(tmp_path, engine=MemoryEngine(), tokens=CALLERS) as server:
        with FaceGateClient(target(server), token=TOKENS["crm"]) as backend:
            backend.enroll("m-1", [KIM])
            backend.identify(KIM, "gate-1")
        for name in ("crm", "ops"):
            with FaceGateClient(target(server), token=TOKENS[name]) as client:
                assert next(client.watch_events()).member_id == "m-1"
        for token, code in (
            (TOKENS["gate-1"], grpc.StatusCode.PERMISSION_DENIED),
            ("fg_unknown", grpc.StatusCode.UNAUTHENTICATED),
            (None, grpc.StatusCode.UNAUTHENTICATED),
        ):
            with (
                FaceGateClient(target(server), token=token) as client,
                pytest.raises(FaceGateError) as refused,
            ):
                next(client.watch_events())
            assert refused.value.code == code


def test_follow_events_resumes_across_a_restart_once_each(tmp_path: Path) -> None:
    """The client's resuming helper, over a server stopped and started on the same port
    and data: every event once, in order."""
    got: queue.Queue[pb.AccessEvent] = queue.Queue()
    waits: list[FaceGateError] = []
    with running_server(tmp_path, engine=MemoryEngine()) as first:
        port = first.port
        enrol_kim(first)
        ids = [enter(first)]
        client = FaceGateClient(target(first))
        stop_reading = threading.Event()

        def read() -> None:
            stream = client.follow_events(
                backoff=0.1, max_backoff=0.5, on_reconnect=lambda e, _: waits.append(e)
            )
            for event in stream:
                got.put(event)
                if stop_reading.is_set():
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert got.get(timeout=WAIT).event_id == ids[0]
        ids.append(enter(first))
        assert got.get(timeout=WAIT).event_id == ids[1]
    # Stopped: the helper waits and reconnects. Events written while nobody serves...
    with running_server(tmp_path, engine=MemoryEngine(), listen=f"127.0.0.1:{port}") as second:
        ids += [enter(second), enter(second, STRANGER)]
        assert [got.get(timeout=WAIT).event_id for _ in range(2)] == ids[2:]
        stop_reading.set()
        ids.append(enter(second))
        assert got.get(timeout=WAIT).event_id == ids[4]
        reader.join(WAIT)
    client.close()
    assert got.empty()
    assert waits and all(isinstance(e, Unavailable) for e in waits)
    assert any(e.reason == "SERVER_STOPPING" for e in waits)


def test_the_bell_wakes_waiters_and_never_misses_a_ring() -> None:
    bell = EventBell()

    async def scenario() -> None:
        seen = bell.rung
        bell.ring()  # rung between reading the store and waiting: wait returns at once
        await asyncio.wait_for(bell.wait(seen, timeout=60), WAIT)
        seen = bell.rung
        waiter = asyncio.create_task(bell.wait(seen, timeout=60))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        threading.Thread(target=bell.ring).start()  # a writer in another thread
        await asyncio.wait_for(waiter, WAIT)
        started = time.monotonic()
        await bell.wait(bell.rung, timeout=0.05)  # nobody rings: the poll's timeout
        assert time.monotonic() - started >= 0.04
        bell.close()
        await asyncio.wait_for(bell.wait(bell.rung, timeout=60), WAIT)

    asyncio.run(scenario())


def stored(store: MemoryStore, turnstile: str = "gate-1") -> int:
    return store.record_event(
        NewAccessEvent(
            time=datetime.now(UTC),
            turnstile_id=turnstile,
            member_id="",
            decision=Decision.DENIED_UNKNOWN_FACE,
            engine=EngineKind.LOCAL,
            confidence=0.0,
            latency=timedelta(milliseconds=5),
        )
    ).event_id


def test_followers_share_one_store_read_an_event() -> None:
    store, bell = MemoryStore(), EventBell()
    feed = EventFeed(store, bell, poll=60)  # no poll during the test: wakes only
    old = [stored(store) for _ in range(5)]

    async def scenario() -> list[list[int]]:
        got: list[list[int]] = [[] for _ in range(20)]
        caught_up = asyncio.Event()

        async def follower(i: int) -> None:
            async for event in feed.follow(0, EventFilter()):
                got[i].append(event.event_id)
                if all(len(g) >= 5 for g in got):
                    caught_up.set()

        tasks = [asyncio.create_task(follower(i)) for i in range(20)]
        await asyncio.wait_for(caught_up.wait(), WAIT)
        await asyncio.sleep(0.05)  # all of them waiting on the bell
        reads = feed.store_reads
        for _ in range(10):
            stored(store)
            bell.ring()
            await asyncio.sleep(0.01)
        deadline = time.monotonic() + WAIT
        while any(len(g) < 15 for g in got) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert feed.store_reads - reads <= 10 + 2  # one read an event, not twenty
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return got

    try:
        got = asyncio.run(scenario())
    finally:
        feed.shutdown()
    assert all(g == old + list(range(6, 16)) for g in got)
    assert feed.followers == 0


def test_a_follower_behind_the_window_reads_the_store_then_joins_it() -> None:
    store, bell = MemoryStore(), EventBell()
    feed = EventFeed(store, bell, poll=60, page=3, recent=4)
    ids = [stored(store, f"gate-{i % 2}") for i in range(11)]

    async def scenario() -> tuple[list[int], list[int]]:
        everything: list[int] = []
        gate1: list[int] = []

        async def follow(where: EventFilter, into: list[int]) -> None:
            async for event in feed.follow(0, where):
                into.append(event.event_id)

        tasks = [
            asyncio.create_task(follow(EventFilter(), everything)),
            asyncio.create_task(follow(EventFilter(turnstile_id="gate-1"), gate1)),
        ]
        for _ in range(9):  # more than the window holds, some while they catch up
            ids.append(stored(store, f"gate-{len(ids) % 2}"))
            bell.ring()
            await asyncio.sleep(0)
        deadline = time.monotonic() + WAIT
        while len(everything) < len(ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return everything, gate1

    try:
        everything, gate1 = asyncio.run(scenario())
    finally:
        feed.shutdown()
    assert everything == ids
    assert gate1 == [i for n, i in enumerate(ids) if n % 2 == 1]
