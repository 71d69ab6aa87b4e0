"""crossmodal_avatar.py: each loss term of Eq. 2-6 against hand values, the ablation flags, frozen networks, the hair
bank, and dry runs of the script (stopped and resumed), of --table 3 / fig8 with --ae-from, and of --apply."""
import json
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

import crossmodal_avatar as cm
import common
import worlds.vector_avatar as va
from worlds import faces


def tiny_args(**kw):
    return cm.Args(latent=4, mlp_hidden=3, f_epochs=3, batch_f=4, **kw)


# ---------------------------------------------------------------------------------------------------------------------
# Losses (Eq. 2-6) against hand values
# ---------------------------------------------------------------------------------------------------------------------


def test_image_and_parameter_reconstruction_losses_by_hand():
    x = torch.tensor([[0.0, 1.0], [-1.0, 0.5]])
    r = torch.tensor([[0.5, 1.0], [1.0, 0.0]])
    assert cm.image_rec_loss(x, r).item() == pytest.approx((0.5 + 0 + 2 + 0.5) / 4)          # Eq. 2, L1
    assert cm.param_rec_loss(x, r).item() == pytest.approx((0.25 + 0 + 4 + 0.25) / 4)        # Eq. 1, MSE
    v = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0, 0.0], [3.0, 3.0]])]
    w = [torch.tensor([1.0, 0.0]), torch.tensor([[1.0, 0.0], [3.0, 1.0]])]
    # Eq. 3: (1/K) sum_k mean ||V^k - W^k||^2 = ((0 + 4) / 2 + (1 + 0 + 0 + 4) / 4) / 2
    assert cm.perceptual_loss(v, w).item() == pytest.approx((2.0 + 1.25) / 2)


def test_cross_modal_loss_eq4_by_hand():
    z_m = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    z_t = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    mse = (1 + 1 + 1 + 1) / 4                     # (z_m - z_t)^2, mean over entries
    one_minus_cos = ((1 - 0.0) + (1 - 1.0)) / 2    # orthogonal, then parallel
    assert cm.cross_modal_loss(z_m, z_t, 1.0, 1.0).item() == pytest.approx(mse + one_minus_cos)
    assert cm.cross_modal_loss(z_m, z_t, 0.3, 2.0).item() == pytest.approx(0.3 * mse + 2.0 * one_minus_cos)
    assert cm.cross_modal_loss(z_m, z_t, 0.0, 1.0).item() == pytest.approx(one_minus_cos)


def test_weight_alignment_loss_eq5_compares_the_last_layers():
    F_net, E_t = cm.mlp(4, 3, 2), cm.mlp(5, 3, 2)     # different first layers; last layers both 3 -> 2
    with torch.no_grad():
        for net, w, b in ((F_net, 1.0, 0.5), (E_t, 0.0, -0.5)):
            net[2].weight.fill_(w)
            net[2].bias.fill_(b)
            net[0].weight.normal_()                       # the first layers do not count
    assert cm.weight_alignment_loss(F_net, E_t).item() == pytest.approx(6 * 1.0 + 2 * 1.0)


def test_mapping_loss_eq6_is_the_weighted_sum_of_its_terms():
    torch.manual_seed(0)
    args = tiny_args()
    F_net, E_t, D_t = cm.make_F(args), cm.mlp(va.AVATAR_DIM, 3, 4), cm.mlp(4, 3, va.AVATAR_DIM, out="sigmoid")
    z_s, y = torch.randn(5, 4), torch.rand(5, va.AVATAR_DIM)
    w = cm.loss_weights(args)
    assert w == dict(r=1.0, c=1.0, w=10.0, l1=1.0, l2=0.1)       # §4.5's lambdas; lambda_1, lambda_2 ours
    parts = cm.mapping_loss(F_net, E_t, D_t, z_s, y, w)
    z_m = F_net(z_s)
    rec = ((D_t(z_m) - y) ** 2).mean()
    cm_term = ((z_m - E_t(y)) ** 2).mean() + 0.1 * (1 - nn.functional.cosine_similarity(z_m, E_t(y)).mean())
    lw = sum(((a - b) ** 2).sum() for a, b in ((F_net[2].weight, E_t[2].weight), (F_net[2].bias, E_t[2].bias)))
    assert parts["loss_rec"].item() == pytest.approx(rec.item(), rel=1e-6)
    assert parts["loss_cm"].item() == pytest.approx(cm_term.item(), rel=1e-6)
    assert parts["loss_w"].item() == pytest.approx(lw.item(), rel=1e-6)
    assert parts["loss"].item() == pytest.approx((rec + cm_term + 10 * lw).item(), rel=1e-6)


@pytest.mark.parametrize("ablation, removed", [("no_align", {"c", "w"}), ("no_mse", {"l1"}), ("no_cos", {"l2"}),
                                               ("no_weight", {"w"}), ("none", set())])
def test_each_ablation_removes_exactly_its_term(ablation, removed):
    full = cm.loss_weights(tiny_args())
    ablated = cm.loss_weights(tiny_args(ablation=ablation))
    assert {k for k in full if ablated[k] != full[k]} == removed
    assert all(ablated[k] == 0 for k in removed)
    torch.manual_seed(1)
    F_net, E_t, D_t = cm.make_F(tiny_args()), cm.mlp(va.AVATAR_DIM, 3, 4), cm.mlp(4, 3, va.AVATAR_DIM, "sigmoid")
    z_s, y = torch.randn(6, 4), torch.rand(6, va.AVATAR_DIM)
    a, b = cm.mapping_loss(F_net, E_t, D_t, z_s, y, full), cm.mapping_loss(F_net, E_t, D_t, z_s, y, ablated)
    z_m, z_t = F_net(z_s), E_t(y)
    dropped = {"c": a["loss_cm"], "w": 10 * a["loss_w"], "l1": ((z_m - z_t) ** 2).mean(),
               "l2": 0.1 * (1 - nn.functional.cosine_similarity(z_m, z_t).mean())}
    expected = a["loss"] - sum((dropped[k] for k in removed - ({"l1", "l2"} if "c" in removed else set())),
                               torch.zeros(()))
    assert b["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_training_F_leaves_the_frozen_networks_untouched():
    torch.manual_seed(2)
    args = tiny_args()
    nets = {"E_t": cm.freeze(cm.mlp(va.AVATAR_DIM, 3, 4)), "D_t": cm.freeze(cm.mlp(4, 3, va.AVATAR_DIM, "sigmoid"))}
    before = {k: {n: p.clone() for n, p in v.state_dict().items()} for k, v in nets.items()}
    z_s, y = torch.randn(16, 4), torch.rand(16, va.AVATAR_DIM)
    F_net, info = cm.train_mapping("F", args, nets, z_s, y, z_s[:4], y[:4], seed=0)
    for k, v in nets.items():
        assert all(torch.equal(p, before[k][n]) for n, p in v.state_dict().items()), k
        assert not any(p.requires_grad for p in v.parameters())
    assert len(info["history"]) == 3 and 1 <= info["best_epoch"] <= 3
    assert info["val_rec"] == min(r["val_rec"] for r in info["history"])   # the epoch kept is the best on val


def test_plan_shares_variants_and_subsets_keep_whole_identities():
    args = cm.Args()
    plan = cm.experiment_plan(args, ["1", "3", "fig8"], 9970)
    assert plan["table1"]["ours"] == ("F", "none", 3995) and plan["table1"]["baseline"][0] == "baseline"
    assert set(a for _, a, _ in plan["table3"].values()) == set(cm.ABLATIONS)
    assert {n for _, _, n in plan["table3"].values()} == {3995}
    assert [n for _, _, n in plan["fig8"].values()] == [9970, 3995, 1000, 500]
    pairs = {"identity": torch.arange(10).repeat_interleave(3)}
    order = va.pair_subset_order(pairs).numpy()
    first6 = pairs["identity"][order[:6]].numpy()
    assert len(set(first6)) == 2 and sorted(order) == list(range(30))


def test_hair_bank_returns_the_nearest_entry():
    n = len(faces.ATTRIBUTE_NAMES)
    bank_a = torch.zeros(3, n)
    bank_a[1, list(cm.HAIR_ATTRIBUTES)] = 1.0
    bank = {"attributes": bank_a[:, list(cm.HAIR_ATTRIBUTES)], "hair": [{"k": 0}, {"k": 1}, {"k": 2}]}
    q = torch.zeros(2, n)
    q[0, list(cm.HAIR_ATTRIBUTES)] = 0.9
    q[1, 0] = 5.0                      # face_width: not a hair attribute, so it does not move the search
    assert cm.hair_bank_lookup(q, bank) == [{"k": 1}, {"k": 0}]


# ---------------------------------------------------------------------------------------------------------------------
# The script: a dry run stopped and resumed, --table 3 and fig8 on its autoencoders, --apply, bad flags
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    from conftest import interrupted_dry_run
    res = interrupted_dry_run(tmp_path_factory, "crossmodal_avatar.py", 1)
    assert res.first.returncode == 130, res.first.stdout + res.first.stderr
    assert res.second.returncode == 0, res.second.stdout + res.second.stderr
    return types.SimpleNamespace(out=res.out, cache=res.cache, stdout=res.second.stdout)


def test_dry_run_writes_every_output(dry_run):
    out = dry_run.out
    for name in ("config.json", "metrics.json", "log.csv", "ckpt.pt", "model.pt", "grid.png", "res512.png",
                 "image_ae.png", "table.md", "probes/metadata.csv"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["avatar_dim"] == 629 and "perceptual_network" in metrics and "lpips" in metrics
    assert set(metrics["results"]["table1"]) == {"ours", "baseline"}
    svgs = list((out / "res512").glob("*.svg"))
    assert svgs and svgs[0].read_text().lstrip().startswith(("<svg", "<?xml"))
    sets = {line.split(",")[0] for line in (out / "probes/metadata.csv").read_text().splitlines()[1:]}
    assert sets == {"photo_x", "photo_x2", "gt_avatar", "ours", "baseline"}
    assert "resume: from phase" in dry_run.stdout


def test_stage2_never_moves_the_autoencoders(dry_run):
    ckpt = torch.load(dry_run.out / "ckpt.pt", weights_only=False)
    model = torch.load(dry_run.out / "model.pt", weights_only=False)
    for k in ("E_s", "D_t"):
        assert all(torch.equal(v, ckpt["nets"][k][n]) for n, v in model[k].items()), k


def test_table3_and_fig8_reuse_the_autoencoders(dry_run, run_fast, tmp_path, monkeypatch):
    monkeypatch.setenv("AVATAR_REPRO_CACHE", str(dry_run.cache))
    res = run_fast("crossmodal_avatar.py", "--dry-run", "--table", "3,fig8", "--ae-from", str(dry_run.out),
              "--out", str(tmp_path / "t3"))
    assert res.returncode == 0, res.stdout + res.stderr
    metrics = json.loads((tmp_path / "t3" / "metrics.json").read_text())
    assert set(metrics["results"]["table3"]) == set(cm.ABLATION_LABELS.values())
    assert len(metrics["results"]["fig8"]) == 2 and "reused" in metrics["autoencoders"]
    assert "Table 3" in (tmp_path / "t3" / "table.md").read_text()


def test_apply_writes_json_png_and_svg(dry_run, run_fast, tmp_path, monkeypatch):
    from PIL import Image
    monkeypatch.setenv("AVATAR_REPRO_CACHE", str(dry_run.cache))
    scene = Image.new("RGB", (300, 240), (128, 128, 128))   # one face in a larger photo: found, aligned, applied
    scene.paste(Image.fromarray(faces.render_photo(faces.sample_identity(0, 3), faces.canonical_nuisance(), 152)),
                (100, 50))
    scene.save(tmp_path / "me.png")
    res = run_fast("crossmodal_avatar.py", "--apply", str(tmp_path / "me.png"), "--ckpt", str(dry_run.out),
              "--apply-size", "96", "--out", str(tmp_path / "apply"))
    assert res.returncode == 0, res.stdout + res.stderr
    rec = json.loads((tmp_path / "apply" / "me.json").read_text())
    assert len(rec["avatar"]) == 629 and set(rec["groups"]) == set(va.GROUP_SLICES) and "hairstyle" in rec["hair"]
    assert Image.open(tmp_path / "apply" / "me.png").size == (96, 96)
    assert "<svg" in (tmp_path / "apply" / "me.svg").read_text()
    assert rec["box"] is not None and Image.open(tmp_path / "apply" / "me_overview.png").size[1] > 240


def test_apply_gives_each_face_its_avatar_and_names_a_photo_without_one(dry_run, run_fast, tmp_path, monkeypatch):
    from PIL import Image
    monkeypatch.setenv("AVATAR_REPRO_CACHE", str(dry_run.cache))
    two = Image.new("RGB", (520, 260), (128, 128, 128))
    for k, x in enumerate((20, 340)):
        two.paste(Image.fromarray(faces.render_photo(faces.sample_identity(0, k), faces.canonical_nuisance(), 152)),
                  (x, 50))
    two.save(tmp_path / "two.jpg")
    Image.new("RGB", (200, 120), (90, 90, 90)).save(tmp_path / "blank.png")
    res = run_fast("crossmodal_avatar.py", "--apply", f"{tmp_path / 'two.jpg'},{tmp_path / 'blank.png'}", "--ckpt",
                   str(dry_run.out), "--out", str(tmp_path / "apply"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{tmp_path / 'blank.png'}: no face found" in res.stdout
    boxes = [json.loads((tmp_path / "apply" / f"two_{k}.json").read_text())["box"] for k in (1, 2)]
    assert boxes[0][2] < 260 < boxes[1][0] and (tmp_path / "apply" / "two_overview.png").is_file()
    res = run_fast("crossmodal_avatar.py", "--apply", str(tmp_path / "blank.png"), "--ckpt", str(dry_run.out),
                   "--out", str(tmp_path / "none"))
    assert res.returncode == 2 and "no face" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, message", [
    (["--ablation", "no_everything"], "--ablation must be one of"),
    (["--table", "2"], "--table"),
    (["--es-widths", "8,8"], "--es-widths needs"),
    (["--apply", "x.png"], "--apply needs --ckpt"),
    (["--pairs-file", "/nonexistent.jsonl"], "--pairs-file: no file"),
])
def test_bad_flags_are_one_line_errors(run_fast, tmp_path, flags, message):
    res = run_fast("crossmodal_avatar.py", "--dry-run", "--out", str(tmp_path / "r"), *flags)
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "r").exists()


def test_pairs_file_is_read_and_split_and_bad_lines_are_named(tmp_path):
    from PIL import Image
    y = va.avatar_from_identity(faces.sample_identity(0, 3))
    lines = []
    for k in range(12):
        Image.fromarray(np.full((40, 40, 3), 10 * k, np.uint8)).save(tmp_path / f"p{k}.png")
        rec = {"photo": f"p{k}.png", "avatar": [float(v) for v in y]}
        if k == 11:
            rec["split"] = "test"
        lines.append(json.dumps(rec))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    sets = va.file_pairs(str(tmp_path / "pairs.jsonl"), 32)
    assert [len(sets[s]["y"]) for s in ("train", "val", "test")] == [10, 1, 1]
    assert sets["train"]["x"].shape == (10, 3, 32, 32) and sets["test"]["identity"].tolist() == [12]
    assert torch.allclose(sets["val"]["y"][0], torch.from_numpy(y))
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n" + json.dumps({"photo": "p1.png", "avatar": [0.5] * 3}) + "\n")
    with pytest.raises(common.UsageError) as err:
        va.file_pairs(str(tmp_path / "bad.jsonl"), 32)
    assert "line 2: 'avatar' must be 629 numbers" in err.value.message
