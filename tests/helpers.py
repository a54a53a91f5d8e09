"""Small builders shared by tests: hostile images and rich-status readers."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image


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


FACEGATE = str(Path(sys.executable).with_name("facegate"))
"""The `facegate` console script of this environment: the real entry point."""


def start_serve(settings: dict[str, str], log: Path) -> tuple[subprocess.Popen[str], str]:
    """`facegate serve` on a free loopback port, configured by FACEGATE_* `settings` only
    (the caller's own FACEGATE_* variables are not inherited); logs appended to `log`.
    Returns the process and its HOST:PORT once it logs "serving"."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEGATE_")}
    start = log.stat().st_size if log.exists() else 0
    with log.open("a") as sink:
        process = subprocess.Popen(
            [FACEGATE, "serve", "--listen", "127.0.0.1:0"],
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
