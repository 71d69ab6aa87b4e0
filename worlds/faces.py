"""The synthetic face world, the face scripts' embedded default; its disjoint splits and cached renders; and the
real-face loaders (CelebA through torchvision, a folder of aligned face chips).

The papers train on a million unlabelled face photos, with DeepFace (trained on four million labelled ones) as f.
Offline, the face scripts run on this world, which knows the truth about every face; its f is trained on its own
labelled split (worlds/face_nets.py). With real photos, f is dlib's face-recognition ResNet (worlds/face_nets.py).

The world: a procedural renderer of face "photos" in the framing of a dlib face chip (``get_face_chip`` with padding
0.25: the landmark box fills the central ~2/3 of the chip, eyes on a horizontal line at ~0.38 of the height). Every
face is drawn from a :class:`FaceIdentity` (shape, colours, hair style, glasses, facial hair; all named, all ground
truth) and a :class:`FaceNuisance` (small similarity transform, lighting, expression, background, camera noise and
blur). One identity's images differ only by nuisance; different identities differ in geometry, colours and
categorical features.

Rendering is pure numpy (float32, planar RGB) with analytic anti-aliasing: every part is an implicit shape with a
signed distance ``d`` (< 0 inside) turned into coverage by a one-pixel linear ramp. The face is lit as a shaded
ellipsoid plus Gaussian height bumps (nose, brows, cheeks, lips, chin, eye sockets) with wrap-Lambert + ambient +
Blinn specular, in linear light (albedo squared, sqrt at the end). Skin, hair and beard textures come from fixed noise
tables sampled at identity-seeded offsets, so an identity's texture is the same in all its images.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from tqdm import tqdm

import common
from common import UsageError, atomic_write, require

# Identities, nuisances and the renderer ------------------------------------------------------------------------------

FACE_WORLD_VERSION = 1  # bump when a change to the renderer or the samplers changes the images (it keys the caches)

# · Attribute schema

#: Continuous geometry attributes, each stored normalised to [0, 1] (0.5 = average face).
FACE_CONTINUOUS: tuple[str, ...] = (
    "face_width",      # narrow .. wide
    "face_height",     # short .. long (chin lower)
    "jaw_shape",       # 0 pointed/V, 0.5 round, 1 square
    "eye_size",        # small .. large eye opening
    "eye_spacing",     # close .. wide set
    "eye_height",      # eyes slightly higher .. lower in the chip (small range: the chip aligns eyes)
    "brow_thickness",  # thin .. bushy
    "brow_angle",      # 0 outer ends low (sad), 0.5 level, 1 outer ends high (stern)
    "nose_length",     # short .. long
    "nose_width",      # narrow .. wide
    "mouth_width",     # narrow .. wide
    "lip_thickness",   # thin .. full
    "hairline",        # high forehead .. low hairline (ignored for bald)
)

#: Colour attributes, each an sRGB triple in [0, 1].
FACE_COLOURS: tuple[str, ...] = ("skin", "hair", "iris", "lips")

#: Categorical attributes and their categories (order = one-hot order in the attribute vector).
FACE_CATEGORICAL: dict[str, tuple[str, ...]] = {
    "hair_style": ("bald", "buzz", "short", "side_part", "long", "bob", "curly", "ponytail"),
    "glasses": ("none", "round", "square"),
    "facial_hair": ("none", "moustache", "beard", "goatee"),
}

# Categorical priors (same order as FACE_CATEGORICAL).
_HAIR_STYLE_P = (0.08, 0.12, 0.22, 0.13, 0.16, 0.10, 0.11, 0.08)
_GLASSES_P = (0.60, 0.20, 0.20)
_FACIAL_HAIR_P = (0.60, 0.10, 0.20, 0.10)
_FACIAL_HAIR_P_LONG = (0.86, 0.04, 0.06, 0.04)   # for long / bob / ponytail hair

#: Name of every entry of :func:`attribute_vector`: continuous, then colour channels, then one-hots.
ATTRIBUTE_NAMES: tuple[str, ...] = (
    FACE_CONTINUOUS
    + tuple(f"{c}.{ch}" for c in FACE_COLOURS for ch in "rgb")
    + tuple(f"{k}={v}" for k, vals in FACE_CATEGORICAL.items() for v in vals)
)

# Seed-sequence domain tags, so identity / nuisance / texture streams never collide.
_TAG_IDENTITY, _TAG_NUISANCE, _TAG_STYLE, _TAG_BG = 0x1D, 0x2B, 0x3C, 0x4E


@dataclass(frozen=True)
class FaceIdentity:
    """A person: every attribute that stays fixed across that person's photos.

    Continuous fields (see FACE_CONTINUOUS) are floats in [0, 1]; colour fields (FACE_COLOURS) are
    sRGB tuples in [0, 1]; categorical fields (FACE_CATEGORICAL) are category names.  ``tex_seed``
    seeds the identity's skin / hair / beard texture offsets and its clothes and frame colours, so
    these are identical in all images of the identity (they are not part of the attribute vector).
    """

    face_width: float
    face_height: float
    jaw_shape: float
    eye_size: float
    eye_spacing: float
    eye_height: float
    brow_thickness: float
    brow_angle: float
    nose_length: float
    nose_width: float
    mouth_width: float
    lip_thickness: float
    hairline: float
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    iris: tuple[float, float, float]
    lips: tuple[float, float, float]
    hair_style: str
    glasses: str
    facial_hair: str
    tex_seed: int


# Colour priors: skin is interpolated along a pale..dark ramp (then an undertone shift).
_SKIN_RAMP = np.array([
    (0.98, 0.87, 0.79), (0.95, 0.79, 0.68), (0.89, 0.70, 0.57), (0.80, 0.60, 0.45),
    (0.68, 0.48, 0.34), (0.55, 0.37, 0.25), (0.41, 0.27, 0.18), (0.27, 0.17, 0.12),
])
_HAIR_COLOURS = np.array([
    (0.06, 0.05, 0.05), (0.17, 0.11, 0.07), (0.32, 0.21, 0.13), (0.50, 0.37, 0.24),  # black..lt brown
    (0.78, 0.64, 0.42), (0.90, 0.83, 0.68), (0.60, 0.26, 0.11), (0.38, 0.15, 0.08),  # blond, platinum, red
    (0.56, 0.55, 0.53), (0.87, 0.86, 0.83),                                          # grey, white
])
_HAIR_P_LIGHT = np.array([0.12, 0.21, 0.17, 0.12, 0.12, 0.04, 0.05, 0.04, 0.09, 0.04])
_HAIR_P_DARK = np.array([0.56, 0.26, 0.05, 0.01, 0.005, 0.0, 0.0, 0.005, 0.08, 0.03])
_IRIS_COLOURS = np.array([
    (0.20, 0.11, 0.05), (0.37, 0.22, 0.10), (0.50, 0.40, 0.20),  # dark brown, brown, hazel
    (0.33, 0.47, 0.27), (0.33, 0.52, 0.75), (0.53, 0.57, 0.61),  # green, blue, grey
])
_IRIS_P_LIGHT = np.array([0.15, 0.25, 0.14, 0.12, 0.26, 0.08])
_IRIS_P_DARK = np.array([0.70, 0.26, 0.035, 0.0025, 0.0025, 0.0])


def _rgb(a) -> tuple[float, float, float]:
    """Clip to [0, 1] and return a tuple of three Python floats."""
    a = np.clip(np.asarray(a, dtype=np.float64), 0.0, 1.0)
    return (float(a[0]), float(a[1]), float(a[2]))


def sample_identity(seed: int, index: int) -> FaceIdentity:
    """Draw identity number ``index`` of world ``seed`` (non-negative ints).

    Reproducible and independent of call order: uses ``np.random.default_rng([tag, seed, index])``.
    Continuous attributes ~ Beta(1.4, 1.4); colours follow human priors (hair / iris colour mildly
    correlated with skin tone); hair style, glasses ('none' 60 %) and facial hair (rarer with long hair)
    are categorical draws.
    """
    rng = np.random.default_rng([_TAG_IDENTITY, int(seed), int(index)])
    cont = {name: float(rng.beta(1.4, 1.4)) for name in FACE_CONTINUOUS}

    # Skin: position on the pale..dark ramp plus a pink / olive undertone and a little jitter.
    tone = float(rng.uniform())
    pos = tone * (len(_SKIN_RAMP) - 1)
    lo = min(int(pos), len(_SKIN_RAMP) - 2)
    skin = _SKIN_RAMP[lo] + (pos - lo) * (_SKIN_RAMP[lo + 1] - _SKIN_RAMP[lo])
    under = float(rng.uniform(-1.0, 1.0))                      # -1 olive .. +1 pink
    skin = skin + under * np.array([0.012, -0.018, 0.008]) + rng.normal(0.0, 0.008, 3)

    # Hair and iris: palette choice with probabilities depending on skin tone, then jitter.
    dark = min(max((tone - 0.3) / 0.5, 0.0), 1.0)
    p_hair = (1 - dark) * _HAIR_P_LIGHT + dark * _HAIR_P_DARK
    hair = _HAIR_COLOURS[rng.choice(len(_HAIR_COLOURS), p=p_hair / p_hair.sum())]
    hair = hair * math.exp(rng.normal(0.0, 0.10)) + rng.normal(0.0, 0.015, 3)
    p_iris = (1 - dark) * _IRIS_P_LIGHT + dark * _IRIS_P_DARK
    iris = _IRIS_COLOURS[rng.choice(len(_IRIS_COLOURS), p=p_iris / p_iris.sum())]
    iris = iris * math.exp(rng.normal(0.0, 0.10)) + rng.normal(0.0, 0.02, 3)
    # Lips: a redder, darker version of the skin.
    lips = skin * np.array([0.88, 0.64, 0.66]) + np.array([0.04, 0.0, 0.02]) + rng.normal(0.0, 0.02, 3)

    cats = FACE_CATEGORICAL
    style = cats["hair_style"][rng.choice(len(cats["hair_style"]), p=_HAIR_STYLE_P)]
    glasses = cats["glasses"][rng.choice(3, p=_GLASSES_P)]
    p_fh = _FACIAL_HAIR_P_LONG if style in ("long", "bob", "ponytail") else _FACIAL_HAIR_P
    facial_hair = cats["facial_hair"][rng.choice(4, p=p_fh)]
    tex_seed = int(rng.integers(0, 2**31 - 1))
    return FaceIdentity(**cont, skin=_rgb(skin), hair=_rgb(hair), iris=_rgb(iris), lips=_rgb(lips),
                        hair_style=style, glasses=glasses, facial_hair=facial_hair, tex_seed=tex_seed)


def face_attributes(identity: FaceIdentity) -> dict[str, float | tuple[float, float, float] | str]:
    """Named ground-truth attributes: continuous floats, colour tuples and category names."""
    names = FACE_CONTINUOUS + FACE_COLOURS + tuple(FACE_CATEGORICAL)
    return {name: getattr(identity, name) for name in names}


def attribute_vector(identity: FaceIdentity) -> np.ndarray:
    """Float32 vector of all attributes in [0, 1], entries named by ATTRIBUTE_NAMES.

    Order: the FACE_CONTINUOUS values, then r, g, b of each FACE_COLOURS entry, then the one-hot of
    each FACE_CATEGORICAL attribute (categories in their listed order).  Length 40.
    """
    vals = [getattr(identity, n) for n in FACE_CONTINUOUS]
    for c in FACE_COLOURS:
        vals.extend(getattr(identity, c))
    for k, cats in FACE_CATEGORICAL.items():
        vals.extend(1.0 if getattr(identity, k) == v else 0.0 for v in cats)
    return np.asarray(vals, dtype=np.float32)


# · Nuisance


@dataclass(frozen=True)
class FaceNuisance:
    """Everything that varies between photos of one identity.

    rotation_deg: in-plane rotation (positive = clockwise on screen), about +-10.
    scale: face scale factor, about 0.92..1.08.  shift_x, shift_y: translation as a fraction of the
    image size (about +-0.05, positive = right / down).
    light_azimuth_deg (positive = light from the image's right), light_elevation_deg (positive = from
    above), light_intensity (~0.75..1.2), ambient (0..1 fraction of the light that is ambient),
    colour_temperature (-1 cool/blue .. +1 warm/orange).
    mouth_curve: -1 frown .. +1 smile (strong smiles open the mouth); eye_openness: 0 shut .. 1 wide.
    background: 'gradient' or 'cluttered'; bg_colour_a / bg_colour_b: sRGB of the two ends of the
    gradient (clutter colours are drawn around them); bg_seed: seeds gradient direction and clutter.
    noise_sigma: std of additive Gaussian camera noise in [0, 1] intensity units.
    blur_radius: Gaussian blur radius in pixels of a 64-px image (scaled with the image size).
    """

    rotation_deg: float
    scale: float
    shift_x: float
    shift_y: float
    light_azimuth_deg: float
    light_elevation_deg: float
    light_intensity: float
    ambient: float
    colour_temperature: float
    mouth_curve: float
    eye_openness: float
    background: str
    bg_colour_a: tuple[float, float, float]
    bg_colour_b: tuple[float, float, float]
    bg_seed: int
    noise_sigma: float
    blur_radius: float


def _muted_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    """A random, mostly desaturated sRGB colour (walls, sky, furniture)."""
    hue = rng.uniform()
    sat = rng.uniform(0.03, 0.45) ** 1.3
    val = rng.uniform(0.25, 0.92)
    rgb = np.array([abs(((hue * 6 + k) % 6) - 3) - 1 for k in (0, 4, 2)]).clip(0, 1)  # hue wheel
    return _rgb(val * (1 - sat + sat * rgb))


def sample_nuisance(seed: int, identity_index: int, image_index: int) -> FaceNuisance:
    """Draw the nuisance of photo ``image_index`` of identity ``identity_index`` in world ``seed``.

    Reproducible and independent of call order (``default_rng([tag, seed, identity, image])``).
    """
    rng = np.random.default_rng([_TAG_NUISANCE, int(seed), int(identity_index), int(image_index)])
    squint = rng.uniform() < 0.06
    return FaceNuisance(
        rotation_deg=float(np.clip(rng.normal(0.0, 4.5), -10.0, 10.0)),
        scale=float(rng.uniform(0.92, 1.08)),
        shift_x=float(rng.uniform(-0.05, 0.05)),
        shift_y=float(rng.uniform(-0.05, 0.05)),
        light_azimuth_deg=float(rng.uniform(-60.0, 60.0)),
        light_elevation_deg=float(rng.uniform(-10.0, 60.0)),
        light_intensity=float(rng.uniform(0.75, 1.2)),
        ambient=float(rng.uniform(0.15, 0.45)),
        colour_temperature=float(rng.uniform(-1.0, 1.0)),
        mouth_curve=float(np.clip(rng.normal(0.15, 0.45), -0.8, 1.0)),
        eye_openness=float(rng.uniform(0.3, 0.55) if squint else rng.uniform(0.6, 1.0)),
        background="cluttered" if rng.uniform() < 0.5 else "gradient",
        bg_colour_a=_muted_colour(rng),
        bg_colour_b=_muted_colour(rng),
        bg_seed=int(rng.integers(0, 2**31 - 1)),
        noise_sigma=float(0.022 * rng.uniform() ** 1.5),
        blur_radius=float(0.6 * rng.uniform() ** 2),
    )


def canonical_nuisance() -> FaceNuisance:
    """Frontal, neutral expression, even soft light from slightly above, plain grey background, no noise."""
    return FaceNuisance(
        rotation_deg=0.0, scale=1.0, shift_x=0.0, shift_y=0.0,
        light_azimuth_deg=0.0, light_elevation_deg=30.0, light_intensity=1.0, ambient=0.35,
        colour_temperature=0.0, mouth_curve=0.1, eye_openness=0.85,
        background="gradient", bg_colour_a=(0.80, 0.80, 0.80), bg_colour_b=(0.80, 0.80, 0.80),
        bg_seed=0, noise_sigma=0.0, blur_radius=0.0,
    )


# · Rendering helpers

_F32 = np.float32
try:  # the raw ufunc is ~4x faster than np.clip's Python wrapper on small arrays
    _clip = np._core.umath.clip  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover
    _clip = np.clip


def _lin(rgb) -> np.ndarray:
    """sRGB-ish colour -> linear light (gamma 2), shape (3, 1, 1) for planar broadcasting."""
    a = np.asarray(rgb, dtype=np.float32)
    return (a * a).reshape(3, 1, 1)


def _ramp(d: np.ndarray, width: float) -> np.ndarray:
    """Coverage of an implicit shape from its signed distance d (< 0 inside), linear over `width`."""
    m = d * _F32(-1.0 / width)
    m += _F32(0.5)
    return _clip(m, _F32(0.0), _F32(1.0), out=m)


def _over(dst: np.ndarray, col, m: np.ndarray) -> None:
    """Alpha-composite in place: dst <- dst + m * (col - dst); dst (3,h,w) or (h,w)."""
    t = col - dst
    t *= m
    dst += t


@lru_cache(maxsize=1)
def _tables() -> dict[str, np.ndarray]:
    """Fixed 256x256 noise tables (flattened float32): skin (std 1), strands and curls (in [0, 1])."""
    n = 256
    rng = np.random.default_rng(20170417)
    fr = np.fft.fftfreq(n)[:, None]
    fc = np.fft.fftfreq(n)[None, :]

    def blur(sr: float, sc: float) -> np.ndarray:
        """Periodic white noise blurred by a Gaussian of std (sr, sc) texels, standardised."""
        k = np.exp(-2 * np.pi**2 * ((fr * sr) ** 2 + (fc * sc) ** 2))
        a = np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) * k).real
        return (a - a.mean()) / a.std()

    skin = blur(0.8, 0.8) + 0.8 * blur(5.0, 5.0)
    skin /= skin.std()
    strands = blur(14.0, 0.7) + 0.5 * blur(40.0, 3.0)            # long along axis 0
    strands = np.clip(0.5 + 0.2 * strands, 0, 1)
    # Curls: dense contour lines of a smooth field (nested, wavy rings) plus fine grain.
    curls = 0.5 + 0.5 * np.cos(2 * np.pi * 1.6 * blur(7.0, 7.0))
    curls = np.clip(0.12 + 0.7 * curls + 0.12 * blur(0.8, 0.8), 0, 1)
    return {k: v.astype(np.float32).ravel() for k, v in
            (("skin", skin), ("strands", strands), ("curls", curls))}


def _tex(table: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Nearest-neighbour, wrapping lookup of a 256x256 table at (row, col) texel coordinates a, b."""
    ia = a.astype(np.int32)
    ia &= 255
    ia <<= 8
    ib = b.astype(np.int32)
    ib &= 255
    ia |= ib
    return _tables()[table].take(ia)


class _Grid:
    """Cached per-size arrays: pixel-centre coordinates, vignette and a camera-noise table."""

    def __init__(self, size: int):
        c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        self.y, self.x = np.meshgrid(c, c, indexing="ij")             # chip coords, centred, y down
        r2 = self.x * self.x + self.y * self.y
        self.vignette = (1.0 - 0.35 * r2).astype(np.float32)         # gentle lens fall-off
        rng = np.random.default_rng([0xCA, size])
        self.noise = rng.standard_normal((3, 2 * size, 2 * size)).astype(np.float32)


@lru_cache(maxsize=32)
def _grid(size: int) -> _Grid:
    """The cached :class:`_Grid` for an image size."""
    return _Grid(size)


@dataclass(frozen=True)
class _Geo:
    """Face layout in face coordinates (x centred, y from chip top, units of the chip size)."""

    W: float; yc: float; Hu: float; Hl: float; y_chin: float; jk: float; jq: float    # noqa: E702
    ye: float; es: float; ew: float; yb: float; bth: float; bang: float              # noqa: E702
    yn: float; nw: float; ym: float; mw: float; lt: float; yh: float                 # noqa: E702


@lru_cache(maxsize=4096)
def face_geometry(idn: FaceIdentity) -> _Geo:
    """Map the normalised attributes of an identity to its face layout."""
    W = 0.285 + 0.07 * idn.face_width
    ye = 0.38 + 0.024 * (idn.eye_height - 0.5)
    yc = ye + 0.05
    y_chin = 0.80 + 0.07 * idn.face_height
    j = idn.jaw_shape                       # 0 pointed, 0.5 round, 1 square
    jk = 1.3 - 2.6 * j if j < 0.5 else -1.0 * (j - 0.5)            # narrows (>0) / widens the jaw
    jq = 0.2 * (j / 0.5) if j < 0.5 else 0.2 + 1.4 * (j - 0.5)     # flattens the chin
    yn = ye + 0.145 + 0.055 * idn.nose_length
    return _Geo(
        W=W, yc=yc, Hu=yc + 0.02, Hl=y_chin - yc, y_chin=y_chin, jk=jk, jq=jq,
        ye=ye, es=0.118 + 0.035 * idn.eye_spacing, ew=0.040 + 0.017 * idn.eye_size,
        yb=ye - 0.062, bth=0.0065 + 0.0095 * idn.brow_thickness, bang=2.0 * idn.brow_angle - 1.0,
        yn=yn, nw=0.025 + 0.02 * idn.nose_width, ym=yn + 0.38 * (y_chin - yn),
        mw=0.072 + 0.038 * idn.mouth_width, lt=0.011 + 0.012 * idn.lip_thickness,
        yh=0.075 + 0.075 * idn.hairline,
    )


_CLOTHES = np.array([
    (0.10, 0.12, 0.22), (0.08, 0.08, 0.08), (0.45, 0.45, 0.47), (0.88, 0.88, 0.86), (0.55, 0.10, 0.12),
    (0.15, 0.35, 0.20), (0.25, 0.40, 0.65), (0.75, 0.68, 0.55), (0.40, 0.25, 0.45), (0.85, 0.55, 0.20),
])
_FRAMES = np.array([  # black, dark brown, tortoise, navy (plastic); gold, silver (metal)
    (0.04, 0.04, 0.045), (0.20, 0.11, 0.06), (0.36, 0.21, 0.09), (0.09, 0.11, 0.25),
    (0.78, 0.62, 0.33), (0.74, 0.74, 0.76),
])


@dataclass(frozen=True)
class _Style:
    """Identity-seeded render constants: texture offsets, part side, clothes and frame colours."""

    off: tuple[float, ...]
    side: float
    clothes: tuple[float, float, float]
    frame: tuple[float, float, float]
    metal: bool


@lru_cache(maxsize=4096)
def _style(tex_seed: int) -> _Style:
    """Derive the identity's fixed rendering constants from its texture seed."""
    rng = np.random.default_rng([_TAG_STYLE, tex_seed])
    off = tuple(float(v) for v in rng.uniform(0, 256, 8))
    fi = int(rng.integers(0, len(_FRAMES)))
    clothes = _CLOTHES[rng.integers(0, len(_CLOTHES))] * rng.uniform(0.8, 1.15) + rng.normal(0, 0.03, 3)
    return _Style(off=off, side=1.0 if rng.uniform() < 0.5 else -1.0, clothes=_rgb(clothes),
                  frame=_rgb(_FRAMES[fi]), metal=fi >= 4)


class _Canvas:
    """Working state of one render: face-frame coordinates, lighting, and the A / S / P buffers.

    A: (3, H, W) linear albedo; S: (H, W) diffuse shading; P: (H, W) specular (white light).
    """

    def __init__(self, size: int, nu: FaceNuisance):
        g = _grid(size)
        self.size, self.grid, self.nu = size, g, nu
        sc = nu.scale
        th = math.radians(nu.rotation_deg)
        ca, sa = math.cos(th), math.sin(th)
        self.sim = (sc * ca, sc * sa, nu.shift_x, nu.shift_y)
        # Inverse similarity: image chip coords -> face coords (x centred, y from the chip top).
        X = g.x - _F32(nu.shift_x)
        Y = g.y - _F32(nu.shift_y)
        self.fx = (X * _F32(ca / sc)) + (Y * _F32(sa / sc))
        self.fy = (Y * _F32(ca / sc)) - (X * _F32(sa / sc))
        self.fy += _F32(0.5)
        self.afx = np.abs(self.fx)                  # mirrored x, for symmetric pairs of parts
        self.sgn = np.sign(self.fx)
        self.aa = 1.0 / (size * sc)                 # one pixel in face units
        # Light direction in camera coords (x right, y down, z to viewer), then into the face frame.
        az, el = math.radians(nu.light_azimuth_deg), math.radians(nu.light_elevation_deg)
        lx, ly, lz = math.sin(az) * math.cos(el), -math.sin(el), math.cos(az) * math.cos(el)
        self.L = (ca * lx + sa * ly, -sa * lx + ca * ly, lz)
        hx, hy, hz = self.L[0], self.L[1], self.L[2] + 1.0          # Blinn half vector (viewer = +z)
        hn = math.sqrt(hx * hx + hy * hy + hz * hz)
        self.H = (hx / hn, hy / hn, hz / hn)
        self.amb = nu.ambient
        self.A = np.empty((3, size, size), np.float32)
        self.S = np.ones((size, size), np.float32)
        self.P = np.zeros((size, size), np.float32)

    def box(self, x0: float, x1: float, y0: float, y1: float):
        """Pixel slices (rows, cols) covering the face-frame rectangle [x0,x1]x[y0,y1], or None."""
        a, b, tx, ty = self.sim
        xs, ys = [], []
        for fx in (x0, x1):
            for fy in (y0 - 0.5, y1 - 0.5):
                xs.append(a * fx - b * fy + tx)
                ys.append(b * fx + a * fy + ty)
        n = self.size
        c0 = max(int(math.floor((min(xs) + 0.5) * n)) - 1, 0)
        c1 = min(int(math.ceil((max(xs) + 0.5) * n)) + 1, n)
        r0 = max(int(math.floor((min(ys) + 0.5) * n)) - 1, 0)
        r1 = min(int(math.ceil((max(ys) + 0.5) * n)) + 1, n)
        if c1 <= c0 or r1 <= r0:
            return None
        return slice(r0, r1), slice(c0, c1)

    def shade(self, nx: np.ndarray, ny: np.ndarray, wrap: float = 0.35):
        """Diffuse shade (ambient + wrapped Lambert) and Blinn term for unnormalised normals (nx, ny, 1)."""
        inv = nx * nx
        inv += ny * ny
        inv += _F32(1.0)
        np.sqrt(inv, out=inv)
        np.divide(_F32(1.0), inv, out=inv)
        lx, ly, lz = self.L
        ndl = nx * _F32(lx)
        ndl += ny * _F32(ly)
        ndl += _F32(lz)
        ndl *= inv
        k = (1.0 - self.amb) * self.nu.light_intensity / (1.0 + wrap)
        ndl += _F32(wrap)
        np.maximum(ndl, _F32(0.0), out=ndl)
        ndl *= _F32(k)
        ndl += _F32(self.amb * self.nu.light_intensity)
        hx, hy, hz = self.H
        ndh = nx * _F32(hx)
        ndh += ny * _F32(hy)
        ndh += _F32(hz)
        ndh *= inv
        np.maximum(ndh, _F32(0.0), out=ndh)
        return ndl, ndh


def _bump(c: _Canvas, sl, nx, ny, cx, cy, sx, sy, amp, mirror=False) -> np.ndarray:
    """Add a Gaussian height bump to the normal field (nx, ny) over slices sl; returns its profile.

    With mirror=True the bump is placed at both x = +cx and x = -cx.
    """
    fx = c.afx[sl] if mirror else c.fx[sl]
    qx = fx - _F32(cx)
    qx *= _F32(1.0 / sx)
    qy = c.fy[sl] - _F32(cy)
    qy *= _F32(1.0 / sy)
    e = qx * qx
    e += qy * qy
    e *= _F32(-1.0)
    np.exp(e, out=e)
    qx *= e
    qx *= _F32(2.0 * amp / sx)
    if mirror:
        qx *= c.sgn[sl]
    nx[sl] += qx
    qy *= e
    qy *= _F32(2.0 * amp / sy)
    ny[sl] += qy
    return e


# · Layers


def _background(c: _Canvas) -> None:
    """Gradient or cluttered (soft out-of-focus blobs and rectangles) background, in image coords."""
    nu, g = c.nu, c.grid
    rng = np.random.default_rng([_TAG_BG, nu.bg_seed])
    ca, cb = _lin(nu.bg_colour_a), _lin(nu.bg_colour_b)
    phi = rng.uniform(0, 2 * math.pi)
    t = g.x * _F32(math.cos(phi)) + g.y * _F32(math.sin(phi))
    t += _F32(0.5)
    _clip(t, _F32(0), _F32(1), out=t)
    A = c.A
    A[:] = ca
    _over(A, cb, t)
    if nu.background == "cluttered":
        for _ in range(int(rng.integers(4, 9))):
            base = nu.bg_colour_a if rng.uniform() < 0.5 else nu.bg_colour_b
            col = np.asarray(base) * rng.uniform(0.5, 1.4) + rng.normal(0, 0.12, 3)
            if rng.uniform() < 0.2:                                   # an occasional bright light
                col = col * 0.3 + 0.75
            cx, cy = rng.uniform(-0.55, 0.55, 2)
            hx, hy = rng.uniform(0.04, 0.35, 2)
            soft = rng.uniform(0.01, 0.06) + 1.0 / c.size
            dx = np.abs(g.x - _F32(cx))
            dy = np.abs(g.y - _F32(cy))
            if rng.uniform() < 0.5:                                   # rectangle
                d = np.maximum(dx - _F32(hx), dy - _F32(hy))
            else:                                                     # ellipse
                dx *= _F32(1 / hx)
                dy *= _F32(1 / hy)
                d = np.sqrt(dx * dx + dy * dy)
                d -= _F32(1.0)
                d *= _F32(min(hx, hy))
            m = _ramp(d, soft)
            m *= _F32(rng.uniform(0.5, 1.0))
            _over(A, _lin(_rgb(col)), m)
    c.S *= _F32(0.55 + 0.4 * nu.light_intensity)                       # background exposure


def _body(c: _Canvas, geo: _Geo, st: _Style) -> None:
    """Clothes over the shoulders with a crew neckline (the neck is drawn by :func:`_neck`)."""
    nk = 0.6 * geo.W
    y_nb = geo.y_chin + 0.08
    sl = c.box(-1.0, 1.0, y_nb - 0.01, 2.0)
    if sl is None:
        return
    fx, fy = c.fx[sl], c.fy[sl]
    ax = np.abs(fx)
    q = ax * _F32(1.0 / nk)
    neckline = _F32(1.0) - q * q
    np.maximum(neckline, _F32(0.0), out=neckline)
    over = ax - _F32(nk)
    np.maximum(over, _F32(0.0), out=over)
    top = neckline * _F32(0.035) + over * over * _F32(0.5)
    top += _F32(y_nb)
    m = _ramp(top - fy, c.aa * 1.2)
    # Shirt colour with a soft fold texture; shading from a gently curved normal.
    tex = _tex("skin", fy * _F32(40.0), fx * _F32(40.0) + _F32(st.off[0]))
    alb = _lin(st.clothes) * (tex * _F32(0.05) + _F32(1.0))
    _over(c.A[:, sl[0], sl[1]], alb, m)
    s, _ = c.shade(fx * _F32(0.9), np.full_like(fx, -0.35))
    _over(c.S[sl], s, m)
    c.P[sl] *= 1 - m


def _neck(c: _Canvas, geo: _Geo, skin: np.ndarray, d_face: np.ndarray) -> None:
    """Neck: a shaded cylinder widening towards the shoulders, in the head's shadow below the jaw."""
    nk = 0.52 * geo.W
    sl = c.box(-nk - 0.06, nk + 0.06, geo.yc, 2.0)
    if sl is None:
        return
    fx, fy = c.fx[sl], c.fy[sl]
    wid = fy - _F32(geo.y_chin)
    np.maximum(wid, _F32(0.0), out=wid)
    wid *= wid
    wid *= _F32(2.0)
    wid += _F32(nk)
    m = _ramp(np.abs(fx) - wid, c.aa * 1.5)
    m *= _ramp(_F32(geo.yc + 0.1) - fy, c.aa)
    q = fx / wid
    _clip(q, _F32(-0.95), _F32(0.95), out=q)
    s, _ = c.shade(q * _F32(1.3), np.full_like(q, 0.1))
    # Shadow of the head just below the jaw line; deeper when the light comes from above.
    depth = 0.45 * max(math.sin(math.radians(c.nu.light_elevation_deg)), 0.0) + 0.3
    sh = _ramp(d_face[sl] - _F32(0.045), 0.1)
    sh *= _F32(depth)
    s *= _F32(1.0) - sh
    _over(c.A[:, sl[0], sl[1]], skin * _lin((0.97, 0.96, 0.96)), m)
    _over(c.S[sl], s, m)
    c.P[sl] *= 1 - m


def _ears(c: _Canvas, geo: _Geo, skin: np.ndarray) -> None:
    """Two ears just outside the face outline at eye / nose level."""
    cx, cy, ax, ay = geo.W - 0.012, geo.ye + 0.07, 0.032, 0.072
    sl = c.box(-cx - ax - 0.01, cx + ax + 0.01, cy - ay - 0.01, cy + ay + 0.01)
    if sl is None:
        return
    dx = c.afx[sl] - _F32(cx)
    dx *= _F32(1 / ax)
    dy = c.fy[sl] - _F32(cy)
    dy *= _F32(1 / ay)
    r = np.sqrt(dx * dx + dy * dy)
    m = _ramp((r - _F32(1.0)) * _F32(ax), c.aa)
    lx, _, lz = c.L
    k = (1 - c.amb) * c.nu.light_intensity
    sgn = c.sgn[sl]
    s = (sgn * _F32(0.75 * lx) + _F32(0.66 * lz) + _F32(0.3)) * _F32(k / 1.3)
    np.maximum(s, _F32(0.0), out=s)
    s += _F32(c.amb * c.nu.light_intensity)
    s *= _F32(0.8) + _F32(0.2) * r                       # inner ear darker
    _over(c.A[:, sl[0], sl[1]], skin * _lin((1.0, 0.93, 0.92)), m)
    _over(c.S[sl], s, m)


def _outline(c: _Canvas, geo: _Geo):
    """Face / skull outline: returns (r2, d_face, m_face) over the full frame.

    r2 is the squared implicit radius (1 on the outline), d_face an approximate signed distance.
    """
    fx, fy = c.fx, c.fy
    W = geo.W
    fxw = fx * _F32(1.0 / W)
    A2 = fxw * fxw
    dyc = fy - _F32(geo.yc)
    tu = dyc * _F32(1.0 / geo.Hu)
    r2u = tu * tu
    r2u += A2
    tl = dyc * _F32(1.0 / geo.Hl)
    T = tl * tl
    r2l = T * _F32(geo.jk)
    r2l += _F32(1.0)
    r2l *= A2                                            # jaw narrowing / widening
    r2l += T * (T * _F32(geo.jq) + _F32(1.0 - geo.jq))   # chin flattening
    r2 = np.where(dyc < 0, r2u, r2l)
    d_face = np.sqrt(r2)
    d_face -= _F32(1.0)
    d_face *= _F32(W)
    return r2, d_face, _ramp(d_face, c.aa)


def _head(c: _Canvas, geo: _Geo, st: _Style, skin: np.ndarray, r2: np.ndarray, m_face: np.ndarray) -> None:
    """Face / skull skin: normal field with feature bumps, textured albedo, shading and sheen."""
    fx, fy = c.fx, c.fy
    W = geo.W
    fxw = fx * _F32(1.0 / W)
    dyc = fy - _F32(geo.yc)

    # Ellipsoid normal (depth 0.9 W); clipped near the outline so the rim darkens but stays finite.
    zr = _F32(1.0) - r2
    np.maximum(zr, _F32(0.06), out=zr)
    np.sqrt(zr, out=zr)
    np.divide(_F32(0.9), zr, out=zr)
    nx = fxw * zr
    Hm = 0.5 * (geo.Hu + geo.Hl)
    ny = dyc * zr
    ny *= _F32(W / (Hm * Hm))

    # Feature height bumps (face units), each restricted to a box around it.
    smile = c.nu.mouth_curve
    es, ye, yn, nw, ym, mw, lt = geo.es, geo.ye, geo.yn, geo.nw, geo.ym, geo.mw, geo.lt

    def bump(cx, cy, sx, sy, amp, mirror=False):
        """Add a bump (mirrored pair if mirror) within +-2.6 sigma; returns (slices, profile)."""
        x0 = -(cx + 2.6 * sx) if mirror else cx - 2.6 * sx
        sl = c.box(x0, cx + 2.6 * sx, cy - 2.6 * sy, cy + 2.6 * sy)
        if sl is None:
            return None, None
        return sl, _bump(c, sl, nx, ny, cx, cy, sx, sy, amp, mirror)

    bump(0.0, ye + 0.02, 0.013, 0.05, 0.012)                                 # upper bridge
    bump(0.0, 0.35 * ye + 0.65 * yn, 0.5 * nw + 0.008, 0.4 * (yn - ye), 0.034)  # nose body
    bump(0.0, yn - 0.02, 0.6 * nw, 0.022, 0.045)                             # nose tip
    bump(0.62 * nw, yn - 0.008, 0.38 * nw, 0.013, 0.014, mirror=True)        # alae
    sl_eye, e_eye = bump(es, ye + 0.002, 0.05, 0.032, -0.022, mirror=True)   # eye sockets
    bump(es - 0.01, geo.yb - 0.006, 0.06, 0.02, 0.014, mirror=True)          # brow ridge
    sl_ck, e_ck = bump(es + 0.025, ye + 0.105 - 0.012 * smile, 0.055, 0.045,
                       0.018 + 0.01 * max(smile, 0.0), mirror=True)          # cheekbones
    bump(0.0, ym - 0.6 * lt, 0.75 * mw, 1.3 * lt, 0.010)                     # upper lip
    bump(0.0, ym + 1.0 * lt, 0.7 * mw, 1.5 * lt, 0.014)                      # lower lip
    bump(0.0, ym + 2.5 * lt + 0.012, 0.6 * mw, 0.012, -0.008)                # groove under the lip
    bump(0.0, geo.y_chin - 0.045, 0.055, 0.03, 0.014)                        # chin
    bump(0.0, ye - 0.15, 0.17, 0.08, 0.015)                                  # forehead

    s, h = c.shade(nx, ny, wrap=0.12)
    # Cast shadow of the nose, offset away from the light.
    lx, ly, lz = c.L
    lz = max(lz, 0.25)
    shx, shy = -lx / lz * 0.022, -ly / lz * 0.022
    sl_n = c.box(-1.5 * nw - 0.04, 1.5 * nw + 0.04, ye, yn + 0.05)
    if sl_n is not None and math.hypot(shx, shy) > 1e-3:
        cy, hy, hx = 0.5 * (ye + yn) + 0.012, 1.0 / (0.5 * (yn - ye) + 0.012), 1.0 / (0.85 * nw)

        def nose(ox: float, oy: float) -> np.ndarray:
            """Soft silhouette of the nose seen from the light, shifted by (ox, oy)."""
            qx = c.fx[sl_n] - _F32(ox)
            qx *= _F32(hx)
            qy = c.fy[sl_n] - _F32(cy + oy)
            qy *= _F32(hy)
            qy *= qy
            e = qx * qx
            e += qy * qy
            return np.exp(-e, out=e)

        cast = nose(shx, shy) - nose(0.0, 0.0)
        np.maximum(cast, _F32(0.0), out=cast)
        cast *= _F32(0.4)
        s[sl_n] *= _F32(1.0) - cast

    # Skin albedo: identity-seeded fine + blotchy texture, rosier cheeks, darker eye surrounds.
    k = 120.0                                              # texels per face unit
    tex = _tex("skin", fy * _F32(k) + _F32(st.off[1]), fx * _F32(k) + _F32(st.off[2]))
    tex *= _F32(0.035)
    tex += _F32(1.0)
    A = c.A
    alb = skin * tex
    if sl_ck is not None:                                  # cheeks slightly redder
        sub = alb[:, sl_ck[0], sl_ck[1]]
        sub *= _F32(1.0) + e_ck * _lin((1.025, 0.985, 0.985)) - e_ck
    if sl_eye is not None:                                 # eye surrounds slightly darker
        sub = alb[:, sl_eye[0], sl_eye[1]]
        sub *= _F32(1.0) - e_eye * _F32(0.10)
    _over(A, alb, m_face)
    # Specular sheen (oilier in the T-zone is implied by the normal field).
    for _ in range(4):
        h *= h                                             # ^16
    h *= _F32(0.07 * c.nu.light_intensity)
    _over(c.S, s, m_face)
    _over(c.P, h, m_face)


def _eyes(c: _Canvas, geo: _Geo, idn: FaceIdentity) -> None:
    """Almond eye openings with sclera, iris, pupil, lid shadow, lash line, crease and catchlight."""
    es, ye, ew = geo.es, geo.ye, geo.ew
    sl = c.box(-es - 1.4 * ew, es + 1.4 * ew, ye - 1.2 * ew, ye + 0.9 * ew)
    if sl is None:
        return
    aa = c.aa
    fx, fy, sgn = c.fx[sl], c.fy[sl], c.sgn[sl]
    ex = fx - sgn * _F32(es)                      # local x (not mirrored)
    mx = ex * sgn                                 # mirrored: + towards the outer corner
    ey = fy - _F32(ye)
    ey -= mx * _F32(0.12)                         # slight canthal tilt (outer corner higher)
    u = ex * _F32(1.0 / ew)
    prof = _F32(1.0) - u * u
    op = c.nu.eye_openness
    eh_up = ew * (0.08 + 0.44 * op)
    eh_lo = ew * (0.26 + 0.06 * op)
    yup = prof * _F32(-eh_up)
    ylo = prof * _F32(eh_lo)
    d_eye = np.maximum(yup - ey, ey - ylo)
    m_eye = _ramp(d_eye, aa * 0.9)

    A, S, P = c.A[:, sl[0], sl[1]], c.S[sl], c.P[sl]
    # Sclera: off-white, darker at the corners and under the upper lid.
    lid = (ey - yup) * _F32(1.0 / (0.9 * eh_up + 1e-4))
    _clip(lid, _F32(0), _F32(1), out=lid)
    lid *= _F32(0.55)
    lid += _F32(0.45)
    sh = prof * _F32(0.3)
    sh += _F32(0.7)
    lid *= sh
    white = _lin((0.76, 0.72, 0.68)) * lid
    _over(A, white, m_eye)
    P *= _F32(1.0) - m_eye
    # Iris (limbal ring darker) and pupil, clipped by the lids.
    ri = 0.48 * ew
    iy = ey - _F32(0.1 * ri)
    rr = np.sqrt(ex * ex + iy * iy)
    q = rr * _F32(1.0 / ri)
    m_iris = _ramp(rr - _F32(ri), aa * 0.9)
    m_iris *= m_eye
    ring = _F32(1.25) - q * q * _F32(0.7)
    ring *= lid
    _over(A, _lin(idn.iris) * ring, m_iris)
    rp = ri * (0.5 - 0.12 * c.nu.light_intensity)
    m_pup = _ramp(rr - _F32(rp), aa * 0.9)
    m_pup *= m_eye
    _over(A, _lin((0.03, 0.025, 0.025)), m_pup)
    # Catchlight: small reflection of the light source, offset towards it.
    lx, ly, _ = c.L
    hx = ex - _F32(0.45 * ri * lx)
    hy = iy - _F32(0.45 * ri * ly)
    hl = np.sqrt(hx * hx + hy * hy)
    m_hl = _ramp(hl - _F32(0.22 * ri), aa * 0.9)
    m_hl *= m_iris
    _over(P, _F32(0.5 * c.nu.light_intensity), m_hl)
    # Lash line along the upper lid (thicker outwards) and a soft lower-lid line.
    inside = _ramp(np.abs(u) - _F32(1.03), 0.08)
    lw = mx * _F32(0.05) + _F32(0.09 * ew + 0.0015)
    m_lash = _ramp(np.abs(ey - yup + _F32(0.002)) - lw, aa * 0.9)
    m_lash *= inside
    m_lash *= _F32(0.88)
    _over(A, _lin((0.07, 0.05, 0.045)), m_lash)
    m_lo = _ramp(np.abs(ey - ylo) - _F32(0.0015), aa * 1.2)
    m_lo *= inside
    S *= _F32(1.0) - m_lo * _F32(0.25)
    # Upper-lid crease: a soft shading line above the lid.
    m_cr = _ramp(np.abs(ey - yup + _F32(0.45 * eh_up + 0.006)) - _F32(0.002), aa * 1.5 + 0.003)
    m_cr *= inside
    S *= _F32(1.0) - m_cr * _F32(0.18)


def _brows(c: _Canvas, geo: _Geo, idn: FaceIdentity, st: _Style) -> None:
    """Arched, tapering brows with a horizontal hair texture, coloured like (darker) hair."""
    es, ew, yb = geo.es, geo.ew, geo.yb
    bl = 1.3 * ew + 0.01                              # half length
    bc = es + 0.008
    sl = c.box(-bc - bl - 0.01, bc + bl + 0.01, yb - 0.05, yb + 0.04)
    if sl is None:
        return
    fy = c.fy[sl]
    t = c.afx[sl] - _F32(bc)
    t *= _F32(1.0 / bl)                               # -1 inner end .. +1 outer end
    line = t * t - _F32(1.0)
    line *= _F32(0.012)                                # arch
    line -= t * _F32(0.014 * geo.bang)                 # angle
    line += _F32(yb)
    th = t * _F32(-0.4 * geo.bth)
    th += _F32(geo.bth)                                # thicker at the inner end
    d = np.abs(fy - line) - th
    np.maximum(d, (np.abs(t) - _F32(1.0)) * _F32(bl), out=d)
    m = _ramp(d, c.aa + 0.004)
    k = 3.0 * c.size
    tex = _tex("strands", t * _F32(k * bl) + _F32(st.off[3]), fy * _F32(k) + _F32(st.off[4]))
    tex *= _F32(1.1)
    tex += _F32(0.25)
    m *= tex
    _clip(m, _F32(0), _F32(0.92), out=m)
    col = np.asarray(idn.hair) * 0.75 + 0.05
    _over(c.A[:, sl[0], sl[1]], _lin(col), m)


def _nose_mouth(c: _Canvas, geo: _Geo, idn: FaceIdentity) -> np.ndarray:
    """Nostrils and lips (with mouth line and an open smile showing teeth).

    Returns the full-frame lips coverage (for keeping the lips visible through a beard).
    """
    lips = np.zeros_like(c.S)
    aa = c.aa
    nw, yn = geo.nw, geo.yn
    sl = c.box(-nw * 1.2, nw * 1.2, yn - 0.02, yn + 0.02)
    if sl is not None:                                 # nostrils: soft dark ellipses
        dx = c.afx[sl] - _F32(0.52 * nw)
        dx *= _F32(1.0 / (0.38 * nw))
        dy = c.fy[sl] - _F32(yn + 0.001)
        dy *= _F32(1.0 / 0.0075)
        d = np.sqrt(dx * dx + dy * dy)
        d -= _F32(1.0)
        m = _ramp(d * _F32(0.008), aa + 0.004)
        c.S[sl] *= _F32(1.0) - m * _F32(0.6)

    mw, ym, lt = geo.mw, geo.ym, geo.lt
    smile = c.nu.mouth_curve
    sl = c.box(-mw * 1.15, mw * 1.15, ym - 3 * lt - 0.03, ym + 3 * lt + 0.03)
    if sl is None:
        return lips
    fx, fy = c.fx[sl], c.fy[sl]
    um = fx * _F32(1.0 / mw)
    u2 = um * um
    prof = _F32(1.0) - u2
    np.maximum(prof, _F32(0.0), out=prof)
    sp = np.sqrt(prof)
    ymx = u2 * _F32(-0.022 * smile)
    ymx += _F32(ym + 0.006 * smile)                    # mouth line: corners up when smiling
    bow = np.exp(u2 * _F32(-30.0))                     # cupid's bow dip at the centre
    top = ymx - sp * (_F32(lt) - bow * _F32(0.3 * lt))
    opening = max(smile - 0.55, 0.0) * 0.03            # strong smiles part the lips
    bot = ymx + sp * _F32(1.35 * lt + opening)
    d = np.maximum(top - fy, fy - bot)
    m_lips = _ramp(d, aa + 0.0015)
    lips[sl] = m_lips
    A = c.A[:, sl[0], sl[1]]
    lower = _ramp(ymx - fy, aa)                        # 1 on the lower lip
    lipcol = _lin(idn.lips) * (lower * _F32(0.12) + _F32(0.95))
    _over(A, lipcol, m_lips)
    c.P[sl] += m_lips * lower * c.P[sl] * _F32(1.5)   # moist lower lip
    # Mouth line / opening: dark, or teeth when open.
    half = 0.0012 + 0.5 * opening
    m_line = _ramp(np.abs(fy - ymx - _F32(0.5 * opening)) - sp * _F32(half), aa * 0.9)
    m_line *= _clip(prof * _F32(6.0), _F32(0), _F32(1))
    if opening > 0:
        teeth = _lin((0.85, 0.82, 0.74)) * (_F32(0.35) + prof * _F32(0.65))
        _over(A, teeth, m_line)
        m_gap = _ramp(np.abs(fy - ymx - _F32(opening * 0.85)) - _F32(0.001), aa)
        m_gap *= m_line
        _over(A, _lin(idn.lips) * _F32(0.2), m_gap)
    else:
        _over(A, _lin(idn.lips) * _F32(0.2), m_line * _F32(0.85))
    # Soft shadow in the mouth corners.
    cx = np.abs(um) - _F32(1.0)
    cx *= _F32(mw / 0.01)
    cy = (fy - ymx) * _F32(1.0 / 0.01)
    e = np.exp(-(cx * cx + cy * cy))
    c.S[sl] *= _F32(1.0) - e * _F32(0.25)
    return lips


def _facial_hair(c: _Canvas, geo: _Geo, idn: FaceIdentity, st: _Style, d_face: np.ndarray,
                 lips: np.ndarray) -> None:
    """Moustache, beard or goatee as textured hair regions (lips stay visible)."""
    kind = idn.facial_hair
    if kind == "none":
        return
    W, ye, yn, ym, mw, lt, ychin = geo.W, geo.ye, geo.yn, geo.ym, geo.mw, geo.lt, geo.y_chin
    if kind == "beard":
        sl = c.box(-W - 0.03, W + 0.03, geo.ye, ychin + 0.04)
    else:
        sl = c.box(-mw * 1.4, mw * 1.4, yn - 0.01, ychin + 0.035 if kind == "goatee" else ym + 0.01)
    if sl is None:
        return
    fx, fy = c.fx[sl], c.fy[sl]
    # Moustache band between nose and upper lip, drooping towards the ends.
    q = fx * _F32(1.0 / (1.2 * mw))
    q2 = q * q
    y_top_lip = ym - lt
    mid = q2 * _F32(0.014)
    mid += _F32(0.5 * (yn + y_top_lip) + 0.002)
    half = _F32(1.0) - q2 * q2
    half *= _F32(0.5 * (y_top_lip - yn) + 0.001)
    d = np.abs(fy - mid) - half
    np.maximum(d, np.abs(q) - _F32(1.0), out=d)
    if kind == "goatee":
        gx = fx * _F32(1.0 / (0.85 * mw))
        gy = (fy - _F32(0.5 * (ym + ychin) + 0.006)) * _F32(1.0 / (0.5 * (ychin - ym) + 0.018))
        dg = np.sqrt(gx * gx + gy * gy)
        dg -= _F32(1.0)
        dg *= _F32(0.04)
        np.minimum(d, dg, out=d)
    elif kind == "beard":
        top = (fx * _F32(1.0 / W)) ** 2 * _F32(-(ym - ye - 0.07))   # cheek line up to the sideburns
        top += _F32(ym - 0.02)
        db = np.maximum(top - fy, d_face[sl] - _F32(0.012) * _clip((fy - _F32(geo.yc)) * _F32(8.0),
                                                                       _F32(0), _F32(1)))
        np.minimum(d, db, out=d)
    m = _ramp(d, c.aa + 0.008)
    k = 2.0 * c.size
    tex = _tex("skin", fy * _F32(k) + _F32(st.off[5]), fx * _F32(k) + _F32(st.off[6]))
    tex *= _F32(0.22)
    tex += _F32(0.5)
    m *= tex * _F32(0.8) + _F32(0.5)
    _clip(m, _F32(0), _F32(0.92), out=m)
    m *= _F32(1.0) - lips[sl] * _F32(0.85)             # keep the lips (mostly) visible
    col = np.asarray(idn.hair) * 0.85 + 0.02
    _over(c.A[:, sl[0], sl[1]], _lin(col) * (tex * _F32(0.6) + _F32(0.6)), m)
    c.P[sl] *= _F32(1.0) - m * _F32(0.7)


# Hair styles: side / top volume (vs, vt); the silhouette's lowest y (relative to the eye line 'ye',
# the widest line 'yc', the chin or absolute); flare of the sides below yc; hairline offset from the
# identity's hairline (None = straight bangs above the brows) and its drop at the temples (curv);
# side strips covering the face: |x| > side_frac * W down to side_bottom.
_HAIR = {
    #            vs     vt     bottom          flare hl_dy  curv  side_frac side_bottom
    "buzz":      (0.006, 0.008, ("ye", -0.01), 0.0, 0.0, 0.10, 0.90, ("ye", 0.01)),
    "short":     (0.020, 0.032, ("ye", 0.0), 0.0, 0.0, 0.16, 0.86, ("ye", 0.02)),
    "side_part": (0.028, 0.045, ("ye", 0.0), 0.0, 0.02, 0.14, 0.86, ("ye", 0.02)),
    "long":      (0.030, 0.035, ("abs", 1.02), 0.12, 0.0, 0.18, 0.84, ("chin", -0.04)),
    "bob":       (0.050, 0.040, ("chin", -0.03), 0.03, None, 0.0, 0.82, ("chin", -0.06)),
    "curly":     (0.085, 0.075, ("yc", 0.12), 0.0, -0.01, 0.14, 0.86, ("ye", 0.03)),
    "ponytail":  (0.010, 0.014, ("ye", -0.02), 0.0, -0.012, 0.18, 0.90, ("ye", 0.0)),
}


def _hair(c: _Canvas, geo: _Geo, idn: FaceIdentity, st: _Style):
    """Hair silhouette (drawn behind the face) and the part covering the face (drawn in front).

    Composites the whole silhouette immediately (the back layer) and returns what the caller needs
    to draw the front layer after the face: (slices, front coverage, albedo, shade, spec, forehead
    shadow), or None for bald heads.
    """
    style = idn.hair_style
    if style == "bald":
        return None
    vs, vt, bottom, flare, hl_dy, curv, side_frac, side_bottom = _HAIR[style]
    W, yc, ye = geo.W, geo.yc, geo.ye
    ref = {"ye": ye, "yc": yc, "chin": geo.y_chin, "abs": 0.0}
    y_bot = ref[bottom[0]] + bottom[1]
    y_sb = ref[side_bottom[0]] + side_bottom[1]
    Wh, Hh = W + vs, geo.Hu + vt
    x_ext = Wh + flare * max(y_bot - yc, 0.0) + 0.03
    if style == "ponytail":
        x_ext = max(x_ext, W * 0.55 + 0.2)
    sl = c.box(-x_ext, x_ext, yc - Hh - 0.03, max(y_bot, 1.1 if style == "ponytail" else 0.0) + 0.03)
    if sl is None:
        return None
    aa = c.aa
    fx, fy = c.fx[sl], c.fy[sl]
    ax = np.abs(fx)

    # Strand texture flowing from a crown / parting point (identity-seeded offsets).
    top = yc - geo.Hu
    if style == "side_part":
        px, py = st.side * 0.35 * W, top - 0.25
    elif style == "ponytail":                             # pulled back: strands converge behind
        px, py = 0.0, yc + 0.12
    else:
        px, py = 0.0, top - 0.22
    dx = fx - _F32(px)
    dy = fy - _F32(py)
    theta = np.arctan2(dx, dy)
    if style == "ponytail":                               # the tail hangs straight down
        theta = np.where(fy > _F32(yc + 0.08), dx * _F32(3.0), theta)
    rho = np.sqrt(dx * dx + dy * dy)
    if style == "curly":
        k = 1.4 * c.size
        tex = _tex("curls", fy * _F32(k) + _F32(st.off[5]), fx * _F32(k) + _F32(st.off[6]))
    else:                                                 # fine strands + coarser clumps
        ka, kx = 0.7 * c.size, 1.4 * c.size * (yc - py)
        tex = _tex("strands", rho * _F32(ka) + _F32(st.off[5]), theta * _F32(kx) + _F32(st.off[6]))
        tex *= _F32(0.65)
        tex += _F32(0.35) * _tex("strands", rho * _F32(0.5 * ka) + _F32(st.off[1]),
                                 theta * _F32(0.25 * kx) + _F32(st.off[2]))

    # Silhouette: ellipse cap with vertical (optionally flaring) walls below the widest line.
    dyc = fy - _F32(yc)
    below = np.maximum(dyc, _F32(0.0))
    np.minimum(dyc, _F32(0.0), out=dyc)
    wx = _F32(y_bot) - fy
    wx *= _F32(1.0 / 0.09)
    _clip(wx, _F32(0.0), _F32(1.0), out=wx)
    wx *= _F32(vs)                                        # side volume tapers off at the bottom
    wx += below * _F32(flare)
    wx += _F32(W)
    qx = fx / wx
    qy = dyc * _F32(1.0 / Hh)
    rc2 = qx * qx + qy * qy
    rc = np.sqrt(rc2)
    d_sil = (rc - _F32(1.0)) * _F32(Wh)
    if style == "curly":                                  # bumpy afro outline
        d_sil -= np.sin(theta * _F32(9.0) + _F32(st.off[7])) * _F32(0.012)
    d_sil += (tex - _F32(0.5)) * _F32(0.012)              # wispy edge
    hem = fy - _F32(y_bot)
    if style in ("long", "bob"):
        hem -= np.sin(fx * _F32(45.0) + _F32(st.off[7])) * _F32(0.01)
    np.maximum(d_sil, hem, out=d_sil)
    if style == "ponytail":                               # tail over one shoulder
        xt = (fy - _F32(0.55)) * _F32(0.25 * st.side)
        xt += _F32(st.side * W * 0.62)
        d_tail = np.abs(fx - xt) - (_F32(0.065) - (fy - _F32(0.55)) * _F32(0.06))
        np.maximum(d_tail, _F32(yc + 0.02) - fy, out=d_tail)
        np.maximum(d_tail, fy - _F32(1.12), out=d_tail)
        np.minimum(d_sil, d_tail, out=d_sil)
    m_sil = _ramp(d_sil, aa * 1.2 + 0.002)

    # Albedo with strands; shading from the hair volume (cylinder below the cap).
    zr = _F32(1.0) - np.minimum(rc2, _F32(0.92))
    np.sqrt(zr, out=zr)
    np.divide(_F32(0.9), zr, out=zr)
    nx = qx * zr
    ny = qy * zr
    nx += (tex - _F32(0.5)) * _F32(0.6)
    s, h = c.shade(nx, ny, wrap=0.3)
    alb = _lin(idn.hair) * (tex * _F32(1.1) + _F32(0.45))
    h *= h
    h *= h
    h *= h
    h *= tex
    h *= _F32(0.16 * c.nu.light_intensity)
    # Back layer (behind the face): slightly occluded.
    A, S, P = c.A[:, sl[0], sl[1]], c.S[sl], c.P[sl]
    _over(A, alb, m_sil)
    _over(S, s * _F32(0.8), m_sil)
    _over(P, h, m_sil)

    # Front coverage: above the hairline, or in side strips (temples, sideburns, framing locks).
    if hl_dy is None:                                     # bob: straight bangs above the brows
        hl = np.sin(fx * _F32(70.0) + _F32(st.off[0])) * _F32(0.005)
        hl += _F32(geo.yb - 0.022)
    else:
        hl = (fx * _F32(1.0 / W)) ** 2
        hl *= hl
        hl *= _F32(curv)
        hl += _F32(geo.yh + hl_dy)
        if style == "side_part":                          # swept fringe, lower away from the part
            sw = (fx - _F32(px)) * _F32(-st.side / W)
            _clip(sw, _F32(0), _F32(1), out=sw)
            hl += sw * _F32(0.07)
    hl += (tex - _F32(0.5)) * _F32(0.02)
    cover = _ramp(fy - hl, aa * 1.3 + 0.004)
    side = np.maximum(_F32(side_frac * W) - ax, fy - _F32(y_sb))
    np.maximum(cover, _ramp(side, aa * 1.5), out=cover)
    m_front = m_sil * cover
    # Soft shadow of the hair on the skin below the hairline.
    shadow = _ramp(fy - hl - _F32(0.012), 0.035)
    shadow *= _F32(0.3)
    return sl, m_front, alb, s, h, shadow


def _glasses(c: _Canvas, geo: _Geo, idn: FaceIdentity, st: _Style) -> None:
    """Round or square frames (rims, bridge, temple arms), a faint lens sheen and frame shadow."""
    kind = idn.glasses
    if kind == "none":
        return
    es, ye, ew, W = geo.es, geo.ye, geo.ew, geo.W
    rg = ew * 1.5 + 0.012                              # lens half width
    rgy = rg * (1.0 if kind == "round" else 0.78)
    sl = c.box(-W - 0.03, W + 0.03, ye - rgy - 0.02, ye + rgy + 0.02)
    if sl is None:
        return
    aa = c.aa
    ft = (0.0035 if st.metal else 0.0055) + 0.2 * aa          # frame half thickness
    fx, fy, sgn = c.fx[sl], c.fy[sl], c.sgn[sl]
    gx = fx - sgn * _F32(es)
    gy = fy - _F32(ye + 0.004)
    lx, ly, lz = c.L
    off = 0.012 / max(lz, 0.3)
    sxo, syo = _F32(-lx * off), _F32(-ly * off)     # shadow offset on the skin, away from the light

    def rim(px, py):
        """Signed distance to the lens outline."""
        if kind == "round":
            return np.sqrt(px * px + py * py) - _F32(rg)
        rr = 0.35 * rgy
        qx = np.abs(px) - _F32(rg - rr)
        qy = np.abs(py) - _F32(rgy - rr)
        out = np.sqrt(np.maximum(qx, _F32(0)) ** 2 + np.maximum(qy, _F32(0)) ** 2)
        out += np.minimum(np.maximum(qx, qy), _F32(0))
        out -= _F32(rr)
        return out

    d_rim = rim(gx, gy)
    lens = _ramp(d_rim, aa)
    d = np.abs(d_rim) - _F32(ft)
    # Bridge between the lenses and temple arms from the outer rims to the face sides.
    ax = np.abs(fx)
    yb = ye - 0.25 * rgy
    d_br = np.maximum(ax - _F32(es - rg + ft), np.abs(fy - _F32(yb)) - _F32(ft * 0.9))
    d_tp = np.maximum(np.abs(fy - _F32(ye - 0.35 * rgy)) - _F32(ft * 0.8), _F32(es + rg - ft) - ax)
    np.maximum(d_tp, ax - _F32(W + 0.015), out=d_tp)
    np.minimum(d, d_br, out=d)
    np.minimum(d, d_tp, out=d)
    m = _ramp(d, aa)
    # Shadow of the rim on the skin (offset away from the light), then lens sheen, then the frame.
    d_sh = np.abs(rim(gx + sxo, gy + syo)) - _F32(ft * 1.3)
    c.S[sl] *= _F32(1.0) - _ramp(d_sh, aa + 0.006) * _F32(0.25)
    sheen = (gx - gy) * _F32(1.0 / rg)
    sheen += _F32(1.2)
    sheen *= lens
    c.P[sl] += sheen * _F32(0.015)
    _over(c.A[:, sl[0], sl[1]], _lin(st.frame), m)
    if st.metal:
        c.P[sl] += m * _F32(0.12)


def _camera(c: _Canvas) -> np.ndarray:
    """Light colour, exposure, gamma, vignette, blur and sensor noise -> uint8 (H, W, 3)."""
    nu, g = c.nu, c.grid
    t = nu.colour_temperature
    light = np.array([1.0 + 0.10 * t, 1.0, 1.0 - 0.10 * t], np.float32).reshape(3, 1, 1)
    S = c.S
    S *= g.vignette
    img = c.A * S
    # Light that scatters under the skin leaves shadows warmer: boost red, cut blue where S is low.
    dark = _F32(1.0) - S
    np.maximum(dark, _F32(0.0), out=dark)
    img[0] *= dark * _F32(0.12) + _F32(1.0)
    img[2] *= dark * _F32(-0.08) + _F32(1.0)
    img += c.P
    img *= light
    _clip(img, _F32(0), _F32(1), out=img)
    np.sqrt(img, out=img)
    img *= _F32(255.0)
    size = c.size
    rad = nu.blur_radius * size / 64.0
    if rad > 0.05:
        u8 = np.ascontiguousarray(img.transpose(1, 2, 0)).astype(np.uint8)   # truncation ok pre-blur
        u8 = Image.fromarray(u8).filter(ImageFilter.GaussianBlur(rad))
        img = np.asarray(u8, dtype=np.float32).transpose(2, 0, 1)
        img = img + _F32(0.5)
    else:
        img += _F32(0.5)
    if nu.noise_sigma > 0:
        rng = np.random.default_rng([_TAG_BG, nu.bg_seed, 1])
        oy, ox = rng.integers(0, size, 2)
        noise = g.noise[:, oy:oy + size, ox:ox + size]
        img = img + noise * _F32(255.0 * nu.noise_sigma)
    _clip(img, _F32(0), _F32(255), out=img)
    return np.ascontiguousarray(img.transpose(1, 2, 0)).astype(np.uint8)


# · Public rendering


def render_photo(identity: FaceIdentity, nuisance: FaceNuisance, size: int = 64) -> np.ndarray:
    """Render one face photo as a uint8 (size, size, 3) RGB array (deterministic).

    Designed for sizes 64..152 (any int; 32..512 accepted).  The face is framed like a dlib face chip
    (padding 0.25, eyes at ~0.38 of the height) before the nuisance's similarity transform.
    """
    size = int(size)
    if not 32 <= size <= 512:
        raise ValueError(f"size must be in 32..512, got {size}")
    idn, geo, st = identity, face_geometry(identity), _style(identity.tex_seed)
    c = _Canvas(size, nuisance)
    skin = _lin(idn.skin)

    _background(c)
    _body(c, geo, st)
    front = _hair(c, geo, idn, st)
    r2, d_face, m_face = _outline(c, geo)
    _neck(c, geo, skin, d_face)
    _ears(c, geo, skin)
    _head(c, geo, st, skin, r2, m_face)
    if front is not None:                              # hair shadow on the forehead
        sl, shadow = front[0], front[5]
        c.S[sl] *= _F32(1.0) - shadow * m_face[sl]
    _eyes(c, geo, idn)
    _brows(c, geo, idn, st)
    lips = _nose_mouth(c, geo, idn)
    _facial_hair(c, geo, idn, st, d_face, lips)
    if front is not None:                              # hair in front of the face
        sl, m, alb, s, h, _ = front
        _over(c.A[:, sl[0], sl[1]], alb, m)
        _over(c.S[sl], s, m)
        _over(c.P[sl], h, m)
    _glasses(c, geo, idn, st)
    return _camera(c)


def render_sheet(seed: int = 0, n_identities: int = 8, n_nuisances: int = 6, size: int = 96) -> np.ndarray:
    """Contact sheet (uint8 RGB): a row per identity, a column per sampled nuisance, 2-px white gaps."""
    gap = 2
    h = n_identities * size + (n_identities + 1) * gap
    w = n_nuisances * size + (n_nuisances + 1) * gap
    sheet = np.full((h, w, 3), 255, np.uint8)
    for i in range(n_identities):
        idn = sample_identity(seed, i)
        for j in range(n_nuisances):
            y, x = gap + i * (size + gap), gap + j * (size + gap)
            sheet[y:y + size, x:x + size] = render_photo(idn, sample_nuisance(seed, i, j), size)
    return sheet


# Splits of the synthetic world, and rendered data sets cached on disk -----------------------------------------

# Each split is its own range of identity indices, so no identity is in two splits (TOS §4.2: f "was trained on a
# labelled set that does not intersect s"; the evaluation's probes and distractors are unseen by every training step).
FACE_SPLITS = {
    "f": 0,            # labelled photos that train the synthetic f (DeepFace's role)
    "f_val": 1,        # held-out identities: f's verification accuracy, and its threshold
    "s": 2,            # the unlabelled source domain s of the GAN
    "eval": 3,         # evaluation probes: at least two photos each (x and x')
    "distractors": 4,  # the retrieval gallery's distractors s'
    "descriptor": 5,   # trains eval_retrieval's independent descriptor (never f)
    "val": 6,          # validation identities: choosing hyperparameters and schedules, never reported as results
    "pairs": 7,        # crossmodal_avatar's paired identities (photos with their ground-truth avatars)
}
SPLIT_STRIDE = 10_000_000  # identities per split: index = FACE_SPLITS[split] * SPLIT_STRIDE + i


def split_identity_indices(split: str, n: int) -> np.ndarray:
    """The first ``n`` identity indices of ``split`` (see FACE_SPLITS)."""
    require(split in FACE_SPLITS, f"unknown face split {split!r}; one of {', '.join(FACE_SPLITS)}")
    require(0 < n <= SPLIT_STRIDE, f"a split holds 1 to {SPLIT_STRIDE} identities, not {n}")
    return FACE_SPLITS[split] * SPLIT_STRIDE + np.arange(n, dtype=np.int64)


def cache_dir(path: str | Path | None = None) -> Path:
    """Where rendered data sets and trained face networks are cached: ``path``, else $AVATAR_REPRO_CACHE, else
    ~/.cache/avatar-repro. Deleting it is always safe: everything in it is rebuilt on demand."""
    root = Path(path or os.environ.get("AVATAR_REPRO_CACHE") or Path.home() / ".cache" / "avatar-repro")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _render_chunk(job):
    world_seed, ids, per_identity, size = job
    out = np.empty((len(ids) * per_identity, size, size, 3), np.uint8)
    k = 0
    for index in ids:
        identity = sample_identity(world_seed, int(index))
        for j in range(per_identity):
            out[k] = render_photo(identity, sample_nuisance(world_seed, int(index), j), size)
            k += 1
    return out


def render_faces(identity_indices: np.ndarray, per_identity: int, size: int, world_seed: int = 0,
                 workers: int | None = None, progress: bool = True,
                 desc: str = "render face photos") -> tuple[torch.Tensor, torch.Tensor]:
    """Photos of the given identities, ``per_identity`` each (nuisances 0..per_identity-1), as a uint8 tensor
    (N, 3, size, size) and the identity index of each image (N,). Rendered by ``workers`` processes (default: every
    core); the result does not depend on their number."""
    from concurrent.futures import ProcessPoolExecutor
    workers = workers or os.cpu_count() or 1
    ids = np.asarray(identity_indices, np.int64)
    chunks = [ids[i:i + 64] for i in range(0, len(ids), 64)]
    jobs = [(world_seed, c, per_identity, size) for c in chunks]
    n = len(ids) * per_identity
    bar = common.progress(desc=f"{desc}: {n:,} at {size} px", total=n, unit="img") if progress else tqdm(disable=True)
    parts = []
    if workers == 1 or len(chunks) == 1:
        for job in jobs:
            parts.append(_render_chunk(job))
            bar.update(len(parts[-1]))
    else:
        import multiprocessing as mp
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for part in pool.map(_render_chunk, jobs):
                parts.append(part)
                bar.update(len(part))
    bar.close()
    images = torch.from_numpy(np.concatenate(parts)).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(np.repeat(ids, per_identity))


def synthetic_faces(split: str, n_identities: int, per_identity: int, size: int = 64, world_seed: int = 0,
                    cache: str | Path | None = None, workers: int | None = None) -> dict:
    """A split of the synthetic world, rendered once and then read from the cache: ``{"images": uint8 (N, 3, size,
    size), "identity": int64 (N,), "source": str}``. Images of identity i are its nuisances 0..per_identity-1."""
    require(64 <= size <= 152, f"synthetic faces render at 64 to 152 px, not {size}")
    require(per_identity >= 1, f"per_identity must be at least 1, not {per_identity}")
    name = f"faces_v{FACE_WORLD_VERSION}_{split}_w{world_seed}_{n_identities}x{per_identity}_{size}px.pt"
    path = cache_dir(cache) / name
    source = f"synthetic face world v{FACE_WORLD_VERSION} (seed {world_seed}), split {split}: " \
             f"{n_identities} identities x {per_identity} photos at {size} px"
    if path.is_file():
        try:
            data = torch.load(path, weights_only=True)
            return {**data, "source": source}
        except Exception:  # a damaged cache file is rebuilt
            print(f"cache: {path} is unreadable; rendering it again")
    images, identity = render_faces(split_identity_indices(split, n_identities), per_identity, size, world_seed,
                                    workers, desc=f"render the face world's {split} split once (then cached)")
    atomic_write(path, lambda tmp: torch.save({"images": images, "identity": identity}, tmp))
    return {"images": images, "identity": identity, "source": source}


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) in [0, 255] to float in [-1, 1], the project's image convention."""
    return images.float().div(127.5).sub(1.0)


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float images (N, C, H, W) to (N, C, size, size): bilinear, antialiased when shrinking; as they are when
    they already have that size. Differentiable, so a loss through a face network reaches the generator."""
    if x.shape[-2:] == (size, size):
        return x
    shrink = x.shape[-2] > size or x.shape[-1] > size
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


# Real faces: CelebA through torchvision, and a folder of aligned face crops -------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CELEBA_HINT = ("CelebA's Google Drive download often fails: download img_align_celeba.zip, identity_CelebA.txt, "
               "list_attr_celeba.txt, list_bbox_celeba.txt, list_landmarks_align_celeba.txt and "
               "list_eval_partition.txt by hand from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html into "
               "{root}/celeba/, unzip the images there, and run again")


def _square_resize(img, size: int, crop: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """A PIL image to a uint8 (3, size, size) array: optionally cropped to ``crop`` (left, top, right, bottom),
    else centre-cropped to a square, then resized with a Lanczos filter."""
    img = img.convert("RGB")
    if crop is None:
        w, h = img.size
        side = min(w, h)
        crop = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    img = img.crop(crop).resize((size, size), Image.LANCZOS)
    return np.asarray(img, np.uint8).transpose(2, 0, 1)


# CelebA's aligned images (178x218) put the eyes at about (69, 111) and (108, 111) on average (its landmark file).
# dlib's 150x150 chip (get_face_chip, padding 0.25) puts them at (47.4, 46.5) and (99.6, 46.5): dlib's 5-point model,
# averaged over 297 of the shared validation chips. Matching the eyes gives this 112-px square, which frames a CelebA
# face about as the dlib f expects (scale 52.2 / 39 = 1.34; left = 88.5 - 73.5 / 1.34; top = 111 - 46.5 / 1.34).
CELEBA_CHIP_BOX = (34, 76, 146, 188)


def load_celeba(root: str, split: str, size: int, download: bool, limit: int | None = None) -> dict:
    """CelebA through torchvision (aligned images, ``target_type='identity'``), cropped to a dlib-like chip and
    resized to ``size``: ``{"images", "identity", "source"}``. ``split`` is train, valid, test or all. A failed
    download raises a UsageError with the hint of where to put the files by hand."""
    from torchvision.datasets import CelebA
    try:
        ds = CelebA(root, split=split, target_type="identity", download=download)
    except Exception as exc:
        how = "could not be downloaded" if download else "--download is off"
        raise UsageError(f"CelebA is not in {root} and {how} ({type(exc).__name__}): "
                         + CELEBA_HINT.format(root=root)) from None
    n = len(ds) if limit is None else min(limit, len(ds))
    images = np.empty((n, 3, size, size), np.uint8)
    for i in tqdm(range(n), desc="CelebA", unit="img", disable=None):
        img, _ = ds[i]
        images[i] = _square_resize(img, size, CELEBA_CHIP_BOX)
    identity = ds.identity[:n, 0].long()
    return {"images": torch.from_numpy(images), "identity": identity,
            "source": f"CelebA {split} ({n} aligned images, {root})"}


def load_face_folder(path: str, size: int, limit: int | None = None) -> dict:
    """A folder of aligned face crops, in one of three layouts: one sub-folder per identity (LFW, FaceScrub, one's
    own photos); an ``identity.txt`` of lines ``file identity`` (CelebA's), the files beside it or in ``img/``; or
    just images, each its own identity. Non-square images are centre-cropped. Returns ``{"images",
    "identity", "names", "files", "source"}``; ``names[identity]`` is the sub-folder's name. Bad input is a one-line
    UsageError."""
    root = Path(path)
    require(root.is_dir(), f"--faces-dir: {root} is not a folder")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if (root / "identity.txt").is_file():  # CelebA's layout: lines "file identity", images in root or root/img
        by_id: dict[str, list[Path]] = {}
        for n, line in enumerate((root / "identity.txt").read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            require(len(parts) == 2, f"--faces-dir: {root / 'identity.txt'} line {n}: expected 'file identity'")
            f = root / parts[0] if (root / parts[0]).is_file() else root / "img" / parts[0]
            by_id.setdefault(parts[1], []).append(f)
        groups = sorted(by_id.items(), key=lambda kv: (len(kv[0]), kv[0]))
    elif subdirs:
        groups = [(d.name, sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)) for d in subdirs]
        groups = [(name, files) for name, files in groups if files]
    else:
        files = sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        groups = [(f.stem, [f]) for f in files]
    require(groups, f"--faces-dir: no images ({', '.join(IMAGE_SUFFIXES)}) in {root} or its sub-folders")
    items = [(k, f) for k, (_, files) in enumerate(groups) for f in files][:limit]
    images = np.empty((len(items), 3, size, size), np.uint8)
    for i, (_, f) in enumerate(items):
        try:
            with Image.open(f) as img:
                images[i] = _square_resize(img, size)
        except Exception as exc:
            raise UsageError(f"--faces-dir: cannot read {f} ({type(exc).__name__}: {exc})") from None
    identity = torch.tensor([k for k, _ in items], dtype=torch.long)
    return {"images": torch.from_numpy(images), "identity": identity, "names": [name for name, _ in groups],
            "files": [str(f) for _, f in items],
            "source": f"face folder {root} ({len(items)} images, {len(groups)} identities)"}


