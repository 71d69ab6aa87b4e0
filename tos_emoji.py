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
    synthetic f is trained with style-removing augmentations (face_nets.style_augment: flattened shading, posterised
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

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
from common import (DownscalingEncoder, UpscalingGenerator, compliance_loss, const_loss, freeze, gan_d_loss,
                    gan_g_loss, require, tid_loss, tv_loss)
from worlds import face_nets
from worlds import faces
from worlds.emoji import CONFIG_DIM, GROUP_SLICES, config_to_dict, decode_config, ground_truth_configs, random_configs, render_emoji_batch

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
    """training steps of the synthetic f (face_nets.FaceNetConfig; trained once, then cached)"""
    f_style_aug: float = 1.0
    """probability of face_nets.style_augment per training photo of the synthetic f, which makes f style-robust on
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


def synthetic_f_config(args: Args) -> face_nets.FaceNetConfig:
    """The synthetic f of a run (trained once per configuration, then read from the cache)."""
    return face_nets.FaceNetConfig(steps=args.f_steps, world_seed=args.world_seed, style_aug=args.f_style_aug)


def load_faces(args: Args, device: torch.device) -> dict:
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

    as_float = faces.to_float_images  # uint8 photos or emoji -> [-1, 1]

    def to_64(img):  # photos at the emoji's size (real chips are 150x150)
        return faces.resize_images(img, 64)

    with torch.no_grad():  # f is fixed: its codes of s, t and the evaluation photos are computed once
        f_s = face_nets.embed(f, s, device=device).to(device)
        f_t = face_nets.embed(f, t, device=device).to(device)
        f_x = face_nets.embed(f, x_eval, device=device).to(device)
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
        return faces.resize_images(img, args.d_size)

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
    size = 64 if synthetic else face_nets.DLIB_INPUT_SIZE
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
    x = faces.to_float_images(torch.stack(photos).to(device))
    if synthetic:
        f, _ = face_nets.load_face_net(synthetic_f_config(run), device)
    else:
        f = face_nets.load_dlib_face_net(device=device)
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
        keep = (code - f(faces.to_float_images(render_emoji_batch(config.cpu())).to(device))).norm(dim=1)
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
