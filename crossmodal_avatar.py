"""From a portrait to a 629-D vector avatar through aligned latent spaces (Ladron de Guevara et al., 2023).

"Cross-modal Latent Space Alignment for Image to Avatar Translation" (../shared/papers/crossmodal_avatar.txt).
Many unpaired portraits x, many unpaired avatar vectors y (629 numbers: the points of spline curves, colours and line
weights of a vector-graphics face, §3), a few pairs (x, y). A latent space per modality is learnt from the unpaired
data, then a small mapping F between the two from the pairs: y_hat = D_t(F(E_s(x))) (§4.2; hair and accessories come
from a separate bank, §4.3).

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

Baseline: E_s's code regressed directly to the 629 parameters on the same pairs (the route the paper argues
overfits). Table 3 ablations: --ablation no_align / no_mse / no_cos / no_weight, or all of them with --table 3.

Deviations from the paper (README.md has the table; docs/crossmodal_avatar.md the runs behind it):
  * The engine, the pairs and the avatars are ours (worlds/vector_avatar.py: the paper's 629 dimensions and
    primitives): 393 synthetic identities x 26 photos with their exact avatars; the paper's data are private.
  * Portraits are 64 px in the quick preset; the paper preset renders 128 px (the world's limit), upsampled to 256.
  * L_perc (Eq. 3) uses ImageNet VGG19 only when its weights are on disk, else the synthetic face network f's features;
    each layer's squared difference is a mean over positions, not a sum, so lambda_p = 0.1 weighs it against an L1.
  * Values the paper does not give (the "Ours" block of Args): lambda_1 = 1, lambda_2 = 0.1, MLP width 1024, the step
    and epoch counts, the plateau on the training loss; the epoch with the lowest validation L_rec is kept.
  * Table 3 uses Table 1's 3,995 pairs (its count is not given).
  * H (§4.3) is a ridge regression from f's code to the face world's 40 attributes, not a ResNet50 [14]; the bank
    holds one portrait of each of the 393 paired identities.
  * LPIPS is reported only when the `lpips` package and its ImageNet weights are present (offline here).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F_nn
from PIL import Image

import common
from common import DownscalingEncoder, UpscalingGenerator, freeze, require
from worlds import face_nets, faces
from worlds.vector_avatar import (AVATAR_DIM, HAIR_ATTRIBUTES, augment_portraits, avatar_to_dict, load_data,
                                  make_evaluator, pair_subset_order, save_avatar, save_avatar_probes,
                                  synthetic_pairs, write_figures)


@dataclass
class Args(common.RunArgs):
    # Data (§3, §4.5)
    faces: str = "synthetic"
    """portraits of the unpaired image autoencoder: synthetic (the face world) or folder (--faces-dir)"""
    faces_dir: str = ""
    """a folder of aligned face photos (any size; resized) for the image autoencoder; sets --faces folder"""
    pairs_file: str = ""
    """JSON lines of real pairs, {"photo": path relative to the file, "avatar": 629 numbers in [0, 1], optional
    "split" (train, val or test) and "hair" (a hair dict)}; empty: the synthetic world's pairs"""
    world_seed: int = 0
    """seed of the synthetic face world (worlds/faces.py)"""
    image_size: int = 256
    """portrait size: "aligned 256x256 resolution faces" (§4.5)"""
    n_photos: int = 90000
    """unpaired portraits of the image autoencoder: "a total of 90000 aligned ... faces" (§4.5)"""
    n_vectors: int = 100000
    """unpaired avatar vectors of the parameter autoencoder: "trained on 100000 vector avatars" (§4.5)"""
    pair_identities: int = 393
    """identities of the paired set: "393 pairs of real captured portraits and ... avatar parameters" (§3)"""
    n_pairs: int = 9970
    """paired samples after augmentation: "our dataset comprises a total of 9970 paired samples" (§3)"""
    table1_pairs: int = 3995
    """pairs of Tables 1 and 3: "the same amount of data that we train previous methods (3995 ...)" (§5)"""
    fig8_sizes: tuple = (9970, 3995, 1000, 500)
    """paired-data sizes of Fig. 8 (§5.3: "9970 ... 3395 [3995 in the caption] ... 1000 ... 500")"""

    # Networks and losses (§4.1, §4.2, §4.5; Eq. 2, 6)
    latent: int = 512
    """dimension u of both latent spaces: "S, T in R^512" (§4.5)"""
    lambda_p: float = 0.1
    """weight of L_perc in Eq. 2: "we set lambda_p (Equation (2)) to 0.1" (§4.5)"""
    augment: bool = True
    """"Gaussian blur, rotation, horizontal flips, and grayscale images" on the image AE's portraits (§4.5)"""
    lambda_r: float = 1.0
    """weight of L_rec in Eq. 6: "lambda_r = 1" (§4.5)"""
    lambda_c: float = 1.0
    """weight of L_cm in Eq. 6: "lambda_c = 1" (§4.5)"""
    lambda_w: float = 10.0
    """weight of L_w in Eq. 6: "lambda_w = 10" (§4.5)"""
    ablation: str = "none"
    """Table 3's variants of F: none (Eq. 6), no_align (L_rec alone), no_mse, no_cos, no_weight (that term off)"""

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

    # Experiments and outputs
    table: str = "1"
    """what to run after the autoencoders, comma-separated: 1 (Table 1: ours, the baseline), 3 (Table 3), fig8"""
    f_seeds: int = 1
    """seeds of every F (and baseline) trained: the tables give their mean and spread"""
    ae_from: str = ""
    """a finished run (folder or ckpt.pt) whose four autoencoders to reuse (H and the bank are rebuilt)"""
    apply: str = ""
    """comma-separated portraits to turn into avatars with --ckpt: writes <name>.json (629-D), .png and .svg"""
    ckpt: str = ""
    """with --apply: the folder (or model.pt) of a trained crossmodal_avatar run"""
    apply_size: int = 512
    """with --apply: the PNG's size in pixels (the SVG scales to any size)"""

    # Ours: deviations from the paper (docstring, README)
    vector_jitter: float = 0.006
    """ours: the paper's avatars are artist-made. Std of the jitter on the sampled unpaired avatars (canvas units)"""
    n_val: int = 300
    """ours: the paper has no validation split. Validation identities (never reported): pick the epoch kept"""
    n_eval: int = 300
    """ours: the paper's held-out set has 30 avatars (§5.1). Held-out test identities, 2 photos each"""
    eval_size: int = 128
    """ours: the paper does not say. Pixel size of the rendered avatars of Table 1's L1"""
    es_widths: tuple = (64, 128, 256, 512, 512, 512)
    """ours: the paper's networks are in its supplement. E_s's stride-2 convs, one per halving to 4 px (D_s mirrors)"""
    perc_net: str = "auto"
    """ours: the paper uses ImageNet VGG19. L_perc's features (Eq. 3): vgg19, f, or auto (vgg19 if on disk, else f)"""
    f_steps: int = 1500
    """ours: the paper has no f. Training steps of the synthetic f behind --perc-net f and H (cached)"""
    f_identities: int = 1000
    """ours: identities of the face world's f split (16 photos each) that train the synthetic f"""
    image_ae_steps: int = 100000
    """ours: the paper trains "until convergence" (§4.5). Steps of the image autoencoder"""
    param_ae_steps: int = 50000
    """ours: the paper trains "until convergence" (§4.5). Steps of the parameter autoencoder"""
    mlp_hidden: int = 1024
    """ours: the paper gives no width. Hidden width of E_t, D_t and F, 2-layer MLPs (F's last layer is E_t's shape)"""
    plateau_on: str = "train"
    """ours: the paper says "on loss plateau" (§4.5). The plateau watches train (the epoch's mean loss) or val L_rec"""
    f_init: str = "random"
    """ours: the paper does not say. F's last layer starts random (PyTorch's default) or E_t (a copy of E_t's)"""
    f_epochs: int = 100
    """ours: the paper gives no count. Epochs of F (and of the baseline) over the pairs (chosen on validation)"""
    lambda_1: float = 1.0
    """ours: the paper gives no value. Weight of the MSE term of L_cm, Eq. 4"""
    lambda_2: float = 0.1
    """ours: the paper gives no value. Weight of the cosine term of L_cm, Eq. 4 (chosen on validation)"""


PRESETS = {
    "paper": {},
    "quick": dict(image_size=64, n_photos=10000, es_widths=(32, 64, 128, 256), f_steps=600, image_ae_steps=2500,
                  param_ae_steps=15000, log_every=100, ckpt_every=1000),
}
DRY_RUN = dict(image_size=64, n_photos=64, n_vectors=256, pair_identities=8, n_pairs=64, table1_pairs=48,
               fig8_sizes=(64, 32), n_val=8, n_eval=8, eval_size=64, es_widths=(8, 8, 8, 8), f_steps=2, f_identities=64,
               image_ae_steps=2, param_ae_steps=2, mlp_hidden=32, latent=16, f_epochs=2, log_every=1,
               ckpt_every=2, batch_ae=8, batch_f=8)
ABLATIONS = ("none", "no_align", "no_mse", "no_cos", "no_weight")
ABLATION_LABELS = {"none": "ours", "no_align": "ours w/o alignment", "no_mse": "ours w/o MSE alignment",
                   "no_cos": "ours w/o cosine alignment", "no_weight": "ours w/o weight alignment"}
TABLE_TOKENS = ("1", "3", "fig8")
LOG_FIELDS = ["loss_l1", "loss_perc", "loss_param"]


def validate(args: Args):
    """Every check that can fail on the arguments alone, before any file is written."""
    choices = {"faces": ("synthetic", "folder"), "ablation": ABLATIONS, "perc_net": ("auto", "vgg19", "f"),
               "plateau_on": ("train", "val"), "f_init": ("random", "E_t")}
    for name, allowed in choices.items():
        require(getattr(args, name) in allowed, f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}")
    require(args.faces != "folder" or args.faces_dir, "--faces folder needs --faces-dir DIR")
    tokens = [t for t in args.table.split(",") if t]
    require(tokens and set(tokens) <= set(TABLE_TOKENS), f"--table: comma-separated from {', '.join(TABLE_TOKENS)}")
    require(args.image_size >= 16 and args.image_size & (args.image_size - 1) == 0,
            "--image-size must be a power of two, at least 16")
    n_layers = int(math.log2(args.image_size // 4))
    require(len(args.es_widths) == n_layers and min(args.es_widths) >= 1,
            f"--es-widths needs {n_layers} positive widths for --image-size {args.image_size} (one per halving to "
            f"4 px), got {args.es_widths}")
    at_least = {1: ("n_photos", "n_vectors", "pair_identities", "n_pairs", "table1_pairs", "n_val", "n_eval", "latent",
                    "mlp_hidden", "batch_ae", "batch_f", "f_epochs", "f_seeds", "log_every", "ckpt_every", "f_steps",
                    "f_identities"),
                0: ("image_ae_steps", "param_ae_steps", "plateau_patience", "lambda_p", "lambda_r", "lambda_c",
                    "lambda_w", "lambda_1", "lambda_2", "vector_jitter")}
    for low, names in at_least.items():
        for name in names:
            require(getattr(args, name) >= low, f"--{name.replace('_', '-')} must be " +
                    ("at least 1" if low else "0 or more"))
    require(16 <= args.eval_size <= 1024, "--eval-size must be 16 to 1024 px")
    require(16 <= args.apply_size <= 4096, "--apply-size must be 16 to 4096 px")
    require(len(args.fig8_sizes) >= 1 and min(args.fig8_sizes) >= 2, "--fig8-sizes needs sizes of at least 2")
    require(args.lr > 0 and 0 <= args.beta1 < 1 and 0 <= args.beta2 < 1, "--lr must be positive, betas in [0, 1)")
    require(0 < args.plateau_factor < 1, "--plateau-factor must be in (0, 1)")
    require(args.pairs_file or max(args.n_pairs, args.table1_pairs, *args.fig8_sizes) <= args.pair_identities * 1000,
            "more pairs than 1,000 photos per identity")
    require(not args.apply or args.ckpt, "--apply needs --ckpt RUN_DIR (a trained crossmodal_avatar run)")
    model = Path(args.ckpt) / "model.pt" if Path(args.ckpt).is_dir() else Path(args.ckpt)
    require(not args.apply or model.is_file(), f"--ckpt: no model.pt in {args.ckpt} (a finished crossmodal_avatar run)")
    for p in (p for p in args.apply.split(",") if p):
        require(Path(p).is_file(), f"--apply: no file {p}")
        face_nets.read_photo(p)   # an unreadable photo is one line, before anything is written
    require(not args.pairs_file or Path(args.pairs_file).is_file(), f"--pairs-file: no file {args.pairs_file}")
    require(not args.faces_dir or Path(args.faces_dir).is_dir(), f"--faces-dir: no folder {args.faces_dir}")


# ======================================================================================================================
# Networks (§4.1-4.3): E_s, D_s (convolutions), E_t, D_t, F (2-layer MLPs), the baseline, H (L_perc's: face_nets)
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


def synthetic_f_config(args: Args) -> face_nets.FaceNetConfig:
    """The synthetic f behind --perc-net f and H (tos_emoji's f: trained once per configuration, then cached)."""
    return face_nets.FaceNetConfig(steps=args.f_steps, identities=args.f_identities, world_seed=args.world_seed,
                                   style_aug=1.0)


class AttributeRegressor(nn.Module):
    """H(I) -> a_hat (§4.3): f's identity code, then a linear map to the face world's 40 attributes
    (faces.ATTRIBUTE_NAMES), fitted by ridge regression on f's labelled training photos (a stand-in for the paper's
    pretrained ResNet50 [14])."""

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


def load_reused_autoencoders(args: Args) -> dict:
    """--ae-from: E_s, D_s, E_t and D_t of a finished run, after checking that their shapes match this run's."""
    state = common.load_checkpoint(args.ae_from)
    require(state.get("script") == "crossmodal_avatar", f"--ae-from: {args.ae_from} is not a crossmodal_avatar run")
    require(state.get("phase") == "done", f"--ae-from: {args.ae_from} has not finished its autoencoders")
    for k in ("image_size", "es_widths", "latent", "mlp_hidden", "world_seed"):
        saved = tuple(state["args"][k]) if isinstance(state["args"][k], list) else state["args"][k]
        require(saved == getattr(args, k), f"--ae-from: its --{k.replace('_', '-')} is {saved}, this run's "
                                           f"{getattr(args, k)}; pass the same value")
    return {k: state["nets"][k] for k in ("E_s", "D_s", "E_t", "D_t")}


def make_autoencoders(args: Args, device: torch.device, reused: dict | None) -> tuple[dict, dict]:
    """E_s, D_s, E_t, D_t on the device (an earlier run's with --ae-from) and the two autoencoders' Adam (§4.5)."""
    nets = {k: v.to(device) for k, v in make_networks(args).items()}
    if reused is not None:
        for k, sd in reused.items():
            nets[k].load_state_dict(sd)
    adam = partial(torch.optim.Adam, lr=args.lr, betas=(args.beta1, args.beta2))
    opts = {"image_ae": adam([*nets["E_s"].parameters(), *nets["D_s"].parameters()]),
            "param_ae": adam([*nets["E_t"].parameters(), *nets["D_t"].parameters()])}
    return nets, opts


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


#: Table 3's variants as the lambdas they zero: no_align drops L_cm and L_w (L_rec alone), no_mse drops Eq. 4's first
#: term, no_cos its second, no_weight drops L_w.
ABLATED = {"none": {}, "no_align": dict(c=0.0, w=0.0), "no_mse": dict(l1=0.0), "no_cos": dict(l2=0.0),
           "no_weight": dict(w=0.0)}


def loss_weights(args: Args, ablation: str | None = None) -> dict[str, float]:
    """The lambdas of Eq. 6 (r, c, w) and Eq. 4 (l1, l2) for one of Table 3's variants (default: --ablation)."""
    w = dict(r=args.lambda_r, c=args.lambda_c, w=args.lambda_w, l1=args.lambda_1, l2=args.lambda_2)
    return {**w, **ABLATED[args.ablation if ablation is None else ablation]}


def mapping_loss(F_net: nn.Module, E_t: nn.Module, D_t: nn.Module, z_s: torch.Tensor, y: torch.Tensor,
                 w: dict[str, float], z_t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Eq. 6 on a batch of E_s codes z_s and their avatars y: L = lambda_r L_rec + lambda_c L_cm + lambda_w L_w.
    ``z_t`` = E_t(y) when the caller has it (E_t is frozen, so it can be computed once for all pairs). Returns the
    total and each term (a term whose lambda is 0 is not computed: it contributes exactly 0)."""
    lambda_r, lambda_c, lambda_w = w["r"], w["c"], w["w"]
    z_m = F_net(z_s)                                   # the translated code z_m = F(E_s(x))
    zero = z_m.new_zeros(())
    loss_rec = param_rec_loss(D_t(z_m), y)             # L_rec = (D_t(F(E_s(x))) - y)^2
    z_t = E_t(y) if z_t is None and lambda_c > 0 else z_t
    loss_cm = cross_modal_loss(z_m, z_t, w["l1"], w["l2"]) if lambda_c > 0 else zero    # Eq. 4
    loss_w = weight_alignment_loss(F_net, E_t) if lambda_w > 0 else zero                # Eq. 5
    loss = lambda_r * loss_rec + lambda_c * loss_cm + lambda_w * loss_w                   # Eq. 6
    return {"loss": loss, "loss_rec": loss_rec, "loss_cm": loss_cm, "loss_w": loss_w}


# ======================================================================================================================
# ALGO LOGIC: stage 1, the two autoencoders on unpaired data (§4.1); stage 2, F on the pairs (§4.2); H's hair (§4.3)
# ======================================================================================================================


def update_image_ae(E_s: nn.Module, D_s: nn.Module, opt, perc: nn.Module, photos: torch.Tensor,
                    args: Args) -> dict[str, torch.Tensor]:
    """One step of the image autoencoder on a batch of unpaired portraits, augmented as in §4.5."""
    (x,) = common.sample_batch(args.batch_ae, photos)
    x = faces.resize_images(faces.to_float_images(x), args.image_size)
    if args.augment:
        x = augment_portraits(x)
    # (1a) Update E_s, D_s: minimise |x - D_s(E_s(x))| + lambda_p L_perc(x, D_s(E_s(x)))             (Eq. 1-3)
    x_rec = D_s(E_s(x))
    loss_l1 = image_rec_loss(x, x_rec)
    loss_perc = perceptual_loss(perc(x), perc(x_rec)) if args.lambda_p > 0 else torch.zeros((), device=x.device)
    loss = loss_l1 + args.lambda_p * loss_perc
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss_l1": loss_l1.detach(), "loss_perc": loss_perc.detach()}


def update_param_ae(E_t: nn.Module, D_t: nn.Module, opt, vectors: torch.Tensor, args: Args) -> dict[str, torch.Tensor]:
    """One step of the parameter autoencoder on a batch of unpaired avatar vectors."""
    (y,) = common.sample_batch(args.batch_ae, vectors)
    # (1b) Update E_t, D_t: minimise (y - D_t(E_t(y)))^2                                                 (Eq. 1)
    loss_param = param_rec_loss(y, D_t(E_t(y)))
    opt.zero_grad(set_to_none=True)
    loss_param.backward()
    opt.step()
    return {"loss_param": loss_param.detach()}


def setup_phase(nets: dict, opts: dict, photos: torch.Tensor, vectors: torch.Tensor, perc: nn.Module, args: Args,
                phase: str, start_step: int):
    """PhaseRunner's setup for stage 1: the phase's autoencoder in train mode, and its step."""
    if phase == "image_ae":
        nets["E_s"].train()
        nets["D_s"].train()
        return partial(update_image_ae, nets["E_s"], nets["D_s"], opts["image_ae"], perc, photos, args)
    nets["E_t"].train()
    nets["D_t"].train()
    return partial(update_param_ae, nets["E_t"], nets["D_t"], opts["param_ae"], vectors, args)


def encode(E_s: nn.Module, images: torch.Tensor, size: int, device: torch.device, batch: int = 256) -> torch.Tensor:
    """z_s = E_s(x) for uint8 portraits, in eval mode and batches (E_s is frozen after stage 1)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = faces.resize_images(faces.to_float_images(images[i:i + batch].to(device)), size)
            out.append(E_s(x))
    return torch.cat(out)


def update_F(F_net: nn.Module, opt, E_t: nn.Module, D_t: nn.Module, w: dict[str, float], z_s: torch.Tensor,
             y: torch.Tensor, z_t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One step of F on a batch of pairs (codes z_s = E_s(x), avatars y, and z_t = E_t(y) when L_cm is on); E_s, E_t
    and D_t are frozen (§4.5). ``w``: the lambdas, Table 3's ablations zero some (loss_weights)."""
    # (2) Update F: minimise lambda_r L_rec + lambda_c L_cm + lambda_w L_w                  (Eq. 6, with Eq. 4 and 5)
    losses = mapping_loss(F_net, E_t, D_t, z_s, y, w, z_t)
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    opt.step()
    return losses


def update_baseline(net: nn.Module, opt, z_s: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """One step of the direct-regression baseline on a batch of pairs."""
    # (2') Update the baseline: minimise (net(E_s(x)) - y)^2, the 629 parameters regressed directly
    loss_rec = param_rec_loss(net(z_s), y)
    opt.zero_grad(set_to_none=True)
    loss_rec.backward()
    opt.step()
    return {"loss": loss_rec, "loss_rec": loss_rec}


def predict(kind: str, net: nn.Module, D_t: nn.Module, z_s: torch.Tensor) -> torch.Tensor:
    """y_hat = D_t(F(z_s)) for F, net(z_s) for the baseline."""
    return D_t(net(z_s)) if kind == "F" else net(z_s)


def train_mapping(kind: str, args: Args, nets: dict, z_s: torch.Tensor, y: torch.Tensor, z_val: torch.Tensor,
                  y_val: torch.Tensor, seed: int, ablation: str = "none") -> tuple[nn.Module, dict]:
    """Train F (kind "F", Eq. 6 with the ablation's lambdas) or the baseline (kind "baseline": MSE of its 629
    outputs) on precomputed codes z_s = E_s(x) of the pairs. Adam (2e-4, (0.5, 0.99)), batch 48, ReduceLROnPlateau
    (patience 1, factor 0.5) once per epoch (§4.5); the epoch with the lowest validation L_rec is kept. E_s, E_t and
    D_t are frozen: only F (or the baseline) has an optimizer."""
    common.seed_everything(seed)
    E_t, D_t = nets["E_t"], nets["D_t"]
    net = (make_F(args) if kind == "F" else make_baseline(args)).to(z_s.device)
    if kind == "F" and args.f_init == "E_t":
        last_linear(net).load_state_dict(last_linear(E_t).state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=args.plateau_factor,
                                                       patience=args.plateau_patience)
    w = loss_weights(args, ablation)
    with torch.no_grad():  # E_t is frozen: z_t = E_t(y) of every pair once, not once per step
        z_t = E_t(y) if kind == "F" and w["c"] > 0 else None
    if kind == "F":
        step, data = partial(update_F, net, opt, E_t, D_t, w), ((z_s, y) if z_t is None else (z_s, y, z_t))
    else:
        step, data = partial(update_baseline, net, opt), (z_s, y)
    best, best_state, history = float("inf"), None, []
    n = len(z_s)
    epochs = common.progress(range(1, args.f_epochs + 1), unit="epoch",
                             desc=f"train {kind} ({ablation}, {n:,} pairs, seed {seed}): {args.f_epochs} epochs")
    for epoch in epochs:
        net.train()
        order = torch.randperm(n, device=z_s.device)
        sums: dict[str, torch.Tensor] = {}
        for i in range(0, n, args.batch_f):
            idx = order[i:i + args.batch_f]
            for k, v in step(*(t[idx] for t in data)).items():
                sums[k] = sums.get(k, 0.0) + v.detach() * len(idx)
        net.eval()
        with torch.no_grad():
            val_rec = param_rec_loss(predict(kind, net, D_t, z_val), y_val).item()
        sched.step(val_rec if args.plateau_on == "val" else (sums["loss"] / n).item())
        row = {"epoch": epoch, **{k: (v / n).item() for k, v in sums.items()}, "val_rec": val_rec,
               "lr": opt.param_groups[0]["lr"]}
        common.check_finite(f"{kind} {ablation}", epoch, {k: v for k, v in row.items() if k != "epoch"})
        history.append(row)
        if val_rec < best:
            best, best_state = val_rec, {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    freeze(net)
    best_epoch = min(history, key=lambda r: r["val_rec"])["epoch"]
    return net, {"best_epoch": best_epoch, "val_rec": best, "history": history}


def build_hair_bank(args: Args, f_net: nn.Module, pairs: dict, device: torch.device) -> tuple[nn.Module, dict]:
    """H, fitted on f's labelled training photos (a quarter of them), and the bank: one portrait of each paired
    identity with its hair and accessory parameters, and H's attributes of that portrait, precomputed (§4.3)."""
    f_data = faces.synthetic_faces("f", args.f_identities, 16, 64, args.world_seed)
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


def hair_bank_lookup(a_query: torch.Tensor, bank: dict) -> list[dict]:
    """§4.3: the nearest neighbour (Euclidean, over HAIR_ATTRIBUTES) of each attribute vector H predicted among the
    bank's precomputed ones gives the hair and accessory parameters to merge with the face parameters."""
    nearest = torch.cdist(a_query[:, list(HAIR_ATTRIBUTES)].float(), bank["attributes"].float()).argmin(1)
    return [bank["hair"][int(k)] for k in nearest]


# ======================================================================================================================
# The run: stage 2's experiments (what each table trains, one F or baseline, all of them), then main
# ======================================================================================================================


def experiment_plan(args: Args, tokens: list[str], n_available: int) -> dict[str, dict[str, tuple]]:
    """{experiment: {row label: (kind, ablation, number of pairs)}} for the requested tables. A (kind, ablation,
    pairs, seed) that two experiments share is trained once."""
    ours, n_table = ABLATION_LABELS[args.ablation], min(args.table1_pairs, n_available)
    plan: dict[str, dict[str, tuple]] = {}
    if "1" in tokens:
        plan["table1"] = {ours: ("F", args.ablation, n_table), "baseline": ("baseline", "none", n_table)}
    if "3" in tokens:
        plan["table3"] = {ABLATION_LABELS[a]: ("F", a, n_table) for a in ("no_align", "no_mse", "no_cos", "no_weight",
                                                                           "none")}
    if "fig8" in tokens:
        sizes = [min(k, n_available) for k in args.fig8_sizes]
        plan["fig8"] = {f"{ours}, {k} pairs": ("F", args.ablation, k) for k in sizes}
    return plan


def train_variant(args: Args, nets: dict, z: dict, y: dict, pair_order: torch.Tensor, evaluate, out: Path,
                  row: tuple, k: int) -> tuple[dict, str]:
    """Train (or, on resume, read back) one F or baseline, row = (kind, ablation, pairs), with seed k; its test
    metrics and the file of its weights."""
    kind, ablation, n_pairs = row
    name = f"{kind}_{ablation}_{n_pairs}pairs_seed{k}"
    path = out / "variants" / f"{name}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        return saved["metrics"], str(path)
    idx = pair_order[:n_pairs].to(z["pairs"].device)
    t0 = time.time()
    net, info = train_mapping(kind, args, nets, z["pairs"][idx], y["pairs"][idx], z["val"], y["val"],
                              seed=args.seed * 1000 + k, ablation=ablation)
    with torch.no_grad():
        y_hat = predict(kind, net, nets["D_t"], z["test"])
    m = {**evaluate(y_hat), "val_rec": info["val_rec"], "best_epoch": float(info["best_epoch"]),
         "train_seconds": round(time.time() - t0, 1)}
    common.save_checkpoint(path, {"state": net.state_dict(), "kind": kind, "metrics": m,
                                  "history": info["history"], "y_hat": y_hat.cpu()})
    print(f"  {name}: L1 face {m['l1_face']:.4f}, L1 avatar {m['l1_avatar']:.4f}, parameter MSE "
          f"{m['param_mse']:.5f} (epoch {info['best_epoch']} kept, {m['train_seconds']:.0f} s)")
    return m, str(path)


def run_stage2(args: Args, nets: dict, z: dict, y: dict, pairs: dict, evaluate, tokens: list[str], out: Path):
    """Stage 2 (§4.2): F, the baseline and the ablations of the requested tables, each on its pairs and seeds, and two
    reference rows. Returns (results, plan, weight files), or None when interrupted (finished F's are kept)."""
    (out / "variants").mkdir(exist_ok=True)
    pair_order = pair_subset_order(pairs, args.seed)
    results: dict = {}
    with torch.no_grad():
        mean_y = y["pairs"].mean(0, keepdim=True).expand_as(y["test"])
        results["reference"] = {"mean_avatar": evaluate(mean_y),
                                "param_ae_ceiling": evaluate(nets["D_t"](nets["E_t"](y["test"])))}
    plan = experiment_plan(args, tokens, len(pairs["y"]))
    files: dict[str, str] = {}
    with common.GracefulInterrupt() as interrupt:
        for exp, rows in plan.items():
            print(f"{exp}:")
            results[exp] = {}
            for label, row in rows.items():
                runs = []
                for k in range(args.f_seeds):
                    m, files[f"{exp}/{label}/{k}"] = train_variant(args, nets, z, y, pair_order, evaluate, out, row, k)
                    runs.append(m)
                    if interrupt.requested:
                        print(f"stopped; the finished F's are kept: python crossmodal_avatar.py --resume {out}")
                        return None
                results[exp][label] = {"n_pairs": row[2], **summarise(runs)}
    return results, plan, files


def main(argv=None):
    t_start = time.time()
    args, preset, device, out, ckpt = common.start_run("crossmodal_avatar", Args, PRESETS, DRY_RUN, validate, argv,
                                                       description=__doc__.split("\n")[0])
    common.seed_everything(args.seed)
    if args.apply:
        return apply_to_photos(args, device, out)
    tokens = [t for t in TABLE_TOKENS if t in args.table.split(",")]
    reused = load_reused_autoencoders(args) if args.ae_from else None

    # Data: unpaired portraits (image AE), unpaired avatar vectors (parameter AE), pairs, validation, test; whole sets
    # sit on the device as uint8 images / float vectors, a batch is converted when it is drawn
    data = load_data(args)
    photos, vectors = data["photos"].to(device), data["vectors"].to(device)
    pairs, test = data["pairs"], data["test"]
    print(f"data: portraits {data['photo_source']}; avatars {data['vector_source']}; pairs {pairs['source']}; "
          f"validation {data['val']['source']}; test {test['source']}")
    f_net, f_metrics = face_nets.load_face_net(synthetic_f_config(args), device)   # L_perc's fallback, and H's input
    perc, perc_source = face_nets.perceptual_network(args.perc_net, f_net)
    perc = perc.to(device)
    print(f"L_perc: {perc_source}")

    # Stage 1 (§4.1): the two autoencoders, "trained independently" on unpaired data (skipped with --ae-from)
    nets, opts = make_autoencoders(args, device, reused)
    phases = {"image_ae": 0 if reused else args.image_ae_steps, "param_ae": 0 if reused else args.param_ae_steps}
    runner = common.PhaseRunner("crossmodal_avatar", args, out, nets, opts, phases, LOG_FIELDS, ckpt, t_start)
    if not runner.run(partial(setup_phase, nets, opts, photos, vectors, perc, args)):
        return 130
    for k in ("E_s", "D_s", "E_t", "D_t"):
        freeze(nets[k])          # "we freeze the weights of E_s, E_t, and D_t" (§4.5); D_s is only shown
    metrics = run_summary(args, data, perc_source, f_metrics, reused)
    z, y, ae_metrics = encode_and_check_autoencoders(args, nets, data, device, out)
    metrics.update(ae_metrics)

    # §4.3: H reads attributes from a portrait; the nearest bank entry gives the hair and accessories
    H, bank = build_hair_bank(args, f_net, pairs, device)
    hair_hat, truth_hair, hair_metrics = retrieve_test_hair(H, bank, test, device)
    metrics.update(hair_metrics)

    # Stage 2 (§4.2): F, the baseline and the ablations, each on its pairs and seeds; the ground truth rendered once
    evaluate, gt_full, metrics["lpips"] = make_evaluator(test, hair_hat, truth_hair, args.eval_size)
    stage2 = run_stage2(args, nets, z, y, pairs, evaluate, tokens, out)
    if stage2 is None:
        return 130
    results, plan, files = stage2
    metrics["results"] = results

    # Outputs: the model for --apply, the grid, 512 px renders and SVGs, probes for eval_retrieval.py, the tables
    y_ours, y_base = save_model(args, out, nets, H, bank, plan, files)
    write_figures(out, test, gt_full, y_ours, y_base, hair_hat, args.eval_size)
    save_avatar_probes(out, test, y_ours, y_base, hair_hat, truth_hair)
    wall = time.time() - t_start + runner.elapsed_before
    write_results(args, preset, device, out, wall, len(test["y"]), metrics, plan)
    return 0


# ======================================================================================================================
# Evaluation (§5): the autoencoders, H's hair; Table 1's L1 between rendered avatars is vector_avatar.avatar_metrics
# ======================================================================================================================


def encode_and_check_autoencoders(args: Args, nets: dict, data: dict, device: torch.device, out: Path):
    """The codes z_s = E_s(x) of every paired, validation and test portrait and their avatars on the device, and the
    autoencoders' held-out reconstruction (metrics, image_ae.png): (z, y, metrics)."""
    E_s, D_s, E_t, D_t = (nets[k] for k in ("E_s", "D_s", "E_t", "D_t"))
    sets = [(name, data[name]) for name in ("pairs", "val", "test")]
    z = {name: encode(E_s, d["x"], args.image_size, device) for name, d in sets}
    y = {name: d["y"].to(device) for name, d in sets}
    with torch.no_grad():
        x_t = faces.resize_images(faces.to_float_images(data["test"]["x"][:16].to(device)), args.image_size)
        metrics = {"image_ae_test_l1": image_rec_loss(x_t, D_s(E_s(x_t))).item(),
                   "param_ae_test_mse": param_rec_loss(y["test"], D_t(E_t(y["test"]))).item()}
    common.save_grid(torch.stack([x_t, D_s(E_s(x_t))], 1).flatten(0, 1), out / "image_ae.png", nrow=8)
    return z, y, metrics


def retrieve_test_hair(H: nn.Module, bank: dict, test: dict, device: torch.device) -> tuple[list, list, dict]:
    """The bank's hair for H's attributes of every test portrait, the ground truth (the retrieved one where the test
    has none) and, in the synthetic world, how often they agree."""
    with torch.no_grad():
        a_test = H(faces.resize_images(faces.to_float_images(test["x"].to(device)), 64))
    hair_hat = hair_bank_lookup(a_test.cpu(), bank)
    truth_hair = [h if h is not None else hair_hat[i] for i, h in enumerate(test["hair"])]
    if test["hair"][0] is None:
        return hair_hat, truth_hair, {}
    accuracy = {k: float(np.mean([p[k] == t[k] for p, t in zip(hair_hat, truth_hair)]))
                for k in ("hairstyle", "glasses", "facial_hair")}
    print("hair bank (§4.3): retrieved = ground truth for " + ", ".join(
        f"{k} {100 * v:.1f}%" for k, v in accuracy.items()))
    return hair_hat, truth_hair, {"hair_retrieval_accuracy": accuracy}


def summarise(runs: list[dict]) -> dict:
    """Mean, sample standard deviation and the values over seeds of every metric."""
    vals = {k: np.array([r[k] for r in runs]) for k, v in runs[0].items() if isinstance(v, float)}
    return {k: {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "values": [float(x) for x in v]} for k, v in vals.items()}


# ======================================================================================================================
# Outputs: model.pt, the tables, --apply (the grid, 512 px renders, probes: vector_avatar.write_figures and below)
# ======================================================================================================================


def run_summary(args: Args, data: dict, perc_source: str, f_metrics: dict, reused: dict | None) -> dict:
    """metrics.json's description of the run's data and networks."""
    return {"data": {k: data[k] for k in ("photo_source", "vector_source")} |
            {"pairs": data["pairs"]["source"], "val": data["val"]["source"], "test": data["test"]["source"]},
            "perceptual_network": perc_source,
            "f": f"synthetic f (ArcFace ResNet, {args.f_steps} steps; verification "
                 f"{100 * f_metrics['accuracy']:.2f}% on held-out identities)",
            "autoencoders": f"reused from {args.ae_from}" if reused else "trained in this run"}


def save_model(args: Args, out: Path, nets: dict, H: nn.Module, bank: dict, plan: dict, files: dict):
    """model.pt for --apply: E_s, D_t, the first experiment's first F (seed 0), H and the bank. Returns that F's test
    avatars and the baseline's (None without a baseline)."""
    main_exp = next(iter(plan))
    ours_label = next(iter(plan[main_exp]))
    ours = torch.load(files[f"{main_exp}/{ours_label}/0"], map_location="cpu", weights_only=False)
    F_net = make_F(args)
    F_net.load_state_dict(ours["state"])
    base_key = next((f"{e}/baseline/0" for e in plan if "baseline" in plan[e]), None)
    y_base = torch.load(files[base_key], map_location="cpu", weights_only=False)["y_hat"] if base_key else None
    common.save_checkpoint(out / "model.pt", {
        "script": "crossmodal_avatar", "args": {**vars(args)}, "E_s": nets["E_s"].state_dict(),
        "D_t": nets["D_t"].state_dict(), "F": F_net.state_dict(), "H": H.head.state_dict(), "bank": bank,
        "trained_on": f"{main_exp}/{ours_label}"})
    return ours["y_hat"], y_base


def _cell(r: dict, k: str, digits: int = 4) -> str:
    """One table cell: a metric's mean (± its spread over seeds), n/a where it was not measured."""
    m = r.get(k)
    if m is None or isinstance(m, float):
        return "n/a" if m is None else f"{m:.{digits}f}"
    return f"{m['mean']:.{digits}f}" + (f" ± {m['std']:.{digits}f}" if len(m["values"]) > 1 else "")


def _row(head: str, r: dict) -> str:
    """One table row: its head cells, then L1 face, L1 avatar, parameter MSE, LPIPS."""
    cells = (_cell(r, "l1_face"), _cell(r, "l1_avatar"), _cell(r, "param_mse", 5), _cell(r, "lpips"))
    return f"| {head} | " + " | ".join(cells) + " |"


def results_tables(results: dict, plan: dict) -> str:
    """The README's tables: mean (and spread over seeds) of each row's held-out metrics."""
    names = {"table1": "Table 1 analogue (held-out identities)", "table3": "Table 3 (the losses of F)",
             "fig8": "Fig. 8 (paired-data size)"}
    lines = []
    for exp in plan:
        lines += [f"**{names[exp]}**", "", "| method | pairs | L1 face | L1 avatar | parameter MSE | LPIPS |",
                  "|---|---|---|---|---|---|"]
        lines += [_row(f"{label} | {r['n_pairs']}", r) for label, r in results[exp].items()]
        if exp == "table1":
            lines += [_row("mean training avatar |", results["reference"]["mean_avatar"]),
                      _row("D_t(E_t(y)): the parameter AE's ceiling |", results["reference"]["param_ae_ceiling"])]
        lines.append("")
    return "\n".join(lines).rstrip()


def write_results(args: Args, preset: str, device: torch.device, out: Path, wall: float, n_test: int, metrics: dict,
                  plan: dict):
    """table.md and metrics.json; the tables on stdout."""
    tables = results_tables(metrics["results"], plan)
    (out / "table.md").write_text(tables + "\n")
    common.write_json(out / "metrics.json", {
        "script": "crossmodal_avatar", "preset": preset, "seed": args.seed, "f_seeds": args.f_seeds,
        "device": common.describe_device(device), "wall_time_s": round(wall, 1), "avatar_dim": AVATAR_DIM,
        "n_test_portraits": n_test, "l1_scale": f"pixels in [0, 1], avatars rendered at {args.eval_size} px",
        **metrics})
    print(tables)
    print(f"wall time {wall / 60:.1f} min; output {out}")


def apply_to_photos(args: Args, device: torch.device, out: Path) -> int:
    """``--apply PHOTO,... --ckpt RUN``: every face found (face_nets.find_faces, aligned like the training portraits;
    an aligned chip is taken as it is) gets y_hat = D_t(F(E_s(x))) merged with the bank's hair for H(x) (§4.3),
    written as <name>.json (the 629 numbers, by group, and the hair), <name>.png (--apply-size) and <name>.svg; every
    photo an overview."""
    path = Path(args.ckpt) / "model.pt" if Path(args.ckpt).is_dir() else Path(args.ckpt)
    state = common.load_checkpoint(path)
    require(state.get("script") == "crossmodal_avatar" and "F" in state, f"--ckpt: {path} is not a crossmodal_avatar "
                                                                          f"model")
    run = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["args"].items()})
    found, n_photos = face_nets.faces_in_photos(args.apply)
    if not (run.faces_dir or run.pairs_file):
        print("note: this model was trained on the synthetic face world; real photos lie outside what it learned "
              "(to train on real faces: python crossmodal_avatar.py --faces-dir DIR --pairs-file PAIRS.jsonl)")
    nets = {k: v.to(device) for k, v in make_networks(run).items()} | {"F": make_F(run).to(device)}
    for k in ("E_s", "D_t", "F"):
        freeze(nets[k]).load_state_dict(state[k])
    f_net, _ = face_nets.load_face_net(synthetic_f_config(run), device)
    H = AttributeRegressor(f_net, state["H"]["weight"].shape[1], state["H"]["weight"].shape[0]).to(device)
    H.head.load_state_dict(state["H"])
    x = torch.stack([torch.from_numpy(np.array(Image.fromarray(face["chip"]).resize(
        (run.image_size, run.image_size), Image.BICUBIC), np.uint8)).permute(2, 0, 1) for face in found])
    with torch.no_grad():
        y_hat = nets["D_t"](nets["F"](encode(nets["E_s"], x, run.image_size, device))).cpu()
        hair = hair_bank_lookup(H(faces.resize_images(faces.to_float_images(x.to(device)), 64)).cpu(),
                                state["bank"])
    pictures = []
    for k, face in enumerate(found):
        y = y_hat[k].numpy()
        common.write_json(out / f"{face['name']}.json", {"photo": face["path"], "face": face["number"],
                                                         "box": face["box"], "avatar": [float(v) for v in y],
                                                         "groups": avatar_to_dict(y), "hair": hair[k]})
        pictures.append(save_avatar(out / face["name"], y, args.apply_size, hair[k]))
    face_nets.save_overviews(out, found, pictures)
    print(f"wrote {len(found)} avatars ({AVATAR_DIM}-D JSON, {args.apply_size} px PNG, SVG) of the faces in "
          f"{n_photos} photos to {out}")
    return 0


if __name__ == "__main__":
    common.run_main(main, "crossmodal_avatar.py")
