"""Fresh virtual environments for the install tests, made the way a user installs.

A package of the workspace is built from its folder and installed with its dependencies
resolved from the registry, held to the lock's versions (`uv export` of the package's part
of uv.lock, as constraints), so the result does not depend on what uv's cache holds: an
empty cache only means more downloads. (An offline install does not work from a cache that
`uv sync --locked` filled: it holds the wheels, not the index pages a resolve reads.)
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT = 600
"""Seconds for one install: with an empty cache it downloads ~100 MB (the face models)."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run(
    *args: str | Path, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


def find_uv() -> str:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH: cannot make a fresh venv to install into")
    return uv


@dataclass
class Venv:
    uv: str
    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def script(self, name: str) -> Path:
        return self.path / "bin" / name

    def distributions(self) -> set[str]:
        """The canonical names of every distribution installed."""
        listing = run(self.uv, "pip", "list", "--python", self.python, "--format", "json")
        return {canonical(d["name"]) for d in json.loads(listing.stdout)}


def workspace_overrides() -> list[str]:
    """The workspace's `[tool.uv] override-dependencies`, which `uv pip` does not read."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    overrides: list[str] = config["tool"]["uv"].get("override-dependencies", [])
    return overrides


def install_from_workspace(work: Path, package: str, *folders: Path) -> Venv:
    """A fresh venv in `work`/venv holding `folders` (workspace members, built as wheels),
    their dependencies at the lock's versions, and the workspace's overrides applied."""
    uv = find_uv()
    venv = Venv(uv, work / "venv")
    run(uv, "venv", "--quiet", "--python", sys.executable, venv.path)
    pins = work / "constraints.txt"
    run(
        uv, "export", "--frozen", "--offline", "--package", package, "--no-dev",
        "--no-emit-workspace", "--no-hashes", "--format", "requirements-txt",
        "--output-file", pins,
        cwd=ROOT,
    )  # fmt: skip
    overrides = work / "overrides.txt"
    overrides.write_text("".join(f"{line}\n" for line in workspace_overrides()))
    run(
        uv, "pip", "install", "--python", venv.python,
        "--constraints", pins, "--overrides", overrides, *folders,
        cwd=ROOT, timeout=INSTALL_TIMEOUT,
    )  # fmt: skip
    return venv
