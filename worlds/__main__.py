"""`python -m worlds COMMAND`: measurements of the face world and the face networks (the world's sheet, render speed,
the verification accuracy of both f's); each prints its numbers, and --json writes them."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common import OneLineParser, atomic_write, describe_device, pick_device, write_json
from worlds.face_nets import (DLIB_DISTANCE_THRESHOLD, DLIB_INPUT_SIZE, FaceNetConfig, dlib_model_path, embed,
                              load_dlib_face_net, load_face_net, verification_accuracy)
from worlds.faces import load_face_folder, render_photo, render_sheet, sample_identity, sample_nuisance

def make_parser() -> OneLineParser:
    """The commands and their flags."""
    parser = OneLineParser(prog="python -m worlds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("face-sheet", help="save a sheet of identities (rows) x nuisances (columns)")
    p.add_argument("--out", default="docs/face_world.png")
    p.add_argument("--identities", type=int, default=8)
    p.add_argument("--nuisances", type=int, default=6)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0, help="world seed")
    p = sub.add_parser("face-bench", help="photos per second of render_photo on one core")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("face-f", help="train (or read from the cache) the synthetic f; report its verification")
    for field in dataclasses.fields(FaceNetConfig):
        p.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default="", help="also write the metrics here")
    p = sub.add_parser("dlib-check", help="the dlib port against dlib, and its verification accuracy, on real chips")
    p.add_argument("--faces-dir", required=True, help="aligned 150x150 chips (e.g. ../shared/data/celeba_aligned_150)")
    p.add_argument("--compare", type=int, default=100, help="chips on which to compare with dlib (needs dlib-bin)")
    p.add_argument("--pairs", type=int, default=3000, help="same and different pairs for verification")
    p.add_argument("--json", default="", help="also write the numbers here")
    return parser


def face_sheet(args):
    """A sheet of identities (rows) x nuisances (columns)."""
    sheet = render_sheet(args.seed, args.identities, args.nuisances, args.size)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: Image.fromarray(sheet).save(tmp, format="PNG"))
    print(f"wrote {args.out}: {args.identities} identities x {args.nuisances} nuisances at {args.size} px")


def face_bench(args):
    """Photos per second of render_photo on one core."""
    torch.set_num_threads(1)
    rates = []
    for r in range(args.repeats):
        jobs = [(sample_identity(0, r * args.n + i), sample_nuisance(0, r * args.n + i, 0)) for i in range(args.n)]
        t = time.perf_counter()
        for identity, nuisance in jobs:
            render_photo(identity, nuisance, args.size)
        rates.append(args.n / (time.perf_counter() - t))
    print(f"render_photo at {args.size} px on one core: {np.median(rates):.0f} images/s (median of "
          f"{args.repeats} runs of {args.n}: {', '.join(f'{v:.0f}' for v in rates)})")


def face_f(args):
    """Train (or read from the cache) the synthetic f; report its verification accuracy."""
    device = pick_device(args.device)
    cfg = FaceNetConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FaceNetConfig)})
    _, metrics = load_face_net(cfg, device, args.cache_dir)
    print(f"synthetic f ({cfg.arch}): verification accuracy {100 * metrics['accuracy']:.2f}% "
          f"(± {100 * metrics['accuracy_std']:.2f}, {metrics['folds']} folds) on {metrics['pairs']} pairs of "
          f"{metrics['held_out']}; trained in {metrics['train_seconds']} s")
    if args.json:
        write_json(args.json, {"config": dataclasses.asdict(cfg), **metrics, "device": describe_device(device)})


def dlib_check(args):
    """The dlib port against dlib itself, and its verification accuracy, on real chips."""
    torch.set_num_threads(os.cpu_count() or 1)
    data = load_face_folder(args.faces_dir, DLIB_INPUT_SIZE)
    net = load_dlib_face_net()
    t = time.perf_counter()
    code = embed(net, data["images"], batch=64)
    out = {"faces": data["source"], "port_ms_per_chip": round(1000 * (time.perf_counter() - t) / len(code), 2)}
    print(f"dlib port: {out['port_ms_per_chip']} ms per chip (batch 64, {torch.get_num_threads()} threads)")
    out["verification_at_0.6"] = verification_accuracy(code, data["identity"].numpy(), args.pairs,
                                                      threshold=DLIB_DISTANCE_THRESHOLD)
    out["verification_10fold"] = verification_accuracy(code, data["identity"].numpy(), args.pairs)
    v = out["verification_at_0.6"]
    print(f"dlib port on {data['source']}: verification accuracy at dlib's 0.6 threshold "
          f"{100 * v['accuracy']:.2f}% (TPR {v['tpr']:.3f}, TNR {v['tnr']:.3f}, {v['pairs']} pairs); "
          f"LFW-style 10-fold {100 * out['verification_10fold']['accuracy']:.2f}%")
    try:
        import dlib
    except ImportError:
        print("dlib is not installed (pip install dlib-bin): no comparison with dlib's own descriptors")
    else:
        model = dlib.face_recognition_model_v1(str(dlib_model_path()))
        k = min(args.compare, len(code))
        chips = [np.ascontiguousarray(c) for c in data["images"][:k].permute(0, 2, 3, 1).numpy()]
        t = time.perf_counter()
        ref = torch.tensor(np.array([np.array(d) for d in model.compute_face_descriptor(chips)]),
                           dtype=torch.float32)
        dlib_ms = 1000 * (time.perf_counter() - t) / k
        cos = F.cosine_similarity(code[:k], ref, dim=1)
        out["dlib_cosine"] = {"chips": k, "min": float(cos.min()), "mean": float(cos.mean()),
                              "max_abs_diff": float((code[:k] - ref).abs().max()), "dlib": dlib.__version__,
                              "dlib_ms_per_chip": round(dlib_ms, 1)}
        print(f"against dlib {dlib.__version__} on {k} chips: cosine min {cos.min():.6f}, mean {cos.mean():.6f}, "
              f"max |difference| {out['dlib_cosine']['max_abs_diff']:.2e}; dlib took {dlib_ms:.0f} ms per chip")
    if args.json:
        write_json(args.json, out)


def main(argv=None):
    args = make_parser().parse_args(argv)
    t0 = time.time()
    {"face-sheet": face_sheet, "face-bench": face_bench, "face-f": face_f, "dlib-check": dlib_check}[args.command](args)
    print(f"({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
