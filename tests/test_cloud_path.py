"""The cloud path's rules, one test (or a few) per case of issue 11, on a fake Face API client
(no HTTP, no clock but the injected one): the outbox's classified failures, the replayer's
own back-off, the training state machine, never a runner-up's grant, readiness, the
client-side rate limit, stores that own their persons, the sweep after a lost create, and
the price model. The same rules against the emulator through the real SDK:
tests/test_cloud_e2e.py; the SDK's error parsing against canned answers:
tests/test_azure_errors.py."""

from __future__ import annotations

import io
import itertools
import socket
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from facegate_server.cloud.azure import (
    AzureSettings,
    CloudFailure,
    CloudPersonInfo,
    DetectedFace,
    TransactionCounter,
    member_of_data,
)
from facegate_server.cloud.cost import PriceModel
from facegate_server.cloud.engine import AzureEngine, CloudPeople
from facegate_server.cloud.health import CloudHealth, Readiness
from facegate_server.cloud.photos import MAX_BYTES, MAX_SIDE, acceptable, for_cloud
from facegate_server.cloud.ratelimit import TIER_RATES, CloudRate
from facegate_server.cloud.sync import CloudSync, Training, poll_delays
from facegate_server.config import SettingsError, load_settings
from facegate_server.domain import (
    Change,
    ChangeKind,
    Decision,
    EngineOutcome,
    FaceBox,
    FaceTemplate,
)
from facegate_server.engines.base import EngineFailure
from facegate_server.engines.memory import MemoryEngine
from facegate_server.routing.breaker import CircuitBreaker, CircuitState
from facegate_server.routing.router import RoutingEngine
from facegate_server.store import MemoryStore
from facegate_server.store.reports import reports_from_json, reports_json
from PIL import Image

from tests.helpers import FakeClock

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def photo(seed: int = 0, size: tuple[int, int] = (200, 200), fmt: str = "JPEG") -> bytes:
    """A small noisy image (over the Face API's 1 KB)."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def refused(status: int, code: str, message: str = "", **kw: Any) -> CloudFailure:
    outcome = kw.pop("outcome", EngineOutcome.ERROR)
    return CloudFailure(outcome, f"HTTP {status} {code}: {message}", status=status, code=code, **kw)


@dataclass
class FakeFace:
    """The AzureFace operations the replayer and the engine use, in memory. `fail` maps an
    operation to failures raised, one a call, before it succeeds."""

    store_id: str = "store-a"
    group: dict[str, CloudPersonInfo] = field(default_factory=dict)
    fail: dict[str, list[CloudFailure]] = field(default_factory=dict)
    refuse_photo: set[bytes] = field(default_factory=set)
    training: str = "nonstarted"
    trains: int = 0
    model: str | None = "recognition_04"
    detect_faces: list[DetectedFace] = field(default_factory=list)
    candidates: list[tuple[str, float]] = field(default_factory=list)
    counter: TransactionCounter = field(default_factory=TransactionCounter)
    rate: CloudRate = field(default_factory=lambda: CloudRate(0))
    lose_create_answer: bool = False
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.settings = AzureSettings("http://fake", "key", store_id=self.store_id)

    def _op(self, name: str, urgent: bool = False) -> None:
        wait = self.rate.take(urgent=urgent)
        if wait > 0:
            raise CloudFailure(
                EngineOutcome.THROTTLED,
                "client-side rate limit",
                code="ClientRateLimit",
                retry_after=wait,
                engine_fault=False,
            )
        self.counter.count(name)
        pending = self.fail.get(name)
        if pending:
            raise pending.pop(0)

    # The engine's
    def detect(self, image: bytes, timeout: float, *, urgent: bool = True) -> list[DetectedFace]:
        self._op("detect", urgent)
        return list(self.detect_faces)

    def identify(
        self, face_id: str, timeout: float, max_candidates: int = 2
    ) -> list[tuple[str, float]]:
        self._op("identify", urgent=True)
        return list(self.candidates)

    # The replayer's
    def group_model(self) -> str | None:
        self._op("get_group")
        return self.model

    def ensure_group(self) -> bool:
        self._op("get_group")
        return False

    def train(self) -> None:
        self._op("train")
        if self.training == "running":
            raise refused(
                409, "LargePersonGroupTrainingNotFinished", outcome=EngineOutcome.NOT_TRAINED
            )
        self.trains += 1
        self.training = "running"

    def training_status(self) -> tuple[str, str]:
        self._op("training_status")
        return self.training, ""

    def create_person(self, member_id: str) -> str:
        self._op("create_person")
        person_id = f"{self.store_id[:6]}-p{next(self._ids)}"
        self.group[person_id] = CloudPersonInfo(person_id, self.settings.tag + member_id, ())
        if self.lose_create_answer:
            self.lose_create_answer = False
            raise CloudFailure(EngineOutcome.TIMED_OUT, "answer lost")
        return person_id

    def add_face(self, person_id: str, data: bytes, tag: str) -> str:
        self._op("add_face")
        if data in self.refuse_photo:
            raise refused(400, "InvalidImage", "No face detected in the image.")
        if person_id not in self.group:
            raise refused(404, "PersonNotFound", "Person ID is invalid.")
        persisted = f"f{next(self._ids)}"
        person = self.group[person_id]
        self.group[person_id] = CloudPersonInfo(
            person_id, person.user_data, (*person.persisted_face_ids, persisted)
        )
        return persisted

    def person_faces(self, person_id: str) -> tuple[str, ...]:
        self._op("get_person")
        return self.group[person_id].persisted_face_ids

    def face_tag(self, person_id: str, persisted: str) -> str:
        self._op("get_face")
        return ""

    def delete_person(self, person_id: str) -> None:
        self._op("delete_person")
        self.group.pop(person_id, None)

    def delete_face(self, person_id: str, persisted: str) -> None:
        self._op("delete_face")

    def persons_page(
        self, start: str | None, top: int = 1000
    ) -> tuple[list[CloudPersonInfo], str | None]:
        self._op("list_persons")
        ordered = sorted(self.group.values(), key=lambda p: p.person_id)
        after = [p for p in ordered if start is None or p.person_id > start][:top]
        return after, (after[-1].person_id if len(after) == top else None)

    def persons(self) -> list[CloudPersonInfo]:
        self._op("list_persons")
        return list(self.group.values())

    def member_of(self, person: CloudPersonInfo) -> str | None:
        return member_of_data(person.user_data, self.settings.tag)

    def members(self) -> list[str]:
        """The members of this store's persons, sorted (duplicates show twice)."""
        return sorted(m for p in self.group.values() if (m := self.member_of(p)) is not None)


class World:
    """A store, the fake cloud, the replayer and the engine, on one fake clock."""

    def __init__(self, face: FakeFace | None = None) -> None:
        self.clock = FakeClock()
        self.store = MemoryStore()
        self.face = face or FakeFace(store_id=self.store.store_id())
        self.people = CloudPeople(self.store)
        self.health = CloudHealth()
        self.sync = CloudSync(
            self.face,  # type: ignore[arg-type]
            self.store,
            self.people,
            self.health,
            clock=self.clock,
        )
        self.engine = AzureEngine(self.face, self.people, health=self.health)  # type: ignore[arg-type]

    def enrol(self, member_id: str, *photos: bytes) -> None:
        templates = [
            FaceTemplate(embedding=np.zeros(128), cloud_photo=p) for p in photos or (photo(),)
        ]
        self.store.create_member(member_id, "", templates, T0)

    def reconcile(self, dry_run: bool) -> list[Change]:
        """Ask for a reconciliation and tick until it has finished; its changes."""
        started = self.sync.request_reconcile(dry_run).running
        assert started is not None
        for _ in range(100):
            self.sync.run_once()
            last = self.sync.reconciliation
            if last and last.reconciliation_id == started.reconciliation_id and not last.running:
                return list(last.changes)
        raise AssertionError(f"the reconciliation did not finish: {self.sync.reconciliation}")

    def settle(self, rounds: int = 200) -> None:
        for _ in range(rounds):
            self.sync.run_once()
            if self.store.outbox_depth() == 0 and self.sync.training is Training.IDLE:
                if self.face.training == "running":
                    self.face.training = "succeeded"
                    continue
                return
            self.clock.advance(1.0)
            if self.face.training == "running":
                self.face.training = "succeeded"
        raise AssertionError(f"did not settle: {self.sync.training}, {self.sync.waiting}")


# 1. Outbox failures classified
def test_a_refused_photo_is_parked_and_the_ten_behind_it_reach_the_cloud() -> None:
    world = World()
    bad = photo(99)
    world.face.refuse_photo.add(bad)
    world.enrol("m-bad", bad)
    for n in range(10):
        world.enrol(f"m-{n}", photo(n))
    world.settle()
    assert world.face.members() == sorted(["m-bad", *(f"m-{n}" for n in range(10))])
    [parked] = world.store.outbox_parked(10)
    assert parked.member_id == "m-bad" and "InvalidImage" in parked.parked
    assert world.store.outbox_depth() == 0 and world.store.outbox_parked_count() == 1
    assert all(world.people.ready(f"m-{n}") for n in range(10))
    # The member's cloud state says so (GetMember).
    assert world.sync.cloud_state("m-bad").startswith("1 change(s) refused by the cloud: HTTP")
    assert world.sync.cloud_state("m-0") == "ready"
    world.enrol("m-new")
    assert world.sync.cloud_state("m-new") == "1 change(s) waiting to be sent"
    # Retried only when an operator asks: the cloud takes it now.
    world.face.refuse_photo.clear()
    assert world.sync.retry_parked() == 1
    world.settle()
    assert world.store.outbox_parked_count() == 0
    assert len(world.face.group[world.people.person_of("m-bad").person_id].persisted_face_ids) == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("failure", "readiness", "advice"),
    [
        (
            refused(401, "401", "Access denied due to invalid subscription key."),
            "paused",
            "FACEGATE_AZURE_KEY",
        ),
        (
            refused(
                403,
                "",
                "Out of call volume quota for FaceAPI. Quota will be replenished in 2 days.",
            ),
            "paused",
            "quota",
        ),
        (
            refused(403, "UnsupportedFeature", "Feature is not supported"),
            "off",
            "aka.ms/facerecognition",
        ),
    ],
)
def test_a_fault_of_the_resource_pauses_everything_until_the_check_passes(
    failure: CloudFailure, readiness: str, advice: str
) -> None:
    world = World()
    world.enrol("m-1")
    world.enrol("m-2")
    world.face.fail["create_person"] = [failure]
    world.sync.run_once()  # the check passes; the replay meets the fault
    world.face.fail["detect"] = [failure]  # the next readiness check, while it lasts
    state = world.health.state
    assert state.readiness.value == readiness and advice in state.describe()
    assert world.store.outbox_depth() == 2 and world.store.outbox_parked_count() == 0
    assert "retrying in" in world.sync.waiting
    creates = world.face.counter.totals().get("create_person", 0)
    world.sync.run_once()  # before the back-off ends: nothing is called
    assert world.face.counter.totals().get("create_person", 0) == creates
    world.clock.advance(world.sync._retry_delay)
    world.sync.run_once()  # the check fails again: still paused, nothing replayed
    assert world.health.state.readiness.value == readiness
    assert world.face.counter.totals().get("create_person", 0) == creates
    world.clock.advance(world.sync._retry_delay)
    world.settle()  # the check passes: the outbox resumes by itself
    assert world.health.state.readiness is Readiness.READY
    assert world.face.members() == ["m-1", "m-2"]


def test_a_person_deleted_behind_our_back_is_made_again() -> None:
    world = World()
    world.enrol("m-1")
    world.settle()
    [gone] = list(world.face.group)
    del world.face.group[gone]
    world.store.add_templates(
        "m-1", [FaceTemplate(embedding=np.zeros(128), cloud_photo=photo(5))], T0
    )
    world.settle()
    assert world.face.members() == ["m-1"]
    again = world.people.person_of("m-1")
    assert again is not None and again.person_id != gone and again.ready


def test_photos_the_cloud_cannot_take_are_converted() -> None:
    small = photo(1)
    assert acceptable(small) and for_cloud(small) is small  # sent as it is
    wide = photo(2, (3000, 1500), "PNG")
    converted = for_cloud(wide)
    with Image.open(io.BytesIO(converted)) as image:
        assert image.format == "JPEG" and max(image.size) == MAX_SIDE
        assert image.size == (1920, 960)
    huge = photo(3, (1900, 1300), "BMP")  # 7.4 MB: over the Face API's 6 MB
    assert len(huge) > MAX_BYTES
    fixed = for_cloud(huge)
    assert len(fixed) <= MAX_BYTES and acceptable(fixed)
    tiff = photo(4, (400, 400), "TIFF")  # a format the Face API does not take
    assert not acceptable(tiff)
    assert for_cloud(tiff) == tiff  # FaceGate cannot decode it either: the cloud decides


# 2. The outbox never touches the doors' breaker
def test_enrolment_work_never_opens_the_turnstiles_circuit() -> None:
    world = World()
    breaker = CircuitBreaker(failure_threshold=1, clock=world.clock)
    world.enrol("m-1")
    world.face.fail["create_person"] = [
        refused(503, "ServiceUnavailable"),
        CloudFailure(EngineOutcome.TIMED_OUT, "no answer in time"),
        refused(429, "RateLimitExceeded", outcome=EngineOutcome.THROTTLED, retry_after=3),
    ]
    delays = []
    for _ in range(3):
        world.sync.run_once()
        delays.append(world.sync._retry_delay)
        world.clock.advance(world.sync._retry_delay)
    assert delays == [1.0, 2.0, 4.0]  # its own back-off (the 429's 3 s is less than due)
    world.face.training = "running"  # a 409 on Train: "running", not a failure
    world.settle()
    assert breaker.state is CircuitState.CLOSED and breaker.allow()
    assert world.face.members() == ["m-1"]


# 3. Training: one state machine
def test_training_is_read_at_start_up_and_never_overwritten_while_running() -> None:
    world = World()
    world.enrol("m-1")
    world.face.training = "running"  # a restart mid-training
    world.sync.run_once()
    assert world.sync.training is Training.RUNNING and world.sync.training_queued
    assert world.face.trains == 0  # no Train while one runs
    world.enrol("m-2")
    world.enrol("m-3")
    for _ in range(5):
        world.clock.advance(1)
        world.sync.run_once()
    assert world.sync.training is Training.RUNNING and world.face.trains == 0
    world.face.training = "succeeded"
    world.clock.advance(60)
    world.sync.run_once()  # the running one finished: the one queued behind it starts
    assert world.face.trains == 1 and world.sync.training is Training.RUNNING
    assert not world.sync.training_queued
    world.settle()
    assert world.face.trains == 1
    assert all(world.people.ready(m) for m in ("m-1", "m-2", "m-3"))


def test_a_409_on_train_means_running_and_queues_one_behind_it() -> None:
    world = World()
    world.enrol("m-1")
    world.sync.run_once()
    world.face.training = "running"  # another server (or a lost answer) started one
    world.sync.training = Training.NEEDED
    world.sync.run_once()
    assert world.sync.training is Training.RUNNING and world.sync.training_queued


def test_polls_back_off_with_the_group_size() -> None:
    assert poll_delays(0) == (1.0, 30.0)
    first, longest = poll_delays(1_000_000)
    assert first == 101.0 and longest == 530.0
    world = World()
    world.enrol("m-1")
    world.sync.run_once()  # trains
    polls = []
    for _ in range(12):
        world.clock.advance(world.sync._next_poll - world.clock())
        world.sync.run_once()
        polls.append(world.sync._poll_delay)
    assert polls == sorted(polls)
    assert polls[0] == pytest.approx(1.5, abs=0.01) and polls[-1] == pytest.approx(30, abs=0.01)


# 4. Never a runner-up's grant
def identify(
    world: World, candidates: list[tuple[str, float]], boxes: list[FaceBox] | None = None
) -> Any:
    boxes = boxes or [FaceBox(0, 0, 100, 100)]
    world.face.detect_faces = [DetectedFace(f"face-{i}", b) for i, b in enumerate(boxes)]
    world.face.candidates = candidates
    return world.engine.identify(photo(), 5.0)


def enrolled_pair() -> tuple[World, str, str]:
    world = World()
    world.enrol("m-a")
    world.enrol("m-b")
    world.settle()
    a, b = (world.people.person_of(m).person_id for m in ("m-a", "m-b"))  # type: ignore[union-attr]
    return world, a, b


def test_a_deleted_members_runner_up_is_never_granted() -> None:
    world, a, b = enrolled_pair()
    world.store.delete_member("m-a", cloud=True)
    world.engine.removed("m-a")
    with pytest.raises(EngineFailure) as raised:
        identify(world, [(a, 0.92), (b, 0.55)])
    assert raised.value.outcome is EngineOutcome.NOT_USED and not raised.value.engine_fault
    # Another store's person (or one FaceGate never made) on top: no answer either.
    with pytest.raises(EngineFailure):
        identify(world, [("someone-elses", 0.95), (b, 0.55)])


def test_through_the_router_the_local_engine_decides_and_the_circuit_stays_closed() -> None:
    world, a, b = enrolled_pair()
    world.store.delete_member("m-a", cloud=True)
    world.engine.removed("m-a")
    world.face.detect_faces = [DetectedFace("face-0", FaceBox(0, 0, 100, 100))]
    world.face.candidates = [(a, 0.92), (b, 0.55)]
    local = MemoryEngine()
    frame = photo(7)
    router = RoutingEngine(local, world.engine, breaker=CircuitBreaker(1, clock=world.clock))
    try:
        found = router.identify(frame, 5.0)
    finally:
        router.close()
    assert found.decision is not Decision.GRANTED and found.engine.value == "LOCAL"
    assert {r.engine.value: r.outcome for r in found.reports}["AZURE"] is EngineOutcome.NOT_USED
    assert router.breaker.state is CircuitState.CLOSED
    # What the cloud cost for this entry goes with its report into the access log.
    [cloud] = [r for r in found.reports if r.engine.value == "AZURE"]
    assert cloud.transactions == 2 == found.cloud_transactions
    assert reports_from_json(reports_json(found.reports)) == found.reports
    assert (
        reports_from_json(
            '[{"engine": "AZURE", "outcome": "ERROR", "decision": null,'
            ' "member_id": "", "confidence": 0, "detail": "", "latency_us": null}]'
        )[0].transactions
        == 0
    )


def test_the_margin_and_the_threshold_apply_to_the_clouds_candidates() -> None:
    world, a, b = enrolled_pair()
    assert identify(world, [(a, 0.80), (b, 0.75)]).decision is Decision.DENIED_AMBIGUOUS
    granted = identify(world, [(a, 0.80), (b, 0.65)])
    assert (granted.decision, granted.member_id) == (Decision.GRANTED, "m-a")
    assert identify(world, [(a, 0.45)]).decision is Decision.DENIED_UNKNOWN_FACE
    world.engine.threshold = 0.4
    assert identify(world, [(a, 0.45)]).decision is Decision.GRANTED


def test_a_person_queueing_behind_does_not_deny_the_one_in_front() -> None:
    world, a, _ = enrolled_pair()
    near, far = FaceBox(100, 100, 200, 200), FaceBox(400, 50, 60, 60)
    granted = identify(world, [(a, 0.9)], [far, near])
    assert (granted.decision, granted.member_id) == (Decision.GRANTED, "m-a")
    assert granted.face_box == near
    two = identify(world, [(a, 0.9)], [FaceBox(0, 0, 150, 150), FaceBox(300, 0, 120, 120)])
    assert two.decision is Decision.DENIED_MULTIPLE_FACES


# 5. Readiness
def test_the_readiness_check_says_what_to_do() -> None:
    world = World()
    assert world.health.check(world.face).readiness is Readiness.READY  # type: ignore[arg-type]
    world.face.model = "recognition_01"
    state = world.health.check(world.face)  # type: ignore[arg-type]
    assert state.readiness is Readiness.OFF
    assert "FACEGATE_AZURE_RECOGNITION_MODEL=recognition_01" in state.describe()
    world.face.model = "recognition_04"
    world.face.fail["detect"] = [refused(403, "UnsupportedFeature", "missing approval")]
    assert world.health.check(world.face).readiness is Readiness.OFF  # type: ignore[arg-type]
    assert world.health.check(world.face).readiness is Readiness.READY  # type: ignore[arg-type]


def test_an_off_cloud_costs_no_transactions_and_comes_back_with_the_check() -> None:
    world, a, _ = enrolled_pair()
    no_face_id = CloudFailure(EngineOutcome.ERROR, "no faceId", status=200, code="NoFaceId")
    world.face.fail["detect"] = [no_face_id, no_face_id]  # the frame, then the first check
    with pytest.raises(EngineFailure):
        identify(world, [(a, 0.9)])
    assert world.health.off and "Limited Access" in world.health.state.advice + "Limited Access"
    before = world.face.counter.total()
    for _ in range(5):
        with pytest.raises(EngineFailure) as raised:
            identify(world, [(a, 0.9)])
        assert raised.value.outcome is EngineOutcome.NOT_USED and not raised.value.engine_fault
    assert world.face.counter.total() == before  # no transaction while off
    world.sync.run_once()  # the check: still no faceId
    assert world.health.off
    world.clock.advance(world.sync._retry_delay)
    world.sync.run_once()  # the check passes
    assert not world.health.off
    assert identify(world, [(a, 0.9)]).decision is Decision.GRANTED


# 6. The client-side rate limit
def test_the_rate_limit_serves_identify_first() -> None:
    clock = FakeClock()
    rate = CloudRate(10, clock=clock)  # S0: 10 a second, a burst of 10, 5 kept for frames
    outbox = 0
    while rate.take(urgent=False) == 0.0:
        outbox += 1
    assert outbox == 5  # the outbox leaves the reserve
    frames = 0
    while rate.take(urgent=True) == 0.0:
        frames += 1
    assert frames == 5
    wait = rate.take(urgent=True)
    assert wait == pytest.approx(0.1)
    clock.advance(0.1)
    assert rate.take(urgent=True) == 0.0
    rate.hold_off(3.0)  # a 429 said wait 3 s
    assert rate.take(urgent=True) > 2.9
    assert TIER_RATES["F0"] == pytest.approx(20 / 60)
    assert CloudRate(0).take(urgent=False) == 0.0  # 0: no limit


def test_a_throttled_outbox_backs_off_for_what_it_was_told() -> None:
    world = World()
    world.enrol("m-1")
    world.face.fail["create_person"] = [
        refused(429, "RateLimitExceeded", outcome=EngineOutcome.THROTTLED, retry_after=17)
    ]
    world.sync.run_once()
    assert world.sync._retry_delay == 17.0


def test_the_outbox_keeps_to_the_rate_without_backing_off_or_doubting_itself() -> None:
    world = World()
    world.face.rate = CloudRate(10, clock=world.clock)  # 5 tokens spare for the outbox
    for n in range(6):
        world.enrol(f"m-{n}")
    world.sync.run_once()  # the readiness check (2), the group, the training read: 4
    assert world.store.outbox_depth() == 6  # 2 left: not enough to start an entry...
    assert world.sync.waiting.startswith("keeping to") and world.sync._retry_delay == 0.0
    world.clock.advance(0.2)
    world.sync.run_once()
    assert world.store.outbox_depth() == 5  # ...then one entry (create + add) at a time
    assert all(e.attempts == 0 for e in world.store.outbox(10))  # none cut short
    for _ in range(10):
        world.clock.advance(0.5)
        world.sync.run_once()
    assert world.store.outbox_depth() == 0 and world.face.members() == [f"m-{n}" for n in range(6)]
    assert not world.sync.sweeping  # no replay was uncertain


# 7. Each store owns its persons
def test_two_stores_on_one_group_keep_each_others_persons() -> None:
    first = World()
    first.enrol("m-1")
    first.settle()
    second = World()
    second.face.group = first.face.group  # one resource, one group
    second.enrol("m-2")
    second.settle()
    for world in (first, second):
        changes = world.reconcile(dry_run=False)
        assert changes == []
    assert sorted(first.face.members()) == ["m-1"] and second.face.members() == ["m-2"]
    assert len(first.face.group) == 2


def test_a_reconciliation_runs_a_page_a_tick_while_the_outbox_moves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("facegate_server.cloud.sync.PAGE", 2)
    monkeypatch.setattr("facegate_server.cloud.sync.MEMBER_PAGE", 2)
    world = World()
    kept = FaceTemplate(embedding=np.zeros(128), photo=photo(7), cloud_photo=photo(7))
    world.store.create_member("m-kept", "", [kept], T0)
    for n in range(4):
        world.enrol(f"m-{n}")
    world.settle()
    orphan = world.face.create_person("gone")  # this store's, unknown to it
    person = world.people.person_of("m-kept")
    assert person is not None
    world.face.group[person.person_id] = CloudPersonInfo(
        person.person_id, world.face.group[person.person_id].user_data, ()
    )
    read: list[int] = []
    face_photo = world.store.face_photo
    monkeypatch.setattr(world.store, "face_photo", lambda i: read.append(i) or face_photo(i))

    report = world.sync.request_reconcile(dry_run=False)
    assert report.running is not None and report.finished is None  # answered at once
    assert report.running.phase == "persons" and world.face.counter.totals()
    lists = world.face.counter.totals().get("list_persons", 0)
    world.sync.run_once()
    assert world.face.counter.totals()["list_persons"] == lists + 1  # one page a tick
    progress = world.sync.reconciliation
    assert progress is not None and (progress.phase, progress.persons_checked) == ("persons", 2)
    world.enrol("m-new")  # enrolled mid-reconciliation: replayed, not reported missing
    world.sync.run_once()
    assert world.store.outbox_depth() == 0
    for _ in range(10):
        world.sync.run_once()
    done = world.sync.reconciliation
    assert done is not None and not done.running and done.members_checked == 6
    assert sorted((c.kind.value, c.member_id, c.applied) for c in done.changes) == [
        ("missing_face", "m-kept", True),
        ("orphan_person", "gone", True),
    ]
    assert orphan not in world.face.group
    assert len(world.face.group[person.person_id].persisted_face_ids) == 1
    assert len(read) == 1  # the one kept photo it re-added; no other photo read


def test_the_background_thread_runs_the_pages_back_to_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pages follow each other without waiting for the replayer's interval (a minute here)."""
    monkeypatch.setattr("facegate_server.cloud.sync.PAGE", 1)
    world = World()
    for n in range(5):
        world.enrol(f"m-{n}")
    world.settle()
    world.sync.interval = 60.0
    finished = threading.Event()
    reconciled_one = world.sync._reconciled_one

    def noted(r: Any) -> None:
        reconciled_one(r)
        finished.set()

    monkeypatch.setattr(world.sync, "_reconciled_one", noted)
    world.sync.start()
    try:
        world.sync.request_reconcile(dry_run=True)
        assert finished.wait(30)
    finally:
        world.sync.stop()
    done = world.sync.reconciliation
    assert done is not None and (done.persons_checked, done.members_checked) == (5, 5)


def test_a_reconciliation_is_joined_and_one_of_the_other_kind_queued() -> None:
    world = World()
    world.enrol("m-1")
    world.settle()
    first = world.sync.request_reconcile(dry_run=True).running
    joined = world.sync.request_reconcile(dry_run=True).running
    queued = world.sync.request_reconcile(dry_run=False).running
    assert first is not None and joined is not None and queued is not None
    assert first.reconciliation_id == joined.reconciliation_id == 1
    assert (queued.reconciliation_id, queued.phase) == (2, "queued")
    polled = world.sync.request_reconcile(dry_run=False, report_only=True)
    assert polled.running is not None and polled.running.reconciliation_id == 1
    for _ in range(10):
        world.sync.run_once()
    last = world.sync.reconciliation
    assert last is not None and (last.reconciliation_id, last.dry_run, last.running) == (
        2,
        False,
        False,
    )
    assert world.sync.request_reconcile(dry_run=True, report_only=True).running is None


def test_a_reconciliation_waits_out_a_failing_page_and_reports_once() -> None:
    world = World()
    world.enrol("m-1")
    world.settle()
    world.face.create_person("gone")
    world.sync.request_reconcile(dry_run=True)
    world.face.fail["list_persons"] = [refused(500, "InternalServerError")]
    world.sync.run_once()
    waiting = world.sync.reconciliation
    assert waiting is not None and waiting.running and "retrying" in waiting.waiting
    world.clock.advance(2)
    world.sync.run_once()
    world.sync.run_once()
    done = world.sync.reconciliation
    assert done is not None and not done.running
    assert [(c.kind, c.applied) for c in done.changes] == [(ChangeKind.ORPHAN_PERSON, False)]


def test_the_group_id_is_validated() -> None:
    assert load_settings({}, azure_group_id="gym-north_1").azure_group_id == "gym-north_1"
    for bad in ("Gym", "gym north", "x" * 65):
        with pytest.raises(SettingsError, match="FACEGATE_AZURE_GROUP_ID"):
            load_settings({}, azure_group_id=bad)


# 8. A lost PersonCreate: found by the background sweep, not on the replay path
def test_a_lost_create_is_swept_up_in_the_background() -> None:
    world = World()
    world.face.lose_create_answer = True
    world.enrol("m-1")
    world.sync.run_once()  # the create took effect; its answer was lost
    assert world.face.members() == ["m-1"]
    world.clock.advance(1)
    world.sync.run_once()  # the replay creates again (no listing) and starts the sweep
    lists_on_replay = world.face.counter.totals().get("list_persons", 0)
    world.settle()
    assert world.face.members() == ["m-1"]  # the lost one was swept
    assert lists_on_replay <= 1 and not world.sync.sweeping
    assert world.people.person_of("m-1").person_id in world.face.group  # type: ignore[union-attr]


# 9. Cost
def test_every_billable_call_is_counted_by_operation() -> None:
    world = World()
    world.enrol("m-1", photo(1), photo(2))
    world.settle()
    totals = world.face.counter.totals()
    for operation in ("create_person", "add_face", "train", "training_status"):
        assert totals.get(operation), operation
    assert totals["add_face"] == 2


def test_the_price_model_of_each_tier() -> None:
    s0, f0 = PriceModel("S0"), PriceModel("F0")
    # The README's example: 2,000 members, 12 visits a month, 3 photos each.
    month = readme_example()
    assert month == 53_700
    assert s0.monthly(month, 2_000 * 3) == pytest.approx(53.76)
    assert f0.monthly(month, 6_000) == 0.0 and f0.over_quota(month)
    assert s0.describe({"detect": 10, "identify": 10}) == "S0: 20 transactions, $0.02"
    assert f0.describe({"detect": 3}) == "F0: 3 of 30000 free transactions a month"


def readme_example() -> int:
    """Transactions a month of the README's gym (the Cost paragraph shows the sums)."""
    entries = 2_000 * 12
    identify = entries * 2  # detect + identify
    retried = identify // 10  # a frame in ten is sent again
    churn = 100  # members enrolled and as many deleted a month
    enrolment = churn * (1 + 3)  # person create + 3 add-face
    deletion = churn
    training = churn * (1 + 3)  # enrolled one at a time: a train and ~3 polls each
    return identify + retried + enrolment + deletion + training


def test_the_start_up_check_runs_in_the_background_and_never_delays_serving(
    tmp_path: Path,
) -> None:
    import grpc
    from facegate.v1 import facegate_service_pb2 as pb
    from facegate.v1 import facegate_service_pb2_grpc as pb_grpc

    from tests.helpers import running_server

    hung = socket.socket()  # accepts connections (the backlog) and never answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    try:
        endpoint = f"http://127.0.0.1:{hung.getsockname()[1]}"
        with (
            running_server(
                tmp_path,
                engine=MemoryEngine(),
                azure_endpoint=endpoint,
                azure_key="k",
                azure_timeout_s=2,
            ) as server,
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            stub = pb_grpc.FaceGateServiceStub(channel)
            state = stub.GetStatus(pb.GetStatusRequest(), timeout=5)
            # Serving while the check waits for a cloud that never answers.
            assert state.cloud_readiness == "checking" and state.routing_policy == "cloud-first"
    finally:
        hung.close()


def test_facegate_status_explains_a_parked_photo_and_sync_retries_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from facegate.v1 import facegate_service_pb2 as pb
    from facegate_client.cli import main

    from tests.cloud import cloud_gate, emulator

    with emulator() as emu, cloud_gate(emu, tmp_path, engine=MemoryEngine()) as gate:
        refused_photo = photo(42, (400, 400))  # no face: the Face API answers InvalidImage
        gate.stub.Enroll(pb.EnrollRequest(member_id="m-bad", photos=[refused_photo]), timeout=30)
        gate.server.gate.replayer.run_once()  # type: ignore[union-attr]
        target = f"127.0.0.1:{gate.server.port}"
        assert main(["status", "--target", target]) == 0
        shown = capsys.readouterr().out
        assert "cloud: ready" in shown
        assert "outbox parked: 1 (retry: facegate sync --retry-parked)" in shown
        assert "add_face m-bad face 1: HTTP 400 InvalidImage" in shown
        assert "cloud cost: S0: " in shown
        assert main(["members", "get", "--target", target, "m-bad"]) == 0
        assert "cloud: 1 change(s) refused by the cloud: HTTP 400 InvalidImage" in (
            capsys.readouterr().out
        )
        assert main(["sync", "--retry-parked", "--target", target]) == 0
        assert capsys.readouterr().out == "1 parked changes put back in line\n"
        assert gate.server.store.outbox_depth() == 1
