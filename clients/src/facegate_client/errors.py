"""The exceptions the FaceGate client raises: one per gRPC status family.

Every failed call raises a `FaceGateError` subclass, never a raw `grpc.RpcError`:

    FaceGateError               any failed call (`code`, `message`, `reason`, `field_violations`)
    ├── InvalidArgument         INVALID_ARGUMENT, OUT_OF_RANGE
    ├── NotFound                NOT_FOUND
    ├── AlreadyExists           ALREADY_EXISTS
    ├── PermissionDenied        PERMISSION_DENIED
    ├── Unauthenticated         UNAUTHENTICATED
    ├── ResourceExhausted       RESOURCE_EXHAUSTED (`retry_delay` from a RetryInfo detail)
    ├── FailedPrecondition      FAILED_PRECONDITION
    ├── Unavailable             UNAVAILABLE
    ├── DeadlineExceeded        DEADLINE_EXCEEDED
    └── Internal                INTERNAL, UNKNOWN, DATA_LOSS and every other code

The server sends a `google.rpc.Status` in the trailers; `from_rpc_error` reads its
`ErrorInfo` (the stable, machine-readable `reason`) and `BadRequest` (which request field
was at fault, and why) details. `code` is always the status code actually received, so an
`Internal` raised for UNIMPLEMENTED still says UNIMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar, cast

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = [
    "AlreadyExists",
    "DeadlineExceeded",
    "FaceGateError",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]


class FaceGateError(Exception):
    """A FaceGate call failed.

    Attributes:
        code: the gRPC status code received.
        message: the status message.
        reason: the `ErrorInfo` reason (UPPER_SNAKE_CASE, stable), or None if the status
            carried none.
        field_violations: (field, description) pairs from a `BadRequest` detail.
        domain: the `ErrorInfo` domain ("facegate.v1"), or None.
        metadata: the `ErrorInfo` metadata.
    """

    grpc_status_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    """The code this class stands for; the one used when none is given."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        field_violations: Iterable[tuple[str, str]] = (),
        domain: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code: grpc.StatusCode = code if code is not None else self.grpc_status_code
        self.message = message
        self.reason = reason
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})

    def _notes(self) -> list[str]:
        notes = [] if self.reason is None else [f"reason {self.reason}"]
        notes.extend(f"{field}: {description}" for field, description in self.field_violations)
        return notes

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}" if self.message else str(self.code.name)
        notes = self._notes()
        return f"{text} ({'; '.join(notes)})" if notes else text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, message={self.message!r}, "
            f"reason={self.reason!r}, field_violations={self.field_violations!r})"
        )


class InvalidArgument(FaceGateError):
    """A request field is missing, malformed or out of bounds (see `field_violations`)."""

    grpc_status_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(FaceGateError):
    """No such member."""

    grpc_status_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(FaceGateError):
    """The member is already enrolled."""

    grpc_status_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(FaceGateError):
    """The caller may not do this."""

    grpc_status_code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(FaceGateError):
    """The caller has no valid credentials."""

    grpc_status_code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(FaceGateError):
    """A limit was hit (a message too large, a quota); `retry_delay` says when to retry."""

    grpc_status_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        field_violations: Iterable[tuple[str, str]] = (),
        domain: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(
            message,
            code=code,
            reason=reason,
            field_violations=field_violations,
            domain=domain,
            metadata=metadata,
        )
        self.retry_delay = retry_delay
        """Seconds to wait before retrying, from a `RetryInfo` detail; None if not sent."""

    def _notes(self) -> list[str]:
        notes = super()._notes()
        if self.retry_delay is not None:
            notes.append(f"retry after {self.retry_delay:g} s")
        return notes


class FailedPrecondition(FaceGateError):
    """The system is not in a state that allows this call."""

    grpc_status_code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(FaceGateError):
    """The server cannot be reached, or is starting or stopping; retry later."""

    grpc_status_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(FaceGateError):
    """The call did not finish within its deadline."""

    grpc_status_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(FaceGateError):
    """A server bug or an unexpected status (UNKNOWN, DATA_LOSS, UNIMPLEMENTED, ...)."""

    grpc_status_code = grpc.StatusCode.INTERNAL


_CLASS_BY_CODE: dict[grpc.StatusCode, type[FaceGateError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def from_rpc_error(err: grpc.RpcError) -> FaceGateError:
    """Build the typed exception for a failed call, with the details of its rich status.

    Details that cannot be read (no trailers, a malformed or inconsistent status) are
    ignored: the code and message are always kept.
    """
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    message = details_fn() if callable(details_fn) else None
    if not isinstance(message, str):
        message = str(err)

    reason: str | None = None
    domain: str | None = None
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    retry_delay: float | None = None
    try:
        # Duck-typed: every failed call of a sync stub is a grpc.Call; anything with
        # trailing_metadata() will do.
        has_trailers = hasattr(err, "trailing_metadata")
        status = rpc_status.from_call(cast(grpc.Call, err)) if has_trailers else None
    except (ValueError, DecodeError):
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if reason is None:
                reason, domain, metadata = (
                    info.reason or None,
                    info.domain or None,
                    dict(info.metadata),
                )
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend((v.field, v.description) for v in bad_request.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry_info = error_details_pb2.RetryInfo()
            detail.Unpack(retry_info)
            retry_delay = retry_info.retry_delay.ToTimedelta().total_seconds()

    cls = _CLASS_BY_CODE.get(code, Internal)
    if cls is ResourceExhausted:
        return ResourceExhausted(
            message,
            code=code,
            reason=reason,
            field_violations=violations,
            domain=domain,
            metadata=metadata,
            retry_delay=retry_delay,
        )
    return cls(
        message,
        code=code,
        reason=reason,
        field_violations=violations,
        domain=domain,
        metadata=metadata,
    )
