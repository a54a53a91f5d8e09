"""What the documented service refuses that a kind emulator would not: the tier's rate and
monthly quota, and Limited Access. Everything runs on the emulator's clock.

Sources (the README's "Strict behaviours" table quotes each):
- Tiers: "Azure Face service quotas and limits" (identity-quotas-limits): F0 20
  transactions a minute, S0 10 a second; a 429 when exceeded. F0: 1,000 persons per
  PersonGroup and LargePersonGroup, 30,000 transactions a month (Azure AI services
  pricing); S0: 10,000 persons per PersonGroup, 1,000,000 per LargePersonGroup.
- 429 bodies: the error-code table's `{"error": {"code": "429", "message": "Rate limit is
  exceeded."}}`, the Azure API Management forms seen in the field, `RateLimitExceeded`
  and `{"error": {"statusCode": 429, ...}}`, with or without `Retry-After`.
- The quota's 403: `{"error": {"statusCode": 403, "message": "Out of call volume quota ...
  Quota will be replenished in N days."}}` (the v1.0 reference's 403 for every call).
- Limited Access: the error-code table's 403 `UnsupportedFeature` ("Feature is not
  supported, missing approval for one or more of the following features:
  Identification,Verification."), the field's `InvalidRequest` with that as its
  `innererror`, and a detect answered without `faceId`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from facegate_azure_emulator.errors import FaceApiError
from facegate_azure_emulator.state import Limits

TIERS = ("S0", "F0")
THROTTLE_FORMS = ("rate-limit-exceeded", "status-code", "code-429")
LIMITED_ACCESS_MODES = ("granted", "denied", "no-face-id")
LIMITED_ACCESS_FORMS = ("inner-error", "unsupported-feature")

RATE_MESSAGE = "Rate limit is exceeded. Try again in {n} seconds."
QUOTA_MESSAGE = (
    "Out of call volume quota for FaceAPI. Quota will be replenished in {days:.2f} days."
)
UNSUPPORTED_MESSAGE = (
    "Feature is not supported, missing approval for one or more of the following features: "
    "Identification,Verification. Please apply for access at https://aka.ms/facerecognition"
)


@dataclass(frozen=True)
class Tier:
    name: str
    rate_per_second: float
    monthly_transactions: int | None
    """None: no quota (S0 is billed per call instead)."""
    limits: Limits


TIER = {
    "S0": Tier("S0", 10.0, None, Limits()),
    "F0": Tier(
        "F0",
        20 / 60,
        30_000,
        Limits(persons_per_person_group=1_000, persons_per_large_person_group=1_000),
    ),
}


def tier(name: str) -> Tier:
    try:
        return TIER[name]
    except KeyError:
        raise ValueError(f"tier must be one of {TIERS}, got {name!r}") from None


def check_choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
    return value


_EPSILON = 1e-6
"""Clock readings near 1.8e9 s carry about 2e-7 s of rounding: a call due is not refused."""


class RateLimiter:
    """A token bucket on the emulator's clock: `rate` calls a second, a burst of a second's
    calls (S0: 10) or, under one a second, a minute's (F0: 20). `None` or 0: no limit."""

    def __init__(self, clock: Callable[[], float], rate: float | None) -> None:
        self._clock = clock
        self.set_rate(rate)

    def set_rate(self, rate: float | None) -> None:
        if rate is not None and (rate < 0 or not math.isfinite(rate)):
            raise ValueError("the rate must be >= 0 calls a second")
        self.rate = rate or 0.0
        self.capacity = max(1.0, self.rate * (1.0 if self.rate >= 1 else 60.0))
        self._tokens = self.capacity
        self._at = self._clock()

    def take(self) -> int | None:
        """Spend one call; None when allowed, else the seconds to wait (at least 1)."""
        if self.rate == 0:
            return None
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1 - _EPSILON:
            self._tokens = max(0.0, self._tokens - 1)
            return None
        return max(1, math.ceil((1 - self._tokens) / self.rate - _EPSILON))


def throttled(form: str, seconds: int, retry_after_header: bool) -> tuple[Any, dict[str, str]]:
    """The 429's body and headers in the chosen documented form."""
    message = RATE_MESSAGE.format(n=seconds)
    body: dict[str, Any]
    if form == "status-code":
        body = {"error": {"statusCode": 429, "message": message}}
    elif form == "code-429":
        body = {"error": {"code": "429", "message": message}}
    else:
        body = {"error": {"code": "RateLimitExceeded", "message": message}}
    return body, ({"Retry-After": str(seconds)} if retry_after_header else {})


def days_to_next_month(now: float) -> float:
    """Until the quota is replenished: the first of the next month (UTC), in days."""
    today = datetime.fromtimestamp(now, UTC)
    year, month = (today.year + 1, 1) if today.month == 12 else (today.year, today.month + 1)
    return (datetime(year, month, 1, tzinfo=UTC).timestamp() - now) / 86400


def out_of_quota(now: float) -> tuple[int, dict[str, Any]]:
    return 403, {
        "error": {"statusCode": 403, "message": QUOTA_MESSAGE.format(days=days_to_next_month(now))}
    }


def unsupported_feature(form: str) -> FaceApiError:
    """The 403 of a resource without Limited Access approval, in the chosen form."""
    if form == "unsupported-feature":
        return FaceApiError(403, "UnsupportedFeature", UNSUPPORTED_MESSAGE)
    return FaceApiError(
        403,
        "InvalidRequest",
        "Invalid request has been sent.",
        inner={"code": "UnsupportedFeature", "message": UNSUPPORTED_MESSAGE},
    )
