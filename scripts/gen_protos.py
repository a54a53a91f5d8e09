"""Regenerate the committed Python code for protos/ (the one generator).

    uv run python scripts/gen_protos.py            # writes clients/src/facegate/v1/
    uv run python scripts/gen_protos.py --out DIR  # writes DIR/facegate/v1/ (the staleness test)

Message code (`_pb2.py`), gRPC stubs (`_pb2_grpc.py`) and typed stubs for both (`.pyi`,
by mypy-protobuf) are produced by grpcio-tools' bundled protoc.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
DEFAULT_OUT = ROOT / "clients" / "src"


def generate(out: Path) -> list[Path]:
    """Generate code for every .proto under protos/ into `out`; return the files written."""
    sources = sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))
    plugin_dir = Path(sys.executable).parent
    mypy_plugin = shutil.which("protoc-gen-mypy", path=str(plugin_dir)) or shutil.which(
        "protoc-gen-mypy"
    )
    mypy_grpc_plugin = shutil.which("protoc-gen-mypy_grpc", path=str(plugin_dir)) or shutil.which(
        "protoc-gen-mypy_grpc"
    )
    if not (mypy_plugin and mypy_grpc_plugin):
        raise SystemExit("mypy-protobuf is not installed: run `uv sync` first")
    well_known = resources.files("grpc_tools") / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={mypy_plugin}",
        f"--plugin=protoc-gen-mypy_grpc={mypy_grpc_plugin}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for package in {Path(s).parent for s in sources}:
        pkg_dir = out / package
        for parent in [pkg_dir, *pkg_dir.relative_to(out).parents]:
            init = out / parent / "__init__.py"
            if parent != Path(".") and not init.exists():
                init.write_text("")
        written += sorted(pkg_dir.glob("*_pb2*.py*"))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root")
    for path in generate(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
