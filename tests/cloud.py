"""Fixtures' building blocks for tests of the Azure engine: the Face API emulator, a FaceGate
server wired to it, and a hand-moved clock for the circuit breaker."""

from __future__ import annotations

import threading
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
from facegate_server.app import FaceGateServer, build_server
from facegate_server.cloud.sync import Training
from facegate_server.config import load_settings
from facegate_server.routing.router import RoutingEngine

KEY = "test-face-key"


class FakeClock:
    """Monotonic seconds that move only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


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

    def identify(self, image: bytes, timeout: float = 30) -> pb.IdentifyResponse:
        response: pb.IdentifyResponse = self.stub.Identify(
            pb.IdentifyRequest(image=image, turnstile_id="gate-1"), timeout=timeout
        )
        return response

    def persons(self) -> dict[str, list[str]]:
        """The emulator's persons in FaceGate's group: userData -> persisted face ids."""
        face = self.server.gate.replayer.face  # type: ignore[union-attr]
        return {p.user_data: list(p.persisted_face_ids) for p in face.persons()}

    def reset_breaker(self) -> None:
        self.router.breaker.record_success()

    @property
    def router(self) -> RoutingEngine:
        router = self.server.gate.engine
        assert isinstance(router, RoutingEngine)
        return router


def emulator(**settings: Any) -> RunningEmulator:
    """An emulator whose clock stands still (trainings finish when `CloudGate.settle` moves it)."""
    settings = {"clock": ManualClock(), **settings}
    return start_emulator(EmulatorSettings(key=KEY, training_seconds=0.05, workers=1, **settings))


@contextmanager
def cloud_gate(
    emu: RunningEmulator, data: Path, key: str = KEY, **settings: Any
) -> Iterator[CloudGate]:
    clock = FakeClock()
    config = load_settings(
        {},
        listen="127.0.0.1:0",
        data_dir=data,
        azure_endpoint=emu.endpoint,
        azure_key=key,
        azure_timeout_s=5.0,
        # A generous budget by default: the tests share two cores with the emulator. No
        # rate limit: the clock below stands still, so no token bucket would ever refill.
        **{"identify_budget_ms": 4000, "workers": 1, "identify_rate": 0, **settings},
    )
    server = build_server(config, clock=clock)
    server.background_sync = False
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield CloudGate(server, pb_grpc.FaceGateServiceStub(channel), emu, clock)
    finally:
        server.stop(grace=1)


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
