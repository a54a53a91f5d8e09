"""A chain server's local copy of the gallery: a SQLite file in data_dir (store/sqlite.py's
schema), which the follower (store/chain.py) keeps equal to the shared PostgreSQL store,
and from which the server decides while PostgreSQL is out of reach.

Beside the members and their faces (with the central face ids) it keeps, in
`replica_meta`: the last change applied (`applied_seq`, written in the same transaction
as the change), when the copy was last known current, and which central store it copies;
and, in `pending_events`, the access events decided while the central store could not
take them, each with its origin sequence, until they are shipped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from facegate_server.domain import (
    AccessKind,
    Decision,
    EngineKind,
    FaceTemplate,
    MembershipRule,
    NewAccessEvent,
)
from facegate_server.store.codec import membership_json, quality_from_json
from facegate_server.store.postgres import StoredMember
from facegate_server.store.reports import reports_from_json, reports_json
from facegate_server.store.sqlite import EMBEDDING_DTYPE, SqliteStore, _time, _us

REPLICA_TABLES = (
    """CREATE TABLE IF NOT EXISTS replica_meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS pending_events (
        origin_seq INTEGER PRIMARY KEY,
        event      TEXT NOT NULL
    )""",
)


CURRENT_SAVE_S = 60.0
"""How often the time the copy was last current is saved while nothing changes."""

COPY_FILE = "gallery-copy.sqlite3"
"""A chain server's local copy of the shared gallery, in its data_dir."""


@dataclass(frozen=True)
class EngineChange:
    """What the engines must be told after a change is applied to the copy."""

    kind: str  # "enrolled", "removed", "template_removed"
    member_id: str
    templates: tuple[FaceTemplate, ...] = ()


def event_json(event: NewAccessEvent) -> str:
    return json.dumps(
        {
            "time_us": _us(event.time),
            "turnstile_id": event.turnstile_id,
            "member_id": event.member_id,
            "decision": event.decision.value,
            "engine": event.engine.value,
            "confidence": event.confidence,
            "latency_us": round(event.latency / timedelta(microseconds=1)),
            "reports": reports_json(event.reports),
            "kind": event.kind.value,
            "claimed_member_id": event.claimed_member_id,
            "detail": event.detail,
            "rule": event.rule.value if event.rule is not None else "",
        }
    )


def event_from_json(text: str) -> NewAccessEvent:
    items: dict[str, Any] = json.loads(text)
    return NewAccessEvent(
        time=_time(items["time_us"]),
        turnstile_id=items["turnstile_id"],
        member_id=items["member_id"],
        decision=Decision(items["decision"]),
        engine=EngineKind(items["engine"]),
        confidence=items["confidence"],
        latency=timedelta(microseconds=items["latency_us"]),
        reports=reports_from_json(items["reports"]),
        kind=AccessKind(items["kind"]),
        claimed_member_id=items["claimed_member_id"],
        detail=items["detail"],
        rule=MembershipRule(items["rule"]) if items["rule"] else None,
    )


def _template(blob: bytes, photo: bytes | None, quality: str | None) -> FaceTemplate:
    return FaceTemplate(
        np.frombuffer(blob, EMBEDDING_DTYPE).astype(np.float64),
        photo=photo,
        quality=quality_from_json(quality),
    )


class ReplicaStore(SqliteStore):
    """The local copy (a SqliteStore: its reads serve the gate as they would alone)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        with self._lock:
            for statement in REPLICA_TABLES:
                self._db.execute(statement)
        # When the copy was last known current: kept in memory, saved at most every
        # CURRENT_SAVE_S (a durable write under the store lock Identify reads through
        # was once a poll, a second); after a restart the copy looks older, never newer.
        self._current: datetime | None = None
        self._current_saved = float("-inf")

    def meta(self, key: str, default: str = "") -> str:
        with self._lock:
            row = self._db.execute(
                "SELECT value FROM replica_meta WHERE key = ?", (key,)
            ).fetchone()
        return default if row is None else str(row[0])

    def _set(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO replica_meta (key, value) VALUES (?, ?)", (key, value)
        )

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._set(key, value)

    def applied_seq(self) -> int:
        return int(self.meta("applied_seq", "0"))

    def current_at(self) -> datetime | None:
        """When the copy was last known equal to the central store."""
        if self._current is not None:
            return self._current
        value = self.meta("current_us")
        return _time(int(value)) if value else None

    def mark_current(self, now: datetime) -> None:
        self._current = now
        if time.monotonic() - self._current_saved >= CURRENT_SAVE_S:
            self.set_meta("current_us", str(_us(now)))
            self._current_saved = time.monotonic()

    def reset(self, central_id: str) -> None:
        """Forget every member: the copy is of another central store (or none yet)."""
        with self._lock, self._transaction():
            self._db.execute("DELETE FROM faces")
            self._db.execute("DELETE FROM members")
            self._set("applied_seq", "0")
            self._set("central_id", central_id)
        self._purge_wal()

    def apply(
        self,
        seq: int,
        order: Sequence[str],
        members: Mapping[str, StoredMember],
        now: datetime,
        *,
        everyone: bool = False,
        current: bool = True,
    ) -> list[EngineChange]:
        """Make the copy of each member in `order` equal to `members` (absent: deleted),
        record `seq` as applied, in one transaction; what the engines must be told, in
        order. With `everyone`, members of the copy not in `members` are deleted too.
        With `current` false the copy is not stamped current at `now` (more is to come)."""
        told: list[EngineChange] = []
        with self._lock, self._transaction():
            names = list(order)
            if everyone:
                known = {r[0] for r in self._db.execute("SELECT member_id FROM members")}
                names += sorted(known - set(names))
            for member_id in names:
                told.extend(self._copy(member_id, members.get(member_id)))
            self._set("applied_seq", str(seq))
            if current:
                self._set("current_us", str(_us(now)))
        if current:
            self._current = now
        if any(t.kind != "enrolled" for t in told):
            self._purge_wal()
        return told

    def _copy(self, member_id: str, stored: StoredMember | None) -> list[EngineChange]:
        row = self._db.execute(
            "SELECT create_us FROM members WHERE member_id = ?", (member_id,)
        ).fetchone()
        told: list[EngineChange] = []
        if row is not None and (stored is None or row[0] != _us(stored.member.create_time)):
            # Deleted, or deleted and enrolled again: a new member, nothing of the old kept.
            self._db.execute("DELETE FROM faces WHERE member_id = ?", (member_id,))
            self._db.execute("DELETE FROM members WHERE member_id = ?", (member_id,))
            told.append(EngineChange("removed", member_id))
            row = None
        if stored is None:
            return told
        m = stored.member
        self._db.execute(
            "INSERT INTO members (member_id, display_name, create_us, update_us, membership)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (member_id) DO UPDATE SET"
            " display_name = excluded.display_name, update_us = excluded.update_us,"
            " membership = excluded.membership",
            (
                member_id,
                m.display_name,
                _us(m.create_time),
                _us(m.update_time),
                membership_json(m.membership),
            ),
        )
        local = {
            int(r[0]): r
            for r in self._db.execute(
                "SELECT face_id, embedding, photo, quality FROM faces WHERE member_id = ?",
                (member_id,),
            )
        }
        central = {face[0] for face in stored.faces}
        for face_id, r in local.items():
            if face_id not in central:
                self._db.execute("DELETE FROM faces WHERE face_id = ?", (face_id,))
                told.append(
                    EngineChange("template_removed", member_id, (_template(r[1], r[2], r[3]),))
                )
        added = []
        for face_id, blob, photo, created, quality in stored.faces:
            if face_id in local:
                continue
            self._db.execute(
                "INSERT INTO faces (face_id, member_id, embedding, photo, create_us, quality)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (face_id, member_id, blob, photo, _us(created), quality),
            )
            added.append(_template(blob, photo, quality))
        if added:
            told.append(EngineChange("enrolled", member_id, tuple(added)))
        return told

    # Access events decided while the central store could not take them.
    def reserve_origins(self, count: int) -> tuple[int, int]:
        """A block of `count` origin sequence numbers, never handed out again: [start, end)."""
        with self._lock, self._transaction():
            row = self._db.execute(
                "SELECT value FROM replica_meta WHERE key = 'next_origin'"
            ).fetchone()
            start = int(row[0]) if row is not None else 1
            self._set("next_origin", str(start + count))
        return start, start + count

    def keep_event(self, origin_seq: int, event: NewAccessEvent) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO pending_events (origin_seq, event) VALUES (?, ?)",
                (origin_seq, event_json(event)),
            )

    def pending_events(self, limit: int) -> list[tuple[int, NewAccessEvent]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT origin_seq, event FROM pending_events ORDER BY origin_seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [(int(r[0]), event_from_json(r[1])) for r in rows]

    def pending_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM pending_events").fetchone()[0])

    def shipped(self, origin_seqs: Sequence[int]) -> None:
        """Forget the events shipped: these, not all below the last (an event whose
        central insert failed late may be kept after later ones were shipped)."""
        with self._lock, self._transaction():
            self._db.executemany(
                "DELETE FROM pending_events WHERE origin_seq = ?", [(s,) for s in origin_seqs]
            )
