"""Peak memory and time of decoding one photo (README: Input limits), each in a process of
its own, measured as its peak resident set (VmHWM): tracemalloc would miss Pillow's and
libjpeg's buffers, which are not Python objects.

    uv run python benchmarks/decode_memory.py [FACES_DIR]

Phone-sized photos are made from a test photograph (../shared/faces) scaled up onto a
canvas with a fine grain, so that their JPEGs are about as large in bytes as a phone's.
For each: its bytes, the bitmap decoded, the decoding process's peak RSS above what it
held before decoding (the interpreter, the modules, the file's bytes), and the time.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FACES = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "faces"

CHILD = """
import json, sys, time
from facegate_server.engines.images import ImageRejected, decode_image

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

data = open(sys.argv[1], "rb").read()
before = hwm()
started = time.perf_counter()
try:
    decoded = decode_image(data, max_bytes=48 << 20, max_side=4096)
    result = "x".join(map(str, decoded.pixels.shape[1::-1]))
except ImageRejected as rejected:
    result = rejected.reason
elapsed = time.perf_counter() - started
print(json.dumps({"before": before, "peak": hwm(), "seconds": elapsed, "result": result}))
"""


def grainy(width: int, height: int) -> Image.Image:
    """A photograph scaled up onto a width x height canvas, with sensor-like grain."""
    canvas = Image.new("RGB", (width, height), (118, 122, 130))
    with Image.open(FACES / "people" / "barack_obama" / "1.jpg") as face:
        scale = min(width / face.width, height / face.height)
        big = face.convert("RGB").resize((int(face.width * scale), int(face.height * scale)))
    canvas.paste(big, ((width - big.width) // 2, (height - big.height) // 2))
    del big
    tile = np.random.default_rng(0).integers(-6, 7, (512, 512, 1), dtype=np.int16)
    pixels = np.asarray(canvas)
    del canvas
    rows = []
    for top in range(0, height, 512):  # in strips: the grain costs no second full copy
        strip = pixels[top : top + 512].astype(np.int16)
        grain = np.tile(tile, (1, -(-width // 512), 3))[: strip.shape[0], :width]
        rows.append(np.clip(strip + grain, 0, 255).astype(np.uint8))
    del pixels
    return Image.fromarray(np.concatenate(rows))


def plain(width: int, height: int) -> Image.Image:
    """The photograph scaled up onto the canvas, no grain (a PNG of it fits 48 MiB)."""
    canvas = Image.new("RGB", (width, height), (118, 122, 130))
    with Image.open(FACES / "people" / "barack_obama" / "1.jpg") as face:
        scale = min(width / face.width, height / face.height)
        big = face.convert("RGB").resize((int(face.width * scale), int(face.height * scale)))
    canvas.paste(big, ((width - big.width) // 2, (height - big.height) // 2))
    return canvas


def wide_grey(image: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)


def save(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    if fmt == "HEIC":
        import pillow_heif

        # In 512-pixel tiles, as an iPhone writes them (one 48 MP HEVC picture is beyond
        # HEVC's levels, and libde265 will not decode it).
        pillow_heif.from_pillow(image).save(out, format="HEIF", quality=80, tile_size=512)
    else:
        image.save(out, fmt, **options)
    return out.getvalue()


CASES = [  # name, size, format, save options, grain (no grain: the bytes limit for PNG)
    ("12 MP phone JPEG", (4032, 3024), "JPEG", {"quality": 90}, True),
    ("4352x2903 JPEG", (4352, 2903), "JPEG", {"quality": 90}, True),
    ("3061x4600 JPEG", (3061, 4600), "JPEG", {"quality": 90}, True),
    ("100 MP phone JPEG", (12240, 8160), "JPEG", {"quality": 92}, True),
    ("200 MP phone JPEG", (16320, 12240), "JPEG", {"quality": 85}, True),
    ("48 MP progressive JPEG", (8064, 6048), "JPEG", {"quality": 85, "progressive": True}, True),
    ("100 MP progressive JPEG", (12240, 8160), "JPEG", {"progressive": True}, True),
    ("48 MP HEIC (iPhone)", (8064, 6048), "HEIC", {}, True),
    ("24 MP AVIF", (6000, 4000), "AVIF", {"quality": 80, "speed": 10}, True),
    ("30 MP WebP", (6336, 4752), "WEBP", {"quality": 85}, True),
    ("48 MP WebP", (8064, 6048), "WEBP", {"quality": 85}, True),
    ("64 MP PNG", (9248, 6936), "PNG", {}, False),
    ("16-bit grey 64 MP PNG", (9248, 6936), "PNG;16", {}, False),
]


def main() -> None:
    print(f"{'photo':26} {'bytes':>9} {'decoded':>26} {'peak RSS +':>10} {'time':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, size, fmt, options, grain in CASES:
            image = grainy(*size) if grain else plain(*size)
            if fmt == "PNG;16":  # Pillow writes 16-bit grey from I;16 (not 16-bit RGB)
                image, fmt = wide_grey(image), "PNG"
            path = Path(tmp) / "photo"
            path.write_bytes(save(image, fmt, **options))
            del image
            run = subprocess.run(
                [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True
            )
            got = json.loads(run.stdout)
            grew = (got["peak"] - got["before"]) / 2**20
            print(
                f"{name:26} {path.stat().st_size / 2**20:7.1f}Mi {got['result']:>26} "
                f"{grew:8.0f}Mi {got['seconds']:6.2f}s"
            )


if __name__ == "__main__":
    main()
