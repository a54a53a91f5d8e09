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
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, NoReturn

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


class Refusals:
    """Calls refused before the servicer, counted by method, code and reason (GetStatus).

    Refusals of callers FaceGate cannot hold to account (no or unknown credentials) and of
    callers over their rate are not logged one by one — nobody fills the disk with them:
    the 1st, 2nd, 4th, 8th... of each (method, code, reason) are logged, with the count so
    far. Other refusals (a known caller's role may not call the method) are logged each.
    """

    SAMPLED: Final = frozenset({"UNAUTHENTICATED", "RESOURCE_EXHAUSTED"})

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def count(self, method: str, code: str, reason: str) -> int:
        """Count one refusal; its number among refusals of the same kind."""
        with self._lock:
            key = f"{method}/{code}/{reason}"
            self._counts[key] += 1
            return self._counts[key]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


async def refuse(
    context: grpc.aio.ServicerContext[Any, Any],
    full_method: str,
    error: FaceGateError,
    started: float,
    counted: Refusals | None = None,
    **fields: Any,
) -> NoReturn:
    """Count and log the refused call (never its credentials; see Refusals for which are
    logged) and answer it with `error`'s status."""
    method, code = method_name(full_method), code_of(error).name
    number = 1 if counted is None else counted.count(method, code, error.reason)
    if code not in Refusals.SAMPLED or number & (number - 1) == 0:
        log.warning(
            "rpc",
            extra={
                "method": method,
                "peer": context.peer(),
                "code": code,
                "reason": error.reason,
                "error": error.message,
                "latency_ms": round((time.perf_counter() - started) * 1000, 1),
                **({"refused_so_far": number} if counted is not None else {}),
                **fields,
            },
        )
    await context.abort_with_status(to_status(error))
    raise AssertionError("unreachable: abort_with_status raises")
