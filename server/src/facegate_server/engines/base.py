"""The recognition engine interface: what the gate and the router know of an engine.

Every engine — the local engine (engines/local.py), the Azure engine (cloud/engine.py), the
router that falls back between them (routing/router.py) and the in-memory fake that tests
use (engines/memory.py) — implements `RecognitionEngine`, and tests/test_engine_contract.py
runs one suite against each.

Enrolment goes through the engine in two steps around the store's transaction: `enrol`
adds, to each photo's template, what this engine needs to remember it (the local engine an
embedding, the cloud engine the photo to upload); once the store has committed the member,
`enrolled` lets the engine recognise them. `removed` forgets a member at once, and
`template_removed` one of a member's templates (a photo removed by RemoveMemberPhoto).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from facegate_server.domain import (
    EngineKind,
    EngineOutcome,
    FaceTemplate,
    Identification,
    SearchResult,
)
from facegate_server.errors import RecognitionUnavailable


@dataclass
class Attempt:
    """One identify or verify call, as its caller and the engine share it."""

    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set by the caller when it no longer waits: the engine makes no further paid call."""
    billed: int = 0
    """Paid calls the engine has made so far (the cloud's transactions)."""


class EngineFailure(RecognitionUnavailable):
    """An engine gave no answer for a frame, and why.

    `engine_fault` says whether the engine itself is failing (it timed out, throttled,
    errored: the router's circuit breaker counts it) or merely could not answer this frame
    (not trained yet, the frame refused): no reason to stop asking it.
    """

    def __init__(
        self,
        outcome: EngineOutcome,
        detail: str,
        *,
        retry_after: float | None = None,
        engine_fault: bool = True,
    ) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
        self.retry_after = retry_after
        self.engine_fault = engine_fault


class RecognitionEngine(Protocol):
    @property
    def kind(self) -> EngineKind:
        """Which engine answers (the router: the one that decides by its policy)."""
        ...

    @property
    def name(self) -> str:
        """What it is, for logs (e.g. "local", "azure", "cloud-first(azure, local)")."""
        ...

    def identify(
        self, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        """Decide on one frame within `timeout` seconds.

        Raises errors.InvalidArgument for unusable images, RecognitionTimeout when the
        time runs out, EngineFailure (a RecognitionUnavailable) when it cannot answer.
        """
        ...

    def verify(
        self, member_id: str, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        """Decide whether the face in one frame is `member_id`'s (1:1), within `timeout`.

        GRANTED (to `member_id`) or DENIED_NOT_THIS_MEMBER, or, before any comparison, the
        frame's own denials (no face, several faces, poor quality); never UNKNOWN_FACE or
        AMBIGUOUS. A member this engine does not know is DENIED_NOT_THIS_MEMBER after the
        same work as any other (the frame is still analysed), with confidence 0. Raises as
        `identify` does.
        """
        ...

    def search(self, image: bytes, timeout: float, max_candidates: int) -> SearchResult:
        """The decision `identify` would take, with the closest members (SearchFaces)."""
        ...

    def enrol(
        self, photos: Sequence[bytes], timeout: float, templates: Sequence[FaceTemplate]
    ) -> list[FaceTemplate]:
        """`templates` (one a photo) with this engine's part added; nothing is stored yet.

        Raises errors.InvalidArgument naming the first unusable photo (`photos[i]`).
        """
        ...

    def enrolled(self, member_id: str, templates: Sequence[FaceTemplate]) -> None:
        """The store committed `templates` for `member_id`: recognise them from now on."""
        ...

    def removed(self, member_id: str) -> None:
        """The store deleted `member_id`: never grant them again."""
        ...

    def template_removed(self, member_id: str, template: FaceTemplate) -> None:
        """The store deleted one of `member_id`'s templates (as it was stored, embedding
        included): never match it again; the member's other templates stay."""
        ...

    def knows(self, member_id: str) -> bool:
        """Whether this engine can recognise `member_id` now (the cloud: once trained)."""
        ...

    def close(self) -> None:
        """Release threads and processes."""
        ...
