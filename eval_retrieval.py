"""Identifiability by retrieval: DTN Table 4 (dtn_iclr2017.txt §5.2) and TOS Table 1 (tos_iccv2017.txt §4.2; the
journal's Table 5).

"For each image x in our manually annotated set, we create a gallery s' u x', where x' is the other image of the
person in x. We then perform retrieval using the VGG face descriptor using either the manually created emoji or G(x)
as probe." (DTN §5.2.) "The VGG network is used in order to avoid a bias that might be caused by using f both for
training ... and for evaluation": the descriptor here is never the f that trained the avatars, and never in a loss.

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
    synthetic world  s' = photos of the world's ``distractors`` split, rendered and embedded once, then cached; the
                     descriptor is a plain CNN (not f's ResNet) trained here once on the ``descriptor`` split
    real photos      s' = the face folder's (or CelebA's) photos of non-evaluation identities; the descriptor is
                     face_nets.MobileFaceNet (--descriptor-ckpt) or dlib's network (a warning if it was the run's f)

Deviations from the papers (the README repeats them):
  * The descriptor is not VGG-Face, whose weights cannot be downloaded here: a plain CNN trained on the synthetic
    world's descriptor split (synthetic), or MobileFaceNet / dlib (real photos).
  * The synthetic world's distractors are rendered photos of that world, not 100,000 random real faces. A face
    folder's distractors are its other photos, which the GAN may have seen in s: 6,000 photos cannot hold both apart.
  * Every image is at the probes' resolution (64 px in tos_emoji), resized to the descriptor's input.
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
from worlds import face_nets, faces

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
    descriptor_ckpt: str = ""
    """a MobileFaceNet checkpoint (a torch pickle with net_state_dict, 112x96 input): the independent descriptor
    for real photos"""
    batch: int = 512
    """images per forward pass of the descriptor"""

    # Ours: deviations from the papers (docstring, README)
    descriptor: str = "auto"
    """ours: the papers use VGG-Face (not available here). synthetic (a plain CNN trained here on the world's
    descriptor split), mobilefacenet (--descriptor-ckpt), dlib, or auto (synthetic for the synthetic world,
    mobilefacenet with --descriptor-ckpt, else dlib)"""
    descriptor_identities: int = 1000
    """ours: the papers' VGG-Face came trained. Identities of the descriptor split that train the synthetic
    descriptor (16 photos each)"""
    descriptor_steps: int = 1500
    """ours: the papers' VGG-Face came trained. Training steps of the synthetic descriptor (ArcFace, batch 128,
    SGD with a one-cycle schedule)"""
    descriptor_style_aug: float = 0.0
    """ours: the papers' VGG-Face came trained. Probability of face_nets.style_augment when training the synthetic
    descriptor (0: flips only, as VGG-Face was trained on ordinary photos)"""


PRESETS = {"paper": {}, "quick": dict(descriptor_steps=600)}
DRY_RUN = dict(distractors=64, descriptor_identities=32, descriptor_steps=2)
PHOTO_SET = "photo_x"  # the photo x itself: the descriptor's own photo-to-photo retrieval, a reference row


def validate(args: Args):
    require(args.run, "--run DIR is required: a tos_emoji or crossmodal_avatar run, or a folder with metadata.csv")
    require(args.world in ("auto", "synthetic", "folder", "celeba"),
            "--world must be auto, synthetic, folder or celeba")
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


def run_faces(run_config: dict) -> str:
    """Where a run's test photos came from: synthetic, celeba or folder (--faces-dir wins, as in tos_emoji). A
    crossmodal_avatar run (it has --pairs-file) writes probes of the synthetic world's test identities only."""
    if "pairs_file" in run_config:
        return "synthetic"
    return "folder" if run_config.get("faces_dir") else run_config.get("faces", "synthetic")


def resolve_auto(args: Args, given: set) -> dict:
    """Fill --world, --faces-dir, --world-seed and --descriptor from the run's config.json (a tos_emoji run says
    where its faces came from); returns that config ({} without one)."""
    run_config = {}
    if (Path(args.run) / "config.json").is_file():
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
    return run_config


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


def probe_ranks(code: dict[str, torch.Tensor], code_s: torch.Tensor, args: Args,
                device: torch.device) -> tuple[dict[str, torch.Tensor], str]:
    """The ranks of x' for every probe set, and a random-probe row: each identity probed with another identity's
    photo (x itself when the run has it), which shows what chance is in this gallery. Returns (ranks, that set)."""
    match, dev_s = code[args.match_set], code_s.to(device)
    ranks = {name: retrieval_ranks(c.to(device), match, dev_s) for name, c in code.items() if name != args.match_set}
    chance_set = PHOTO_SET if PHOTO_SET in code else next(n for n in code if n != args.match_set)
    perm = np.random.default_rng(args.seed).permutation(len(match))
    other = np.empty_like(perm)
    other[perm] = np.roll(perm, 1)  # a derangement: nobody is probed with their own image
    ranks["random_probe"] = retrieval_ranks(code[chance_set][other].to(device), match, dev_s)
    return ranks, chance_set


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
        net = face_nets.load_mobilefacenet(args.descriptor_ckpt)
        return (Descriptor(net, face_nets.mobilefacenet_input).to(device),
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
        return face_nets.embed(desc, distractors, args.batch, device, desc="embed the distractors")
    key = hashlib.sha1(f"{source} {len(distractors)} {tuple(distractors.shape)}".encode())
    for v in desc.state_dict().values():
        key.update(v.detach().cpu().contiguous().numpy().tobytes())
    path = faces.cache_dir() / f"retrieval_codes_{key.hexdigest()[:12]}.pt"
    if path.is_file():
        print(f"distractor codes: read from {path}")
        return torch.load(path, weights_only=True)
    code = face_nets.embed(desc, distractors, args.batch, device, desc="embed the distractors once (then cached)")
    common.atomic_write(path, lambda tmp: torch.save(code, tmp))
    return code


def distractor_check(code_s: torch.Tensor, identity: np.ndarray | None, size: int, seed: int) -> dict:
    """Real photos: the descriptor's own verification (LFW's 10-fold protocol) on the distractors, at the probes'
    resolution, so that a wrong crop or a foreign checkpoint shows before any table is read. {} when s' holds no
    two photos of one person (the synthetic world)."""
    counts = np.unique(identity, return_counts=True)[1] if identity is not None else []
    if not (len(counts) >= 2 and counts.max() >= 2):
        return {}
    v = face_nets.verification_accuracy(code_s, identity, n_pairs=min(3000, len(code_s)), seed=seed)
    print(f"descriptor check: verification {100 * v['accuracy']:.2f}% (± {100 * v['accuracy_std']:.2f}, "
          f"{v['folds']} folds, {v['pairs']} pairs of distractor photos at {size} px)")
    return {"distractor_verification": v}


# ======================================================================================================================
# The run: probes, gallery, ranks; then ranks.csv and the table
# ======================================================================================================================


def main(argv=None):
    t0 = time.time()
    args, preset, why, given = common.parse_args(Args, PRESETS, common.auto_preset, argv, description=__doc__)
    if args.dry_run:
        args = dataclasses.replace(args, **{k: v for k, v in DRY_RUN.items() if k not in given})
    validate(args)
    device = common.pick_device(args.device)
    run_config = resolve_auto(args, given)
    meta, sets, identity, files = read_probes(args.run, args.match_set)
    out = Path(args.out) if args.out else Path(args.run) / "retrieval"
    out.mkdir(parents=True, exist_ok=True)
    print(f"preset: {preset} ({why}); device: {common.describe_device(device)}; output: {out}")
    common.print_config(args)
    common.write_json(out / "config.json", {**args.__dict__, "preset": preset, "preset_reason": why})

    # Data: the probes, and the gallery s' u {x'}
    size = sets[args.match_set].shape[-1]
    distractors, distractor_identity, source = load_distractors(args, identity, size)
    gallery = len(distractors) + 1
    print(f"probes: {len(identity)} identities, sets {', '.join(sets)} ({meta})")
    print(f"distractors: {source}; gallery size {gallery:,}")

    # The descriptor: an independent face network, never the f of the run, never in a loss
    common.seed_everything(args.seed)
    desc, desc_name, desc_metrics = load_descriptor(args, run_config, device)
    print(f"descriptor: {desc_name}")
    code = {name: face_nets.embed(desc, images, args.batch, device) for name, images in sets.items()}
    code_s = distractor_codes(desc, distractors, source, args, device)
    desc_metrics = {**desc_metrics, **distractor_check(code_s, distractor_identity, size, args.seed)}

    # Ranks of x' for every probe set and the random probe, and their statistics
    ranks, chance_set = probe_ranks(code, code_s, args, device)
    stats = {name: rank_stats(r, gallery) for name, r in ranks.items()}

    # Outputs: ranks.csv, table.md, metrics.json
    wall = time.time() - t0
    write_ranks(out / "ranks.csv", files, identity, ranks)
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


def write_ranks(path: Path, files: list[str], identity: list[str], ranks: dict[str, torch.Tensor]):
    """One line per identity: its x' file, its identity, and its rank in every probe set."""
    lines = [",".join(["file", "identity", *ranks])]
    lines += [",".join([files[i], identity[i], *(str(int(r[i])) for r in ranks.values())])
              for i in range(len(identity))]
    common.atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


# The rows of TOS Table 1 (emoji columns; DTN Table 4 is its Manual and DTN G(x) cells): label, the probe sets of
# the G(x), e(..(x)) and engine columns, and the paper's median ranks out of 100,001 (None: "NA").
TABLE_ROWS = [
    ("Manual (the ground-truth emoji, exact)", None, None, "manual", None, 16311),
    ("DANN", None, "dann_e_c_G", "dann_engine", None, 59625),
    ("DTN (e(c-bar(..)) for its configuration)", "dtn_G", "dtn_e_c_G", "dtn_engine", 16, 18079),
    ("TOS", "tos_G", "tos_e_c_G", "tos_engine", 30, 3519),
    ("TOS fixed c-bar", "tos_fixed_cbar_G", "tos_fixed_cbar_e_c_G", "tos_fixed_cbar_engine", 26, 14990),
]


def median_cell(stats: dict, name: str | None) -> str:
    """A set's median rank for the table: "NA" for a column the method has not, "" for a set the run has not."""
    if name is None:
        return "NA"
    if name not in stats:
        return ""
    v = stats[name]["median_rank"]
    return f"{v:,.0f}" if v == int(v) else f"{v:,.1f}"


def results_table(stats: dict, gallery: int, chance_set: str, desc_name: str, source: str) -> str:
    """TOS Table 1's emoji columns beside ours (median rank), then every probe set in full."""
    lines = [f"Median rank of x' in a gallery of {gallery:,} faces (the paper's: 100,001). Descriptor: {desc_name}. "
             f"Distractors: {source}.", "",
             "| method | G(x) | e(..(x)) | engine(..(x)) | paper G(x) | paper e(..(x)) |", "|---|---|---|---|---|---|"]
    for label, g, e, engine, p_g, p_e in TABLE_ROWS:
        if any(s in stats for s in (g, e, engine) if s):
            paper_g, paper_e = ("NA" if p is None else f"{p:,}" for p in (p_g, p_e))
            lines.append(f"| {label} | {median_cell(stats, g)} | {median_cell(stats, e)} | "
                         f"{median_cell(stats, engine)} | {paper_g} | {paper_e} |")
    lines.append(f"| random probe (another identity's {chance_set}) | | | {median_cell(stats, 'random_probe')} | | |")
    if PHOTO_SET in stats:
        lines.append(f"| the photo x itself (reference) | | | {median_cell(stats, PHOTO_SET)} | | |")
    lines += ["", "| probe set | median rank | its 95% bootstrap interval | mean rank | rank-1 | rank-5 | probes |",
              "|---|---|---|---|---|---|---|"]
    for name, s in stats.items():
        lo, hi = s["median_rank_ci95"]
        lines.append(f"| {name} | {median_cell(stats, name)} | {lo:,.0f}-{hi:,.0f} | {s['mean_rank']:,.1f} | "
                     f"{100 * s['rank1']:.1f}% | {100 * s['rank5']:.1f}% | {s['probes']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    common.run_main(main, "eval_retrieval.py")
