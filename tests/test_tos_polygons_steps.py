"""tos_polygons.py's training steps: the shared forward of d gives each player the gradient of its own loss."""
import copy

import torch

import tos_polygons as tp
from common import DownscalingEncoder, UpscalingGenerator, compliance_loss, gan_d_loss, gan_g_loss


def small_nets():
    torch.manual_seed(0)
    G = UpscalingGenerator(8, (8, 8, 4, 4), 1)
    d = DownscalingEncoder(1, (4, 4, 8, 8), 1, bn_first=False)
    c = DownscalingEncoder(1, (4, 4, 8, 8), 3, final="tanh")
    e = UpscalingGenerator(3, (8, 8, 4, 4), 1).requires_grad_(False)
    return G, d, c, e


def test_update_gan_takes_each_players_gradient_before_either_moves():
    G, d, c, e = small_nets()
    z, x_real = torch.rand(6, 8) * 2 - 1, torch.rand(6, 1, 64, 64) * 2 - 1
    # the reference: each loss's gradient with respect to its own player's parameters, on the same forward passes
    G_ref, d_ref, c_ref = copy.deepcopy(G), copy.deepcopy(d), copy.deepcopy(c)
    g_z = G_ref(z)
    d_fake = d_ref(g_z)
    loss_d = gan_d_loss(d_ref(x_real), d_fake)
    loss_G = compliance_loss(g_z, e(c_ref(g_z))) + 0.5 * gan_g_loss(d_fake)
    want_d = torch.autograd.grad(loss_d, list(d_ref.parameters()), retain_graph=True)
    want_G = torch.autograd.grad(loss_G, list(G_ref.parameters()) + list(c_ref.parameters()))

    sgd = lambda net: torch.optim.SGD(net.parameters(), lr=1.0)  # noqa: E731  the step is then p -= grad
    before = {name: [p.detach().clone() for p in net.parameters()] for name, net in (("G", G), ("d", d), ("c", c))}
    g_z = G(z)
    tp.update_gan(G, d, sgd(G), sgd(d), x_real, g_z, compliance_loss(g_z, e(c(g_z))), sgd(c), alpha=0.5)
    for p0, p, g in zip(before["d"], d.parameters(), want_d):
        torch.testing.assert_close(p0 - p, g, rtol=1e-4, atol=1e-6)
    for p0, p, g in zip(before["G"] + before["c"], list(G.parameters()) + list(c.parameters()), want_G):
        torch.testing.assert_close(p0 - p, g, rtol=1e-4, atol=1e-6)


def test_alpha_schedule_is_fixed_by_default_and_falls_over_the_last_anneal_steps():
    args = tp.Args(gan_steps=5, alpha=0.5)
    assert tp.alpha_schedule(args).tolist() == [0.5] * 5
    args.alpha, args.alpha_final, args.anneal_steps = 1.0, 1e-4, 5
    torch.testing.assert_close(tp.alpha_schedule(args).tolist(), [1.0, 0.1, 0.01, 0.001, 1e-4])
    args.alpha_final = 0.0  # geometric cannot reach 0: linear
    assert tp.alpha_schedule(args).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    args.anneal_steps = 2  # only the last two steps move
    assert tp.alpha_schedule(args).tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
