"""What a run measures: scenarios (a server configuration and the cloud's weather), each at
one gallery size, and the cells (concurrency x probe resolution) run against it.

One scenario = one fresh `facegate serve` process; its cells run one after the other
against that server, in the order listed (so the cloud's circuit breaker carries its
state from one cell to the next, as it would at a gym). A worker-scaling scenario is the
exception: a 1-worker and a 2-worker server side by side, their cells interleaved round
by round (`worker_scaling`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, replace

RESOLUTIONS: dict[str, tuple[int, int]] = {"480p": (854, 480), "1080p": (1920, 1080)}

POLICIES = ("local-only", "cloud-first", "local-first")
RAW = "raw"
"""The policy of the raw face_recognition pipeline's scenario (suite/raw.py): no server, the
library's own functions in the benchmark process, the yardstick of the latency aim."""
FAULTS = ("healthy", "refuse", "hang", "throttle", "flap")


@dataclass(frozen=True)
class Cell:
    """Turnstiles calling at once, with frames of one resolution, for `seconds`."""

    concurrency: int
    resolution: str
    seconds: float
    hostile: float = 0.0
    """Calls a second of a hostile turnstile beside them (4096x4096 16-bit PNGs, each about
    0.8 s of worker time, within every documented limit); 0: none."""
    workers: int | None = None
    """Which of a worker-scaling scenario's servers the cell calls (its FACEGATE_WORKERS);
    None in every other scenario (its one server)."""
    round: int | None = None
    """A worker-scaling scenario's round (1, 2, ...) the cell belongs to."""


@dataclass(frozen=True)
class Scenario:
    name: str
    """e.g. "local-only", "local-only, 1 worker", "cloud-first/hang"."""
    policy: str
    fault: str | None
    """The emulator's fault mode; None without a cloud."""
    gallery: int
    """Members in the store: the real people enrolled through the API, the rest synthetic."""
    cells: tuple[Cell, ...]
    workers: int | None = None
    """FACEGATE_WORKERS; None keeps the server's default (one a core)."""
    latency_profile: str = "field"
    """The emulator's latency per call once the scenario runs (enrolment runs without)."""
    side_by_side: tuple[int, ...] = ()
    """A worker-scaling scenario: one server per entry (its FACEGATE_WORKERS), all up at
    once, each cell calling the one its `workers` names; empty: one server."""

    @property
    def key(self) -> str:
        return f"{self.name} @{self.gallery:,}"

    @property
    def cloud(self) -> bool:
        return self.fault is not None

    @property
    def raw(self) -> bool:
        return self.policy == RAW


def raw_pipeline(gallery: int, cells: tuple[Cell, ...]) -> Scenario:
    """face_recognition's own pipeline on the same frames (one caller, no server), against a
    gallery of `gallery` members: run just before the local-only scenario it is compared to."""
    return Scenario("face_recognition (raw)", RAW, None, gallery, cells)


SCALING = "worker scaling"


def worker_scaling(
    gallery: int,
    rounds: int,
    seconds: float,
    one: Sequence[int] = (2, 4),
    two: Sequence[int] = (4,),
) -> Scenario:
    """Issue 12's throughput aim (two workers against one) within one run: a 1-worker and a
    2-worker local-only server started side by side on the same gallery, then `rounds`
    rounds of closed-loop 480p cells, each round one cell a concurrency on each server
    (`one` turnstiles on the 1-worker server, `two` on the 2-worker one), the servers'
    order alternating from round to round (1, 2, 2, 1, ...), so that a change in the shared
    machine's load falls on both sides of each round's ratio."""
    cells: list[Cell] = []
    for n in range(1, rounds + 1):
        order = ((1, one), (2, two)) if n % 2 else ((2, two), (1, one))
        cells += [Cell(c, "480p", seconds, workers=w, round=n) for w, cs in order for c in cs]
    return Scenario(SCALING, "local-only", None, gallery, tuple(cells), side_by_side=(1, 2))


def _cells(
    concurrency: Sequence[int], resolutions: Sequence[str], seconds: float
) -> tuple[Cell, ...]:
    return tuple(Cell(c, r, seconds) for r in resolutions for c in concurrency)


def quick_plan() -> list[Scenario]:
    """Under 2 minutes: one small gallery, one and eight turnstiles, one beside a hostile
    turnstile, the healthy and hung cloud, and one short round of 1 worker (2 turnstiles)
    against 2 (4 turnstiles), side by side."""
    cells = (
        Cell(1, "480p", 5),
        Cell(1, "1080p", 5),
        Cell(8, "480p", 6),
        Cell(1, "480p", 8, hostile=6.5),
    )
    return [
        # At least one pass over the probe frames, whatever the seconds (suite/raw.py).
        raw_pipeline(1_000, (Cell(1, "480p", 2),)),
        Scenario("local-only", "local-only", None, 1_000, cells),
        Scenario("cloud-first/healthy", "cloud-first", "healthy", 1_000, (Cell(2, "480p", 6),)),
        Scenario("cloud-first/hang", "cloud-first", "hang", 1_000, (Cell(2, "480p", 6),)),
        worker_scaling(1_000, rounds=1, seconds=4.0, one=(2,), two=(4,)),
    ]


def full_plan() -> list[Scenario]:
    """About 18 minutes on 2 cores (38 cells of 20 s and 15 of 10 s, 14 server starts, a
    100k gallery)."""
    s = 20.0
    plan = [
        # The yardstick of the latency aim: face_recognition itself, at the aims' gallery.
        raw_pipeline(10_000, _cells([1], tuple(RESOLUTIONS), s)),
        # The local engine at the gym size of the aims, every concurrency, both frame sizes.
        Scenario(
            "local-only",
            "local-only",
            None,
            10_000,
            (*_cells([1, 2, 4, 8], tuple(RESOLUTIONS), s), Cell(1, "480p", s, hostile=6.5)),
        ),
        # Latency against gallery size.
        *(
            Scenario("local-only", "local-only", None, n, _cells([1, 4], ["480p"], s))
            for n in (10, 1_000, 100_000)
        ),
        # The throughput aim: 1 and 2 workers side by side, rounds interleaved.
        # (2 workers: 4 turnstiles beat 8 in every round measured; 1 worker: 2 and 4 split.)
        worker_scaling(10_000, rounds=5, seconds=10.0),
    ]
    plan += [
        Scenario(
            f"cloud-first/{fault}", "cloud-first", fault, 10_000, _cells([1, 4, 8], ["480p"], s)
        )
        for fault in FAULTS
    ]
    plan += [
        Scenario(f"local-first/{fault}", "local-first", fault, 10_000, _cells([1, 4], ["480p"], s))
        for fault in ("healthy", "hang", "flap")
    ]
    return plan


def select(plan: Sequence[Scenario], patterns: Sequence[str]) -> list[Scenario]:
    """The scenarios whose name or key matches one of the shell patterns (all if none given)."""
    if not patterns:
        return list(plan)
    return [
        s
        for s in plan
        if any(fnmatch.fnmatchcase(s.name, p) or fnmatch.fnmatchcase(s.key, p) for p in patterns)
    ]


def with_seconds(plan: Sequence[Scenario], seconds: float) -> list[Scenario]:
    """The same plan with every cell lasting `seconds`."""
    return [replace(s, cells=tuple(replace(c, seconds=seconds) for c in s.cells)) for s in plan]


def estimate_seconds(plan: Sequence[Scenario]) -> float:
    """A rough duration on an idle machine: the cells, plus a server's start, enrolment and
    warm-up (and the cloud's settling) per server, and the stage breakdown and the
    emulator's start. A loaded machine takes up to twice as long (at load 10 servers
    started in 11-16 s, against 4-5 s on a quieter one; the stage breakdown took 30 s)."""
    cells = sum(c.seconds + (0.5 if s.raw else 1.0) for s in plan for c in s.cells)
    starts = sum(
        # Side by side, the servers start at once: the others cost their enrolment.
        12.0 if s.cloud else 0.0 if s.raw else 8.0 + 3.0 * max(0, len(s.side_by_side) - 1)
        for s in plan
    )
    galleries = sum(n / 4_000 for n in {s.gallery for s in plan})  # ~0.25 ms a member
    return cells + starts + galleries + 18.0  # + stage breakdown and the emulator
