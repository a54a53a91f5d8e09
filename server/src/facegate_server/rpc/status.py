"""The one place that maps domain errors (errors.py) to gRPC statuses.

Every status carries a google.rpc.Status with one ErrorInfo (domain "facegate.v1",
reason in UPPER_SNAKE_CASE); invalid input adds BadRequest field violations, a rate limit a
RetryInfo.
"""

from __future__ import annotations

import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from facegate_server import errors

ERROR_DOMAIN = "facegate.v1"

CODES: dict[type[errors.FaceGateError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.MemberNotFound: grpc.StatusCode.NOT_FOUND,
    errors.PhotoNotFound: grpc.StatusCode.NOT_FOUND,
    errors.LastPhoto: grpc.StatusCode.FAILED_PRECONDITION,
    errors.MemberAlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.RecognitionTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.RecognitionUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.CloudNotConfigured: grpc.StatusCode.FAILED_PRECONDITION,
    errors.CloudUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ServerStopping: grpc.StatusCode.UNAVAILABLE,
    errors.StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def code_of(error: errors.FaceGateError) -> grpc.StatusCode:
    """The canonical code for `error`: its class's, or its nearest base class's (INTERNAL)."""
    for kind in type(error).__mro__:
        if kind in CODES:
            return CODES[kind]
    return grpc.StatusCode.INTERNAL


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status(error: errors.FaceGateError) -> grpc.Status:
    """The gRPC status (with google.rpc details) that tells the caller about `error`."""
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
            )
        )
    ]
    if isinstance(error, errors.InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=error.description
        )
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    if isinstance(error, errors.RateLimited):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(0, math.ceil(error.retry_delay * 1000)) * 1_000_000)
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    code_number: int = getattr(code_pb2, code_of(error).name)
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code_number, message=error.message, details=details)
    )
    return status
