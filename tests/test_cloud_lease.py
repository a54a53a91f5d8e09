"""Two outbox replayers sharing one outbox and one lease (cloud/lease.py) against the Face API
emulator: only the holder writes, and a takeover (the holder killed mid-replay, or half-way
through creating a person) finishes the outbox with no member given two persons.

The shared outbox here is one SQLite file both replayers open (the PostgreSQL store will be
the chain's); the lease is in the real PostgreSQL."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate_azure_emulator import RunningEmulator
from facegate_azure_emulator.faults import LatencyProfile
from facegate_server.cloud.azure import AzureFace, AzureSettings, CloudFailure
from facegate_server.cloud.engine import CloudPeople
from facegate_server.cloud.lease import REPLAYER, PostgresLease
from facegate_server.cloud.ratelimit import CloudRate
from facegate_server.cloud.sync import CloudSync
from facegate_server.domain import FaceTemplate
from facegate_server.store import SqliteStore

from tests.cloud import KEY, cloud_gate, emulator, wait_for
from tests.conftest import Faces
from tests.pg import database

NOW = datetime(2026, 12, 1, tzinfo=UTC)


@dataclass
class Replayer:
    store: SqliteStore
    face: AzureFace
    sync: CloudSync

    def close(self) -> None:
        self.sync.keeper.stop(release=False)
        self.sync.lease.close()
        self.store.close()


def replayer(
    path: Path, emu: RunningEmulator, url: str, holder: str, ttl: float, *, keep: bool = True
) -> Replayer:
    """A server's replayer as app.py builds it, on the shared outbox and the shared lease."""
    store = SqliteStore(path)
    face = AzureFace(
        AzureSettings(endpoint=emu.endpoint, key=KEY, store_id=store.store_id(), read_timeout=10),
        rate=CloudRate(0),
    )
    lease = PostgresLease(url, holder=holder, ttl=ttl)
    sync = CloudSync(face, store, CloudPeople(store), lease=lease)
    if keep:
        sync.keeper.start()  # the lease renewed on its timer, as `start()` does; ticks by hand
    return Replayer(store, face, sync)


def persons(face: AzureFace) -> dict[str, list[list[str]]]:
    """member id -> each of its persons' persisted faces (more than one person: a duplicate)."""
    found: dict[str, list[list[str]]] = {}
    for p in face.persons():
        member = face.member_of(p)
        assert member is not None, f"a person this store did not make: {p}"
        found.setdefault(member, []).append(list(p.persisted_face_ids))
    return found


def made(face: AzureFace) -> int:
    """Persons in the group so far (0 before the group is made)."""
    try:
        return len(list(face.persons()))
    except CloudFailure as failure:
        if not failure.not_found:
            raise
        return 0


def enrol(store: SqliteStore, member_id: str, photo: bytes) -> None:
    store.create_member(member_id, "", [FaceTemplate(np.zeros(128), cloud_photo=photo)], NOW)


def finish(r: Replayer, timeout: float = 120) -> None:
    """Tick the replayer as its thread would, until the outbox is empty."""

    def done() -> bool:
        r.sync.run_once()
        if r.store.outbox_depth() == 0:
            return True
        time.sleep(0.2)
        return False

    wait_for(done, timeout=timeout)


@pytest.fixture
def db() -> Iterator[str]:
    with database() as url:
        yield url


@pytest.fixture
def emu() -> Iterator[RunningEmulator]:
    running = emulator()
    try:
        yield running
    finally:
        running.stop()


def test_a_takeover_keeps_the_person_the_stopped_holder_made(
    tmp_path: Path, db: str, emu: RunningEmulator, faces: Faces
) -> None:
    """The holder counted its attempt and created the member's person, and stopped before
    it heard the answer (nothing saved): the next holder finds that person and adds the
    face to it, rather than creating a second one."""
    path = tmp_path / "shared.sqlite3"
    a = replayer(path, emu, db, "a", ttl=2.0)
    a.sync.keeper.stop(release=False)  # a is stopped: it renews no more
    b = replayer(path, emu, db, "b", ttl=2.0)
    try:
        enrol(a.store, "m-1", faces.read(faces.of("barack_obama")[0]))
        assert a.sync.lease.acquire() == 1
        a.face.ensure_group()
        # What a's replay of the entry did before it was stopped:
        (entry,) = a.store.outbox(10)
        a.store.outbox_attempt(entry.seq)
        made = a.face.create_person("m-1")

        b.sync.run_once()  # a's lease has not run out: b waits
        assert "another server" in b.sync.waiting
        assert b.store.outbox_depth() == 1
        finish(b)
        assert b.sync.keeper.token == 2  # b took over: the token grew
        (person,) = b.face.persons()
        assert person.person_id == made
        assert persons(b.face) == {"m-1": [list(person.persisted_face_ids)]}
        assert len(person.persisted_face_ids) == 1
        assert b.store.cloud_person("m-1") is not None
        assert b.store.cloud_person("m-1").person_id == made  # type: ignore[union-attr]
        # a, were it to wake, writes nothing: its check fails.
        assert not a.sync.lease.check(1)
    finally:
        a.close()
        b.close()


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from facegate_server.cloud.azure import AzureFace, AzureSettings, CloudFailure
    from facegate_server.cloud.engine import CloudPeople
    from facegate_server.cloud.lease import REPLAYER, PostgresLease
    from facegate_server.cloud.ratelimit import CloudRate
    from facegate_server.cloud.sync import CloudSync
    from facegate_server.store import SqliteStore

    path, endpoint, key, url = sys.argv[1:5]
    store = SqliteStore(Path(path))
    face = AzureFace(
        AzureSettings(endpoint=endpoint, key=key, store_id=store.store_id(), read_timeout=10),
        rate=CloudRate(0),
    )
    lease = PostgresLease(url, holder="killed", ttl=2.0)
    sync = CloudSync(face, store, CloudPeople(store), lease=lease, interval=0.1)
    sync.start()
    print("started", flush=True)
    time.sleep(600)
    """
)


def stop_outside_a_write(process: subprocess.Popen[bytes], path: Path) -> None:
    """SIGSTOP `process` at a moment it holds no write lock on the shared SQLite file.

    The file stands in for the chain's PostgreSQL, where the replayer's outbox writes are
    single autocommit statements: a frozen holder keeps no lock there between them (and
    an open transaction is ended by idle_in_transaction_session_timeout). SQLite's file
    lock would instead be held for as long as the process stays stopped."""
    import sqlite3

    for _ in range(200):
        process.send_signal(signal.SIGSTOP)
        probe = sqlite3.connect(path, timeout=0.2, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:  # stopped inside a write: let it finish
            process.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        finally:
            probe.close()
    raise AssertionError("the holder was always inside a write")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_killing_the_holder_mid_replay_lets_the_other_finish_without_duplicates(
    tmp_path: Path, db: str, faces: Faces, how: signal.Signals
) -> None:
    """A server replaying the outbox (a real process) is killed, or stopped, in the middle:
    the other server takes over within seconds and finishes it; every member has exactly
    one person with its one face."""
    emu = emulator(latency=LatencyProfile(min_ms=250, max_ms=250))
    path = tmp_path / "shared.sqlite3"
    b = replayer(path, emu, db, "b", ttl=2.0, keep=False)  # not a candidate yet
    photos = [faces.read(p) for person in ("barack_obama", "joe_biden") for p in faces.of(person)]
    members = [f"m-{n}" for n in range(8)]
    for n, member in enumerate(members):
        enrol(b.store, member, photos[n % len(photos)])
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), emu.endpoint, KEY, db],
        stdout=subprocess.DEVNULL,
    )
    try:
        # The holder is part-way through: some members in the cloud, some not yet.
        wait_for(lambda: made(b.face) >= 2, timeout=60)
        if how is signal.SIGSTOP:
            stop_outside_a_write(process, path)
        else:
            process.send_signal(how)
        b.sync.keeper.start()
        depth = b.store.outbox_depth()
        assert 0 < depth < len(members), "the holder was not stopped mid-replay"
        started = time.monotonic()
        finish(b)
        took = time.monotonic() - started
        found = persons(b.face)
        assert sorted(found) == members
        duplicates = {m: p for m, p in found.items() if len(p) != 1 or len(p[0]) != 1}
        assert not duplicates, duplicates
        assert took < 60  # the lease ran out (2 s) and b finished the rest
        if how is signal.SIGSTOP:
            # Woken, the old holder finds the lease gone and writes nothing more.
            process.send_signal(signal.SIGCONT)
            time.sleep(3)
            assert persons(b.face) == found
    finally:
        process.kill()
        process.wait(timeout=10)
        b.close()
        emu.stop()


def test_a_server_with_a_lease_url_replays_only_while_it_holds_the_lease(
    tmp_path: Path, db: str, emu: RunningEmulator, faces: Faces
) -> None:
    """FACEGATE_CLOUD_LEASE_URL wires the lease in: named after the store (servers sharing
    a store share one lease), held by another, the server's outbox waits and says why."""
    with cloud_gate(emu, tmp_path, cloud_lease_url=db, cloud_lease_ttl_s=30) as gate:
        name = f"{REPLAYER}:{gate.server.store.store_id()}"
        other = PostgresLease(db, name=name, holder="another server", ttl=30)
        try:
            token = other.acquire()
            assert token == 1
            gate.stub.Enroll(
                pb.EnrollRequest(member_id="m-1", photos=[faces.read(faces.of("barack_obama")[0])]),
                timeout=60,
            )
            replayer = gate.server.gate.replayer
            assert replayer is not None
            # What the holder saves in the shared store, this server follows while waiting:
            # its cloud answers then name the member.
            gate.server.store.save_cloud_person("m-1", "person-made-by-the-holder")
            assert replayer.people.member_of("person-made-by-the-holder") is None
            replayer.run_once()
            assert replayer.people.member_of("person-made-by-the-holder") == "m-1"
            replayer.people.forget("person-made-by-the-holder")  # (it is not in the cloud)
            answer = gate.stub.GetStatus(pb.GetStatusRequest(), timeout=5)
            assert answer.outbox_depth == 1
            assert "another server replays the outbox" in answer.outbox_waiting
            other.release(token)
            gate.settle()
            assert gate.persons() == {"m-1": gate.persons()["m-1"]}
            assert len(gate.persons()["m-1"]) == 1
            assert other.acquire() is None  # the server holds it now (token 2)
        finally:
            other.close()


def test_a_holder_whose_create_lands_after_a_takeover_does_not_record_its_person(
    tmp_path: Path, db: str, emu: RunningEmulator, faces: Faces
) -> None:
    """The holder passed its check before creating the member's person, then froze before
    the request reached the cloud (SIGSTOP, a paused VM) for longer than its lease: the
    next holder replayed the entry meanwhile (its own person, with the face). When the
    frozen create lands at last, its person is not recorded in the shared store (a second
    person for the member there, which the store could then pick): the holder checks its
    lease again before the store write, finds it lost, and stops. The late person is an
    orphan in the cloud, which `facegate sync` deletes."""
    path = tmp_path / "shared.sqlite3"
    a = replayer(path, emu, db, "a", ttl=1.0, keep=False)
    b = replayer(path, emu, db, "b", ttl=1.0, keep=False)
    try:
        enrol(a.store, "m-1", faces.read(faces.of("barack_obama")[0]))
        create = a.face.create_person
        late: list[str] = []

        def frozen_then_create(member_id: str) -> str:
            # a's lease lapses while it is frozen; b takes over and replays the entry.
            wait_for(lambda: b.sync.lease.acquire() is not None, timeout=20)
            finish(b)
            late.append(create(member_id))  # the request reaches the cloud now
            return late[-1]

        a.face.create_person = frozen_then_create  # type: ignore[method-assign]
        a.sync.run_once()
        assert late, "a did not reach its create"
        assert "passed to another server" in a.sync.waiting

        kept = b.store.cloud_person("m-1")
        assert kept is not None and kept.person_id != late[0]
        # The shared store knows b's person only; a's late one is not recorded.
        assert [p.person_id for p in b.store.cloud_people()] == [kept.person_id]
        found = persons(b.face)
        assert len(found["m-1"]) == 2  # b's (with the face) and a's late, faceless one

        # `facegate sync` (a reconciliation) deletes the orphan.
        b.sync.request_reconcile(dry_run=False)

        def reconciled() -> bool:
            b.sync.run_once()
            return not b.sync.reconciling

        wait_for(reconciled, timeout=60)
        (person,) = b.face.persons()
        assert person.person_id == kept.person_id and len(person.persisted_face_ids) == 1
    finally:
        a.close()
        b.close()
