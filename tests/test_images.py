"""Image decoding rules: limits before decoding, formats, EXIF orientation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from facegate_server.engines.images import ImageRejected, decode
from PIL import Image

from tests.helpers import image_bytes, png_bomb


def noise_jpeg() -> bytes:
    out = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


NOISE_JPEG = noise_jpeg()
LIMITS = {"max_bytes": 6 * 1024 * 1024, "max_side": 4096}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP"])
def test_supported_formats_decode_to_rgb(fmt: str) -> None:
    pixels = decode(image_bytes(40, 30, fmt, "red"), **LIMITS)
    assert pixels.shape == (30, 40, 3)
    assert pixels.dtype == np.uint8
    assert pixels[0, 0, 0] > 200


def test_rgba_and_greyscale_become_rgb() -> None:
    for mode in ("RGBA", "L", "P", "I;16"):
        out = io.BytesIO()
        Image.new(mode, (10, 12)).save(out, "PNG")
        assert decode(out.getvalue(), **LIMITS).shape == (12, 10, 3)


def test_exif_orientation_is_applied() -> None:
    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), "blue").save(out, "JPEG", exif=exif)
    assert decode(out.getvalue(), **LIMITS).shape == (40, 20, 3)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "IMAGE_EMPTY"),
        (b"x" * (6 * 1024 * 1024 + 1), "IMAGE_TOO_LARGE"),
        (b"GIF89a", "IMAGE_FORMAT_UNSUPPORTED"),
        (b"%PDF-1.4 not an image", "IMAGE_FORMAT_UNSUPPORTED"),
        (png_bomb(), "IMAGE_DIMENSIONS_TOO_LARGE"),
        (png_bomb(5000, 10), "IMAGE_DIMENSIONS_TOO_LARGE"),
        (image_bytes(8, 8, "TIFF"), "IMAGE_FORMAT_UNSUPPORTED"),
        (NOISE_JPEG[: len(NOISE_JPEG) // 2], "IMAGE_CORRUPT"),
    ],
)
def test_rejections(data: bytes, reason: str) -> None:
    with pytest.raises(ImageRejected) as rejected:
        decode(data, **LIMITS)
    assert rejected.value.reason == reason
    assert str(rejected.value)
