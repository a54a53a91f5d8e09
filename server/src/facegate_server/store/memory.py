"""An in-memory store: the test double, held to the same contract as SQLite."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime

from facegate_server.domain import (
    AccessEvent,
    Embedding,
    EventFilter,
    FaceTemplate,
    Member,
    NewAccessEvent,
)
from facegate_server.errors import MemberAlreadyExists, MemberNotFound
from facegate_server.store.base import Store


class MemoryStore(Store):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._members: dict[str, Member] = {}
        self._templates: dict[str, list[FaceTemplate]] = {}
        self._events: list[AccessEvent] = []

    def create_member(
        self, member_id: str, display_name: str, templates: Sequence[FaceTemplate], now: datetime
    ) -> Member:
        with self._lock:
            if member_id in self._members:
                raise MemberAlreadyExists(member_id)
            member = Member(member_id, display_name, len(templates), now, now)
            self._members[member_id] = member
            self._templates[member_id] = list(templates)
            return member

    def add_templates(
        self, member_id: str, templates: Sequence[FaceTemplate], now: datetime
    ) -> Member:
        with self._lock:
            member = self._get(member_id)
            self._templates[member_id].extend(templates)
            member = replace(member, face_count=member.face_count + len(templates), update_time=now)
            self._members[member_id] = member
            return member

    def _get(self, member_id: str) -> Member:
        try:
            return self._members[member_id]
        except KeyError:
            raise MemberNotFound(member_id) from None

    def get_member(self, member_id: str) -> Member:
        with self._lock:
            return self._get(member_id)

    def list_members(self, limit: int, after: str = "") -> list[Member]:
        with self._lock:
            ids = sorted(i for i in self._members if i > after)[:limit]
            return [self._members[i] for i in ids]

    def delete_member(self, member_id: str) -> None:
        with self._lock:
            self._get(member_id)
            del self._members[member_id]
            del self._templates[member_id]

    def iter_embeddings(self) -> Iterator[tuple[str, Embedding]]:
        with self._lock:
            pairs = [(m, t.embedding) for m, ts in self._templates.items() for t in ts]
        return iter(pairs)

    def record_event(self, event: NewAccessEvent) -> AccessEvent:
        with self._lock:
            fields = {k: getattr(event, k) for k in NewAccessEvent.__dataclass_fields__}
            stored = AccessEvent(**fields, event_id=len(self._events) + 1)
            self._events.append(stored)
            return stored

    def list_events(
        self, where: EventFilter, limit: int, before_id: int | None = None
    ) -> list[AccessEvent]:
        with self._lock:
            found = []
            for event in reversed(self._events):
                if before_id is not None and event.event_id >= before_id:
                    continue
                if where.member_id and event.member_id != where.member_id:
                    continue
                if where.turnstile_id and event.turnstile_id != where.turnstile_id:
                    continue
                if where.start_time is not None and event.time < where.start_time:
                    continue
                if where.end_time is not None and event.time >= where.end_time:
                    continue
                found.append(event)
                if len(found) == limit:
                    break
            return found
