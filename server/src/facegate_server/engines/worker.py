"""What runs inside a recognition worker process: decode, detect, measure, encode.

dlib's shape predictor and face encoder hold the GIL, so FaceGate runs them in worker
processes (one a core by default) and keeps matching in the server process. Nothing here
is imported by the server process except to name the functions it submits.

Detection runs on a copy scaled to about 853x480 pixels (HOG's cost grows with pixels;
smaller frames are upsampled once so that small faces are still found). A JPEG frame to
identify is decoded at the smallest DCT scale that keeps those pixels (a 1080p frame at
960x540) and the chosen face is encoded there when it is at least ENCODE_FACE_PX wide,
else on the full decode; enrolment photos are decoded in full (or as scaled down for the
side limit, engines/images.py). A coarse-to-fine search (`find_faces`, COARSE_SHARE) that
keeps every decision is there, off by default: measured, it costs more than it saves on
the frames we have.

Of the faces found, one is chosen (policy.choose_face); its 5-point landmarks are computed
once and serve both the quality measurements (pose) and the encoder, which is what
face_recognition.face_encodings does inside. A face of poor quality is not encoded unless
asked (`FaceRules.encode_poor`), so a frame that will be answered "come closer" costs no
encoding.

The encoder (FACEGATE_ENCODER, `init_worker(encoder)`): "onnx" runs dlib's own trained
network, read from the same .dat file, on ONNX Runtime (engines/encoder.py; one thread, as
there is one worker a core) on the chip dlib aligns from the 5-point landmarks; "dlib" is
dlib's `compute_face_descriptor`, the reference. Both give the same embeddings (within
1e-3; tests/test_encoder.py), so templates enrolled with either stay valid.

The steps are public so that the Face API emulator (facegate-azure-emulator) recognises
with this same code: `load_models`, `init_worker`, `detect_faces` (with its own pixel
budget), `landmarks`, `encode` and `encode_faces`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from facegate_server.domain import Embedding, FaceBox, FaceQuality
from facegate_server.engines.images import Decoded, RGBImage, decode_image, decode_scaled
from facegate_server.engines.images import decode as decode  # re-exported: benchmarks use it
from facegate_server.engines.policy import QualityLimits, choose_face

DETECT_PIXELS = 853 * 480

Encoder = Literal["onnx", "dlib"]
ENCODERS: tuple[Encoder, ...] = get_args(Encoder)
DEFAULT_ENCODER: Encoder = "onnx"

_face_recognition: Any = None
_load_lock = threading.Lock()
_encoder: Encoder = DEFAULT_ENCODER
_onnx_encoder: Any = None


@dataclass(frozen=True)
class FaceRules:
    """What the worker needs of the policy: which face to take, and whether to encode it."""

    dominant_face_ratio: float | None
    """See policy.choose_face; None: only a lone face is chosen (enrolment)."""
    limits: QualityLimits
    encode_poor: bool = False
    """Encode the chosen face even when its quality is poor (SearchFaces)."""


@dataclass(frozen=True)
class Analysis:
    """What a worker found in one image."""

    width: int
    """The full image's width, as oriented (it may have been decoded scaled down)."""
    height: int
    boxes: list[FaceBox]
    """The faces found, in the full image's pixels."""
    chosen: int | None = None
    """The index in `boxes` of the face decided on (policy.choose_face), if any."""
    quality: FaceQuality | None = None
    """The chosen face's measurements."""
    embedding: Embedding | None = None
    """The chosen face's 128-d embedding; None when it was not encoded (poor quality)."""
    stages_ms: dict[str, float] = field(default_factory=dict)

    @property
    def face(self) -> FaceBox | None:
        return None if self.chosen is None else self.boxes[self.chosen]


def exit_with_parent(interval: float = 1.0) -> None:
    """End this worker process when the process that started it is gone.

    A server killed outright (SIGKILL, the OOM killer) cannot shut its pool down, and its
    workers would otherwise live on, holding dlib's models (~200 MB each). A daemon thread
    notices the parent's death (the worker is re-parented) within `interval` seconds.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def load_models() -> Any:
    """Import face_recognition (loading dlib's models) and run it once; return the module.
    The ONNX encoder is built then too when it is this process's encoder (`use_encoder`).

    Once a process: later calls (from any thread) return the loaded module at once.
    """
    global _face_recognition
    with _load_lock:
        if _face_recognition is not None:
            return _face_recognition
        import warnings

        with warnings.catch_warnings():
            # face_recognition_models imports pkg_resources, which warns on import.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            import face_recognition
        from PIL import ImageFile

        # face_recognition turns on Pillow's "decode truncated images" at import: a cut-off
        # upload would then be decoded as a grey-padded frame instead of being rejected.
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        rng = np.random.default_rng(0)
        frame = rng.integers(0, 255, size=(480, 853, 3), dtype=np.uint8)
        face_recognition.face_locations(frame, number_of_times_to_upsample=0, model="hog")
        face_recognition.face_encodings(frame, known_face_locations=[(100, 300, 300, 100)])
        _face_recognition = face_recognition
        if _encoder == "onnx":  # warm too, so that no first request pays for building it
            _build_onnx_encoder()
        return face_recognition


def use_encoder(encoder: Encoder) -> None:
    """Choose this process's encoder ("onnx" or "dlib", the reference); load it if needed."""
    global _encoder, _onnx_encoder
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; one of {', '.join(ENCODERS)}")
    _encoder = encoder
    if encoder == "onnx":
        with _load_lock:
            _build_onnx_encoder()


def _build_onnx_encoder() -> None:
    """Build and run once the ONNX encoder, if not yet built (with _load_lock held)."""
    global _onnx_encoder
    if _onnx_encoder is None:
        from facegate_server.engines.encoder import CHIP_SIZE, OnnxEncoder

        built = OnnxEncoder(threads=1)
        built.encode_chips(np.zeros((CHIP_SIZE, CHIP_SIZE, 3), np.uint8))
        _onnx_encoder = built


def init_worker(encoder: Encoder = DEFAULT_ENCODER) -> None:
    """A worker process's start: end with the parent, load the models before any request."""
    exit_with_parent()
    use_encoder(encoder)
    load_models()


def ping() -> int:
    """A no-op task; submitting one a worker makes the pool start every worker."""
    return 1


SHARPNESS_SIDE = 64
"""The face crop is measured at this many pixels a side, or at its own size when smaller
(never upsampled: interpolation would read as blur)."""


def _grey_crop(pixels: RGBImage, box: FaceBox) -> npt.NDArray[np.float64]:
    from PIL import Image

    crop = pixels[box.top : box.top + box.height, box.left : box.left + box.width]
    side = max(3, min(SHARPNESS_SIDE, box.width, box.height))
    grey = Image.fromarray(crop).convert("L").resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(grey, np.float64)


def sharpness_and_brightness(pixels: RGBImage, box: FaceBox) -> tuple[float, float]:
    """(sharpness, brightness) of a face crop; see domain.FaceQuality.

    Sharpness: the variance of the second difference in the flattest of 4 directions (0,
    45, 90, 135 degrees; the flattest catches motion blur, which leaves detail across the
    motion), scaled to a mean brightness of 128, on the crop scaled to 64x64 grey pixels,
    or kept at its own size when smaller: a small face is not upsampled, as interpolation
    would read as blur (faces of 43-62 px measured 40-193 upsampled, 183-580 not).
    """
    g = _grey_crop(pixels, box)
    brightness = float(g.mean())
    centre = 2.0 * g[1:-1, 1:-1]
    second_differences = (
        g[1:-1, :-2] + g[1:-1, 2:] - centre,  # across columns (0 degrees)
        g[:-2, 1:-1] + g[2:, 1:-1] - centre,  # across rows (90 degrees)
        (g[:-2, :-2] + g[2:, 2:] - centre) / 2.0,  # diagonals, per unit of pixel step
        (g[:-2, 2:] + g[2:, :-2] - centre) / 2.0,
    )
    flattest = min(float(d.var()) for d in second_differences)
    return flattest * (128.0 / max(brightness, 1.0)) ** 2, brightness


def pose(points: npt.NDArray[np.float64]) -> tuple[float, float]:
    """(yaw, pitch) proxies from dlib's 5 landmarks: 2 corners of each eye, nose base."""
    eye_a, eye_b, nose = points[0:2].mean(axis=0), points[2:4].mean(axis=0), points[4]
    left, right = (eye_a, eye_b) if eye_a[0] <= eye_b[0] else (eye_b, eye_a)
    across = right - left
    between = float(np.hypot(*across))
    if between < 1e-6:
        return math.inf, 0.0
    unit = across / between
    down = np.array([-unit[1], unit[0]])
    offset = nose - (left + right) / 2.0
    return float(offset @ unit) / between, float(abs(offset @ down)) / between


def measure_quality(pixels: RGBImage, box: FaceBox, points: npt.NDArray[np.float64]) -> FaceQuality:
    sharpness, brightness = sharpness_and_brightness(pixels, box)
    yaw, pitch = pose(points)
    return FaceQuality(
        size=max(box.width, box.height),
        sharpness=sharpness,
        brightness=brightness,
        yaw=yaw,
        pitch=pitch,
    )


HOG_WINDOW = 80
"""dlib's HOG window: the smallest face it finds, in the pixels it detects on."""
COARSE_SHARE: float | None = None
"""The coarse pass's share of the fine pass's scale; None: no coarse pass (the default).

Measured (benchmarks/README.md, "Detection for Identify"): with the dominant-face ratio
of 4 a face half as wide as the largest matters, so a coarse pass settles a frame alone
only when its face fills most of it; what the coarse pass gives is the largest face's
width, which sets the middle pass's scale. At 1/3 (a ninth of the pixels) it saved 12% of
HOG's time on 480p close-ups (the face 55% of the height) and cost 17% on the benchmark's
letterboxed frames (faces of 72-258 px at 480p), with every decision the same; so it is
off until turnstile framing says otherwise. `COARSE_TO_FINE_SHARE` is the measured value."""
COARSE_TO_FINE_SHARE = 1 / 3
SURE_WINDOWS = 1.0
"""A face this many HOG windows wide at the scale HOG runs is taken to be found there
(dlib's boxes go down to about 72 pixels at its scale); only narrower faces may have
been missed."""
MIDDLE_AT_MOST = 0.75
"""A middle pass runs only at this share of the fine pass's scale or less (about half its
pixels): above it, the coarse and middle passes together would cost about as much as the
fine pass, and a middle pass that does not settle (the coarse box overstated the face)
adds the fine pass after both."""
ENCODE_FACE_PX = 100
"""A frame decoded DCT-scaled is decoded again in full for the chosen face's landmarks,
measurements and encoding when the face is narrower than this there (and the full decode
has more of it). dlib's 150x150 chip (padding 0.25) holds the face at about 100 pixels,
so a face this wide is not upsampled into it. Measured against 150 on the test photos
(benchmarks/README.md): the same decisions, the largest old-new embedding distance 0.085
against 0.082, and 1080p frames decoded in 6.8 ms against 11.4 (at 150 most of them were
decoded twice; the full decode alone took 9.3)."""


def _hog(pixels: RGBImage, scale: float, upsample: int) -> list[FaceBox]:
    """HOG on `pixels` scaled by `scale` (<= 1) and upsampled `upsample` times; the boxes
    scaled back to `pixels` and clipped."""
    fr = load_models()
    from PIL import Image

    height, width = pixels.shape[:2]
    if scale < 1.0:
        small = Image.fromarray(pixels).resize(
            (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR
        )
        detect_on = np.asarray(small)
    else:
        detect_on = pixels
    found = fr.face_locations(detect_on, number_of_times_to_upsample=upsample, model="hog")
    boxes = []
    for top, right, bottom, left in found:
        t = max(0, round(top / scale))
        r = min(width, round(right / scale))
        b = min(height, round(bottom / scale))
        l_ = max(0, round(left / scale))
        if r > l_ and b > t:
            boxes.append(FaceBox(left=l_, top=t, width=r - l_, height=b - t))
    return boxes


def _fine_scale(width: int, height: int, detect_pixels: int) -> tuple[float, int]:
    """(scale, upsample) of the fine pass: a copy of about `detect_pixels` pixels, or the
    image upsampled once when it has a quarter of that or less."""
    scale = min(1.0, math.sqrt(detect_pixels / (width * height)))
    return scale, 1 if width * height * 4 <= detect_pixels else 0


def detect_faces(pixels: RGBImage, detect_pixels: int = DETECT_PIXELS) -> list[FaceBox]:
    """The faces HOG finds in `pixels`, as boxes in its pixels, in the detector's order.

    Detection runs on a copy scaled down to about `detect_pixels` pixels (HOG's cost grows
    with pixels); an image of a quarter of that or less is upsampled once instead, so that
    small faces are still found. Boxes are scaled back and clipped to the image.
    """
    height, width = pixels.shape[:2]
    return _hog(pixels, *_fine_scale(width, height, detect_pixels))


def _settled(
    boxes: Sequence[FaceBox], ratio: float, frame: tuple[int, int], missed_below: float
) -> bool:
    """Whether faces narrower than `missed_below` (which a pass may have missed) could not
    change `choose_face`'s decision on `boxes`.

    They cannot when the largest face found is at least `ratio` times the area of any of
    them (it stays the largest and, by the size rule, dominant over them; a decision of
    "several faces" only gains faces) -- unless the decision was made by the centre/side
    rule, which any face in the middle overturns.
    """
    if not boxes:
        return False
    order = sorted(boxes, key=lambda b: b.area, reverse=True)
    if order[0].area < ratio * missed_below * missed_below:
        return False
    chosen = choose_face(boxes, ratio, frame)
    by_position = chosen is not None and len(order) > 1 and order[0].area < ratio * order[1].area
    return not by_position


def find_faces(
    pixels: RGBImage, dominant_face_ratio: float | None, detect_pixels: int = DETECT_PIXELS
) -> tuple[list[FaceBox], str]:
    """The faces `choose_face` needs to decide, coarse to fine; and the passes that ran.

    Enrolment (`dominant_face_ratio` None: any second face matters) runs the fine pass
    (`detect_faces`), and so does everything while COARSE_SHARE is None. Otherwise a
    coarse pass first, at COARSE_SHARE of the fine pass's
    scale; its faces are kept when every face it could have missed (narrower than
    SURE_WINDOWS HOG windows at its scale) could not change the decision (`_settled`).
    Else a second pass at the coarsest scale that surely finds every face that could
    (the largest face's width over the square root of the ratio; the coarse box's width
    is known to about a pyramid step, hence a slack) when that scale is at most
    MIDDLE_AT_MOST of the fine pass's -- and the fine pass if that still leaves the
    decision open, or at once when the middle pass would save too little to pay for the
    risk of a third.
    """
    height, width = pixels.shape[:2]
    fine, upsample = _fine_scale(width, height, detect_pixels)
    if dominant_face_ratio is None or COARSE_SHARE is None:
        return _hog(pixels, fine, upsample), "fine"
    frame = (width, height)
    effective = fine * (2 if upsample else 1)  # HOG's pixels per pixel of `pixels`
    coarse = effective * COARSE_SHARE
    boxes = _hog(pixels, coarse, 0) if coarse <= 1.0 else []
    sure = SURE_WINDOWS * HOG_WINDOW
    if coarse <= 1.0 and _settled(boxes, dominant_face_ratio, frame, sure / coarse):
        return boxes, "coarse"
    if boxes:
        largest = max(b.width for b in boxes)
        needed = sure * math.sqrt(dominant_face_ratio) / (0.85 * largest)  # boxes move
        if coarse < needed <= effective * MIDDLE_AT_MOST and needed <= 1.0:
            middle = _hog(pixels, needed, 0)
            if _settled(middle, dominant_face_ratio, frame, sure / needed):
                return middle, "coarse+middle"
            return _hog(pixels, fine, upsample), "coarse+middle+fine"
    return _hog(pixels, fine, upsample), "coarse+fine" if coarse <= 1.0 else "fine"


def landmarks(pixels: RGBImage, box: FaceBox) -> Any:
    """dlib's 5-point landmarks of the face in `box` (a dlib full_object_detection)."""
    fr = load_models()
    import dlib

    rect = dlib.rectangle(box.left, box.top, box.left + box.width, box.top + box.height)
    return fr.api.pose_predictor_5_point(pixels, rect)


def encode(pixels: RGBImage, shape: Any) -> Embedding:
    """The 128-d embedding of the face whose landmarks are `shape` (see `landmarks`).

    Both encoders see the same 150x150 chip, aligned by dlib from the landmarks (padding
    0.25, no jitter): dlib's `compute_face_descriptor` cuts it itself.
    """
    fr = load_models()
    if _encoder == "onnx":
        import dlib

        from facegate_server.engines.encoder import CHIP_PADDING, CHIP_SIZE

        if _onnx_encoder is None:
            use_encoder("onnx")
        chip = dlib.get_face_chip(pixels, shape, size=CHIP_SIZE, padding=CHIP_PADDING)
        return _onnx_encoder.encode_chips(chip)  # type: ignore[no-any-return]
    descriptor = fr.api.face_encoder.compute_face_descriptor(pixels, shape, 1)
    return np.asarray(descriptor, dtype=np.float64)


def encode_faces(pixels: RGBImage, boxes: Sequence[FaceBox]) -> list[Embedding]:
    """The embeddings of the faces in `boxes`, in their order."""
    return [encode(pixels, landmarks(pixels, box)) for box in boxes]


def full_size(box: FaceBox, image: Decoded) -> FaceBox:
    """`box`, found in the decoded (perhaps scaled-down) pixels, in the full image's."""
    scale = image.scale
    if scale == 1.0:
        return box
    left, top = (
        min(image.width - 1, round(box.left / scale)),
        min(image.height - 1, round(box.top / scale)),
    )
    return FaceBox(
        left=left,
        top=top,
        width=max(1, min(image.width - left, round(box.width / scale))),
        height=max(1, min(image.height - top, round(box.height / scale))),
    )


def _frame_at_least(data: bytes, detect_pixels: int) -> tuple[int, int] | None:
    """The size (as displayed) a frame must keep when decoded for detection: the fine
    pass's copy (`detect_pixels`); None when it is not a JPEG or not larger than that."""
    import io
    import struct

    from PIL import JpegImagePlugin

    if not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        header = JpegImagePlugin.JpegImageFile(io.BytesIO(data))
        width, height = header.size
        if header.getexif().get(0x0112, 1) >= 5:  # stored sideways
            width, height = height, width
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error):
        # the decode proper reports what is wrong
        return None
    scale = math.sqrt(detect_pixels / (width * height))
    if scale >= 1.0:
        return None
    return math.ceil(width * scale), math.ceil(height * scale)


def _scaled_box(box: FaceBox, by: float, size: tuple[int, int]) -> FaceBox:
    """`box` scaled by `by`, clipped to `size` (width, height)."""
    left, top = min(size[0] - 1, round(box.left * by)), min(size[1] - 1, round(box.top * by))
    return FaceBox(
        left=left,
        top=top,
        width=max(1, min(size[0] - left, round(box.width * by))),
        height=max(1, min(size[1] - top, round(box.height * by))),
    )


def analyse(data: bytes, max_bytes: int, max_side: int, rules: FaceRules) -> Analysis:
    """Find the faces in an image; measure and encode the one to decide on.

    Enrolment photos (`rules.dominant_face_ratio` None) are decoded in full (larger than
    `max_side`: scaled down, engines/images.py) and searched by the fine pass. Frames to
    identify are decoded at the smallest JPEG DCT scale that keeps the fine pass's pixels
    (`images.decode_scaled`) and searched coarse to fine (`find_faces`); when the chosen
    face is narrower than ENCODE_FACE_PX there and the full decode has more of it, the
    frame is decoded again in full for its landmarks, measurements and encoding. Boxes
    are reported in the full image's pixels (`width` x `height`), and so is the quality's
    face size.
    """
    if _face_recognition is None:
        init_worker()

    started = time.perf_counter()
    identify = rules.dominant_face_ratio is not None
    at_least = _frame_at_least(data, DETECT_PIXELS) if identify else None
    if at_least is not None:
        image = decode_scaled(data, at_least, max_bytes=max_bytes, max_side=max_side)
    else:
        image = decode_image(data, max_bytes=max_bytes, max_side=max_side)
    pixels = image.pixels
    decoded = time.perf_counter()

    boxes, _passes = find_faces(pixels, rules.dominant_face_ratio)
    detected = time.perf_counter()

    # The frame's size in the pixels the boxes are in (the decoded, maybe scaled, image).
    chosen = choose_face(boxes, rules.dominant_face_ratio, (pixels.shape[1], pixels.shape[0]))
    quality = None
    embedding = None
    measured = encoded = detected
    redecode = 0.0
    if chosen is not None:
        box = boxes[chosen]
        work, work_box = pixels, box
        if at_least is not None and image.scale < 1.0 and box.width < ENCODE_FACE_PX:
            again = time.perf_counter()
            full = decode_image(data, max_bytes=max_bytes, max_side=max_side)
            if full.scale > image.scale:
                work = full.pixels
                work_box = _scaled_box(
                    box, full.scale / image.scale, (work.shape[1], work.shape[0])
                )
            redecode = time.perf_counter() - again
        shape = landmarks(work, work_box)
        points = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
        quality = measure_quality(work, work_box, points)
        size = full_size(box, image)
        quality = dataclasses.replace(quality, size=max(size.width, size.height))
        measured = time.perf_counter()
        if rules.encode_poor or rules.limits.problem(quality) is None:
            embedding = encode(work, shape)
        encoded = time.perf_counter()
    return Analysis(
        width=image.width,
        height=image.height,
        boxes=[full_size(box, image) for box in boxes],
        chosen=chosen,
        quality=quality,
        embedding=embedding,
        stages_ms={
            "decode": (decoded - started + redecode) * 1000,
            "detect": (detected - decoded) * 1000,
            "landmarks_quality": (measured - detected - redecode) * 1000,
            "encode": (encoded - measured) * 1000,
        },
    )
