"""The client-side rate limit of the Face API: one token bucket per resource share, on the
injected clock, shared by Identify and the outbox with Identify first.

The tiers' rates (Azure AI services quotas and limits for Face, read 2026-12-01:
https://learn.microsoft.com/azure/ai-services/computer-vision/identity-quotas-limits):
S0 10 transactions a second by default, F0 20 transactions a minute. Several servers on
one resource each keep to their share (FACEGATE_AZURE_RATE).

Identify comes first: a frame takes any token there is; the outbox takes one only while
the bucket holds more than a reserve kept for the doors, so enrolment work never makes a
turnstile wait for the cloud. Nobody sleeps here: a caller that finds no token is told
when there will be one, and decides (a frame goes to the local engine; the outbox backs
off until then).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

TIER_RATES = {"S0": 10.0, "F0": 20.0 / 60.0}
"""Transactions a second each tier allows by default."""


class CloudRate:
    def __init__(
        self,
        per_second: float,
        *,
        burst: float | None = None,
        reserve: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`per_second` 0 means no limit. `burst` defaults to one second's worth (at least
        2); `reserve`, the tokens the outbox leaves for Identify, to half the burst."""
        if per_second < 0:
            raise ValueError("per_second must be >= 0")
        self.per_second = per_second
        self.burst = burst if burst is not None else max(2.0, per_second)
        self.reserve = reserve if reserve is not None else self.burst / 2
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._updated = clock()

    @property
    def limited(self) -> bool:
        return self.per_second > 0

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.per_second)
        self._updated = now

    def take(self, *, urgent: bool) -> float:
        """Take a token: 0.0 if taken, else the seconds until one may be.

        `urgent` (Identify) may take the last token; the outbox leaves `reserve`."""
        if not self.limited:
            return 0.0
        with self._lock:
            self._refill()
            floor = 1.0 if urgent else 1.0 + self.reserve
            floor = min(floor, self.burst)
            if self._tokens >= floor:
                self._tokens -= 1.0
                return 0.0
            return (floor - self._tokens) / self.per_second

    def spare(self) -> float:
        """Tokens the outbox could take now (beyond the reserve); infinite without a limit."""
        if not self.limited:
            return float("inf")
        with self._lock:
            self._refill()
            return max(0.0, self._tokens - min(self.reserve, self.burst - 1.0))

    def hold_off(self, seconds: float) -> None:
        """The resource answered 429: no token for `seconds` (its Retry-After)."""
        if not self.limited or seconds <= 0:
            return
        with self._lock:
            self._refill()
            self._tokens = min(self._tokens, -seconds * self.per_second)
