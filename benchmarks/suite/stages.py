"""The local pipeline's stages, measured in this process with the worker's own functions:
`worker.analyse` (decode, detect, landmarks + quality, encode; its `stages_ms`) on
every probe frame, and `FaceIndex.match` at each gallery size. The same analysis gives the
real embeddings the synthetic gallery is shaped after and kept away from.

Run before any server starts, so nothing else of the benchmark competes for the cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .frames import Person, Probe
from .gallery import Vectors
from .stats import latency_summary

STAGES = ("decode", "detect", "landmarks_quality", "encode")


def analyse_real(
    enrolment: Sequence[tuple[Person, bytes]],
    probes: Sequence[Probe],
    resolutions: Sequence[str],
    repeats: int,
) -> tuple[dict[str, dict[str, dict[str, float]]], Vectors, Vectors]:
    """Stage timings per resolution, the enrolment photos' embeddings and the probe frames'
    embeddings (every resolution)."""
    from facegate_server.config import Settings
    from facegate_server.engines import worker
    from facegate_server.engines.policy import decision_policy

    policy = decision_policy(Settings(workers=1))
    identify_rules = worker.FaceRules(policy.dominant_face_ratio, policy.quality)
    enrol_rules = worker.FaceRules(None, policy.quality)
    limit_bytes, limit_side = Settings().max_image_bytes, Settings().max_image_side
    worker.init_worker()

    enrolled = []
    for person, photo in enrolment:
        analysis = worker.analyse(photo, limit_bytes, limit_side, enrol_rules)
        if analysis.embedding is None:
            raise RuntimeError(f"{person.photos[0]}: no enrolable face")
        enrolled.append(analysis.embedding)

    stages: dict[str, dict[str, dict[str, float]]] = {}
    probed = []
    for resolution in resolutions:
        samples: dict[str, list[float]] = {name: [] for name in (*STAGES, "worker_total")}
        for repeat in range(repeats):
            for probe in probes:
                analysis = worker.analyse(
                    probe.frames[resolution], limit_bytes, limit_side, identify_rules
                )
                for name in STAGES:
                    samples[name].append(analysis.stages_ms.get(name, 0.0))
                samples["worker_total"].append(sum(analysis.stages_ms.values()))
                if repeat == 0 and analysis.embedding is not None:
                    probed.append(analysis.embedding)
        stages[resolution] = {name: latency_summary(values) for name, values in samples.items()}
    return stages, np.asarray(enrolled), np.asarray(probed)


def match_times(
    sizes: Sequence[int],
    gallery: Callable[[int], Vectors],
    probes: Vectors,
    repeats: int,
) -> dict[str, dict[str, float]]:
    """`FaceIndex.match` per gallery size (members, one template each), in milliseconds."""
    from facegate_server.engines.index import FaceIndex

    found = {}
    for size in sizes:
        vectors = gallery(size)
        index = FaceIndex((f"m-{i}", v) for i, v in enumerate(vectors))
        for probe in probes[:2]:  # warm up
            index.match(probe)
        times: list[float] = []
        for repeat in range(repeats):
            probe = probes[repeat % len(probes)]
            started = time.perf_counter()
            index.match(probe)
            times.append((time.perf_counter() - started) * 1000.0)
        found[str(size)] = latency_summary(times)
    return found


def overhead(
    end_to_end_p50: float, stages: dict[str, dict[str, float]], match_p50: float
) -> dict[str, Any]:
    """End to end (p50 of the turnstile's latency) minus the stages' medians and matching:
    gRPC, validation, the hop to the worker process and back, the access log's write."""
    parts = {name: stages[name]["p50"] for name in STAGES}
    parts["match"] = match_p50
    return {
        "end_to_end_p50": end_to_end_p50,
        "parts_p50": parts,
        "overhead_ms": end_to_end_p50 - sum(parts.values()),
    }
