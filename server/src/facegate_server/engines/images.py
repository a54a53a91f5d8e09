"""Turning untrusted image bytes into pixels, with limits checked before decoding.

Checked in order, each failure an `ImageRejected` with a stable reason:
1. size in bytes (before anything is parsed): IMAGE_EMPTY, IMAGE_TOO_LARGE;
2. the format, judged by the first bytes (magic numbers), never by a name or a type a
   caller states: JPEG, PNG, GIF, BMP, WebP, HEIC/HEIF (pillow-heif) and AVIF (Pillow's
   own plugin); anything else is IMAGE_FORMAT_UNSUPPORTED;
3. the header only, before a pixel is decoded (decompression bombs stop here):
   IMAGE_DIMENSIONS_TOO_LARGE for an image of more than `max_pixels` pixels, or one whose
   decoding would need more than `max_decode_bytes` of memory (see "Memory" below);
4. the decode: IMAGE_CORRUPT (truncated or malformed data).

`max_side` is the longest side of the bitmap recognition works on, not a refusal: a larger
image is scaled down by the smallest integer factor that brings its longest side within
`max_side` (4352x2903 becomes 2176x1452 with the default 4096). A JPEG is scaled while it
is decoded (libjpeg's DCT scaling, by 1/2, 1/4 or 1/8, through Pillow's `draft`), so its
full-resolution bitmap is never built; other formats are decoded in full, then reduced.
(`refuse_over_side=True` restores the old meaning, a refusal, for callers that emulate a
service with that limit.)

Memory. A format decoded in full needs memory in proportion to its pixels: the factors in
`DECODE_BYTES_PER_PIXEL` are a decoding process's measured peak growth per pixel
(benchmarks/decode_memory.py), rounded up. An image whose pixels times its format's factor
exceed `max_decode_bytes` is refused from its header; that is each format's own pixel
bound (with the default 512 MiB: PNG, GIF and BMP 89 megapixels, a progressive JPEG 76,
HEIC 59, AVIF 53, WebP 31). A baseline JPEG is bounded by its DCT-scaled bitmap instead,
so it may have up to `max_pixels` pixels, which bounds decoding time. Pillow's own
decompression-bomb limit (about 179 megapixels) is not consulted (the plugins are opened
directly): these bounds replace it, and exceed it only on the DCT-scaled JPEG path.

Every mode becomes 8-bit RGB: 16-bit grey and 16-bit RGB by their high byte (not clipped),
palette by its colours, CMYK and YCbCr converted, alpha composited over white (as a viewer
shows a transparent picture). EXIF orientation is applied; GIF, WebP, AVIF and HEIF
sequences give their first (primary) frame.

`decode_scaled` is the frame pipeline's helper: a JPEG decoded at the smallest DCT scale
that still has at least the size asked for, and the scale to map boxes back.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageFile,
    JpegImagePlugin,
    PngImagePlugin,
    WebPImagePlugin,
)

FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WebP", "HEIC", "AVIF")
"""The formats decoded, by the names that messages use."""
SUPPORTED_FORMATS = FORMATS  # the name this module used to export

MAX_PIXELS = 1 << 28
"""An image's pixels (width x height from its header), any format: 268 megapixels, above
the 200-megapixel phone cameras. It bounds decoding time; memory is bounded by the next."""
MAX_DECODE_BYTES = 512 * 1024 * 1024
"""The memory one decode may need, by DECODE_BYTES_PER_PIXEL: a 48-megapixel iPhone HEIC
fits; a baseline JPEG, held at its DCT-scaled size, needs at most about 160 MiB."""
DECODE_BYTES_PER_PIXEL = {
    # Peak growth of a decoding process per pixel of the image (per pixel decoded, for a
    # baseline JPEG), measured by benchmarks/decode_memory.py and rounded up: the
    # decoder's buffers, Pillow's bitmap (4 bytes a pixel for RGB), the conversions.
    "PNG": 6,  # 4.4 for RGB, 4.7 at 64 MP, 3.1 for 16-bit grey; a palette converts to RGB
    "GIF": 6,  # 5.3: a palette bitmap, then RGB
    "BMP": 6,  # 4.4
    "WebP": 17,  # 16.1: libwebp's animation decoder keeps two RGBA canvases, then copies
    "HEIC": 9,  # 8.2: libheif's planes, its RGB, Pillow's copy
    "AVIF": 10,  # 9.4
    "progressive JPEG": 7,  # 3.3 at 4:2:0, 6.3 at 4:4:4: every DCT coefficient is kept
    "JPEG": 10,  # 9.4 a pixel decoded (not of the image): Pillow's bitmap, the array
}

RGBImage = npt.NDArray[np.uint8]

_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"}
_AVIF_BRANDS = {b"avif", b"avis"}
_GENERIC_HEIF_BRANDS = {b"mif1", b"msf1"}
# What malformed data makes a Pillow plugin raise (Image.open catches the same ones at the
# header); libheif and libavif also raise RuntimeError.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    struct.error,
    RuntimeError,
)
_HEADER_ERRORS = (*_DECODE_ERRORS, TypeError)
_REDUCIBLE = {"L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}


class ImageRejected(Exception):
    """The bytes are not an image FaceGate will process. Picklable (crosses processes)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Decoded:
    """Decoded pixels and the size of the image they were decoded from."""

    pixels: RGBImage
    """(height, width, 3) uint8 RGB, EXIF-oriented, at most `max_side` a side."""
    width: int
    """The full image's width, as oriented (before any scaling)."""
    height: int
    format: str
    """One of FORMATS."""

    @property
    def scale(self) -> float:
        """Decoded pixels per pixel of the full image (1.0: not scaled); divide a box in
        `pixels` by it to place it in the full image."""
        return float(self.pixels.shape[1] / self.width)


def check_size(data: bytes, max_bytes: int) -> None:
    """The checks that need no parsing: run them before handing bytes to a worker."""
    if not data:
        raise ImageRejected("IMAGE_EMPTY", "image is empty")
    if len(data) > max_bytes:
        raise ImageRejected(
            "IMAGE_TOO_LARGE", f"image is {len(data)} bytes; the limit is {max_bytes} bytes"
        )


def sniff(data: bytes) -> str | None:
    """The format `data` is in, judged by its first bytes; None: not one decoded here."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp":  # ISO base media: the brands say which codec
        box = int.from_bytes(data[:4], "big")
        major = data[8:12]
        compatible = {data[i : i + 4] for i in range(16, min(box, len(data), 64) - 3, 4)}
        if major in _AVIF_BRANDS:
            return "AVIF"
        if major in _HEIF_BRANDS or compatible & _HEIF_BRANDS:
            return "HEIC"
        if compatible & _AVIF_BRANDS:
            return "AVIF"
        if major in _GENERIC_HEIF_BRANDS or compatible & _GENERIC_HEIF_BRANDS:
            return "HEIC"
    return None


def _open(data: bytes, fmt: str) -> ImageFile.ImageFile:
    """The format's own plugin on `data`: its header read, nothing decoded.

    Not Image.open: that would try every registered plugin (TIFF, PDF, ... are not
    accepted here) and apply Pillow's decompression-bomb limit, which this module's two
    pixel bounds replace.
    """
    fp = io.BytesIO(data)
    if fmt == "JPEG":
        return JpegImagePlugin.JpegImageFile(fp)
    if fmt == "PNG":
        return PngImagePlugin.PngImageFile(fp)
    if fmt == "GIF":
        return GifImagePlugin.GifImageFile(fp)
    if fmt == "BMP":
        return BmpImagePlugin.BmpImageFile(fp)
    if fmt == "WebP":
        return WebPImagePlugin.WebPImageFile(fp)
    if fmt == "AVIF":
        from PIL import AvifImagePlugin

        return AvifImagePlugin.AvifImageFile(fp)
    from pillow_heif import HeifImageFile  # libheif: loaded only when a HEIC arrives

    image: ImageFile.ImageFile = HeifImageFile(fp)  # type: ignore[no-untyped-call]
    return image


def _dct_factor(size: tuple[int, int], max_side: int, at_least: tuple[int, int] | None) -> int:
    """The JPEG DCT scale denominator (1, 2, 4 or 8) to decode at: the smallest that brings
    the longest side within `max_side` (8 if none does), or, if larger, the largest whose
    result is still at least `at_least`."""
    width, height = size
    factor = 1
    while factor < 8 and -(-max(width, height) // factor) > max_side:
        factor *= 2
    if at_least is not None:
        while (
            factor < 8
            and -(-width // (factor * 2)) >= at_least[0]
            and -(-height // (factor * 2)) >= at_least[1]
        ):
            factor *= 2
    while factor > 1 and (width // factor < 1 or height // factor < 1):
        factor //= 2
    return factor


def _too_large(width: int, height: int, limit: int, why: str) -> ImageRejected:
    return ImageRejected(
        "IMAGE_DIMENSIONS_TOO_LARGE",
        f"image is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels); "
        f"{why} is {limit / 1e6:.1f} megapixels",
    )


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 to 8); 1 when absent or unreadable (metadata, not pixels)."""
    try:
        value = image.getexif().get(_ORIENTATION, 1)
    except _DECODE_ERRORS:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _high_byte(image: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) grey image as 8-bit grey, by its high byte.

    Pillow's own convert("L") clips I;16 at 255, which turns most of a 16-bit photo white.
    In strips of rows: whole-image numpy temporaries would need several times the bitmap.
    """
    width, height = image.size
    grey = np.empty((height, width), np.uint8)
    for top in range(0, height, 256):
        values = np.asarray(image.crop((0, top, width, min(height, top + 256))))
        if image.mode == "F":
            grey[top : top + 256] = np.clip(values, 0, 255)
        else:  # I;16, I;16B, I;16L, I;16N, I (a 16-bit PNG's values in 32 bits)
            grey[top : top + 256] = np.clip(values, 0, 65535) >> 8
    return Image.fromarray(grey)


def _reducible(image: Image.Image) -> Image.Image:
    """The image in a mode Pillow can reduce (average) without changing what it shows."""
    mode = image.mode
    if mode in _REDUCIBLE:
        return image
    if mode.startswith("I") or mode == "F":
        return _high_byte(image)
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        return image.convert("RGBA" if has_alpha else "RGB")
    if mode == "La":
        return image.convert("LA")
    if mode == "RGBa":
        return image.convert("RGBA")
    if mode == "1":
        return image.convert("L")
    return image.convert("RGB")  # LAB, HSV and the rest Pillow can convert


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("LA", "RGBA"):
        lowest, _ = image.getchannel("A").getextrema()
        if isinstance(lowest, int) and lowest < 255:  # some transparency: show it over white
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(
    data: bytes,
    *,
    max_bytes: int,
    max_side: int,
    max_pixels: int = MAX_PIXELS,
    max_decode_bytes: int = MAX_DECODE_BYTES,
    at_least: tuple[int, int] | None = None,
    refuse_over_side: bool = False,
    formats: Collection[str] = FORMATS,
) -> Decoded:
    """Decode `data` into RGB pixels at most `max_side` a side, or raise ImageRejected.

    `at_least` (width, height, as displayed): a JPEG may be DCT-scaled further, as long as
    the result keeps at least that size (see `decode_scaled`); other formats ignore it.
    `formats` narrows FORMATS (an emulated service that takes fewer).
    """
    check_size(data, max_bytes)
    fmt = sniff(data)
    if fmt is None or fmt not in formats:
        named = [f for f in FORMATS if f in formats]
        raise ImageRejected(
            "IMAGE_FORMAT_UNSUPPORTED",
            f"image is not a {', '.join(named[:-1])} or {named[-1]} file",
        )
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check still runs inside some plugins (a GIF's frames):
            # its warning is for the bounds below to decide, its error is a refusal.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _open(data, fmt)
    except Image.DecompressionBombError:
        raise ImageRejected(
            "IMAGE_DIMENSIONS_TOO_LARGE", "a frame of the image is too large to decode"
        ) from None
    except _HEADER_ERRORS:
        raise ImageRejected(
            "IMAGE_FORMAT_UNSUPPORTED",
            f"image is not a readable {fmt} file "
            "(an unsupported variant, or a truncated or damaged header)",
        ) from None
    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageRejected("IMAGE_CORRUPT", f"image is {width}x{height} pixels")
        if refuse_over_side and max(width, height) > max_side:
            raise ImageRejected(
                "IMAGE_DIMENSIONS_TOO_LARGE",
                f"image is {width}x{height} pixels; the limit is {max_side} pixels a side",
            )
        if width * height > max_pixels:
            raise _too_large(width, height, max_pixels, "the limit")
        orientation = _orientation(image)
        kind = fmt
        if fmt == "JPEG" and image.info.get("progressive"):
            kind = "progressive JPEG"
        if kind != "JPEG" and width * height * DECODE_BYTES_PER_PIXEL[kind] > max_decode_bytes:
            raise _too_large(
                width,
                height,
                max_decode_bytes // DECODE_BYTES_PER_PIXEL[kind],
                f"a {kind} is decoded in full, and its limit",
            )
        if fmt == "JPEG":
            wanted = at_least
            if wanted is not None and orientation >= 5:  # stored sideways
                wanted = (wanted[1], wanted[0])
            factor = _dct_factor((width, height), max_side, wanted)
            if factor > 1:
                image.draft(None, (width // factor, height // factor))
            held = image.size[0] * image.size[1]
            if kind == "JPEG" and held * DECODE_BYTES_PER_PIXEL["JPEG"] > max_decode_bytes:
                raise _too_large(
                    width,
                    height,
                    max_decode_bytes // DECODE_BYTES_PER_PIXEL["JPEG"] * factor * factor,
                    f"decoded at 1/{factor}, its limit",
                )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
            if fmt != "JPEG":
                orientation = _orientation(image)  # PNG may carry EXIF after the pixels
            out: Image.Image = _reducible(image)
            longest = max(out.size)
            if longest > max_side:
                out = out.reduce(-(-longest // max_side))
            out = _to_rgb(out)
        except Image.DecompressionBombError:
            raise ImageRejected(
                "IMAGE_DIMENSIONS_TOO_LARGE", "a frame of the image is too large to decode"
            ) from None
        except _DECODE_ERRORS as err:
            # Not Pillow's words: some quote the file's bytes ("broken PNG file (chunk b'...')").
            damage = "truncated" if "truncated" in str(err) else "corrupt"
            raise ImageRejected("IMAGE_CORRUPT", f"image data is {damage}") from None
        if orientation in _TRANSPOSE:
            out = out.transpose(_TRANSPOSE[orientation])
            if orientation >= 5:
                width, height = height, width
        pixels = np.asarray(out, dtype=np.uint8)  # before `image` closes: `out` may be it
    return Decoded(pixels, width, height, fmt)


def decode(
    data: bytes,
    *,
    max_bytes: int,
    max_side: int,
    max_pixels: int = MAX_PIXELS,
    max_decode_bytes: int = MAX_DECODE_BYTES,
    refuse_over_side: bool = False,
    formats: Collection[str] = FORMATS,
) -> RGBImage:
    """Decode `data` into an (height, width, 3) uint8 RGB array at most `max_side` a side
    (larger images scaled down), or raise ImageRejected. See the module's docstring."""
    return decode_image(
        data,
        max_bytes=max_bytes,
        max_side=max_side,
        max_pixels=max_pixels,
        max_decode_bytes=max_decode_bytes,
        refuse_over_side=refuse_over_side,
        formats=formats,
    ).pixels


def decode_scaled(
    data: bytes, at_least: tuple[int, int], *, max_bytes: int, max_side: int
) -> Decoded:
    """A frame decoded no larger than it needs to be: a JPEG at the smallest DCT scale
    (1, 1/2, 1/4 or 1/8) whose result, as displayed, is still at least `at_least` (width,
    height), so libjpeg skips the work of the pixels it would drop; other formats as
    `decode_image`. A 1920x1080 JPEG asked for at least 853x480 is decoded at 960x540,
    in about half the full decode's time. `Decoded.scale` maps boxes back.
    """
    return decode_image(data, max_bytes=max_bytes, max_side=max_side, at_least=at_least)
