"""The emoji engine of tos_emoji.py (TOS §4.2): one-hot switch groups -> a flat cartoon emoji, and the exact
ground-truth configuration of a synthetic identity; the experiment's data (face photos, f, the engine's sets); and
the scoring of configurations against the ground truth."""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw

import common
from common import require
from worlds import face_nets, faces


# ======================================================================================================================
# The emoji engine (TOS §4.2): configuration switches -> a flat cartoon emoji; and the ground truth of a face
# ======================================================================================================================
# A parametric emoji engine: one-hot switch groups -> flat cartoon avatar (TOS §4.2 stand-in).
#
# The paper's emoji engine (bitmoji.com) is private: an 813-D binary vector of one-hot switch groups
# mapped to a cartoon face.  This section is our own, smaller engine for the synthetic face world of
# worlds/faces.py: 11 ordered switch groups (EMOJI_GROUPS, 61 switches in all), a PIL renderer
# of flat cartoon heads in the same framing as the world's photos (face centred, eyes at ~0.38 of the
# height), and the "manually created emoji" of a synthetic identity made exact (ground_truth_config).
#
# Rendering: every part is a set of precomputed PIL draw operations (cached per category and canvas
# size) drawn at 2x-4x supersampling with flat colours and bold dark outlines, then box-downsampled
# (``Image.reduce``), so a render is a few dozen C-level fills: ~1-2 ms at 64 px on one core.

# · Switch groups

#: Ordered one-hot switch groups (the configuration vector is their concatenation, in this order).
EMOJI_GROUPS: dict[str, tuple[str, ...]] = {
    "skin_tone": ("pale", "fair", "light", "medium", "tan", "brown", "dark", "deep"),
    "face_shape": ("narrow", "oval", "round", "square", "long"),
    "hair_style": ("bald", "buzz", "short", "side_part", "long", "bob", "curly", "ponytail"),
    "hair_colour": ("black", "dark_brown", "brown", "light_brown", "blond", "red", "grey", "white"),
    "eye_shape": ("small_close", "small_wide", "medium_close", "medium_wide", "large_close", "large_wide"),
    "iris_colour": ("dark_brown", "brown", "green", "blue", "grey"),
    "eyebrows": ("thin_sad", "thin_level", "thin_stern", "thick_sad", "thick_level", "thick_stern"),
    "nose": ("short_narrow", "short_wide", "long_narrow", "long_wide"),
    "mouth": ("narrow_thin", "narrow_full", "wide_thin", "wide_full"),
    "glasses": ("none", "round", "square"),
    "facial_hair": ("none", "moustache", "beard", "goatee"),
}


def _slices() -> dict[str, slice]:
    """Consecutive slices of the groups in the configuration vector."""
    out, i = {}, 0
    for g, cats in EMOJI_GROUPS.items():
        out[g] = slice(i, i + len(cats))
        i += len(cats)
    return out


#: Where each group lives in the configuration vector.
GROUP_SLICES: dict[str, slice] = _slices()
#: Length of a configuration vector (61).
CONFIG_DIM: int = sum(len(c) for c in EMOJI_GROUPS.values())
_GROUP_SIZES = tuple(len(c) for c in EMOJI_GROUPS.values())
_GROUP_STARTS = tuple(s.start for s in GROUP_SLICES.values())


# · Configurations


def random_configs(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random configurations, float32 (n, CONFIG_DIM): each group one-hot, uniform over its categories."""
    out = np.zeros((int(n), CONFIG_DIM), np.float32)
    rows = np.arange(int(n))
    for start, k in zip(_GROUP_STARTS, _GROUP_SIZES):
        out[rows, start + rng.integers(0, k, int(n))] = 1.0
    return out


def decode_config(scores):
    """Argmax within each group: scores (D,) or (n, D), numpy or torch -> one-hot of the same type and shape.

    numpy input gives float32; torch input keeps its device and (floating) dtype.  Ties go to the first
    category.
    """
    if isinstance(scores, torch.Tensor):
        x = scores if scores.dtype.is_floating_point else scores.float()
        out = torch.zeros_like(x)
        for start, k in zip(_GROUP_STARTS, _GROUP_SIZES):
            idx = x[..., start:start + k].argmax(dim=-1, keepdim=True) + start
            out.scatter_(-1, idx, 1.0)
        return out
    x = np.asarray(scores, dtype=np.float32)
    out = np.zeros_like(x)
    for start, k in zip(_GROUP_STARTS, _GROUP_SIZES):
        idx = x[..., start:start + k].argmax(axis=-1)[..., None] + start
        np.put_along_axis(out, idx, 1.0, axis=-1)
    return out


def _indices(row) -> tuple[int, ...]:
    """Category index of every group (argmax within the group) of one configuration row."""
    if isinstance(row, torch.Tensor):
        row = row.detach().cpu().numpy()
    row = np.asarray(row, dtype=np.float32).reshape(-1)
    if row.shape[0] != CONFIG_DIM:
        raise ValueError(f"expected a configuration of length {CONFIG_DIM}, got {row.shape[0]}")
    return tuple(int(row[s:s + k].argmax()) for s, k in zip(_GROUP_STARTS, _GROUP_SIZES))


def config_to_dict(config_row) -> dict[str, str]:
    """{group: category name} of one configuration (argmax within each group, so scores work too)."""
    return {g: EMOJI_GROUPS[g][i] for g, i in zip(EMOJI_GROUPS, _indices(config_row))}


def config_from_dict(d: dict[str, str]) -> np.ndarray:
    """Float32 one-hot configuration (CONFIG_DIM,) from {group: category name}; every group is required."""
    out = np.zeros(CONFIG_DIM, np.float32)
    for g, cats in EMOJI_GROUPS.items():
        if g not in d:
            raise KeyError(f"missing group {g!r}")
        if d[g] not in cats:
            raise ValueError(f"unknown {g} category {d[g]!r}; expected one of {cats}")
        out[GROUP_SLICES[g].start + cats.index(d[g])] = 1.0
    return out


def is_valid_config(x) -> bool:
    """True iff x ((D,) or (n, D), numpy or torch) has exactly one 1 per group and 0 everywhere else."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim not in (1, 2) or x.shape[-1] != CONFIG_DIM:
        return False
    if not np.all((x == 0) | (x == 1)):
        return False
    return all(bool(np.all(x[..., s].sum(axis=-1) == 1)) for s in GROUP_SLICES.values())


# · Colours: display palettes (what the engine draws) and ground-truth prototypes (how a person is matched)

# Skin: 8 points evenly spaced (at (k + 0.5) / 8) along common's pale..dark skin ramp; the world draws the
# ramp position uniformly, so nearest-shade matching gives ~12.5 % per shade.  Display = prototype.
_SKIN = np.array([
    (0.967, 0.835, 0.742), (0.931, 0.762, 0.646), (0.873, 0.681, 0.548), (0.793, 0.592, 0.443),
    (0.688, 0.488, 0.347), (0.574, 0.391, 0.267), (0.454, 0.301, 0.202), (0.331, 0.214, 0.146),
])
# Hair display colours (flat cartoon fills), in EMOJI_GROUPS["hair_colour"] order.
_HAIR = np.array([
    (0.11, 0.10, 0.10), (0.24, 0.15, 0.09), (0.40, 0.26, 0.15), (0.58, 0.43, 0.27),
    (0.88, 0.74, 0.45), (0.72, 0.32, 0.13), (0.58, 0.57, 0.56), (0.93, 0.92, 0.89),
])
# Hair prototypes = common's hair palette with its category; platinum is left out on purpose, so a platinum
# person goes to the nearer of blond / white; the auburn shade counts as red.
_HAIR_PROTO = (
    ("black", (0.06, 0.05, 0.05)), ("dark_brown", (0.17, 0.11, 0.07)), ("brown", (0.32, 0.21, 0.13)),
    ("light_brown", (0.50, 0.37, 0.24)), ("blond", (0.78, 0.64, 0.42)), ("red", (0.60, 0.26, 0.11)),
    ("red", (0.38, 0.15, 0.08)), ("grey", (0.56, 0.55, 0.53)), ("white", (0.87, 0.86, 0.83)),
)
# Iris display colours (a little more saturated than life, to read at 64 px).
_IRIS = np.array([
    (0.25, 0.14, 0.07), (0.52, 0.35, 0.15), (0.30, 0.56, 0.28), (0.25, 0.50, 0.86), (0.60, 0.64, 0.68),
])
# Iris prototypes = common's iris palette; hazel counts as brown.
_IRIS_PROTO = (
    ("dark_brown", (0.20, 0.11, 0.05)), ("brown", (0.37, 0.22, 0.10)), ("brown", (0.50, 0.40, 0.20)),
    ("green", (0.33, 0.47, 0.27)), ("blue", (0.33, 0.52, 0.75)), ("grey", (0.53, 0.57, 0.61)),
)
_INK = (0.13, 0.09, 0.09)             # outlines and lines
_BG = (0.86, 0.90, 0.95)              # the one fixed background colour (light grey-blue)
_SHIRT = (0.30, 0.45, 0.62)           # fixed shirt colour
_WHITE = (0.98, 0.98, 0.97)           # eye whites, highlights
_FRAME = (0.10, 0.10, 0.13)           # glasses frames


def _srgb_to_lab(rgb) -> np.ndarray:
    """sRGB in [0, 1] (..., 3) -> CIELAB (D65): matching happens in this roughly perceptual space."""
    c = np.asarray(rgb, dtype=np.float64)
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _nearest(colours: np.ndarray, protos: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Label index of the nearest prototype (Euclidean in CIELAB, i.e. CIE76 delta E) of each colour."""
    d = ((_srgb_to_lab(colours)[:, None] - _srgb_to_lab(protos)[None]) ** 2).sum(-1)
    return labels[d.argmin(1)]


def _proto_arrays(protos, group: str) -> tuple[np.ndarray, np.ndarray]:
    """(prototype colours, category index of each) for a (name, rgb) prototype list."""
    return (np.array([p[1] for p in protos]),
            np.array([EMOJI_GROUPS[group].index(p[0]) for p in protos]))


# · Ground truth: the "manual emoji" of a synthetic identity, made exact

# Bin edges of the continuous attributes (all ~ Beta(1.4, 1.4) in faces.sample_identity): terciles 0.362 / 0.638
# and median 0.5 of that distribution (exact quantiles; 5,000 sampled identities of world 0 give terciles
# 0.354..0.372 / 0.630..0.646 and medians 0.487..0.511 over the 13 attributes).
_T1, _T2, _MED = 0.362, 0.638, 0.5


def _tercile(v: np.ndarray) -> np.ndarray:
    """0 / 1 / 2 for the low / middle / high tercile."""
    return (v >= _T1).astype(int) + (v >= _T2).astype(int)


def _get(identity, name: str):
    """Attribute of a FaceIdentity or of a face_attributes dict."""
    return identity[name] if isinstance(identity, dict) else getattr(identity, name)


def ground_truth_configs(identities) -> np.ndarray:
    """Float32 (n, CONFIG_DIM) one-hot ground-truth configurations of FaceIdentity objects (or attribute dicts).

    Colours -> nearest prototype in CIELAB (skin: the 8 display shades; hair / iris: common's palettes with
    platinum left out and auburn -> red, hazel -> brown).  hair_style, glasses, facial_hair: same category.
    Continuous attributes, binned at the terciles (T) / median (M) of their distribution:
    face_shape: square if jaw_shape >= T2; else long if face_height >= T2 and face_width < T2; else narrow
    if face_width < T1; else round if face_width >= T2; else oval.  eye_shape: eye_size tercile x
    eye_spacing vs M.  eyebrows: brow_thickness vs M x brow_angle tercile.  nose: nose_length vs M x
    nose_width vs M.  mouth: mouth_width vs M x lip_thickness vs M.
    """
    ids = list(identities)
    n = len(ids)
    a = {k: np.array([_get(i, k) for i in ids], dtype=np.float64) for k in (
        "face_width", "face_height", "jaw_shape", "eye_size", "eye_spacing", "brow_thickness", "brow_angle",
        "nose_length", "nose_width", "mouth_width", "lip_thickness")}
    idx: dict[str, np.ndarray] = {}
    idx["skin_tone"] = _nearest(np.array([_get(i, "skin") for i in ids]), _SKIN, np.arange(len(_SKIN)))
    w, h, j = _tercile(a["face_width"]), _tercile(a["face_height"]), _tercile(a["jaw_shape"])
    shape = np.full(n, 1)                                               # oval
    shape[w == 2] = 2                                                   # round
    shape[w == 0] = 0                                                   # narrow
    shape[(h == 2) & (w < 2)] = 4                                       # long
    shape[j == 2] = 3                                                   # square
    idx["face_shape"] = shape
    idx["hair_style"] = np.array([EMOJI_GROUPS["hair_style"].index(_get(i, "hair_style")) for i in ids])
    idx["hair_colour"] = _nearest(np.array([_get(i, "hair") for i in ids]), *_proto_arrays(_HAIR_PROTO, "hair_colour"))
    idx["eye_shape"] = 2 * _tercile(a["eye_size"]) + (a["eye_spacing"] >= _MED)
    idx["iris_colour"] = _nearest(np.array([_get(i, "iris") for i in ids]), *_proto_arrays(_IRIS_PROTO, "iris_colour"))
    idx["eyebrows"] = 3 * (a["brow_thickness"] >= _MED) + _tercile(a["brow_angle"])
    idx["nose"] = 2 * (a["nose_length"] >= _MED) + (a["nose_width"] >= _MED)
    idx["mouth"] = 2 * (a["mouth_width"] >= _MED) + (a["lip_thickness"] >= _MED)
    for g in ("glasses", "facial_hair"):
        idx[g] = np.array([EMOJI_GROUPS[g].index(_get(i, g)) for i in ids])
    out = np.zeros((n, CONFIG_DIM), np.float32)
    rows = np.arange(n)
    for g, s in GROUP_SLICES.items():
        out[rows, s.start + np.asarray(idx[g], dtype=int)] = 1.0
    return out


def ground_truth_config(identity) -> np.ndarray:
    """Float32 one-hot (CONFIG_DIM,) ground-truth configuration of one identity (see ground_truth_configs)."""
    return ground_truth_configs([identity])[0]


# · Geometry (face units: x in [-0.5, 0.5] from the centre, y in [0, 1] from the top; as in common's photos)

_YE = 0.38                 # eye line
_YC = 0.43                 # widest line of the skull
_HU = 0.40                 # skull height above _YC (crown at y = 0.03)
_YM = 0.665                # mouth line
_LW = 0.022                # bold outline width (~1.4 px at 64)
_LF = 0.016                # feature line width

# face_shape -> (half width W, chin y, jaw 0 pointed .. 0.5 round .. 1 square), as in common's _geometry.
_FACE = {0: (0.287, 0.835, 0.15), 1: (0.312, 0.835, 0.40), 2: (0.338, 0.805, 0.50),
         3: (0.325, 0.830, 0.85), 4: (0.293, 0.878, 0.45)}
# eye_shape -> (eye half width, eye centre offset from the middle)
_EYE = {0: (0.046, 0.118), 1: (0.046, 0.158), 2: (0.056, 0.118), 3: (0.056, 0.158),
        4: (0.066, 0.118), 5: (0.066, 0.158)}
_EYE_H = 0.80              # eye half height / half width


def _ell(cx, cy, rx, ry, a0, a1, n) -> np.ndarray:
    """Points on an ellipse arc, angles a0 -> a1 (radians, 0 = right, pi/2 = down), (n, 2)."""
    t = np.linspace(a0, a1, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


@lru_cache(maxsize=None)
def _face_pts(fs: int) -> np.ndarray:
    """Closed face / skull outline (clockwise in image coordinates) for a face_shape index."""
    W, chin, j = _FACE[fs]
    jk = 1.3 - 2.6 * j if j < 0.5 else -1.0 * (j - 0.5)          # narrows (>0) / widens the jaw
    jq = 0.4 * j if j < 0.5 else 0.2 + 1.4 * (j - 0.5)            # flattens the chin
    hl = chin - _YC
    top = _ell(0.0, _YC, W, _HU, math.pi, 2 * math.pi, 40)          # left -> crown -> right
    s = np.sin(np.linspace(0.0, math.pi / 2, 24))                 # denser towards the chin
    T = s * s
    a2 = np.clip((1 - T * (jq * T + 1 - jq)) / (1 + jk * T), 0.0, None)
    x = W * np.sqrt(a2)
    y = _YC + hl * s
    right = np.stack([x, y], 1)[1:]
    left = np.stack([-x, y], 1)[::-1][1:-1]
    return np.concatenate([top, right, left])


def _face_x(fs: int, y: float) -> float:
    """Half width of the face outline at height y (below the widest line)."""
    p = _face_pts(fs)
    r = p[(p[:, 0] >= 0) & (p[:, 1] >= _YC)]
    r = r[np.argsort(r[:, 1])]
    return float(np.interp(y, r[:, 1], r[:, 0]))


def _offset(pts: np.ndarray, d: float) -> np.ndarray:
    """Polygon grown by d (mitred, mitre length capped at 2d) along its outward vertex normals."""
    p = np.asarray(pts, np.float64)
    keep = np.linalg.norm(np.roll(p, -1, 0) - p, axis=1) > 1e-9           # drop repeated vertices
    p = p[keep]
    area = np.sum(p[:, 0] * np.roll(p[:, 1], -1) - np.roll(p[:, 0], -1) * p[:, 1])
    e = np.roll(p, -1, 0) - p
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    n = np.stack([e[:, 1], -e[:, 0]], 1) * (1.0 if area > 0 else -1.0)   # outward normal of each edge
    m = n + np.roll(n, 1, 0)
    m /= np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-9)
    k = np.clip(1.0 / np.maximum((m * n).sum(1), 0.5), 1.0, 2.0)
    return p + m * (d * k)[:, None]


# Draw operations: (kind, colour role, geometry in face units, width in face units).
# kinds: poly (filled polygon), line (polyline), ell (filled ellipse bbox), ring (ellipse outline bbox),
# rrect (rounded-rectangle outline: bbox + radius).


def _outlined(pts, role: str, lw: float = _LW) -> list:
    """A filled polygon with a bold ink outline (drawn as an ink polygon grown by lw, then the fill)."""
    pts = np.asarray(pts, np.float64)
    return [("poly", "ink", _offset(pts, lw), 0.0), ("poly", role, pts, 0.0)]


def _oval(cx, cy, rx, ry, role: str, lw: float = _LW) -> list:
    """A filled ellipse with an ink outline of width lw."""
    ops = [("ell", "ink", (cx - rx - lw, cy - ry - lw, cx + rx + lw, cy + ry + lw), 0.0)] if lw > 0 else []
    return ops + [("ell", role, (cx - rx, cy - ry, cx + rx, cy + ry), 0.0)]


def _mirror(pts) -> np.ndarray:
    """Mirror points about the vertical centre line (reversing their order to keep the orientation)."""
    p = np.asarray(pts, np.float64)[::-1].copy()
    p[:, 0] *= -1
    return p


# · Parts


@lru_cache(maxsize=None)
def _part_shirt() -> list:
    """Shirt over the shoulders."""
    return _outlined(_ell(0.0, 1.26, 0.50, 0.33, math.pi, 2 * math.pi, 40).tolist() + [(0.5, 1.3), (-0.5, 1.3)],
                     "shirt")


@lru_cache(maxsize=None)
def _part_neck(fs: int) -> list:
    """Neck with a flat shadow under the jaw, and the ears (half hidden by the face)."""
    W, chin, _ = _FACE[fs]
    nk = 0.56 * W
    ops = []
    neck = np.concatenate([[(-nk, 0.55)], _ell(0.0, chin + 0.075, nk, 0.03, math.pi, 0.0, 16), [(nk, 0.55)]])
    neck[1:-1, 0] = np.clip(neck[1:-1, 0] * 1.08, -nk - 0.01, nk + 0.01)
    ops += _outlined(neck, "skin")
    shade = _face_pts(fs) + (0.0, 0.045)                          # the jaw line, lowered, clipped to the neck
    shade = shade[shade[:, 1] > _YC + 0.15]
    shade[:, 0] = np.clip(shade[:, 0], -nk + 0.002, nk - 0.002)
    ops.append(("poly", "shadow", shade, 0.0))
    for sx in (-1, 1):                                            # ears, half hidden by the face
        ops += _oval(sx * (W - 0.004), _YE + 0.075, 0.036, 0.062, "skin")
        ops.append(("ell", "shadow", (sx * (W - 0.004) - 0.015, _YE + 0.05, sx * (W - 0.004) + 0.015, _YE + 0.10),
                    0.0))
    return ops


@lru_cache(maxsize=None)
def _part_face(fs: int) -> list:
    """The face / skull."""
    return _outlined(_face_pts(fs), "skin")


def _cap(W: float, vs: float, vt: float, ysb: float, inner: float, hairline, n: int = 48,
         bumps: tuple[float, float] = (0.0, 0.0), tip: float = 0.0) -> np.ndarray:
    """Hair cap polygon: outer skull arc grown by (vs, vt) down to ysb, sideburns, then the hairline.

    hairline(x) gives the hairline's y for |x| <= inner * W; bumps = (amplitude, count) modulates the
    outer arc (tufts); tip raises the inner bottom corners (slanted lock ends).  Clockwise in image coordinates.
    """
    rx, ry = W + vs, _HU + vt
    if ysb <= _YC:
        a = math.asin((ysb - _YC) / ry)
        outer = _ell(0.0, _YC, rx, ry, math.pi - a, 2 * math.pi + a, n)
    else:
        outer = np.concatenate([[(-rx, ysb)], _ell(0.0, _YC, rx, ry, math.pi, 2 * math.pi, n), [(rx, ysb)]])
    if bumps[0] > 0:                                              # tufts: bumps on the upper arc only
        t = np.linspace(0.0, 1.0, len(outer))
        up = np.clip((_YC - outer[:, 1]) / ry, 0.0, 1.0)
        r = 1.0 + bumps[0] * np.abs(np.sin(math.pi * bumps[1] * t)) * up
        outer = np.stack([outer[:, 0] * r, _YC + (outer[:, 1] - _YC) * r], 1)
    xs = np.linspace(inner * W, -inner * W, 25)
    line = np.stack([xs, [hairline(x) for x in xs]], 1)
    return np.concatenate([outer, [(inner * W, ysb - tip)], line, [(-inner * W, ysb - tip)]])


@lru_cache(maxsize=None)
def _part_hair(style: int, fs: int) -> tuple[list, list]:
    """(back layer drawn before the neck and face, front layer drawn over the face) for a hair style."""
    W, chin, _ = _FACE[fs]
    name = EMOJI_GROUPS["hair_style"][style]
    back: list = []
    front: list = []
    if name == "bald":
        return back, front
    if name == "buzz":
        front = _outlined(_cap(W, 0.005, 0.006, _YE - 0.06, 0.95, lambda x: 0.19 + 0.07 * (x / W) ** 4), "hair")
    elif name == "short":
        def hl(x):                                                # a spiky fringe
            return 0.16 + 0.06 * (x / W) ** 4 + 0.03 * abs(math.sin(x / W * 2.5 * math.pi))
        front = _outlined(_cap(W, 0.025, 0.05, _YE - 0.02, 0.9, hl, n=72, bumps=(0.08, 8)), "hair")
    elif name == "side_part":
        px = -0.38 * W

        def hl(x):
            if x < px:                                            # short side
                return 0.14 + 0.06 * ((x - px) / (W + px)) ** 2
            u = (x - px) / (0.9 * W - px)
            return 0.13 + 0.14 * u ** 1.3                         # swept fringe, lower away from the part
        front = _outlined(_cap(W, 0.035, 0.08, _YE - 0.01, 0.9, hl), "hair")
        part = np.array([(px, 0.14), (px - 0.015, 0.07), (px - 0.035, 0.01)])
        front.append(("line", "ink", part, _LF))
    elif name == "long":
        wall = _ell(0.0, _YC, W + 0.045, _HU + 0.045, math.pi, 2 * math.pi, 40)
        back = _outlined(np.concatenate([[(-W - 0.15, 1.05)], wall, [(W + 0.15, 1.05)]]), "hair")

        def hl(x):
            return 0.115 + 0.12 * abs(x / W) ** 1.5                 # centre part
        cap = _cap(W, 0.045, 0.045, 0.78, 0.8, hl, tip=0.07)
        front = _outlined(cap, "hair")
        front.append(("line", "ink", np.array([(0.0, 0.12), (0.0, 0.04)]), _LF))
    elif name == "bob":
        wall = _ell(0.0, _YC, W + 0.06, _HU + 0.05, math.pi, 2 * math.pi, 40)
        bottom = _ell(0.0, chin - 0.06, W + 0.08, 0.03, 0.0, math.pi, 12)
        back = _outlined(np.concatenate([[(-W - 0.08, chin - 0.06)], wall, bottom]), "hair")
        front = _outlined(_cap(W, 0.06, 0.05, chin - 0.07, 0.84, lambda x: _YE - 0.125 + 0.008 * (x / W) ** 2),
                          "hair")
    elif name == "curly":
        rx, ry = W + 0.05, _HU + 0.07
        ts = np.linspace(math.pi - 0.55, 2 * math.pi + 0.55, 15)
        circles = [(rx * math.cos(t), _YC + 0.02 + ry * math.sin(t), 0.062) for t in ts]
        blob = _ell(0.0, _YC + 0.02, rx, ry, 0.0, 2 * math.pi, 48)[:-1]
        for x, y, r in circles:                                   # ink rims of the puffs, then fills
            back.append(("ell", "ink", (x - r - _LW, y - r - _LW, x + r + _LW, y + r + _LW), 0.0))
        back += _outlined(blob, "hair")
        back += [("ell", "hair", (x - r, y - r, x + r, y + r), 0.0) for x, y, r in circles]
        xs = np.linspace(-0.88 * W, 0.88 * W, 7)                  # scalloped hairline over the forehead
        curls = [(x, 0.17 + 0.09 * (x / W) ** 4, 0.045) for x in xs]
        for x, y, r in curls:
            front.append(("ell", "ink", (x - r - _LF, y - r - _LF, x + r + _LF, y + r + _LF), 0.0))
        front.append(("poly", "hair", _cap(W, 0.03, 0.04, _YE + 0.01, 0.9, lambda x: 0.17 + 0.09 * (x / W) ** 4),
                      0.0))
        front += [("ell", "hair", (x - r, y - r, x + r, y + r), 0.0) for x, y, r in curls]
    elif name == "ponytail":
        tail = np.array([(W * 0.55, 0.30), (W + 0.07, 0.42), (W + 0.11, 0.62), (W + 0.13, 0.85), (W + 0.10, 1.05),
                         (W - 0.02, 1.05), (W - 0.01, 0.80), (W - 0.04, 0.55)])
        back = _outlined(tail, "hair")
        back += _outlined([(W + 0.0, 0.44), (W + 0.08, 0.41), (W + 0.095, 0.47), (W + 0.005, 0.51)], "shirt")
        front = _outlined(_cap(W, 0.012, 0.018, _YE - 0.03, 0.93, lambda x: 0.14 + 0.07 * (x / W) ** 4), "hair")
        front += [("line", "ink", np.array([(x, 0.13 + 0.05 * abs(x) / W), (x * 1.3, 0.06)]), _LF * 0.6)
                  for x in (-0.10, 0.0, 0.10)]                    # combed-back lines
    return back, front


@lru_cache(maxsize=None)
def _part_eyes(es_i: int) -> list:
    """Two large cartoon eyes: ink rim, white, iris, pupil, highlight, heavier upper lash line."""
    ew, es = _EYE[es_i]
    eh = _EYE_H * ew
    ri = 0.80 * eh
    ops = []
    for sx in (-1, 1):
        cx = sx * es
        ops += _oval(cx, _YE, ew, eh, "white", _LF)
        ops.append(("ell", "iris", (cx - ri, _YE - ri + 0.1 * eh, cx + ri, _YE + ri + 0.1 * eh), 0.0))
        rp = 0.45 * ri
        ops.append(("ell", "ink", (cx - rp, _YE - rp + 0.1 * eh, cx + rp, _YE + rp + 0.1 * eh), 0.0))
        rh = 0.28 * ri
        hx, hy = cx + 0.35 * ri, _YE - 0.3 * ri
        ops.append(("ell", "white", (hx - rh, hy - rh, hx + rh, hy + rh), 0.0))
        lash = _ell(cx, _YE, ew + 0.3 * _LF, eh + 0.3 * _LF, math.pi * 1.05, math.pi * 1.95, 16)
        ops.append(("line", "ink", lash, _LF * 1.2))
    return ops


@lru_cache(maxsize=None)
def _part_brows(br: int, es_i: int) -> list:
    """Tapered, slightly arched brows in the hair colour; thin / thick x sad / level / stern."""
    ew, es = _EYE[es_i]
    th = (0.012, 0.032)[br // 3]
    tilt = (0.045, 0.0, -0.045)[br % 3]                           # outer end lower (sad) .. higher (stern)
    yb = _YE - _EYE_H * ew - 0.045
    ops = []
    for sx in (-1, 1):
        t = np.linspace(-1.0, 1.0, 9)                             # -1 inner end .. +1 outer end
        x = sx * (es + 0.003 + t * (ew + 0.012))
        mid = yb + 0.012 * (t * t - 1) + tilt * 0.5 * t
        half = th * (1.0 - 0.3 * t) / 2
        top, bot = np.stack([x, mid - half], 1), np.stack([x, mid + half], 1)
        ops += _outlined(np.concatenate([top, bot[::-1]]), "hair", _LF * 0.8)
    return ops


@lru_cache(maxsize=None)
def _part_nose(nz: int) -> list:
    """Nose: flat shadow along one side + an ink base curve; short / long x narrow / wide."""
    yn = (0.51, 0.58)[nz // 2]
    nw = (0.022, 0.054)[nz % 2]
    side = np.array([(-0.006, _YE + 0.05), (-nw * 0.55, yn - 0.035), (-nw * 1.05, yn - 0.003),
                     (-nw * 0.5, yn + 0.006), (-0.004, yn - 0.01)])
    t = np.linspace(math.pi * 0.85, math.pi * 0.15, 15)           # base: a shallow U from wing to wing
    base = np.stack([nw * np.cos(t) * -1, yn - 0.01 + 0.018 * np.sin(t)], 1)
    bridge = np.array([(nw * 0.35, _YE + 0.06), (nw * 0.55, yn - 0.03)])
    return [("poly", "shadow", side, 0.0), ("line", "ink", base, _LF), ("line", "ink", bridge, _LF * 0.7)]


def _lips(mo: int) -> tuple[float, float, float]:
    """(half width, upper lip, lower lip thickness) of a mouth category."""
    mw = (0.058, 0.092)[mo // 2]
    tu, tl = ((0.008, 0.012), (0.020, 0.030))[mo % 2]
    return mw, tu, tl


@lru_cache(maxsize=None)
def _part_mouth(mo: int) -> list:
    """Lips in the lip colour with an ink outline and a smiling mouth line."""
    mw, tu, tl = _lips(mo)
    x = np.linspace(-1.0, 1.0, 17)
    line = _YM - 0.012 * x * x + 0.004                            # smile: corners up
    bow = 1.0 - 0.35 * np.exp(-(x * 4) ** 2)                      # cupid's bow dip at the centre
    top = np.stack([x * mw, line - tu * np.sqrt(1 - x * x) * bow * 1.0], 1)
    bot = np.stack([x * mw, line + tl * np.sqrt(1 - x * x)], 1)[::-1]
    ops = _outlined(np.concatenate([top, bot[1:-1]]), "lips", _LF * 0.8)
    ops.append(("line", "ink", np.stack([x * mw * 0.97, line], 1), _LF * 0.8))
    return ops


def _moustache_pts(mo: int) -> np.ndarray:
    """Moustache band between the nose and the upper lip, drooping at the ends."""
    mw, tu, _ = _lips(mo)
    x = np.linspace(-1.0, 1.0, 15)
    w = mw + 0.02
    top = np.stack([x * w, 0.598 + 0.018 * x ** 4], 1)
    bot = np.stack([x * w, _YM - tu * 0.55 - 0.006 + 0.034 * x ** 6], 1)[::-1]
    return np.concatenate([top, bot])


@lru_cache(maxsize=None)
def _part_facial_hair(fh: int, fs: int, mo: int) -> tuple[list, list]:
    """(under the mouth, over the mouth) facial-hair layers: beard / goatee patch, then moustache."""
    name = EMOJI_GROUPS["facial_hair"][fh]
    under: list = []
    over: list = []
    if name == "none":
        return under, over
    W, chin, _ = _FACE[fs]
    mw, tu, tl = _lips(mo)
    if name == "beard":                                           # follows the jaw from the sideburns down
        p = _face_pts(fs)
        low = _offset(p, 0.014)
        low = low[low[:, 1] > _YE + 0.02]
        low = low[np.argsort(np.arctan2(low[:, 1] - _YE, low[:, 0]))]   # right side -> chin -> left side
        xr = _face_x(fs, _YE + 0.04)
        cheek = np.array([(-xr + 0.01, _YE + 0.03), (-mw - 0.05, 0.60), (0.0, 0.592), (mw + 0.05, 0.60),
                          (xr - 0.01, _YE + 0.03)])
        under = _outlined(np.concatenate([low, cheek]), "hair")
    elif name == "goatee":                                        # a U around the mouth down to the chin
        t = np.linspace(0.0, math.pi, 21)
        rx = (mw + 0.022) * (1.0 - 0.3 * np.sin(t) ** 2)
        bot = np.stack([rx * np.cos(t), _YM - 0.01 + (chin + 0.012 - _YM) * np.sin(t)], 1)
        under = _outlined(bot, "hair")
    if name in ("moustache", "goatee", "beard"):
        over = _outlined(_moustache_pts(mo), "hair", _LF)
    return under, over


@lru_cache(maxsize=None)
def _part_glasses(gl: int, es_i: int, fs: int) -> list:
    """Round or square frames (thick, dark), bridge and temple arms to the face sides."""
    name = EMOJI_GROUPS["glasses"][gl]
    if name == "none":
        return []
    ew, es = _EYE[es_i]
    W = _FACE[fs][0]
    rg = ew + 0.032
    rgy = rg if name == "round" else 0.80 * rg
    fw = _LW * 1.1
    ops = []
    for sx in (-1, 1):
        box = (sx * es - rg, _YE + 0.005 - rgy, sx * es + rg, _YE + 0.005 + rgy)
        ops.append(("ring", "frame", box, fw) if name == "round" else ("rrect", "frame", box + (0.35 * rgy,), fw))
        arm = np.array([(sx * (es + rg - 0.3 * fw), _YE - 0.25 * rgy), (sx * (W + 0.004), _YE - 0.3 * rgy)])
        ops.append(("line", "frame", arm, fw))
    bridge = _ell(0.0, _YE - 0.005, es - rg + 0.01, 0.02, math.pi * 1.1, math.pi * 1.9, 8)
    ops.append(("line", "frame", bridge, fw))
    return ops


# · Rendering


def _rgb8(c) -> tuple[int, int, int]:
    """sRGB float triple -> 8-bit tuple."""
    return tuple(int(round(255 * min(max(float(v), 0.0), 1.0))) for v in c)


_SKIN8 = [_rgb8(c) for c in _SKIN]
_SHADOW8 = [_rgb8(c * 0.84) for c in _SKIN]                                   # the one flat shadow tone
_LIPS8 = [_rgb8(c * np.array([0.86, 0.56, 0.56]) + np.array([0.07, 0.0, 0.02])) for c in _SKIN]
_HAIR8 = [_rgb8(c) for c in _HAIR]
_IRIS8 = [_rgb8(c) for c in _IRIS]
_FIXED8 = {"ink": _rgb8(_INK), "white": _rgb8(_WHITE), "shirt": _rgb8(_SHIRT), "frame": _rgb8(_FRAME)}
_BG8 = _rgb8(_BG)


def _supersampling(size: int) -> int:
    """Supersampling factor: 4x up to 64 px, 3x up to 96 px, else 2x."""
    return 4 if size <= 64 else (3 if size <= 96 else 2)


@lru_cache(maxsize=None)
def _to_pixels(ops: tuple, canvas: int) -> tuple:
    """Face-unit draw operations -> PIL arguments on a canvas of the given pixel size."""
    def px(p):
        p = np.asarray(p, np.float64)
        return [(float((x + 0.5) * canvas), float(y * canvas)) for x, y in p.reshape(-1, 2)]

    out = []
    for kind, role, geo, width in ops:
        w = max(1, int(round(width * canvas)))
        if kind in ("poly", "line"):
            out.append((kind, role, px(geo), w))
        else:                                                     # ell / ring / rrect: bounding box (+ radius)
            x0, y0, x1, y1 = geo[:4]
            box = ((x0 + 0.5) * canvas, y0 * canvas, (x1 + 0.5) * canvas, y1 * canvas)
            out.append((kind, role, box + tuple(g * canvas for g in geo[4:]), w))
    return tuple(out)


def _freeze(ops: list) -> tuple:
    """Hashable copy of a draw-operation list (numpy geometry -> nested tuples)."""
    return tuple((k, r, tuple(map(tuple, np.asarray(g).reshape(-1, 2))) if k in ("poly", "line") else tuple(g), w)
                 for k, r, g, w in ops)


@lru_cache(maxsize=None)
def _layer(name: str, key: tuple, canvas: int) -> tuple:
    """Pixel draw operations of one part (cached per part, categories and canvas size)."""
    if name in ("hair_back", "hair_front"):
        ops = _part_hair(*key)[name == "hair_front"]
    elif name in ("fh_under", "fh_over"):
        ops = _part_facial_hair(*key)[name == "fh_over"]
    else:
        ops = {"shirt": _part_shirt, "neck": _part_neck, "face": _part_face, "eyes": _part_eyes, "brows": _part_brows,
               "nose": _part_nose, "mouth": _part_mouth, "glasses": _part_glasses}[name](*key)
    return _to_pixels(_freeze(ops), canvas)


def render_emoji(config_row, size: int = 64) -> np.ndarray:
    """Render one configuration (CONFIG_DIM,) as a uint8 (size, size, 3) RGB cartoon avatar (deterministic).

    Each group's category is the argmax within the group.  size: 32..256.
    """
    size = int(size)
    if not 32 <= size <= 256:
        raise ValueError(f"size must be in 32..256, got {size}")
    sk, fs, hs, hc, es, ic, br, nz, mo, gl, fh = _indices(config_row)
    ss = _supersampling(size)
    canvas = size * ss
    colours = dict(_FIXED8, skin=_SKIN8[sk], shadow=_SHADOW8[sk], lips=_LIPS8[sk], hair=_HAIR8[hc],
                   iris=_IRIS8[ic])
    layers = (("shirt", ()), ("hair_back", (hs, fs)), ("neck", (fs,)), ("face", (fs,)), ("nose", (nz,)),
              ("fh_under", (fh, fs, mo)), ("mouth", (mo,)), ("fh_over", (fh, fs, mo)), ("eyes", (es,)),
              ("brows", (br, es)), ("hair_front", (hs, fs)), ("glasses", (gl, es, fs)))
    img = Image.new("RGB", (canvas, canvas), _BG8)
    draw = ImageDraw.Draw(img)
    for name, key in layers:
        for kind, role, geo, w in _layer(name, key, canvas):
            col = colours[role]
            if kind == "poly":
                draw.polygon(geo, fill=col)
            elif kind == "line":
                draw.line(geo, fill=col, width=w, joint="curve")
            elif kind == "ell":
                draw.ellipse(geo, fill=col)
            elif kind == "ring":
                draw.ellipse(geo, outline=col, width=w)
            else:                                                 # rrect
                draw.rounded_rectangle(geo[:4], radius=geo[4], outline=col, width=w)
    return np.array(img.reduce(ss))


def render_emoji_batch(configs, size: int = 64, desc: str | None = None) -> torch.Tensor:
    """Render a batch (n, CONFIG_DIM) (numpy or torch) as a uint8 tensor (n, 3, size, size); with ``desc``, a
    progress bar of that name."""
    if isinstance(configs, torch.Tensor):
        configs = configs.detach().cpu().numpy()
    configs = np.asarray(configs, dtype=np.float32).reshape(-1, CONFIG_DIM)
    out = np.empty((len(configs), size, size, 3), np.uint8)
    rows = enumerate(configs)
    for i, row in common.progress(rows, desc=desc, total=len(configs), unit="emoji") if desc else rows:
        out[i] = render_emoji(row, size)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


# ======================================================================================================================
# The experiment's data (tos_emoji.py): the photos s and the evaluation pairs, f, the engine's emoji sets, and all of
# them on the device with f's codes (load_data). ``args`` is tos_emoji.Args.
# ======================================================================================================================


def face_source(args) -> str:
    """Where the photos come from: --faces-dir, when given, means a face folder (whatever --faces says)."""
    return "folder" if args.faces_dir else args.faces


def synthetic_f_config(args) -> face_nets.FaceNetConfig:
    """The synthetic f of a run (trained once per configuration, then read from the cache)."""
    return face_nets.FaceNetConfig(steps=args.f_steps, identities=args.f_identities, world_seed=args.world_seed,
                                   style_aug=args.f_style_aug)


def load_faces(args, device: torch.device) -> dict:
    """The photos and f. Synthetic: s, eval (2 photos each) and f from the face world, with ground-truth
    configurations. Real (celeba or a folder of chips): the identities with two or more photos are split in
    half, one half as the evaluation set and the other as s (with the single-photo identities); f is dlib's."""
    source = face_source(args)
    if source == "synthetic":
        s = faces.synthetic_faces("s", args.n_s, 1, 64, args.world_seed)
        ev = faces.synthetic_faces("eval", args.n_eval, 2, 64, args.world_seed)
        identities = [faces.sample_identity(args.world_seed, int(i)) for i in ev["identity"][0::2]]
        pop = [faces.sample_identity(args.world_seed, int(i)) for i in s["identity"][:2000]]
        f, f_metrics = face_nets.load_face_net(synthetic_f_config(args), device)
        return {"s": s["images"], "x": ev["images"][0::2], "x2": ev["images"][1::2],
                "identity": ev["identity"][0::2].tolist(),
                "gt": torch.from_numpy(ground_truth_configs(identities)),
                "gt_population": torch.from_numpy(ground_truth_configs(pop)), "f": f,
                "f_source": f"synthetic f (ArcFace ResNet, {args.f_steps} steps"
                            f"{f', style augmentation p={args.f_style_aug}' if args.f_style_aug else ''}; verification "
                            f"{100 * f_metrics['accuracy']:.2f}% on held-out identities)",
                "source": f"{s['source']}; eval: {ev['source']}"}
    if source == "celeba":
        data = faces.load_celeba(args.data_root, "all", face_nets.DLIB_INPUT_SIZE, args.download,
                                 limit=args.n_s + 2 * args.n_eval)
    else:
        data = faces.load_face_folder(args.faces_dir, face_nets.DLIB_INPUT_SIZE)
    ids = data["identity"].numpy()
    rng = np.random.default_rng(args.seed)
    multi = np.array([k for k in np.unique(ids) if (ids == k).sum() >= 2])
    rng.shuffle(multi)
    eval_ids = multi[:min(args.n_eval, len(multi) // 2)]
    require(len(eval_ids) >= 2, f"{data['source']}: fewer than 4 identities with two photos; cannot evaluate")
    first = [np.flatnonzero(ids == k)[:2] for k in eval_ids]
    is_eval = np.isin(ids, eval_ids)
    s_idx = np.flatnonzero(~is_eval)[:args.n_s]
    return {"s": data["images"][s_idx], "x": data["images"][[a for a, _ in first]],
            "x2": data["images"][[b for _, b in first]], "gt": None, "gt_population": None,
            "identity": [int(k) for k in eval_ids],
            "f": face_nets.load_dlib_face_net(device=device), "f_source": "dlib face-recognition ResNet (PyTorch port)",
            "source": f"{data['source']}: {len(s_idx)} photos as s, {len(eval_ids)} identities x 2 for evaluation"}


def photos_64(img: torch.Tensor) -> torch.Tensor:
    """uint8 photos -> [-1, 1] at the emoji's size, 64x64 (real chips are 150x150)."""
    return faces.resize_images(faces.to_float_images(img), 64)


def load_data(args, device: torch.device) -> dict:
    """s, t, e's pairs, the evaluation photos x and x' (with ground truth and its emoji), f, and f's codes of s, t and
    x (f is fixed: they are computed once), all on the device; images stay uint8 until a batch is drawn."""
    data = load_faces(args, device)
    print(f"data: {data['source']}; f: {data['f_source']}")
    data.update(emoji_sets(args.seed, args.n_e_train, args.n_t))
    for k in ("s", "x", "x2", "u_e", "x_e", "t", "u_e_test", "x_e_test"):
        data[k] = data[k].to(device)
    if data["gt"] is not None:
        data["gt"] = data["gt"].to(device)
    with torch.no_grad():
        for k in ("s", "t", "x"):
            data[f"f_{k}"] = face_nets.embed(data["f"], data[k], device=device, desc=f"f's codes of {k}").to(device)
    if data["gt"] is not None:
        data["gt_emoji"] = render_emoji_batch(data["gt"].cpu()).to(device)
    return data


def emoji_sets(seed: int, n_e_train: int, n_t: int, n_test: int = 500) -> dict:
    """The engine's emoji, uint8: e's and c-bar's training pairs (u_e, x_e = engine(u_e)), the target set t (and
    its configurations u_t, never used in training), and held-out pairs for e and c-bar (u_e_test, x_e_test)."""
    rng = np.random.default_rng(seed)
    u_e = torch.from_numpy(random_configs(rng, n_e_train))
    u_t = torch.from_numpy(random_configs(rng, n_t))
    sets = {"u_e": u_e, "x_e": render_emoji_batch(u_e, desc=f"render e's {len(u_e):,} training emoji"),
            "t": render_emoji_batch(u_t, desc=f"render the {len(u_t):,} emoji of t")}
    sets["u_e_test"] = torch.from_numpy(random_configs(rng, n_test))
    sets["x_e_test"] = render_emoji_batch(sets["u_e_test"])
    return sets


# ======================================================================================================================
# Scoring against the ground truth (synthetic world): attribute accuracy, its chance and majority-class references,
# and f across the two domains
# ======================================================================================================================


def _with_mean(per_group: dict) -> dict:
    return {"per_group": per_group, "mean": float(np.mean(list(per_group.values())))}


def group_accuracy(pred: torch.Tensor, gt: torch.Tensor) -> dict:
    """Per-group accuracy of decoded configurations against the ground truth, and the mean over the groups."""
    pred, gt = decode_config(pred), gt.to(pred.device)
    return _with_mean({g: (pred[:, sl].argmax(1) == gt[:, sl].argmax(1)).float().mean().item()
                       for g, sl in GROUP_SLICES.items()})


def baseline_accuracy(gt: torch.Tensor, population: torch.Tensor) -> dict:
    """Chance (a uniform guess in every group) and majority class (the population's commonest category)."""
    chance = {g: 1.0 / (sl.stop - sl.start) for g, sl in GROUP_SLICES.items()}
    majority = {g: (gt[:, sl].argmax(1) == population[:, sl].sum(0).argmax()).float().mean().item()
                for g, sl in GROUP_SLICES.items()}
    return {"chance": _with_mean(chance), "majority": _with_mean(majority)}


@torch.no_grad()
def cross_domain_rank(f, photos: torch.Tensor, emoji: torch.Tensor) -> dict:
    """Rank of each emoji's own photo among all the photos, by the distance between f codes. Rank 1 is best; chance
    is a median rank of (n + 1) / 2."""
    fp, fe = f(photos), f(emoji)
    dist = torch.cdist(fe, fp)
    rank = (dist < dist.diagonal()[:, None]).sum(1) + 1  # ties count in the emoji's favour
    n = len(photos)
    return {"n": n, "median_rank": float(np.median(rank.cpu().numpy())), "r_at_1": (rank == 1).float().mean().item(),
            "chance_median_rank": (n + 1) / 2, "chance_r_at_1": 1 / n}


def f_across_domains(data: dict) -> dict:
    """Before any GAN training (synthetic world): does f find each person's photo from their ground-truth emoji?"""
    if data["gt"] is None:
        return {}
    m = cross_domain_rank(data["f"], faces.to_float_images(data["x"]), faces.to_float_images(data["gt_emoji"]))
    print(f"f across domains: each ground-truth emoji ranks its own photo at median {m['median_rank']:.0f} of "
          f"{m['n']} (chance {m['chance_median_rank']:.0f}); R@1 {100 * m['r_at_1']:.1f}% "
          f"(chance {100 * m['chance_r_at_1']:.1f}%)")
    return {"f_cross_domain": m}
