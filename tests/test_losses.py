"""Every loss in common.py against a value computed by hand on a tiny tensor."""
import math

import pytest
import torch

import common

LOG2, LOG3 = math.log(2), math.log(3)


def test_gan_d_loss_by_hand():
    # d(x') = sigmoid(log 3) = 0.75 on the real sample, d(G(z)) = 0.5 on the fake one:
    # -log 0.75 - log(1 - 0.5)
    loss = common.gan_d_loss(torch.tensor([math.log(3)]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(-math.log(0.75) + LOG2, rel=1e-6)


def test_gan_g_loss_by_hand():
    # non-saturating: -log d(G(z)); d = sigmoid(-log 3) = 0.25
    assert common.gan_g_loss(torch.tensor([-math.log(3)])).item() == pytest.approx(-math.log(0.25), rel=1e-6)


def test_dtn_d_loss_by_hand():
    # Uniform logits: each of the three cross-entropy terms is log 3.
    zeros = torch.zeros(2, 3)
    assert common.dtn_d_loss(zeros, zeros, zeros).item() == pytest.approx(3 * LOG3, rel=1e-6)
    # A confident, correct D: logits (a, 0, 0) for class 1 on g(f(s)), etc.; each term is -log(e^a / (e^a + 2)).
    a = 2.0
    s = torch.tensor([[a, 0.0, 0.0]])
    gt = torch.tensor([[0.0, a, 0.0]])
    t = torch.tensor([[0.0, 0.0, a]])
    term = -math.log(math.exp(a) / (math.exp(a) + 2))
    assert common.dtn_d_loss(s, gt, t).item() == pytest.approx(3 * term, rel=1e-6)
    # The same logits in the wrong roles cost more: -log(1 / (e^a + 2)) each.
    wrong = -math.log(1 / (math.exp(a) + 2))
    assert common.dtn_d_loss(t, s, gt).item() == pytest.approx(3 * wrong, rel=1e-6)


def test_dtn_gang_loss_by_hand():
    # G wants D to say class 3 ("real target") for both g(f(s)) and g(f(t)).
    a = 1.5
    fooled = torch.tensor([[0.0, 0.0, a]])
    assert common.dtn_gang_loss(fooled, fooled).item() == pytest.approx(
        2 * -math.log(math.exp(a) / (math.exp(a) + 2)), rel=1e-6)
    assert common.dtn_gang_loss(torch.zeros(4, 3), torch.zeros(4, 3)).item() == pytest.approx(2 * LOG3, rel=1e-6)


def test_const_and_tid_are_mse():
    f_x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    f_gx = torch.tensor([[1.0, 2.0], [1.0, 1.0]])
    # (1 + 4 + 0 + 0) / 4
    assert common.const_loss(f_x, f_gx).item() == pytest.approx(1.25)
    assert common.tid_loss(f_x, f_gx).item() == pytest.approx(1.25)


def test_const_loss_reaches_g_through_fixed_f():
    f = common.freeze(torch.nn.Linear(3, 2))
    g = torch.nn.Linear(2, 3)
    x = torch.randn(4, 3)
    loss = common.const_loss(f(x), f(g(f(x))))
    loss.backward()
    assert g.weight.grad is not None and g.weight.grad.abs().sum() > 0
    assert f.weight.grad is None


def test_tv_loss_by_hand():
    # One image, one channel, 3x3. The sum runs over the 2x2 pixels that have a right and a lower neighbour.
    z = torch.tensor([[[[0.0, 3.0, 3.0],
                        [4.0, 0.0, 0.0],
                        [4.0, 0.0, 0.0]]]])
    # (0,0): dx=3, dy=4 -> 5; (0,1): dx=0, dy=-3 -> 3; (1,0): dx=-4, dy=0 -> 4; (1,1): 0
    assert common.tv_loss(z, eps=0.0).item() == pytest.approx(12.0)
    # Mean over the batch: two copies cost the same as one.
    assert common.tv_loss(torch.cat([z, z]), eps=0.0).item() == pytest.approx(12.0)


def test_tv_loss_has_no_nan_gradient_on_flat_images():
    z = torch.zeros(2, 3, 8, 8, requires_grad=True)
    loss = common.tv_loss(z)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    assert loss.item() == pytest.approx(2 * 0 + 3 * 49 * math.sqrt(1e-8), rel=1e-4)
    # Without the epsilon, the same flat image gives NaN gradients: the trap the epsilon is there for.
    z2 = torch.zeros(1, 1, 4, 4, requires_grad=True)
    common.tv_loss(z2, eps=0.0).backward()
    assert torch.isnan(z2.grad).any()


def test_compliance_loss_by_hand_and_gradients():
    g = torch.tensor([[[[1.0, -1.0], [1.0, 1.0]]]], requires_grad=True)
    e_c_g = torch.tensor([[[[0.0, -1.0], [1.0, -1.0]]]], requires_grad=True)
    # Eq. 4's squared norm, summed over the pixels; "mean" is the per-pixel MSE
    assert common.compliance_loss(g, e_c_g, "mean").item() == pytest.approx((1 + 0 + 0 + 4) / 4)
    loss = common.compliance_loss(g, e_c_g, "sum")
    assert loss.item() == pytest.approx(1 + 0 + 0 + 4)
    assert common.compliance_loss(torch.cat([g, g]), torch.cat([e_c_g, e_c_g]), "sum").item() == pytest.approx(5.0)
    loss.backward()
    # Both G and c (through e) minimize L_c: neither side is detached.
    assert g.grad.abs().sum() > 0 and e_c_g.grad.abs().sum() > 0


def test_nan_guard_names_the_step_and_the_loss():
    common.check_finite("tos", 7, {"loss_c": 0.5})
    with pytest.raises(common.NonFiniteLoss, match=r"loss_d = nan at dcgan step 300"):
        common.check_finite("dcgan", 300, {"loss_g_gan": 1.0, "loss_d": float("nan")})
    with pytest.raises(common.NonFiniteLoss, match="inf"):
        common.check_finite("e", 1, {"loss_e": float("inf")})
