"""The server's memory under large messages from callers who may not send them (README:
Memory before authentication): the resident set of a real `facegate serve` process at
rest and while N concurrent Enroll calls, each carrying one photo of M MiB, arrive
(1) without credentials, (2) from a turnstile (a known caller whose role may not enrol),
(3) from the backend (which may: its messages are received whole); and while N health
checks with an M MiB service name arrive without credentials (4) on the main port, where
health needs none, (5) on the main port of a server with a probe listener
(FACEGATE_HEALTH_LISTEN), where it then does (Check, and Watch), and (6) on that
probe listener.

    uv run python benchmarks/prelimit.py [--calls 24] [--mib 60] [--out FILE.json]
        [--only anonymous turnstile backend health health-locked watch-locked probes]

Each scenario gets a fresh server (the allocator keeps what it once took, so a second
scenario in the same process would start higher). RSS is read from /proc every 10 ms
while the calls run; "peak growth" is the highest RSS minus the RSS at rest. The calls
come from one client process, each on a connection of its own. Slow (2-3 minutes):
not part of the suite's quick mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import psutil
from facegate.v1 import facegate_service_pb2 as pb
from facegate_server.commands.token import new_token
from facegate_server.rpc.auth import token_hash

FACEGATE = str(Path(sys.executable).with_name("facegate"))
MIB = 1024 * 1024
ENROLL = "/facegate.v1.FaceGateService/Enroll"
HEALTH = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"
TOKENS = {"crm": new_token(), "gate-1": new_token()}
CALLERS = f"backend crm {token_hash(TOKENS['crm'])};turnstile gate-1 {token_hash(TOKENS['gate-1'])}"


def start(
    data: Path, settings: dict[str, str], at_probes: bool = False
) -> tuple[subprocess.Popen[str], str]:
    """`facegate serve` on a free loopback port with callers; (process, target): the
    health listener's if `at_probes`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEGATE_")}
    env |= {
        "FACEGATE_DATA_DIR": str(data),
        "FACEGATE_TOKENS": CALLERS,
        "FACEGATE_WORKERS": "1",
        "FACEGATE_ENROLL_RATE": "0",
        **settings,
    }
    log = data / "serve.log"
    sink = log.open("w")
    process = subprocess.Popen(
        [FACEGATE, "serve", "--listen", "127.0.0.1:0"],
        stdout=sink,
        stderr=sink,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        for line in log.read_text().splitlines():
            entry = json.loads(line) if line.startswith("{") else {}
            if entry.get("msg") == "serving":
                port = entry["health_port"] if at_probes else entry["port"]
                return process, f"127.0.0.1:{port}"
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text()}")


def rss(process: psutil.Process) -> int:
    return int(process.memory_info().rss)


def settle(process: psutil.Process, seconds: float = 2.0) -> int:
    """RSS once it has stopped moving (at most `seconds` of samples): the last sample."""
    time.sleep(0.5)
    last = rss(process)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = rss(process)
        if abs(now - last) < MIB:
            return now
        last = now
    return last


def scenario(
    name: str,
    method: str,
    request: bytes,
    token: str | None,
    calls: int,
    settings: dict[str, str],
    at_probes: bool = False,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="facegate-prelimit-") as tmp:
        server, target = start(Path(tmp), settings, at_probes)
        watched = psutil.Process(server.pid)
        channels = [
            grpc.insecure_channel(
                target,
                options=[
                    ("grpc.use_local_subchannel_pool", 1),  # a connection each
                    ("grpc.max_send_message_length", len(request) + MIB),
                ],
            )
            for _ in range(calls)
        ]
        try:
            for channel in channels:  # connected, and one small call made on each
                grpc.channel_ready_future(channel).result(timeout=30)
            at_rest = settle(watched)
            peak = at_rest
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, rss(watched))
                    time.sleep(0.01)

            sampler = threading.Thread(target=sample)
            sampler.start()
            metadata = [("authorization", f"Bearer {token}")] if token else None

            def call(channel: grpc.Channel) -> tuple[str, str, float]:
                started = time.perf_counter()
                try:
                    if method == WATCH:
                        next(channel.unary_stream(method)(request, timeout=120, metadata=metadata))
                    else:
                        channel.unary_unary(method)(request, timeout=120, metadata=metadata)
                    return "OK", "", time.perf_counter() - started
                except grpc.RpcError as error:
                    took = time.perf_counter() - started
                    return error.code().name, error.details() or "", took

            started = time.perf_counter()
            with futures.ThreadPoolExecutor(calls) as pool:
                outcomes = list(pool.map(call, channels))
            wall = time.perf_counter() - started
            after = settle(watched)
            done.set()
            sampler.join()
        finally:
            for channel in channels:
                channel.close()
            server.terminate()
            server.wait(30)
    codes: dict[str, int] = {}
    for code, _, _ in outcomes:
        codes[code] = codes.get(code, 0) + 1
    result = {
        "scenario": name,
        "calls": calls,
        "message_mib": round(len(request) / MIB, 1),
        "rss_at_rest_mib": round(at_rest / MIB, 1),
        "peak_rss_mib": round(peak / MIB, 1),
        "peak_growth_mib": round((peak - at_rest) / MIB, 1),
        "growth_per_call_mib": round((peak - at_rest) / MIB / calls, 2),
        "rss_after_mib": round(after / MIB, 1),
        "codes": codes,
        "details": sorted({detail[:160] for _, detail, _ in outcomes}),
        "slowest_call_s": round(max(took for _, _, took in outcomes), 2),
        "wall_s": round(wall, 2),
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=24)
    parser.add_argument("--mib", type=float, default=60)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--only",
        nargs="*",
        default=[
            "anonymous",
            "turnstile",
            "backend",
            "health",
            "health-locked",
            "watch-locked",
            "probes",
        ],
    )
    args = parser.parse_args()
    size = int(args.mib * MIB)
    # A photo of `size` bytes that is no image: the backend's Enroll is received, then
    # refused INVALID_ARGUMENT, so nothing but the message's receipt is measured.
    enroll = pb.EnrollRequest(
        member_id="m-prelimit", display_name="x", photos=[b"\0" * size]
    ).SerializeToString()
    settings: dict[str, str] = {}  # the defaults: messages up to 10 x 48 MiB + 1 MiB
    from grpc_health.v1 import health_pb2

    health = health_pb2.HealthCheckRequest(service="x" * size).SerializeToString()
    plan = {
        "anonymous": ("Enroll without credentials", ENROLL, enroll, None),
        "turnstile": ("Enroll from a turnstile (may not enrol)", ENROLL, enroll, TOKENS["gate-1"]),
        "backend": ("Enroll from the backend (may)", ENROLL, enroll, TOKENS["crm"]),
        "health": ("Health Check (no credentials needed)", HEALTH, health, None),
        "health-locked": (
            "Health Check, probes elsewhere (needs credentials)",
            HEALTH,
            health,
            None,
        ),
        "probes": ("Health Check on the probe listener", HEALTH, health, None),
        "watch-locked": ("Health Watch, probes elsewhere (needs credentials)", WATCH, health, None),
    }
    probes = {"FACEGATE_HEALTH_LISTEN": "127.0.0.1:0"}
    results = []
    for key in args.only:
        name, method, request, token = plan[key]
        # health-locked: the main port, with a probe listener; probes: the probe listener.
        extra = probes if key in ("health-locked", "watch-locked", "probes") else {}
        at_probes = key == "probes"
        results.append(
            scenario(name, method, request, token, args.calls, settings | extra, at_probes)
        )
    machine = {"cpus": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 2)}
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
