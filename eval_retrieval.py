"""Identifiability by retrieval: DTN Table 4 (dtn_iclr2017.txt §5.2) and TOS Table 1 (tos_iccv2017.txt §4.2; the
journal's Table 5).

"For each image x in our manually annotated set, we create a gallery s' u x', where x' is the other image of the
person in x. We then perform retrieval using the VGG face descriptor using either the manually created emoji or G(x)
as probe." (DTN §5.2.) The rank of x' among the 100,001 gallery faces says how well an avatar identifies its person.
"The VGG network is used in order to avoid a bias that might be caused by using f both for training ... and for
evaluation": the descriptor here is never the f that trained the avatars, and it never touches a loss.

    python eval_retrieval.py --run runs/tos_emoji/<run>                 # the table for a tos_emoji run
    python eval_retrieval.py --run runs/crossmodal_avatar/<run>         # the same for crossmodal_avatar's avatars
    python eval_retrieval.py --run runs/tos_emoji/<celeba run> --descriptor mobilefacenet \\
        --descriptor-ckpt ../shared/data/eval_only/mobilefacenet_casia.ckpt    # real chips, an independent network
    python eval_retrieval.py --run my_probes/ --world synthetic         # one's own method's images (format below)
    python eval_retrieval.py --run runs/tos_emoji/<run> --dry-run       # tiny gallery and descriptor: checks only

Protocol, for every probe set of the run and every evaluation identity i:
    probe  = the method's avatar made from photo x_i (or the ground-truth emoji, or x_i itself as a reference)
    gallery = s' u {x'_i}: the distractors s' (no photo of any evaluation identity) and i's other photo x'_i
    rank_i = 1 + the number of distractors at least as similar to the probe as x'_i is (ties count against
             the probe, so a descriptor or a method that maps every face to one point gets the worst rank, not
             the best); similarity is the dot product of the descriptor's unit-length codes
    reported: median rank (numpy's: the mean of the two middle ranks for an even count) with a 95% bootstrap
              interval over the probes, mean rank, rank-1 and rank-5 accuracy, and the gallery size |s'| + 1
              beside them (a median rank grows with the gallery)

The input: a folder with ``probes/metadata.csv`` (or ``metadata.csv`` itself), lines ``set,file,identity``, the file
relative to the metadata's folder. The set ``photo_x2`` (``--match-set``) holds the gallery's x' of each identity;
every other set is a probe set with one image per identity (the same identities). ``tos_emoji.py`` writes exactly
this; so can any method. Identities are the synthetic world's identity indices (the ``eval`` split) or, for real
photos, the identity numbers of ``faces.load_face_folder`` on the same folder (tos_emoji writes those).

Distractors s' and descriptors:
    synthetic world  s' = photos of the world's ``distractors`` split (identities no other split holds), rendered
                     once and cached, and so are the descriptor's codes of them. The descriptor is a second
                     identity network trained by this script (once, then cached) on the ``descriptor`` split: other
                     identities, another architecture (a plain VGG-like stack, not f's ResNet) and another seed
                     than tos_emoji's f. It sees photos only.
    real photos      s' = every photo of the face folder (--faces-dir) or of CelebA (--faces celeba) whose identity
                     is not an evaluation identity. The descriptor is a user-supplied MobileFaceNet checkpoint
                     (--descriptor mobilefacenet --descriptor-ckpt; the architecture is below), or dlib's network,
                     with a warning when the evaluated run used dlib's network as its f.

Deviations from the papers (the README repeats them):
  * The descriptor is not VGG-Face, whose weights cannot be downloaded here: a plain CNN trained on the synthetic
    world's descriptor split (synthetic), or MobileFaceNet / dlib (real photos).
  * Distractors of the synthetic world are rendered photos of the same world; the paper's were 100,000 random real
    faces. On a face folder the distractors are that folder's other photos, which the GAN may have seen in s (the
    paper's s' was "not included in s"); a folder of 6,000 photos cannot hold both apart.
  * The gallery images are at the probes' resolution (64 px in tos_emoji), and every image is resized to the
    descriptor's input.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
from common import require
from worlds import face_nets
from worlds import faces

# ======================================================================================================================
# Arguments
# ======================================================================================================================


@dataclass
class Args:
    preset: str = "auto"
    """paper (100,000 distractors as in DTN Tab. 4 / TOS Tab. 1, the descriptor trained 1,500 steps) or quick
    (the descriptor trained 600 steps, for a 2-core CPU); auto picks paper on CUDA and quick otherwise"""
    run: str = ""
    """a run folder of tos_emoji.py or crossmodal_avatar.py (its probes/metadata.csv), or any folder holding
    metadata.csv (format above)"""
    out: str = ""
    """output folder; empty means <run>/retrieval"""
    seed: int = 1
    """seed of the descriptor's training (tos_emoji's f has seed 0) and of the random-probe row"""
    device: str = "auto"
    """auto, cuda, cpu or mps"""
    dry_run: bool = False
    """a tiny gallery and a descriptor trained 2 steps: checks that everything runs and writes its files"""

    world: str = "auto"
    """where the distractors come from: synthetic (the face world), folder (--faces-dir), celeba, or auto (the
    run's config.json says which; synthetic when it has none)"""
    faces_dir: str = ""
    """real photos: the face folder of the run (its other identities are the distractors)"""
    data_root: str = "data"
    """real photos from CelebA: where torchvision keeps (or downloads) it"""
    download: bool = True
    """let torchvision download CelebA"""
    world_seed: int = 0
    """synthetic world: its seed (read from the run's config.json when there is one)"""
    distractors: int = 100000
    """size of the distractor set s' ("a set s' of 100,000 random face images", DTN §5.2); real photos use at
    most this many"""
    match_set: str = "photo_x2"
    """the set holding x', the other photo of each identity, which joins the gallery"""

    descriptor: str = "auto"
    """synthetic (a plain CNN trained here on the world's descriptor split), mobilefacenet (--descriptor-ckpt),
    dlib, or auto (synthetic for the synthetic world, mobilefacenet with --descriptor-ckpt, else dlib)"""
    descriptor_ckpt: str = ""
    """a MobileFaceNet checkpoint (a torch pickle with net_state_dict, 112x96 input): the independent descriptor
    for real photos"""
    descriptor_identities: int = 1000
    """identities of the descriptor split that train the synthetic descriptor (16 photos each)"""
    descriptor_steps: int = 1500
    """training steps of the synthetic descriptor (ArcFace, batch 128, SGD with a one-cycle schedule)"""
    descriptor_style_aug: float = 0.0
    """probability of face_nets.style_augment when training the synthetic descriptor (0: flips only, as VGG-Face was
    trained on ordinary photos)"""
    batch: int = 512
    """images per forward pass of the descriptor"""


PRESETS = {"paper": {}, "quick": dict(descriptor_steps=600)}
DRY_RUN = dict(distractors=64, descriptor_identities=32, descriptor_steps=2)

# The rows of TOS Table 1 (emoji columns; DTN Table 4 is its Manual and DTN G(x) cells): label, the probe sets of
# the G(x), e(..(x)) and engine columns, and the paper's median ranks out of 100,001 (None: "NA").
TABLE_ROWS = [
    ("Manual (the ground-truth emoji, exact)", None, None, "manual", None, 16311),
    ("DANN", None, "dann_e_c_G", "dann_engine", None, 59625),
    ("DTN (e(c-bar(..)) for its configuration)", "dtn_G", "dtn_e_c_G", "dtn_engine", 16, 18079),
    ("TOS", "tos_G", "tos_e_c_G", "tos_engine", 30, 3519),
    ("TOS fixed c-bar", "tos_fixed_cbar_G", "tos_fixed_cbar_e_c_G", "tos_fixed_cbar_engine", 26, 14990),
]
PHOTO_SET = "photo_x"  # the photo x itself: the descriptor's own photo-to-photo retrieval, a reference row


def validate(args: Args):
    require(args.run, "--run DIR is required: a tos_emoji or crossmodal_avatar run, or a folder with metadata.csv")
    require(args.world in ("auto", "synthetic", "folder", "celeba"), "--world must be auto, synthetic, folder or "
                                                                      "celeba")
    require(args.descriptor in ("auto", "synthetic", "mobilefacenet", "dlib"),
            "--descriptor must be auto, synthetic, mobilefacenet or dlib")
    require(args.descriptor != "mobilefacenet" or args.descriptor_ckpt,
            "--descriptor mobilefacenet needs --descriptor-ckpt FILE")
    require(not args.descriptor_ckpt or Path(args.descriptor_ckpt).is_file(),
            f"--descriptor-ckpt: no file at {args.descriptor_ckpt}")
    require(args.distractors >= 1, "--distractors must be at least 1")
    require(args.descriptor_steps >= 1 and args.descriptor_identities >= 2,
            "--descriptor-steps must be at least 1 and --descriptor-identities at least 2")
    require(0 <= args.descriptor_style_aug <= 1, "--descriptor-style-aug is a probability, in [0, 1]")
    require(args.batch >= 1, "--batch must be at least 1")


# ======================================================================================================================
# Retrieval: ranks in chunks, and their statistics
# ======================================================================================================================


@torch.no_grad()
def retrieval_ranks(probe: torch.Tensor, match: torch.Tensor, distractors: torch.Tensor,
                    chunk: int = 16384) -> torch.Tensor:
    """The rank of ``match[i]`` for ``probe[i]`` in the gallery ``distractors`` u {match[i]}: 1 + the number of
    distractors whose similarity (dot product) to the probe is at least that of the match. Ties count against the
    probe. The distractors are scored ``chunk`` at a time, so 100,000 x 1,000 never needs the whole similarity
    matrix; the scores are float64, so equal codes give equal scores."""
    probe, match = probe.double(), match.to(probe.device).double()
    true = (probe * match).sum(1, keepdim=True)
    better = torch.zeros(len(probe), dtype=torch.long, device=probe.device)
    for k in range(0, len(distractors), chunk):
        block = distractors[k:k + chunk].to(probe.device).double()
        better += (probe @ block.t() >= true).sum(1)
    return (better + 1).cpu()


def rank_stats(ranks, gallery_size: int, resamples: int = 2000) -> dict:
    """Median rank (numpy: the mean of the two middle values for an even count), mean rank, rank-1 and rank-5
    accuracy, as in DTN Table 4; and a 95% bootstrap interval of the median over the probes (seeded), so that a
    reader can tell a row from the random probe's with a few hundred probes."""
    r = np.asarray(ranks, dtype=np.float64)
    boot = np.median(r[np.random.default_rng(0).integers(len(r), size=(resamples, len(r)))], axis=1)
    ci95 = [float(v) for v in np.percentile(boot, [2.5, 97.5])]
    return {"median_rank": float(np.median(r)), "median_rank_ci95": ci95, "mean_rank": float(r.mean()),
            "rank1": float((r <= 1).mean()), "rank5": float((r <= 5).mean()), "probes": int(len(r)),
            "gallery_size": int(gallery_size)}


# ======================================================================================================================
# Probes: metadata.csv and its PNGs
# ======================================================================================================================


def read_probes(run: str, match_set: str) -> tuple[Path, dict[str, torch.Tensor], list[str], list[str]]:
    """The probe sets of a run folder: (metadata path, {set: uint8 images (N, 3, H, W)}, identities, files of the
    first set), every set holding one image per identity in the same order. Bad input is a one-line error."""
    root = Path(run)
    require(root.is_dir(), f"--run: {root} is not a folder")
    meta = root / "probes" / "metadata.csv" if (root / "probes" / "metadata.csv").is_file() else root / "metadata.csv"
    require(meta.is_file(), f"--run: no probes/metadata.csv or metadata.csv in {root} (is it a tos_emoji or "
                            f"crossmodal_avatar run?)")
    rows: dict[str, list[tuple[str, str]]] = {}
    with open(meta, newline="") as fh:
        reader = csv.DictReader(fh)
        require(reader.fieldnames is not None and {"set", "file", "identity"} <= set(reader.fieldnames),
                f"{meta}: the header must be set,file,identity")
        for row in reader:
            rows.setdefault(row["set"], []).append((row["file"], row["identity"]))
    require(match_set in rows, f"{meta}: no set {match_set!r} (the gallery's x'); sets: {', '.join(rows) or 'none'}")
    identity = [i for _, i in rows[match_set]]
    require(len(set(identity)) == len(identity), f"{meta}: set {match_set} has an identity twice")
    sets = {}
    for name, items in rows.items():
        require([i for _, i in items] == identity,
                f"{meta}: set {name} does not list the identities of {match_set} in the same order")
        images = []
        for file, _ in items:
            path = meta.parent / file
            try:
                with Image.open(path) as img:
                    images.append(np.asarray(img.convert("RGB")))
            except Exception as exc:
                raise common.UsageError(f"{meta}: cannot read {path} ({type(exc).__name__})") from None
        require(len({a.shape for a in images}) == 1, f"{meta}: the images of set {name} differ in size")
        sets[name] = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    require(len(sets) >= 2, f"{meta}: only the set {match_set}; there is nothing to probe with")
    require(len(identity) >= 2, f"{meta}: one identity; retrieval needs two or more")
    return meta, sets, identity, [f for f, _ in rows[match_set]]


# ======================================================================================================================
# The distractors s', and the descriptor
# ======================================================================================================================


def load_distractors(args: Args, identity: list[str], size: int) -> tuple[torch.Tensor, np.ndarray | None, str]:
    """s' as uint8 images at the probes' ``size``, their identities (real photos; None for the synthetic world,
    one photo per identity) and where they come from (see the module docstring)."""
    if args.world == "synthetic":
        ids = np.array([int(i) for i in identity])
        lo = faces.FACE_SPLITS["eval"] * faces.SPLIT_STRIDE
        require(((ids >= lo) & (ids < lo + faces.SPLIT_STRIDE)).all(),
                "the probes' identities are not the synthetic world's eval split: pass --world folder or celeba")
        data = faces.synthetic_faces("distractors", args.distractors, 1, max(size, 64), args.world_seed)
        return data["images"], None, data["source"]
    if args.world == "folder":
        require(args.faces_dir, "--world folder needs --faces-dir DIR (the run's face folder)")
        data = faces.load_face_folder(args.faces_dir, face_nets.DLIB_INPUT_SIZE)
    else:
        data = faces.load_celeba(args.data_root, "all", face_nets.DLIB_INPUT_SIZE, args.download)
    probe_ids = {int(i) for i in identity}
    keep = np.flatnonzero(~np.isin(data["identity"].numpy(), list(probe_ids)))[:args.distractors]
    require(len(keep) >= 1, f"{data['source']}: no photo outside the evaluation identities to serve as distractor")
    images = faces.resize_images(faces.to_float_images(data["images"][keep]), size)
    images = ((images + 1) * 127.5).round().clamp(0, 255).byte()
    return (images, data["identity"].numpy()[keep],
            f"{data['source']}: the {len(keep)} photos of identities outside the evaluation set")


class Descriptor(nn.Module):
    """A face network behind one interface: images in [-1, 1] -> unit-length codes, the code of the image plus
    that of its mirror image (a common test-time augmentation of face descriptors)."""

    def __init__(self, net: nn.Module, prepare=None):
        super().__init__()
        self.net, self.prepare = net, prepare

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare(x) if self.prepare else x
        return F.normalize(self.net(x) + self.net(x.flip(3)), dim=1)


def run_faces(run_config: dict) -> str:
    """Where a run's test photos came from: synthetic, celeba or folder (--faces-dir wins, as in tos_emoji). A
    crossmodal_avatar run (it has --pairs-file) writes probes of the synthetic world's test identities only."""
    if "pairs_file" in run_config:
        return "synthetic"
    return "folder" if run_config.get("faces_dir") else run_config.get("faces", "synthetic")


def load_descriptor(args: Args, run_config: dict, device: torch.device) -> tuple[Descriptor, str, dict]:
    """The independent descriptor (never the run's f), its description and its own check."""
    if args.descriptor == "synthetic":
        cfg = face_nets.FaceNetConfig(arch="plain", split="descriptor", identities=args.descriptor_identities,
                                   steps=args.descriptor_steps, seed=args.seed,
                                   world_seed=args.world_seed, style_aug=args.descriptor_style_aug)
        require(cfg.seed != 0 or cfg.arch != "resnet", "the descriptor must differ from tos_emoji's f")
        net, metrics = face_nets.load_face_net(cfg, device)
        return (Descriptor(net).to(device), f"synthetic descriptor (plain CNN, ArcFace, {args.descriptor_steps} "
                f"steps on the descriptor split, seed {args.seed}; verification {100 * metrics['accuracy']:.2f}% "
                f"on held-out identities)", metrics)
    if args.descriptor == "mobilefacenet":
        net = load_mobilefacenet(args.descriptor_ckpt)
        return (Descriptor(net, mobilefacenet_input).to(device),
                f"MobileFaceNet ({args.descriptor_ckpt}; 112x96 input, the SphereFace template)", {})
    if run_faces(run_config) != "synthetic":
        print("warning: the run's f was dlib's network, so dlib as the descriptor is the very bias the papers "
              "avoided with VGG-Face; pass --descriptor mobilefacenet --descriptor-ckpt FILE for an independent one")
    return Descriptor(face_nets.load_dlib_face_net(device=device)).to(device), "dlib face-recognition ResNet", {}


def distractor_codes(desc: Descriptor, distractors: torch.Tensor, source: str, args: Args,
                     device: torch.device) -> torch.Tensor:
    """The descriptor's codes of s'. The synthetic world's s' is fixed by its source line, so its codes are cached
    under the hash of that line and of the descriptor's weights: the 100,000 are embedded once per descriptor, and
    every later table (another run, another seed) reads them."""
    if args.world != "synthetic":
        return face_nets.embed(desc, distractors, args.batch, device, desc="distractors")
    key = hashlib.sha1(f"{source} {len(distractors)} {tuple(distractors.shape)}".encode())
    for v in desc.state_dict().values():
        key.update(v.detach().cpu().contiguous().numpy().tobytes())
    path = faces.cache_dir() / f"retrieval_codes_{key.hexdigest()[:12]}.pt"
    if path.is_file():
        print(f"distractor codes: read from {path}")
        return torch.load(path, weights_only=True)
    code = face_nets.embed(desc, distractors, args.batch, device, desc="distractors")
    common.atomic_write(path, lambda tmp: torch.save(code, tmp))
    return code


# ======================================================================================================================
# MobileFaceNet (Chen et al. 2018): the independent descriptor for real photos
# ======================================================================================================================


class ConvBN(nn.Module):
    """A bias-free convolution, batch norm, and PReLU (none when ``linear``)."""

    def __init__(self, c_in: int, c_out: int, k, stride: int = 1, pad: int = 0, groups: int = 1, linear=False):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.prelu = None if linear else nn.PReLU(c_out)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return x if self.prelu is None else self.prelu(x)


class Bottleneck(nn.Module):
    """MobileNetV2's inverted residual: 1x1 expansion (x t), BN, PReLU, 3x3 depthwise (stride s), BN, PReLU, 1x1
    projection, BN; the input is added when the stride is 1 and the width unchanged."""

    def __init__(self, c_in: int, c_out: int, stride: int, t: int):
        super().__init__()
        h = c_in * t
        self.residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, h, 1, bias=False), nn.BatchNorm2d(h), nn.PReLU(h),
            nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.PReLU(h),
            nn.Conv2d(h, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet (Chen et al. 2018): (N, 3, 112, 96) RGB scaled as (pixel - 127.5) / 128 -> a 128-D code.

    conv1     3x3 conv 3->64, stride 2, BN, PReLU                       112x96 -> 56x48
    dw_conv1  3x3 depthwise, BN, PReLU
    blocks    bottlenecks (t expansion, c width, n repeats, s stride of the first), the paper's Table 1:
              (2, 64, 5, 2) 28x24 | (4, 128, 1, 2) 14x12 | (2, 128, 6, 1) | (4, 128, 1, 2) 7x6 | (2, 128, 2, 1)
    conv2     1x1 conv 128->512, BN, PReLU
    linear7   global depthwise convolution (7x6 kernel), BN, no activation
    linear1   1x1 conv 512->128, BN, no activation
    The layer names are those of the public CASIA-WebFace checkpoint (Xiaoccer/MobileFaceNet_Pytorch)."""

    SETTING = [(2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1)]

    def __init__(self):
        super().__init__()
        self.conv1 = ConvBN(3, 64, 3, 2, 1)
        self.dw_conv1 = ConvBN(64, 64, 3, 1, 1, groups=64)
        layers, c_in = [], 64
        for t, c, n, s in self.SETTING:
            for i in range(n):
                layers.append(Bottleneck(c_in, c, s if i == 0 else 1, t))
                c_in = c
        self.blocks = nn.Sequential(*layers)
        self.conv2 = ConvBN(128, 512, 1)
        self.linear7 = ConvBN(512, 512, (7, 6), groups=512, linear=True)
        self.linear1 = ConvBN(512, 128, 1, linear=True)

    def forward(self, x):
        return self.linear1(self.linear7(self.conv2(self.blocks(self.dw_conv1(self.conv1(x)))))).flatten(1)


def load_mobilefacenet(path: str) -> MobileFaceNet:
    """A MobileFaceNet with the weights of ``path`` (``{'net_state_dict': ...}`` or a bare state dict), in eval
    mode; a file that is not such a checkpoint is a one-line error."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # a pickle: load only files you trust
    except Exception as exc:
        raise common.UsageError(f"--descriptor-ckpt: cannot read {path} ({type(exc).__name__})") from None
    state = ckpt.get("net_state_dict", ckpt) if isinstance(ckpt, dict) else None
    net = MobileFaceNet()
    want = net.state_dict()
    require(isinstance(state, dict) and set(state) == set(want)
            and all(tuple(state[k].shape) == tuple(v.shape) for k, v in want.items()),
            f"--descriptor-ckpt: {path} is not a MobileFaceNet checkpoint (its weights do not fit the architecture)")
    net.load_state_dict(state, strict=True)
    return common.freeze(net.eval())


# dlib's chip (get_face_chip, padding 0.25) frames its 68-point mean face as (m + 0.25) / 1.5 of the side. Five of
# its points, as fractions of the side: the eye centres (the means of points 36-41 and 42-47), the nose tip (30)
# and the mouth corners (48, 54), the image's left first.
DLIB_CHIP_POINTS = torch.tensor([[0.225492, 0.215990], [0.754761, 0.215990], [0.490127, 0.515625],
                                 [0.254149, 0.780233], [0.726104, 0.780233]], dtype=torch.float64)
# The same five points in SphereFace's 96 x 112 crop (1-based pixel coordinates), the input MobileFaceNet expects.
SPHEREFACE_POINTS = torch.tensor([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                                  [33.5493, 92.3655], [62.7299, 92.2041]], dtype=torch.float64)


def mobilefacenet_input(chips: torch.Tensor) -> torch.Tensor:
    """dlib-framed chips (N, 3, S, S) in [-1, 1], any S, -> MobileFaceNet's (N, 3, 112, 96) input.

    The crop is the least-squares similarity from SphereFace's five template points to the same points of dlib's
    chip: one crop pixel is 1.449 chip pixels at S = 150, rotation 0.3 degrees, residual 2.2 chip pixels. The top
    ~19 rows of the crop lie above the chip and repeat its top edge. Bilinear sampling; x * 127.5 / 128 then gives
    the network's (pixel - 127.5) / 128."""
    h, w = 112, 96
    src = SPHEREFACE_POINTS - 0.5                                      # pixel centres, 0-based, continuous
    dst = (DLIB_CHIP_POINTS + 0.25) / 1.5 + 0.5 / 150                  # fractions of the chip's side
    u, v = src[:, 0], src[:, 1]
    one, zero = torch.ones_like(u), torch.zeros_like(u)
    A = torch.cat([torch.stack([u, -v, one, zero], 1), torch.stack([v, u, zero, one], 1)])
    a, b, tx, ty = torch.linalg.lstsq(A, torch.cat([dst[:, 0], dst[:, 1]])[:, None]).solution[:, 0]
    to_chip = torch.tensor([[a, -b, tx], [b, a, ty]])                  # crop pixels -> chip fractions
    to_px = torch.tensor([[w / 2, 0, w / 2], [0, h / 2, h / 2], [0, 0, 1]], dtype=torch.float64)
    theta = 2 * to_chip @ to_px                                        # crop [-1, 1] -> chip [-1, 1]
    theta[:, 2] -= 1
    theta = theta.to(chips).expand(len(chips), 2, 3)
    grid = F.affine_grid(theta, [len(chips), 3, h, w], align_corners=False)
    return F.grid_sample(chips, grid, mode="bilinear", padding_mode="border", align_corners=False) * (127.5 / 128)


# ======================================================================================================================
# The run: probes, gallery, ranks, tables
# ======================================================================================================================


def main(argv=None):
    t0 = time.time()
    args, preset, why, given = common.parse_args(Args, PRESETS, common.auto_preset, argv, description=__doc__)
    if args.dry_run:
        args = dataclasses.replace(args, **{k: v for k, v in DRY_RUN.items() if k not in given})
    validate(args)
    device = common.pick_device(args.device)
    run_config = {}
    if (Path(args.run) / "config.json").is_file():  # a tos_emoji run says where its faces came from
        run_config = json.loads((Path(args.run) / "config.json").read_text())
    if args.world == "auto":
        args.world = run_faces(run_config)
        args.faces_dir = args.faces_dir or run_config.get("faces_dir", "")
        if "world_seed" in run_config and "world_seed" not in given:
            args.world_seed = int(run_config["world_seed"])
    if args.descriptor == "auto":
        args.descriptor = ("synthetic" if args.world == "synthetic" else
                           "mobilefacenet" if args.descriptor_ckpt else "dlib")
    require(args.descriptor != "synthetic" or args.world == "synthetic",
            "--descriptor synthetic reads synthetic faces only; real photos need mobilefacenet or dlib")
    meta, sets, identity, files = read_probes(args.run, args.match_set)
    out = Path(args.out) if args.out else Path(args.run) / "retrieval"
    out.mkdir(parents=True, exist_ok=True)
    print(f"preset: {preset} ({why}); device: {common.describe_device(device)}; output: {out}")
    common.print_config(args)
    common.write_json(out / "config.json", {**args.__dict__, "preset": preset, "preset_reason": why})

    # Data: the probes, and the gallery s' u {x'}
    size = sets[args.match_set].shape[-1]
    distractors, distractor_identity, source = load_distractors(args, identity, size)
    print(f"probes: {len(identity)} identities, sets {', '.join(sets)} ({meta})")
    print(f"distractors: {source}; gallery size {len(distractors) + 1:,}")

    # The descriptor: an independent face network, never the f of the run, never in a loss
    common.seed_everything(args.seed)
    desc, desc_name, desc_metrics = load_descriptor(args, run_config, device)
    print(f"descriptor: {desc_name}")
    code = {name: face_nets.embed(desc, images, args.batch, device) for name, images in sets.items()}
    code_s = distractor_codes(desc, distractors, source, args, device)
    counts = np.unique(distractor_identity, return_counts=True)[1] if distractor_identity is not None else []
    if len(counts) >= 2 and counts.max() >= 2:
        # real photos: the descriptor's own verification (LFW's 10-fold protocol) on the distractors, at the
        # probes' resolution, so that a wrong crop or a foreign checkpoint shows before any table is read
        desc_metrics = {**desc_metrics, "distractor_verification": face_nets.verification_accuracy(
            code_s, distractor_identity, n_pairs=min(3000, len(code_s)), seed=args.seed)}
        v = desc_metrics["distractor_verification"]
        print(f"descriptor check: verification {100 * v['accuracy']:.2f}% (± {100 * v['accuracy_std']:.2f}, "
              f"{v['folds']} folds, {v['pairs']} pairs of distractor photos at {size} px)")

    # Ranks of x' for every probe set, and a random-probe row: each identity probed with another identity's photo
    gallery = len(distractors) + 1
    dev_s = code_s.to(device)
    ranks = {name: retrieval_ranks(c.to(device), code[args.match_set], dev_s)
             for name, c in code.items() if name != args.match_set}
    chance_set = PHOTO_SET if PHOTO_SET in code else next(n for n in code if n != args.match_set)
    perm = np.random.default_rng(args.seed).permutation(len(identity))
    other = np.empty_like(perm)
    other[perm] = np.roll(perm, 1)  # a derangement: nobody is probed with their own image
    ranks["random_probe"] = retrieval_ranks(code[chance_set][other].to(device), code[args.match_set], dev_s)
    stats = {name: rank_stats(r, gallery) for name, r in ranks.items()}

    # Outputs: ranks.csv, table.md, metrics.json
    wall = time.time() - t0
    header = ["file", "identity", *ranks]
    common.atomic_write(out / "ranks.csv", lambda tmp: Path(tmp).write_text(
        "\n".join([",".join(header)] + [",".join([files[i], identity[i], *(str(int(r[i])) for r in ranks.values())])
                                         for i in range(len(identity))]) + "\n"))
    table = results_table(stats, gallery, chance_set, desc_name, source)
    (out / "table.md").write_text(table + "\n")
    common.write_json(out / "metrics.json", {
        "script": "eval_retrieval", "preset": preset, "run": str(args.run), "gallery_size": gallery,
        "distractors": len(distractors), "distractor_source": source, "descriptor": desc_name,
        "descriptor_check": desc_metrics, "random_probe": f"another identity's {chance_set}",
        "device": common.describe_device(device), "wall_time_s": round(wall, 1), "sets": stats})
    print(table)
    print(f"wall time {wall / 60:.1f} min; output {out}")
    return 0


def results_table(stats: dict, gallery: int, chance_set: str, desc_name: str, source: str) -> str:
    """TOS Table 1's emoji columns beside ours (median rank), then every probe set in full."""
    def med(name):
        if name not in stats:
            return ""
        v = stats[name]["median_rank"]
        return f"{v:,.0f}" if v == int(v) else f"{v:,.1f}"

    def paper(v):
        return "NA" if v is None else f"{v:,}"

    lines = [f"Median rank of x' in a gallery of {gallery:,} faces (the paper's: 100,001). Descriptor: {desc_name}. "
             f"Distractors: {source}.", "",
             "| method | G(x) | e(..(x)) | engine(..(x)) | paper G(x) | paper e(..(x)) |", "|---|---|---|---|---|---|"]
    for label, g, e, engine, p_g, p_e in TABLE_ROWS:
        if any(s in stats for s in (g, e, engine) if s):
            lines.append(f"| {label} | {med(g) if g else 'NA'} | {med(e) if e else 'NA'} | {med(engine)} | "
                         f"{paper(p_g)} | {paper(p_e)} |")
    lines.append(f"| random probe (another identity's {chance_set}) | | | {med('random_probe')} | | |")
    if PHOTO_SET in stats:
        lines.append(f"| the photo x itself (reference) | | | {med(PHOTO_SET)} | | |")
    lines += ["", "| probe set | median rank | its 95% bootstrap interval | mean rank | rank-1 | rank-5 | probes |",
              "|---|---|---|---|---|---|---|"]
    for name, s in stats.items():
        lo, hi = s["median_rank_ci95"]
        lines.append(f"| {name} | {med(name)} | {lo:,.0f}-{hi:,.0f} | {s['mean_rank']:,.1f} | "
                     f"{100 * s['rank1']:.1f}% | {100 * s['rank5']:.1f}% | {s['probes']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    common.run_main(main, "eval_retrieval.py")
