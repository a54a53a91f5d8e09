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

`uv run python -m benchmarks.suite.stages --detection [FACES_DIR]` compares detection old
and new (`compare_detection`): the pipeline before coarse-to-fine HOG and DCT-scaled
decoding (`old_analyse`) against `worker.analyse`, on every test photo as it is, as 480p
and 1080p frames and as 480p close-ups; time, faces found, decisions and the distance
between the two embeddings of the chosen face.
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


def _shared_faces() -> Any:
    from pathlib import Path

    return Path(__file__).resolve().parents[3] / "shared" / "faces"


def _main(argv: Sequence[str]) -> int:
    import csv
    import os
    from pathlib import Path

    import dlib
    from facegate_server.engines import worker
    from facegate_server.engines.encoder import CHIP_PADDING, CHIP_SIZE

    if argv and argv[0] == "--detection":
        faces = Path(argv[1]) if len(argv) > 1 else _shared_faces()
        frames = detection_frames(faces)
        for share in (None, worker.COARSE_TO_FINE_SHARE):
            load_before = os.getloadavg()
            rows = compare_detection(frames, repeats=3, coarse_share=share)
            print(
                f"\nold vs new, coarse share {share}: 3 runs each interleaved, one process;"
                f" load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
                f" ({os.cpu_count()} cores)"
            )
            print(detection_summary(rows))
        return 0
    faces = Path(argv[0]) if argv else _shared_faces()
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


def old_analyse(data: bytes, max_bytes: int, max_side: int, rules: Any) -> Any:
    """The pipeline before coarse-to-fine detection and DCT-scaled decoding: the frame
    decoded in full, HOG on its 853x480 copy, landmarks, quality and encoding on the
    decoded frame. Kept to compare against (`compare_detection`)."""
    from facegate_server.engines import worker
    from facegate_server.engines.images import decode_image
    from facegate_server.engines.policy import choose_face

    started = time.perf_counter()
    image = decode_image(data, max_bytes=max_bytes, max_side=max_side)
    pixels = image.pixels
    decoded = time.perf_counter()
    boxes = worker.detect_faces(pixels)
    detected = time.perf_counter()
    chosen = choose_face(boxes, rules.dominant_face_ratio, (pixels.shape[1], pixels.shape[0]))
    quality = embedding = None
    if chosen is not None:
        shape = worker.landmarks(pixels, boxes[chosen])
        points = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
        quality = worker.measure_quality(pixels, boxes[chosen], points)
        if rules.encode_poor or rules.limits.problem(quality) is None:
            embedding = worker.encode(pixels, shape)
    finished = time.perf_counter()
    return worker.Analysis(
        width=image.width,
        height=image.height,
        boxes=[worker.full_size(box, image) for box in boxes],
        chosen=chosen,
        quality=quality,
        embedding=embedding,
        stages_ms={
            "decode": (decoded - started) * 1000,
            "detect": (detected - decoded) * 1000,
            "rest": (finished - detected) * 1000,
        },
    )


def _iou(a: Any, b: Any) -> float:
    left, top = max(a.left, b.left), max(a.top, b.top)
    right = min(a.left + a.width, b.left + b.width)
    bottom = min(a.top + a.height, b.top + b.height)
    inter = max(0, right - left) * max(0, bottom - top)
    return inter / float(a.area + b.area - inter)


def compare_detection(
    frames: Sequence[tuple[str, bytes]], repeats: int = 1, coarse_share: float | None = None
) -> list[dict[str, Any]]:
    """Old (`old_analyse`) and new (`worker.analyse`) on each (name, frame), Identify's
    rules (every chosen face encoded), interleaved `repeats` times: per frame the faces
    each found, the decisions, whether every old face that could matter (area at least
    the largest's over the dominant-face ratio) has a new box over it (IoU >= 0.5), the
    distance between the chosen face's two embeddings, and each path's median times.
    `coarse_share`: `worker.COARSE_SHARE` for the run (None: no coarse pass)."""
    from facegate_server.config import Settings
    from facegate_server.engines import worker
    from facegate_server.engines.policy import decision_policy

    settings = Settings(workers=1)
    policy = decision_policy(settings)
    ratio = policy.dominant_face_ratio
    rules = worker.FaceRules(ratio, policy.quality, encode_poor=True)
    limit_bytes, limit_side = settings.max_image_bytes, settings.max_image_side
    worker.init_worker()
    rows = []
    was, worker.COARSE_SHARE = worker.COARSE_SHARE, coarse_share
    try:
        rows = _compare(frames, repeats, ratio, rules, limit_bytes, limit_side)
    finally:
        worker.COARSE_SHARE = was
    return rows


def _compare(
    frames: Sequence[tuple[str, bytes]],
    repeats: int,
    ratio: float,
    rules: Any,
    limit_bytes: int,
    limit_side: int,
) -> list[dict[str, Any]]:
    from facegate_server.engines import worker

    rows = []
    for name, frame in frames:
        olds, news = [], []
        for _ in range(repeats):
            olds.append(old_analyse(frame, limit_bytes, limit_side, rules))
            news.append(worker.analyse(frame, limit_bytes, limit_side, rules))
        old, new = olds[0], news[0]
        largest = max((b.area for b in old.boxes), default=0)
        matter = [b for b in old.boxes if b.area * ratio > largest]
        kept = [b for b in matter if any(_iou(b, n) >= 0.5 for n in new.boxes)]
        distance = None
        if old.embedding is not None and new.embedding is not None:
            distance = float(np.linalg.norm(old.embedding - new.embedding))
        same_face = (
            old.face is None
            if new.face is None
            else old.face is not None and _iou(old.face, new.face) >= 0.5
        )
        rows.append(
            {
                "frame": name,
                "size": f"{old.width}x{old.height}",
                "old_faces": len(old.boxes),
                "new_faces": len(new.boxes),
                "matter": len(matter),
                "matter_kept": len(kept),
                "old_chosen": old.chosen is not None,
                "new_chosen": new.chosen is not None,
                "same_face": same_face,
                "old_problem": old.quality and rules.limits.problem(old.quality),
                "new_problem": new.quality and rules.limits.problem(new.quality),
                "distance": distance,
                "old_ms": float(np.median([sum(a.stages_ms.values()) for a in olds])),
                "new_ms": float(np.median([sum(a.stages_ms.values()) for a in news])),
                "old_detect_ms": float(np.median([a.stages_ms["detect"] for a in olds])),
                "new_detect_ms": float(np.median([a.stages_ms["detect"] for a in news])),
                "old_decode_ms": float(np.median([a.stages_ms["decode"] for a in olds])),
                "new_decode_ms": float(np.median([a.stages_ms["decode"] for a in news])),
            }
        )
    return rows


def close_up(data: bytes, width: int = 853, height: int = 480, share: float = 0.55) -> bytes | None:
    """A turnstile's framing of a one-face photo: a `width` x `height` JPEG (quality 90)
    cut around the face HOG finds so that its box is `share` of the frame's height;
    None when the photo has no single face or is too small for it."""
    import io

    from facegate_server.engines import worker
    from PIL import Image

    pixels = worker.decode(data, max_bytes=6 << 20, max_side=4096)
    boxes = worker.detect_faces(pixels)
    if len(boxes) != 1:
        return None
    box = boxes[0]
    scale = share * height / box.height
    crop_w, crop_h = width / scale, height / scale
    centre_x, centre_y = box.left + box.width / 2, box.top + box.height / 2
    left = min(max(0.0, centre_x - crop_w / 2), pixels.shape[1] - crop_w)
    top = min(max(0.0, centre_y - crop_h / 2), pixels.shape[0] - crop_h)
    if left < 0 or top < 0:
        return None
    image = Image.fromarray(pixels).resize(
        (width, height), Image.Resampling.LANCZOS, box=(left, top, left + crop_w, top + crop_h)
    )
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def detection_frames(faces: Any) -> list[tuple[str, bytes]]:
    """Every photo in `faces` as it is, letterboxed into 480p and 1080p frames (the
    benchmark's turnstile frames, faces of 72 to 258 pixels at 480p), and each one-face
    photo that allows it as a 480p close-up (`close_up`: the face 55% of the height)."""
    import csv

    from .frames import letterbox

    with (faces / "manifest.csv").open(newline="") as f:
        paths = [row["path"] for row in csv.DictReader(f)]
    found = []
    for path in paths:
        data = (faces / path).read_bytes()
        found.append((path, data))
        for label, (width, height) in (("480p", (853, 480)), ("1080p", (1920, 1080))):
            found.append((f"{path} @{label}", letterbox(data, width, height)))
        near = close_up(data)
        if near is not None:
            found.append((f"{path} @480p close-up", near))
    return found


def detection_summary(rows: Sequence[dict[str, Any]]) -> str:
    """`compare_detection`'s rows as a markdown table by kind of frame (median ms a frame,
    old and new), with the recall, decisions and the largest embedding distance."""
    kinds: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        kind = row["frame"].partition(" @")[2] or "as photographed"
        kinds.setdefault(kind, []).append(row)
    lines = [
        "| frames | n | decode old/new ms | detect old/new ms | worker old/new ms |",
        "|---|---|---|---|---|",
    ]
    for kind, group in kinds.items():

        def med(key: str, group: list[dict[str, Any]] = group) -> float:
            return float(np.median([r[key] for r in group]))

        lines.append(
            f"| {kind} | {len(group)} | {med('old_decode_ms'):.1f} / {med('new_decode_ms'):.1f}"
            f" | {med('old_detect_ms'):.1f} / {med('new_detect_ms'):.1f}"
            f" | {med('old_ms'):.1f} / {med('new_ms'):.1f} |"
        )
    matter = sum(r["matter"] for r in rows)
    kept = sum(r["matter_kept"] for r in rows)
    same = sum(
        r["old_chosen"] == r["new_chosen"]
        and r["same_face"]
        and bool(r["old_problem"]) == bool(r["new_problem"])
        for r in rows
    )
    distances = [r["distance"] for r in rows if r["distance"] is not None]
    lines.append("")
    lines.append(
        f"{len(rows)} frames: faces that could matter found {kept} of {matter}; faces found"
        f" old {sum(r['old_faces'] for r in rows)}, new {sum(r['new_faces'] for r in rows)};"
        f" same decision {same} of {len(rows)}; largest distance between the chosen face's"
        f" old and new embeddings {max(distances, default=0.0):.3f}"
        f" (median {float(np.median(distances)) if distances else 0.0:.3f})."
    )
    return "\n".join(lines)


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
