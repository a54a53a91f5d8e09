"""The chain's store: the shared PostgreSQL store (the source of truth) and this server's
local copy of the gallery (store/replica.py), kept in step by a follower thread.

Every server decides locally: Identify and Verify read members from the local copy, and
the matching index changes only when the copy does (`applies_changes`: the gate leaves the
engines to this store). Changes of members go to PostgreSQL, which logs each in the same
transaction and NOTIFYs; the follower LISTENs on a connection of its own and, when woken,
every `poll` seconds, and after every reconnection, reads the changes after the last one
applied and applies them to the copy and the engines: deletions and membership updates
first, then the rest in log order. Applying copies a member as PostgreSQL has it then, so
applying twice changes nothing, and a change a later deletion removed is not applied; the
copy records the last change applied in the same local transaction.

While PostgreSQL cannot be reached, changes of members are refused (StoreUnavailable:
UNAVAILABLE, naming the store), and access events are kept in the local copy, each with
its origin (this server's id and a local sequence), and shipped in order when PostgreSQL
is back; the origin is unique there, so an event arrives once even if shipping is cut off
half-way. An event kept locally has no event id yet (0 in the response): it gets the
chain's id when it arrives, and appears in the access log from then on.

The WAN never holds a door: a decision's event waits for PostgreSQL at most `event_wait`
(and never past the call's deadline, store/base.py ANSWER_BY), on a thread of its own;
past that it is kept locally like an event decided offline, and later ones queue behind
it. Should the slow insert commit after all, shipping the kept copy finds its origin
there and inserts nothing: exactly once either way, and in order (the kept copy is
shipped before the later events, in one transaction, and the late insert, which takes
the same lock, either commits first or finds the shipped copy).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import psycopg

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
    StoreState,
)
from facegate_server.errors import StoreUnavailable
from facegate_server.store.base import ANSWER_BY, Store
from facegate_server.store.postgres import (
    CALL_TIMEOUT,
    CALL_TIMEOUT_S,
    CHANNEL,
    FOLLOWER_CALL_TIMEOUT_S,
    WATCHDOG,
    MemberChange,
    PostgresStore,
)
from facegate_server.store.replica import EngineChange, ReplicaStore

log = logging.getLogger(__name__)

BATCH = 1000
"""Changes applied in one local transaction; events shipped in one central one."""
ORIGIN_BLOCK = 1000
"""Origin sequence numbers reserved (one local write) at a time."""
EVENT_WAIT_S = 0.3
"""How long a decision's access event may wait for PostgreSQL before it is kept locally."""
PRIORITY = ("deleted", "updated")
"""Changes applied before the rest: who must no longer come in."""
CHANGE_WAIT_S = 1.0
"""How long a member change made here waits for a catch-up under way (the follower's, after
an outage) before it answers: that catch-up applies the change too, in the log's order."""


class Listener(Protocol):
    """The engines' hooks (engines/base.py RecognitionEngine)."""

    def enrolled(self, member_id: str, templates: Sequence[FaceTemplate]) -> None: ...
    def removed(self, member_id: str) -> None: ...
    def template_removed(self, member_id: str, template: FaceTemplate) -> None: ...


def ordered(changes: Sequence[MemberChange]) -> list[str]:
    """The members to copy for `changes`, each once: those deleted or updated first, then
    the rest in log order."""
    first = [c.member_id for c in changes if c.kind in PRIORITY]
    rest = [c.member_id for c in changes]
    return list(dict.fromkeys([*first, *rest]))


def utc_now() -> datetime:
    return datetime.now(UTC)


class ChainStore(Store):
    applies_changes = True

    def __init__(
        self,
        url: str,
        copy_path: Path,
        *,
        poll: float = 1.0,
        retry: float = 0.5,
        timeout: float = 3.0,
        event_wait: float = EVENT_WAIT_S,
        call_timeout: float = CALL_TIMEOUT_S,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.local = ReplicaStore(copy_path)
        self.central = PostgresStore(url, migrate=False, timeout=timeout, call_timeout=call_timeout)
        self.name = self.central.name
        self.poll, self.retry, self.clock = poll, retry, clock
        self.event_wait = event_wait
        self._inserts = concurrent.futures.ThreadPoolExecutor(8, "event-insert")
        self._apply_lock = threading.RLock()
        self._event_lock = threading.Lock()
        self._listener: Listener | None = None
        self._connected = False
        self._state_lock = threading.Lock()
        self._since = time.monotonic()
        self._last_error = ""
        self._outage = False  # the pool has failed since it was made
        self._origin = (0, 0)
        self._pending = self.local.pending_count()
        """Events kept locally that are in no central log yet, as far as this server knows."""
        self.server_id = self.local.store_id()
        """This server's identity, the origin of its events (made with its local copy)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._reconnected()
        except StoreUnavailable as error:
            self._lost(error)
            log.warning(
                "the shared store is unreachable: deciding from the local copy",
                extra={"store": self.name, "copy_current": str(self.local.current_at())},
            )

    # Connection state.
    @property
    def connected(self) -> bool:
        with self._state_lock:
            return self._connected

    def _lost(self, error: Exception) -> None:
        with self._state_lock:
            was, self._connected = self._connected, False
            # Why, once: a StoreUnavailable's own message already names the store.
            self._last_error = error.detail if isinstance(error, StoreUnavailable) else str(error)
            self._outage = True
            if was:
                self._since = time.monotonic()
        if was:
            log.warning("shared store lost", extra={"store": self.name, "error": str(error)})

    def _reconnected(self) -> None:
        """Migrate if needed, check the copy is of this store, catch up, ship events."""
        with self._state_lock:
            outage, self._outage = self._outage, False
        if outage:
            self.central.reopen()
        self.central.migrate()
        central_id = self.central.store_id()
        if self.local.meta("central_id") != central_id:
            if self.local.meta("central_id"):
                log.warning("the local copy is of another store: copying again")
            self._notify(self._reset(central_id))
        self.catch_up()  # before it says connected: its copy is current only then
        with self._state_lock:
            was, self._connected = self._connected, True
            self._last_error = ""
        self.ship()
        if not was:
            log.info("shared store connected", extra={"store": self.name})

    def _reset(self, central_id: str) -> list[EngineChange]:
        with self._apply_lock:
            seq, members = self.central.snapshot()
            self.local.set_meta("central_id", central_id)
            return self.local.apply(seq, sorted(members), members, self.clock(), everyone=True)

    def _central(self) -> PostgresStore:
        """The central store, or StoreUnavailable at once while it is out of reach."""
        if not self.connected:
            raise StoreUnavailable(self.name, self._last_error or "not connected")
        return self.central

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._central(), method)(*args, **kwargs)
        except StoreUnavailable as error:
            self._lost(error)
            raise

    def check_writable(self) -> None:
        self._central()

    def state(self) -> StoreState:
        with self._state_lock:
            connected, error = self._connected, self._last_error
        return StoreState(
            kind="postgresql",
            name=self.name,
            state="connected" if connected else "disconnected",
            copy_current=self.local.current_at(),
            pending_events=self._pending,
            applied_change=self.local.applied_seq(),
            last_error=error,
        )

    # Following the change log.
    def follow(self, listener: Listener) -> None:
        """Tell `listener` (the engines) of every change from now on, and start following."""
        self._listener = listener
        self._thread = threading.Thread(target=self._follow, name="store-follower", daemon=True)
        self._thread.start()

    def _notify(self, changes: Sequence[EngineChange]) -> None:
        if self._listener is None:
            return
        for change in changes:
            if change.kind == "removed":
                self._listener.removed(change.member_id)
            elif change.kind == "enrolled":
                self._listener.enrolled(change.member_id, change.templates)
            else:
                for template in change.templates:
                    self._listener.template_removed(change.member_id, template)

    def catch_up(self, wait: float | None = None, changed: str | None = None) -> int:
        """Apply every change logged after the last one applied; how many. A batch copies
        its deleted and updated members first (`ordered`); when more than one batch is
        pending, those anywhere in it are copied first of all, as they are now: after an
        outage with thousands of enrolments logged, a suspension logged last still takes
        effect first. The copy is stamped current only once nothing is pending.

        `wait`: how long to wait for another thread's catch-up under way (None: as long as
        it takes); when it does not end in time, 0: that catch-up applies what is logged by
        then. `changed`: the member a change made through this server named; when more than
        a batch is pending, it is copied as it is now with the first ones, and the rest is
        left to the follower (the change's caller is not held up by a long catch-up)."""
        done = 0
        if not self._apply_lock.acquire(timeout=-1 if wait is None else wait):
            return 0
        try:
            while True:
                applied = self.local.applied_seq()
                changes = self.central.changes_after(applied, BATCH)
                if not changes:
                    self.local.mark_current(self.clock())
                    return done
                if done == 0 and len(changes) == BATCH:  # more than a batch is pending
                    first = self.central.members_changed_as(applied, PRIORITY)
                    if changed is not None and changed not in first:
                        first = [*first, changed]
                    members = self.central.stored_members(first)
                    self._notify(
                        self.local.apply(applied, first, members, self.clock(), current=False)
                    )
                    if changed is not None:
                        return done
                names = ordered(changes)
                members = self.central.stored_members(names)
                told = self.local.apply(
                    changes[-1].seq, names, members, self.clock(), current=False
                )
                self._notify(told)
                done += len(changes)
        finally:
            self._apply_lock.release()

    def ship(self) -> int:
        """Send the events kept locally, oldest first, and forget them; how many arrived
        new (one already there, from an insert that committed after its wait, is not
        inserted again)."""
        arrived = 0
        while True:
            batch = self.local.pending_events(BATCH)
            if not batch:
                return arrived
            arrived += self.central.ship_events(self.server_id, batch)
            self.local.shipped([seq for seq, _ in batch])
            with self._event_lock:
                self._pending = self.local.pending_count()

    def _follow(self) -> None:
        limit = min(self.central.call_timeout, FOLLOWER_CALL_TIMEOUT_S)
        CALL_TIMEOUT.set(limit)  # this thread's calls: small ones
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.central.url, autocommit=True) as conn:
                    with WATCHDOG.guard(conn, limit):
                        conn.execute(f"LISTEN {CHANNEL}")
                    self._reconnected()
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=self.poll, stop_after=1):
                            pass
                        if not self.connected:  # a call failed, yet this connection works
                            self._reconnected()
                        self.catch_up()
                        if self._pending:
                            self.ship()
                        with WATCHDOG.guard(conn, limit):
                            conn.execute("SELECT 1")  # the LISTEN connection is alive
            except (psycopg.Error, StoreUnavailable) as error:
                self._lost(error)
            except Exception:  # never let the follower die: the next round retries
                log.exception("store follower")
                self._lost(RuntimeError("follower error"))
            self._stop.wait(self.retry)

    # Member changes: to the central store, then the copy (and the engines) catch up, so
    # that this server acts on its own change at once. Not behind a long catch-up (after an
    # outage, thousands of changes): that one applies it, and the change answers now.
    def _changed(self, method: str, member_id: str, *args: Any, **kwargs: Any) -> Any:
        result = self._call(method, member_id, *args, **kwargs)
        try:
            self.catch_up(wait=CHANGE_WAIT_S, changed=member_id)
        except StoreUnavailable as error:  # done centrally; the copy follows on reconnecting
            self._lost(error)
        return result

    def create_member(
        self,
        member_id: str,
        display_name: str,
        templates: Sequence[FaceTemplate],
        now: datetime,
        membership: Membership | None = None,
    ) -> Member:
        member: Member = self._changed(
            "create_member", member_id, display_name, templates, now, membership
        )
        return member

    def update_member(
        self, member_id: str, display_name: str, membership: Membership, now: datetime
    ) -> Member:
        member: Member = self._changed("update_member", member_id, display_name, membership, now)
        return member

    def update_member_with(
        self,
        member_id: str,
        change: Callable[[Member], tuple[str, Membership]],
        now: datetime,
    ) -> Member:
        """Read-modify-write on the central row, locked (not the local copy, which may be
        a second behind another server's change)."""
        member: Member = self._changed("update_member_with", member_id, change, now)
        return member

    def add_templates(
        self, member_id: str, templates: Sequence[FaceTemplate], now: datetime
    ) -> Member:
        member: Member = self._changed("add_templates", member_id, templates, now)
        return member

    def delete_member(self, member_id: str, *, cloud: bool = False) -> None:
        self._changed("delete_member", member_id, cloud=cloud)

    def remove_photo(
        self, member_id: str, photo_id: int, now: datetime, *, cloud: bool = False
    ) -> tuple[Member, FaceTemplate]:
        removed: tuple[Member, FaceTemplate] = self._changed(
            "remove_photo", member_id, photo_id, now, cloud=cloud
        )
        return removed

    # Members, read from the local copy.
    def get_member(self, member_id: str) -> Member:
        return self.local.get_member(member_id)

    def list_members(self, limit: int, after: str = "") -> list[Member]:
        return self.local.list_members(limit, after)

    def count_members(self) -> int:
        return self.local.count_members()

    def photos(self, member_id: str, *, with_bytes: bool = False) -> list[MemberPhoto]:
        return self.local.photos(member_id, with_bytes=with_bytes)

    def iter_embeddings(self) -> Iterator[tuple[str, Embedding]]:
        return self.local.iter_embeddings()

    # The access log.
    def _next_origin(self) -> int:
        start, end = self._origin
        if start >= end:
            start, end = self.local.reserve_origins(ORIGIN_BLOCK)
        self._origin = (start + 1, end)
        return start

    def record_event(self, event: NewAccessEvent) -> AccessEvent:
        """Into the central log when it is reachable and nothing waits before it; else
        kept locally (event id 0) and shipped in order; see the module's docstring for the
        bound on the wait."""
        started = time.monotonic()
        with self._event_lock:
            origin = self._next_origin()
            direct = self._pending == 0 and self.connected
        wait = self.event_wait
        if (answer_by := ANSWER_BY.get()) is not None:
            wait = min(wait, answer_by - started)
        if direct and wait > 0:
            # Concurrent calls insert concurrently: there is no order among them.
            insert = self._inserts.submit(self._insert, event, origin)
            try:
                return insert.result(timeout=wait)
            except concurrent.futures.TimeoutError:
                if not insert.cancel():  # under way: it may yet commit (shipping finds it)
                    log.warning(
                        "PostgreSQL took too long for an access event: kept locally",
                        extra={"store": self.name, "waited_s": round(wait, 3)},
                    )
            except StoreUnavailable:
                pass  # _insert said the store is lost
        with self._event_lock:
            self.local.keep_event(origin, event)
            self._pending += 1
        return event.stored(0)

    def _insert(self, event: NewAccessEvent, origin: int) -> AccessEvent:
        # A small call, on a thread of its own: cut after the follower's limit, not the
        # store's 60 s (a stopping server waits for these threads; review: 60 s to stop).
        CALL_TIMEOUT.set(min(self.central.call_timeout, FOLLOWER_CALL_TIMEOUT_S))
        try:
            return self.central.record_event_from(event, (self.server_id, origin))
        except StoreUnavailable as error:
            self._lost(error)
            raise

    def list_events(
        self, where: EventFilter, limit: int, before_id: int | None = None
    ) -> list[AccessEvent]:
        events: list[AccessEvent] = self._call("list_events", where, limit, before_id)
        return events

    def events_after(self, after_id: int, where: EventFilter, limit: int) -> list[AccessEvent]:
        events: list[AccessEvent] = self._call("events_after", after_id, where, limit)
        return events

    def delete_events_before(self, cutoff: datetime) -> int:
        return int(self._call("delete_events_before", cutoff))

    def oldest_event_at(self) -> datetime | None:
        oldest: datetime | None = self._call("oldest_event_at")
        return oldest

    def store_id(self) -> str:
        central_id = self.local.meta("central_id")
        if not central_id:
            raise StoreUnavailable(self.name, "never reached: its identity is unknown")
        return central_id

    # The outbox and the cloud's ids: central.
    def outbox(self, limit: int) -> list[OutboxEntry]:
        entries: list[OutboxEntry] = self._call("outbox", limit)
        return entries

    def outbox_depth(self) -> int:
        return int(self._call("outbox_depth"))

    def outbox_members(self) -> set[str]:
        members: set[str] = self._call("outbox_members")
        return members

    def outbox_park(self, seq: int, reason: str) -> None:
        self._call("outbox_park", seq, reason)

    def outbox_parked(self, limit: int) -> list[OutboxEntry]:
        entries: list[OutboxEntry] = self._call("outbox_parked", limit)
        return entries

    def outbox_of(self, member_id: str) -> list[OutboxEntry]:
        entries: list[OutboxEntry] = self._call("outbox_of", member_id)
        return entries

    def outbox_parked_count(self) -> int:
        return int(self._call("outbox_parked_count"))

    def outbox_unpark(self) -> int:
        return int(self._call("outbox_unpark"))

    def outbox_attempt(self, seq: int, error: str = "") -> None:
        self._call("outbox_attempt", seq, error)

    def outbox_done(self, seq: int) -> None:
        self._call("outbox_done", seq)

    def cloud_person(self, member_id: str) -> CloudPerson | None:
        person: CloudPerson | None = self._call("cloud_person", member_id)
        return person

    def cloud_people(self) -> list[CloudPerson]:
        people: list[CloudPerson] = self._call("cloud_people")
        return people

    def cloud_people_version(self) -> int | None:
        version: int | None = self._call("cloud_people_version")
        return version

    def member_of_person(self, person_id: str) -> str | None:
        member: str | None = self._call("member_of_person", person_id)
        return member

    def save_cloud_person(self, member_id: str, person_id: str) -> None:
        self._call("save_cloud_person", member_id, person_id)

    def forget_cloud_person(self, person_id: str) -> None:
        self._call("forget_cloud_person", person_id)

    def save_cloud_face(self, face_id: int, persisted_face_id: str) -> None:
        self._call("save_cloud_face", face_id, persisted_face_id)

    def faces(self, member_id: str, *, photos: bool = True) -> list[StoredFace]:
        faces: list[StoredFace] = self._call("faces", member_id, photos=photos)
        return faces

    def face_photo(self, face_id: int) -> bytes | None:
        photo: bytes | None = self._call("face_photo", face_id)
        return photo

    def training_queued(self) -> None:
        self._call("training_queued")

    def training_succeeded(self) -> None:
        self._call("training_succeeded")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._inserts.shutdown(wait=False, cancel_futures=True)
        self.central.close()
        self.local.close()
