"""tos_polygons.py end to end on the CPU: the dry run's files, exact resume, and clean failures on bad input."""
import csv
import json

import pytest
import torch

PROMISED = ["config.json", "metrics.json", "log.csv", "ckpt.pt", "table.md", "real_polygons.png",
            "e_vs_engine.png", "dcgan_G.png", "dcgan_e_cbar_G.png", "tos_G.png", "tos_e_c_G.png",
            "tos_engine_c_G.png", "fig5.png"]
TINY = ["--dry-run", "--device", "cpu", "--e-steps", "4", "--cbar-steps", "3", "--gan-steps", "4", "--n-eval", "32"]


def read_log(path):
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted tiny dry run, shared by the tests that read its files and the resume tests it anchors."""
    from conftest import run_script
    out = tmp_path_factory.mktemp("polygons") / "full"
    return out, run_script("tos_polygons.py", *TINY, "--out", str(out))


def test_dry_run_writes_every_promised_file(full_run):
    out, res = full_run
    assert res.returncode == 0, res.stderr
    assert "preset: quick (auto: the recipe measured on seeds 1-3" in res.stdout
    for name in PROMISED:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob("*.tmp*"))
    config = json.loads((out / "config.json").read_text())
    assert config["dry_run"] is True and config["preset"] == "quick" and config["alpha"] == 0.01
    m = json.loads((out / "metrics.json").read_text())
    assert m["device"].startswith("cpu") and m["data_source"].startswith("synthetic") and m["wall_time_s"] > 0
    for model in ("dcgan", "tos"):
        assert set(m[model]) >= {"e_compliance", "engine_compliance", "G(z)", "e(c(G(z)))"}
        for key in ("validity_mse_mean", "valid_fraction"):
            assert 0 <= m[model]["G(z)"][key]
        assert set(m[model]["G(z)"]["coverage"]) == {"n_vertices", "radius", "rotation"}
    # the real renders are valid polygons by construction: the reference row calibrates the fitter
    assert m["reference"]["real renders"]["valid_fraction"] == 1.0
    phases = {row["phase"] for row in read_log(out / "log.csv")}
    assert phases == {"e", "cbar", "dcgan", "tos"}
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["phase"] == "done"


@pytest.mark.parametrize("stop_at", [6, 13])  # inside c-bar's phase; inside TOS's phase
def test_resume_after_interrupt_gives_the_same_losses(run_fast, tmp_path, full_run, stop_at):
    (full, res), cut = full_run, tmp_path / "cut"
    assert res.returncode == 0
    res = run_fast("tos_polygons.py", *TINY, "--out", str(cut), "--interrupt-at", str(stop_at))
    assert res.returncode == 130, res.stderr
    assert "--resume" in res.stdout
    assert not (cut / "metrics.json").exists()
    ckpt = torch.load(cut / "ckpt.pt", weights_only=False)
    phase, step = {6: ("cbar", 2), 13: ("tos", 2)}[stop_at]
    assert (ckpt["phase"], ckpt["step"]) == (phase, step)
    assert len(read_log(cut / "log.csv")) == stop_at

    res = run_fast("tos_polygons.py", "--resume", str(cut))
    assert res.returncode == 0, res.stderr
    assert f"resume: from phase {phase}, step {step}" in res.stdout
    assert read_log(cut / "log.csv") == read_log(full / "log.csv")
    m_full = json.loads((full / "metrics.json").read_text())
    m_cut = json.loads((cut / "metrics.json").read_text())
    assert m_cut["tos"]["e_compliance"] == pytest.approx(m_full["tos"]["e_compliance"], rel=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--no-such-flag"], "unrecognized arguments"),
    (["--gan-steps", "-5"], "--gan-steps must be 0 or more"),
    (["--gan-steps", "many"], "invalid int value"),
    (["--preset", "huge"], "invalid choice"),
    (["--g-widths", "64,32"], "needs 4 positive widths"),
    (["--device", "tpu"], "--device must be auto, cuda, cpu or mps"),
    (["--resume", "/nonexistent/run"], "no checkpoint at"),
])
def test_bad_flags_fail_with_one_line_and_write_nothing(run_fast, tmp_path, flags, message):
    out = tmp_path / "never"
    res = run_fast("tos_polygons.py", "--dry-run", "--out", str(out), *flags)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert res.stdout == ""
    assert not out.exists()


def test_cuda_asked_for_without_cuda(run, tmp_path):
    res = run("tos_polygons.py", "--dry-run", "--device", "cuda", "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "CUDA is not available" in res.stderr
    assert not (tmp_path / "x").exists()


def test_an_existing_run_is_not_overwritten(run_fast, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    res = run_fast("tos_polygons.py", "--dry-run", "--out", str(out))
    assert res.returncode == 2 and "already holds a run" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_a_corrupt_checkpoint_is_one_clear_line(run_fast, tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    res = run_fast("tos_polygons.py", "--resume", str(tmp_path))
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "not a readable checkpoint" in res.stderr


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path):
    """A real SIGINT, as a user's Ctrl-C: the step in progress finishes, ckpt.pt is written, the exit code is 130."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tos_polygons.py"), "--dry-run", "--device", "cpu",
                             "--e-steps", "100000", "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and (not (out / "log.csv").exists() or len(read_log(out / "log.csv")) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupt: finishing this step" in stderr and "--resume" in stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["phase"] == "e" and ckpt["step"] >= 3
    assert len(read_log(out / "log.csv")) == ckpt["step"]  # dry runs log every step
