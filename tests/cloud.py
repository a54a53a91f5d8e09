"""Fixtures' building blocks for tests of the Azure engine: the Face API emulator (its clock
moved by the tests) and a FaceGate server wired to it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from facegate_azure_emulator import EmulatorSettings, ManualClock, RunningEmulator, start_emulator
from facegate_server.app import FaceGateServer
from facegate_server.cloud.sync import Training
from facegate_server.routing.router import RoutingEngine

from tests.helpers import FakeClock, running_server

KEY = "test-face-key"


@dataclass
class CloudGate:
    server: FaceGateServer
    stub: pb_grpc.FaceGateServiceStub
    emulator: RunningEmulator
    clock: FakeClock

    def settle(self) -> None:
        """Replay the outbox and train, as the background thread would, moving both clocks
        (FaceGate's and the emulator's) instead of waiting for the training to finish."""
        cloud = self.server.gate.replayer
        assert cloud is not None
        for _ in range(100):
            cloud.run_once()
            if self.server.store.outbox_depth() == 0 and cloud.training is Training.IDLE:
                return
            self.clock.advance(1.0)  # the next training poll is due
            emulator_clock = self.emulator.settings.clock
            assert isinstance(emulator_clock, ManualClock), "start the emulator with emulator()"
            emulator_clock.advance(1.0)  # the training has finished
        raise AssertionError(f"the cloud did not settle: training {cloud.training.value}")

    def sync(self, dry_run: bool = False) -> pb.SyncCloudResponse:
        """`facegate sync --wait`, the background's part done here: SyncCloud starts a
        reconciliation, the replayer's ticks run it, SyncCloud (report_only) reports it."""
        cloud = self.server.gate.replayer
        assert cloud is not None
        started: pb.SyncCloudResponse = self.stub.SyncCloud(
            pb.SyncCloudRequest(dry_run=dry_run), timeout=30
        )
        for _ in range(100):
            cloud.run_once()
            answer: pb.SyncCloudResponse = self.stub.SyncCloud(
                pb.SyncCloudRequest(report_only=True), timeout=30
            )
            if answer.finished.reconciliation_id == started.running.reconciliation_id:
                return answer
            self.clock.advance(1.0)  # past a back-off, if a page failed
        raise AssertionError(f"the reconciliation did not finish: {answer.running}")

    def identify(self, image: bytes, timeout: float = 30) -> pb.IdentifyResponse:
        response: pb.IdentifyResponse = self.stub.Identify(
            pb.IdentifyRequest(image=image, turnstile_id="gate-1"), timeout=timeout
        )
        return response

    def persons(self) -> dict[str, list[str]]:
        """The emulator's persons in FaceGate's group: member id (this store's persons;
        others by their userData) -> persisted face ids."""
        face = self.server.gate.replayer.face  # type: ignore[union-attr]
        return {
            face.member_of(p) or p.user_data: list(p.persisted_face_ids) for p in face.persons()
        }

    def reset_breaker(self) -> None:
        self.router.breaker.record_success()

    @property
    def router(self) -> RoutingEngine:
        router = self.server.gate.engine
        assert isinstance(router, RoutingEngine)
        return router


def emulator(**settings: Any) -> RunningEmulator:
    """An emulator whose clock stands still (trainings finish when `CloudGate.settle` moves it).

    No rate limit unless a test asks for one (`rate_per_second=...`): on a clock that
    stands still, the tier's token bucket would never refill. No small-face pass unless a
    test asks for one (`small_faces=True`): it costs 0.4-1.2 s a photo of the emulator's
    core, which the 1.2-s budget tests share with the local engine (emulator/README.md)."""
    settings = {"clock": ManualClock(), "rate_per_second": 0, "small_faces": False, **settings}
    return start_emulator(EmulatorSettings(key=KEY, training_seconds=0.05, workers=1, **settings))


@contextmanager
def cloud_gate(
    emu: RunningEmulator, data: Path, key: str = KEY, **settings: Any
) -> Iterator[CloudGate]:
    """A server wired to the emulator, whose outbox the test replays (`CloudGate.settle`).

    A generous budget by default: the tests share two cores with the emulator. No rate
    limit (the gRPC one or the cloud's): the clock stands still, so no token bucket would
    ever refill."""
    clock = FakeClock()
    values = {"identify_budget_ms": 4000, "azure_rate": 0, **settings}
    with (
        running_server(
            data,
            clock=clock,
            background_sync=False,
            azure_endpoint=emu.endpoint,
            azure_key=key,
            azure_timeout_s=5.0,
            **values,
        ) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield CloudGate(server, pb_grpc.FaceGateServiceStub(channel), emu, clock)


def engines(response: pb.IdentifyResponse) -> dict[str, str]:
    """{"azure": "DECIDED", "local": "AGREED"} from a response's engine reports."""
    return {
        pb.Engine.Name(r.engine).removeprefix("ENGINE_").lower(): pb.EngineOutcome.Name(
            r.outcome
        ).removeprefix("ENGINE_OUTCOME_")
        for r in response.engines
    }


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)
