"""facegate-server installs alone, as on a gym's server: no Face API emulator (aiohttp) and
no plotting for `facegate evaluate` (matplotlib) come with it.

The venv holds the server and the client it depends on, both built from the workspace,
their dependencies from the registry at the lock's versions, with the workspace's dlib
override (tests/installs.py). One venv serves the whole module: with an empty uv cache
making it downloads ~100 MB (face_recognition_models) and takes about 20 s.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from facegate_server.commands.evaluate import NO_MATPLOTLIB

from tests.installs import INSTALL_TIMEOUT, ROOT, Venv, install_from_workspace, run

pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT + 60)


@pytest.fixture(scope="module")
def server_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Venv]:
    work = tmp_path_factory.mktemp("server-install")
    try:
        yield install_from_workspace(work, "facegate-server", ROOT / "clients", ROOT / "server")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_neither_the_emulator_nor_matplotlib_comes_with_the_server(server_venv: Venv) -> None:
    names = server_venv.distributions()
    assert {"facegate-server", "facegate-client", "dlib-bin", "face-recognition"} <= names
    assert not names & {"aiohttp", "matplotlib", "facegate-azure-emulator"}
    assert "dlib" not in names  # the override: dlib-bin is the same dlib, as a wheel
    # Every requirement of every installed distribution is met but face_recognition's
    # `dlib`, the one the override removes.
    check = subprocess.run(
        [server_venv.uv, "pip", "check", "--python", server_venv.python],
        capture_output=True,
        text=True,
        timeout=60,
    )
    unmet = [line for line in (check.stdout + check.stderr).splitlines() if "requires" in line]
    assert len(unmet) == 1 and "`dlib" in unmet[0], check.stdout + check.stderr


def test_facegate_lists_the_server_commands_but_not_the_emulator(server_venv: Venv) -> None:
    help_text = run(server_venv.script("facegate"), "--help").stdout
    commands = set(re.findall(r"^ {4}([a-z][a-z-]*)", help_text, re.MULTILINE))
    assert {"serve", "token", "evaluate", "config", "identify"} <= commands
    assert "azure-emulator" not in commands
    run(server_venv.python, "-c", "import facegate_server.app")  # the whole server loads
    assert run(server_venv.script("facegate"), "serve", "--help").stdout.startswith(
        "usage: facegate serve"
    )


def test_evaluate_without_its_extra_says_what_to_install(server_venv: Venv, tmp_path: Path) -> None:
    (tmp_path / "kim").mkdir()
    for name in ("1.jpg", "2.jpg"):
        (tmp_path / "kim" / name).write_bytes(b"")
    result = subprocess.run(
        [server_venv.script("facegate"), "evaluate", tmp_path, "--target", "127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == NO_MATPLOTLIB + "\n"  # one line, no traceback
