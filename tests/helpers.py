"""Small builders shared by tests: hostile images, rich-status readers, a hand-moved clock,
and the one way tests start a FaceGate server (in-process with `running_server`, or as a
`facegate serve` process with `start_serve`)."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

if TYPE_CHECKING:
    from facegate_server.app import FaceGateServer
    from facegate_server.engines.base import RecognitionEngine


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG whose header claims width x height pixels: all zeros, compressing to ~KBs."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    zeros = zlib.compress(b"\x00" * (1 << 20), 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zeros)
        + png_chunk(b"IEND", b"")
    )


def image_bytes(width: int, height: int, fmt: str = "PNG", color: str = "gray") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, fmt)
    return out.getvalue()


def details(error: grpc.RpcError) -> tuple[str, list[tuple[str, str]]]:
    """(ErrorInfo reason, BadRequest field violations) of a rich status."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the status carries no google.rpc.Status details"
    reason, violations = "", []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "facegate.v1"
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [(v.field, v.description) for v in bad.field_violations]
    return reason, violations


def require_tool(name: str, how: str) -> str:
    """The path of the program `name` on PATH. Where it is missing the test skips, saying
    `how` to install it, except in CI (CI=true), where a missing tool fails the test: CI
    must install what its tests need (.ci/run), not pass by skipping them."""
    found = shutil.which(name)
    if found is not None:
        return found
    reason = f"{name} is not installed (not on PATH): {how}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


FACEGATE = str(Path(sys.executable).with_name("facegate"))
"""The `facegate` console script of this environment: the real entry point."""


def start_serve(
    settings: dict[str, str], log: Path, *flags: str, listen: str = "127.0.0.1:0"
) -> tuple[subprocess.Popen[str], str]:
    """`facegate serve` on a free loopback port (or `listen`: a restart on the same one),
    configured by FACEGATE_* `settings` only (the caller's own FACEGATE_* variables are not
    inherited) and `flags`; logs appended to `log`. Returns the process and its HOST:PORT
    once it logs "serving"."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEGATE_")}
    start = log.stat().st_size if log.exists() else 0
    with log.open("a") as sink:
        process = subprocess.Popen(
            [FACEGATE, "serve", "--listen", listen, *flags],
            stdout=sink,
            stderr=sink,
            text=True,
            env={**env, **settings},
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        with log.open() as f:
            f.seek(start)
            for line in f:
                entry = json.loads(line) if line.startswith("{") else {}
                if entry.get("msg") == "serving":
                    return process, f"127.0.0.1:{entry['port']}"
        time.sleep(0.1)
    process.kill()
    process.wait()
    raise AssertionError(f"the server did not start:\n{log.read_text()}")


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


@contextmanager
def running_server(
    data: Path,
    *,
    engine: RecognitionEngine | None = None,
    clock: Callable[[], float] = time.monotonic,
    background_sync: bool = True,
    wall_clock: Callable[[], datetime] | None = None,
    **settings: Any,
) -> Iterator[FaceGateServer]:
    """A started FaceGate server on a free loopback port, stopped on exit.

    Settings are FaceGate's (none read from the environment), with test defaults: one
    worker, no rate limits (tests/test_security.py tests them). `engine` replaces the local
    engine: pass `MemoryEngine()` where a test recognises no faces (no dlib, no workers).
    """
    from facegate_server.app import build_server
    from facegate_server.config import load_settings

    values = {
        "listen": "127.0.0.1:0",
        "data_dir": data,
        "workers": 1,
        "identify_rate": 0,
        "enroll_rate": 0,
        "follow_rate": 0,
        **settings,
    }
    extra = {} if wall_clock is None else {"wall_clock": wall_clock}
    server = build_server(load_settings({}, **values), engine=engine, clock=clock, **extra)
    server.background_sync = background_sync
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=1.0)


@contextmanager
def serving(servicer: Any) -> Iterator[str]:
    """A plain gRPC server for a fake FaceGateService servicer (client tests): its target.
    On exit, a servicer's `release` event (if any) frees calls it holds, then it stops."""
    from concurrent import futures

    from facegate.v1 import facegate_service_pb2_grpc as pb_grpc

    executor = futures.ThreadPoolExecutor(max_workers=4)
    server = grpc.server(executor)
    pb_grpc.add_FaceGateServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        release = getattr(servicer, "release", None)
        if release is not None:
            release.set()
        server.stop(grace=None).wait()
        executor.shutdown(wait=True)
