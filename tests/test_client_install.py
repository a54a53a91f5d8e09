"""facegate-client installs and runs with grpcio, protobuf and grpcio-status only.

A turnstile installs the client alone: no numpy, dlib, face_recognition, Pillow or Azure
SDK. This builds the package from clients/ into a fresh venv, its dependencies from the
registry at the lock's versions (tests/installs.py: whatever uv's cache holds), and runs
it there.
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from packaging.requirements import Requirement

from tests.installs import INSTALL_TIMEOUT, ROOT, Venv, canonical, install_from_workspace, run

pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT + 60)

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


def test_client_depends_on_grpc_and_protobuf_only() -> None:
    project = tomllib.loads((CLIENTS / "pyproject.toml").read_text())["project"]
    names = {canonical(Requirement(dep).name) for dep in project["dependencies"]}
    assert names == {"grpcio", "protobuf", "grpcio-status"}


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Venv]:
    work = tmp_path_factory.mktemp("client-install")
    try:
        yield install_from_workspace(work, "facegate-client", CLIENTS)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_installed_distributions_are_light(client_venv: Venv) -> None:
    names = client_venv.distributions()
    assert {"facegate-client", "grpcio", "protobuf", "grpcio-status"} <= names
    assert not names & HEAVY
    assert not [n for n in names if n.startswith("azure")]
    # Every requirement of every installed distribution is met: nothing else is needed.
    run(client_venv.uv, "pip", "check", "--python", client_venv.python)


def test_client_imports_and_runs(client_venv: Venv) -> None:
    run(client_venv.python, "-c", "import facegate_client, facegate.v1.facegate_service_pb2")
    help_text = run(client_venv.script("facegate"), "--help").stdout
    assert "facegate-server package" in help_text


def test_client_commands_work_without_the_server_package(client_venv: Venv) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    server.stop(grace=None).wait()  # nothing listens on `port` now
    facegate = client_venv.script("facegate")
    args = ["members", "list", "--target", f"127.0.0.1:{port}", "--timeout", "2"]
    result = subprocess.run([facegate, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error: UNAVAILABLE: ")

    result = subprocess.run([facegate, "serve"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid choice: 'serve'" in result.stderr
