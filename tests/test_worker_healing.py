"""Self-healing recognition workers (engines/pool.py), with real worker processes.

A worker is caught with a job in hand by stopping it (SIGSTOP) first: its job cannot finish
before the test acts. Killed (SIGKILL) or left hung, the worker is replaced alone and its
job answered by the other worker: no failed call that another worker could take.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from facegate_client.cli import format_status
from facegate_server.engines.admission import RecognitionBusy
from facegate_server.engines.index import FaceIndex
from facegate_server.engines.local import LocalEngine
from facegate_server.engines.pool import WorkerPool
from facegate_server.engines.worker import Analysis
from facegate_server.routing.router import RoutingEngine
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import Faces
from tests.helpers import running_server

HANG_AFTER = 3.0


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    workers = WorkerPool(
        2, max_bytes=6 * 1024 * 1024, max_side=4096, per_caller=2, hang_after=HANG_AFTER
    )
    try:
        workers.warm_up()
        assert workers.live() == 2
        yield workers
    finally:
        workers.close()


def healed(pool: WorkerPool, restarts: int) -> bool:
    """Wait (told by the pool, not by polling) until both workers are ready again and the
    slots have replaced `restarts` workers in all."""
    done = threading.Event()

    def check() -> None:
        if pool.live() == 2 and sum(w.restarts for w in pool.state()) >= restarts:
            done.set()

    pool.on_change(check)
    check()
    return done.wait(180)


def catch_a_worker_with_a_job(pool: WorkerPool, frame: bytes) -> tuple[int, list]:
    """Stop one worker; queue frames until its slot has sent it one. (pid, futures)."""
    engine = LocalEngine(pool, FaceIndex([]))
    stopped = pool.pids()[0]
    os.kill(stopped, signal.SIGSTOP)
    futures = []
    for _ in range(50):
        future = pool.submit(frame, engine.enrol_rules, timeout=60)
        futures.append(future)
        while not future.done():  # the other worker's frame: answered in a moment
            if any(w.pid == stopped and w.state == "busy" for w in pool.state()):
                return stopped, futures
            time.sleep(0.01)
    raise AssertionError("the stopped worker's slot never took a job")


def analysed(futures: list) -> list[Analysis]:
    return [f.result(timeout=60) for f in futures]


def test_a_killed_worker_is_replaced_alone_and_its_job_answered(
    pool: WorkerPool, faces: Faces
) -> None:
    frame = faces.read("people/lin_manuel_miranda/1.png")
    before = pool.admission.snapshot()
    restarts = sum(w.restarts for w in pool.state())
    stopped, futures = catch_a_worker_with_a_job(pool, frame)
    os.kill(stopped, signal.SIGKILL)  # a dlib crash, as seen from outside
    results = analysed(futures)  # every one answered: the lost job ran on the other worker
    assert all(len(r.boxes) == 1 for r in results)
    after = pool.admission.snapshot()
    assert after["lost"] - before.get("lost", 0) == 1
    assert after["retried"] - before.get("retried", 0) == 1
    assert healed(pool, restarts + 1)
    assert stopped not in pool.pids()


def test_a_hung_worker_is_detected_and_replaced(pool: WorkerPool, faces: Faces) -> None:
    frame = faces.read("people/lin_manuel_miranda/1.png")
    before = pool.admission.snapshot()
    restarts = sum(w.restarts for w in pool.state())
    stopped, futures = catch_a_worker_with_a_job(pool, frame)
    # Left stopped: the watchdog sees its heartbeat stop and kills it after HANG_AFTER.
    results = analysed(futures)
    assert all(len(r.boxes) == 1 for r in results)
    after = pool.admission.snapshot()
    assert after["retried"] - before.get("retried", 0) == 1
    assert healed(pool, restarts + 1)
    assert stopped not in pool.pids()


def test_a_full_queue_is_refused_at_once(faces: Faces) -> None:
    """Refusal comes when the frame is submitted, not when its deadline passes."""
    frame = faces.read("people/lin_manuel_miranda/1.png")
    pool = WorkerPool(1, max_bytes=6 * 1024 * 1024, max_side=4096, queue=2, hang_after=60)
    try:
        pool.warm_up()
        engine = LocalEngine(pool, FaceIndex([]))
        stopped = pool.pids()[0]
        os.kill(stopped, signal.SIGSTOP)  # nothing queued gets done
        try:
            waiting: list = []
            started = time.monotonic()
            with pytest.raises(RecognitionBusy) as busy:
                for _ in range(4):  # 2 queued, and 1 sent to the stopped worker if it took one
                    waiting.append(pool.submit(frame, engine.enrol_rules, timeout=60))
            assert 2 <= len(waiting) <= 3
            assert time.monotonic() - started < 5.0  # at once: the deadline is 60 s away
            assert busy.value.retry_delay > 0
        finally:
            os.kill(stopped, signal.SIGCONT)
        assert all(len(r.boxes) == 1 for r in analysed(waiting))
    finally:
        pool.close()


def test_health_says_not_serving_while_nothing_can_decide(tmp_path: Path) -> None:
    """One worker, no cloud: its death leaves nothing to decide with (NOT_SERVING, and
    `facegate status` says so), until its replacement is ready (SERVING)."""
    with (
        running_server(tmp_path, workers=1) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=180)
        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        assert next(watch).status == serving
        router = server.gate.engine
        assert isinstance(router, RoutingEngine) and isinstance(router.local, LocalEngine)
        os.kill(router.local.pool.pids()[0], signal.SIGKILL)
        assert next(watch).status == not_serving
        status = pb_grpc.FaceGateServiceStub(channel).GetStatus(pb.GetStatusRequest())
        assert not status.can_decide and status.workers[0].state in ("stopped", "starting")
        assert "CANNOT DECIDE" in format_status(status)
        assert next(watch).status == serving
        status = pb_grpc.FaceGateServiceStub(channel).GetStatus(pb.GetStatusRequest())
        assert status.can_decide and status.workers[0].restarts == 1
        watch.cancel()
