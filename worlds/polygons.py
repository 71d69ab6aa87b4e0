"""The polygon engine of tos_polygons.py (TOS §4.1): "binary 64x64 images of regular polygons ... sampling uniformly
three parameters: the number of vertices (3-6), the radius of the enclosing circle (15-30), and a rotation angle in the
range [-10, 10]". Also the measure the paper lacks: which real render fits an image best (validity), and how the
fitted parameters cover the prior (coverage)."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

SIZE = 64
N_VERTICES = (3, 4, 5, 6)
RADIUS = (15.0, 30.0)
ROTATION = (-10.0, 10.0)  # degrees; 0 puts a vertex straight above the centre, positive turns clockwise


def render(n: int, radius: float, rotation: float) -> np.ndarray:
    """The real engine: a filled regular polygon, centred, as a 64x64 uint8 array of 0 and 1 (drawn by PIL)."""
    img = Image.new("L", (SIZE, SIZE), 0)
    centre = SIZE / 2
    angles = [math.radians(rotation) + 2 * math.pi * k / n for k in range(n)]
    ImageDraw.Draw(img).polygon([(centre + radius * math.sin(a), centre - radius * math.cos(a)) for a in angles],
                                fill=1)
    return np.array(img, dtype=np.uint8)


def sample_params(rng: np.random.Generator, k: int) -> np.ndarray:
    """k parameter vectors (n, radius, rotation), uniform over the prior."""
    return np.stack([rng.choice(N_VERTICES, k).astype(np.float64), rng.uniform(*RADIUS, k),
                     rng.uniform(*ROTATION, k)], axis=1)


def render_batch(params: np.ndarray) -> torch.Tensor:
    """(k, 3) parameters -> (k, 1, 64, 64) float images in {-1, 1}. The vertex count is rounded and every parameter
    clipped to the prior's range, so any vector (e.g. c's output) renders."""
    n = np.clip(np.rint(params[:, 0]), N_VERTICES[0], N_VERTICES[-1]).astype(int)
    r = np.clip(params[:, 1], *RADIUS)
    rot = np.clip(params[:, 2], *ROTATION)
    imgs = np.stack([render(a, b, c) for a, b, c in zip(n, r, rot)])
    return torch.from_numpy(imgs).float().mul_(2).sub_(1).unsqueeze(1)


# u, the configuration vector that e takes and c predicts, is the parameters scaled to [-1, 1] (c ends in tanh).
_LOW = torch.tensor([N_VERTICES[0], RADIUS[0], ROTATION[0]], dtype=torch.float64)
_HIGH = torch.tensor([N_VERTICES[-1], RADIUS[1], ROTATION[1]], dtype=torch.float64)


def to_u(params: np.ndarray) -> torch.Tensor:
    return ((torch.as_tensor(params, dtype=torch.float64) - _LOW) / (_HIGH - _LOW) * 2 - 1).float()


def from_u(u: torch.Tensor) -> np.ndarray:
    return ((u.detach().double().cpu().clamp(-1, 1) + 1) / 2 * (_HIGH - _LOW) + _LOW).numpy()


class PolygonFitter:
    """Validity against the real renderer: for an image, the engine parameters whose render is nearest in per-pixel
    MSE, by exhaustive search over a grid (4 vertex counts x radius step 0.25 px x rotation step 0.5 degree =
    10,004 renders)."""

    def __init__(self, device: torch.device):
        n, r, rot = np.meshgrid(N_VERTICES, np.arange(RADIUS[0], RADIUS[1] + 1e-9, 0.25),
                                np.arange(ROTATION[0], ROTATION[1] + 1e-9, 0.5), indexing="ij")
        self.params = np.stack([n.ravel(), r.ravel(), rot.ravel()], 1).astype(np.float64)
        self.bank = render_batch(self.params).flatten(1).to(device)  # (M, 4096) in {-1, 1}
        self.bank_sq = (self.bank * self.bank).sum(1)

    @torch.no_grad()
    def fit(self, x: torch.Tensor, chunk: int = 250):
        """x: (N, 1, 64, 64) in [-1, 1] -> (best parameters (N, 3), per-pixel MSE to their render (N,))."""
        best_i, best_d = [], []
        for xs in x.flatten(1).to(self.bank).split(chunk):
            dist = (xs * xs).sum(1, keepdim=True) - 2 * xs @ self.bank.T + self.bank_sq  # squared L2, (n, M)
            d, i = dist.min(1)
            best_i.append(i)
            best_d.append(d.clamp_min(0) / xs.shape[1])
        return self.params[torch.cat(best_i).cpu().numpy()], torch.cat(best_d).cpu()


COVERAGE_BINS = {"n_vertices": np.array([2.5, 3.5, 4.5, 5.5, 6.5]), "radius": np.linspace(*RADIUS, 6),
                 "rotation": np.linspace(*ROTATION, 5)}


def image_metrics(x: torch.Tensor, fitter: PolygonFitter, threshold: float) -> dict:
    """Validity (per-pixel MSE to the best-fitting real render; valid below ``threshold``) and coverage (histograms of
    the fitted parameters and their total-variation distance to the uniform prior) of a set of images."""
    params, mse = fitter.fit(x)
    out = {"validity_mse_mean": mse.mean().item(), "validity_mse_median": mse.median().item(),
           "valid_fraction": (mse < threshold).float().mean().item(), "coverage": {}}
    for j, (name, edges) in enumerate(COVERAGE_BINS.items()):
        hist = np.histogram(params[:, j], edges)[0] / len(params)
        out["coverage"][name] = {"edges": edges.round(3).tolist(), "fraction": hist.round(4).tolist(),
                                 "tv_to_uniform": float(0.5 * np.abs(hist - 1 / len(hist)).sum())}
    return out
