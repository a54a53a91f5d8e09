"""The ONNX encoder (engines/encoder.py) against dlib's own, on every face of the test photos.

The network is read from face_recognition_models' .dat file; both encoders get the same
chip, aligned by dlib from the 5-point landmarks. Their embeddings must agree within 1e-3
and every decision taken on them (a match within the threshold, the policy's decision
against a gallery of the other faces) must be the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import numpy.typing as npt
import pytest
from facegate_server.config import Encoder as SettingsEncoder
from facegate_server.config import Settings, load_settings
from facegate_server.engines import worker
from facegate_server.engines.encoder import (
    CHIP_PADDING,
    CHIP_SIZE,
    NetworkFormatError,
    OnnxEncoder,
    build_model,
    model_path,
    read_network,
)
from facegate_server.engines.images import decode
from facegate_server.engines.index import FaceIndex
from facegate_server.engines.policy import DecisionPolicy, decide_match

from tests.conftest import Faces

TOLERANCE = 1e-3


@dataclass(frozen=True)
class Face:
    label: str
    """The photo's path and the face's index in it."""
    person: str
    """The person of a one-face photo; the label for a face in a group photo."""
    dlib: npt.NDArray[np.float64]
    """dlib's compute_face_descriptor on the whole image (what the worker's "dlib" does)."""
    dlib_chip: npt.NDArray[np.float64]
    """dlib's descriptor of the aligned chip."""
    onnx: npt.NDArray[np.float64]


@pytest.fixture(scope="module")
def onnx_encoder() -> OnnxEncoder:
    return OnnxEncoder(threads=1)


@pytest.fixture(scope="module")
def encoded(faces: Faces, onnx_encoder: OnnxEncoder) -> list[Face]:
    """Every face HOG finds in every test photo, encoded both ways."""
    import dlib

    fr = worker.load_models()
    found = []
    for row in faces.rows:
        pixels = decode(faces.read(row["path"]), max_bytes=6 << 20, max_side=4096)
        for i, box in enumerate(worker.detect_faces(pixels)):
            shape = worker.landmarks(pixels, box)
            chip = dlib.get_face_chip(pixels, shape, size=CHIP_SIZE, padding=CHIP_PADDING)
            one_face = row["faces"] == "1" and row["person"]
            found.append(
                Face(
                    label=f"{row['path']}#{i}",
                    person=row["person"] if one_face else f"{row['path']}#{i}",
                    dlib=np.asarray(fr.api.face_encoder.compute_face_descriptor(pixels, shape, 1)),
                    dlib_chip=np.asarray(fr.api.face_encoder.compute_face_descriptor(chip, 0)),
                    onnx=onnx_encoder.encode_chips(chip),
                )
            )
    return found


def test_every_photo_gives_faces(encoded: list[Face], faces: Faces) -> None:
    assert len(encoded) >= len(faces.rows)


def test_dlib_encodes_its_own_chip_as_the_whole_image(encoded: list[Face]) -> None:
    """The chip the ONNX encoder is given is the one dlib aligns inside compute_face_descriptor."""
    worst = max(float(np.abs(f.dlib - f.dlib_chip).max()) for f in encoded)
    assert worst < 1e-6


def test_embeddings_equal_dlibs(encoded: list[Face]) -> None:
    differences = {f.label: float(np.abs(f.onnx - f.dlib).max()) for f in encoded}
    worst = max(differences, key=differences.__getitem__)
    assert differences[worst] < TOLERANCE, f"{worst}: {differences[worst]:.2e}"


def test_every_match_within_the_threshold_is_the_same(encoded: list[Face]) -> None:
    threshold = Settings().match_threshold
    for encoding in ("dlib", "onnx"):
        assert all(np.linalg.norm(getattr(f, encoding)) > 0.5 for f in encoded), encoding
    for i, a in enumerate(encoded):
        for b in encoded[i + 1 :]:
            near_dlib = np.linalg.norm(a.dlib - b.dlib) <= threshold
            near_onnx = np.linalg.norm(a.onnx - b.onnx) <= threshold
            assert near_dlib == near_onnx, (a.label, b.label)


def test_every_decision_is_the_same(encoded: list[Face]) -> None:
    """Each face against a gallery of all the others (one member a person): same outcome."""
    policy = DecisionPolicy()

    def decisions(encoding: str) -> list[tuple[Any, str]]:
        result = []
        for probe in encoded:
            others = [(f.person, getattr(f, encoding)) for f in encoded if f is not probe]
            decided = decide_match(FaceIndex(others).match(getattr(probe, encoding)), policy)
            result.append((decided.decision, decided.member_id))
        return result

    by_dlib, by_onnx = decisions("dlib"), decisions("onnx")
    assert by_dlib == by_onnx
    assert {d for d, _ in by_dlib} != {by_dlib[0][0]}  # the gallery decides both ways


def test_the_worker_encodes_with_the_chosen_encoder(faces: Faces) -> None:
    pixels = decode(faces.read(faces.of("barack_obama")[0]), max_bytes=6 << 20, max_side=4096)
    (box,) = worker.detect_faces(pixels)
    shape = worker.landmarks(pixels, box)
    try:
        worker.use_encoder("dlib")
        by_dlib = worker.encode(pixels, shape)
        worker.use_encoder("onnx")
        by_onnx = worker.encode(pixels, shape)
    finally:
        worker.use_encoder(worker.DEFAULT_ENCODER)
    assert by_onnx.shape == (128,) and by_onnx.dtype == np.float64
    assert float(np.abs(by_onnx - by_dlib).max()) < TOLERANCE
    with pytest.raises(ValueError, match="unknown encoder"):
        worker.use_encoder("tflite")  # type: ignore[arg-type]


def test_the_setting_names_the_workers_encoders() -> None:
    assert get_args(SettingsEncoder) == worker.ENCODERS
    assert Settings().encoder == worker.DEFAULT_ENCODER == "onnx"
    assert load_settings({"FACEGATE_ENCODER": "dlib"}).encoder == "dlib"


def test_the_network_is_read_from_the_file() -> None:
    network = read_network(model_path())
    kinds = [layer.kind for layer in network.layers]
    assert network.loss == "loss_metric_2"
    assert network.input_size == (150, 150)
    assert kinds.count("con") == 29 and kinds.count("add_prev") == 14
    assert kinds[-1] == "fc" and network.layers[-1].weights["w"].shape == (256, 128)
    parameters = sum(w.size for layer in network.layers for w in layer.weights.values())
    assert 5_000_000 < parameters < 6_000_000
    build_model(network)  # passes onnx's checker


def test_a_truncated_file_is_refused(tmp_path: Any) -> None:
    cut = tmp_path / "cut.dat"
    cut.write_bytes(model_path().read_bytes()[:100_000])
    with pytest.raises(NetworkFormatError, match="ends inside"):
        read_network(cut)


def test_a_chip_of_another_size_is_refused(onnx_encoder: OnnxEncoder) -> None:
    with pytest.raises(ValueError, match="150x150"):
        onnx_encoder.encode_chips(np.zeros((100, 100, 3), np.uint8))
    batch = onnx_encoder.encode_chips(np.zeros((2, 150, 150, 3), np.uint8))
    assert batch.shape == (2, 128)
