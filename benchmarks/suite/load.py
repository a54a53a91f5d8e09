"""Turnstiles: threads calling Identify over real gRPC with the facegate_client library,
each with its own channel, one frame after the other (a closed loop) for a set time.

Threads, not processes: a turnstile spends its time waiting on the network, so the load
generator's GIL costs little; each record keeps the client-side latency and the server's
own `server_latency`, and their difference (client_overhead_ms in the results) shows what
the generator and gRPC add at each concurrency.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from facegate.v1 import facegate_service_pb2 as pb
from facegate_client import FaceGateClient
from facegate_client.errors import FaceGateError

from .frames import Probe


def _record(probe: Probe, latency_s: float) -> dict[str, Any]:
    return {
        "latency_ms": latency_s * 1000.0,
        "server_ms": None,
        "code": "OK",
        "decision": "",
        "engine": "",
        "member_id": "",
        "expected": probe.member_id,
        "probe": probe.path,
        "reports": {},
        "cloud_transactions": 0,
    }


def describe(record: dict[str, Any], answer: pb.IdentifyResponse) -> dict[str, Any]:
    record["server_ms"] = answer.server_latency.ToNanoseconds() / 1e6
    record["decision"] = pb.Decision.Name(answer.decision).removeprefix("DECISION_")
    record["engine"] = pb.Engine.Name(answer.engine).removeprefix("ENGINE_")
    record["member_id"] = answer.member_id
    record["reports"] = {
        pb.Engine.Name(r.engine).removeprefix("ENGINE_").lower(): pb.EngineOutcome.Name(
            r.outcome
        ).removeprefix("ENGINE_OUTCOME_")
        for r in answer.engines
    }
    record["cloud_transactions"] = answer.cloud_transactions
    return record


def identify_once(
    client: FaceGateClient, probe: Probe, resolution: str, name: str
) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        answer = client.identify(probe.frames[resolution], turnstile_id=name)
    except FaceGateError as error:
        record = _record(probe, time.perf_counter() - started)
        record["code"] = error.code.name
        return record
    return describe(_record(probe, time.perf_counter() - started), answer)


def run_cell(
    target: str,
    probes: Sequence[Probe],
    resolution: str,
    concurrency: int,
    seconds: float,
    deadline: float,
    hostile: Hostile | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """`concurrency` turnstiles send frames for `seconds` (a call started before the end is
    waited for), beside `hostile` when given (started with them, stopped at the end).
    Returns every call's record and the wall time from start to last answer."""
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)
    clients = [FaceGateClient(target, identify_timeout=deadline) for _ in range(concurrency)]
    stop_at = [0.0]

    def turnstile(index: int) -> None:
        client = clients[index]
        name = f"bench-gate-{index + 1}"
        position = index * max(1, len(probes) // concurrency)  # spread over the probes
        barrier.wait()
        while True:  # at least one call each, however short the cell
            record = identify_once(client, probes[position % len(probes)], resolution, name)
            position += 1
            with lock:
                records.append(record)
            if time.perf_counter() >= stop_at[0]:
                break

    threads = [
        threading.Thread(target=turnstile, args=(i,), name=f"turnstile-{i + 1}", daemon=True)
        for i in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    if hostile is not None:
        hostile.start()
    started = time.perf_counter()
    stop_at[0] = started + seconds
    barrier.wait()
    for thread in threads:
        thread.join()
    if hostile is not None:
        hostile.stop()
    wall = time.perf_counter() - started
    for client in clients:
        client.close()
    return records, wall


def hostile_frame(side: int = 4096) -> bytes:
    """A 16-bit greyscale PNG of side x side pixels, a smooth gradient (about 130 KB): within
    every documented limit, and about 0.8 s of a worker's time to decode, scale and scan."""
    import io

    import numpy as np
    from PIL import Image

    ramp = (np.add.outer(np.arange(side), np.arange(side)) * (65535 // (2 * side))).astype(
        np.uint16
    )
    out = io.BytesIO()
    Image.fromarray(ramp).save(out, "PNG", compress_level=9)
    return out.getvalue()


class Hostile:
    """A turnstile that sends `frame` at `rate` calls a second whatever the answers (an open
    loop: each call in a thread of its own), until stopped; its records name the codes."""

    def __init__(self, target: str, frame: bytes, rate: float, deadline: float) -> None:
        self.frame, self.rate = frame, rate
        self.client = FaceGateClient(target, identify_timeout=deadline)
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._calls: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._run, name="hostile", daemon=True)

    def _call(self) -> None:
        started = time.perf_counter()
        code = "OK"
        try:
            self.client.identify(self.frame, turnstile_id="bench-hostile")
        except FaceGateError as error:
            code = error.code.name
        with self._lock:
            self.records.append(
                {"latency_ms": (time.perf_counter() - started) * 1000.0, "code": code}
            )

    def _run(self) -> None:
        interval = 1.0 / self.rate
        next_at = time.perf_counter()
        while not self._stop.is_set():
            call = threading.Thread(target=self._call, daemon=True)
            call.start()
            self._calls.append(call)
            next_at += interval
            self._stop.wait(max(0.0, next_at - time.perf_counter()))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join()
        for call in self._calls:
            call.join()
        self.client.close()
        return self.records
