"""Photos the Face API can take: converted before they enter the outbox, not refused later.

The Face API takes JPEG, PNG, GIF (first frame) and BMP, 1 KB to 6 MB, 36 to 4096 pixels a
side, and finds faces down to 36 px only in images up to 1920x1080 (larger images need
proportionally larger faces) — "Detect", Face API v1.0 reference and the Face detection
concepts page, read 2026-12-01. A photo outside those bounds is decoded (the local
engine's decoder, engines/images.decode) and re-encoded as a JPEG whose longest side is at
most 1920 px. Enrolment photos show one face that fills much of the frame: a face that
spans a tenth of the longest side is still about 190 px after the reduction, five times the
minimum. A photo already within bounds is sent as it is (no loss of quality).
"""

from __future__ import annotations

import io

from PIL import Image

from facegate_server.engines.images import ImageRejected, decode

ACCEPTED = ("JPEG", "PNG", "GIF", "BMP")
MAX_BYTES = 6 * 1024 * 1024
MAX_SIDE = 1920
"""The longest side of a converted photo (and of one sent as it is)."""
MIN_SIDE = 36
DECODE_LIMIT_BYTES = 64 * 1024 * 1024


def _header(photo: bytes) -> tuple[str, int, int] | None:
    try:
        with Image.open(io.BytesIO(photo)) as image:
            return str(image.format or ""), image.size[0], image.size[1]
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def acceptable(photo: bytes) -> bool:
    """Whether the Face API takes `photo` as it is (read from the header alone)."""
    header = _header(photo)
    if header is None or not 1024 <= len(photo) <= MAX_BYTES:
        return False
    kind, width, height = header
    return kind in ACCEPTED and max(width, height) <= MAX_SIDE and min(width, height) >= MIN_SIDE


def for_cloud(photo: bytes) -> bytes:
    """`photo` as it is when the Face API takes it, else a JPEG it takes.

    A photo FaceGate cannot decode is sent as it is: the cloud decides (and, if it
    refuses it, the outbox parks it with the cloud's reason)."""
    if acceptable(photo):
        return photo
    try:
        # Decoded at most twice MAX_SIDE a side (the decoder scales by whole factors, so it
        # leaves at least MAX_SIDE for the resize below): a phone JPEG is DCT-scaled while
        # it is decoded, and a 100-megapixel one stays within the decoder's memory bound.
        pixels = decode(photo, max_bytes=DECODE_LIMIT_BYTES, max_side=2 * MAX_SIDE)
    except ImageRejected:
        return photo
    image = Image.fromarray(pixels)
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    for quality in (92, 85, 75, 60):
        out = io.BytesIO()
        image.save(out, "JPEG", quality=quality)
        data = out.getvalue()
        if len(data) <= MAX_BYTES:
            break
    if len(data) < 1024:  # a tiny image: pad with an EXIF-free comment (JPEG COM segment)
        data = (
            data[:2]
            + b"\xff\xfe"
            + (1026 - len(data)).to_bytes(2, "big")
            + bytes(1024 - len(data))
            + data[2:]
        )
    return data
