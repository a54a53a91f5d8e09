"""The store: members, their face templates, the access log, and what FaceGate knows of
the cloud (its person and face ids, and the outbox of changes not yet sent), behind one
interface.

Every implementation passes the same contract suite (tests/test_store_contract.py).
Writes are atomic: a member is created with all of its templates, and with the outbox
entries that will copy them to the cloud, or not at all.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime

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

ANSWER_BY: ContextVar[float | None] = ContextVar("facegate_answer_by", default=None)
"""When the call being served must be answered (time.monotonic()), while a decision's
access event is written: a store whose log is across a network waits for it no longer
(store/chain.py), and keeps the event to send later instead."""


@contextmanager
def answer_within(time_left: float | None) -> Iterator[None]:
    """Set ANSWER_BY for what runs inside: `time_left` seconds from now (None: no bound)."""
    token = ANSWER_BY.set(None if time_left is None else time.monotonic() + time_left)
    try:
        yield
    finally:
        ANSWER_BY.reset(token)


def embedding_of(template: FaceTemplate) -> Embedding:
    """A stored template's embedding: every stored template has the local engine's."""
    if template.embedding is None:
        raise ValueError("a stored template needs an embedding (the local engine's part)")
    return template.embedding


class Store(abc.ABC):
    applies_changes: bool = False
    """True when the store itself tells the engines of every change of members (the
    chain, store/chain.py: each server's index follows the shared change log, whichever
    server made the change); the gate then does not."""

    def check_writable(self) -> None:  # noqa: B027 - only the chain's store can refuse
        """Raise StoreUnavailable when members cannot be changed now (the chain's store,
        cut off from PostgreSQL)."""

    def state(self) -> StoreState:
        """The store's state for GetStatus."""
        return StoreState()

    @abc.abstractmethod
    def create_member(
        self,
        member_id: str,
        display_name: str,
        templates: Sequence[FaceTemplate],
        now: datetime,
        membership: Membership | None = None,
    ) -> Member:
        """Create a member with its templates in one transaction; MemberAlreadyExists if taken.

        Each template with a `cloud_photo` gets an "add_face" outbox entry in the same
        transaction.
        """

    @abc.abstractmethod
    def update_member(
        self, member_id: str, display_name: str, membership: Membership, now: datetime
    ) -> Member:
        """Replace a member's display name and membership; MemberNotFound if there is none.
        (The gate merges a field mask into the member it read, under its lock.)"""

    def update_member_with(
        self,
        member_id: str,
        change: Callable[[Member], tuple[str, Membership]],
        now: datetime,
    ) -> Member:
        """Read the member, `change` it (its new display name and membership) and write it
        back; MemberNotFound if there is none. Here the caller's lock (the gate's) keeps
        the read and the write together; a store shared by several servers does both in
        one transaction (store/postgres.py)."""
        display_name, membership = change(self.get_member(member_id))
        return self.update_member(member_id, display_name, membership, now)

    @abc.abstractmethod
    def add_templates(
        self, member_id: str, templates: Sequence[FaceTemplate], now: datetime
    ) -> Member:
        """Add templates to a member in one transaction; MemberNotFound if there is none."""

    @abc.abstractmethod
    def get_member(self, member_id: str) -> Member:
        """The member; MemberNotFound if there is none."""

    @abc.abstractmethod
    def list_members(self, limit: int, after: str = "") -> list[Member]:
        """Up to `limit` members with ids greater than `after`, in id order."""

    @abc.abstractmethod
    def count_members(self) -> int:
        """How many members are enrolled."""

    @abc.abstractmethod
    def delete_member(self, member_id: str, *, cloud: bool = False) -> None:
        """Delete a member, its templates and stored photos; MemberNotFound if there is none.

        Photos still waiting in the outbox are dropped with them. With `cloud`, a
        "delete_member" outbox entry is added in the same transaction. Access events are
        kept: they hold no biometric data.
        """

    @abc.abstractmethod
    def photos(self, member_id: str, *, with_bytes: bool = False) -> list[MemberPhoto]:
        """The member's photos in the order they were added (the bytes only with
        `with_bytes`, and only those kept); MemberNotFound if there is none."""

    @abc.abstractmethod
    def remove_photo(
        self, member_id: str, photo_id: int, now: datetime, *, cloud: bool = False
    ) -> tuple[Member, FaceTemplate]:
        """Delete one of a member's templates in one transaction; the member as it is now
        and the template removed (its embedding: for the engines to forget).

        MemberNotFound, PhotoNotFound (not this member's), LastPhoto (the member's only one:
        delete the member instead). The face's "add_face" outbox entry, if still waiting, is
        dropped. With `cloud`, a "delete_face" outbox entry is added in the same transaction
        when the face may be in the cloud (its add was sent, or tried).
        """

    @abc.abstractmethod
    def iter_embeddings(self) -> Iterator[tuple[str, Embedding]]:
        """Every template's (member id, embedding): what the matching index is built from."""

    @abc.abstractmethod
    def record_event(self, event: NewAccessEvent) -> AccessEvent:
        """Append an event to the access log; returns it with its id."""

    @abc.abstractmethod
    def list_events(
        self, where: EventFilter, limit: int, before_id: int | None = None
    ) -> list[AccessEvent]:
        """Up to `limit` events matching `where`, newest first, older than `before_id`."""

    @abc.abstractmethod
    def delete_events_before(self, cutoff: datetime) -> int:
        """Delete the access events older than `cutoff` (retention); how many. Event ids
        are never reused afterwards."""

    @abc.abstractmethod
    def oldest_event_at(self) -> datetime | None:
        """The time of the oldest access event kept; None when there is none."""

    def purge_pending_since(self) -> datetime | None:
        """Since when deleted data has been waiting to be purged from the store's files
        (the SQLite store's WAL, while another process reads); None when nothing waits."""
        return None

    @abc.abstractmethod
    def events_after(self, after_id: int, where: EventFilter, limit: int) -> list[AccessEvent]:
        """Up to `limit` events matching `where` with ids greater than `after_id`, oldest
        (lowest id) first: what a follower of the log reads next (WatchAccessEvents).

        Ids are the log's total order: an event is visible here only once every event
        with a lower id is (a follower that resumes after the last id it saw misses
        nothing), and an id is never reused, even after older events are deleted.
        """

    @abc.abstractmethod
    def store_id(self) -> str:
        """This store's identity: made once, when the store is created, and never changed.

        Every cloud person this store makes is tagged with it (cloud/azure.py), so that
        stores sharing one Face API resource, even one group, never touch each other's."""

    # The outbox: cloud changes, oldest first.
    @abc.abstractmethod
    def outbox(self, limit: int) -> list[OutboxEntry]:
        """The oldest `limit` entries not yet done and not parked."""

    @abc.abstractmethod
    def outbox_depth(self) -> int:
        """How many entries are not yet done and not parked."""

    @abc.abstractmethod
    def outbox_members(self) -> set[str]:
        """The members with an entry not yet done, parked or not (no photo is read)."""

    @abc.abstractmethod
    def outbox_park(self, seq: int, reason: str) -> None:
        """Set an entry aside (the cloud refused it for its own sake), with the reason."""

    @abc.abstractmethod
    def outbox_parked(self, limit: int) -> list[OutboxEntry]:
        """The oldest `limit` parked entries, without their photos."""

    @abc.abstractmethod
    def outbox_of(self, member_id: str) -> list[OutboxEntry]:
        """The member's entries not yet done, parked or not, oldest first, without photos."""

    @abc.abstractmethod
    def outbox_parked_count(self) -> int:
        """How many entries are parked."""

    @abc.abstractmethod
    def outbox_unpark(self) -> int:
        """Put every parked entry back in line (`facegate sync --retry-parked`); how many."""

    @abc.abstractmethod
    def outbox_attempt(self, seq: int, error: str = "") -> None:
        """Count an attempt at an entry (before it is sent), or record why it failed."""

    @abc.abstractmethod
    def outbox_done(self, seq: int) -> None:
        """Remove an entry that has taken effect in the cloud (its photo goes with it)."""

    # What FaceGate knows of the cloud.
    @abc.abstractmethod
    def cloud_person(self, member_id: str) -> CloudPerson | None:
        """The current member's cloud person, if it has been created."""

    @abc.abstractmethod
    def cloud_people(self) -> list[CloudPerson]:
        """Every cloud person FaceGate remembers, those of deleted members included."""

    def cloud_people_version(self) -> int | None:
        """A number that changes whenever a cloud person is saved, changed or forgotten,
        by any server of the store (servers that do not replay the outbox follow the
        holder's persons by it); None where there is no cheaper check than reading them all
        (one server alone: it makes every change itself)."""
        return None

    @abc.abstractmethod
    def member_of_person(self, person_id: str) -> str | None:
        """The current member whose cloud person this is, or None (unknown or deleted)."""

    @abc.abstractmethod
    def save_cloud_person(self, member_id: str, person_id: str) -> None:
        """Remember the member's cloud person (not ready until trained)."""

    @abc.abstractmethod
    def forget_cloud_person(self, person_id: str) -> None:
        """The cloud person is gone."""

    @abc.abstractmethod
    def save_cloud_face(self, face_id: int, persisted_face_id: str) -> None:
        """Remember that a face has been added to the member's cloud person; the member
        needs training again before the cloud can use it."""

    @abc.abstractmethod
    def faces(self, member_id: str, *, photos: bool = True) -> list[StoredFace]:
        """The member's faces with their cloud ids, if any (empty when there is no member);
        without `photos`, no photo is read (`photo_kept` says which are kept)."""

    @abc.abstractmethod
    def face_photo(self, face_id: int) -> bytes | None:
        """One face's kept photo, if the store keeps it."""

    @abc.abstractmethod
    def training_queued(self) -> None:
        """A training has been queued: it covers every cloud face saved before now."""

    @abc.abstractmethod
    def training_succeeded(self) -> None:
        """The training last queued has succeeded: the members it covered are ready."""

    def close(self) -> None:  # noqa: B027 - optional for implementations
        """Release resources."""
