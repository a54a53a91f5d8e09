"""The server end to end over real gRPC, on the real local engine and a real SQLite file."""

from __future__ import annotations

import grpc
import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import Faces
from tests.helpers import details, image_bytes, png_bomb

Stub = pb_grpc.FaceGateServiceStub

# Enrolled from their first photo(s); every other photo of theirs is a probe.
ENROLLED = {
    "barack_obama": 2,
    "joe_biden": 1,
    "kit_harington": 1,
    "rose_leslie": 1,
    "alex_lacamoire": 1,
}
GRANTED, UNKNOWN = pb.DECISION_GRANTED, pb.DECISION_DENIED_UNKNOWN_FACE


def identify(stub: Stub, image: bytes, turnstile: str = "gate-1") -> pb.IdentifyResponse:
    response: pb.IdentifyResponse = stub.Identify(
        pb.IdentifyRequest(image=image, turnstile_id=turnstile), timeout=30
    )
    return response


@pytest.fixture(scope="module")
def gym(stub: Stub, faces: Faces) -> Faces:
    """The server with the ENROLLED people enrolled (member id = person)."""
    for person, count in ENROLLED.items():
        photos = [faces.read(p) for p in faces.of(person)[:count]]
        stub.Enroll(
            pb.EnrollRequest(member_id=person, display_name=person.title(), photos=photos),
            timeout=60,
        )
    return faces


def probes(faces: Faces) -> list[tuple[str, str]]:
    return [
        (path, person) for person, count in ENROLLED.items() for path in faces.of(person)[count:]
    ]


def test_members_other_photos_are_granted_to_them(stub: Stub, gym: Faces) -> None:
    for path, person in probes(gym):
        response = identify(stub, gym.read(path))
        assert (pb.Decision.Name(response.decision), response.member_id) == (
            "DECISION_GRANTED",
            person,
        ), path
        assert 0.5 <= response.confidence <= 1.0
        assert response.engine == pb.ENGINE_LOCAL
        assert response.display_name == person.title()
        assert response.face_box.width > 0 and response.face_box.height > 0
        assert response.server_latency.ToNanoseconds() > 0
        assert response.event_id > 0


def test_unenrolled_person_is_denied_as_unknown(stub: Stub, gym: Faces) -> None:
    response = identify(stub, gym.read("people/lin_manuel_miranda/1.png"))
    assert response.decision == UNKNOWN
    assert response.member_id == ""
    assert response.display_name == ""
    assert 0.0 <= response.confidence < 0.5


def test_group_photos_get_the_several_faces_decision(stub: Stub, gym: Faces) -> None:
    groups = [r["path"] for r in gym.rows if r["path"].startswith("group/")]
    assert groups
    for path in groups:
        response = identify(stub, gym.read(path))
        assert response.decision == pb.DECISION_DENIED_MULTIPLE_FACES, path
        assert response.member_id == ""
        assert response.hint


@pytest.mark.parametrize("path", ["edge/32bit_rgba.png", "edge/obama_240p.jpg"])
def test_awkward_frames_work(stub: Stub, gym: Faces, path: str) -> None:
    response = identify(stub, gym.read(path))
    assert (response.decision, response.member_id) == (GRANTED, "barack_obama")


def test_a_frame_without_a_face(stub: Stub, gym: Faces) -> None:
    response = identify(stub, image_bytes(640, 480, "JPEG"))
    assert response.decision == pb.DECISION_DENIED_NO_FACE
    assert not response.HasField("face_box")


def test_every_decision_is_in_the_access_log(stub: Stub, gym: Faces) -> None:
    granted = identify(stub, gym.read("people/joe_biden/2.jpg"), turnstile="gate-7")
    denied = identify(stub, gym.read("people/lin_manuel_miranda/1.png"), turnstile="gate-7")
    page = stub.ListAccessEvents(pb.ListAccessEventsRequest(turnstile_id="gate-7"), timeout=5)
    assert [e.event_id for e in page.events] == [denied.event_id, granted.event_id]
    newest, oldest = page.events
    assert (newest.decision, newest.member_id) == (UNKNOWN, "")
    assert (oldest.decision, oldest.member_id, oldest.engine) == (
        GRANTED,
        "joe_biden",
        pb.ENGINE_LOCAL,
    )
    assert oldest.confidence == pytest.approx(granted.confidence)
    assert oldest.server_latency.ToNanoseconds() > 0
    biden = stub.ListAccessEvents(
        pb.ListAccessEventsRequest(member_id="joe_biden", page_size=1), timeout=5
    )
    assert [e.member_id for e in biden.events] == ["joe_biden"]
    if biden.next_page_token:
        more = stub.ListAccessEvents(
            pb.ListAccessEventsRequest(member_id="joe_biden", page_token=biden.next_page_token),
            timeout=5,
        )
        assert all(e.event_id < biden.events[0].event_id for e in more.events)


def test_enrol_get_list_add_delete(stub: Stub, gym: Faces) -> None:
    photos = [gym.read("people/rose_leslie/2.jpg")]
    with pytest.raises(grpc.RpcError) as taken:
        stub.Enroll(pb.EnrollRequest(member_id="rose_leslie", photos=photos), timeout=30)
    assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert details(taken.value)[0] == "MEMBER_ALREADY_EXISTS"

    added = stub.AddMemberPhotos(
        pb.AddMemberPhotosRequest(member_id="rose_leslie", photos=photos), timeout=30
    ).member
    assert added.face_count == 2
    got = stub.GetMember(pb.GetMemberRequest(member_id="rose_leslie"), timeout=5).member
    assert got == added

    first = stub.ListMembers(pb.ListMembersRequest(page_size=2), timeout=5)
    assert [m.member_id for m in first.members] == ["alex_lacamoire", "barack_obama"]
    second = stub.ListMembers(
        pb.ListMembersRequest(page_size=2, page_token=first.next_page_token), timeout=5
    )
    assert [m.member_id for m in second.members] == ["joe_biden", "kit_harington"]

    stub.DeleteMember(pb.DeleteMemberRequest(member_id="kit_harington"), timeout=5)
    assert identify(stub, gym.read("people/kit_harington/2.jpg")).decision == UNKNOWN
    for call, request in [
        (stub.GetMember, pb.GetMemberRequest(member_id="kit_harington")),
        (stub.DeleteMember, pb.DeleteMemberRequest(member_id="kit_harington")),
        (stub.AddMemberPhotos, pb.AddMemberPhotosRequest(member_id="kit_harington", photos=photos)),
    ]:
        with pytest.raises(grpc.RpcError) as missing:
            call(request, timeout=30)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert details(missing.value)[0] == "MEMBER_NOT_FOUND"
        assert "kit_harington" in (missing.value.details() or "")
    # Enrolling the same id again starts afresh.
    stub.Enroll(
        pb.EnrollRequest(
            member_id="kit_harington", photos=[gym.read("people/kit_harington/1.jpg")]
        ),
        timeout=30,
    )
    assert identify(stub, gym.read("people/kit_harington/2.jpg")).member_id == "kit_harington"


def test_enrolment_photos_must_show_exactly_one_face(stub: Stub, gym: Faces) -> None:
    good = gym.read("people/lin_manuel_miranda/1.png")
    for bad, reason in [
        (gym.read("group/two_people.jpg"), "PHOTO_MULTIPLE_FACES"),
        (image_bytes(400, 300, "JPEG"), "PHOTO_NO_FACE"),
        (b"not an image", "IMAGE_FORMAT_UNSUPPORTED"),
    ]:
        with pytest.raises(grpc.RpcError) as error:
            stub.Enroll(pb.EnrollRequest(member_id="lin", photos=[good, bad]), timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details(error.value)[0] == reason
        assert details(error.value)[1][0][0] == "photos[1]"
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetMember(pb.GetMemberRequest(member_id="lin"), timeout=5)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


MIB = 1024 * 1024


def bad_identify_inputs(faces: Faces | None) -> list[tuple[str, bytes, str, str]]:
    cases = [
        ("empty", b"", "IMAGE_EMPTY", "empty"),
        ("text file", b"Member list\nKim Jiwoo, m-1001\n" * 50, "IMAGE_FORMAT_UNSUPPORTED", "JPEG"),
        ("over the size limit", b"\xff\xd8\xff" + bytes(6 * MIB), "IMAGE_TOO_LARGE", "limit"),
        ("decompression bomb", png_bomb(), "IMAGE_DIMENSIONS_TOO_LARGE", "pixels"),
        ("too many pixels", png_bomb(10_000, 10_000), "IMAGE_DIMENSIONS_TOO_LARGE", "10000x10000"),
    ]
    return cases


@pytest.mark.parametrize(
    ("name", "image", "reason", "words"), bad_identify_inputs(None), ids=lambda v: str(v)[:20]
)
def test_bad_images_are_invalid_argument(
    stub: Stub, name: str, image: bytes, reason: str, words: str
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        identify(stub, image)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    assert words in (error.value.details() or "")
    assert details(error.value) == (reason, [("image", (error.value.details() or "")[7:])])
    assert identify(stub, image_bytes(64, 64)).decision == pb.DECISION_DENIED_NO_FACE


def test_truncated_jpeg_is_invalid_argument(stub: Stub, faces: Faces) -> None:
    whole = faces.read("people/barack_obama/3.jpg")
    with pytest.raises(grpc.RpcError) as error:
        identify(stub, whole[: len(whole) // 2])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(error.value)[0] == "IMAGE_CORRUPT"
    assert "truncated" in (error.value.details() or "")
    assert identify(stub, whole).decision in (GRANTED, UNKNOWN)


@pytest.mark.parametrize(
    ("member_id", "reason"),
    [
        ("", "MEMBER_ID_MISSING"),
        ("m" * 65, "MEMBER_ID_TOO_LONG"),
        ("kim jiwoo", "MEMBER_ID_INVALID"),
    ],
)
def test_bad_member_ids(stub: Stub, member_id: str, reason: str) -> None:
    for call, request in [
        (stub.Enroll, pb.EnrollRequest(member_id=member_id, photos=[image_bytes(64, 64)])),
        (stub.GetMember, pb.GetMemberRequest(member_id=member_id)),
        (stub.DeleteMember, pb.DeleteMemberRequest(member_id=member_id)),
    ]:
        with pytest.raises(grpc.RpcError) as error:
            call(request, timeout=5)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        reason_got, violations = details(error.value)
        assert reason_got == reason
        assert violations[0][0] == "member_id"


def test_other_bad_fields(stub: Stub) -> None:
    cases = [
        (stub.Identify, pb.IdentifyRequest(image=image_bytes(64, 64)), "turnstile_id"),
        (stub.Enroll, pb.EnrollRequest(member_id="x"), "photos"),
        (stub.Enroll, pb.EnrollRequest(member_id="x", photos=[b"1"] * 11), "photos"),
        (
            stub.Enroll,
            pb.EnrollRequest(member_id="x", display_name="n" * 201, photos=[b"1"]),
            "display_name",
        ),
        (stub.ListMembers, pb.ListMembersRequest(page_size=5000), "page_size"),
        (stub.ListMembers, pb.ListMembersRequest(page_token="garbage!"), "page_token"),
        (stub.ListAccessEvents, pb.ListAccessEventsRequest(page_token="e30="), "page_token"),
    ]
    for call, request, field in cases:
        with pytest.raises(grpc.RpcError) as error:
            call(request, timeout=5)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert details(error.value)[1][0][0] == field


def test_health_and_reflection(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "facegate.v1.FaceGateService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answer = next(iter(reflection.ServerReflectionInfo(iter([request]), timeout=5)))
        names = {s.name for s in answer.list_services_response.service}
        assert {"facegate.v1.FaceGateService", "grpc.health.v1.Health"} <= names
