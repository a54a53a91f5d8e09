"""A chain: several FaceGate servers on one PostgreSQL database (store/chain.py).

Real servers (in-process, the in-memory engine: recognition is not the point here) on a
real PostgreSQL: a database of the test's own on the shared server, or, for the tests
that stop the database, a PostgreSQL server of the test's own (tests/pg.py). Timings are
measured and printed (`-s`), asserted only as "eventually" with a generous timeout: the
machine is shared.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import psycopg
import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from facegate_server.app import FaceGateServer
from facegate_server.domain import FaceTemplate
from facegate_server.engines.memory import MemoryEngine
from facegate_server.store.replica import COPY_FILE, ReplicaStore
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import pg
from tests.helpers import details, image_bytes, running_server

GRANTED = pb.Decision.DECISION_GRANTED
UNKNOWN = pb.Decision.DECISION_DENIED_UNKNOWN_FACE
EVENTUALLY = 20.0  # seconds: the aim is 1 s; a shared machine may be slower


def face(n: int) -> bytes:
    """A distinct "face" for the in-memory engine (its bytes are its identity)."""
    return image_bytes(40 + n, 40, "PNG")


class Branch:
    """One server of the chain, and a channel to it."""

    def __init__(self, server: FaceGateServer, channel: grpc.Channel) -> None:
        self.server = server
        self.stub = pb_grpc.FaceGateServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    def identify(self, photo: bytes) -> pb.IdentifyResponse:
        answer: pb.IdentifyResponse = self.stub.Identify(
            pb.IdentifyRequest(image=photo, turnstile_id="gate-1"), timeout=10
        )
        return answer

    def decides(self, photo: bytes, decision: int, member_id: str = "") -> bool:
        answer = self.identify(photo)
        return answer.decision == decision and answer.member_id == member_id

    def enroll(self, member_id: str, *photos: bytes) -> pb.Member:
        response: pb.EnrollResponse = self.stub.Enroll(
            pb.EnrollRequest(member_id=member_id, photos=list(photos)), timeout=10
        )
        return response.member

    def status(self) -> pb.GetStatusResponse:
        status: pb.GetStatusResponse = self.stub.GetStatus(pb.GetStatusRequest(), timeout=10)
        return status

    def store_health(self) -> int:
        request = health_pb2.HealthCheckRequest(service="facegate.v1.Store")
        return int(self.health.Check(request, timeout=5).status)


@contextmanager
def branch(data: Path, url: str, engine: MemoryEngine | None = None) -> Iterator[Branch]:
    with (
        running_server(data, engine=engine or MemoryEngine(), store=url) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield Branch(server, channel)


@contextmanager
def chain(tmp_path: Path, url: str, count: int = 2) -> Iterator[list[Branch]]:
    with ExitStack() as stack:
        yield [stack.enter_context(branch(tmp_path / f"branch-{i}", url)) for i in range(count)]


@pytest.fixture
def url() -> Iterator[str]:
    with pg.database() as made:
        yield made


def test_a_member_enrolled_at_one_branch_is_granted_at_the_other(tmp_path: Path, url: str) -> None:
    with chain(tmp_path, url) as (first, second):
        assert second.decides(face(1), UNKNOWN)
        first.enroll("m-1", face(1))
        took = pg.wait_for(lambda: second.decides(face(1), GRANTED, "m-1"), EVENTUALLY)
        print(f"\nenrolled at the first, granted at the second after {took * 1000:.0f} ms")

        # A photo added at the second, then removed at the first: each follows.
        second.stub.AddMemberPhotos(
            pb.AddMemberPhotosRequest(member_id="m-1", photos=[face(2)]), timeout=10
        )
        pg.wait_for(lambda: first.decides(face(2), GRANTED, "m-1"), EVENTUALLY)
        photos = first.stub.ListMemberPhotos(pb.ListMemberPhotosRequest(member_id="m-1")).photos
        first.stub.RemoveMemberPhoto(
            pb.RemoveMemberPhotoRequest(member_id="m-1", photo_id=photos[-1].photo_id), timeout=10
        )
        pg.wait_for(lambda: second.decides(face(2), UNKNOWN), EVENTUALLY)
        assert second.decides(face(1), GRANTED, "m-1")

        # Suspended at the second: refused at the first, with their id and the rule.
        member = pb.Member(member_id="m-1", membership=pb.Membership(suspended=True))
        second.stub.UpdateMember(
            pb.UpdateMemberRequest(
                member=member, update_mask=FieldMask(paths=["membership.suspended"])
            ),
            timeout=10,
        )
        pg.wait_for(
            lambda: (
                first.identify(face(1)).decision == pb.Decision.DECISION_DENIED_MEMBERSHIP_INACTIVE
            ),
            EVENTUALLY,
        )

        second.stub.DeleteMember(pb.DeleteMemberRequest(member_id="m-1"), timeout=10)
        took = pg.wait_for(lambda: first.decides(face(1), UNKNOWN), EVENTUALLY)
        print(f"deleted at the second, refused at the first after {took * 1000:.0f} ms")

        # The same id enrolled again is a new member: nothing of the old one comes back.
        second.enroll("m-1", face(3))
        pg.wait_for(lambda: first.decides(face(3), GRANTED, "m-1"), EVENTUALLY)
        assert first.decides(face(1), UNKNOWN)
        for b in (first, second):
            assert b.server.store.count_members() == 1
            assert [p.photo_id for p in b.server.store.photos("m-1")] == [
                p.photo_id for p in second.server.store.photos("m-1")
            ]


def test_a_server_that_starts_late_copies_the_gallery_and_events_go_to_the_one_log(
    tmp_path: Path, url: str
) -> None:
    with branch(tmp_path / "a", url) as first:
        for n in range(5):
            first.enroll(f"m-{n}", face(n))
        first.stub.DeleteMember(pb.DeleteMemberRequest(member_id="m-0"), timeout=10)
        with branch(tmp_path / "b", url) as second:
            # Copied before serving (the in-memory engine is not filled from the copy, as
            # the local engine's index is: the copy itself is checked).
            copy = second.server.store
            assert [m.member_id for m in copy.list_members(10)] == ["m-1", "m-2", "m-3", "m-4"]
            assert copy.get_member("m-4") == first.server.store.get_member("m-4")
            assert second.decides(face(0), UNKNOWN)
            assert second.identify(face(4)).event_id > 0  # the chain's id, at once
            ids = [
                e.event_id for e in first.stub.ListAccessEvents(pb.ListAccessEventsRequest()).events
            ]
            assert len(ids) == 2 and ids == sorted(ids, reverse=True)
            status = second.status().store
            assert (status.kind, status.state) == ("postgresql", "connected")
            assert status.HasField("copy_current_time") and status.pending_events == 0
            assert second.store_health() == health_pb2.HealthCheckResponse.SERVING


def test_with_the_database_down_branches_decide_from_their_copies_and_lose_nothing(
    tmp_path: Path, private: pg.PrivateServer
) -> None:
    url = pg.create_database(private.url)
    with chain(tmp_path, url) as (first, second):
        first.enroll("m-1", face(1))
        first.enroll("m-2", face(2))
        pg.wait_for(lambda: second.decides(face(2), GRANTED, "m-2"), EVENTUALLY)
        second.stub.DeleteMember(pb.DeleteMemberRequest(member_id="m-2"), timeout=10)
        pg.wait_for(lambda: first.decides(face(2), UNKNOWN), EVENTUALLY)
        before = {b: b.status().store.applied_change for b in (first, second)}
        assert before[first] == before[second] > 0

        with psycopg.connect(url) as conn:
            (last_before,) = conn.execute("SELECT max(event_id) FROM access_events").fetchone()
        private.stop("immediate")  # killed: no shutdown checkpoint, connections cut
        for b in (first, second):
            pg.wait_for(lambda b=b: b.status().store.state == "disconnected", EVENTUALLY)
        offline = []
        for b in (first, second):
            for _ in range(3):
                granted = b.identify(face(1))
                assert (granted.decision, granted.member_id) == (GRANTED, "m-1")
                assert granted.event_id == 0  # kept locally: no chain id yet
                offline.append(b)
            assert b.decides(face(2), UNKNOWN)
            offline.append(b)
            with pytest.raises(grpc.RpcError) as refused:
                b.enroll("m-3", face(3))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert details(refused.value)[0] == "STORE_UNAVAILABLE"
            assert "127.0.0.1" in (refused.value.details() or "")
            with pytest.raises(grpc.RpcError) as refused:
                b.stub.DeleteMember(pb.DeleteMemberRequest(member_id="m-1"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            whole = b.status()
            status = whole.store
            assert status.state == "disconnected" and status.pending_events == 4
            assert whole.shared_figures_unknown  # the outbox and the log are in PostgreSQL
            pg.wait_for(
                lambda b=b: b.store_health() == health_pb2.HealthCheckResponse.NOT_SERVING, 5
            )

        private.start()
        for b in (first, second):
            pg.wait_for(lambda b=b: b.status().store.pending_events == 0, EVENTUALLY)
            assert b.status().store.state == "connected"
        with psycopg.connect(url) as conn:
            rows = conn.execute(
                "SELECT origin_server, origin_seq, member_id, decision FROM access_events"
                " WHERE event_id > %s ORDER BY event_id",
                (last_before,),
            ).fetchall()
            everything = conn.execute(
                "SELECT count(*), count(DISTINCT (origin_server, origin_seq)) FROM access_events"
            ).fetchone()
        assert len(rows) == len(offline) == 8  # every event decided offline arrived
        assert len({(r[0], r[1]) for r in rows}) == 8
        assert everything[0] == everything[1]  # and none twice
        for server_id in {r[0] for r in rows}:
            seqs = [r[1] for r in rows if r[0] == server_id]
            assert seqs == sorted(seqs)  # in the order they were decided
        # Writes are accepted again, and followed.
        second.enroll("m-3", face(3))
        pg.wait_for(lambda: first.decides(face(3), GRANTED, "m-3"), EVENTUALLY)


def test_a_server_restarted_while_the_database_is_down_decides_from_its_copy(
    tmp_path: Path, private: pg.PrivateServer
) -> None:
    url = pg.create_database(private.url)
    data = tmp_path / "branch"
    with branch(data, url) as first:
        first.enroll("m-1", face(1))
        first.enroll("m-2", face(2))
    private.stop("immediate")
    # The in-memory engine is built by the test: fill it from the copy as the local
    # engine's index is built from the store (app.build_local).
    engine = MemoryEngine()
    copy = ReplicaStore(data / COPY_FILE)
    for member_id, embedding in copy.iter_embeddings():
        engine.enrolled(member_id, [FaceTemplate(embedding)])
    copy.close()
    with branch(data, url, engine) as again:
        assert again.decides(face(1), GRANTED, "m-1")
        status = again.status().store
        assert status.state == "disconnected"
        assert status.copy_current_time.ToSeconds() > 0
        with pytest.raises(grpc.RpcError) as refused:
            again.enroll("m-3", face(3))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        private.start()
        pg.wait_for(lambda: again.status().store.state == "connected", EVENTUALLY)
        again.enroll("m-3", face(3))
        assert again.decides(face(3), GRANTED, "m-3")


def test_a_store_setting_that_is_not_a_postgresql_url_is_refused() -> None:
    from facegate_server.config import load_settings

    with pytest.raises(ValueError, match="FACEGATE_STORE"):
        load_settings({"FACEGATE_STORE": "mysql://x"})


def test_catching_up_applies_deletions_first_and_skips_what_they_remove(
    tmp_path: Path, url: str
) -> None:
    """Changes made while a server was away: its copy gets them in one catch-up."""
    data = tmp_path / "away"
    with branch(tmp_path / "a", url) as first:
        with branch(data, url):
            pass
        first.enroll("gone", face(1))
        first.enroll("stays", face(2))
        first.stub.DeleteMember(pb.DeleteMemberRequest(member_id="gone"), timeout=10)
        first.enroll("again", face(3))
        first.stub.DeleteMember(pb.DeleteMemberRequest(member_id="again"), timeout=10)
        first.enroll("again", face(4))  # a new member with an old id
        copy = ReplicaStore(data / COPY_FILE)
        applied_before = copy.applied_seq()
        copy.close()
        started = time.monotonic()
        with branch(data, url) as back:
            print(f"\ncaught up 6 changes in {time.monotonic() - started:.2f} s (with startup)")
            store = back.server.store
            assert [m.member_id for m in store.list_members(10)] == ["again", "stays"]
            assert back.status().store.applied_change > applied_before
            assert [p.photo_id for p in store.photos("again")] == [
                p.photo_id for p in first.server.store.photos("again")
            ]


def test_a_batch_copies_deleted_and_updated_members_first_each_once() -> None:
    from facegate_server.store.chain import ordered
    from facegate_server.store.postgres import MemberChange

    changes = [
        MemberChange(1, "a", "enrolled"),
        MemberChange(2, "b", "enrolled"),
        MemberChange(3, "c", "enrolled"),
        MemberChange(4, "b", "updated"),
        MemberChange(5, "a", "photos_added"),
        MemberChange(6, "d", "deleted"),
        MemberChange(7, "d", "enrolled"),
    ]
    assert ordered(changes) == ["b", "d", "a", "c"]


def test_a_suspension_logged_after_many_enrolments_is_applied_first(
    tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The members suspended or deleted anywhere in what is pending are copied before the
    log is applied batch by batch (issue 16): a branch back from an outage refuses them
    from its first moment, not once it has copied every enrolment logged before them."""
    from facegate_server.store import chain

    monkeypatch.setattr(chain, "BATCH", 3)
    data = tmp_path / "away"
    with branch(tmp_path / "a", url) as first:
        first.enroll("leaver", face(0))
        with branch(data, url):
            pass
        for n in range(1, 10):
            first.enroll(f"new-{n}", face(n))
        first.stub.UpdateMember(
            pb.UpdateMemberRequest(
                member=pb.Member(
                    member_id="leaver",
                    membership=pb.Membership(suspended=True, suspension_reason="left"),
                ),
                update_mask=FieldMask(
                    paths=["membership.suspended", "membership.suspension_reason"]
                ),
            ),
            timeout=10,
        )
        applied: list[list[str]] = []
        apply = ReplicaStore.apply

        def recorded(self: ReplicaStore, seq: int, order: list[str], *args, **kwargs):  # type: ignore[no-untyped-def]
            applied.append(list(order))
            return apply(self, seq, order, *args, **kwargs)

        monkeypatch.setattr(ReplicaStore, "apply", recorded)
        engine = MemoryEngine()  # filled from the copy, as app.build_local fills the index
        copy = ReplicaStore(data / COPY_FILE)
        for member_id, embedding in copy.iter_embeddings():
            engine.enrolled(member_id, [FaceTemplate(embedding)])
        copy.close()
        with branch(data, url, engine) as back:
            answer = back.identify(face(0))
            assert (answer.decision, answer.member_id) == (
                pb.Decision.DECISION_DENIED_MEMBERSHIP_INACTIVE,
                "leaver",
            ), answer
        assert applied[0] == ["leaver"]  # first, alone: before any of the 4 batches
        assert len(applied) >= 5


def test_facegate_serve_with_a_store_url_and_facegate_status(tmp_path: Path, url: str) -> None:
    """The real entry point: `--store` (here FACEGATE_STORE) selects PostgreSQL; the log
    names the database without a password; `facegate status` shows the store."""
    import json
    import subprocess

    from tests.helpers import FACEGATE, start_serve

    log = tmp_path / "serve.log"
    with_password = url.replace("postgres@", "postgres:not-logged@")  # trust: unused
    settings = {
        "FACEGATE_DATA_DIR": str(tmp_path / "data"),
        "FACEGATE_WORKERS": "1",
        "FACEGATE_STORE": with_password,
    }
    process, target = start_serve(settings, log)
    try:
        status = subprocess.run(
            [FACEGATE, "status", "--target", target], capture_output=True, text=True, timeout=60
        )
        assert status.returncode == 0, status.stderr
        assert "store: postgresql://127.0.0.1:5432/facegate_test_" in status.stdout
        assert " connected, local copy current " in status.stdout
        serving = [json.loads(line) for line in log.read_text().splitlines() if "serving" in line]
        assert serving[-1]["store"].startswith("postgresql://127.0.0.1:5432/facegate_test_")
        assert "not-logged" not in log.read_text()
        assert (tmp_path / "data" / COPY_FILE).exists()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_events_recorded_from_many_threads_across_an_outage_arrive_exactly_once(
    tmp_path: Path, private: pg.PrivateServer
) -> None:
    """The store alone: 8 threads record events while the database is killed and started
    again; every event ends in PostgreSQL once, and each server's in its order."""
    from datetime import UTC, datetime, timedelta

    from facegate_server.domain import Decision, EngineKind, NewAccessEvent
    from facegate_server.store.chain import ChainStore

    url = pg.create_database(private.url)
    store = ChainStore(url, tmp_path / "copy.sqlite3", poll=0.2, retry=0.2, timeout=1.0)
    store.follow(MemoryEngine())
    stop = threading.Event()
    recorded: list[int] = []
    lock = threading.Lock()

    def turnstile(n: int) -> None:
        i = 0
        while not stop.is_set():
            event = NewAccessEvent(
                time=datetime.now(UTC),
                turnstile_id=f"t-{n}",
                member_id=f"{n}:{i}",
                decision=Decision.GRANTED,
                engine=EngineKind.LOCAL,
                confidence=1.0,
                latency=timedelta(milliseconds=1),
            )
            store.record_event(event)
            with lock:
                recorded.append(1)
            i += 1
            time.sleep(0.005)

    threads = [threading.Thread(target=turnstile, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        private.stop("immediate")
        pg.wait_for(lambda: not store.connected, EVENTUALLY)
        time.sleep(1.0)
        assert store.state().pending_events > 0
        private.start()
        pg.wait_for(lambda: store.connected, EVENTUALLY)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    pg.wait_for(lambda: store.state().pending_events == 0, EVENTUALLY)
    store.close()
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT member_id, origin_seq FROM access_events ORDER BY event_id"
        ).fetchall()
    assert len(rows) == len(recorded)
    assert len({r[0] for r in rows}) == len(rows)  # none twice
    assert len({r[1] for r in rows}) == len(rows)
    per_turnstile: dict[str, list[int]] = {}
    for member, _ in rows:
        n, i = member.split(":")
        per_turnstile.setdefault(n, []).append(int(i))
    for sequence in per_turnstile.values():  # each turnstile's events in its order
        assert sequence == sorted(sequence)


def test_two_servers_changing_different_fields_of_one_member_at_once_keep_both(
    tmp_path: Path, url: str
) -> None:
    """UpdateMember reads the member and writes it back in one PostgreSQL transaction,
    the row locked (not from the local copy, a moment behind): server B's change, made
    while A's is under way, waits for it and keeps it."""
    from dataclasses import replace
    from datetime import UTC, datetime

    import numpy as np
    from facegate_server.domain import Member, Membership
    from facegate_server.store.chain import ChainStore

    now = datetime.now(UTC)
    a = ChainStore(url, tmp_path / "a.sqlite3")
    b = ChainStore(url, tmp_path / "b.sqlite3")
    a.create_member("m-1", "Ann", [FaceTemplate(np.ones(128))], now)
    b.catch_up()
    assert b.get_member("m-1").display_name == "Ann"
    done: list[Member] = []

    def suspend(member: Member) -> tuple[str, Membership]:
        return member.display_name, replace(member.membership, suspended=True)

    def b_suspends() -> None:
        done.append(b.update_member_with("m-1", suspend, now))

    def waiting_on_a_lock() -> bool:
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            ).fetchone()
        return bool(row and row[0])

    other = threading.Thread(target=b_suspends)

    def rename(member: Member) -> tuple[str, Membership]:
        other.start()  # B's update, while A holds the member
        pg.wait_for(waiting_on_a_lock, EVENTUALLY)  # B waits for A's commit
        return "Ann B.", member.membership

    try:
        a.update_member_with("m-1", rename, now)
        other.join(timeout=EVENTUALLY)
        assert done
        for member in (done[0], a.central.get_member("m-1")):
            assert member.display_name == "Ann B." and member.membership.suspended
        b.catch_up()
        assert b.get_member("m-1").membership.suspended
    finally:
        other.join(timeout=EVENTUALLY)
        a.close()
        b.close()


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    private: pg.PrivateServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The pool retries a lost database with backoff; it used to warn at every attempt."""
    import logging

    from facegate_server.errors import StoreUnavailable
    from facegate_server.store.postgres import PostgresStore

    url = pg.create_database(private.url)
    store = PostgresStore(url, timeout=1.0)
    try:
        caplog.set_level(logging.INFO)
        private.stop("immediate")
        for _ in range(2):  # the connection it held is found dead; new ones are refused
            with pytest.raises(StoreUnavailable):
                store.count_members()
        pg.wait_for(lambda: store._pool.get_stats().get("connections_errors", 0) >= 2, 60)
        private.start()
        store.reopen()  # as the chain does once PostgreSQL answers again
        assert store.count_members() == 0
    finally:
        store.close()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not [m for m in said if m.startswith("error connecting")]
    assert len([m for m in said if m.startswith("PostgreSQL unreachable")]) == 1
    back = [m for m in said if m.startswith("PostgreSQL reachable again after")]
    assert len(back) == 1, said


def test_a_member_change_answers_without_waiting_for_a_long_catch_up(
    tmp_path: Path, url: str
) -> None:
    """A change made through a server is applied to its copy before it answers, unless a
    catch-up is under way (after an outage, thousands of changes): then it answers once
    committed centrally, and that catch-up applies it (review: UpdateMember answered the
    CLI after 52 s)."""
    from dataclasses import replace
    from datetime import UTC, datetime

    import numpy as np
    from facegate_server.domain import Member, Membership
    from facegate_server.store.chain import ChainStore

    now = datetime.now(UTC)
    a = ChainStore(url, tmp_path / "a.sqlite3")
    catching_up, finish = threading.Event(), threading.Event()

    def long_catch_up() -> None:
        with a._apply_lock:  # as the follower holds it through a long catch-up
            catching_up.set()
            finish.wait(EVENTUALLY)
            a.catch_up()

    def suspend(member: Member) -> tuple[str, Membership]:
        return member.display_name, replace(member.membership, suspended=True)

    try:
        a.create_member("m-1", "Ann", [FaceTemplate(np.ones(128))], now)
        assert a.get_member("m-1").display_name == "Ann"  # its own change: applied at once
        follower = threading.Thread(target=long_catch_up)
        follower.start()
        assert catching_up.wait(EVENTUALLY)
        updated = a.update_member_with("m-1", suspend, now)
        assert updated.membership.suspended
        assert follower.is_alive()  # answered while the catch-up still runs
        assert not a.get_member("m-1").membership.suspended  # the copy: not yet
        finish.set()
        follower.join(EVENTUALLY)
        assert a.get_member("m-1").membership.suspended  # that catch-up applied it
    finally:
        finish.set()
        a.close()


def test_a_change_with_more_than_a_batch_pending_is_copied_at_once_and_the_rest_left(
    tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With more than a batch of changes pending (a bulk import through another server), a
    change made here copies its own member as it is now and answers, leaving the rest to
    the follower: its caller is not held up, and GetMember here finds the member (review:
    NOT_FOUND after Enroll answered)."""
    from datetime import UTC, datetime

    import numpy as np
    from facegate_server.store import chain as module
    from facegate_server.store.chain import ChainStore

    monkeypatch.setattr(module, "BATCH", 5)
    now = datetime.now(UTC)
    a = ChainStore(url, tmp_path / "a.sqlite3")
    try:
        for n in range(12):  # through another server: only in PostgreSQL so far
            a.central.create_member(f"bulk-{n}", "", [FaceTemplate(np.ones(128))], now)
        a.create_member("mine", "Mine", [FaceTemplate(np.ones(128))], now)
        assert a.get_member("mine").display_name == "Mine"
        assert a.local.applied_seq() == 0  # the rest: left to the follower
        assert a.catch_up() == 13
        assert a.count_members() == 13
    finally:
        a.close()
