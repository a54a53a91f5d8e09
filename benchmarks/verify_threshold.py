"""The measurements behind Verify's 1:1 threshold (FACEGATE_VERIFY_THRESHOLD; README:
Verify), on the test photographs in ../shared/faces. Runs in-process, no server:

    uv run python benchmarks/verify_threshold.py [FACES_DIR]

Verify compares a frame with one member's enrolled photos only: its distance is that to the
member's closest photo, and it grants within the threshold, with no margin (there is no
runner-up). Every one-face photo (and a turnstile-grade copy of each: 250 pixels wide,
JPEG quality 70) claims to be every person in turn, each person "enrolled" from their
photos in people/ (a photo never counts as its own reference, nor as its copy's):

- a genuine claim is a photo of the person claimed: it should be granted;
- an impostor claim is a photo of anybody else: it must not be.

It prints both distributions and, for thresholds 0.40 to 0.70, how many of each are granted.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np
from facegate_server.engines import worker
from facegate_server.engines.policy import DecisionPolicy, QualityLimits
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FACES = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "faces"
RULES = worker.FaceRules(None, QualityLimits())


def embedding(data: bytes) -> np.ndarray | None:
    analysis = worker.analyse(data, 6 << 20, 4096, RULES)
    return analysis.embedding


def turnstile_grade(data: bytes) -> bytes:
    """The photo as a cheap camera at a distance would send it: 250 px wide, JPEG 70."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = 250 / image.width
    small = image.resize((250, max(1, round(image.height * scale))), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, "JPEG", quality=70)
    return out.getvalue()


def main() -> None:
    rows = list(csv.DictReader((FACES / "manifest.csv").open(newline="")))
    worker.init_worker()
    singles = [r for r in rows if r["faces"] == "1" and r["person"]]
    references: dict[str, list[tuple[str, np.ndarray]]] = {}
    probes: list[tuple[str, str, str, np.ndarray]] = []  # (label, person, source path, emb)
    refused: list[str] = []
    for r in singles:
        data = (FACES / r["path"]).read_bytes()
        for label, frame in ((r["path"], data), (r["path"] + " @250px q70", turnstile_grade(data))):
            found = embedding(frame)
            if found is None:
                refused.append(label)
                continue
            probes.append((label, r["person"], r["path"], found))
            if frame is data and r["path"].startswith("people/"):
                references.setdefault(r["person"], []).append((r["path"], found))

    genuine: list[tuple[float, str, str]] = []
    impostor: list[tuple[float, str, str]] = []
    for label, person, source, probe in probes:
        for claimed, photos in references.items():
            others = [e for path, e in photos if path != source]
            if not others:
                continue
            distance = float(min(np.linalg.norm(e - probe) for e in others))
            (genuine if claimed == person else impostor).append((distance, label, claimed))
    genuine.sort()
    impostor.sort()
    policy = DecisionPolicy()
    print(f"{len(probes)} probes ({len(refused)} refused by the quality limits: {refused})")
    print(f"people enrolled: {', '.join(f'{p} ({len(v)})' for p, v in references.items())}")
    print(f"\ngenuine claims: {len(genuine)}, {genuine[0][0]:.3f} to {genuine[-1][0]:.3f}")
    for d, label, claimed in genuine[-5:]:
        print(f"   {d:.3f}  {label} as {claimed}")
    print(f"impostor claims: {len(impostor)}, {impostor[0][0]:.3f} to {impostor[-1][0]:.3f}")
    for d, label, claimed in impostor[:5]:
        print(f"   {d:.3f}  {label} as {claimed}")
    print("\nthreshold  genuine granted  impostors granted")
    for threshold in [round(0.40 + 0.05 * i, 2) for i in range(7)]:
        g = sum(d <= threshold for d, _, _ in genuine)
        i = sum(d <= threshold for d, _, _ in impostor)
        mark = " (1:N threshold)" if threshold == policy.match_threshold else ""
        print(f"   {threshold:.2f}    {g:4d}/{len(genuine)}        {i:4d}/{len(impostor)}{mark}")


if __name__ == "__main__":
    main()
