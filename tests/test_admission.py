"""Fair admission (engines/admission.py): the queue in front of the recognition workers,
and the access event of every Identify that got no decision.

No processes: jobs are taken by the test as a worker would, on a hand-moved clock.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from facegate_server.domain import Decision, EventFilter, Identification
from facegate_server.engines.admission import (
    ENROL,
    IDENTIFY,
    Admission,
    Job,
    RecognitionBusy,
    Ticket,
)
from facegate_server.engines.base import Attempt
from facegate_server.engines.memory import MemoryEngine
from facegate_server.errors import FaceGateError, RecognitionTimeout, RecognitionUnavailable

from tests.helpers import FakeClock, image_bytes, running_server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def queue(clock: FakeClock, *, limit: int = 100, per_caller: int = 1, live: int = 2) -> Admission:
    return Admission(limit=limit, per_caller=per_caller, live=lambda: live, clock=clock)


def job(caller: Ticket | str, *, priority: int = IDENTIFY, deadline: float | None = None) -> Job:
    ticket = caller if isinstance(caller, Ticket) else Ticket(caller)
    return Job((ticket.caller,), priority, ticket, deadline)


def take(admission: Admission) -> Job:
    taken = admission.take(timeout=0)
    assert taken is not None
    return taken


def run(admission: Admission, clock: FakeClock, taken: Job, seconds: float) -> None:
    clock.now += seconds
    admission.finished(taken)
    taken.future.set_result(taken.args)


def test_identify_goes_before_enrolment(clock: FakeClock) -> None:
    admission = queue(clock, per_caller=4)
    photos = [job("crm", priority=ENROL) for _ in range(3)]
    frame = job("gate-1")
    for j in [*photos, frame]:
        admission.admit(j)
    assert take(admission) is frame
    assert [take(admission) for _ in range(3)] == photos


def test_a_flood_from_one_caller_does_not_starve_another(clock: FakeClock) -> None:
    """The flooding caller holds one of the two workers at most; the other caller's frame
    is the next to start, however many frames the flood queued before it."""
    admission = queue(clock, per_caller=1, live=2)
    flood = [job("hostile") for _ in range(10)]
    for j in flood:
        admission.admit(j)
    first = take(admission)
    assert first is flood[0]
    assert admission.take(timeout=0) is None  # the second worker is not the flood's
    honest = job("honest")
    admission.admit(honest)
    assert take(admission) is honest
    run(admission, clock, honest, 0.1)
    honest_again = job("honest")
    admission.admit(honest_again)
    assert take(admission) is honest_again  # still first, though the flood queued earlier
    run(admission, clock, first, 0.8)
    assert take(admission) is flood[1]  # the flood's next frame gets the freed worker


def test_round_robin_between_callers(clock: FakeClock) -> None:
    admission = queue(clock, per_caller=1, live=8)
    for caller in ("a", "a", "b", "b", "c"):
        admission.admit(job(caller))
    order = []
    for _ in range(5):
        taken = take(admission)
        order.append(taken.caller)
        run(admission, clock, taken, 0.1)
    assert order == ["a", "b", "c", "a", "b"]


def test_a_full_queue_refuses_at_once_with_a_retry_delay(clock: FakeClock) -> None:
    admission = queue(clock, limit=3, per_caller=4)
    for _ in range(3):
        admission.admit(job("gate-1"))
    with pytest.raises(RecognitionBusy) as busy:
        admission.admit(job("gate-2"))
    assert busy.value.reason == "RECOGNITION_BUSY" and busy.value.retry_delay > 0
    assert admission.snapshot()["refused_full"] == 1


def test_a_job_that_cannot_finish_before_its_deadline_is_refused_at_once(
    clock: FakeClock,
) -> None:
    """The expensive caller's measured cost puts its next frame past the deadline: refused
    when it arrives. The cheap caller's frame, beside it, is admitted."""
    admission = queue(clock, per_caller=1, live=2)
    for _ in range(3):  # learn the costs: 0.9 s a frame for one caller, 0.1 s the other
        admission.admit(job("hostile"))
        run(admission, clock, take(admission), 0.9)
        admission.admit(job("honest"))
        run(admission, clock, take(admission), 0.1)
    admission.admit(job("hostile", deadline=clock.now + 1.2))
    take(admission)  # running
    with pytest.raises(RecognitionBusy) as late:
        admission.admit(job("hostile", deadline=clock.now + 1.2))
    assert late.value.retry_delay > 1.0
    admission.admit(job("honest", deadline=clock.now + 1.2))
    assert admission.snapshot()["refused_late"] == 1


def test_no_live_worker_refuses_at_once(clock: FakeClock) -> None:
    with pytest.raises(RecognitionUnavailable):
        queue(clock, live=0).admit(job("gate-1"))


def test_a_frame_whose_caller_has_gone_or_whose_deadline_passed_never_starts(
    clock: FakeClock,
) -> None:
    admission = queue(clock, per_caller=4)
    gone = Ticket("gate-1")
    left = job(gone)
    late = job("gate-2", deadline=clock.now + 1.0)
    kept = job("gate-3")
    for j in (left, late, kept):
        admission.admit(j)
    gone.gone.set()
    clock.now += 1.5
    assert take(admission) is kept
    assert admission.take(timeout=0) is None
    assert left.future.cancelled()
    with pytest.raises(RecognitionTimeout):
        late.future.result(timeout=0)
    counts = admission.snapshot()
    assert (counts["dropped_gone"], counts["dropped_late"]) == (1, 1)


def test_a_lost_job_is_retried_once_then_fails(clock: FakeClock) -> None:
    """A worker that dies running a job: the job runs again first in line (on another
    worker); when that worker dies too, the caller is told, and no third worker is risked."""
    admission = queue(clock, per_caller=4)
    frame = job("gate-1")
    admission.admit(frame)
    admission.admit(job("gate-2"))
    first = take(admission)
    assert first is frame
    admission.lost(first)
    retry = take(admission)
    assert retry.args == frame.args and retry.attempts == 1  # before gate-2's frame
    admission.lost(retry)
    with pytest.raises(RecognitionUnavailable) as lost:
        frame.future.result(timeout=0)
    assert lost.value.reason == "WORKER_LOST"
    counts = admission.snapshot()
    assert (counts["lost"], counts["retried"]) == (2, 1)


def test_a_retried_job_that_succeeds_answers_the_caller(clock: FakeClock) -> None:
    admission = queue(clock)
    frame = job("gate-1")
    admission.admit(frame)
    admission.lost(take(admission))
    retry = take(admission)
    run(admission, clock, retry, 0.1)
    assert frame.future.result(timeout=0) == ("gate-1",)


def test_a_waiting_worker_wakes_for_a_new_job(clock: FakeClock) -> None:
    admission = queue(clock)
    taken: cf.Future[Any] = cf.Future()
    started = threading.Event()

    def worker() -> None:
        started.set()
        taken.set_result(Admission.take(admission, timeout=30))

    thread = threading.Thread(target=worker)
    thread.start()
    started.wait()
    frame = job("gate-1")
    admission.admit(frame)
    assert taken.result(timeout=30) is frame
    thread.join()


class Failing(MemoryEngine):
    """Identify never decides: it runs out of time, or is refused for load."""

    def __init__(self, error: FaceGateError | None) -> None:
        super().__init__()
        self.error = error

    def identify(
        self, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        if self.error is not None:
            raise self.error
        threading.Event().wait(timeout)  # an engine that does not finish in time
        raise RecognitionTimeout(f"face recognition did not finish within {timeout * 1000:.0f} ms")

    def verify(
        self, member_id: str, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        return self.identify(image, timeout, attempt)


@pytest.mark.parametrize(
    ("error", "code", "decision"),
    [
        (None, grpc.StatusCode.DEADLINE_EXCEEDED, pb.DECISION_NOT_DECIDED_TIMEOUT),
        (
            RecognitionBusy("the recognition queue is full", retry_delay=0.2),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            pb.DECISION_NOT_DECIDED_BUSY,
        ),
        (
            RecognitionUnavailable("no recognition worker is running"),
            grpc.StatusCode.UNAVAILABLE,
            pb.DECISION_NOT_DECIDED_UNAVAILABLE,
        ),
    ],
)
def test_an_identify_without_a_decision_is_in_the_access_log(
    tmp_path: Path, error: FaceGateError | None, code: grpc.StatusCode, decision: int
) -> None:
    with (
        running_server(tmp_path, engine=Failing(error), identify_budget_ms=200) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.FaceGateServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.Identify(pb.IdentifyRequest(image=b"frame", turnstile_id="gate-7"), timeout=30)
        assert failed.value.code() == code
        events = stub.ListAccessEvents(pb.ListAccessEventsRequest(), timeout=30).events
        assert [(e.turnstile_id, e.decision, e.member_id) for e in events] == [
            ("gate-7", decision, "")
        ]
        counted = {c.name: c.count for c in stub.GetStatus(pb.GetStatusRequest()).decisions}
        assert counted == {f"local/{pb.Decision.Name(decision).removeprefix('DECISION_')}": 1}


@pytest.mark.parametrize(
    ("error", "code", "decision"),
    [
        (None, grpc.StatusCode.DEADLINE_EXCEEDED, pb.DECISION_NOT_DECIDED_TIMEOUT),
        (
            RecognitionBusy("the recognition queue is full", retry_delay=0.2),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            pb.DECISION_NOT_DECIDED_BUSY,
        ),
        (
            RecognitionUnavailable("no recognition worker is running"),
            grpc.StatusCode.UNAVAILABLE,
            pb.DECISION_NOT_DECIDED_UNAVAILABLE,
        ),
    ],
)
def test_a_verify_without_a_decision_is_in_the_access_log(
    tmp_path: Path, error: FaceGateError | None, code: grpc.StatusCode, decision: int
) -> None:
    with (
        running_server(tmp_path, engine=Failing(error), identify_budget_ms=200) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.FaceGateServiceStub(channel)
        request = pb.VerifyRequest(member_id="m-1", image=b"frame", turnstile_id="gate-7")
        with pytest.raises(grpc.RpcError) as failed:
            stub.Verify(request, timeout=30)
        assert failed.value.code() == code
        events = stub.ListAccessEvents(pb.ListAccessEventsRequest(), timeout=30).events
        assert [
            (e.kind, e.turnstile_id, e.claimed_member_id, e.decision, e.member_id) for e in events
        ] == [(pb.ACCESS_KIND_VERIFY, "gate-7", "m-1", decision, "")]
        counted = {c.name: c.count for c in stub.GetStatus(pb.GetStatusRequest()).decisions}
        assert counted == {f"local/{pb.Decision.Name(decision).removeprefix('DECISION_')}": 1}


def test_a_verify_refused_at_the_door_is_in_the_access_log(tmp_path: Path) -> None:
    """rpc/server.py refuses calls for load before a thread takes them and tells the
    servicer (`on_unserved`): a Verify gets its event as an Identify does; a request whose ids
    are invalid gets none (nobody could have been let in by that call)."""
    from facegate_server.errors import RateLimited
    from facegate_server.rpc.servicer import FaceGateServicer

    busy = RateLimited("the server is full", retry_delay=0.1)
    with running_server(tmp_path, engine=MemoryEngine()) as server:
        servicer = FaceGateServicer(server.gate)
        method = "/facegate.v1.FaceGateService/Verify"
        verify = pb.VerifyRequest(member_id="m-1", turnstile_id="g-1")
        servicer.unserved(method, verify, busy, 0.0)
        servicer.unserved(method, pb.VerifyRequest(member_id="", turnstile_id="g-1"), busy, 0.0)
        servicer.unserved(
            "/facegate.v1.FaceGateService/Identify",
            pb.IdentifyRequest(turnstile_id="g-2"),
            busy,
            0.0,
        )
        events = server.store.list_events(EventFilter(), 10)
    assert sorted(
        (e.kind.value, e.turnstile_id, e.claimed_member_id, e.decision) for e in events
    ) == [
        ("IDENTIFY", "g-2", "", Decision.NOT_DECIDED_BUSY),
        ("VERIFY", "g-1", "m-1", Decision.NOT_DECIDED_BUSY),
    ]


FRAME = image_bytes(64, 64, color="blue")  # nobody enrolled: DENIED_UNKNOWN_FACE


class Held(MemoryEngine):
    """Identify, or enrolment (`held`), waits until released: a slow recognition holding
    its lane's threads (the door's, or the photo methods')."""

    def __init__(self, held: str) -> None:
        super().__init__()
        self.held = held
        self.release = threading.Event()

    def _wait(self, what: str) -> None:
        if what == self.held and not self.release.wait(30):
            raise AssertionError("never released")

    def identify(
        self, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        self._wait("identify")
        return super().identify(image, timeout, attempt)

    def enrol(self, photos: Any, timeout: float, templates: Any) -> Any:
        self._wait("enrol")
        return super().enrol(photos, timeout, templates)


def test_an_identify_whose_caller_left_while_it_waited_for_a_thread_is_logged(
    tmp_path: Path,
) -> None:
    """Every door thread is held; a turnstile whose deadline passes while its Identify waits
    for one gets DEADLINE_EXCEEDED, and the access log still counts the attempt."""
    engine = Held("identify")
    with (
        running_server(tmp_path, engine=engine, identify_budget_ms=30_000) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.FaceGateServiceStub(channel)
        door = server.rpc.lanes["door"]
        try:
            held = [
                stub.Identify.future(
                    pb.IdentifyRequest(image=FRAME, turnstile_id="gate-1"), timeout=60
                )
                for _ in range(door.threads)
            ]
            assert door.slots.wait_for(door.threads, timeout=30)
            with pytest.raises(grpc.RpcError) as late:
                stub.Identify(pb.IdentifyRequest(image=FRAME, turnstile_id="late"), timeout=1)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            events: list[Any] = []
            for _ in range(300):  # written off the loop, a moment after the caller left
                events = server.store.list_events(EventFilter(turnstile_id="late"), 10)
                if events:
                    break
                threading.Event().wait(0.05)
            assert [(e.decision, e.member_id) for e in events] == [
                (Decision.NOT_DECIDED_TIMEOUT, "")
            ]
            assert events[0].latency.total_seconds() >= 0.9  # it waited for its deadline
        finally:
            engine.release.set()
        assert {f.result().decision for f in held} == {pb.DECISION_DENIED_UNKNOWN_FACE}


def test_administration_cannot_hold_the_doors_threads(tmp_path: Path) -> None:
    """Slow administrative calls (GetStatus while the shared store does not answer) fill
    their own threads and queue and are then refused SERVER_BUSY; turnstiles are still
    answered on the door's threads (app.py's lanes)."""
    release = threading.Event()
    with (
        running_server(tmp_path, engine=MemoryEngine()) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.FaceGateServiceStub(channel)
        status = server.gate.status

        def slow_status() -> Any:
            release.wait(30)
            return status()

        server.gate.status = slow_status  # type: ignore[method-assign]
        try:
            admin = server.rpc.slots.limit
            waiting = [
                stub.GetStatus.future(pb.GetStatusRequest(), timeout=60) for _ in range(admin)
            ]
            assert server.rpc.slots.wait_for(admin, timeout=30)
            with pytest.raises(grpc.RpcError) as busy:
                stub.GetStatus(pb.GetStatusRequest(), timeout=30)
            assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "SERVER_BUSY" in str(busy.value.trailing_metadata())

            door = server.rpc.lanes["door"].threads
            with cf.ThreadPoolExecutor(door + 2) as turnstiles:
                answers = list(
                    turnstiles.map(
                        lambda n: stub.Identify(
                            pb.IdentifyRequest(image=FRAME, turnstile_id=f"gate-{n}"),
                            timeout=30,
                        ),
                        range(door + 2),
                    )
                )
            assert {a.decision for a in answers} == {pb.DECISION_DENIED_UNKNOWN_FACE}
        finally:
            release.set()
        assert len([f.result() for f in waiting]) == admin


def test_enrolments_cannot_hold_the_threads_a_suspension_needs(tmp_path: Path) -> None:
    """Enroll, AddMemberPhotos and SearchFaces wait on recognition and have a lane of their
    own: when it is full, a suspension (UpdateMember) and a deletion are still answered,
    and so is a turnstile."""
    engine = Held("enrol")  # ten large photos, the workers busy
    with (
        running_server(tmp_path, engine=engine) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.FaceGateServiceStub(channel)
        engine.release.set()
        for member in ("m-1", "m-2"):
            stub.Enroll(pb.EnrollRequest(member_id=member, photos=[FRAME]), timeout=30)
        engine.release.clear()
        photo = server.rpc.lanes["photo"]
        try:
            enrolling = [
                stub.Enroll.future(pb.EnrollRequest(member_id=f"n-{n}", photos=[FRAME]), timeout=60)
                for n in range(photo.slots.limit)
            ]
            assert photo.slots.wait_for(photo.slots.limit, timeout=30)
            with pytest.raises(grpc.RpcError) as busy:
                stub.Enroll(pb.EnrollRequest(member_id="late", photos=[FRAME]), timeout=30)
            assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            suspended = stub.UpdateMember(
                pb.UpdateMemberRequest(
                    member=pb.Member(member_id="m-1", membership=pb.Membership(suspended=True)),
                    update_mask={"paths": ["membership.suspended"]},
                ),
                timeout=30,
            )
            assert suspended.member.membership.suspended
            stub.DeleteMember(pb.DeleteMemberRequest(member_id="m-2"), timeout=30)
            entered = stub.Identify(pb.IdentifyRequest(image=FRAME, turnstile_id="g"), timeout=30)
            assert entered.decision == pb.DECISION_DENIED_MEMBERSHIP_INACTIVE
        finally:
            engine.release.set()
        assert all(f.result().member.member_id for f in enrolling)
