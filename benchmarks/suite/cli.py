"""The command: `uv run python -m benchmarks.suite [--quick] [options]`."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import plan as plans
from . import plots, report, stats
from .runner import Options, Run

ROOT = Path(__file__).resolve().parents[2]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.suite",
        description="Benchmark Identify end to end against real `facegate serve` processes "
        "and the Face API emulator: latency against the budget, scale, throughput, cost.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the quick mode (under 2 minutes; what CI runs) instead of the full one",
    )
    p.add_argument(
        "--scenarios",
        nargs="+",
        default=[],
        metavar="PATTERN",
        help="only the scenarios whose name or key matches a shell pattern, e.g. "
        "'local-only' 'cloud-first/*' '*@100,000'",
    )
    p.add_argument("--list", action="store_true", help="list the mode's scenarios and exit")
    p.add_argument("--seconds", type=float, help="every cell lasts this long (default: the mode's)")
    p.add_argument(
        "--out",
        type=Path,
        help="where results.json, report.md and the plots go "
        "(default benchmarks/results/MODE-YYYYmmdd-HHMMSS)",
    )
    p.add_argument(
        "--faces",
        type=Path,
        default=ROOT.parent / "shared" / "faces",
        help="the test photographs (default ../shared/faces)",
    )
    p.add_argument(
        "--budget-ms",
        type=float,
        default=1200.0,
        help="the verdict's budget for the p99 (default 1200)",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=5.0,
        help="the turnstiles' Identify deadline in seconds (default 5: long enough "
        "to see the tail beyond the budget)",
    )
    p.add_argument("--seed", type=int, default=1, help="seeds the synthetic gallery (1)")
    cost = p.add_argument_group("the month's cloud cost (the seed document's prices by default)")
    cost.add_argument("--members", type=int, default=1_000, help="members of the gym (1000)")
    cost.add_argument(
        "--visits-per-member",
        type=float,
        default=12.0,
        help="entries a member makes in a month (12)",
    )
    cost.add_argument("--faces-per-member", type=int, default=1, help="stored faces each (1)")
    cost.add_argument(
        "--free-transactions", type=int, default=30_000, help="free transactions a month (30000)"
    )
    cost.add_argument(
        "--price-per-1000",
        type=float,
        default=1.0,
        help="USD per 1,000 transactions beyond the free ones (1.0)",
    )
    cost.add_argument(
        "--storage-per-1000-faces",
        type=float,
        default=0.01,
        help="USD per 1,000 stored faces a month (0.01)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    mode = "quick" if args.quick else "full"
    chosen = plans.quick_plan() if args.quick else plans.full_plan()
    chosen = plans.select(chosen, args.scenarios)
    if args.seconds is not None:
        chosen = plans.with_seconds(chosen, args.seconds)
    if args.scenarios or args.seconds is not None:
        mode = "custom" if not args.quick else "quick"
    console = Console(stderr=True)
    if not chosen:
        console.print(f"no scenario matches {args.scenarios}; --list shows them")
        return 2
    if args.list:
        for s in chosen:
            cells = ", ".join(
                (f"r{c.round} {c.workers}w " if c.workers is not None else "")
                + f"c{c.concurrency} {c.resolution} {c.seconds:g}s"
                for c in s.cells
            )
            print(f"{s.key:42} {cells}")
        print(f"about {plans.estimate_seconds(chosen) / 60:.0f} min")
        return 0
    if not (args.faces / "manifest.csv").exists():
        console.print(f"[red]no test photographs at {args.faces}[/red] (--faces DIR)")
        return 2
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or ROOT / "benchmarks" / "results" / f"{mode}-{stamp}"
    options = Options(
        mode=mode,
        plan=chosen,
        faces=args.faces,
        out=out,
        cache=ROOT / "benchmarks" / "results" / "cache",
        root=ROOT,
        cost=stats.CostModel(
            members=args.members,
            visits_per_member=args.visits_per_member,
            faces_per_member=args.faces_per_member,
            free_transactions=args.free_transactions,
            price_per_1000=args.price_per_1000,
            storage_per_1000_faces=args.storage_per_1000_faces,
        ),
        budget_ms=args.budget_ms,
        deadline_s=args.deadline,
        seed=args.seed,
        stage_repeats=1 if args.quick else 3,
        match_repeats=50 if args.quick else 200,
    )
    total = sum(c.seconds for s in chosen for c in s.cells)
    console.print(
        f"FaceGate benchmark, {mode} mode: {len(chosen)} scenarios, "
        f"{sum(len(s.cells) for s in chosen)} cells, about "
        f"{plans.estimate_seconds(chosen) / 60:.0f} min; results in {out}"
    )
    with Progress(
        TextColumn("{task.description}", style="bold"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("starting", total=total)

        def update(description: str, done: float) -> None:
            progress.update(task, description=description[:60], completed=done)

        results = Run(options, update).run()
    json_path, md_path = report.write(results, out)
    drawn = plots.draw_all(report.clean(results), out)
    table = Table(title=f"FaceGate benchmark ({mode}): Identify end to end, ms", show_lines=False)
    for header in report.SUMMARY_HEADERS:
        table.add_column(header, overflow="fold")
    for row in report.summary_rows(report.clean(results)):
        style = None if row[-1].startswith("PASS") else "red"
        table.add_row(*row, style=style)
    wide = Console(width=max(160, console.width))
    wide.print(table)
    for aim in results["aims"]:
        status = {True: "[green]met[/green]", False: "[red]not met[/red]", None: "not measured"}
        wide.print(f"  {status[aim['met']]}: {aim['aim']} ({aim['target']}): {aim['measured']}")
    for failure in results["failures"]:
        wide.print(f"[red]failed: {failure['scenario']}: {failure['error']}[/red]")
    wide.print(f"results: {json_path}\nreport:  {md_path}")
    for path in drawn:
        wide.print(f"plot:    {path}")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
