"""The shared plumbing in common.py: arguments and presets, run files, grids and checkpoints."""
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

import common


@dataclass
class ToyArgs:
    preset: str = "auto"
    """which preset"""
    steps: int = 100
    """training steps (§9: "one hundred")"""
    widths: tuple = (8, 4)
    """layer widths"""
    fast: bool = False
    """go fast"""


PRESETS = {"paper": {}, "quick": {"steps": 5, "widths": (2, 1)}}


def auto(args):
    return "quick", "auto: test"


def test_field_docstrings_become_help():
    docs = common.field_docs(ToyArgs)
    assert docs["steps"] == 'training steps (§9: "one hundred")'


def test_command_line_beats_preset_beats_default():
    args, preset, why, given = common.parse_args(ToyArgs, PRESETS, auto, [])
    assert (preset, why, args.steps, args.widths) == ("quick", "auto: test", 5, (2, 1))
    args, preset, why, given = common.parse_args(ToyArgs, PRESETS, auto, ["--preset", "paper"])
    assert (preset, args.steps, args.widths) == ("paper", 100, (8, 4))
    args, *_ = common.parse_args(ToyArgs, PRESETS, auto, ["--preset", "quick", "--steps", "7", "--widths", "3,3"])
    assert (args.steps, args.widths) == (7, (3, 3))
    args, _, _, given = common.parse_args(ToyArgs, PRESETS, auto, ["--fast"])
    assert args.fast is True and given == {"fast"}
    args, *_ = common.parse_args(ToyArgs, PRESETS, auto, ["--fast", "false"])
    assert args.fast is False


def test_bad_values_are_one_line_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        common.parse_args(ToyArgs, PRESETS, auto, ["--steps", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid int value" in err[0]


def test_csv_log_keeps_rows_before_the_checkpoint(tmp_path):
    log = common.CSVLog(tmp_path / "log.csv", ["step", "loss"])
    for i in range(5):
        log.write(step=i, loss=0.5 * i)
    log.close()
    log = common.CSVLog(tmp_path / "log.csv", ["step", "loss"], keep_rows=3)
    log.write(step=3, loss=9.0)
    log.close()
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines == ["step,loss", "0,0", "1,0.5", "2,1", "3,9"]


def test_checkpoints_and_json_are_written_whole(tmp_path):
    common.save_checkpoint(tmp_path / "ckpt.pt", {"w": torch.arange(3), "step": 4})
    common.write_json(tmp_path / "m.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "m.json"]
    assert common.load_checkpoint(tmp_path)["step"] == 4
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        common.save_checkpoint(tmp_path / "ckpt.pt", {"bad": Boom()})
    assert common.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 4  # the old checkpoint survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "m.json"]


def test_grids_keep_the_minus_one_to_one_scale(tmp_path):
    # A grid of mid-grey images must stay mid-grey: without value_range it would be stretched to black.
    common.save_grid(torch.zeros(4, 1, 8, 8), tmp_path / "g.png", nrow=2)
    img = np.asarray(Image.open(tmp_path / "g.png").convert("L"))
    assert abs(int(img[3, 3]) - 128) <= 1
    common.save_grid(torch.ones(4, 1, 8, 8), tmp_path / "w.png", nrow=2)
    assert np.asarray(Image.open(tmp_path / "w.png").convert("L"))[3, 3] == 255


def test_rng_state_round_trip():
    common.seed_everything(3)
    state = common.rng_state()
    a = (torch.rand(3), np.random.rand(), __import__("random").random())
    common.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_pick_device():
    assert common.pick_device("cpu").type == "cpu"
    assert common.pick_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(SystemExit):
        common.pick_device("tpu")


def test_recalibrated_batchnorm_holds_the_statistics_of_the_given_batches_alone():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    bn = net[1]
    net.train()
    with torch.no_grad():  # training on two domains mixes their running statistics
        for _ in range(50):
            net(torch.randn(32, 3) + 5)
            net(torch.randn(32, 3) - 5)
    source = [torch.randn(64, 3) + 5 for _ in range(4)]
    with torch.no_grad():
        want = torch.stack([net[0](x).mean(0) for x in source]).mean(0)
        want_var = torch.stack([net[0](x).var(0) for x in source]).mean(0)  # the unbiased variance, as BN keeps it
    assert not torch.allclose(bn.running_mean, want, atol=0.5)
    assert common.recalibrate_batchnorm(net, net, source) is net
    assert not net.training and bn.momentum == 0.1  # eval mode, the momentum given back
    assert torch.allclose(bn.running_mean, want, atol=1e-5) and torch.allclose(bn.running_var, want_var, atol=1e-4)
