"""eval_retrieval.py: the ranking against brute force, the statistics, and runs on small probe folders."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import eval_retrieval as er
from worlds import face_nets, faces


def brute_force_ranks(probe, match, distractors):
    """1 + the distractors at least as similar as the match, one probe and one distractor at a time."""
    ranks = []
    for p, m in zip(probe.tolist(), match.tolist()):
        true = sum(a * b for a, b in zip(p, m))
        ranks.append(1 + sum(sum(a * b for a, b in zip(p, d)) >= true for d in distractors.tolist()))
    return ranks


def test_ranks_match_brute_force_with_ties_and_chunks():
    g = torch.Generator().manual_seed(0)
    # small integers: every dot product is exact, so the many ties are real ties
    probe = torch.randint(-2, 3, (40, 4), generator=g).float()
    match = torch.randint(-2, 3, (40, 4), generator=g).float()
    distractors = torch.randint(-2, 3, (301, 4), generator=g).float()
    distractors[:5] = match[0]  # five exact copies of one match: they count against its probe
    ranks = er.retrieval_ranks(probe, match, distractors, chunk=37)
    assert ranks.tolist() == brute_force_ranks(probe, match, distractors)
    assert ranks[0] >= 6


def test_identical_probe_ranks_first_and_a_collapsed_descriptor_ranks_last():
    code = torch.nn.functional.normalize(torch.randn(50, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    distractors = torch.nn.functional.normalize(torch.randn(1000, 16), dim=1)
    assert er.retrieval_ranks(code, code, distractors).tolist() == [1] * 50
    same = torch.ones(50, 16)
    assert er.retrieval_ranks(same, same, torch.ones(1000, 16)).tolist() == [1001] * 50


def test_a_shuffled_probe_set_ranks_near_the_middle_of_the_gallery():
    g = torch.Generator().manual_seed(2)
    match = torch.nn.functional.normalize(torch.randn(400, 8, generator=g), dim=1)
    distractors = torch.nn.functional.normalize(torch.randn(999, 8, generator=g), dim=1)
    probe = match + 0.1 * torch.randn(400, 8, generator=g)  # each probe close to its own x'
    assert er.rank_stats(er.retrieval_ranks(probe, match, distractors), 1000)["median_rank"] < 20
    shuffled = probe[torch.roll(torch.arange(400), 1)]  # every identity probed with another one's image
    median = er.rank_stats(er.retrieval_ranks(shuffled, match, distractors), 1000)["median_rank"]
    assert 400 < median < 600, median  # (gallery size) / 2 = 500


def test_rank_stats_median_of_an_even_count_and_the_accuracies():
    s = er.rank_stats([1, 2, 3, 10], gallery_size=11)
    assert s["median_rank"] == 2.5  # torch.median would say 2
    assert s["mean_rank"] == 4.0 and s["rank1"] == 0.25 and s["rank5"] == 0.75 and s["gallery_size"] == 11
    lo, hi = s["median_rank_ci95"]
    assert 1 <= lo <= 2.5 <= hi <= 10 and lo < hi


def write_probes(root: Path, sets: dict, identity: list, config: dict | None = None):
    rows = ["set,file,identity"]
    for name, images in sets.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k, (img, ident) in enumerate(zip(images, identity)):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / name / f"{k}.png")
            rows.append(f"{name},{name}/{k}.png,{ident}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AVATAR_REPRO_CACHE", str(tmp_path / "cache"))  # tiny nets and renders stay out of the user's
    return tmp_path / "cache"


def test_dry_run_on_a_synthetic_probe_folder(run, run_fast, tmp_path, cache):
    ids = faces.split_identity_indices("eval", 6)
    images, _ = faces.render_faces(ids, 2, 64, workers=1, progress=False)
    x, x2 = images[0::2], images[1::2]
    write_probes(tmp_path / "mine", {"photo_x": x, "photo_x2": x2, "copy_of_x2": x2, "tos_engine": x.flip(3)},
                 [str(i) for i in ids])
    r = run("eval_retrieval.py", "--run", str(tmp_path / "mine"), "--dry-run", "--distractors", "20")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "mine" / "retrieval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["gallery_size"] == 21 and metrics["distractors"] == 20
    assert metrics["sets"]["copy_of_x2"]["median_rank"] == 1 and metrics["sets"]["copy_of_x2"]["rank1"] == 1
    assert set(metrics["sets"]) == {"photo_x", "copy_of_x2", "tos_engine", "random_probe"}
    assert "| TOS | NA | NA |" not in (out / "table.md").read_text()
    assert "| TOS |  |  |" in (out / "table.md").read_text() and "16,311" not in (out / "table.md").read_text()
    lines = (out / "ranks.csv").read_text().splitlines()
    assert lines[0] == "file,identity,photo_x,copy_of_x2,tos_engine,random_probe" and len(lines) == 7
    # a second table reads the distractors' codes from the cache, and ranks exactly as the first
    again = run_fast("eval_retrieval.py", "--run", str(tmp_path / "mine"), "--dry-run", "--distractors", "20",
                "--out", str(tmp_path / "again"))
    assert again.returncode == 0 and "distractor codes: read from" in again.stdout, again.stderr
    assert (tmp_path / "again" / "ranks.csv").read_text() == (out / "ranks.csv").read_text()


def test_a_face_folder_excludes_the_probe_identities_and_warns_about_dlib(run_fast, tmp_path, cache):
    folder = tmp_path / "faces"
    images, _ = faces.render_faces(faces.split_identity_indices("val", 5), 2, 150, workers=1, progress=False)
    for k, img in enumerate(images):
        (folder / f"person{k // 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"person{k // 2}" / f"{k}.png")
    small = faces.resize_images(faces.to_float_images(images), 64).add(1).mul(127.5).round().byte()
    # identities 0 and 1 of the folder are probed; identities 2, 3 and 4 (6 photos) are the distractors
    # tos_emoji writes faces "synthetic" beside a --faces-dir, which wins
    write_probes(tmp_path / "run", {"photo_x": small[[0, 2]], "photo_x2": small[[1, 3]]}, ["0", "1"],
                 {"faces": "synthetic", "faces_dir": str(folder)})
    r = run_fast("eval_retrieval.py", "--run", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert "warning: the run's f was dlib's network" in r.stdout
    metrics = json.loads((tmp_path / "run" / "retrieval" / "metrics.json").read_text())
    assert metrics["gallery_size"] == 7 and "dlib" in metrics["descriptor"]
    check = metrics["descriptor_check"]["distractor_verification"]  # the descriptor's own check, on s'
    assert check["pairs"] == 12 and 0 <= check["accuracy"] <= 1


def test_bad_input_is_one_line(run_fast, tmp_path):
    for args, message in [
        ([], "--run DIR is required"),
        (["--run", str(tmp_path)], "no probes/metadata.csv or metadata.csv"),
        (["--run", str(tmp_path), "--descriptor", "mobilefacenet"], "needs --descriptor-ckpt"),
        (["--run", str(tmp_path), "--distractors", "0"], "--distractors must be at least 1"),
    ]:
        r = run_fast("eval_retrieval.py", *args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    (tmp_path / "metadata.csv").write_text("set,file,identity\nphoto_x,a.png,1\n")
    r = run_fast("eval_retrieval.py", "--run", str(tmp_path))
    assert r.returncode == 2 and "no set 'photo_x2'" in r.stderr
    assert not (tmp_path / "retrieval").exists()


def test_a_missing_identity_or_an_unreadable_image_is_one_line(run_fast, tmp_path):
    img = torch.zeros(3, 3, 16, 16, dtype=torch.uint8)
    write_probes(tmp_path / "gap", {"photo_x2": img, "tos_engine": img}, ["7", "8", "9"])
    meta = tmp_path / "gap" / "metadata.csv"
    meta.write_text("\n".join(row for row in meta.read_text().splitlines() if row != "tos_engine,tos_engine/1.png,8"))
    write_probes(tmp_path / "broken", {"photo_x2": img, "tos_engine": img}, ["7", "8", "9"])
    (tmp_path / "broken" / "tos_engine" / "2.png").write_bytes(b"not a png")
    for folder, message in [("gap", "set tos_engine does not list the identities of photo_x2"),
                            ("broken", "cannot read " + str(tmp_path / "broken" / "tos_engine" / "2.png"))]:
        r = run_fast("eval_retrieval.py", "--run", str(tmp_path / folder))
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / folder / "retrieval").exists()


def test_mobilefacenet_shapes_checkpoint_and_crop(tmp_path):
    net = face_nets.MobileFaceNet().eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 112, 96)).shape == (2, 128)
    torch.save({"epoch": 1, "net_state_dict": net.state_dict()}, tmp_path / "mfn.ckpt")
    again = face_nets.load_mobilefacenet(str(tmp_path / "mfn.ckpt"))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    torch.save({"net_state_dict": {"conv1.conv.weight": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    with pytest.raises(SystemExit):
        face_nets.load_mobilefacenet(str(tmp_path / "bad.ckpt"))
    # a bright dot on the chip's left eye lands on the SphereFace template's left eye (within 2 crop pixels;
    # the similarity fits the five points with a residual of about 1.5 crop pixels)
    chip = -torch.ones(1, 3, 150, 150)
    ex, ey = ((face_nets.DLIB_CHIP_POINTS[0] + 0.25) / 1.5 * 150).long().tolist()
    chip[:, :, ey - 2:ey + 3, ex - 2:ex + 3] = 1
    crop = face_nets.mobilefacenet_input(chip)
    assert crop.shape == (1, 3, 112, 96)
    w = (crop[0, 0] + 1 - 0.1).clamp(min=0)  # the dot's brightness, 0 on the background (-0.996 after scaling)
    y = float((w.sum(1) * torch.arange(112)).sum() / w.sum())
    x = float((w.sum(0) * torch.arange(96)).sum() / w.sum())
    tx, ty = (face_nets.SPHEREFACE_POINTS[0] - 1).tolist()
    assert abs(x - tx) <= 2 and abs(y - ty) <= 2, (x, y, tx, ty)
