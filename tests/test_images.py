"""Image decoding rules: limits before decoding, formats by content, every mode to 8-bit RGB,
EXIF orientation, and large images scaled down rather than refused."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pillow_heif
import pytest
from facegate_server.engines.images import (
    DECODE_BYTES_PER_PIXEL,
    ImageRejected,
    decode,
    decode_image,
    decode_scaled,
    sniff,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import FACES
from tests.helpers import image_bytes, png_bomb, png_chunk

LIMITS = {"max_bytes": 6 * 1024 * 1024, "max_side": 4096}
PHOTO = FACES / "people" / "barack_obama" / "1.jpg"


def noise_jpeg() -> bytes:
    out = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


NOISE_JPEG = noise_jpeg()


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    """`image` saved as `fmt` (HEIC through pillow-heif, the others through Pillow)."""
    out = io.BytesIO()
    if fmt == "HEIC":
        pillow_heif.from_pillow(image).save(out, format="HEIF", **options)
    else:
        image.save(out, fmt, **options)
    return out.getvalue()


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG (grey for 2-d `values`, RGB for 3-d), written by hand: Pillow cannot
    write 16-bit RGB."""
    height, width = values.shape[:2]
    colour = 2 if values.ndim == 3 else 0
    rows = values.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) claims width x height."""
    data = bytearray(image_bytes(16, 16, "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    if not PHOTO.exists():
        pytest.skip(f"the test photographs are not here ({FACES})")
    with Image.open(PHOTO) as image:
        return image.convert("RGB")


def difference(pixels: np.ndarray, image: Image.Image) -> float:
    """Mean absolute difference, in 8-bit levels, between decoded pixels and `image`."""
    assert pixels.shape == (image.height, image.width, 3)
    return float(np.abs(pixels.astype(int) - np.asarray(image.convert("RGB"), int)).mean())


# ------------------------------------------------------------------ formats


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "WEBP", "HEIC", "AVIF"])
def test_supported_formats_decode_to_rgb(fmt: str) -> None:
    pixels = decode(encoded(Image.new("RGB", (40, 30), "red"), fmt), **LIMITS)
    assert pixels.shape == (30, 40, 3)
    assert pixels.dtype == np.uint8
    assert pixels[0, 0, 0] > 200 and pixels[0, 0, 1] < 60


@pytest.mark.parametrize(
    ("fmt", "options", "tolerance"),
    [
        ("WEBP", {"quality": 90}, 3.0),
        ("WEBP", {"lossless": True}, 0.0),
        ("HEIC", {"quality": 90}, 3.0),
        ("AVIF", {"quality": 90}, 3.0),
        ("PNG", {}, 0.0),
        ("BMP", {}, 0.0),
    ],
)
def test_a_photo_in_another_format_decodes_to_its_pixels(
    photo: Image.Image, fmt: str, options: dict[str, object], tolerance: float
) -> None:
    decoded = decode_image(encoded(photo, fmt, **options), **LIMITS)
    assert decoded.format == {"WEBP": "WebP"}.get(fmt, fmt)
    assert difference(decoded.pixels, photo) <= tolerance


def test_formats_are_judged_by_content() -> None:
    red = Image.new("RGB", (8, 8), "red")
    assert sniff(encoded(red, "WEBP")) == "WebP"
    assert sniff(encoded(red, "HEIC")) == "HEIC"
    assert sniff(encoded(red, "AVIF")) == "AVIF"
    assert sniff(encoded(red, "TIFF")) is None
    assert sniff(b"RIFF\0\0\0\0WAVEfmt ") is None  # RIFF, but sound
    assert sniff(b"\0\0\0\x18ftypmp42\0\0\0\0isom") is None  # ISO media, but a video


# ------------------------------------------------------------------ modes and depths


def test_16_bit_grey_is_its_high_byte_not_clipped() -> None:
    ramp = np.tile(np.arange(0, 65536, 256, dtype=np.uint16), (4, 1)) + 0x7F  # 4x256
    pixels = decode(png16(ramp), **LIMITS)
    assert pixels.shape == (4, 256, 3)
    assert (pixels[..., 0] == np.arange(256)).all()  # Pillow's convert("L") makes 255 of >255
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_16_bit_photos_decode_like_8_bit(photo: Image.Image) -> None:
    rgb = np.asarray(photo).astype(np.uint16)
    assert difference(decode(png16(rgb * 257), **LIMITS), photo) == 0.0
    grey = photo.convert("L")
    wide = png16(np.asarray(grey).astype(np.uint16) * 257)
    assert difference(decode(wide, **LIMITS), grey) == 0.0


def test_palette_greyscale_cmyk_and_bilevel(photo: Image.Image) -> None:
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE)
    assert difference(decode(encoded(palette, "PNG"), **LIMITS), palette) == 0.0
    grey = photo.convert("L")
    assert difference(decode(encoded(grey, "PNG"), **LIMITS), grey) == 0.0
    cmyk = encoded(photo.convert("CMYK"), "JPEG", quality=95)
    assert difference(decode(cmyk, **LIMITS), photo) <= 3.0
    bilevel = photo.convert("1")
    assert difference(decode(encoded(bilevel, "PNG"), **LIMITS), bilevel) == 0.0


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparency_is_shown_over_white(mode: str) -> None:
    image = Image.new("RGBA", (10, 10), (0, 0, 200, 255))
    image.paste((0, 0, 0, 0), (0, 0, 5, 10))  # left half: transparent black
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "PA":
        image = image.convert("P")  # a palette with one transparent entry
    pixels = decode(encoded(image, "PNG"), **LIMITS)
    assert (pixels[:, :5] == 255).all()  # what a viewer shows: white, not black
    assert (pixels[:, 5:] < 255).any()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "AVIF"])
def test_exif_orientation_is_applied(fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = Image.new("RGB", (40, 20), "blue")
    image.paste((255, 0, 0), (0, 0, 10, 20))  # stored: red on the left
    decoded = decode_image(encoded(image, fmt, exif=exif), **LIMITS)
    assert decoded.pixels.shape == (40, 20, 3)
    assert (decoded.width, decoded.height) == (20, 40)
    assert decoded.pixels[2, 10, 0] > 200 and decoded.pixels[-3, 10, 0] < 60  # red on top


def test_heic_orientation_is_applied_once() -> None:
    """libheif applies a HEIC's rotation itself (and pillow-heif reports EXIF orientation
    1), so it must not be applied again."""
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = io.BytesIO()
    Image.new("RGB", (40, 20), "blue").save(stored, "JPEG", exif=exif)
    out = io.BytesIO()
    pillow_heif.register_heif_opener()  # Pillow's save("HEIF") is how a phone's file is made
    with Image.open(stored) as jpeg:
        jpeg.save(out, "HEIF")
    assert decode(out.getvalue(), **LIMITS).shape == (40, 20, 3)


# ------------------------------------------------------------------ sizes


def test_a_large_jpeg_is_dct_scaled_not_refused() -> None:
    """A 4352x2903 phone photo: decoded at 1/2 in libjpeg, never at full size."""
    decoded = decode_image(image_bytes(4352, 2903, "JPEG"), **LIMITS)
    assert decoded.pixels.shape == (1452, 2176, 3)
    assert (decoded.width, decoded.height, decoded.scale) == (4352, 2903, 0.5)


def test_a_large_png_is_reduced_not_refused() -> None:
    decoded = decode_image(image_bytes(3061, 4600, "PNG"), **LIMITS)
    assert decoded.pixels.shape == (2300, 1531, 3)
    assert (decoded.width, decoded.height) == (3061, 4600)


def test_a_long_thin_image_is_scaled_too() -> None:
    assert decode(image_bytes(4097, 8), **LIMITS).shape == (4, 2049, 3)


def test_the_side_limit_can_still_refuse() -> None:
    with pytest.raises(ImageRejected) as rejected:
        decode(image_bytes(4097, 8), **LIMITS, refuse_over_side=True)
    assert rejected.value.reason == "IMAGE_DIMENSIONS_TOO_LARGE"
    assert "4097x8" in str(rejected.value)


def test_a_caller_can_narrow_the_formats() -> None:
    """The Face API emulator takes Azure's four formats only."""
    webp = encoded(Image.new("RGB", (8, 8)), "WEBP")
    with pytest.raises(ImageRejected) as rejected:
        decode(webp, **LIMITS, formats=("JPEG", "PNG", "GIF", "BMP"))
    assert rejected.value.reason == "IMAGE_FORMAT_UNSUPPORTED"
    assert str(rejected.value) == "image is not a JPEG, PNG, GIF or BMP file"


def test_formats_decoded_in_full_have_a_pixel_bound_of_their_own() -> None:
    """Checked from the header, by each format's memory per pixel: a PNG that claims
    10000x10000 is refused, a JPEG of that size is DCT-scaled; a progressive JPEG keeps
    every coefficient, so it is bounded like the formats decoded in full."""
    with pytest.raises(ImageRejected) as rejected:
        decode(png_bomb(10_000, 10_000), **LIMITS)
    assert rejected.value.reason == "IMAGE_DIMENSIONS_TOO_LARGE"
    assert "10000x10000" in str(rejected.value) and "PNG" in str(rejected.value)
    # libjpeg fills what the 16x16 image's data does not cover: decoded, at 1/4.
    assert decode(jpeg_claiming(10_000, 10_000), **LIMITS).shape == (2500, 2500, 3)

    budget = 100 * 100 * DECODE_BYTES_PER_PIXEL["PNG"]
    small = {"max_decode_bytes": budget, "max_bytes": 1 << 20, "max_side": 16}
    photo = Image.new("RGB", (100, 100), "green")
    assert decode(encoded(photo, "PNG"), **small).shape == (15, 15, 3)  # reduced by 7
    assert decode(encoded(photo, "JPEG"), **small).shape == (13, 13, 3)  # held at 1/8
    for fmt, options, kind in [
        ("JPEG", {"progressive": True}, "progressive JPEG"),
        ("WEBP", {}, "WebP"),
        ("HEIC", {}, "HEIC"),
    ]:
        with pytest.raises(ImageRejected) as full:
            decode(encoded(photo, fmt, **options), **small)
        assert f"a {kind} is decoded in full" in str(full.value)


def test_decode_scaled_gives_the_smallest_dct_scale_still_large_enough() -> None:
    frame = image_bytes(1920, 1080, "JPEG")
    decoded = decode_scaled(frame, (853, 480), **LIMITS)
    assert decoded.pixels.shape == (540, 960, 3)
    assert decoded.scale == 0.5
    assert decode_scaled(frame, (400, 200), **LIMITS).pixels.shape == (270, 480, 3)
    assert decode_scaled(frame, (1000, 600), **LIMITS).pixels.shape == (1080, 1920, 3)
    # A frame stored sideways: `at_least` is of the displayed image.
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = encoded(Image.new("RGB", (1920, 1080)), "JPEG", exif=exif)
    assert decode_scaled(sideways, (480, 853), **LIMITS).pixels.shape == (960, 540, 3)
    # Other formats are decoded as they are.
    assert decode_scaled(image_bytes(640, 480), (100, 100), **LIMITS).pixels.shape[:2] == (
        480,
        640,
    )


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "IMAGE_EMPTY"),
        (b"x" * (6 * 1024 * 1024 + 1), "IMAGE_TOO_LARGE"),
        (b"GIF89a", "IMAGE_FORMAT_UNSUPPORTED"),
        (b"%PDF-1.4 not an image", "IMAGE_FORMAT_UNSUPPORTED"),
        (png_bomb(), "IMAGE_DIMENSIONS_TOO_LARGE"),
        (jpeg_claiming(20_000, 20_000), "IMAGE_DIMENSIONS_TOO_LARGE"),
        (image_bytes(8, 8, "TIFF"), "IMAGE_FORMAT_UNSUPPORTED"),
        (NOISE_JPEG[: len(NOISE_JPEG) // 2], "IMAGE_CORRUPT"),
        (b"RIFF\0\0\0\0WEBPVP8 garbage", "IMAGE_FORMAT_UNSUPPORTED"),
        # found by tests/test_fuzz.py: a 0x0 GIF whose frame claims 180 megapixels
        (b"GIF87a\0\0\0\0\0\0\0,\0\0\0\0\0+\0@", "IMAGE_DIMENSIONS_TOO_LARGE"),
        (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic garbage", "IMAGE_FORMAT_UNSUPPORTED"),
    ],
)
def test_rejections(data: bytes, reason: str) -> None:
    with pytest.raises(ImageRejected) as rejected:
        decode(data, **LIMITS)
    assert rejected.value.reason == reason
    assert str(rejected.value)


def test_bombs_are_refused_by_pixel_count_before_decoding() -> None:
    """20000x20000 is 400 megapixels: refused from the header (decoding it at 1/8 would
    still be 6 megapixels of work and a minute of entropy decoding)."""
    with pytest.raises(ImageRejected) as rejected:
        decode(jpeg_claiming(20_000, 20_000), **LIMITS)
    assert "20000x20000" in str(rejected.value) and "megapixels" in str(rejected.value)


def _seeds() -> list[bytes]:
    red = Image.new("RGB", (24, 16), "red")
    return [encoded(red, fmt) for fmt in ("WEBP", "HEIC", "AVIF")] + [png16(np.ones((6, 6)))]


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        del data[draw(st.integers(1, len(data))) :]
    return bytes(data)


SEEDS = _seeds()


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=_mutated())
def test_damaged_new_formats_give_pixels_or_image_rejected(data: bytes) -> None:
    try:
        pixels = decode(data, **LIMITS)
    except ImageRejected as rejected:
        assert rejected.reason.startswith("IMAGE_")
        assert "b'" not in rejected.message and "\\x" not in rejected.message
        return
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8
