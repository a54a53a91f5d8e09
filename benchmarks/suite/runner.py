"""A whole run: the stage breakdown in-process, then each scenario against its own server.

For each scenario: copy its synthetic gallery into a fresh data directory, start
`facegate serve` on it (FACEGATE_IDENTIFY_RATE=0: the per-caller rate limit, 10 a second
by default, would otherwise refuse the load), enrol the real people through the API, wait
for the cloud to be trained (cloud scenarios, with the emulator healthy and without
latency), send a few warm-up frames, then set the emulator's weather and run the cells.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from facegate_client import FaceGateClient
from google.protobuf.json_format import MessageToDict

from . import frames, gallery, load, machine, raw, stages, stats
from .plan import RESOLUTIONS, Cell, Scenario
from .processes import EMULATOR_KEY, EmulatorProcess, Sampler, ServerProcess

SCHEMA_VERSION = 1
GALLERY_SIZES = (10, 1_000, 10_000, 100_000)
FAULT_KNOBS: dict[str, dict[str, Any]] = {
    # The emulator's defaults (hang: 120 s, throttle: Retry-After 1 s), flap seeded so
    # that a rerun meets the same weather in the same order.
    "flap": {"seed": 7},
}


@dataclass
class Options:
    mode: str
    plan: list[Scenario]
    faces: Path
    out: Path
    cache: Path
    root: Path
    cost: stats.CostModel = field(default_factory=stats.CostModel)
    budget_ms: float = 1200.0
    deadline_s: float = 5.0
    seed: int = 1
    stage_repeats: int = 3
    match_repeats: int = 200


Progress = Callable[[str, float], None]
"""progress(description, work done): the terminal's progress bar (work in cell-seconds)."""


def _cell_label(scenario: Scenario, cell: Cell) -> str:
    beside = f" +hostile {cell.hostile:g}/s" if cell.hostile else ""
    which = ""
    if cell.workers is not None:
        which = f" r{cell.round} {cell.workers}w"
    return f"{scenario.key}{which} c{cell.concurrency} {cell.resolution}{beside}"


class Run:
    def __init__(self, options: Options, progress: Progress) -> None:
        self.o = options
        self.progress = progress
        self.sampler = Sampler()
        self.emulator: EmulatorProcess | None = None
        self._hostile_frame: bytes | None = None
        self.people = frames.enrolment(options.faces)
        self.probes = frames.probes(options.faces)
        self.synthetic: gallery.Vectors = np.empty((0, 128))
        self.logs = options.out / "logs"
        self.results: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "mode": options.mode,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine.describe(options.root),
            "settings": {
                "budget_ms": options.budget_ms,
                "client_deadline_s": options.deadline_s,
                "server": "facegate serve, default settings but FACEGATE_IDENTIFY_RATE=0 "
                "(the per-caller Identify rate limit off) and, where a scenario says so, "
                "FACEGATE_WORKERS and the cloud (FACEGATE_AZURE_*, FACEGATE_ROUTING_POLICY)",
                "emulator": "facegate azure-emulator --workers 1 --training-seconds 0.2 "
                "--rate 0 --small-faces off --seed 7, in its own process on the same cores",
                "fault_knobs": FAULT_KNOBS,
                "turnstiles": "threads in the benchmark process, one gRPC channel each, "
                "closed loop (the next frame as soon as the answer comes)",
                "percentiles": "nearest rank",
                "seed": options.seed,
            },
            "cost_model": asdict(options.cost),
            "plan": [
                {
                    "scenario": s.name,
                    "key": s.key,
                    "policy": s.policy,
                    "fault": s.fault,
                    "gallery": s.gallery,
                    "workers": s.workers,
                    "latency_profile": s.latency_profile if s.cloud else None,
                    "cells": [asdict(c) for c in s.cells],
                }
                for s in options.plan
            ],
            "people": {
                "enrolled": [p.name for p, _ in self.people],
                "enrolment_photos": [p.photos[0] for p, _ in self.people],
                "unenrolled": list(frames.UNENROLLED),
                "probes": [{"path": p.path, "member_id": p.member_id} for p in self.probes],
            },
            "runs": [],
            "raw_pipeline": [],
            "servers": [],
            "failures": [],
        }

    # ---- before any server -------------------------------------------------------------

    def measure_stages(self) -> None:
        self.progress("stage breakdown (in-process)", 0)
        started = time.monotonic()
        timings, enrolled, probed = stages.analyse_real(
            self.people, self.probes, tuple(RESOLUTIONS), self.o.stage_repeats
        )
        real = np.vstack([enrolled, probed])
        self.enrolled = enrolled
        most = max(GALLERY_SIZES) - len(self.people)
        between = gallery.pairwise_mean(enrolled)
        self.synthetic, scale = gallery.synthetic(most, real, self.o.seed, between)
        self.progress("matching at each gallery size (in-process)", 0)
        match = stages.match_times(
            GALLERY_SIZES, self.gallery_vectors, probed, self.o.match_repeats
        )
        self.results["stages"] = {
            "method": "worker.analyse (the worker's function, its stages_ms) on every "
            f"probe frame x {self.o.stage_repeats}, and FaceIndex.match x "
            f"{self.o.match_repeats} per gallery size, in the benchmark process before any "
            "server ran",
            "by_resolution": timings,
            "match_ms": match,
            "seconds": time.monotonic() - started,
        }
        self.results["gallery"] = {
            "real_members": len(self.people),
            "real_embeddings": gallery.describe(real),
            "real_between_people_mean_distance": between,
            "synthetic_embeddings": gallery.describe(self.synthetic[:10_000]),
            "synthetic_between_members_mean_distance": gallery.pairwise_mean(
                self.synthetic[:2_000]
            ),
            "synthetic_spread_scale": scale,
            "synthetic_min_distance_to_real": gallery.nearest_real(self.synthetic, real),
            "synthetic_rule": "normal per dimension with the real embeddings' mean and "
            "their per-dimension spread scaled so that synthetic members are as far apart as "
            f"real people; redrawn when within {gallery.MIN_DISTANCE} of a real embedding",
            "written": "straight into the SQLite store (SqliteStore.create_member) before the "
            "server starts; the real people are enrolled through the API",
        }

    def gallery_vectors(self, size: int) -> gallery.Vectors:
        synthetic = self.synthetic[: max(0, size - len(self.enrolled))]
        return np.vstack([synthetic, self.enrolled])

    def gallery_ids(self, size: int) -> list[str]:
        """The member ids of `gallery_vectors(size)`, row by row."""
        synthetic = max(0, size - len(self.enrolled))
        return [f"synthetic-{i}" for i in range(synthetic)] + [p.member_id for p, _ in self.people]

    # ---- the raw face_recognition pipeline -------------------------------------------------

    def raw_pipeline(self, scenario: Scenario, done: float) -> None:
        """face_recognition's own pipeline, each cell in this process (no server runs)."""
        vectors, ids = self.gallery_vectors(scenario.gallery), self.gallery_ids(scenario.gallery)
        for cell in scenario.cells:
            label = _cell_label(scenario, cell)
            self.progress(label, done)
            load_before = machine.load_average()
            own = Sampler.own_cpu_seconds()
            busy, _ = Sampler.machine_cpu()
            started = time.monotonic()
            measured = raw.run(
                self.probes, cell.resolution, vectors, ids, cell.seconds, len(self.probes)
            )
            wall = time.monotonic() - started
            busy_after, _ = Sampler.machine_cpu()
            own = Sampler.own_cpu_seconds() - own
            self.results["raw_pipeline"].append(
                {
                    "cell": label,
                    "scenario": scenario.name,
                    "key": scenario.key,
                    "gallery": scenario.gallery,
                    "resolution": cell.resolution,
                    "method": raw.METHOD,
                    **measured,
                    "wall_seconds": wall,
                    "load_average_before": load_before,
                    "benchmark_cpu_seconds": own,
                    "others_cpu_seconds": max(0.0, busy_after - busy - own),
                }
            )
            done += cell.seconds
            self.progress(label, done)

    # ---- one scenario --------------------------------------------------------------------

    def scenario(self, scenario: Scenario, done: float) -> None:
        if scenario.raw:
            self.raw_pipeline(scenario, done)
            return
        synthetic = max(0, scenario.gallery - len(self.people))
        template = None
        record: dict[str, Any] = {
            "scenario": scenario.name,
            "key": scenario.key,
            "gallery": scenario.gallery,
        }
        if synthetic:
            self.progress(f"{scenario.key}: gallery of {synthetic:,} synthetic members", done)
            started = time.monotonic()
            template = gallery.cached_store(self.o.cache, self.synthetic[:synthetic])
            record["gallery_seconds"] = time.monotonic() - started
        settings = {"FACEGATE_IDENTIFY_RATE": "0"}
        emulator = self.emulator
        if scenario.cloud:
            assert emulator is not None
            settings |= {
                "FACEGATE_AZURE_ENDPOINT": emulator.endpoint,
                "FACEGATE_AZURE_KEY": EMULATOR_KEY,
                "FACEGATE_ROUTING_POLICY": scenario.policy,
                # The emulator runs --rate 0: FaceGate keeps to no tier's rate either.
                "FACEGATE_AZURE_RATE": "0",
            }
            emulator.set_fault("healthy")
            emulator.set_latency("none")
            emulator.clear_state()
            emulator.reset_counts()
        # One server, or (a worker-scaling scenario) one per worker count, all up at once.
        counts: tuple[int | None, ...] = scenario.side_by_side or (scenario.workers,)
        servers: dict[int | None, ServerProcess] = {}
        records: dict[int | None, dict[str, Any]] = {}
        with tempfile.TemporaryDirectory(prefix="facegate-bench-") as tmp:
            try:
                for workers in counts:
                    key = scenario.key
                    if scenario.side_by_side:
                        key += f", {workers} worker{'s' if workers != 1 else ''}"
                    records[workers] = {**record, "key": key}
                    env = dict(settings)
                    if workers is not None:
                        env["FACEGATE_WORKERS"] = str(workers)
                    slug = key.replace("/", "-").replace(" ", "").replace(",", "")
                    server = ServerProcess(
                        gallery.data_dir_from(template, Path(tmp) / f"data-{workers}"),
                        env,
                        self.logs / f"{slug.replace('@', '-')}.server.log",
                    )
                    self.progress(f"{key}: starting facegate serve", done)
                    servers[workers] = server
                    server.launch()  # side by side: both start at once
                for workers, server in servers.items():
                    server.ready()
                    self.sampler.watch(server.pid)
                    records[workers] |= {
                        "startup_seconds": server.startup_seconds,
                        "workers": server.workers,
                    }
                    with FaceGateClient(server.target, timeout=120) as client:
                        self._prepare(scenario, client, records[workers], done)
                for cell in scenario.cells:
                    server = servers[cell.workers]
                    label = _cell_label(scenario, cell)
                    self.progress(label, done)
                    idle = [s for s in servers.values() if s is not server]
                    run = self._cell(scenario, server, cell, idle)
                    run["server_workers"] = server.workers
                    self.results["runs"].append(run)
                    done += cell.seconds
                    self.progress(label, done)
                for workers, server in servers.items():
                    with FaceGateClient(server.target, timeout=30) as client:
                        status = client.get_status(timeout=10)
                    records[workers]["status"] = MessageToDict(
                        status, preserving_proto_field_name=True
                    )
            finally:
                if emulator is not None:
                    emulator.set_fault("healthy")  # hung requests end, the server stops fast
                for workers, server in servers.items():
                    stopping = time.monotonic()
                    server.stop()
                    records[workers]["stop_seconds"] = time.monotonic() - stopping
                    records[workers]["peak_rss_mib"] = (
                        self.sampler.peak_mib(server.popen.pid) if server.popen else 0
                    )
                    if server.popen is not None:
                        self.sampler.forget(server.popen.pid)
                    self.results["servers"].append(records[workers])

    def _prepare(
        self, scenario: Scenario, client: FaceGateClient, record: dict[str, Any], done: float
    ) -> None:
        self.progress(f"{scenario.key}: enrolling {len(self.people)} people through the API", done)
        started = time.monotonic()
        for person, photo in self.people:
            client.enroll(person.member_id, [photo], display_name=person.name)
        record["enrol_seconds"] = time.monotonic() - started
        if scenario.cloud:
            self.progress(f"{scenario.key}: waiting for the cloud group to be trained", done)
            started = time.monotonic()
            while True:
                status = client.get_status(timeout=10)
                if status.outbox_depth == 0 and status.cloud_training == "idle":
                    break
                if time.monotonic() - started > 120:
                    raise RuntimeError(f"the cloud did not settle: {status}")
                time.sleep(0.2)
            record["cloud_settle_seconds"] = time.monotonic() - started
        for resolution in {c.resolution for c in scenario.cells}:
            for probe in self.probes[:2]:
                load.identify_once(client, probe, resolution, "bench-warm-up")
        if scenario.cloud:
            assert self.emulator is not None
            self.emulator.set_latency(scenario.latency_profile)
            assert scenario.fault is not None
            self.emulator.set_fault(scenario.fault, **FAULT_KNOBS.get(scenario.fault, {}))

    def _cell(
        self,
        scenario: Scenario,
        server: ServerProcess,
        cell: Cell,
        idle: Sequence[ServerProcess] = (),
    ) -> dict[str, Any]:
        """One cell against `server`; `idle`: the scenario's other servers, up meanwhile
        (their CPU is kept apart from the others')."""
        concurrency, resolution, seconds = cell.concurrency, cell.resolution, cell.seconds
        hostile_rate = cell.hostile
        self.sampler.window(server.pid)
        hostile = None
        if hostile_rate:
            if self._hostile_frame is None:
                self._hostile_frame = load.hostile_frame()
            hostile = load.Hostile(
                server.target, self._hostile_frame, hostile_rate, self.o.deadline_s
            )
        load_before = machine.load_average()
        server_cpu = Sampler.cpu_seconds(server.pid)
        emulator_cpu = Sampler.cpu_seconds(self.emulator.pid) if self.emulator else 0.0
        counts_before = self.emulator.counts() if scenario.cloud and self.emulator else {}
        server_alone = Sampler.process_cpu_seconds(server.pid)
        idle_cpu = sum(Sampler.cpu_seconds(s.pid) for s in idle)
        own = Sampler.own_cpu_seconds()
        busy, steal = Sampler.machine_cpu()
        records, wall = load.run_cell(
            server.target, self.probes, resolution, concurrency, seconds, self.o.deadline_s, hostile
        )
        busy_after, steal_after = Sampler.machine_cpu()
        server_cpu = Sampler.cpu_seconds(server.pid) - server_cpu
        emulator_cpu = (
            Sampler.cpu_seconds(self.emulator.pid) - emulator_cpu if self.emulator else 0.0
        )
        own = Sampler.own_cpu_seconds() - own
        server_alone = Sampler.process_cpu_seconds(server.pid) - server_alone
        idle_cpu = sum(Sampler.cpu_seconds(s.pid) for s in idle) - idle_cpu
        others = max(0.0, busy_after - busy - server_cpu - emulator_cpu - own - idle_cpu)
        run: dict[str, Any] = {
            "cell": _cell_label(scenario, cell),
            "scenario": scenario.name,
            "policy": scenario.policy,
            "fault": scenario.fault,
            "latency_profile": scenario.latency_profile if scenario.cloud else None,
            "gallery": scenario.gallery,
            "workers_setting": scenario.workers if cell.workers is None else cell.workers,
            "round": cell.round,
            "concurrency": concurrency,
            "resolution": resolution,
            **stats.summarize_cell(records, wall),
            **stats.admission(records, self.o.budget_ms),
            "hostile_rate": hostile_rate,
            "hostile": stats.hostile(hostile.records) if hostile is not None else None,
            "load_average_before": load_before,
            "peak_rss_mib": self.sampler.window_peak_mib(server.pid),
            "server_cpu_seconds": server_cpu,
            "emulator_cpu_seconds": emulator_cpu,
            "benchmark_cpu_seconds": own,
            # What else ran on the machine meanwhile (other users' processes): figures
            # measured while others took CPU are slower than the server alone would be.
            "others_cpu_seconds": others,
            "steal_cpu_seconds": steal_after - steal,
            # Where the CPU went, process by process (the throughput aim's ceiling is the
            # server's and the load generator's share of the 2 cores beside the workers').
            "cpu_seconds": {
                "server": server_alone,
                "workers": server_cpu - server_alone,
                "load_generator": own,
                "others": others,
                "idle_servers": idle_cpu,
            },
        }
        if scenario.cloud and self.emulator is not None:
            after = self.emulator.counts()
            received = {
                op: n - counts_before.get("received", {}).get(op, 0)
                for op, n in after.get("received", {}).items()
            }
            run["emulator_received"] = {k: v for k, v in sorted(received.items()) if v}
        tpe = float(run["cloud_transactions_per_entry"])
        run["monthly_cost"] = stats.monthly_cost(tpe, self.o.cost)
        run["verdict"] = stats.verdict(run["latency_ms"]["p99"], self.o.budget_ms)
        return run

    # ---- the whole run -----------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.sampler.start()
        try:
            self.measure_stages()
            if any(s.cloud for s in self.o.plan):
                self.progress("starting facegate azure-emulator", 0)
                self.emulator = EmulatorProcess(self.logs / "emulator.log")
                started = time.monotonic()
                self.emulator.start()
                self.results["emulator_start_seconds"] = time.monotonic() - started
                self.sampler.watch(self.emulator.pid)
            done = 0.0
            for scenario in self.o.plan:
                try:
                    self.scenario(scenario, done)
                except Exception as error:  # keep going: the report says what failed
                    self.results["failures"].append(
                        {
                            "scenario": scenario.key,
                            "error": f"{type(error).__name__}: {error}",
                            "traceback": traceback.format_exc(limit=6),
                        }
                    )
                done += sum(c.seconds for c in scenario.cells)
                self.progress(scenario.key, done)
        finally:
            if self.emulator is not None:
                self.emulator.stop()
            self.sampler.stop()
        self._finish()
        return self.results

    def _finish(self) -> None:
        runs = self.results["runs"]
        timings = self.results.get("stages", {})
        breakdown = {}
        for resolution in RESOLUTIONS:
            local = [
                r
                for r in runs
                if r["scenario"] == "local-only"
                and r["concurrency"] == 1
                and r["resolution"] == resolution
            ]
            if not local or "by_resolution" not in timings:
                continue
            # The aims' gallery if it ran, else the largest that did.
            chosen = next((r for r in local if r["gallery"] == 10_000), None) or max(
                local, key=lambda r: r["gallery"]
            )
            match = timings["match_ms"].get(str(chosen["gallery"]), {"p50": 0.0})["p50"]
            breakdown[resolution] = {
                "cell": chosen["cell"],
                **stages.overhead(
                    chosen["latency_ms"]["p50"], timings["by_resolution"][resolution], match
                ),
            }
        if timings:
            timings["breakdown"] = breakdown
        self.results["aims"] = stats.aims(self.results)
        self.results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        started = datetime.fromisoformat(self.results["started"])
        self.results["duration_seconds"] = (datetime.now(UTC) - started).total_seconds()
        self.results["machine"]["load_average_at_end"] = machine.load_average()
