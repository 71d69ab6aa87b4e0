"""Tied Output Synthesis on polygons: TOS paper §4.1 (journal §6.3, Fig. 8), against a DCGAN baseline.

Wolf, Taigman, Polyak. "Unsupervised Creation of Parameterized Avatars", ICCV 2017 (../shared/papers/tos_iccv2017.txt).

The toy problem: a polygon engine renders a binary 64x64 image from three parameters u (vertex count, radius,
rotation). A network e learns to mimic the engine. A DCGAN learns to generate polygon-like images G(z) from noise;
TOS trains the same G together with a network c and the frozen e, so that every G(z) is e-compliant: there is a u with
G(z) = e(u), namely u = c(G(z)) (Eq. 4). The paper shows only pictures (Fig. 5); this script also measures.

    python tos_polygons.py                    # the paper's preset on CUDA, the quick one otherwise
    python tos_polygons.py --preset quick     # narrower layers and fewer steps: < 10 min on a 2-core CPU
    python tos_polygons.py --resume runs/tos_polygons/<run>    # continue after Ctrl-C
    python tos_polygons.py --dry-run          # a few steps of everything (smoke test)

Algorithm (TOS Alg. 1, restricted as in §4.1 to L_c + alpha * L_GAN, since there is no f):
    0. train e on 10,000 (u, render(u)) pairs, supervised; then freeze it
    for each step:
        sample z ~ U[-1,1]^100 and a batch x' of real renders from t
        update d:      maximize log d(x') + log(1 - d(G(z)))                      (Eq. 7)
        update G, c:   minimize ||G(z) - e(c(G(z)))||^2 + alpha * -log d(G(z))   (Eq. 4/5 + Eq. 7)
    (c-bar, which inverts e on real renders, is trained before the GANs: DCGAN's e-compliance needs it)
The DCGAN baseline is the same loop without c and L_c.

Evaluation the paper lacks, over --n-eval samples of each model (see ``tied_metrics``):
    e-compliance   ||G(z) - e(c(G(z)))||^2 (per-pixel MSE); for DCGAN with c-bar, trained to invert e on real renders
    validity       the 3 parameters of the real renderer that best fit G(z) (grid search), the MSE to that best fit,
                   and the fraction of samples under --valid-threshold
    coverage       histograms of the fitted parameters against the uniform prior, and their total-variation distance

Deviations from the paper (the README repeats them, with the runs behind them):
  * Training schedule: the paper gives none. We use dcgan.torch's defaults (Adam, lr 2e-4, beta1 0.5, batch 64),
    since §4.1 says that code was used for the baseline, and fixed step counts (see Args).
  * G's loss is the non-saturating -log d(G(z)) of dcgan.torch, not log(1 - d(G(z))) of Eq. 7.
  * L_c's normalisation is not given, and it sets what alpha = 1 means. We take the per-pixel mean (an MSE, the unit
    of e's "MSE of 0.1"). The literal squared norm summed over 4,096 pixels (--lc-reduction sum) outweighs L_GAN so
    far that G collapsed onto a single polygon in every validation run.
  * c starts as a copy of c-bar (--c-init cbar); Alg. 1 step 2 only says "initialize". From a random c, G collapsed
    in validation (a constant c pulls every G(z) towards one image).
  * The quick preset uses alpha = 0.1, chosen on validation seeds 100 and 101 (at alpha = 1 its narrow TOS was less
    e-compliant than DCGAN on seed 100); the paper preset keeps alpha = 1.
  * d follows dcgan.torch for 64x64 inputs (64-128-256-512-1, no batch norm on its first layer); Table 1's d is
    written for the 152x152 emoji. c uses leaky ReLU 0.2 as ICCV §4.2 says (Table 1 says ReLU).
  * G is updated once per step with L_c + alpha * L_GAN, which has the same gradient as Alg. 1's separate steps 7
    and 12 taken together.
  * The image scale is [-1, 1] (tanh); the paper does not say which scale its MSE of 0.1 is in.
  * The quick preset narrows every layer 4x and trains fewer steps; the paper preset keeps Table 1's widths.

Known defect (README, "Paper preset"): at Table 1's widths c-bar's tanh saturates within 50 steps and c-bar does not
learn to invert e (its parameter error is at chance); the quick widths are fine.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

import common
from common import (DownscalingEncoder, UpscalingGenerator, compliance_loss, freeze, gan_d_loss, gan_g_loss,
                    require)


@dataclass
class Args(common.RunArgs):
    # Data: the polygon engine (§4.1)
    n_e_train: int = 10000
    """renders to train e on (§4.1: "10,000 training images were created and used in order to train a CNN e")"""
    n_t: int = 10000
    """renders in the GAN's target set t (§4.1: "A training set t of a similar size")"""
    n_e_test: int = 1000
    """held-out renders on which e's MSE is reported (not in the paper)"""

    # Networks (journal Table 1; filters listed in layer order, the output layer not included)
    nz: int = 100
    """dimension of G's input z ~ U[-1,1]^nz (§4.1: "a random vector in [-1, 1]^100")"""
    e_widths: tuple = (512, 256, 128, 64)
    """e's upscaling layers before the 1-channel output (Table 1: "512-256-128-64-3 filters", 1 channel here)"""
    g_widths: tuple = (512, 256, 128, 64)
    """G's upscaling layers before the output (Table 1, e's architecture from z; dcgan.torch ngf=64)"""
    d_widths: tuple = (64, 128, 256, 512)
    """d's stride-2 layers before the 1-logit output (dcgan.torch ndf=64, which §4.1 says was used)"""
    c_widths: tuple = (64, 128, 256, 512)
    """c's (and c-bar's) stride-2 layers before the 3 tanh outputs (Table 1: "five convolutional layers with
    64-128-256-512-813 filters", 3 parameters here)"""

    # Optimisation (not given by the paper: dcgan.torch defaults)
    batch_size: int = 64
    """mini-batch size (dcgan.torch default; the paper gives none)"""
    lr: float = 2e-4
    """Adam learning rate for every network (dcgan.torch default; the paper names Adam, DTN §3)"""
    beta1: float = 0.5
    """Adam beta1 (dcgan.torch default)"""
    e_steps: int = 8000
    """steps to train e (51 epochs of 10,000 renders; the paper gives no schedule)"""
    cbar_steps: int = 4000
    """steps to train c-bar to invert e on real renders (for DCGAN's e-compliance; not in the paper)"""
    gan_steps: int = 8000
    """steps of DCGAN and of TOS, each (51 epochs of t; dcgan.torch's default is 25 epochs)"""
    alpha: float = 1.0
    """weight of L_GAN against L_c (§4.1: "minimizes L_c + alpha L_GAN, for alpha = 1")"""
    c_init: str = "cbar"
    """how TOS's c starts: random (DCGAN init), or cbar, a copy of c-bar (Alg. 1 step 2 only says "initialize")"""
    lc_reduction: str = "mean"
    """L_c per image: sum, Eq. 4's squared norm summed over pixels; or mean, the per-pixel MSE"""

    # Evaluation (not in the paper)
    n_eval: int = 1000
    """samples of each model to evaluate (the issue asks for at least 1,000)"""
    valid_threshold: float = 0.05
    """a sample is valid when the per-pixel MSE to its best-fitting real render is below this ([-1, 1] scale;
    0.05 is about 50 of 4,096 pixels flipped)"""



PRESETS = {
    "paper": {},
    "quick": dict(e_widths=(128, 64, 32, 16), g_widths=(128, 64, 32, 16), d_widths=(16, 32, 64, 128),
                  c_widths=(16, 32, 64, 128), e_steps=1500, cbar_steps=600, gan_steps=1500, alpha=0.1,
                  log_every=50, ckpt_every=500),
}
DRY_RUN = dict(n_e_train=256, n_t=256, n_e_test=64, e_steps=3, cbar_steps=3, gan_steps=3, n_eval=64, log_every=1,
               ckpt_every=2)
PHASES = ("e", "cbar", "dcgan", "tos")
LOG_FIELDS = ["loss_e", "loss_cbar", "loss_d", "loss_g_gan", "loss_c"]


def validate(args: Args):
    """Every check that can fail on the arguments alone, before any file is written."""
    for name in ("n_e_train", "n_t", "n_e_test", "nz", "batch_size", "n_eval", "log_every", "ckpt_every"):
        require(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
    for name in ("e_steps", "cbar_steps", "gan_steps"):
        require(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be 0 or more")
    for name in ("e_widths", "g_widths", "d_widths", "c_widths"):
        w = getattr(args, name)
        require(len(w) == 4 and all(v >= 1 for v in w),
                f"--{name.replace('_', '-')} needs 4 positive widths for 64x64 images, got {w}")
    require(args.lr > 0 and 0 <= args.beta1 < 1, "--lr must be positive and --beta1 in [0, 1)")
    require(args.alpha >= 0 and args.valid_threshold > 0, "--alpha must be >= 0 and --valid-threshold > 0")
    require(args.lc_reduction in ("sum", "mean"), "--lc-reduction must be sum or mean")
    require(args.c_init in ("random", "cbar"), "--c-init must be random or cbar")


# ======================================================================================================================
# The polygon engine (§4.1): "binary 64x64 images of regular polygons ... sampling uniformly three parameters: the
# number of vertices (3-6), the radius of the enclosing circle (15-30), and a rotation angle in the range [-10, 10]"
# ======================================================================================================================
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


# ======================================================================================================================
# Evaluation
# ======================================================================================================================
COVERAGE_BINS = {"n_vertices": np.array([2.5, 3.5, 4.5, 5.5, 6.5]), "radius": np.linspace(*RADIUS, 6),
                 "rotation": np.linspace(*ROTATION, 5)}


def image_metrics(x: torch.Tensor, fitter: PolygonFitter, threshold: float) -> dict:
    """Validity and coverage of a set of images (see the module docstring)."""
    params, mse = fitter.fit(x)
    out = {"validity_mse_mean": mse.mean().item(), "validity_mse_median": mse.median().item(),
           "valid_fraction": (mse < threshold).float().mean().item(), "coverage": {}}
    for j, (name, edges) in enumerate(COVERAGE_BINS.items()):
        hist = np.histogram(params[:, j], edges)[0] / len(params)
        out["coverage"][name] = {"edges": edges.round(3).tolist(), "fraction": hist.round(4).tolist(),
                                 "tv_to_uniform": float(0.5 * np.abs(hist - 1 / len(hist)).sum())}
    return out


@torch.no_grad()
def tied_metrics(g_z: torch.Tensor, c, e, fitter, threshold) -> dict:
    """Everything measured on one generator's samples g_z, with c the network that maps images to u."""
    u = c(g_z)
    e_c_g = e(u)
    return {"e_compliance": compliance_loss(g_z, e_c_g, "mean").item(),
            # The real engine rendered from c's parameters: is the tied output (G(z), c(G(z))) consistent?
            "engine_compliance": compliance_loss(g_z.cpu(), render_batch(from_u(u)), "mean").item(),
            "G(z)": image_metrics(g_z, fitter, threshold),
            "e(c(G(z)))": image_metrics(e_c_g, fitter, threshold)}


def results_table(m: dict, threshold: float) -> str:
    """The README's table, in markdown, from metrics.json's numbers."""
    rows = [("real renders (reference)", m["reference"]["real renders"], None, None),
            ("e(u), u from the prior (reference)", m["reference"]["e(u)"], None, None)]
    for name in ("dcgan", "tos"):
        label = "DCGAN" if name == "dcgan" else "TOS"
        cname = "c-bar" if name == "dcgan" else "c"
        mm = m[name]
        rows.append((f"{label} G(z)", mm["G(z)"], mm["e_compliance"], mm["engine_compliance"]))
        rows.append((f"{label} e({cname}(G(z)))", mm["e(c(G(z)))"], None, None))

    def f(v):
        return "" if v is None else f"{v:.4f}"
    lines = [f"| samples | e-compliance | engine-compliance | validity MSE | valid (< {threshold}) | "
             "TV to uniform: n / radius / rotation |", "|---|---|---|---|---|---|"]
    for label, im, ec, gc in rows:
        tv = " / ".join(f"{im['coverage'][k]['tv_to_uniform']:.3f}" for k in COVERAGE_BINS)
        lines.append(f"| {label} | {f(ec)} | {f(gc)} | {im['validity_mse_mean']:.4f} | "
                     f"{100 * im['valid_fraction']:.1f}% | {tv} |")
    return "\n".join(lines)


# ======================================================================================================================
# Main: arguments, data, networks, training phases, evaluation, outputs
# ======================================================================================================================
def main(argv=None):
    t_start = time.time()
    args, preset, device, out, ckpt = common.start_run("tos_polygons", Args, PRESETS, DRY_RUN, validate,
                                                       argv, description=__doc__.split("\n")[0])

    # ------------------------------------------------------------------------------------------------------------------
    # Seeding, then data. The data come from their own numpy generator, so a resumed run rebuilds exactly the same sets.
    # ------------------------------------------------------------------------------------------------------------------
    common.seed_everything(args.seed)
    data_rng = np.random.default_rng(args.seed)
    print("data: synthetic polygons from the PIL engine (no download needed)")
    p_e_train, p_t, p_e_test, p_eval = (sample_params(data_rng, k) for k in
                                        (args.n_e_train, args.n_t, args.n_e_test, args.n_eval))
    u_e_train, x_e_train = to_u(p_e_train).to(device), render_batch(p_e_train).to(device)   # e's training pairs
    t = render_batch(p_t).to(device)                                                        # the target set t
    u_e_test, x_e_test = to_u(p_e_test).to(device), render_batch(p_e_test).to(device)      # e's held-out pairs
    x_eval, u_eval = render_batch(p_eval).to(device), to_u(sample_params(data_rng, args.n_eval)).to(device)
    z_gen = torch.Generator().manual_seed(args.seed + 1)
    z_eval = (torch.rand(args.n_eval, args.nz, generator=z_gen) * 2 - 1).to(device)  # fixed inputs, both GANs
    n_grid = min(64, args.n_eval)

    # ------------------------------------------------------------------------------------------------------------------
    # Networks (journal Table 1):
    #   e: u (3 parameters) -> image, mimics the engine; trained first, then fixed
    #   G: z -> image, the generator; d: image -> real/fake logit, the GAN's discriminator
    #   c: image -> u, trained with G so that e(c(G(z))) = G(z); c-bar: the same network trained on real renders
    # ------------------------------------------------------------------------------------------------------------------
    def make_c():
        return DownscalingEncoder(1, args.c_widths, 3, final="tanh")

    def make_d():
        return DownscalingEncoder(1, args.d_widths, 1, bn_first=False)

    nets = {"e": UpscalingGenerator(3, args.e_widths, 1), "cbar": make_c(),
            "dcgan_G": UpscalingGenerator(args.nz, args.g_widths, 1), "dcgan_d": make_d(),
            "tos_G": UpscalingGenerator(args.nz, args.g_widths, 1), "tos_d": make_d(), "tos_c": make_c()}
    for net in nets.values():
        net.to(device)
    opts = {k: torch.optim.Adam(v.parameters(), lr=args.lr, betas=(args.beta1, 0.999)) for k, v in nets.items()}
    e = nets["e"]

    steps = {"e": args.e_steps, "cbar": args.cbar_steps, "dcgan": args.gan_steps, "tos": args.gan_steps}
    runner = common.PhaseRunner("tos_polygons", args, out, nets, opts, steps, LOG_FIELDS, ckpt, t_start)

    def batch(x: torch.Tensor, *more: torch.Tensor):
        return common.sample_batch(args.batch_size, x, *more)

    def noise():
        return torch.rand(args.batch_size, args.nz, device=device) * 2 - 1  # z ~ U[-1, 1]^nz

    # ------------------------------------------------------------------------------------------------------------------
    # One training step of each phase; each returns its losses as tensors (read on the host only when logged).
    # ------------------------------------------------------------------------------------------------------------------
    def step_e():
        # e is trained supervised on (u, render(u)) pairs: minimize ||e(u) - x||^2 (§4.1, "MSE of 0.1")
        u, x = batch(u_e_train, x_e_train)
        loss = torch.nn.functional.mse_loss(e(u), x)
        opts["e"].zero_grad(set_to_none=True)
        loss.backward()
        opts["e"].step()
        return {"loss_e": loss}

    def step_cbar():
        # c-bar inverts the fixed e on real renders: minimize ||x' - e(c-bar(x'))||^2 (Eq. 4 with G = identity)
        (x,) = batch(t)
        loss = compliance_loss(x, e(nets["cbar"](x)), args.lc_reduction)
        opts["cbar"].zero_grad(set_to_none=True)
        loss.backward()
        opts["cbar"].step()
        return {"loss_cbar": loss}

    def gan_step(G, d, opt_G, opt_d, c=None, opt_c=None):
        """One DCGAN step; with c, one TOS step (Alg. 1 steps 4-7 and 11-12)."""
        (x_real,) = batch(t)
        g_z = G(noise())
        # (1) Update d: maximize log d(x') + log(1 - d(G(z)))                         (Eq. 7)
        loss_d = gan_d_loss(d(x_real), d(g_z.detach()))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # (2) Update G: maximize log d(G(z)) (non-saturating L_GAN)                      (Eq. 7)
        loss_gan = gan_g_loss(d(g_z))
        losses = {"loss_d": loss_d, "loss_g_gan": loss_gan}
        loss_G = loss_gan
        if c is not None:
            # (3) TOS: G and c both minimize L_c = ||G(z) - e(c(G(z)))||^2, e fixed     (Eq. 4/5, Alg. 1 step 12)
            loss_c = compliance_loss(g_z, e(c(g_z)), args.lc_reduction)
            loss_G = loss_c + args.alpha * loss_gan
            losses["loss_c"] = loss_c
            opt_c.zero_grad(set_to_none=True)
        opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        opt_G.step()
        if c is not None:
            opt_c.step()
        return losses

    def phase_setup(phase: str, start_step: int):
        """Train mode for the networks this phase trains; e is fixed after its own phase."""
        for net in nets.values():
            net.eval()
        trained = {"e": ["e"], "cbar": ["cbar"], "dcgan": ["dcgan_G", "dcgan_d"],
                   "tos": ["tos_G", "tos_d", "tos_c"]}[phase]
        for k in trained:
            nets[k].train()
        if phase != "e":
            freeze(e)
        if phase == "tos" and start_step == 0 and args.c_init == "cbar":
            nets["tos_c"].load_state_dict(nets["cbar"].state_dict())
        return {"e": step_e, "cbar": step_cbar,
                "dcgan": lambda: gan_step(nets["dcgan_G"], nets["dcgan_d"], opts["dcgan_G"], opts["dcgan_d"]),
                "tos": lambda: gan_step(nets["tos_G"], nets["tos_d"], opts["tos_G"], opts["tos_d"],
                                        nets["tos_c"], opts["tos_c"])}[phase]

    @torch.no_grad()
    def e_test_mse() -> float:
        return torch.nn.functional.mse_loss(e.eval()(u_e_test), x_e_test).item()

    def after_phase(phase: str):
        if phase == "e":
            mse = e_test_mse()
            print(f"e: held-out MSE {mse:.4f} on the [-1, 1] scale ({mse / 4:.4f} on [0, 1]); "
                  f"the paper reports 'MSE of 0.1'")

    # ------------------------------------------------------------------------------------------------------------------
    # Training: the phases in order, each from where a checkpoint left it
    # ------------------------------------------------------------------------------------------------------------------
    if not runner.run(phase_setup, after_phase):
        return 130

    # ------------------------------------------------------------------------------------------------------------------
    # Evaluation (fixed z_eval for both GANs; fresh renders and e(u) as references)
    # ------------------------------------------------------------------------------------------------------------------
    for net in nets.values():
        net.eval()
    print(f"evaluating {args.n_eval} samples of each model against the real renderer ...")
    fitter = PolygonFitter(device)
    e_mse = e_test_mse()
    with torch.no_grad():
        g_dcgan, g_tos = nets["dcgan_G"](z_eval), nets["tos_G"](z_eval)
        e_u = e(u_eval)
        cbar_test_u = nets["cbar"](x_e_test)
        metrics = {
            "e": {"test_mse": e_mse, "test_mse_0_1_scale": e_mse / 4, "paper_mse": 0.1},
            "cbar": {"param_mae_on_held_out_renders": dict(zip(
                ("n_vertices", "radius", "rotation"),
                np.abs(from_u(cbar_test_u) - from_u(u_e_test)).mean(0).round(4).tolist()))},
            "reference": {"real renders": image_metrics(x_eval, fitter, args.valid_threshold),
                          "e(u)": image_metrics(e_u, fitter, args.valid_threshold)},
            "dcgan": tied_metrics(g_dcgan, nets["cbar"], e, fitter, args.valid_threshold),
            "tos": tied_metrics(g_tos, nets["tos_c"], e, fitter, args.valid_threshold),
        }
        metrics["tos"]["e_compliance_with_cbar"] = compliance_loss(g_tos, e(nets["cbar"](g_tos)), "mean").item()

        # Sample grids from fixed inputs
        common.save_grid(t[:n_grid], out / "real_polygons.png")
        common.save_grid(torch.stack([x_e_test[:32], e(u_e_test[:32])], 1).flatten(0, 1), out / "e_vs_engine.png")
        common.save_grid(g_dcgan[:n_grid], out / "dcgan_G.png")
        common.save_grid(e(nets["cbar"](g_dcgan[:n_grid])), out / "dcgan_e_cbar_G.png")
        common.save_grid(g_tos[:n_grid], out / "tos_G.png")
        common.save_grid(e(nets["tos_c"](g_tos[:n_grid])), out / "tos_e_c_G.png")
        common.save_grid(render_batch(from_u(nets["tos_c"](g_tos[:n_grid]))), out / "tos_engine_c_G.png")

    wall = runner.elapsed()
    table = results_table(metrics, args.valid_threshold)
    common.write_json(out / "metrics.json", {
        "script": "tos_polygons", "preset": preset, "seed": args.seed, "device": common.describe_device(device),
        "data_source": "synthetic: polygons rendered by PIL (no download needed)", "wall_time_s": round(wall, 1),
        "n_eval": args.n_eval, "valid_threshold": args.valid_threshold, **metrics})
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"TOS vs DCGAN: e-compliance {metrics['tos']['e_compliance']:.4f} vs "
          f"{metrics['dcgan']['e_compliance']:.4f}; valid {100 * metrics['tos']['G(z)']['valid_fraction']:.1f}% vs "
          f"{100 * metrics['dcgan']['G(z)']['valid_fraction']:.1f}%; wall time {wall / 60:.1f} min; output {out}")
    return 0


if __name__ == "__main__":
    common.run_main(main, "tos_polygons.py")
