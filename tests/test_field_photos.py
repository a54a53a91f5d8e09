"""The photos members really have, through a real server: other formats, other bit depths
and colour modes, phone sizes up to 100 megapixels (issue 13). Each is made in the test from
a shared photograph and must enrol and identify like the original.

One server (one worker) serves the module; each case enrols a member from a converted
photo, identifies a converted frame of the same person's other photo, and deletes the
member, so the gallery never holds two templates of one face.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pillow_heif
import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from PIL import Image

from tests.conftest import Faces
from tests.helpers import details, running_server
from tests.test_images import png16

Stub = pb_grpc.FaceGateServiceStub
MIB = 1024 * 1024
ENROL, PROBE = "people/barack_obama/1.jpg", "people/barack_obama/2.jpg"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    with running_server(tmp_path_factory.mktemp("facegate-data"), workers=1) as built:
        yield built


@pytest.fixture(scope="module")
def stub(server: object) -> Iterator[Stub]:
    target = f"127.0.0.1:{server.port}"  # type: ignore[attr-defined]
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 * MIB)]) as ch:
        yield pb_grpc.FaceGateServiceStub(ch)


def rgb(faces: Faces, path: str) -> Image.Image:
    with Image.open(io.BytesIO(faces.read(path))) as image:
        return image.convert("RGB")


def saved(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    if fmt == "HEIC":
        pillow_heif.from_pillow(image).save(out, format="HEIF", quality=90)
    else:
        image.save(out, fmt, **options)
    return out.getvalue()


def transparent_border(image: Image.Image) -> bytes:
    rgba = image.convert("RGBA")
    alpha = Image.new("L", image.size, 0)
    alpha.paste(255, (20, 20, image.width - 20, image.height - 20))
    rgba.putalpha(alpha)
    return saved(rgba, "PNG")


def stored_sideways(image: Image.Image) -> bytes:
    """The pixels stored rotated, with the EXIF orientation that turns them upright."""
    exif = Image.Exif()
    exif[0x0112] = 6  # display: rotate 90 degrees clockwise
    return saved(image.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif)


def on_canvas(image: Image.Image, width: int, height: int, grain: bool = False) -> Image.Image:
    """`image` scaled up to fill a width x height canvas (a phone's photo of the person)."""
    scale = min(width / image.width, height / image.height)
    big = image.resize((int(image.width * scale), int(image.height * scale)))
    canvas = Image.new("RGB", (width, height), (118, 122, 130))
    canvas.paste(big, ((width - big.width) // 2, (height - big.height) // 2))
    del big
    if not grain:
        return canvas
    pixels = np.array(canvas)
    del canvas
    tile = np.random.default_rng(0).integers(-6, 7, (256, 256, 1), dtype=np.int16)
    for top in range(0, height, 256):  # sensor grain: its JPEG is a phone's size in bytes
        strip = pixels[top : top + 256]
        grain_ = np.tile(tile, (1, -(-width // 256), 3))[: strip.shape[0], :width]
        strip[...] = np.clip(strip.astype(np.int16) + grain_, 0, 255)
    return Image.fromarray(pixels)


def grey8(image: Image.Image) -> bytes:
    return saved(image.convert("L"), "PNG")


def jpeg(image: Image.Image) -> bytes:
    return saved(image, "JPEG", quality=95)


def png(image: Image.Image) -> bytes:
    return saved(image, "PNG")


def wide(image: Image.Image) -> bytes:
    return png16(np.asarray(image).astype(np.uint16) * 257)


# Each: (how the photo is converted, how the reference it must match is converted).
VARIANTS: dict[str, tuple[Callable[[Image.Image], bytes], Callable[[Image.Image], bytes]]] = {
    "WebP": (lambda i: saved(i, "WEBP", quality=90), jpeg),
    "HEIC": (lambda i: saved(i, "HEIC"), jpeg),
    "AVIF": (lambda i: saved(i, "AVIF", quality=90), jpeg),
    "16-bit RGB PNG": (wide, png),
    "16-bit grey PNG": (lambda i: wide(i.convert("L")), grey8),
    "palette PNG": (lambda i: png(i.convert("P", palette=Image.Palette.ADAPTIVE)), png),
    "CMYK JPEG": (lambda i: saved(i.convert("CMYK"), "JPEG", quality=95), jpeg),
    "RGBA PNG, transparent border": (transparent_border, png),
    "JPEG stored sideways": (stored_sideways, jpeg),
}


def enrol_and_identify(stub: Stub, photo: bytes, frame: bytes) -> pb.IdentifyResponse:
    stub.Enroll(pb.EnrollRequest(member_id="obama", photos=[photo]), timeout=120)
    try:
        response: pb.IdentifyResponse = stub.Identify(
            pb.IdentifyRequest(image=frame, turnstile_id="gate-1"), timeout=60
        )
    finally:
        stub.DeleteMember(pb.DeleteMemberRequest(member_id="obama"), timeout=10)
    return response


@pytest.fixture(scope="module")
def references() -> dict[object, pb.IdentifyResponse]:
    """What each reference conversion gets, once per module."""
    return {}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_converted_photo_enrols_and_identifies_like_the_original(
    stub: Stub, faces: Faces, references: dict[object, pb.IdentifyResponse], variant: str
) -> None:
    convert, reference = VARIANTS[variant]
    photo, probe = rgb(faces, ENROL), rgb(faces, PROBE)
    if reference not in references:
        references[reference] = enrol_and_identify(stub, reference(photo), reference(probe))
    expected = references[reference]
    got = enrol_and_identify(stub, convert(photo), convert(probe))
    assert expected.decision == pb.DECISION_GRANTED and expected.member_id == "obama"
    assert (got.decision, got.member_id) == (expected.decision, expected.member_id)
    assert got.confidence == pytest.approx(expected.confidence, abs=0.03)


def test_phone_sized_photos_enrol_and_are_scaled_not_refused(stub: Stub, faces: Faces) -> None:
    """The two field photos the side limit refused, and a 100-megapixel phone photo of
    phone-like bytes (over the frames' 6 MiB, under the photos' 48 MiB)."""
    photo, probe = rgb(faces, ENROL), faces.read(PROBE)
    for width, height in [(4352, 2903), (3061, 4600)]:
        large = saved(on_canvas(photo, width, height), "JPEG", quality=90)
        assert enrol_and_identify(stub, large, probe).decision == pb.DECISION_GRANTED
    huge = saved(on_canvas(photo, 12240, 8160, grain=True), "JPEG", quality=92)
    assert 6 * MIB < len(huge) < 48 * MIB
    assert enrol_and_identify(stub, huge, probe).decision == pb.DECISION_GRANTED
    with pytest.raises(grpc.RpcError) as frame:  # as a turnstile frame: over 6 MiB
        stub.Identify(pb.IdentifyRequest(image=huge, turnstile_id="gate-1"), timeout=60)
    assert details(frame.value)[0] == "IMAGE_TOO_LARGE"


def test_a_large_frames_face_box_is_in_its_own_pixels(stub: Stub, faces: Faces) -> None:
    """Decoded at half size, answered in the frame's pixels."""
    stub.Enroll(pb.EnrollRequest(member_id="obama", photos=[faces.read(ENROL)]), timeout=120)
    try:
        small = stub.Identify(
            pb.IdentifyRequest(image=faces.read(PROBE), turnstile_id="gate-1"), timeout=60
        )
        probe = rgb(faces, PROBE)
        frame = saved(probe.resize((probe.width * 4, probe.height * 4)), "JPEG", quality=90)
        large = stub.Identify(pb.IdentifyRequest(image=frame, turnstile_id="gate-1"), timeout=60)
    finally:
        stub.DeleteMember(pb.DeleteMemberRequest(member_id="obama"), timeout=10)
    assert large.decision == small.decision == pb.DECISION_GRANTED
    for side in ("left", "top", "width", "height"):
        assert getattr(large.face_box, side) == pytest.approx(
            4 * getattr(small.face_box, side), rel=0.15, abs=10
        ), side


MEASURE = """
import json, sys
from facegate_server.engines.images import decode_image

def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

data = open(sys.argv[1], "rb").read()
before = peak()
decoded = decode_image(data, max_bytes=48 << 20, max_side=4096)
print(json.dumps({"grew": peak() - before, "shape": list(decoded.pixels.shape)}))
"""


def test_a_100_megapixel_photo_decodes_in_bounded_memory(faces: Faces, tmp_path: Path) -> None:
    """Measured as a separate process's peak RSS (tracemalloc misses Pillow's buffers): the
    JPEG is DCT-scaled to 1/4, so its 300 MB full-resolution bitmap is never built."""
    path = tmp_path / "100mp.jpg"
    path.write_bytes(saved(on_canvas(rgb(faces, ENROL), 12240, 8160), "JPEG", quality=90))
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, check=True
    )
    measured = json.loads(run.stdout)
    assert measured["shape"] == [2040, 3060, 3]
    assert measured["grew"] < 160 * MIB  # about 60 MiB measured; 12240x8160x3 is 286 MiB
