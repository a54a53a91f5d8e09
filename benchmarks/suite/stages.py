"""The local pipeline's stages, measured in this process with the worker's own functions:
`worker.analyse` (decode, detect, landmarks + quality, encode; its `stages_ms`) on
every probe frame, and `FaceIndex.match` at each gallery size. The same analysis gives the
real embeddings the synthetic gallery is shaped after and kept away from.

`encode` is the encoder the servers run (FACEGATE_ENCODER's default, ONNX Runtime);
`encode_onnx` and `encode_dlib` time `worker.encode` with each encoder on the same face of
the same frame, so the table shows both side by side in one run.

Run before any server starts, so nothing else of the benchmark competes for the cores.

`uv run python -m benchmarks.suite.stages [FACES_DIR]` compares the encoders alone: the
time to encode one aligned chip with dlib and with ONNX Runtime on 1 and 2 threads, every
face of the test photos, in one process.
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
ENCODER_STAGES = ("encode_onnx", "encode_dlib")


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
        names = (*STAGES, "worker_total", *ENCODER_STAGES)
        samples: dict[str, list[float]] = {name: [] for name in names}
        for repeat in range(repeats):
            for probe in probes:
                frame = probe.frames[resolution]
                analysis = worker.analyse(frame, limit_bytes, limit_side, identify_rules)
                for name in STAGES:
                    samples[name].append(analysis.stages_ms.get(name, 0.0))
                samples["worker_total"].append(sum(analysis.stages_ms.values()))
                if analysis.embedding is not None and analysis.face is not None:
                    pixels = worker.decode(frame, max_bytes=limit_bytes, max_side=limit_side)
                    shape = worker.landmarks(pixels, analysis.face)
                    for name, took in _encode_each(pixels, shape).items():
                        samples[name].append(took)
                if repeat == 0 and analysis.embedding is not None:
                    probed.append(analysis.embedding)
        stages[resolution] = {name: latency_summary(values) for name, values in samples.items()}
    return stages, np.asarray(enrolled), np.asarray(probed)


def _encode_each(pixels: Any, shape: Any) -> dict[str, float]:
    """`worker.encode` with each encoder on one face, in ms (the default encoder after)."""
    from facegate_server.engines import worker

    took = {}
    try:
        for encoder in worker.ENCODERS:
            worker.use_encoder(encoder)
            started = time.perf_counter()
            worker.encode(pixels, shape)
            took[f"encode_{encoder}"] = (time.perf_counter() - started) * 1000.0
    finally:
        worker.use_encoder(worker.DEFAULT_ENCODER)
    return took


def compare_encoders(chips: Sequence[Any], repeats: int) -> dict[str, dict[str, float]]:
    """ms to encode one aligned 150x150 chip: dlib, and ONNX Runtime on 1 and 2 threads.

    Each chip `repeats` times with each encoder, interleaved (chip by chip) so that a change
    in the machine's load falls on all of them alike.
    """
    import numpy as np
    from facegate_server.engines import worker
    from facegate_server.engines.encoder import OnnxEncoder

    dlib_encoder = worker.load_models().api.face_encoder
    onnx = {threads: OnnxEncoder(threads=threads) for threads in (1, 2)}
    runs: dict[str, Callable[[Any], object]] = {
        "dlib": lambda chip: dlib_encoder.compute_face_descriptor(chip, 0),
        "onnx, 1 thread": onnx[1].encode_chips,
        "onnx, 2 threads": onnx[2].encode_chips,
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm up
        run(chips[0])
    for chip in chips:
        chip = np.ascontiguousarray(chip)
        for _ in range(repeats):
            for name, run in runs.items():
                started = time.perf_counter()
                run(chip)
                times[name].append((time.perf_counter() - started) * 1000.0)
    return {name: latency_summary(values) for name, values in times.items()}


def _main(argv: Sequence[str]) -> int:
    import csv
    import os
    from pathlib import Path

    import dlib
    from facegate_server.engines import worker
    from facegate_server.engines.encoder import CHIP_PADDING, CHIP_SIZE

    faces = Path(argv[0]) if argv else Path(__file__).resolve().parents[3] / "shared" / "faces"
    with (faces / "manifest.csv").open(newline="") as f:
        paths = [row["path"] for row in csv.DictReader(f)]
    chips = []
    for path in paths:
        pixels = worker.decode((faces / path).read_bytes(), max_bytes=6 << 20, max_side=4096)
        for box in worker.detect_faces(pixels):
            shape = worker.landmarks(pixels, box)
            chips.append(dlib.get_face_chip(pixels, shape, size=CHIP_SIZE, padding=CHIP_PADDING))
    load_before = os.getloadavg()
    found = compare_encoders(chips, repeats=3)
    load_after = os.getloadavg()
    print(
        f"{len(chips)} faces x 3, one process; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after ({os.cpu_count()} cores)"
    )
    print("| encoder | p50 ms | p95 ms | mean ms |")
    print("|---|---|---|---|")
    for name, v in found.items():
        print(f"| {name} | {v['p50']:.1f} | {v['p95']:.1f} | {v['mean']:.1f} |")
    return 0


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


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
