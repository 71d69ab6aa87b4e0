"""tos_emoji.py: the loss weights, the gradient reversal, a dry run of every method, resume with c-bar frozen, and
--apply on a generated photo."""
import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import common
import tos_emoji
from worlds import emoji
from conftest import interrupted_dry_run
from worlds import face_nets
from worlds import faces


def test_each_loss_term_appears_with_its_weight():
    terms = {"loss_c": 1.0, "loss_gan": 10.0, "loss_const": 100.0, "loss_tid": 1000.0, "loss_tv": 10000.0}
    losses = {k: torch.tensor(v) for k, v in terms.items()}
    args = SimpleNamespace(alpha=2.0, beta=3.0, gamma=5.0, delta=7.0, dtn_const=11.0, dtn_tid=13.0, dtn_tv=17.0)
    tos = tos_emoji.tos_generator_loss(args, losses)
    assert tos.item() == pytest.approx(1 + 2 * 10 + 3 * 100 + 5 * 1000 + 7 * 10000)
    dtn = tos_emoji.dtn_generator_loss(args, losses)
    assert dtn.item() == pytest.approx(10 + 11 * 100 + 13 * 1000 + 17 * 10000)  # no L_c in DTN
    defaults = tos_emoji.Args()
    assert (defaults.alpha, defaults.beta, defaults.gamma, defaults.delta) == (0.01, 100.0, 1.0, 0.0005)  # §4.2
    assert (defaults.dtn_const, defaults.dtn_tid, defaults.dtn_tv) == (100.0, 1.0, 0.05)  # DTN §5.2


def test_straight_through_gives_e_a_valid_configuration_and_c_a_gradient():
    scores = torch.tanh(torch.randn(5, emoji.CONFIG_DIM)).requires_grad_()
    u = tos_emoji.configuration_for_e(scores, "straight_through", 0.2)
    hard = emoji.decode_config(scores.detach())
    assert all(emoji.is_valid_config(row) for row in hard.numpy())
    assert torch.allclose(u.detach(), 2 * hard - 1, atol=1e-6)           # e's {-1, 1} scale, nothing in between
    weights = torch.randn(emoji.CONFIG_DIM)
    (u * weights).sum().backward()
    assert scores.grad.abs().sum() > 0                                    # the argmax alone would give none
    soft = scores.detach().clone().requires_grad_()
    (2 * torch.cat([torch.softmax(soft[:, sl] / 0.2, 1) for sl in emoji.GROUP_SLICES.values()], 1)
     * weights).sum().backward()
    assert torch.allclose(scores.grad, soft.grad)                         # the softmax's gradient, backward
    raw = torch.rand(3, emoji.CONFIG_DIM) * 2 - 1
    assert torch.equal(tos_emoji.configuration_for_e(raw, "tanh"), raw)  # --c-decode tanh: c's output as it is


def test_const_on_picks_its_terms():
    fx, fg, fe = torch.zeros(2, 4), torch.full((2, 4), 1.0), torch.full((2, 4), 3.0)
    f = lambda img: img  # an f that returns its input, so the codes are the hand values themselves
    assert tos_emoji.tos_const_loss("G", f, fx, fg, fe).item() == pytest.approx(1.0)      # Eq. 6: MSE(f(x), f(G(x)))
    assert tos_emoji.tos_const_loss("e_c_G", f, fx, fg, fe).item() == pytest.approx(9.0)  # on e(c(G(x)))
    assert tos_emoji.tos_const_loss("both", f, fx, fg, fe).item() == pytest.approx(5.0)   # the mean of the two


def test_gradient_reversal_negates_and_scales_gradients():
    x = torch.randn(4, 3, requires_grad=True)
    tos_emoji.GradientReversal.apply(x, 0.5).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, -0.5))
    y = torch.randn(4, 3)
    assert torch.equal(tos_emoji.GradientReversal.apply(y, 0.5), y)


def test_networks_have_the_papers_shapes():
    g = tos_emoji.NineLayerG(128, (16, 8, 8, 8))
    assert g(torch.randn(2, 128)).shape == (2, 3, 64, 64)
    assert sum(isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) for m in g.modules()) == 9
    dann = tos_emoji.DANN(emoji.CONFIG_DIM).eval()
    assert dann.p(torch.randn(2, 3, 64, 64)).shape == (2, 2048)  # §6.4.2: "2048-dimensional feature vectors"
    assert dann(torch.randn(2, 3, 64, 64)).shape == (2, emoji.CONFIG_DIM)
    d = common.DownscalingEncoder(3, (8, 8, 8, 8, 8), 3, bn_first=False)
    assert d(torch.randn(2, 3, 152, 152)).shape == (2, 3)  # six stride-2 blocks on 152x152 (Table 1)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of all four methods, stopped after c-bar's phase and resumed: c-bar must not change after it."""
    res = interrupted_dry_run(tmp_path_factory, "tos_emoji.py", 4,   # e 2, c-bar 2
                              after_first=lambda out: torch.load(out / "ckpt.pt", weights_only=False)["nets"]["cbar"])
    assert res.first.returncode == 130, res.first.stderr
    assert res.second.returncode == 0, res.second.stderr
    return SimpleNamespace(out=res.out, cache=res.cache, cbar_after_phase=res.between, stdout=res.second.stdout)


def test_dry_run_writes_every_method_and_output(dry_run):
    out, stdout = dry_run.out, dry_run.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    for m in tos_emoji.METHODS:
        assert 0 <= metrics[m]["attributes"]["mean"] <= 1 and metrics[m]["f_constancy"] >= 0, m
    assert metrics["manual"]["attributes"]["mean"] == 1.0
    assert {"chance", "majority", "f_cross_domain", "e_test_mse"} <= set(metrics)
    for name in ("fig6_grid.png", "configs.json", "table.md", "log.csv", "config.json", "probes/metadata.csv"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "probes" / "metadata.csv")))
    sets = {r["set"] for r in rows}
    assert {"photo_x", "photo_x2", "manual", "tos_G", "tos_engine", "dtn_e_c_G", "dann_engine"} <= sets
    assert all((out / "probes" / r["file"]).is_file() for r in rows[:20])
    configs = json.loads((out / "configs.json").read_text())
    assert set(configs["tos"][0]) == set(emoji.EMOJI_GROUPS)
    assert "TOS: engine(c(G(x)))" in stdout


def test_fixed_cbar_really_freezes_c(dry_run):
    final = torch.load(dry_run.out / "ckpt.pt", weights_only=False)["nets"]["cbar"]
    for k, v in dry_run.cbar_after_phase.items():
        assert torch.equal(v, final[k]), k  # neither TOS fixed c-bar nor DTN changed c-bar (nor its BN statistics)


def test_apply_on_a_generated_photo(dry_run, run_fast, tmp_path, monkeypatch):
    out = dry_run.out
    photo = faces.render_photo(faces.sample_identity(0, 7), faces.canonical_nuisance(), 64)
    Image.fromarray(photo).save(tmp_path / "me.png")
    Image.fromarray(np.zeros((100, 80, 3), np.uint8)).save(tmp_path / "scene.png")
    monkeypatch.setenv("AVATAR_REPRO_CACHE", str(dry_run.cache))
    res = run_fast("tos_emoji.py", "--apply", str(tmp_path / "me.png"), "--ckpt", str(out), "--out",
                   str(tmp_path / "a"))
    assert res.returncode == 0, res.stderr
    config = json.loads((tmp_path / "a" / "me_config.json").read_text())["configuration"]
    assert set(config) == set(emoji.EMOJI_GROUPS)
    assert Image.open(tmp_path / "a" / "me_avatar.png").size == (256, 256)
    res = run_fast("tos_emoji.py", "--apply", str(tmp_path / "scene.png"), "--ckpt", str(out), "--out",
              str(tmp_path / "b"))
    assert res.returncode == 2 and "not an aligned" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_bad_flags_are_one_line_errors(run_fast, tmp_path):
    for flags in (["--methods", "tos,gan"], ["--d-size", "100"], ["--faces", "folder"], ["--lc-reduction", "max"],
                  ["--f-style-aug", "1.5"], ["--c-decode", "round"], ["--const-on", "x"], ["--st-tau", "0"],
                  ["--apply", "photo.jpg"]):
        res = run_fast("tos_emoji.py", *flags, "--out", str(tmp_path / "x"))
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, (flags, res.stderr)
        assert not (tmp_path / "x").exists()


def test_dry_run_on_a_face_folder_uses_the_dlib_f(run_fast, tmp_path, monkeypatch):
    try:
        face_nets.dlib_model_path()
    except RuntimeError as exc:
        pytest.skip(f"the dlib f needs face_recognition_models ({exc})")
    for i in range(10):  # ten people, two aligned 150x150 chips each (rendered: no real data in tests)
        (tmp_path / "faces" / f"p{i}").mkdir(parents=True)
        for j in range(2):
            photo = faces.render_photo(faces.sample_identity(0, i), faces.sample_nuisance(0, i, j), 150)
            Image.fromarray(photo).save(tmp_path / "faces" / f"p{i}" / f"{j}.png")
    monkeypatch.setenv("AVATAR_REPRO_CACHE", str(tmp_path / "cache"))
    res = run_fast("tos_emoji.py", "--dry-run", "--faces-dir", str(tmp_path / "faces"), "--out", str(tmp_path / "r"))
    assert res.returncode == 0, res.stderr
    assert "dlib face-recognition ResNet" in res.stdout and "5 identities x 2 for evaluation" in res.stdout
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert "attributes" not in metrics["tos"] and metrics["tos"]["f_constancy"] > 0  # no ground truth for real faces
