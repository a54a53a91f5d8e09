"""The measurements behind the local engine's decision policy (README: How the local engine
decides), on the test photographs in ../shared/faces. Runs in-process, no server:

    uv run python benchmarks/decision_policy.py [FACES_DIR]

1. distances between every two one-face photos: same person and different people;
2. each photo's quality measurements (size, sharpness, brightness, yaw, pitch) against
   the limits, and the group photos' face sizes (for the several-face rule);
3. photos made worse (smaller, blurred, motion-blurred, darker): the measurement, and how
   far the embedding moved from the original's (what the quality limits protect);
4. the cost of the quality measurements (the landmarks are the encoder's own).
"""

from __future__ import annotations

import csv
import io
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from facegate_server.engines import worker
from facegate_server.engines.policy import DecisionPolicy, QualityLimits
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
FACES = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "faces"
LIMITS = QualityLimits()
MEASURE_ALL = worker.FaceRules(None, LIMITS, encode_poor=True)
MANY = worker.FaceRules(1e9, LIMITS, encode_poor=True)  # choose no face among several


def analyse(data: bytes, rules: worker.FaceRules = MEASURE_ALL) -> worker.Analysis:
    return worker.analyse(data, 6 << 20, 4096, rules)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def degraded(image: Image.Image, how: str, amount: float, face: int) -> Image.Image:
    if how == "smaller":  # amount: the face's new size in pixels
        scale = amount / face
        return image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS
        )
    if how == "blurred":  # amount: Gaussian sigma, as a share of the face's size
        return image.filter(ImageFilter.GaussianBlur(amount * face))
    if how == "moving":  # amount: horizontal smear, as a share of the face's size
        pixels = np.asarray(image, np.float32)
        n = max(2, int(amount * face))
        smeared = sum(np.roll(pixels, i - n // 2, axis=1) for i in range(n)) / n
        return Image.fromarray(np.asarray(smeared, np.uint8))
    if how == "darker":  # amount: the factor every pixel is multiplied by
        return Image.fromarray(np.asarray(np.asarray(image, np.float32) * amount, np.uint8))
    raise ValueError(how)


def main() -> None:
    rows = list(csv.DictReader((FACES / "manifest.csv").open(newline="")))
    worker.init_worker()
    policy = DecisionPolicy()
    print(f"limits: {LIMITS}")
    print(f"policy: threshold {policy.match_threshold}, margin {policy.match_margin}")

    print("\n1. distances between one-face photos")
    singles = [r for r in rows if r["faces"] == "1" and r["person"]]
    found = {r["path"]: analyse((FACES / r["path"]).read_bytes()) for r in singles}
    same, different = [], []
    for a, b in itertools.combinations(singles, 2):
        ea, eb = found[a["path"]].embedding, found[b["path"]].embedding
        assert ea is not None and eb is not None
        d = float(np.linalg.norm(ea - eb))
        (same if a["person"] == b["person"] else different).append((d, a["path"], b["path"]))
    same.sort()
    different.sort()
    print(f"   same person: {len(same)} pairs, {same[0][0]:.3f} to {same[-1][0]:.3f}")
    for d, a, b in same[-3:]:
        print(f"     {d:.3f}  {a}  {b}")
    print(f"   different people: {len(different)} pairs, from {different[0][0]:.3f}")
    for d, a, b in different[:3]:
        print(f"     {d:.3f}  {a}  {b}")

    print("\n2. quality of every photo (size px, sharpness, brightness, yaw, pitch)")
    for r in rows:
        a = analyse((FACES / r["path"]).read_bytes(), MANY)
        if a.quality is None:
            sides = sorted((max(b.width, b.height) for b in a.boxes), reverse=True)
            ratio = (sides[0] / sides[1]) ** 2 if len(sides) > 1 else float("nan")
            print(f"   {r['path']:32s} {len(a.boxes)} faces, sides {sides}, area ratio {ratio:.2f}")
            continue
        q = a.quality
        print(
            f"   {r['path']:32s} {q.size:5d} {q.sharpness:7.1f} {q.brightness:6.1f}"
            f" {q.yaw:+.3f} {q.pitch:.3f}  {LIMITS.problem(q) or 'ok'}"
        )

    print("\n3. photos made worse: measurement, distance moved from the original, problem")
    bases = [
        "people/barack_obama/1.jpg",
        "people/kit_harington/1.jpg",
        "people/rose_leslie/1.jpg",
        "people/joe_biden/2.jpg",
        "people/alex_lacamoire/3.png",
        "people/lin_manuel_miranda/1.png",
    ]
    plans = [
        ("smaller", [72, 60, 50, 40], "size"),
        ("blurred", [0.01, 0.02, 0.03], "sharpness"),
        ("moving", [0.03, 0.06, 0.10, 0.15], "sharpness"),
        ("darker", [0.4, 0.3, 0.2, 0.15], "brightness"),
    ]
    for how, amounts, metric in plans:
        for amount in amounts:
            cells = []
            for base in bases:
                original = found[base]
                assert original.quality is not None and original.embedding is not None
                image = Image.open(FACES / base).convert("RGB")
                worse = analyse(png(degraded(image, how, amount, original.quality.size)))
                if worse.quality is None or worse.embedding is None:
                    cells.append("   no face    ")
                    continue
                moved = float(np.linalg.norm(worse.embedding - original.embedding))
                flag = "*" if LIMITS.problem(worse.quality) else " "
                cells.append(f"{getattr(worse.quality, metric):6.1f} {moved:.2f}{flag}")
            print(f"   {how:7s} {amount:<5} " + " ".join(cells))
    names = ", ".join(Path(b).parent.name for b in bases)
    print(f"   (* = refused by the limits; columns: {names})")

    print("\n4. cost of the quality measurements (sharpness, brightness, pose), one face")
    data = (FACES / "edge/obama_1080p.jpg").read_bytes()
    pixels = worker.decode(data, max_bytes=6 << 20, max_side=4096)
    a = analyse(data)
    assert a.face is not None
    points = np.array([[0, 0], [10, 0], [30, 0], [40, 0], [20, 20]], np.float64)
    times = []
    for _ in range(200):
        started = time.perf_counter()
        worker.measure_quality(pixels, a.face, points)
        times.append((time.perf_counter() - started) * 1000)
    print(f"   measure_quality: median {statistics.median(times):.2f} ms (200 runs, 1080p frame)")
    stages: dict[str, list[float]] = {}
    for _ in range(10):
        for k, v in analyse(data).stages_ms.items():
            stages.setdefault(k, []).append(v)
    print(
        "   analyse stages, median of 10 (ms): "
        + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in stages.items())
    )


if __name__ == "__main__":
    main()
