"""Which gRPC server model: the sync server (a thread pool) or grpc.aio (an event loop)?

    uv run python -m benchmarks.server_model            # about 1 minute on 2 cores
    uv run python -m benchmarks.server_model --seconds 4

Each model serves, in its own process on loopback, three raw-bytes methods that stand in
for FaceGate's:

- `Cpu`: Identify as the local engine does it: ~100 ms of CPU in a pool of 2 processes,
  the calling thread blocked on the future (the Gate is synchronous code);
- `Wait`: a call that waits ~100 ms without CPU (a cloud call);
- `Watch`: a server-streaming call that sends nothing until the caller cancels it (the
  operations issue's live entry events).

Both models run the blocking (synchronous) handler on a pool of 8 threads, today's
`max(8, 4 * workers)` with 2 workers: the sync server because that is its model, grpc.aio
through `loop.run_in_executor` (FaceGate's Gate stays synchronous). A `time.monotonic()`
stamp is taken when the call arrives (sync: in an interceptor, which gRPC runs on its
polling thread before a pool thread is free; aio: as the handler coroutine starts).
CLOCK_MONOTONIC is system-wide, so the caller (this process) compares its own send and
receive times with the server's arrival, handler start and handler end stamps:

- caller: what the turnstile sees (send to answer);
- handler: from the handler's start, what the servicer can measure on its own today;
- hidden: caller - handler, the queueing the server does not see from inside the handler;
- arrival gap: caller - (handler end - arrival stamp): near 0 when the arrival stamp is
  the true arrival (the servicer could start the budget there).

Then K idle `Watch` streams are opened and N callers call `Cpu` again: in the sync model
every stream holds one thread of the pool for its life.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import platform
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

SERVICE = "bench.Bench"
STAMPS = struct.Struct("<3d")  # arrival, handler start, handler end (time.monotonic)
THREADS = 8
WORK_S = 0.100


# ------------------------------------------------------------------ the server side


def burn(seconds: float) -> float:
    """~`seconds` of CPU in a worker process (the recognition stand-in)."""
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass
    return time.process_time() - start


def blocking_work(pool: futures.ProcessPoolExecutor, kind: str) -> None:
    """What the synchronous Gate does: block this thread until the work is done."""
    if kind == "Cpu":
        pool.submit(burn, WORK_S).result()
    else:
        time.sleep(WORK_S)


BOUND = 4
"""`Bounded`: at most this many calls in the server (2 running, 2 waiting); more are
refused with RESOURCE_EXHAUSTED."""


class Admitted:
    def __init__(self) -> None:
        self.count, self.lock = 0, threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if self.count >= BOUND:
                return False
            self.count += 1
            return True

    def give(self) -> None:
        with self.lock:
            self.count -= 1


def sync_server(port_out: Callable[[int], None], threads: int) -> None:
    pool = futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
    list(pool.map(burn, [0.0, 0.0]))

    def unary(kind: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
            started = time.monotonic()
            blocking_work(pool, kind)
            return STAMPS.pack(float("nan"), started, time.monotonic())

        return handler

    def watch(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        done = threading.Event()
        if context.add_callback(done.set):
            done.wait()
        return iter(())

    admitted = Admitted()

    class Stamp(grpc.ServerInterceptor):
        def intercept_service(self, continuation: Any, details: Any) -> Any:
            arrived = time.monotonic()  # the polling thread, as the call arrives
            handler = continuation(details)
            if handler is None or handler.unary_unary is None:
                return handler
            inner = handler.unary_unary
            bounded = details.method.endswith("/Bounded")
            if bounded and not admitted.take():

                def refuse(request: bytes, context: grpc.ServicerContext) -> bytes:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")  # in a thread
                    raise AssertionError

                return grpc.unary_unary_rpc_method_handler(refuse)

            def stamped(request: bytes, context: grpc.ServicerContext) -> bytes:
                try:
                    _, started, ended = STAMPS.unpack(inner(request, context))
                finally:
                    if bounded:
                        admitted.give()
                return STAMPS.pack(arrived, started, ended)

            return grpc.unary_unary_rpc_method_handler(stamped)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), interceptors=[Stamp()])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Cpu": grpc.unary_unary_rpc_method_handler(unary("Cpu")),
                    "Wait": grpc.unary_unary_rpc_method_handler(unary("Wait")),
                    "Bounded": grpc.unary_unary_rpc_method_handler(unary("Cpu")),
                    "Watch": grpc.unary_stream_rpc_method_handler(watch),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_out(port)
    server.wait_for_termination()


def aio_server(port_out: Callable[[int], None], threads: int) -> None:
    pool = futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
    list(pool.map(burn, [0.0, 0.0]))
    gate_threads = futures.ThreadPoolExecutor(max_workers=threads)

    async def main() -> None:
        loop = asyncio.get_running_loop()

        admitted = Admitted()

        def unary(kind: str, bounded: bool = False) -> Any:
            async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                arrived = time.monotonic()  # the coroutine starts as the call arrives
                if bounded and not admitted.take():
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")  # at once
                box: list[float] = []

                def in_thread() -> None:
                    box.append(time.monotonic())
                    blocking_work(pool, kind)

                try:
                    await loop.run_in_executor(gate_threads, in_thread)
                finally:
                    if bounded:
                        admitted.give()
                return STAMPS.pack(arrived, box[0], time.monotonic())

            return handler

        async def watch(request: bytes, context: grpc.aio.ServicerContext) -> Any:
            await asyncio.Event().wait()  # until the caller cancels: the task is cancelled
            yield b""

        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "Cpu": grpc.unary_unary_rpc_method_handler(unary("Cpu")),
                        "Wait": grpc.unary_unary_rpc_method_handler(unary("Wait")),
                        "Bounded": grpc.unary_unary_rpc_method_handler(unary("Cpu", True)),
                        "Watch": grpc.unary_stream_rpc_method_handler(watch),
                    },
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(server.stop(0)))
        port_out(port)
        await server.wait_for_termination()

    asyncio.run(main())
    pool.shutdown()


def serve(model: str, threads: int) -> None:
    def announce(port: int) -> None:
        print(port, flush=True)

    def on_term(number: int, frame: object) -> None:
        raise SystemExit(0)  # the pool's workers exit with us

    if model == "sync":
        signal.signal(signal.SIGTERM, on_term)
    (sync_server if model == "sync" else aio_server)(announce, threads)


# ------------------------------------------------------------------ the caller side


@dataclass
class Cell:
    label: str
    calls: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    caller_ms: list[float] = field(default_factory=list)
    handler_ms: list[float] = field(default_factory=list)
    hidden_ms: list[float] = field(default_factory=list)
    refused_ms: list[float] = field(default_factory=list)
    gap_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    threads: int = 0
    rss_mb: float = 0.0


def proc_status(pid: int) -> tuple[int, float]:
    """(threads, RSS in MB) of a process, from /proc."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) / 1024


async def load(
    target: str,
    pid: int,
    label: str,
    method: str,
    callers: int,
    seconds: float,
    deadline: float = 10.0,
) -> Cell:
    """`callers` callers call `method` back to back for `seconds`."""
    cell = Cell(label)
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(f"/{SERVICE}/{method}")
        stop_at = time.monotonic() + seconds

        async def caller() -> None:
            while time.monotonic() < stop_at:
                sent = time.monotonic()
                try:
                    reply = await call(b"x", timeout=deadline)
                except grpc.aio.AioRpcError as error:
                    name = error.code().name
                    if error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                        cell.refused_ms.append((time.monotonic() - sent) * 1000)
                        await asyncio.sleep(0.05)  # the caller backs off a little
                    cell.errors[name] = cell.errors.get(name, 0) + 1
                    continue
                received = time.monotonic()
                arrived, started, ended = STAMPS.unpack(reply)
                cell.calls += 1
                cell.caller_ms.append((received - sent) * 1000)
                cell.handler_ms.append((ended - started) * 1000)
                cell.hidden_ms.append((received - sent - (ended - started)) * 1000)
                cell.gap_ms.append((received - sent - (ended - arrived)) * 1000)

        async def sample() -> None:
            while time.monotonic() < stop_at + 1:
                threads, rss = proc_status(pid)
                cell.threads, cell.rss_mb = max(cell.threads, threads), max(cell.rss_mb, rss)
                await asyncio.sleep(0.05)

        began = time.monotonic()
        sampler = asyncio.ensure_future(sample())
        await asyncio.gather(*(caller() for _ in range(callers)))
        cell.seconds = time.monotonic() - began
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    return cell


async def with_streams(
    target: str, pid: int, label: str, streams: int, callers: int, seconds: float
) -> Cell:
    """`Cpu` under load while `streams` idle `Watch` streams are open."""
    async with grpc.aio.insecure_channel(target) as channel:
        watch = channel.unary_stream(f"/{SERVICE}/Watch")
        calls = [watch(b"") for _ in range(streams)]
        await asyncio.sleep(0.5)  # let the server take them all
        idle_threads, idle_rss = proc_status(pid)
        try:
            # a deadline of 2.5 s: twice the Identify budget, an answer later is no use
            cell = await load(target, pid, label, "Cpu", callers, seconds, deadline=2.5)
        finally:
            for c in calls:
                c.cancel()
        cell.threads, cell.rss_mb = max(cell.threads, idle_threads), max(cell.rss_mb, idle_rss)
        return cell


@contextlib.contextmanager
def server_process(model: str, threads: int) -> Iterator[tuple[str, int]]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.server_model",
            "--serve",
            model,
            "--threads",
            str(threads),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield f"127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        process.wait(10)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def row(cell: Cell) -> str:
    errors = ", ".join(f"{k} {v}" for k, v in sorted(cell.errors.items())) or "0"
    if cell.refused_ms:
        errors += (
            f" (refused in p50 {pct(cell.refused_ms, 0.5):.0f} / max {max(cell.refused_ms):.0f} ms)"
        )
    return (
        f"| {cell.label} | {cell.calls} | {cell.calls / cell.seconds:.1f} "
        f"| {pct(cell.caller_ms, 0.5):.0f} / {max(cell.caller_ms, default=float('nan')):.0f} "
        f"| {pct(cell.handler_ms, 0.5):.0f} / {max(cell.handler_ms, default=float('nan')):.0f} "
        f"| {max(cell.hidden_ms, default=float('nan')):.0f} "
        f"| {max(cell.gap_ms, default=float('nan')):.1f} "
        f"| {cell.threads} | {cell.rss_mb:.0f} | {errors} |"
    )


HEADER = (
    "| model / method / callers | calls | calls/s | caller p50 / max ms "
    "| handler p50 / max ms | hidden max ms | arrival gap max ms | threads | RSS MB | errors |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


async def run(args: argparse.Namespace) -> None:
    print(
        f"machine: {platform.node()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, grpcio {grpc.__version__}, load {os.getloadavg()[0]:.2f}"
    )
    print(f"command: uv run python -m benchmarks.server_model {' '.join(sys.argv[1:])}\n")
    print(HEADER)
    cells: dict[tuple[str, str, int], Cell] = {}
    for model in ("sync", "aio"):
        with server_process(model, THREADS) as (target, pid):
            threads, rss = proc_status(pid)
            print(f"| {model}, idle | | | | | | | {threads} | {rss:.0f} | |")
            for method in ("Cpu", "Wait"):
                for callers in args.callers:
                    label = f"{model} / {method} / {callers}"
                    cell = await load(target, pid, label, method, callers, args.seconds)
                    cells[(model, method, callers)] = cell
                    print(row(cell), flush=True)
            label = f"{model} / Cpu, at most {BOUND} in the server / 16"
            print(row(await load(target, pid, label, "Bounded", 16, args.seconds)))
            label = f"{model} / Cpu / 4 + {args.streams} idle streams"
            print(row(await with_streams(target, pid, label, args.streams, 4, args.seconds)))
    with server_process("sync", THREADS + args.streams) as (target, pid):
        label = f"sync ({THREADS + args.streams} threads) / Cpu / 4 + {args.streams} streams"
        print(row(await with_streams(target, pid, label, args.streams, 4, args.seconds)))
    print()
    for callers in args.callers:
        for method in ("Cpu", "Wait"):
            sync, aio = cells[("sync", method, callers)], cells[("aio", method, callers)]
            print(
                f"aio/sync {method} x{callers}: throughput "
                f"{(aio.calls / aio.seconds) / (sync.calls / sync.seconds):.2f}, caller p50 "
                f"{pct(aio.caller_ms, 0.5) / pct(sync.caller_ms, 0.5):.2f}, hidden max "
                f"{max(sync.hidden_ms):.0f} -> {max(aio.hidden_ms):.0f} ms"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="each cell (default 2)")
    parser.add_argument("--callers", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--streams", type=int, default=50, help="idle streams (default 50)")
    parser.add_argument("--serve", choices=["sync", "aio"], help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=THREADS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.threads)
        return
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
