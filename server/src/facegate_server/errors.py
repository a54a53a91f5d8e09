"""Domain errors, and the one place that maps them to gRPC statuses.

    FaceGateError                     -> INTERNAL (unless a subclass says otherwise)
    ├── InvalidArgument               -> INVALID_ARGUMENT, with BadRequest field violations
    ├── MemberNotFound                -> NOT_FOUND
    ├── MemberAlreadyExists           -> ALREADY_EXISTS
    ├── RecognitionTimeout            -> DEADLINE_EXCEEDED
    ├── RecognitionUnavailable        -> UNAVAILABLE
    ├── CloudNotConfigured            -> FAILED_PRECONDITION
    ├── CloudUnavailable              -> UNAVAILABLE
    ├── Unauthenticated               -> UNAUTHENTICATED (no or unknown credentials)
    ├── PermissionDenied              -> PERMISSION_DENIED (the caller's role may not)
    └── RateLimited                   -> RESOURCE_EXHAUSTED, with a RetryInfo

Every status carries a google.rpc.Status with one ErrorInfo (domain "facegate.v1",
reason in UPPER_SNAKE_CASE). Messages never quote credentials or image bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "facegate.v1"


class FaceGateError(Exception):
    """A failure that the caller is told about, with a stable reason."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
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

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str, *, reason: str) -> None:
        super().__init__(f"{field}: {message}", reason=reason, metadata={"field": field})
        self.field = field
        self.description = message


class MemberNotFound(FaceGateError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "MEMBER_NOT_FOUND"

    def __init__(self, member_id: str) -> None:
        super().__init__(f"no member with id {member_id!r}", metadata={"member_id": member_id})


class MemberAlreadyExists(FaceGateError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "MEMBER_ALREADY_EXISTS"

    def __init__(self, member_id: str) -> None:
        super().__init__(
            f"member {member_id!r} is already enrolled (use AddMemberPhotos to add photos)",
            metadata={"member_id": member_id},
        )


class RecognitionTimeout(FaceGateError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "RECOGNITION_TIMEOUT"


class RecognitionUnavailable(FaceGateError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "RECOGNITION_UNAVAILABLE"


class CloudNotConfigured(FaceGateError):
    """A cloud operation (SyncCloud) on a server without a cloud engine."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "CLOUD_NOT_CONFIGURED"


class CloudUnavailable(FaceGateError):
    """The cloud could not be reached for an operation that needs it (SyncCloud)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "CLOUD_UNAVAILABLE"


class Unauthenticated(FaceGateError):
    """No credentials, or credentials FaceGate does not know (never quoted back)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "CREDENTIALS_MISSING"


class PermissionDenied(FaceGateError):
    """A known caller whose role may not call the method."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "ROLE_NOT_ALLOWED"


class RateLimited(FaceGateError):
    """The caller went over its rate; `retry_delay` seconds from now it may call again."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMITED"

    def __init__(
        self, message: str, *, retry_delay: float, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_delay = retry_delay


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status(error: FaceGateError) -> grpc.Status:
    """The gRPC status (with google.rpc details) that tells the caller about `error`."""
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
            )
        )
    ]
    if isinstance(error, InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=error.description
        )
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    if isinstance(error, RateLimited):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(0, math.ceil(error.retry_delay * 1000)) * 1_000_000)
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    code_number: int = getattr(code_pb2, error.code.name)
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code_number, message=error.message, details=details)
    )
    return status
