"""Start-up warnings (permissions.py) and the modes FaceGate gives the files it creates."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from facegate_server.config import load_settings
from facegate_server.engines.memory import MemoryEngine
from facegate_server.permissions import startup_findings
from facegate_server.rpc import auth
from facegate_server.store import SqliteStore

from tests.helpers import running_server

TOKEN_LINE = f"turnstile gate-1 sha256:{'ab' * 32}\n"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def no_umask() -> Iterator[None]:
    """umask 0: modes are FaceGate's own doing, not the umask's."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_the_data_directory_and_database_are_created_private(
    tmp_path: Path, no_umask: None
) -> None:
    data = tmp_path / "data"
    store = SqliteStore(data / "facegate.sqlite3")
    try:
        store.store_id()  # a write: the -wal and -shm files exist from here
        db = data / "facegate.sqlite3"
        wal, shm = Path(f"{db}-wal"), Path(f"{db}-shm")
        assert wal.exists() and shm.exists()
        assert mode(data) == 0o700
        assert (mode(db), mode(wal), mode(shm)) == (0o600, 0o600, 0o600)
    finally:
        store.close()
    settings = load_settings({}, data_dir=data)
    assert startup_findings(settings, auth.Callers()) == []


def findings(settings_values: dict[str, object], callers: auth.Callers) -> list[tuple[str, str]]:
    settings = load_settings({}, **settings_values)
    return [(f.path, f.fix) for f in startup_findings(settings, callers)]


def callers_of(text: str) -> auth.Callers:
    return auth.build_callers(auth.parse_callers(text, "test"))


def test_a_tokens_file_others_can_read_or_write(tmp_path: Path) -> None:
    tokens = tmp_path / "callers.txt"
    tokens.write_text(TOKEN_LINE)
    values: dict[str, object] = {"tokens_file": tokens, "data_dir": tmp_path / "none"}
    for private in (0o600, 0o400):
        os.chmod(tokens, private)
        assert findings(values, callers_of(TOKEN_LINE)) == []
    for loose in (0o640, 0o604, 0o644, 0o620):
        os.chmod(tokens, loose)
        assert findings(values, callers_of(TOKEN_LINE)) == [(str(tokens), f"chmod 600 {tokens}")]


def test_a_data_directory_others_can_open(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for private in (0o700, 0o750):
        os.chmod(data, private)
        assert findings({"data_dir": data}, auth.Callers()) == []
    for loose in (0o755, 0o701, 0o704):
        os.chmod(data, loose)
        assert findings({"data_dir": data}, auth.Callers()) == [(str(data), f"chmod 700 {data}")]


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_database_files_group_or_others_can_read(tmp_path: Path, suffix: str) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    path = Path(f"{data / 'facegate.sqlite3'}{suffix}")
    path.write_bytes(b"")
    os.chmod(path, 0o600)
    assert findings({"data_dir": data}, auth.Callers()) == []
    for loose in (0o640, 0o604, 0o660):
        os.chmod(path, loose)
        assert findings({"data_dir": data}, auth.Callers()) == [(str(path), f"chmod 600 {path}")]


def test_tokens_in_clear_text_beyond_loopback(tmp_path: Path) -> None:
    callers = callers_of(TOKEN_LINE)
    far = {"listen": "0.0.0.0:50051", "data_dir": tmp_path}
    [(where, fix)] = findings(far, callers)
    assert where == "0.0.0.0:50051" and "FACEGATE_TLS_CERT" in fix
    assert findings({**far, "listen": "[::]:50051"}, callers) != []
    assert findings({**far, "listen": "127.0.0.1:50051"}, callers) == []  # loopback
    assert findings({**far, "listen": "unix:/run/facegate.sock"}, callers) == []
    assert findings({**far, "tls_cert": tmp_path / "c.pem"}, callers) == []  # TLS
    # Certificate callers only: no bearer token to leak (mutual TLS needs a certificate).
    certificate_only = callers_of("admin ops cert:ops\n")
    assert findings(far, certificate_only) == []


def test_serving_logs_each_warning_with_path_and_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    tokens = tmp_path / "callers.txt"
    tokens.write_text(TOKEN_LINE)
    os.chmod(tokens, 0o644)
    caplog.set_level(logging.WARNING, logger="facegate_server.app")
    with running_server(data, engine=MemoryEngine(), tokens_file=tokens):
        pass
    warnings = {
        r.path: (r.getMessage(), r.fix)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "facegate_server.app" and r.levelno == logging.WARNING
    }
    assert warnings == {
        str(tokens): (
            "the tokens file is readable or writable by other users",
            f"chmod 600 {tokens}",
        ),
        str(data): ("the data directory is open to other users", f"chmod 700 {data}"),
    }
