"""What FaceGate's server interceptors share: wrapping a method's behaviour, and refusing
a call with a rich status and the one log line the call gets.

A `grpc.ServerInterceptor` only sees the method name and metadata; the caller's address
and TLS identity live in the `ServicerContext`, which only the behaviour receives. So each
interceptor wraps the behaviour (`wrap_behaviour`) and decides inside it, in the thread
that then runs the servicer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NoReturn

import grpc

from facegate_server.errors import FaceGateError
from facegate_server.rpc.status import code_of, to_status

log = logging.getLogger("facegate.rpc")

Behaviour = Callable[[Any, grpc.ServicerContext], Any]


def method_name(full_method: str) -> str:
    """`/facegate.v1.FaceGateService/Identify` -> `Identify` (as the servicer logs it)."""
    return full_method.rsplit("/", 1)[-1]


def peer_host(context: grpc.ServicerContext) -> str:
    """The caller's address without its port: `ipv4:127.0.0.1:5123` -> `ipv4:127.0.0.1`."""
    peer = context.peer() or "unknown"
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


def wrap_behaviour(
    handler: grpc.RpcMethodHandler[Any, Any], wrap: Callable[[Behaviour], Behaviour]
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same method handler, with its behaviour (of whichever streaming kind) wrapped."""
    deserializer, serializer = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary), deserializer, serializer
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream), deserializer, serializer
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary), deserializer, serializer
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            wrap(handler.stream_stream), deserializer, serializer
        )
    return handler


def refuse(
    context: grpc.ServicerContext,
    full_method: str,
    error: FaceGateError,
    started: float,
    **fields: Any,
) -> NoReturn:
    """Log the refused call (never its credentials) and answer it with `error`'s status."""
    log.warning(
        "rpc",
        extra={
            "method": method_name(full_method),
            "peer": context.peer(),
            "code": code_of(error).name,
            "reason": error.reason,
            "error": error.message,
            "latency_ms": round((time.perf_counter() - started) * 1000, 1),
            **fields,
        },
    )
    context.abort_with_status(to_status(error))
