"""Turning untrusted image bytes into pixels, with limits checked before decoding.

Checked in order, each failure an `ImageRejected` with a stable reason:
1. size in bytes (before anything is parsed): IMAGE_EMPTY, IMAGE_TOO_LARGE;
2. the header only: IMAGE_FORMAT_UNSUPPORTED (not JPEG, PNG, GIF or BMP),
   IMAGE_DIMENSIONS_TOO_LARGE (a side over the limit: decompression bombs stop here);
3. the decode: IMAGE_CORRUPT (truncated or malformed data).
EXIF orientation is applied; GIFs give their first frame; every mode becomes 8-bit RGB.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP")

RGBImage = npt.NDArray[np.uint8]


class ImageRejected(Exception):
    """The bytes are not an image FaceGate will process. Picklable (crosses processes)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


def check_size(data: bytes, max_bytes: int) -> None:
    """The checks that need no parsing: run them before handing bytes to a worker."""
    if not data:
        raise ImageRejected("IMAGE_EMPTY", "image is empty")
    if len(data) > max_bytes:
        raise ImageRejected(
            "IMAGE_TOO_LARGE", f"image is {len(data)} bytes; the limit is {max_bytes} bytes"
        )


def decode(data: bytes, *, max_bytes: int, max_side: int) -> RGBImage:
    """Decode `data` into an (height, width, 3) uint8 RGB array, or raise ImageRejected."""
    check_size(data, max_bytes)
    try:
        with warnings.catch_warnings():
            # We apply our own (stricter) pixel limit below, from the header alone.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError:
        raise ImageRejected(
            "IMAGE_DIMENSIONS_TOO_LARGE",
            f"image dimensions are absurdly large; the limit is {max_side} pixels a side",
        ) from None
    except (OSError, ValueError, SyntaxError):
        raise ImageRejected(
            "IMAGE_FORMAT_UNSUPPORTED",
            "image is not a readable JPEG, PNG, GIF or BMP file "
            "(an unknown format, or a truncated or damaged header)",
        ) from None
    with image:
        width, height = image.size
        if width < 1 or height < 1 or max(width, height) > max_side:
            raise ImageRejected(
                "IMAGE_DIMENSIONS_TOO_LARGE" if max(width, height) > max_side else "IMAGE_CORRUPT",
                f"image is {width}x{height} pixels; the limit is {max_side} pixels a side",
            )
        try:
            image.load()
            oriented = ImageOps.exif_transpose(image) or image
            rgb = oriented.convert("RGB")
        except Image.DecompressionBombError:
            raise ImageRejected(
                "IMAGE_DIMENSIONS_TOO_LARGE", "image is too large to decode safely"
            ) from None
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            # Not Pillow's words: some quote the file's bytes ("broken PNG file (chunk b'...')").
            damage = "truncated" if "truncated" in str(err) else "corrupt"
            raise ImageRejected("IMAGE_CORRUPT", f"image data is {damage}") from None
    return np.asarray(rgb, dtype=np.uint8)
