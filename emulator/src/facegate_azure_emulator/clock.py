"""A clock for tests: it stands still until advanced, so nothing needs to sleep."""

from __future__ import annotations

import threading


class ManualClock:
    """Seconds since the epoch, moved only by `advance` (thread-safe).

    Pass it as `EmulatorSettings(clock=...)` to expire faceIds and finish trainings at once.
    """

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        with self._lock:
            self._now += seconds
