"""Check that a results.json is well-formed (its shape, not its figures): what CI runs after
the quick mode.

    uv run python -m benchmarks.suite.check benchmarks/results/ci/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]

SCHEMA = Path(__file__).with_name("results.schema.json")


def errors(results: Any) -> list[str]:
    """Every way `results` breaks the schema (empty when it is well-formed)."""
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
        for e in sorted(validator.iter_errors(results), key=lambda e: list(e.absolute_path))
    ]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks.suite.check RESULTS_JSON", file=sys.stderr)
        return 2
    path = Path(args[0])
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        print(f"{path}: {error}", file=sys.stderr)
        return 1
    found = errors(results)
    if not found:
        # Every planned cell ran: a scenario that could not run is a broken benchmark.
        # The raw face_recognition scenario's cells go to raw_pipeline, the others' to runs.
        raw = sum(len(s["cells"]) for s in results["plan"] if s["policy"] == "raw")
        planned = sum(len(s["cells"]) for s in results["plan"] if s["policy"] != "raw")
        found += [f"failures: {f['scenario']}: {f['error']}" for f in results["failures"]]
        if len(results["runs"]) != planned:
            found.append(f"runs: {len(results['runs'])} cells ran of {planned} planned")
        if len(results["raw_pipeline"]) != raw:
            found.append(f"raw_pipeline: {len(results['raw_pipeline'])} cells ran of {raw} planned")
    for line in found[:50]:
        print(f"{path}: {line}", file=sys.stderr)
    if found:
        return 1
    print(f"{path}: well-formed ({len(results['runs'])} cells, {len(results['aims'])} aims)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
