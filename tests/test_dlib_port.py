"""The PyTorch port of dlib's face-recognition ResNet in worlds/face_nets.py, and its reader of dlib's model file.

Tests that need the trained weights skip when face_recognition_models is not installed; the comparison with dlib
itself also skips when dlib (pip install dlib-bin) is not importable. No test reads a shared data folder: the faces
are the synthetic world's.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from worlds.faces import render_photo, sample_identity, sample_nuisance
from worlds.face_nets import (
    DLIB_FACE_NET_NUM_WEIGHTS, DlibFaceNet, count_weights, dlib_model_path, load_dlib_face_net, read_dlib_weights,
    zero_extended_add,
)


def _model_path_or_skip() -> Path:
    try:
        return dlib_model_path()
    except RuntimeError as e:
        pytest.skip(f"dlib model file not available ({e})")


@pytest.fixture(scope="module")
def model_path() -> Path:
    return _model_path_or_skip()


@pytest.fixture(scope="module")
def model_bytes(model_path) -> bytes:
    return model_path.read_bytes()


@pytest.fixture(scope="module")
def loaded_net(model_path) -> DlibFaceNet:
    torch.set_num_threads(2)
    return load_dlib_face_net(model_path)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size, 3) smooth random field in [0, 1]: coarse uniform noise upsampled bilinearly."""
    coarse = torch.from_numpy(rng.random((1, 3, cells, cells), dtype=np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    return fine[0].permute(1, 2, 0).numpy()


def _to_project_range(chips: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB to the project's (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(chips).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------------------------------
# The network, with random weights: no model file needed


def test_output_shapes_and_resize():
    torch.manual_seed(0)
    net = DlibFaceNet().eval()
    with torch.no_grad():
        assert net(torch.rand(2, 3, 150, 150) * 2 - 1).shape == (2, 128)
        small = torch.rand(2, 3, 64, 64) * 2 - 1
        out = net(small)
        assert out.shape == (2, 128)
        resized = torch.nn.functional.interpolate(small, size=(150, 150), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out, net(resized))
        assert net(torch.rand(1, 3, 200, 180) * 2 - 1).shape == (1, 128)


def test_gradient_reaches_the_input():
    torch.manual_seed(0)
    net = DlibFaceNet().eval().requires_grad_(False)
    for size in (150, 64):
        x = (torch.rand(2, 3, size, size) * 2 - 1).requires_grad_(True)
        net(x).pow(2).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_zero_extended_add_matches_dlib_add_prev():
    a = torch.arange(1 * 2 * 3 * 3, dtype=torch.float32).reshape(1, 2, 3, 3)
    b = torch.ones(1, 1, 4, 4)
    out = zero_extended_add(a, b)
    assert out.shape == (1, 2, 4, 4)
    torch.testing.assert_close(out[:, :1, :, :], b + torch.nn.functional.pad(a[:, :1], (0, 1, 0, 1)))
    torch.testing.assert_close(out[:, 1, :3, :3], a[:, 1])
    assert (out[:, 1, 3, :] == 0).all() and (out[:, 1, :, 3] == 0).all()


def test_the_weight_count_constant_matches_the_architecture():
    net = DlibFaceNet()
    assert count_weights(net.state_dict()) == DLIB_FACE_NET_NUM_WEIGHTS == 5_614_592
    assert sum(p.numel() for p in net.parameters()) == DLIB_FACE_NET_NUM_WEIGHTS


# ----------------------------------------------------------------------------------------------------------------------
# The reader


def test_missing_package_gives_a_pip_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "face_recognition_models" else real(name, *a))
    with pytest.raises(RuntimeError, match="pip install face_recognition_models") as info:
        dlib_model_path()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [
    b"",                                           # empty
    b"\x89PNG\r\n\x1a\n" + bytes(100),             # another kind of file
    b"BZh91AY&SY" + bytes(100),                    # the .dat.bz2 download, still compressed
    b"\x01\x01\x01\x0dloss_metric_9",              # unknown loss version
    b"\x01\x01\x01\x0dloss_metric_2\x03\x0a",      # truncated right after the header
])
def test_files_that_are_not_the_model_give_a_one_line_value_error(tmp_path, content):
    path = tmp_path / "bad.dat"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        read_dlib_weights(path)
    assert "\n" not in str(info.value)


def test_loaded_state_dict_fills_the_whole_module(model_path):
    state = read_dlib_weights(model_path)
    assert count_weights(state) == DLIB_FACE_NET_NUM_WEIGHTS
    net = DlibFaceNet()
    result = net.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(state) == set(net.state_dict())
    for name, tensor in net.state_dict().items():
        assert tensor.shape == state[name].shape and torch.isfinite(tensor).all(), name
    torch.testing.assert_close(state["input_mean"], torch.tensor([122.782, 117.001, 104.298]))


def test_load_dlib_face_net_is_frozen(loaded_net):
    assert not loaded_net.training
    assert not any(p.requires_grad for p in loaded_net.parameters())


@pytest.mark.parametrize("cut", ["header", "middle", "last_byte", "trailing", "version_string"])
def test_truncated_or_corrupted_model_gives_a_one_line_value_error(tmp_path, model_bytes, cut):
    data = bytearray(model_bytes)
    if cut == "header":
        data = data[:1000]
    elif cut == "middle":
        data = data[:len(data) // 2]
    elif cut == "last_byte":
        data = data[:-1]
    elif cut == "trailing":
        data += b"\x00"
    else:  # the first con_ version string (the 7x7 input convolution): "con_4" -> "con_9"
        i = data.index(b"con_4")
        data[i + 4] = ord("9")
    path = tmp_path / "model.dat"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as info:
        read_dlib_weights(path)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------------------------------
# Equivalence with dlib


def test_descriptors_match_dlib(model_path, loaded_net):
    if importlib.util.find_spec("dlib") is None:
        pytest.skip("dlib is not installed (pip install dlib-bin); cannot compare with dlib's own descriptors")
    import dlib

    rng = np.random.default_rng(1234)
    chips = [render_photo(sample_identity(0, i), sample_nuisance(0, i, 0), 150) for i in range(4)]  # synthetic faces
    chips += [(_smooth_noise(rng, 150, cells) * 255).round().astype(np.uint8) for cells in (6, 30)]
    chips = np.stack(chips)

    model = dlib.face_recognition_model_v1(str(model_path))
    # The overload taking a list of aligned 150x150 HxWx3 uint8 RGB chips, num_jitters=0.
    ref = np.array([np.array(d) for d in model.compute_face_descriptor([np.ascontiguousarray(c) for c in chips])])
    with torch.no_grad():
        ours = loaded_net(_to_project_range(chips)).double().numpy()

    cosine = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    max_abs = np.abs(ours - ref).max()
    print(f"\ndlib equivalence on {len(chips)} chips: cosine min {cosine.min():.8f}, max |diff| {max_abs:.2e}, "
          f"descriptor norms {np.linalg.norm(ref, axis=1).round(3)}")
    assert cosine.min() >= 0.999, cosine
    assert max_abs < 1e-3, max_abs
    # The descriptors are not normalised, as dlib's are not.
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), np.linalg.norm(ref, axis=1), rtol=1e-4)
