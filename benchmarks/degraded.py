"""Does each refusal of the local engine earn its keep? The shared photographs made as bad
as a cheap turnstile camera makes them, decided by the engine's rules and by the raw
face_recognition library at the same threshold. In-process, no server:

    uv run python benchmarks/degraded.py [FACES_DIR] [--rules old|new|both]

The gallery: each person's first photo (people/<person>/1.*), undegraded, one photo a
member, as a gym enrols. The probes: every other labelled one-face photo (people/ and edge/),
each in these versions:

- `original`;
- `250 q75`, `250 q60`: a square around the face (the face about 40 % of its side, as in a
  press photograph) downscaled to 250x250 and saved as JPEG at quality 75 / 60;
- `180 q70`, `150 q70`: the same square at 180 and 150 pixels (the face 65-75 and 55-60 px:
  further from the camera);
- `250 motion 3`, `250 motion 6`: `250 q75` smeared horizontally over 3 and 6 pixels before
  the JPEG (1-2 % and 3-5 % of the face: a member walking in);
- `250 queue 0.7 edge`, `250 queue 0.5 edge`: `250 q75` with another person's face pasted
  at the frame's upper edge, 0.7 and 0.5 times the member's face (someone 1.4 and 2 times
  as far away, queueing behind);
- `250 queue 0.7 beside`, `250 side by side 0.9`: the frame widened to 450x250 (the
  member still in its middle) and a face 0.7 / 0.9 times the member's at its edge, at the
  same height (someone a step back at the side; two people side by side at the
  turnstile: must be refused).

Every probe is a genuine probe (its person enrolled) and a stranger probe (the same
embedding against the gallery without its person: each person left out in turn);
lin_manuel_miranda, with one photo, is only a stranger. For each rule the script counts
the genuine and stranger probes it turns away and, for the faces it turns away, how far
their embedding moved from the original photo's (what the rule protects against), next to
the raw library (face_locations + face_encodings, the largest face, nearest member within
0.55).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import pickle
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from facegate_server.domain import Decision, FaceBox, FaceQuality
from facegate_server.engines import worker
from facegate_server.engines.index import Match
from facegate_server.engines.policy import (
    DecisionPolicy,
    QualityLimits,
    QualityProblem,
    decide_match,
)
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
FACES = Path(ARGS[0]) if ARGS else ROOT.parent / "shared" / "faces"
THRESHOLD = 0.55
CACHE = Path("/tmp/facegate-degraded.pickle")
POLICY = DecisionPolicy()
ALL = worker.FaceRules(1e9, QualityLimits(), encode_poor=True)


def jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def square_around(image: Image.Image, box: FaceBox, share: float = 0.4) -> Image.Image:
    """A square around the face, the face `share` of its side (padded grey past the edges)."""
    side = round(max(box.width, box.height) / share)
    cx, cy = box.left + box.width / 2, box.top + box.height / 2
    left, top = round(cx - side / 2), round(cy - side * 0.45)
    canvas = Image.new("RGB", (side, side), (128, 128, 128))
    canvas.paste(image.crop((left, top, left + side, top + side)), (0, 0))
    return canvas


def smear(image: Image.Image, n: int) -> Image.Image:
    pixels = np.asarray(image, np.float32)
    smeared = sum(np.roll(pixels, i - n // 2, axis=1) for i in range(n)) / n
    return Image.fromarray(np.asarray(smeared, np.uint8))


def paste_face(frame: Image.Image, face: Image.Image, scale: float, where: str) -> Image.Image:
    """`face` (a 250 square, the face 40 % of it) pasted at `scale` of the frame's face.

    "edge": in the frame's upper corner, partly cut (someone further back in the queue);
    "beside": the frame widened to 450 pixels, the member still in its middle, the face at
    the member's height at its right edge (someone next to the member, `scale` as near).
    """
    side = round(250 * scale * 0.55)  # the face and a little hair, not the whole square
    inner = face.crop((56, 45, 194, 183)).resize((side, side), Image.Resampling.LANCZOS)
    if where == "edge":
        out = frame.copy()
        out.paste(inner, (250 - side + side // 5, 0))
        return out
    out = Image.new("RGB", (450, 250), (128, 128, 128))
    out.paste(frame, (100, 0))
    out.paste(inner, (450 - side - 4, 125 - side // 2))
    return out


@dataclass
class Face:
    box: FaceBox
    points: np.ndarray
    quality: FaceQuality
    embedding: np.ndarray
    old_sharpness: float = 0.0


@dataclass
class Seen:
    """One probe version, as the engine's functions see it and as the raw library does."""

    person: str
    version: str
    width: int
    height: int
    faces: list[Face]
    data: bytes
    raw: np.ndarray | None
    """The raw library's embedding of the largest face it finds."""


def measure(data: bytes) -> tuple[int, int, list[Face]]:
    pixels = worker.decode(data, max_bytes=6 << 20, max_side=4096)
    height, width = pixels.shape[:2]
    faces = []
    for box in worker.detect_faces(pixels):
        shape = worker.landmarks(pixels, box)
        points = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
        quality = worker.measure_quality(pixels, box, points)
        embedding = worker.encode(pixels, shape)
        faces.append(Face(box, points, quality, embedding, old_sharpness(pixels, box)))
    return width, height, faces


def raw_library(data: bytes) -> np.ndarray | None:
    fr = worker.load_models()
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    found = fr.face_locations(pixels)
    if not found:
        return None
    largest = max(found, key=lambda f: (f[2] - f[0]) * (f[1] - f[3]))
    return fr.face_encodings(pixels, [largest])[0]


def nearest(gallery: dict[str, np.ndarray], e: np.ndarray) -> Match | None:
    if not gallery:
        return None
    ds = sorted((float(np.linalg.norm(e - g)), who) for who, g in gallery.items())
    runner_up = ds[1][0] if len(ds) > 1 else float("inf")
    return Match(member_id=ds[0][1], distance=ds[0][0], runner_up_distance=runner_up)


Rules = Callable[["Seen", dict[str, np.ndarray]], tuple[str, str]]


def old_sharpness(pixels: np.ndarray, box: FaceBox) -> float:
    """The sharpness measure before issue 13: absolute, on the crop scaled to 64x64."""
    crop = pixels[box.top : box.top + box.height, box.left : box.left + box.width]
    grey = Image.fromarray(crop).convert("L").resize((64, 64), Image.Resampling.BILINEAR)
    g = np.asarray(grey, np.float64)
    c = 2.0 * g[1:-1, 1:-1]
    ds = (
        g[1:-1, :-2] + g[1:-1, 2:] - c,
        g[:-2, 1:-1] + g[2:, 1:-1] - c,
        (g[:-2, :-2] + g[2:, 2:] - c) / 2.0,
        (g[:-2, 2:] + g[2:, :-2] - c) / 2.0,
    )
    return min(float(d.var()) for d in ds) * (128.0 / max(float(g.mean()), 1.0)) ** 2


OLD = DecisionPolicy(quality=QualityLimits(min_face_px=60, min_sharpness=30.0))
"""The rules before issue 13 (with `old=True`: absolute sharpness, several faces by area
alone, the margin whatever the runner-up's distance)."""


def engine(policy: DecisionPolicy, old: bool = False) -> Rules:
    """The engine's decision on a probe version: (rule that refused or "", member granted)."""
    from facegate_server.engines import policy as rules

    def decide(seen: Seen, gallery: dict[str, np.ndarray]) -> tuple[str, str]:
        if not seen.faces:
            return "no face", ""
        boxes = [f.box for f in seen.faces]
        frame = None if old else (seen.width, seen.height)
        chosen = rules.choose_face(boxes, policy.dominant_face_ratio, frame)
        if chosen is None:
            return "several faces", ""
        face = seen.faces[chosen]
        quality = face.quality
        if old:
            quality = dataclasses.replace(quality, sharpness=face.old_sharpness)
        problem = policy.quality.problem(quality)
        if problem is not None:
            return RULE_OF_PROBLEM[problem], ""
        match = nearest(gallery, face.embedding)
        if old and match is not None and match.distance <= policy.match_threshold:
            if match.runner_up_distance - match.distance < policy.match_margin:
                return "margin", ""
            return "", match.member_id
        decided = decide_match(match, policy)
        if decided.decision is Decision.DENIED_AMBIGUOUS:
            return "margin", ""
        if decided.decision is Decision.DENIED_UNKNOWN_FACE:
            return "threshold", ""
        return "", decided.member_id

    return decide


RULE_OF_PROBLEM = {
    QualityProblem.TOO_SMALL: "size",
    QualityProblem.TURNED: "pose",
    QualityProblem.TOO_DARK: "light",
    QualityProblem.BLURRED: "sharpness",
}
RULES = ("no face", "several faces", "size", "pose", "light", "sharpness", "margin", "threshold")


def raw(seen: Seen, gallery: dict[str, np.ndarray]) -> tuple[str, str]:
    if seen.raw is None:
        return "no face", ""
    m = nearest(gallery, seen.raw)
    if m is None or m.distance > THRESHOLD:
        return "threshold", ""
    return "", m.member_id


def versions(image: Image.Image, box: FaceBox, other: Image.Image) -> dict[str, bytes]:
    square = square_around(image, box)
    at = {n: square.resize((n, n), Image.Resampling.LANCZOS) for n in (250, 180, 150, 120, 100)}
    return {
        "original": png(image),
        "250 q75": jpeg(at[250], 75),
        "250 q60": jpeg(at[250], 60),
        "180 q70": jpeg(at[180], 70),
        "150 q70": jpeg(at[150], 70),
        "120 q70": jpeg(at[120], 70),
        "100 q70": jpeg(at[100], 70),
        "250 soft 120 q70": jpeg(at[120].resize((250, 250), Image.Resampling.BILINEAR), 70),
        "250 soft 100 q70": jpeg(at[100].resize((250, 250), Image.Resampling.BILINEAR), 70),
        "250 motion 3": jpeg(smear(at[250], 3), 75),
        "250 motion 6": jpeg(smear(at[250], 6), 75),
        "250 motion 9": jpeg(smear(at[250], 9), 75),
        "250 defocus 1.5": jpeg(at[250].filter(ImageFilter.GaussianBlur(1.5)), 75),
        "250 defocus 3": jpeg(at[250].filter(ImageFilter.GaussianBlur(3)), 75),
        "250 queue 0.7 edge": jpeg(paste_face(at[250], other, 0.7, "edge"), 75),
        "250 queue 0.5 edge": jpeg(paste_face(at[250], other, 0.5, "edge"), 75),
        "250 queue 0.7 beside": jpeg(paste_face(at[250], other, 0.7, "beside"), 75),
        "250 side by side 0.9": jpeg(paste_face(at[250], other, 0.9, "beside"), 75),
    }


def main() -> None:
    if "--cached" in sys.argv and CACHE.exists():
        gallery, seen = pickle.loads(CACHE.read_bytes())
        for _, s, _ in seen:  # measure again (the measurements may have changed), not encode
            pixels = worker.decode(s.data, max_bytes=6 << 20, max_side=4096)
            for f in s.faces:
                f.quality = worker.measure_quality(pixels, f.box, f.points)
                f.old_sharpness = old_sharpness(pixels, f.box)
    else:
        gallery, seen = measure_all()
        CACHE.write_bytes(pickle.dumps((gallery, seen)))
    decide_all(gallery, seen)


def measure_all() -> tuple[dict[str, np.ndarray], list[tuple[str, Seen, Face]]]:
    rows = list(csv.DictReader((FACES / "manifest.csv").open(newline="")))
    labelled = [r for r in rows if r["faces"] == "1" and r["person"] and ";" not in r["person"]]
    worker.init_worker()
    gallery: dict[str, np.ndarray] = {}
    originals: dict[str, Face] = {}
    for r in labelled:
        _, _, faces = measure((FACES / r["path"]).read_bytes())
        assert len(faces) == 1, r["path"]
        originals[r["path"]] = faces[0]
    counts = Counter(r["person"] for r in labelled)
    for r in labelled:
        if Path(r["path"]).stem == "1" and counts[r["person"]] > 1 and r["person"] not in gallery:
            gallery[r["person"]] = originals[r["path"]].embedding
    probes = [r for r in labelled if gallery.get(r["person"]) is not originals[r["path"]].embedding]
    print(f"gallery: {len(gallery)} members ({', '.join(gallery)}); {len(probes)} probe photos")

    # a face to paste behind: the first photo of a person other than the probe's
    squares = {
        p: square_around(Image.open(FACES / path).convert("RGB"), originals[path].box).resize(
            (250, 250), Image.Resampling.LANCZOS
        )
        for p in gallery
        for path in [next(r["path"] for r in labelled if r["person"] == p)]
    }
    seen: list[tuple[str, Seen, Face]] = []
    for r in probes:
        image = Image.open(FACES / r["path"]).convert("RGB")
        original = originals[r["path"]]
        other = next(squares[p] for p in squares if p != r["person"])
        for version, data in versions(image, original.box, other).items():
            width, height, faces = measure(data)
            s = Seen(r["person"], version, width, height, faces, data, raw_library(data))
            seen.append((r["path"], s, original))
        print(f"  {r['path']}: measured", file=sys.stderr)
    return gallery, seen


def decide_all(gallery: dict[str, np.ndarray], seen: list[tuple[str, Seen, Face]]) -> None:
    others = references(gallery, seen)
    policies: dict[str, Rules] = {
        "engine, rules before issue 13": engine(OLD, old=True),
        "engine, rules now": engine(POLICY),
        "raw library": raw,
    }
    print(
        f"\n{len(seen)} probe versions; each a genuine probe and a stranger probe. "
        "Per rule: the genuine probes it refuses, how many of them the threshold alone "
        "(the closest member within 0.55, nothing else) would grant to the right member, how "
        "far their embeddings moved from the original photo's, how many of them are nearer "
        "some other person's photo than their own member's; the stranger probes it refuses "
        "and how many of them the threshold alone would let in."
    )
    for name, decide in policies.items():
        report(name, decide, seen, gallery, others)

    print("\nper version: genuine granted, strangers let in; genuine refused now, by rule")
    print(f"  {'':24s}" + "".join(f"{n[:22]:>24s}" for n in policies))
    by_version: dict[str, list[tuple[Seen, Face]]] = defaultdict(list)
    for _, s, o in seen:
        by_version[s.version].append((s, o))
    for version, items in by_version.items():
        cells = []
        for decide in policies.values():
            g = sum(decide(s, gallery)[1] == s.person for s, _ in items if s.person in gallery)
            n = sum(s.person in gallery for s, _ in items)
            st = sum(bool(decide(s, without(gallery, s.person))[1]) for s, _ in items)
            cells.append(f"{g:2d}/{n:<2d} {st:2d}/{len(items):<2d}")
        now = policies["engine, rules now"]
        why = Counter(now(s, gallery)[0] for s, _ in items if s.person in gallery)
        refused = ", ".join(f"{rule} {count}" for rule, count in why.items() if rule)
        print(f"  {version:24s}" + "".join(f"{c:>24s}" for c in cells) + f"  {refused}")

    print(
        "\nthe chosen (largest) face per version, median [min, max]: size, sharpness now, "
        "sharpness before, embedding moved, distance to own member, nearest other person; "
        "(probe, other person's photo) pairs within 0.60 (stranger pressure)"
    )
    for version, items in by_version.items():
        chosen = [(max(s.faces, key=lambda f: f.box.area), s, o) for s, o in items if s.faces]
        cols = {
            "size": [float(f.quality.size) for f, _, _ in chosen],
            "sharp": [f.quality.sharpness for f, _, _ in chosen],
            "before": [f.old_sharpness for f, _, _ in chosen],
            "moved": [dist(f.embedding, o.embedding) for f, _, o in chosen],
            "own": [
                dist(f.embedding, gallery[s.person]) for f, s, _ in chosen if s.person in gallery
            ],
            "other": [nearest_other(f.embedding, s.person, others) for f, s, _ in chosen],
        }
        pairs = [dist(f.embedding, r) for f, s, _ in chosen for who, r in others if who != s.person]
        near = sum(d <= 0.60 for d in pairs)
        print(
            f"  {version:24s}"
            + " ".join(
                f"{statistics.median(v):6.2f} [{min(v):.2f}, {max(v):.2f}]"
                if k not in ("size", "sharp", "before")
                else f"{statistics.median(v):5.0f} [{min(v):.0f}, {max(v):.0f}]"
                for k, v in cols.items()
            )
            + f"  {near}/{len(pairs)} within 0.60"
        )
    margin_study(gallery, seen, others)


def dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b))


def references(
    gallery: dict[str, np.ndarray], seen: list[tuple[str, Seen, Face]]
) -> list[tuple[str, np.ndarray]]:
    """Every original photo's embedding, with its person (the gallery's and the probes')."""
    refs = list(gallery.items())
    done = set()
    for path, s, o in seen:
        if path not in done:
            done.add(path)
            refs.append((s.person, o.embedding))
    return refs


def nearest_other(e: np.ndarray, person: str, others: list[tuple[str, np.ndarray]]) -> float:
    return min(dist(e, r) for who, r in others if who != person)


def without(gallery: dict[str, np.ndarray], person: str) -> dict[str, np.ndarray]:
    return {k: v for k, v in gallery.items() if k != person}


def report(
    name: str,
    decide: Rules,
    seen: list[tuple[str, Seen, Face]],
    gallery: dict[str, np.ndarray],
    others: list[tuple[str, np.ndarray]],
) -> None:
    genuine = [(s, o) for _, s, o in seen if s.person in gallery]
    granted = wrong = 0
    refused: dict[str, list[tuple[float, bool, bool]]] = defaultdict(list)
    for s, o in genuine:
        rule, who = decide(s, gallery)
        if who == s.person:
            granted += 1
        elif who:
            wrong += 1
        elif s.faces:
            face = max(s.faces, key=lambda f: f.box.area)
            own = dist(face.embedding, gallery[s.person])
            m = nearest(gallery, face.embedding)
            alone = m is not None and m.distance <= THRESHOLD and m.member_id == s.person
            closer = nearest_other(face.embedding, s.person, others) < own
            refused[rule].append((dist(face.embedding, o.embedding), alone, closer))
        else:
            refused[rule].append((float("nan"), False, False))
    let_in = 0
    stranger_refused: dict[str, list[bool]] = defaultdict(list)
    for _, s, _ in seen:
        rule, who = decide(s, without(gallery, s.person))
        let_in += bool(who)
        if not who and s.faces:
            face = max(s.faces, key=lambda f: f.box.area)
            m = nearest(without(gallery, s.person), face.embedding)
            stranger_refused[rule].append(m is not None and m.distance <= THRESHOLD)
        elif not who:
            stranger_refused[rule].append(False)
    print(
        f"\n{name}: {granted}/{len(genuine)} genuine granted, {wrong} to a wrong member, "
        f"{let_in}/{len(seen)} strangers let in"
    )
    print(
        f"  {'rule':14s} {'genuine':>8s} {'threshold':>10s} {'moved':>12s} {'nearer':>7s}"
        f" {'strangers':>10s} {'threshold':>10s}"
    )
    print(
        f"  {'':14s} {'refused':>8s} {'grants':>10s} {'':>12s} {'another':>7s}"
        f" {'refused':>10s} {'lets in':>10s}"
    )
    for rule in RULES:
        rows = refused.get(rule, [])
        moved = [m for m, _, _ in rows if m == m]
        spread = f"{min(moved):.2f}-{max(moved):.2f}" if moved else "-"
        sr = stranger_refused.get(rule, [])
        print(
            f"  {rule:14s} {len(rows):8d} {sum(a for _, a, _ in rows):10d} {spread:>12s}"
            f" {sum(c for _, _, c in rows):7d} {len(sr):10d} {sum(sr):10d}"
        )


def margin_study(
    gallery: dict[str, np.ndarray],
    seen: list[tuple[str, Seen, Face]],
    others: list[tuple[str, np.ndarray]],
) -> None:
    """What the margin costs as the gallery grows: each other member is, for a genuine probe,
    a chance of a runner-up that triggers it; estimated per other person from the degraded
    probes against every other person's original photos."""
    old = new = 0
    pairs = 0
    for _, s, _ in seen:
        if s.person not in gallery or not s.faces:
            continue
        face = max(s.faces, key=lambda f: f.box.area)
        own = dist(face.embedding, gallery[s.person])
        if own > THRESHOLD:
            continue
        for who, r in others:
            if who == s.person:
                continue
            d = dist(face.embedding, r)
            pairs += 1
            old += d - own < POLICY.match_margin
            new += d <= THRESHOLD and d - own < POLICY.match_margin
    p_old, p_new = old / pairs, new / pairs
    print(
        f"\nthe margin against the gallery size: of {pairs} (granted genuine probe, other "
        f"person's photo) pairs, {old} would trigger the margin before issue 13 (runner-up "
        f"less than {POLICY.match_margin} further), {new} now (runner-up within "
        f"{THRESHOLD} too). Share of genuine probes refused with N members, "
        "1 - (1 - p)^(N - 1) (p < 1/pairs when nothing was seen):"
    )
    bound = 1 / pairs
    for n in (8, 100, 1000, 10000):
        before = 1 - (1 - p_old) ** (n - 1)
        now = 1 - (1 - (p_new or bound)) ** (n - 1)
        print(f"  N = {n:5d}: before {before:6.1%}, now {'<' if not p_new else ''}{now:6.1%}")


if __name__ == "__main__":
    main()
