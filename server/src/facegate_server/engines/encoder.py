"""dlib's face-recognition network, read from its own `.dat` file and run by ONNX Runtime.

`face_recognition_models` installs dlib's trained ResNet
(`dlib_face_recognition_resnet_model_v1.dat`) in dlib's serialization (davisking/dlib:
dlib/serialize.h, dlib/dnn/core.h, layers.h, input.h, tensor.h). This module reads that file
(`read_network`), turns the layers it finds into an ONNX graph built in memory
(`build_model`) and runs it (`OnnxEncoder`). No weights are downloaded or written here: every
layer, its shape and its parameters come from the file.

How dlib writes a network (`serialize(net)`): the loss layer first (a version, its name and
settings), then the layer stack from the output down to the input, recursively: each
`add_layer` writes its version, then the layers below it, then its own details and some
bookkeeping (three bools and its cached tensors, empty or not). So the file begins with a
run of version numbers, one per layer from the top (2 for a layer; 1 for a tag or a skip,
which write nothing else, not even their ID), then the input layer, then each layer's
details from the input up. Numbers are dlib's compact integers (a byte: bit 7 the sign, the
low 4 bits how many little-endian bytes follow), strings are such a length then the
bytes, a double is two such integers (mantissa, exponent: m * 2**e), a bool is the
character '0' or '1', and a tensor is a version, its 4 dimensions and raw little-endian
float32 values.

Tags and skips carry no ID in the file; they are read as dlib's residual templates place
them (dlib/examples/dnn_face_recognition_ex.cpp, `residual` and `residual_down`): a tag
remembers the output so far; a tag directly followed by another marker is a tag then a
skip, which goes back to the tag before it; `add_prev` adds the latest remembered output
(dlib zero-pads the smaller operand: a 3x3 block output added to a 4x4 pooled shortcut,
32 channels to 64). Anything else raises NetworkFormatError rather than guessing.

The network's input layer (`input_rgb_image_sized<150>`) takes a 150x150 RGB chip and feeds
(value - mean of its channel) / 256; the graph does the same from uint8 pixels, so its
input is the chip `dlib.get_face_chip(image, shape, size=150, padding=0.25)` returns: the
chip dlib's own `compute_face_descriptor` extracts (jitter off).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "CHIP_PADDING",
    "CHIP_SIZE",
    "Layer",
    "Network",
    "NetworkFormatError",
    "OnnxEncoder",
    "build_model",
    "model_path",
    "read_network",
]

CHIP_SIZE = 150
CHIP_PADDING = 0.25


class NetworkFormatError(ValueError):
    """The file is not a dlib network this reader understands."""


def model_path() -> Path:
    """The .dat file face_recognition_models installs (dlib's face-recognition ResNet)."""
    import warnings

    with warnings.catch_warnings():
        # face_recognition_models imports pkg_resources, which warns on import.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        import face_recognition_models

    return Path(face_recognition_models.face_recognition_model_location())


class _Reader:
    """dlib's serialize.h primitives over a byte string."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise NetworkFormatError(f"the file ends inside a record (offset {self.pos})")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def integer(self) -> int:
        head = self._take(1)[0]
        size = head & 0x0F
        if size > 8:
            raise NetworkFormatError(f"not a dlib integer at offset {self.pos - 1}")
        value = int.from_bytes(self._take(size), "little")
        return -value if head & 0x80 else value

    def looks_like_name(self) -> bool:
        """Whether a string (a layer's name) starts here, rather than another integer."""
        start = self.pos
        try:
            n = self.integer()
            return n >= 3 and self.data[self.pos : self.pos + n].replace(b"_", b"").isalnum()
        except NetworkFormatError:
            return False
        finally:
            self.pos = start

    def string(self) -> str:
        return self._take(self.integer()).decode("ascii")

    def double(self) -> float:
        mantissa = self.integer()
        exponent = self.integer()
        return float(mantissa) * 2.0**exponent

    def boolean(self) -> bool:
        char = self._take(1)
        if char not in (b"0", b"1"):
            raise NetworkFormatError(f"not a dlib bool at offset {self.pos - 1}")
        return char == b"1"

    def tensor(self) -> npt.NDArray[np.float32]:
        if (version := self.integer()) != 2:
            raise NetworkFormatError(f"tensor version {version}, expected 2")
        shape = tuple(self.integer() for _ in range(4))
        count = int(np.prod(shape))
        if self.pos + 4 * count > len(self.data):
            raise NetworkFormatError(f"the file ends inside a tensor (offset {self.pos})")
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos)
        self.pos += 4 * count
        return values.astype(np.float32, copy=False).reshape(shape)  # read-only, no copy

    def alias(self) -> tuple[int, int, int, int]:
        """An alias_tensor: only the shape of a slice of the layer's parameters."""
        if (version := self.integer()) != 1:
            raise NetworkFormatError(f"alias_tensor version {version}, expected 1")
        n, k, nr, nc = (self.integer() for _ in range(4))
        return n, k, nr, nc


@dataclass(frozen=True)
class Layer:
    """One record of the file: a computational layer, or a tag/skip marker ("marker")."""

    kind: str
    """dlib's name without its version: con, affine, relu, max_pool, avg_pool, add_prev,
    fc; or "marker"."""
    settings: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)


@dataclass(frozen=True)
class Network:
    """A dlib network as read: its input layer and its layers from the input up."""

    loss: str
    input_size: tuple[int, int]
    """(rows, columns) of the input image."""
    channel_means: tuple[float, float, float]
    """The red, green and blue means the input layer subtracts (then divides by 256)."""
    layers: list[Layer]


def _size(shape: tuple[int, int, int, int]) -> int:
    return int(np.prod(shape))


def _details(r: _Reader) -> Layer:
    """A computational layer's own record (layers.h `serialize(const X_&)`)."""
    name = r.string()
    if name == "con_4":
        params = r.tensor().ravel()
        settings = {
            "filters": r.integer(),
            "rows": r.integer(),
            "cols": r.integer(),
            "stride": (r.integer(), r.integer()),
            "padding": (r.integer(), r.integer()),
        }
        filters, biases = r.alias(), r.alias()
        for _ in range(4):  # learning-rate and weight-decay multipliers
            r.double()
        w = params[: _size(filters)].reshape(filters)
        b = params[_size(filters) : _size(filters) + _size(biases)]
        return Layer("con", settings, {"w": w, "b": b})
    if name == "affine_":
        params = r.tensor().ravel()
        gamma, beta = r.alias(), r.alias()
        mode = r.integer()  # dlib's layer_mode: CONV_MODE 0, FC_MODE 1
        g = params[: _size(gamma)]
        b = params[_size(gamma) : _size(gamma) + _size(beta)]
        return Layer("affine", {"conv_mode": mode == 0}, {"gamma": g, "beta": b})
    if name in ("max_pool_2", "avg_pool_2"):
        settings = {
            "rows": r.integer(),
            "cols": r.integer(),
            "stride": (r.integer(), r.integer()),
            "padding": (r.integer(), r.integer()),
        }
        return Layer(name[:-2], settings)
    if name == "fc_2":
        outputs, inputs = r.integer(), r.integer()
        params = r.tensor().ravel()
        weights, biases = r.alias(), r.alias()
        r.integer()  # bias mode (the biases' alias is empty without one)
        for _ in range(4):
            r.double()
        matrix = params[: _size(weights)].reshape(inputs, outputs)
        b = params[_size(weights) : _size(weights) + _size(biases)]
        return Layer("fc", {"outputs": outputs}, {"w": matrix, "b": b})
    if name in ("relu_", "add_prev_"):
        return Layer(name[:-1])
    raise NetworkFormatError(f"layer {name!r} is not supported")


def read_network(path: Path | str) -> Network:
    """Read a dlib network of the layers above (the face-recognition ResNet is one)."""
    r = _Reader(Path(path).read_bytes())
    if (version := r.integer()) != 1:
        raise NetworkFormatError(f"add_loss_layer version {version}, expected 1")
    loss = r.string()
    if loss != "loss_metric_2":
        raise NetworkFormatError(f"loss {loss!r} is not supported")
    r.double()  # margin
    r.double()  # distance threshold

    # The stack's versions, top down: 2 a layer (3 for the one on the input), 1 a marker.
    versions = []
    while not r.looks_like_name():
        versions.append(r.integer())
    if not versions or any(v not in (1, 2) for v in versions[:-1]) or versions[-1] not in (2, 3):
        raise NetworkFormatError(f"unexpected layer versions {versions}")

    if (input_name := r.string()) != "input_rgb_image_sized":
        raise NetworkFormatError(f"input layer {input_name!r} is not supported")
    means = (r.double(), r.double(), r.double())
    size = (r.integer(), r.integer())

    layers: list[Layer] = []
    for depth, version in enumerate(reversed(versions)):
        if version == 1:
            layers.append(Layer("marker"))
            continue
        layers.append(_details(r))
        for _ in range(3):  # setup called, gradient stale, output disabled
            r.boolean()
        r.tensor()  # x_grad
        r.tensor()  # cached_output
        r.tensor()  # params_grad (grad_final on the input's layer)
        if depth == 0 and version == 3:
            r.integer()  # sample expansion factor
    if r.pos != len(r.data):
        raise NetworkFormatError(f"{len(r.data) - r.pos} bytes left after the network")
    return Network(loss=loss, input_size=size, channel_means=means, layers=layers)


# ---------------------------------------------------------------------------------------
# The ONNX graph


class _Graph:
    """Builds the ONNX graph node by node, tracking each value's (channels, rows, cols)."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.helper = helper
        self.numpy_helper = numpy_helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, array: npt.NDArray[Any], prefix: str = "c") -> str:
        name = self.name(prefix)
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: Sequence[str], **attrs: Any) -> str:
        out = self.name(op.lower())
        self.nodes.append(self.helper.make_node(op, list(inputs), [out], **attrs))
        return out


_Value = tuple[str, tuple[int, int, int]]


def _pool_size(size: int, window: int, stride: int, padding: int) -> int:
    return 1 + (size + 2 * padding - window) // stride


def _pad_to(g: _Graph, value: _Value, shape: tuple[int, int, int]) -> str:
    """dlib's add_prev zero-pads the smaller operand (channels, rows, columns at the end)."""
    name, have = value
    if have == shape:
        return name
    pads = [0, 0, 0, 0, 0, *(want - got for want, got in zip(shape, have, strict=True))]
    return g.node("Pad", [name, g.const(np.array(pads, np.int64), "pads")], mode="constant")


def build_model(network: Network) -> Any:
    """The network as an ONNX model (onnx.ModelProto): uint8 chips in, float embeddings out.

    Input "chips": (N, rows, cols, 3) uint8 RGB; output "embeddings": (N, 128) float32.
    """
    from onnx import TensorProto, checker, helper

    if not network.layers or network.layers[-1].kind != "fc":
        raise NetworkFormatError("the network does not end in a fully connected layer")
    g = _Graph()
    rows, cols = network.input_size
    means = np.array(network.channel_means, np.float32)
    x = g.node("Cast", ["chips"], to=TensorProto.FLOAT)
    x = g.node("Sub", [x, g.const(means, "mean")])
    x = g.node("Mul", [x, g.const(np.array(1 / 256, np.float32), "scale")])
    x = g.node("Transpose", [x], perm=[0, 3, 1, 2])
    current: _Value = (x, (3, rows, cols))
    remembered: list[_Value] = []
    layers = network.layers
    i = 0
    while i < len(layers):
        layer = layers[i]
        name, (k, h, w) = current
        s = layer.settings
        if layer.kind == "marker":
            remembered.append(current)  # a tag
            if i + 1 < len(layers) and layers[i + 1].kind == "marker":  # then a skip
                if len(remembered) < 2:
                    raise NetworkFormatError("a skip with no tag below it to go back to")
                current = remembered.pop(-2)
                i += 1
        elif layer.kind == "con":
            wt, bias = layer.weights["w"], layer.weights["b"]
            if wt.shape[1] != k:
                raise NetworkFormatError(f"layer {i}: con over {wt.shape[1]} channels, not {k}")
            (sy, sx), (py, px) = s["stride"], s["padding"]
            inputs = [name, g.const(wt, "w")] + ([g.const(bias, "b")] if bias.size else [])
            out = g.node(
                "Conv",
                inputs,
                kernel_shape=[s["rows"], s["cols"]],
                strides=[sy, sx],
                pads=[py, px, py, px],
            )
            h, w = _pool_size(h, s["rows"], sy, py), _pool_size(w, s["cols"], sx, px)
            current = (out, (s["filters"], h, w))
        elif layer.kind == "affine":
            gamma, beta = layer.weights["gamma"], layer.weights["beta"]
            if not s["conv_mode"] or gamma.size != k:
                raise NetworkFormatError(f"layer {i}: only per-channel affine layers are supported")
            out = g.node("Mul", [name, g.const(gamma.reshape(1, k, 1, 1), "gamma")])
            out = g.node("Add", [out, g.const(beta.reshape(1, k, 1, 1), "beta")])
            current = (out, (k, h, w))
        elif layer.kind == "relu":
            current = (g.node("Relu", [name]), (k, h, w))
        elif layer.kind in ("max_pool", "avg_pool"):
            (sy, sx), (py, px) = s["stride"], s["padding"]
            if s["rows"] == 0 and s["cols"] == 0:  # dlib's avg_pool_everything
                if layer.kind != "avg_pool":
                    raise NetworkFormatError(f"layer {i}: a whole-image max pool")
                current = (g.node("GlobalAveragePool", [name]), (k, 1, 1))
            else:
                if layer.kind == "avg_pool" and (py or px):
                    raise NetworkFormatError(f"layer {i}: a padded average pool")
                op = "MaxPool" if layer.kind == "max_pool" else "AveragePool"
                out = g.node(
                    op,
                    [name],
                    kernel_shape=[s["rows"], s["cols"]],
                    strides=[sy, sx],
                    pads=[py, px, py, px],
                )
                h, w = _pool_size(h, s["rows"], sy, py), _pool_size(w, s["cols"], sx, px)
                current = (out, (k, h, w))
        elif layer.kind == "add_prev":
            if not remembered:
                raise NetworkFormatError(f"layer {i}: add_prev with no tag below it")
            other = remembered.pop()
            shape = tuple(max(a, b) for a, b in zip(current[1], other[1], strict=True))
            assert len(shape) == 3
            out = g.node("Add", [_pad_to(g, current, shape), _pad_to(g, other, shape)])
            current = (out, shape)
        elif layer.kind == "fc":
            wt, bias = layer.weights["w"], layer.weights["b"]
            if wt.shape[0] != k * h * w:
                raise NetworkFormatError(f"layer {i}: fc of {wt.shape[0]} inputs on {k * h * w}")
            out = g.node("MatMul", [g.node("Flatten", [name], axis=1), g.const(wt, "w")])
            if bias.size:
                out = g.node("Add", [out, g.const(bias, "b")])
            current = (out, (wt.shape[1], 1, 1))
        else:  # pragma: no cover - _details admits only the kinds above
            raise NetworkFormatError(f"layer {i}: {layer.kind}")
        i += 1
    if remembered:
        raise NetworkFormatError(f"{len(remembered)} tags were never used")
    out, (dims, _, _) = current
    g.nodes.append(helper.make_node("Identity", [out], ["embeddings"]))
    graph = helper.make_graph(
        g.nodes,
        "dlib_face_recognition_resnet",
        [helper.make_tensor_value_info("chips", TensorProto.UINT8, ["N", rows, cols, 3])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["N", dims])],
        g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every onnxruntime since 1.10 reads
    checker.check_model(model)
    return model


class OnnxEncoder:
    """dlib's face-recognition network on ONNX Runtime (CPU), built from the .dat file."""

    def __init__(self, path: Path | str | None = None, threads: int = 1) -> None:
        import onnxruntime as ort

        network = read_network(path or model_path())
        self.input_size = network.input_size
        model = build_model(network).SerializeToString()
        del network
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # A worker is one process a core: idle pool threads must not spin between calls.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        del model
        _return_freed_memory()

    def encode_chips(self, chips: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
        """Embeddings (N, 128) of aligned chips (N, 150, 150, 3) uint8 RGB, or of one chip."""
        batch = np.ascontiguousarray(chips, dtype=np.uint8)
        one = batch.ndim == 3
        if one:
            batch = batch[None]
        rows, cols = self.input_size
        if batch.shape[1:] != (rows, cols, 3):
            raise ValueError(f"chips must be {rows}x{cols} RGB, got {batch.shape[1:]}")
        (out,) = self.session.run(["embeddings"], {"chips": batch})
        result = np.asarray(out, dtype=np.float64)
        return result[0] if one else result


def _return_freed_memory() -> None:
    """Give the heap freed after building back to the system (glibc's malloc_trim).

    Building holds the weights several times over (the file, the graph, its bytes) and
    glibc keeps what was freed: without this, each worker stays ~65 MB larger.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        trim = None
    if trim is not None:
        trim(0)
