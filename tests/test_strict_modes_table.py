"""benchmarks/strict_modes.py's percentile and table on canned results (the benchmark
itself is `python -m benchmarks.strict_modes`, see benchmarks/README.md)."""

from __future__ import annotations

from benchmarks.strict_modes import Result, percentile, table


def result(mode: str, p99: float, verdict: bool, why: str = "") -> Result:
    return Result(
        mode=mode,
        calls=40,
        p50_ms=80.4,
        p99_ms=p99,
        max_ms=p99,
        correct=40,
        errors=0,
        engines={"local": 38, "azure": 2},
        cloud_outcomes={},
        transactions_per_entry=0.05,
        emulator_transactions=2,
        emulator_calls={},
        settled=False,
        readiness="checking",
        verdict=verdict,
        why=why,
    )


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([5.0, 1.0], 99) == 5
    assert percentile([7.0], 99) == 7


def test_table_has_a_row_a_mode_with_its_verdict() -> None:
    text = table([result("S0", 356.2, True), result("F0", 1300, False, "p99 1300 ms > 1200 ms")])
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[2] == (
        "| S0 | 40 | 80 | 356 | 356 | 40/40 | azure 2, local 38 | 0.05 | 2 | no | pass |"
    )
    assert lines[3].endswith("| FAIL (p99 1300 ms > 1200 ms) |")
