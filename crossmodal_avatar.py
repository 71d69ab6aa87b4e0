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

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F_nn
from PIL import Image

import common
from common import DownscalingEncoder, UpscalingGenerator, freeze, require
from worlds import face_nets
from worlds import faces
from worlds.vector_avatar import AVATAR_DIM, avatar_from_identity, avatar_svg, avatar_to_dict, hair_from_identity, render_avatar, render_avatar_batch, sample_avatars, validate_hair

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
    """training steps of the synthetic f behind --perc-net f and H (face_nets.FaceNetConfig; trained once, cached)"""
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
            x = faces.resize_images(x, self.size)
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
    # f's stem and its four residual stages (face_nets.FaceIdentityNet.features: conv, BN, ReLU, then 4 blocks)
    net = FeatureMaps(f_net.features, (2, 3, 4, 5, 6), [0.5] * 3, [0.5] * 3, size=f_net.in_size)
    why = "no ImageNet VGG19 weights on disk" if args.perc_net == "auto" else "chosen with --perc-net f"
    return net, (f"the synthetic face network f's stem and 4 residual stages (face_nets.FaceIdentityNet; {why}; the "
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
    x = face_nets.blur(x, sigma)
    grey = x.mul(torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return torch.where(coin(0.2), grey.expand_as(x), x)


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


def synthetic_f_config(args: Args) -> face_nets.FaceNetConfig:
    """The synthetic f behind --perc-net f and H (tos_emoji's f: trained once per configuration, then cached)."""
    return face_nets.FaceNetConfig(steps=args.f_steps, world_seed=args.world_seed, style_aug=1.0)


def load_data(args: Args) -> dict:
    """Every data set of a run, as uint8 images and float avatar vectors on the CPU:
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


def encode(E_s: nn.Module, images: torch.Tensor, size: int, device: torch.device, batch: int = 256) -> torch.Tensor:
    """z_s = E_s(x) for uint8 portraits, in eval mode and batches (E_s is frozen after stage 1)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = faces.resize_images(faces.to_float_images(images[i:i + batch].to(device)), size)
            out.append(E_s(x))
    return torch.cat(out)


# ======================================================================================================================
# H and the hair bank (§4.3)
# ======================================================================================================================


class AttributeRegressor(nn.Module):
    """H(I) -> a_hat: f's identity code, then a linear map to the face world's 40 attributes (faces.ATTRIBUTE_NAMES),
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
HAIR_ATTRIBUTES = tuple(i for i, n in enumerate(faces.ATTRIBUTE_NAMES)
                        if n == "hairline" or n.split(".")[0] == "hair" or n.split("=")[0] in
                        ("hair_style", "glasses", "facial_hair"))


def build_hair_bank(args: Args, f_net: nn.Module, pairs: dict, device: torch.device) -> tuple[nn.Module, dict]:
    """H, fitted on f's labelled training photos (a quarter of them), and the bank: one portrait of each paired
    identity with its hair and accessory parameters, and H's attributes of that portrait, precomputed (§4.3)."""
    f_data = faces.synthetic_faces("f", 1000, 16, 64, args.world_seed)
    images, ids = f_data["images"][::4], f_data["identity"][::4].numpy()
    people = {int(i): faces.attribute_vector(faces.sample_identity(args.world_seed, int(i))) for i in np.unique(ids)}
    attributes = torch.from_numpy(np.stack([people[int(i)] for i in ids]))
    codes = face_nets.embed(f_net, images, device=device)
    H = AttributeRegressor(f_net, codes.shape[1], attributes.shape[1]).fit(codes, attributes).to(device)
    if pairs["attributes"] is None:   # real pairs without hair: the synthetic world's paired identities are the bank
        pairs = synthetic_pairs("pairs", args.pair_identities, 1, 64, args.world_seed)
    ids = pairs["identity"].numpy()
    first = np.array([np.flatnonzero(ids == p)[0] for p in np.unique(ids)])
    with torch.no_grad():
        x = faces.resize_images(faces.to_float_images(pairs["x"][first].to(device)), 64)
        a = torch.cat([H(x[i:i + 256]) for i in range(0, len(x), 256)]).cpu()
    bank = {"attributes": a[:, list(HAIR_ATTRIBUTES)], "hair": [pairs["hair"][int(i)] for i in first],
            "columns": [faces.ATTRIBUTE_NAMES[i] for i in HAIR_ATTRIBUTES]}
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
    f_net, f_metrics = face_nets.load_face_net(synthetic_f_config(args), device)   # L_perc's fallback, and H's input
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
        x = faces.resize_images(faces.to_float_images(x), size)
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
        x_t = faces.resize_images(faces.to_float_images(test["x"][:16].to(device)), size)
        metrics["image_ae_test_l1"] = image_rec_loss(x_t, D_s(E_s(x_t))).item()
        metrics["param_ae_test_mse"] = param_rec_loss(y["test"], D_t(E_t(y["test"]))).item()
    common.save_grid(torch.stack([x_t, D_s(E_s(x_t))], 1).flatten(0, 1), out / "image_ae.png", nrow=8)

    # ------------------------------------------------------------------------------------------------------------------
    # §4.3: H reads attributes from a portrait; its outputs on the bank's portraits are precomputed; a query's nearest
    # bank entry gives the hair and accessories
    # ------------------------------------------------------------------------------------------------------------------
    H, bank = build_hair_bank(args, f_net, pairs, device)
    with torch.no_grad():
        a_test = H(faces.resize_images(faces.to_float_images(test["x"].to(device)), 64))
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
    cols = [faces.resize_images(faces.to_float_images(test["x"][rows]), s), gt_full[rows] * 2 - 1,
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
    photos = faces.to_float_images(test["x"])
    sets = {"photo_x": faces.resize_images(photos[first], 64), "photo_x2": faces.resize_images(photos[second], 64),
            "gt_avatar": render_avatar_batch(test["y"][first], 64, [truth_hair[i] for i in first]),
            "ours": render_avatar_batch(y_ours[first], 64, [hair_hat[i] for i in first])}
    if y_base is not None:
        sets["baseline"] = render_avatar_batch(y_base[first], 64, [hair_hat[i] for i in first])
    sets = {k: faces.to_float_images(v) if v.dtype == torch.uint8 else v for k, v in sets.items()}
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
    f_net, _ = face_nets.load_face_net(synthetic_f_config(run), device)
    H = AttributeRegressor(f_net, state["H"]["weight"].shape[1], state["H"]["weight"].shape[0]).to(device)
    H.head.load_state_dict(state["H"])
    paths = [p for p in args.apply.split(",") if p]
    x = torch.stack([read_portrait(p, run.image_size) for p in paths])
    for m in (nets["E_s"], nets["D_t"], F_net):
        freeze(m)
    with torch.no_grad():
        y_hat = nets["D_t"](F_net(encode(nets["E_s"], x, run.image_size, device))).cpu()
        hair = hair_bank_lookup(H(faces.resize_images(faces.to_float_images(x.to(device)), 64)).cpu(),
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
