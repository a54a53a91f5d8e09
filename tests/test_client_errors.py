"""The client library against a fake FaceGate server: typed errors, deadlines, retries, paging.

The server here is `FakeFaceGateServicer`, a test double that answers from canned data and
fails on cue with rich statuses (google.rpc.Status with ErrorInfo, BadRequest, RetryInfo),
served by a real gRPC server on a free port.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import facegate_client
import grpc
import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from facegate_client import (
    AlreadyExists,
    DeadlineExceeded,
    FaceGateClient,
    FaceGateError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tests.helpers import serving

DOMAIN = "facegate.v1"


def rich_status(
    code: int,
    message: str,
    reason: str,
    violations: tuple[tuple[str, str], ...] = (),
    retry_delay: float | None = None,
) -> grpc.Status:
    details = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata={"k": "v"}))
    details.append(info)
    if violations:
        bad_request = any_pb2.Any()
        bad_request.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in violations
                ]
            )
        )
        details.append(bad_request)
    if retry_delay is not None:
        retry = any_pb2.Any()
        delay = duration_pb2.Duration()
        delay.FromTimedelta(timedelta(seconds=retry_delay))
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=details))


def member(member_id: str, name: str = "", faces: int = 1) -> pb.Member:
    return pb.Member(member_id=member_id, display_name=name, face_count=faces)


@dataclass
class FakeFaceGateServicer(pb_grpc.FaceGateServiceServicer):
    """A test double of the FaceGate server: canned answers, failures on cue."""

    members: dict[str, pb.Member] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    requests: list[Any] = field(default_factory=list)
    time_remaining: list[float] = field(default_factory=list)
    invocation_metadata: list[dict[str, str]] = field(default_factory=list)
    get_member_unavailable: int = 0  # fail this many GetMember calls with UNAVAILABLE
    release: threading.Event = field(default_factory=threading.Event)
    """Set when the test ends: it lets go of the calls held by "slow"."""
    answered_slow: threading.Event = field(default_factory=threading.Event)

    def _record(self, name: str, request: Any, context: grpc.ServicerContext) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.requests.append(request)
        self.time_remaining.append(context.time_remaining())
        self.invocation_metadata.append(dict(context.invocation_metadata()))

    def Identify(self, request: pb.IdentifyRequest, context: grpc.ServicerContext) -> Any:
        self._record("Identify", request, context)
        if not request.image:
            context.abort_with_status(
                rich_status(
                    code_pb2.INVALID_ARGUMENT,
                    "image is empty",
                    "IMAGE_EMPTY",
                    (("image", "must hold an encoded image"),),
                )
            )
        if request.image == b"slow":  # held until the test ends: past any client deadline
            self.release.wait(timeout=60.0)
            self.answered_slow.set()
        if request.image == b"busy":
            context.abort_with_status(
                rich_status(code_pb2.RESOURCE_EXHAUSTED, "too busy", "BUSY", retry_delay=1.5)
            )
        if request.image == b"crash":
            raise RuntimeError("a bug")  # reaches the client as UNKNOWN, without details
        return pb.IdentifyResponse(decision=pb.DECISION_DENIED_NO_FACE, engine=pb.ENGINE_LOCAL)

    def Enroll(self, request: pb.EnrollRequest, context: grpc.ServicerContext) -> Any:
        self._record("Enroll", request, context)
        if request.member_id == "down":
            context.abort_with_status(
                rich_status(code_pb2.UNAVAILABLE, "starting", "SERVER_STARTING")
            )
        if request.member_id in self.members:
            context.abort_with_status(
                rich_status(code_pb2.ALREADY_EXISTS, "already enrolled", "MEMBER_ALREADY_EXISTS")
            )
        new = member(request.member_id, request.display_name, len(request.photos))
        self.members[request.member_id] = new
        return pb.EnrollResponse(member=new)

    def GetMember(self, request: pb.GetMemberRequest, context: grpc.ServicerContext) -> Any:
        self._record("GetMember", request, context)
        if self.get_member_unavailable > 0:
            self.get_member_unavailable -= 1
            context.abort_with_status(
                rich_status(code_pb2.UNAVAILABLE, "starting", "SERVER_STARTING")
            )
        if request.member_id not in self.members:
            context.abort_with_status(
                rich_status(
                    code_pb2.NOT_FOUND,
                    f"no member with id {request.member_id!r}",
                    "MEMBER_NOT_FOUND",
                )
            )
        return pb.GetMemberResponse(member=self.members[request.member_id])

    def ListMembers(self, request: pb.ListMembersRequest, context: grpc.ServicerContext) -> Any:
        self._record("ListMembers", request, context)
        ids = sorted(self.members)
        start = int(request.page_token or 0)
        end = start + (request.page_size or 100)
        return pb.ListMembersResponse(
            members=[self.members[i] for i in ids[start:end]],
            next_page_token=str(end) if end < len(ids) else "",
        )

    def DeleteMember(self, request: pb.DeleteMemberRequest, context: grpc.ServicerContext) -> Any:
        self._record("DeleteMember", request, context)
        # The member id names the status to fail with, e.g. "PERMISSION_DENIED".
        code = grpc.StatusCode[request.member_id]
        context.abort(code, f"failing with {code.name}")

    def ListAccessEvents(
        self, request: pb.ListAccessEventsRequest, context: grpc.ServicerContext
    ) -> Any:
        self._record("ListAccessEvents", request, context)
        start = int(request.page_token or 0)
        events = [pb.AccessEvent(event_id=100 - i) for i in range(start, min(start + 2, 5))]
        return pb.ListAccessEventsResponse(
            events=events, next_page_token=str(start + 2) if start + 2 < 5 else ""
        )


@dataclass
class Served:
    servicer: FakeFaceGateServicer
    target: str


@pytest.fixture
def served() -> Iterator[Served]:
    servicer = FakeFaceGateServicer(members={"m-1": member("m-1", "Kim Jiwoo", 2)})
    with serving(servicer) as target:
        yield Served(servicer, target)


@pytest.fixture
def client(served: Served) -> Iterator[FaceGateClient]:
    with FaceGateClient(served.target) as client:
        yield client


# ---------------------------------------------------------------- typed errors


def test_invalid_argument_carries_reason_and_field_violations(client: FaceGateClient) -> None:
    with pytest.raises(InvalidArgument) as caught:
        client.identify(b"", "gate-1")
    error = caught.value
    assert not isinstance(error, grpc.RpcError)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "image is empty"
    assert error.reason == "IMAGE_EMPTY"
    assert error.domain == DOMAIN
    assert error.metadata == {"k": "v"}
    assert error.field_violations == [("image", "must hold an encoded image")]
    assert str(error) == (
        "INVALID_ARGUMENT: image is empty (reason IMAGE_EMPTY; image: must hold an encoded image)"
    )


def test_not_found(client: FaceGateClient) -> None:
    with pytest.raises(NotFound) as caught:
        client.get_member("nobody")
    assert caught.value.reason == "MEMBER_NOT_FOUND"
    assert caught.value.field_violations == []
    assert str(caught.value) == "NOT_FOUND: no member with id 'nobody' (reason MEMBER_NOT_FOUND)"


def test_already_exists(client: FaceGateClient) -> None:
    with pytest.raises(AlreadyExists) as caught:
        client.enroll("m-1", [b"photo"])
    assert caught.value.reason == "MEMBER_ALREADY_EXISTS"


def test_resource_exhausted_reads_retry_info(client: FaceGateClient) -> None:
    with pytest.raises(ResourceExhausted) as caught:
        client.identify(b"busy", "gate-1")
    assert caught.value.retry_delay == 1.5
    assert str(caught.value) == "RESOURCE_EXHAUSTED: too busy (reason BUSY; retry after 1.5 s)"


def test_status_without_details_is_still_typed(client: FaceGateClient) -> None:
    with pytest.raises(Internal) as caught:
        client.identify(b"crash", "gate-1")
    assert caught.value.code is grpc.StatusCode.UNKNOWN
    assert caught.value.reason is None
    assert caught.value.field_violations == []


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.OUT_OF_RANGE, InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.ALREADY_EXISTS, AlreadyExists),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
        (grpc.StatusCode.INTERNAL, Internal),
        (grpc.StatusCode.UNKNOWN, Internal),
        (grpc.StatusCode.DATA_LOSS, Internal),
        (grpc.StatusCode.UNIMPLEMENTED, Internal),
        (grpc.StatusCode.ABORTED, Internal),
        (grpc.StatusCode.CANCELLED, Internal),
    ],
)
def test_every_status_code_maps_to_its_family(
    client: FaceGateClient, code: grpc.StatusCode, expected: type[FaceGateError]
) -> None:
    with pytest.raises(FaceGateError) as caught:
        client.delete_member(code.name)
    assert type(caught.value) is expected
    assert caught.value.code is code
    assert caught.value.message == f"failing with {code.name}"


class FakeCallError(grpc.RpcError):
    """A stand-in for a failed call, for statuses a real server cannot be made to send."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: Any) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailers


def test_inconsistent_or_malformed_details_are_ignored() -> None:
    status = rich_status(code_pb2.NOT_FOUND, "gone", "MEMBER_NOT_FOUND")
    mismatched = FakeCallError(grpc.StatusCode.INTERNAL, "other", status.trailing_metadata)
    error = from_rpc_error(mismatched)
    assert type(error) is Internal
    assert (error.message, error.reason) == ("other", None)

    garbage = (("grpc-status-details-bin", b"\xff\xff\xff"),)
    error = from_rpc_error(FakeCallError(grpc.StatusCode.NOT_FOUND, "gone", garbage))
    assert type(error) is NotFound
    assert error.reason is None

    assert type(from_rpc_error(FakeCallError(grpc.StatusCode.NOT_FOUND, "x", None))) is NotFound
    assert type(from_rpc_error(grpc.RpcError("bare"))) is Internal


def test_errors_can_be_raised_directly() -> None:
    error = NotFound("no member", reason="MEMBER_NOT_FOUND")
    assert error.code is grpc.StatusCode.NOT_FOUND
    assert str(error) == "NOT_FOUND: no member (reason MEMBER_NOT_FOUND)"
    assert "NotFound(code=NOT_FOUND" in repr(error)


def test_public_names_are_exported() -> None:
    for name in facegate_client.__all__:
        assert hasattr(facegate_client, name), name


# ---------------------------------------------------------------- deadlines


def test_every_call_has_a_deadline_by_default(served: Served, client: FaceGateClient) -> None:
    client.get_member("m-1")
    client.identify(b"frame", "gate-1")
    get_remaining, identify_remaining = served.servicer.time_remaining
    assert 4.0 < get_remaining < 5.5  # the deadline travels rounded up a little
    assert 1.0 < identify_remaining < 2.5


def test_deadline_exceeded(served: Served, client: FaceGateClient) -> None:
    with pytest.raises(DeadlineExceeded) as caught:
        client.identify(b"slow", "gate-1", timeout=0.1)
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    # The client gave up by itself, at its deadline: the server holds the call until the
    # test ends, and (if the call reached it in time) saw a deadline of 0.1 s, not more.
    assert not served.servicer.answered_slow.is_set()
    assert all(remaining <= 0.15 for remaining in served.servicer.time_remaining)


def test_constructor_timeout_applies(served: Served) -> None:
    client = FaceGateClient(served.target, identify_timeout=0.1)
    with client, pytest.raises(DeadlineExceeded):
        client.identify(b"slow", "gate-1")


# ---------------------------------------------------------------- retries


def test_get_member_is_retried_on_unavailable(served: Served, client: FaceGateClient) -> None:
    served.servicer.get_member_unavailable = 1
    assert client.get_member("m-1").display_name == "Kim Jiwoo"
    assert served.servicer.calls["GetMember"] == 2


def test_get_member_gives_up_after_three_attempts(served: Served, client: FaceGateClient) -> None:
    served.servicer.get_member_unavailable = 10
    with pytest.raises(Unavailable) as caught:
        client.get_member("m-1")
    assert caught.value.reason == "SERVER_STARTING"
    assert served.servicer.calls["GetMember"] == 3


def test_enroll_is_not_retried(served: Served, client: FaceGateClient) -> None:
    with pytest.raises(Unavailable):
        client.enroll("down", [b"photo"])
    assert served.servicer.calls["Enroll"] == 1


def test_unreachable_server_is_unavailable() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    server.stop(grace=None).wait()  # nothing listens there any more
    client = FaceGateClient(f"127.0.0.1:{port}", timeout=1.0)
    with client, pytest.raises(Unavailable):
        client.delete_member("m-1")


# ---------------------------------------------------------------- the calls


def test_enroll_and_paging(served: Served, client: FaceGateClient) -> None:
    for i in range(2, 6):
        created = client.enroll(f"m-{i}", [b"a", b"b"], display_name=f"Member {i}")
        assert (created.member_id, created.face_count) == (f"m-{i}", 2)
    added = served.servicer.requests[-1]
    assert list(added.photos) == [b"a", b"b"]

    page = client.list_members(page_size=2)
    assert [m.member_id for m in page.members] == ["m-1", "m-2"]
    assert page.next_page_token == "2"
    assert [m.member_id for m in client.iter_members(page_size=2)] == [
        f"m-{i}" for i in range(1, 6)
    ]
    assert [r.page_token for r in served.servicer.requests[-3:]] == ["", "2", "4"]


def test_enroll_rejects_a_single_photo_passed_as_bytes(client: FaceGateClient) -> None:
    with pytest.raises(TypeError, match="sequence of photos"):
        client.enroll("m-9", b"one photo")


def test_access_events_filters_and_paging(served: Served, client: FaceGateClient) -> None:
    start = datetime(2026, 11, 26, 23, 0, tzinfo=UTC)
    end = datetime(2026, 11, 27, 9, 0, tzinfo=timezone(timedelta(hours=9)))  # 00:00 UTC
    events = list(
        client.iter_access_events(
            member_id="m-1", turnstile_id="gate-1", start_time=start, end_time=end, page_size=2
        )
    )
    assert [e.event_id for e in events] == [100, 99, 98, 97, 96]
    first = served.servicer.requests[0]
    assert (first.member_id, first.turnstile_id, first.page_size) == ("m-1", "gate-1", 2)
    assert first.start_time.ToDatetime(tzinfo=UTC) == start
    assert first.end_time.ToDatetime(tzinfo=UTC) == datetime(2026, 11, 27, tzinfo=UTC)
    assert client.list_access_events().next_page_token == "2"
    unfiltered = served.servicer.requests[-1]
    assert not unfiltered.HasField("start_time")
    assert not unfiltered.HasField("end_time")


def test_metadata_is_sent_with_every_call(served: Served) -> None:
    with FaceGateClient(served.target, metadata=[("x-api-key", "secret")]) as client:
        client.get_member("m-1")
        client.identify(b"frame", "gate-1")
    assert all(md.get("x-api-key") == "secret" for md in served.servicer.invocation_metadata)


def test_an_injected_channel_is_used_and_left_open(served: Served) -> None:
    channel = grpc.insecure_channel(served.target, options=facegate_client.CHANNEL_OPTIONS)
    try:
        with FaceGateClient("ignored:1", channel=channel) as client:
            assert client.get_member("m-1").member_id == "m-1"
        again = pb_grpc.FaceGateServiceStub(channel)
        reply = again.GetMember(pb.GetMemberRequest(member_id="m-1"), timeout=5)
        assert reply.member.member_id == "m-1"
    finally:
        channel.close()


def test_constructor_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="positive"):
        FaceGateClient(timeout=0)
    channel = grpc.insecure_channel("127.0.0.1:1")
    try:
        with pytest.raises(ValueError, match="not both"):
            FaceGateClient(channel=channel, credentials=grpc.ssl_channel_credentials())
    finally:
        channel.close()


class Deadlines(pb_grpc.FaceGateServiceServicer):
    """Records the deadline each call arrived with (seconds left)."""

    def __init__(self) -> None:
        self.left: dict[str, list[float]] = {}

    def _note(self, name: str, context: grpc.ServicerContext) -> None:
        remaining = context.time_remaining()
        assert remaining is not None
        self.left.setdefault(name, []).append(remaining)

    def Enroll(self, request: Any, context: grpc.ServicerContext) -> pb.EnrollResponse:
        self._note("Enroll", context)
        return pb.EnrollResponse()

    def AddMemberPhotos(
        self, request: Any, context: grpc.ServicerContext
    ) -> pb.AddMemberPhotosResponse:
        self._note("AddMemberPhotos", context)
        return pb.AddMemberPhotosResponse()

    def GetMember(self, request: Any, context: grpc.ServicerContext) -> pb.Member:
        self._note("GetMember", context)
        return pb.Member()

    def Identify(self, request: Any, context: grpc.ServicerContext) -> pb.IdentifyResponse:
        self._note("Identify", context)
        return pb.IdentifyResponse()


def test_enrolment_waits_as_long_as_the_server_may_take() -> None:
    """Enroll and AddMemberPhotos wait longer than the server's own limit (60 s) by default,
    not the 5 s of the other calls: ten large photos take seconds to encode, and a client
    that gave up sooner would not know whether the member was stored."""
    servicer = Deadlines()
    with serving(servicer) as target, FaceGateClient(target) as client:
        client.enroll("m-1", [b"photo"])
        client.add_member_photos("m-1", [b"photo"])
        client.get_member("m-1")
        client.identify(b"frame", "gate-1")
        client.enroll("m-2", [b"photo"], timeout=3)
    left = servicer.left
    for enrolment in (left["Enroll"][0], left["AddMemberPhotos"][0]):
        assert 60 < enrolment <= 91  # (gRPC rounds a deadline up)
    assert 2 < left["GetMember"][0] <= 6
    assert 1 < left["Identify"][0] <= 3
    assert 1 < left["Enroll"][1] <= 4  # an explicit timeout wins
    with pytest.raises(ValueError, match="timeouts must be positive"):
        FaceGateClient(target, enroll_timeout=0)
