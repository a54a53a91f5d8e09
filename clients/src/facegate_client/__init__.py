"""FaceGate client: typed calls to a FaceGate server, typed errors, and the `facegate` CLI.

    from facegate_client import FaceGateClient, NotFound

    with FaceGateClient("127.0.0.1:50051") as client:
        result = client.identify(frame, "gate-1")

Responses are the `facegate.v1` protobuf messages (`from facegate.v1 import
facegate_service_pb2 as pb`). Depends only on grpcio, protobuf and grpcio-status.
"""

from facegate_client.client import (
    CHANNEL_OPTIONS,
    DEFAULT_TARGET,
    KEEP,
    MAX_MESSAGE_BYTES,
    SERVICE_CONFIG,
    FaceGateClient,
)
from facegate_client.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FaceGateError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)

__all__ = [
    "CHANNEL_OPTIONS",
    "DEFAULT_TARGET",
    "KEEP",
    "MAX_MESSAGE_BYTES",
    "SERVICE_CONFIG",
    "AlreadyExists",
    "DeadlineExceeded",
    "FaceGateClient",
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
