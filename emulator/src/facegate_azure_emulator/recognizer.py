"""Real face detection and embeddings for the emulator, with the local engine's code.

The emulator recognises for real, with the local engine's worker functions
(`facegate_server.engines.worker`: dlib's models loaded once, HOG detection, 5-point
alignment, 128-d embeddings), so an engine tested against it sees real rectangles and
real decisions. Only its detection budget differs (`DETECT_PIXELS`), and it keeps every
face rather than choosing one. Images are decoded by `facegate_server.engines.images.decode`
(limits checked before decoding, truncated data refused).

dlib's shape predictor and encoder hold the GIL, so the work runs in worker processes
(`workers` >= 1, spawned) and never on the emulator's event loop: fault modes, latency
and the admin API stay responsive while a face is being encoded. `workers=0` runs it in
one thread instead (slower to answer admin calls while encoding, but no processes).

## Confidence

Azure reports a confidence in [0, 1] and treats 0.5 as "the same person" (Verify's
`isIdentical`, Identify's default `confidenceThreshold`). The emulator derives it from
the Euclidean distance d between two 128-d embeddings, with the match threshold T
(face_recognition's tolerance, 0.6 by default), by a linear map:

    confidence = clip(1 - d / (2 T), 0, 1)

1.0 for identical embeddings, 0.5 at d = T, 0 at d >= 2 T. A person's distance is that of
their closest persisted face. So Azure's default threshold 0.5 means d <= 0.6 here.

This is not the local engine's map: `facegate_server.engines.policy.confidence` is
logistic, 1 / (1 + exp(10 (d - 0.6))), and does not depend on a threshold. Both give 0.5
at d = 0.6 and fall as d grows, but not alike (at d = 0.35: 0.92 there, 0.71 here), so
compare the two engines' decisions, not their confidences.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import math
import multiprocessing
import threading
from dataclasses import dataclass

import numpy as np
from facegate_server.domain import Embedding, FaceBox
from facegate_server.engines import worker
from facegate_server.engines.images import RGBImage, decode

AZURE_FORMATS = ("JPEG", "PNG", "GIF", "BMP")
"""What the Face API decodes (FaceGate's server takes more: engines/images.py)."""
DETECT_PIXELS = 1280 * 720
"""The emulator's detection budget (see `worker.detect_faces`): a copy scaled down to
about this many pixels, or upsampled once when the image has a quarter of them or fewer.
The local engine's is smaller (`worker.DETECT_PIXELS`, 853x480)."""

MAX_FACES = 100
"""The service returns at most 100 faces, largest first."""

SMALL_FACE_PIXELS = 1920 * 1080
"""Azure finds faces down to 36x36 pixels in images up to 1920x1080, proportionally larger
beyond ("Face identity input technicals"). The small-face pass looks at up to this many
pixels of the image, upsampled once (dlib's HOG then finds faces from about 36 pixels)."""

SMALL_FACE_SCALE = 0.8
"""The small-face pass looks at a copy at this fraction of those pixels' side, upsampled
once: 1.6 times the image. HOG then finds faces from about 34 pixels of the image (1.5
times found a 36-pixel face, 1.4 times did not), at two thirds of the cost of 2 times."""

SMALL_FACE_PASS_ABOVE = 36
"""The small-face pass runs only when the first pass's smallest findable face (about 80
pixels at its scale) is larger than this in the image's pixels."""

_FIRST_PASS_MIN_FACE = 80.0
"""dlib's HOG window: the smallest face it finds, in the pixels it detects on."""


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


def first_pass_min_face(width: int, height: int) -> float:
    """The smallest face (pixels of the image) the first pass finds: dlib's 80-pixel
    window at the scale `worker.detect_faces` detects on with DETECT_PIXELS."""
    scale = min(1.0, math.sqrt(DETECT_PIXELS / (width * height)))
    upsample = 2.0 if width * height * 4 <= DETECT_PIXELS else 1.0
    return _FIRST_PASS_MIN_FACE / (scale * upsample)


def detect_all(pixels: RGBImage, *, small_faces: bool) -> list[FaceBox]:
    """Every face, as Azure would find them: down to 36 pixels in images up to 1920x1080.

    The first pass is `worker.detect_faces` at DETECT_PIXELS (faces from about 120 pixels
    in a 1080p frame). When it finds at most one face (two or more are "several faces"
    whatever else is there) and could have missed faces of 36 pixels, a second pass looks
    for small ones: `worker.detect_faces` on a grey copy (dlib's HOG costs a third less on
    one channel than on three) of at most SMALL_FACE_PIXELS, scaled by SMALL_FACE_SCALE and
    upsampled once (1.6 times the image). Faces it finds that overlap none of the first
    pass's are added; the first pass's rectangles are kept, so the large face's embedding
    does not change.
    """
    found = worker.detect_faces(pixels, DETECT_PIXELS)
    height, width = pixels.shape[:2]
    if (
        not small_faces
        or len(found) > 1
        or first_pass_min_face(width, height) <= SMALL_FACE_PASS_ABOVE
    ):
        return found
    from PIL import Image

    scale = SMALL_FACE_SCALE * min(1.0, math.sqrt(SMALL_FACE_PIXELS / (width * height)))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    grey = np.asarray(Image.fromarray(pixels).convert("L").resize(size, Image.Resampling.BILINEAR))
    # A budget of four times its pixels: detect_faces upsamples it once, at full size.
    # dlib's HOG takes one channel as well as three.
    for box in worker.detect_faces(grey, 4 * size[0] * size[1]):
        left, top = round(box.left / scale), round(box.top / scale)
        right = min(width, round((box.left + box.width) / scale))
        bottom = min(height, round((box.top + box.height) / scale))
        if right <= left or bottom <= top:
            continue
        scaled = FaceBox(left=left, top=top, width=right - left, height=bottom - top)
        if all(_iou(scaled, other) < 0.3 for other in found):
            found.append(scaled)
    return found


def _iou(a: FaceBox, b: FaceBox) -> float:
    return Box(a.left, a.top, a.width, a.height).iou(Box(b.left, b.top, b.width, b.height))


def analyse(
    data: bytes, *, max_bytes: int, max_side: int, encode: bool, small_faces: bool = True
) -> Analysis:
    """Decode, detect every face (largest first), and embed them when `encode`.

    Raises `facegate_server.engines.images.ImageRejected` for bytes that are not a usable image.
    """
    worker.load_models()
    pixels = decode(  # Azure's formats, and its side limit a refusal (not a downscale)
        data, max_bytes=max_bytes, max_side=max_side, formats=AZURE_FORMATS, refuse_over_side=True
    )
    height, width = pixels.shape[:2]
    found = detect_all(pixels, small_faces=small_faces)
    boxes = sorted(found, key=lambda box: box.area, reverse=True)[:MAX_FACES]
    embeddings: list[Embedding | None] = [None] * len(boxes)
    if encode:
        embeddings = list(worker.encode_faces(pixels, boxes))
    return Analysis(
        width=width,
        height=height,
        faces=[
            Face(Box(b.left, b.top, b.width, b.height), embedding)
            for b, embedding in zip(boxes, embeddings, strict=True)
        ],
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
            initializer=worker.init_worker,
        )

    def warm_up(self) -> None:
        """Start every worker and wait until each has loaded the models."""
        if self.workers == 0:
            self._pool.submit(worker.load_models).result()
            return
        for future in [self._pool.submit(worker.ping) for _ in range(self.workers)]:
            future.result()

    async def analyse(
        self, data: bytes, *, max_bytes: int, max_side: int, encode: bool, small_faces: bool = True
    ) -> Analysis:
        loop = asyncio.get_running_loop()
        call = functools.partial(
            analyse,
            data,
            max_bytes=max_bytes,
            max_side=max_side,
            encode=encode,
            small_faces=small_faces,
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
