"""Where the CPU goes when one and two recognition workers answer Identify flat out (issue 12's
"two workers at least 1.8x one").

    uv run python -m benchmarks.worker_scaling [--seconds S] [--rounds N] [--faces DIR]
        [--env NAME=VALUE ...] [--also NAME=VALUE ...]

For 1 and then 2 workers (`FACEGATE_WORKERS`), a fresh `facegate serve` (the suite's
settings: FACEGATE_IDENTIFY_RATE=0), the 5 real people of ../shared/faces enrolled through
the API, then closed-loop turnstiles (the suite's load generator, 480p frames), 2
callers a worker (enough to keep every worker's queue non-empty), and with `--also
NAME=VALUE` one more 2-worker server per setting. Rounds alternate the servers' cells so
that a change in the machine's load falls on all of them.

Per cell: answers a second, and the CPU seconds of each process (the server's own process,
each worker, the load generator, everyone else on the machine), with the threads each
process holds and its busiest ones (name/id from /proc/PID/task/TID/comm: Python names no
OS thread but the first, so `py-spy dump --pid PID` maps ids to Python's thread names). So
whether the server process, spinning threads or the load generator take the workers'
share shows directly. `--env` passes FACEGATE_* settings to every server.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
from facegate_client import FaceGateClient

from benchmarks.suite import frames, load
from benchmarks.suite.processes import Sampler, ServerProcess

ROOT = Path(__file__).resolve().parents[1]


def _thread_names(pid: int) -> dict[int, str]:
    names = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                names[int(tid)] = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    return names


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def snapshot(server_pid: int) -> dict[str, Any]:
    """CPU seconds per process (server, workers, this process) and per thread."""
    server = psutil.Process(server_pid)
    found: dict[str, Any] = {}
    processes = {"server": server}
    children = sorted(server.children(recursive=True), key=lambda p: p.pid)
    workers = [c for c in children if "resource_tracker" not in " ".join(_cmdline(c))]
    for i, child in enumerate(workers):
        processes[f"worker {i + 1}"] = child
    processes["load generator"] = psutil.Process()
    for name, process in processes.items():
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            names = _thread_names(process.pid)
            found[name] = {
                "cpu": times.user + times.system,
                "threads": {
                    t.id: (names.get(t.id, "?"), t.user_time + t.system_time)
                    for t in process.threads()
                },
                "affinity": sorted(process.cpu_affinity() or []),
            }
    return found


def cell(
    server: ServerProcess, probes: list[frames.Probe], concurrency: int, seconds: float
) -> dict[str, Any]:
    before = snapshot(server.pid)
    busy, _ = Sampler.machine_cpu()
    records, wall = load.run_cell(server.target, probes, "480p", concurrency, seconds, 5.0)
    busy_after, _ = Sampler.machine_cpu()
    after = snapshot(server.pid)
    ok = [r for r in records if r["code"] == "OK"]
    processes: dict[str, Any] = {}
    for name, now in after.items():
        was = before.get(name, {"cpu": 0.0, "threads": {}})
        by_thread: Counter[str] = Counter()
        for tid, (thread, cpu) in now["threads"].items():
            by_thread[f"{thread}/{tid}"] += cpu - was["threads"].get(tid, (thread, 0.0))[1]
        processes[name] = {
            "cpu": now["cpu"] - was["cpu"],
            "threads": len(now["threads"]),
            "busiest": by_thread.most_common(4),
            "affinity": now["affinity"],
        }
    ours = sum(p["cpu"] for p in processes.values())
    return {
        "answers_per_s": len(ok) / wall,
        "errors": len(records) - len(ok),
        "p50_ms": statistics.median(r["latency_ms"] for r in ok) if ok else float("nan"),
        "wall": wall,
        "processes": processes,
        "others_cpu": max(0.0, busy_after - busy - ours),
    }


def start(workers: int, env: dict[str, str], data: Path, logs: Path, label: str) -> ServerProcess:
    settings = {"FACEGATE_IDENTIFY_RATE": "0", "FACEGATE_WORKERS": str(workers), **env}
    slug = "".join(c if c.isalnum() else "-" for c in label)
    server = ServerProcess(data, settings, logs / f"{slug}.log")
    server.start()
    return server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.worker_scaling")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--faces", type=Path, default=ROOT.parent / "shared" / "faces")
    p.add_argument(
        "--env", nargs="*", default=[], metavar="NAME=VALUE", help="settings of every server"
    )
    p.add_argument(
        "--also",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="one more 2-worker server with each of these settings, in the same rounds",
    )
    args = p.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    variants: list[tuple[str, int, dict[str, str]]] = [
        ("1 worker", 1, env),
        ("2 workers", 2, env),
    ]
    for item in args.also:
        name, value = item.split("=", 1)
        variants.append((f"2 workers, {item}", 2, {**env, name: value}))
    people = frames.enrolment(args.faces)
    probes = frames.probes(args.faces, ("480p",))
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in variants}
    with tempfile.TemporaryDirectory(prefix="facegate-scaling-") as tmp:
        servers: dict[str, tuple[int, ServerProcess]] = {}
        try:
            for label, workers, settings in variants:
                data = Path(tmp) / f"data-{len(servers)}"
                server = start(workers, settings, data, Path(tmp), label)
                servers[label] = (workers, server)
                with FaceGateClient(server.target, timeout=120) as client:
                    for person, photo in people:
                        client.enroll(person.member_id, [photo], display_name=person.name)
                    for probe in probes[:4]:
                        load.identify_once(client, probe, "480p", "warm-up")
            load_before = os.getloadavg()
            for _ in range(args.rounds):
                for label, (workers, server) in servers.items():
                    results[label].append(cell(server, probes, 2 * workers, args.seconds))
            load_after = os.getloadavg()
        finally:
            for _, server in servers.values():
                server.stop()
    print(
        f"{args.rounds} rounds of {args.seconds:g} s cells, 480p, 5 members, 2 turnstiles a "
        f"worker; load average {load_before[0]:.2f} -> {load_after[0]:.2f} "
        f"({os.cpu_count()} cores); env {env or '-'}"
    )
    for label, cells in results.items():
        for i, c in enumerate(cells):
            share = ", ".join(
                f"{name} {p['cpu'] / c['wall']:.2f}" for name, p in c["processes"].items()
            )
            print(
                f"{label}, round {i + 1}: {c['answers_per_s']:.1f} answers/s (p50 "
                f"{c['p50_ms']:.0f} ms, {c['errors']} errors); cores used: {share}, others "
                f"{c['others_cpu'] / c['wall']:.2f}"
            )
    medians = {
        label: statistics.median(c["answers_per_s"] for c in cells)
        for label, cells in results.items()
    }
    one = medians["1 worker"]
    for label, rate in medians.items():
        print(f"median {label}: {rate:.1f} answers/s, {rate / one:.2f}x 1 worker")
    print(
        "\nCPU ms an answer by process, median of the rounds (threads; busiest threads, last round)"
    )
    for label, cells in results.items():
        print(f"{label}:")
        for name in cells[-1]["processes"]:
            per_answer = statistics.median(
                1000 * c["processes"][name]["cpu"] / max(1.0, c["answers_per_s"] * c["wall"])
                for c in cells
                if name in c["processes"]
            )
            last = cells[-1]["processes"][name]
            busiest = ", ".join(f"{t} {cpu:.2f} s" for t, cpu in last["busiest"])
            print(
                f"  {name}: {per_answer:.1f} ms, {last['threads']} threads, cores "
                f"{last['affinity']}; {busiest}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
