"""Tied Output Synthesis on polygons: TOS paper §4.1 (journal §6.3, Fig. 8), against a DCGAN baseline.

Wolf, Taigman, Polyak. "Unsupervised Creation of Parameterized Avatars", ICCV 2017 (../shared/papers/tos_iccv2017.txt).

The toy problem: a polygon engine renders a binary 64x64 image from three parameters u (vertex count, radius,
rotation). A network e learns to mimic the engine. A DCGAN learns to generate polygon-like images G(z) from noise;
TOS trains the same G together with a network c and the frozen e, so that every G(z) is e-compliant: there is a u with
G(z) = e(u), namely u = c(G(z)) (Eq. 4). The paper shows only pictures (Fig. 5); this script also measures.

    python tos_polygons.py                    # the quick preset, on any device: 8.5-11.3 min on 2 CPU cores
    python tos_polygons.py --preset paper     # Table 1's widths and a longer schedule, for one GPU
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

Evaluation the paper lacks, over --n-eval samples of each model (``tied_metrics``; README.md defines each measure):
e-compliance ||G(z) - e(c(G(z)))||^2 (DCGAN uses c-bar, trained to invert e on real renders), validity (the MSE to
the best-fitting real render, by grid search) and coverage (the fitted parameters against the uniform prior).

Deviations from the paper (README.md has the table; docs/tos_polygons.md the runs behind it):
  * Schedule: the paper gives none; we use dcgan.torch's defaults (Adam, lr 2e-4, beta1 0.5, batch 64), the code
    §4.1 used for the baseline, and fixed step counts (the "ours" block of Args).
  * G's loss is dcgan.torch's non-saturating -log d(G(z)), not Eq. 7's log(1 - d(G(z))): same fixed point.
  * L_c is the per-pixel mean (an MSE, the unit of e's "MSE of 0.1"), not Eq. 4's sum over 4,096 pixels, which
    outweighs L_GAN so far that alpha = 1 loses its meaning (--lc-reduction).
  * c starts as a copy of c-bar (--c-init cbar); Alg. 1 step 2 only says "initialize", and a random c collapsed G.
  * d is dcgan.torch's for 64x64 inputs (64-128-256-512-1, no batch norm on its first layer): Table 1's d is for the
    152x152 emoji. c uses leaky ReLU 0.2, as ICCV §4.2 says (Table 1 says ReLU).
  * G and c take one step on L_c + alpha * L_GAN: the same gradient as Alg. 1's steps 7 and 12 together.
  * One forward of d on G(z) serves both players, and both gradients are taken before either network moves
    (dcgan.torch reuses d's output on the fake batch for G's loss too); Alg. 1 updates d (steps 5-6), then G (7).
  * c ends in batch norm, then Table 1's tanh (--c-final bn_tanh): with the tanh alone, Adam drove c-bar's
    pre-activations into the tanh's flat tails within 50 steps at Table 1's widths and c never learned.
  * Images are in [-1, 1] (tanh); the paper does not say which scale its MSE of 0.1 is in.
  * The quick preset halves every layer's width, trains fewer steps and uses alpha = 0.01, lowered over TOS's last
    300 steps to 0.0003 (--anneal-steps, --alpha-final; chosen on validation seed 100); the paper preset keeps
    Table 1's widths and a fixed alpha = 1, and has had no full run since c's fix.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

import common
from common import (DownscalingEncoder, UpscalingGenerator, compliance_loss, freeze, gan_d_loss, gan_g_loss,
                    require)
from worlds.polygons import COVERAGE_BINS, PolygonFitter, from_u, image_metrics, render_batch, sample_params, to_u


@dataclass
class Args(common.RunArgs):
    # Data: the polygon engine (§4.1)
    n_e_train: int = 10000
    """renders to train e on (§4.1: "10,000 training images were created and used in order to train a CNN e")"""
    n_t: int = 10000
    """renders in the GAN's target set t (§4.1: "A training set t of a similar size")"""

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

    # Loss (§4.1)
    alpha: float = 1.0
    """weight of L_GAN against L_c (§4.1: "minimizes L_c + alpha L_GAN, for alpha = 1")"""
    anneal_steps: int = 0
    """ours: TOS's last N steps lower alpha geometrically to --alpha-final; 0 keeps alpha fixed, as §4.1 does"""
    alpha_final: float = 0.001
    """ours: alpha at TOS's last step when --anneal-steps > 0"""

    # Evaluation (not in the paper)
    n_e_test: int = 1000
    """held-out renders on which e's MSE is reported"""
    n_eval: int = 1000
    """samples of each model to evaluate"""
    valid_threshold: float = 0.05
    """a sample is valid when the per-pixel MSE to its best-fitting real render is below this ([-1, 1] scale;
    0.05 is about 50 of 4,096 pixels flipped)"""

    # Ours: deviations from the paper (docstring, README)
    batch_size: int = 64
    """ours: mini-batch size, dcgan.torch's default (the paper gives none)"""
    lr: float = 2e-4
    """ours: Adam learning rate for every network, dcgan.torch's default (the paper names Adam, DTN §3, no rate)"""
    beta1: float = 0.5
    """ours: Adam beta1, dcgan.torch's default (the paper gives none)"""
    e_steps: int = 8000
    """ours: steps to train e, 51 epochs of 10,000 renders (the paper gives no schedule)"""
    cbar_steps: int = 4000
    """ours: steps to train c-bar to invert e on real renders, for DCGAN's e-compliance (c-bar is not in §4.1)"""
    gan_steps: int = 8000
    """ours: steps of DCGAN and of TOS, each, 51 epochs of t (the paper gives none; dcgan.torch's default is 25
    epochs)"""
    c_init: str = "cbar"
    """ours: how TOS's c starts: cbar, a copy of c-bar, or random, DCGAN's init (Alg. 1 step 2 only says
    "initialize")"""
    c_final: str = "bn_tanh"
    """ours: c's output: bn_tanh, batch norm before Table 1's tanh, or tanh alone, which saturates within 50 steps
    (docs/tos_polygons.md, "c's tanh")"""
    lc_reduction: str = "mean"
    """ours: L_c per image: mean, the per-pixel MSE; or sum, over pixels (Eq. 4's squared norm, scale unstated)"""


PRESETS = {
    "paper": {},
    "quick": dict(e_widths=(256, 128, 64, 32), g_widths=(256, 128, 64, 32), d_widths=(32, 64, 128, 256),
                  c_widths=(32, 64, 128, 256), e_steps=1000, cbar_steps=400, gan_steps=1200, alpha=0.01,
                  anneal_steps=300, alpha_final=0.0003,
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
    require(args.alpha_final >= 0 and args.anneal_steps >= 0, "--alpha-final and --anneal-steps must be >= 0")
    require(args.lc_reduction in ("sum", "mean"), "--lc-reduction must be sum or mean")
    require(args.c_init in ("random", "cbar"), "--c-init must be random or cbar")
    require(args.c_final in ("tanh", "bn_tanh"), "--c-final must be tanh or bn_tanh")


def make_data(args: Args, device: torch.device) -> dict:
    """Every tensor the run uses, from their own numpy generator (and torch generator for z_eval), so that a resumed
    run rebuilds exactly the same sets."""
    data_rng = np.random.default_rng(args.seed)
    print("data: synthetic polygons from the PIL engine (no download needed)")
    p_e_train, p_t, p_e_test, p_eval = (sample_params(data_rng, k) for k in
                                        (args.n_e_train, args.n_t, args.n_e_test, args.n_eval))
    data = {"u_e_train": to_u(p_e_train).to(device), "x_e_train": render_batch(p_e_train).to(device),  # e's pairs
            "t": render_batch(p_t).to(device),                                                         # target set t
            "u_e_test": to_u(p_e_test).to(device), "x_e_test": render_batch(p_e_test).to(device),      # e's held out
            "x_eval": render_batch(p_eval).to(device),
            "u_eval": to_u(sample_params(data_rng, args.n_eval)).to(device)}
    z_gen = torch.Generator().manual_seed(args.seed + 1)
    data["z_eval"] = (torch.rand(args.n_eval, args.nz, generator=z_gen) * 2 - 1).to(device)  # fixed, both GANs
    # Images and networks channels-last: the convolutions' fastest layout on the CPU (docs/tos_polygons.md, timing)
    return {k: common.channels_last(v) for k, v in data.items()}


# ======================================================================================================================
# Networks (journal Table 1):
#   e: u (3 parameters) -> image, mimics the engine; trained first, then fixed
#   G: z -> image, the generator; d: image -> real/fake logit, the GAN's discriminator
#   c: image -> u, trained with G so that e(c(G(z))) = G(z); c-bar: the same network trained on real renders
# ======================================================================================================================
def build_networks(args: Args, device: torch.device) -> tuple[dict, dict]:
    """The networks of both models (built in this order, which sets their initial weights) and an Adam for each."""
    make_G = partial(UpscalingGenerator, args.nz, args.g_widths, 1)
    make_d = partial(DownscalingEncoder, 1, args.d_widths, 1, bn_first=False)
    make_c = partial(DownscalingEncoder, 1, args.c_widths, 3, final=args.c_final)
    nets = {"e": UpscalingGenerator(3, args.e_widths, 1), "cbar": make_c(),
            "dcgan_G": make_G(), "dcgan_d": make_d(), "tos_G": make_G(), "tos_d": make_d(), "tos_c": make_c()}
    for net in nets.values():
        net.to(device, memory_format=torch.channels_last)
    opts = {k: torch.optim.Adam(v.parameters(), lr=args.lr, betas=(args.beta1, 0.999)) for k, v in nets.items()}
    return nets, opts


# ======================================================================================================================
# ALGO LOGIC: one training step of each phase; each returns its losses as tensors (read only when logged)
# ======================================================================================================================
def update_e(e, opt_e, u_train: torch.Tensor, x_train: torch.Tensor, args: Args) -> dict:
    """e learns the engine, supervised on (u, render(u)) pairs."""
    u, x = common.sample_batch(args.batch_size, u_train, x_train)
    # Update e: minimize ||e(u) - x||^2                                               (§4.1, "MSE of 0.1")
    loss = torch.nn.functional.mse_loss(e(u), x)
    opt_e.zero_grad(set_to_none=True)
    loss.backward()
    opt_e.step()
    return {"loss_e": loss}


def update_cbar(cbar, e, opt_cbar, t: torch.Tensor, args: Args) -> dict:
    """c-bar learns to invert the fixed e on real renders (DCGAN has no c of its own)."""
    (x,) = common.sample_batch(args.batch_size, t)
    # Update c-bar: minimize ||x' - e(c-bar(x'))||^2                                  (Eq. 4 with G = identity)
    loss = compliance_loss(x, e(cbar(x)), args.lc_reduction)
    opt_cbar.zero_grad(set_to_none=True)
    loss.backward()
    opt_cbar.step()
    return {"loss_cbar": loss}


def update_gan(G, d, opt_G, opt_d, x_real: torch.Tensor, g_z: torch.Tensor, loss_c=None, opt_c=None,
               alpha: float = 1.0) -> dict:
    """Alg. 1 steps 5-7 (and 12 when c is given): one forward of d on G(z) serves both players, as dcgan.torch reuses
    d's output on the fake batch for G's loss; both gradients are taken before either network moves."""
    d_fake = d(g_z)
    # (1) Update d: maximize log d(x') + log(1 - d(G(z)))                             (Eq. 7, Alg. 1 steps 5-6)
    loss_d = gan_d_loss(d(x_real), d_fake)
    # (2) Update G (and c): minimize L_c + alpha * L_GAN, L_GAN = -log d(G(z))  (Eq. 4/5 and 7, Alg. 1 steps 7, 12)
    loss_gan = gan_g_loss(d_fake)
    loss_G = loss_gan if loss_c is None else loss_c + alpha * loss_gan
    opts = [opt_G] if opt_c is None else [opt_G, opt_c]
    d_params = list(d.parameters())
    grads_d = torch.autograd.grad(loss_d, d_params, retain_graph=True)  # reaches d's parameters only, not G's
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    loss_G.backward(inputs=[p for opt in opts for group in opt.param_groups for p in group["params"]])
    for p, grad in zip(d_params, grads_d):
        p.grad = grad
    for opt in (opt_d, *opts):
        opt.step()
    return {"loss_d": loss_d, "loss_g_gan": loss_gan}


def update_dcgan(G, d, opt_G, opt_d, t: torch.Tensor, args: Args) -> dict:
    """One step of the DCGAN baseline: Alg. 1 steps 4-7, without c and L_c."""
    (x_real,) = common.sample_batch(args.batch_size, t)
    g_z = G(torch.rand(args.batch_size, args.nz, device=t.device) * 2 - 1)  # z ~ U[-1, 1]^nz
    return update_gan(G, d, opt_G, opt_d, x_real, g_z)


def update_tos(G, c, d, e, opt_G, opt_c, opt_d, t: torch.Tensor, args: Args, alpha: float) -> dict:
    """One TOS step (Alg. 1 steps 4-7 and 11-12): DCGAN's step, with L_c added to G's loss and minimized by c too."""
    (x_real,) = common.sample_batch(args.batch_size, t)
    g_z = G(torch.rand(args.batch_size, args.nz, device=t.device) * 2 - 1)  # z ~ U[-1, 1]^nz
    # L_c = ||G(z) - e(c(G(z)))||^2, e fixed, minimized by G and c                   (Eq. 4/5, Alg. 1 steps 7, 12)
    loss_c = compliance_loss(g_z, e(c(g_z)), args.lc_reduction)
    return {**update_gan(G, d, opt_G, opt_d, x_real, g_z, loss_c, opt_c, alpha), "loss_c": loss_c}


def alpha_schedule(args: Args) -> np.ndarray:
    """alpha at each TOS step: fixed (§4.1) or, over the last --anneal-steps, down to --alpha-final (ours)."""
    n = min(args.anneal_steps, args.gan_steps)
    ramp = np.geomspace if args.alpha > 0 and args.alpha_final > 0 else np.linspace
    return np.concatenate([np.full(args.gan_steps - n, args.alpha), ramp(args.alpha, args.alpha_final, n)])


TRAINED = {"e": ["e"], "cbar": ["cbar"], "dcgan": ["dcgan_G", "dcgan_d"], "tos": ["tos_G", "tos_d", "tos_c"]}


def setup_phase(nets: dict, opts: dict, data: dict, args: Args, phase: str, start_step: int):
    """Train mode for the networks this phase trains, eval mode for the rest; e is fixed after its own phase, and
    TOS's c starts from c-bar (--c-init cbar). Returns the phase's step function."""
    for name, net in nets.items():
        net.train(name in TRAINED[phase])
    if phase != "e":
        freeze(nets["e"])
    if phase == "tos" and start_step == 0 and args.c_init == "cbar":
        nets["tos_c"].load_state_dict(nets["cbar"].state_dict())
    if phase == "e":
        return partial(update_e, nets["e"], opts["e"], data["u_e_train"], data["x_e_train"], args)
    if phase == "cbar":
        return partial(update_cbar, nets["cbar"], nets["e"], opts["cbar"], data["t"], args)
    if phase == "dcgan":
        return partial(update_dcgan, nets["dcgan_G"], nets["dcgan_d"], opts["dcgan_G"], opts["dcgan_d"], data["t"],
                       args)
    alphas = iter(alpha_schedule(args)[start_step:].tolist())  # a resumed run continues the schedule
    step = partial(update_tos, nets["tos_G"], nets["tos_c"], nets["tos_d"], nets["e"],
                   opts["tos_G"], opts["tos_c"], opts["tos_d"], data["t"], args)
    return lambda: step(next(alphas))


@torch.no_grad()
def e_test_mse(e, data: dict) -> float:
    return torch.nn.functional.mse_loss(e.eval()(data["u_e_test"]), data["x_e_test"]).item()


def report_e(e, data: dict, phase: str):
    """After e's phase: its held-out MSE, against the paper's."""
    if phase == "e":
        mse = e_test_mse(e, data)
        print(f"e: held-out MSE {mse:.4f} on the [-1, 1] scale ({mse / 4:.4f} on [0, 1]); "
              f"the paper reports 'MSE of 0.1'")


# ======================================================================================================================
# Main: arguments, seeding, data, networks, training phases, evaluation, outputs
# ======================================================================================================================
def main(argv=None):
    t_start = time.time()
    args, preset, device, out, ckpt = common.start_run("tos_polygons", Args, PRESETS, DRY_RUN, validate, argv,
                                                       __doc__.split("\n")[0], common.quick_everywhere)
    common.seed_everything(args.seed)
    data = make_data(args, device)
    nets, opts = build_networks(args, device)

    steps = dict(zip(PHASES, (args.e_steps, args.cbar_steps, args.gan_steps, args.gan_steps)))
    runner = common.PhaseRunner("tos_polygons", args, out, nets, opts, steps, LOG_FIELDS, ckpt, t_start)
    if not runner.run(partial(setup_phase, nets, opts, data, args), partial(report_e, nets["e"], data)):
        return 130

    metrics = evaluate(nets, data, args, device, out)
    write_outputs(out, args, preset, device, metrics, runner.elapsed())
    return 0


# ======================================================================================================================
# Evaluation and outputs (not in the paper: it shows pictures only)
# ======================================================================================================================
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
    rows = [("real renders (reference)", m["reference"]["real renders"], "", ""),
            ("e(u), u from the prior (reference)", m["reference"]["e(u)"], "", "")]
    for name, label, cname in (("dcgan", "DCGAN", "c-bar"), ("tos", "TOS", "c")):
        mm = m[name]
        rows += [(f"{label} G(z)", mm["G(z)"], f"{mm['e_compliance']:.4f}", f"{mm['engine_compliance']:.4f}"),
                 (f"{label} e({cname}(G(z)))", mm["e(c(G(z)))"], "", "")]
    lines = [f"| samples | e-compliance | engine-compliance | validity MSE | valid (< {threshold}) | "
             "TV to uniform: n / radius / rotation |", "|---|---|---|---|---|---|"]
    for label, im, ec, gc in rows:
        tv = " / ".join(f"{im['coverage'][k]['tv_to_uniform']:.3f}" for k in COVERAGE_BINS)
        lines.append(f"| {label} | {ec} | {gc} | {im['validity_mse_mean']:.4f} | {100 * im['valid_fraction']:.1f}% | "
                     f"{tv} |")
    return "\n".join(lines)


@torch.no_grad()
def evaluate(nets: dict, data: dict, args: Args, device: torch.device, out) -> dict:
    """metrics.json's numbers and the sample grids, from fixed z_eval for both GANs (fresh renders and e(u) as
    references)."""
    for net in nets.values():
        net.eval()
    print(f"evaluating {args.n_eval} samples of each model against the real renderer ...")
    fitter = PolygonFitter(device)
    e, cbar, thr = nets["e"], nets["cbar"], args.valid_threshold
    e_mse = e_test_mse(e, data)
    g_dcgan, g_tos = nets["dcgan_G"](data["z_eval"]), nets["tos_G"](data["z_eval"])
    e_u = e(data["u_eval"])
    cbar_test_u = cbar(data["x_e_test"])
    metrics = {
        "e": {"test_mse": e_mse, "test_mse_0_1_scale": e_mse / 4, "paper_mse": 0.1},
        "cbar": {"param_mae_on_held_out_renders": dict(zip(
            ("n_vertices", "radius", "rotation"),
            np.abs(from_u(cbar_test_u) - from_u(data["u_e_test"])).mean(0).round(4).tolist()))},
        "reference": {"real renders": image_metrics(data["x_eval"], fitter, thr),
                      "e(u)": image_metrics(e_u, fitter, thr)},
        "dcgan": tied_metrics(g_dcgan, cbar, e, fitter, thr),
        "tos": tied_metrics(g_tos, nets["tos_c"], e, fitter, thr),
    }
    metrics["tos"]["e_compliance_with_cbar"] = compliance_loss(g_tos, e(cbar(g_tos)), "mean").item()

    # Sample grids from fixed inputs
    n = min(64, args.n_eval)
    common.save_grid(data["t"][:n], out / "real_polygons.png")
    common.save_grid(torch.stack([data["x_e_test"][:32], e(data["u_e_test"][:32])], 1).flatten(0, 1),
                     out / "e_vs_engine.png")
    common.save_grid(g_dcgan[:n], out / "dcgan_G.png")
    common.save_grid(e(cbar(g_dcgan[:n])), out / "dcgan_e_cbar_G.png")
    common.save_grid(g_tos[:n], out / "tos_G.png")
    u_tos = nets["tos_c"](g_tos[:n])
    common.save_grid(e(u_tos), out / "tos_e_c_G.png")
    engine_c_g = render_batch(from_u(u_tos))
    common.save_grid(engine_c_g, out / "tos_engine_c_G.png")
    save_fig5({"(a) real renders": data["x_eval"], "(b) DCGAN G(z)": g_dcgan, "(c) TOS G(z)": g_tos,
               "(d) engine(c(G(z)))": engine_c_g}, out / "fig5.png")
    return metrics


def save_fig5(columns: dict[str, torch.Tensor], path, n: int = 16, nrow: int = 4):
    """Fig. 5 of §4.1 as one picture: a captioned panel per column (the same n fixed inputs in each), side by side."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid
    panels = [make_grid(x[:n].detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=2, pad_value=0.0)
              for x in columns.values()]
    h, w, top, gap = panels[0].shape[1], panels[0].shape[2], 22, 12
    canvas = Image.new("L", (len(panels) * (w + gap) - gap, h + top), 255)
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=13)
    for k, (caption, panel) in enumerate(zip(columns, panels)):
        pixels = ((panel[0] + 1) * 127.5).round().byte().numpy()
        canvas.paste(Image.fromarray(pixels), (k * (w + gap), top))
        draw.text((k * (w + gap) + 2, 3), caption, fill=0, font=font)
    common.atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def write_outputs(out, args: Args, preset: str, device: torch.device, metrics: dict, wall: float):
    """metrics.json, table.md, and a one-line summary."""
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


if __name__ == "__main__":
    common.run_main(main, "tos_polygons.py")
