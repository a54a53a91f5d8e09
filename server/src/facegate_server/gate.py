"""The gate: what each RPC does, in domain terms (no protobuf here).

It validates requests, asks the engine, keeps the store and the matching index in step,
applies the membership rules to whoever the engines recognised (`_admit`: membership.py),
and writes every Identify and Verify decision to the access log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from facegate_server import membership as rules
from facegate_server import validation
from facegate_server.cloud.sync import CloudSync
from facegate_server.domain import (
    AccessEvent,
    AccessKind,
    Decision,
    EngineStatus,
    EventFilter,
    FaceTemplate,
    Identification,
    Member,
    MemberPhoto,
    Membership,
    NewAccessEvent,
    SearchResult,
    Status,
    SyncReport,
)
from facegate_server.engines.base import RecognitionEngine
from facegate_server.errors import (
    CloudNotConfigured,
    FaceGateError,
    InvalidArgument,
    MemberAlreadyExists,
    MemberNotFound,
    RateLimited,
    RecognitionTimeout,
    RecognitionUnavailable,
    StoreUnavailable,
)
from facegate_server.feed import EventBell
from facegate_server.membership import Site
from facegate_server.store import Store
from facegate_server.store.base import answer_within

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

MAX_CANDIDATES = 10
"""The most members SearchFaces returns."""

MEMBERSHIP_FIELDS = (
    "valid_from",
    "valid_until",
    "suspended",
    "suspension_reason",
    "access_hours",
    "sites",
)
UPDATABLE = ("display_name", "membership", *(f"membership.{f}" for f in MEMBERSHIP_FIELDS))
"""The field mask paths UpdateMember accepts (relative to the member)."""
NO_SUCH_MEMBER = "no member with this id"
"""The access log's detail for a Verify of an id nobody has (the turnstile is not told)."""


PARKED_SHOWN = 20  # parked outbox entries GetStatus lists


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class IdentifyResult:
    """What Identify or Verify answers (`identification`, `display_name`) and logged."""

    identification: Identification
    display_name: str
    event: AccessEvent


def told(found: Identification) -> Identification:
    """A Verify answer as the turnstile hears it: on a denial, no confidence and no detail.

    How close the face came to the member, or that no photo of theirs was compared, would
    tell a turnstile which member ids exist.
    """
    if found.decision is Decision.GRANTED:
        return found
    return replace(
        found,
        confidence=0.0,
        reports=tuple(replace(r, confidence=0.0, detail="", member_id="") for r in found.reports),
    )


class Gate:
    """The use cases, on one engine (the router, or any RecognitionEngine) and one store.

    `replayer` is the cloud's outbox replayer, when one is configured: woken after each
    change of membership, and asked to reconcile by SyncCloud. `engine_status` reports
    the routing and the cloud for GetStatus. `site` is where the turnstiles are (its id
    and time zone), for the membership rules; `clock` the wall clock they read.
    `on_event` is told of each access event logged (the metrics' latency histograms).
    """

    def __init__(
        self,
        store: Store,
        engine: RecognitionEngine,
        *,
        identify_budget: float,
        enroll_timeout: float,
        max_photos: int,
        keep_photos: bool = False,
        clock: Clock = utc_now,
        replayer: CloudSync | None = None,
        engine_status: Callable[[], EngineStatus] | None = None,
        refusals: Callable[[], dict[str, int]] | None = None,
        site: Site | None = None,
        event_retention_days: int = 0,
        on_event: Callable[[AccessEvent], None] | None = None,
        events: EventBell | None = None,
    ) -> None:
        self.store = store
        self.events_written = events if events is not None else EventBell()
        """Rung after each access event is stored: wakes followers of the log (feed.py)."""
        self.engine = engine
        self.replayer = replayer
        self._engine_status = engine_status or EngineStatus
        self._refusals = refusals or dict
        self._on_event = on_event
        self._decisions: Counter[str] = Counter()
        self.identify_budget = identify_budget
        self.enroll_timeout = enroll_timeout
        self.max_photos = max_photos
        self.keep_photos = keep_photos
        self.clock = clock
        self.site = site if site is not None else Site()
        self.event_retention_days = event_retention_days
        # Serialises changes of membership so the store and the engines change together.
        self._membership = threading.Lock()

    def identify(
        self, image: bytes, turnstile_id: str, time_left: float | None = None
    ) -> IdentifyResult:
        with answer_within(time_left):  # the access event's write too
            return self._identify(image, turnstile_id, time_left)

    def _identify(self, image: bytes, turnstile_id: str, time_left: float | None) -> IdentifyResult:
        started = time.perf_counter()
        validation.turnstile_id(turnstile_id)
        budget = self.identify_budget if time_left is None else min(self.identify_budget, time_left)
        try:
            identification = self.engine.identify(image, budget)
        except (RecognitionTimeout, RateLimited, RecognitionUnavailable) as error:
            self.record_undecided(turnstile_id, error, time.perf_counter() - started)
            raise
        now = self.clock()
        identification, member = self._admit(identification, now)
        granted = identification.decision is Decision.GRANTED
        name = member.display_name if granted and member is not None else ""
        event = self._log(identification, turnstile_id, now, started)
        return IdentifyResult(identification, name, event)

    def _log(
        self,
        found: Identification,
        turnstile_id: str,
        now: datetime,
        started: float,
        **verification: Any,
    ) -> AccessEvent:
        """Count the decision and write it to the access log: the one place decisions are
        written (`verification`: the event's Verify fields); `_record` stores every entry."""
        self._decisions[f"{found.engine.value.lower()}/{found.decision.value}"] += 1
        event = self._record(
            NewAccessEvent(
                time=now,
                turnstile_id=turnstile_id,
                member_id=found.member_id,
                decision=found.decision,
                engine=found.engine,
                confidence=found.confidence,
                latency=timedelta(seconds=time.perf_counter() - started),
                reports=found.reports,
                rule=found.rule,
                **verification,
            )
        )
        return self._logged(event)

    def _logged(self, event: AccessEvent) -> AccessEvent:
        """Tell `on_event` (the metrics) of an Identify or Verify just logged."""
        if self._on_event is not None:
            self._on_event(event)
        return event

    def _record(self, event: NewAccessEvent) -> AccessEvent:
        """Store an access event and wake the log's followers."""
        stored = self.store.record_event(event)
        self.events_written.ring()
        return stored

    def record_undecided(
        self,
        turnstile_id: str,
        error: FaceGateError,
        latency: float = 0.0,
        claimed_member_id: str | None = None,
    ) -> AccessEvent | None:
        """Log an Identify, or a Verify of `claimed_member_id`, that got no decision (timed
        out, refused for load, no engine), so that the access log counts every attempt;
        None for an invalid turnstile id (or claimed member id)."""
        try:
            validation.turnstile_id(turnstile_id)
            if claimed_member_id is not None:
                validation.member_id(claimed_member_id)
        except InvalidArgument:
            return None
        if isinstance(error, RecognitionTimeout):
            decision = Decision.NOT_DECIDED_TIMEOUT
        elif isinstance(error, RateLimited):
            decision = Decision.NOT_DECIDED_BUSY
        else:
            decision = Decision.NOT_DECIDED_UNAVAILABLE
        self._decisions[f"{self.engine.kind.value.lower()}/{decision.value}"] += 1
        event = self._record(
            NewAccessEvent(
                time=self.clock(),
                turnstile_id=turnstile_id,
                member_id="",
                decision=decision,
                engine=self.engine.kind,
                confidence=0.0,
                latency=timedelta(seconds=latency),
                reports=(),
                kind=AccessKind.IDENTIFY if claimed_member_id is None else AccessKind.VERIFY,
                claimed_member_id=claimed_member_id or "",
            )
        )
        return self._logged(event)

    def _admit(
        self, identification: Identification, now: datetime | None = None
    ) -> tuple[Identification, Member | None]:
        """The membership rules, after recognition: a grant stands only if the member may
        come in here and now (membership.py), on the store's copy of the member, whichever
        engine recognised them. A refusal keeps the member's id (the gym needs to know who
        was turned away), says which rule applied and gives the turnstile a hint.

        Every other decision (unknown face, no face, several, poor quality, ambiguous)
        stands as it is: the rules never reveal whom a stranger resembles. Identify and
        Verify call this; so must any other use case that grants. With the decision, the
        member read for it (None when none was: no grant, or deleted meanwhile).
        """
        if identification.decision is not Decision.GRANTED or not identification.member_id:
            return identification, None
        try:
            member = self.store.get_member(identification.member_id)
        except MemberNotFound:  # deleted while the engine decided: nobody to let in
            denied = replace(
                identification, decision=Decision.DENIED_UNKNOWN_FACE, member_id="", hint=""
            )
            return denied, None
        rule = rules.refusal(member.membership, self.clock() if now is None else now, self.site)
        if rule is None:
            return identification, member
        refused = replace(
            identification, decision=rules.DECISIONS[rule], rule=rule, hint=rules.HINTS[rule]
        )
        return refused, member

    def verify(
        self, member_id: str, image: bytes, turnstile_id: str, time_left: float | None = None
    ) -> IdentifyResult:
        """Verify: is the face in `image` the member `member_id` (1:1)?

        An id nobody has gets the engine's answer for a face that is not theirs, after the
        same work (the engine analyses the frame and compares it with nobody's photos);
        the access log says why. A denial tells the turnstile nothing measured about the
        member (`told`): the log keeps the confidences.
        """
        with answer_within(time_left):  # the access event's write too
            return self._verify(member_id, image, turnstile_id, time_left)

    def _verify(
        self, member_id: str, image: bytes, turnstile_id: str, time_left: float | None
    ) -> IdentifyResult:
        started = time.perf_counter()
        validation.turnstile_id(turnstile_id)
        validation.member_id(member_id)
        budget = self.identify_budget if time_left is None else min(self.identify_budget, time_left)
        try:
            found = self.engine.verify(member_id, image, budget)
        except (RecognitionTimeout, RateLimited, RecognitionUnavailable) as error:
            self.record_undecided(turnstile_id, error, time.perf_counter() - started, member_id)
            raise
        now = self.clock()
        found, member = self._admit(found, now)
        if member is None:  # no grant read it: existence, for the log's detail
            try:
                member = self.store.get_member(member_id)
            except MemberNotFound:
                member = None
        display_name, enrolled = (member.display_name, True) if member else ("", False)
        granted = found.decision is Decision.GRANTED
        detail = NO_SUCH_MEMBER if not (enrolled or granted) else ""
        event = self._log(
            found,
            turnstile_id,
            now,
            started,
            kind=AccessKind.VERIFY,
            claimed_member_id=member_id,
            detail=detail,
        )
        return IdentifyResult(told(found), display_name if granted else "", event)

    def _templates(self, photos: Sequence[bytes]) -> list[FaceTemplate]:
        """One template a photo, each engine's part added; the first bad photo fails all."""
        validation.photo_count(len(photos), self.max_photos)
        kept = [FaceTemplate(photo=p if self.keep_photos else None) for p in photos]
        return self.engine.enrol(photos, self.enroll_timeout, kept)

    def search(
        self, image: bytes, max_candidates: int, time_left: float | None = None
    ) -> SearchResult:
        """SearchFaces: score a frame against the members, without deciding or logging."""
        if not 0 <= max_candidates <= MAX_CANDIDATES:
            raise InvalidArgument(
                "max_candidates",
                f"must be 0 to {MAX_CANDIDATES}",
                reason="MAX_CANDIDATES_OUT_OF_RANGE",
            )
        budget = self.identify_budget if time_left is None else min(self.identify_budget, time_left)
        return self.engine.search(image, budget, max_candidates or 2)

    def enroll(
        self,
        member_id: str,
        display_name: str,
        photos: Sequence[bytes],
        membership: Membership | None = None,
    ) -> Member:
        validation.member_id(member_id)
        validation.display_name(display_name)
        checked = validation.membership(membership or Membership())
        self.store.check_writable()
        self._check_absent(member_id)
        templates = self._templates(photos)
        with self._membership:
            member = self.store.create_member(
                member_id, display_name, templates, self.clock(), checked
            )
            if not self.store.applies_changes:
                self.engine.enrolled(member_id, templates)
        self._wake_cloud()
        return member

    def _wake_cloud(self) -> None:
        if self.replayer is not None:
            self.replayer.wake()

    def status_engines(self) -> EngineStatus:
        """The engines' part of the status (cheap: no store query)."""
        return self._engine_status()

    def status(self) -> Status:
        unknown = False
        try:  # the outbox and the access log are in the shared store, when there is one
            depth = self.store.outbox_depth()
            parked_count = self.store.outbox_parked_count()
            parked = tuple(self.store.outbox_parked(PARKED_SHOWN))
            oldest_event = self.store.oldest_event_at()
        except StoreUnavailable:  # the store's state says why
            depth, parked_count, parked, oldest_event, unknown = 0, 0, (), None, True
        return Status(
            engines=self._engine_status(),
            outbox_depth=depth,
            decisions=dict(self._decisions),
            member_count=self.store.count_members(),
            outbox_parked=parked_count,
            parked=parked,
            refusals=self._refusals(),
            purge_pending_since=self.store.purge_pending_since(),
            oldest_event_time=oldest_event,
            event_retention_days=self.event_retention_days,
            store=self.store.state(),
            shared_figures_unknown=unknown,
        )

    def retry_parked(self) -> int:
        """Put the parked outbox entries back in line; how many."""
        if self.replayer is None:
            raise CloudNotConfigured("no cloud engine is configured (FACEGATE_AZURE_ENDPOINT)")
        self.store.check_writable()
        return self.replayer.retry_parked()

    def sync_cloud(self, dry_run: bool, *, report_only: bool = False) -> SyncReport:
        """Start (or join) a reconciliation in the replayer's background and answer at once
        with it and the last finished one; with report_only, start nothing."""
        if self.replayer is None:
            raise CloudNotConfigured("no cloud engine is configured (FACEGATE_AZURE_ENDPOINT)")
        return self.replayer.request_reconcile(dry_run, report_only=report_only)

    def _check_absent(self, member_id: str) -> None:
        """Fail fast (before seconds of encoding) when the id is taken; create re-checks."""
        try:
            self.store.get_member(member_id)
        except MemberNotFound:
            return
        raise MemberAlreadyExists(member_id)

    def add_member_photos(self, member_id: str, photos: Sequence[bytes]) -> Member:
        validation.member_id(member_id)
        self.store.check_writable()
        self.store.get_member(member_id)
        templates = self._templates(photos)
        with self._membership:
            member = self.store.add_templates(member_id, templates, self.clock())
            if not self.store.applies_changes:
                self.engine.enrolled(member_id, templates)
        self._wake_cloud()
        return member

    def update_member(
        self, member_id: str, display_name: str, membership: Membership, paths: Sequence[str]
    ) -> Member:
        """Change the fields named by `paths` (a field mask, UPDATABLE), and only those, to
        their values in `display_name` and `membership`."""
        validation.member_id(member_id, "member.member_id")
        if not paths:
            raise InvalidArgument(
                "update_mask",
                "name the fields to change (e.g. membership.valid_until)",
                reason="UPDATE_MASK_MISSING",
            )
        for path in paths:
            if path not in UPDATABLE:
                raise InvalidArgument(
                    "update_mask",
                    f"{path!r} cannot be updated; the fields are {', '.join(UPDATABLE)}",
                    reason="UPDATE_MASK_INVALID",
                )
        self.store.check_writable()

        def change(current: Member) -> tuple[str, Membership]:
            name = current.display_name
            if "display_name" in paths:
                name = validation.display_name(display_name)
            changed = membership if "membership" in paths else current.membership
            fields = {
                f: getattr(membership, f)
                for f in MEMBERSHIP_FIELDS
                if f"membership.{f}" in paths and "membership" not in paths
            }
            if "membership.suspended" in paths and "membership.suspension_reason" not in paths:
                # Suspending or resuming replaces the reason: an old one never outlives it.
                fields["suspension_reason"] = membership.suspension_reason
            return name, validation.membership(replace(changed, **fields), "member.membership")

        with self._membership:  # the store reads and writes back in one go (a chain's: locked)
            member = self.store.update_member_with(member_id, change, self.clock())
        log.info("member updated", extra={"member_id": member_id, "fields": list(paths)})
        return member

    def list_member_photos(self, member_id: str, with_bytes: bool = False) -> list[MemberPhoto]:
        """The member's photos (their bytes too with `with_bytes`, where photos are kept)."""
        return self.store.photos(validation.member_id(member_id), with_bytes=with_bytes)

    def remove_member_photo(self, member_id: str, photo_id: int) -> Member:
        """Remove one photo: from the store and the engines at once, from the cloud person
        through the outbox. A member's last photo is refused (LastPhoto)."""
        validation.member_id(member_id)
        if photo_id <= 0:
            raise InvalidArgument("photo_id", "is required", reason="PHOTO_ID_MISSING")
        self.store.check_writable()
        with self._membership:
            member, removed = self.store.remove_photo(
                member_id, photo_id, self.clock(), cloud=self.replayer is not None
            )
            if not self.store.applies_changes:
                self.engine.template_removed(member_id, removed)
        self._wake_cloud()
        log.info("member photo removed", extra={"member_id": member_id, "photo_id": photo_id})
        return member

    def get_member(self, member_id: str) -> Member:
        member = self.store.get_member(validation.member_id(member_id))
        if self.replayer is None:
            return member
        return replace(member, cloud_state=self.replayer.cloud_state(member.member_id))

    def list_members(self, page_size: int, after: str) -> tuple[list[Member], str]:
        """A page of members, and the id to continue after ("" on the last page)."""
        limit = validation.page_size(page_size)
        members = self.store.list_members(limit + 1, after)
        if len(members) > limit:
            return members[:limit], members[limit - 1].member_id
        return members, ""

    def delete_member(self, member_id: str) -> None:
        validation.member_id(member_id)
        self.store.check_writable()
        with self._membership:
            self.store.delete_member(member_id, cloud=self.replayer is not None)
            if not self.store.applies_changes:
                self.engine.removed(member_id)
        self._wake_cloud()
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
