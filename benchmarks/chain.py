"""The chain (README: A chain of gyms): what PostgreSQL costs a decision, how soon a change
made at one server is seen at another, and how long a server cut off from PostgreSQL
takes to catch up.

    uv run python benchmarks/chain.py [--quick] [--postgres postgresql://postgres@127.0.0.1:5432/postgres]

Real servers in this process (the in-memory engine: recognition is not measured here,
only what the store adds), on a database of the benchmark's own on that PostgreSQL
(created and dropped).

1. Identify latency through gRPC, one caller: SQLite in the data dir against the chain
   (PostgreSQL + local copy; also with PostgreSQL's synchronous_commit=off), the same
   frames, in the same run, each round in a random order.
   `--only event`: where an Identify's extra time on the chain goes, in this process (no
   gRPC): the access event written to SQLite, to PostgreSQL (PostgresStore), through the
   chain (ChainStore: origin, bounded wait on a thread), and the parts of PostgreSQL's
   (pool checkout, a round trip, the insert with and without the commit's WAL flush),
   each round in a random order.
2. Enrolment at server A to the first grant at server B (B polled back to back), p50/p99.
3. Catch-up: B is cut off from PostgreSQL (a TCP relay between them is closed) for 60 s
   (`--quick`: 5 s) while A makes 1,000 changes (enrolments, updates, deletions); then
   the relay opens and the time to B's copy being current is measured.
4. `--only persons`: what a server that does not hold the cloud replay lease spends each
   2-s tick following the holder's cloud persons, at 10,000 and 100,000 persons: reading
   them all (as it did) against `CloudPeople.follow()` when nothing changed (one row), in
   wall time and this process's CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from facegate_server.engines.memory import MemoryEngine
from google.protobuf.field_mask_pb2 import FieldMask

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import pg  # noqa: E402
from tests.helpers import image_bytes, running_server  # noqa: E402


def face(n: int) -> bytes:
    return image_bytes(40 + n % 400, 40 + n // 400, "PNG")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ms(values: list[float]) -> str:
    return (
        f"p50 {pct(values, 50) * 1000:.2f} ms, p99 {pct(values, 99) * 1000:.2f} ms,"
        f" mean {statistics.fmean(values) * 1000:.2f} ms (n={len(values)})"
    )


class Relay:
    """A TCP relay to PostgreSQL that can be cut (every connection closed, new ones
    refused) and restored on the same port: a branch's WAN link."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = pg.free_port()
        self._open = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        assert self._listener is not None
        self._listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def identify_latency(tmp: Path, url: str, calls: int) -> None:
    """Both servers at once, calls alternating between them: the machine's noise falls on
    both alike."""
    relaxed = url + ("&" if "?" in url else "?") + "options=-c%20synchronous_commit%3Doff"
    with (
        running_server(tmp / "lat-sqlite", engine=MemoryEngine()) as lite,
        running_server(tmp / "lat-pg", engine=MemoryEngine(), store=url) as chained,
        running_server(tmp / "lat-pg-async", engine=MemoryEngine(), store=relaxed) as fast,
        grpc.insecure_channel(f"127.0.0.1:{lite.port}") as c1,
        grpc.insecure_channel(f"127.0.0.1:{chained.port}") as c2,
        grpc.insecure_channel(f"127.0.0.1:{fast.port}") as c3,
    ):
        stubs = {
            "sqlite": pb_grpc.FaceGateServiceStub(c1),
            "postgresql": pb_grpc.FaceGateServiceStub(c2),
            "postgresql, synchronous_commit=off": pb_grpc.FaceGateServiceStub(c3),
        }
        for i, (name, stub) in enumerate(stubs.items()):
            for n in range(20):
                member = f"lat-{n}" + ("" if name == "postgresql" else f"-{i}")
                stub.Enroll(pb.EnrollRequest(member_id=member, photos=[face(n)]), timeout=10)
        frames = [face(n % 40) for n in range(calls)]  # half members, half strangers
        took: dict[str, list[float]] = {name: [] for name in stubs}
        for i, f in enumerate(frames + frames[:50]):
            order = list(stubs.items())
            random.shuffle(order)  # no server always right after another's disk flush
            for name, stub in order:
                started = time.perf_counter()
                stub.Identify(pb.IdentifyRequest(image=f, turnstile_id="t"), timeout=10)
                if i >= 50:  # the first 50: warm-up
                    took[name].append(time.perf_counter() - started)
    for name, values in took.items():
        print(f"Identify, store {name}: {ms(values)}", flush=True)
    for name in list(took)[1:]:
        ratio = pct(took[name], 50) / pct(took["sqlite"], 50)
        print(f"  {name} / sqlite, p50: {ratio:.2f}")


def event_write(tmp: Path, url: str, rounds: int) -> None:
    """The access event's write alone, and its parts, interleaved at random each round."""
    import psycopg
    from facegate_server.domain import Decision, EngineKind, NewAccessEvent
    from facegate_server.store.chain import ChainStore
    from facegate_server.store.postgres import PostgresStore
    from facegate_server.store.sqlite import SqliteStore

    def event(n: int) -> NewAccessEvent:
        return NewAccessEvent(
            time=datetime.now(UTC),
            turnstile_id="t",
            member_id=f"m-{n % 40}",
            decision=Decision.GRANTED,
            engine=EngineKind.LOCAL,
            confidence=0.9,
            latency=timedelta(milliseconds=1),
        )

    lite = SqliteStore(tmp / "event-sqlite" / "facegate.sqlite3")
    central = PostgresStore(url)
    chained = ChainStore(url, tmp / "event-copy.sqlite3")
    insert = PostgresStore._INSERT_EVENT + " RETURNING event_id"
    row = PostgresStore._event_row
    with (
        psycopg.connect(central.url, autocommit=True) as durable,
        psycopg.connect(
            central.url, autocommit=True, options="-c synchronous_commit=off"
        ) as relaxed,
    ):

        def checkout(n: int) -> None:
            with central._conn():
                pass

        def round_trip(n: int) -> None:
            with central._conn() as conn:
                conn.execute("SELECT 1").fetchone()

        cases: dict[str, Callable[[int], object]] = {
            "SQLite store": lambda n: lite.record_event(event(n)),
            "PostgresStore.record_event_from": lambda n: central.record_event_from(
                event(n), ("bench-pg", n)
            ),
            "ChainStore.record_event (bounded, on a thread)": lambda n: chained.record_event(
                event(n)
            ),
            "  pool checkout": checkout,
            "  pool checkout + SELECT 1": round_trip,
            "  the insert, one connection": lambda n: durable.execute(
                insert, row(event(n), ("bench-raw", n)), prepare=True
            ).fetchone(),
            "  the insert, synchronous_commit=off": lambda n: relaxed.execute(
                insert, row(event(n), ("bench-async", n)), prepare=True
            ).fetchone(),
        }
        took: dict[str, list[float]] = {name: [] for name in cases}
        for n in range(rounds + 30):
            order = list(cases.items())
            random.shuffle(order)
            for name, case in order:
                started = time.perf_counter()
                case(n)
                if n >= 30:  # warm-up
                    took[name].append(time.perf_counter() - started)
    for name, values in took.items():
        print(f"event write, {name}: {ms(values)}", flush=True)
    chained.close()
    central.close()
    lite.close()


def propagation(tmp: Path, url: str, trials: int) -> None:
    with (
        running_server(tmp / "prop-a", engine=MemoryEngine(), store=url) as a,
        running_server(tmp / "prop-b", engine=MemoryEngine(), store=url) as b,
        grpc.insecure_channel(f"127.0.0.1:{a.port}") as ca,
        grpc.insecure_channel(f"127.0.0.1:{b.port}") as cb,
    ):
        sa, sb = pb_grpc.FaceGateServiceStub(ca), pb_grpc.FaceGateServiceStub(cb)
        enrol, delete = [], []
        for n in range(trials):
            member, photo = f"p-{n}", face(1000 + n)
            sa.Enroll(pb.EnrollRequest(member_id=member, photos=[photo]), timeout=10)
            answered = time.perf_counter()
            ask = pb.IdentifyRequest(image=photo, turnstile_id="t")
            while sb.Identify(ask, timeout=10).decision != pb.Decision.DECISION_GRANTED:
                pass
            enrol.append(time.perf_counter() - answered)
            sb.DeleteMember(pb.DeleteMemberRequest(member_id=member), timeout=10)
            answered = time.perf_counter()
            ask = pb.IdentifyRequest(image=photo, turnstile_id="t")
            while sa.Identify(ask, timeout=10).decision == pb.Decision.DECISION_GRANTED:
                pass
            delete.append(time.perf_counter() - answered)
        print(f"Enrolled at A -> first grant at B: {ms(enrol)}")
        print(f"Deleted at B -> first refusal at A: {ms(delete)}")


def catch_up(tmp: Path, url: str, away: float, changes: int) -> None:
    parts = __import__("psycopg").conninfo.conninfo_to_dict(url)
    relay = Relay((parts.get("host") or "127.0.0.1", int(parts.get("port") or 5432)))
    relayed = url.replace(f":{parts.get('port') or 5432}/", f":{relay.port}/")
    with (
        running_server(tmp / "cu-a", engine=MemoryEngine(), store=url) as a,
        running_server(tmp / "cu-b", engine=MemoryEngine(), store=relayed) as b,
        grpc.insecure_channel(f"127.0.0.1:{a.port}") as ca,
    ):
        sa = pb_grpc.FaceGateServiceStub(ca)
        relay.cut()
        cut_at = time.monotonic()
        while b.store.state().state != "disconnected":
            time.sleep(0.05)
        made = 0
        n = 0
        while made < changes:  # enrol, suspend, delete: three changes a member
            member = f"c-{n}"
            sa.Enroll(pb.EnrollRequest(member_id=member, photos=[face(2000 + n)]), timeout=10)
            made += 1
            if made < changes and n % 2 == 0:
                update = pb.UpdateMemberRequest(
                    member=pb.Member(member_id=member, membership=pb.Membership(suspended=True)),
                    update_mask=FieldMask(paths=["membership.suspended"]),
                )
                sa.UpdateMember(update, timeout=10)
                made += 1
            if made < changes and n % 3 == 0:
                sa.DeleteMember(pb.DeleteMemberRequest(member_id=member), timeout=10)
                made += 1
            n += 1
        left = away - (time.monotonic() - cut_at)
        print(f"  {changes} changes made at A while B was cut off; waiting {max(0, left):.0f} s")
        time.sleep(max(0.0, left))
        target = a.store.central.last_change()  # type: ignore[attr-defined]
        relay.restore()
        restored = time.perf_counter()
        while b.store.state().applied_change < target:
            time.sleep(0.005)
        took = time.perf_counter() - restored
        assert b.store.count_members() == a.store.count_members()
        print(
            f"Catch-up after {away:.0f} s cut off, {changes} changes: {took:.2f} s from the"
            f" link's return to B's copy current ({b.store.count_members()} members)"
        )


def persons(url: str, rounds: int) -> None:
    import psycopg
    from facegate_server.cloud.engine import CloudPeople
    from facegate_server.store.postgres import PostgresStore

    store = PostgresStore(url)
    try:
        for count in (10_000, 100_000):
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("TRUNCATE cloud_persons")
                conn.execute(
                    "INSERT INTO cloud_persons (person_id, member_id, ready)"
                    " SELECT 'p-' || i, 'm-' || i, true FROM generate_series(1, %s) i",
                    (count,),
                )
            people = CloudPeople(store)
            timed: dict[str, list[tuple[float, float]]] = {"read all": [], "follow": []}
            for _ in range(rounds):
                for name, step in random.sample(
                    [("read all", people.reload), ("follow", people.follow)], 2
                ):
                    wall, cpu = time.perf_counter(), time.process_time()
                    step()
                    timed[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            (every, follow) = (
                [statistics.median(v[i] for v in timed[k]) * 1000 for i in (0, 1)]
                for k in ("read all", "follow")
            )
            print(
                f"{count:,} cloud persons, a non-holder's tick (p50 of {rounds}): read all"
                f" {every[0]:.1f} ms ({every[1]:.1f} ms CPU here); follow, unchanged"
                f" {follow[0]:.2f} ms ({follow[1]:.2f} ms CPU)"
            )
    finally:
        store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls, a 5 s disconnect")
    parser.add_argument("--postgres", default=pg.ADMIN_URL)
    parser.add_argument(
        "--only", choices=["latency", "event", "propagation", "catch-up", "persons"]
    )
    args = parser.parse_args()
    url = pg.create_database(args.postgres)
    try:
        with tempfile.TemporaryDirectory() as folder:
            tmp = Path(folder)
            if args.only in (None, "latency"):
                identify_latency(tmp, url, 200 if args.quick else 2000)
            if args.only == "event":
                event_write(tmp, url, 300 if args.quick else 2000)
            if args.only == "persons":
                persons(url, 5 if args.quick else 20)
            if args.only in (None, "propagation"):
                propagation(tmp, url, 10 if args.quick else 100)
            if args.only in (None, "catch-up"):
                catch_up(tmp, url, 5.0 if args.quick else 60.0, 1000)
    finally:
        pg.drop_database(url, args.postgres)
    return 0


if __name__ == "__main__":
    sys.exit(main())
