"""The gRPC server model (rpc/server.py): the bound on calls in the server, the arrival
time, and calls whose caller has gone. No recognition: raw-bytes methods, 1 thread."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from facegate_server.errors import FaceGateError
from facegate_server.rpc.server import Lane, RpcServer, arrival
from facegate_server.rpc.servicer import FaceGateServicer
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

SERVICE = "test.Blocking"


@dataclass
class Blocking:
    """`Hold` blocks its thread until `release` is set; every call records its arrival and
    start."""

    release: threading.Event = field(default_factory=threading.Event)
    started: list[tuple[bytes, float | None, float]] = field(default_factory=list)
    finished: list[bytes] = field(default_factory=list)

    def hold(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.started.append((request, arrival(), time.monotonic()))
        if not self.release.wait(30):
            raise AssertionError("never released")
        self.finished.append(request)  # as the servicer writes its access event
        return request

    def register(self, server: grpc.aio.Server) -> None:
        handlers = {
            "Hold": grpc.unary_unary_rpc_method_handler(self.hold),
            "Door": grpc.unary_unary_rpc_method_handler(self.hold),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


@contextmanager
def serving(service: Blocking, **options: Any) -> Iterator[tuple[RpcServer, grpc.Channel]]:
    """A started RpcServer of `service` (1 thread and a queue of 1 unless `options` say
    otherwise) and a channel to it; on exit the service's calls are released and the
    server stopped (a second stop is harmless)."""
    server = RpcServer(
        listen="127.0.0.1:0",
        credentials=None,
        register=service.register,
        service_names=(SERVICE,),
        **{"threads": 1, "queue": 1, **options},
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, channel
    finally:
        service.release.set()
        server.stop(grace=1)


@pytest.fixture
def blocking() -> Iterator[tuple[RpcServer, Blocking, grpc.Channel]]:
    service = Blocking()
    with serving(service) as (server, channel):
        yield server, service, channel


def test_over_the_bound_a_caller_is_refused_at_once_and_queued_calls_keep_their_arrival(
    blocking: tuple[RpcServer, Blocking, grpc.Channel],
) -> None:
    server, service, channel = blocking
    hold = channel.unary_unary(f"/{SERVICE}/Hold")
    first = hold.future(b"first", timeout=30)
    assert server.slots.wait_for(1, timeout=10)  # the only thread is held
    sent = time.monotonic()
    second = hold.future(b"second", timeout=30)
    assert server.slots.wait_for(2, timeout=10)  # the queue (1) is full

    with pytest.raises(grpc.RpcError) as refused:
        hold(b"third", timeout=30)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(refused.value)
    assert status is not None
    infos = {d.type_url.rsplit("/", 1)[-1]: d for d in status.details}
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    infos["google.rpc.ErrorInfo"].Unpack(info)
    infos["google.rpc.RetryInfo"].Unpack(retry)
    assert info.reason == "SERVER_BUSY"
    assert retry.retry_delay.ToNanoseconds() > 0
    assert "busy" in status.message

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as probe:  # health needs no thread
        answer = health_pb2_grpc.HealthStub(probe).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=10
        )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

    released = time.monotonic()
    service.release.set()
    assert (first.result(), second.result()) == (b"first", b"second")
    request, arrived, began = service.started[1]
    assert request == b"second" and arrived is not None
    assert sent <= arrived < released <= began  # it arrived long before a thread took it
    assert server.slots.wait_for(0, timeout=10)


def test_a_call_whose_caller_has_gone_is_never_started(
    blocking: tuple[RpcServer, Blocking, grpc.Channel],
) -> None:
    server, service, channel = blocking
    hold = channel.unary_unary(f"/{SERVICE}/Hold")
    first = hold.future(b"first", timeout=30)
    assert server.slots.wait_for(1, timeout=10)
    gone = hold.future(b"gone", timeout=30)
    assert server.slots.wait_for(2, timeout=10)
    gone.cancel()
    assert server.slots.wait_for(1, timeout=10)  # its slot is free before a thread took it
    service.release.set()
    assert first.result() == b"first"
    assert server.slots.wait_for(0, timeout=10)
    assert [request for request, _, _ in service.started] == [b"first"]


def test_stop_reports_not_serving_and_releases_its_thread() -> None:
    with serving(Blocking()) as (server, _):
        server.stop(grace=0)
    assert not server._thread.is_alive()
    assert server.health._server_status[SERVICE] == health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class _Budget:
    identify_budget: float


@dataclass
class _Deadline:
    remaining: float | None

    def time_remaining(self) -> float | None:
        return self.remaining


def test_the_identify_budget_starts_when_the_call_arrived() -> None:
    servicer = FaceGateServicer(_Budget(identify_budget=1.2))
    waited = time.monotonic() - 0.5  # arrived half a second ago, waiting for a thread
    left = servicer._time_left(waited, _Deadline(None))
    assert left <= 0.7
    assert servicer._time_left(waited, _Deadline(0.2)) == 0.2
    assert servicer._time_left(None, _Deadline(None)) == 1.2


def test_a_call_refused_for_load_is_told_to_on_unserved() -> None:
    """The servicer writes an Identify refused for load to the access log (`on_unserved`)."""
    service = Blocking()
    told: cf.Future[tuple[str, bytes, str]] = cf.Future()
    with serving(
        service,
        queue=0,
        on_unserved=lambda method, request, error, waited: told.set_result(
            (method, request, error.reason)
        ),
    ) as (server, channel):
        hold = channel.unary_unary(f"/{SERVICE}/Hold")
        first = hold.future(b"first", timeout=30)
        assert server.slots.wait_for(1, timeout=10)
        with pytest.raises(grpc.RpcError):
            hold(b"refused", timeout=30)
        assert told.result(timeout=10) == (f"/{SERVICE}/Hold", b"refused", "SERVER_BUSY")
        counted = server.refusals.counts()
        assert counted == {"Hold/RESOURCE_EXHAUSTED/SERVER_BUSY": 1}
        service.release.set()
        assert first.result() == b"first"


def test_a_lanes_methods_are_served_while_every_other_thread_is_held() -> None:
    """A `Lane` (app.py's door: Identify, Verify) has threads and a bound of its own: calls
    to other methods that fill the server do not delay or refuse it, nor it them."""
    service = Blocking()
    door = f"/{SERVICE}/Door"
    lanes = [Lane("door", frozenset({door}), threads=1, queue=0)]
    with serving(service, lanes=lanes) as (server, channel):
        hold, enter = channel.unary_unary(f"/{SERVICE}/Hold"), channel.unary_unary(door)
        held = [hold.future(b"held", timeout=30), hold.future(b"queued", timeout=30)]
        assert server.slots.wait_for(2, timeout=10)  # every other thread and queue: full
        with pytest.raises(grpc.RpcError) as refused:
            hold(b"refused", timeout=30)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 other calls are already in it" in (refused.value.details() or "")

        entered = enter.future(b"entered", timeout=30)
        assert server.lanes["door"].slots.wait_for(1, timeout=10)
        deadline = time.monotonic() + 10
        while len(service.started) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = [r for r, _, _ in service.started]
        assert started[1] == b"entered"  # started at once, beside the held one: not queued
        with pytest.raises(grpc.RpcError) as full:  # its own bound: one thread, no queue
            enter(b"refused", timeout=30)
        assert "1 door calls are already in it" in (full.value.details() or "")
        service.release.set()
        assert entered.result() == b"entered"
        assert [f.result() for f in held] == [b"held", b"queued"]
        assert sorted(r for r, _, _ in service.started) == [b"entered", b"held", b"queued"]


def test_a_call_whose_caller_left_before_a_thread_took_it_is_told_to_on_unserved() -> None:
    """An Identify whose deadline passed while it waited for a thread still gets its access
    event: the servicer is told, with how long the call waited."""
    service = Blocking()
    told: cf.Future[tuple[bytes, FaceGateError, float]] = cf.Future()
    with serving(
        service,
        on_unserved=lambda method, request, error, waited: told.set_result(
            (request, error, waited)
        ),
    ) as (server, channel):
        hold = channel.unary_unary(f"/{SERVICE}/Hold")
        first = hold.future(b"first", timeout=30)
        assert server.slots.wait_for(1, timeout=10)
        with pytest.raises(grpc.RpcError) as late:
            hold(b"late", timeout=0.5)
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        request, error, waited = told.result(timeout=10)
        assert (request, error.reason) == (b"late", "CALL_ABANDONED")
        assert waited >= 0.4
        assert "waited for one of the 1 threads for calls" in error.message
        service.release.set()
        assert first.result() == b"first"
        assert [r for r, _, _ in service.started] == [b"first"]  # never started


def test_a_stopping_server_returns_once_its_calls_have_written_what_they_write() -> None:
    """Stopping, the calls still waiting for a thread are cancelled: the servicer is told
    (SERVER_STOPPING, not a caller that left); a call still running in its thread at the
    grace's end finishes. stop() returns only once both have, so their access events are
    written before the store closes."""
    service = Blocking()
    told: list[tuple[bytes, str]] = []

    def slowly(method: str, request: bytes, error: FaceGateError, waited: float) -> None:
        time.sleep(0.3)  # an access log write on a slow disk
        told.append((request, error.reason))

    with serving(service, on_unserved=slowly) as (server, channel):
        hold = channel.unary_unary(f"/{SERVICE}/Hold")
        first = hold.future(b"first", timeout=30)
        assert server.slots.wait_for(1, timeout=10)
        queued = hold.future(b"queued", timeout=30)
        assert server.slots.wait_for(2, timeout=10)
        later = threading.Timer(1.0, service.release.set)  # the running call, slower than grace
        later.start()
        try:
            server.stop(grace=0.2)
            assert told == [(b"queued", "SERVER_STOPPING")]
            assert service.finished == [b"first"]
        finally:
            later.cancel()
            service.release.set()
        for call in (first, queued):
            with pytest.raises(grpc.RpcError):
                call.result()
