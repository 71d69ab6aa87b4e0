"""The 629-D vector avatar engine (crossmodal_avatar §3, §4.3-4.4): table, ground truth, hair, PIL and SVG."""
import io
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from worlds import faces
from worlds.vector_avatar import (ACCESSORIES, AVATAR_DIM, AVATAR_GROUPS, GROUP_SLICES, HAIRSTYLES, avatar_from_dict,
                                   avatar_from_identity, avatar_primitives, avatar_svg, avatar_to_dict,
                                   hair_from_identity, hair_names, render_avatar, render_avatar_batch, sample_avatars,
                                   validate_hair)

SVG_NS = "{http://www.w3.org/2000/svg}"


def _mad(a, b) -> float:
    """Mean absolute difference of two uint8 images, in 0..255 units."""
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.fixture(scope="module")
def identity():
    return faces.sample_identity(0, 2)          # curly hair, square glasses, goatee


@pytest.fixture(scope="module")
def y_open(identity):
    return avatar_from_identity(identity, mouth_open=0.02)   # mouth open: the teeth show


def test_table_sums_to_629():
    assert AVATAR_DIM == 629
    assert sum(d for _, d, _ in AVATAR_GROUPS) == 629
    names = [g for g, _, _ in AVATAR_GROUPS]
    assert names == ["skin", "face_contour", "chin", "ears", "eye_lids", "iris", "pupils", "eye_highlights",
                     "eyebrows", "nose", "lips", "teeth", "shading"]
    start = 0
    for g, d, _ in AVATAR_GROUPS:
        s = GROUP_SLICES[g]
        assert s.start == start and s.stop - s.start == d
        start = s.stop
    assert start == AVATAR_DIM


def test_dict_roundtrip(identity):
    y = avatar_from_identity(identity)
    d = avatar_to_dict(y)
    assert set(d) == set(GROUP_SLICES) and all(isinstance(v, float) for v in d["nose"])
    assert np.array_equal(avatar_from_dict(d), y)
    with pytest.raises(KeyError):
        avatar_from_dict({k: v for k, v in d.items() if k != "lips"})
    with pytest.raises(ValueError):
        avatar_from_dict({**d, "teeth": d["teeth"][:-1]})


def test_ground_truth_vector(identity):
    y = avatar_from_identity(identity)
    assert y.shape == (AVATAR_DIM,) and y.dtype == np.float32
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert np.array_equal(y, avatar_from_identity(identity))
    # the layout is the photo's: eye line near 0.38, eyes left and right of the centre, chin near 0.80-0.87
    geo = faces.face_geometry(identity)
    ic = avatar_to_dict(y)["iris"]
    assert abs(ic[1] - geo.ye) < 0.01 and ic[0] < 0.5 < ic[3]
    pts = y[GROUP_SLICES["face_contour"]][:60].reshape(30, 2)
    assert abs(pts[:, 1].max() - geo.y_chin) < 0.01
    jit = avatar_from_identity(identity, np.random.default_rng(0), 0.006)
    assert jit.min() >= 0 and jit.max() <= 1 and 0 < np.abs(jit - y).mean() < 0.02


def test_sample_avatars_reproducible():
    a = sample_avatars(6, seed=3)
    assert a.shape == (6, AVATAR_DIM) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert np.array_equal(a, sample_avatars(6, seed=3))
    assert np.array_equal(a[:4], sample_avatars(4, seed=3))
    assert not np.array_equal(a, sample_avatars(6, seed=4))
    one = avatar_from_identity(faces.sample_identity(3, 5), np.random.default_rng([0x5A, 3, 5]), 0.006)
    assert np.allclose(a[5], one, atol=1e-6)


def test_render_deterministic_and_sizes(identity):
    y = avatar_from_identity(identity)
    h = hair_from_identity(identity)
    a = render_avatar(y, 128, h)
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8
    assert a.tobytes() == render_avatar(y, 128, h).tobytes()
    for size in (16, 37, 300):
        assert render_avatar(y, size).shape == (size, size, 3)
    with pytest.raises(ValueError):
        render_avatar(y, 8)
    batch = render_avatar_batch(np.stack([y, y]), 32, [h, None])
    assert tuple(batch.shape) == (2, 3, 32, 32) and str(batch.dtype) == "torch.uint8"
    assert np.array_equal(batch[0].permute(1, 2, 0).numpy(), render_avatar(y, 32, h))


# Every group moves the pixels: +0.08 on all its entries (clipped), 128 px render, mouth open. Observed: pixels whose
# largest channel moves by > 8 levels, from 15 (eye_highlights) and 17 (chin) to 7523 (skin).
GROUP_MIN_PIXELS = 8


@pytest.mark.parametrize("group", list(GROUP_SLICES))
def test_every_group_changes_pixels(group, y_open):
    base = render_avatar(y_open, 128)
    y = y_open.copy()
    s = GROUP_SLICES[group]
    y[s] = np.clip(y[s] + 0.08, 0, 1)
    diff = np.abs(render_avatar(y, 128).astype(int) - base.astype(int)).max(-1)
    assert (diff > 8).sum() >= GROUP_MIN_PIXELS, group


# 256 px downscaled to 64 with a box filter vs a direct 64-px render (observed <= 2.7 on these identities).
RES_MAX_MAD = 4.5


def test_resolutions_agree():
    for i in (0, 2, 4, 7):
        idn = faces.sample_identity(0, i)
        y, h = avatar_from_identity(idn), hair_from_identity(idn)
        small = render_avatar(y, 64, h)
        big = np.asarray(Image.fromarray(render_avatar(y, 256, h)).resize((64, 64), Image.BOX))
        assert _mad(small, big) < RES_MAX_MAD, i
    # a wrong render (another identity) is far away
    other = render_avatar(avatar_from_identity(faces.sample_identity(0, 3)), 64)
    assert _mad(render_avatar(avatar_from_identity(faces.sample_identity(0, 7)), 64), other) > 2 * RES_MAX_MAD


def test_hair_bank_and_accessories(identity):
    assert len(HAIRSTYLES) >= 20 and len(hair_names()) == len(set(hair_names())) == len(HAIRSTYLES)
    y = avatar_from_identity(identity)
    base = {"hairstyle": hair_names().index("bald_clean"), "hair_colour": [0.3, 0.2, 0.1], "glasses": "none",
            "facial_hair": "none"}
    bald = render_avatar(y, 96, base)
    renders = []
    for k, name in enumerate(hair_names()):
        if name == "bald_clean":
            continue
        r = render_avatar(y, 96, {**base, "hairstyle": k})
        assert _mad(r, bald) > 0.3, name
        renders.append(r.tobytes())
    assert len(set(renders)) == len(renders)                 # all styles differ from each other
    for key, cats in ACCESSORIES.items():
        for c in cats[1:]:
            assert _mad(render_avatar(y, 96, {**base, key: c}), bald) > 0.3, (key, c)
    h = hair_from_identity(identity)
    assert validate_hair(h) is h and hair_names()[h["hairstyle"]].startswith(identity.hair_style)


@pytest.mark.parametrize("bad", [
    None, {}, {"hairstyle": 0, "hair_colour": [0, 0, 0], "glasses": "none"},
    {"hairstyle": 99, "hair_colour": [0, 0, 0], "glasses": "none", "facial_hair": "none"},
    {"hairstyle": 1.5, "hair_colour": [0, 0, 0], "glasses": "none", "facial_hair": "none"},
    {"hairstyle": 1, "hair_colour": [0, 2, 0], "glasses": "none", "facial_hair": "none"},
    {"hairstyle": 1, "hair_colour": [0, 0], "glasses": "none", "facial_hair": "none"},
    {"hairstyle": 1, "hair_colour": [0, 0, 0], "glasses": "monocle", "facial_hair": "none"},
    {"hairstyle": 1, "hair_colour": [0, 0, 0], "glasses": "none", "facial_hair": "mutton"},
    {"hairstyle": 1, "hair_colour": [0, 0, 0], "glasses": "none", "facial_hair": "none", "hat": "x"},
])
def test_validate_hair_rejects(bad):
    with pytest.raises(ValueError):
        validate_hair(bad)


def _hex(c) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(round(255 * v)) for v in c))


def test_svg_matches_display_list(identity):
    y, h = avatar_from_identity(identity), hair_from_identity(identity)
    prims = avatar_primitives(y, h)
    root = ET.fromstring(avatar_svg(y, 256, h).split("\n", 1)[1])
    assert root.tag == SVG_NS + "svg" and root.get("viewBox") == "0 0 256 256" and root.get("width") == "256"
    elems = list(root)
    assert len(elems) == len(prims)
    tags = {"path": "path", "taper": "path", "polygon": "polygon"}
    for e, p in zip(elems, prims):
        assert e.get("class") == p.group
        want = tags.get(p.kind) or ("circle" if p.ellipse[2] == p.ellipse[3] else "ellipse")
        assert e.tag == SVG_NS + want
        assert e.get("fill") == ("none" if p.fill is None else _hex(p.fill))
        if p.stroke is not None:
            assert e.get("stroke") == _hex(p.stroke)
        if p.kind == "path":
            assert e.get("d").startswith("M") and "C" in e.get("d")
        if p.fill is not None and p.opacity < 1:
            assert abs(float(e.get("fill-opacity")) - p.opacity) < 1e-3
    groups = {e.get("class") for e in elems}
    assert set(GROUP_SLICES) - {"skin"} <= groups | {"skin"} and {"hair", "glasses", "facial_hair"} <= groups


# cairosvg's raster of the SVG vs render_avatar at 128 px (observed 0.9-2.3 on these identities).
SVG_MAX_MAD = 4.0


def test_svg_raster_matches_pil():
    try:
        import cairosvg
    except Exception:  # noqa: BLE001 - cairosvg or its cairo library missing
        pytest.skip("cairosvg not available")
    for i in (0, 2, 4):
        idn = faces.sample_identity(0, i)
        y, h = avatar_from_identity(idn), hair_from_identity(idn)
        png = cairosvg.svg2png(bytestring=avatar_svg(y, 128, h).encode(), output_width=128, output_height=128)
        svg = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert _mad(svg, render_avatar(y, 128, h)) < SVG_MAX_MAD, i
