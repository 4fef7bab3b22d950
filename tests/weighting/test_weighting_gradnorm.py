"""GradNorm (Chen et al. 2018): weights move toward equal relative training rates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtseg.weighting import GradNormWeighting


def test_weight_gradient_matches_the_paper():
    strategy = GradNormWeighting(["a", "b", "c"], alpha=1.5)
    strategy.weights.copy_(torch.tensor([0.5, 1.0, 1.5]))
    strategy.initial_losses.copy_(torch.tensor([2.0, 1.0, 4.0]))
    norms = torch.tensor([1.0, 3.0, 2.0])  # ||grad_W L_i||
    losses = torch.tensor([1.0, 0.9, 1.0])
    g = strategy.weights * norms  # G_i = ||grad_W (w_i L_i)||
    ratio = losses / strategy.initial_losses
    target = g.mean() * (ratio / ratio.mean()) ** 1.5
    w = strategy.weights.clone().requires_grad_()
    l_grad = ((w * norms) - target).abs().sum()  # target held constant
    (expected,) = torch.autograd.grad(l_grad, w)
    assert torch.allclose(strategy.weight_gradient(norms, losses), expected)


def _quadratic_problem():
    """Two tasks on one shared 1x2 layer; task a (curvature 10) trains much faster than b (0.1)."""
    shared = nn.Parameter(torch.zeros(1, 2))

    def losses():
        return {"a": 10.0 * (shared[0, 0] - 1.0) ** 2 + 0.1, "b": 0.1 * (shared[0, 1] - 1.0) ** 2 + 0.1}

    return shared, losses


def test_slower_task_gains_weight_and_rates_even_out():
    spread = {}
    for name in ("equal", "gradnorm"):
        shared, losses = _quadratic_problem()
        strategy = GradNormWeighting(["a", "b"], alpha=1.5, lr=0.05)
        opt = torch.optim.SGD([shared], lr=0.01)
        first = None
        for _ in range(60):
            opt.zero_grad()
            ls = losses()
            if name == "equal":
                sum(ls.values()).backward()
            else:
                weights = strategy.backward(ls, [shared])
                assert sum(weights.values()) == pytest.approx(2.0, abs=1e-5)
            first = first or {k: float(v.detach()) for k, v in ls.items()}
            opt.step()
        final = {k: float(v.detach()) for k, v in losses().items()}
        rates = [final[k] / first[k] for k in ("a", "b")]
        spread[name] = abs(rates[0] - rates[1])
        if name == "gradnorm":
            assert strategy.weights[1] > 1.0 > strategy.weights[0]  # the slow task b is up-weighted
            assert float(strategy.weights.sum()) == pytest.approx(2.0, abs=1e-5)
    assert spread["gradnorm"] < spread["equal"]


def test_network_gradient_uses_the_weights_before_their_update():
    shared, losses = _quadratic_problem()
    strategy = GradNormWeighting(["a", "b"])
    strategy.weights.copy_(torch.tensor([0.5, 1.5]))
    strategy.backward(losses(), [shared])
    ref = nn.Parameter(torch.zeros(1, 2))
    (0.5 * 10.0 * (ref[0, 0] - 1.0) ** 2 + 1.5 * 0.1 * (ref[0, 1] - 1.0) ** 2).backward()
    assert torch.allclose(shared.grad, ref.grad)
    assert bool(strategy.has_initial) and torch.allclose(strategy.initial_losses, torch.tensor([10.1, 0.2]))


def test_rep_grad_follows_the_norms_at_the_representation():
    """z = W x; L_a = a . z, L_b = b . z: the gradients at z are a and b (norms 3 and 1)."""
    shared = nn.Parameter(torch.tensor([[0.5, -0.5], [0.25, 1.0]]))
    x, a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])
    strategy = GradNormWeighting(["a", "b"], alpha=1.5, lr=0.1, rep_grad=True)
    assert strategy.uses_representation
    for step in range(2):
        shared.grad = None
        features = shared @ x
        leaf = features.detach().requires_grad_()
        # Losses kept positive and equal in ratio to their start, so the target is the mean norm.
        losses = {"a": a @ leaf + 10.0, "b": b @ leaf + 10.0}
        used = strategy.backward(losses, [shared], (features, leaf))
        # The network still descends sum_i w_i L_i exactly: ONE encoder backward of w_a a + w_b b.
        assert torch.allclose(shared.grad, torch.outer(used["a"] * a + used["b"] * b, x))
        if step == 0:
            assert used == {"a": 1.0, "b": 1.0}
    # G_a = 3 > mean 2 > G_b = 1: a's weight falls, b's rises, the sum stays 2.
    w = strategy.weights
    assert w[0] < 1.0 < w[1] and torch.isclose(w.sum(), torch.tensor(2.0))
