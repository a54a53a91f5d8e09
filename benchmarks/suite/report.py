"""What a run leaves: results.json (every figure), report.md, and the terminal's table.

`markdown(results)` and `summary_rows(results)` are pure: they rebuild the report from a
results file (`python -m benchmarks.suite.report results.json` prints it again).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _ms(value: float) -> str:
    return (
        "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.0f}"
    )


def _short(counts: Mapping[str, int], total: int) -> str:
    if not counts or total == 0:
        return "-"
    parts = sorted(counts.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in parts)


def _engines(decisions: Mapping[str, int]) -> str:
    """{"local/GRANTED": 9, "azure/GRANTED": 1} -> "local 90%, azure 10%"."""
    by_engine: dict[str, int] = {}
    for name, count in decisions.items():
        engine = name.split("/", 1)[0]
        by_engine[engine] = by_engine.get(engine, 0) + count
    return _short(by_engine, sum(by_engine.values()))


def _verdict(run: Mapping[str, Any]) -> str:
    v = run["verdict"]
    word = "PASS" if v["pass"] else "FAIL"
    margin = v.get("margin_ms")
    return word if margin is None else f"{word} ({margin:+.0f} ms)"


def _errors(run: Mapping[str, Any]) -> str:
    errors = run.get("errors", {})
    return ", ".join(f"{k} {v}" for k, v in errors.items()) if errors else "0"


def _detail_row(run: Mapping[str, Any]) -> list[str]:
    o = run["outcomes"]
    received = run.get("emulator_received")
    calls = "-"
    if received is not None and run["requests"]:
        paid = received.get("Face_DetectWithStream", 0) + received.get("Face_Identify", 0)
        calls = f"{paid / run['requests']:.2f}"
    overhead = run["client_overhead_ms"]
    return [
        run["cell"],
        ", ".join(f"{k} {v}" for k, v in run["decisions"].items()) or "-",
        ", ".join(f"{k} {v}" for k, v in run["engine_outcomes"].items()) or "-",
        f"{o['correct_grant']}/{o['wrong_grant']}/{o['false_reject']}/{o['correct_reject']}"
        f"/{o['error']}",
        f"{run['cloud_transactions_per_entry']:.2f}",
        calls,
        f"{run['server_cpu_seconds']:.1f}",
        f"{run['emulator_cpu_seconds']:.1f}",
        f"{run.get('others_cpu_seconds', 0.0):.1f}",
        f"{_ms(overhead['p50'])}/{_ms(overhead['p95'])}",
    ]


def summary_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """One row a cell: the terminal's table and the report's verdict table."""
    rows = []
    for run in results.get("runs", []):
        lat = run["latency_ms"]
        rows.append(
            [
                run["cell"],
                str(lat["n"]),
                _ms(lat["p50"]),
                _ms(lat["p95"]),
                _ms(lat["p99"]),
                _ms(lat["max"]),
                f"{run['throughput_rps']:.1f}",
                _engines(run["decisions"]),
                _errors(run),
                str(run["wrong_grants"]),
                f"{run['cloud_transactions_per_entry']:.2f}",
                f"{run['monthly_cost']['total_usd']:,.2f}",
                f"{run['peak_rss_mib']:.0f}",
                _verdict(run),
            ]
        )
    return rows


SUMMARY_HEADERS = [
    "cell",
    "n",
    "p50",
    "p95",
    "p99",
    "max",
    "answers/s",
    "decided by",
    "errors",
    "wrong",
    "tx/entry",
    "$/month",
    "peak MiB",
    "verdict (p99 vs budget)",
]


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return lines


def _met(value: bool | None) -> str:
    return {True: "**met**", False: "**not met**", None: "not measured"}[value]


def markdown(results: Mapping[str, Any]) -> str:
    m = results["machine"]
    cost = results["cost_model"]
    budget = results["settings"]["budget_ms"]
    dirty = " (with uncommitted changes)" if m["dirty"] else ""
    out = [
        f"# FaceGate benchmark: {results['mode']} mode",
        "",
        f"Run {results['started']} to {results.get('finished', '?')} "
        f"({results.get('duration_seconds', 0) / 60:.1f} min) on {m['cpu_model']}, "
        f"{m['usable_cores']} usable cores, {m['memory_gib']} GiB, Python {m['python']}, "
        f"{m['os']}; commit {m['commit'][:10]}{dirty}. "
        f"Load average (1, 5, 15 min) at start {m['load_average_at_start']}, at end "
        f"{m.get('load_average_at_end', '?')}.",
        "",
        "## Verdict",
        "",
        f"Every cell's p99 of the end-to-end Identify latency, as the turnstile sees it, "
        f"against the budget ({budget:.0f} ms). Latencies in ms, errors included; "
        "`answers/s` decisions a second (errors excluded); `decided by` the share of answers "
        "by deciding engine; `wrong` counts wrong grants; "
        "`tx/entry` cloud transactions per Identify; `$/month` the month's cloud cost for "
        f"{cost['members']:,} members visiting {cost['visits_per_member']:g} times; "
        "`peak MiB` the server's process tree during the cell.",
        "",
        *_table(SUMMARY_HEADERS, summary_rows(results)),
        "",
    ]
    out += [
        "### Decisions, engines and the cloud, per cell",
        "",
        "`outcomes`: correct grants / wrong grants / false rejects (a member denied) / "
        "correct rejects (the unenrolled person denied) / errors. `engine outcomes`: what "
        "each engine did (EngineReport). `emulator calls/entry`: detect + identify calls the "
        "emulator received per Identify (faulted ones included). `overhead`: the turnstile's "
        "latency minus the server's own server_latency (gRPC, the load generator), p50/p95. "
        "CPU seconds during the cell (2 cores give 2 a second): `others'` is what other "
        "users' processes on the machine took meanwhile; where it is high, the cell's "
        "figures are slower than the server alone would give.",
        "",
        *_table(
            [
                "cell",
                "decisions",
                "engine outcomes",
                "outcomes",
                "tx/entry",
                "emulator calls/entry",
                "server CPU s",
                "emulator CPU s",
                "others' CPU s",
                "overhead ms",
            ],
            [_detail_row(run) for run in results.get("runs", [])],
        ),
        "",
    ]
    if results.get("failures"):
        out += ["**Scenarios that failed to run:**", ""]
        out += [f"- {f['scenario']}: {f['error']}" for f in results["failures"]]
        out.append("")
    out += ["## Against the aims", ""]
    out += _table(
        ["aim", "target", "measured", "status"],
        [
            [
                a["aim"],
                a["target"],
                a["measured"] + (f" ({a['note']})" if a["note"] else ""),
                _met(a["met"]),
            ]
            for a in results.get("aims", [])
        ],
    )
    out.append("")
    out += _scaling_section(results)
    out += _raw_section(results)
    timings = results.get("stages")
    if timings:
        out += ["## The local pipeline, stage by stage", "", timings["method"] + ".", ""]
        rows = []
        names = ["decode", "detect", "landmarks_quality", "encode", "worker_total"]
        heads = ["frame", "decode", "detect", "landmarks + quality", "encode", "worker total"]
        # Both encoders on the same faces (stages.ENCODER_STAGES), where the run timed them.
        if all(
            "encode_onnx" in by and "encode_dlib" in by for by in timings["by_resolution"].values()
        ):
            names += ["encode_onnx", "encode_dlib"]
            heads += ["encode: onnx", "encode: dlib"]
        for resolution, by_stage in timings["by_resolution"].items():
            rows.append(
                [resolution]
                + [f"{by_stage[s]['p50']:.1f} / {by_stage[s]['p95']:.1f}" for s in names]
            )
        out += _table(heads, rows)
        out += ["", "(p50 / p95, ms.) Matching, `FaceIndex.match`, one template a member:", ""]
        out += _table(
            ["members", "p50 ms", "p95 ms"],
            [
                [f"{int(n):,}", f"{v['p50']:.2f}", f"{v['p95']:.2f}"]
                for n, v in timings["match_ms"].items()
            ],
        )
        for resolution, b in timings.get("breakdown", {}).items():
            parts = ", ".join(f"{k} {v:.0f}" for k, v in b["parts_p50"].items())
            out += [
                "",
                f"End to end at {resolution} ({b['cell']}): p50 {b['end_to_end_p50']:.0f} ms = "
                f"{parts} + **overhead {b['overhead_ms']:.0f} ms** (gRPC, validation, the hop "
                "to the worker process and back, the access log; stage medians do not add "
                "exactly, so read it as an estimate).",
            ]
        out.append("")
    g = results.get("gallery")
    if g:
        out += [
            "## The gallery",
            "",
            f"{g['real_members']} real people enrolled through the API with one photo each "
            f"({', '.join(results['people']['enrolled'])}); probes are their other photos and "
            f"the unenrolled {', '.join(results['people']['unenrolled'])} (must be denied), "
            "letterboxed to 854x480 and 1920x1080 JPEGs. The rest of each gallery is "
            f"synthetic: {g['synthetic_rule']}, written {g['written']}. Real embeddings' norm "
            f"{g['real_embeddings']['norm_mean']:.3f}, synthetic "
            f"{g['synthetic_embeddings']['norm_mean']:.3f}; nearest synthetic to a real face "
            f"{g['synthetic_min_distance_to_real']:.2f}. Synthetic members are easier to tell "
            "apart than a real crowd: this measures speed, not accuracy at scale.",
            "",
        ]
    servers = results.get("servers", [])
    if servers:
        out += ["## Servers", ""]
        out += _table(
            [
                "scenario",
                "workers",
                "start s",
                "enrol s",
                "cloud settle s",
                "peak MiB",
                "cloud transactions (server)",
            ],
            [
                [
                    s["key"],
                    str(s.get("workers", "?")),
                    f"{s.get('startup_seconds', 0):.1f}",
                    f"{s.get('enrol_seconds', 0):.1f}",
                    f"{s['cloud_settle_seconds']:.1f}" if "cloud_settle_seconds" in s else "-",
                    f"{s.get('peak_rss_mib', 0):.0f}",
                    ", ".join(
                        f"{c['name']} {c['count']}"
                        for c in s.get("status", {}).get("cloud_transactions", [])
                    )
                    or "-",
                ]
                for s in servers
            ],
        )
        out.append("")
    out += [
        "## How",
        "",
        f"- Server: {results['settings']['server']}.",
        f"- Cloud: {results['settings']['emulator']}.",
        f"- Turnstiles: {results['settings']['turnstiles']}; client deadline "
        f"{results['settings']['client_deadline_s']:g} s.",
        f"- Percentiles: {results['settings']['percentiles']}.",
        f"- Cost: {cost['free_transactions']:,} free transactions a month, then "
        f"${cost['price_per_1000']:g} per 1,000; storage ${cost['storage_per_1000_faces']:g} "
        f"per 1,000 faces a month ({cost['faces_per_member']} a member).",
        "",
    ]
    return "\n".join(out)


def _scaling_section(results: Mapping[str, Any]) -> list[str]:
    """The worker-scaling scenario round by round, and where the CPU went."""
    from .stats import CPU_PARTS, worker_scaling

    w = worker_scaling(results)
    if w is None:
        return []
    out = [
        "## Two workers against one, side by side (the throughput aim)",
        "",
        f"A 1-worker and a 2-worker local-only server up at once, {w['gallery']:,} members, "
        "480p; each round one closed-loop cell a concurrency on each, the servers' order "
        "alternating from round to round. Per round the best cell of each server; `cores`: "
        "CPU seconds a second of the wall clock during the two cells the round's ratio "
        "divides (the larger of the two), 2 cores in all.",
        "",
    ]
    out += _table(
        [
            "round",
            "1 worker answers/s",
            "2 workers answers/s",
            "ratio",
            "load generator cores",
            "others' cores",
        ],
        [
            [
                str(r["round"]),
                f"{r['one']['throughput_rps']:.1f} (c{r['one']['concurrency']})",
                f"{r['two']['throughput_rps']:.1f} (c{r['two']['concurrency']})",
                f"{r['ratio']:.2f}x",
                f"{r['load_generator_cores']:.2f}",
                f"{r['others_cores']:.2f}",
            ]
            for r in w["rounds"]
        ],
    )
    out += [
        "",
        f"Median of the rounds' ratios **{w['ratio_median']:.2f}x** (the aim's figure); ratio "
        f"of the medians {w['ratio_of_medians']:.2f}x ({w['two_rps_median']:.1f} / "
        f"{w['one_rps_median']:.1f} answers/s). CPU ms an answer (median of the rounds' best "
        "cells; `idle server`: the other server, up but not called, meanwhile):",
        "",
    ]
    out += _table(
        ["server", "server process", "workers", "load generator", "others", "idle server"],
        [
            [f"{n} worker{'s' if n == '2' else ''}"] + [f"{c[part]:.1f}" for part in CPU_PARTS]
            for n, c in w["cpu_ms_per_answer"].items()
        ],
    )
    out.append("")
    return out


def _raw_section(results: Mapping[str, Any]) -> list[str]:
    """The raw face_recognition pipeline per cell, and FaceGate's local Identify against it."""
    from .stats import raw_ratios

    cells = results.get("raw_pipeline", [])
    if not cells:
        return []
    out = [
        "## The raw face_recognition pipeline (the latency aim's yardstick)",
        "",
        cells[0]["method"] + ". Latency per frame, load to decision (ms, p50 / p95 for the "
        "stages); `correct`: frames granted to the probe's member (or to nobody for the "
        "unenrolled person) at face_recognition's tolerance.",
        "",
    ]

    def pair(v: Mapping[str, Any]) -> str:
        return f"{v['p50']:.1f} / {v['p95']:.1f}"

    out += _table(
        [
            "cell",
            "frames",
            "p50",
            "p99",
            "load",
            "detect",
            "encode",
            "compare",
            "correct",
            "others' CPU s",
        ],
        [
            [
                c["cell"],
                str(c["frames"]),
                _ms(c["latency_ms"]["p50"]),
                _ms(c["latency_ms"]["p99"]),
                *(pair(c["stages_ms"][s]) for s in ("load", "detect", "encode", "compare")),
                f"{c['correct']}/{c['frames']}",
                f"{c['others_cpu_seconds']:.1f}",
            ]
            for c in cells
        ],
    )
    for resolution in ("480p", "1080p"):
        r = raw_ratios(results, resolution)
        if r is not None:
            out += [
                "",
                f"FaceGate ({r['cell']}) against it at {resolution}, {r['gallery']:,} members: "
                f"p50 {r['facegate_ms']['p50']:.0f} / {r['raw_ms']['p50']:.0f} ms = "
                f"**{r['ratio']['p50']:.2f}x**, p99 {r['facegate_ms']['p99']:.0f} / "
                f"{r['raw_ms']['p99']:.0f} ms = **{r['ratio']['p99']:.2f}x**.",
            ]
    out.append("")
    return out


def write(results: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    results = clean(results)
    json_path = out / "results.json"
    json_path.write_text(json.dumps(results, indent=1, allow_nan=False, default=_nan) + "\n")
    md_path = out / "report.md"
    md_path.write_text(markdown(results))
    return json_path, md_path


def _nan(value: Any) -> Any:
    raise TypeError(f"not JSON: {value!r}")


def clean(value: Any) -> Any:
    """NaN (no samples) becomes null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


if __name__ == "__main__":
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
