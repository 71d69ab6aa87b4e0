"""The synthetic face world of worlds/faces.py: samplers, renderer, attribute vector, speed."""

import dataclasses
import time

import numpy as np
import pytest

import worlds.faces as fw


def test_sample_identity_deterministic_and_seed_dependent():
    a, b = fw.sample_identity(3, 7), fw.sample_identity(3, 7)
    assert a == b
    fw.sample_identity(3, 8)                     # call order must not matter
    assert fw.sample_identity(3, 7) == a
    assert fw.sample_identity(3, 8) != a
    assert fw.sample_identity(4, 7) != a


def test_sample_nuisance_deterministic_and_seed_dependent():
    a = fw.sample_nuisance(1, 2, 3)
    assert a == fw.sample_nuisance(1, 2, 3)
    assert a != fw.sample_nuisance(1, 2, 4)
    assert a != fw.sample_nuisance(1, 3, 3)
    assert a != fw.sample_nuisance(2, 2, 3)
    assert a.background in ("gradient", "cluttered")


def test_render_deterministic_bit_identical():
    idn, nu = fw.sample_identity(0, 5), fw.sample_nuisance(0, 5, 1)
    x, y = fw.render_photo(idn, nu, 64), fw.render_photo(idn, nu, 64)
    assert np.array_equal(x, y)
    assert not np.array_equal(x, fw.render_photo(idn, fw.sample_nuisance(0, 5, 2), 64))
    assert not np.array_equal(x, fw.render_photo(fw.sample_identity(0, 6), nu, 64))


@pytest.mark.parametrize("size", [64, 96, 112, 128, 150, 152, 77])
def test_shapes_and_dtype(size):
    for i in range(3):
        img = fw.render_photo(fw.sample_identity(1, i), fw.sample_nuisance(1, i, 0), size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        assert img.std() > 10                     # not a blank image
    img = fw.render_photo(fw.sample_identity(1, 0), fw.canonical_nuisance(), size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8


def test_attribute_vector_layout():
    names = fw.ATTRIBUTE_NAMES
    assert len(set(names)) == len(names)
    n_onehot = sum(len(v) for v in fw.FACE_CATEGORICAL.values())
    assert len(names) == len(fw.FACE_CONTINUOUS) + 3 * len(fw.FACE_COLOURS) + n_onehot
    for i in range(50):
        idn = fw.sample_identity(2, i)
        v = fw.attribute_vector(idn)
        assert v.dtype == np.float32 and v.shape == (len(names),)
        assert v.min() >= 0.0 and v.max() <= 1.0
        start = len(fw.FACE_CONTINUOUS) + 3 * len(fw.FACE_COLOURS)
        for key, cats in fw.FACE_CATEGORICAL.items():
            group = v[start:start + len(cats)]
            assert group.sum() == 1.0
            assert cats[int(group.argmax())] == getattr(idn, key)
            start += len(cats)
        attrs = fw.face_attributes(idn)
        assert v[names.index("skin.g")] == np.float32(attrs["skin"][1])
        assert v[names.index("jaw_shape")] == np.float32(attrs["jaw_shape"])


def test_all_categories_reachable():
    seen = {k: set() for k in fw.FACE_CATEGORICAL}
    for i in range(500):
        idn = fw.sample_identity(0, i)
        for k in seen:
            seen[k].add(getattr(idn, k))
    for k, cats in fw.FACE_CATEGORICAL.items():
        assert seen[k] == set(cats), k
    assert "bald" in fw.FACE_CATEGORICAL["hair_style"] and len(fw.FACE_CATEGORICAL["hair_style"]) >= 6


def test_speed_smoke():
    idn = [fw.sample_identity(0, i) for i in range(10)]
    nus = [fw.sample_nuisance(0, i % 10, i) for i in range(100)]
    fw.render_photo(idn[0], nus[0], 64)          # warm caches (grid, noise tables)
    t0 = time.perf_counter()
    for i, nu in enumerate(nus):
        fw.render_photo(idn[i % 10], nu, 64)
    assert time.perf_counter() - t0 < 2.0


def test_identity_closer_than_other_identity():
    canon = fw.canonical_nuisance()
    light = {f: getattr(canon, f) for f in ("light_azimuth_deg", "light_elevation_deg", "light_intensity",
                                            "ambient", "colour_temperature")}

    def img(i, j):
        nu = dataclasses.replace(fw.sample_nuisance(9, i, j), **light)
        return fw.render_photo(fw.sample_identity(9, i), nu, 64).astype(np.float32)

    same = [np.abs(img(i, 0) - img(i, 1)).mean() for i in range(50)]
    diff = [np.abs(img(i, 0) - img(i + 50, 1)).mean() for i in range(50)]
    assert np.mean(same) < np.mean(diff)
