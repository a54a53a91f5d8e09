"""Real face detection and embeddings for the emulator, with the local engine's library.

The emulator recognises for real, with face_recognition / dlib (HOG detection, 5-point
alignment, 128-d embeddings), so an engine tested against it sees real rectangles and
real decisions. Images are decoded by `facegate_server.engines.images.decode` (limits checked
before decoding, truncated data refused).

dlib's shape predictor and encoder hold the GIL, so the work runs in worker processes
(`workers` >= 1, spawned) and never on the emulator's event loop: fault modes, latency
and the admin API stay responsive while a face is being encoded. `workers=0` runs it in
one thread instead (slower to answer admin calls while encoding, but no processes).

## Confidence

Azure reports a confidence in [0, 1] and treats 0.5 as "the same person" (Verify's
`isIdentical`, Identify's default `confidenceThreshold`). The emulator derives it from
the Euclidean distance d between two 128-d embeddings, with the match threshold T
(face_recognition's tolerance, 0.6 by default), exactly as FaceGate's local engine does:

    confidence = clip(1 - d / (2 T), 0, 1)

1.0 for identical embeddings, 0.5 at d = T, 0 at d >= 2 T. A person's distance is that of
their closest persisted face. So Azure's default threshold 0.5 means d <= 0.6 here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import math
import multiprocessing
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from facegate_server.engines.images import decode

DETECT_PIXELS = 1280 * 720
"""Detection runs on a copy scaled down to about this many pixels (HOG's cost grows with
pixels); smaller images are upsampled once so that small faces are still found."""

MAX_FACES = 100
"""The service returns at most 100 faces, largest first."""

Embedding = npt.NDArray[np.float64]

_face_recognition: Any = None
_load_lock = threading.Lock()


@dataclass(frozen=True)
class Box:
    left: int
    top: int
    width: int
    height: int

    def to_json(self) -> dict[str, int]:
        return {"width": self.width, "height": self.height, "left": self.left, "top": self.top}

    def iou(self, other: Box) -> float:
        """Intersection over union of two rectangles (0 when apart)."""
        left = max(self.left, other.left)
        top = max(self.top, other.top)
        right = min(self.left + self.width, other.left + other.width)
        bottom = min(self.top + self.height, other.top + other.height)
        if right <= left or bottom <= top:
            return 0.0
        inter = (right - left) * (bottom - top)
        union = self.width * self.height + other.width * other.height - inter
        return inter / union


@dataclass(frozen=True)
class Face:
    box: Box
    embedding: Embedding | None


@dataclass(frozen=True)
class Analysis:
    width: int
    height: int
    faces: list[Face]
    """Largest first, at most MAX_FACES."""


def confidence(distance: float, threshold: float) -> float:
    """Map an embedding distance to Azure's [0, 1] confidence: 0.5 at the threshold."""
    return min(1.0, max(0.0, 1.0 - distance / (2.0 * threshold)))


def _init_worker() -> None:
    """A recognition process: gone with the emulator, models loaded before any request."""
    from facegate_server.engines.worker import exit_with_parent

    exit_with_parent()
    load_models()


def load_models() -> None:
    """Import face_recognition (loads dlib's models) and warm it up once."""
    global _face_recognition
    with _load_lock:
        if _face_recognition is not None:
            return
        import warnings

        with warnings.catch_warnings():
            # face_recognition_models imports pkg_resources, which warns on import.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            import face_recognition
        from PIL import ImageFile

        # face_recognition turns on Pillow's "decode truncated images" at import; a cut-off
        # upload must be refused (InvalidImage), not decoded as a grey-padded frame.
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        rng = np.random.default_rng(0)
        frame = rng.integers(0, 255, size=(240, 320, 3), dtype=np.uint8)
        face_recognition.face_locations(frame, number_of_times_to_upsample=0, model="hog")
        face_recognition.face_encodings(frame, known_face_locations=[(50, 150, 150, 50)])
        _face_recognition = face_recognition


def ping() -> int:
    """A no-op task: submitted once per worker, it makes the pool start every worker."""
    return 1


def analyse(data: bytes, *, max_bytes: int, max_side: int, encode: bool) -> Analysis:
    """Decode, detect every face (largest first), and embed them when `encode`.

    Raises `facegate_server.engines.images.ImageRejected` for bytes that are not a usable image.
    """
    load_models()
    fr = _face_recognition
    from PIL import Image

    pixels = decode(data, max_bytes=max_bytes, max_side=max_side)
    height, width = pixels.shape[:2]
    scale = min(1.0, math.sqrt(DETECT_PIXELS / (width * height)))
    upsample = 1 if width * height * 4 <= DETECT_PIXELS else 0
    if scale < 1.0:
        small = Image.fromarray(pixels).resize(
            (max(1, round(width * scale)), max(1, round(height * scale))),
            Image.Resampling.BILINEAR,
        )
        detect_on = np.asarray(small)
    else:
        detect_on = pixels
    found = fr.face_locations(detect_on, number_of_times_to_upsample=upsample, model="hog")
    located: list[tuple[Box, tuple[int, int, int, int]]] = []
    for top, right, bottom, left in found:
        t = max(0, round(top / scale))
        r = min(width, round(right / scale))
        b = min(height, round(bottom / scale))
        lft = max(0, round(left / scale))
        if r > lft and b > t:
            located.append((Box(lft, t, r - lft, b - t), (t, r, b, lft)))
    located.sort(key=lambda item: item[0].width * item[0].height, reverse=True)
    located = located[:MAX_FACES]
    embeddings: list[Embedding | None] = [None] * len(located)
    if encode and located:
        encoded = fr.face_encodings(
            pixels, known_face_locations=[loc for _, loc in located], model="small"
        )
        embeddings = [np.asarray(e, dtype=np.float64) for e in encoded]
    return Analysis(
        width=width,
        height=height,
        faces=[Face(box, emb) for (box, _), emb in zip(located, embeddings, strict=True)],
    )


class Recognizer:
    """Runs `analyse` off the event loop: in `workers` spawned processes, or one thread.

    One Recognizer may serve several emulators (tests share one to load dlib once).
    """

    def __init__(self, workers: int = 1) -> None:
        if workers < 0:
            raise ValueError("workers must be >= 0")
        self.workers = workers
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> cf.Executor:
        if self.workers == 0:
            return cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="emulator-dlib")
        return cf.ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
        )

    def warm_up(self) -> None:
        """Start every worker and wait until each has loaded the models."""
        if self.workers == 0:
            self._pool.submit(load_models).result()
            return
        for future in [self._pool.submit(ping) for _ in range(self.workers)]:
            future.result()

    async def analyse(
        self, data: bytes, *, max_bytes: int, max_side: int, encode: bool
    ) -> Analysis:
        loop = asyncio.get_running_loop()
        call = functools.partial(
            analyse, data, max_bytes=max_bytes, max_side=max_side, encode=encode
        )
        with self._lock:
            pool = self._pool
        try:
            return await loop.run_in_executor(pool, call)
        except cf.BrokenExecutor:
            # A worker died (killed, out of memory): replace the pool for the next call.
            with self._lock:
                if self._pool is pool:
                    self._pool = self._new_pool()
            pool.shutdown(wait=False, cancel_futures=True)
            raise

    def close(self) -> None:
        with self._lock:
            self._pool.shutdown(wait=True, cancel_futures=True)
