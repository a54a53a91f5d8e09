"""What FaceGate's server interceptors share: guarding a method's behaviour, and refusing
a call with a rich status and the one log line the call gets.

A `grpc.aio.ServerInterceptor` only sees the method name and metadata; the caller's
address and TLS identity live in the `ServicerContext`, which only the behaviour receives.
So each interceptor wraps the behaviour (`guard_behaviour`) with an async context manager
that admits or refuses the call on the event loop before the behaviour runs (and may set
context variables, such as the caller, for it). Behaviours are asyncio ones here: the
server's Dispatcher (rpc/server.py) turns the synchronous servicer's into coroutines.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, NoReturn

import grpc

from facegate_server.errors import FaceGateError
from facegate_server.rpc.status import code_of, to_status

log = logging.getLogger("facegate.rpc")

Behaviour = Callable[..., Any]
"""A method's behaviour: (request or request iterator, context) -> response(s)."""
Guard = Callable[[grpc.aio.ServicerContext[Any, Any]], AbstractAsyncContextManager[None]]


def method_name(full_method: str) -> str:
    """`/facegate.v1.FaceGateService/Identify` -> `Identify` (as the servicer logs it)."""
    return full_method.rsplit("/", 1)[-1]


def peer_host(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's address without its port: `ipv4:127.0.0.1:5123` -> `ipv4:127.0.0.1`."""
    peer = context.peer() or "unknown"
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


def _guarded(behaviour: Behaviour, guard: Guard) -> Behaviour:
    if inspect.isasyncgenfunction(behaviour):  # a streamed response, yielded

        async def streamed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with guard(context):
                async for response in behaviour(request, context):
                    yield response

        return streamed

    async def called(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async with guard(context):
            result = behaviour(request, context)
            return await result if inspect.isawaitable(result) else result

    return called


def guard_behaviour(
    handler: grpc.RpcMethodHandler[Any, Any], guard: Guard
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same method handler, its behaviour (of whichever streaming kind) run inside
    `guard(context)`."""
    deserializer, serializer = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _guarded(handler.unary_unary, guard), deserializer, serializer
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _guarded(handler.unary_stream, guard), deserializer, serializer
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _guarded(handler.stream_unary, guard), deserializer, serializer
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _guarded(handler.stream_stream, guard), deserializer, serializer
        )
    return handler


async def refuse(
    context: grpc.aio.ServicerContext[Any, Any],
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
    await context.abort_with_status(to_status(error))
    raise AssertionError("unreachable: abort_with_status raises")
