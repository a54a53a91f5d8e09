"""The domain's plain values: what the store keeps and the engines decide.

Protobuf stays at the edge (servicer.py, serde.py); everything here is a frozen dataclass
or an enum, so the store, the engines and the gate can be tested without gRPC.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

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
    DENIED_NOT_THIS_MEMBER = "DENIED_NOT_THIS_MEMBER"
    """Verify only: the face is not the claimed member's (or no such member is enrolled)."""
    DENIED_MEMBERSHIP_INACTIVE = "DENIED_MEMBERSHIP_INACTIVE"
    """Recognised, but the membership is not yet valid, has expired, or is suspended."""
    DENIED_OUTSIDE_HOURS = "DENIED_OUTSIDE_HOURS"
    """Recognised, but outside the member's access hours (site time)."""
    DENIED_OTHER_SITE = "DENIED_OTHER_SITE"
    """Recognised, but the membership is for other branches than this server's site."""
    # No decision, recorded in the access log only (the call fails; the gate stays shut):
    NOT_DECIDED_TIMEOUT = "NOT_DECIDED_TIMEOUT"
    """No engine decided in time (DEADLINE_EXCEEDED)."""
    NOT_DECIDED_BUSY = "NOT_DECIDED_BUSY"
    """Refused at once for load (RESOURCE_EXHAUSTED)."""
    NOT_DECIDED_UNAVAILABLE = "NOT_DECIDED_UNAVAILABLE"
    """No engine could decide at all (UNAVAILABLE)."""


class AccessKind(enum.Enum):
    """What a turnstile asked (names match facegate.v1.AccessKind)."""

    IDENTIFY = "IDENTIFY"
    """Who is this? (1:N, every member)"""
    VERIFY = "VERIFY"
    """Is this the member claimed? (1:1, a card or QR code names them)"""


class MembershipRule(enum.Enum):
    """Which membership rule refused a recognised member (names match
    facegate.v1.MembershipRule); see membership.py."""

    NOT_YET_VALID = "NOT_YET_VALID"
    EXPIRED = "EXPIRED"
    SUSPENDED = "SUSPENDED"
    OUTSIDE_HOURS = "OUTSIDE_HOURS"
    OTHER_SITE = "OTHER_SITE"


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
    transactions: int = 0
    """Paid calls this engine spent on the frame (the cloud's transactions)."""


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
class FaceQuality:
    """What the worker measured of one face (see worker.measure_quality)."""

    size: int
    """The longer side of the face box, in pixels (HOG boxes are square, so the longer
    side is the face's scale even when the frame's edge cuts the box)."""
    sharpness: float
    """Detail left in the face: on the face crop scaled to 64x64 grey pixels, the variance
    of the second difference in the flattest of 4 directions (0, 45, 90, 135 degrees),
    scaled to a mean brightness of 128. The flattest direction catches motion blur, which
    leaves detail across the motion."""
    brightness: float
    """Mean luma (0 to 255) of the face crop."""
    yaw: float
    """How far the nose base sits sideways from the eyes' midpoint, over the distance
    between the eyes (0 facing the camera; signed: positive to the image's right)."""
    pitch: float
    """How far the nose base sits below the line of the eyes, over the distance between
    the eyes (about 0.75 facing the camera; smaller when the head tips back)."""


@dataclass(frozen=True)
class AccessWindow:
    """One weekly window of local wall-clock time at the site: from `start` minutes after
    midnight on `day` (0 Monday to 6 Sunday) to `end` minutes after midnight (1 to 1440).
    An `end` at or before `start` crosses midnight: the window ends on the next day, and
    belongs to the day it starts (Fri 22:00-02:00 lets a member in at 01:00 on Saturday)."""

    day: int
    start: int
    end: int


@dataclass(frozen=True)
class Membership:
    """What lets a recognised member in (membership.py decides by it); the defaults admit."""

    valid_from: datetime | None = None
    """The first instant the membership is valid (inclusive); None: since always."""
    valid_until: datetime | None = None
    """The first instant it is no longer valid (exclusive); None: no end."""
    suspended: bool = False
    suspension_reason: str = ""
    """The gym's own words ("unpaid", "holiday freeze"); kept only while suspended."""
    access_hours: tuple[AccessWindow, ...] = ()
    """Weekly windows of site time; empty: any time."""
    sites: tuple[str, ...] = ()
    """The sites (FACEGATE_SITE_ID) the member may enter; empty: every site."""


@dataclass(frozen=True)
class Member:
    member_id: str
    display_name: str
    face_count: int
    create_time: datetime
    update_time: datetime
    cloud_state: str = ""
    """The member in the cloud, in a few words (GetMember, when a cloud is configured)."""
    membership: Membership = Membership()


@dataclass(frozen=True)
class MemberPhoto:
    """One of a member's enrolled photos, as ListMemberPhotos shows it."""

    photo_id: int
    create_time: datetime
    quality: FaceQuality | None = None
    """What the local engine measured of the face at enrolment (None: not measured)."""
    photo: bytes | None = None
    """The photo itself, only when photos are kept (FACEGATE_KEEP_PHOTOS)."""


@dataclass(frozen=True)
class FaceTemplate:
    """One enrolled photo's embedding; the photo itself only when configured to keep it."""

    embedding: Embedding | None = None
    """The local engine's part (every stored template has one)."""
    photo: bytes | None = None
    cloud_photo: bytes | None = None
    """The photo to add to the member's cloud person: held in the outbox until it is sent,
    then dropped (unlike `photo`, which is kept only when so configured)."""
    quality: FaceQuality | None = None
    """What the local engine measured of the photo's face (ListMemberPhotos shows it)."""


@dataclass(frozen=True)
class StoredFace:
    """An enrolled face as the cloud sync sees it."""

    face_id: int
    member_id: str
    photo: bytes | None
    persisted_face_id: str | None
    photo_kept: bool = False
    """Whether the store keeps the photo (read with `Store.face_photo` when `photo` was
    not asked for)."""


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
    kind: AccessKind = AccessKind.IDENTIFY
    claimed_member_id: str = ""
    """Verify: the member the card named (`member_id` is set only when granted)."""
    detail: str = ""
    """Why, when the decision alone does not say (Verify: "no member with this id")."""
    rule: MembershipRule | None = None
    """The membership rule that refused a recognised member, if one did."""

    def stored(self, event_id: int, **changed: Any) -> AccessEvent:
        """This event as a store returns it: with its id (and `changed` fields)."""
        fields = {name: getattr(self, name) for name in NewAccessEvent.__dataclass_fields__}
        return AccessEvent(**(fields | changed), event_id=event_id)


@dataclass(frozen=True)
class AccessEvent(NewAccessEvent):
    event_id: int = 0


@dataclass(frozen=True)
class EventFilter:
    """Which access events to list; None or empty means no restriction."""

    member_id: str = ""
    """The events granted to the member, and the verifications that claimed them."""
    turnstile_id: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None
    decisions: tuple[Decision, ...] = ()
    """Only events with one of these decisions."""
    rule: MembershipRule | None = None
    """Only events refused by this membership rule."""

    def matches(self, event: NewAccessEvent) -> bool:
        """Whether `event` passes the filter (the stores' SQL says the same)."""
        if self.member_id and self.member_id not in (event.member_id, event.claimed_member_id):
            return False
        if self.turnstile_id and event.turnstile_id != self.turnstile_id:
            return False
        if self.start_time is not None and event.time < self.start_time:
            return False
        if self.end_time is not None and event.time >= self.end_time:
            return False
        if self.decisions and event.decision not in self.decisions:
            return False
        return self.rule is None or event.rule is self.rule


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
    rule: MembershipRule | None = None
    """The membership rule that refused a recognised member (the gate's `_admit`)."""


@dataclass(frozen=True)
class OutboxEntry:
    """A cloud change recorded with the local change, replayed in order until it succeeds.

    kind "add_face": make sure the member's cloud person exists and holds this face.
    kind "delete_member": make sure the member's cloud person is gone.
    kind "delete_face": make sure one face (a removed photo) is gone from the member's
    cloud person: by `persisted_face_id` when it is known, else by the face's tag.
    """

    seq: int
    kind: str
    member_id: str
    face_id: int | None = None
    photo: bytes | None = None
    attempts: int = 0
    last_error: str = ""
    parked: str = ""
    """Why the cloud refused this entry for its own sake; empty while it is in line."""
    persisted_face_id: str | None = None


@dataclass(frozen=True)
class CloudPerson:
    """The cloud's person for a member, as FaceGate remembers it."""

    member_id: str
    person_id: str
    ready: bool
    """True once a training that includes the member's first cloud faces has succeeded."""
    deleted: bool = False
    """The member is gone; the person waits in the outbox to be deleted in the cloud."""


@dataclass(frozen=True)
class Candidate:
    """An enrolled member and how close the face is to their closest photo."""

    member_id: str
    distance: float
    confidence: float


@dataclass(frozen=True)
class SearchResult:
    """SearchFaces: the decision Identify would take, and the closest members."""

    identification: Identification
    candidates: list[Candidate]
    quality: FaceQuality | None


@dataclass(frozen=True)
class EngineStatus:
    """How the routing and the cloud are doing."""

    policy: str = "local-only"
    circuit: str = "disabled"
    last_cloud_error: str = ""
    last_cloud_error_time: datetime | None = None
    cloud_training: str = ""
    cloud_transactions: dict[str, int] = field(default_factory=dict)
    cloud_readiness: str = ""
    outbox_waiting: str = ""
    cloud_cost: str = ""
    workers: tuple[WorkerStatus, ...] = ()
    """The local engine's recognition worker slots (none without one)."""
    recognition_queue: int = 0
    admission: dict[str, int] = field(default_factory=dict)
    """The recognition queue's counts (admitted, refused_full, lost, retried, ...)."""
    can_decide: bool = True
    """A recognition worker is running, or the cloud is reachable."""
    reconciliation: Reconciliation | None = None
    """The running reconciliation (`facegate sync`), else the last finished one."""


@dataclass(frozen=True)
class WorkerStatus:
    """One recognition worker slot."""

    slot: int
    state: str
    """starting, idle, busy or stopped."""
    pid: int
    jobs: int
    """Images its workers have analysed since the server started."""
    restarts: int
    """Workers it replaced (dead or hung) since the server started."""


@dataclass(frozen=True)
class StoreState:
    """The store as GetStatus shows it (the chain's: store/chain.py)."""

    kind: str = "local"
    """"local" (this server's own SQLite file) or "postgresql" (the chain's shared store)."""
    name: str = ""
    """The shared database (host, port, name; never a password)."""
    state: str = "local"
    """"local", or the shared store's: "connected" or "disconnected"."""
    copy_current: datetime | None = None
    """When the local copy of the gallery was last known equal to the shared store."""
    pending_events: int = 0
    """Access events kept locally until the shared store takes them."""
    applied_change: int = 0
    """The last change of the shared change log applied to the local copy."""
    last_error: str = ""


@dataclass(frozen=True)
class Status:
    """GetStatus: how the server, its engines and the cloud are doing."""

    engines: EngineStatus
    outbox_depth: int
    decisions: dict[str, int]
    member_count: int
    outbox_parked: int = 0
    parked: tuple[OutboxEntry, ...] = ()
    refusals: dict[str, int] = field(default_factory=dict)
    """Calls refused before the servicer, by "method/code/reason"."""
    purge_pending_since: datetime | None = None
    """Since when deleted data has been waiting to be purged from the store's files
    (another process holds a read transaction); None when nothing waits."""
    oldest_event_time: datetime | None = None
    """The oldest access event kept; None when the log is empty."""
    event_retention_days: int = 0
    """Access events are kept this many days (0: forever)."""
    store: StoreState = StoreState()
    shared_figures_unknown: bool = False
    """The shared store could not be read: the outbox's and the access log's figures are
    unknown (0 and None here)."""


class ChangeKind(enum.Enum):
    MISSING_PERSON = "missing_person"
    MISSING_FACE = "missing_face"
    ORPHAN_PERSON = "orphan_person"
    ORPHAN_FACE = "orphan_face"


@dataclass(frozen=True)
class Change:
    kind: ChangeKind
    member_id: str
    person_id: str
    detail: str
    applied: bool


@dataclass(frozen=True)
class Reconciliation:
    """A reconciliation of the cloud group with the store, as far as it has gone."""

    reconciliation_id: int
    dry_run: bool
    phase: str
    """queued, persons, members or done."""
    persons_checked: int = 0
    members_checked: int = 0
    changes_found: int = 0
    waiting: str = ""
    changes: tuple[Change, ...] = ()
    """The first differences found (at most cloud/sync.py's REPORTED)."""

    @property
    def running(self) -> bool:
        return self.phase != "done"


@dataclass(frozen=True)
class SyncReport:
    """SyncCloud's answer: the reconciliation started or joined, the last finished one."""

    running: Reconciliation | None
    finished: Reconciliation | None
