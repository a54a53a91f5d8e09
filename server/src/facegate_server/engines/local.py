"""The local engine: dlib embeddings computed in worker processes, matched in-process.

The rules it decides by are engines/policy.py's; this module runs them: it sends a frame to
a worker (decode, detect, choose a face, measure it, encode it), matches the embedding
against the index and applies the policy.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import threading
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
from facegate_server.engines import worker
from facegate_server.engines.base import Attempt
from facegate_server.engines.images import ImageRejected, check_size
from facegate_server.engines.index import FaceIndex
from facegate_server.engines.policy import (
    DecisionPolicy,
    MatchDecision,
    confidence,
    decide_match,
    decide_verification,
)
from facegate_server.engines.worker import Analysis, FaceRules
from facegate_server.errors import InvalidArgument, RecognitionTimeout, RecognitionUnavailable

log = logging.getLogger(__name__)

__all__ = ["LocalEngine", "WorkerPool"]

HINT_NO_FACE = "look at the camera"
HINT_MULTIPLE_FACES = "one person at a time, please"


class WorkerPool:
    """A pool of recognition processes (spawned, never forked: gRPC threads don't fork)."""

    def __init__(
        self,
        workers: int,
        *,
        max_bytes: int,
        max_side: int,
        encoder: worker.Encoder = worker.DEFAULT_ENCODER,
        max_photo_bytes: int | None = None,
    ) -> None:
        """`max_bytes` bounds a frame, `max_photo_bytes` an enrolment photo (default: the
        same); `max_side` is the longest side decoded (engines/images.py)."""
        self.workers = workers
        self.encoder = encoder
        self._max_bytes = max_bytes
        self._max_photo_bytes = max_bytes if max_photo_bytes is None else max_photo_bytes
        self._max_side = max_side
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._pool = self._new_pool()

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=worker.init_worker,
            initargs=(self.encoder,),
        )

    def warm_up(self) -> None:
        """Start every worker and wait until each has loaded and run the models."""
        self._warm(self._pool)

    def _warm(self, pool: cf.ProcessPoolExecutor) -> None:
        pings = [pool.submit(worker.ping) for _ in range(self.workers)]
        try:
            for ping in pings:
                ping.result()
        except cf.BrokenExecutor:
            log.error("recognition workers failed to start")
            return
        self._ready.set()

    def submit(self, data: bytes, rules: FaceRules, *, photo: bool = False) -> cf.Future[Analysis]:
        """Start analysing one image (an enrolment photo if `photo`, with its own byte
        limit); the future raises ImageRejected for unusable bytes."""
        max_bytes = self._max_photo_bytes if photo else self._max_bytes
        check_size(data, max_bytes)
        if not self._ready.is_set():
            raise RecognitionUnavailable("the recognition workers are starting; retry shortly")
        pool = self._pool
        try:
            return pool.submit(worker.analyse, data, max_bytes, self._max_side, rules)
        except (cf.BrokenExecutor, RuntimeError):
            self._replace(pool)
            raise RecognitionUnavailable("the recognition workers are restarting; retry") from None

    def result(self, future: cf.Future[Analysis], timeout: float) -> Analysis:
        try:
            return future.result(timeout=max(0.0, timeout))
        except cf.TimeoutError:
            future.cancel()
            raise RecognitionTimeout(
                f"face recognition did not finish within {timeout * 1000:.0f} ms"
            ) from None
        except cf.BrokenExecutor:
            log.error("a recognition worker died; restarting the pool")
            self._replace(self._pool)
            raise RecognitionUnavailable(
                "a recognition worker crashed while processing this image"
            ) from None

    def _replace(self, broken: cf.ProcessPoolExecutor) -> None:
        """Swap in a new pool; it warms up in the background while callers get UNAVAILABLE."""
        with self._lock:
            if self._pool is not broken:
                return
            self._ready.clear()
            self._pool = self._new_pool()
            threading.Thread(
                target=self._warm, args=(self._pool,), name="warm-workers", daemon=True
            ).start()
        broken.shutdown(wait=False, cancel_futures=True)

    def pids(self) -> list[int]:
        """The process ids of the running recognition workers (none before they start)."""
        return sorted(self._pool._processes or ())

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


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
            return self.pool.result(self.pool.submit(data, rules or self._identify_rules), timeout)
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
        futures = []
        for i, data in enumerate(photos):
            try:
                futures.append(self.pool.submit(data, rules, photo=True))
            except ImageRejected as rejected:
                for f in futures:
                    f.cancel()
                raise image_error(f"{field}[{i}]", rejected) from None
        results = []
        for i, future in enumerate(futures):
            try:
                results.append(self.pool.result(future, timeout))
            except ImageRejected as rejected:
                for f in futures:
                    f.cancel()
                raise image_error(f"{field}[{i}]", rejected) from None
        return results

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
