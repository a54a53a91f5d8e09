"""Operations on the SQLite store: deleting a member while another process reads the
database, backups taken while serving and restored elsewhere, retention of the access log."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate_client import FaceGateClient
from facegate_client.cli import format_status
from facegate_server.engines.memory import MemoryEngine
from facegate_server.store.backup import BackupError, backup, describe, restore

from tests.conftest import Faces
from tests.helpers import FACEGATE, image_bytes, running_server

GRANTED = pb.Decision.DECISION_GRANTED

READER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN")
print(db.execute("SELECT COUNT(*) FROM faces").fetchone()[0], flush=True)
sys.stdin.readline()
db.execute("COMMIT")
db.close()
"""


@contextmanager
def reader(db: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding a read transaction on `db` until the block ends."""
    process = subprocess.Popen(
        [sys.executable, "-c", READER, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdin is not None
    try:
        assert int(process.stdout.readline()) >= 1
        yield process
    finally:
        if process.poll() is None:
            process.stdin.write("\n")
            process.stdin.close()
            process.wait(timeout=30)
        process.stdout.close()


CAT = """
import pathlib, sys
files = sorted(pathlib.Path(sys.argv[1]).glob("facegate.sqlite3*"))
sys.stdout.buffer.write(b"".join(p.read_bytes() for p in files))
"""


def stored(data: Path) -> bytes:
    """The raw bytes of the live database files (.sqlite3, -wal, -shm), read by another
    process: closing a descriptor of them here would drop the server's POSIX locks."""
    return subprocess.run(
        [sys.executable, "-c", CAT, str(data)], capture_output=True, check=True, timeout=60
    ).stdout


def wait_for(condition: object, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_delete_under_a_reader_neither_stalls_nor_leaves_the_member(tmp_path: Path) -> None:
    data = tmp_path / "data"
    db_path = data / "facegate.sqlite3"
    name = "Quentin Zabriskie-Vole"
    photos = [image_bytes(64, 64, color="red"), image_bytes(72, 64, color="blue")]
    with (
        running_server(
            data, engine=MemoryEngine(), keep_photos=True, purge_interval_s=0.2
        ) as server,
        FaceGateClient(f"127.0.0.1:{server.port}") as client,
    ):
        client.enroll("m-1", photos, name)
        client.enroll("m-2", [image_bytes(64, 64, color="green")], "Ana")
        with closing(sqlite3.connect(db_path)) as db:
            rows = db.execute(
                "SELECT embedding, photo FROM faces WHERE member_id = 'm-1'"
            ).fetchall()
        assert len(rows) == 2 and all(photo for _, photo in rows)
        pieces = [name.encode()]
        for embedding, photo in rows:
            pieces += [embedding[:64], embedding[-64:], photo[len(photo) // 2 :][:64]]
        assert all(p in stored(data) for p in pieces)

        with reader(db_path):
            took: list[float] = []

            def identify() -> None:
                started = time.perf_counter()
                result = client.identify(image_bytes(64, 64, color="green"), "gate-1")
                took.append(time.perf_counter() - started)
                assert result.decision == GRANTED

            callers = [threading.Thread(target=identify) for _ in range(2)]
            started = time.perf_counter()
            for caller in callers:
                caller.start()
            client.delete_member("m-1")
            deleting = time.perf_counter() - started
            for caller in callers:
                caller.join()
            # Before: 5 s (the store's busy timeout) for the delete and ~4.7 s for Identify.
            assert deleting < 1.2, deleting
            assert len(took) == 2 and max(took) < 1.2, took
            status = client.get_status()
            assert status.HasField("purge_pending_since")
            assert "purge pending since" in format_status(status)
            # The reader pins the pages as they were: the purge cannot have happened yet.
            for _ in range(30):
                client.identify(image_bytes(64, 64, color="green"), "gate-1")
            assert any(p in stored(data) for p in pieces)
            assert client.get_status().HasField("purge_pending_since")

        assert wait_for(lambda: not client.get_status().HasField("purge_pending_since"))
        left = [i for i, p in enumerate(pieces) if p in stored(data)]
        assert not left, f"pieces {left} of the deleted member are still in the files"
        assert "purge pending" not in format_status(client.get_status())
        assert [m.member_id for m in client.iter_members()] == ["m-2"]


def test_backup_copies_while_serving_and_restore_checks_first(tmp_path: Path) -> None:
    data = tmp_path / "data"
    copy = tmp_path / "backups" / "one.sqlite3"
    copy.parent.mkdir()
    green = image_bytes(64, 64, color="green")
    with (
        running_server(data, engine=MemoryEngine()) as server,
        FaceGateClient(f"127.0.0.1:{server.port}") as client,
    ):
        client.enroll("m-1", [green], "Ana")
        client.identify(green, "gate-1")
        with reader(data / "facegate.sqlite3"):  # a reader does not hold a backup up
            made = subprocess.run(
                [FACEGATE, "backup", str(copy), "--data-dir", str(data)],
                capture_output=True,
                text=True,
                timeout=60,
            )
        assert made.returncode == 0, made.stdout + made.stderr
        assert "1 members, 1 faces, 1 access events" in made.stdout
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
        assert list(copy.parent.iterdir()) == [copy]  # one self-contained file
        with pytest.raises(BackupError, match="never overwritten"):
            backup(data / "facegate.sqlite3", copy)
        client.enroll("m-2", [image_bytes(64, 64, color="red")], "Bo")

        # Refused while the server runs: the live database is untouched.
        refused = subprocess.run(
            [FACEGATE, "restore", str(copy), "--data-dir", str(data)],
            capture_output=True,
            text=True,
        )
        assert refused.returncode == 1
        assert "server is running" in refused.stdout and "stop it" in refused.stdout
        assert client.get_status().member_count == 2

    # Another process with the database open (the sqlite3 shell) also stops a restore.
    with reader(data / "facegate.sqlite3"), pytest.raises(BackupError, match="open"):
        restore(copy, data / "facegate.sqlite3")

    # Stopped: the restore puts the backup's state back.
    restored = subprocess.run(
        [FACEGATE, "restore", str(copy), "--data-dir", str(data)], capture_output=True, text=True
    )
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert stat.S_IMODE((data / "facegate.sqlite3").stat().st_mode) == 0o600
    with closing(sqlite3.connect(data / "facegate.sqlite3")) as db:
        assert db.execute("SELECT member_id FROM members").fetchall() == [("m-1",)]


def test_restore_refuses_what_is_not_an_intact_facegate_backup(tmp_path: Path) -> None:
    target = tmp_path / "data" / "facegate.sqlite3"
    text = tmp_path / "notes.txt"
    text.write_bytes(b"not a database " * 400)
    other = tmp_path / "other.sqlite3"
    with closing(sqlite3.connect(other)) as db:
        db.execute("CREATE TABLE t (x)")
        db.commit()
    newer = tmp_path / "newer.sqlite3"
    with closing(sqlite3.connect(newer)) as db:
        for table in ("store_meta", "members", "faces", "access_events"):
            db.execute(f"CREATE TABLE {table} (key, value)")
        db.execute("INSERT INTO store_meta VALUES ('store_id', 'x')")
        db.execute("PRAGMA user_version = 99")
        db.commit()
    for path, words in [
        (tmp_path / "missing.sqlite3", "no such file"),
        (text, "not a SQLite database"),
        (other, "not a FaceGate database"),
        (newer, "upgrade FaceGate"),
    ]:
        with pytest.raises(BackupError, match=words):
            restore(path, target)
    assert not target.exists()


def test_a_damaged_backup_is_refused(tmp_path: Path) -> None:
    from facegate_server.store import SqliteStore
    from facegate_server.store.backup import BackupInfo

    store = SqliteStore(tmp_path / "data" / "facegate.sqlite3")
    try:
        for i in range(300):
            store.create_member(f"m-{i:03}", "x" * 200, [], datetime(2026, 12, 1, tzinfo=UTC))
    finally:
        store.close()
    good = backup(tmp_path / "data" / "facegate.sqlite3", tmp_path / "good.sqlite3")
    assert isinstance(good, BackupInfo) and good.members == 300
    damaged = tmp_path / "damaged.sqlite3"
    raw = bytearray(good.path.read_bytes())
    page = 4096
    for number in range(2, len(raw) // page):  # every b-tree page's header, past the schema
        raw[number * page : number * page + 8] = b"\xa5" * 8
    damaged.write_bytes(bytes(raw))
    with pytest.raises(BackupError, match=r"damaged|not a SQLite"):
        describe(damaged)


def test_a_backup_restores_into_a_new_data_dir_that_grants_the_same_members(
    tmp_path: Path, faces: Faces
) -> None:
    """The real local engine: its index is rebuilt from the restored embeddings."""
    people = ["barack_obama", "joe_biden"]
    copy = tmp_path / "backup.sqlite3"
    with (
        running_server(tmp_path / "a") as server,
        FaceGateClient(f"127.0.0.1:{server.port}", timeout=60) as client,
    ):
        for person in people:
            enrol = [(faces.root / p).read_bytes() for p in faces.of(person)[:1]]
            client.enroll(f"m-{person}", enrol, person)
        assert backup(tmp_path / "a" / "facegate.sqlite3", copy).members == 2
        client.delete_member("m-joe_biden")  # deleted later: still in the backup
    restore(copy, tmp_path / "b" / "facegate.sqlite3")
    with (
        running_server(tmp_path / "b") as server,
        FaceGateClient(f"127.0.0.1:{server.port}", timeout=60) as client,
    ):
        assert client.get_status().member_count == 2
        for person in people:
            probe = (faces.root / faces.of(person)[1]).read_bytes()
            result = client.identify(probe, "gate-1")
            assert (result.decision, result.member_id) == (GRANTED, f"m-{person}")


def test_retention_deletes_old_events_on_the_wall_clock(tmp_path: Path) -> None:
    now = [datetime(2026, 12, 1, 9, 0, tzinfo=UTC)]
    green = image_bytes(64, 64, color="green")
    with (
        running_server(
            tmp_path / "data",
            engine=MemoryEngine(),
            wall_clock=lambda: now[0],
            event_retention_days=30,
        ) as server,
        FaceGateClient(f"127.0.0.1:{server.port}") as client,
    ):
        assert server.retention is not None
        client.enroll("m-1", [green], "Ana")
        first = now[0]
        client.identify(green, "gate-1")
        now[0] += timedelta(days=20)
        client.identify(green, "gate-1")
        status = client.get_status()
        assert status.oldest_event_time.ToDatetime(tzinfo=UTC) == first
        assert status.event_retention_days == 30
        assert "kept 30 days" in format_status(status)
        now[0] += timedelta(days=15)  # the first event is 35 days old, the second 15
        assert server.retention.run_once() == 1
        status = client.get_status()
        assert status.oldest_event_time.ToDatetime(tzinfo=UTC) == first + timedelta(days=20)
        now[0] += timedelta(days=30)
        assert server.retention.run_once() == 1
        assert not client.get_status().HasField("oldest_event_time")


def test_retention_zero_keeps_events_forever(tmp_path: Path) -> None:
    from facegate_server.retention import Retention
    from facegate_server.store import MemoryStore

    from tests.test_store_contract import event

    store = MemoryStore()
    store.record_event(event(datetime(2000, 1, 1, tzinfo=UTC)))
    forever = Retention(store, 0, clock=lambda: datetime(2026, 12, 1, tzinfo=UTC))
    assert forever.run_once() == 0
    forever.start()  # starts nothing
    forever.stop()
    assert store.oldest_event_at() == datetime(2000, 1, 1, tzinfo=UTC)


def test_a_store_does_not_open_while_a_restore_holds_its_lock(tmp_path: Path) -> None:
    import fcntl
    import os

    from facegate_server.store import SqliteStore
    from facegate_server.store.sqlite import open_lock

    path = tmp_path / "data" / "facegate.sqlite3"
    SqliteStore(path).close()
    held = open_lock(path)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what `facegate restore` takes
        with pytest.raises(RuntimeError, match="being restored"):
            SqliteStore(path)
    finally:
        os.close(held)
    SqliteStore(path).close()
    assert stat.S_IMODE(path.with_name("facegate.sqlite3.lock").stat().st_mode) == 0o600


def test_a_chain_servers_data_dir_points_to_postgresqls_tools(tmp_path: Path) -> None:
    """A chain server keeps only its local copy in the data dir: `facegate backup` there
    says where the members are instead of only that no database is found."""
    (tmp_path / "gallery-copy.sqlite3").write_bytes(b"")
    with pytest.raises(BackupError, match=r"store is PostgreSQL.*pg_dump"):
        backup(tmp_path / "facegate.sqlite3", tmp_path / "copy.sqlite3")
