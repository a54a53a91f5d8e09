"""The gate: what each RPC does, in domain terms (no protobuf here).

It validates requests, asks the engine, keeps the store and the matching index in step,
and writes every Identify decision to the access log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from facegate_server import validation
from facegate_server.domain import (
    AccessEvent,
    EventFilter,
    FaceTemplate,
    Identification,
    Member,
    NewAccessEvent,
)
from facegate_server.engines.local import LocalEngine
from facegate_server.errors import InvalidArgument
from facegate_server.store import Store

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class IdentifyResult:
    identification: Identification
    display_name: str
    event: AccessEvent


class Gate:
    def __init__(
        self,
        store: Store,
        engine: LocalEngine,
        *,
        identify_budget: float,
        enroll_timeout: float,
        max_photos: int,
        keep_photos: bool = False,
        clock: Clock = utc_now,
    ) -> None:
        self.store = store
        self.engine = engine
        self.identify_budget = identify_budget
        self.enroll_timeout = enroll_timeout
        self.max_photos = max_photos
        self.keep_photos = keep_photos
        self.clock = clock
        # Serialises changes of membership so the store and the index change together.
        self._membership = threading.Lock()

    def identify(
        self, image: bytes, turnstile_id: str, time_left: float | None = None
    ) -> IdentifyResult:
        started = time.perf_counter()
        validation.turnstile_id(turnstile_id)
        budget = self.identify_budget if time_left is None else min(self.identify_budget, time_left)
        identification = self.engine.identify(image, budget)
        display_name = ""
        if identification.member_id:
            try:
                display_name = self.store.get_member(identification.member_id).display_name
            except Exception:  # deleted a moment ago: the name is only for display
                display_name = ""
        latency = timedelta(seconds=time.perf_counter() - started)
        event = self.store.record_event(
            NewAccessEvent(
                time=self.clock(),
                turnstile_id=turnstile_id,
                member_id=identification.member_id,
                decision=identification.decision,
                engine=identification.engine,
                confidence=identification.confidence,
                latency=latency,
            )
        )
        return IdentifyResult(identification, display_name, event)

    def _templates(self, photos: Sequence[bytes]) -> list[FaceTemplate]:
        validation.photo_count(len(photos), self.max_photos)
        analyses = self.engine.analyse_many(photos, self.enroll_timeout)
        templates = []
        for i, (photo, analysis) in enumerate(zip(photos, analyses, strict=True)):
            if not analysis.boxes:
                raise InvalidArgument(
                    f"photos[{i}]", "no face was found in this photo", reason="PHOTO_NO_FACE"
                )
            if len(analysis.boxes) > 1:
                raise InvalidArgument(
                    f"photos[{i}]",
                    f"{len(analysis.boxes)} faces were found; an enrolment photo must show one",
                    reason="PHOTO_MULTIPLE_FACES",
                )
            templates.append(
                FaceTemplate(analysis.embeddings[0], photo if self.keep_photos else None)
            )
        return templates

    def enroll(self, member_id: str, display_name: str, photos: Sequence[bytes]) -> Member:
        validation.member_id(member_id)
        validation.display_name(display_name)
        self.store_lookup_absent(member_id)
        templates = self._templates(photos)
        with self._membership:
            member = self.store.create_member(member_id, display_name, templates, self.clock())
            self.engine.index.add(member_id, [t.embedding for t in templates])
        return member

    def store_lookup_absent(self, member_id: str) -> None:
        """Fail fast (before minutes of encoding) when the id is taken; create re-checks."""
        from facegate_server.errors import MemberAlreadyExists, MemberNotFound

        try:
            self.store.get_member(member_id)
        except MemberNotFound:
            return
        raise MemberAlreadyExists(member_id)

    def add_member_photos(self, member_id: str, photos: Sequence[bytes]) -> Member:
        validation.member_id(member_id)
        self.store.get_member(member_id)
        templates = self._templates(photos)
        with self._membership:
            member = self.store.add_templates(member_id, templates, self.clock())
            self.engine.index.add(member_id, [t.embedding for t in templates])
        return member

    def get_member(self, member_id: str) -> Member:
        return self.store.get_member(validation.member_id(member_id))

    def list_members(self, page_size: int, after: str) -> tuple[list[Member], str]:
        """A page of members, and the id to continue after ("" on the last page)."""
        limit = validation.page_size(page_size)
        members = self.store.list_members(limit + 1, after)
        if len(members) > limit:
            return members[:limit], members[limit - 1].member_id
        return members, ""

    def delete_member(self, member_id: str) -> None:
        validation.member_id(member_id)
        with self._membership:
            self.store.delete_member(member_id)
            self.engine.index.remove(member_id)
        log.info("member deleted", extra={"member_id": member_id})

    def list_events(
        self, where: EventFilter, page_size: int, before_id: int | None
    ) -> tuple[list[AccessEvent], int | None]:
        """A page of events, and the id to continue before (None on the last page)."""
        limit = validation.page_size(page_size)
        if where.member_id:
            validation.member_id(where.member_id)
        if where.turnstile_id:
            validation.turnstile_id(where.turnstile_id)
        events = self.store.list_events(where, limit + 1, before_id)
        if len(events) > limit:
            return events[:limit], events[limit - 1].event_id
        return events, None
