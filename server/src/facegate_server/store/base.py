"""The store: members, their face templates, and the access log, behind one interface.

Every implementation passes the same contract suite (tests/test_store_contract.py).
Writes are atomic: a member is created with all of its templates or not at all.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from datetime import datetime

from facegate_server.domain import (
    AccessEvent,
    Embedding,
    EventFilter,
    FaceTemplate,
    Member,
    NewAccessEvent,
)


class Store(abc.ABC):
    @abc.abstractmethod
    def create_member(
        self, member_id: str, display_name: str, templates: Sequence[FaceTemplate], now: datetime
    ) -> Member:
        """Create a member with its templates in one transaction; MemberAlreadyExists if taken."""

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
    def delete_member(self, member_id: str) -> None:
        """Delete a member, its templates and stored photos; MemberNotFound if there is none.

        Access events are kept: they hold no biometric data.
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

    def close(self) -> None:  # noqa: B027 - optional for implementations
        """Release resources."""
