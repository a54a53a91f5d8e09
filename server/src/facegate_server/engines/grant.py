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
    """Within the threshold, and so is the runner-up, less than the margin further."""


def verdict(distance: float, runner_up_distance: float, threshold: float, margin: float) -> Verdict:
    """Grant the closest member within `threshold`, unless the runner-up is within it too
    and less than `margin` further (two members the threshold would each grant alone).

    `runner_up_distance` is the closest other member's (infinity when there is none). A
    runner-up beyond the threshold is a stranger to the face by the threshold's own
    measure, so it does not make the closest member's grant ambiguous: the margin costs
    refusals only when a second member passes the threshold, which happens more often as
    the gallery grows, which is when it protects (README: How the local engine decides).
    """
    if distance > threshold:
        return Verdict.UNKNOWN
    if runner_up_distance <= threshold and runner_up_distance - distance < margin:
        return Verdict.AMBIGUOUS
    return Verdict.GRANT
