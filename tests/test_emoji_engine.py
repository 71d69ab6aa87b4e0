"""tos_emoji.py's emoji engine: switch groups, rendering, the ground truth of a synthetic face."""
import time

import numpy as np
import pytest
import torch

import worlds.emoji as E
from worlds import faces

BASE = dict(skin_tone="light", face_shape="oval", hair_style="short", hair_colour="brown", eye_shape="medium_wide",
            iris_colour="blue", eyebrows="thick_level", nose="short_narrow", mouth="wide_full", glasses="none",
            facial_hair="none")


def test_groups_and_dims():
    assert list(E.EMOJI_GROUPS) == ["skin_tone", "face_shape", "hair_style", "hair_colour", "eye_shape",
                                    "iris_colour", "eyebrows", "nose", "mouth", "glasses", "facial_hair"]
    sizes = [len(v) for v in E.EMOJI_GROUPS.values()]
    assert sizes == [8, 5, 8, 8, 6, 5, 6, 4, 4, 3, 4]
    assert E.CONFIG_DIM == 61 == sum(sizes)
    assert E.EMOJI_GROUPS["hair_style"] == faces.FACE_CATEGORICAL["hair_style"]
    assert E.EMOJI_GROUPS["glasses"] == faces.FACE_CATEGORICAL["glasses"]
    assert E.EMOJI_GROUPS["facial_hair"] == faces.FACE_CATEGORICAL["facial_hair"]
    assert E.GROUP_SLICES["skin_tone"] == slice(0, 8) and E.GROUP_SLICES["facial_hair"] == slice(57, 61)


def test_random_configs_valid_and_uniform():
    cfg = E.random_configs(np.random.default_rng(0), 4000)
    assert cfg.dtype == np.float32 and cfg.shape == (4000, E.CONFIG_DIM)
    assert E.is_valid_config(cfg)
    for g, s in E.GROUP_SLICES.items():
        f = cfg[:, s].mean(0)
        assert np.all(np.abs(f - 1 / len(f)) < 0.04), g


def test_determinism():
    row = E.config_from_dict({**BASE, "glasses": "round", "facial_hair": "beard", "hair_style": "curly"})
    a, b = E.render_emoji(row, 64), E.render_emoji(row.copy(), 64)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("group", list(E.EMOJI_GROUPS))
def test_every_group_visible(group):
    """Swapping one group's switch to any other category changes the 64-px picture."""
    imgs = [E.render_emoji(E.config_from_dict({**BASE, group: c}), 64).astype(np.float64)
            for c in E.EMOJI_GROUPS[group]]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert np.abs(imgs[i] - imgs[j]).mean() > 0.1, (group, i, j)


def test_ground_truth_valid():
    ids = [faces.sample_identity(0, i) for i in range(200)]
    gt = E.ground_truth_configs(ids)
    assert gt.shape == (200, E.CONFIG_DIM) and E.is_valid_config(gt)
    assert np.array_equal(E.ground_truth_config(ids[3]), gt[3])
    d = E.config_to_dict(gt[0])
    for g in ("hair_style", "glasses", "facial_hair"):
        assert d[g] == getattr(ids[0], g)
    assert np.array_equal(E.ground_truth_config(faces.face_attributes(ids[5])), gt[5])


def test_decode_noisy_scores():
    rng = np.random.default_rng(1)
    cfg = E.random_configs(rng, 64)
    noisy = cfg * 2.0 + rng.normal(0, 0.3, cfg.shape).astype(np.float32)
    assert np.array_equal(E.decode_config(noisy), cfg)
    t = torch.from_numpy(noisy)
    out = E.decode_config(t)
    assert isinstance(out, torch.Tensor) and torch.equal(out, torch.from_numpy(cfg))
    assert np.array_equal(E.decode_config(noisy[0]), cfg[0])
    assert E.is_valid_config(E.decode_config(rng.normal(size=(10, E.CONFIG_DIM))))


def test_dict_round_trip():
    for row in E.random_configs(np.random.default_rng(2), 20):
        assert np.array_equal(E.config_from_dict(E.config_to_dict(row)), row)
    assert E.config_to_dict(E.config_from_dict(BASE)) == BASE
    assert not E.is_valid_config(np.zeros(E.CONFIG_DIM))
    with pytest.raises(ValueError):
        E.config_from_dict({**BASE, "nose": "button"})


def test_render_emoji_batch_shape():
    cfg = E.random_configs(np.random.default_rng(3), 5)
    x = E.render_emoji_batch(cfg, 64)
    assert x.shape == (5, 3, 64, 64) and x.dtype == torch.uint8
    assert torch.equal(x[2], torch.from_numpy(E.render_emoji(cfg[2], 64)).permute(2, 0, 1))
    assert torch.equal(E.render_emoji_batch(torch.from_numpy(cfg), 64), x)
    for size in (32, 96, 152, 256):
        assert E.render_emoji(cfg[0], size).shape == (size, size, 3)


def test_speed_smoke():
    cfg = E.random_configs(np.random.default_rng(4), 100)
    E.render_emoji_batch(cfg[:10], 64)                                  # warm the part caches
    t = time.perf_counter()
    E.render_emoji_batch(cfg, 64)
    assert time.perf_counter() - t < 1.0
