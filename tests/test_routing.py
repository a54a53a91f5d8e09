"""The fallback's rules and the circuit breaker, with test doubles for the two engines and a
hand-moved clock: no sleeps beyond a few tens of milliseconds."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from facegate_server.cloud.azure import CloudCall, CloudFailure
from facegate_server.domain import (
    Decision,
    EngineKind,
    EngineOutcome,
    FaceTemplate,
    Identification,
)
from facegate_server.errors import RecognitionTimeout
from facegate_server.routing.breaker import CircuitBreaker, CircuitState
from facegate_server.routing.router import Agreement, Policy, RoutingEngine
from facegate_server.store import MemoryStore

from tests.cloud import FakeClock

LOCAL, AZURE = EngineKind.LOCAL, EngineKind.AZURE
FRAME = b"\xff\xd8" + bytes(2000)  # above the Face API's 1 KB minimum


def grant(engine: EngineKind, member: str, confidence: float = 0.9) -> Identification:
    return Identification(Decision.GRANTED, engine, member_id=member, confidence=confidence)


def unknown(engine: EngineKind, confidence: float = 0.3) -> Identification:
    return Identification(Decision.DENIED_UNKNOWN_FACE, engine, confidence=confidence)


class FakeLocal:
    def __init__(self, answer: Identification, delay: float = 0.0) -> None:
        self.answer, self.delay, self.calls = answer, delay, 0

    def identify(self, image: bytes, timeout: float) -> Identification:
        self.calls += 1
        if self.delay > timeout:
            time.sleep(timeout)
            raise RecognitionTimeout("too slow")
        time.sleep(self.delay)
        return self.answer


class FakeCloud:
    """Answers, fails, or hangs until released."""

    def __init__(self, answer: Identification | CloudFailure | None = None) -> None:
        self.answer = answer
        self.release = threading.Event()
        self.calls = 0

    def identify(self, image: bytes, timeout: float, call: CloudCall) -> Identification:
        self.calls += 1
        call.transactions += 2
        if self.answer is None:  # hung: held until released or the read timeout
            self.release.wait(timeout)
            raise CloudFailure(EngineOutcome.TIMED_OUT, "read timeout")
        if isinstance(self.answer, CloudFailure):
            raise self.answer
        return self.answer


def router(
    local: Any, cloud: Any, store: MemoryStore | None = None, **options: Any
) -> RoutingEngine:
    return RoutingEngine(local, cloud, store or MemoryStore(), **options)


def outcomes(found: Identification) -> dict[str, str]:
    return {r.engine.value.lower(): r.outcome.value for r in found.reports}


def ready_member(store: MemoryStore, member_id: str, person_id: str) -> None:
    now = datetime.now(UTC)
    store.create_member(member_id, "", [FaceTemplate(np.zeros(128), cloud_photo=b"photo")], now)
    store.save_cloud_person(member_id, person_id)
    store.save_cloud_face(store.faces(member_id)[0].face_id, "pf")
    store.training_queued()
    store.training_succeeded()


# -- the breaker


def test_breaker_opens_after_repeated_failures_and_probes_after_the_cooldown() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, cooldown=10, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    assert not breaker.allow()
    clock.advance(9.9)
    assert not breaker.allow()
    clock.advance(0.2)
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    clock.advance(10)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.allow() and breaker.allow()


def test_a_429_opens_at_once_for_its_retry_after() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=5, cooldown=2, clock=clock)
    breaker.record_failure(retry_after=30)
    assert breaker.state is CircuitState.OPEN
    clock.advance(29)
    assert not breaker.allow()
    clock.advance(2)
    assert breaker.allow()


def test_a_success_resets_the_count() -> None:
    breaker = CircuitBreaker(failure_threshold=2, cooldown=1, clock=FakeClock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED


# -- cloud-first


def test_the_cloud_decides_when_it_answers_and_agrees() -> None:
    found = router(FakeLocal(grant(LOCAL, "m-1")), FakeCloud(grant(AZURE, "m-1"))).identify(
        FRAME, 1.0
    )
    assert (found.decision, found.member_id, found.engine) == (Decision.GRANTED, "m-1", AZURE)
    assert outcomes(found) == {"azure": "DECIDED", "local": "AGREED"}
    assert found.cloud_transactions == 2


def test_engines_granting_different_members_is_a_denial() -> None:
    found = router(FakeLocal(grant(LOCAL, "m-1")), FakeCloud(grant(AZURE, "m-2"))).identify(
        FRAME, 1.0
    )
    assert found.decision is Decision.DENIED_UNKNOWN_FACE
    assert found.member_id == ""
    assert outcomes(found) == {"azure": "DISAGREED", "local": "DISAGREED"}
    assert {r.member_id for r in found.reports} == {"m-1", "m-2"}  # both kept for the log


def test_a_member_not_yet_trained_in_the_cloud_gets_in_through_the_local_engine() -> None:
    found = router(FakeLocal(grant(LOCAL, "m-new")), FakeCloud(unknown(AZURE))).identify(FRAME, 1)
    assert (found.decision, found.member_id, found.engine) == (Decision.GRANTED, "m-new", LOCAL)
    assert outcomes(found) == {"azure": "OUTRANKED", "local": "DECIDED"}


def test_a_trained_member_the_cloud_does_not_recognise_is_denied() -> None:
    store = MemoryStore()
    ready_member(store, "m-1", "p-1")
    found = router(FakeLocal(grant(LOCAL, "m-1")), FakeCloud(unknown(AZURE)), store).identify(
        FRAME, 1.0
    )
    assert (found.decision, found.engine) == (Decision.DENIED_UNKNOWN_FACE, AZURE)
    assert outcomes(found) == {"azure": "DECIDED", "local": "OUTRANKED"}


def test_require_agreement_denies_a_cloud_grant_the_local_engine_does_not_share() -> None:
    options = {"agreement": Agreement.REQUIRE_AGREEMENT}
    found = router(FakeLocal(unknown(LOCAL)), FakeCloud(grant(AZURE, "m-1")), **options).identify(
        FRAME, 1.0
    )
    assert found.decision is Decision.DENIED_UNKNOWN_FACE
    assert outcomes(found) == {"azure": "DISAGREED", "local": "DISAGREED"}
    # Default: the cloud, the primary engine, decides.
    found = router(FakeLocal(unknown(LOCAL)), FakeCloud(grant(AZURE, "m-1"))).identify(FRAME, 1.0)
    assert (found.decision, found.member_id) == (Decision.GRANTED, "m-1")


@pytest.mark.parametrize(
    ("failure", "outcome"),
    [
        (CloudFailure(EngineOutcome.ERROR, "cannot connect"), "ERROR"),
        (CloudFailure(EngineOutcome.THROTTLED, "HTTP 429", retry_after=60), "THROTTLED"),
        (CloudFailure(EngineOutcome.NOT_TRAINED, "HTTP 409"), "NOT_TRAINED"),
    ],
)
def test_a_failing_cloud_leaves_the_decision_to_the_local_engine(
    failure: CloudFailure, outcome: str
) -> None:
    found = router(FakeLocal(grant(LOCAL, "m-1")), FakeCloud(failure)).identify(FRAME, 1.0)
    assert (found.decision, found.member_id, found.engine) == (Decision.GRANTED, "m-1", LOCAL)
    assert outcomes(found) == {"local": "DECIDED", "azure": outcome}


def test_a_hung_cloud_is_abandoned_at_the_deadline() -> None:
    cloud = FakeCloud(None)
    engine = router(FakeLocal(grant(LOCAL, "m-1"), delay=0.01), cloud)
    started = time.monotonic()
    found = engine.identify(FRAME, 0.3)
    assert time.monotonic() - started < 0.3
    assert outcomes(found) == {"local": "DECIDED", "azure": "TIMED_OUT"}
    cloud.release.set()


def test_neither_engine_in_time_is_a_timeout() -> None:
    cloud = FakeCloud(None)
    with pytest.raises(RecognitionTimeout):
        router(FakeLocal(grant(LOCAL, "m-1"), delay=5), cloud).identify(FRAME, 0.2)
    cloud.release.set()


def test_the_circuit_opens_then_skips_the_cloud_then_recovers() -> None:
    clock = FakeClock()
    cloud = FakeCloud(CloudFailure(EngineOutcome.ERROR, "HTTP 503"))
    engine = router(FakeLocal(grant(LOCAL, "m-1")), cloud, breaker=CircuitBreaker(3, 10, clock))
    for _ in range(3):
        assert outcomes(engine.identify(FRAME, 1.0))["azure"] == "ERROR"
    skipped = engine.identify(FRAME, 1.0)
    assert outcomes(skipped)["azure"] == "CIRCUIT_OPEN"
    assert cloud.calls == 3 and skipped.cloud_transactions == 0
    clock.advance(10)
    cloud.answer = grant(AZURE, "m-1")
    recovered = engine.identify(FRAME, 1.0)  # the half-open probe
    assert recovered.engine is AZURE
    assert engine.breaker.state is CircuitState.CLOSED


def test_cloud_calls_in_flight_are_bounded() -> None:
    cloud = FakeCloud(None)
    engine = router(
        FakeLocal(grant(LOCAL, "m-1")),
        cloud,
        cloud_slots=2,
        breaker=CircuitBreaker(1000, 10, FakeClock()),
    )
    results: list[Identification] = []

    def call() -> None:
        results.append(engine.identify(FRAME, 0.3))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cloud.calls <= 2 + 2  # two slots, freed once the held calls time out
    assert all(r.engine is LOCAL for r in results)
    assert any("in flight" in r.reports[1].detail for r in results)
    cloud.release.set()


# -- local-first and local-only


def test_local_first_asks_the_cloud_only_when_unsure() -> None:
    cloud = FakeCloud(grant(AZURE, "m-1"))
    sure = router(FakeLocal(grant(LOCAL, "m-1", 0.9)), cloud, policy=Policy.LOCAL_FIRST).identify(
        FRAME, 1.0
    )
    assert sure.engine is LOCAL and cloud.calls == 0
    assert outcomes(sure) == {"local": "DECIDED", "azure": "NOT_USED"}
    assert sure.cloud_transactions == 0
    unsure = router(FakeLocal(unknown(LOCAL, 0.45)), cloud, policy=Policy.LOCAL_FIRST).identify(
        FRAME, 1.0
    )
    assert (unsure.engine, unsure.member_id) == (AZURE, "m-1") and cloud.calls == 1


def test_local_only_never_calls_the_cloud() -> None:
    cloud = FakeCloud(grant(AZURE, "m-1"))
    found = router(FakeLocal(unknown(LOCAL)), cloud, policy=Policy.LOCAL_ONLY).identify(FRAME, 1)
    assert found.engine is LOCAL and cloud.calls == 0


def test_local_first_asks_the_cloud_about_an_ambiguous_face() -> None:
    ambiguous = Identification(Decision.DENIED_AMBIGUOUS, LOCAL, confidence=0.7)
    cloud = FakeCloud(grant(AZURE, "m-1"))
    found = router(FakeLocal(ambiguous), cloud, policy=Policy.LOCAL_FIRST).identify(FRAME, 1.0)
    assert (found.engine, found.member_id) == (AZURE, "m-1") and cloud.calls == 1


def test_a_frame_the_cloud_refuses_does_not_open_the_circuit() -> None:
    refused = CloudFailure(EngineOutcome.ERROR, "HTTP 400 InvalidImage", status=400)
    engine = router(FakeLocal(grant(LOCAL, "m-1")), FakeCloud(refused))
    for _ in range(5):
        assert outcomes(engine.identify(b"x" * 2000, 1.0))["azure"] == "ERROR"
    assert engine.breaker.state is CircuitState.CLOSED


def test_images_under_a_kilobyte_are_not_sent_to_the_cloud() -> None:
    cloud = FakeCloud(grant(AZURE, "m-1"))
    found = router(FakeLocal(unknown(LOCAL)), cloud).identify(b"x" * 1000, 1.0)
    assert cloud.calls == 0 and outcomes(found)["azure"] == "NOT_USED"


def test_an_idle_sync_tells_the_breaker_nothing() -> None:
    from facegate_server.cloud.azure import TransactionCounter
    from facegate_server.cloud.sync import CloudSync

    class IdleFace:
        counter = TransactionCounter()

        def ensure_group(self) -> bool:
            return False

    clock = FakeClock()
    breaker = CircuitBreaker(3, 10, clock)
    sync = CloudSync(IdleFace(), MemoryStore(), breaker)  # type: ignore[arg-type]
    sync._group_checked = True
    for _ in range(2):
        breaker.record_failure()
    sync.run_once()  # nothing in the outbox, no training: no call made
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
