"""Uncertainty weighting (Kendall et al. 2018): learned log-variances reach their closed form."""

from __future__ import annotations

import math

import pytest
import torch

from mtseg.weighting import UncertaintyWeighting


def test_gradient_and_weights_match_the_formula():
    strategy = UncertaintyWeighting(["a", "b"])
    with torch.no_grad():
        strategy.log_vars.copy_(torch.tensor([0.3, -0.7]))
    la = torch.tensor(2.0, requires_grad=True)
    lb = torch.tensor(0.5, requires_grad=True)
    weights = strategy.backward({"a": la, "b": lb}, [])
    expected_w = [0.5 * math.exp(-0.3), 0.5 * math.exp(0.7)]
    assert weights["a"] == pytest.approx(expected_w[0]) and weights["b"] == pytest.approx(expected_w[1])
    assert la.grad.item() == pytest.approx(expected_w[0])
    # d/ds [0.5 e^{-s} L + 0.5 s] = 0.5 - 0.5 e^{-s} L
    expected_grad = [0.5 - 0.5 * math.exp(-0.3) * 2.0, 0.5 - 0.5 * math.exp(0.7) * 0.5]
    assert torch.allclose(strategy.log_vars.grad, torch.tensor(expected_grad))


def test_log_variances_converge_to_log_of_the_losses():
    losses = {"a": 4.0, "b": 0.25}
    strategy = UncertaintyWeighting(list(losses))
    opt = torch.optim.SGD(strategy.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        strategy.backward({k: torch.tensor(v, requires_grad=True) for k, v in losses.items()}, [])
        opt.step()
    assert torch.allclose(strategy.log_vars, torch.log(torch.tensor([4.0, 0.25])), atol=1e-4)
    weights = strategy.backward({k: torch.tensor(v, requires_grad=True) for k, v in losses.items()}, [])
    assert weights["a"] == pytest.approx(1 / (2 * 4.0), rel=1e-3)  # closed form: 1 / (2 L)
    assert weights["b"] == pytest.approx(1 / (2 * 0.25), rel=1e-3)
