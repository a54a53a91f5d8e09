"""The committed generated code is what scripts/gen_protos.py makes from protos/ now."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "clients" / "src"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = generator
    try:
        spec.loader.exec_module(generator)
        fresh = generator.generate(tmp_path)
    finally:
        del sys.modules["gen_protos"]
    assert fresh, "the generator wrote nothing"
    for path in fresh:
        committed = COMMITTED / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run scripts/gen_protos.py"
        assert committed.read_text() == path.read_text(), (
            f"{committed.relative_to(ROOT)} is stale: run `uv run python scripts/gen_protos.py`"
        )
    generated = {p.relative_to(COMMITTED) for p in COMMITTED.rglob("*_pb2*.py*")}
    assert generated == {p.relative_to(tmp_path) for p in fresh}, "stray generated files"
