"""The domain's plain values: what the store keeps and the engines decide.

Protobuf stays at the edge (servicer.py, serde.py); everything here is a frozen dataclass
or an enum, so the store, the engines and the gate can be tested without gRPC.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import numpy.typing as npt

Embedding = npt.NDArray[np.float64]
"""A 128-d face embedding (dlib's face descriptor)."""


class Decision(enum.Enum):
    """What the gate decided about a frame (names match facegate.v1.Decision)."""

    GRANTED = "GRANTED"
    DENIED_UNKNOWN_FACE = "DENIED_UNKNOWN_FACE"
    DENIED_NO_FACE = "DENIED_NO_FACE"
    DENIED_MULTIPLE_FACES = "DENIED_MULTIPLE_FACES"
    DENIED_POOR_QUALITY = "DENIED_POOR_QUALITY"
    DENIED_AMBIGUOUS = "DENIED_AMBIGUOUS"


class EngineKind(enum.Enum):
    """Which engine decided (names match facegate.v1.Engine)."""

    LOCAL = "LOCAL"
    AZURE = "AZURE"


class EngineOutcome(enum.Enum):
    """What one engine did for a frame (names match facegate.v1.EngineOutcome)."""

    DECIDED = "DECIDED"
    AGREED = "AGREED"
    NOT_USED = "NOT_USED"
    OUTRANKED = "OUTRANKED"
    DISAGREED = "DISAGREED"
    TIMED_OUT = "TIMED_OUT"
    CIRCUIT_OPEN = "CIRCUIT_OPEN"
    THROTTLED = "THROTTLED"
    ERROR = "ERROR"
    NOT_TRAINED = "NOT_TRAINED"


@dataclass(frozen=True)
class EngineReport:
    """One engine's part in a decision: kept in the response and the access log."""

    engine: EngineKind
    outcome: EngineOutcome
    decision: Decision | None = None
    member_id: str = ""
    confidence: float = 0.0
    detail: str = ""
    latency: timedelta | None = None


@dataclass(frozen=True)
class FaceBox:
    """A face's box in pixels of the (EXIF-oriented) image."""

    left: int
    top: int
    width: int
    height: int

    @property
    def area(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class Member:
    member_id: str
    display_name: str
    face_count: int
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class FaceTemplate:
    """One enrolled photo's embedding; the photo itself only when configured to keep it."""

    embedding: Embedding
    photo: bytes | None = None
    cloud_photo: bytes | None = None
    """The photo to add to the member's cloud person: held in the outbox until it is sent,
    then dropped (unlike `photo`, which is kept only when so configured)."""


@dataclass(frozen=True)
class StoredFace:
    """An enrolled face as the cloud sync sees it."""

    face_id: int
    member_id: str
    photo: bytes | None
    persisted_face_id: str | None


@dataclass(frozen=True)
class NewAccessEvent:
    time: datetime
    turnstile_id: str
    member_id: str
    decision: Decision
    engine: EngineKind
    confidence: float
    latency: timedelta
    reports: tuple[EngineReport, ...] = ()
    """What each engine did, when more than one was involved."""


@dataclass(frozen=True)
class AccessEvent(NewAccessEvent):
    event_id: int = 0


@dataclass(frozen=True)
class EventFilter:
    """Which access events to list; None or empty means no restriction."""

    member_id: str = ""
    turnstile_id: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None


@dataclass(frozen=True)
class Identification:
    """An engine's answer for one frame, before it is logged."""

    decision: Decision
    engine: EngineKind
    member_id: str = ""
    confidence: float = 0.0
    face_box: FaceBox | None = None
    hint: str = ""
    reports: tuple[EngineReport, ...] = ()
    cloud_transactions: int = 0


@dataclass(frozen=True)
class OutboxEntry:
    """A cloud change recorded with the local change, replayed in order until it succeeds.

    kind "add_face": make sure the member's cloud person exists and holds this face.
    kind "delete_member": make sure the member's cloud person is gone.
    """

    seq: int
    kind: str
    member_id: str
    face_id: int | None = None
    photo: bytes | None = None
    attempts: int = 0
    last_error: str = ""


@dataclass(frozen=True)
class CloudPerson:
    """The cloud's person for a member, as FaceGate remembers it."""

    member_id: str
    person_id: str
    ready: bool
    """True once a training that includes the member's first cloud faces has succeeded."""
    deleted: bool = False
    """The member is gone; the person waits in the outbox to be deleted in the cloud."""
