"""Domain errors: what a caller is told, with a stable reason (rpc/status.py maps them to
gRPC statuses).

    FaceGateError                     -> INTERNAL (unless a subclass says otherwise)
    ├── InvalidArgument               -> INVALID_ARGUMENT, with BadRequest field violations
    ├── MemberNotFound                -> NOT_FOUND
    ├── PhotoNotFound                 -> NOT_FOUND
    ├── LastPhoto                     -> FAILED_PRECONDITION
    ├── MemberAlreadyExists           -> ALREADY_EXISTS
    ├── RecognitionTimeout            -> DEADLINE_EXCEEDED
    ├── RecognitionUnavailable        -> UNAVAILABLE
    ├── CloudNotConfigured            -> FAILED_PRECONDITION
    ├── CloudUnavailable              -> UNAVAILABLE
    ├── StoreUnavailable              -> UNAVAILABLE (the shared store cannot be reached)
    ├── Unauthenticated               -> UNAUTHENTICATED (no or unknown credentials)
    ├── PermissionDenied              -> PERMISSION_DENIED (the caller's role may not)
    ├── ServerStopping                -> UNAVAILABLE (a follower of the log: reconnect)
    └── RateLimited                   -> RESOURCE_EXHAUSTED, with a RetryInfo
        ├── RecognitionBusy           -> RESOURCE_EXHAUSTED (the recognition queue is full,
        │                                or the image could not finish before its deadline)
        └── FollowersLimit            -> RESOURCE_EXHAUSTED (as many WatchAccessEvents
                                         streams as the server allows are open)

Messages never quote credentials or image bytes.
"""

from __future__ import annotations

from collections.abc import Mapping


class FaceGateError(Exception):
    """A failure that the caller is told about, with a stable reason."""

    reason: str = "INTERNAL"

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})


class InvalidArgument(FaceGateError):
    """A request field is missing, malformed or out of bounds."""

    def __init__(self, field: str, message: str, *, reason: str) -> None:
        super().__init__(f"{field}: {message}", reason=reason, metadata={"field": field})
        self.field = field
        self.description = message


class MemberNotFound(FaceGateError):
    reason = "MEMBER_NOT_FOUND"

    def __init__(self, member_id: str) -> None:
        super().__init__(f"no member with id {member_id!r}", metadata={"member_id": member_id})


class PhotoNotFound(FaceGateError):
    reason = "PHOTO_NOT_FOUND"

    def __init__(self, member_id: str, photo_id: int) -> None:
        super().__init__(
            f"member {member_id!r} has no photo {photo_id}",
            metadata={"member_id": member_id, "photo_id": str(photo_id)},
        )


class LastPhoto(FaceGateError):
    """RemoveMemberPhoto of a member's only photo: a member needs one (delete them instead)."""

    reason = "LAST_PHOTO"

    def __init__(self, member_id: str) -> None:
        super().__init__(
            f"photo is member {member_id!r}'s last: delete the member instead",
            metadata={"member_id": member_id},
        )


class MemberAlreadyExists(FaceGateError):
    reason = "MEMBER_ALREADY_EXISTS"

    def __init__(self, member_id: str) -> None:
        super().__init__(
            f"member {member_id!r} is already enrolled (use AddMemberPhotos to add photos)",
            metadata={"member_id": member_id},
        )


class RecognitionTimeout(FaceGateError):
    reason = "RECOGNITION_TIMEOUT"


class RecognitionUnavailable(FaceGateError):
    reason = "RECOGNITION_UNAVAILABLE"


class CloudNotConfigured(FaceGateError):
    """A cloud operation (SyncCloud) on a server without a cloud engine."""

    reason = "CLOUD_NOT_CONFIGURED"


class CloudUnavailable(FaceGateError):
    """The cloud could not be reached for an operation that needs it (SyncCloud)."""

    reason = "CLOUD_UNAVAILABLE"


class StoreUnavailable(FaceGateError):
    """The shared store (PostgreSQL) cannot be reached: what needs it (changes of members,
    the access log, the cloud's outbox) waits for it (the source of truth is central),
    while Identify and Verify go on from the local copy. The message says so for any
    request (the store cannot tell which asked), on one line."""

    reason = "STORE_UNAVAILABLE"

    def __init__(self, store: str, detail: str = "") -> None:
        detail = " ".join(detail.split())  # libpq's hints come on lines of their own
        super().__init__(
            f"the store {store} is unreachable"
            + (f" ({detail})" if detail else "")
            + ": this cannot be done until it is back (Identify and Verify go on from this"
            " server's local copy of the gallery)",
            metadata={"store": store},
        )
        self.store = store
        self.detail = detail


class Unauthenticated(FaceGateError):
    """No credentials, or credentials FaceGate does not know (never quoted back)."""

    reason = "CREDENTIALS_MISSING"


class PermissionDenied(FaceGateError):
    """A known caller whose role may not call the method."""

    reason = "ROLE_NOT_ALLOWED"


class RateLimited(FaceGateError):
    """The caller went over its rate; `retry_delay` seconds from now it may call again."""

    reason = "RATE_LIMITED"

    def __init__(
        self, message: str, *, retry_delay: float, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_delay = retry_delay


class RecognitionBusy(RateLimited):
    """Refused at once by the recognition queue (engines/admission.py): it is full, or this
    image could not be analysed before its deadline."""

    reason = "RECOGNITION_BUSY"


class ServerStopping(FaceGateError):
    """The server is stopping: a stream that would run on (WatchAccessEvents) ends; the
    caller reconnects, to this server once restarted or to another."""

    reason = "SERVER_STOPPING"


class FollowersLimit(RateLimited):
    """The server already has as many followers of the access log as it allows."""

    reason = "FOLLOWERS_LIMIT"
