"""The raw `face_recognition` pipeline, the yardstick of issue 12's latency aim: what a
newcomer's script would do with each frame, timed in the benchmark process on the same
frames and against a gallery of the same size as the FaceGate cell it is compared to.

Per frame, one after the other (a closed loop, like one turnstile), for the cell's time:

1. `face_recognition.load_image_file` on the frame's JPEG bytes (PIL decode to RGB);
2. `face_recognition.face_locations(image, number_of_times_to_upsample=0, model="hog")`:
   HOG on the full frame without upsampling — at 480p the same pixels FaceGate's detector
   scans (its default upsamples once, 4x the pixels, which would flatter FaceGate);
3. `face_recognition.face_encodings(image, locations)` (5-point landmarks, dlib-bin's
   encoder, one jitter: the library's defaults) for every face found;
4. `face_recognition.face_distance(gallery, encoding)` (numpy) for each, then the nearest
   member and `compare_faces`' tolerance (0.6).

No server, no gRPC, no process hop, no access log, no quality checks: the pipeline alone,
in one process and one thread, while no FaceGate server runs. Its latency is per frame,
load to decision; FaceGate's is the turnstile's, end to end.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .frames import Probe
from .gallery import Vectors
from .stats import latency_summary

STAGES = ("load", "detect", "encode", "compare")
TOLERANCE = 0.6
"""face_recognition's `compare_faces` default."""

METHOD = (
    "face_recognition.load_image_file, face_locations(model='hog', "
    "number_of_times_to_upsample=0), face_encodings (model='small', num_jitters=1) of every "
    "face found, face_distance against the gallery (numpy) and the nearest member within "
    f"{TOLERANCE}; per frame, one after the other, in the benchmark process (one thread) "
    "while no server ran, on the probe frames the turnstiles send"
)


def pipeline(frame: bytes, gallery: Vectors, ids: Sequence[str]) -> tuple[dict[str, float], str]:
    """One frame through the raw pipeline: (ms per stage, the member granted or "")."""
    import face_recognition

    started = time.perf_counter()
    image = face_recognition.load_image_file(io.BytesIO(frame))
    loaded = time.perf_counter()
    locations = face_recognition.face_locations(image, number_of_times_to_upsample=0, model="hog")
    detected = time.perf_counter()
    encodings = face_recognition.face_encodings(image, locations) if locations else []
    encoded = time.perf_counter()
    granted = ""
    for encoding in encodings:
        distances = face_recognition.face_distance(gallery, encoding)
        nearest = int(np.argmin(distances))
        if distances[nearest] <= TOLERANCE:
            granted = ids[nearest]
    compared = time.perf_counter()
    return {
        "load": (loaded - started) * 1000.0,
        "detect": (detected - loaded) * 1000.0,
        "encode": (encoded - detected) * 1000.0,
        "compare": (compared - encoded) * 1000.0,
    }, granted


def run(
    probes: Sequence[Probe],
    resolution: str,
    gallery: Vectors,
    ids: Sequence[str],
    seconds: float,
    min_frames: int = 0,
) -> dict[str, Any]:
    """The raw pipeline on the probes' frames at `resolution` for `seconds` (and at least
    `min_frames`), after one warm-up frame; per-frame latency and per-stage summaries."""
    if not probes:
        raise ValueError("no probe frames")
    pipeline(probes[0].frames[resolution], gallery, ids)  # models loaded, caches warm
    latencies: list[float] = []
    stages: dict[str, list[float]] = {name: [] for name in STAGES}
    correct = 0
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end or i < min_frames:
        probe = probes[i % len(probes)]
        took, granted = pipeline(probe.frames[resolution], gallery, ids)
        for name in STAGES:
            stages[name].append(took[name])
        latencies.append(sum(took.values()))
        correct += granted == probe.member_id
        i += 1
    return {
        "frames": len(latencies),
        "latency_ms": latency_summary(latencies),
        "stages_ms": {name: latency_summary(values) for name, values in stages.items()},
        "correct": correct,
        "latency_samples_ms": [round(x, 2) for x in latencies],
    }
