"""The run's PNG plots (matplotlib, Agg): latency per cell with the budget line, latency
against gallery size, throughput against concurrency."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency(results: Mapping[str, Any], path: Path) -> Path | None:
    runs = [r for r in results.get("runs", []) if r.get("latency_samples_ms")]
    if not runs:
        return None
    plt = _pyplot()
    budget = results["settings"]["budget_ms"]
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.32 * len(runs)))
    labels = [r["cell"] for r in runs][::-1]
    data = [r["latency_samples_ms"] for r in runs][::-1]
    ax.boxplot(
        data, orientation="horizontal", whis=(1, 99), showfliers=True, flierprops={"markersize": 2}
    )
    for i, run in enumerate(runs[::-1], start=1):
        colour = "tab:green" if run["verdict"]["pass"] else "tab:red"
        ax.plot(run["latency_ms"]["p99"], i, marker="|", markersize=12, color=colour)
    ax.set_yticks(range(1, len(labels) + 1), labels, fontsize=7)
    ax.axvline(budget, color="tab:red", linestyle="--")
    ax.set_xlabel(
        "Identify latency at the turnstile (ms); box: quartiles, whiskers p1-p99, "
        "tick: p99 (green within budget)"
    )
    ax.set_title(f"End-to-end Identify latency per scenario; dashed: the budget, {budget:.0f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gallery(results: Mapping[str, Any], path: Path) -> Path | None:
    series: dict[tuple[int, str], list[tuple[int, Mapping[str, float]]]] = {}
    for r in results.get("runs", []):
        if r["scenario"] == "local-only" and not r.get("hostile_rate"):  # the plain cells
            series.setdefault((r["concurrency"], r["resolution"]), []).append(
                (r["gallery"], r["latency_ms"])
            )
    series = {
        k: sorted(v, key=lambda p: p[0]) for k, v in series.items() if len({g for g, _ in v}) > 1
    }
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (concurrency, resolution), points in sorted(series.items()):
        sizes = [g for g, _ in points]
        for stat, style in (("p50", "-o"), ("p99", "--^")):
            ax.plot(
                sizes,
                [lat[stat] for _, lat in points],
                style,
                label=f"{stat}, {concurrency} turnstile(s), {resolution}",
            )
    ax.set_xscale("log")
    ax.set_xlabel("members in the gallery")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title("Local-only Identify latency against gallery size")
    handles, labels = ax.get_legend_handles_labels()
    match = results.get("stages", {}).get("match_ms", {})
    if match:
        right = ax.twinx()
        sizes = sorted(int(n) for n in match)
        (line,) = right.plot(sizes, [match[str(n)]["p50"] for n in sizes], ":s", color="grey")
        right.set_ylabel("matching alone, in-process p50 (ms; grey)")
        right.set_ylim(bottom=0)
        handles.append(line)
        labels.append("matching alone (right axis)")
    ax.legend(handles, labels, fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput(results: Mapping[str, Any], path: Path) -> Path | None:
    series: dict[str, list[tuple[int, float]]] = {}
    for r in results.get("runs", []):
        if not r["scenario"].startswith("local-only") or r.get("hostile_rate"):
            continue  # the cloud scenarios' throughput is the local engine's, behind waits
        name = f"{r['scenario']} @{r['gallery']:,} {r['resolution']}"
        series.setdefault(name, []).append((r["concurrency"], r["throughput_rps"]))
    series = {k: sorted(v) for k, v in series.items() if len(v) > 1}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in sorted(series.items()):
        ax.plot([c for c, _ in points], [t for _, t in points], "-o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    ax.set_xlabel("turnstiles calling at once")
    ax.set_ylabel("Identify calls answered a second")
    ax.set_title("Local-only throughput against concurrency (answers, errors excluded)")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(results: Mapping[str, Any], out: Path) -> list[Path]:
    drawn = [
        latency(results, out / "latency.png"),
        gallery(results, out / "latency_vs_gallery.png"),
        throughput(results, out / "throughput.png"),
    ]
    return [p for p in drawn if p is not None]
