"""Per-caller rate limits: a token bucket per (limit, caller), checked before the servicer.

Each limited method draws from a named bucket (`METHOD_LIMITS`): Identify and Verify (the
same camera's other question) from "identify", Enroll and AddMemberPhotos from "enroll",
each start of a WatchAccessEvents stream from "follow" (a reconnecting loop). A
bucket holds up to `burst` calls and refills at `rate` calls a second; a call finding it
empty is refused with RESOURCE_EXHAUSTED, reason RATE_LIMITED and a google.rpc.RetryInfo
saying when the next call will be admitted. Refused calls take nothing from the bucket.

The caller is the admitted identity (token name or certificate CN, from auth); on an open
server, where everybody is "anonymous", it is the caller's address. The clock is injected
(`time.monotonic` by default), so tests step time instead of sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import grpc

from facegate_server.errors import RateLimited
from facegate_server.rpc.auth import current_caller
from facegate_server.rpc.intercept import Refusals, guard_behaviour, peer_host, refuse

Clock = Callable[[], float]

_FACEGATE = "/facegate.v1.FaceGateService/"
METHOD_LIMITS: Final[Mapping[str, str]] = {
    _FACEGATE + "Identify": "identify",
    _FACEGATE + "Verify": "identify",
    _FACEGATE + "Enroll": "enroll",
    _FACEGATE + "AddMemberPhotos": "enroll",
    _FACEGATE + "WatchAccessEvents": "follow",
}
"""Which bucket each limited method draws from; other methods are not limited."""


@dataclass(frozen=True)
class Limit:
    name: str
    rate: float
    """Calls a second the bucket refills by."""
    burst: int
    """Calls a full bucket holds."""

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError(f"rate limit {self.name}: rate must be > 0 and burst >= 1")


class RateLimiter:
    """Token buckets, one per (limit, caller key), created full on first use."""

    def __init__(
        self,
        limits: Mapping[str, Limit],
        *,
        clock: Clock = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        """`limits`: full method name -> its Limit (methods not in it are unlimited)."""
        self.limits = dict(limits)
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # (tokens, at)
        self._lock = threading.Lock()

    def limit_for(self, full_method: str) -> Limit | None:
        return self.limits.get(full_method)

    def take(self, limit: Limit, key: str) -> float:
        """Take one call from `key`'s bucket: 0.0 if admitted, else seconds to wait."""
        with self._lock:
            now = self.clock()
            tokens, at = self._buckets.get((limit.name, key), (float(limit.burst), now))
            tokens = min(float(limit.burst), tokens + max(0.0, now - at) * limit.rate)
            if tokens >= 1.0:
                self._buckets[(limit.name, key)] = (tokens - 1.0, now)
                self._prune(now)
                return 0.0
            self._buckets[(limit.name, key)] = (tokens, now)
            return (1.0 - tokens) / limit.rate

    def _prune(self, now: float) -> None:
        """Forget buckets that have refilled (a fresh one is the same) when there are many."""
        if len(self._buckets) <= self.max_keys:
            return
        by_name = {limit.name: limit for limit in self.limits.values()}
        for (name, key), (tokens, at) in list(self._buckets.items()):
            limit = by_name[name]
            if tokens + (now - at) * limit.rate >= limit.burst:
                del self._buckets[(name, key)]


def method_limits(
    identify_rate: float,
    identify_burst: int,
    enroll_rate: float,
    enroll_burst: int,
    follow_rate: float = 0.0,
    follow_burst: int = 1,
) -> dict[str, Limit]:
    """The Limit of each limited method; a rate of 0 leaves its methods unlimited."""
    limits = {}
    if identify_rate > 0:
        limits["identify"] = Limit("identify", identify_rate, identify_burst)
    if enroll_rate > 0:
        limits["enroll"] = Limit("enroll", enroll_rate, enroll_burst)
    if follow_rate > 0:
        limits["follow"] = Limit("follow", follow_rate, follow_burst)
    return {method: limits[name] for method, name in METHOD_LIMITS.items() if name in limits}


class RateLimitInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls over their caller's rate. Put it after the AuthInterceptor."""

    def __init__(self, limiter: RateLimiter, refusals: Refusals | None = None) -> None:
        self.limiter = limiter
        self.refusals = refusals

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        full_method = handler_call_details.method
        limit = self.limiter.limit_for(full_method)
        if handler is None or limit is None:
            return handler
        take = self.limiter.take

        @asynccontextmanager
        async def within_limit(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
            started = time.perf_counter()
            caller = current_caller()
            if caller is None or caller.via == "open":
                key, fields = peer_host(context), {}
            else:
                key, fields = caller.name, caller.log_fields()
            delay = take(limit, key)
            if delay > 0:
                error = RateLimited(
                    f"over the {limit.name} rate limit ({limit.rate:g} calls a second, "
                    f"bursts of {limit.burst}); retry in {delay:.3g} s",
                    retry_delay=delay,
                    metadata={"limit": limit.name},
                )
                await refuse(context, full_method, error, started, self.refusals, **fields)
            yield

        return guard_behaviour(handler, within_limit)


def interceptor(
    identify: tuple[float, int],
    enroll: tuple[float, int],
    clock: Clock = time.monotonic,
    refusals: Refusals | None = None,
    follow: tuple[float, int] = (0.0, 1),
) -> RateLimitInterceptor:
    """The interceptor for (rate, burst) of Identify, of enrolment and of starting to
    follow the access log; rate 0 is no limit."""
    return RateLimitInterceptor(
        RateLimiter(method_limits(*identify, *enroll, *follow), clock=clock), refusals
    )
