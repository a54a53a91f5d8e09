"""The fallback's rules and the circuit breaker, with test doubles for the two engines and a
hand-moved clock: nothing sleeps; a "slow" engine waits on an event its test controls."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from facegate_server.cloud.azure import CloudFailure
from facegate_server.domain import (
    Decision,
    EngineKind,
    EngineOutcome,
    Identification,
)
from facegate_server.engines.base import Attempt
from facegate_server.engines.memory import MemoryEngine
from facegate_server.errors import RecognitionTimeout
from facegate_server.routing.breaker import CircuitBreaker, CircuitState
from facegate_server.routing.router import Agreement, Policy, RoutingEngine

from tests.helpers import FakeClock

LOCAL, AZURE = EngineKind.LOCAL, EngineKind.AZURE
FRAME = b"\xff\xd8" + bytes(2000)  # above the Face API's 1 KB minimum


def grant(engine: EngineKind, member: str, confidence: float = 0.9) -> Identification:
    return Identification(Decision.GRANTED, engine, member_id=member, confidence=confidence)


def unknown(engine: EngineKind, confidence: float = 0.3) -> Identification:
    return Identification(Decision.DENIED_UNKNOWN_FACE, engine, confidence=confidence)


class FakeLocal(MemoryEngine):
    """Gives `answer`; `hung` holds it until released or its time is up (then times out)."""

    def __init__(self, answer: Identification, hung: bool = False) -> None:
        super().__init__()
        self.answer, self.calls = answer, 0
        self.release = threading.Event()
        if not hung:
            self.release.set()

    def identify(
        self, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        self.calls += 1
        if not self.release.wait(timeout):
            raise RecognitionTimeout("too slow")
        return self.answer


class FakeCloud(MemoryEngine):
    """Answers, fails, or hangs until released; `trained` are the members it knows."""

    kind = AZURE
    name = "fake-cloud"

    def __init__(
        self, answer: Identification | CloudFailure | None = None, trained: tuple[str, ...] = ()
    ) -> None:
        super().__init__()
        self.answer = answer
        self.trained = trained
        self.release = threading.Event()
        self.calls = 0

    def identify(
        self, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        self.calls += 1
        assert attempt is not None
        attempt.billed += 2
        if self.answer is None:  # hung: held until released or the read timeout
            self.release.wait(timeout)
            raise CloudFailure(EngineOutcome.TIMED_OUT, "read timeout")
        if isinstance(self.answer, CloudFailure):
            raise self.answer
        return self.answer

    def knows(self, member_id: str) -> bool:
        return member_id in self.trained


def router(local: Any, cloud: Any, **options: Any) -> RoutingEngine:
    return RoutingEngine(local, cloud, **options)


def outcomes(found: Identification) -> dict[str, str]:
    return {r.engine.value.lower(): r.outcome.value for r in found.reports}


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
    cloud = FakeCloud(unknown(AZURE), trained=("m-1",))
    found = router(FakeLocal(grant(LOCAL, "m-1")), cloud).identify(FRAME, 1.0)
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
    engine = router(FakeLocal(grant(LOCAL, "m-1")), cloud)
    found = engine.identify(FRAME, 0.3)  # returns (the cloud is never released)
    assert outcomes(found) == {"local": "DECIDED", "azure": "TIMED_OUT"}
    cloud.release.set()


def test_neither_engine_in_time_is_a_timeout() -> None:
    cloud = FakeCloud(None)
    with pytest.raises(RecognitionTimeout):
        router(FakeLocal(grant(LOCAL, "m-1"), hung=True), cloud).identify(FRAME, 0.2)
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


def test_the_sync_tells_the_turnstiles_breaker_nothing() -> None:
    """Enrolment work has its own back-off (cloud/sync.py): the breaker the doors share
    hears only of Identify calls, whether the sync is idle or failing."""
    from facegate_server.cloud.azure import CloudFailure, TransactionCounter
    from facegate_server.cloud.engine import CloudPeople
    from facegate_server.cloud.health import CloudHealth, HealthState, Readiness
    from facegate_server.cloud.sync import CloudSync
    from facegate_server.store import MemoryStore

    class FailingFace:
        counter = TransactionCounter()

        def ensure_group(self) -> bool:
            raise CloudFailure(EngineOutcome.ERROR, "HTTP 503", status=503)

    clock = FakeClock()
    breaker = CircuitBreaker(3, 10, clock)
    store = MemoryStore()
    health = CloudHealth()
    health.set(HealthState(Readiness.READY))
    sync = CloudSync(FailingFace(), store, CloudPeople(store), health, clock=clock)  # type: ignore[arg-type]
    for _ in range(2):
        breaker.record_failure()
    for _ in range(5):
        sync.run_once()  # fails, and backs off on its own
        clock.advance(61)
    assert sync.waiting and breaker.state is CircuitState.CLOSED
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN


# -- Verify: the same routing, "not this member" in place of "unknown"


class VerifyingLocal(FakeLocal):
    """Answers Verify as it answers Identify, and remembers who was claimed."""

    claimed = ""

    def verify(
        self, member_id: str, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        self.claimed = member_id
        return self.identify(image, timeout, attempt)


class VerifyingCloud(FakeCloud):
    claimed = ""

    def verify(
        self, member_id: str, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        self.claimed = member_id
        return self.identify(image, timeout, attempt)


def not_this(engine: EngineKind, confidence: float = 0.3) -> Identification:
    return Identification(Decision.DENIED_NOT_THIS_MEMBER, engine, confidence=confidence)


def test_verify_asks_both_engines_about_the_claimed_member() -> None:
    local, cloud = VerifyingLocal(grant(LOCAL, "m-1")), VerifyingCloud(grant(AZURE, "m-1"))
    found = router(local, cloud).verify("m-1", FRAME, 1.0)
    assert (found.decision, found.member_id, found.engine) == (Decision.GRANTED, "m-1", AZURE)
    assert outcomes(found) == {"azure": "DECIDED", "local": "AGREED"}
    assert found.cloud_transactions == 2
    assert local.claimed == cloud.claimed == "m-1"


def test_verify_a_member_not_yet_in_the_cloud_gets_in_through_the_local_engine() -> None:
    found = router(VerifyingLocal(grant(LOCAL, "m-new")), VerifyingCloud(not_this(AZURE))).verify(
        "m-new", FRAME, 1.0
    )
    assert (found.decision, found.member_id, found.engine) == (Decision.GRANTED, "m-new", LOCAL)
    assert outcomes(found) == {"azure": "OUTRANKED", "local": "DECIDED"}
    trained = VerifyingCloud(not_this(AZURE), trained=("m-1",))
    denied = router(VerifyingLocal(grant(LOCAL, "m-1")), trained).verify("m-1", FRAME, 1.0)
    assert (denied.decision, denied.engine) == (Decision.DENIED_NOT_THIS_MEMBER, AZURE)


def test_verify_require_agreement_denies_as_not_this_member() -> None:
    options = {"agreement": Agreement.REQUIRE_AGREEMENT}
    found = router(
        VerifyingLocal(not_this(LOCAL)), VerifyingCloud(grant(AZURE, "m-1")), **options
    ).verify("m-1", FRAME, 1.0)
    assert (found.decision, found.member_id) == (Decision.DENIED_NOT_THIS_MEMBER, "")
    assert outcomes(found) == {"azure": "DISAGREED", "local": "DISAGREED"}


def test_verify_shares_identifys_breaker() -> None:
    clock = FakeClock()
    cloud = VerifyingCloud(CloudFailure(EngineOutcome.ERROR, "HTTP 503"))
    engine = router(
        VerifyingLocal(grant(LOCAL, "m-1")), cloud, breaker=CircuitBreaker(3, 10, clock)
    )
    for call in (engine.identify, engine.identify):
        assert outcomes(call(FRAME, 1.0))["azure"] == "ERROR"
    assert outcomes(engine.verify("m-1", FRAME, 1.0))["azure"] == "ERROR"  # the third
    skipped = engine.verify("m-1", FRAME, 1.0)
    assert outcomes(skipped) == {"local": "DECIDED", "azure": "CIRCUIT_OPEN"}
    assert (skipped.decision, skipped.member_id) == (Decision.GRANTED, "m-1")
    assert cloud.calls == 3


@pytest.mark.parametrize(
    ("local", "cloud_asked"),
    [
        (grant(LOCAL, "m-1", 0.9), False),  # a confident grant
        (not_this(LOCAL, 0.05), False),  # clearly not them (an unknown id: confidence 0)
        (not_this(LOCAL, 0.45), True),  # unsure
    ],
)
def test_verify_local_first_asks_the_cloud_only_when_unsure(
    local: Identification, cloud_asked: bool
) -> None:
    cloud = VerifyingCloud(not_this(AZURE))
    found = router(VerifyingLocal(local), cloud, policy=Policy.LOCAL_FIRST).verify(
        "m-1", FRAME, 1.0
    )
    assert cloud.calls == int(cloud_asked)
    assert outcomes(found)["azure"] == ("DECIDED" if cloud_asked else "NOT_USED")


def test_verify_local_only_never_asks_the_cloud() -> None:
    cloud = VerifyingCloud(grant(AZURE, "m-1"))
    found = router(VerifyingLocal(not_this(LOCAL)), cloud, policy=Policy.LOCAL_ONLY).verify(
        "m-1", FRAME, 1.0
    )
    assert (found.decision, cloud.calls) == (Decision.DENIED_NOT_THIS_MEMBER, 0)
