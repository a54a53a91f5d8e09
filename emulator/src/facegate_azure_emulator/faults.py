"""Added latency and injected faults: what makes the emulator behave like a far-away cloud.

Every Face API call first gets a fault decision, then the profile's latency, then is
answered. The fault modes (`FaultMode`):

- `healthy`: answered normally.
- `refuse`: the Face port refuses TCP connections (its listening socket is closed and
  open connections are dropped; the admin port keeps working).
- `hang`: the request is accepted and never answered, until the mode changes (then it
  is handled under the new mode), the client gives up (its task is cancelled), the
  emulator stops, or `hang_max_seconds` pass (then the connection is closed unanswered).
- `throttle`: 429 with a `Retry-After` header and the service's body.
- `error500`, `error503`: 500 / 503 with an error body.
- `slow`: answered normally after an extra fixed delay (`slow_seconds`, default 2 s).
- `flap`: each request draws one of the modes above (weights in `flap_weights`) from a
  seeded generator, so a run with the same seed and the same request order repeats.
  A drawn `refuse` drops that request's connection.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType


class FaultMode(StrEnum):
    HEALTHY = "healthy"
    REFUSE = "refuse"
    HANG = "hang"
    THROTTLE = "throttle"
    ERROR500 = "error500"
    ERROR503 = "error503"
    SLOW = "slow"
    FLAP = "flap"


DEFAULT_FLAP_WEIGHTS: Mapping[FaultMode, float] = MappingProxyType(
    {
        FaultMode.HEALTHY: 0.5,
        FaultMode.THROTTLE: 0.1,
        FaultMode.ERROR500: 0.1,
        FaultMode.ERROR503: 0.1,
        FaultMode.SLOW: 0.1,
        FaultMode.REFUSE: 0.05,
        FaultMode.HANG: 0.05,
    }
)


@dataclass(frozen=True)
class LatencyProfile:
    """Extra time added to each Face API answer, drawn between min_ms and max_ms.

    `uniform` draws evenly; `skewed` draws from a Beta(2, 5) stretched over the range:
    most calls near the low end (mode at 20% of the range), a long tail to the maximum,
    as measured cloud round trips look.
    """

    min_ms: float = 0.0
    max_ms: float = 0.0
    distribution: str = "uniform"
    name: str = "custom"

    def __post_init__(self) -> None:
        if not 0 <= self.min_ms <= self.max_ms:
            raise ValueError(f"latency needs 0 <= min_ms <= max_ms, got {self}")
        if self.distribution not in ("uniform", "skewed"):
            raise ValueError(f"latency distribution must be uniform or skewed: {self}")

    def sample(self, rng: random.Random) -> float:
        """One draw, in seconds."""
        if self.max_ms <= 0:
            return 0.0
        span = self.max_ms - self.min_ms
        fraction = rng.betavariate(2, 5) if self.distribution == "skewed" else rng.random()
        return (self.min_ms + span * fraction) / 1000.0

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "minMs": self.min_ms,
            "maxMs": self.max_ms,
            "distribution": self.distribution,
        }

    @staticmethod
    def named(name: str) -> LatencyProfile:
        try:
            return PROFILES[name]
        except KeyError:
            raise ValueError(
                f"unknown latency profile {name!r}; known: {', '.join(sorted(PROFILES))}"
            ) from None


PROFILES: Mapping[str, LatencyProfile] = {
    "none": LatencyProfile(0, 0, "uniform", "none"),
    # A turnstile's call to a cloud region far away: 700-1200 ms, most near 800 ms.
    "field": LatencyProfile(700, 1200, "skewed", "field"),
}


@dataclass(frozen=True)
class FaultSettings:
    """The fault mode and its knobs; replaced whole on each change."""

    mode: FaultMode = FaultMode.HEALTHY
    slow_seconds: float = 2.0
    retry_after_seconds: int = 1
    hang_max_seconds: float = 120.0
    flap_weights: Mapping[FaultMode, float] = field(default_factory=lambda: DEFAULT_FLAP_WEIGHTS)

    def __post_init__(self) -> None:
        if self.slow_seconds < 0 or self.hang_max_seconds < 0 or self.retry_after_seconds < 0:
            raise ValueError("slow_seconds, hang_max_seconds, retry_after_seconds must be >= 0")
        weights = dict(self.flap_weights)
        if FaultMode.FLAP in weights or any(w < 0 for w in weights.values()):
            raise ValueError("flap_weights: non-negative weights of modes other than flap")
        if sum(weights.values()) <= 0:
            raise ValueError("flap_weights: at least one weight must be positive")

    def to_json(self) -> dict[str, object]:
        return {
            "mode": self.mode.value,
            "slowSeconds": self.slow_seconds,
            "retryAfterSeconds": self.retry_after_seconds,
            "hangMaxSeconds": self.hang_max_seconds,
            "flapWeights": {m.value: w for m, w in self.flap_weights.items()},
        }


class FaultPicker:
    """Draws each request's fault and latency from seeded generators (event loop only)."""

    def __init__(self, settings: FaultSettings, latency: LatencyProfile, seed: int) -> None:
        self.settings = settings
        self.latency = latency
        self.seed = seed
        self._fault_rng = random.Random(seed)
        self._latency_rng = random.Random(seed + 1)

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self._fault_rng = random.Random(seed)
        self._latency_rng = random.Random(seed + 1)

    def choose(self) -> FaultMode:
        """This request's mode: the set mode, or under `flap` a weighted draw."""
        mode = self.settings.mode
        if mode is not FaultMode.FLAP:
            return mode
        modes = list(self.settings.flap_weights)
        weights = [self.settings.flap_weights[m] for m in modes]
        return self._fault_rng.choices(modes, weights)[0]

    def delay(self) -> float:
        return self.latency.sample(self._latency_rng)
