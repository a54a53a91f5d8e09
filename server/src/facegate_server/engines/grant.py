"""The grant rule alone: two distances in, a verdict out (no numpy, no engine).

The local engine decides with it (policy.decide_match), and `facegate evaluate`, which runs
where the engine is not loaded, recomputes decisions with it over a range of thresholds, so
the sweep it reports is the engine's rule and cannot drift from it.
"""

from __future__ import annotations

import enum


class Verdict(enum.Enum):
    """What the grant rule makes of the closest member and the runner-up."""

    GRANT = "grant"
    UNKNOWN = "unknown"
    """The closest member is further than the threshold."""
    AMBIGUOUS = "ambiguous"
    """Within the threshold, but the runner-up is less than the margin further."""


def verdict(distance: float, runner_up_distance: float, threshold: float, margin: float) -> Verdict:
    """Grant the closest member only within `threshold` and ahead of the runner-up by `margin`.

    `runner_up_distance` is the closest other member's (infinity when there is none).
    """
    if distance > threshold:
        return Verdict.UNKNOWN
    if runner_up_distance - distance < margin:
        return Verdict.AMBIGUOUS
    return Verdict.GRANT
