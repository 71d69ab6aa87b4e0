"""What two or more avatar-repro trainers share, in the order a trainer uses it:

1. Arguments: a ``@dataclass`` of hyperparameters (a docstring under each field, cleanrl style) as an argparse
   parser with presets, whose errors are one line.
2. Device choice and seeding.
3. Networks: DCGAN-style blocks and the two builders every paper uses (Radford et al. 2015; J Table 1).
4. Losses, each citing its equation: the GAN BCE, DTN's ternary L_D and L_GANG, L_CONST, L_TID, L_TV, TOS's L_c.
5. Run outputs: config.json, metrics.json, log.csv, sample grids, probes, atomic checkpoints, a NaN guard.
6. The run's skeleton: arguments to output folder, then phases of training steps with logging, checkpoints, resume.

The simulated worlds the experiments run in (data, engines, face networks) are in ``worlds/``.

  DTN   Taigman, Polyak, Wolf. Unsupervised Cross-Domain Image Generation. ICLR 2017 (dtn_iclr2017.txt).
  TOS   Wolf, Taigman, Polyak. Unsupervised Creation of Parameterized Avatars. ICCV 2017 (tos_iccv2017.txt).
  J     The journal version of both (dtn_tos_journal.txt); its Table 1 lists the architectures.
"""
from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import inspect
import json
import math
import os
import random
import signal
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

# 1. Arguments -------------------------------------------------------------------------------------------------------


class UsageError(SystemExit):
    """A bad flag, value or file: the script prints one line and exits 2, before it writes anything."""

    def __init__(self, message: str):
        prog = os.path.basename(sys.argv[0]) or "avatar-repro"
        print(f"{prog}: error: {message}", file=sys.stderr)
        super().__init__(2)
        self.message = message


class OneLineParser(argparse.ArgumentParser):
    """argparse, except that an error is one line on stderr (no usage block) and exit code 2."""

    def error(self, message: str):  # noqa: D102 (argparse API)
        raise UsageError(f"{message} (see --help)")


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass and its bases, read from their source (cleanrl's convention)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


@dataclasses.dataclass
class RunArgs:
    """The arguments every training script has; a script's ``Args`` extends it with the paper's hyperparameters."""
    preset: str = "auto"
    """paper (the paper's widths and a full schedule, for one GPU) or quick (narrower layers and fewer steps, for a
    2-core CPU; the script's PRESETS say what changes); auto picks paper on CUDA and quick otherwise"""
    seed: int = 1
    """seed of the experiment (data, initialisation, batches, evaluation noise)"""
    device: str = "auto"
    """auto, cuda, cpu or mps"""
    out: str = ""
    """output folder; empty means runs/<script>/<time>__seed<seed>"""
    resume: str = ""
    """a run folder (or its ckpt.pt) to continue; its saved configuration is used"""
    dry_run: bool = False
    """a few steps of every phase on tiny data: checks that everything runs and writes its files"""
    log_every: int = 100
    """write losses to log.csv (and check them for NaN) every N steps"""
    ckpt_every: int = 2000
    """write ckpt.pt every N steps (and at the end of each phase, and on Ctrl-C)"""
    interrupt_at: int = -1
    """(tests only, hidden from --help) act as if Ctrl-C was pressed after this many steps of the run; -1 never"""


def auto_preset(args) -> tuple[str, str]:
    """The preset for a run without --preset: the paper's on CUDA, the CPU recipe otherwise."""
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        return "paper", "auto: a CUDA device is available"
    return "quick", "auto: no CUDA device, so the CPU recipe"


def quick_everywhere(args) -> tuple[str, str]:
    """The preset for a run without --preset in a script whose paper preset has no run that works yet: the quick
    recipe on every device."""
    return "quick", "auto: the recipe measured on seeds 1-3 on any device; --preset paper for Table 1's widths"


_UNSET = object()
HIDDEN = {"interrupt_at"}  # test-only hooks: flags that work but do not appear in --help


def _parse_bool(text: str) -> bool:
    value = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
             "off": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def _parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(cls, presets: dict[str, dict[str, Any]], auto_preset, argv: Sequence[str] | None = None,
               description: str | None = None):
    """The dataclass ``cls`` as flags ``--field-name`` (help: the field's docstring; default: the paper's value).
    A value comes from the command line, else the preset (``presets[name]`` overrides fields; ``auto_preset(args)``
    gives ``(name, reason)`` without --preset), else the default. Returns ``(args, preset, why, given)``."""
    docs = field_docs(cls)
    # the script's docstring keeps its lines (its usage commands and its tables); each flag's help is rewrapped
    parser = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in fields.items():
        doc = f"{docs.get(name, '')} (default: {f.default})".replace("%", "%%")
        kw: dict[str, Any] = dict(dest=name, default=_UNSET, help=argparse.SUPPRESS if name in HIDDEN else doc)
        if name == "preset":
            kw["choices"] = ["auto"] + list(presets)
        if isinstance(f.default, bool):
            kw.update(type=_parse_bool, metavar="BOOL", nargs="?", const=True)  # --flag alone means true
        elif isinstance(f.default, tuple):
            kw.update(type=_parse_ints, metavar="N,N,...")
        elif f.default is None or isinstance(f.default, str):
            kw.update(type=str)
        else:
            kw.update(type=type(f.default))
        parser.add_argument("--" + name.replace("_", "-"), **kw)
    ns = vars(parser.parse_args(argv))
    given = {k: v for k, v in ns.items() if v is not _UNSET}
    preset = given.get("preset", fields["preset"].default)
    if preset == "auto":
        probe = cls(**{k: v for k, v in given.items() if k != "preset"})
        preset, why = auto_preset(probe)
    else:
        why = "chosen with --preset"
    values = {**presets[preset], **given, "preset": preset}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"preset {preset} sets unknown fields {sorted(unknown)}")
    return cls(**values), preset, why, set(given)


def require(ok: bool, message: str):
    """Check one argument or input; on failure print one line and exit 2 (before anything is written)."""
    if not ok:
        raise UsageError(message)


# 2. Device and seeding ----------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    """``auto`` takes CUDA, then Apple's MPS, then the CPU. A named device that is absent is a usage error."""
    require(name in ("auto", "cuda", "cpu", "mps"), f"--device must be auto, cuda, cpu or mps, not {name!r}")
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    require(name != "cuda" or torch.cuda.is_available(), "--device cuda was asked for, but CUDA is not available")
    require(name != "mps" or has_mps, "--device mps was asked for, but MPS is not available")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool = True):
    """Seed python, numpy and torch (CPU and CUDA); with ``deterministic``, cuDNN picks deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def rng_state() -> dict:
    """Every random state a resumed run needs in order to draw the same numbers as an uninterrupted one."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# 3. Networks (DCGAN, Radford et al. 2015; journal Table 1) ----------------------------------------------------------


def dcgan_init(module: nn.Module):
    """DCGAN initialisation: conv weights ~ N(0, 0.02), batch-norm scale ~ N(1, 0.02) and shift 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def up_block(c_in: int, c_out: int, first: bool, last: bool) -> list[nn.Module]:
    """A 4x4 upscaling (transposed) convolution: stride 2, padding 1, except the first (1x1 -> 4x4, no stride or
    padding). BN + ReLU after every layer but the last, which ends in tanh (Table 1, "g" and "e")."""
    conv = nn.ConvTranspose2d(c_in, c_out, 4, 1 if first else 2, 0 if first else 1, bias=last)
    return [conv, nn.Tanh()] if last else [conv, nn.BatchNorm2d(c_out), nn.ReLU(True)]


def down_block(c_in: int, c_out: int, bn: bool, last: bool, act: str = "lrelu") -> list[nn.Module]:
    """A 4x4 convolution: stride 2, padding 1, except the last (4x4 -> 1x1, no stride or padding); BN (if ``bn``)
    and leaky ReLU (0.2) or ReLU after every layer but the last (Table 1, "d", "f" and "c")."""
    conv = nn.Conv2d(c_in, c_out, 4, 1 if last else 2, 0 if last else 1, bias=last or not bn)
    if last:
        return [conv]
    layers = [conv] + ([nn.BatchNorm2d(c_out)] if bn else [])
    return layers + [nn.LeakyReLU(0.2, True) if act == "lrelu" else nn.ReLU(True)]


class UpscalingGenerator(nn.Module):
    """A vector (B, n_in) -> an image (B, out_channels, 4*2^L', 4*2^L'), L' = len(widths), through 4x4 upscaling
    convolutions with ``widths`` filters, then ``out_channels``. J Table 1: DCGAN's G, e ("five 4x4 upscaling
    convolutional layers with 512-256-128-64-3 filters") and the digits g; filters in layer order."""

    def __init__(self, n_in: int, widths: Sequence[int], out_channels: int):
        super().__init__()
        chans = [n_in, *widths, out_channels]
        layers: list[nn.Module] = []
        for i in range(len(chans) - 1):
            layers += up_block(chans[i], chans[i + 1], first=i == 0, last=i == len(chans) - 2)
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.net(v.view(v.shape[0], -1, 1, 1))


class DownscalingEncoder(nn.Module):
    """An image (B, in_channels, S, S) -> a vector (B, n_out), S = 4 * 2^len(widths): stride-2 4x4 convolutions,
    then a 4x4 one without stride or padding. J Table 1: d ("... batch normalization and a leaky ReLU 0.2 ... stride
    2, padding 1, except the last one") and c ("64-128-256-512-813 filters ... Tanh": ``final="tanh"``)."""

    def __init__(self, in_channels: int, widths: Sequence[int], n_out: int, bn_first: bool = True,
                 act: str = "lrelu", final: str = "none"):
        super().__init__()
        chans = [in_channels, *widths, n_out]
        layers: list[nn.Module] = []
        for i in range(len(chans) - 1):
            last = i == len(chans) - 2
            layers += down_block(chans[i], chans[i + 1], bn=bn_first or i > 0, last=last, act=act)
        if final == "bn_tanh":  # the outputs batch-normalised before the tanh: their scale cannot run away
            layers.append(nn.BatchNorm2d(n_out))
        if final in ("tanh", "bn_tanh"):
            layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


def freeze(net: nn.Module) -> nn.Module:
    """A fixed network (f, e, an evaluator): eval mode, so its batch-norm uses running statistics, and no gradients
    to its weights. Gradients still flow *through* it to the networks before it (e.g. L_c reaches G through e)."""
    net.eval()
    net.requires_grad_(False)
    return net


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, forward, batches) -> nn.Module:
    """Recompute every batch-norm layer's running statistics as the plain average over ``batches``, each fed
    through ``forward`` (which calls ``net``) in training mode; ``net`` is left in eval mode. g sees f(s) and f(t) in
    separate batches (DTN Eq. 4-6), so its running statistics mix the two domains; source batches alone give G(s)
    the statistics it was trained with."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # None: a cumulative average over all the batches, not an exponential one
    net.train()
    for batch in batches:
        forward(batch)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return net.eval()


# 4. Losses ----------------------------------------------------------------------------------------------------------


def gan_d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's side of the binary GAN (DTN Eq. 1, TOS Eq. 7).

    d maximizes log d(x') + log(1 - d(G(x))), i.e. minimizes BCE(d(x'), 1) + BCE(d(G(x)), 0), on the logits of
    real x' (from t) and generated G(x); batch means stand for the sums over the sets."""
    return (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
            + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))


def gan_g_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """The generator's side of the binary GAN (DTN Eq. 1, TOS Eq. 7), in the non-saturating form of Goodfellow et
    al. (2014) that dcgan.torch uses: G minimizes -log d(G(x)) = BCE(d(G(x)), 1) instead of log(1 - d(G(x))). Same
    fixed point, stronger gradients early in training."""
    return F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))


# Classes of the DTN's ternary discriminator D (DTN Eq. 3): D_1, D_2, D_3 in the paper.
D_FAKE_FROM_S, D_FAKE_FROM_T, D_REAL_T = 0, 1, 2


def _ce(logits: torch.Tensor, cls: int) -> torch.Tensor:
    """Cross-entropy of every row of ``logits`` against the one class ``cls``."""
    return F.cross_entropy(logits, torch.full((logits.shape[0],), cls, device=logits.device, dtype=torch.long))


def dtn_d_loss(d_g_s: torch.Tensor, d_g_t: torch.Tensor, d_t: torch.Tensor) -> torch.Tensor:
    """The DTN discriminator's ternary loss (DTN Eq. 3):

        L_D = -E_{x in S} log D_1(g(f(x))) - E_{x in T} log D_2(g(f(x))) - E_{x in T} log D_3(x)

    ``d_g_s``, ``d_g_t``, ``d_t`` are (B, 3) logits of D on g(f(s)), g(f(t)) and t."""
    return _ce(d_g_s, D_FAKE_FROM_S) + _ce(d_g_t, D_FAKE_FROM_T) + _ce(d_t, D_REAL_T)


def dtn_gang_loss(d_g_s: torch.Tensor, d_g_t: torch.Tensor) -> torch.Tensor:
    """The DTN generator's adversarial loss (DTN Eq. 4): both kinds of generated samples should look like real
    targets, class 3 of D:

        L_GANG = -E_{x in S} log D_3(g(f(x))) - E_{x in T} log D_3(g(f(x)))"""
    return _ce(d_g_s, D_REAL_T) + _ce(d_g_t, D_REAL_T)


def const_loss(f_x: torch.Tensor, f_g_x: torch.Tensor) -> torch.Tensor:
    """f-constancy (DTN Eq. 5, TOS Eq. 6): L_CONST = sum_{x in S} d(f(x), f(g(f(x)))), with d the MSE (DTN §3).

    Mean over the batch and the representation's dimensions. ``f_g_x`` must keep its graph: g gets its gradient
    through the fixed f, so never detach f(g(f(x)))."""
    return F.mse_loss(f_g_x, f_x)


def tid_loss(t: torch.Tensor, g_t: torch.Tensor) -> torch.Tensor:
    """Target identity (DTN Eq. 6, TOS Eq. 8): L_TID = sum_{x in T} d_2(x, G(x)), with d_2 the MSE (DTN §3).
    Mean over the batch and the pixels."""
    return F.mse_loss(g_t, t)


def tv_loss(z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Anisotropic total variation (DTN Eq. 7 with B = 1; TOS §3.2):

        L_TV(z) = sum_{i,j} ((z_{i,j+1} - z_{i,j})^2 + (z_{i+1,j} - z_{i,j})^2 + eps)^(1/2)

    Ours: ``eps`` inside the square root, since sqrt's gradient at 0 is infinite (flat regions give NaN). Summed over
    an image's pixels and channels, as the paper's sum over i,j; mean over the batch."""
    dx = z[..., :-1, 1:] - z[..., :-1, :-1]
    dy = z[..., 1:, :-1] - z[..., :-1, :-1]
    return torch.sqrt(dx * dx + dy * dy + eps).flatten(1).sum(1).mean()


def compliance_loss(g_x: torch.Tensor, e_c_g_x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """e-compliance (TOS Eq. 4 and 5): L_c = sum_x ||G(x) - e(c(G(x)))||^2.

    Both c and G minimize it (Alg. 1, steps 11-12), so neither argument is detached; e is fixed. ``"sum"``: Eq. 4's
    squared norm summed over an image's pixels; ``"mean"``: per pixel (an MSE, the unit of the paper's e error).
    The sum over x is the mean over the batch."""
    sq = (g_x - e_c_g_x).pow(2).flatten(1)
    if reduction == "sum":
        return sq.sum(1).mean()
    if reduction == "mean":
        return sq.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', not {reduction!r}")


# 5. Run outputs: folder, config, metrics, log, grids, checkpoints, NaN guard ----------------------------------------


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``: a crash or Ctrl-C
    mid-write leaves the previous file intact, never half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any):
    """Write JSON atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def default_out_dir(script: str, seed: int) -> Path:
    """``runs/<script>/<time>__seed<seed>``."""
    return Path("runs") / script / f"{time.strftime('%Y%m%d-%H%M%S')}__seed{seed}"


def print_config(args) -> None:
    """The hyperparameters as a table at the start of a run (cleanrl)."""
    rows = dataclasses.asdict(args)
    width = max(len(k) for k in rows)
    print("hyperparameters:")
    for k, v in rows.items():
        print(f"  {k:<{width}}  {v}")


class CSVLog:
    """``log.csv``: one row of losses every N steps. On resume it keeps the first ``rows`` rows (those written
    before the checkpoint) and appends after them, so a resumed log reads like an uninterrupted one."""

    def __init__(self, path: str | Path, fields: Sequence[str], keep_rows: int | None = None):
        self.path, self.fields = Path(path), list(fields)
        kept: list[dict] = []
        if keep_rows is not None and self.path.exists():
            with open(self.path, newline="") as fh:
                kept = list(csv.DictReader(fh))[:keep_rows]
        self.rows = len(kept)
        self.fh = open(self.path, "w", newline="")
        self.writer = csv.DictWriter(self.fh, fieldnames=self.fields, extrasaction="raise")
        self.writer.writeheader()
        self.writer.writerows(kept)
        self.fh.flush()

    def write(self, **row):
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self.fh.flush()
        self.rows += 1

    def close(self):
        self.fh.close()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8):
    """A PNG grid of images in [-1, 1]. ``value_range=(-1, 1)`` keeps the grey levels comparable across grids
    (without it save_image stretches each grid to its own min and max)."""
    from torchvision.utils import save_image
    images = images.detach().float().cpu()
    atomic_write(path, lambda tmp: save_image(images, tmp, nrow=nrow, normalize=True, value_range=(-1, 1),
                                              padding=2, pad_value=0.5))


def save_probes(out: Path, sets: dict[str, torch.Tensor], identity: list[int]):
    """A face script's evaluation images for eval_retrieval.py: ``probes/<set>/<k>.png`` and ``probes/metadata.csv``
    (set, file, identity). ``photo_x`` and ``photo_x2`` are each identity's two photos (x' joins the gallery); the
    other sets are the methods' probes. Images are float in [-1, 1]."""
    root = out / "probes"
    rows = ["set,file,identity"]
    for name, images in sets.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
        for k, (img, ident) in enumerate(zip(pixels.numpy(), identity)):
            Image.fromarray(img).save(root / name / f"{k:05d}.png")
            rows.append(f"{name},{name}/{k:05d}.png,{ident}")
    atomic_write(root / "metadata.csv", lambda tmp: Path(tmp).write_text("\n".join(rows) + "\n"))


def save_checkpoint(path: str | Path, state: dict):
    """``torch.save``, atomically: a crash mid-write leaves the previous checkpoint intact."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint of ``save_checkpoint`` (the file, or the run folder holding ``ckpt.pt``); a missing or
    unreadable file is a one-line usage error."""
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    require(path.is_file(), f"--resume: no checkpoint at {path}")
    try:
        # numpy RNG state and plain containers besides tensors, hence weights_only=False: load only your own runs
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise UsageError(f"--resume: {path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None


class NonFiniteLoss(RuntimeError):
    pass


def check_finite(phase: str, step: int, losses: dict[str, float]):
    """The NaN guard: stop the run, naming the phase, the step and the loss, when a logged loss is NaN or inf
    (checked when losses are logged, so it names the first logged step that is not finite)."""
    for name, value in losses.items():
        if not math.isfinite(value):
            raise NonFiniteLoss(f"{name} = {value} at {phase} step {step}: stopping (lower the learning rate, "
                                f"or resume from the last checkpoint with another seed)")


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "it", initial: int = 0):
    """A step that takes more than a few seconds says what it does: on a terminal a tqdm bar with its rate and the
    time left; elsewhere (a log file, CI) its description as one line, printed once. Both go to stderr, as tqdm's
    bars do, so that stdout keeps the run's results."""
    if not sys.stderr.isatty():
        print(f"{desc} ...", file=sys.stderr, flush=True)
    return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, dynamic_ncols=True, disable=None)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type


class GracefulInterrupt:
    """Ctrl-C (SIGINT) asks the training loop to stop at the end of the current step, so that the checkpoint it then
    writes is exact and ``--resume`` continues as if nothing happened. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr)

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)
        return False


# 6. The run's skeleton: arguments to output folder, then phases of training steps with logging, checkpoints, resume ---


def start_run(script: str, cls, presets: dict, dry_run_sizes: dict, validate, argv=None,
              description: str | None = None, auto=auto_preset):
    """Arguments, ``--resume`` (the saved arguments; only --device may change), ``--dry-run`` (shrinks the sizes not
    given), validation, device and output folder, in that order: nothing is written before every check has passed.
    ``auto(args)`` names the preset of a run without --preset. Returns ``(args, preset, device, out, ckpt)``,
    ``ckpt`` the loaded checkpoint when resuming, else None."""
    args, preset, why, given = parse_args(cls, presets, auto, argv, description=description)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        require(ckpt.get("script") == script, f"--resume: {args.resume} is not a {script} checkpoint")
        keep = {k: getattr(args, k) for k in ("device", "interrupt_at", "resume")}
        ignored = sorted(given - set(keep))
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["args"].items()}
        args = dataclasses.replace(cls(**saved), **keep)
        preset, why = args.preset, "restored from the checkpoint"
        if ignored:
            print(f"resume: using the saved configuration; ignoring {', '.join('--' + k for k in ignored)}")
    if args.dry_run and ckpt is None:  # a resumed run's saved arguments already hold the dry run's sizes
        args = dataclasses.replace(args, **{k: v for k, v in dry_run_sizes.items() if k not in given})
    validate(args)
    device = pick_device(args.device)

    if ckpt is not None:
        out = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent
    else:
        out = Path(args.out) if args.out else default_out_dir(script, args.seed)
        require(not (out / "config.json").exists(),
                f"{out} already holds a run: pass --resume {out} to continue it, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    args = dataclasses.replace(args, out=str(out))
    print(f"preset: {preset} ({why}); device: {describe_device(device)}; output: {out}")
    print_config(args)
    write_json(out / "config.json", {**dataclasses.asdict(args), "preset_reason": why})
    return args, preset, device, out, ckpt


class PhaseRunner:
    """Runs a script's training phases in order, each a number of steps, and does the bookkeeping they share:
    ``log.csv`` every ``log_every`` steps with the NaN guard, ``ckpt.pt`` every ``ckpt_every`` steps, at the end of
    each phase and on Ctrl-C, and an exact resume from such a checkpoint (networks, optimizers, random state, log).

    A step function returns its losses as a dict of tensors; they are read on the host only when logged."""

    def __init__(self, script: str, args, out: Path, nets: dict, opts: dict, phases: dict[str, int],
                 log_fields: Sequence[str], ckpt: dict | None, t_start: float):
        self.script, self.args, self.out, self.nets, self.opts = script, args, out, nets, opts
        self.phases, self.t_start = phases, t_start
        self.phase_i, self.step, self.elapsed_before = 0, 0, 0.0
        if ckpt is not None:
            for k, sd in ckpt["nets"].items():
                nets[k].load_state_dict(sd)
            for k, sd in ckpt["opts"].items():
                opts[k].load_state_dict(sd)
            names = list(phases)
            self.phase_i = names.index(ckpt["phase"]) if ckpt["phase"] in names else len(names)  # "done"
            self.step, self.elapsed_before = ckpt["step"], ckpt["elapsed"]
            set_rng_state(ckpt["rng"])
            print(f"resume: from phase {ckpt['phase']}, step {self.step}")
        self.log = CSVLog(out / "log.csv", ["phase", "step", "seconds", *log_fields],
                          keep_rows=ckpt["log_rows"] if ckpt else None)

    def elapsed(self) -> float:
        """Seconds of training so far, over every session of this run."""
        return self.elapsed_before + time.time() - self.t_start

    def checkpoint(self, phase: str, done: int):
        save_checkpoint(self.out / "ckpt.pt", {
            "script": self.script, "args": dataclasses.asdict(self.args), "phase": phase, "step": done,
            "nets": {k: v.state_dict() for k, v in self.nets.items()},
            "opts": {k: v.state_dict() for k, v in self.opts.items()},
            "rng": rng_state(), "log_rows": self.log.rows, "elapsed": self.elapsed()})

    def run(self, setup, after_phase=None) -> bool:
        """``setup(phase, start_step)`` puts the networks in the phase's modes and returns its step function;
        ``after_phase(phase)`` runs when a phase is complete. Returns True when every phase is done, False when
        interrupted (the checkpoint is written and the command to continue printed)."""
        names, args = list(self.phases), self.args
        global_done = sum(self.phases[p] for p in names[:self.phase_i]) + self.step
        step = self.step
        with GracefulInterrupt() as interrupt:
            for i_phase in range(self.phase_i, len(names)):
                phase, total = names[i_phase], self.phases[names[i_phase]]
                train_step = setup(phase, step)
                bar = progress(range(step, total), desc=f"train {phase}: {total:,} steps", total=total, unit="step",
                               initial=step)
                for i in bar:
                    losses = train_step()
                    done, global_done = i + 1, global_done + 1
                    if done % args.log_every == 0 or done == total:
                        values = {k: v.item() for k, v in losses.items()}
                        check_finite(phase, done, values)
                        self.log.write(phase=phase, step=done, seconds=round(self.elapsed(), 2), **values)
                        bar.set_postfix({k.removeprefix("loss_"): f"{v:.4f}" for k, v in values.items()})
                    if done % args.ckpt_every == 0:
                        self.checkpoint(phase, done)
                    if global_done == args.interrupt_at:
                        interrupt.requested = True
                    if interrupt.requested:
                        self.checkpoint(phase, done)
                        self.log.close()
                        print(f"stopped at {phase} step {done}; continue with: "
                              f"python {self.script}.py --resume {self.out}")
                        return False
                bar.close()
                if after_phase is not None:
                    after_phase(phase)
                step = 0
                self.checkpoint(names[i_phase + 1] if i_phase + 1 < len(names) else "done", 0)
        self.log.close()
        return True


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """A batch of images (4-D) in the channels-last layout, the CPU's fast one for convolutions and max pooling;
    any other tensor as it is."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def sample_batch(batch_size: int, x: torch.Tensor, *more: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A random mini-batch (with replacement) of ``x`` and of the tensors aligned with it, drawn on their device:
    no loader, no host sync."""
    idx = torch.randint(len(x), (batch_size,), device=x.device)
    return (x[idx], *(m[idx] for m in more))


def run_main(main, script: str):
    """``sys.exit(main())``, with a NaN stop reported as one line and exit code 1."""
    try:
        sys.exit(main())
    except NonFiniteLoss as exc:
        print(f"{script}: error: {exc}", file=sys.stderr)
        sys.exit(1)
