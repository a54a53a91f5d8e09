"""Issue 16's "done when", with Azure primary, end to end: killing the chain server that
replays the outbox lets the other finish it, with no duplicate person.

Everything is a real process: one PostgreSQL database (tests/pg.py), one Face API emulator
(`facegate azure-emulator`, steered through its admin HTTP API), and two `facegate serve`
processes on that database, cloud-first, sharing one outbox and one replayer's lease.
Members are enrolled through both servers while the emulator refuses connections, so the
outbox fills; the emulator heals, slowly; once the lease's holder is part-way through, the
emulator holds (hangs) its next PersonCreate, and the holder is killed (SIGKILL) in the
middle of it: either at once (the create is dropped) or after the create has taken effect
while the holder was frozen (SIGSTOP), so that it never read the answer. The other server
takes the lease over when it lapses and empties the outbox; the emulator's group then
holds exactly one person per member with exactly the enrolled faces, no person or face was
ever made twice, and the survivor grants every member, the cloud deciding.

And a holder frozen past its lease with a PersonCreate in flight (held back on the wire by
a relay between that server and the emulator), whose create lands after the survivor has
taken over: woken, it records nothing in the shared store (no second person for the
member there), and `facegate sync` deletes its late person.

Waits poll with generous timeouts (the machine is shared); the figures are printed (`-s`).
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import psycopg
import pytest
import requests
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc

from tests import pg
from tests.conftest import Faces
from tests.helpers import FACEGATE, start_serve

pytestmark = pytest.mark.timeout(600)  # three servers' start-ups and their waits, on 2 cores

KEY = "chain-cloud-key"
GROUP = "facegate"  # FACEGATE_AZURE_GROUP_ID's default
TTL = 5.0
"""The lease's ttl (FACEGATE_CLOUD_LEASE_TTL_S): the survivor takes over within about this."""
EVENTUALLY = 120.0
"""Seconds any "eventually" may take: generous, the machine is shared."""

# member id -> (photos enrolled, the frame shown at the turnstile): 6 members, 9 faces.
MEMBERS = {
    "m-obama": (["barack_obama/1.jpg", "barack_obama/2.jpg"], "barack_obama/3.jpg"),
    "m-biden": (["joe_biden/1.jpg"], "joe_biden/2.jpg"),
    "m-kit": (["kit_harington/1.jpg", "kit_harington/2.jpg"], "kit_harington/3.jpg"),
    "m-rose": (["rose_leslie/1.jpg"], "rose_leslie/2.jpg"),
    "m-alex": (["alex_lacamoire/1.jpg", "alex_lacamoire/2.jpg"], "alex_lacamoire/3.png"),
    "m-lin": (["lin_manuel_miranda/1.png"], "lin_manuel_miranda/1.png"),
}
"""Paths under ../shared/faces/people."""
FACES = sum(len(photos) for photos, _ in MEMBERS.values())


class Emulator:
    """`facegate azure-emulator` as a process, steered through its admin API."""

    def __init__(self, process: subprocess.Popen[str], serving: dict[str, Any]) -> None:
        self.process = process
        self.endpoint: str = serving["endpoint"]
        self.admin: str = serving["admin_endpoint"]

    def put(self, what: str, body: dict[str, Any]) -> None:
        answer = requests.put(f"{self.admin}/_emulator/{what}", json=body, timeout=10)
        assert answer.status_code == 200, answer.text

    def fault(self, mode: str) -> None:
        self.put("fault", {"mode": mode})

    def latency(self, ms: int) -> None:
        self.put("latency", {"minMs": ms, "maxMs": ms})

    def counts(self) -> dict[str, Any]:
        counts: dict[str, Any] = requests.get(f"{self.admin}/_emulator/counts", timeout=10).json()
        return counts

    def answered(self, operation: str) -> int:
        """The Face API calls of `operation` answered 200."""
        return int(self.counts()["answered"].get(operation, {}).get("200", 0))

    def in_flight(self) -> list[str]:
        """The operations of the calls received and not yet answered nor dropped."""
        counts = self.counts()
        return [
            op
            for op, received in counts["received"].items()
            for _ in range(
                received
                - sum(counts["answered"].get(op, {}).values())
                - counts["dropped"].get(op, 0)
            )
        ]

    def hung(self) -> int:
        status = requests.get(f"{self.admin}/_emulator/status", timeout=10).json()
        return int(status["hung"])

    def persons(self) -> list[dict[str, Any]]:
        """The group's persons, read over the Face API as any client would (the group
        holds far fewer than a page)."""
        answer = requests.get(
            f"{self.endpoint}/face/v1.0/largepersongroups/{GROUP}/persons",
            params={"top": 1000},
            headers={"Ocp-Apim-Subscription-Key": KEY},
            timeout=30,
        )
        if answer.status_code == 404:  # the group is not made yet
            return []
        assert answer.status_code == 200, answer.text
        persons: list[dict[str, Any]] = answer.json()
        return persons


@contextmanager
def emulator_process(log: Path) -> Iterator[Emulator]:
    """The emulator on free ports; no rate limit, no small-face pass (not the point here,
    and it would cost the shared cores), trainings of 1 s on its real clock."""
    process = subprocess.Popen(
        [
            *(FACEGATE, "azure-emulator", "--listen", "127.0.0.1:0", "--key", KEY),
            *("--admin-listen", "127.0.0.1:0", "--workers", "1", "--training-seconds", "1"),
            *("--rate", "0", "--small-faces", "off"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert process.stderr is not None
    stderr = process.stderr

    def read() -> None:
        with log.open("w") as sink:
            for line in stderr:
                sink.write(line)
                sink.flush()
                lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            entry = json.loads(line) if line.startswith("{") else {}
            if entry.get("msg") == "serving":
                break
        yield Emulator(process, entry)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=5)
        stderr.close()


class Proxy:
    """A TCP relay between one server and the emulator that can hold that server's next
    PersonCreate on the wire (`hold_create`) until `release`: a request "in flight" for
    as long as the test wants, for this server alone (the emulator's own hang would
    hold every server's calls)."""

    CREATE = re.compile(rb"^POST [^ ]*/largepersongroups/[^/ ]+/persons(\?[^ ]*)? HTTP/")

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.armed = False
        self.held = threading.Event()
        self.released = threading.Event()
        self.released.set()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def hold_create(self) -> None:
        self.released.clear()
        self.held.clear()
        self.armed = True

    def release(self) -> None:
        self.armed = False
        self.released.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:  # the emulator refuses: so does the relay (a reset)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, outbound: bool) -> None:
        try:
            while data := source.recv(65536):
                if outbound and self.armed and self.CREATE.match(data):
                    self.armed = False
                    data = self._whole_request(source, data)
                    self.held.set()  # all of it here: the sender may be stopped now
                    self.released.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:  # either side gone: both go (as a direct connection would)
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _whole_request(source: socket.socket, data: bytes) -> bytes:
        """`data` and the rest of its request (headers, then Content-Length bytes)."""
        while b"\r\n\r\n" not in data and (more := source.recv(65536)):
            data += more
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        while length and len(body) < int(length.group(1)) and (more := source.recv(65536)):
            body += more
            data += more
        return data

    def close(self) -> None:
        self.release()
        self.listener.close()
        for end in self._sockets:
            end.close()


@dataclass
class Server:
    """One `facegate serve` of the chain."""

    name: str
    process: subprocess.Popen[str]
    target: str
    stub: pb_grpc.FaceGateServiceStub
    proxy: Proxy
    """Between this server and the emulator."""

    def status(self) -> pb.GetStatusResponse:
        answer: pb.GetStatusResponse = self.stub.GetStatus(pb.GetStatusRequest(), timeout=10)
        return answer


@contextmanager
def serve(name: str, tmp_path: Path, url: str, emu: Emulator) -> Iterator[Server]:
    proxy = Proxy(emu.endpoint)
    settings = {
        "FACEGATE_DATA_DIR": str(tmp_path / name),
        "FACEGATE_WORKERS": "1",
        "FACEGATE_STORE": url,
        "FACEGATE_AZURE_ENDPOINT": proxy.endpoint,
        "FACEGATE_AZURE_KEY": KEY,
        "FACEGATE_AZURE_RATE": "0",  # the emulator has none either
        "FACEGATE_ROUTING_POLICY": "cloud-first",
        "FACEGATE_IDENTIFY_BUDGET_MS": "4000",  # the tests share two cores with the cloud
        "FACEGATE_SYNC_INTERVAL_S": "0.2",
        "FACEGATE_CLOUD_LEASE_TTL_S": str(TTL),
        "FACEGATE_AZURE_TIMEOUT_S": "30",  # no call given up (and made twice) on a slow machine
    }
    try:
        process, target = start_serve(settings, tmp_path / f"{name}.log")
    except BaseException:
        proxy.close()
        raise
    try:
        with grpc.insecure_channel(target) as channel:
            yield Server(name, process, target, pb_grpc.FaceGateServiceStub(channel), proxy)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # were it left stopped
        workers = (
            psutil.Process(process.pid).children(recursive=True) if process.poll() is None else []
        )
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        psutil.wait_procs(workers, timeout=10)
        proxy.close()


@dataclass(frozen=True)
class Held:
    pid: int
    token: int
    live: bool


def lease(url: str) -> Held | None:
    """The replayer's lease as the database has it: the holder's pid (holders are named
    host:pid:random), its token, and whether it is unexpired."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT holder, token, expires_at > now() FROM facegate_lease"
            " WHERE name LIKE 'cloud-replayer:%'"
        ).fetchone()
    if row is None:
        return None
    return Held(int(str(row[0]).split(":")[1]), int(row[1]), bool(row[2]))


def outbox_depth(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT COUNT(*) FROM outbox WHERE parked = ''").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def url() -> Iterator[str]:
    with pg.database() as made:
        yield made


CREATE = "LargePersonGroupPerson_Create"
ADD_FACE = "LargePersonGroupPerson_AddFaceFromStream"


def hold_a_create(emu: Emulator, url: str) -> None:
    """Hang the holder's next cloud call, until the call hung is a person's create: each
    other call is let go (the holder makes one call at a time; nothing else calls the
    cloud now)."""
    while True:
        emu.fault("hang")
        pg.wait_for(lambda: emu.hung() == 1, EVENTUALLY, 0.05)
        (call,) = emu.in_flight()
        if call == CREATE:
            return
        assert outbox_depth(url) > 0, "the holder emptied the outbox before a create was held"
        emu.fault("healthy")  # let this one go: it is answered
        pg.wait_for(lambda: emu.hung() == 0, EVENTUALLY, 0.05)


@dataclass
class Chain:
    emu: Emulator
    servers: list[Server]
    holder: Server
    survivor: Server
    token: int
    """The holder's token."""


@contextmanager
def chain_with_a_full_outbox(tmp_path: Path, url: str, faces: Faces) -> Iterator[Chain]:
    """The emulator and two servers; the members enrolled through both while the cloud
    refused connections: the shared outbox holds every face, the lease's holder waits to
    retry, the other says that another server replays."""
    with ExitStack() as stack:
        emu = stack.enter_context(emulator_process(tmp_path / "emulator.log"))
        servers = [stack.enter_context(serve(n, tmp_path, url, emu)) for n in ("a", "b")]
        by_pid = {s.process.pid: s for s in servers}

        # One of the two holds the replayer's lease (the other waits for it).
        pg.wait_for(lambda: (h := lease(url)) is not None and h.live, EVENTUALLY, 0.2)
        held = lease(url)
        assert held is not None and held.pid in by_pid, held
        holder = by_pid[held.pid]
        (survivor,) = (s for s in servers if s is not holder)
        for server in servers:  # each has checked the cloud (Identify reads the result)
            pg.wait_for(lambda s=server: s.status().cloud_readiness == "ready", EVENTUALLY, 0.2)

        emu.fault("refuse")
        for n, (member, (photos, _)) in enumerate(MEMBERS.items()):
            servers[n % 2].stub.Enroll(
                pb.EnrollRequest(
                    member_id=member, photos=[faces.read(f"people/{p}") for p in photos]
                ),
                timeout=60,
            )
        assert survivor.status().outbox_depth == FACES
        pg.wait_for(lambda: "retrying" in holder.status().outbox_waiting, EVENTUALLY, 0.2)
        assert "another server replays the outbox" in survivor.status().outbox_waiting
        yield Chain(emu, servers, holder, survivor, held.token)


def takes_over(chain: Chain, url: str, how: str, pending: int) -> None:
    """The survivor takes the lease over when it lapses (a larger token), and empties the
    outbox, with nothing parked."""
    started = time.monotonic()
    survivor = chain.survivor

    def taken() -> bool:
        now = lease(url)
        return now is not None and now.pid == survivor.process.pid

    took_lease = pg.wait_for(taken, EVENTUALLY, 0.1)
    pg.wait_for(lambda: survivor.status().outbox_depth == 0, EVENTUALLY, 0.2)
    print(
        f"\n{how}: {pending} of {FACES} entries pending; the survivor held the lease after"
        f" {took_lease:.1f} s and emptied the outbox after {time.monotonic() - started:.1f} s"
        f" (lease ttl {TTL:.0f} s)"
    )
    after = lease(url)
    assert after is not None and after.token > chain.token
    state = survivor.status()
    assert state.outbox_parked == 0, state.parked


def one_person_per_member(emu: Emulator) -> None:
    """Exactly one person per member, holding exactly the member's enrolled faces."""
    persons = emu.persons()
    by_member: dict[str, list[dict[str, Any]]] = {}
    for person in persons:
        by_member.setdefault(person["name"], []).append(person)
    assert sorted(by_member) == sorted(MEMBERS), persons
    duplicates = {m: p for m, p in by_member.items() if len(p) != 1}
    assert not duplicates, f"members with more than one person: {duplicates}"
    for member, (photos, _) in MEMBERS.items():
        (person,) = by_member[member]
        assert person["userData"].endswith(f":{member}"), person
        assert len(person["persistedFaceIds"]) == len(photos), (member, person)


def recorded_persons(url: str) -> dict[str, int]:
    """member id -> the persons the shared store records for it."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT member_id, count(*) FROM cloud_persons WHERE NOT deleted GROUP BY member_id"
        ).fetchall()
    return {str(member): int(count) for member, count in rows}


def grants_by_the_cloud(server: Server, faces: Faces) -> None:
    """The server trains the group (if it holds the lease) and grants every member, the
    cloud deciding once the training has finished."""
    for member, (_, frame) in MEMBERS.items():
        request = pb.IdentifyRequest(image=faces.read(f"people/{frame}"), turnstile_id="gate-1")

        def granted(request: pb.IdentifyRequest = request, member: str = member) -> bool:
            answer = server.stub.Identify(request, timeout=30)
            assert (answer.decision, answer.member_id) == (pb.DECISION_GRANTED, member)
            return bool(answer.engine == pb.ENGINE_AZURE)

        pg.wait_for(granted, EVENTUALLY, 0.5)


@pytest.mark.parametrize("how", ["killed-mid-create", "create-answer-lost"])
def test_killing_the_replaying_server_lets_the_other_finish_with_no_duplicate_person(
    tmp_path: Path, url: str, faces: Faces, how: str
) -> None:
    """killed-mid-create: the holder is killed while the cloud holds its PersonCreate (the
    cloud drops it: no person). create-answer-lost: the holder is frozen while its
    PersonCreate is held, the create then takes effect, and the holder is killed before it
    could read the answer (a person the store does not know): the survivor must find that
    person, not make a second one."""
    with chain_with_a_full_outbox(tmp_path, url, faces) as chain:
        emu, holder, survivor = chain.emu, chain.holder, chain.survivor
        # The cloud heals, slowly (0.5 s a call). Once the holder is part-way through,
        # its next PersonCreate is held (hung) and the holder killed in the middle of it.
        emu.latency(500)
        emu.fault("healthy")
        pg.wait_for(lambda: outbox_depth(url) <= FACES - 2, EVENTUALLY, 0.05)
        hold_a_create(emu, url)
        pending = outbox_depth(url)
        emu.latency(0)
        if how == "killed-mid-create":
            holder.process.send_signal(signal.SIGKILL)
            holder.process.wait(timeout=30)
            # Its connection closed: the cloud drops the hung create, which makes nothing.
            pg.wait_for(lambda: emu.hung() == 0, EVENTUALLY, 0.05)
            emu.fault("healthy")
        else:
            holder.process.send_signal(signal.SIGSTOP)
            creates = emu.answered(CREATE)
            emu.fault("healthy")  # the create goes on: a person the holder never hears of
            pg.wait_for(lambda: emu.answered(CREATE) == creates + 1, EVENTUALLY, 0.05)
            now = lease(url)
            assert now is not None and now.pid == holder.process.pid, (
                "the lease passed on before the held create took effect: slower than the"
                f" lease's ttl ({TTL} s); the case under test did not happen"
            )
            holder.process.send_signal(signal.SIGKILL)
            holder.process.wait(timeout=30)

        takes_over(chain, url, how, pending)
        one_person_per_member(emu)
        assert recorded_persons(url) == dict.fromkeys(MEMBERS, 1)
        if how == "create-answer-lost":
            # The survivor adopted the person the killed holder made and never recorded.
            log = (tmp_path / f"{survivor.name}.log").read_text()
            assert "cloud person of an earlier attempt found: kept" in log
        # Never a person or a face made twice (none made, then deleted, either).
        assert emu.answered(CREATE) == len(MEMBERS)
        assert emu.answered(ADD_FACE) == FACES
        assert emu.answered("LargePersonGroupPerson_Delete") == 0
        assert emu.answered("LargePersonGroupPerson_DeleteFace") == 0
        pg.wait_for(lambda: survivor.status().cloud_training == "idle", EVENTUALLY, 0.2)
        grants_by_the_cloud(survivor, faces)


def test_a_holder_frozen_past_its_lease_mid_create_records_nothing_when_it_wakes(
    tmp_path: Path, url: str, faces: Faces
) -> None:
    """The holder sends a PersonCreate, which its link holds back (the proxy), and is
    frozen (SIGSTOP, a paused VM) for longer than its lease: the survivor takes over and
    replays the entry (its own person). Then the old request reaches the cloud, and the old
    holder wakes (SIGCONT) to its answer: it finds its lease gone and records nothing (a
    second person for the member in the shared store); the late person is an orphan in the
    cloud, which `facegate sync` deletes. Both servers then grant every member."""
    with chain_with_a_full_outbox(tmp_path, url, faces) as chain:
        emu, holder, survivor = chain.emu, chain.holder, chain.survivor
        emu.latency(300)
        emu.fault("healthy")
        pg.wait_for(lambda: outbox_depth(url) <= FACES - 2, EVENTUALLY, 0.05)
        holder.proxy.hold_create()
        assert holder.proxy.held.wait(EVENTUALLY), "no create was sent"
        holder.process.send_signal(signal.SIGSTOP)
        pending = outbox_depth(url)
        emu.latency(0)

        takes_over(chain, url, "frozen-then-resumed", pending)
        assert recorded_persons(url) == dict.fromkeys(MEMBERS, 1)
        creates = emu.answered(CREATE)
        holder.proxy.release()  # the old create lands now
        pg.wait_for(lambda: emu.answered(CREATE) == creates + 1, EVENTUALLY, 0.05)
        holder.process.send_signal(signal.SIGCONT)
        pg.wait_for(
            lambda: "another server replays the outbox" in holder.status().outbox_waiting,
            EVENTUALLY,
            0.2,
        )
        assert (
            "cloud replayer lease lost: writes stopped"
            in (tmp_path / f"{holder.name}.log").read_text()
        )
        assert recorded_persons(url) == dict.fromkeys(MEMBERS, 1)
        assert len(emu.persons()) == len(MEMBERS) + 1  # the late, faceless orphan

        started = survivor.stub.SyncCloud(pb.SyncCloudRequest(), timeout=30)

        def reconciled() -> bool:
            answer = survivor.stub.SyncCloud(pb.SyncCloudRequest(report_only=True), timeout=30)
            return bool(answer.finished.reconciliation_id == started.running.reconciliation_id)

        pg.wait_for(reconciled, EVENTUALLY, 0.2)
        one_person_per_member(emu)
        assert emu.answered("LargePersonGroupPerson_Delete") == 1  # the orphan
        assert emu.answered(ADD_FACE) == FACES
        pg.wait_for(lambda: survivor.status().cloud_training == "idle", EVENTUALLY, 0.2)
        for server in (survivor, holder):
            grants_by_the_cloud(server, faces)
