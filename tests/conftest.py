"""Shared fixtures: the test photographs, and real servers on port 0."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc

from tests.helpers import running_server
from tests.pg import private  # noqa: F401  (the fixture: a PostgreSQL server of the test's own)

ROOT = Path(__file__).resolve().parent.parent
# The photographs live beside the checkout; FACEGATE_TEST_FACES points elsewhere (or at
# nothing, to see the suite skip what needs them).
FACES = Path(os.environ.get("FACEGATE_TEST_FACES", ROOT.parent / "shared" / "faces"))


@dataclass(frozen=True)
class Faces:
    root: Path
    rows: list[dict[str, str]]

    def read(self, relative: str) -> bytes:
        return (self.root / relative).read_bytes()

    def of(self, person: str) -> list[str]:
        """Paths of the one-face photos of `person`, in manifest order."""
        return [r["path"] for r in self.rows if r["path"].startswith(f"people/{person}/")]


@pytest.fixture(scope="session")
def faces() -> Faces:
    manifest = FACES / "manifest.csv"
    if not manifest.exists():
        pytest.skip(f"the test photographs are not here ({FACES}): see the README's Tests section")
    with manifest.open(newline="") as f:
        return Faces(FACES, list(csv.DictReader(f)))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real FaceGate server (local engine, SQLite, 2 workers) on a free loopback port."""
    with running_server(tmp_path_factory.mktemp("facegate-data"), workers=2) as built:
        yield built


@pytest.fixture(scope="module")
def target(server: object) -> str:
    return f"127.0.0.1:{server.port}"  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def stub(target: str) -> Iterator[pb_grpc.FaceGateServiceStub]:
    with grpc.insecure_channel(
        target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as channel:
        yield pb_grpc.FaceGateServiceStub(channel)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of this test session's own on the shared PostgreSQL (tests/pg.py),
    dropped at the end; skips (fails under CI) where there is no PostgreSQL."""
    from tests import pg

    with pg.database() as url:
        yield url
