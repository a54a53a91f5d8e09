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


class EngineKind(enum.Enum):
    """Which engine decided (names match facegate.v1.Engine)."""

    LOCAL = "LOCAL"
    AZURE = "AZURE"


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


@dataclass(frozen=True)
class NewAccessEvent:
    time: datetime
    turnstile_id: str
    member_id: str
    decision: Decision
    engine: EngineKind
    confidence: float
    latency: timedelta


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
