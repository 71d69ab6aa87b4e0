"""Output shapes of every network the scripts build, and the fixed-network helper."""
import pytest
import torch

import common
from worlds import polygons


@pytest.mark.parametrize("widths", [(512, 256, 128, 64), (128, 64, 32, 16)])
def test_polygon_generators_make_64x64_images(widths):
    for n_in in (3, 100):  # e takes u, G takes z
        net = common.UpscalingGenerator(n_in, widths, 1).eval()
        y = net(torch.rand(2, n_in) * 2 - 1)
        assert y.shape == (2, 1, 64, 64)
        assert y.min() >= -1 and y.max() <= 1  # tanh


@pytest.mark.parametrize("widths", [(64, 128, 256, 512), (16, 32, 64, 128)])
def test_polygon_encoders(widths):
    x = torch.rand(3, 1, 64, 64) * 2 - 1
    c = common.DownscalingEncoder(1, widths, 3, final="tanh").eval()
    u = c(x)
    assert u.shape == (3, 3) and u.abs().max() <= 1
    d = common.DownscalingEncoder(1, widths, 1, bn_first=False).eval()
    assert d(x).shape == (3, 1)
    # dcgan.torch's d has no batch norm on its first layer; Table 1's d has it on every layer but the last.
    assert not isinstance(d.net[1], torch.nn.BatchNorm2d)
    assert isinstance(c.net[1], torch.nn.BatchNorm2d)


def test_bn_tanh_keeps_c_off_the_tanh_rails_however_large_its_last_layer():
    """tos_polygons' c: batch norm between the last convolution and the tanh, so a last layer whose weights have grown
    (as Adam grows them at Table 1's widths) still gives outputs inside (-1, 1), spread over the batch."""
    torch.manual_seed(0)
    x = torch.rand(64, 1, 64, 64) * 2 - 1
    for final, saturated in (("tanh", True), ("bn_tanh", False)):
        c = common.DownscalingEncoder(1, (16, 32, 64, 128), 3, final=final)
        with torch.no_grad():
            c.net[-2 if final == "tanh" else -3].weight.mul_(100.0)  # the last convolution, grown 100x
        u = c(x)
        assert u.shape == (64, 3)
        assert ((u.abs() > 0.99).float().mean() > 0.5) == saturated


def test_digit_sized_networks():
    # Journal Table 1, digits: g maps f's 128-D representation to 32x32; d and f take 32x32 images.
    g = common.UpscalingGenerator(128, (256, 128, 64), 1).eval()
    assert g(torch.randn(2, 128)).shape == (2, 1, 32, 32)
    d = common.DownscalingEncoder(1, (64, 128, 256), 3).eval()
    assert d(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    f = common.DownscalingEncoder(3, (64, 128, 256), 128, act="relu").eval()
    assert f(torch.randn(2, 3, 32, 32)).shape == (2, 128)


def test_freeze_keeps_gradients_flowing_through():
    e = common.freeze(common.UpscalingGenerator(3, (16, 8, 8, 4), 1))
    assert not e.training and not any(p.requires_grad for p in e.parameters())
    u = torch.rand(2, 3, requires_grad=True)
    e(u).pow(2).sum().backward()
    assert u.grad is not None and u.grad.abs().sum() > 0


def test_fitter_bank_and_u_scaling_round_trip():
    p = polygons.sample_params(__import__("numpy").random.default_rng(0), 50)
    u = polygons.to_u(p)
    assert u.abs().max() <= 1
    assert abs(polygons.from_u(u) - p).max() < 1e-4
