"""How the local engine decides: pure functions of measurements (no dlib, no I/O).

1. Which face: the only one, or the largest when it is clearly in front: its area at
   least `dominant_face_ratio` times the second largest's, or at least FRONT_AREA_RATIO
   times and in the middle of the frame with every other face at the side (choose_face);
   otherwise "one person at a time".
2. Quality of that face, checked in this order, each with a hint the turnstile can show:
   too small ("come closer"), turned ("look at the camera"), too dark ("step into the
   light"), blurred ("hold still"). Size and darkness come first because a small or dark
   face also measures as blurred.
3. The match: grant the closest member when their distance is at most `match_threshold`
   AND, if the runner-up member is within `match_threshold` too, it is at least
   `match_margin` further away. A member's distance is that of their closest enrolled
   photo (every photo is kept and matched). A face within the threshold of two members
   with too small a margin is DENIED_AMBIGUOUS. The rule itself is grant.verdict, which
   `facegate evaluate` also recomputes decisions with.
4. Verify (1:1) compares the face with the claimed member's photos only: granted when the
   closest is within `verify_threshold`; otherwise DENIED_NOT_THIS_MEMBER (also when no
   member has the id). No margin: there is no runner-up. Steps 1 and 2 are the same.
5. Confidence: a fixed map of distance to [0, 1] (`confidence`), the same whatever the
   threshold is configured to, so that it means the same from either engine.

The README's "How the local engine decides" has the measurements behind each default.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from facegate_server.config import Settings
from facegate_server.domain import Decision, FaceBox, FaceQuality
from facegate_server.engines.grant import Verdict, verdict
from facegate_server.engines.index import Match

CONFIDENCE_REFERENCE = 0.6
"""The distance that maps to confidence 0.5: dlib's 1:1 verification tolerance, as 0.5 is
Azure Face's default "same person" boundary for its confidence."""

CONFIDENCE_SLOPE = 10.0
"""Steepness of the logistic map, per unit of distance: the same-person distances
measured on the test photographs (0.06 to 0.52) map to 0.69 to 0.99."""


def confidence(distance: float) -> float:
    """Map a descriptor distance to [0, 1]: 1 / (1 + exp(10 (d - 0.6))).

    0.5 at d = 0.6 (the 1:1 boundary); 0.62 at the default gate threshold 0.55; 0.92 at
    0.35, a typical same-person distance; 0.27 at 0.7; about 0.998 at 0. Monotone, so an
    evaluation may sweep thresholds over it; it does not depend on the configured
    threshold, so it means the same on every server.
    """
    return 1.0 / (1.0 + math.exp(CONFIDENCE_SLOPE * (distance - CONFIDENCE_REFERENCE)))


def distance_for(score: float) -> float:
    """The inverse of `confidence`, for confidence in (0, 1)."""
    return CONFIDENCE_REFERENCE + math.log(1.0 / score - 1.0) / CONFIDENCE_SLOPE


class QualityProblem(enum.Enum):
    """Why a face is not good enough to decide on; the value is the turnstile's hint."""

    TOO_SMALL = "come closer"
    TURNED = "look at the camera"
    TOO_DARK = "step into the light"
    BLURRED = "hold still"

    @property
    def hint(self) -> str:
        return self.value


@dataclass(frozen=True)
class QualityLimits:
    """The least a face must measure to be decided on (and to be enrolled)."""

    min_face_px: int = 36
    max_yaw: float = 0.30
    min_pitch: float = 0.40
    min_brightness: float = 40.0
    min_sharpness: float = 15.0

    def problem(self, q: FaceQuality) -> QualityProblem | None:
        """The first limit `q` fails, or None when it passes them all."""
        if q.size < self.min_face_px:
            return QualityProblem.TOO_SMALL
        if abs(q.yaw) > self.max_yaw or q.pitch < self.min_pitch:
            return QualityProblem.TURNED
        if q.brightness < self.min_brightness:
            return QualityProblem.TOO_DARK
        if q.sharpness < self.min_sharpness:
            return QualityProblem.BLURRED
        return None

    def explain(self, q: FaceQuality) -> str:
        """The failed limit in words, with the measurement (for enrolment errors)."""
        problem = self.problem(q)
        if problem is QualityProblem.TOO_SMALL:
            return f"the face is too small ({q.size} px; at least {self.min_face_px} px)"
        if problem is QualityProblem.TURNED:
            return (
                f"the face is turned away from the camera (yaw {q.yaw:+.2f}, at most "
                f"±{self.max_yaw:.2f}; pitch {q.pitch:.2f}, at least {self.min_pitch:.2f})"
            )
        if problem is QualityProblem.TOO_DARK:
            return (
                f"the face is too dark (brightness {q.brightness:.0f}; "
                f"at least {self.min_brightness:.0f})"
            )
        if problem is QualityProblem.BLURRED:
            return (
                f"the face is blurred (sharpness {q.sharpness:.0f}; "
                f"at least {self.min_sharpness:.0f})"
            )
        return "the face is good enough"


@dataclass(frozen=True)
class DecisionPolicy:
    """The local engine's rules (FACEGATE_MATCH_THRESHOLD and friends, config.py)."""

    match_threshold: float = 0.55
    match_margin: float = 0.10
    dominant_face_ratio: float = 4.0
    quality: QualityLimits = field(default_factory=QualityLimits)
    verify_threshold: float = 0.55
    """Verify's 1:1 threshold (FACEGATE_VERIFY_THRESHOLD): genuine claims on the test
    photographs measure 0.02 to 0.53, impostor claims 0.66 and more
    (benchmarks/verify_threshold.py)."""


def decision_policy(settings: Settings) -> DecisionPolicy:
    """The policy the settings configure (their defaults are DecisionPolicy's)."""
    return DecisionPolicy(
        match_threshold=settings.match_threshold,
        match_margin=settings.match_margin,
        verify_threshold=settings.verify_threshold,
        dominant_face_ratio=settings.dominant_face_ratio,
        quality=QualityLimits(
            min_face_px=settings.min_face_px,
            max_yaw=settings.max_yaw,
            min_pitch=settings.min_pitch,
            min_brightness=settings.min_brightness,
            min_sharpness=settings.min_sharpness,
        ),
    )


FRONT_AREA_RATIO = 2.0
"""Of several faces, the largest is also chosen when its area is at least this many times
every other's (1.4 times the width: at most 0.7 times as far away) and the position says
it is the one in front: see `choose_face`."""

CENTRE_SHARE = 0.35
"""The chosen face's centre is at most this share of the half-width from the frame's
centre (the middle third of the frame, about): the person at the turnstile."""

EDGE_SHARE = 0.6
"""Every other face's centre is at least this share of the half-width from the frame's
centre (the outer fifths of the frame): people passing or queueing at the side. In
group/kit_with_rose.jpg the smaller face is at 0.52, beside the larger (at 0.20, area
2.05 times): one person at a time."""


def choose_face(
    boxes: Sequence[FaceBox],
    dominant_face_ratio: float | None,
    frame: tuple[int, int] | None = None,
) -> int | None:
    """The index of the face to decide on, or None (no face, or no face clearly in front).

    A lone face is chosen. Of several, the largest is chosen when it is clearly in front:
    - by size alone: its area is at least `dominant_face_ratio` times the second
      largest's (twice the width: the next person in the queue, twice as far away); or
    - by size and position, when the frame's (width, height) is given: its area is at
      least FRONT_AREA_RATIO times the second largest's, its centre is in the middle of
      the frame (CENTRE_SHARE) and every other face's centre is at the side (EDGE_SHARE).
    Two faces of about the same size, or a smaller one in the middle, are not chosen
    among. `dominant_face_ratio` None: never choose among several (enrolment).
    """
    if len(boxes) == 1:
        return 0
    if len(boxes) < 2 or dominant_face_ratio is None:
        return None
    order = sorted(range(len(boxes)), key=lambda i: boxes[i].area, reverse=True)
    largest, second = boxes[order[0]], boxes[order[1]]
    if largest.area >= dominant_face_ratio * second.area:
        return order[0]
    if frame is None or largest.area < min(FRONT_AREA_RATIO, dominant_face_ratio) * second.area:
        return None
    half_width = frame[0] / 2.0

    def off_centre(box: FaceBox) -> float:
        return abs(box.left + box.width / 2.0 - half_width) / half_width

    in_middle = off_centre(largest) <= CENTRE_SHARE
    others_aside = all(off_centre(boxes[i]) >= EDGE_SHARE for i in order[1:])
    return order[0] if in_middle and others_aside else None


@dataclass(frozen=True)
class MatchDecision:
    decision: Decision
    member_id: str = ""
    confidence: float = 0.0
    hint: str = ""


HINT_AMBIGUOUS = "please see the front desk"


def decide_verification(member_id: str, distance: float, policy: DecisionPolicy) -> MatchDecision:
    """Grant `member_id` when their closest photo is within the 1:1 threshold.

    `distance` is infinite when no member has the id: denied like any other face that is
    not theirs, with confidence 0.
    """
    score = confidence(distance) if math.isfinite(distance) else 0.0
    if distance <= policy.verify_threshold:
        return MatchDecision(Decision.GRANTED, member_id, score)
    return MatchDecision(Decision.DENIED_NOT_THIS_MEMBER, confidence=score)


def decide_match(match: Match | None, policy: DecisionPolicy) -> MatchDecision:
    """Grant the closest member only within the threshold, and ahead by the margin of a
    runner-up within the threshold too.

    Denials carry the closest member's confidence but never their id.
    """
    if match is None:
        return MatchDecision(Decision.DENIED_UNKNOWN_FACE)
    score = confidence(match.distance)
    found = verdict(
        match.distance, match.runner_up_distance, policy.match_threshold, policy.match_margin
    )
    if found is Verdict.UNKNOWN:
        return MatchDecision(Decision.DENIED_UNKNOWN_FACE, confidence=score)
    if found is Verdict.AMBIGUOUS:
        return MatchDecision(Decision.DENIED_AMBIGUOUS, confidence=score, hint=HINT_AMBIGUOUS)
    return MatchDecision(Decision.GRANTED, match.member_id, score)
