"""facegate-client installs and runs with grpcio, protobuf and grpcio-status only.

A turnstile installs the client alone: no numpy, dlib, face_recognition, Pillow or Azure
SDK. This builds the package from clients/ into a fresh venv, offline from uv's cache,
and runs it there.

Why `--no-deps` with versions exported from uv.lock: the workspace was synced from the
lock, so uv's cache holds every wheel the client needs, but the resolver of `uv pip
install --offline` also wants each chosen wheel's metadata in the cache, and after a
lock-driven sync it is cached for the lock's first-listed wheel only (for grpcio and
protobuf, another platform's). So the dependency versions come from the lock and
`uv pip check` proves that they are all the client needs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ROOT / "clients"
HEAVY = {
    "numpy",
    "dlib",
    "dlib-bin",
    "face-recognition",
    "face-recognition-models",
    "pillow",
    "matplotlib",  # facegate evaluate's plot: a server command
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


def test_client_depends_on_grpc_and_protobuf_only() -> None:
    project = tomllib.loads((CLIENTS / "pyproject.toml").read_text())["project"]
    names = {canonical(Requirement(dep).name) for dep in project["dependencies"]}
    assert names == {"grpcio", "protobuf", "grpcio-status"}


@dataclass
class Venv:
    uv: str
    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Venv]:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH: cannot make a fresh venv to install facegate-client in")
    work = tmp_path_factory.mktemp("client-install")
    venv = Venv(uv, work / "venv")
    try:
        run(uv, "venv", "--quiet", "--python", sys.executable, venv.path)
        pins = work / "requirements.txt"
        run(
            uv, "export", "--frozen", "--offline", "--package", "facegate-client", "--no-dev",
            "--no-emit-project", "--no-hashes", "--format", "requirements-txt",
            "--output-file", pins,
            cwd=ROOT,
        )  # fmt: skip
        run(
            uv, "pip", "install", "--offline", "--no-deps", "--python", venv.python,
            "-r", pins, CLIENTS,
        )  # fmt: skip
        yield venv
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_installed_distributions_are_light(client_venv: Venv) -> None:
    listing = run(client_venv.uv, "pip", "list", "--python", client_venv.python, "--format", "json")
    names = {canonical(d["name"]) for d in json.loads(listing.stdout)}
    assert {"facegate-client", "grpcio", "protobuf", "grpcio-status"} <= names
    assert not names & HEAVY
    assert not [n for n in names if n.startswith("azure")]
    # Every requirement of every installed distribution is met: nothing else is needed.
    run(client_venv.uv, "pip", "check", "--python", client_venv.python)


def test_client_imports_and_runs(client_venv: Venv) -> None:
    run(client_venv.python, "-c", "import facegate_client, facegate.v1.facegate_service_pb2")
    help_text = run(client_venv.path / "bin" / "facegate", "--help").stdout
    assert "facegate-server package" in help_text


def test_client_commands_work_without_the_server_package(client_venv: Venv) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    server.stop(grace=None).wait()  # nothing listens on `port` now
    facegate = client_venv.path / "bin" / "facegate"
    args = ["members", "list", "--target", f"127.0.0.1:{port}", "--timeout", "2"]
    result = subprocess.run([facegate, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error: UNAVAILABLE: ")

    result = subprocess.run([facegate, "serve"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid choice: 'serve'" in result.stderr
