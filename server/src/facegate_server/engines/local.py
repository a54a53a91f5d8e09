"""The local engine: dlib embeddings computed in worker processes, matched in-process.

The rules it decides by are engines/policy.py's; this module runs them: it sends a frame to
a worker (decode, detect, choose a face, measure it, encode it), matches the embedding
against the index and applies the policy.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from facegate_server.domain import (
    Candidate,
    Decision,
    Embedding,
    EngineKind,
    FaceTemplate,
    Identification,
    SearchResult,
)
from facegate_server.engines.base import Attempt
from facegate_server.engines.images import ImageRejected
from facegate_server.engines.index import FaceIndex
from facegate_server.engines.policy import (
    DecisionPolicy,
    MatchDecision,
    confidence,
    decide_match,
    decide_verification,
)
from facegate_server.engines.pool import ENROL, WorkerPool
from facegate_server.engines.worker import Analysis, FaceRules
from facegate_server.errors import InvalidArgument

log = logging.getLogger(__name__)

__all__ = ["LocalEngine", "WorkerPool"]

HINT_NO_FACE = "look at the camera"
HINT_MULTIPLE_FACES = "one person at a time, please"


def image_error(field: str, rejected: ImageRejected) -> InvalidArgument:
    return InvalidArgument(field, rejected.message, reason=rejected.reason)


class LocalEngine:
    """Identify against the in-memory index of enrolled templates, by `policy`."""

    kind = EngineKind.LOCAL
    name = "local"

    def __init__(
        self, pool: WorkerPool, index: FaceIndex, policy: DecisionPolicy | None = None
    ) -> None:
        self.pool = pool
        self.index = index
        self.policy = policy if policy is not None else DecisionPolicy()
        self._identify_rules = FaceRules(self.policy.dominant_face_ratio, self.policy.quality)
        self._search_rules = FaceRules(
            self.policy.dominant_face_ratio, self.policy.quality, encode_poor=True
        )
        self.enrol_rules = FaceRules(None, self.policy.quality)
        """Enrolment: only a lone face, of good quality, is encoded."""

    def analyse(
        self, data: bytes, timeout: float, field: str = "image", rules: FaceRules | None = None
    ) -> Analysis:
        try:
            future = self.pool.submit(data, rules or self._identify_rules, timeout=timeout)
            return self.pool.result(future, timeout)
        except ImageRejected as rejected:
            raise image_error(field, rejected) from None

    def analyse_many(
        self,
        photos: Sequence[bytes],
        timeout: float,
        field: str = "photos",
        rules: FaceRules | None = None,
    ) -> list[Analysis]:
        """Analyse photos in parallel (enrolment rules by default); errors name the photo."""
        rules = rules or self.enrol_rules
        deadline = time.monotonic() + timeout
        futures: list[cf.Future[Analysis]] = []
        current = 0  # the photo being submitted or waited for, to name in an error
        try:
            for data in photos:
                futures.append(
                    self.pool.submit(data, rules, priority=ENROL, timeout=timeout, photo=True)
                )
                current += 1
            results = []
            for current, future in enumerate(futures):  # noqa: B007 - named on error
                results.append(self.pool.result(future, deadline - time.monotonic()))
            return results
        except ImageRejected as rejected:
            raise image_error(f"{field}[{current}]", rejected) from None
        finally:
            for f in futures:
                f.cancel()  # the photos not started yet, after a failure

    def identify(
        self, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        return self.decide(self.analyse(image, timeout))

    def verify(
        self, member_id: str, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        """The frame analysed as for Identify, then compared with `member_id`'s photos only."""
        analysis = self.analyse(image, timeout)
        return self.decide(
            analysis,
            lambda embedding: decide_verification(
                member_id, self.index.distance(member_id, embedding), self.policy
            ),
        )

    def enrol(
        self, photos: Sequence[bytes], timeout: float, templates: Sequence[FaceTemplate]
    ) -> list[FaceTemplate]:
        """An embedding a photo; the first bad photo fails them all, naming it.

        Each photo must show exactly one face that passes the same quality limits as a
        turnstile frame (size, pose, brightness, sharpness), so no member is made from a
        template that would match poorly.
        """
        analyses = self.analyse_many(photos, timeout)
        limits = self.policy.quality
        enrolled = []
        for i, (template, analysis) in enumerate(zip(templates, analyses, strict=True)):
            if not analysis.boxes:
                raise InvalidArgument(
                    f"photos[{i}]", "no face was found in this photo", reason="PHOTO_NO_FACE"
                )
            if len(analysis.boxes) > 1:
                raise InvalidArgument(
                    f"photos[{i}]",
                    f"{len(analysis.boxes)} faces were found; an enrolment photo must show one",
                    reason="PHOTO_MULTIPLE_FACES",
                )
            if analysis.quality is None or analysis.embedding is None:
                explained = (
                    limits.explain(analysis.quality) if analysis.quality else "no usable face"
                )
                raise InvalidArgument(
                    f"photos[{i}]",
                    f"{explained}; enrol a sharp, well-lit photo facing the camera",
                    reason="PHOTO_POOR_QUALITY",
                )
            enrolled.append(
                replace(template, embedding=analysis.embedding, quality=analysis.quality)
            )
        return enrolled

    def enrolled(self, member_id: str, templates: Sequence[FaceTemplate]) -> None:
        self.index.add(member_id, [t.embedding for t in templates if t.embedding is not None])

    def removed(self, member_id: str) -> None:
        self.index.remove(member_id)

    def template_removed(self, member_id: str, template: FaceTemplate) -> None:
        if template.embedding is not None:
            self.index.remove_template(member_id, template.embedding)

    def knows(self, member_id: str) -> bool:
        return self.index.has(member_id)

    def close(self) -> None:
        self.pool.close()

    def search(self, image: bytes, timeout: float, max_candidates: int) -> SearchResult:
        """The decision `identify` would take on `image`, with the closest members.

        Poor-quality faces are encoded too, so their candidates show what the quality rule
        kept from deciding; frames with no face or no clearly nearest face have none.
        """
        analysis = self.analyse(image, timeout, rules=self._search_rules)
        candidates = []
        if analysis.embedding is not None:
            candidates = [
                Candidate(member_id, distance, confidence(distance))
                for member_id, distance in self.index.nearest(analysis.embedding, max_candidates)
            ]
        return SearchResult(self.decide(analysis), candidates, analysis.quality)

    def decide(
        self,
        analysis: Analysis,
        compare: Callable[[Embedding], MatchDecision] | None = None,
    ) -> Identification:
        """Apply the policy to a worker's analysis (see engines/policy.py for the rules).

        `compare` decides on a face good enough to decide on: by default a match against
        every member (Identify); Verify passes a comparison with one member.
        """
        if not analysis.boxes:
            return Identification(Decision.DENIED_NO_FACE, self.kind, hint=HINT_NO_FACE)
        face = analysis.face
        if face is None:
            largest = max(analysis.boxes, key=lambda b: b.area)
            return Identification(
                Decision.DENIED_MULTIPLE_FACES,
                self.kind,
                face_box=largest,
                hint=HINT_MULTIPLE_FACES,
            )
        assert analysis.quality is not None
        problem = self.policy.quality.problem(analysis.quality)
        if problem is not None:
            return Identification(
                Decision.DENIED_POOR_QUALITY, self.kind, face_box=face, hint=problem.hint
            )
        assert analysis.embedding is not None
        if compare is None:
            decided = decide_match(self.index.match(analysis.embedding), self.policy)
        else:
            decided = compare(analysis.embedding)
        return Identification(
            decided.decision,
            self.kind,
            member_id=decided.member_id,
            confidence=decided.confidence,
            face_box=face,
            hint=decided.hint,
        )
