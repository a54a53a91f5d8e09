"""A circuit breaker for the cloud, with an injected clock (tests need no sleeps).

    closed ──(N failures in a row, or a 429)──▶ open ──(cool-down passes)──▶ half-open
      ▲                                                                        │
      └──────────────(the one probe succeeds)──────────────────────────────────┘
                               (the probe fails: open again)

While open, callers skip the cloud at once. A 429's Retry-After (when longer than the
cool-down) keeps it open that long.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 3,
        cooldown: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or cooldown <= 0:
            raise ValueError("failure_threshold must be >= 1 and cooldown > 0")
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._open_until = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> CircuitState:
        with self._lock:
            if self._state is CircuitState.OPEN and self._clock() >= self._open_until:
                return CircuitState.HALF_OPEN
            return self._state

    def allow(self) -> bool:
        """May the cloud be called now? In half-open state, only one caller (the probe) may."""
        with self._lock:
            if self._state is CircuitState.CLOSED:
                return True
            if self._state is CircuitState.OPEN:
                if self._clock() < self._open_until:
                    return False
                self._state = CircuitState.HALF_OPEN
                self._probe_in_flight = False
            if self._probe_in_flight:
                return False
            self._probe_in_flight = True
            return True

    def record_success(self) -> None:
        with self._lock:
            self._state = CircuitState.CLOSED
            self._failures = 0
            self._probe_in_flight = False

    def record_failure(self, retry_after: float | None = None) -> None:
        """Count a failure; `retry_after` (a 429's) opens the circuit at once for that long."""
        with self._lock:
            self._failures += 1
            self._probe_in_flight = False
            if (
                retry_after is not None
                or self._state is CircuitState.HALF_OPEN
                or self._failures >= self.failure_threshold
            ):
                self._state = CircuitState.OPEN
                self._open_until = self._clock() + max(self.cooldown, retry_after or 0.0)

    def release(self) -> None:
        """A call that ended neither in success nor failure (e.g. abandoned): free the probe."""
        with self._lock:
            self._probe_in_flight = False
