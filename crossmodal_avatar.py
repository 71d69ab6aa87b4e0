"""From a portrait to a 629-D vector avatar through aligned latent spaces (Ladron de Guevara et al., 2023).

"Cross-modal Latent Space Alignment for Image to Avatar Translation" (../shared/papers/crossmodal_avatar.txt).

The problem: many unpaired portraits x, many unpaired avatar vectors y (629 numbers: the points of spline curves,
colours and line weights of a vector-graphics face, §3), and only a few paired (x, y). The method learns a latent
space per modality from the unpaired data, then a small mapping F between the two latent spaces from the pairs:

    y_hat = D_t(F(E_s(x)))                              (§4.2; hair and accessories come from a separate bank, §4.3)

    python crossmodal_avatar.py                          # the paper's preset on CUDA, the quick one otherwise
    python crossmodal_avatar.py --preset quick           # the synthetic face world on a 2-core CPU (Table 1)
    python crossmodal_avatar.py --preset quick --table 1,3,fig8 --f-seeds 3    # Tables 1 and 3, Fig. 8
    python crossmodal_avatar.py --table 3 --ae-from runs/crossmodal_avatar/<run>  # reuse a run's autoencoders
    python crossmodal_avatar.py --apply me.png --ckpt runs/crossmodal_avatar/<run> # 629-D JSON, PNG and SVG
    python crossmodal_avatar.py --resume runs/crossmodal_avatar/<run>               # continue after Ctrl-C
    python crossmodal_avatar.py --dry-run                # a few steps of everything

Algorithm (§4.1, §4.2, §4.5):
    1. unpaired, independently (Eq. 1):
         E_s, D_s:  minimise |x - D_s(E_s(x))| + lambda_p L_perc (Eq. 2, 3) on augmented portraits
         E_t, D_t:  minimise (y - D_t(E_t(y)))^2 on sampled avatar vectors
       then discard D_s and freeze E_s, E_t and D_t.
    2. paired: train F only, minimising (Eq. 6)
         L = lambda_r L_rec + lambda_c L_cm + lambda_w L_w, where
         L_rec = (D_t(F(E_s(x))) - y)^2,
         L_cm  = lambda_1 (z_m - z_t)^2 + lambda_2 (1 - cos(z_m, z_t)),  z_m = F(E_s(x)), z_t = E_t(y)  (Eq. 4)
         L_w   = ||theta_F - theta_Et||^2, the last layers of F and of E_t                            (Eq. 5)
    3. hair (§4.3): an attribute regressor H reads the portrait; the nearest attribute vector of a bank of
       (portrait, hair) pairs gives the hairstyle and accessories, merged with y_hat before rendering (§4.4).

Baseline: a direct regression from E_s's code to the 629 parameters, trained on the same pairs (the route the paper
argues overfits). Table 3 ablations: --ablation no_align / no_mse / no_cos / no_weight, or all of them with --table 3.

Deviations from the paper (the README repeats them):
  * The paper's engine, its 393 artist pairs and its 100,000 avatars are private. Our engine (below) has the paper's
    629 dimensions and primitives, with our own group sizes; in the synthetic face world (common.py §7a) every photo
    has an exact ground-truth avatar (its identity's geometry and colours), so pairs are free and exact. The pairs are
    393 identities with 26 photos each (their nuisances, i.e. pose, light, expression, background, play the part of
    the paper's augmentations), 9,970 in all; the unpaired avatars are ground-truth avatars of other identities with
    a small jitter on every coordinate and colour.
  * Photos are 64 px in the quick preset; the synthetic world renders at most 152 px, so the paper preset renders
    at 128 px and upsamples each batch to 256.
  * L_perc (Eq. 3) uses ImageNet VGG19 only when its weights are on disk (or --perc-net vgg19 with a network);
    otherwise the feature maps of the project's synthetic face network f (common.py §7e): metrics.json says which.
    Each layer's squared difference is averaged over positions and channels rather than summed over positions, so
    that lambda_p = 0.1 weighs it against a per-pixel-mean L1.
  * The paper gives neither lambda_1, lambda_2 (Eq. 4) nor the MLP widths, the epochs or what the plateau scheduler
    watches: lambda_1 = 1 and lambda_2 = 0.1 (of 1 and 0.1, on the validation split), hidden width 1024 for E_t, D_t
    and F (F's last layer must have E_t's shape for Eq. 5), 100 epochs (read off a validation curve) with the plateau
    watched on the epoch's training loss ("on loss plateau"), and the epoch with the lowest validation L_rec kept.
    Both AEs' step counts are ours. Table 3 uses Table 1's 3,995 pairs (its count is not given). Eq. 5 is a sum over
    F's last layer (525,312 numbers), as written: at lambda_w = 10 it outweighs L_rec 10^5-fold at the start.
  * H (§4.3) is not a ResNet50 attribute regressor [14]: a ridge regression from the synthetic f's code to the 40
    ground-truth attributes of the face world, fitted on f's own training photos. The bank holds one portrait of each
    paired identity (393), with its ground-truth hair and accessories.
  * LPIPS needs ImageNet weights that cannot be downloaded offline: reported only when the `lpips` package and its
    weights are present.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F_nn
from PIL import Image, ImageDraw

import common
from common import DownscalingEncoder, UpscalingGenerator, freeze, require

# ======================================================================================================================
# The avatar engine (§3, §4.3, §4.4): a 629-D parametric vector avatar, its ground truth, a hair bank, PIL and SVG
# ======================================================================================================================
# Ladron de Guevara et al. 2023 (../shared/papers/crossmodal_avatar.txt) encode an avatar as a 629-D vector of point
# coordinates, colours and line weights, grouped by facial component (§3, Fig. 2), and render it with PIL from cubic
# Bezier curves (contours, outlines), polygons (fills, highlights, shadows) and composites (eyebrows, hair) drawn in
# artist order with tapered line ends (§4.4, Fig. 4). Hair and accessories live outside the vector and come from a
# bank (§4.3). Their engine, its 629 parameters and its 470 hairstyles are not public: this section is our own engine
# with the paper's dimension and primitives, for the synthetic face world of common (7a), whose identities map
# exactly to their avatar vector (avatar_from_identity: the paper's artist-made avatars, made exact).
#
# Parameter table (AVATAR_GROUPS; every entry in [0, 1]; "pts" are (x, y) pairs in the unit canvas, x 0 = left ..
# 1 = right, y 0 = top .. 1 = bottom, the framing of common.render_photo; a closed Bezier path of K anchors stores 3K
# points [A0, H0out, H1in, A1, H1out, ...], an open one 3K - 2; colours are sRGB):
#
#   name            dims  what
#   skin              12  face RGB, shadow RGB (ear inner strokes), neck RGB, ear RGB
#   face_contour      64  closed head/jaw outline: 10 anchors + 20 handles (30 pts), outline width, outline RGB
#   chin              19  chin crease: open Bezier, 3 anchors (7 pts), r_s, r_e, RGB (tapered)
#   ears              79  per ear (left, right): closed outline 4 anchors (12 pts) + inner curve 3 anchors (7 pts);
#                         outline width, inner-curve r_s, r_e
#   eye_lids          87  per eye: upper lid, lower lid (7 pts each), crease (4 pts), upper r_s, r_e, lower r_s, r_e;
#                         crease width, lash RGB, sclera RGB
#   iris              13  per eye centre (1 pt), radius; iris RGB, ring RGB, ring width
#   pupils             9  per eye centre (1 pt), radius; pupil RGB
#   eye_highlights    23  per eye a 5-point polygon; highlight RGB
#   eyebrows          44  per brow a spine (open Bezier, 3 anchors, 7 pts) + thickness at 5 stations; fill RGB,
#                         hair-stroke RGB
#   nose              51  y_nose := {(x, y)^N, r_s, r_e, R, G, B}: left and right side curves (4 pts each), base
#                         (7 pts), left and right nostril (4 pts each); r_s, r_e, RGB
#   lips              89  upper lip closed 6 anchors (18 pts), lower lip closed 4 anchors (12 pts), mouth line
#                         (7 pts), mouth-line r_s, r_e, lip outline width; upper, lower, line, mouth-interior RGB
#   teeth             19  8-point polygon, RGB (drawn in the mouth opening, under the lips)
#   shading          120  6 polygons (left cheek, right cheek, under nose, under lip, neck/jaw shadow, forehead
#                         highlight), each 8 pts + RGB + opacity
#   total            629
#
# Scalar entries map [0, 1] to a fraction of the canvas side: widths and taper radii r_s, r_e (full stroke widths) to
# [0, _WIDTH] = [0, 0.02], iris and pupil radii to [0, _RADIUS] = [0, 0.05], brow thickness to [0, _THICK] = [0, 0.05];
# opacities are used as they are. So a vector draws the same at any resolution.
#
# Rendering (§4.4) goes through a display list (avatar_primitives): Prim records in unit coordinates, in artist order,
# that keep their Bezier control points. render_avatar flattens them for PIL ImageDraw on a supersampled canvas (4x up
# to 128 px, 2x above) reduced with Image.reduce; avatar_svg writes the same list as an SVG 1.1 document with true
# cubic `C` commands, one element per primitive.


# · Parameter table

_WIDTH = 0.02      # stroke widths and taper radii (full widths): entry 1.0 = 0.02 of the canvas side
_RADIUS = 0.05     # iris and pupil radii: entry 1.0 = 0.05 of the canvas side
_THICK = 0.05      # eyebrow thickness (full): entry 1.0 = 0.05 of the canvas side

# Fields of each group, in vector order: (field, kind, count). Kinds: "pt" (count (x, y) pairs), "rgb" (count = 1
# colour), "w" width, "r" radius, "t" thickness, "a" opacity (count scalars each).
_EYE_FIELDS = tuple((f"{s}_{f}", k, c) for s in "lr" for f, k, c in (
    ("upper", "pt", 7), ("lower", "pt", 7), ("crease", "pt", 4),
    ("upper_rs", "w", 1), ("upper_re", "w", 1), ("lower_rs", "w", 1), ("lower_re", "w", 1)))
_FIELDS: dict[str, tuple[tuple[str, str, int], ...]] = {
    "skin": (("face", "rgb", 1), ("shadow", "rgb", 1), ("neck", "rgb", 1), ("ear", "rgb", 1)),
    "face_contour": (("pts", "pt", 30), ("width", "w", 1), ("rgb", "rgb", 1)),
    "chin": (("pts", "pt", 7), ("rs", "w", 1), ("re", "w", 1), ("rgb", "rgb", 1)),
    "ears": (("l_outline", "pt", 12), ("l_inner", "pt", 7), ("r_outline", "pt", 12), ("r_inner", "pt", 7),
             ("width", "w", 1), ("inner_rs", "w", 1), ("inner_re", "w", 1)),
    "eye_lids": _EYE_FIELDS + (("crease_w", "w", 1), ("lash", "rgb", 1), ("sclera", "rgb", 1)),
    "iris": (("l_c", "pt", 1), ("l_r", "r", 1), ("r_c", "pt", 1), ("r_r", "r", 1), ("rgb", "rgb", 1),
             ("ring", "rgb", 1), ("ring_w", "w", 1)),
    "pupils": (("l_c", "pt", 1), ("l_r", "r", 1), ("r_c", "pt", 1), ("r_r", "r", 1), ("rgb", "rgb", 1)),
    "eye_highlights": (("l", "pt", 5), ("r", "pt", 5), ("rgb", "rgb", 1)),
    "eyebrows": (("l_spine", "pt", 7), ("l_thick", "t", 5), ("r_spine", "pt", 7), ("r_thick", "t", 5),
                 ("rgb", "rgb", 1), ("stroke", "rgb", 1)),
    "nose": (("side_l", "pt", 4), ("side_r", "pt", 4), ("base", "pt", 7), ("nostril_l", "pt", 4),
             ("nostril_r", "pt", 4), ("rs", "w", 1), ("re", "w", 1), ("rgb", "rgb", 1)),
    "lips": (("upper", "pt", 18), ("lower", "pt", 12), ("line", "pt", 7), ("line_rs", "w", 1), ("line_re", "w", 1),
             ("outline_w", "w", 1), ("upper_rgb", "rgb", 1), ("lower_rgb", "rgb", 1), ("line_rgb", "rgb", 1),
             ("interior_rgb", "rgb", 1)),
    "teeth": (("pts", "pt", 8), ("rgb", "rgb", 1)),
    "shading": tuple((f"{p}_{f}", k, c) for p in ("cheek_l", "cheek_r", "under_nose", "under_lip", "neck", "forehead")
                     for f, k, c in (("pts", "pt", 8), ("rgb", "rgb", 1), ("a", "a", 1))),
}
_KIND_DIMS = {"pt": 2, "rgb": 3, "w": 1, "r": 1, "t": 1, "a": 1}
_DESCRIPTIONS = {
    "skin": "face RGB, shadow RGB (ear inner strokes), neck RGB, ear RGB",
    "face_contour": "closed cubic Bezier head/jaw outline (10 anchors + 20 handles), outline width, outline RGB",
    "chin": "chin crease: open Bezier (3 anchors), r_s, r_e, RGB; tapered",
    "ears": "per ear: closed Bezier outline (4 anchors) + inner curve (3 anchors); outline width, inner r_s, r_e",
    "eye_lids": "per eye: upper and lower lid curves, crease, lid r_s / r_e; crease width, lash RGB, sclera RGB",
    "iris": "per eye centre and radius; iris RGB, ring RGB, ring width",
    "pupils": "per eye centre and radius; pupil RGB",
    "eye_highlights": "per eye a 5-point polygon; highlight RGB",
    "eyebrows": "per brow a spine curve + thickness at 5 stations (filled shape + tapered hair strokes); 2 RGB",
    "nose": "side curves, base, nostrils (Bezier points), r_s, r_e, RGB: y_nose of §4.4",
    "lips": "upper and lower lip closed Bezier outlines, mouth line, line r_s / r_e, outline width, 4 RGB",
    "teeth": "8-point polygon and RGB, inside the mouth opening",
    "shading": "6 polygons (cheeks, under nose, under lip, neck/jaw shadow, forehead highlight): 8 pts + RGB + opacity",
}

#: The avatar vector's groups in order (§3, Fig. 2): (name, dims, what).
AVATAR_GROUPS: tuple[tuple[str, int, str], ...] = tuple(
    (g, sum(_KIND_DIMS[k] * c for _, k, c in fields), _DESCRIPTIONS[g]) for g, fields in _FIELDS.items())
#: Length of an avatar vector (the paper's 629).
AVATAR_DIM: int = 629
assert sum(d for _, d, _ in AVATAR_GROUPS) == AVATAR_DIM, sum(d for _, d, _ in AVATAR_GROUPS)


def _layout() -> tuple[dict[str, slice], dict[str, dict[str, tuple[slice, str, int]]]]:
    """Consecutive slices of the groups and of every field inside them."""
    groups, fields, i = {}, {}, 0
    for g, fs in _FIELDS.items():
        start, fields[g] = i, {}
        for name, kind, count in fs:
            n = _KIND_DIMS[kind] * count
            fields[g][name] = (slice(i, i + n), kind, count)
            i += n
        groups[g] = slice(start, i)
    return groups, fields


#: Where each group lives in the avatar vector.
GROUP_SLICES: dict[str, slice]
#: Where each field lives: {group: {field: (slice, kind, count)}}.
AVATAR_FIELDS: dict[str, dict[str, tuple[slice, str, int]]]
GROUP_SLICES, AVATAR_FIELDS = _layout()


def avatar_to_dict(y) -> dict[str, list[float]]:
    """{group: its entries as Python floats} of one avatar vector (AVATAR_DIM,)."""
    y = _as_vector(y)
    return {g: [float(v) for v in y[s]] for g, s in GROUP_SLICES.items()}


def avatar_from_dict(d: dict) -> np.ndarray:
    """Float32 avatar vector (AVATAR_DIM,) from {group: entries}; every group is required, with its exact length."""
    out = np.zeros(AVATAR_DIM, np.float32)
    for g, s in GROUP_SLICES.items():
        if g not in d:
            raise KeyError(f"missing group {g!r}")
        v = np.asarray(d[g], dtype=np.float32).reshape(-1)
        if v.shape[0] != s.stop - s.start:
            raise ValueError(f"group {g!r} needs {s.stop - s.start} entries, got {v.shape[0]}")
        out[s] = v
    return out


def _as_vector(y) -> np.ndarray:
    """One avatar vector as float64 (AVATAR_DIM,), clipped to [0, 1]; numpy, torch or a sequence."""
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if y.shape[0] != AVATAR_DIM:
        raise ValueError(f"expected an avatar vector of length {AVATAR_DIM}, got {y.shape[0]}")
    if not np.all(np.isfinite(y)):
        raise ValueError("avatar vector has non-finite entries")
    return np.clip(y, 0.0, 1.0)


_SCALE = {"w": _WIDTH, "r": _RADIUS, "t": _THICK, "a": 1.0}


def _get(y: np.ndarray, group: str, field: str):
    """A field of one vector in drawing units: points (count, 2), a colour (3,), scalars (float or (count,))."""
    sl, kind, count = AVATAR_FIELDS[group][field]
    v = y[sl]
    if kind == "pt":
        return v.reshape(count, 2)
    if kind == "rgb":
        return v
    v = v * _SCALE[kind]
    return float(v[0]) if count == 1 else v


# · Bezier helpers (points as (..., 2) arrays; a path is an (S, 4, 2) array of cubic segments)

_KAPPA = 0.5523                                          # circle-quadrant handle length


def _segments(pts: np.ndarray, closed: bool) -> np.ndarray:
    """Cubic segments (S, 4, 2) of a stored control-point list (3K closed, 3K - 2 open)."""
    p = np.asarray(pts, np.float64)
    if closed:
        p = np.concatenate([p, p[:1]])
    s = (len(p) - 1) // 3
    idx = 3 * np.arange(s)[:, None] + np.arange(4)[None]
    return p[idx]


def _smooth(anchors, closed: bool, corners=(), k: float = 1.0 / 3.0) -> np.ndarray:
    """Stored control points (3K or 3K - 2, ...) of a smooth Bezier spline through anchors (..., K, 2).

    Tangents at anchor i follow the neighbours' chord (P[i+1] - P[i-1]); each handle is k times the adjacent
    chord long (a chord-scaled Catmull-Rom). Anchors listed in corners get handles pointing at their neighbours
    (a sharp corner). Leading dimensions are batched.
    """
    a = np.asarray(anchors, np.float64)
    K = a.shape[-2]
    nxt = np.roll(a, -1, axis=-2)
    prv = np.roll(a, 1, axis=-2)
    if not closed:                                       # open ends: reflect the neighbour
        nxt[..., -1, :] = 2 * a[..., -1, :] - a[..., -2, :]
        prv[..., 0, :] = 2 * a[..., 0, :] - a[..., 1, :]
    tang = nxt - prv
    tang /= np.maximum(np.linalg.norm(tang, axis=-1, keepdims=True), 1e-12)
    d_next = np.linalg.norm(nxt - a, axis=-1, keepdims=True)
    d_prev = np.linalg.norm(a - prv, axis=-1, keepdims=True)
    h_out = a + tang * d_next * k
    h_in = a - tang * d_prev * k
    for c in corners:
        h_out[..., c, :] = a[..., c, :] + (nxt[..., c, :] - a[..., c, :]) * k
        h_in[..., c, :] = a[..., c, :] + (prv[..., c, :] - a[..., c, :]) * k
    stacked = np.stack([a, h_out, np.roll(h_in, -1, axis=-2)], axis=-2)      # (..., K, 3, 2)
    out = stacked.reshape(a.shape[:-2] + (3 * K, 2))
    return out if closed else out[..., :3 * K - 2, :]


def _hermite(p, dp, du) -> np.ndarray:
    """Stored open-path points (3K - 2, ...) from anchor values p (..., K, 2) and derivatives dp over steps du."""
    p = np.asarray(p, np.float64)
    dp = np.asarray(dp, np.float64)
    du = np.asarray(du, np.float64)[..., None]
    h_out = p[..., :-1, :] + dp[..., :-1, :] * du / 3.0
    h_in = p[..., 1:, :] - dp[..., 1:, :] * du / 3.0
    body = np.stack([p[..., :-1, :], h_out, h_in], axis=-2).reshape(p.shape[:-2] + (-1, 2))
    return np.concatenate([body, p[..., -1:, :]], axis=-2)


# Bernstein matrix for control points of a cubic through 4 points at t = 0, 1/3, 2/3, 1.
_T4 = np.array([0.0, 1 / 3, 2 / 3, 1.0])
_THROUGH4 = np.linalg.inv(np.stack([(1 - _T4) ** 3, 3 * (1 - _T4) ** 2 * _T4, 3 * (1 - _T4) * _T4 ** 2, _T4 ** 3], 1))


@lru_cache(maxsize=16)
def _bernstein(m: int) -> np.ndarray:
    """(m, 4) cubic Bernstein weights at m evenly spaced parameters in [0, 1]."""
    t = np.linspace(0.0, 1.0, m)[:, None]
    return np.concatenate([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3], 1)


def _flatten(segs: np.ndarray, m: int) -> np.ndarray:
    """Polyline (S * (m - 1) + 1, 2) of a path's segments, m samples per segment."""
    pts = np.einsum("mk,skd->smd", _bernstein(m), segs)
    return np.concatenate([pts[:, :-1].reshape(-1, 2), pts[-1:, -1]])


def _line_seg(a, b) -> np.ndarray:
    """A straight cubic segment (4, 2) from a to b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.stack([a, a + (b - a) / 3, a + 2 * (b - a) / 3, b])


def _ellipse_pts(cx, cy, rx, ry, n: int = 8, phase: float = 0.0) -> np.ndarray:
    """n points on an ellipse (clockwise in image coordinates), batched over array-like cx, cy, rx, ry."""
    t = phase + 2 * np.pi * np.arange(n) / n
    cx, cy, rx, ry = (np.asarray(v, np.float64)[..., None] for v in (cx, cy, rx, ry))
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], -1)


# · Ground truth: the avatar of a synthetic identity (the paper's artist-made avatars, §3 "Dataset", made exact)

# Face-contour anchors on the right half, as a parameter u of the photo's outline (common._outline): u in [0, 0.5]
# is the skull ellipse from the crown (0) to the widest point (0.5), u in [0.5, 1] the jaw from there to the chin.
_U_CONTOUR = np.array([0.0, 0.2778, 0.5, 0.675, 0.834, 1.0])
_GEO_FIELDS = ("W", "yc", "Hu", "Hl", "y_chin", "jk", "jq", "ye", "es", "ew", "yb", "bth", "bang", "yn", "nw",
               "ym", "mw", "lt")


def _outline_xy(g: dict, u: np.ndarray) -> np.ndarray:
    """Right half of the photo's face outline (face coordinates) at parameters u (n, m) -> (n, m, 2)."""
    W, yc, Hu, Hl = (g[k][:, None] for k in ("W", "yc", "Hu", "Hl"))
    jk, jq = g["jk"][:, None], g["jq"][:, None]
    th = 0.5 * np.pi * (1 - 2 * np.clip(u, 0, 0.5))
    s = 0.5 * np.pi * (2 * np.clip(u, 0.5, 1) - 1)
    T = np.sin(s) ** 2
    a2 = np.clip((1 - T * (jq * T + 1 - jq)) / (1 + jk * T), 0.0, None)
    x = np.where(u <= 0.5, W * np.cos(th), W * np.sqrt(a2))
    y = np.where(u <= 0.5, yc - Hu * np.sin(th), yc + Hl * np.sin(s))
    return np.stack([x, y], -1)


def _contour_points(g: dict) -> np.ndarray:
    """Stored face-contour control points (n, 30, 2) in face coordinates: 10 anchors clockwise from the crown."""
    n = len(g["W"])
    u = np.broadcast_to(_U_CONTOUR, (n, 6))
    h = 1e-4
    p = _outline_xy(g, u)
    d_plus = (_outline_xy(g, np.minimum(u + h, 1.0)) - p) / h        # one-sided: the two pieces meet at u = 0.5
    d_minus = (p - _outline_xy(g, np.maximum(u - h, 0.0))) / h
    du = np.diff(_U_CONTOUR)
    h_out = p[:, :-1] + d_plus[:, :-1] * du[None, :, None] / 3
    h_in = p[:, 1:] - d_minus[:, 1:] * du[None, :, None] / 3
    h_out[:, 0, 1] = p[:, 0, 1]                          # horizontal tangent at the crown
    h_out[:, 0, 0] = np.abs(h_out[:, 0, 0])
    right = [p[:, 0]]
    for k in range(5):                                   # crown -> chin, down the right side
        right += [h_out[:, k], h_in[:, k], p[:, k + 1]]
    mirror = np.array([-1.0, 1.0])
    left = []
    for k in range(4, -1, -1):                           # chin -> crown, up the left side (mirrored, reversed)
        left += [h_in[:, k] * mirror, h_out[:, k] * mirror, p[:, k] * mirror]
    pts = np.stack(right + left[:-1], 1)                 # drop the repeated crown: closed path of 30 points
    return pts


def _lips_geometry(g: dict, mouth_open: float):
    """Upper lip (n, 18, 2), lower lip (n, 12, 2), mouth line (n, 7, 2), teeth (n, 8, 2) in face coordinates."""
    mw, ym, lt = g["mw"][:, None], g["ym"][:, None], g["lt"][:, None]
    smile = 0.1                                          # canonical_nuisance's mouth_curve: a neutral face

    def line_y(u):
        return ym + 0.006 * smile - 0.022 * smile * u * u

    def top_y(u):
        return line_y(u) - np.sqrt(np.clip(1 - u * u, 0, 1)) * lt * (1 - 0.3 * np.exp(-30 * u * u))

    uu = np.array([-1.0, -0.32, 0.0, 0.32, 1.0])
    xs = mw * uu
    up = np.stack([xs, top_y(uu[None] + 0 * mw)], -1)                       # corner, peak, dip, peak, corner
    up[:, 0, 1] = line_y(-1.0)[:, 0]
    up[:, 4, 1] = line_y(1.0)[:, 0]
    up[:, 1, 1] -= 0.1 * lt[:, 0]                                             # crisper bow peaks
    up[:, 3, 1] -= 0.1 * lt[:, 0]
    bc = np.stack([0 * mw[:, 0], line_y(0.0)[:, 0] - 0.25 * mouth_open], -1)[:, None]
    upper = _smooth(np.concatenate([up, bc], 1), True, corners=(0, 2, 4))
    lc, rc = up[:, 0], up[:, 4]
    tc = np.stack([0 * mw[:, 0], line_y(0.0)[:, 0]], -1)
    bot = tc + np.stack([0 * mw[:, 0], 1.35 * lt[:, 0]], -1)
    k = _KAPPA
    lower = np.stack([
        lc, lc + (tc - lc) / 3 + [0, 0.0], tc - [1, 0] * (mw * 0.45), tc,    # left corner -> top centre
        tc + [1, 0] * (mw * 0.45), rc + (tc - rc) / 3, rc,                    # -> right corner
        rc + [0, 1] * (1.35 * lt * k * 0.8), bot + [1, 0] * (mw * k), bot,    # -> bottom centre
        bot - [1, 0] * (mw * k), lc + [0, 1] * (1.35 * lt * k * 0.8)], 1)   # -> left corner
    lower = lower + np.array([0.0, 1.0]) * mouth_open * np.array([0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1.0])[:, None]
    # mouth line: the quadratic line_y as an exact Hermite cubic (3 anchors)
    ua = np.array([-0.97, 0.0, 0.97])
    pa = np.stack([mw * ua, line_y(ua[None] + 0 * mw) + 0.5 * mouth_open], -1)
    dpa = np.stack([mw + 0 * ua, -0.044 * smile * ua[None] + 0 * mw], -1)
    mline = _hermite(pa, dpa, np.full((len(mw), 2), 0.97))
    # teeth: a band just under the upper lip's lower edge, inside the mouth line
    tu = np.array([-0.78, -0.28, 0.28, 0.78])
    gap = 0.55 * mouth_open + 0.004
    t_top = np.stack([mw * tu, line_y(tu[None] + 0 * mw) - 0.004], -1)
    t_bot = np.stack([mw * tu[::-1] * 0.95, line_y(tu[None] + 0 * mw)[:, ::-1] + gap], -1)
    teeth = np.concatenate([t_top, t_bot], 1)
    return upper, lower, mline, teeth


def _octagon(cx, cy, rx, ry) -> np.ndarray:
    """8-point polygon approximating an ellipse, batched: (n, 8, 2)."""
    return _ellipse_pts(cx, cy, rx, ry, 8, np.pi / 8)


def _build(g: dict, col: dict, mouth_open: float = 0.0) -> np.ndarray:
    """Vectorised ground truth: layouts g (arrays (n,), common._geometry's fields) and colours (n, 3) -> (n, 629)."""
    n = len(g["W"])
    out = np.zeros((n, AVATAR_DIM), np.float64)
    to_canvas = np.array([0.5, 0.0])                     # face coordinates (x centred) -> unit canvas

    def put(group, field, v, pts=False):
        sl = AVATAR_FIELDS[group][field][0]
        v = np.asarray(v, np.float64)
        if pts:
            v = v + to_canvas
        out[:, sl] = np.broadcast_to(v.reshape(n, -1) if v.ndim > 0 and v.shape[0] == n else v,
                                     (n, sl.stop - sl.start))

    def w(v):
        return v / _WIDTH

    skin = col["skin"]
    W, yc, ye, es, ew = g["W"], g["yc"], g["ye"], g["es"], g["ew"]
    one = np.ones(n)

    # skin (§3: "skin color"): face, shadow, neck and ear tones
    put("skin", "face", skin)
    put("skin", "shadow", skin * [0.72, 0.60, 0.58])
    put("skin", "neck", skin * [0.93, 0.91, 0.91])
    put("skin", "ear", skin * [0.98, 0.92, 0.90])

    # face contour: the photo's outline as a closed cubic Bezier path (§4.4: "cubic Bezier curves for contours")
    cpts = _contour_points(g)
    put("face_contour", "pts", cpts, pts=True)
    put("face_contour", "width", w(0.0055) * one)
    put("face_contour", "rgb", skin * 0.55)

    # chin crease: a short tapered arc above the chin
    yck = g["y_chin"] - 0.045 + 0.1 * (g["ym"] - 0.65)
    cx = np.stack([-0.032 * one, 0 * one, 0.032 * one], 1)
    cy = np.stack([yck - 0.004, yck + 0.002, yck - 0.004], 1)
    chin = _hermite(np.stack([cx, cy], -1), np.stack([0.032 * np.ones((n, 3)), [[0.3, 0.0, -0.3]] * one[:, None]
                                                      * 0.032], -1), np.full((n, 2), 1.0))
    put("chin", "pts", chin, pts=True)
    put("chin", "rs", w(0.005) * one)
    put("chin", "re", w(0.005) * one)
    put("chin", "rgb", skin * 0.74)

    # ears: outline and inner fold, each ear its own coordinates (mirror images here)
    ecx, ecy, ax, ay = W - 0.012, ye + 0.07, 0.034, 0.072
    for side, sx in (("l", -1.0), ("r", 1.0)):
        anc = np.stack([np.stack([ecx - 0.2 * ax, ecy - ay], -1), np.stack([ecx + ax, ecy - 0.25 * ay], -1),
                        np.stack([ecx + 0.25 * ax, ecy + ay * one], -1), np.stack([ecx - ax, ecy + 0 * one], -1)], 1)
        anc = anc * [sx, 1.0]
        put("ears", f"{side}_outline", _smooth(anc, True, k=0.36), pts=True)
        inner = np.stack([np.stack([ecx + 0.05 * ax, ecy - 0.62 * ay], -1),
                          np.stack([ecx + 0.55 * ax, ecy - 0.12 * ay], -1),
                          np.stack([ecx + 0.15 * ax, ecy + 0.55 * ay], -1)], 1) * [sx, 1.0]
        put("ears", f"{side}_inner", _smooth(inner, False), pts=True)
    put("ears", "width", w(0.004) * one)
    put("ears", "inner_rs", w(0.004) * one)
    put("ears", "inner_re", w(0.006) * one)

    # eyes (common._eyes with canonical_nuisance: openness 0.85, light from above): lids as exact Hermite cubics
    op = 0.85
    eh_up, eh_lo = ew * (0.08 + 0.44 * op) * 1.08, ew * (0.26 + 0.06 * op) * 1.05
    ri = 0.48 * ew
    uu = np.array([-1.0, 0.0, 1.0])                       # inner corner, middle, outer corner
    for side, sx in (("l", -1.0), ("r", 1.0)):
        cxe = sx * es

        def lid(h, off, us=uu):
            """Points of y = ye + 0.12 ew u + h (1 - u^2) - off along u (inner -> outer), Hermite exact."""
            x = cxe[:, None] + sx * ew[:, None] * us[None]
            y = ye[:, None] + 0.12 * ew[:, None] * us + h[:, None] * (1 - us * us) - off[:, None]
            dx = sx * ew[:, None] * np.ones_like(us)
            dy = 0.12 * ew[:, None] - 2 * h[:, None] * us
            return _hermite(np.stack([x, y], -1), np.stack([dx, dy], -1), np.diff(us)[None] * one[:, None])

        put("eye_lids", f"{side}_upper", lid(-eh_up, 0 * one), pts=True)
        put("eye_lids", f"{side}_lower", lid(eh_lo, 0 * one), pts=True)
        put("eye_lids", f"{side}_crease", lid(-eh_up * 1.05, 0.45 * eh_up + 0.007, np.array([-0.75, 0.95])),
            pts=True)
        put("eye_lids", f"{side}_upper_rs", w(0.0045) * one)
        put("eye_lids", f"{side}_upper_re", w(0.0095) * one)
        put("eye_lids", f"{side}_lower_rs", w(0.0025) * one)
        put("eye_lids", f"{side}_lower_re", w(0.0035) * one)
        ic = np.stack([cxe, ye + 0.1 * ri], -1)
        put("iris", f"{side}_c", ic, pts=True)
        put("iris", f"{side}_r", ri / _RADIUS)
        put("pupils", f"{side}_c", ic, pts=True)
        put("pupils", f"{side}_r", 0.40 * ri / _RADIUS)
        hl = _ellipse_pts(cxe + 0.32 * ri, ye + 0.1 * ri - 0.34 * ri, 0.2 * ri, 0.2 * ri, 5, -np.pi / 2)
        put("eye_highlights", side, hl, pts=True)
    put("eye_lids", "crease_w", w(0.003) * one)
    put("eye_lids", "lash", np.array([0.09, 0.06, 0.055]) * one[:, None])
    put("eye_lids", "sclera", np.array([0.96, 0.95, 0.93]) * one[:, None])
    put("iris", "rgb", col["iris"])
    put("iris", "ring", col["iris"] * 0.55)
    put("iris", "ring_w", w(0.0035) * one)
    put("pupils", "rgb", np.array([0.04, 0.03, 0.03]) * one[:, None])
    put("eye_highlights", "rgb", np.array([1.0, 1.0, 1.0]) * one[:, None])

    # eyebrows (common._brows): spine y = yb + 0.012 (t^2 - 1) - 0.014 bang t, thickness 2 bth (1 - 0.4 t)
    bl, bc = 1.3 * ew + 0.01, es + 0.008
    tt = np.array([-1.0, 0.0, 1.0])
    for side, sx in (("l", -1.0), ("r", 1.0)):
        x = sx * (bc[:, None] + tt * bl[:, None])
        y = g["yb"][:, None] + 0.012 * (tt * tt - 1) - 0.014 * g["bang"][:, None] * tt
        dx = sx * bl[:, None] * np.ones(3)
        dy = 0.024 * tt[None] - 0.014 * g["bang"][:, None]
        put("eyebrows", f"{side}_spine", _hermite(np.stack([x, y], -1), np.stack([dx, dy * np.ones_like(dx)], -1),
                                                  np.ones((n, 2))), pts=True)
        st = np.linspace(-1, 1, 5)
        put("eyebrows", f"{side}_thick", 2.0 * g["bth"][:, None] * (1 - 0.4 * st) / _THICK)
    brow = np.clip(col["hair"] * 0.75 + 0.05, 0, 1)
    put("eyebrows", "rgb", brow)
    put("eyebrows", "stroke", np.clip(brow * 0.6 + 0.02, 0, 1))

    # nose (§4.4's example): side curves from the bridge to the wings, the base, two nostrils
    nw, yn = g["nw"], g["yn"]
    for side, sx in (("l", -1.0), ("r", 1.0)):
        y0, y3 = ye + 0.075, yn - 0.03
        side_pts = np.stack([np.stack([sx * 0.011 * one, y0], -1), np.stack([sx * 0.013 * one, y0 + 0.45 * (y3 - y0)],
                                                                            -1),
                             np.stack([sx * 0.45 * nw, y3 - 0.03], -1), np.stack([sx * 0.72 * nw, y3], -1)], 1)
        put("nose", f"side_{side}", side_pts, pts=True)
        nos = np.stack([np.stack([sx * 0.75 * nw, yn - 0.011], -1), np.stack([sx * 0.74 * nw, yn + 0.001], -1),
                        np.stack([sx * 0.52 * nw, yn + 0.006], -1), np.stack([sx * 0.36 * nw, yn + 0.003], -1)], 1)
        put("nose", f"nostril_{side}", nos, pts=True)
    ub = np.array([-1.0, 0.0, 1.0])
    bx = 0.92 * nw[:, None] * ub
    by = yn[:, None] + 0.010 - 0.022 * ub * ub
    put("nose", "base", _hermite(np.stack([bx, by], -1), np.stack([0.92 * nw[:, None] * np.ones(3),
                                                                   -0.044 * ub * one[:, None]], -1),
                                 np.ones((n, 2))), pts=True)
    put("nose", "rs", w(0.0025) * one)
    put("nose", "re", w(0.0075) * one)
    put("nose", "rgb", skin * [0.66, 0.55, 0.52])

    # lips and teeth
    upper, lower, mline, teeth = _lips_geometry(g, mouth_open)
    put("lips", "upper", upper, pts=True)
    put("lips", "lower", lower, pts=True)
    put("lips", "line", mline, pts=True)
    put("lips", "line_rs", w(0.0045) * one)
    put("lips", "line_re", w(0.0045) * one)
    put("lips", "outline_w", w(0.0025) * one)
    lips = col["lips"]
    put("lips", "upper_rgb", lips * 0.90)
    put("lips", "lower_rgb", np.clip(lips * 1.02 + 0.02, 0, 1))
    put("lips", "line_rgb", lips * 0.45)
    put("lips", "interior_rgb", lips * 0.28)
    put("teeth", "pts", teeth, pts=True)
    put("teeth", "rgb", np.array([0.96, 0.94, 0.88]) * one[:, None])

    # shading polygons (§4.4: "polygons for color filling, highlights and shadows")
    for side, sx in (("l", -1.0), ("r", 1.0)):
        put("shading", f"cheek_{side}_pts", _octagon(sx * (es + 0.03), ye + 0.11, 0.05 * one, 0.03 * one), pts=True)
        put("shading", f"cheek_{side}_rgb", np.clip(skin * [1.0, 0.80, 0.80] + [0.04, 0.0, 0.0], 0, 1))
        put("shading", f"cheek_{side}_a", 0.30 * one)
    put("shading", "under_nose_pts", _octagon(0 * one, yn + 0.016, 0.75 * nw, 0.0075 * one), pts=True)
    put("shading", "under_nose_rgb", skin * 0.78)
    put("shading", "under_nose_a", 0.35 * one)
    ylip = g["ym"] + 2.4 * g["lt"] + 0.012 + mouth_open
    put("shading", "under_lip_pts", _octagon(0 * one, ylip, 0.5 * g["mw"], 0.008 * one), pts=True)
    put("shading", "under_lip_rgb", skin * 0.80)
    put("shading", "under_lip_a", 0.30 * one)
    # neck / jaw shadow: under the jaw line, as wide as the neck (drawn under the face fill)
    nk = 0.52 * W
    us = np.linspace(0.5, 1.0, 41)
    jaw = _outline_xy(g, np.broadcast_to(us, (n, 41)))
    y_nk = np.take_along_axis(jaw[:, :, 1], np.abs(jaw[:, :, 0] - nk[:, None]).argmin(1)[:, None], 1)[:, 0]
    yt, ych = yc + 0.14, g["y_chin"]
    neck = np.stack([np.stack(v, -1) for v in (
        (-nk, yt), (-nk, y_nk + 0.03), (-0.55 * nk, 0.5 * (y_nk + ych) + 0.035), (0 * one, ych + 0.045),
        (0.55 * nk, 0.5 * (y_nk + ych) + 0.035), (nk, y_nk + 0.03), (nk, yt), (0 * one, yt))], 1)
    put("shading", "neck_pts", neck, pts=True)
    put("shading", "neck_rgb", skin * 0.70)
    put("shading", "neck_a", 0.55 * one)
    put("shading", "forehead_pts", _octagon(0 * one, ye - 0.17, 0.13 * one, 0.05 * one), pts=True)
    put("shading", "forehead_rgb", np.clip(skin * 1.06 + 0.06, 0, 1))
    put("shading", "forehead_a", 0.22 * one)
    return np.clip(out, 0.0, 1.0)


# Entry kinds of every dimension, for the jitter: 0 x, 1 y, 2 colour channel, 3 scalar; and the feature (field)
# each belongs to, so a feature's points move together ("smooth-ish" jitter).
_FEATURES: dict[str, int] = {}


def _feature_id(group: str, field: str) -> int:
    """The feature a field moves with: one eye (lids, iris, pupil, highlight), one brow, one ear, else its group."""
    side = field[0] if field[:2] in ("l_", "r_") or field in ("l", "r") else ""
    if group in ("eye_lids", "iris", "pupils", "eye_highlights") and side:
        key = f"eye_{side}"
    elif group in ("eyebrows", "ears") and side:
        key = f"{group}_{side}"
    elif group == "shading":
        key = "shading_" + field.rsplit("_", 1)[0]
    else:
        key = group
    return _FEATURES.setdefault(key, len(_FEATURES))


def _entry_kinds() -> tuple[np.ndarray, np.ndarray]:
    """(kind per dimension, feature id per dimension)."""
    kinds, fid = np.zeros(AVATAR_DIM, np.int64), np.zeros(AVATAR_DIM, np.int64)
    for g, fs in AVATAR_FIELDS.items():
        for name, (sl, kind, count) in fs.items():
            if kind == "pt":
                kinds[sl] = np.tile([0, 1], count)
            elif kind == "rgb":
                kinds[sl] = 2
            else:
                kinds[sl] = 3
            fid[sl] = _feature_id(g, name)
    return kinds, fid


_ENTRY_KIND, _ENTRY_FIELD = _entry_kinds()
_N_FIELDS = int(_ENTRY_FIELD.max()) + 1
_NOISE_LEN = AVATAR_DIM + 3 * _N_FIELDS                 # own noise per entry + shared (x, y, other) per feature


def _apply_jitter(y: np.ndarray, noise: np.ndarray, jitter: float) -> np.ndarray:
    """Add jitter to vectors y (n, 629) from standard-normal noise (n, _NOISE_LEN); clip to [0, 1].

    Coordinates: std ``jitter`` (canvas units), 80 % of the variance shared by the feature's points (an eye with its
    lids, iris, pupil and highlight, a brow, an ear, the nose, the lips, ...: a feature moves as a whole and deforms
    a little). Colours: std 2.5 jitter per channel, half shared by the triple. Scalar entries
    (widths, radii, opacities): std 5 jitter in entry units.
    """
    own = noise[:, :AVATAR_DIM]
    shared = noise[:, AVATAR_DIM:].reshape(-1, _N_FIELDS, 3)
    axis = np.minimum(_ENTRY_KIND, 2)                 # shared columns: x, y, colours and scalars
    sh = shared[:, _ENTRY_FIELD, axis]
    pt = _ENTRY_KIND <= 1
    r_own = np.where(pt, math.sqrt(0.2), math.sqrt(0.5))
    r_sh = np.where(pt, math.sqrt(0.8), math.sqrt(0.5))
    scale = np.select([pt, _ENTRY_KIND == 2], [jitter, 2.5 * jitter], 5.0 * jitter)
    return np.clip(y + (r_own * own + r_sh * sh) * scale, 0.0, 1.0)


def _identity_arrays(identities) -> tuple[dict, dict]:
    """Layouts (common._geometry) and colours of identities as arrays."""
    geos = [common._geometry(i) for i in identities]
    g = {k: np.array([getattr(x, k) for x in geos], np.float64) for k in _GEO_FIELDS}
    col = {k: np.array([getattr(i, k) for i in identities], np.float64) for k in ("skin", "iris", "lips", "hair")}
    return g, col


def avatar_from_identity(identity: "common.FaceIdentity", rng: np.random.Generator | None = None,
                         jitter: float = 0.0, mouth_open: float = 0.0) -> np.ndarray:
    """The ground-truth avatar vector (float32, (AVATAR_DIM,), in [0, 1]) of a synthetic identity.

    The identity's layout (common._geometry: eye line, spacing and size, brows, nose, mouth, lips, chin, jaw, face
    width) and colours (skin, iris, lips; brows from the hair colour) in the 629-D space, with a neutral expression,
    so the avatar is a clean vector cartoon of the identity's canonical photo. With rng and jitter > 0, adds feature-
    coherent Gaussian jitter (std ``jitter`` canvas units on coordinates, small colour and width jitter).
    ``mouth_open`` (canvas units, 0 = closed) parts the lips and shows the teeth.
    """
    g, col = _identity_arrays([identity])
    y = _build(g, col, mouth_open)
    if rng is not None and jitter > 0:
        y = _apply_jitter(y, rng.standard_normal((1, _NOISE_LEN)), jitter)
    return y[0].astype(np.float32)


def sample_avatars(n: int, seed: int, jitter: float = 0.006) -> np.ndarray:
    """The unpaired avatar set (§4.1, §4.5: the parameter autoencoder trains on 100,000 vectors): (n, 629) float32.

    Row i is avatar_from_identity(common.sample_identity(seed, i), np.random.default_rng([0x5A, seed, i]), jitter):
    reproducible and independent of n. Built in vectorised chunks of 8192.
    """
    n = int(n)
    out = np.empty((n, AVATAR_DIM), np.float32)
    for a in range(0, n, 8192):
        idx = range(a, min(n, a + 8192))
        ids = [common.sample_identity(seed, i) for i in idx]
        g, col = _identity_arrays(ids)
        y = _build(g, col)
        if jitter > 0:
            noise = np.stack([np.random.default_rng([0x5A, int(seed), i]).standard_normal(_NOISE_LEN) for i in idx])
            y = _apply_jitter(y, noise, jitter)
        out[a:a + len(ids)] = y
    return out


# · Hair and accessories (§4.3): a bank of hairstyles outside the 629-D vector

#: Accessory categories (the synthetic world's, common.FACE_CATEGORICAL).
ACCESSORIES: dict[str, tuple[str, ...]] = {"glasses": ("none", "round", "square"),
                                           "facial_hair": ("none", "moustache", "beard", "goatee")}


@dataclass(frozen=True)
class HairStyle:
    """One bank hairstyle: a category of common.FACE_CATEGORICAL['hair_style'] and a variant 0..2.

    For haired categories the variant is the hairline (0 high, 1 mid, 2 low; the tercile of the identity's
    ``hairline``); for bald it is 0 clean, 1 stubble, 2 side fringe.
    """

    name: str
    category: str
    variant: int


_VARIANTS = {"bald": ("clean", "stubble", "fringe")}
#: The hairstyle bank: 8 categories x 3 variants (the paper's bank has 470 artist-made styles).
HAIRSTYLES: tuple[HairStyle, ...] = tuple(
    HairStyle(f"{c}_{_VARIANTS.get(c, ('high', 'mid', 'low'))[v]}", c, v)
    for c in common.FACE_CATEGORICAL["hair_style"] for v in range(3))


def hair_names() -> list[str]:
    """Names of the bank's hairstyles, in bank order (the index is a hair dict's "hairstyle")."""
    return [h.name for h in HAIRSTYLES]


def validate_hair(d: dict) -> dict:
    """Check a hair/accessory dict {"hairstyle", "hair_colour", "glasses", "facial_hair"}; return it, or raise."""
    if not isinstance(d, dict):
        raise ValueError(f"hair parameters must be a dict, got {type(d).__name__}")
    need = {"hairstyle", "hair_colour", "glasses", "facial_hair"}
    if set(d) != need:
        raise ValueError(f"hair dict needs exactly the keys {sorted(need)}; got {sorted(d)}")
    hs = d["hairstyle"]
    if isinstance(hs, bool) or not isinstance(hs, (int, np.integer)) or not 0 <= int(hs) < len(HAIRSTYLES):
        raise ValueError(f"hairstyle must be an int in 0..{len(HAIRSTYLES) - 1}, got {hs!r}")
    try:
        c = np.asarray(d["hair_colour"], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"hair_colour must be 3 numbers in [0, 1], got {d['hair_colour']!r}") from None
    if c.shape != (3,) or not np.all(np.isfinite(c)) or c.min() < 0 or c.max() > 1:
        raise ValueError(f"hair_colour must be 3 numbers in [0, 1], got {d['hair_colour']!r}")
    for k, cats in ACCESSORIES.items():
        if d[k] not in cats:
            raise ValueError(f"{k} must be one of {cats}, got {d[k]!r}")
    return d


def hair_from_identity(identity: "common.FaceIdentity") -> dict:
    """The ground-truth hair/accessory dict of an identity: style and hairline tercile -> bank index, colours."""
    style = identity.hair_style
    v = int(identity.hairline >= 0.362) + int(identity.hairline >= 0.638)        # Beta(1.4, 1.4) terciles
    if style == "bald":
        v = 0
    idx = hair_names().index(f"{style}_{_VARIANTS.get(style, ('high', 'mid', 'low'))[v]}")
    return {"hairstyle": idx, "hair_colour": [float(c) for c in identity.hair], "glasses": identity.glasses,
            "facial_hair": identity.facial_hair}


# · Display list (§4.4): primitives in unit coordinates, in artist order


@dataclass(frozen=True)
class Prim:
    """One drawing primitive of the display list, in unit canvas coordinates.

    kind: "path" (cubic Bezier segments ``segs`` (S, 4, 2); ``closed``; fill and/or stroke), "polygon" (``pts``
    (P, 2), filled), "taper" (an open Bezier spine ``segs`` drawn as the filled outline polygon ``pts`` whose width
    goes from r_s to r_e with thin ends) or "ellipse" (``ellipse`` = (cx, cy, rx, ry); fill and/or stroke).
    fill / stroke: sRGB triples or None; width: stroke width; opacity: fill opacity; group: the class it belongs to.
    rs, re, tip: a taper's start and end widths and the fraction of its length over which each end thins.
    """

    kind: str
    group: str
    fill: tuple | None = None
    stroke: tuple | None = None
    width: float = 0.0
    opacity: float = 1.0
    segs: np.ndarray | None = None
    closed: bool = False
    pts: np.ndarray | None = None
    ellipse: tuple | None = None
    rs: float = 0.0
    re: float = 0.0
    tip: float = 0.18


def _c(rgb) -> tuple:
    """A colour as a tuple of floats clipped to [0, 1]."""
    return tuple(float(min(max(v, 0.0), 1.0)) for v in rgb)


_TAPER_SAMPLES = 10                                      # outline samples per spine segment (resolution independent)


def _taper_outline(segs: np.ndarray, rs: float, re: float, tip: float = 0.18, profile=None) -> np.ndarray:
    """Outline polygon of a tapered stroke along segs: width from rs to re, thinning to points at both ends.

    §4.4: "In order to achieve a natural stroke effect, we taper the end points of the lines." The width at
    arc parameter s is lerp(rs, re, s) * min(1, s / tip, (1 - s) / tip)^0.6 (or ``profile(s)`` if given).
    """
    p = _flatten(segs, _TAPER_SAMPLES)
    d = np.gradient(p, axis=0)
    nrm = np.stack([-d[:, 1], d[:, 0]], 1)
    nrm /= np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-12)
    seg = np.linalg.norm(np.diff(p, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    s /= max(s[-1], 1e-12)
    if profile is None:
        env = np.minimum(1.0, np.minimum(s, 1 - s) / tip) ** 0.6
        half = 0.5 * (rs + (re - rs) * s) * env
    else:
        half = 0.5 * profile(s)
    half = np.maximum(half, 0.0)[:, None]
    return np.concatenate([p + nrm * half, (p - nrm * half)[::-1]])


def _taper(group, segs, rs, re, rgb, opacity: float = 1.0, tip: float = 0.18) -> Prim:
    """A tapered-stroke primitive; its outline polygon is filled in later, in a batch (_finish_tapers)."""
    return Prim("taper", group, fill=_c(rgb), opacity=float(opacity), segs=np.asarray(segs, np.float64),
                rs=float(rs), re=float(re), tip=float(tip))


def _finish_tapers(prims: list[Prim]) -> list[Prim]:
    """Fill in the outline polygons of all pending tapers at once (the batched form of _taper_outline)."""
    pending: dict[int, list[int]] = {}
    for i, p in enumerate(prims):
        if p.kind == "taper" and p.pts is None:
            pending.setdefault(len(p.segs), []).append(i)
    out = list(prims)
    B = _bernstein(_TAPER_SAMPLES)
    for S, idx in pending.items():
        segs = np.stack([prims[i].segs for i in idx])                          # (B, S, 4, 2)
        q = np.einsum("mk,bskd->bsmd", B, segs)
        p = np.concatenate([q[:, :, :-1].reshape(len(idx), -1, 2), q[:, -1:, -1]], 1)   # (B, P, 2)
        d = np.empty_like(p)
        d[:, 1:-1] = p[:, 2:] - p[:, :-2]
        d[:, 0] = p[:, 1] - p[:, 0]
        d[:, -1] = p[:, -1] - p[:, -2]
        nrm = np.stack([-d[..., 1], d[..., 0]], -1)
        nrm /= np.maximum(np.sqrt((nrm * nrm).sum(-1, keepdims=True)), 1e-12)
        seg = np.sqrt((np.diff(p, axis=1) ** 2).sum(-1))
        s = np.concatenate([np.zeros((len(idx), 1)), np.cumsum(seg, 1)], 1)
        s /= np.maximum(s[:, -1:], 1e-12)
        rs = np.array([prims[i].rs for i in idx])[:, None]
        re = np.array([prims[i].re for i in idx])[:, None]
        tip = np.array([prims[i].tip for i in idx])[:, None]
        env = np.minimum(1.0, np.minimum(s, 1 - s) / tip) ** 0.6
        half = (0.5 * (rs + (re - rs) * s) * env)[..., None]
        poly = np.concatenate([p + nrm * half, (p - nrm * half)[:, ::-1]], 1)
        for k, i in enumerate(idx):
            out[i] = dataclasses.replace(prims[i], pts=poly[k])
    return out


def _path(group, segs, closed, fill=None, stroke=None, width=0.0, opacity=1.0) -> Prim:
    """A Bezier path primitive."""
    return Prim("path", group, fill=None if fill is None else _c(fill), stroke=None if stroke is None else _c(stroke),
                width=float(width), opacity=float(opacity), segs=np.asarray(segs, np.float64), closed=closed)


_BACKGROUND = (0.90, 0.92, 0.95)                          # the one fixed background colour
_SHIRT = (0.30, 0.45, 0.62)                               # fixed shirt colour
_FRAME = (0.10, 0.10, 0.13)                               # glasses frames


@dataclass(frozen=True)
class _Head:
    """The head's box from the face-contour anchors: centre x, half width, widest line, crown, chin."""

    cx: float
    W: float
    yc: float
    top: float
    chin: float


def _head(y: np.ndarray) -> _Head:
    """Bounding box of the face contour's anchors (so hair and neck fit any face)."""
    a = _get(y, "face_contour", "pts")[0::3]
    x0, x1 = float(a[:, 0].min()), float(a[:, 0].max())
    i0, i1 = int(a[:, 0].argmin()), int(a[:, 0].argmax())
    return _Head(cx=0.5 * (x0 + x1), W=max(0.5 * (x1 - x0), 0.05), yc=0.5 * (a[i0, 1] + a[i1, 1]),
                 top=float(a[:, 1].min()), chin=float(a[:, 1].max()))


def _darker(rgb, k: float) -> tuple:
    """A colour scaled towards black by k (k < 1) or towards white (k > 1)."""
    c = np.asarray(rgb, np.float64)
    return _c(c * k if k <= 1 else c + (1 - c) * (k - 1))


def _hair_prims(style: HairStyle, colour, hd: _Head) -> tuple[list, list]:
    """(back layer, front layer) primitives of a bank hairstyle fitted to the head box (§4.3, Fig. 4c composites)."""
    cat, v = style.category, style.variant
    col = _c(colour)
    lum = 0.3 * col[0] + 0.59 * col[1] + 0.11 * col[2]
    line = _darker(col, 0.55 if lum > 0.25 else 0.45)
    strand = _darker(col, 0.68) if lum > 0.2 else _darker(col, 1.35)
    lw = 0.005
    cx, W, yc, chin = hd.cx, hd.W, hd.yc, hd.chin
    Hu = max(yc - hd.top, 0.1) + 0.02
    ye = yc - 0.05
    hl = yc - (0.35, 0.3175, 0.285)[v]                   # hairline: high / mid / low (common: yh = 0.075..0.15)
    back: list = []
    front: list = []

    def arc(vs, vt, y_from, y_to, n=9, bump=0.0, nb=0):
        """Points on the grown skull ellipse from the left side at y_from over the crown to the right side at y_to."""
        rx, ry = W + vs, Hu + vt

        def ang(yy):
            return math.asin(max(-1.0, min(1.0, (yc - yy) / ry)))

        a0, a1 = math.pi - ang(y_from), ang(y_to)
        t = np.linspace(a0, a1, n)
        r = 1.0 + (bump * np.abs(np.sin(np.linspace(0, math.pi * nb, n))) if nb else 0.0)
        return np.stack([cx + rx * r * np.cos(t), yc - ry * r * np.sin(t)], 1)

    def shape(anchors, corners, group_layer, fill=col, opacity=1.0, k=1 / 3, stroke=line):
        """A closed, smooth Bezier hair shape with a darker outline."""
        segs = _segments(_smooth(np.asarray(anchors), True, corners, k), True)
        group_layer.append(_path("hair", segs, True, fill=fill, stroke=stroke, width=lw if stroke else 0.0,
                                 opacity=opacity))

    def strands(pairs, width=0.006):
        """A few tapered strands (start, mid, end) in the front layer."""
        for p in pairs:
            segs = _segments(_THROUGH4 @ np.asarray(p, np.float64), False)
            front.append(_taper("hair", segs, width, width * 0.6, strand))

    def hairline(u, y_of_u):
        """Hairline anchors from right (u = +u) to left (u = -u)."""
        us = np.linspace(u, -u, 7)
        return np.stack([cx + us * W, [y_of_u(x) for x in us]], 1)

    if cat == "bald":
        if v == 1:                                       # stubble: a translucent cap
            cap = np.concatenate([arc(0.002, 0.002, ye - 0.07, ye - 0.07, 9),
                                  hairline(0.93, lambda u: hl + 0.12 * u ** 4 + 0.05)])
            shape(cap, (8, 9, 15, 0), front, opacity=0.35, stroke=None)
        elif v == 2:                                     # horseshoe fringe around the sides and back
            for s in (-1, 1):
                pts = np.array([(cx + s * (W + 0.012), ye - 0.11), (cx + s * (W + 0.022), ye - 0.02),
                                (cx + s * (W + 0.008), ye + 0.04), (cx + s * (W - 0.03), ye + 0.02),
                                (cx + s * (W - 0.02), ye - 0.06), (cx + s * (W - 0.01), ye - 0.12)])
                shape(pts, (0, 3), front)
            back.append(_path("hair", _segments(_smooth(arc(0.02, 0.0, ye - 0.06, ye - 0.06, 7)
                                                        + [0, 0.0], False), False), False, stroke=col,
                              width=0.02))
        return back, front

    if cat == "buzz":
        vs, vt, ysb = 0.006, 0.008, ye - 0.02
        sil = arc(vs + 0.004, vt + 0.004, ysb, ysb, 11)
        shape(np.concatenate([sil, [(cx + W * 0.9, ysb + 0.01), (cx - W * 0.9, ysb + 0.01)]]), (10, 11, 12, 0),
              back)
        cap = np.concatenate([arc(vs, vt, ysb, ysb, 11), hairline(0.9, lambda u: hl + 0.01 + 0.10 * u ** 4)])
        shape(cap, (10, 11, 17, 0), front, opacity=0.92)
    elif cat in ("short", "side_part", "ponytail", "curly"):
        vs, vt = {"short": (0.02, 0.035), "side_part": (0.028, 0.048), "ponytail": (0.012, 0.016),
                  "curly": (0.075, 0.07)}[cat]
        ysb = ye + (0.02 if cat != "ponytail" else 0.0)
        nb, bump = (13, 0.035) if cat == "curly" else (0, 0.0)
        if cat == "curly":                               # an afro of puffs around a blob
            for x, yy in arc(vs - 0.01, vt - 0.01, yc + 0.13, yc + 0.13, 15):
                back.append(Prim("ellipse", "hair", fill=col, stroke=line, width=lw, ellipse=(x, yy, 0.055, 0.055)))
            blob = np.concatenate([arc(vs - 0.01, vt - 0.01, yc + 0.13, yc + 0.13, 11), [(cx, yc + 0.16)]])
            back.append(_path("hair", _segments(_smooth(blob, True), True), True, fill=col))
        else:
            sil = arc(vs + 0.006, vt + 0.006, ysb + 0.02, ysb + 0.02, 11)
            shape(np.concatenate([sil, [(cx + W * 0.85, ysb + 0.03), (cx - W * 0.85, ysb + 0.03)]]),
                  (10, 11, 12, 0), back)
        if cat == "ponytail":                            # the tail, hanging behind the right shoulder
            tail = np.array([(cx + 0.45 * W, yc - 0.14), (cx + W + 0.07, yc - 0.02), (cx + W + 0.11, yc + 0.2),
                             (cx + W + 0.12, chin + 0.05), (cx + W + 0.07, chin + 0.2), (cx + W - 0.02, chin + 0.08),
                             (cx + W - 0.01, yc + 0.15), (cx + W - 0.05, yc + 0.02)])
            shape(tail, (4, 5), back)
            back.append(Prim("ellipse", "hair", fill=(0.62, 0.16, 0.22), stroke=line, width=lw,
                             ellipse=(cx + W + 0.045, yc - 0.03, 0.03, 0.02)))
        if cat == "short":
            def hly(u):
                return hl + 0.015 + 0.12 * u ** 4 + 0.018 * abs(math.sin(u * 2.6 * math.pi))
            cap = np.concatenate([arc(vs, vt, ysb, ysb, 11), hairline(0.88, hly)])
            shape(cap, (10, 11, 17, 0), front)
            strands([[(cx + u * W, hly(u) - 0.005), (cx + u * W * 0.95, hl - 0.04), (cx + u * W * 0.8, hl - 0.08),
                      (cx + u * W * 0.6, hl - 0.12)] for u in (-0.55, -0.15, 0.25, 0.6)])
        elif cat == "side_part":
            px = -0.4

            def hly(u):
                if u < px:
                    return hl - 0.005 + 0.08 * ((u - px) / (1 + px)) ** 2
                return hl - 0.005 + 0.11 * ((u - px) / (0.9 - px)) ** 1.4
            cap = np.concatenate([arc(vs, vt, ysb, ysb, 11), hairline(0.88, hly)])
            shape(cap, (10, 11, 17, 0), front)
            front.append(_taper("hair", _segments(_THROUGH4 @ np.array(
                [(cx + px * W, hl - 0.005), (cx + px * W - 0.01, hl - 0.05), (cx + px * W - 0.02, hl - 0.1),
                 (cx + px * W - 0.035, hl - 0.15)]), False), 0.006, 0.003, line))
            strands([[(cx + (px + d) * W, hl - 0.01), (cx + (px + d + 0.15) * W, hly(px + d + 0.2) - 0.02),
                      (cx + (px + d + 0.3) * W, hly(px + d + 0.35) - 0.008),
                      (cx + (px + d + 0.42) * W, hly(px + d + 0.45) - 0.004)] for d in (0.1, 0.4, 0.7)])
        elif cat == "ponytail":
            cap = np.concatenate([arc(vs, vt, ysb, ysb, 11), hairline(0.92, lambda u: hl + 0.07 * u ** 4)])
            shape(cap, (10, 11, 17, 0), front)
            strands([[(cx + u * W, hl + 0.07 * u ** 4 - 0.004), (cx + u * W * 1.05, hl - 0.05),
                      (cx + u * W * 1.08, hl - 0.1), (cx + u * W * 1.1, hl - 0.15)] for u in (-0.4, 0.0, 0.4)],
                    0.005)
        else:                                            # curly: a row of curls along the hairline
            cap = np.concatenate([arc(vs * 0.5, vt * 0.5, ysb, ysb, 11), hairline(0.9, lambda u: hl + 0.09 * u ** 4)])
            shape(cap, (10, 11, 17, 0), front, stroke=None)
            for u in np.linspace(-0.9, 0.9, 8):
                yy = hl + 0.09 * u ** 4 - 0.004
                front.append(Prim("ellipse", "hair", fill=col, stroke=line, width=lw * 0.8,
                                  ellipse=(cx + u * W, yy, 0.04, 0.034)))
    elif cat in ("long", "bob"):
        if cat == "long":
            vs, vt = 0.035, 0.04
            y_bot = min(chin + 0.2, 1.02)
            sil = np.concatenate([[(cx - W - 0.13, y_bot)], arc(vs + 0.01, vt + 0.006, yc, yc, 11),
                                  [(cx + W + 0.13, y_bot), (cx + W * 0.6, y_bot + 0.01), (cx - W * 0.6, y_bot + 0.01)]])
            shape(sil, (0, 12, 13, 14), back)

            def hly(u):
                return hl - 0.01 + 0.14 * abs(u) ** 1.5
            y_side = chin - 0.04
            cap = np.concatenate([[(cx - W - 0.05, y_side)], arc(vs, vt, yc, yc, 11), [(cx + W + 0.05, y_side),
                                                                                       (cx + 0.86 * W, y_side - 0.06),
                                                                                       (cx + 0.84 * W, yc)],
                                  hairline(0.8, hly), [(cx - 0.84 * W, yc), (cx - 0.86 * W, y_side - 0.06)]])
            shape(cap, (0, 12, 13, 23), front)
            front.append(_taper("hair", _segments(_THROUGH4 @ np.array(
                [(cx, hl - 0.01), (cx, hl - 0.05), (cx + 0.004, hl - 0.1), (cx + 0.01, hl - 0.14)]), False),
                0.006, 0.003, line))
            strands([[(cx + s * 0.3 * W, hly(0.3) - 0.01), (cx + s * 0.7 * W, hly(0.7)), (cx + s * 0.92 * W, yc),
                      (cx + s * (W + 0.02), y_side - 0.05)] for s in (-1, 1)])
        else:
            vs, vt = 0.055, 0.045
            y_bot = chin - 0.03
            sil = np.concatenate([[(cx - W - 0.08, y_bot)], arc(vs + 0.01, vt + 0.006, yc, yc, 11),
                                  [(cx + W + 0.08, y_bot), (cx, y_bot + 0.012)]])
            shape(sil, (0, 12), back)
            bang = ye - 0.09 - 0.01 * (v - 1)
            y_side = chin - 0.06
            cap = np.concatenate([[(cx - W - 0.07, y_side)], arc(vs, vt, yc, yc, 11), [(cx + W + 0.07, y_side),
                                                                                       (cx + 0.84 * W, y_side - 0.01),
                                                                                       (cx + 0.8 * W, bang)],
                                  hairline(0.76, lambda u: bang + 0.006 * u * u), [(cx - 0.8 * W, bang),
                                                                                  (cx - 0.84 * W, y_side - 0.01)]])
            shape(cap, (0, 12, 13, 14, 22, 23), front)
            strands([[(cx + u * W, bang - 0.005), (cx + u * W * 0.9, bang - 0.05), (cx + u * W * 0.75, bang - 0.1),
                      (cx + u * W * 0.55, bang - 0.15)] for u in (-0.5, -0.1, 0.3, 0.65)])
    return back, front


def _face_x_at(y: np.ndarray, yy: float) -> float:
    """Half width of the face contour at height yy (from its flattened outline, right half)."""
    p = _flatten(_segments(_get(y, "face_contour", "pts"), True), 8)
    hd = _head(y)
    right = p[p[:, 0] >= hd.cx]
    if len(right) == 0:
        return hd.W
    i = int(np.abs(right[:, 1] - yy).argmin())
    return float(right[i, 0] - hd.cx)


def _accessory_prims(y: np.ndarray, hair: dict, which: str) -> list:
    """Facial hair (which = "facial_hair") or glasses (which = "glasses") primitives placed from the vector."""
    out: list = []
    kind = hair[which]
    if kind == "none":
        return out
    hd = _head(y)
    col = _c(hair["hair_colour"])
    if which == "facial_hair":
        fh = _c(np.asarray(col) * 0.85 + 0.02)
        line = _darker(fh, 0.6)
        up = _get(y, "lips", "upper")
        lo = _get(y, "lips", "lower")
        lc, rc, dip = up[0], up[12], up[6]
        nose_base = _get(y, "nose", "base")[3]
        bot = lo[9]
        mw = 0.5 * (rc[0] - lc[0])
        mid_y = 0.5 * (nose_base[1] + dip[1])
        mous = np.array([(lc[0] - 0.018, lc[1] + 0.012), (lc[0] + 0.1 * mw, mid_y - 0.002),
                         (0.5 * (lc[0] + rc[0]), nose_base[1] + 0.008), (rc[0] - 0.1 * mw, mid_y - 0.002),
                         (rc[0] + 0.018, rc[1] + 0.012), (rc[0] - 0.15 * mw, dip[1] - 0.004),
                         (0.5 * (lc[0] + rc[0]), dip[1] - 0.004), (lc[0] + 0.15 * mw, dip[1] - 0.004)])
        under = []
        if kind == "goatee":
            g = np.array([(lc[0] - 0.012, lc[1] + 0.004), (lc[0] - 0.006, 0.5 * (bot[1] + hd.chin)),
                          (hd.cx, hd.chin + 0.006), (rc[0] + 0.006, 0.5 * (bot[1] + hd.chin)),
                          (rc[0] + 0.012, rc[1] + 0.004), (rc[0] - 0.1 * mw, bot[1] + 0.001),
                          (hd.cx, bot[1] + 0.008), (lc[0] + 0.1 * mw, bot[1] + 0.001)])
            under.append(g)
        elif kind == "beard":
            ye = hd.yc - 0.05
            segs = _segments(_get(y, "face_contour", "pts"), True)[2:8]          # widest right -> chin -> widest left
            segs = (segs - [hd.cx, hd.yc]) * [1.035, 1.03] + [hd.cx, hd.yc]
            xr = _face_x_at(y, ye + 0.04)
            top = np.array([(hd.cx - xr + 0.005, ye + 0.02), (lc[0] - 0.03, mid_y - 0.01),
                            (lc[0] - 0.012, lc[1] + 0.004), (hd.cx - 0.4 * mw, bot[1] + 0.003), (hd.cx, bot[1] + 0.008),
                            (hd.cx + 0.4 * mw, bot[1] + 0.003), (rc[0] + 0.012, rc[1] + 0.004),
                            (rc[0] + 0.03, mid_y - 0.01), (hd.cx + xr - 0.005, ye + 0.02)])
            tsegs = _segments(_smooth(top, False, corners=(2, 6)), False)
            join_r = _line_seg(segs[-1][-1], tsegs[0][0])
            join_l = _line_seg(tsegs[-1][-1], segs[0][0])
            beard = np.concatenate([segs, [join_r], tsegs, [join_l]])
            out.append(_path("facial_hair", beard, True, fill=fh, stroke=line, width=0.004))
        for g in under:
            out.append(_path("facial_hair", _segments(_smooth(g, True, corners=(0, 4)), True), True, fill=fh,
                             stroke=line, width=0.004))
        out.append(_path("facial_hair", _segments(_smooth(mous, True, corners=(0, 4)), True), True, fill=fh,
                         stroke=line, width=0.004))
        return out
    # glasses: rims around the eyes (from the lid corners), bridge, temple arms to the face sides
    eyes = []
    for s in "lr":
        upl = _get(y, "eye_lids", f"{s}_upper")
        c = 0.5 * (upl[0] + upl[6])
        eyes.append((c, 0.5 * abs(upl[6][0] - upl[0][0])))
    ew = max(0.5 * (eyes[0][1] + eyes[1][1]), 0.02)
    rg = 1.45 * ew + 0.012
    rgy = rg if kind == "round" else 0.8 * rg
    fw = 0.0065
    inner_x = []
    for (c, _), sgn in zip(eyes, (-1, 1)):
        cy = c[1] + 0.004
        if kind == "round":
            out.append(Prim("ellipse", "glasses", stroke=_FRAME, width=fw, ellipse=(float(c[0]), float(cy), rg, rgy)))
        else:
            r = 0.35 * rgy
            x0, x1, y0, y1 = c[0] - rg, c[0] + rg, cy - rgy, cy + rgy
            k = r * (1 - _KAPPA)
            segs = np.array([
                _line_seg((x0 + r, y0), (x1 - r, y0)), [(x1 - r, y0), (x1 - k, y0), (x1, y0 + k), (x1, y0 + r)],
                _line_seg((x1, y0 + r), (x1, y1 - r)), [(x1, y1 - r), (x1, y1 - k), (x1 - k, y1), (x1 - r, y1)],
                _line_seg((x1 - r, y1), (x0 + r, y1)), [(x0 + r, y1), (x0 + k, y1), (x0, y1 - k), (x0, y1 - r)],
                _line_seg((x0, y1 - r), (x0, y0 + r)), [(x0, y0 + r), (x0, y0 + k), (x0 + k, y0), (x0 + r, y0)]])
            out.append(_path("glasses", segs, True, stroke=_FRAME, width=fw))
        inner_x.append(float(c[0] - sgn * rg))
        side = hd.cx + sgn * (_face_x_at(y, float(c[1])) + 0.006)
        arm_y = float(c[1] - 0.3 * rgy)
        out.append(_path("glasses", _line_seg((c[0] + sgn * rg, arm_y), (side, arm_y - 0.006))[None], False,
                         stroke=_FRAME, width=fw))
    by = float(0.5 * (eyes[0][0][1] + eyes[1][0][1]) - 0.25 * rgy)
    bridge = np.array([[(inner_x[0], by), (inner_x[0] + 0.3 * (inner_x[1] - inner_x[0]), by - 0.012),
                        (inner_x[0] + 0.7 * (inner_x[1] - inner_x[0]), by - 0.012), (inner_x[1], by)]])
    out.append(_path("glasses", bridge, False, stroke=_FRAME, width=fw))
    return out


# Hair strokes of an eyebrow: (start, end) along the spine and a sideways offset (fraction of the local thickness).
_BROW_STROKES = np.array([(0.03, 0.38, 0.25), (0.18, 0.58, -0.22), (0.36, 0.76, 0.18), (0.55, 0.95, -0.1)])


def _brow_prims(y: np.ndarray, side: str) -> list:
    """An eyebrow composite (§4.4, Fig. 4c): a filled tapered body along the spine plus tapered hair strokes."""
    spine = _segments(_get(y, "eyebrows", f"{side}_spine"), False)
    th = _get(y, "eyebrows", f"{side}_thick")
    st = np.linspace(0, 1, 5)

    def prof(s):
        """Thickness along the spine: the 5 stations, blunt-rounded inner end, tapered outer end."""
        env = np.minimum(1.0, s / 0.07) ** 0.5 * np.minimum(1.0, (1 - s) / 0.3) ** 0.8
        return np.interp(s, st, th) * env

    body = _taper_outline(spine, 0, 0, profile=prof)
    out = [Prim("taper", "eyebrows", fill=_c(_get(y, "eyebrows", "rgb")), segs=spine, pts=body)]
    P = len(body) // 2
    upper, lower = body[:P], body[P:][::-1]
    mid, halfv = 0.5 * (upper + lower), 0.5 * (upper - lower)              # spine points and half-thickness vectors
    sp = np.linspace(0, 1, P)                                               # (samples are near-uniform in s)
    ts = _BROW_STROKES[:, :1] + (_BROW_STROKES[:, 1:2] - _BROW_STROKES[:, :1]) * np.linspace(0, 1, 4)[None]
    k = np.interp(ts.ravel(), sp, np.arange(P)).reshape(4, 4)
    i0 = np.minimum(k.astype(int), P - 2)
    f = (k - i0)[..., None]
    base = mid[i0] * (1 - f) + mid[i0 + 1] * f
    hv = halfv[i0] * (1 - f) + halfv[i0 + 1] * f
    lean = np.array([1.0, 0.0, -0.5, -1.0])[None, :, None] * 0.3            # strokes lean towards the outer end
    pts = base + hv * (2 * _BROW_STROKES[:, 2:3, None] + lean)
    stroke = _get(y, "eyebrows", "stroke")
    for j in range(4):
        w = float(0.3 * np.interp(0.5 * (_BROW_STROKES[j, 0] + _BROW_STROKES[j, 1]), st, th))
        out.append(_taper("eyebrows", _segments(_THROUGH4 @ pts[j], False), w, 0.6 * w, stroke))
    return out


def avatar_primitives(y, hair: dict | None = None) -> list[Prim]:
    """The display list of an avatar vector (+ optional hair/accessory dict), in artist order (§4.4).

    Order: background, back hair, neck and shoulders, ears, neck shadow, face fill, shading polygons, face contour,
    chin, eyes (sclera, iris, pupil, highlight, lid skin, lid lines, crease), eyebrows, nose, mouth interior, teeth,
    lips, mouth line, facial hair, front hair, glasses. Coordinates in the unit canvas.
    """
    y = _as_vector(y)
    if hair is not None:
        validate_hair(hair)
    hd = _head(y)
    skin = _get(y, "skin", "face")
    P: list[Prim] = [Prim("polygon", "background", fill=_BACKGROUND,
                          pts=np.array([(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]))]
    back, front = ([], [])
    if hair is not None:
        back, front = _hair_prims(HAIRSTYLES[int(hair["hairstyle"])], hair["hair_colour"], hd)
    P += back

    # neck and shoulders (fixed shirt colour), fitted to the head box
    out_rgb = _get(y, "face_contour", "rgb")
    ow = _get(y, "face_contour", "width")
    nk = 0.52 * hd.W
    yn0, ysh = hd.yc + 0.12, hd.chin + 0.08
    neck = np.array([(hd.cx - nk, yn0), (hd.cx + nk, yn0), (hd.cx + nk * 1.02, ysh - 0.02),
                     (hd.cx + nk * 1.25, ysh + 0.06), (hd.cx - nk * 1.25, ysh + 0.06), (hd.cx - nk * 1.02, ysh - 0.02)])
    P.append(_path("neck", _segments(_smooth(neck, True, corners=(0, 1, 3, 4), k=0.3), True), True,
                   fill=_get(y, "skin", "neck"), stroke=out_rgb, width=ow))
    shirt = np.array([(hd.cx - 1.2, 1.3), (hd.cx - 0.48, ysh + 0.09), (hd.cx - nk * 1.1, ysh + 0.012),
                      (hd.cx, ysh + 0.05), (hd.cx + nk * 1.1, ysh + 0.012), (hd.cx + 0.48, ysh + 0.09),
                      (hd.cx + 1.2, 1.3)])
    P.append(_path("neck", _segments(_smooth(shirt, True, corners=(0, 2, 4, 6), k=0.3), True), True,
                   fill=_SHIRT, stroke=_darker(_SHIRT, 0.6), width=ow))
    # ears (drawn before the face, which hides their inner side)
    ear_rgb, shadow = _get(y, "skin", "ear"), _get(y, "skin", "shadow")
    for s in "lr":
        P.append(_path("ears", _segments(_get(y, "ears", f"{s}_outline"), True), True, fill=ear_rgb, stroke=out_rgb,
                       width=_get(y, "ears", "width")))
        P.append(_taper("ears", _segments(_get(y, "ears", f"{s}_inner"), False), _get(y, "ears", "inner_rs"),
                        _get(y, "ears", "inner_re"), shadow))
    # the jaw's shadow on the neck goes under the face fill; the other shading polygons over it
    shade = {}
    for name in ("cheek_l", "cheek_r", "under_nose", "under_lip", "neck", "forehead"):
        shade[name] = Prim("polygon", "shading", fill=_c(_get(y, "shading", f"{name}_rgb")),
                           opacity=_get(y, "shading", f"{name}_a"), pts=_get(y, "shading", f"{name}_pts"))
    P.append(shade["neck"])
    contour = _segments(_get(y, "face_contour", "pts"), True)
    P.append(_path("skin", contour, True, fill=skin))
    P += [shade[k] for k in ("forehead", "cheek_l", "cheek_r", "under_nose", "under_lip")]
    P.append(_path("face_contour", contour, True, stroke=out_rgb, width=ow))
    P.append(_taper("chin", _segments(_get(y, "chin", "pts"), False), _get(y, "chin", "rs"), _get(y, "chin", "re"),
                    _get(y, "chin", "rgb")))

    # eyes: sclera, iris (with its ring), pupil, highlight; then lid skin (which trims the iris), lid lines, crease
    lash, sclera = _get(y, "eye_lids", "lash"), _get(y, "eye_lids", "sclera")
    for s in "lr":
        up = _segments(_get(y, "eye_lids", f"{s}_upper"), False)
        lo = _segments(_get(y, "eye_lids", f"{s}_lower"), False)
        sc = np.concatenate([up, lo[::-1, ::-1]])
        P.append(_path("eye_lids", sc, True, fill=sclera))
        ic, ir = _get(y, "iris", f"{s}_c")[0], _get(y, "iris", f"{s}_r")
        P.append(Prim("ellipse", "iris", fill=_c(_get(y, "iris", "rgb")), stroke=_c(_get(y, "iris", "ring")),
                      width=min(_get(y, "iris", "ring_w"), ir), ellipse=(float(ic[0]), float(ic[1]), ir, ir)))
        pc, pr = _get(y, "pupils", f"{s}_c")[0], _get(y, "pupils", f"{s}_r")
        P.append(Prim("ellipse", "pupils", fill=_c(_get(y, "pupils", "rgb")),
                      ellipse=(float(pc[0]), float(pc[1]), pr, pr)))
        P.append(Prim("polygon", "eye_highlights", fill=_c(_get(y, "eye_highlights", "rgb")),
                      pts=_get(y, "eye_highlights", s)))
        # lid skin: closes the opening above the upper lid and below the lower lid in the skin colour
        h = 1.6 * max(ir, pr) + 0.012
        a0, a1 = up[0, 0], up[-1, -1]
        cap_up = np.array([[a1, a1 + [0, -h], a0 + [0, -h], a0]])
        P.append(_path("eye_lids", np.concatenate([up, cap_up]), True, fill=skin))
        b0, b1 = lo[0, 0], lo[-1, -1]
        cap_lo = np.array([[b1, b1 + [0, h], b0 + [0, h], b0]])
        P.append(_path("eye_lids", np.concatenate([lo, cap_lo]), True, fill=skin))
        P.append(_taper("eye_lids", lo, _get(y, "eye_lids", f"{s}_lower_rs"), _get(y, "eye_lids", f"{s}_lower_re"),
                        lash, tip=0.3))
        P.append(_taper("eye_lids", up, _get(y, "eye_lids", f"{s}_upper_rs"), _get(y, "eye_lids", f"{s}_upper_re"),
                        lash, tip=0.12))
        cw = _get(y, "eye_lids", "crease_w")
        P.append(_taper("eye_lids", _segments(_get(y, "eye_lids", f"{s}_crease"), False), cw, cw, lash,
                        opacity=0.4, tip=0.35))
    for s in "lr":
        P += _brow_prims(y, s)

    # nose: y_nose = {(x, y)^N, r_s, r_e, R, G, B} (§4.4): sides taper r_s -> r_e, base and nostrils at r_e
    rs, re, nrgb = _get(y, "nose", "rs"), _get(y, "nose", "re"), _get(y, "nose", "rgb")
    for f in ("side_l", "side_r"):
        P.append(_taper("nose", _segments(_get(y, "nose", f), False), rs, re, nrgb, tip=0.3))
    P.append(_taper("nose", _segments(_get(y, "nose", "base"), False), re, re, nrgb, tip=0.25))
    for f in ("nostril_l", "nostril_r"):
        P.append(_taper("nose", _segments(_get(y, "nose", f), False), re, 0.8 * re, nrgb, tip=0.3))

    # mouth: interior (between the upper lip's lower edge and the lower lip's upper edge), teeth, lips, mouth line
    up = _segments(_get(y, "lips", "upper"), True)
    lo = _segments(_get(y, "lips", "lower"), True)
    interior = np.concatenate([up[4:6], lo[0:2]])
    P.append(_path("lips", interior, True, fill=_get(y, "lips", "interior_rgb")))
    P.append(Prim("polygon", "teeth", fill=_c(_get(y, "teeth", "rgb")), pts=_get(y, "teeth", "pts")))
    olw, lrgb = _get(y, "lips", "outline_w"), _get(y, "lips", "line_rgb")
    P.append(_path("lips", lo, True, fill=_get(y, "lips", "lower_rgb"), stroke=lrgb, width=olw))
    P.append(_path("lips", up, True, fill=_get(y, "lips", "upper_rgb"), stroke=lrgb, width=olw))
    P.append(_taper("lips", _segments(_get(y, "lips", "line"), False), _get(y, "lips", "line_rs"),
                    _get(y, "lips", "line_re"), lrgb, tip=0.2))
    if hair is not None:
        P += _accessory_prims(y, hair, "facial_hair")
        P += front
        P += _accessory_prims(y, hair, "glasses")
    return _finish_tapers(P)


# · Rendering with PIL (§4.4: "we use Python, and the PIL library as our primary drawing library")


def _supersampling(size: int) -> int:
    """Supersampling factor: 4x up to 128 px, 2x above."""
    return 4 if size <= 128 else 2


@lru_cache(maxsize=4096)
def _rgb8(c: tuple) -> tuple[int, int, int]:
    """sRGB float triple (a tuple) -> 8-bit tuple."""
    return tuple(int(round(255 * min(max(float(v), 0.0), 1.0))) for v in c)


def _draw(prims: list[Prim], canvas: int) -> Image.Image:
    """Draw a display list on an RGB canvas of canvas x canvas pixels (no downsampling)."""
    img = Image.new("RGB", (canvas, canvas), _rgb8(_BACKGROUND))
    draw = ImageDraw.Draw(img)
    drawa = ImageDraw.Draw(img, "RGBA")                  # blends fills with alpha (fill-opacity)
    m = int(min(max(6 + canvas // 40, 8), 64))          # samples per Bezier segment
    # flatten every path's segments in one batch
    paths = [p for p in prims if p.kind == "path"]
    flat = {}
    if paths:
        segs = np.concatenate([p.segs for p in paths]) * canvas - 0.5
        pts = np.einsum("mk,skd->smd", _bernstein(m), segs)
        i = 0
        for p in paths:
            s = len(p.segs)
            q = pts[i:i + s]
            flat[id(p)] = np.concatenate([q[:, :-1].reshape(-1, 2), q[-1:, -1]]).ravel().tolist()
            i += s
    for p in prims:
        fill = None if p.fill is None else _rgb8(p.fill)
        d = draw
        if fill is not None and p.opacity < 1.0:
            fill = fill + (int(round(255 * p.opacity)),)
            d = drawa
        if p.kind == "path":
            xy = flat[id(p)]
            if fill is not None:
                d.polygon(xy, fill=fill)
            if p.stroke is not None and p.width > 0:
                w = max(1, int(round(p.width * canvas)))
                if p.closed:
                    xy = xy + xy[:2]
                draw.line(xy, fill=_rgb8(p.stroke), width=w, joint="curve")
        elif p.kind in ("polygon", "taper"):
            d.polygon((p.pts * canvas - 0.5).ravel().tolist(), fill=fill)
        elif p.kind == "ellipse":
            cx, cy, rx, ry = (v * canvas for v in p.ellipse)
            cx, cy = cx - 0.5, cy - 0.5
            if fill is not None:
                d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)
            if p.stroke is not None and p.width > 0:
                w = max(1, int(round(p.width * canvas)))
                h = 0.5 * w                              # PIL strokes inside the box; SVG centres the stroke
                draw.ellipse((cx - rx - h, cy - ry - h, cx + rx + h, cy + ry + h), outline=_rgb8(p.stroke), width=w)
    return img


def render_avatar(y, size: int = 64, hair: dict | None = None) -> np.ndarray:
    """Render an avatar vector (+ optional hair dict) as uint8 (size, size, 3) RGB (deterministic; size 16..2048).

    Draws the display list (avatar_primitives) with PIL on a canvas supersampled 4x (size <= 128) or 2x, then
    box-downsamples it with Image.reduce.
    """
    size = int(size)
    if not 16 <= size <= 2048:
        raise ValueError(f"size must be in 16..2048, got {size}")
    ss = _supersampling(size)
    img = _draw(avatar_primitives(y, hair), size * ss)
    return np.asarray(img.reduce(ss))


def render_avatar_batch(ys, size: int = 64, hairs: list | None = None):
    """Render a batch of avatar vectors (N, 629) (numpy or torch) as a uint8 torch tensor (N, 3, size, size)."""
    if hasattr(ys, "detach"):
        ys = ys.detach().cpu().numpy()
    ys = np.asarray(ys, dtype=np.float64).reshape(-1, AVATAR_DIM)
    if hairs is not None and len(hairs) != len(ys):
        raise ValueError(f"got {len(hairs)} hair dicts for {len(ys)} avatars")
    out = np.empty((len(ys), size, size, 3), np.uint8)
    for i, y in enumerate(ys):
        out[i] = render_avatar(y, size, None if hairs is None else hairs[i])
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


# · SVG: the same display list as a standalone SVG 1.1 document (true cubic Bezier commands)


def _hex(c) -> str:
    """sRGB float triple -> #rrggbb."""
    return "#{:02x}{:02x}{:02x}".format(*_rgb8(c))


def _path_d(segs: np.ndarray, closed: bool, size: int) -> str:
    """SVG path data 'M .. C .. (Z)' of cubic segments (unit coordinates scaled to size)."""
    s = segs * size
    out = [f"M{s[0, 0, 0]:.2f} {s[0, 0, 1]:.2f}"]
    prev = s[0, 0]
    for seg in s:
        if np.abs(seg[0] - prev).max() > 1e-6:
            out.append(f"L{seg[0, 0]:.2f} {seg[0, 1]:.2f}")
        out.append("C" + " ".join(f"{x:.2f} {y:.2f}" for x, y in seg[1:]))
        prev = seg[3]
    if closed:
        out.append("Z")
    return "".join(out)


def avatar_svg(y, size: int = 512, hair: dict | None = None) -> str:
    """A standalone SVG 1.1 document of an avatar (width = height = size, viewBox 0 0 size size).

    One element per display-list primitive, in artist order, each with class = its group: Bezier paths as
    <path d="M .. C .. Z">, polygons as <polygon>, ellipses as <circle>/<ellipse>, tapered strokes as filled <path>s.
    """
    size = int(size)
    root = ET.Element("svg", {"xmlns": "http://www.w3.org/2000/svg", "version": "1.1", "width": str(size),
                              "height": str(size), "viewBox": f"0 0 {size} {size}"})
    for p in avatar_primitives(y, hair):
        a = {"class": p.group}
        a["fill"] = "none" if p.fill is None else _hex(p.fill)
        if p.fill is not None and p.opacity < 1.0:
            a["fill-opacity"] = f"{p.opacity:.4f}"
        if p.stroke is not None and p.width > 0:
            a.update({"stroke": _hex(p.stroke), "stroke-width": f"{p.width * size:.3f}", "stroke-linejoin": "round"})
        if p.kind == "path":
            ET.SubElement(root, "path", {"d": _path_d(p.segs, p.closed, size), **a})
        elif p.kind == "polygon":
            ET.SubElement(root, "polygon", {"points": " ".join(f"{x * size:.2f},{y_ * size:.2f}" for x, y_ in p.pts),
                                            **a})
        elif p.kind == "taper":
            q = p.pts * size
            d = f"M{q[0, 0]:.2f} {q[0, 1]:.2f}" + "".join(f"L{x:.2f} {y_:.2f}" for x, y_ in q[1:]) + "Z"
            ET.SubElement(root, "path", {"d": d, **a})
        else:
            cx, cy, rx, ry = (v * size for v in p.ellipse)
            if abs(rx - ry) < 1e-9:
                ET.SubElement(root, "circle", {"cx": f"{cx:.2f}", "cy": f"{cy:.2f}", "r": f"{rx:.2f}", **a})
            else:
                ET.SubElement(root, "ellipse", {"cx": f"{cx:.2f}", "cy": f"{cy:.2f}", "rx": f"{rx:.2f}",
                                                "ry": f"{ry:.2f}", **a})
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode")


# ======================================================================================================================
# Arguments (the paper's values as defaults; §4.5 unless said otherwise)
# ======================================================================================================================


@dataclass
class Args(common.RunArgs):
    # Data
    faces: str = "synthetic"
    """portraits of the unpaired image autoencoder: synthetic (the embedded face world) or folder (--faces-dir)"""
    faces_dir: str = ""
    """a folder of aligned face photos (any size; resized) for the image autoencoder; sets --faces folder"""
    pairs_file: str = ""
    """a JSON-lines file of real pairs, one per line: {"photo": path (relative to the file), "avatar": 629 numbers
    in [0, 1] (the group table of this script), "split": train, val or test (optional; default train), "hair": an
    optional hair dict}; empty means the synthetic world's pairs"""
    world_seed: int = 0
    """seed of the synthetic face world (common.py §7)"""
    image_size: int = 256
    """portrait size: "aligned 256x256 resolution faces" (§4.5); the synthetic world renders 128 px and upsamples"""
    n_photos: int = 90000
    """unpaired portraits of the image autoencoder: "a total of 90000 aligned ... faces" (§4.5)"""
    n_vectors: int = 100000
    """unpaired avatar vectors of the parameter autoencoder: "trained on 100000 vector avatars" (§4.5)"""
    vector_jitter: float = 0.006
    """std of the jitter on every coordinate of the sampled unpaired avatars (canvas units; ours)"""
    pair_identities: int = 393
    """identities of the paired set: "393 pairs of real captured portraits and ... avatar parameters" (§3)"""
    n_pairs: int = 9970
    """paired samples after augmentation: "our dataset comprises a total of 9970 paired samples" (§3)"""
    table1_pairs: int = 3995
    """pairs of Tables 1 and 3: "the same amount of data that we train previous methods (3995 ...)" (§5; Table 3's
    count is not given)"""
    fig8_sizes: tuple = (9970, 3995, 1000, 500)
    """paired-data sizes of Fig. 8 (§5.3: "9970 ... 3395 [3995 in the caption] ... 1000 ... 500")"""
    n_val: int = 300
    """validation identities (the face world's val split): the plateau scheduler and the epoch kept, never reported"""
    n_eval: int = 300
    """held-out test identities (the eval split, 2 photos each); the paper's held-out set has 30 avatars (§5.1)"""
    eval_size: int = 128
    """pixel size at which predicted and ground-truth avatars are rendered for Table 1's L1"""

    # Image autoencoder E_s / D_s (§4.1)
    latent: int = 512
    """dimension u of both latent spaces: "S, T in R^512" (§4.5)"""
    es_widths: tuple = (64, 128, 256, 512, 512, 512)
    """E_s's stride-2 convolutions (D_s mirrors them with transposed convolutions); one per halving from image_size
    to 4 px (the paper's networks are in its supplement, which we do not have)"""
    lambda_p: float = 0.1
    """weight of L_perc in Eq. 2: "we set lambda_p (Equation (2)) to 0.1" (§4.5)"""
    perc_net: str = "auto"
    """L_perc's feature network (Eq. 3): vgg19 (ImageNet VGG19, torchvision; downloads its weights if absent), f
    (the project's synthetic face network), or auto (vgg19 when its weights are on disk, else f)"""
    f_steps: int = 1500
    """training steps of the synthetic f behind --perc-net f and H (common.FaceNetConfig; trained once, cached)"""
    augment: bool = True
    """"Gaussian blur, rotation, horizontal flips, and grayscale images" on the image AE's portraits (§4.5)"""
    image_ae_steps: int = 100000
    """steps of the image autoencoder ("until convergence", §4.5; the count is ours)"""

    # Parameter autoencoder E_t / D_t (§4.1)
    mlp_hidden: int = 1024
    """hidden width of E_t, D_t and F, each a 2-layer MLP (§5.3; the width is ours; F's last layer must have E_t's
    shape for Eq. 5)"""
    param_ae_steps: int = 50000
    """steps of the parameter autoencoder (the count is ours)"""

    # Optimisation (§4.5)
    lr: float = 2e-4
    """Adam's initial learning rate: "an initial learning rate of 0.0002" (§4.5)"""
    beta1: float = 0.5
    """Adam beta1: "beta_1 = 0.5" (§4.5)"""
    beta2: float = 0.99
    """Adam beta2: "beta_2 = 0.99" (§4.5)"""
    batch_ae: int = 24
    """batch size of both autoencoders: "batch size of 24" (§4.5)"""
    batch_f: int = 48
    """batch size of F: "increase the batch size to 48" (§4.5)"""
    plateau_patience: int = 1
    """ReduceLROnPlateau patience: "on loss plateau with patience 1" (§4.5)"""
    plateau_factor: float = 0.5
    """ReduceLROnPlateau factor: "and factor 0.5" (§4.5)"""
    plateau_on: str = "train"
    """what the plateau scheduler watches once per epoch: train (the epoch's mean training loss, Eq. 6: "on loss
    plateau", §4.5) or val (the validation split's L_rec)"""
    f_init: str = "random"
    """how F's last layer starts: random (PyTorch's default) or E_t (a copy of E_t's last layer, where Eq. 5 pulls
    it; the paper does not say)"""
    f_epochs: int = 100
    """epochs of F (and of the baseline) over the pairs (the count is ours, read off a 200-epoch validation curve of
    the full method: L_rec 0.0024 at 60 epochs, 0.0012 at 100, 0.0010 at 200)"""

    # Losses of F (Eq. 4-6; §4.5: "lambda_r = 1, lambda_c = 1, lambda_w = 10")
    lambda_r: float = 1.0
    """weight of L_rec in Eq. 6 (§4.5)"""
    lambda_c: float = 1.0
    """weight of L_cm in Eq. 6 (§4.5)"""
    lambda_w: float = 10.0
    """weight of L_w in Eq. 6 (§4.5)"""
    lambda_1: float = 1.0
    """weight of the MSE term of L_cm, Eq. 4 (not given in the paper)"""
    lambda_2: float = 0.1
    """weight of the cosine term of L_cm, Eq. 4 (not given in the paper; 0.1 was better than 1 on the validation
    split: L_rec 0.00077 against 0.0012 after 100 epochs)"""
    ablation: str = "none"
    """Table 3's variants of F: none (Eq. 6), no_align (L_rec alone), no_mse (lambda_1 = 0), no_cos (lambda_2 = 0),
    no_weight (lambda_w = 0)"""

    # Experiments
    table: str = "1"
    """what to run after the autoencoders, comma-separated: 1 (Table 1: ours and the direct-regression baseline on
    --table1-pairs), 3 (Table 3: ours and the four ablations on --table1-pairs), fig8 (Fig. 8: ours on
    --fig8-sizes)"""
    f_seeds: int = 1
    """seeds of every F (and baseline) trained: the tables give their mean and spread"""
    ae_from: str = ""
    """a finished run (folder or ckpt.pt) whose four autoencoder networks to reuse instead of training them (H and
    the bank are rebuilt: they are deterministic)"""

    # Outputs
    apply: str = ""
    """comma-separated portraits to turn into avatars with --ckpt: writes <name>.json (629-D), .png and .svg"""
    ckpt: str = ""
    """with --apply: the folder (or ckpt.pt) of a trained crossmodal_avatar run"""
    apply_size: int = 512
    """with --apply: the PNG's size in pixels (the SVG scales to any size)"""


PRESETS = {
    "paper": {},
    "quick": dict(image_size=64, n_photos=10000, es_widths=(32, 64, 128, 256), f_steps=600, image_ae_steps=2500,
                  param_ae_steps=15000, log_every=100, ckpt_every=1000),
}
DRY_RUN = dict(image_size=64, n_photos=64, n_vectors=256, pair_identities=8, n_pairs=64, table1_pairs=48,
               fig8_sizes=(64, 32), n_val=8, n_eval=8, eval_size=64, es_widths=(8, 8, 8, 8), f_steps=2,
               image_ae_steps=2, param_ae_steps=2, mlp_hidden=32, latent=16, f_epochs=2, log_every=1,
               ckpt_every=2, batch_ae=8, batch_f=8)
ABLATIONS = ("none", "no_align", "no_mse", "no_cos", "no_weight")
TABLE_TOKENS = ("1", "3", "fig8")
LOG_FIELDS = ["loss_l1", "loss_perc", "loss_param"]
SYNTHETIC_RENDER_MAX = 128   # the synthetic world renders at most 152 px; the paper preset upsamples 128 -> 256


def validate(args: Args):
    """Every check that can fail on the arguments alone, before any file is written."""
    require(args.faces in ("synthetic", "folder"), "--faces must be synthetic or folder")
    require(args.faces != "folder" or args.faces_dir, "--faces folder needs --faces-dir DIR")
    require(args.ablation in ABLATIONS, f"--ablation must be one of {', '.join(ABLATIONS)}")
    require(args.perc_net in ("auto", "vgg19", "f"), "--perc-net must be auto, vgg19 or f")
    require(args.plateau_on in ("train", "val"), "--plateau-on must be train or val")
    require(args.f_init in ("random", "E_t"), "--f-init must be random or E_t")
    tokens = [t for t in args.table.split(",") if t]
    require(tokens and set(tokens) <= set(TABLE_TOKENS), f"--table: comma-separated from {', '.join(TABLE_TOKENS)}")
    require(args.image_size >= 16 and args.image_size & (args.image_size - 1) == 0,
            "--image-size must be a power of two, at least 16")
    n_layers = int(math.log2(args.image_size // 4))
    require(len(args.es_widths) == n_layers and min(args.es_widths) >= 1,
            f"--es-widths needs {n_layers} positive widths for --image-size {args.image_size} (one per halving to "
            f"4 px), got {args.es_widths}")
    for name in ("n_photos", "n_vectors", "pair_identities", "n_pairs", "table1_pairs", "n_val", "n_eval", "latent",
                 "mlp_hidden", "batch_ae", "batch_f", "f_epochs", "f_seeds", "log_every", "ckpt_every", "f_steps"):
        require(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
    for name in ("image_ae_steps", "param_ae_steps", "plateau_patience"):
        require(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be 0 or more")
    require(16 <= args.eval_size <= 1024, "--eval-size must be 16 to 1024 px")
    require(16 <= args.apply_size <= 4096, "--apply-size must be 16 to 4096 px")
    require(len(args.fig8_sizes) >= 1 and min(args.fig8_sizes) >= 2, "--fig8-sizes needs sizes of at least 2")
    for name in ("lambda_p", "lambda_r", "lambda_c", "lambda_w", "lambda_1", "lambda_2", "vector_jitter"):
        require(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be 0 or more")
    require(args.lr > 0 and 0 <= args.beta1 < 1 and 0 <= args.beta2 < 1, "--lr must be positive, betas in [0, 1)")
    require(0 < args.plateau_factor < 1, "--plateau-factor must be in (0, 1)")
    if not args.pairs_file:
        most = max(args.n_pairs, args.table1_pairs, *args.fig8_sizes)
        require(most <= args.pair_identities * 1000, "more pairs than 1,000 photos per identity")
    require(not args.apply or args.ckpt, "--apply needs --ckpt RUN_DIR (a trained crossmodal_avatar run)")
    if args.apply:
        model = Path(args.ckpt) / "model.pt" if Path(args.ckpt).is_dir() else Path(args.ckpt)
        require(model.is_file(), f"--ckpt: no model.pt in {args.ckpt} (a finished crossmodal_avatar run)")
        for p in (p for p in args.apply.split(",") if p):
            require(Path(p).is_file(), f"--apply: no file {p}")
    if args.pairs_file:
        require(Path(args.pairs_file).is_file(), f"--pairs-file: no file {args.pairs_file}")
    if args.faces_dir:
        require(Path(args.faces_dir).is_dir(), f"--faces-dir: no folder {args.faces_dir}")


# ======================================================================================================================
# Networks (§4.1, §4.2): E_s, D_s (convolutions), E_t, D_t, F (2-layer MLPs), the baseline, H
# ======================================================================================================================


def mlp(n_in: int, hidden: int, n_out: int, out: str = "none") -> nn.Sequential:
    """A 2-layer MLP, "multilayer perceptrons with non-linearity activation functions" (§4.1): Linear, LeakyReLU(0.2),
    Linear, then a sigmoid for outputs in [0, 1] (every avatar parameter is)."""
    layers: list[nn.Module] = [nn.Linear(n_in, hidden), nn.LeakyReLU(0.2, True), nn.Linear(hidden, n_out)]
    if out == "sigmoid":
        layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def make_networks(args: Args) -> dict[str, nn.Module]:
    """E_s: portrait -> S (u = 512), D_s: S -> portrait (transposed convolutions, §4.1); E_t: y -> T, D_t: T -> y."""
    return {"E_s": DownscalingEncoder(3, args.es_widths, args.latent),
            "D_s": UpscalingGenerator(args.latent, tuple(reversed(args.es_widths)), 3),
            "E_t": mlp(AVATAR_DIM, args.mlp_hidden, args.latent),
            "D_t": mlp(args.latent, args.mlp_hidden, AVATAR_DIM, out="sigmoid")}


def make_F(args: Args) -> nn.Sequential:
    """F: S -> T, "a multilayer perceptron with one hidden layer" (§4.2); its last layer has E_t's shape (Eq. 5)."""
    return mlp(args.latent, args.mlp_hidden, args.latent)


def make_baseline(args: Args) -> nn.Sequential:
    """The direct regression baseline: E_s's code -> the 629 parameters, trained from scratch on the pairs."""
    return mlp(args.latent, args.mlp_hidden, AVATAR_DIM, out="sigmoid")


def last_linear(net: nn.Module) -> nn.Linear:
    """The last nn.Linear of an MLP: theta of Eq. 5."""
    return [m for m in net.modules() if isinstance(m, nn.Linear)][-1]


# ======================================================================================================================
# Losses (Eq. 1-6)
# ======================================================================================================================


def image_rec_loss(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """|x - D(E(x))|, the first term of Eq. 2, as a per-pixel mean (images in [-1, 1])."""
    return (x - x_rec).abs().mean()


def perceptual_loss(feats_x: list[torch.Tensor], feats_rec: list[torch.Tensor]) -> torch.Tensor:
    """L_perc, Eq. 3: (1/K) sum_k ||V^k - W^k||^2 over the K feature maps, each squared difference averaged over
    positions i, j and channels (the paper sums over i, j; a deviation, see the docstring)."""
    return torch.stack([(v - w).pow(2).mean() for v, w in zip(feats_x, feats_rec)]).mean()


def param_rec_loss(y: torch.Tensor, y_rec: torch.Tensor) -> torch.Tensor:
    """(y - D(E(y)))^2 (Eq. 1 for the parameter modality, §4.1) and L_rec = (y_hat - y)^2 of F (§4.2): an MSE."""
    return (y - y_rec).pow(2).mean()


def cross_modal_loss(z_m: torch.Tensor, z_t: torch.Tensor, lambda_1: float, lambda_2: float) -> torch.Tensor:
    """L_cm, Eq. 4: lambda_1 (z_m - z_t)^2 + lambda_2 (1 - z_m . z_t / (||z_m|| ||z_t||)); the squared difference is a
    mean over the latent's entries and both terms a mean over the batch."""
    mse = (z_m - z_t).pow(2).mean()
    cos = F_nn.cosine_similarity(z_m, z_t, dim=1, eps=1e-8).mean()
    return lambda_1 * mse + lambda_2 * (1.0 - cos)


def weight_alignment_loss(F_net: nn.Module, E_t: nn.Module) -> torch.Tensor:
    """L_w, Eq. 5: ||theta_f - theta_t||_2^2, the squared distance between the last layers of F and of E_t (weights
    and biases; summed, not averaged). E_t is frozen, so only F moves."""
    a, b = last_linear(F_net), last_linear(E_t)
    return (a.weight - b.weight).pow(2).sum() + (a.bias - b.bias).pow(2).sum()


def loss_weights(args: Args, ablation: str | None = None) -> dict[str, float]:
    """The lambdas of Eq. 4 and 6 for one of Table 3's variants: no_align drops L_cm and L_w (L_rec alone), no_mse
    drops Eq. 4's first term, no_cos its second, no_weight drops L_w."""
    ablation = args.ablation if ablation is None else ablation
    w = dict(r=args.lambda_r, c=args.lambda_c, w=args.lambda_w, l1=args.lambda_1, l2=args.lambda_2)
    if ablation == "no_align":
        w.update(c=0.0, w=0.0)
    elif ablation == "no_mse":
        w.update(l1=0.0)
    elif ablation == "no_cos":
        w.update(l2=0.0)
    elif ablation == "no_weight":
        w.update(w=0.0)
    return w


def mapping_loss(F_net: nn.Module, E_t: nn.Module, D_t: nn.Module, z_s: torch.Tensor, y: torch.Tensor,
                 w: dict[str, float], z_t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Eq. 6 on a batch of E_s codes z_s and their avatars y: L = lambda_r L_rec + lambda_c L_cm + lambda_w L_w.
    ``z_t`` = E_t(y) when the caller has it (E_t is frozen, so it can be computed once for all pairs). Returns the
    total and each term (a term whose lambda is 0 is not computed: it contributes exactly 0)."""
    z_m = F_net(z_s)                                   # the translated code z_m = F(E_s(x))
    zero = z_m.new_zeros(())
    l_rec = param_rec_loss(D_t(z_m), y)                # L_rec = (D_t(F(E_s(x))) - y)^2
    if w["c"] > 0:                                     # Eq. 4, with z_t = E_t(y)
        l_cm = cross_modal_loss(z_m, E_t(y) if z_t is None else z_t, w["l1"], w["l2"])
    else:
        l_cm = zero
    l_w = weight_alignment_loss(F_net, E_t) if w["w"] > 0 else zero                  # Eq. 5
    total = w["r"] * l_rec + w["c"] * l_cm + w["w"] * l_w
    return {"loss": total, "loss_rec": l_rec, "loss_cm": l_cm, "loss_w": l_w}


# ======================================================================================================================
# The perceptual network of Eq. 3: VGG19 when its weights are available, else f's feature maps
# ======================================================================================================================


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
            x = common.resize_images(x, self.size)
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


def perceptual_network(args: Args, f_net: nn.Module | None) -> tuple[nn.Module, str]:
    """L_perc's feature extractor and a description for metrics.json."""
    use_vgg = args.perc_net == "vgg19" or (args.perc_net == "auto" and vgg19_weights_on_disk() is not None)
    if use_vgg:
        import torchvision
        try:
            vgg = torchvision.models.vgg19(weights=torchvision.models.VGG19_Weights.IMAGENET1K_V1)
        except Exception as exc:
            raise common.UsageError(f"--perc-net vgg19: cannot load ImageNet VGG19 ({type(exc).__name__}: {exc}); "
                                    f"use --perc-net f") from None
        return (FeatureMaps(vgg.features, VGG19_LAYERS, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
                "ImageNet VGG19 (torchvision), relu1_2, relu2_2, relu3_4, relu4_4, relu5_4 (as the paper)")
    assert f_net is not None
    # f's stem and its four residual stages (common.FaceIdentityNet.features: conv, BN, ReLU, then 4 blocks)
    net = FeatureMaps(f_net.features, (2, 3, 4, 5, 6), [0.5] * 3, [0.5] * 3, size=f_net.in_size)
    why = "no ImageNet VGG19 weights on disk" if args.perc_net == "auto" else "chosen with --perc-net f"
    return net, (f"the synthetic face network f's stem and 4 residual stages (common.FaceIdentityNet; {why}; the "
                 f"paper uses ImageNet VGG19)")


def lpips_metric():
    """LPIPS (Table 1's second column) when the `lpips` package and its ImageNet backbone are available, else
    (None, why)."""
    try:
        import lpips  # noqa: F401
    except Exception:
        return None, "not computed: the `lpips` package is not installed (and its ImageNet backbone cannot be " \
                     "downloaded offline)"
    try:
        net = lpips.LPIPS(net="alex", verbose=False)
    except Exception as exc:
        return None, f"not computed: LPIPS could not load its backbone ({type(exc).__name__})"
    return freeze(net), "LPIPS (AlexNet, lpips package)"


# ======================================================================================================================
# Data: unpaired portraits and avatar vectors, the pairs, the validation and test identities
# ======================================================================================================================


def augment_portraits(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """§4.5's augmentations, each on a random half (or fifth) of the batch: Gaussian blur (sigma up to 1.5 px at
    64 px), rotation (up to 10 degrees), horizontal flip, grayscale. x in [-1, 1]."""
    n, dev = x.shape[0], x.device

    def coin(p):
        return (torch.rand(n, device=dev, generator=gen) < p).view(n, 1, 1, 1)

    x = torch.where(coin(0.5), x.flip(3), x)
    angle = (torch.rand(n, device=dev, generator=gen) * 2 - 1) * math.radians(10) * coin(0.5).view(n)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
    grid = F_nn.affine_grid(theta, list(x.shape), align_corners=False)
    x = F_nn.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    sigma = torch.rand(n, device=dev, generator=gen) * 1.5 * x.shape[-1] / 64 * coin(0.3).view(n)
    x = common._blur(x, sigma)
    grey = x.mul(torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return torch.where(coin(0.2), grey.expand_as(x), x)


def synthetic_pairs(split: str, n_identities: int, per_identity: int, size: int, world_seed: int,
                    limit: int | None = None) -> dict:
    """Photos of a face-world split with their ground-truth avatars and hair: the synthetic paired data."""
    data = common.synthetic_faces(split, n_identities, per_identity, size, world_seed)
    ids = data["identity"].numpy()
    if limit is not None:
        ids = ids[:limit]
    people = {int(i): common.sample_identity(world_seed, int(i)) for i in np.unique(ids)}
    y = np.stack([avatar_from_identity(people[int(i)]) for i in ids])
    return {"x": data["images"][:len(ids)], "y": torch.from_numpy(y), "identity": torch.from_numpy(ids),
            "hair": [hair_from_identity(people[int(i)]) for i in ids],
            "attributes": torch.from_numpy(np.stack([common.attribute_vector(people[int(i)]) for i in ids])),
            "source": data["source"] + (f" (first {limit})" if limit is not None else "")}


def file_pairs(path: str, size: int) -> dict[str, dict]:
    """Real pairs from --pairs-file (format in --pairs-file's help), split by their "split" field."""
    root = Path(path).parent
    rows: dict[str, list] = {"train": [], "val": [], "test": []}
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                y = np.asarray(rec["avatar"], np.float32)
                split = rec.get("split", "train")
                hair = rec.get("hair")
                if hair is not None:
                    validate_hair(hair)
            except (ValueError, KeyError, TypeError) as exc:
                raise common.UsageError(f"--pairs-file: line {n}: {type(exc).__name__}: {exc}") from None
            require(y.shape == (AVATAR_DIM,) and np.isfinite(y).all() and y.min() >= 0 and y.max() <= 1,
                    f"--pairs-file: line {n}: 'avatar' must be {AVATAR_DIM} numbers in [0, 1]")
            require(split in rows, f"--pairs-file: line {n}: 'split' must be train, val or test, not {split!r}")
            photo = root / rec["photo"]
            try:
                with Image.open(photo) as img:
                    pixels = np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC), np.uint8)
            except Exception as exc:
                raise common.UsageError(f"--pairs-file: line {n}: cannot read {photo} ({type(exc).__name__})") \
                    from None
            rows[split].append((pixels, y, hair, n))
    require(len(rows["train"]) >= 2, "--pairs-file: fewer than 2 training pairs")
    for s in ("val", "test"):  # without a split field, a tenth of the pairs each
        if not rows[s]:
            k = max(1, len(rows["train"]) // 10)
            rows[s], rows["train"] = rows["train"][-k:], rows["train"][:-k]
    out = {}
    for s, rs in rows.items():
        out[s] = {"x": torch.from_numpy(np.stack([r[0] for r in rs])).permute(0, 3, 1, 2).contiguous(),
                  "y": torch.from_numpy(np.stack([r[1] for r in rs])), "identity": torch.tensor([r[3] for r in rs]),
                  "hair": [r[2] for r in rs], "attributes": None,
                  "source": f"{path}: {len(rs)} {s} pairs"}
    return out


def synthetic_f_config(args: Args) -> common.FaceNetConfig:
    """The synthetic f behind --perc-net f and H (tos_emoji's f: trained once per configuration, then cached)."""
    return common.FaceNetConfig(steps=args.f_steps, world_seed=args.world_seed, style_aug=1.0)


def load_data(args: Args) -> dict:
    """Every data set of a run, as uint8 images and float avatar vectors on the CPU:
    photos (unpaired portraits), vectors (unpaired avatars), pairs / val / test (portrait, avatar, hair)."""
    render = min(args.image_size, SYNTHETIC_RENDER_MAX)
    if args.faces_dir or args.faces == "folder":
        folder = common.load_face_folder(args.faces_dir, args.image_size, limit=args.n_photos)
        photos, photo_source = folder["images"], folder["source"]
    else:
        s = common.synthetic_faces("s", args.n_photos, 1, render, args.world_seed)
        photos, photo_source = s["images"], s["source"]
    vectors = torch.from_numpy(sample_avatars(args.n_vectors, args.world_seed + 7919, args.vector_jitter))
    vector_source = (f"{args.n_vectors} avatars sampled from the face world's prior (identities of world seed "
                     f"{args.world_seed + 7919}, jitter {args.vector_jitter})")
    if args.pairs_file:
        sets = file_pairs(args.pairs_file, render)
        pairs, val, test = sets["train"], sets["val"], sets["test"]
    else:
        most = max(args.n_pairs, args.table1_pairs, *args.fig8_sizes)
        per = math.ceil(most / args.pair_identities)
        pairs = synthetic_pairs("pairs", args.pair_identities, per, render, args.world_seed, limit=most)
        val = synthetic_pairs("val", args.n_val, 1, render, args.world_seed)
        test = synthetic_pairs("eval", args.n_eval, 2, render, args.world_seed)
    return {"photos": photos, "photo_source": photo_source, "vectors": vectors, "vector_source": vector_source,
            "pairs": pairs, "val": val, "test": test}


def encode(E_s: nn.Module, images: torch.Tensor, size: int, device: torch.device, batch: int = 256) -> torch.Tensor:
    """z_s = E_s(x) for uint8 portraits, in eval mode and batches (E_s is frozen after stage 1)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = common.resize_images(common.to_float_images(images[i:i + batch].to(device)), size)
            out.append(E_s(x))
    return torch.cat(out)


# ======================================================================================================================
# H and the hair bank (§4.3)
# ======================================================================================================================


class AttributeRegressor(nn.Module):
    """H(I) -> a_hat: f's identity code, then a linear map to the face world's 40 attributes (common.ATTRIBUTE_NAMES),
    fitted by ridge regression on f's labelled training photos (a stand-in for the paper's pretrained ResNet50 [14])."""

    def __init__(self, f_net: nn.Module, code_dim: int, n_attr: int):
        super().__init__()
        self.f = f_net
        self.head = nn.Linear(code_dim, n_attr)
        freeze(self)

    def fit(self, codes: torch.Tensor, attributes: torch.Tensor, ridge: float = 1e-2):
        """Closed-form ridge regression of the attributes on [codes, 1]."""
        X = torch.cat([codes, torch.ones(len(codes), 1)], 1).double()
        A = X.T @ X + ridge * len(codes) * torch.eye(X.shape[1], dtype=torch.float64)
        W = torch.linalg.solve(A, X.T @ attributes.double())
        self.head.weight.data.copy_(W[:-1].T.float())
        self.head.bias.data.copy_(W[-1].float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.f(x))


def hair_bank_lookup(a_query: torch.Tensor, bank: dict) -> list[dict]:
    """§4.3: the nearest neighbour (Euclidean, over HAIR_ATTRIBUTES) of each attribute vector H predicted among the
    bank's precomputed ones gives the hair and accessory parameters to merge with the face parameters."""
    nearest = torch.cdist(a_query[:, list(HAIR_ATTRIBUTES)].float(), bank["attributes"].float()).argmin(1)
    return [bank["hair"][int(k)] for k in nearest]


def hair_accuracy(pred: list[dict], truth: list[dict]) -> dict[str, float]:
    """How often the retrieved hairstyle, glasses and facial hair are the ground truth's (synthetic world)."""
    return {k: float(np.mean([p[k] == t[k] for p, t in zip(pred, truth)])) for k in ("hairstyle", "glasses",
                                                                                     "facial_hair")}


# ======================================================================================================================
# Stage 2: training F (Eq. 6) or the direct-regression baseline on the pairs, the epoch kept on validation
# ======================================================================================================================


def train_mapping(kind: str, args: Args, nets: dict, z_s: torch.Tensor, y: torch.Tensor, z_val: torch.Tensor,
                  y_val: torch.Tensor, seed: int, ablation: str = "none", log=None) -> tuple[nn.Module, dict]:
    """Train F (kind "F", Eq. 6 with the ablation's lambdas) or the baseline (kind "baseline": MSE of its 629
    outputs) on precomputed codes z_s = E_s(x) of the pairs. Adam (2e-4, (0.5, 0.99)), batch 48, ReduceLROnPlateau
    (patience 1, factor 0.5) on the validation L_rec, once per epoch (§4.5); the epoch with the lowest validation
    L_rec is kept. E_s, E_t and D_t are frozen: only F (or the baseline) has an optimizer."""
    common.seed_everything(seed)
    E_t, D_t = nets["E_t"], nets["D_t"]
    net = (make_F(args) if kind == "F" else make_baseline(args)).to(z_s.device)
    if kind == "F" and args.f_init == "E_t":
        last_linear(net).load_state_dict(last_linear(E_t).state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=args.plateau_factor,
                                                       patience=args.plateau_patience)
    w = loss_weights(args, ablation)

    def predict(z):
        return D_t(net(z)) if kind == "F" else net(z)

    with torch.no_grad():  # E_t is frozen: z_t = E_t(y) of every pair once, not once per step
        z_t = E_t(y) if kind == "F" and w["c"] > 0 else None

    def losses(idx):
        if kind == "F":
            return mapping_loss(net, E_t, D_t, z_s[idx], y[idx], w, None if z_t is None else z_t[idx])
        rec = param_rec_loss(net(z_s[idx]), y[idx])
        return {"loss": rec, "loss_rec": rec}

    best, best_state, history = float("inf"), None, []
    n = len(z_s)
    for epoch in range(1, args.f_epochs + 1):
        net.train()
        order = torch.randperm(n, device=z_s.device)
        sums: dict[str, torch.Tensor] = {}
        for i in range(0, n, args.batch_f):
            idx = order[i:i + args.batch_f]
            parts = losses(idx)
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach() * len(idx)
        net.eval()
        with torch.no_grad():
            val_rec = param_rec_loss(predict(z_val), y_val).item()
        sched.step(val_rec if args.plateau_on == "val" else (sums["loss"] / n).item())
        row = {"epoch": epoch, **{k: (v / n).item() for k, v in sums.items()}, "val_rec": val_rec,
               "lr": opt.param_groups[0]["lr"]}
        common.check_finite(f"{kind} {ablation}", epoch, {k: v for k, v in row.items() if k != "epoch"})
        history.append(row)
        if val_rec < best:
            best, best_state = val_rec, {k: v.detach().clone() for k, v in net.state_dict().items()}
        if log:
            log(row)
    net.load_state_dict(best_state)
    freeze(net)
    best_epoch = min(history, key=lambda r: r["val_rec"])["epoch"]
    return net, {"best_epoch": best_epoch, "val_rec": best, "history": history}


# ======================================================================================================================
# Evaluation (§5): Table 1's L1 between rendered avatars, parameter MSE, LPIPS where available
# ======================================================================================================================


def avatar_metrics(y_hat: torch.Tensor, y: torch.Tensor, hair_hat: list[dict], hair: list[dict], size: int,
                   gt_face: torch.Tensor, gt_full: torch.Tensor, lpips_net=None) -> dict:
    """Table 1 analogue on held-out identities: the L1 between the rendered predicted avatar and the rendered
    ground truth (pixels in [0, 1], mean over pixels, channels and faces), of the face alone (the 629 parameters F
    predicts) and of the whole avatar with its retrieved hair; the parameter MSE; LPIPS when available."""
    face = render_avatar_batch(y_hat.cpu(), size).float() / 255
    full = render_avatar_batch(y_hat.cpu(), size, hair_hat).float() / 255
    out = {"l1_face": (face - gt_face).abs().mean().item(), "l1_avatar": (full - gt_full).abs().mean().item(),
           "param_mse": (y_hat.cpu() - y.cpu()).pow(2).mean().item()}
    if lpips_net is not None:
        with torch.no_grad():
            out["lpips"] = lpips_net(full * 2 - 1, gt_full * 2 - 1).mean().item()
    return out


def summarise(runs: list[dict]) -> dict:
    """Mean, sample standard deviation and the values over seeds of every metric."""
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    out = {}
    for k in keys:
        vals = np.array([r[k] for r in runs])
        out[k] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                  "values": [float(v) for v in vals]}
    return out



# ======================================================================================================================
# What each experiment trains; the subsets of pairs; the autoencoders of an earlier run; H and the bank
# ======================================================================================================================

ABLATION_LABELS = {"none": "ours", "no_align": "ours w/o alignment", "no_mse": "ours w/o MSE alignment",
                   "no_cos": "ours w/o cosine alignment", "no_weight": "ours w/o weight alignment"}


def experiment_plan(args: Args, tokens: list[str], n_available: int) -> dict[str, dict[str, tuple]]:
    """{experiment: {row label: (kind, ablation, number of pairs)}} for the requested tables. A (kind, ablation,
    pairs, seed) that two experiments share is trained once."""
    def n(k):
        return min(k, n_available)

    ours = ABLATION_LABELS[args.ablation]
    plan: dict[str, dict[str, tuple]] = {}
    if "1" in tokens:
        plan["table1"] = {ours: ("F", args.ablation, n(args.table1_pairs)),
                          "baseline": ("baseline", "none", n(args.table1_pairs))}
    if "3" in tokens:
        plan["table3"] = {ABLATION_LABELS[a]: ("F", a, n(args.table1_pairs)) for a in ("no_align", "no_mse",
                                                                                        "no_cos", "no_weight", "none")}
    if "fig8" in tokens:
        plan["fig8"] = {f"{ours}, {n(k)} pairs": ("F", args.ablation, n(k)) for k in args.fig8_sizes}
    return plan


def pair_subset_order(pairs: dict, seed: int = 0) -> torch.Tensor:
    """The order in which pairs enter a subset of size N (Table 1's 3,995, Fig. 8's sizes): whole identities in a
    fixed shuffle, so a smaller set has fewer people (fewer avatars an artist had to make), each with all its photos."""
    ids = pairs["identity"].numpy()
    people = np.unique(ids)
    np.random.default_rng([0xF8, seed]).shuffle(people)
    return torch.from_numpy(np.concatenate([np.flatnonzero(ids == p) for p in people]))


def load_reused_autoencoders(args: Args) -> dict:
    """--ae-from: E_s, D_s, E_t and D_t of a finished run, after checking that their shapes match this run's."""
    state = common.load_checkpoint(args.ae_from)
    require(state.get("script") == "crossmodal_avatar", f"--ae-from: {args.ae_from} is not a crossmodal_avatar run")
    require(state.get("phase") == "done", f"--ae-from: {args.ae_from} has not finished its autoencoders")
    for k in ("image_size", "es_widths", "latent", "mlp_hidden", "world_seed"):
        saved = state["args"][k]
        saved = tuple(saved) if isinstance(saved, list) else saved
        require(saved == getattr(args, k), f"--ae-from: its --{k.replace('_', '-')} is {saved}, this run's "
                                           f"{getattr(args, k)}; pass the same value")
    return {k: state["nets"][k] for k in ("E_s", "D_s", "E_t", "D_t")}


#: The attributes of H that the bank's nearest-neighbour search compares (hair and accessories; §4.3 retrieves
#: "the best hair and accessory parameters"; eye size or nose width only add noise to that search).
HAIR_ATTRIBUTES = tuple(i for i, n in enumerate(common.ATTRIBUTE_NAMES)
                        if n == "hairline" or n.split(".")[0] == "hair" or n.split("=")[0] in
                        ("hair_style", "glasses", "facial_hair"))


def build_hair_bank(args: Args, f_net: nn.Module, pairs: dict, device: torch.device) -> tuple[nn.Module, dict]:
    """H, fitted on f's labelled training photos (a quarter of them), and the bank: one portrait of each paired
    identity with its hair and accessory parameters, and H's attributes of that portrait, precomputed (§4.3)."""
    f_data = common.synthetic_faces("f", 1000, 16, 64, args.world_seed)
    images, ids = f_data["images"][::4], f_data["identity"][::4].numpy()
    people = {int(i): common.attribute_vector(common.sample_identity(args.world_seed, int(i))) for i in np.unique(ids)}
    attributes = torch.from_numpy(np.stack([people[int(i)] for i in ids]))
    codes = common.embed(f_net, images, device=device)
    H = AttributeRegressor(f_net, codes.shape[1], attributes.shape[1]).fit(codes, attributes).to(device)
    if pairs["attributes"] is None:   # real pairs without hair: the synthetic world's paired identities are the bank
        pairs = synthetic_pairs("pairs", args.pair_identities, 1, 64, args.world_seed)
    ids = pairs["identity"].numpy()
    first = np.array([np.flatnonzero(ids == p)[0] for p in np.unique(ids)])
    with torch.no_grad():
        x = common.resize_images(common.to_float_images(pairs["x"][first].to(device)), 64)
        a = torch.cat([H(x[i:i + 256]) for i in range(0, len(x), 256)]).cpu()
    bank = {"attributes": a[:, list(HAIR_ATTRIBUTES)], "hair": [pairs["hair"][int(i)] for i in first],
            "columns": [common.ATTRIBUTE_NAMES[i] for i in HAIR_ATTRIBUTES]}
    return H, bank


# ======================================================================================================================
# The run: data, networks, stage 1 (both autoencoders), H and the bank, stage 2 (F, the baseline, the ablations)
# ======================================================================================================================


def main(argv=None):
    t_start = time.time()
    args, preset, device, out, ckpt = common.start_run("crossmodal_avatar", Args, PRESETS, DRY_RUN, validate, argv,
                                                       description=__doc__.split("\n")[0])
    common.seed_everything(args.seed)
    if args.apply:
        return apply_to_photos(args, device, out)
    tokens = [t for t in TABLE_TOKENS if t in args.table.split(",")]
    reused = load_reused_autoencoders(args) if args.ae_from else None

    # ------------------------------------------------------------------------------------------------------------------
    # Data: unpaired portraits (image AE), unpaired avatar vectors (parameter AE), pairs, validation, test.
    # Whole sets sit on the device as uint8 images / float vectors; a batch is converted when it is drawn.
    # ------------------------------------------------------------------------------------------------------------------
    data = load_data(args)
    photos, vectors = data["photos"].to(device), data["vectors"].to(device)
    pairs, val, test = data["pairs"], data["val"], data["test"]
    print(f"data: portraits {data['photo_source']}; avatars {data['vector_source']}; pairs {pairs['source']}; "
          f"validation {val['source']}; test {test['source']}")
    f_net, f_metrics = common.load_face_net(synthetic_f_config(args), device)   # L_perc's fallback, and H's input
    perc, perc_source = perceptual_network(args, f_net)
    perc = perc.to(device)
    print(f"L_perc: {perc_source}")

    # ------------------------------------------------------------------------------------------------------------------
    # Networks (§4.1): E_s: portrait -> S, D_s: S -> portrait (discarded after stage 1), E_t: avatar -> T,
    # D_t: T -> avatar. F: S -> T is trained in stage 2.
    # ------------------------------------------------------------------------------------------------------------------
    nets = {k: v.to(device) for k, v in make_networks(args).items()}
    if reused is not None:
        for k, sd in reused.items():
            nets[k].load_state_dict(sd)
    opts = {"image_ae": torch.optim.Adam([*nets["E_s"].parameters(), *nets["D_s"].parameters()], lr=args.lr,
                                         betas=(args.beta1, args.beta2)),
            "param_ae": torch.optim.Adam([*nets["E_t"].parameters(), *nets["D_t"].parameters()], lr=args.lr,
                                         betas=(args.beta1, args.beta2))}
    E_s, D_s, E_t, D_t = (nets[k] for k in ("E_s", "D_s", "E_t", "D_t"))
    size = args.image_size

    def image_ae_step():
        """Eq. 1-3 on portraits: min |x - D_s(E_s(x))| + lambda_p L_perc(x, D_s(E_s(x)))."""
        (x,) = common.sample_batch(args.batch_ae, photos)
        x = common.resize_images(common.to_float_images(x), size)
        if args.augment:
            x = augment_portraits(x)
        x_rec = D_s(E_s(x))
        l1 = image_rec_loss(x, x_rec)
        lp = perceptual_loss(perc(x), perc(x_rec)) if args.lambda_p > 0 else torch.zeros((), device=device)
        loss = l1 + args.lambda_p * lp
        opts["image_ae"].zero_grad(set_to_none=True)
        loss.backward()
        opts["image_ae"].step()
        return {"loss_l1": l1.detach(), "loss_perc": lp.detach()}

    def param_ae_step():
        """Eq. 1 on avatar vectors: min (y - D_t(E_t(y)))^2."""
        (y,) = common.sample_batch(args.batch_ae, vectors)
        loss = param_rec_loss(y, D_t(E_t(y)))
        opts["param_ae"].zero_grad(set_to_none=True)
        loss.backward()
        opts["param_ae"].step()
        return {"loss_param": loss.detach()}

    def setup(phase, start_step):
        if phase == "image_ae":
            E_s.train(), D_s.train()
            return image_ae_step
        E_t.train(), D_t.train()
        return param_ae_step

    # ------------------------------------------------------------------------------------------------------------------
    # Stage 1 (§4.1): the two autoencoders, "trained independently" on unpaired data (skipped with --ae-from)
    # ------------------------------------------------------------------------------------------------------------------
    phases = {"image_ae": 0 if reused else args.image_ae_steps, "param_ae": 0 if reused else args.param_ae_steps}
    runner = common.PhaseRunner("crossmodal_avatar", args, out, nets, opts, phases, LOG_FIELDS, ckpt, t_start)
    if not runner.run(setup):
        return 130
    for k in ("E_s", "D_s", "E_t", "D_t"):
        freeze(nets[k])          # "we freeze the weights of E_s, E_t, and D_t" (§4.5); D_s is only shown
    metrics: dict = {"data": {k: data[k] for k in ("photo_source", "vector_source")} |
                     {"pairs": pairs["source"], "val": val["source"], "test": test["source"]},
                     "perceptual_network": perc_source,
                     "f": f"synthetic f (ArcFace ResNet, {args.f_steps} steps; verification "
                          f"{100 * f_metrics['accuracy']:.2f}% on held-out identities)",
                     "autoencoders": f"reused from {args.ae_from}" if reused else "trained in this run"}

    # ------------------------------------------------------------------------------------------------------------------
    # Codes of every portrait through the frozen E_s, and the autoencoders' held-out reconstruction
    # ------------------------------------------------------------------------------------------------------------------
    z = {name: encode(E_s, d["x"], size, device) for name, d in (("pairs", pairs), ("val", val), ("test", test))}
    y = {name: d["y"].to(device) for name, d in (("pairs", pairs), ("val", val), ("test", test))}
    with torch.no_grad():
        x_t = common.resize_images(common.to_float_images(test["x"][:16].to(device)), size)
        metrics["image_ae_test_l1"] = image_rec_loss(x_t, D_s(E_s(x_t))).item()
        metrics["param_ae_test_mse"] = param_rec_loss(y["test"], D_t(E_t(y["test"]))).item()
    common.save_grid(torch.stack([x_t, D_s(E_s(x_t))], 1).flatten(0, 1), out / "image_ae.png", nrow=8)

    # ------------------------------------------------------------------------------------------------------------------
    # §4.3: H reads attributes from a portrait; its outputs on the bank's portraits are precomputed; a query's nearest
    # bank entry gives the hair and accessories
    # ------------------------------------------------------------------------------------------------------------------
    H, bank = build_hair_bank(args, f_net, pairs, device)
    with torch.no_grad():
        a_test = H(common.resize_images(common.to_float_images(test["x"].to(device)), 64))
    hair_hat = hair_bank_lookup(a_test.cpu(), bank)
    truth_hair = [h if h is not None else hair_hat[i] for i, h in enumerate(test["hair"])]
    if test["hair"][0] is not None:
        metrics["hair_retrieval_accuracy"] = hair_accuracy(hair_hat, truth_hair)
        print("hair bank (§4.3): retrieved = ground truth for " + ", ".join(
            f"{k} {100 * v:.1f}%" for k, v in metrics["hair_retrieval_accuracy"].items()))

    # ------------------------------------------------------------------------------------------------------------------
    # Stage 2 (§4.2): F, the baseline and the ablations, each on its pairs and seeds; the ground truth rendered once
    # ------------------------------------------------------------------------------------------------------------------
    gt_face = render_avatar_batch(test["y"], args.eval_size).float() / 255
    gt_full = render_avatar_batch(test["y"], args.eval_size, truth_hair).float() / 255
    lpips_net, lpips_note = lpips_metric()
    metrics["lpips"] = lpips_note
    (out / "variants").mkdir(exist_ok=True)
    pair_order = pair_subset_order(pairs, args.seed)

    def evaluate(y_hat):
        return avatar_metrics(y_hat, test["y"], hair_hat, truth_hair, args.eval_size, gt_face, gt_full, lpips_net)

    def variant(kind: str, ablation: str, n_pairs: int, k: int) -> tuple[dict, str]:
        """Train (or, on resume, read back) one F or baseline; its test metrics and the file of its weights."""
        name = f"{kind}_{ablation}_{n_pairs}pairs_seed{k}"
        path = out / "variants" / f"{name}.pt"
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=False)
            return saved["metrics"], str(path)
        idx = pair_order[:n_pairs].to(device)
        t0 = time.time()
        net, info = train_mapping(kind, args, nets, z["pairs"][idx], y["pairs"][idx], z["val"], y["val"],
                                  seed=args.seed * 1000 + k, ablation=ablation)
        with torch.no_grad():
            y_hat = D_t(net(z["test"])) if kind == "F" else net(z["test"])
        m = {**evaluate(y_hat), "val_rec": info["val_rec"], "best_epoch": float(info["best_epoch"]),
             "train_seconds": round(time.time() - t0, 1)}
        common.save_checkpoint(path, {"state": net.state_dict(), "kind": kind, "metrics": m,
                                      "history": info["history"], "y_hat": y_hat.cpu()})
        print(f"  {name}: L1 face {m['l1_face']:.4f}, L1 avatar {m['l1_avatar']:.4f}, parameter MSE "
              f"{m['param_mse']:.5f} (epoch {info['best_epoch']} kept, {m['train_seconds']:.0f} s)")
        return m, str(path)

    results: dict = {}
    with torch.no_grad():
        mean_y = y["pairs"].mean(0, keepdim=True).expand_as(y["test"])
        results["reference"] = {"mean_avatar": evaluate(mean_y),
                                "param_ae_ceiling": evaluate(D_t(E_t(y["test"])))}
    plan = experiment_plan(args, tokens, len(pairs["y"]))
    files: dict[str, str] = {}
    with common.GracefulInterrupt() as interrupt:
        for exp, rows in plan.items():
            print(f"{exp}:")
            results[exp] = {}
            for label, (kind, ablation, n_pairs) in rows.items():
                runs = []
                for k in range(args.f_seeds):
                    m, files[f"{exp}/{label}/{k}"] = variant(kind, ablation, n_pairs, k)
                    runs.append(m)
                    if interrupt.requested:
                        print(f"stopped; the finished F's are kept: python crossmodal_avatar.py --resume {out}")
                        return 130
                results[exp][label] = {"n_pairs": n_pairs, **summarise(runs)}
    metrics["results"] = results

    # ------------------------------------------------------------------------------------------------------------------
    # Outputs: the model for --apply, the grid, 512 px renders and SVGs, probes for eval_retrieval.py, the tables
    # ------------------------------------------------------------------------------------------------------------------
    main_exp = next(iter(plan))
    ours_label = next(iter(plan[main_exp]))
    ours = torch.load(files[f"{main_exp}/{ours_label}/0"], map_location="cpu", weights_only=False)
    F_net = make_F(args)
    F_net.load_state_dict(ours["state"])
    y_ours = ours["y_hat"]
    base_key = next((f"{e}/baseline/0" for e in plan if "baseline" in plan[e]), None)
    y_base = torch.load(files[base_key], map_location="cpu", weights_only=False)["y_hat"] if base_key else None
    common.save_checkpoint(out / "model.pt", {
        "script": "crossmodal_avatar", "args": {**vars(args)}, "E_s": E_s.state_dict(), "D_t": D_t.state_dict(),
        "F": F_net.state_dict(), "H": H.head.state_dict(), "bank": bank, "trained_on": f"{main_exp}/{ours_label}"})
    write_figures(out, test, gt_full, y_ours, y_base, hair_hat, args)
    save_probes(out, test, y_ours, y_base, hair_hat, truth_hair)
    wall = time.time() - t_start + runner.elapsed_before
    tables = results_tables(results, plan)
    (out / "table.md").write_text(tables + "\n")
    common.write_json(out / "metrics.json", {
        "script": "crossmodal_avatar", "preset": preset, "seed": args.seed, "f_seeds": args.f_seeds,
        "device": common.describe_device(device), "wall_time_s": round(wall, 1), "avatar_dim": AVATAR_DIM,
        "n_test_portraits": len(test["y"]), "l1_scale": f"pixels in [0, 1], avatars rendered at {args.eval_size} px",
        **metrics})
    print(tables)
    print(f"wall time {wall / 60:.1f} min; output {out}")
    return 0


# ======================================================================================================================
# Outputs: the grid and 512 px renders, probes for eval_retrieval.py, the tables, and --apply
# ======================================================================================================================


def first_photos(test: dict) -> np.ndarray:
    """Index of the first test portrait of each identity."""
    ids = test["identity"].numpy()
    return np.array([np.flatnonzero(ids == p)[0] for p in dict.fromkeys(ids.tolist())])


def write_figures(out: Path, test: dict, gt_full: torch.Tensor, y_ours: torch.Tensor, y_base: torch.Tensor | None,
                  hair_hat: list[dict], args: Args):
    """grid.png: photo | ground-truth avatar | ours | baseline, one identity per row, at --eval-size; res512/: four
    of our avatars as 512 px PNGs and as SVGs, and res512.png, all four side by side."""
    rows = first_photos(test)[:12]
    s = args.eval_size
    cols = [common.resize_images(common.to_float_images(test["x"][rows]), s), gt_full[rows] * 2 - 1,
            render_avatar_batch(y_ours[rows], s, [hair_hat[i] for i in rows]).float() / 127.5 - 1]
    if y_base is not None:
        cols.append(render_avatar_batch(y_base[rows], s, [hair_hat[i] for i in rows]).float() / 127.5 - 1)
    common.save_grid(torch.stack(cols, 1).flatten(0, 1), out / "grid.png", nrow=len(cols))
    (out / "res512").mkdir(exist_ok=True)
    big = []
    for k in rows[:4]:
        y, hair = y_ours[k].numpy(), hair_hat[k]
        big.append(render_avatar(y, 512, hair))
        Image.fromarray(big[-1]).save(out / "res512" / f"ours_{k:04d}.png")
        common.atomic_write(out / "res512" / f"ours_{k:04d}.svg", lambda tmp: Path(tmp).write_text(
            avatar_svg(y, 512, hair)))
    Image.fromarray(np.concatenate(big, 1)).save(out / "res512.png")


def save_probes(out: Path, test: dict, y_ours: torch.Tensor, y_base: torch.Tensor | None, hair_hat: list[dict],
                truth_hair: list[dict]):
    """eval_retrieval.py's probes (tos_emoji's format, common.save_probes): the two photos of each test identity
    (photo_x, photo_x2) and, from the first photo, the ground-truth avatar, ours and the baseline's, at 64 px."""
    ids = test["identity"].numpy()
    first = first_photos(test)
    second = np.array([np.flatnonzero(ids == ids[i])[1] if (ids == ids[i]).sum() > 1 else -1 for i in first])
    if (second < 0).any():
        print("probes: skipped (eval_retrieval needs two photos of every test identity)")
        return
    photos = common.to_float_images(test["x"])
    sets = {"photo_x": common.resize_images(photos[first], 64), "photo_x2": common.resize_images(photos[second], 64),
            "gt_avatar": render_avatar_batch(test["y"][first], 64, [truth_hair[i] for i in first]),
            "ours": render_avatar_batch(y_ours[first], 64, [hair_hat[i] for i in first])}
    if y_base is not None:
        sets["baseline"] = render_avatar_batch(y_base[first], 64, [hair_hat[i] for i in first])
    sets = {k: common.to_float_images(v) if v.dtype == torch.uint8 else v for k, v in sets.items()}
    common.save_probes(out, sets, [int(ids[i]) for i in first])


def results_tables(results: dict, plan: dict) -> str:
    """The README's tables: mean (and spread over seeds) of each row's held-out metrics."""
    def cell(r, k, digits=4):
        if k not in r:
            return "n/a"
        m = r[k]
        if isinstance(m, float):
            return f"{m:.{digits}f}"
        return f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f}" if len(m["values"]) > 1 else f"{m['mean']:.{digits}f}"

    head = "| {} | pairs | L1 face | L1 avatar | parameter MSE | LPIPS |\n|---|---|---|---|---|---|"
    names = {"table1": "Table 1 analogue (held-out identities)", "table3": "Table 3 (the losses of F)",
             "fig8": "Fig. 8 (paired-data size)"}
    lines = []
    for exp in plan:
        lines += [f"**{names[exp]}**", "", head.format("method")]
        for label, r in results[exp].items():
            lines.append(f"| {label} | {r['n_pairs']} | {cell(r, 'l1_face')} | {cell(r, 'l1_avatar')} | "
                         f"{cell(r, 'param_mse', 5)} | {cell(r, 'lpips')} |")
        if exp == "table1":
            for label, key in (("mean training avatar", "mean_avatar"),
                               ("D_t(E_t(y)): the parameter AE's ceiling", "param_ae_ceiling")):
                r = results["reference"][key]
                lines.append(f"| {label} | | {cell(r, 'l1_face')} | {cell(r, 'l1_avatar')} | "
                             f"{cell(r, 'param_mse', 5)} | {cell(r, 'lpips')} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def read_portrait(path: str, size: int) -> torch.Tensor:
    """A portrait file as uint8 (3, size, size): centre-cropped to a square, resized; a bad file is a usage error."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except Exception as exc:
        raise common.UsageError(f"--apply: cannot read {path} ({type(exc).__name__}: {exc})") from None
    w, h = img.size
    side = min(w, h)
    img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    return torch.from_numpy(np.array(img.resize((size, size), Image.BICUBIC), np.uint8)).permute(2, 0, 1)


def apply_to_photos(args: Args, device: torch.device, out: Path) -> int:
    """``--apply PHOTO,... --ckpt RUN``: y_hat = D_t(F(E_s(x))) merged with the bank's hair for H(x) (§4.3), written
    per portrait as <name>.json (the 629 numbers, by group, and the hair), <name>.png (--apply-size) and <name>.svg.
    Portraits should be framed like the training ones (an aligned face chip: eyes at ~0.38 of the height)."""
    path = Path(args.ckpt) / "model.pt" if Path(args.ckpt).is_dir() else Path(args.ckpt)
    state = common.load_checkpoint(path)
    require(state.get("script") == "crossmodal_avatar" and "F" in state, f"--ckpt: {path} is not a "
                                                                          f"crossmodal_avatar model")
    run = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["args"].items()})
    nets = {k: v.to(device) for k, v in make_networks(run).items()}
    F_net = make_F(run).to(device)
    for k in ("E_s", "D_t"):
        nets[k].load_state_dict(state[k])
    F_net.load_state_dict(state["F"])
    f_net, _ = common.load_face_net(synthetic_f_config(run), device)
    H = AttributeRegressor(f_net, state["H"]["weight"].shape[1], state["H"]["weight"].shape[0]).to(device)
    H.head.load_state_dict(state["H"])
    paths = [p for p in args.apply.split(",") if p]
    x = torch.stack([read_portrait(p, run.image_size) for p in paths])
    for m in (nets["E_s"], nets["D_t"], F_net):
        freeze(m)
    with torch.no_grad():
        y_hat = nets["D_t"](F_net(encode(nets["E_s"], x, run.image_size, device))).cpu()
        hair = hair_bank_lookup(H(common.resize_images(common.to_float_images(x.to(device)), 64)).cpu(),
                                state["bank"])
    for k, p in enumerate(paths):
        name, y = Path(p).stem, y_hat[k].numpy()
        common.write_json(out / f"{name}.json", {"photo": p, "avatar": [float(v) for v in y],
                                                 "groups": avatar_to_dict(y), "hair": hair[k]})
        img = render_avatar(y, args.apply_size, hair[k])
        common.atomic_write(out / f"{name}.png", lambda tmp: Image.fromarray(img).save(tmp, format="PNG"))
        common.atomic_write(out / f"{name}.svg", lambda tmp: Path(tmp).write_text(
            avatar_svg(y, args.apply_size, hair[k])))
    print(f"wrote {len(paths)} avatars ({AVATAR_DIM}-D JSON, {args.apply_size} px PNG, SVG) to {out}")
    return 0


if __name__ == "__main__":
    common.run_main(main, "crossmodal_avatar.py")
