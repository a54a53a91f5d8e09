"""The benchmark suite's report-building code on canned numbers (no benchmark runs here:
the suite itself is `python -m benchmarks.suite`, see benchmarks/README.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks.suite import check, plan, plots, report, stats


def record(
    latency: float,
    decision: str = "GRANTED",
    member: str = "m-a",
    expected: str = "m-a",
    engine: str = "LOCAL",
    code: str = "OK",
    tx: int = 0,
    reports: dict[str, str] | None = None,
) -> dict[str, Any]:
    ok = code == "OK"
    return {
        "latency_ms": latency,
        "server_ms": latency - 2.0 if ok else None,
        "code": code,
        "decision": decision if ok else "",
        "engine": engine if ok else "",
        "member_id": member if ok and decision == "GRANTED" else "",
        "expected": expected,
        "probe": "people/a/2.jpg",
        "reports": reports or {},
        "cloud_transactions": tx,
    }


def run(
    cell: str,
    scenario: str,
    gallery: int,
    concurrency: int,
    records: list[dict[str, Any]],
    wall: float = 10.0,
    resolution: str = "480p",
    fault: str | None = None,
    workers: int | None = None,
    round: int | None = None,
) -> dict[str, Any]:
    summary = stats.summarize_cell(records, wall)
    answers = summary["throughput_rps"] * wall
    return {
        "cell": cell,
        "scenario": scenario,
        "policy": scenario.split("/")[0].split(",")[0],
        "fault": fault,
        "latency_profile": "field" if fault else None,
        "gallery": gallery,
        "workers_setting": workers,
        "round": round,
        "concurrency": concurrency,
        "resolution": resolution,
        **summary,
        "load_average_before": [0.5, 0.4, 0.3],
        "peak_rss_mib": 480.0,
        "server_cpu_seconds": 9.5,
        "emulator_cpu_seconds": 0.0,
        "benchmark_cpu_seconds": 1.0,
        "others_cpu_seconds": 0.5,
        "steal_cpu_seconds": 0.0,
        "monthly_cost": stats.monthly_cost(
            summary["cloud_transactions_per_entry"], stats.CostModel()
        ),
        "verdict": stats.verdict(summary["latency_ms"]["p99"], 1200.0),
        "server_workers": workers or 2,
        # 4 ms of the server process, 60 of the workers, 1 of the load generator an answer.
        "cpu_seconds": {
            "server": 0.004 * answers,
            "workers": 0.060 * answers,
            "load_generator": 0.001 * answers,
            "others": 0.5,
            "idle_servers": 0.1,
        },
    }


def scaling_runs(rates: list[tuple[float, float]], gallery: int = 10_000) -> list[dict[str, Any]]:
    """The worker-scaling scenario's cells: per round (1-worker rate, 2-worker rate), each
    side at two concurrencies, the second 1 answer/s below the first."""
    runs = []
    for n, (one, two) in enumerate(rates, start=1):
        for workers, rate, concurrencies in ((1, one, (2, 4)), (2, two, (4, 8))):
            for i, c in enumerate(concurrencies):
                answers = round((rate - i) * 10)
                runs.append(
                    run(
                        f"worker scaling @{gallery:,} r{n} {workers}w c{c} 480p",
                        "worker scaling",
                        gallery,
                        c,
                        local_records(100 * c, n=answers),
                        workers=workers,
                        round=n,
                    )
                    | {"policy": "local-only"}
                )
    return runs


def local_records(base: float, n: int = 100) -> list[dict[str, Any]]:
    return [record(base + i % 10) for i in range(n)]


def raw_cell(gallery: int, resolution: str, base: float, n: int = 20) -> dict[str, Any]:
    """A raw face_recognition cell (suite/raw.py's shape): latencies base .. base + 9."""
    latencies = [base + i % 10 for i in range(n)]
    stage = stats.latency_summary([x / 4 for x in latencies])
    return {
        "cell": f"face_recognition (raw) @{gallery:,} c1 {resolution}",
        "scenario": "face_recognition (raw)",
        "key": f"face_recognition (raw) @{gallery:,}",
        "gallery": gallery,
        "resolution": resolution,
        "method": "face_recognition's own functions",
        "frames": n,
        "latency_ms": stats.latency_summary(latencies),
        "stages_ms": {name: stage for name in ("load", "detect", "encode", "compare")},
        "correct": n,
        "latency_samples_ms": latencies,
        "wall_seconds": 7.0,
        "load_average_before": [0.5, 0.4, 0.3],
        "benchmark_cpu_seconds": 7.0,
        "others_cpu_seconds": 0.1,
    }


def canned() -> dict[str, Any]:
    runs = [
        run("local-only @10 c1 480p", "local-only", 10, 1, local_records(140)),
        run("local-only @10,000 c1 480p", "local-only", 10_000, 1, local_records(141), wall=14.5),
        run("local-only @10,000 c2 480p", "local-only", 10_000, 2, local_records(150), wall=7.6),
        run("local-only @100,000 c1 480p", "local-only", 100_000, 1, local_records(143)),
        # Rounds 1.84x, 2.0x and 1.5x (a disturbed one): median 1.84x.
        *scaling_runs([(12.5, 23.0), (13.0, 26.0), (14.0, 21.0)]),
        run(
            "cloud-first/hang @10,000 c4 480p",
            "cloud-first/hang",
            10_000,
            4,
            [
                record(
                    1150, engine="LOCAL", tx=1, reports={"azure": "TIMED_OUT", "local": "DECIDED"}
                )
                for _ in range(98)
            ]
            + [
                record(1300, decision="GRANTED", member="m-b", expected="m-a"),
                record(5000, code="DEADLINE_EXCEEDED"),
            ],
            fault="hang",
        ),
    ]
    timing = stats.latency_summary([1.0, 2.0, 3.0])
    results: dict[str, Any] = {
        "schema_version": 1,
        "mode": "full",
        "started": "2026-11-27T00:00:00+00:00",
        "finished": "2026-11-27T00:20:00+00:00",
        "duration_seconds": 1200.0,
        "machine": {
            "cpu_model": "AMD EPYC",
            "logical_cores": 2,
            "usable_cores": 2,
            "memory_gib": 23.5,
            "python": "3.11.7",
            "os": "Linux",
            "commit": "abc123",
            "dirty": False,
            "load_average_at_start": [0.2, 0.3, 0.4],
            "load_average_at_end": [1.0, 0.9, 0.8],
        },
        "settings": {
            "budget_ms": 1200.0,
            "client_deadline_s": 5.0,
            "server": "facegate serve",
            "emulator": "facegate azure-emulator",
            "turnstiles": "threads",
            "percentiles": "nearest rank",
            "seed": 1,
            "fault_knobs": {},
        },
        "cost_model": {
            "members": 1000,
            "visits_per_member": 12.0,
            "faces_per_member": 1,
            "free_transactions": 30000,
            "price_per_1000": 1.0,
            "storage_per_1000_faces": 0.01,
        },
        "plan": [
            {
                "scenario": r["scenario"],
                "key": r["cell"],
                "policy": r["policy"],
                "fault": r["fault"],
                "gallery": r["gallery"],
                "workers": None,
                "cells": [{"concurrency": r["concurrency"], "resolution": "480p", "seconds": 10.0}],
            }
            for r in runs
        ]
        + [
            {
                "scenario": "face_recognition (raw)",
                "key": "face_recognition (raw) @10,000",
                "policy": "raw",
                "fault": None,
                "gallery": 10_000,
                "workers": None,
                "cells": [{"concurrency": 1, "resolution": "480p", "seconds": 10.0}],
            }
        ],
        "people": {"enrolled": ["a", "b"], "unenrolled": ["c"], "probes": []},
        "gallery": {
            "real_members": 2,
            "real_embeddings": {"norm_mean": 1.4},
            "synthetic_embeddings": {"norm_mean": 1.45},
            "synthetic_min_distance_to_real": 0.7,
            "synthetic_rule": "normal",
            "written": "into the store",
        },
        "stages": {
            "method": "in-process",
            "seconds": 10.0,
            "by_resolution": {
                "480p": {
                    name: timing
                    for name in ("decode", "detect", "landmarks_quality", "encode", "worker_total")
                }
            },
            "match_ms": {
                "10": stats.latency_summary([0.03]),
                "100000": stats.latency_summary([3.2]),
            },
            "breakdown": {
                "480p": {
                    "cell": "local-only @10,000 c1 480p",
                    "end_to_end_p50": 145.0,
                    "parts_p50": {"decode": 2.0, "match": 0.3},
                    "overhead_ms": 3.0,
                }
            },
        },
        "runs": runs,
        "raw_pipeline": [raw_cell(10_000, "480p", 330)],
        "servers": [
            {
                "scenario": "local-only",
                "key": "local-only @10",
                "gallery": 10,
                "peak_rss_mib": 490.0,
                "startup_seconds": 3.0,
                "enrol_seconds": 1.0,
                "workers": 2,
                "status": {"cloud_transactions": [{"name": "detect", "count": "3"}]},
            }
        ],
        "failures": [],
    }
    results["aims"] = stats.aims(results)
    return results


def test_percentiles_are_nearest_rank() -> None:
    samples = list(range(1, 101))
    assert stats.percentile(samples, 50) == 50
    assert stats.percentile(samples, 99) == 99
    assert stats.percentile([5.0], 99) == 5.0
    assert stats.percentile([3.0, 1.0, 2.0], 95) == 3.0  # a latency someone really waited
    assert math.isnan(stats.percentile([], 50))


def test_a_wrong_grant_is_any_grant_but_the_probes_own() -> None:
    assert stats.outcome("GRANTED", "m-a", "m-a") == "correct_grant"
    assert stats.outcome("GRANTED", "m-b", "m-a") == "wrong_grant"
    assert stats.outcome("GRANTED", "m-a", "") == "wrong_grant"  # an unenrolled person let in
    assert stats.outcome("DENIED_UNKNOWN_FACE", "", "m-a") == "false_reject"
    assert stats.outcome("DENIED_UNKNOWN_FACE", "", "") == "correct_reject"
    assert stats.outcome("", "", "m-a") == "error"


def test_a_cell_summary_counts_errors_engines_and_transactions() -> None:
    records = [
        record(100, tx=2, engine="AZURE", reports={"azure": "DECIDED", "local": "AGREED"}),
        record(
            200,
            decision="DENIED_UNKNOWN_FACE",
            expected="",
            tx=1,
            reports={"azure": "TIMED_OUT", "local": "DECIDED"},
        ),
        record(2000, code="DEADLINE_EXCEEDED"),
        record(150, member="m-b"),
    ]
    summary = stats.summarize_cell(records, wall_seconds=2.0)
    assert summary["requests"] == 4
    assert summary["throughput_rps"] == 1.5  # answers: the failed call is not throughput
    assert summary["attempts_rps"] == 2.0
    assert summary["latency_ms"]["max"] == 2000  # errors count: the turnstile waited
    assert summary["errors"] == {"DEADLINE_EXCEEDED": 1}
    assert summary["decisions"] == {
        "azure/GRANTED": 1,
        "local/DENIED_UNKNOWN_FACE": 1,
        "local/GRANTED": 1,
    }
    assert summary["engine_outcomes"]["azure/TIMED_OUT"] == 1
    assert summary["wrong_grants"] == 1
    assert summary["outcomes"]["correct_reject"] == 1
    assert summary["cloud_transactions"] == 3
    assert summary["cloud_transactions_per_entry"] == 0.75
    assert summary["client_overhead_ms"]["p50"] == 2.0


def test_the_verdict_gives_the_margin_both_ways() -> None:
    assert stats.verdict(1100.0, 1200.0) == {
        "pass": True,
        "budget_ms": 1200.0,
        "p99_ms": 1100.0,
        "margin_ms": 100.0,
    }
    failed = stats.verdict(1250.0, 1200.0)
    assert not failed["pass"] and failed["margin_ms"] == -50.0


def test_the_months_cost_counts_free_transactions_and_storage() -> None:
    model = stats.CostModel(members=2_000, visits_per_member=10)
    cost = stats.monthly_cost(2.0, model)  # 20,000 entries, 40,000 transactions
    assert cost["billable_transactions"] == 10_000
    assert cost["transactions_usd"] == pytest.approx(10.0)
    assert cost["storage_usd"] == pytest.approx(0.02)
    assert stats.monthly_cost(0.0, model)["total_usd"] == pytest.approx(0.02)


def test_the_aims_are_judged_from_the_runs() -> None:
    results = canned()
    by_name = {a["aim"].split(" ")[0]: a for a in results["aims"]}
    budget = by_name["p99"]
    assert budget["met"] is False  # the hung cell has a 5 s error and a wrong grant
    assert "1 wrong grants" in budget["measured"]
    local = results["aims"][1]
    assert local["met"] is True and "p50 145 ms" in local["measured"]
    scale = results["aims"][2]
    assert scale["met"] is True and "+3.0 ms" in scale["measured"]
    assert "3.2 ms" in scale["note"]  # matching alone, 0.03 -> 3.2 ms
    throughput = results["aims"][3]
    assert throughput["met"] is True and "1.84x, median of 3 round(s)" in throughput["measured"]
    assert "(1.50-2.00x)" in throughput["measured"]
    assert "load generator 0.03 cores, others 0.05" in throughput["measured"]


def test_the_throughput_aim_is_the_median_of_the_rounds_ratios() -> None:
    w = stats.worker_scaling({"runs": scaling_runs([(12.5, 23.0), (13.0, 26.0), (14.0, 21.0)])})
    assert w is not None
    # Each round pairs its own cells: the best of each side (c2 and c4 for 1 worker).
    assert [r["one"]["concurrency"] for r in w["rounds"]] == [2, 2, 2]
    assert [round(r["ratio"], 2) for r in w["rounds"]] == [1.84, 2.0, 1.5]
    assert w["ratio_median"] == pytest.approx(23.0 / 12.5)
    assert w["ratio_of_medians"] == pytest.approx(23.0 / 13.0)
    cpu = w["cpu_ms_per_answer"]["2"]
    assert cpu["server"] == pytest.approx(4.0) and cpu["workers"] == pytest.approx(60.0)
    # A round with one side missing is no round; a smaller gallery is judged and said.
    runs = scaling_runs([(10.0, 19.0), (10.0, 17.0)], gallery=1_000)
    aim = stats.throughput_aim(
        {"runs": [r for r in runs if r["round"] == 1 or r["workers_setting"] == 1]}
    )
    assert aim["met"] is True and "1.90x, median of 1 round(s)" in aim["measured"]
    assert "not the aims' 10,000" in aim["note"]
    assert stats.throughput_aim({"runs": runs})["met"] is False  # median of 1.9x and 1.7x
    assert stats.throughput_aim({"runs": []})["met"] is None
    # Other processes taking a core: said beside the figure.
    for r in runs:
        r["cpu_seconds"]["others"] = 10.0
    assert (
        "other processes took up to 1.00 of the 2 cores"
        in stats.throughput_aim({"runs": runs})["note"]
    )


def test_aims_not_run_are_not_measured_rather_than_failed() -> None:
    results = canned()
    results["runs"] = [r for r in results["runs"] if r["gallery"] == 10]
    results["raw_pipeline"] = []
    assert [a["met"] for a in stats.aims(results)[1:]] == [None] * 6


def test_local_identify_is_judged_against_the_raw_pipeline_at_the_same_gallery() -> None:
    results = canned()
    aim = results["aims"][-1]
    # FaceGate's p50 145 / raw 335 = 0.43x, p99 150 / raw 339 = 0.44x: both within.
    assert aim["met"] is True and "p50 0.43x" in aim["measured"] and "p99 0.44x" in aim["measured"]
    assert aim["note"] == ""
    results["raw_pipeline"] = [raw_cell(10_000, "480p", 300)]  # p50 145 / 305 = 0.48x
    assert stats.aims(results)[-1]["met"] is False
    # Only a raw cell at another gallery than the local cells: nothing to compare.
    results["raw_pipeline"] = [raw_cell(1_000, "480p", 330)]
    assert stats.aims(results)[-1]["met"] is None
    # The quick mode's 1,000 members: judged there, and the note says so.
    results["raw_pipeline"] = [raw_cell(10, "480p", 400)]
    assert "not the aim's 10,000" in stats.aims(results)[-1]["note"]


def test_check_counts_the_raw_cells_apart_from_the_servers_cells(tmp_path: Path) -> None:
    results = report.clean(canned())
    assert check.errors(results) == []
    results["raw_pipeline"] = []
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert check.main([str(path)]) == 1  # the planned raw cell did not run


def test_the_report_and_the_json_are_well_formed(tmp_path: Path) -> None:
    results = canned()
    json_path, md_path = report.write(results, tmp_path)
    written = json.loads(json_path.read_text())
    assert check.errors(written) == []
    assert check.main([str(json_path)]) == 0
    text = md_path.read_text()
    assert "| local-only @10,000 c1 480p | 100 | 145 |" in text
    assert "FAIL (-100 ms)" in text
    assert "**not met**" in text and "**met**" in text
    assert "overhead 3 ms" in text
    assert "face_recognition (raw) @10,000 c1 480p | 20 | 334 | 339 |" in text
    assert "**0.43x**" in text
    assert "Median of the rounds' ratios **1.84x**" in text
    assert "| 1 | 12.5 (c2) | 23.0 (c4) | 1.84x | 0.02 | 0.05 |" in text
    assert len(report.summary_rows(written)) == len(results["runs"])


def test_check_accepts_a_complete_run_and_refuses_a_broken_one(tmp_path: Path) -> None:
    results = report.clean(canned())
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert check.main([str(path)]) == 0
    del results["runs"][0]["latency_ms"]
    results["failures"].append({"scenario": "x", "error": "did not start"})
    path.write_text(json.dumps(results))
    assert check.main([str(path)]) == 1
    assert any("latency_ms" in e for e in check.errors(results))


def test_the_plots_are_drawn(tmp_path: Path) -> None:
    drawn = plots.draw_all(canned(), tmp_path)
    assert {p.name for p in drawn} == {"latency.png", "latency_vs_gallery.png", "throughput.png"}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in drawn)


def test_the_plans_fit_their_time_and_can_be_narrowed() -> None:
    quick, full = plan.quick_plan(), plan.full_plan()
    assert plan.estimate_seconds(quick) < 120
    assert plan.estimate_seconds(full) < 25 * 60
    assert {s.gallery for s in full} == {10, 1_000, 10_000, 100_000}
    assert {c.concurrency for s in full for c in s.cells} == {1, 2, 4, 8}
    assert {c.resolution for s in full for c in s.cells} == {"480p", "1080p"}
    assert {s.fault for s in full if s.policy == "cloud-first"} == set(plan.FAULTS)
    assert [s.key for s in plan.select(full, ["cloud-first/*"])] == [
        f"cloud-first/{f} @10,000" for f in plan.FAULTS
    ]
    assert [s.key for s in plan.select(full, ["*@100,000"])] == ["local-only @100,000"]
    assert all(c.seconds == 3 for s in plan.with_seconds(quick, 3) for c in s.cells)
    # Both modes time face_recognition itself just before the local-only scenario it is
    # compared to, at the same gallery size.
    for mode in (quick, full):
        assert mode[0].raw and mode[1].name == "local-only" and mode[0].gallery == mode[1].gallery
    # Both measure two workers against one side by side, the servers' order alternating.
    for mode in (quick, full):
        (scaling,) = plan.select(mode, ["worker scaling"])
        assert scaling.side_by_side == (1, 2) and {c.workers for c in scaling.cells} == {1, 2}
    (scaling,) = plan.select(full, ["worker scaling @10,000"])
    order = [c.workers for c in scaling.cells if c.round in (1, 2)]
    assert order == [1, 1, 2, 2, 1, 1]
    assert not plan.select(full, ["local-only, 1 worker"])  # the scaling scenario replaced it


def test_the_admission_aims_are_judged_from_their_cells() -> None:
    results = canned()
    crowd = run(
        "local-only @10,000 c8 480p",
        "local-only",
        10_000,
        8,
        [record(900) for _ in range(40)] + [record(30, code="RESOURCE_EXHAUSTED")] * 5,
    )
    crowd |= stats.admission(
        [record(900)] * 40 + [record(30, code="RESOURCE_EXHAUSTED")] * 5, 1200.0
    )
    assert (crowd["late_answers"], crowd["refused"], crowd["refused_max_ms"]) == (0, 5, 30.0)
    honest = run("local-only @10,000 c1 480p +hostile 6.5/s", "local-only", 10_000, 1, [])
    honest |= {
        **stats.summarize_cell([record(300), record(1300)], 10.0),
        **stats.admission([record(300), record(1300)], 1200.0),
        "hostile_rate": 6.5,
        "hostile": stats.hostile([{"latency_ms": 5.0, "code": "RESOURCE_EXHAUSTED"}]),
    }
    results["runs"] += [crowd, honest]
    by_name = {a["aim"]: a for a in stats.aims(results)}
    assert by_name["8 turnstiles non-stop on 2 cores"]["met"] is True
    beside = by_name["an honest turnstile beside a hostile one within its limits"]
    assert beside["met"] is False and "honest p99 1300 ms" in beside["measured"]
    assert honest["late_answers"] == 1  # 1300 ms > the budget + 50 ms
