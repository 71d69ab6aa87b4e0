"""From a face photo to an emoji and its configuration: TOS §4.2 (journal §6.4), with DTN, c-bar and DANN baselines.

Wolf, Taigman, Polyak. "Unsupervised Creation of Parameterized Avatars", ICCV 2017 (../shared/papers/tos_iccv2017.txt);
Taigman, Polyak, Wolf. "Unsupervised Cross-Domain Image Generation", ICLR 2017 §5.2 (dtn_iclr2017.txt); the journal
version of both (dtn_tos_journal.txt): Table 1 gives the architectures, §6.4.2 the DANN baseline.

From unlabelled photos s, unlabelled emoji t, a fixed face-identity network f and an engine that renders a configuration
u (one-hot switches), TOS learns G = g o f (photo -> emoji) and c (emoji -> u) so that G(x) keeps f's identity and is
e-compliant, G(x) = e(c(G(x))), where e mimics the engine. The avatar is the engine's render of c(G(x)).

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
                       L_TID = ||x' - g(f(x'))||^2 (Eq. 8), L_TV the total variation of G(x)
Baselines, scored alike: DTN (DTN §5.2: the same f, g and d, a ternary d, no c; its configuration is c-bar(G(x)));
c-bar (c trained to invert the engine on its renders); TOS fixed c-bar (c frozen to c-bar); DANN (journal §6.4.2:
the engine's renders as the labelled source, photos as the target; features p, label predictor l, and a domain
classifier behind a gradient reversal).

Deviations from the paper (README.md gives the reasons; docs/tos_emoji.md the runs behind them):
  * Bitmoji's engine is private: ours (worlds/emoji.py) has 11 one-hot groups, 61 switches against the paper's 813;
    its ground truth of a synthetic identity makes the paper's "manual" emoji exact.
  * f is not DeepFace: the synthetic world's ArcFace ResNet, trained on photos only with style-removing augmentations
    (--f-style-aug) so that it reads identity from a cartoon, or dlib's face ResNet for real photos.
  * c's output enters e as the valid configuration it decodes to, with a per-group softmax's gradient (--c-decode
    straight_through, --st-tau 0.2); the paper does not say how.
  * L_CONST is the mean of Eq. 6 on G(x) and on e(c(G(x))) (--const-on both): on G(x) alone, G fools the small
    synthetic f with images that are no emoji. `--c-decode tanh --const-on G` is the paper's setting.
  * L_c is a per-pixel mean (--lc-reduction mean), as in tos_polygons.py; the paper gives no normalisation.
  * DTN's weights (100, 1, 0.05) are read in DTN's notation, L_G = L_GANG + alpha L_CONST + beta L_TID + gamma L_TV.
  * g's batch-norm statistics are recomputed on s before evaluation (--bn-recalibrate): g trains on f(s) and f(t) in
    separate batches, so its running statistics mix the two (see dtn_digits.py).
  * DANN's p ends in a 7x7 convolution with stride 1, so that its output is §6.4.2's 2048-D (no kernel given).
  * Adam (lr 2e-4, beta1 0.5), batch 64, the step counts and data sizes are ours. The quick preset narrows every
    network and shows d 64x64 emoji instead of 152x152 ones.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
from common import (DownscalingEncoder, UpscalingGenerator, compliance_loss, const_loss, freeze, gan_d_loss,
                    gan_g_loss, require, tid_loss, tv_loss)
from worlds import face_nets, faces
from worlds.emoji import (CONFIG_DIM, GROUP_SLICES, baseline_accuracy, config_to_dict, decode_config,
                          f_across_domains, face_source, group_accuracy, load_data, photos_64, render_emoji_batch,
                          synthetic_f_config)

to_float = faces.to_float_images  # uint8 photos or emoji -> [-1, 1]

# ======================================================================================================================
# Arguments: the paper's values as defaults (§4.2 and journal §6.4, Table 1), then ours
# ======================================================================================================================


@dataclass
class Args(common.RunArgs):
    # Data
    faces: str = "synthetic"
    """synthetic (the face world, with ground truth), celeba (torchvision) or folder (--faces-dir); real: dlib's f"""
    faces_dir: str = ""
    """a folder of aligned 150x150 face chips (a sub-folder per identity, or identity.txt); sets --faces folder"""
    data_root: str = "data"
    """where torchvision keeps (or downloads) CelebA"""
    download: bool = True
    """let torchvision download CelebA"""
    n_eval: int = 500
    """evaluation identities, two photos each (x and x'), never in s or in f's training set"""
    world_seed: int = 0
    """seed of the synthetic face world (worlds/faces.py)"""

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

    # Losses (§4.2: "alpha = 0.01, beta = 100, gamma = 1, delta = 0.0005"; DTN: ICLR §5.2)
    alpha: float = 0.01
    """TOS: weight of L_GAN (§4.2)"""
    beta: float = 100.0
    """TOS: weight of L_CONST (§4.2)"""
    gamma: float = 1.0
    """TOS: weight of L_TID (§4.2)"""
    delta: float = 0.0005
    """TOS: weight of L_TV (§4.2)"""
    dtn_const: float = 100.0
    """DTN baseline: weight of L_CONST (ICLR §5.2 "alpha = 100"; journal §6.4)"""
    dtn_tid: float = 1.0
    """DTN baseline: weight of L_TID (ICLR §5.2 "beta = 1")"""
    dtn_tv: float = 0.05
    """DTN baseline: weight of L_TV (ICLR §5.2 "gamma = 0.05")"""

    # Training (Alg. 1)
    c_init: str = "random"
    """how TOS's c starts: random (DCGAN init, Alg. 1 step 2: "initialize"), or cbar, a copy of c-bar"""
    d_every: int = 1
    """d is updated once every d_every g updates (Alg. 1 updates it every step)"""
    methods: str = "tos,dtn,tos_fixed_cbar,dann"
    """which methods to train, comma-separated (c-bar is trained whenever DTN or fixed c-bar needs it)"""

    # Outputs
    apply: str = ""
    """comma-separated aligned face chips (150x150, dlib's alignment) to turn into emoji with --ckpt"""
    ckpt: str = ""
    """with --apply: the run folder (or its ckpt.pt) of a trained tos_emoji run"""

    # Ours: deviations from the paper (docstring, README)
    n_s: int = 20000
    """ours: unlabelled source photos in s (§4.2: "one million random images")"""
    n_t: int = 20000
    """ours: emoji in t, rendered by the engine from random configurations (§4.2: Bitmoji's avatars, no number)"""
    n_e_train: int = 20000
    """ours: (configuration, render) pairs that train e and c-bar (the paper gives no number)"""
    f_steps: int = 1500
    """ours: training steps of the synthetic f (trained once, then cached); the paper's f is a pretrained DeepFace"""
    f_identities: int = 1000
    """ours: identities of the face world's f split (16 photos each) that train the synthetic f (DeepFace: 4,030)"""
    f_style_aug: float = 1.0
    """ours: probability of face_nets.style_augment per training photo of f (0 = flips only); DeepFace has none"""
    c_decode: str = "straight_through"
    """ours: straight_through (one-hot forward, softmax gradient backward) or tanh (c's output); the paper: unsaid"""
    st_tau: float = 0.2
    """ours: the temperature of --c-decode straight_through's softmax (the paper has no such decoding)"""
    const_on: str = "both"
    """ours: L_CONST on G (Eq. 6, the paper's), on e_c_G (e(c(G(x)))) or on both (the mean of the two terms)"""
    lc_reduction: str = "mean"
    """ours: L_c per pixel (mean) or Eq. 4's squared norm (sum, 12,288 times larger); the paper gives none"""
    lr: float = 2e-4
    """ours: Adam learning rate of every network (DCGAN's; the paper gives none)"""
    beta1: float = 0.5
    """ours: Adam beta1 (DCGAN's; the paper gives none)"""
    batch_size: int = 64
    """ours: mini-batch size of s and of t (the paper gives none)"""
    e_steps: int = 20000
    """ours: steps of e's supervised training on (u, engine(u)) pairs (the paper gives none)"""
    cbar_steps: int = 10000
    """ours: steps of c-bar's supervised training on (engine(u), u) pairs (the paper gives none)"""
    gan_steps: int = 20000
    """ours: steps of each GAN (TOS, DTN, TOS fixed c-bar; the paper gives none)"""
    dann_steps: int = 10000
    """ours: steps of DANN (the paper gives none)"""
    bn_recalibrate: bool = True
    """ours: recompute g's batch-norm statistics on 100 source batches before evaluating (the paper does not)"""


PRESETS = {
    "paper": {},
    "quick": dict(n_s=10000, n_t=10000, n_e_train=10000, n_eval=300, f_steps=600,
                  e_widths=(128, 64, 32, 16), c_widths=(16, 32, 64, 128), g_widths=(128, 64, 32, 16),
                  d_widths=(16, 32, 64, 128), dann_widths=(16, 32, 64, 128), d_size=64, batch_size=32, e_steps=2000,
                  cbar_steps=1000, gan_steps=1500, dann_steps=1000, log_every=50, ckpt_every=500),
}
DRY_RUN = dict(n_s=128, n_t=128, n_e_train=128, n_eval=16, f_steps=2, f_identities=64, e_steps=2, cbar_steps=2,
               gan_steps=2, dann_steps=2, log_every=1, ckpt_every=2, batch_size=8)
METHODS = ("tos", "dtn", "tos_fixed_cbar", "dann")
LOG_FIELDS = ["loss_e", "loss_cbar", "loss_d", "loss_gan", "loss_c", "loss_const", "loss_tid", "loss_tv",
              "loss_label", "loss_domain"]
CHOICES = {"c_init": ("random", "cbar"), "lc_reduction": ("mean", "sum"), "c_decode": ("straight_through", "tanh"),
           "const_on": ("G", "e_c_G", "both"), "faces": ("synthetic", "celeba", "folder")}


def validate(args: Args):
    """Every check that can fail on the arguments alone, before any file is written."""
    for name, ok in CHOICES.items():
        require(getattr(args, name) in ok, f"--{name.replace('_', '-')} must be {', '.join(ok[:-1])} or {ok[-1]}")
    require(not args.apply or args.ckpt, "--apply needs --ckpt RUN_DIR (a trained tos_emoji run)")
    require(not args.apply or Path(args.ckpt).exists(), f"--ckpt: no run or checkpoint at {args.ckpt}")
    for p in (p for p in args.apply.split(",") if p):
        require(Path(p).is_file(), f"--apply: no file {p}")
        face_nets.read_photo(p)   # an unreadable photo is one line, before anything is written
    require(args.st_tau > 0, "--st-tau must be positive")
    require(0 <= args.f_style_aug <= 1, "--f-style-aug is a probability, in [0, 1]")
    for name in ("n_s", "n_t", "n_e_train", "n_eval", "batch_size", "log_every", "ckpt_every", "f_steps", "d_every",
                 "f_identities"):
        require(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
    for name in ("e_steps", "cbar_steps", "gan_steps", "dann_steps", "alpha", "beta", "gamma", "delta", "dtn_const",
                 "dtn_tid", "dtn_tv"):
        require(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be 0 or more")
    for name in ("e_widths", "c_widths", "g_widths", "dann_widths"):
        w = getattr(args, name)
        require(len(w) == 4 and min(w) >= 1, f"--{name.replace('_', '-')} needs 4 positive widths, got {w}")
    require(len(args.d_widths) >= 1 and min(args.d_widths) >= 1, "--d-widths needs positive widths")
    require(args.d_size == 4 * 2 ** len(args.d_widths) or (args.d_size == 152 and len(args.d_widths) == 5),
            f"--d-size {args.d_size} does not fit {len(args.d_widths)} stride-2 layers of d: use "
            f"{4 * 2 ** len(args.d_widths)} (or 152 with 5 widths, Table 1)")
    require(args.faces != "folder" or args.faces_dir, "--faces folder needs --faces-dir DIR")
    unknown = set(m for m in args.methods.split(",") if m) - set(METHODS)
    require(not unknown and args.methods, f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    require(args.lr > 0 and 0 <= args.beta1 < 1, "--lr must be positive and --beta1 in [0, 1)")


# ======================================================================================================================
# Networks (journal Table 1 and §6.4.2) and losses
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
    """Journal §6.4.2: p, "4 convolution layers ... 64-128-256-512 filters" (the last with stride 1, no batch norm or
    leaky ReLU; 2048-D); l, fully connected 1024-512-configuration (batch norm, leaky ReLU, tanh last); the domain
    classifier, fully connected 512-1 behind the gradient reversal (a logit, for BCE with logits)."""

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


def make_c(widths) -> DownscalingEncoder:
    """c (and c-bar): a 64x64 emoji -> a configuration, tanh in [-1, 1] (Table 1: five convolutional layers)."""
    return DownscalingEncoder(3, widths, CONFIG_DIM, final="tanh")


def build_networks(args: Args, methods: list[str], code_dim: int, device: torch.device) -> dict:
    """The trained networks, built (and initialised) in this order (journal Table 1): e (configuration -> emoji);
    c-bar, when DTN, fixed c-bar or --c-init cbar needs it; per GAN method g (f's code -> emoji), d (real/fake, or 3
    classes for DTN) and TOS's own c; then DANN."""
    need_cbar = any(m in methods for m in ("dtn", "tos_fixed_cbar")) or ("tos" in methods and args.c_init == "cbar")
    nets = {"e": UpscalingGenerator(CONFIG_DIM, args.e_widths, 3)}
    if need_cbar:
        nets["cbar"] = make_c(args.c_widths)
    for m in ("tos", "dtn", "tos_fixed_cbar"):
        if m in methods:
            nets[f"{m}_g"] = NineLayerG(code_dim, args.g_widths)
            nets[f"{m}_d"] = DownscalingEncoder(3, args.d_widths, 3 if m == "dtn" else 1, bn_first=False)
            if m == "tos":
                nets["tos_c"] = make_c(args.c_widths)
    if "dann" in methods:
        nets["dann"] = DANN(CONFIG_DIM, args.dann_widths)
    for net in nets.values():
        net.to(device)
    return nets


# Losses (the shared ones are in common.py: gan_d_loss, gan_g_loss, dtn_d_loss, dtn_gang_loss, const_loss, ...)
def configuration_for_e(scores: torch.Tensor, decode: str = "straight_through", tau: float = 0.2) -> torch.Tensor:
    """c's output (tanh) as e's input, on e's {-1, 1} scale. straight_through: the valid configuration forward (the
    engine's), the gradient of a per-group softmax(scores / tau) backward (Bengio et al. 2013), so that L_c and
    L_CONST reach c and G; tanh: the scores as they are."""
    if decode == "tanh":
        return scores
    hard = decode_config(scores)
    soft = torch.cat([F.softmax(scores[:, sl] / tau, 1) for sl in GROUP_SLICES.values()], 1)
    return 2 * (hard + soft - soft.detach()) - 1


def tos_const_loss(const_on: str, f, fx: torch.Tensor, g_x: torch.Tensor, e_c_g_x: torch.Tensor) -> torch.Tensor:
    """L_CONST of TOS (Eq. 6, ||f(x) - f(G(x))||^2) on G(x), on e(c(G(x))) or the mean of the two (--const-on)."""
    emoji = {"G": [g_x], "e_c_G": [e_c_g_x], "both": [g_x, e_c_g_x]}[const_on]
    return sum(const_loss(fx, f(img)) for img in emoji) / len(emoji)


def tos_generator_loss(args: Args, L: dict) -> torch.Tensor:
    """What g and c minimize (TOS §3.2, weights §4.2): L_c + alpha L_GAN + beta L_CONST + gamma L_TID + delta L_TV."""
    return (L["loss_c"] + args.alpha * L["loss_gan"] + args.beta * L["loss_const"] + args.gamma * L["loss_tid"]
            + args.delta * L["loss_tv"])


def dtn_generator_loss(args: Args, L: dict) -> torch.Tensor:
    """What DTN's g minimizes (ICLR §3, weights §5.2): L_G = L_GANG + alpha L_CONST + beta L_TID + gamma L_TV."""
    return L["loss_gan"] + args.dtn_const * L["loss_const"] + args.dtn_tid * L["loss_tid"] + args.dtn_tv * L["loss_tv"]


# ======================================================================================================================
# ALGO LOGIC: one training step per phase, each returning its losses as tensors (read on the host only when logged):
# TOS, its baselines, the supervised pretraining of e and c-bar, then the small pieces they share
# ======================================================================================================================


def update_tos(g, d, c, e, opt_g, opt_d, opt_c, data: dict, args: Args, clock: PhaseClock) -> dict:
    """One step of TOS (Alg. 1, steps 4-12). "TOS fixed c-bar" is this same update with c = c-bar, frozen, and
    opt_c None: c is not trained, every other term and weight is Alg. 1's."""
    fx, x_t, g_x, g_t = gan_batch(g, data, args)
    # (1) Update d: maximize log d(x') + log(1 - d(G(x))), every d_every steps                        (Eq. 7)
    if clock.next() % args.d_every == 0:
        clock.loss_d = update_d(opt_d, gan_d_loss(d(for_d(x_t, args)), d(for_d(g_x.detach(), args))))
    # (2) Update g and c: minimize L_c + alpha L_GAN + beta L_CONST + gamma L_TID + delta L_TV          (§3.2)
    loss_tid = tid_loss(x_t, g_t)                              # L_TID = ||x' - G(x')||^2 for x' in t  (Eq. 8)
    loss_tv = tv_loss(g_x)                                     # L_TV, the total variation of G(x)    (§3.2)
    loss_gan = gan_g_loss(d(for_d(g_x, args)))                 # L_GAN: -log d(G(x)), non-saturating  (Eq. 7)
    e_c_g_x = e(configuration_for_e(c(g_x), args.c_decode, args.st_tau))  # e fixed; c decoded for e (--c-decode)
    loss_c = compliance_loss(g_x, e_c_g_x, args.lc_reduction)  # L_c = ||G(x) - e(c(G(x)))||^2        (Eq. 5)
    # L_CONST = ||f(x) - f(G(x))||^2 (Eq. 6), on G(x) and/or e(c(G(x))) (--const-on); f fixed, not detached
    loss_const = tos_const_loss(args.const_on, data["f"], fx, g_x, e_c_g_x)
    losses = {"loss_d": clock.loss_d, "loss_tid": loss_tid, "loss_tv": loss_tv, "loss_gan": loss_gan,
              "loss_c": loss_c, "loss_const": loss_const}
    loss_G = tos_generator_loss(args, losses)
    opt_g.zero_grad(set_to_none=True)
    if opt_c is not None:
        opt_c.zero_grad(set_to_none=True)
    loss_G.backward()
    opt_g.step()
    if opt_c is not None:
        opt_c.step()   # c and g both minimize L_c (Alg. 1 step 12)
    return losses


def update_dtn(g, d, opt_g, opt_d, data: dict, args: Args, clock: PhaseClock) -> dict:
    """One step of the DTN baseline (ICLR §3, Eqs. 3-7, weights of §5.2): a ternary d, no c."""
    fx, x_t, g_x, g_t = gan_batch(g, data, args)
    # (1) Update d: minimize -log D_1(G(x)) - log D_2(G(x')) - log D_3(x'), every d_every steps    (DTN Eq. 3)
    if clock.next() % args.d_every == 0:
        clock.loss_d = update_d(opt_d, common.dtn_d_loss(d(for_d(g_x.detach(), args)), d(for_d(g_t.detach(), args)),
                                                         d(for_d(x_t, args))))
    # (2) Update g: minimize L_GANG + alpha L_CONST + beta L_TID + gamma L_TV                        (DTN §3)
    loss_tid = tid_loss(x_t, g_t)                              # L_TID = ||x' - G(x')||^2 for x' in t  (DTN Eq. 6)
    loss_tv = tv_loss(g_x)                                     # L_TV, the total variation of G(x)    (DTN Eq. 7)
    loss_const = const_loss(fx, data["f"](g_x))                # L_CONST = ||f(x) - f(G(x))||^2       (DTN Eq. 5)
    loss_gan = common.dtn_gang_loss(d(for_d(g_x, args)), d(for_d(g_t, args)))   # L_GANG, d_3 on both (DTN Eq. 4)
    losses = {"loss_d": clock.loss_d, "loss_tid": loss_tid, "loss_tv": loss_tv, "loss_const": loss_const,
              "loss_gan": loss_gan}
    loss_G = dtn_generator_loss(args, losses)
    opt_g.zero_grad(set_to_none=True)
    loss_G.backward()
    opt_g.step()
    return losses


def update_dann(net: DANN, opt, data: dict, args: Args, clock: PhaseClock) -> dict:
    """One step of DANN (journal §6.4.2): l(p(.)) learns configurations on the engine's renders (the labelled
    source); the domain classifier, behind the gradient reversal, makes p's features of renders and photos alike."""
    u, x_src = common.sample_batch(args.batch_size, data["u_e"], data["x_e"])
    (x_tgt,) = common.sample_batch(args.batch_size, data["s"])
    progress = clock.next() / max(1, args.dann_steps)
    lam = 2.0 / (1.0 + np.exp(-10 * progress)) - 1.0   # Ganin & Lempitsky's schedule of the reversal weight
    p_src, p_tgt = net.p(to_float(x_src)), net.p(photos_64(x_tgt))
    # minimize the label loss ||l(p(x)) - u||^2 on the source, and the domain loss over both domains: the domain
    # classifier minimizes it, p (behind the reversal) maximizes it
    loss_label = F.mse_loss(net.l(p_src), 2 * u - 1)
    logits = net.domain_logit(torch.cat([p_src, p_tgt]), lam)
    labels = torch.cat([torch.zeros(len(u), device=u.device), torch.ones(len(x_tgt), device=u.device)])
    loss_domain = F.binary_cross_entropy_with_logits(logits, labels)
    opt.zero_grad(set_to_none=True)
    (loss_label + loss_domain).backward()
    opt.step()
    return {"loss_label": loss_label, "loss_domain": loss_domain}


def update_e(e, opt_e, data: dict, args: Args) -> dict:
    """e mimics the engine, supervised on (u, engine(u)) pairs (§4.2); e reads u on the {-1, 1} scale."""
    u, x = common.sample_batch(args.batch_size, data["u_e"], data["x_e"])
    # minimize ||e(u) - engine(u)||^2
    loss_e = F.mse_loss(e(2 * u - 1), to_float(x))
    opt_e.zero_grad(set_to_none=True)
    loss_e.backward()
    opt_e.step()
    return {"loss_e": loss_e}


def update_cbar(cbar, opt_cbar, data: dict, args: Args) -> dict:
    """c-bar inverts the engine, supervised on its renders (§4.2)."""
    u, x = common.sample_batch(args.batch_size, data["u_e"], data["x_e"])
    # minimize ||c-bar(engine(u)) - u||^2, u on c's {-1, 1} scale
    loss_cbar = F.mse_loss(cbar(to_float(x)), 2 * u - 1)
    opt_cbar.zero_grad(set_to_none=True)
    loss_cbar.backward()
    opt_cbar.step()
    return {"loss_cbar": loss_cbar}


def update_d(opt_d, loss_d: torch.Tensor) -> torch.Tensor:
    """One step of d on its loss; returns the loss, detached, for the log."""
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    return loss_d.detach()


def gan_batch(g, data: dict, args: Args):
    """A GAN step's batch: f(x) for photos x in s (codes computed once), emoji x' in t, G(x) and G(x')."""
    (fx,) = common.sample_batch(args.batch_size, data["f_s"])
    x_t, ft = common.sample_batch(args.batch_size, data["t"], data["f_t"])
    return fx, to_float(x_t), g(fx), g(ft)


def for_d(img: torch.Tensor, args: Args) -> torch.Tensor:
    """d sees emoji "scaled-up" to d_size (§4.2)."""
    return faces.resize_images(img, args.d_size)


class PhaseClock:
    """The step's index in its phase (d's schedule, DANN's reversal weight); d's last loss, for steps that skip d."""

    def __init__(self, start_step: int, device: torch.device):
        self.step, self.loss_d = start_step, torch.zeros((), device=device)

    def next(self) -> int:
        self.step += 1
        return self.step - 1


TRAINED = {"e": ["e"], "cbar": ["cbar"], "tos": ["tos_g", "tos_d", "tos_c"], "dtn": ["dtn_g", "dtn_d"],
           "tos_fixed_cbar": ["tos_fixed_cbar_g", "tos_fixed_cbar_d"], "dann": ["dann"]}


def setup_phase(nets: dict, opts: dict, data: dict, args: Args, phase: str, start_step: int):
    """Train mode for what this phase trains; e (after its phase), f and c-bar (after its phase) are fixed.
    Returns the phase's step (common.PhaseRunner calls it once per step)."""
    for k, net in nets.items():
        net.train(k in TRAINED[phase])
    if phase != "e":
        freeze(nets["e"])
    if phase not in ("e", "cbar") and "cbar" in nets:
        freeze(nets["cbar"])   # DTN and TOS fixed c-bar use c-bar as it is
    if phase == "tos" and start_step == 0 and args.c_init == "cbar":
        nets["tos_c"].load_state_dict(nets["cbar"].state_dict())
    clock = PhaseClock(start_step, data["f_s"].device)
    if phase == "e":
        return partial(update_e, nets["e"], opts["e"], data, args)
    if phase == "cbar":
        return partial(update_cbar, nets["cbar"], opts["cbar"], data, args)
    if phase == "dann":
        return partial(update_dann, nets["dann"], opts["dann"], data, args, clock)
    if phase == "dtn":
        return partial(update_dtn, nets["dtn_g"], nets["dtn_d"], opts["dtn_g"], opts["dtn_d"], data, args, clock)
    # TOS, or TOS fixed c-bar: the same update, there with c = c-bar (frozen above) and no optimizer for c
    c, opt_c = (nets["tos_c"], opts["tos_c"]) if phase == "tos" else (nets["cbar"], None)
    return partial(update_tos, nets[f"{phase}_g"], nets[f"{phase}_d"], c, nets["e"], opts[f"{phase}_g"],
                   opts[f"{phase}_d"], opt_c, data, args, clock)


def after_phase(e, data: dict, phase: str):
    """After e's phase: e's error against the engine on held-out configurations."""
    if phase == "e":
        with torch.no_grad():
            mse = F.mse_loss(e.eval()(2 * data["u_e_test"] - 1), to_float(data["x_e_test"])).item()
        print(f"e: held-out MSE {mse:.4f} on the [-1, 1] scale")


# ======================================================================================================================
# Main: arguments, data, networks, training phases, evaluation, outputs
# ======================================================================================================================


def main(argv=None):
    t_start = time.time()
    args, preset, device, out, ckpt = common.start_run("tos_emoji", Args, PRESETS, DRY_RUN, validate, argv,
                                                       description=__doc__.split("\n")[0])
    common.seed_everything(args.seed)
    if args.apply:
        return apply_to_photos(args, device, out)
    methods = [m for m in METHODS if m in args.methods.split(",")]

    data = load_data(args, device)
    metrics = {"data_source": data["source"], "f": data["f_source"], **f_across_domains(data)}

    nets = build_networks(args, methods, data["f_s"].shape[1], device)
    opts = {k: torch.optim.Adam(v.parameters(), lr=args.lr, betas=(args.beta1, 0.999)) for k, v in nets.items()}

    phases = {"e": args.e_steps, **({"cbar": args.cbar_steps} if "cbar" in nets else {}),
              **{m: args.dann_steps if m == "dann" else args.gan_steps for m in methods}}
    runner = common.PhaseRunner("tos_emoji", args, out, nets, opts, phases, LOG_FIELDS, ckpt, t_start)
    if not runner.run(partial(setup_phase, nets, opts, data, args), partial(after_phase, nets["e"], data)):
        return 130

    outputs = evaluate(nets, data, methods, args, metrics)
    write_outputs(out, nets["e"], data, outputs, metrics, methods, args, preset, device, runner.elapsed)
    return 0


# ======================================================================================================================
# Evaluation (f-constancy, compliance, attribute accuracy against the ground truth), outputs and --apply
# ======================================================================================================================


@torch.no_grad()
def generate(nets: dict, data: dict, methods: list[str], args: Args) -> dict:
    """Each method on the evaluation photos x: G(x), e(c(G(x))) and the configuration c(G(x)), decoded (c is c-bar
    for DTN and TOS fixed c-bar); DANN: its configuration l(p(x)) and e's render of it."""
    e, outputs = nets["e"], {}
    for m in methods:
        if m == "dann":
            scores = nets["dann"](photos_64(data["x"]))
            outputs[m] = {"config": decode_config(scores),
                          "e_c_G": e(configuration_for_e(scores, args.c_decode, args.st_tau))}
            continue
        g = nets[f"{m}_g"]
        if args.bn_recalibrate:
            common.recalibrate_batchnorm(g, g, (common.sample_batch(args.batch_size, data["f_s"])[0]
                                                for _ in range(100)))
        c = nets["tos_c"] if m == "tos" else nets["cbar"]
        g_x = g(data["f_x"])
        c_g_x = c(g_x)
        e_c_g_x = e(configuration_for_e(c_g_x, args.c_decode, args.st_tau))
        outputs[m] = {"G": g_x, "config": decode_config(c_g_x), "e_c_G": e_c_g_x,
                      "compliance": compliance_loss(g_x, e_c_g_x).item()}
    return outputs


@torch.no_grad()
def evaluate(nets: dict, data: dict, methods: list[str], args: Args, metrics: dict) -> dict:
    """Into ``metrics``: e's and c-bar's held-out errors; per method, the f-constancy of the engine's render (the real
    avatar) and of G(x), compliance and attribute accuracy; the chance, majority and manual rows. Returns outputs."""
    for net in nets.values():
        net.eval()
    e, f, f_x, gt = nets["e"], data["f"], data["f_x"], data["gt"]
    metrics["e_test_mse"] = F.mse_loss(e(2 * data["u_e_test"] - 1), to_float(data["x_e_test"])).item()
    if "cbar" in nets:
        metrics["cbar_test_accuracy"] = group_accuracy(nets["cbar"](to_float(data["x_e_test"])),
                                                       data["u_e_test"])["mean"]
    outputs = generate(nets, data, methods, args)
    for m, o in outputs.items():
        o["engine"] = to_float(render_emoji_batch(o["config"].cpu()).to(f_x.device))  # the real avatar
        r = {"f_constancy": (f_x - f(o["engine"])).norm(dim=1).mean().item()}
        if "G" in o:
            r["compliance"] = o["compliance"]
            r["f_constancy_G"] = (f_x - f(o["G"])).norm(dim=1).mean().item()
        if gt is not None:
            r["attributes"] = group_accuracy(o["config"], gt)
        metrics[m] = r
    if gt is not None:
        metrics.update(baseline_accuracy(gt, data["gt_population"].to(gt.device)))
        metrics["manual"] = {"f_constancy": (f_x - f(to_float(data["gt_emoji"]))).norm(dim=1).mean().item(),
                             "attributes": group_accuracy(gt, gt)}
    return outputs


def write_outputs(out: Path, e, data: dict, outputs: dict, metrics: dict, methods: list[str], args: Args,
                  preset: str, device: torch.device, elapsed):
    """The Fig. 6 grid, t and e's renders, every evaluation face for eval_retrieval.py (common.save_probes), the
    configurations, metrics.json and table.md; ``elapsed()`` gives the training time so far."""
    x_64 = photos_64(data["x"])
    manual = {"manual": to_float(data["gt_emoji"])} if data["gt"] is not None else {}
    columns = {"photo": x_64, **manual, **{f"{m}_G": outputs[m]["G"] for m in ("dtn", "tos") if m in outputs}}
    if "tos" in outputs:
        columns.update(tos_e_c_G=outputs["tos"]["e_c_G"], tos_engine=outputs["tos"]["engine"])
    common.save_grid(torch.stack([v[:16] for v in columns.values()], 1).flatten(0, 1), out / "fig6_grid.png",
                     nrow=len(columns))
    print(f"fig6_grid.png: columns {', '.join(columns)}")
    common.save_grid(to_float(data["t"][:64]), out / "t_emoji.png")
    common.save_grid(torch.stack([to_float(data["x_e_test"][:32]), e(2 * data["u_e_test"][:32] - 1)], 1).flatten(0, 1),
                     out / "e_vs_engine.png")
    sets = {"photo_x": x_64, "photo_x2": photos_64(data["x2"]), **manual}
    for m, o in outputs.items():
        sets.update({f"{m}_{k}": o[k] for k in ("G", "e_c_G", "engine") if k in o})
    common.save_probes(out, sets, data["identity"])
    common.write_json(out / "configs.json", {m: [config_to_dict(row) for row in o["config"].cpu().numpy()]
                                             for m, o in outputs.items()})
    wall, table = elapsed(), results_table(metrics, methods)
    common.write_json(out / "metrics.json", {
        "script": "tos_emoji", "preset": preset, "seed": args.seed, "device": common.describe_device(device),
        "wall_time_s": round(wall, 1), "n_eval": len(x_64), "config_dim": CONFIG_DIM, **metrics})
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"wall time {wall / 60:.1f} min; output {out}")


ROW_NAMES = {"chance": "chance (a uniform guess per group)", "majority": "majority class per group",
             "manual": "ground-truth emoji (the paper's manual emoji, exact)", "tos": "TOS: engine(c(G(x)))",
             "dtn": "DTN + c-bar: engine(c-bar(G(x)))", "tos_fixed_cbar": "TOS fixed c-bar: engine(c-bar(G(x)))",
             "dann": "DANN: engine(l(p(x)))"}


def _fmt(v, pct=False) -> str:
    return "" if v is None else f"{100 * v:.1f}%" if pct else f"{v:.4f}"


def results_table(metrics: dict, methods: list[str]) -> str:
    """The README's table: mean attribute accuracy, f-constancy and compliance of every method and reference row,
    then the accuracy of each group."""
    rows = [k for k in ["chance", "majority", "manual", *methods] if k in metrics]
    acc = {k: metrics[k].get("attributes", metrics[k]) for k in rows}  # chance and majority hold theirs at the top
    lines = ["| method | mean attribute accuracy | f-constancy ||f(x) - f(engine(..))|| | "
             "compliance ||G(x) - e(c(G(x)))||^2 (MSE) |", "|---|---|---|---|"]
    lines += [f"| {ROW_NAMES[k]} | {_fmt(acc[k].get('mean'), True)} | {_fmt(metrics[k].get('f_constancy'))} | "
              f"{_fmt(metrics[k].get('compliance'))} |" for k in rows]
    per = [k for k in rows if "per_group" in acc[k]]
    if per:
        lines += ["", "| group | " + " | ".join(per) + " |", "|---|" + "---|" * len(per)]
        lines += [f"| {g} | " + " | ".join(f"{100 * acc[k]['per_group'][g]:.1f}" for k in per) + " |"
                  for g in GROUP_SLICES]
    return "\n".join(lines)


def apply_to_photos(args: Args, device: torch.device, out: Path) -> int:
    """``--apply PHOTO,... --ckpt RUN``: a trained TOS on one's own photos. Every face found (face_nets.find_faces;
    an aligned chip is taken as it is) gets its configuration (JSON, named switches), the engine's render of it (the
    avatar, 256 px) and G(x); every photo an overview; ``best.json`` names the face whose avatar keeps f best (Eq. 17),
    for several photos of one person."""
    state = common.load_checkpoint(args.ckpt)
    require(state.get("script") == "tos_emoji" and "tos_g" in state["nets"],
            f"--ckpt: {args.ckpt} is not a tos_emoji run with a trained TOS")
    saved = {"f_style_aug": 0.0, **state["args"]}  # runs saved before --f-style-aug had the flips-only f
    run = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    synthetic = face_source(run) == "synthetic"
    size = 64 if synthetic else face_nets.DLIB_INPUT_SIZE
    found, n_photos = face_nets.faces_in_photos(args.apply)
    if synthetic:
        print("note: this model was trained on the synthetic face world; real photos lie outside what it learned "
              "(to train on real faces: python tos_emoji.py --faces-dir DIR_OF_ALIGNED_CHIPS)")
    chips = [np.array(Image.fromarray(face["chip"]).resize((size, size), Image.BILINEAR)) for face in found]
    f = (face_nets.load_face_net(synthetic_f_config(run), device)[0] if synthetic
         else face_nets.load_dlib_face_net(device=device))
    with torch.no_grad():
        code = f(to_float(torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).to(device)))
        g, c = NineLayerG(code.shape[1], run.g_widths).to(device), make_c(run.c_widths).to(device)
        g.load_state_dict(state["nets"]["tos_g"])
        c.load_state_dict(state["nets"]["tos_c"])
        g_x = g.eval()(code)
        config = decode_config(c.eval()(g_x))
        avatar = render_emoji_batch(config.cpu(), size=256).permute(0, 2, 3, 1).numpy()
        keep = (code - f(to_float(render_emoji_batch(config.cpu())).to(device))).norm(dim=1)
    for k, face in enumerate(found):
        common.write_json(out / f"{face['name']}_config.json", {
            "photo": face["path"], "face": face["number"], "box": face["box"],
            "configuration": config_to_dict(config[k].cpu().numpy()), "f_distance_to_avatar": keep[k].item()})
        Image.fromarray(avatar[k]).save(out / f"{face['name']}_avatar.png")
        common.save_grid(g_x[k:k + 1], out / f"{face['name']}_G.png", nrow=1)
    face_nets.save_overviews(out, found, avatar)
    best = int(keep.argmin())
    common.write_json(out / "best.json", {"face": found[best]["name"], "f_distance_to_avatar": keep[best].item(),
                                          "rule": "argmin ||f(x) - f(engine(c(G(x))))|| over the faces (Eq. 17)"})
    print(f"wrote the avatars of {len(found)} faces in {n_photos} photos to {out}; the one that keeps "
          f"f best: {found[best]['name']}")
    return 0


if __name__ == "__main__":
    common.run_main(main, "tos_emoji.py")
