"""A database of its own on the real PostgreSQL (127.0.0.1:5432, trust authentication), for
the lease tests; dropped afterwards. Absent PostgreSQL skips with how to run them, and
fails the run under CI (CI=true)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

ADMIN = os.environ.get("FACEGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _absent(why: str) -> None:
    message = (
        f"PostgreSQL is not reachable ({why}): start PostgreSQL 15+ on 127.0.0.1:5432 with"
        " trust authentication for user postgres (or set FACEGATE_TEST_PG to a superuser URL)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def own_database() -> Iterator[str]:
    """The URL of a new, empty database, dropped on the way out."""
    import psycopg

    name = f"facegate_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as error:
        _absent(str(error).strip().splitlines()[0])
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield ADMIN.rsplit("/", 1)[0] + "/" + name
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
