"""The local engine: dlib embeddings computed in worker processes, matched in-process."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import threading
from collections.abc import Sequence

from facegate_server.domain import Decision, EngineKind, Identification
from facegate_server.engines import local_worker
from facegate_server.engines.index import FaceIndex
from facegate_server.engines.local_worker import Analysis
from facegate_server.errors import InvalidArgument, RecognitionTimeout, RecognitionUnavailable
from facegate_server.images import ImageRejected, check_size

log = logging.getLogger(__name__)

HINT_NO_FACE = "look at the camera"
HINT_MULTIPLE_FACES = "one person at a time, please"


def confidence(distance: float, threshold: float) -> float:
    """Map a descriptor distance to [0, 1]: 1 at distance 0, 0.5 at the threshold, 0 at twice it.

    Linear, so that 0.5 means "on the threshold" for every threshold, as Azure's
    confidenceThreshold does.
    """
    return min(1.0, max(0.0, 1.0 - distance / (2.0 * threshold)))


class WorkerPool:
    """A pool of recognition processes (spawned, never forked: gRPC threads don't fork)."""

    def __init__(self, workers: int, *, max_bytes: int, max_side: int) -> None:
        self.workers = workers
        self._max_bytes = max_bytes
        self._max_side = max_side
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._pool = self._new_pool()

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=local_worker.init_worker,
        )

    def warm_up(self) -> None:
        """Start every worker and wait until each has loaded and run the models."""
        self._warm(self._pool)

    def _warm(self, pool: cf.ProcessPoolExecutor) -> None:
        pings = [pool.submit(local_worker.ping) for _ in range(self.workers)]
        try:
            for ping in pings:
                ping.result()
        except cf.BrokenExecutor:
            log.error("recognition workers failed to start")
            return
        self._ready.set()

    def submit(self, data: bytes) -> cf.Future[Analysis]:
        """Start analysing one image; the future raises ImageRejected for unusable bytes."""
        check_size(data, self._max_bytes)
        if not self._ready.is_set():
            raise RecognitionUnavailable("the recognition workers are starting; retry shortly")
        pool = self._pool
        try:
            return pool.submit(local_worker.analyse, data, self._max_bytes, self._max_side)
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

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def image_error(field: str, rejected: ImageRejected) -> InvalidArgument:
    return InvalidArgument(field, rejected.message, reason=rejected.reason)


class LocalEngine:
    """Identify against the in-memory index of enrolled templates."""

    kind = EngineKind.LOCAL

    def __init__(self, pool: WorkerPool, index: FaceIndex, threshold: float) -> None:
        self.pool = pool
        self.index = index
        self.threshold = threshold

    def analyse(self, data: bytes, timeout: float, field: str = "image") -> Analysis:
        try:
            return self.pool.result(self.pool.submit(data), timeout)
        except ImageRejected as rejected:
            raise image_error(field, rejected) from None

    def analyse_many(
        self, photos: Sequence[bytes], timeout: float, field: str = "photos"
    ) -> list[Analysis]:
        """Analyse photos in parallel; errors name the photo (`photos[2]`)."""
        futures = []
        for i, data in enumerate(photos):
            try:
                futures.append(self.pool.submit(data))
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

    def identify(self, image: bytes, timeout: float) -> Identification:
        analysis = self.analyse(image, timeout)
        return self.decide(analysis)

    def decide(self, analysis: Analysis) -> Identification:
        if not analysis.boxes:
            return Identification(Decision.DENIED_NO_FACE, self.kind, hint=HINT_NO_FACE)
        if len(analysis.boxes) > 1:
            largest = max(analysis.boxes, key=lambda b: b.area)
            return Identification(
                Decision.DENIED_MULTIPLE_FACES,
                self.kind,
                face_box=largest,
                hint=HINT_MULTIPLE_FACES,
            )
        box = analysis.boxes[0]
        match = self.index.match(analysis.embeddings[0])
        if match is None:
            return Identification(Decision.DENIED_UNKNOWN_FACE, self.kind, face_box=box)
        score = confidence(match.distance, self.threshold)
        if match.distance <= self.threshold:
            return Identification(
                Decision.GRANTED,
                self.kind,
                member_id=match.member_id,
                confidence=score,
                face_box=box,
            )
        return Identification(
            Decision.DENIED_UNKNOWN_FACE, self.kind, confidence=score, face_box=box
        )
