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

Waits poll with generous timeouts (the machine is shared); the figures are printed (`-s`).
"""

from __future__ import annotations

import json
import queue
import signal
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


@dataclass
class Server:
    """One `facegate serve` of the chain."""

    name: str
    process: subprocess.Popen[str]
    target: str
    stub: pb_grpc.FaceGateServiceStub

    def status(self) -> pb.GetStatusResponse:
        answer: pb.GetStatusResponse = self.stub.GetStatus(pb.GetStatusRequest(), timeout=10)
        return answer


@contextmanager
def serve(name: str, tmp_path: Path, url: str, emu: Emulator) -> Iterator[Server]:
    settings = {
        "FACEGATE_DATA_DIR": str(tmp_path / name),
        "FACEGATE_WORKERS": "1",
        "FACEGATE_STORE": url,
        "FACEGATE_AZURE_ENDPOINT": emu.endpoint,
        "FACEGATE_AZURE_KEY": KEY,
        "FACEGATE_AZURE_RATE": "0",  # the emulator has none either
        "FACEGATE_ROUTING_POLICY": "cloud-first",
        "FACEGATE_IDENTIFY_BUDGET_MS": "4000",  # the tests share two cores with the cloud
        "FACEGATE_SYNC_INTERVAL_S": "0.2",
        "FACEGATE_CLOUD_LEASE_TTL_S": str(TTL),
        "FACEGATE_AZURE_TIMEOUT_S": "30",  # no call given up (and made twice) on a slow machine
    }
    process, target = start_serve(settings, tmp_path / f"{name}.log")
    try:
        with grpc.insecure_channel(target) as channel:
            yield Server(name, process, target, pb_grpc.FaceGateServiceStub(channel))
    finally:
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


@pytest.mark.parametrize("how", ["killed-mid-create", "create-answer-lost"])
def test_killing_the_replaying_server_lets_the_other_finish_with_no_duplicate_person(
    tmp_path: Path, url: str, faces: Faces, how: str
) -> None:
    """killed-mid-create: the holder is killed while its PersonCreate hangs (the cloud
    drops it: no person). create-answer-lost: the holder is frozen while its PersonCreate
    hangs, the create then takes effect, and the holder is killed before it could read the
    answer (a person the store does not know): the survivor must find that person, not
    make a second one."""
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
        pg.wait_for(lambda: holder.status().cloud_readiness == "ready", EVENTUALLY, 0.2)

        # The cloud refuses connections: enrolments (through both servers) commit, and
        # the shared outbox fills.
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
        killed = time.monotonic()

        # The survivor takes the lease over when it lapses, and empties the outbox.
        def taken() -> bool:
            now = lease(url)
            return now is not None and now.pid == survivor.process.pid

        took_lease = pg.wait_for(taken, EVENTUALLY, 0.1)
        pg.wait_for(lambda: survivor.status().outbox_depth == 0, EVENTUALLY, 0.2)
        print(
            f"\n{how}: killed with {pending} of {FACES} entries pending; the survivor held the"
            f" lease after {took_lease:.1f} s and emptied the outbox after"
            f" {time.monotonic() - killed:.1f} s (lease ttl {TTL:.0f} s)"
        )
        after = lease(url)
        assert after is not None and after.token > held.token  # a takeover: the token grew
        state = survivor.status()
        assert state.outbox_parked == 0, state.parked

        # Exactly one person per member, holding exactly the member's enrolled faces;
        # and never a person or a face made twice (none made, then deleted, either).
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
        if how == "create-answer-lost":
            # The survivor adopted the person the killed holder made and never recorded.
            log = (tmp_path / f"{survivor.name}.log").read_text()
            assert "cloud person of an earlier attempt found: kept" in log
        assert emu.answered(CREATE) == len(MEMBERS)
        assert emu.answered(ADD_FACE) == FACES
        assert emu.answered("LargePersonGroupPerson_Delete") == 0
        assert emu.answered("LargePersonGroupPerson_DeleteFace") == 0

        # The survivor trains the group and grants every member at the turnstile, the
        # cloud deciding once its training has finished.
        pg.wait_for(lambda: survivor.status().cloud_training == "idle", EVENTUALLY, 0.2)
        for member, (_, frame) in MEMBERS.items():
            request = pb.IdentifyRequest(image=faces.read(f"people/{frame}"), turnstile_id="gate-1")

            def granted_by_the_cloud(
                request: pb.IdentifyRequest = request, member: str = member
            ) -> bool:
                answer = survivor.stub.Identify(request, timeout=30)
                assert (answer.decision, answer.member_id) == (pb.DECISION_GRANTED, member)
                return bool(answer.engine == pb.ENGINE_AZURE)

            pg.wait_for(granted_by_the_cloud, EVENTUALLY, 0.5)
