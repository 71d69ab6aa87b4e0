"""From a face photo to an emoji and its parameter vector: TOS §4.2 (journal §6.4), with the DTN, fixed-c-bar and
DANN baselines.

Wolf, Taigman, Polyak. "Unsupervised Creation of Parameterized Avatars", ICCV 2017 (../shared/papers/tos_iccv2017.txt);
Taigman, Polyak, Wolf. "Unsupervised Cross-Domain Image Generation", ICLR 2017 §5.2 (dtn_iclr2017.txt); the journal
version of both (dtn_tos_journal.txt), whose Table 1 gives the architectures and §6.4.2 the DANN baseline.

The problem: unlabelled face photos s, unlabelled emoji t, a fixed face-identity network f, and an emoji engine whose
configuration u (one-hot switches) renders an emoji. TOS learns G = g o f (photo -> emoji) and c (emoji -> u) so that
G(x) keeps f's identity and is e-compliant: G(x) = e(c(G(x))), where e is a network that mimics the engine. The
configuration c(G(x)) is the avatar: the engine renders it.

    python tos_emoji.py                      # the paper's preset on CUDA, the quick one otherwise
    python tos_emoji.py --preset quick       # the synthetic face world on a 2-core CPU
    python tos_emoji.py --faces-dir ../shared/data/celeba_aligned_150   # real aligned chips, with the dlib f
    python tos_emoji.py --apply chip.png --ckpt runs/tos_emoji/<run>    # a trained model on one's own face chips
    python tos_emoji.py --resume runs/tos_emoji/<run>                   # continue after Ctrl-C
    python tos_emoji.py --dry-run            # a few steps of everything

Algorithm (TOS Alg. 1), after e is trained on (u, engine(u)) pairs and fixed:
    for each step:
        sample photos x from s and emoji x' from t
        update d:      maximize log d(x') + log(1 - d(G(x)))                                             (Eq. 7)
        update g, c:   minimize L_c + alpha L_GAN + beta L_CONST + gamma L_TID + delta L_TV, where
                       L_c = ||G(x) - e(c(G(x)))||^2 (Eq. 5), L_CONST = ||f(x) - f(G(x))||^2 (Eq. 6),
                       L_TID = ||x' - g(f(x'))||^2 (Eq. 8), L_TV the total variation of G(x);
                       c's configuration reaches e as a valid one-hot configuration (straight-through), and
                       L_CONST also compares f(x) with f(e(c(G(x)))) (both are deviations, below)
Baselines, each written to the same metrics:
    DTN            DTN §5.2: the same f, g and d, no c; a ternary d; L_G = L_GANG + a L_CONST + b L_TID + c L_TV
                   with (a, b, c) = (100, 1, 0.05) in DTN's notation. Its configuration is c-bar(G(x)).
    c-bar          c trained supervised to invert the engine on its own renders.
    TOS fixed c-bar  TOS with c frozen to c-bar.
    DANN           journal §6.4.2: the engine's renders (with their configurations) as the labelled source domain,
                   photos as the unlabelled target; features p, label predictor l, domain classifier behind a
                   gradient-reversal layer.

Deviations from the paper (the README repeats them):
  * The Bitmoji engine is private: our own PIL engine (below), 11 one-hot groups and 61 switches against the paper's
    813. Its ground-truth map from a synthetic identity to its configuration makes the paper's "manual" emoji exact.
  * f is not DeepFace: a ResNet trained with ArcFace on the synthetic world's f split (common.py §7e), or dlib's
    face ResNet for real photos (common.py §7d). Photos are 64x64 in the synthetic world (f's input size). The
    synthetic f is trained with style-removing augmentations (common.style_augment: flattened shading, posterised
    colours, outlines, grey-scale, blur; --f-style-aug), on photos only, so that it reads identity from a cartoon
    better; it never sees an emoji or a configuration.
  * c's configuration enters e as the valid configuration it decodes to (argmax within each group), with the
    straight-through gradient of a per-group softmax (--c-decode straight_through, temperature --st-tau 0.2). The
    paper feeds e c's output without saying how; c's raw tanh output (--c-decode tanh) lies between the binary
    corners that e was trained on, where e draws textures, and G learned to match those textures.
  * L_CONST is the mean of ||f(x) - f(G(x))||^2 (Eq. 6) and ||f(x) - f(e(c(G(x))))||^2 (--const-on both; G is Eq. 6
    alone). On G(x) alone, G fools the small synthetic f with images that are no emoji: on the validation split,
    ||f(x) - f(G(x))|| fell to 0.29 while the engine's render of c(G(x)) stayed at 1.31 (unrelated faces: ~1.4),
    and the configurations were at chance. The compliant emoji is what Table 1 scores and what the engine draws.
    `--c-decode tanh --const-on G` is the paper's setting; the README gives the validation runs behind both choices.
  * L_c is a per-pixel mean (--lc-reduction mean), as in tos_polygons.py; the paper does not give its
    normalisation. The squared norm summed over the image (--lc-reduction sum) outweighs L_CONST and L_TID so far
    that G collapsed onto 4 configurations for 300 faces in validation.
  * DTN's weights (100, 1, 0.05) are read in DTN's notation, L_G = L_GANG + alpha L_CONST + beta L_TID + gamma L_TV
    (ICLR §5.2), which the journal repeats for the emoji baseline.
  * g's batch-norm statistics are recomputed on source batches before evaluation (common.recalibrate_batchnorm): g
    sees f(s) and f(t) in separate batches, and its running statistics would mix the two (see dtn_digits.py).
  * DANN's p ends in a 7x7 convolution with stride 1, so that its output is 512 x 2 x 2 = 2048-D as §6.4.2 says;
    the journal does not give the kernel.
  * The schedule (Adam, lr 2e-4, beta1 0.5, batch 64, fixed step counts) is not in the paper. The quick preset
    narrows every network and shows d 64x64 emoji instead of 152x152 ones.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import common
from common import (DownscalingEncoder, UpscalingGenerator, compliance_loss, const_loss, freeze, gan_d_loss,
                    gan_g_loss, require, tid_loss, tv_loss)

# ======================================================================================================================
# The emoji engine (TOS §4.2): configuration switches -> a flat cartoon emoji; and the ground truth of a face
# ======================================================================================================================
# A parametric emoji engine: one-hot switch groups -> flat cartoon avatar (TOS §4.2 stand-in).
#
# The paper's emoji engine (bitmoji.com) is private: an 813-D binary vector of one-hot switch groups
# mapped to a cartoon face.  This section is our own, smaller engine for the synthetic face world of
# ``common`` (section 7a): 11 ordered switch groups (EMOJI_GROUPS, 61 switches in all), a PIL renderer
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

# Bin edges of the continuous attributes (all ~ Beta(1.4, 1.4) in common.sample_identity): terciles 0.362 / 0.638
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


def render_emoji_batch(configs, size: int = 64) -> torch.Tensor:
    """Render a batch (n, CONFIG_DIM) (numpy or torch) as a uint8 tensor (n, 3, size, size)."""
    if isinstance(configs, torch.Tensor):
        configs = configs.detach().cpu().numpy()
    configs = np.asarray(configs, dtype=np.float32).reshape(-1, CONFIG_DIM)
    out = np.empty((len(configs), size, size, 3), np.uint8)
    for i, row in enumerate(configs):
        out[i] = render_emoji(row, size)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


# ======================================================================================================================
# Arguments: the paper's values as defaults (§4.2 and journal §6.4, Table 1)
# ======================================================================================================================


@dataclass
class Args(common.RunArgs):
    # Data
    faces: str = "synthetic"
    """synthetic (the embedded face world, with ground truth), celeba (torchvision, into --data-root) or folder
    (--faces-dir); real photos use the dlib f"""
    faces_dir: str = ""
    """a folder of aligned 150x150 face chips (one sub-folder per identity, or an identity.txt); sets --faces folder"""
    data_root: str = "data"
    """where torchvision keeps (or downloads) CelebA"""
    download: bool = True
    """let torchvision download CelebA"""
    n_s: int = 20000
    """unlabelled source photos in s (§4.2 uses "a set s of one million random images")"""
    n_t: int = 20000
    """emoji in t, rendered by the engine from random configurations (§4.2: "assorted facial avatars")"""
    n_e_train: int = 20000
    """(configuration, render) pairs that train e and c-bar (the paper does not give the number)"""
    n_eval: int = 500
    """evaluation identities, two photos each (x and x'), never in s or in f's training set"""
    world_seed: int = 0
    """seed of the synthetic face world (common.py §7)"""

    # f (fixed): the synthetic world's identity network (DeepFace's role, §4.2)
    f_steps: int = 1500
    """training steps of the synthetic f (common.FaceNetConfig; trained once, then cached)"""
    f_style_aug: float = 1.0
    """probability of common.style_augment per training photo of the synthetic f, which makes f style-robust on
    photos only, never an emoji (0 = flips only; 1 was best of 0, 0.8 and 1 on the validation split)"""

    # Networks (journal Table 1; filters in layer order, the output layer not included)
    e_widths: tuple = (512, 256, 128, 64)
    """e: "five 4x4 upscaling convolutional layers with 512-256-128-64-3 filters" """
    c_widths: tuple = (64, 128, 256, 512)
    """c: "five convolutional layers with 64-128-256-512-813 filters", here 64-128-256-512-CONFIG_DIM"""
    g_widths: tuple = (512, 256, 128, 64)
    """g: nine layers, the odd ones "upscaling 4x4 convolutions with 512-256-128-64-3 filters", the even ones 1x1"""
    d_widths: tuple = (64, 128, 256, 512, 512)
    """d: "six 4x4 convolutional layers with 64-128-256-512-512-(1 or 3) filters", stride 2"""
    dann_widths: tuple = (64, 128, 256, 512)
    """DANN's p: "4 convolution layers ... with 64-128-256-512 filters" (journal §6.4.2)"""
    d_size: int = 152
    """d's input size: "152x152 RGB images (either natural or scaled-up emoji)" (§4.2)"""

    # Losses (§4.2: "alpha = 0.01, beta = 100, gamma = 1, delta = 0.0005")
    alpha: float = 0.01
    """TOS: weight of L_GAN (§4.2)"""
    beta: float = 100.0
    """TOS: weight of L_CONST (§4.2)"""
    gamma: float = 1.0
    """TOS: weight of L_TID (§4.2)"""
    delta: float = 0.0005
    """TOS: weight of L_TV (§4.2)"""
    c_decode: str = "straight_through"
    """how c's configuration enters e: straight_through (the argmax one-hot of each group forward, the gradient of a
    softmax per group backward, so e only ever sees the binary configurations it was trained on) or tanh (c's raw
    output in [-1, 1], off e's training set between the corners; the paper does not say which)"""
    st_tau: float = 0.2
    """with --c-decode straight_through: the temperature of the per-group softmax whose gradient stands in for the
    argmax's"""
    const_on: str = "both"
    """which emoji L_CONST compares with the photo: G (Eq. 6 as written, f(G(x))), e_c_G (the compliant emoji
    e(c(G(x))), the one Table 1 scores) or both (the mean of the two terms)"""
    lc_reduction: str = "mean"
    """L_c's normalisation, which the paper does not give: mean (per pixel, an MSE) or sum (Eq. 4's squared norm
    over the 64x64x3 values, which outweighs every other term 12,288-fold)"""
    dtn_const: float = 100.0
    """DTN baseline: weight of L_CONST (ICLR §5.2 "alpha = 100"; journal §6.4)"""
    dtn_tid: float = 1.0
    """DTN baseline: weight of L_TID (ICLR §5.2 "beta = 1")"""
    dtn_tv: float = 0.05
    """DTN baseline: weight of L_TV (ICLR §5.2 "gamma = 0.05")"""

    # Optimisation (not in the paper: DCGAN's Adam)
    lr: float = 2e-4
    """Adam learning rate of every network (DCGAN's; the paper gives none)"""
    beta1: float = 0.5
    """Adam beta1 (DCGAN's)"""
    batch_size: int = 64
    """mini-batch size of s and of t"""
    e_steps: int = 20000
    """steps of e's supervised training on (u, engine(u)) pairs"""
    cbar_steps: int = 10000
    """steps of c-bar's supervised training on (engine(u), u) pairs"""
    gan_steps: int = 20000
    """steps of each GAN (TOS, DTN, TOS fixed c-bar)"""
    dann_steps: int = 10000
    """steps of DANN"""
    c_init: str = "random"
    """how TOS's c starts: random (DCGAN init, Alg. 1 step 2: "initialize"), or cbar, a copy of c-bar"""
    d_every: int = 1
    """d is updated once every d_every g updates (Alg. 1 updates it every step)"""
    methods: str = "tos,dtn,tos_fixed_cbar,dann"
    """which methods to train, comma-separated (c-bar is trained whenever DTN or fixed c-bar needs it)"""
    bn_recalibrate: bool = True
    """recompute g's batch-norm statistics on 100 source batches before evaluating (a deviation, see above)"""

    # Outputs
    apply: str = ""
    """comma-separated aligned face chips (150x150, dlib's alignment) to turn into emoji with --ckpt"""
    ckpt: str = ""
    """with --apply: the run folder (or its ckpt.pt) of a trained tos_emoji run"""


PRESETS = {
    "paper": {},
    "quick": dict(n_s=10000, n_t=10000, n_e_train=10000, n_eval=300, f_steps=600,
                  e_widths=(128, 64, 32, 16), c_widths=(16, 32, 64, 128), g_widths=(128, 64, 32, 16),
                  d_widths=(16, 32, 64, 128), dann_widths=(16, 32, 64, 128), d_size=64, batch_size=32, e_steps=2000,
                  cbar_steps=1000, gan_steps=1500, dann_steps=1000, log_every=50, ckpt_every=500),
}
DRY_RUN = dict(n_s=128, n_t=128, n_e_train=128, n_eval=16, f_steps=2, e_steps=2, cbar_steps=2, gan_steps=2,
               dann_steps=2, log_every=1, ckpt_every=2, batch_size=8)
METHODS = ("tos", "dtn", "tos_fixed_cbar", "dann")
LOG_FIELDS = ["loss_e", "loss_cbar", "loss_d", "loss_gan", "loss_c", "loss_const", "loss_tid", "loss_tv",
              "loss_label", "loss_domain"]


def validate(args: Args):
    """Every check that can fail on the arguments alone, before any file is written."""
    require(args.c_init in ("random", "cbar"), "--c-init must be random or cbar")
    require(args.lc_reduction in ("mean", "sum"), "--lc-reduction must be mean or sum")
    require(args.c_decode in ("straight_through", "tanh"), "--c-decode must be straight_through or tanh")
    require(args.const_on in ("G", "e_c_G", "both"), "--const-on must be G, e_c_G or both")
    require(args.st_tau > 0, "--st-tau must be positive")
    require(0 <= args.f_style_aug <= 1, "--f-style-aug is a probability, in [0, 1]")
    for name in ("n_s", "n_t", "n_e_train", "n_eval", "batch_size", "log_every", "ckpt_every", "f_steps", "d_every"):
        require(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
    for name in ("e_steps", "cbar_steps", "gan_steps", "dann_steps"):
        require(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be 0 or more")
    for name, n in (("e_widths", 4), ("c_widths", 4), ("g_widths", 4), ("dann_widths", 4)):
        w = getattr(args, name)
        require(len(w) == n and min(w) >= 1, f"--{name.replace('_', '-')} needs {n} positive widths, got {w}")
    require(len(args.d_widths) >= 1 and min(args.d_widths) >= 1, "--d-widths needs positive widths")
    require(args.d_size == 4 * 2 ** len(args.d_widths) or (args.d_size == 152 and len(args.d_widths) == 5),
            f"--d-size {args.d_size} does not fit {len(args.d_widths)} stride-2 layers of d: use "
            f"{4 * 2 ** len(args.d_widths)} (or 152 with 5 widths, Table 1)")
    require(args.faces in ("synthetic", "celeba", "folder"), "--faces must be synthetic, celeba or folder")
    require(args.faces != "folder" or args.faces_dir, "--faces folder needs --faces-dir DIR")
    unknown = set(m for m in args.methods.split(",") if m) - set(METHODS)
    require(not unknown and args.methods, f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    require(args.lr > 0 and 0 <= args.beta1 < 1, "--lr must be positive and --beta1 in [0, 1)")
    for name in ("alpha", "beta", "gamma", "delta", "dtn_const", "dtn_tid", "dtn_tv"):
        require(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be 0 or more")


# ======================================================================================================================
# Networks (journal Table 1 and §6.4.2)
# ======================================================================================================================


class NineLayerG(nn.Module):
    """g: f's code -> a 64x64 emoji. "9 blocks, each consisting of a convolution, batch-normalization and ReLU. The
    odd blocks 1,3,5,7,9 perform upscaling convolutions. The even ones perform 1x1 convolutions" (§4.2); tanh last."""

    def __init__(self, n_in: int, widths=(512, 256, 128, 64)):
        super().__init__()
        chans, layers = [n_in, *widths, 3], []
        for i in range(5):
            layers += common.up_block(chans[i], chans[i + 1], first=i == 0, last=i == 4)
            if i < 4:  # the even blocks: 1x1 convolutions
                layers += [nn.Conv2d(chans[i + 1], chans[i + 1], 1, bias=False), nn.BatchNorm2d(chans[i + 1]),
                           nn.ReLU(True)]
        self.net = nn.Sequential(*layers)
        common.dcgan_init(self)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.net(code.view(code.shape[0], -1, 1, 1))


class GradientReversal(torch.autograd.Function):
    """DANN's gradient-reversal layer (Ganin & Lempitsky 2015): the identity forward, -lambda * gradient backward."""

    @staticmethod
    def forward(ctx, x, lam: float):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lam * grad, None


class DANN(nn.Module):
    """Journal §6.4.2: p, "4 convolution layers ... 64-128-256-512 filters", the last with stride 1 and without batch
    norm or leaky ReLU, flattened to 2048-D; l, three fully connected layers (1024, 512, then the configuration)
    with batch norm and leaky ReLU, tanh last; the domain classifier, two fully connected layers (512 hidden) behind
    the gradient-reversal layer, sigmoid last (a logit here, for BCE with logits)."""

    def __init__(self, config_dim: int, widths=(64, 128, 256, 512)):
        super().__init__()
        w = widths
        self.p = nn.Sequential(
            *common.down_block(3, w[0], bn=False, last=False), *common.down_block(w[0], w[1], bn=True, last=False),
            *common.down_block(w[1], w[2], bn=True, last=False),
            nn.Conv2d(w[2], w[3], 7, 1, 0), nn.Flatten())  # 8x8 -> 2x2: 512 x 2 x 2 = 2048-D
        n_feat = w[3] * 4
        self.l = nn.Sequential(nn.Linear(n_feat, 1024), nn.BatchNorm1d(1024), nn.LeakyReLU(0.2, True),
                               nn.Linear(1024, 512), nn.BatchNorm1d(512), nn.LeakyReLU(0.2, True),
                               nn.Linear(512, config_dim), nn.Tanh())
        self.domain = nn.Sequential(nn.Linear(n_feat, 512), nn.BatchNorm1d(512), nn.LeakyReLU(0.2, True),
                                    nn.Linear(512, 1))
        common.dcgan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(self.p(x))

    def domain_logit(self, features: torch.Tensor, lam: float) -> torch.Tensor:
        """The domain classifier on p's features, behind the gradient reversal (weight ``lam``)."""
        return self.domain(GradientReversal.apply(features, lam)).flatten()


def configuration_for_e(scores: torch.Tensor, decode: str = "straight_through", tau: float = 0.2) -> torch.Tensor:
    """c's output (tanh, [-1, 1]) as e's input, a configuration on e's {-1, 1} scale (e is trained on 2u - 1).

    straight_through: forward, the valid configuration itself (argmax within each group, as the engine gets it);
    backward, the gradient of softmax(scores / tau) within each group (Bengio et al. 2013's straight-through
    estimator), so that L_c and L_CONST still reach c and G. tanh: the scores as they are (e then sees points between
    the corners of its training set, where it renders textures, not emoji)."""
    if decode == "tanh":
        return scores
    hard = decode_config(scores)
    soft = torch.cat([F.softmax(scores[:, sl] / tau, 1) for sl in GROUP_SLICES.values()], 1)
    return 2 * (hard + soft - soft.detach()) - 1


def tos_const_loss(const_on: str, f, fx: torch.Tensor, g_x: torch.Tensor, e_c_g_x: torch.Tensor) -> torch.Tensor:
    """L_CONST of TOS (Eq. 6, ||f(x) - f(G(x))||^2), on G(x), on the compliant emoji e(c(G(x))), or the mean of
    the two (--const-on; the second is a deviation, see the docstring). f runs only on the emoji it compares."""
    emoji = {"G": [g_x], "e_c_G": [e_c_g_x], "both": [g_x, e_c_g_x]}[const_on]
    return sum(const_loss(fx, f(img)) for img in emoji) / len(emoji)


def generator_loss(method: str, args: Args, losses: dict) -> torch.Tensor:
    """What g (and TOS's c) minimize. TOS (§3.2): L_c + alpha L_GAN + beta L_CONST + gamma L_TID + delta L_TV.
    DTN (ICLR §3, in its own notation): L_GANG + alpha L_CONST + beta L_TID + gamma L_TV, with the DTN weights."""
    if method == "dtn":
        return (losses["loss_gan"] + args.dtn_const * losses["loss_const"] + args.dtn_tid * losses["loss_tid"]
                + args.dtn_tv * losses["loss_tv"])
    return (losses["loss_c"] + args.alpha * losses["loss_gan"] + args.beta * losses["loss_const"]
            + args.gamma * losses["loss_tid"] + args.delta * losses["loss_tv"])


# ======================================================================================================================
# Data: s, t, the evaluation photos and their ground truth, and f
# ======================================================================================================================


def face_source(args: Args) -> str:
    """Where the photos come from: --faces-dir, when given, means a face folder (whatever --faces says)."""
    return "folder" if args.faces_dir else args.faces


def synthetic_f_config(args: Args) -> common.FaceNetConfig:
    """The synthetic f of a run (trained once per configuration, then read from the cache)."""
    return common.FaceNetConfig(steps=args.f_steps, world_seed=args.world_seed, style_aug=args.f_style_aug)


def load_faces(args: Args, device: torch.device) -> dict:
    """The photos and f. Synthetic: s, eval (2 photos each) and f from the face world, with ground-truth
    configurations. Real (celeba or a folder of chips): the identities with two or more photos are split in
    half, one half as the evaluation set and the other as s (with the single-photo identities); f is dlib's."""
    source = face_source(args)
    if source == "synthetic":
        s = common.synthetic_faces("s", args.n_s, 1, 64, args.world_seed)
        ev = common.synthetic_faces("eval", args.n_eval, 2, 64, args.world_seed)
        identities = [common.sample_identity(args.world_seed, int(i)) for i in ev["identity"][0::2]]
        pop = [common.sample_identity(args.world_seed, int(i)) for i in s["identity"][:2000]]
        f, f_metrics = common.load_face_net(synthetic_f_config(args), device)
        return {"s": s["images"], "x": ev["images"][0::2], "x2": ev["images"][1::2],
                "identity": ev["identity"][0::2].tolist(),
                "gt": torch.from_numpy(ground_truth_configs(identities)),
                "gt_population": torch.from_numpy(ground_truth_configs(pop)), "f": f,
                "f_source": f"synthetic f (ArcFace ResNet, {args.f_steps} steps"
                            f"{f', style augmentation p={args.f_style_aug}' if args.f_style_aug else ''}; verification "
                            f"{100 * f_metrics['accuracy']:.2f}% on held-out identities)",
                "source": f"{s['source']}; eval: {ev['source']}"}
    if source == "celeba":
        data = common.load_celeba(args.data_root, "all", common.DLIB_INPUT_SIZE, args.download,
                                  limit=args.n_s + 2 * args.n_eval)
    else:
        data = common.load_face_folder(args.faces_dir, common.DLIB_INPUT_SIZE)
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
            "f": common.load_dlib_face_net(device=device), "f_source": "dlib face-recognition ResNet (PyTorch port)",
            "source": f"{data['source']}: {len(s_idx)} photos as s, {len(eval_ids)} identities x 2 for evaluation"}


# ======================================================================================================================
# Evaluation: attribute accuracy against the ground truth, f-constancy, compliance, f across the two domains
# ======================================================================================================================


def group_accuracy(pred: torch.Tensor, gt: torch.Tensor) -> dict:
    """Per-group accuracy of decoded configurations against the ground truth, and the mean over the groups."""
    pred, gt = decode_config(pred), gt.to(pred.device)
    acc = {g: (pred[:, sl].argmax(1) == gt[:, sl].argmax(1)).float().mean().item() for g, sl in GROUP_SLICES.items()}
    return {"per_group": acc, "mean": float(np.mean(list(acc.values())))}


def baseline_accuracy(gt: torch.Tensor, population: torch.Tensor) -> dict:
    """Chance (a uniform guess in every group) and majority class (the population's commonest category)."""
    chance = {g: 1.0 / (sl.stop - sl.start) for g, sl in GROUP_SLICES.items()}
    majority = {}
    for g, sl in GROUP_SLICES.items():
        top = population[:, sl].sum(0).argmax()
        majority[g] = (gt[:, sl].argmax(1) == top).float().mean().item()
    return {"chance": {"per_group": chance, "mean": float(np.mean(list(chance.values())))},
            "majority": {"per_group": majority, "mean": float(np.mean(list(majority.values())))}}


@torch.no_grad()
def cross_domain_rank(f, photos: torch.Tensor, emoji: torch.Tensor) -> dict:
    """f across the two domains (issue: "check it before any GAN training"): rank of each emoji's own photo among
    all the photos, by the distance between f codes. Rank 1 is best; chance is a median rank of (n + 1) / 2."""
    fp, fe = f(photos), f(emoji)
    dist = torch.cdist(fe, fp)
    own = dist.diagonal()[:, None]
    rank = (dist < own).sum(1) + 1  # ties count in the emoji's favour
    n = len(photos)
    return {"n": n, "median_rank": float(np.median(rank.cpu().numpy())), "r_at_1": (rank == 1).float().mean().item(),
            "chance_median_rank": (n + 1) / 2, "chance_r_at_1": 1 / n}


# ======================================================================================================================
# Main: arguments, data, networks, training phases, evaluation, outputs
# ======================================================================================================================


def main(argv=None):
    t_start = time.time()
    args, preset, device, out, ckpt = common.start_run("tos_emoji", Args, PRESETS, DRY_RUN, validate, argv,
                                                       description=__doc__.split("\n")[0])
    common.seed_everything(args.seed)
    if args.apply:
        require(bool(args.ckpt), "--apply needs --ckpt RUN_DIR (a trained tos_emoji run)")
        return apply_to_photos(args, device, out)
    methods = [m for m in METHODS if m in args.methods.split(",")]
    need_cbar = any(m in methods for m in ("dtn", "tos_fixed_cbar")) or ("tos" in methods and args.c_init == "cbar")

    # ------------------------------------------------------------------------------------------------------------------
    # Data. s: unlabelled photos; t: emoji of random configurations; e's pairs; the evaluation photos x and x'.
    # Everything sits on the device as tensors; images are uint8 until a batch is drawn.
    # ------------------------------------------------------------------------------------------------------------------
    faces = load_faces(args, device)
    print(f"data: {faces['source']}; f: {faces['f_source']}")
    f = faces["f"]
    data_rng = np.random.default_rng(args.seed)
    u_e = torch.from_numpy(random_configs(data_rng, args.n_e_train))
    u_t = torch.from_numpy(random_configs(data_rng, args.n_t))
    x_e = render_emoji_batch(u_e)                   # e's and c-bar's training pairs (u, engine(u))
    t = render_emoji_batch(u_t)                     # the target set t
    u_e_test = torch.from_numpy(random_configs(data_rng, 500))
    x_e_test = render_emoji_batch(u_e_test)
    s, x_eval, x2_eval = (faces[k].to(device) for k in ("s", "x", "x2"))
    u_e, x_e, t, u_e_test, x_e_test = (v.to(device) for v in (u_e, x_e, t, u_e_test, x_e_test))
    gt = faces["gt"].to(device) if faces["gt"] is not None else None

    as_float = common.to_float_images  # uint8 photos or emoji -> [-1, 1]

    def to_64(img):  # photos at the emoji's size (real chips are 150x150)
        return common.resize_images(img, 64)

    with torch.no_grad():  # f is fixed: its codes of s, t and the evaluation photos are computed once
        f_s = common.embed(f, s, device=device).to(device)
        f_t = common.embed(f, t, device=device).to(device)
        f_x = common.embed(f, x_eval, device=device).to(device)
    code_dim = f_s.shape[1]

    # f across the two domains, before any GAN training (synthetic world: the ground-truth emoji of each person)
    metrics: dict = {"data_source": faces["source"], "f": faces["f_source"]}
    if gt is not None:
        gt_emoji = render_emoji_batch(gt.cpu()).to(device)
        metrics["f_cross_domain"] = cross_domain_rank(f, as_float(x_eval), as_float(gt_emoji))
        m = metrics["f_cross_domain"]
        print(f"f across domains: each ground-truth emoji ranks its own photo at median {m['median_rank']:.0f} of "
              f"{m['n']} (chance {m['chance_median_rank']:.0f}); R@1 {100 * m['r_at_1']:.1f}% "
              f"(chance {100 * m['chance_r_at_1']:.1f}%)")

    # ------------------------------------------------------------------------------------------------------------------
    # Networks (journal Table 1):
    #   e: configuration -> 64x64 emoji, mimics the engine; trained first, then fixed
    #   c: emoji -> configuration (tanh, [-1, 1]); c-bar: c trained supervised on the engine's renders
    #   g: f's code -> emoji, so G = g o f; d: emoji (upscaled to d_size) -> real/fake (TOS) or 3 classes (DTN)
    # ------------------------------------------------------------------------------------------------------------------
    def make_c():
        return DownscalingEncoder(3, args.c_widths, CONFIG_DIM, final="tanh")

    def make_d(n_out):
        return DownscalingEncoder(3, args.d_widths, n_out, bn_first=False)

    nets = {"e": UpscalingGenerator(CONFIG_DIM, args.e_widths, 3)}
    if need_cbar:
        nets["cbar"] = make_c()
    for m in ("tos", "dtn", "tos_fixed_cbar"):
        if m in methods:
            nets[f"{m}_g"] = NineLayerG(code_dim, args.g_widths)
            nets[f"{m}_d"] = make_d(3 if m == "dtn" else 1)
            if m == "tos":
                nets["tos_c"] = make_c()
    if "dann" in methods:
        nets["dann"] = DANN(CONFIG_DIM, args.dann_widths)
    for net in nets.values():
        net.to(device)
    opts = {k: torch.optim.Adam(v.parameters(), lr=args.lr, betas=(args.beta1, 0.999)) for k, v in nets.items()}
    e = nets["e"]
    phases = {"e": args.e_steps}
    if need_cbar:
        phases["cbar"] = args.cbar_steps
    phases.update({m: args.gan_steps if m != "dann" else args.dann_steps for m in methods})
    runner = common.PhaseRunner("tos_emoji", args, out, nets, opts, phases, LOG_FIELDS, ckpt, t_start)

    def batch(x: torch.Tensor, *more: torch.Tensor):
        return common.sample_batch(args.batch_size, x, *more)

    def for_d(img: torch.Tensor) -> torch.Tensor:
        """d sees emoji "scaled-up" to d_size (§4.2)."""
        return common.resize_images(img, args.d_size)

    # ------------------------------------------------------------------------------------------------------------------
    # One training step of each phase; each returns its losses as tensors (read on the host only when logged)
    # ------------------------------------------------------------------------------------------------------------------
    def step_e():
        # e mimics the engine, supervised on (u, engine(u)): minimize ||e(u) - engine(u)||^2 (§4.2)
        u, x = batch(u_e, x_e)
        loss = F.mse_loss(e(2 * u - 1), as_float(x))
        opts["e"].zero_grad(set_to_none=True)
        loss.backward()
        opts["e"].step()
        return {"loss_e": loss}

    def step_cbar():
        # c-bar inverts the engine, supervised on its renders: minimize ||c-bar(engine(u)) - u||^2 (u in {-1, 1})
        u, x = batch(u_e, x_e)
        loss = F.mse_loss(nets["cbar"](as_float(x)), 2 * u - 1)
        opts["cbar"].zero_grad(set_to_none=True)
        loss.backward()
        opts["cbar"].step()
        return {"loss_cbar": loss}

    def gan_step(m: str):
        """One step of TOS (Alg. 1), TOS with c fixed to c-bar, or DTN (ICLR §3, Eqs. 3-7)."""
        g, d, opt_g, opt_d = nets[f"{m}_g"], nets[f"{m}_d"], opts[f"{m}_g"], opts[f"{m}_d"]
        (fx,) = batch(f_s)                 # f(x) of photos x in s (f is fixed: computed once)
        t_b, ft = batch(t, f_t)            # emoji x' in t, and f(x')
        t_b = as_float(t_b)
        g_x, g_t = g(fx), g(ft)            # G(x) = g(f(x)) and G(x') = g(f(x'))
        # (1) Update d (every d_every steps). TOS: maximize log d(t) + log(1 - d(G(x))) (Eq. 7). DTN: the ternary
        #     L_D (DTN Eq. 3)
        runner_state["gan_step"] += 1
        if (runner_state["gan_step"] - 1) % args.d_every == 0:  # steps 1, 1 + d_every, ... of the phase
            if m == "dtn":
                loss_d = common.dtn_d_loss(d(for_d(g_x.detach())), d(for_d(g_t.detach())), d(for_d(t_b)))
            else:
                loss_d = gan_d_loss(d(for_d(t_b)), d(for_d(g_x.detach())))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            runner_state["loss_d"] = loss_d.detach()
        loss_d = runner_state["loss_d"]  # logged: d's loss at its last update
        # (2) Update g (and c): the generator's loss
        loss_tid = tid_loss(t_b, g_t)              # L_TID = ||x' - G(x')||^2 for x' in t (Eq. 8)
        loss_tv = tv_loss(g_x)                     # L_TV (§3.2)
        losses = {"loss_d": loss_d, "loss_tid": loss_tid, "loss_tv": loss_tv}
        if m == "dtn":
            losses["loss_const"] = const_loss(fx, f(g_x))  # L_CONST = ||f(x) - f(G(x))||^2 (DTN Eq. 5); f fixed
            losses["loss_gan"] = common.dtn_gang_loss(d(for_d(g_x)), d(for_d(g_t)))   # L_GANG (DTN Eq. 4)
        else:
            c = nets["tos_c"] if m == "tos" else nets["cbar"]
            losses["loss_gan"] = gan_g_loss(d(for_d(g_x)))      # L_GAN, non-saturating (Eq. 7)
            # L_c = ||G(x) - e(c(G(x)))||^2 (Eq. 5), e fixed; c's configuration decoded for e (--c-decode)
            e_c_g_x = e(configuration_for_e(c(g_x), args.c_decode, args.st_tau))
            losses["loss_c"] = compliance_loss(g_x, e_c_g_x, args.lc_reduction)
            # L_CONST = ||f(x) - f(G(x))||^2 (Eq. 6), on G(x) and/or e(c(G(x))) (--const-on); f fixed, not detached
            losses["loss_const"] = tos_const_loss(args.const_on, f, fx, g_x, e_c_g_x)
            if m == "tos":
                opts["tos_c"].zero_grad(set_to_none=True)
        loss_g = generator_loss(m, args, losses)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if m == "tos":
            opts["tos_c"].step()   # c and g both minimize L_c (Alg. 1 step 12)
        return losses

    def step_dann():
        # DANN (journal §6.4.2): l(p(.)) learns configurations on the engine's renders (the labelled source), while
        # the domain classifier, behind the gradient reversal, makes p's features of renders and photos alike.
        net = nets["dann"]
        u, x_src = batch(u_e, x_e)
        (x_tgt,) = batch(s)
        progress = runner_state["dann_step"] / max(1, args.dann_steps)
        lam = 2.0 / (1.0 + np.exp(-10 * progress)) - 1.0   # Ganin & Lempitsky's schedule of the reversal weight
        runner_state["dann_step"] += 1
        p_src, p_tgt = net.p(as_float(x_src)), net.p(to_64(as_float(x_tgt)))
        loss_label = F.mse_loss(net.l(p_src), 2 * u - 1)
        logits = net.domain_logit(torch.cat([p_src, p_tgt]), lam)
        labels = torch.cat([torch.zeros(len(u), device=device), torch.ones(len(x_tgt), device=device)])
        loss_domain = F.binary_cross_entropy_with_logits(logits, labels)
        opts["dann"].zero_grad(set_to_none=True)
        (loss_label + loss_domain).backward()
        opts["dann"].step()
        return {"loss_label": loss_label, "loss_domain": loss_domain}

    runner_state = {"dann_step": 0, "gan_step": 0, "loss_d": torch.zeros((), device=device)}

    def phase_setup(phase: str, start_step: int):
        """Train mode for what this phase trains; e (after its phase), f and c-bar (after its phase) are fixed."""
        for net in nets.values():
            net.eval()
        trained = {"e": ["e"], "cbar": ["cbar"], "tos": ["tos_g", "tos_d", "tos_c"], "dtn": ["dtn_g", "dtn_d"],
                   "tos_fixed_cbar": ["tos_fixed_cbar_g", "tos_fixed_cbar_d"], "dann": ["dann"]}[phase]
        for k in trained:
            nets[k].train()
        if phase != "e":
            freeze(e)
        if phase not in ("e", "cbar") and "cbar" in nets:
            freeze(nets["cbar"])   # "TOS fixed c-bar": c frozen to c-bar
        if phase == "dann":
            runner_state["dann_step"] = start_step
        runner_state["gan_step"] = start_step
        if phase == "tos" and start_step == 0 and args.c_init == "cbar":
            nets["tos_c"].load_state_dict(nets["cbar"].state_dict())
        return {"e": step_e, "cbar": step_cbar, "dann": step_dann}.get(phase, lambda: gan_step(phase))

    def after_phase(phase: str):
        if phase == "e":
            with torch.no_grad():
                mse = F.mse_loss(e.eval()(2 * u_e_test - 1), as_float(x_e_test)).item()
            print(f"e: held-out MSE {mse:.4f} on the [-1, 1] scale")

    if not runner.run(phase_setup, after_phase):
        return 130

    # ------------------------------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------------------------------
    for net in nets.values():
        net.eval()
    x_f = as_float(x_eval)        # the evaluation photos x (f's input size)
    x_64 = to_64(x_f)             # the same at the emoji's size, for DANN and the grids
    with torch.no_grad():
        metrics["e_test_mse"] = F.mse_loss(e(2 * u_e_test - 1), as_float(x_e_test)).item()
        if "cbar" in nets:
            metrics["cbar_test_accuracy"] = group_accuracy(nets["cbar"](as_float(x_e_test)), u_e_test)["mean"]
    outputs = {}  # method -> G(x), e(c(G(x))) and the decoded configuration
    for m in methods:
        with torch.no_grad():
            if m == "dann":
                scores = nets["dann"](x_64)
                outputs[m] = {"config": decode_config(scores),
                              "e_c_G": e(configuration_for_e(scores, args.c_decode, args.st_tau))}
                continue
        g = nets[f"{m}_g"]
        if args.bn_recalibrate:
            with torch.no_grad():
                common.recalibrate_batchnorm(g, g, (batch(f_s)[0] for _ in range(100)))
        with torch.no_grad():
            c = nets["tos_c"] if m == "tos" else nets["cbar"]
            g_x = g(f_x)
            c_g_x = c(g_x)
            e_c_g_x = e(configuration_for_e(c_g_x, args.c_decode, args.st_tau))
            outputs[m] = {"G": g_x, "config": decode_config(c_g_x), "e_c_G": e_c_g_x,
                          "compliance": compliance_loss(g_x, e_c_g_x).item()}
    with torch.no_grad():
        for m, o in outputs.items():
            o["engine"] = as_float(render_emoji_batch(o["config"].cpu()).to(device))  # the real avatar
            r = {"f_constancy": (f_x - f(o["engine"])).norm(dim=1).mean().item()}
            if "G" in o:
                r["compliance"] = o["compliance"]
                r["f_constancy_G"] = (f_x - f(o["G"])).norm(dim=1).mean().item()
            if gt is not None:
                r["attributes"] = group_accuracy(o["config"], gt)
            metrics[m] = r
        if gt is not None:
            metrics.update(baseline_accuracy(gt, faces["gt_population"].to(device)))
            metrics["manual"] = {"f_constancy": (f_x - f(as_float(gt_emoji))).norm(dim=1).mean().item(),
                                 "attributes": group_accuracy(gt, gt)}

    # ------------------------------------------------------------------------------------------------------------------
    # Outputs: the Fig. 6 grid, every evaluation face for eval_retrieval.py, the configurations, metrics and table
    # ------------------------------------------------------------------------------------------------------------------
    n_grid = min(16, len(x_f))
    columns = {"photo": x_64}
    if gt is not None:
        columns["manual"] = as_float(gt_emoji)
    for m in ("dtn", "tos"):
        if m in outputs:
            columns[f"{m}_G"] = outputs[m]["G"]
    if "tos" in outputs:
        columns["tos_e_c_G"] = outputs["tos"]["e_c_G"]
        columns["tos_engine"] = outputs["tos"]["engine"]
    common.save_grid(torch.stack([v[:n_grid] for v in columns.values()], 1).flatten(0, 1), out / "fig6_grid.png",
                     nrow=len(columns))
    print(f"fig6_grid.png: columns {', '.join(columns)}")
    common.save_grid(as_float(t[:64]), out / "t_emoji.png")
    common.save_grid(torch.stack([as_float(x_e_test[:32]), e(2 * u_e_test[:32] - 1)], 1).flatten(0, 1),
                     out / "e_vs_engine.png")
    sets = {"photo_x": x_64, "photo_x2": to_64(as_float(x2_eval))}
    if gt is not None:
        sets["manual"] = as_float(gt_emoji)
    for m, o in outputs.items():
        sets.update({f"{m}_{k}": o[k] for k in ("G", "e_c_G", "engine") if k in o})
    common.save_probes(out, sets, faces["identity"])
    common.write_json(out / "configs.json", {m: [config_to_dict(row) for row in o["config"].cpu().numpy()]
                                             for m, o in outputs.items()})
    wall = runner.elapsed()
    table = results_table(metrics, methods)
    common.write_json(out / "metrics.json", {
        "script": "tos_emoji", "preset": preset, "seed": args.seed, "device": common.describe_device(device),
        "wall_time_s": round(wall, 1), "n_eval": len(x_f), "config_dim": CONFIG_DIM, **metrics})
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"wall time {wall / 60:.1f} min; output {out}")
    return 0


# ======================================================================================================================
# Outputs: the table, and --apply (the probes for eval_retrieval.py: common.save_probes)
# ======================================================================================================================


def results_table(metrics: dict, methods: list[str]) -> str:
    """The README's table: attribute accuracy against the ground truth (synthetic world), f-constancy and
    compliance for every method, the reference rows, then the accuracy of each group."""
    names = {"chance": "chance (a uniform guess per group)", "majority": "majority class per group",
             "manual": "ground-truth emoji (the paper's manual emoji, exact)", "tos": "TOS: engine(c(G(x)))",
             "dtn": "DTN + c-bar: engine(c-bar(G(x)))", "tos_fixed_cbar": "TOS fixed c-bar: engine(c-bar(G(x)))",
             "dann": "DANN: engine(l(p(x)))"}

    def fmt(v, pct=False):
        return "" if v is None else f"{100 * v:.1f}%" if pct else f"{v:.4f}"

    def accuracy(r):
        return r.get("attributes", r).get("mean"), r.get("attributes", r).get("per_group")

    rows = [k for k in ["chance", "majority", "manual", *methods] if k in metrics]
    lines = ["| method | mean attribute accuracy | f-constancy ||f(x) - f(engine(..))|| | "
             "compliance ||G(x) - e(c(G(x)))||^2 (MSE) |", "|---|---|---|---|"]
    for k in rows:
        r = metrics[k]
        lines.append(f"| {names[k]} | {fmt(accuracy(r)[0], True)} | {fmt(r.get('f_constancy'))} | "
                     f"{fmt(r.get('compliance'))} |")
    per = [k for k in rows if accuracy(metrics[k])[1] is not None]
    if per:
        lines += ["", "| group | " + " | ".join(per) + " |", "|---|" + "---|" * len(per)]
        for g in GROUP_SLICES:
            lines.append(f"| {g} | " + " | ".join(f"{100 * accuracy(metrics[k])[1][g]:.1f}" for k in per) + " |")
    return "\n".join(lines)


def apply_to_photos(args: Args, device: torch.device, out: Path) -> int:
    """``--apply PHOTO,... --ckpt RUN``: a trained TOS model on one's own aligned face chips. Writes, per photo, the
    configuration as JSON with named switches, the engine's render of it (the avatar, 256 px) and G(x); with
    several photos of one person, ``best.json`` names the photo whose avatar keeps f best (Eq. 17)."""
    state = common.load_checkpoint(args.ckpt)
    require(state.get("script") == "tos_emoji" and "tos_g" in state["nets"],
            f"--ckpt: {args.ckpt} is not a tos_emoji run with a trained TOS")
    saved = {"f_style_aug": 0.0, **state["args"]}  # runs saved before --f-style-aug had the flips-only f
    run = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    synthetic = face_source(run) == "synthetic"
    size = 64 if synthetic else common.DLIB_INPUT_SIZE
    photos, names = [], []
    for path in (p for p in args.apply.split(",") if p):
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except Exception as exc:
            raise common.UsageError(f"--apply: cannot read {path} ({type(exc).__name__}: {exc})") from None
        require(img.size[0] == img.size[1] and (img.size[0] == size or synthetic and 64 <= img.size[0] <= 152),
                f"--apply: {path} is {img.size[0]}x{img.size[1]}, not an aligned {size}x{size} face chip "
                f"(dlib's get_face_chip alignment, as in ../shared/data/celeba_aligned_150); crop and align it first")
        photos.append(torch.from_numpy(np.asarray(img.resize((size, size)), np.uint8)).permute(2, 0, 1))
        names.append(Path(path).stem)
    x = common.to_float_images(torch.stack(photos).to(device))
    if synthetic:
        f, _ = common.load_face_net(synthetic_f_config(run), device)
    else:
        f = common.load_dlib_face_net(device=device)
    with torch.no_grad():
        code = f(x)
        g = NineLayerG(code.shape[1], run.g_widths).to(device)
        c = DownscalingEncoder(3, run.c_widths, CONFIG_DIM, final="tanh").to(device)
        g.load_state_dict(state["nets"]["tos_g"])
        c.load_state_dict(state["nets"]["tos_c"])
        g.eval()
        c.eval()
        g_x = g(code)
        config = decode_config(c(g_x))
        avatar = render_emoji_batch(config.cpu(), size=256)
        keep = (code - f(common.to_float_images(render_emoji_batch(config.cpu())).to(device))).norm(dim=1)
    for k, name in enumerate(names):
        common.write_json(out / f"{name}_config.json", {"photo": args.apply.split(",")[k],
                                                         "configuration": config_to_dict(config[k].cpu().numpy()),
                                                         "f_distance_to_avatar": keep[k].item()})
        Image.fromarray(avatar[k].permute(1, 2, 0).numpy()).save(out / f"{name}_avatar.png")
        common.save_grid(g_x[k:k + 1], out / f"{name}_G.png", nrow=1)
    best = int(keep.argmin())
    common.write_json(out / "best.json", {"photo": names[best], "f_distance_to_avatar": keep[best].item(),
                                          "rule": "argmin ||f(x) - f(engine(c(G(x))))|| over the photos (Eq. 17)"})
    print(f"wrote the avatars of {len(names)} photos to {out}; the one that keeps f best: {names[best]}")
    return 0


if __name__ == "__main__":
    common.run_main(main, "tos_emoji.py")
