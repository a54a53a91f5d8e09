"""The real people of ../shared/faces: who is enrolled, with which photo, and the probe
frames (their other photos, and an unenrolled person) letterboxed to 480p and 1080p."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .plan import RESOLUTIONS

UNENROLLED = ("lin_manuel_miranda",)
"""People never enrolled: their photos are impostor probes, which must be denied."""


@dataclass(frozen=True)
class Person:
    name: str
    photos: tuple[str, ...]
    """Paths relative to the faces folder, in manifest order."""

    @property
    def member_id(self) -> str:
        return f"m-{self.name}"

    @property
    def enrolled(self) -> bool:
        return self.name not in UNENROLLED


@dataclass(frozen=True)
class Probe:
    path: str
    person: str
    member_id: str
    """The member this face must be granted to; "" for an unenrolled person (deny)."""
    frames: dict[str, bytes]
    """Resolution name -> JPEG bytes of the letterboxed frame."""


def people(faces: Path) -> list[Person]:
    """Every person of manifest.csv's people/ folder, in manifest order."""
    with (faces / "manifest.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["path"].startswith("people/")]
    names: dict[str, list[str]] = {}
    for row in rows:
        names.setdefault(row["person"], []).append(row["path"])
    return [Person(name, tuple(paths)) for name, paths in names.items()]


def letterbox(data: bytes, width: int, height: int) -> bytes:
    """The photo scaled to fit `width` x `height`, centred on black (never stretched), as
    a JPEG of quality 90: what a turnstile's camera would send."""
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    scale = min(width / image.width, height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resized = image.resize(size, Image.Resampling.LANCZOS)
    frame = Image.new("RGB", (width, height))
    frame.paste(resized, ((width - size[0]) // 2, (height - size[1]) // 2))
    out = io.BytesIO()
    frame.save(out, "JPEG", quality=90)
    return out.getvalue()


def enrolment(faces: Path) -> list[tuple[Person, bytes]]:
    """The enrolled people with their first photo, as the gym's backend would send it."""
    return [(p, (faces / p.photos[0]).read_bytes()) for p in people(faces) if p.enrolled]


def probes(faces: Path, resolutions: tuple[str, ...] = tuple(RESOLUTIONS)) -> list[Probe]:
    """Every enrolled person's other photos and every unenrolled person's photos."""
    found = []
    for person in people(faces):
        paths = person.photos[1:] if person.enrolled else person.photos
        for path in paths:
            data = (faces / path).read_bytes()
            frames = {r: letterbox(data, *RESOLUTIONS[r]) for r in resolutions}
            found.append(
                Probe(path, person.name, person.member_id if person.enrolled else "", frames)
            )
    return found
