"""Starting a chain server wrongly: what an operator sees (issue 16's review).

- A store URL FaceGate cannot use is one line naming the setting, never the password;
  `facegate config check` masks the password only.
- A database that is not FaceGate's (another application's tables, another application's
  `schema_version`), or a role that may not create tables, stops the start with one line
  and exit 2, and leaves nothing behind.
- A server that has never reached its store has no gallery: NOT_SERVING and Identify
  refused (UNAVAILABLE), not every member denied as a stranger; SERVING once it has a
  copy. A store that cannot be reached for good (no such database) stops the start.
- One server a data dir; a chain's data dir is not served without --store.
- The store's errors are one line and say what waits for it.

Real PostgreSQL (tests/pg.py): a database of the test's own, or a server of its own.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from facegate_server.config import SettingsError, load_settings, mask_url
from facegate_server.datadir import (
    COPY_FILE,
    DB_FILE,
    DataDirLock,
    DataDirRefused,
    check_kind,
)
from facegate_server.engines.memory import MemoryEngine
from facegate_server.errors import StoreUnavailable
from facegate_server.store.postgres import SCHEMA_VERSION, PostgresStore, StoreSchemaError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import pg
from tests.helpers import FACEGATE, details, image_bytes, running_server

SECRET = "S3cr%ZZet"
EVENTUALLY = 30.0


@pytest.fixture
def url() -> Iterator[str]:
    with pg.database() as made:
        yield made


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        ).fetchall()
    return {str(r[0]) for r in rows}


def serve(data: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """`facegate serve` that is expected to refuse to start (a timeout fails the test)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEGATE_")}
    return subprocess.run(
        [FACEGATE, "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data), *flags],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "FACEGATE_WORKERS": "1"},
        check=False,
    )


def refused_in_one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stdout
    return lines[0]


# A. The store URL.
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (f"postgresql://postgres:{SECRET}@127.0.0.1:5432/db", "the password has a '%'"),
        ("postgresql://", "names no host"),
        ("postgresql:///gym", "names no host"),
        ("postgresql://127.0.0.1:5432", "names no database"),
        (f"postgresql://u:{SECRET.replace('%', '%25')}@h:99999/db", "not a port number"),
        ("postgresql://u:pa ss@h/db", "not a valid PostgreSQL URL"),
    ],
)
def test_a_store_url_is_checked_and_named_by_its_source_never_quoted(
    tmp_path: Path, value: str, problem: str
) -> None:
    for env, overrides, name in (
        ({"FACEGATE_STORE": value}, {}, "FACEGATE_STORE: "),
        ({}, {"store": value}, "--store: "),
    ):
        with pytest.raises(SettingsError) as raised:
            load_settings(env, flags=True, **overrides)
        message = str(raised.value)
        assert message.startswith(name) and problem in message
        assert "S3cr" not in message and "pa ss" not in message and "\n" not in message
    as_file = tmp_path / "store-url"
    as_file.write_text(value + "\n")
    with pytest.raises(SettingsError, match=r"^FACEGATE_STORE_FILE: ") as raised:
        load_settings({"FACEGATE_STORE_FILE": str(as_file)})
    assert "S3cr" not in str(raised.value)


def test_good_store_urls_pass_and_show_all_but_the_password() -> None:
    for good in (
        "postgresql://facegate@db.gym.lan:5432/gym",
        "postgres://facegate:p%40ss@10.0.0.5/gym?sslmode=require",
        "postgresql://facegate@/gym?host=/var/run/postgresql",
        "postgresql://facegate@db1:5432,db2:5432/gym?target_session_attrs=read-write",
    ):
        assert load_settings({}, store=good).store == good
    assert (
        mask_url("postgresql://facegate:se:cr@t@db:5432/gym?password=x&sslmode=require")
        == "postgresql://facegate:********@t@db:5432/gym?password=********&sslmode=require"
    )
    assert mask_url("postgresql://facegate@db:5432/gym") == "postgresql://facegate@db:5432/gym"


def test_config_check_refuses_a_bad_url_and_masks_only_the_password(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from facegate_client.cli import main

    for name in [n for n in os.environ if n.startswith("FACEGATE_")]:
        monkeypatch.delenv(name)
    bad = f"postgresql://postgres:{SECRET}@127.0.0.1:5432/db"
    assert main(["config", "check", "--store", bad]) == 2
    out = capsys.readouterr().out
    assert out.startswith("error: --store: the password has a '%'") and SECRET not in out
    good = "postgresql://postgres:S3cr%25et@127.0.0.1:5432/gym"
    assert main(["config", "check", "--store", good]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("store "))
    assert "postgresql://postgres:********@127.0.0.1:5432/gym" in row and "S3cr" not in row
    assert row.split()[-1] == "flag"


# B. A database that is not FaceGate's, or a role without rights.
def test_another_applications_tables_are_refused_and_nothing_is_left(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE members (id int)")
    with pytest.raises(StoreSchemaError) as refused:
        PostgresStore(url)
    message = str(refused.value)
    assert "holds tables (members) but no FaceGate schema version" in message
    assert "not FaceGate's database" in message and "\n" not in message
    assert tables(url) == {"members"}


def test_an_extensions_relations_are_not_another_applications(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            conn.execute("CREATE EXTENSION pg_stat_statements")  # views in public
        except psycopg.errors.UndefinedFile:
            pytest.skip("pg_stat_statements is not installed (PostgreSQL's contrib)")
        views = conn.execute("SELECT count(*) FROM pg_views WHERE schemaname = 'public'")
        assert views.fetchone() != (0,)
    PostgresStore(url).close()
    assert {"schema_version", "members"} <= tables(url)


def test_a_clash_half_way_through_leaves_nothing_behind(url: str) -> None:
    """FaceGate's database at version 1 where another application made an index of a name
    migration 2 creates last: refused, and migration 2's first statements are undone."""
    PostgresStore(url).close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE member_changes")
        conn.execute("ALTER TABLE access_events DROP COLUMN origin_server, DROP COLUMN origin_seq")
        conn.execute("UPDATE schema_version SET version = 1")
        conn.execute("CREATE TABLE other (x int)")
        conn.execute("CREATE INDEX events_by_origin ON other (x)")
    with pytest.raises(StoreSchemaError, match="already exists: it is not FaceGate's"):
        PostgresStore(url)
    assert "member_changes" not in tables(url)
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (1,)
        columns = conn.execute(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_name = 'access_events' AND column_name = 'origin_server'"
        ).fetchone()
    assert columns == (0,)


def test_another_applications_schema_version_is_not_taken_for_a_newer_facegate(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version text)")
        conn.execute("INSERT INTO schema_version VALUES ('3')")
    with pytest.raises(StoreSchemaError) as refused:
        PostgresStore(url)
    assert "has a schema_version table that is not FaceGate's" in str(refused.value)
    assert "upgrade FaceGate" not in str(refused.value)
    assert tables(url) == {"schema_version"}


def test_facegates_own_databases_are_still_recognised(url: str) -> None:
    """Made before the version table had FaceGate's mark; a version 0 an older FaceGate
    left behind when its first migration failed; a newer FaceGate's."""
    PostgresStore(url).close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("COMMENT ON TABLE schema_version IS NULL")
    store = PostgresStore(url)
    assert store.schema_version() == SCHEMA_VERSION and store.store_id()
    store.close()
    with pg.database() as empty:
        with psycopg.connect(empty, autocommit=True) as conn:
            conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
            conn.execute("INSERT INTO schema_version VALUES (0)")
        store = PostgresStore(empty)
        assert store.schema_version() == SCHEMA_VERSION
        store.close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreSchemaError, match=r"newer than this FaceGate's .*: upgrade FaceGate"):
        PostgresStore(url)


def test_a_role_that_may_not_create_tables_is_told_how_to_fix_it(url: str) -> None:
    role = f"facegate_test_{secrets.token_hex(4)}"
    with psycopg.connect(pg.ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        as_role = psycopg.conninfo.make_conninfo(url, user=role)
        with pytest.raises(StoreSchemaError) as refused:
            PostgresStore(as_role)
        message = str(refused.value)
        assert "permission denied for schema public" in message
        assert "createdb -O ROLE DATABASE" in message and "\n" not in message
        assert tables(url) == set()
    finally:
        with psycopg.connect(pg.ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_serve_refuses_another_applications_database_in_one_line(tmp_path: Path, url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE members (id int)")
    line = refused_in_one_line(serve(tmp_path / "data", "--store", url))
    assert "not FaceGate's database" in line
    assert tables(url) == {"members"}
    assert not (tmp_path / "data" / COPY_FILE).exists()


# C. No local copy yet.
def test_a_database_that_does_not_exist_stops_the_first_start(tmp_path: Path) -> None:
    missing = pg._with_db(pg.ADMIN_URL, f"facegate_test_{secrets.token_hex(6)}")
    line = refused_in_one_line(serve(tmp_path / "data", "--store", missing))
    assert "does not exist: create it, owned by FaceGate's role" in line
    assert "no local copy of the gallery yet" in line
    assert not (tmp_path / "data" / COPY_FILE).exists()


def test_a_server_that_never_reached_its_store_does_not_decide_until_it_has(
    tmp_path: Path, private: pg.PrivateServer
) -> None:
    url = pg.create_database(private.url)
    with psycopg.connect(url) as conn:
        conn.execute("SELECT 1")
    private.stop("immediate")
    engine = MemoryEngine()
    with (
        running_server(tmp_path / "data", engine=engine, store=url) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.FaceGateServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def main_health() -> int:
            request = health_pb2.HealthCheckRequest(service="facegate.v1.FaceGateService")
            return int(health.Check(request, timeout=5).status)

        assert main_health() == health_pb2.HealthCheckResponse.NOT_SERVING
        request = pb.IdentifyRequest(image=image_bytes(41, 40, "PNG"), turnstile_id="gate-1")
        with pytest.raises(grpc.RpcError) as refused:
            stub.Identify(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert details(refused.value)[0] == "NO_GALLERY_COPY"
        message = refused.value.details() or ""
        assert f"never reached its store postgresql://127.0.0.1:{private.port}/" in message
        assert "no local copy of the gallery" in message
        with pytest.raises(grpc.RpcError) as refused:
            stub.Verify(
                pb.VerifyRequest(member_id="m-1", image=request.image, turnstile_id="gate-1"),
                timeout=10,
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        private.start()
        pg.wait_for(lambda: main_health() == health_pb2.HealthCheckResponse.SERVING, EVENTUALLY)
        answer = stub.Identify(request, timeout=10)
        assert answer.decision == pb.Decision.DECISION_DENIED_UNKNOWN_FACE


# D. The data dir.
def test_one_server_a_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    held = DataDirLock(data)
    try:
        with pytest.raises(
            DataDirRefused, match=f"in use by another facegate serve \\(pid {os.getpid()}\\)"
        ):
            DataDirLock(data)
        line = refused_in_one_line(serve(data))
        assert f"(pid {os.getpid()})" in line and "a data dir of its own" in line
    finally:
        held.release()
    DataDirLock(data).release()  # free again


def test_a_chain_data_dir_is_not_served_without_its_store(tmp_path: Path) -> None:
    import sqlite3

    from facegate_server.store import replica

    assert COPY_FILE == replica.COPY_FILE
    data = tmp_path / "data"
    data.mkdir()
    sqlite3.connect(data / COPY_FILE).close()
    with pytest.raises(DataDirRefused, match="chain server's"):
        check_kind(data, chain=False)
    line = refused_in_one_line(serve(data))
    assert "start it with --store" in line
    assert not (data / DB_FILE).exists()
    backup = subprocess.run(
        [FACEGATE, "backup", str(tmp_path / "b.sqlite3"), "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert backup.returncode == 2 and "pg_dump" in backup.stdout
    assert not (tmp_path / "b.sqlite3").exists()
    # A server of its own with members, started with --store: a warning.
    from facegate_server.store import SqliteStore

    own = tmp_path / "own"
    store = SqliteStore(own / DB_FILE)
    from datetime import UTC, datetime

    import numpy as np
    from facegate_server.domain import FaceTemplate

    store.create_member("m-1", "M", [FaceTemplate(np.zeros(128))], datetime.now(UTC))
    store.close()
    assert "1 members" in check_kind(own, chain=True)
    assert check_kind(own, chain=False) == ""


# E. Messages.
def test_the_stores_errors_are_one_line_and_say_what_waits() -> None:
    error = StoreUnavailable(
        "postgresql://db:5432/gym",
        "connection refused\n\tIs the server running on that host?",
    )
    assert "\n" not in error.message and "\t" not in error.message
    assert "members cannot be changed" not in error.message
    assert "this cannot be done until it is back" in error.message

    from facegate_client.cli import format_store

    store = pb.StoreStatus(
        name="postgresql://db:5432/gym",
        state="disconnected",
        last_error="connection refused\n\tIs the server running on that host?",
    )
    assert "\n" not in format_store(store)


def test_status_says_what_it_cannot_read_while_the_store_is_away() -> None:
    """The outbox and the access log are in PostgreSQL: while it is unreachable, status
    says their figures are unknown rather than `outbox depth: 0` and `oldest -`."""
    from facegate_client.cli import format_status

    away = pb.GetStatusResponse(
        store=pb.StoreStatus(kind="postgresql", name="postgresql://db/gym", state="disconnected"),
        shared_figures_unknown=True,
    )
    text = format_status(away)
    assert "outbox depth: unknown (the store is unreachable)" in text
    assert "access events: oldest unknown (the store is unreachable)" in text
    away.shared_figures_unknown = False  # read, just before the store went away
    text = format_status(away)
    assert "outbox depth: 0" in text and "access events: oldest -" in text


def test_the_cloud_persons_trigger_works_whatever_the_sessions_search_path(url: str) -> None:
    """The version trigger names its table without a schema: it carries FaceGate's own
    search_path, so a session with another one (pg_dump's data-only restore sets an empty
    one) can still write cloud_persons."""
    PostgresStore(url).close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET search_path = ''")
        conn.execute("INSERT INTO public.cloud_persons (person_id, member_id) VALUES ('p', 'm')")
        row = conn.execute("SELECT version FROM public.cloud_persons_version").fetchone()
    assert row is not None and row[0] >= 1
