"""PostgreSQL for tests: a database of their own on the shared server, or a server of
their own (for the tests that stop or kill it).

The shared server is FACEGATE_TEST_POSTGRES (default postgresql://postgres@127.0.0.1:5432/
postgres, trust authentication): each test session creates its own database there
(`facegate_test_<random>`) and drops it at the end. Where no PostgreSQL answers, the tests
skip and say how to run them; under CI (CI=true) they fail instead.

A private server (`PrivateServer`) is made with initdb and pg_ctl (on PATH) in a
temporary folder, on a free port; initdb refuses to run as root, so as root it runs them
as the `postgres` user (runuser).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ADMIN_URL = os.environ.get(
    "FACEGATE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
HOW = (
    "PostgreSQL is not reachable at {url} ({error}); start PostgreSQL 15 there with trust "
    "authentication for user postgres, or point FACEGATE_TEST_POSTGRES at a server where "
    "the tests may create databases"
)


def unavailable(reason: str) -> None:
    """Skip, or fail under CI (CI=true), where PostgreSQL is missing."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


def _admin(url: str = ADMIN_URL):  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(url, autocommit=True, connect_timeout=3)


def _with_db(url: str, name: str) -> str:
    """`url` (a postgresql:// URL) naming database `name` instead."""
    return urlsplit(url)._replace(path=f"/{name}").geturl()


def create_database(url: str = ADMIN_URL) -> str:
    """A new empty database on the server at `url`; its URL. Skips (fails in CI) when
    the server does not answer."""
    import psycopg

    name = f"facegate_test_{secrets.token_hex(6)}"
    try:
        with _admin(url) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as error:
        unavailable(HOW.format(url=url, error=str(error).strip().splitlines()[0]))
    return _with_db(url, name)


def drop_database(db_url: str, url: str = ADMIN_URL) -> None:
    import psycopg

    name = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]
    assert name and name.startswith("facegate_test_")
    with _admin(url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def database(url: str = ADMIN_URL) -> Iterator[str]:
    made = create_database(url)
    try:
        yield made
    finally:
        drop_database(made, url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateServer:
    """A PostgreSQL server of the test's own, in a temporary folder, on a free port."""

    def __init__(self) -> None:
        if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
            unavailable("initdb and pg_ctl are not on PATH (install PostgreSQL's server)")
        self.root = Path(tempfile.mkdtemp(prefix="facegate-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            ["initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        )
        self.start()

    def _run(self, command: list[str]) -> None:
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            [
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.root / "log"),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ]
        )

    def stop(self, mode: str = "immediate") -> None:
        """Stop it (`immediate`: as if killed, no shutdown checkpoint)."""
        self._run(["pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop"])

    def close(self) -> None:
        with suppress(RuntimeError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def wait_for(check, timeout: float = 20.0, interval: float = 0.02) -> float:  # type: ignore[no-untyped-def]
    """Poll `check()` until it is true; the seconds it took (AssertionError on timeout)."""
    started = time.monotonic()
    while True:
        if check():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true after {timeout} s")
        time.sleep(interval)


@pytest.fixture
def private() -> Iterator[PrivateServer]:
    """A PostgreSQL server of the test's own, for tests that stop or kill it."""
    server = PrivateServer()
    try:
        yield server
    finally:
        server.close()
