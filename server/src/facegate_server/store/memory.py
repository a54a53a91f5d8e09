"""An in-memory store: the test double, held to the same contract as SQLite."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from facegate_server.domain import (
    AccessEvent,
    CloudPerson,
    Embedding,
    EventFilter,
    FaceTemplate,
    Member,
    MemberPhoto,
    Membership,
    NewAccessEvent,
    OutboxEntry,
    StoredFace,
)
from facegate_server.errors import LastPhoto, MemberAlreadyExists, MemberNotFound, PhotoNotFound
from facegate_server.store.base import Store, embedding_of


@dataclass
class _Face:
    face_id: int
    template: FaceTemplate
    create_time: datetime
    persisted_face_id: str | None = None


@dataclass
class _Person:
    member_id: str
    person_id: str
    deleted: bool = False
    ready: bool = False
    pending: bool = False
    in_training: bool = False


class MemoryStore(Store):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._members: dict[str, Member] = {}
        self._templates: dict[str, list[_Face]] = {}
        self._events: list[AccessEvent] = []
        self._outbox: list[OutboxEntry] = []
        self._persons: dict[str, _Person] = {}
        self._next_face = 1
        self._next_seq = 1
        self._next_event = 1  # ids are never reused, even after retention deletes events
        self._store_id = uuid.uuid4().hex

    def _add_faces(
        self, member_id: str, templates: Sequence[FaceTemplate], now: datetime
    ) -> list[_Face]:
        faces = []
        for t in templates:
            embedding_of(t)
            face = _Face(self._next_face, t, now)
            self._next_face += 1
            faces.append(face)
            if t.cloud_photo is not None:
                self._enqueue("add_face", member_id, face.face_id, t.cloud_photo)
        return faces

    def _enqueue(
        self,
        kind: str,
        member_id: str,
        face_id: int | None = None,
        photo: bytes | None = None,
        persisted_face_id: str | None = None,
    ) -> None:
        self._outbox.append(
            OutboxEntry(
                self._next_seq,
                kind,
                member_id,
                face_id,
                photo,
                persisted_face_id=persisted_face_id,
            )
        )
        self._next_seq += 1

    def create_member(
        self,
        member_id: str,
        display_name: str,
        templates: Sequence[FaceTemplate],
        now: datetime,
        membership: Membership | None = None,
    ) -> Member:
        with self._lock:
            if member_id in self._members:
                raise MemberAlreadyExists(member_id)
            member = Member(
                member_id,
                display_name,
                len(templates),
                now,
                now,
                membership=membership or Membership(),
            )
            self._members[member_id] = member
            self._templates[member_id] = self._add_faces(member_id, templates, now)
            return member

    def update_member(
        self, member_id: str, display_name: str, membership: Membership, now: datetime
    ) -> Member:
        with self._lock:
            member = replace(
                self._get(member_id),
                display_name=display_name,
                membership=membership,
                update_time=now,
            )
            self._members[member_id] = member
            return member

    def photos(self, member_id: str, *, with_bytes: bool = False) -> list[MemberPhoto]:
        with self._lock:
            self._get(member_id)
            return [
                MemberPhoto(
                    f.face_id,
                    f.create_time,
                    f.template.quality,
                    f.template.photo if with_bytes else None,
                )
                for f in self._templates[member_id]
            ]

    def remove_photo(
        self, member_id: str, photo_id: int, now: datetime, *, cloud: bool = False
    ) -> tuple[Member, FaceTemplate]:
        with self._lock:
            member = self._get(member_id)
            faces = self._templates[member_id]
            found = [f for f in faces if f.face_id == photo_id]
            if not found:
                raise PhotoNotFound(member_id, photo_id)
            if len(faces) == 1:
                raise LastPhoto(member_id)
            face = found[0]
            self._templates[member_id] = [f for f in faces if f is not face]
            pending = [e for e in self._outbox if e.kind == "add_face" and e.face_id == photo_id]
            self._outbox = [e for e in self._outbox if e not in pending]
            sent = face.persisted_face_id is not None or any(e.attempts for e in pending)
            if cloud and sent:
                self._enqueue(
                    "delete_face", member_id, photo_id, persisted_face_id=face.persisted_face_id
                )
            member = replace(member, face_count=len(faces) - 1, update_time=now)
            self._members[member_id] = member
            return member, face.template

    def add_templates(
        self, member_id: str, templates: Sequence[FaceTemplate], now: datetime
    ) -> Member:
        with self._lock:
            member = self._get(member_id)
            self._templates[member_id].extend(self._add_faces(member_id, templates, now))
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

    def count_members(self) -> int:
        with self._lock:
            return len(self._members)

    def delete_member(self, member_id: str, *, cloud: bool = False) -> None:
        with self._lock:
            self._get(member_id)
            del self._members[member_id]
            del self._templates[member_id]
            self._outbox = [
                e for e in self._outbox if not (e.member_id == member_id and e.kind == "add_face")
            ]
            if cloud:
                for person in self._persons.values():
                    if person.member_id == member_id:
                        person.deleted = True
                self._enqueue("delete_member", member_id)

    def iter_embeddings(self) -> Iterator[tuple[str, Embedding]]:
        with self._lock:
            pairs = [(m, embedding_of(f.template)) for m, fs in self._templates.items() for f in fs]
        return iter(pairs)

    def record_event(self, event: NewAccessEvent) -> AccessEvent:
        with self._lock:
            stored = event.stored(
                self._next_event,
                latency=timedelta(microseconds=round(event.latency.total_seconds() * 1e6)),
            )
            self._next_event += 1
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
                if where.matches(event):
                    found.append(event)
                    if len(found) == limit:
                        break
            return found

    def events_after(self, after_id: int, where: EventFilter, limit: int) -> list[AccessEvent]:
        with self._lock:
            found = []
            for event in self._events:
                if event.event_id > after_id and where.matches(event):
                    found.append(event)
                    if len(found) == limit:
                        break
            return found

    def delete_events_before(self, cutoff: datetime) -> int:
        with self._lock:
            kept = [e for e in self._events if e.time >= cutoff]
            deleted = len(self._events) - len(kept)
            self._events = kept
        return deleted

    def oldest_event_at(self) -> datetime | None:
        with self._lock:
            return min((e.time for e in self._events), default=None)

    def store_id(self) -> str:
        return self._store_id

    def outbox(self, limit: int) -> list[OutboxEntry]:
        with self._lock:
            return [e for e in self._outbox if not e.parked][:limit]

    def outbox_depth(self) -> int:
        with self._lock:
            return sum(1 for e in self._outbox if not e.parked)

    def outbox_members(self) -> set[str]:
        with self._lock:
            return {e.member_id for e in self._outbox}

    def outbox_park(self, seq: int, reason: str) -> None:
        with self._lock:
            self._outbox = [
                replace(e, parked=reason or "refused", last_error=reason) if e.seq == seq else e
                for e in self._outbox
            ]

    def outbox_parked(self, limit: int) -> list[OutboxEntry]:
        with self._lock:
            return [replace(e, photo=None) for e in self._outbox if e.parked][:limit]

    def outbox_of(self, member_id: str) -> list[OutboxEntry]:
        with self._lock:
            return [replace(e, photo=None) for e in self._outbox if e.member_id == member_id]

    def outbox_parked_count(self) -> int:
        with self._lock:
            return sum(1 for e in self._outbox if e.parked)

    def outbox_unpark(self) -> int:
        with self._lock:
            count = sum(1 for e in self._outbox if e.parked)
            self._outbox = [
                replace(e, parked="", attempts=0) if e.parked else e for e in self._outbox
            ]
            return count

    def outbox_attempt(self, seq: int, error: str = "") -> None:
        with self._lock:
            self._outbox = [
                e
                if e.seq != seq
                else replace(e, last_error=error)
                if error
                else replace(e, attempts=e.attempts + 1)
                for e in self._outbox
            ]

    def outbox_done(self, seq: int) -> None:
        with self._lock:
            self._outbox = [e for e in self._outbox if e.seq != seq]

    @staticmethod
    def _public(p: _Person) -> CloudPerson:
        return CloudPerson(p.member_id, p.person_id, p.ready, p.deleted)

    def cloud_person(self, member_id: str) -> CloudPerson | None:
        with self._lock:
            for p in self._persons.values():
                if p.member_id == member_id and not p.deleted:
                    return self._public(p)
            return None

    def cloud_people(self) -> list[CloudPerson]:
        with self._lock:
            people = sorted(self._persons.values(), key=lambda p: (p.member_id, p.person_id))
            return [self._public(p) for p in people]

    def member_of_person(self, person_id: str) -> str | None:
        with self._lock:
            p = self._persons.get(person_id)
            if p is None or p.deleted or p.member_id not in self._members:
                return None
            return p.member_id

    def save_cloud_person(self, member_id: str, person_id: str) -> None:
        with self._lock:
            self._persons[person_id] = _Person(member_id, person_id)

    def forget_cloud_person(self, person_id: str) -> None:
        with self._lock:
            self._persons.pop(person_id, None)

    def save_cloud_face(self, face_id: int, persisted_face_id: str) -> None:
        with self._lock:
            for member_id, faces in self._templates.items():
                for face in faces:
                    if face.face_id == face_id:
                        face.persisted_face_id = persisted_face_id
                        for p in self._persons.values():
                            if p.member_id == member_id and not p.deleted:
                                p.pending = True

    def faces(self, member_id: str, *, photos: bool = True) -> list[StoredFace]:
        with self._lock:
            return [
                StoredFace(
                    f.face_id,
                    member_id,
                    f.template.photo if photos else None,
                    f.persisted_face_id,
                    f.template.photo is not None,
                )
                for f in self._templates.get(member_id, [])
            ]

    def face_photo(self, face_id: int) -> bytes | None:
        with self._lock:
            for faces in self._templates.values():
                for f in faces:
                    if f.face_id == face_id:
                        return f.template.photo
        return None

    def training_queued(self) -> None:
        with self._lock:
            for p in self._persons.values():
                if p.pending:
                    p.in_training, p.pending = True, False

    def training_succeeded(self) -> None:
        with self._lock:
            for p in self._persons.values():
                if p.in_training:
                    p.ready, p.in_training = True, False
