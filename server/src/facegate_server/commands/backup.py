"""`facegate backup PATH` and `facegate restore PATH`: the SQLite store's backups
(store/backup.py). Both open the data directory's database directly: a backup runs while
the server serves; a restore needs the server stopped and refuses otherwise."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="the server's data directory (FACEGATE_DATA_DIR; ./facegate-data)",
    )


def register_backup(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "backup",
        help="copy the server's database to a new file, while it serves",
        description=(
            "Copy the data directory's database to PATH (a new file, readable by its owner"
            " only): a consistent snapshot, taken while the server serves. A backup keeps"
            " what it held when taken, members deleted later included: rotate them."
        ),
    )
    parser.add_argument("path", type=Path, metavar="PATH", help="the backup file to write")
    _data_dir(parser)
    parser.set_defaults(func=run_backup)


def register_restore(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "restore",
        help="replace a stopped server's database with a backup",
        description=(
            "Check that PATH is an intact FaceGate backup, then replace the data directory's"
            " database with it. The server must be stopped: refused while it runs."
        ),
    )
    parser.add_argument("path", type=Path, metavar="PATH", help="a file made by `facegate backup`")
    _data_dir(parser)
    parser.set_defaults(func=run_restore)


def _db_path(args: argparse.Namespace) -> Path | None:
    from facegate_server.config import load_settings

    try:
        return load_settings(data_dir=args.data_dir).db_path
    except ValueError as error:
        print(f"error: {error}", flush=True)
        return None


def run_backup(args: argparse.Namespace) -> int:
    from facegate_server.datadir import COPY_FILE, member_count
    from facegate_server.store.backup import BackupError, backup

    db_path = _db_path(args)
    if db_path is None:
        return 2
    if (db_path.parent / COPY_FILE).exists() and not member_count(db_path):
        print(
            f"error: {db_path.parent} is a chain server's data dir: its members are in the"
            " shared PostgreSQL (--store), which PostgreSQL's tools back up (pg_dump); the"
            f" local copy ({COPY_FILE}) is made again from it",
            flush=True,
        )
        return 2
    try:
        info = backup(db_path, args.path)
    except BackupError as error:
        print(f"error: {error}", flush=True)
        return 1
    print(
        f"backed up {db_path} to {info.path}: {info.members} members, {info.faces} faces,"
        f" {info.events} access events, {info.size} bytes (schema {info.schema_version})"
    )
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from facegate_server.store.backup import BackupError, restore

    db_path = _db_path(args)
    if db_path is None:
        return 2
    try:
        info = restore(args.path, db_path)
    except BackupError as error:
        print(f"error: {error}", flush=True)
        return 1
    print(
        f"restored {info.path} into {db_path}: {info.members} members, {info.faces} faces,"
        f" {info.events} access events (schema {info.schema_version}); start the server"
    )
    return 0
