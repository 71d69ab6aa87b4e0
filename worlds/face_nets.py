"""The face networks: dlib's face-recognition ResNet in PyTorch with a reader of dlib's model file (f for real
photos); the synthetic world's own identity network with its trainer and verification (f for the synthetic world);
and MobileFaceNet, eval_retrieval's independent descriptor for real photos (never an f)."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps

import common
from common import UsageError, atomic_write, freeze, require, rng_state, seed_everything, set_rng_state
from worlds.faces import FACE_WORLD_VERSION, cache_dir, resize_images, synthetic_faces, to_float_images

# f for real faces: dlib's face-recognition ResNet (dlib_face_recognition_resnet_model_v1) in PyTorch ------------------
# dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1``) in PyTorch.
#
# The network is dlib's ``anet_type`` from ``examples/dnn_face_recognition_ex.cpp`` (dlib, Boost licence; the trained
# weights are CC0 and ship in the ``face_recognition_models`` package). This file holds our own re-implementation,
# written from the facts of dlib's source, and a reader of dlib's serialisation format that does not need dlib.
#
# The dlib network type, input to output::
#
#     input_rgb_image_sized<150>     RGB uint8 chip -> (pixel - mean_rgb) / 256, mean_rgb = (122.782, 117.001, 104.298)
#     con<32,7,7,2,2>                7x7 conv, stride 2, padding 0 (dlib pads 0 when stride != 1, size/2 otherwise)
#     affine, relu                   per-channel scale and shift (a batch norm frozen into gamma and beta)
#     max_pool<3,3,2,2>              3x3 max pool, stride 2, padding 0
#     level4: ares<32> x3            residual block: relu(block(x) + x)
#     level3: ares_down<64>, ares<64> x3
#     level2: ares_down<128>, ares<128> x2
#     level1: ares_down<256>, ares<256> x2
#     level0: ares_down<256>
#     avg_pool_everything            global average pool
#     fc_no_bias<128>                linear 256 -> 128, no bias
#     loss_metric                    the descriptor is the fc output as is: no L2 normalisation
#
#     block<N, stride>  = affine(con<N,3,3,1,1>(relu(affine(con<N,3,3,stride,stride>(x)))))
#     ares_down<N>(x)   = relu(add_prev(block<N,2>(x), avg_pool<2,2,2,2>(x)))
#
# Two dlib semantics matter and are easy to miss:
#
# * ``add_prev`` adds tensors of different shapes by zero extension: the output has the larger size in every dimension
#   (channels, rows, columns) and each input counts as 0 outside its own extent (padding at the end: last channels,
#   bottom rows, right columns). The down-sampling blocks rely on it: the shortcut ``avg_pool(x)`` has half the channels
#   of the block output, and at level1 the block gives 3x3 while the shortcut gives 4x4 (8x8 input, no padding), so the
#   sum is 4x4, level0 then gives 2x2, and the global average pool averages 4 positions.
# * Stride-2 convolutions and pools have padding 0, stride-1 ones have padding size // 2.

DLIB_INPUT_SIZE = 150
"""Side of the aligned face chip the network takes (``input_rgb_image_sized<150>``)."""

DLIB_DISTANCE_THRESHOLD = 0.6
"""dlib's same-person threshold on the Euclidean distance between descriptors (``loss_metric`` in the model file)."""

MODEL_FILE_NAME = "dlib_face_recognition_resnet_model_v1.dat"

# (number of filters, stride of the first convolution) of each residual block, input to output.
_DLIB_BLOCKS: tuple[tuple[int, int], ...] = (
    (32, 1), (32, 1), (32, 1),                  # level4
    (64, 2), (64, 1), (64, 1), (64, 1),         # level3
    (128, 2), (128, 1), (128, 1),               # level2
    (256, 2), (256, 1), (256, 1),               # level1
    (256, 2),                                   # level0
)


def _expected_num_weights() -> int:
    """Learned floats: conv weights and biases, affine gammas and betas, the fc matrix."""
    total = 3 * 32 * 7 * 7 + 32 + 2 * 32
    c_in = 32
    for n, _ in _DLIB_BLOCKS:
        total += (c_in * n * 9 + n) + (n * n * 9 + n) + 2 * (2 * n)
        c_in = n
    return total + c_in * 128


DLIB_FACE_NET_NUM_WEIGHTS = 5_614_592
"""Number of learned floats in the network (every state_dict entry except the ``input_mean`` buffer)."""
assert DLIB_FACE_NET_NUM_WEIGHTS == _expected_num_weights()


# · Network


class DlibAffine(nn.Module):
    """dlib's ``affine`` layer in conv mode: ``y = x * weight[c] + bias[c]`` per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def zero_extended_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: sum of two (N, C, H, W) tensors whose C, H, W may differ.

    The result has the larger C, H and W; each input counts as 0 past its own last channel, row and column.
    """
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def extend(t: torch.Tensor) -> torch.Tensor:
        pad = (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1])
        return F.pad(t, pad) if any(pad) else t

    return extend(a) + extend(b)


def _dlib_padding(kernel: int, stride: int) -> int:
    """dlib's default padding for ``con``, ``max_pool`` and ``avg_pool``."""
    return 0 if stride != 1 else kernel // 2


class DlibResBlock(nn.Module):
    """dlib's ``ares<N>`` (stride 1) or ``ares_down<N>`` (stride 2) with ``affine`` as the normalisation."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, _dlib_padding(3, stride))
        self.affine1 = DlibAffine(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, _dlib_padding(3, 1))
        self.affine2 = DlibAffine(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        shortcut = F.avg_pool2d(x, 2, 2, _dlib_padding(2, 2)) if self.stride != 1 else x
        return F.relu(zero_extended_add(y, shortcut))


class DlibFaceNet(nn.Module):
    """dlib's face-recognition ResNet (``anet_type`` of dlib's ``dnn_face_recognition_ex.cpp``); see the module doc.

    ``forward(x)`` takes float (N, 3, H, W) RGB in [-1, 1] (pixel = (x + 1) * 127.5) and returns the (N, 128)
    descriptors that dlib's ``compute_face_descriptor`` gives for the same aligned chips (not normalised; dlib's
    same-person rule is a Euclidean distance below :data:`DLIB_DISTANCE_THRESHOLD`). An input that is not 150x150
    is first resized to 150x150 with bilinear interpolation (``align_corners=False``, antialiased when it shrinks),
    which dlib does not do: dlib only accepts 150x150 chips. The forward pass is differentiable in ``x``.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("input_mean", torch.tensor([122.782, 117.001, 104.298]))
        self.conv1 = nn.Conv2d(3, 32, 7, 2, _dlib_padding(7, 2))
        self.affine1 = DlibAffine(32)
        blocks, c_in = [], 32
        for n, stride in _DLIB_BLOCKS:
            blocks.append(DlibResBlock(c_in, n, stride))
            c_in = n
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(c_in, 128, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"DlibFaceNet expects (N, 3, H, W) RGB in [-1, 1], got shape {tuple(x.shape)}")
        x = resize_images(x, DLIB_INPUT_SIZE)
        pixels = (x + 1.0) * 127.5
        x = (pixels - self.input_mean[:, None, None]) / 256.0
        x = F.relu(self.affine1(self.conv1(x)))
        x = F.max_pool2d(x, 3, 2, _dlib_padding(3, 2))
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))


def count_weights(state_dict: dict[str, torch.Tensor]) -> int:
    """Number of learned floats in a :class:`DlibFaceNet` state_dict (all entries but the ``input_mean`` buffer)."""
    return sum(t.numel() for k, t in state_dict.items() if k != "input_mean")


# · Reader of dlib's serialisation format
#
# Facts from dlib/serialize.h, dlib/float_details.h, dlib/cuda/tensor.h, dlib/dnn/{core,layers,input,loss}.h:
# * integer: a control byte (bit 7: negative; low 4 bits: byte count n, 1..8), then |value| in n little-endian bytes.
# * bool: the ASCII byte '1' or '0'.  string: its length as an integer, then the bytes.
# * float: two integers, a mantissa (int64) and an exponent (int16): value = mantissa * 2**exponent; the exponents
#   32000, 32001, 32002 stand for +inf, -inf and NaN.
# * tensor: integer version 2, then num_samples, k, nr, nc as integers, then the values as little-endian float32.
#   alias_tensor: integer version 1, then the four sizes (no data).
# * network: add_loss_layer writes (int version 1, loss details, subnetwork); add_layer writes (int version,
#   subnetwork, layer details, 3 bools, tensors x_grad and cached_output, and params_grad when version == 2); the
#   add_layer right on the input layer writes (int version 2|3, input layer, details, 3 bools, x_grad, cached_output,
#   grad_final, and an integer sample_expansion_factor when version == 3); tag and skip layers write (int version 1,
#   subnetwork). So the file holds the outer-to-inner chain of versions first, then the input layer, then the layers'
#   details from the input outwards.


class _Reader:
    """Cursor over the bytes of a dlib serialised object; every failure is a one-line ValueError."""

    def __init__(self, data: bytes, name: str):
        self.data = data
        self.view = memoryview(data)
        self.pos = 0
        self.name = name

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.name}: not a {MODEL_FILE_NAME} file: {what} (at byte {self.pos})")

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise self.fail(f"truncated while reading {what}")
        out = self.view[self.pos:self.pos + n]
        self.pos += n
        return out

    def integer(self, what: str) -> int:
        control = self.take(1, what)[0]
        n = control & 0x0F
        if n == 0 or n > 8 or control & 0x70:
            raise self.fail(f"bad integer control byte 0x{control:02x} for {what}")
        value = int.from_bytes(self.take(n, what), "little")
        return -value if control & 0x80 else value

    def boolean(self, what: str) -> bool:
        ch = self.take(1, what)[0]
        if ch not in (ord("0"), ord("1")):
            raise self.fail(f"bad bool byte 0x{ch:02x} for {what}")
        return ch == ord("1")

    def string(self, what: str, max_len: int = 64) -> str:
        n = self.integer(what)
        if not 0 <= n <= max_len:
            raise self.fail(f"implausible string length {n} for {what}")
        try:
            return bytes(self.take(n, what)).decode("ascii")
        except UnicodeDecodeError:
            raise self.fail(f"non-ASCII bytes in {what}") from None

    def real(self, what: str) -> float:
        mantissa, exponent = self.integer(what), self.integer(what)
        special = {32000: math.inf, 32001: -math.inf, 32002: math.nan}
        return special[exponent] if exponent in special else float(np.float32(math.ldexp(mantissa, exponent)))

    def expect_int(self, expected: set[int], what: str) -> int:
        value = self.integer(what)
        if value not in expected:
            raise self.fail(f"unexpected {what} {value}, expected one of {sorted(expected)}")
        return value

    def expect_string(self, expected: set[str], what: str) -> str:
        value = self.string(what)
        if value not in expected:
            raise self.fail(f"unexpected {what} {value!r}, expected one of {sorted(expected)}")
        return value

    def tensor(self, what: str) -> np.ndarray:
        self.expect_int({2}, f"tensor version of {what}")
        shape = tuple(self.integer(f"tensor size of {what}") for _ in range(4))
        if min(shape) < 0 or math.prod(shape) > len(self.data):
            raise self.fail(f"implausible tensor shape {shape} for {what}")
        raw = self.take(4 * math.prod(shape), f"tensor data of {what}")
        return np.frombuffer(raw, dtype="<f4").reshape(shape)

    def alias_tensor(self, what: str) -> tuple[int, ...]:
        self.expect_int({1}, f"alias_tensor version of {what}")
        return tuple(self.integer(f"alias_tensor size of {what}") for _ in range(4))


def _layer_chain() -> list[tuple]:
    """The layers of ``anet_type`` below the loss, outermost first, as dlib serialises them.

    Entries: ("tag", id), ("skip", id) or ("add", kind, args, key) where kind names the layer details and key is the
    DlibFaceNet state_dict prefix for layers with weights.
    """
    inner: list[tuple] = [  # input side first; reversed at the end
        ("add", "con", (3, 32, 7, 2), "conv1"),
        ("add", "affine", (32,), "affine1"),
        ("add", "relu", (), None),
        ("add", "max_pool", (3, 2), None),
    ]
    c_in = 32
    for i, (n, stride) in enumerate(_DLIB_BLOCKS):
        p = f"blocks.{i}."
        inner += [
            ("tag", 1),
            ("add", "con", (c_in, n, 3, stride), p + "conv1"),
            ("add", "affine", (n,), p + "affine1"),
            ("add", "relu", (), None),
            ("add", "con", (n, n, 3, 1), p + "conv2"),
            ("add", "affine", (n,), p + "affine2"),
        ]
        if stride == 1:
            inner += [("add", "add_prev", (), None)]
        else:
            inner += [("tag", 2), ("skip", 1), ("add", "avg_pool", (2, 2), None), ("add", "add_prev", (), None)]
        inner += [("add", "relu", (), None)]
        c_in = n
    inner += [("add", "avg_pool", (0, 1), None), ("add", "fc", (c_in, 128), "fc")]
    return inner[::-1]


def _read_details(r: _Reader, kind: str, args: tuple, key: str | None, out: dict[str, np.ndarray]) -> None:
    """Read one layer's details (dlib's ``deserialize`` of the layer class) and store its weights under ``key``."""
    if kind == "con":
        c_in, c_out, size, stride = args
        version = r.expect_string({"con_4", "con_5", "con_6"}, "con_ version")
        params = r.tensor(key)
        r.expect_int({c_out}, "con_ num_filters")
        r.expect_int({size}, "con_ rows")
        r.expect_int({size}, "con_ columns")
        r.expect_int({stride}, "con_ stride_y")
        r.expect_int({stride}, "con_ stride_x")
        r.expect_int({_dlib_padding(size, stride)}, "con_ padding_y")
        r.expect_int({_dlib_padding(size, stride)}, "con_ padding_x")
        filters, biases = r.alias_tensor(key), r.alias_tensor(key)
        for _ in range(4):  # learning-rate and weight-decay multipliers
            r.real("con_ multiplier")
        use_bias = r.boolean("con_ use_bias") if version in ("con_5", "con_6") else True
        if version == "con_6":
            r.boolean("con_ use_relu")
        n_w = c_out * c_in * size * size
        if filters != (c_out, c_in, size, size) or not use_bias or biases != (1, c_out, 1, 1) \
                or params.size != n_w + c_out:
            raise r.fail(f"unexpected shapes for {key}: params {params.size}, filters {filters}, biases {biases}")
        flat = params.reshape(-1)
        out[key + ".weight"] = flat[:n_w].reshape(c_out, c_in, size, size)
        out[key + ".bias"] = flat[n_w:]
    elif kind == "affine":
        (c,) = args
        version = r.expect_string({"affine_", "affine_2"}, "affine_ version")
        params = r.tensor(key)
        gamma, beta = r.alias_tensor(key), r.alias_tensor(key)
        r.expect_int({0}, "affine_ mode (0 = CONV_MODE)")
        if version == "affine_2" and r.boolean("affine_ disabled"):
            raise r.fail(f"{key} is disabled")
        if gamma != (1, c, 1, 1) or beta != (1, c, 1, 1) or params.size != 2 * c:
            raise r.fail(f"unexpected shapes for {key}: params {params.size}, gamma {gamma}, beta {beta}")
        out[key + ".weight"] = params.reshape(-1)[:c]
        out[key + ".bias"] = params.reshape(-1)[c:]
    elif kind == "relu":
        if r.expect_string({"relu_", "relu_2"}, "relu_ version") == "relu_2" and r.boolean("relu_ disabled"):
            raise r.fail("a relu layer is disabled")
    elif kind in ("max_pool", "avg_pool"):
        size, stride = args
        r.expect_string({kind + "_2"}, f"{kind}_ version")
        r.expect_int({size}, f"{kind} rows")
        r.expect_int({size}, f"{kind} columns")
        r.expect_int({stride}, f"{kind} stride_y")
        r.expect_int({stride}, f"{kind} stride_x")
        r.expect_int({_dlib_padding(size, stride)}, f"{kind} padding_y")
        r.expect_int({_dlib_padding(size, stride)}, f"{kind} padding_x")
    elif kind == "add_prev":
        r.expect_string({"add_prev_"}, "add_prev_ version")
    elif kind == "fc":
        n_in, n_out = args
        version = r.expect_string({"fc_2", "fc_3"}, "fc_ version")
        r.expect_int({n_out}, "fc_ num_outputs")
        r.expect_int({n_in}, "fc_ num_inputs")
        params = r.tensor(key)
        weights = r.alias_tensor(key)
        r.alias_tensor(key)  # biases: empty with FC_NO_BIAS
        r.expect_int({1}, "fc_ bias_mode (1 = FC_NO_BIAS)")
        for _ in range(4):
            r.real("fc_ multiplier")
        if version == "fc_3":
            r.boolean("fc_ use_bias")
        if weights != (n_in, n_out, 1, 1) or params.size != n_in * n_out:
            raise r.fail(f"unexpected shapes for {key}: params {params.size}, weights {weights}")
        out[key + ".weight"] = params.reshape(n_in, n_out).T  # dlib computes x @ W with W of shape (in, out)
    else:  # pragma: no cover - _layer_chain only names the kinds above
        raise AssertionError(kind)


def read_dlib_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Parse ``dlib_face_recognition_resnet_model_v1.dat`` (dlib serialisation) into a :class:`DlibFaceNet` state_dict.

    Pure Python and numpy, no dlib. Every layer's version string, sizes, strides and paddings are checked against
    the architecture; a file that does not match (wrong kind of file, other network, truncated, trailing bytes, still
    bz2-compressed) raises a ValueError with a one-line message. Weight tensors are stored as raw little-endian
    float32 in the file, so reading the 22 MB file takes about 0.02 s.
    """
    path = Path(path)
    data = path.read_bytes()
    r = _Reader(data, str(path))
    if data[:3] == b"BZh":
        raise r.fail("it is bz2-compressed; decompress it first (bunzip2)")
    r.expect_int({1}, "add_loss_layer version")
    loss = r.expect_string({"loss_metric_", "loss_metric_2"}, "loss layer")
    if loss == "loss_metric_2":
        r.real("loss_metric margin")
        r.real("loss_metric distance threshold")

    chain = _layer_chain()
    versions = []
    for i, layer in enumerate(chain):  # the versions, outermost first
        on_input = i == len(chain) - 1
        if layer[0] == "add":
            versions.append(r.expect_int({2, 3} if on_input else {1, 2}, f"add_layer version of {layer[1]}"))
        else:
            versions.append(r.expect_int({1}, f"add_{layer[0]}_layer version"))

    r.expect_string({"input_rgb_image_sized"}, "input layer")
    mean = [r.real("input mean") for _ in range(3)]
    r.expect_int({DLIB_INPUT_SIZE}, "input rows")
    r.expect_int({DLIB_INPUT_SIZE}, "input columns")

    arrays: dict[str, np.ndarray] = {"input_mean": np.array(mean, dtype=np.float32)}
    for i in range(len(chain) - 1, -1, -1):  # the details, innermost first
        layer, version = chain[i], versions[i]
        if layer[0] != "add":
            continue
        _, kind, args, key = layer
        _read_details(r, kind, args, key, arrays)
        for name in ("this_layer_setup_called", "gradient_input_is_stale", "get_output_and_gradient_input_disabled"):
            r.boolean(name)
        r.tensor("x_grad")
        r.tensor("cached_output")
        if i == len(chain) - 1:
            r.tensor("grad_final")
            if version == 3:
                r.integer("sample_expansion_factor")
        elif version == 2:
            r.tensor("params_grad")
    if r.pos != len(data):
        raise r.fail(f"{len(data) - r.pos} unexpected trailing bytes")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in arrays.items()}  # copies: writable


# · Finding and loading the model


def dlib_model_path(name: str = MODEL_FILE_NAME) -> Path:
    """Path of one of dlib's model files (by default ``dlib_face_recognition_resnet_model_v1.dat``) inside the
    installed ``face_recognition_models`` package.

    The package is located without importing it (its ``__init__`` needs ``pkg_resources``, which recent setuptools
    no longer ships).
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the dlib face model needs the face_recognition_models package: "
                           "pip install face_recognition_models")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "models" / name
        if path.is_file():
            return path
    raise RuntimeError(f"face_recognition_models has no models/{name}; "
                       "reinstall it: pip install --force-reinstall face_recognition_models")


def load_dlib_face_net(path: str | Path | None = None, device: str | torch.device = "cpu") -> DlibFaceNet:
    """A frozen :class:`DlibFaceNet` (eval mode, no parameter gradients) with dlib's trained weights.

    ``path`` defaults to :func:`dlib_model_path`. Gradients still flow to the input.
    """
    net = DlibFaceNet()
    net.load_state_dict(read_dlib_weights(dlib_model_path() if path is None else path), strict=True)
    return net.to(device).eval().requires_grad_(False)


# Faces in any photo: dlib's detector, its 5 landmarks and the chip alignment of dlib's face network -------------------

LANDMARKS_FILE_NAME = "shape_predictor_5_face_landmarks.dat"


def read_photo(path: str | Path) -> Image.Image:
    """A photo as RGB, turned upright by its EXIF orientation (phone pictures); greyscale, RGBA, PNG and JPEG alike. A
    file that is not an image is a one-line usage error."""
    try:
        with Image.open(path) as img:
            return ImageOps.exif_transpose(img).convert("RGB")
    except Exception as exc:
        raise UsageError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None


@lru_cache(maxsize=1)
def _dlib_face_tools():
    """dlib (the ``dlib-bin`` package), its frontal (HOG) face detector and its 5-point landmark model."""
    import dlib
    return dlib, dlib.get_frontal_face_detector(), dlib.shape_predictor(str(dlib_model_path(LANDMARKS_FILE_NAME)))


def find_faces(photo: Image.Image, size: int = DLIB_INPUT_SIZE, padding: float = 0.25,
               detect_side: int = 1200, min_score: float = 0.15) -> list[dict]:
    """Every face dlib's detector finds in ``photo``, left to right, each with the chip dlib's face network expects:
    5 landmarks, then ``get_face_chip`` with ``padding`` 0.25 at ``size`` px (the alignment of the shared CelebA chips).
    The detector runs on a copy at most ``detect_side`` px on its longer side, and a detection scoring below
    ``min_score`` is dropped (badges and patches score just above dlib's 0); the landmarks and the chip come from the
    photo itself. Each face: ``{"chip": uint8 (size, size, 3), "box": (left,
    top, right, bottom), "landmarks": float32 (5, 2)}`` in the photo's pixels."""
    dlib, detector, predictor = _dlib_face_tools()
    rgb = np.array(photo.convert("RGB"), np.uint8)
    scale = min(1.0, detect_side / max(photo.size))
    small = rgb if scale == 1 else np.array(photo.convert("RGB").resize(
        (max(1, round(photo.width * scale)), max(1, round(photo.height * scale))), Image.BILINEAR), np.uint8)
    found = []
    rects, scores, _ = detector.run(small, 1, min_score)          # upsampled once: faces from ~40 px on
    for r in sorted(rects, key=lambda r: r.left()):
        box = dlib.rectangle(*(int(round(v / scale)) for v in (r.left(), r.top(), r.right(), r.bottom())))
        shape = predictor(rgb, box)
        found.append({"chip": np.array(dlib.get_face_chip(rgb, shape, size=size, padding=padding), np.uint8),
                      "box": (box.left(), box.top(), box.right(), box.bottom()),
                      "landmarks": np.array([[q.x, q.y] for q in shape.parts()], np.float32)})
    return found


def faces_in_photos(apply: str, chip_max: int = 160) -> tuple[list[dict], int]:
    """--apply's input (comma-separated photos): every face of every photo, left to right, as dlib's aligned chip
    (find_faces); a square image of at most ``chip_max`` px is taken as an aligned chip already. A photo without a
    face is named in one line; none in any photo is a usage error. Returns the faces, each ``{"path", "name" (the
    photo's stem, numbered when it holds several faces), "number", "photo", "chip" uint8 (H, W, 3), "box" (None for a
    chip)}``, and how many photos held one."""
    paths = [p for p in apply.split(",") if p]
    found, empty = [], []
    for path in paths:
        photo = read_photo(path)
        stem = Path(path).stem
        if photo.width == photo.height <= chip_max:
            found.append({"path": path, "name": stem, "number": 1, "photo": photo, "chip": np.array(photo),
                          "box": None})
            continue
        hits = find_faces(photo)
        empty += [] if hits else [path]
        found += [{"path": path, "name": stem if len(hits) == 1 else f"{stem}_{k}", "number": k, "photo": photo,
                   "chip": hit["chip"], "box": hit["box"]} for k, hit in enumerate(hits, 1)]
    require(bool(found), f"--apply: no face in {', '.join(empty)}: not an aligned face chip, and dlib's detector "
                         f"finds no face")
    for path in empty:
        print(f"--apply: {path}: no face found")
    return found, len(paths) - len(empty)


def save_overviews(out: Path, found: list[dict], avatars: list[np.ndarray]):
    """``<photo>_overview.png`` for every photo of faces_in_photos' faces, each face's avatar (uint8 (H, W, 3)) given
    in the same order."""
    for path in dict.fromkeys(face["path"] for face in found):
        mine = [k for k, face in enumerate(found) if face["path"] == path]
        save_overview(out / f"{Path(path).stem}_overview.png", [found[k] for k in mine], [avatars[k] for k in mine])


def save_overview(path: str | Path, faces_of_photo: list[dict], avatars: list[np.ndarray], tile: int = 128):
    """One picture per photo: the photo with a numbered box on each face, and below it each face's chip beside its
    avatar, under the same number."""
    photo = faces_of_photo[0]["photo"]
    scale = min(1.0, 640 / max(photo.size))
    top = photo.resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))), Image.BILINEAR)
    draw, font = ImageDraw.Draw(top), ImageFont.load_default(size=18)
    for face in faces_of_photo:
        if face["box"] is not None:
            box = [round(v * scale) for v in face["box"]]
            draw.rectangle(box, outline=(255, 60, 60), width=3)
            draw.rectangle([box[0], box[1], box[0] + 20, box[1] + 22], fill=(255, 60, 60))
            draw.text((box[0] + 5, box[1] + 1), str(face["number"]), fill=(255, 255, 255), font=font)
    pairs = max(1, top.width // (2 * tile + 8))
    rows = -(-len(faces_of_photo) // pairs)
    sheet = Image.new("RGB", (max(top.width, pairs * (2 * tile + 8)), top.height + rows * (tile + 20)), (255, 255, 255))
    sheet.paste(top, (0, 0))
    draw = ImageDraw.Draw(sheet)
    for i, (face, avatar) in enumerate(zip(faces_of_photo, avatars)):
        x, y = (i % pairs) * (2 * tile + 8), top.height + (i // pairs) * (tile + 20) + 18
        sheet.paste(Image.fromarray(face["chip"]).resize((tile, tile), Image.BILINEAR), (x, y))
        sheet.paste(Image.fromarray(avatar).resize((tile, tile), Image.BILINEAR), (x + tile, y))
        draw.text((x + 2, y - 17), str(face["number"]), fill=(0, 0, 0), font=ImageFont.load_default(size=13))
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))


# The synthetic world's f: an identity network trained on the f split (DeepFace's role), and verification --------------


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return F.relu(self.body(x) + self.skip(x))


class FaceIdentityNet(nn.Module):
    """f of the synthetic world: a face photo in [-1, 1] (any size; resized to ``in_size``) to a unit-length
    ``dim``-D identity code. ``arch`` "resnet" (residual blocks, widths w..8w) is the f of the face scripts;
    "plain" (a VGG-like stack of plain convolutions) is eval_retrieval's independent descriptor, so that the
    evaluator does not share f's architecture (as VGG-Face did not share DeepFace's)."""

    def __init__(self, arch: str = "resnet", dim: int = 128, width: int = 32, in_size: int = 64):
        super().__init__()
        require(arch in ("resnet", "plain"), f"unknown face network {arch!r}: resnet or plain")
        self.arch, self.in_size = arch, in_size
        w = width
        if arch == "resnet":
            layers = [nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                      _ResBlock(w, w, 2), _ResBlock(w, 2 * w, 2), _ResBlock(2 * w, 4 * w, 2),
                      _ResBlock(4 * w, 8 * w, 2)]
        else:
            layers, c = [], 3
            for c_out in (w, 2 * w, 4 * w, 8 * w):
                layers += [nn.Conv2d(c, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True),
                           nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
                           nn.LeakyReLU(0.2, True), nn.MaxPool2d(2)]
                c = c_out
        self.features = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(8 * w * (in_size // 16) ** 2, dim),
                                   nn.BatchNorm1d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(self.features(resize_images(x, self.in_size))), dim=1)


def arcface_loss(code: torch.Tensor, weight: torch.Tensor, label: torch.Tensor, s: float = 30.0,
                 m: float = 0.3) -> torch.Tensor:
    """ArcFace (Deng et al. 2019, Eq. 3): softmax cross-entropy on s * cos(theta_y + m) for the true class and
    s * cos(theta_j) for the others, theta the angle between the unit code and the class's unit weight."""
    cos = code @ F.normalize(weight, dim=1).t()
    theta_y = torch.acos(cos.gather(1, label[:, None]).clamp(-1 + 1e-6, 1 - 1e-6))
    logits = cos.scatter(1, label[:, None], torch.cos(theta_y + m))
    return F.cross_entropy(s * logits, label)


def face_pairs(identity: np.ndarray, n_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A balanced verification set (as LFW's): ``n_pairs`` same-identity pairs and ``n_pairs`` different-identity
    pairs of image indices, drawn with ``seed``. Returns (i, j, same)."""
    rng = np.random.default_rng(seed)
    identity = np.asarray(identity)
    by_id: dict[int, np.ndarray] = {}
    for k, v in enumerate(identity):
        by_id.setdefault(int(v), []).append(k)
    multi = [np.asarray(v) for v in by_id.values() if len(v) >= 2]
    require(multi, "verification needs at least one identity with two images")
    same = []
    for _ in range(n_pairs):
        group = multi[rng.integers(len(multi))]
        a, b = rng.choice(len(group), 2, replace=False)
        same.append((group[a], group[b]))
    diff = []
    while len(diff) < n_pairs:
        a, b = rng.integers(len(identity), size=2)
        if identity[a] != identity[b]:
            diff.append((a, b))
    pairs = np.asarray(same + diff)
    return pairs[:, 0], pairs[:, 1], np.r_[np.ones(n_pairs, bool), np.zeros(n_pairs, bool)]


def verification_accuracy(code: torch.Tensor, identity, n_pairs: int = 3000, seed: int = 0,
                          threshold: float | None = None, folds: int = 10) -> dict:
    """Same/different-person accuracy on a balanced pair set, by Euclidean distance between codes.

    With ``threshold`` (dlib's is 0.6): the accuracy at it. Without: LFW's protocol, the threshold chosen on
    ``folds - 1`` folds and the accuracy measured on the one left out, averaged over the folds."""
    i, j, same = face_pairs(np.asarray(identity), n_pairs, seed)
    code = code.float().cpu()
    dist = (code[i] - code[j]).norm(dim=1).numpy()

    def acc(t, k):
        return float(((dist[k] < t) == same[k]).mean())

    if threshold is not None:
        return {"accuracy": acc(threshold, slice(None)), "threshold": threshold,
                "tpr": float((dist[same] < threshold).mean()),
                "tnr": float((dist[~same] >= threshold).mean()), "pairs": 2 * n_pairs}
    order = np.random.default_rng(seed + 1).permutation(len(dist))
    candidates = np.unique(dist)
    scores, chosen = [], []
    for fold in np.array_split(order, folds):
        train = np.setdiff1d(order, fold)
        best = max(candidates[::max(1, len(candidates) // 400)], key=lambda t: acc(t, train))
        scores.append(acc(best, fold))
        chosen.append(float(best))
    return {"accuracy": float(np.mean(scores)), "accuracy_std": float(np.std(scores)),
            "threshold": float(np.mean(chosen)), "pairs": 2 * n_pairs, "folds": folds}


@torch.no_grad()
def embed(net: nn.Module, images: torch.Tensor, batch: int = 256, device: torch.device | str = "cpu",
          desc: str | None = None) -> torch.Tensor:
    """Codes of uint8 or [-1, 1] float images, in batches, in eval mode; returned on the CPU. With ``desc``, a
    progress bar of that name."""
    net.eval()
    out = []
    steps = range(0, len(images), batch)
    for k in common.progress(steps, desc=f"{desc}: {len(images):,} images", unit="batch") if desc else steps:
        x = images[k:k + batch].to(device)
        out.append(net(to_float_images(x) if x.dtype == torch.uint8 else x).float().cpu())
    return torch.cat(out)


def blur(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Gaussian blur of (N, C, H, W), one sigma for all or one per image (0 = unchanged), separable, 7 taps."""
    r = torch.arange(-3, 4, device=x.device, dtype=x.dtype)
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).expand(len(x))
    k = torch.exp(-r[None] ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)                                                       # (N, 7)
    n, c, h, w = x.shape
    y = F.conv2d(F.pad(x.reshape(1, n * c, h, w), (3, 3, 0, 0), mode="replicate"),
                 k.repeat_interleave(c, 0)[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), k.repeat_interleave(c, 0)[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def style_augment(x: torch.Tensor, p: float = 0.8, generator: torch.Generator | None = None) -> torch.Tensor:
    """Augmentations that remove photographic style but keep identity, for training a style-robust f on photos only
    (the f the emoji scripts need: L_CONST compares f of a photo with f of a cartoon). Each image, with
    probability ``p``, gets a random mix of: shading flattened (the low-frequency luminance divided out),
    saturation changed or removed (grey-scale), contrast and brightness jittered, blur, colours posterised (after a
    blur) to 4-8 levels, and dark outlines drawn where the image has edges. Float images in [-1, 1] in and out;
    f never sees an emoji or a configuration (TOS §4.2 trains f on photos only)."""
    n, dev = len(x), x.device

    def u(*shape):
        return torch.rand(*shape, generator=generator, device="cpu").to(dev)

    def coin(q):
        return (u(n) < q)[:, None, None, None]

    def luminance(img):
        return img.mul(torch.tensor([0.299, 0.587, 0.114], device=dev)[:, None, None]).sum(1, keepdim=True)

    on = coin(p)
    y = (x + 1) / 2                                                                      # [0, 1]
    shading = blur(blur(luminance(y), 3.0), 3.0)
    flat = (y * (shading.mean((2, 3), keepdim=True) / shading.clamp(min=0.05))).clamp(0, 1)
    y = torch.where(coin(0.5), flat, y)
    grey = luminance(y)
    sat = torch.where(u(n) < 0.2, torch.zeros(n, device=dev), 0.5 + 1.5 * u(n))[:, None, None, None]
    y = (grey + sat * (y - grey)).clamp(0, 1)
    mean = y.mean((1, 2, 3), keepdim=True)
    y = ((y - mean) * (0.6 + 0.9 * u(n, 1, 1, 1)) + mean + 0.3 * (u(n, 1, 1, 1) - 0.5)).clamp(0, 1)
    y = torch.where(coin(0.4), blur(y, 0.3 + 1.2 * u(n)), y)
    levels = torch.randint(4, 9, (n,), generator=generator).to(dev).float()[:, None, None, None]
    poster = torch.round(blur(y, 1.0) * (levels - 1)) / (levels - 1)
    y = torch.where(coin(0.4), poster, y)
    g = y.mean(1, keepdim=True)
    gx, gy = g[..., :, 1:] - g[..., :, :-1], g[..., 1:, :] - g[..., :-1, :]
    edge = F.pad(gx.abs(), (0, 1, 0, 0)) + F.pad(gy.abs(), (0, 0, 0, 1))
    line = (edge > 0.08 + 0.1 * u(n, 1, 1, 1)).float()
    y = torch.where(coin(0.4), y * (1 - 0.8 * line), y)
    return torch.where(on, y * 2 - 1, x)


@dataclasses.dataclass(frozen=True)
class FaceNetConfig:
    """How a synthetic identity network is trained; its cache key."""
    arch: str = "resnet"
    split: str = "f"
    identities: int = 1000
    per_identity: int = 16
    size: int = 64
    steps: int = 1500
    batch: int = 128
    lr: float = 0.1
    seed: int = 0
    world_seed: int = 0
    dim: int = 128
    width: int = 16
    style_aug: float = 0.0      # probability of style_augment per training image (0: flips only)


def train_face_net(cfg: FaceNetConfig, device: torch.device | str = "cpu",
                   cache: str | Path | None = None) -> tuple[FaceIdentityNet, dict]:
    """Train an identity network on the labelled photos of ``cfg.split`` with the ArcFace loss (SGD with momentum,
    cosine schedule, horizontal flips), then measure its verification accuracy on 500 held-out identities of the
    f_val split (2 photos each). Returns the network (eval mode, frozen) and its metrics."""
    seed_everything(cfg.seed)
    data = synthetic_faces(cfg.split, cfg.identities, cfg.per_identity, cfg.size, cfg.world_seed, cache)
    x = data["images"].to(device)
    y = (data["identity"] - data["identity"].min()).to(device)
    net = FaceIdentityNet(cfg.arch, cfg.dim, cfg.width, cfg.size).to(device)
    head = nn.Parameter(torch.randn(cfg.identities, cfg.dim, device=device) * 0.01)
    opt = torch.optim.SGD([*net.parameters(), head], lr=cfg.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    net.train()
    t0 = time.time()
    bar = common.progress(range(1, cfg.steps + 1), desc=f"train the synthetic face net once (then cached): {cfg.arch}, "
                                                       f"{cfg.steps:,} steps", unit="step")
    for step in bar:
        idx = torch.randint(len(x), (cfg.batch,), device=device)
        xb = to_float_images(x[idx])
        flip = torch.rand(cfg.batch, device=device) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
        if cfg.style_aug > 0:
            xb = style_augment(xb, cfg.style_aug)
        loss = arcface_loss(net(xb), head, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == cfg.steps:
            bar.set_postfix(arcface_loss=f"{loss.item():.3f}")
    freeze(net.eval())
    held = synthetic_faces("f_val", 500, 2, cfg.size, cfg.world_seed, cache)
    metrics = verification_accuracy(embed(net, held["images"], device=device), held["identity"].numpy())
    metrics.update(train_seconds=round(time.time() - t0, 1), held_out="f_val: 500 identities x 2 photos")
    return net, metrics


def load_face_net(cfg: FaceNetConfig = FaceNetConfig(), device: torch.device | str = "cpu",
                  cache: str | Path | None = None, log=print) -> tuple[FaceIdentityNet, dict]:
    """The synthetic world's identity network for ``cfg``: read from the cache, or trained once and cached
    (with its metrics). Frozen and in eval mode, as a fixed f must be."""
    fields = dataclasses.asdict(cfg)
    if not cfg.style_aug:
        del fields["style_aug"]          # the nets cached before style_aug existed keep their keys
    key = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    path = cache_dir(cache) / f"facenet_v{FACE_WORLD_VERSION}_{cfg.arch}_{key}.pt"
    if not path.is_file():
        log(f"face net: training {cfg} once; it is then cached at {path}")
        state = rng_state()   # training reseeds: the caller's random state is put back afterwards
        trained, metrics = train_face_net(cfg, device, cache)
        set_rng_state(state)
        atomic_write(path, lambda tmp: torch.save({"net": trained.state_dict(), "metrics": json.dumps(metrics),
                                                   "config": json.dumps(dataclasses.asdict(cfg))}, tmp))
    # Read from the cache in every run, the first too: building the network draws its (overwritten) initial weights
    # from the caller's random state, so a first run draws the same numbers as later ones.
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = FaceIdentityNet(cfg.arch, cfg.dim, cfg.width, cfg.size)
    net.load_state_dict(state["net"])
    return freeze(net.to(device).eval()), json.loads(state["metrics"])


# An independent descriptor for real faces: MobileFaceNet (Chen et al. 2018), eval_retrieval's, never an f -------------


class ConvBN(nn.Module):
    """A bias-free convolution, batch norm, and PReLU (none when ``linear``)."""

    def __init__(self, c_in: int, c_out: int, k, stride: int = 1, pad: int = 0, groups: int = 1, linear=False):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.prelu = None if linear else nn.PReLU(c_out)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return x if self.prelu is None else self.prelu(x)


class Bottleneck(nn.Module):
    """MobileNetV2's inverted residual: 1x1 expansion (x t), BN, PReLU, 3x3 depthwise (stride s), BN, PReLU, 1x1
    projection, BN; the input is added when the stride is 1 and the width unchanged."""

    def __init__(self, c_in: int, c_out: int, stride: int, t: int):
        super().__init__()
        h = c_in * t
        self.residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, h, 1, bias=False), nn.BatchNorm2d(h), nn.PReLU(h),
            nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.PReLU(h),
            nn.Conv2d(h, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet (Chen et al. 2018): (N, 3, 112, 96) RGB scaled as (pixel - 127.5) / 128 -> a 128-D code.

    conv1     3x3 conv 3->64, stride 2, BN, PReLU                       112x96 -> 56x48
    dw_conv1  3x3 depthwise, BN, PReLU
    blocks    bottlenecks (t expansion, c width, n repeats, s stride of the first), the paper's Table 1:
              (2, 64, 5, 2) 28x24 | (4, 128, 1, 2) 14x12 | (2, 128, 6, 1) | (4, 128, 1, 2) 7x6 | (2, 128, 2, 1)
    conv2     1x1 conv 128->512, BN, PReLU
    linear7   global depthwise convolution (7x6 kernel), BN, no activation
    linear1   1x1 conv 512->128, BN, no activation
    The layer names are those of the public CASIA-WebFace checkpoint (Xiaoccer/MobileFaceNet_Pytorch)."""

    SETTING = [(2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1)]

    def __init__(self):
        super().__init__()
        self.conv1 = ConvBN(3, 64, 3, 2, 1)
        self.dw_conv1 = ConvBN(64, 64, 3, 1, 1, groups=64)
        layers, c_in = [], 64
        for t, c, n, s in self.SETTING:
            for i in range(n):
                layers.append(Bottleneck(c_in, c, s if i == 0 else 1, t))
                c_in = c
        self.blocks = nn.Sequential(*layers)
        self.conv2 = ConvBN(128, 512, 1)
        self.linear7 = ConvBN(512, 512, (7, 6), groups=512, linear=True)
        self.linear1 = ConvBN(512, 128, 1, linear=True)

    def forward(self, x):
        return self.linear1(self.linear7(self.conv2(self.blocks(self.dw_conv1(self.conv1(x)))))).flatten(1)


def load_mobilefacenet(path: str) -> MobileFaceNet:
    """A MobileFaceNet with the weights of ``path`` (``{'net_state_dict': ...}`` or a bare state dict), in eval
    mode; a file that is not such a checkpoint is a one-line error."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # a pickle: load only files you trust
    except Exception as exc:
        raise UsageError(f"--descriptor-ckpt: cannot read {path} ({type(exc).__name__})") from None
    state = ckpt.get("net_state_dict", ckpt) if isinstance(ckpt, dict) else None
    net = MobileFaceNet()
    want = net.state_dict()
    require(isinstance(state, dict) and set(state) == set(want)
            and all(tuple(state[k].shape) == tuple(v.shape) for k, v in want.items()),
            f"--descriptor-ckpt: {path} is not a MobileFaceNet checkpoint (its weights do not fit the architecture)")
    net.load_state_dict(state, strict=True)
    return freeze(net.eval())


# dlib's chip (get_face_chip, padding 0.25) frames its 68-point mean face as (m + 0.25) / 1.5 of the side. Five of
# its points, as fractions of the side: the eye centres (the means of points 36-41 and 42-47), the nose tip (30)
# and the mouth corners (48, 54), the image's left first.
DLIB_CHIP_POINTS = torch.tensor([[0.225492, 0.215990], [0.754761, 0.215990], [0.490127, 0.515625],
                                 [0.254149, 0.780233], [0.726104, 0.780233]], dtype=torch.float64)
# The same five points in SphereFace's 96 x 112 crop (1-based pixel coordinates), the input MobileFaceNet expects.
SPHEREFACE_POINTS = torch.tensor([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                                  [33.5493, 92.3655], [62.7299, 92.2041]], dtype=torch.float64)


def mobilefacenet_input(chips: torch.Tensor) -> torch.Tensor:
    """dlib-framed chips (N, 3, S, S) in [-1, 1], any S, -> MobileFaceNet's (N, 3, 112, 96) input.

    The crop is the least-squares similarity from SphereFace's five template points to the same points of dlib's
    chip. The crop's top rows lie above the chip, so the sampling repeats the chip's top edge there. Bilinear
    sampling; x * 127.5 / 128 then gives the network's (pixel - 127.5) / 128."""
    h, w = 112, 96
    src = SPHEREFACE_POINTS - 0.5                                      # pixel centres, 0-based, continuous
    dst = (DLIB_CHIP_POINTS + 0.25) / 1.5 + 0.5 / 150                  # fractions of the chip's side
    u, v = src[:, 0], src[:, 1]
    one, zero = torch.ones_like(u), torch.zeros_like(u)
    A = torch.cat([torch.stack([u, -v, one, zero], 1), torch.stack([v, u, zero, one], 1)])
    a, b, tx, ty = torch.linalg.lstsq(A, torch.cat([dst[:, 0], dst[:, 1]])[:, None]).solution[:, 0]
    to_chip = torch.tensor([[a, -b, tx], [b, a, ty]])                  # crop pixels -> chip fractions
    to_px = torch.tensor([[w / 2, 0, w / 2], [0, h / 2, h / 2], [0, 0, 1]], dtype=torch.float64)
    theta = 2 * to_chip @ to_px                                        # crop [-1, 1] -> chip [-1, 1]
    theta[:, 2] -= 1
    theta = theta.to(chips).expand(len(chips), 2, 3)
    grid = F.affine_grid(theta, [len(chips), 3, h, w], align_corners=False)
    return F.grid_sample(chips, grid, mode="bilinear", padding_mode="border", align_corners=False) * (127.5 / 128)


# Fixed feature networks for L_perc and LPIPS (crossmodal_avatar): VGG19 or f's feature maps, and LPIPS ----------------

VGG19_LAYERS = (3, 8, 17, 26, 35)  # relu1_2, relu2_2, relu3_4, relu4_4, relu5_4 of torchvision's vgg19().features


class FeatureMaps(nn.Module):
    """A frozen network that returns the feature maps of chosen layers of ``features`` for images in [-1, 1]."""

    def __init__(self, features: nn.Sequential, layers, mean=None, std=None, size: int | None = None):
        super().__init__()
        self.features, self.layers, self.size = features[:max(layers) + 1], set(layers), size
        self.register_buffer("mean", torch.tensor(mean or [0.5] * 3).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std or [0.5] * 3).view(1, 3, 1, 1))
        freeze(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x + 1) / 2 - self.mean) / self.std
        if self.size:
            x = resize_images(x, self.size)
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.layers:
                out.append(x)
        return out


def vgg19_weights_on_disk() -> Path | None:
    """torchvision's ImageNet VGG19 weights in torch hub's cache, if someone put them there."""
    import torchvision
    name = Path(torchvision.models.VGG19_Weights.IMAGENET1K_V1.url).name
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    return path if path.is_file() else None


def perceptual_network(choice: str, f_net: nn.Module | None) -> tuple[nn.Module, str]:
    """The feature maps of a perceptual loss and their description: ImageNet VGG19 for ``choice`` vgg19 (or auto
    when its weights are on disk), else those of the synthetic f (``choice`` f, or auto without VGG19)."""
    if choice == "vgg19" or (choice == "auto" and vgg19_weights_on_disk() is not None):
        import torchvision
        try:
            vgg = torchvision.models.vgg19(weights=torchvision.models.VGG19_Weights.IMAGENET1K_V1)
        except Exception as exc:
            raise UsageError(f"--perc-net vgg19: cannot load ImageNet VGG19 ({type(exc).__name__}: {exc}); "
                             f"use --perc-net f") from None
        return (FeatureMaps(vgg.features, VGG19_LAYERS, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
                "ImageNet VGG19 (torchvision), relu1_2, relu2_2, relu3_4, relu4_4, relu5_4 (as the paper)")
    assert f_net is not None
    # f's stem and its four residual stages (FaceIdentityNet.features: conv, BN, ReLU, then 4 blocks)
    net = FeatureMaps(f_net.features, (2, 3, 4, 5, 6), [0.5] * 3, [0.5] * 3, size=f_net.in_size)
    why = "no ImageNet VGG19 weights on disk" if choice == "auto" else "chosen with --perc-net f"
    return net, (f"the synthetic face network f's stem and 4 residual stages (face_nets.FaceIdentityNet; {why}; the "
                 f"paper uses ImageNet VGG19)")


def lpips_metric() -> tuple[nn.Module | None, str]:
    """LPIPS (AlexNet) when the `lpips` package and its ImageNet backbone are available, else (None, why)."""
    try:
        import lpips
    except Exception:
        return None, "not computed: the `lpips` package is not installed (and its ImageNet backbone cannot be " \
                     "downloaded offline)"
    try:
        return freeze(lpips.LPIPS(net="alex", verbose=False)), "LPIPS (AlexNet, lpips package)"
    except Exception as exc:
        return None, f"not computed: LPIPS could not load its backbone ({type(exc).__name__})"
