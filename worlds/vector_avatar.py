"""The 629-D vector avatar engine of crossmodal_avatar.py (§3, §4.3, §4.4): the parameter table, the ground truth
of a synthetic identity, a hair bank, and one display list rendered by PIL and written as SVG; and the experiment's
paired data (§3, §4.5): portraits with their avatars, the unpaired sets, the portraits' augmentations; and a test
set's avatars rendered (§5): Table 1's metrics, the figures and eval_retrieval's probes."""
from __future__ import annotations

import dataclasses
import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from common import UsageError, atomic_write, require, save_grid, save_probes
from worlds import face_nets, faces



# ======================================================================================================================
# The avatar engine (§3, §4.3, §4.4): a 629-D parametric vector avatar, its ground truth, a hair bank, PIL and SVG
# ======================================================================================================================
# Ladron de Guevara et al. 2023 (../shared/papers/crossmodal_avatar.txt) encode an avatar as a 629-D vector of point
# coordinates, colours and line weights, grouped by facial component (§3, Fig. 2), and render it with PIL from cubic
# Bezier curves (contours, outlines), polygons (fills, highlights, shadows) and composites (eyebrows, hair) drawn in
# artist order with tapered line ends (§4.4, Fig. 4). Hair and accessories live outside the vector and come from a
# bank (§4.3). Their engine, its 629 parameters and its 470 hairstyles are not public: this section is our own engine
# with the paper's dimension and primitives, for the synthetic face world of worlds/faces.py, whose identities map
# exactly to their avatar vector (avatar_from_identity: the paper's artist-made avatars, made exact).
#
# Parameter table (AVATAR_GROUPS; every entry in [0, 1]; "pts" are (x, y) pairs in the unit canvas, x 0 = left ..
# 1 = right, y 0 = top .. 1 = bottom, the framing of faces.render_photo; a closed Bezier path of K anchors stores 3K
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

# Face-contour anchors on the right half, as a parameter u of the photo's outline (faces._outline): u in [0, 0.5]
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
    """Vectorised ground truth: layouts g (arrays (n,), faces.face_geometry's fields) and colours (n, 3) -> (n, 629)."""
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

    # eyes (faces._eyes with canonical_nuisance: openness 0.85, light from above): lids as exact Hermite cubics
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

    # eyebrows (faces._brows): spine y = yb + 0.012 (t^2 - 1) - 0.014 bang t, thickness 2 bth (1 - 0.4 t)
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
    """Layouts (faces.face_geometry) and colours of identities as arrays."""
    geos = [faces.face_geometry(i) for i in identities]
    g = {k: np.array([getattr(x, k) for x in geos], np.float64) for k in _GEO_FIELDS}
    col = {k: np.array([getattr(i, k) for i in identities], np.float64) for k in ("skin", "iris", "lips", "hair")}
    return g, col


def avatar_from_identity(identity: "faces.FaceIdentity", rng: np.random.Generator | None = None,
                         jitter: float = 0.0, mouth_open: float = 0.0) -> np.ndarray:
    """The ground-truth avatar vector (float32, (AVATAR_DIM,), in [0, 1]) of a synthetic identity.

    The identity's layout (faces.face_geometry: eye line, spacing and size, brows, nose, mouth, lips, chin, jaw, face
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

    Row i is avatar_from_identity(faces.sample_identity(seed, i), np.random.default_rng([0x5A, seed, i]), jitter):
    reproducible and independent of n. Built in vectorised chunks of 8192.
    """
    n = int(n)
    out = np.empty((n, AVATAR_DIM), np.float32)
    for a in range(0, n, 8192):
        idx = range(a, min(n, a + 8192))
        ids = [faces.sample_identity(seed, i) for i in idx]
        g, col = _identity_arrays(ids)
        y = _build(g, col)
        if jitter > 0:
            noise = np.stack([np.random.default_rng([0x5A, int(seed), i]).standard_normal(_NOISE_LEN) for i in idx])
            y = _apply_jitter(y, noise, jitter)
        out[a:a + len(ids)] = y
    return out


# · Hair and accessories (§4.3): a bank of hairstyles outside the 629-D vector

#: Accessory categories (the synthetic world's, faces.FACE_CATEGORICAL).
ACCESSORIES: dict[str, tuple[str, ...]] = {"glasses": ("none", "round", "square"),
                                           "facial_hair": ("none", "moustache", "beard", "goatee")}
#: The face-world attributes (indices into faces.ATTRIBUTE_NAMES) that describe hair and accessories: those the
#: bank's nearest-neighbour search compares (§4.3 retrieves "the best hair and accessory parameters"; eye size or nose
#: width only add noise to that search).
HAIR_ATTRIBUTES = tuple(i for i, n in enumerate(faces.ATTRIBUTE_NAMES)
                        if n == "hairline" or n.split(".")[0] == "hair" or n.split("=")[0] in
                        ("hair_style", "glasses", "facial_hair"))


@dataclass(frozen=True)
class HairStyle:
    """One bank hairstyle: a category of faces.FACE_CATEGORICAL['hair_style'] and a variant 0..2.

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
    for c in faces.FACE_CATEGORICAL["hair_style"] for v in range(3))


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


def hair_from_identity(identity: "faces.FaceIdentity") -> dict:
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


def save_avatar(stem: Path, y, size: int, hair: dict | None = None) -> np.ndarray:
    """<stem>.png (PIL, ``size`` px) and <stem>.svg of one avatar vector, each written atomically; the PNG's pixels."""
    img = render_avatar(y, size, hair)
    atomic_write(f"{stem}.png", lambda tmp: Image.fromarray(img).save(tmp, format="PNG"))
    atomic_write(f"{stem}.svg", lambda tmp: Path(tmp).write_text(avatar_svg(y, size, hair)))
    return img


# ======================================================================================================================
# Paired data (§3, §4.5): unpaired portraits and avatar vectors, the pairs, the validation and test identities
# ======================================================================================================================

SYNTHETIC_RENDER_MAX = 128   # the synthetic world renders at most 152 px; the paper preset upsamples 128 -> 256


def _coin(n: int, p: float, device, gen: torch.Generator | None) -> torch.Tensor:
    """(n, 1, 1, 1) booleans, each True with probability p."""
    return (torch.rand(n, device=device, generator=gen) < p).view(n, 1, 1, 1)


def augment_portraits(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """§4.5's augmentations, each on a random half (or fifth) of the batch: Gaussian blur (sigma up to 1.5 px at
    64 px), rotation (up to 10 degrees), horizontal flip, grayscale. x in [-1, 1]."""
    n, dev = x.shape[0], x.device
    x = torch.where(_coin(n, 0.5, dev, gen), x.flip(3), x)
    angle = (torch.rand(n, device=dev, generator=gen) * 2 - 1) * math.radians(10) * _coin(n, 0.5, dev, gen).view(n)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    sigma = torch.rand(n, device=dev, generator=gen) * 1.5 * x.shape[-1] / 64 * _coin(n, 0.3, dev, gen).view(n)
    x = face_nets.blur(x, sigma)
    grey = x.mul(torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return torch.where(_coin(n, 0.2, dev, gen), grey.expand_as(x), x)


def synthetic_pairs(split: str, n_identities: int, per_identity: int, size: int, world_seed: int,
                    limit: int | None = None) -> dict:
    """Photos of a face-world split with their ground-truth avatars and hair: the synthetic paired data."""
    data = faces.synthetic_faces(split, n_identities, per_identity, size, world_seed)
    ids = data["identity"].numpy()
    if limit is not None:
        ids = ids[:limit]
    people = {int(i): faces.sample_identity(world_seed, int(i)) for i in np.unique(ids)}
    y = np.stack([avatar_from_identity(people[int(i)]) for i in ids])
    return {"x": data["images"][:len(ids)], "y": torch.from_numpy(y), "identity": torch.from_numpy(ids),
            "hair": [hair_from_identity(people[int(i)]) for i in ids],
            "attributes": torch.from_numpy(np.stack([faces.attribute_vector(people[int(i)]) for i in ids])),
            "source": data["source"] + (f" (first {limit})" if limit is not None else "")}


def file_pairs(path: str, size: int) -> dict[str, dict]:
    """Real pairs from --pairs-file (format in crossmodal_avatar's --pairs-file help), split by their "split" field."""
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
                raise UsageError(f"--pairs-file: line {n}: {type(exc).__name__}: {exc}") from None
            require(y.shape == (AVATAR_DIM,) and np.isfinite(y).all() and y.min() >= 0 and y.max() <= 1,
                    f"--pairs-file: line {n}: 'avatar' must be {AVATAR_DIM} numbers in [0, 1]")
            require(split in rows, f"--pairs-file: line {n}: 'split' must be train, val or test, not {split!r}")
            photo = root / rec["photo"]
            try:
                with Image.open(photo) as img:
                    pixels = np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC), np.uint8)
            except Exception as exc:
                raise UsageError(f"--pairs-file: line {n}: cannot read {photo} ({type(exc).__name__})") from None
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


def load_data(args) -> dict:
    """Every data set of a crossmodal_avatar run (its Args), as uint8 images and float avatar vectors on the CPU:
    photos (unpaired portraits), vectors (unpaired avatars), pairs / val / test (portrait, avatar, hair)."""
    render = min(args.image_size, SYNTHETIC_RENDER_MAX)
    if args.faces_dir or args.faces == "folder":
        folder = faces.load_face_folder(args.faces_dir, args.image_size, limit=args.n_photos)
        photos, photo_source = folder["images"], folder["source"]
    else:
        s = faces.synthetic_faces("s", args.n_photos, 1, render, args.world_seed)
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


def pair_subset_order(pairs: dict, seed: int = 0) -> torch.Tensor:
    """The order in which pairs enter a subset of size N (Table 1's 3,995, Fig. 8's sizes): whole identities in a
    fixed shuffle, so a smaller set has fewer people (fewer avatars an artist had to make), each with all its photos."""
    ids = pairs["identity"].numpy()
    people = np.unique(ids)
    np.random.default_rng([0xF8, seed]).shuffle(people)
    return torch.from_numpy(np.concatenate([np.flatnonzero(ids == p) for p in people]))


# ======================================================================================================================
# A test set's avatars rendered (§5): Table 1's metrics, the comparison grid and 512 px renders, eval_retrieval probes
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


def make_evaluator(test: dict, hair_hat: list[dict], truth_hair: list[dict], size: int):
    """avatar_metrics against the test avatars, rendered once (face alone and with hair): (evaluate, the rendered
    ground truth with hair, what LPIPS is)."""
    gt_face = render_avatar_batch(test["y"], size).float() / 255
    gt_full = render_avatar_batch(test["y"], size, truth_hair).float() / 255
    lpips_net, lpips_note = face_nets.lpips_metric()
    evaluate = partial(avatar_metrics, y=test["y"], hair_hat=hair_hat, hair=truth_hair, size=size, gt_face=gt_face,
                       gt_full=gt_full, lpips_net=lpips_net)
    return evaluate, gt_full, lpips_note


def first_photos(test: dict) -> np.ndarray:
    """Index of the first test portrait of each identity."""
    ids = test["identity"].numpy()
    return np.array([np.flatnonzero(ids == p)[0] for p in dict.fromkeys(ids.tolist())])


def write_figures(out: Path, test: dict, gt_full: torch.Tensor, y_ours: torch.Tensor, y_base: torch.Tensor | None,
                  hair_hat: list[dict], size: int):
    """grid.png: photo | ground-truth avatar | ours | baseline, one identity per row, at ``size`` px; res512/: four
    of our avatars as 512 px PNGs and SVGs; res512.png: those four side by side."""
    rows = first_photos(test)[:12]
    hair = [hair_hat[i] for i in rows]
    cols = [faces.resize_images(faces.to_float_images(test["x"][rows]), size), gt_full[rows] * 2 - 1]
    cols += [render_avatar_batch(y[rows], size, hair).float() / 127.5 - 1 for y in (y_ours, y_base) if y is not None]
    save_grid(torch.stack(cols, 1).flatten(0, 1), out / "grid.png", nrow=len(cols))
    (out / "res512").mkdir(exist_ok=True)
    big = [save_avatar(out / "res512" / f"ours_{k:04d}", y_ours[k].numpy(), 512, hair_hat[k]) for k in rows[:4]]
    Image.fromarray(np.concatenate(big, 1)).save(out / "res512.png")


def save_avatar_probes(out: Path, test: dict, y_ours: torch.Tensor, y_base: torch.Tensor | None, hair_hat: list[dict],
                       truth_hair: list[dict]):
    """eval_retrieval.py's probes (common.save_probes): the two photos of each test identity (photo_x, photo_x2)
    and, from the first photo, the ground-truth avatar, ours and the baseline's, at 64 px."""
    ids, first = test["identity"].numpy(), first_photos(test)
    second = np.array([np.flatnonzero(ids == ids[i])[1] if (ids == ids[i]).sum() > 1 else -1 for i in first])
    if (second < 0).any():
        print("probes: skipped (eval_retrieval needs two photos of every test identity)")
        return
    photos = faces.to_float_images(test["x"])
    sets = {"photo_x": faces.resize_images(photos[first], 64), "photo_x2": faces.resize_images(photos[second], 64)}
    hair, truth = [hair_hat[i] for i in first], [truth_hair[i] for i in first]
    for name, y, h in (("gt_avatar", test["y"], truth), ("ours", y_ours, hair), ("baseline", y_base, hair)):
        if y is not None:
            sets[name] = faces.to_float_images(render_avatar_batch(y[first], 64, h))
    save_probes(out, sets, [int(ids[i]) for i in first])
