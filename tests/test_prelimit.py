"""Memory before authentication (README: Memory before authentication): a unary method's
message is received only once the call is admitted, and a frame method takes one frame.

The server runs as `facegate serve` in a process of its own, so that its resident set is
its own (the client's copies of the messages would swamp an in-process measurement).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from facegate_server.commands.token import new_token
from facegate_server.rpc import auth
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import Faces
from tests.helpers import start_serve

MIB = 1024 * 1024
TOKENS = {"crm": new_token(), "gate-1": new_token()}
CALLERS = (
    f"backend crm {auth.token_hash(TOKENS['crm'])};"
    f"turnstile gate-1 {auth.token_hash(TOKENS['gate-1'])}"
)
ENROLL = "/facegate.v1.FaceGateService/Enroll"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, psutil.Process]]:
    """A `facegate serve` with a backend and a turnstile: (target, its process)."""
    data = tmp_path_factory.mktemp("prelimit")
    settings = {
        "FACEGATE_DATA_DIR": str(data),
        "FACEGATE_TOKENS": CALLERS,
        "FACEGATE_WORKERS": "1",
        "FACEGATE_ENROLL_RATE": "0",
        "FACEGATE_IDENTIFY_RATE": "0",
        "FACEGATE_MAX_PHOTO_BYTES": str(64 * MIB),  # the 60 MiB photo is a photo
    }
    process, target = start_serve(settings, data / "serve.log")
    try:
        yield target, psutil.Process(process.pid)
    finally:
        process.terminate()
        process.wait(30)


def channel(target: str) -> grpc.Channel:
    """A channel on a connection of its own, that may send 64 MiB messages."""
    return grpc.insecure_channel(
        target,
        options=[("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", 64 * MIB)],
    )


def bearer(name: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[name]}")]


def enroll_request(member_id: str, photo: bytes) -> pb.EnrollRequest:
    return pb.EnrollRequest(member_id=member_id, display_name="Big Photo", photos=[photo])


def padded(photo: bytes, size: int) -> bytes:
    """A JPEG of `size` bytes: the photo, then zeros after its end (decoders ignore them)."""
    return photo + b"\0" * (size - len(photo))


def test_an_unauthenticated_60_mib_enroll_is_refused(served: tuple[str, psutil.Process]) -> None:
    target, _ = served
    with channel(target) as ch, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.FaceGateServiceStub(ch).Enroll(
            enroll_request("m-anon", b"\0" * 60 * MIB), timeout=60
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refused.value.details() == (
        "this server needs credentials: metadata 'authorization: Bearer <token>'"
    )


def test_the_backends_60_mib_enroll_still_enrols(
    served: tuple[str, psutil.Process], faces: Faces
) -> None:
    target, _ = served
    photo = padded(faces.read(faces.of("barack_obama")[0]), 60 * MIB)
    with channel(target) as ch:
        stub = pb_grpc.FaceGateServiceStub(ch)
        enrolled = stub.Enroll(enroll_request("m-big", photo), timeout=120, metadata=bearer("crm"))
        assert enrolled.member.member_id == "m-big"
        got = stub.GetMember(pb.GetMemberRequest(member_id="m-big"), metadata=bearer("crm"))
        assert got.member.display_name == "Big Photo"


def test_a_turnstiles_oversized_frame_is_refused_before_it_is_parsed(
    served: tuple[str, psutil.Process],
) -> None:
    target, _ = served
    image = b"\xff\xd8" + b"\0" * (7 * MIB)  # above FACEGATE_MAX_IMAGE_BYTES (6 MiB) + 64 KiB
    limit = 6 * MIB + 64 * 1024
    why = (
        f"one image of at most FACEGATE_MAX_IMAGE_BYTES = {6 * MIB} bytes, "
        "and its ids in 65536 bytes"
    )
    with channel(target) as ch:
        stub = pb_grpc.FaceGateServiceStub(ch)
        for method, call, request in (
            ("Identify", stub.Identify, pb.IdentifyRequest(image=image, turnstile_id="t1")),
            (
                "Verify",
                stub.Verify,
                pb.VerifyRequest(member_id="m", image=image, turnstile_id="t1"),
            ),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call(request, timeout=60, metadata=bearer("gate-1"))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details() == (
                f"image: the {method} request message is {request.ByteSize()} bytes; "
                f"{method} takes at most {limit} bytes ({why})"
            )


def test_a_unary_method_called_with_no_message_is_refused(
    served: tuple[str, psutil.Process],
) -> None:
    """The methods are request-streaming on the server now: a client that streams no
    message gets a precise refusal, not a hang or INTERNAL."""
    target, _ = served
    with channel(target) as ch:
        streamed = ch.stream_unary("/facegate.v1.FaceGateService/GetMember")
        with pytest.raises(grpc.RpcError) as refused:
            streamed(iter(()), timeout=30, metadata=bearer("crm"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            refused.value.details() == "request: GetMember takes one request message; none was sent"
        )
        garbage = ch.unary_unary("/facegate.v1.FaceGateService/GetMember")
        with pytest.raises(grpc.RpcError) as refused:
            garbage(b"\xff\xff\xff", timeout=30, metadata=bearer("crm"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == (
            "request: the GetMember request message could not be parsed"
        )


def test_unauthenticated_enrolls_cost_the_server_little_memory(tmp_path: Path) -> None:
    """8 concurrent unauthenticated Enrolls of a 60 MiB photo: each used to cost the server
    about twice its message (~1 GB for the 8); now what flow control lets through (below
    1 MiB each measured). The bound is 12 MiB a call: generous, and far below the old cost."""
    settings = {"FACEGATE_DATA_DIR": str(tmp_path), "FACEGATE_TOKENS": CALLERS}
    settings |= {"FACEGATE_WORKERS": "1", "FACEGATE_MAX_PHOTO_BYTES": str(64 * MIB)}
    process, target = start_serve(settings, tmp_path / "serve.log")
    watched = psutil.Process(process.pid)
    calls = 8
    message = enroll_request("m-anon", b"\0" * 60 * MIB).SerializeToString()
    channels = [channel(target) for _ in range(calls)]
    try:
        for ch in channels:
            grpc.channel_ready_future(ch).result(timeout=30)
        time.sleep(0.5)
        at_rest = watched.memory_info().rss
        peak, done = at_rest, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, watched.memory_info().rss)
                time.sleep(0.005)

        def call(ch: grpc.Channel) -> Any:
            try:
                ch.unary_unary(ENROLL)(message, timeout=120)
            except grpc.RpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            with futures.ThreadPoolExecutor(calls) as pool:
                codes = list(pool.map(call, channels))
            time.sleep(0.3)
        finally:
            done.set()
            sampler.join()
    finally:
        for ch in channels:
            ch.close()
        process.terminate()
        process.wait(30)
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * calls
    growth = peak - at_rest
    assert growth < calls * 12 * MIB, f"the server grew by {growth / MIB:.0f} MiB"


def test_a_probe_listener_serves_health_alone_and_locks_it_on_the_main_port(
    tmp_path: Path,
) -> None:
    """FACEGATE_HEALTH_LISTEN: probes get health there, without credentials, and a large
    message is refused from its length; on the main port health then needs a known caller."""
    settings = {"FACEGATE_DATA_DIR": str(tmp_path), "FACEGATE_TOKENS": CALLERS}
    settings |= {"FACEGATE_WORKERS": "1", "FACEGATE_HEALTH_LISTEN": "127.0.0.1:0"}
    log = tmp_path / "serve.log"
    process, target = start_serve(settings, log)
    try:
        serving = [json.loads(line) for line in log.read_text().splitlines() if '"serving"' in line]
        probes = f"127.0.0.1:{serving[-1]['health_port']}"
        check = health_pb2.HealthCheckRequest(service="facegate.v1.FaceGateService")
        with channel(probes) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            assert stub.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
            big = health_pb2.HealthCheckRequest(service="x" * 60 * MIB)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Check(big, timeout=60)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in (refused.value.details() or "")
            with pytest.raises(grpc.RpcError) as refused:  # nothing but health there
                pb_grpc.FaceGateServiceStub(ch).GetStatus(pb.GetStatusRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with channel(target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Check(check, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            answer = stub.Check(check, timeout=10, metadata=bearer("gate-1"))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            # Watch streams its answers: its one message too is read after admission.
            big = health_pb2.HealthCheckRequest(service="x" * 60 * MIB)
            with pytest.raises(grpc.RpcError) as refused:
                next(stub.Watch(big, timeout=60))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            watched = stub.Watch(check, timeout=10, metadata=bearer("gate-1"))
            assert next(watched).status == health_pb2.HealthCheckResponse.SERVING
            watched.cancel()
    finally:
        process.terminate()
        process.wait(30)
