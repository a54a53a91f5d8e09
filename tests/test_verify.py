"""Verify (1:1) end to end over real gRPC, on the real local engine and a real SQLite file:
a member verifies with their id and a frame; a stranger with the same id is denied; an id
nobody has is denied the same way, and only the access log says why."""

from __future__ import annotations

import grpc
import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc

from tests.conftest import Faces
from tests.helpers import details, image_bytes

Stub = pb_grpc.FaceGateServiceStub
NOT_THIS = pb.DECISION_DENIED_NOT_THIS_MEMBER


def verify(
    stub: Stub, member_id: str, image: bytes, turnstile: str = "gate-v"
) -> pb.VerifyResponse:
    response: pb.VerifyResponse = stub.Verify(
        pb.VerifyRequest(member_id=member_id, image=image, turnstile_id=turnstile), timeout=30
    )
    return response


@pytest.fixture(scope="module")
def gym(stub: Stub, faces: Faces) -> Faces:
    """Obama (two photos) and Biden (one) enrolled; their other photos are probes."""
    for member_id, person, count in (("m-obama", "barack_obama", 2), ("m-biden", "joe_biden", 1)):
        photos = [faces.read(p) for p in faces.of(person)[:count]]
        stub.Enroll(
            pb.EnrollRequest(member_id=member_id, display_name=person.title(), photos=photos),
            timeout=60,
        )
    return faces


def event(stub: Stub, event_id: int) -> pb.AccessEvent:
    page = stub.ListAccessEvents(pb.ListAccessEventsRequest(turnstile_id="gate-v"), timeout=5)
    [found] = [e for e in page.events if e.event_id == event_id]
    return found


def test_a_member_verifies_with_their_id_and_a_frame(stub: Stub, gym: Faces) -> None:
    for path in gym.of("barack_obama")[2:]:
        response = verify(stub, "m-obama", gym.read(path))
        assert (response.decision, response.member_id) == (pb.DECISION_GRANTED, "m-obama"), path
        assert response.display_name == "Barack_Obama"
        assert 0.5 <= response.confidence <= 1.0
        assert response.engine == pb.ENGINE_LOCAL
        assert response.face_box.width > 0
        assert response.server_latency.ToNanoseconds() > 0
    logged = event(stub, response.event_id)
    assert (logged.kind, logged.claimed_member_id, logged.member_id, logged.decision) == (
        pb.ACCESS_KIND_VERIFY,
        "m-obama",
        "m-obama",
        pb.DECISION_GRANTED,
    )
    assert logged.confidence == pytest.approx(response.confidence)
    assert logged.detail == ""


def test_a_stranger_with_a_members_id_is_denied(stub: Stub, gym: Faces) -> None:
    response = verify(stub, "m-obama", gym.read(gym.of("kit_harington")[0]))
    assert (response.decision, response.member_id, response.display_name) == (NOT_THIS, "", "")
    assert response.confidence == 0.0  # the turnstile learns nothing measured
    assert response.face_box.width > 0
    logged = event(stub, response.event_id)
    assert (logged.kind, logged.claimed_member_id, logged.member_id) == (
        pb.ACCESS_KIND_VERIFY,
        "m-obama",
        "",
    )
    assert 0.0 < logged.confidence < 0.5  # the log keeps what was measured
    assert logged.detail == ""
    # The member's own history shows their card used with another face.
    theirs = stub.ListAccessEvents(pb.ListAccessEventsRequest(member_id="m-obama"), timeout=5)
    assert response.event_id in [e.event_id for e in theirs.events]


def test_another_member_is_not_this_member(stub: Stub, gym: Faces) -> None:
    """Biden is enrolled, but his face with Obama's card does not open the gate."""
    response = verify(stub, "m-obama", gym.read(gym.of("joe_biden")[1]))
    assert (response.decision, response.member_id) == (NOT_THIS, "")


def test_an_unknown_id_is_denied_the_same_way(stub: Stub, gym: Faces) -> None:
    """The same frame against a member it is not, and against an id nobody has: the same
    answer, field for field, but for the event id and the time taken."""
    frame = gym.read(gym.of("kit_harington")[1])
    known = verify(stub, "m-biden", frame)
    unknown = verify(stub, "m-nobody", frame)
    for response in (known, unknown):
        response.ClearField("event_id")
        response.ClearField("server_latency")
    assert unknown == known
    assert unknown.decision == NOT_THIS


def test_the_access_log_says_why_an_unknown_id_was_denied(stub: Stub, gym: Faces) -> None:
    response = verify(stub, "m-ghost", gym.read(gym.of("barack_obama")[2]))
    assert response.decision == NOT_THIS
    logged = event(stub, response.event_id)
    assert (logged.kind, logged.claimed_member_id, logged.member_id) == (
        pb.ACCESS_KIND_VERIFY,
        "m-ghost",
        "",
    )
    assert (logged.decision, logged.confidence) == (NOT_THIS, 0.0)
    assert logged.detail == "no member with this id"


def test_the_frame_is_judged_whoever_is_claimed(stub: Stub, gym: Faces) -> None:
    """An unknown id still has its frame analysed: no face is no face, as for a member."""
    blank = image_bytes(640, 480, "JPEG")
    for member_id in ("m-obama", "m-nobody"):
        response = verify(stub, member_id, blank)
        assert response.decision == pb.DECISION_DENIED_NO_FACE
        assert response.hint
    group = next(r["path"] for r in gym.rows if r["path"].startswith("group/"))
    assert verify(stub, "m-nobody", gym.read(group)).decision == pb.DECISION_DENIED_MULTIPLE_FACES


def test_identify_events_say_so(stub: Stub, gym: Faces) -> None:
    answer = stub.Identify(
        pb.IdentifyRequest(image=gym.read(gym.of("joe_biden")[1]), turnstile_id="gate-v"),
        timeout=30,
    )
    logged = event(stub, answer.event_id)
    assert (logged.kind, logged.claimed_member_id, logged.member_id) == (
        pb.ACCESS_KIND_IDENTIFY,
        "",
        "m-biden",
    )


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.VerifyRequest(image=b"x", turnstile_id="gate-v"), "member_id"),
        (pb.VerifyRequest(member_id="m bad", image=b"x", turnstile_id="gate-v"), "member_id"),
        (pb.VerifyRequest(member_id="m-obama", image=b"x"), "turnstile_id"),
        (pb.VerifyRequest(member_id="m-obama", turnstile_id="gate-v"), "image"),
    ],
)
def test_bad_fields_are_invalid_arguments(
    stub: Stub, request_: pb.VerifyRequest, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.Verify(request_, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(error.value)[1][0][0] == field
