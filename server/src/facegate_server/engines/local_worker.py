"""What runs inside a recognition worker process: decode, detect, encode.

dlib's shape predictor and face encoder hold the GIL, so FaceGate runs them in worker
processes (one a core by default) and keeps matching in the server process. Nothing here
is imported by the server process except to name the functions it submits.

Detection runs on a copy scaled to about 853x480 pixels (HOG's cost grows with pixels;
smaller frames are upsampled once so that small faces are still found); encoding runs on
the full-resolution frame (its cost does not grow with pixels).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facegate_server.domain import Embedding, FaceBox
from facegate_server.images import decode

DETECT_PIXELS = 853 * 480

_face_recognition: Any = None


@dataclass(frozen=True)
class Analysis:
    """What a worker found in one image."""

    width: int
    height: int
    boxes: list[FaceBox]
    embeddings: list[Embedding]
    """Only computed when exactly one face was found (the only case a decision needs)."""
    stages_ms: dict[str, float] = field(default_factory=dict)


def init_worker() -> None:
    """Load dlib's models and run them once, so the first real request is not slow."""
    global _face_recognition
    import warnings

    with warnings.catch_warnings():
        # face_recognition_models imports pkg_resources, which warns on import.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        import face_recognition
    from PIL import ImageFile

    # face_recognition turns on Pillow's "decode truncated images" at import: a cut-off
    # upload would then be decoded as a grey-padded frame instead of being rejected.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    _face_recognition = face_recognition
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, size=(480, 853, 3), dtype=np.uint8)
    face_recognition.face_locations(frame, number_of_times_to_upsample=0, model="hog")
    face_recognition.face_encodings(frame, known_face_locations=[(100, 300, 300, 100)])


def ping() -> int:
    """A no-op task; submitting one a worker makes the pool start every worker."""
    return 1


def analyse(data: bytes, max_bytes: int, max_side: int) -> Analysis:
    """Find the faces in an image; encode the face when there is exactly one."""
    if _face_recognition is None:
        init_worker()
    fr = _face_recognition
    from PIL import Image

    started = time.perf_counter()
    pixels = decode(data, max_bytes=max_bytes, max_side=max_side)
    height, width = pixels.shape[:2]
    decoded = time.perf_counter()

    scale = min(1.0, math.sqrt(DETECT_PIXELS / (width * height)))
    upsample = 1 if width * height * 4 <= DETECT_PIXELS else 0
    if scale < 1.0:
        small = Image.fromarray(pixels).resize(
            (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR
        )
        detect_on = np.asarray(small)
    else:
        detect_on = pixels
    found = fr.face_locations(detect_on, number_of_times_to_upsample=upsample, model="hog")
    boxes = []
    locations = []
    for top, right, bottom, left in found:
        t = max(0, round(top / scale))
        r = min(width, round(right / scale))
        b = min(height, round(bottom / scale))
        l_ = max(0, round(left / scale))
        if r > l_ and b > t:
            boxes.append(FaceBox(left=l_, top=t, width=r - l_, height=b - t))
            locations.append((t, r, b, l_))
    detected = time.perf_counter()

    embeddings: list[Embedding] = []
    if len(locations) == 1:
        embeddings = [
            np.asarray(e, dtype=np.float64)
            for e in fr.face_encodings(pixels, known_face_locations=locations, model="small")
        ]
    encoded = time.perf_counter()
    return Analysis(
        width=width,
        height=height,
        boxes=boxes,
        embeddings=embeddings,
        stages_ms={
            "decode": (decoded - started) * 1000,
            "detect": (detected - decoded) * 1000,
            "encode": (encoded - detected) * 1000,
        },
    )
