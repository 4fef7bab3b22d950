"""Dynamic Weight Average (Liu et al. 2019): weights follow the epoch loss ratios."""

from __future__ import annotations

import math

import pytest
import torch

from mtseg.weighting import DWAWeighting


def _epoch(strategy, per_step_losses):
    weights = None
    for la, lb in per_step_losses:
        weights = strategy.backward({"a": torch.tensor(la, requires_grad=True), "b": torch.tensor(lb, requires_grad=True)}, [])
    strategy.on_epoch_end()
    return weights


def test_weights_follow_loss_ratios():
    strategy = DWAWeighting(["a", "b"], temperature=2.0)
    # Epoch averages: (1.0, 1.0), then (0.5, 0.9): task a improves fast, b slowly.
    assert _epoch(strategy, [(1.2, 0.8), (0.8, 1.2)]) == {"a": 1.0, "b": 1.0}
    assert _epoch(strategy, [(0.5, 0.9)]) == {"a": 1.0, "b": 1.0}  # still 1: two epochs needed
    weights = _epoch(strategy, [(0.4, 0.9)])
    ra, rb = 0.5 / 1.0, 0.9 / 1.0
    za, zb = math.exp(ra / 2.0), math.exp(rb / 2.0)
    assert weights["a"] == pytest.approx(2 * za / (za + zb))
    assert weights["b"] == pytest.approx(2 * zb / (za + zb))
    assert weights["b"] > weights["a"]  # the task that stopped improving gets more weight
    # Next epoch: ratios from epochs 2 -> 3: (0.4 / 0.5, 0.9 / 0.9)
    nxt = strategy.backward({"a": torch.tensor(1.0, requires_grad=True), "b": torch.tensor(1.0, requires_grad=True)}, [])
    za, zb = math.exp(0.8 / 2.0), math.exp(1.0 / 2.0)
    assert nxt["a"] == pytest.approx(2 * za / (za + zb))


def test_gradient_is_the_weighted_sum_and_empty_epochs_change_nothing():
    strategy = DWAWeighting(["a", "b"])
    with torch.no_grad():
        strategy.weights.copy_(torch.tensor([0.5, 1.5]))
    la = torch.tensor(3.0, requires_grad=True)
    lb = torch.tensor(3.0, requires_grad=True)
    strategy.backward({"a": la, "b": lb}, [])
    assert la.grad.item() == 0.5 and lb.grad.item() == 1.5
    strategy.on_epoch_end()
    seen = int(strategy.epochs_seen)
    strategy.on_epoch_end()  # no steps in between
    assert int(strategy.epochs_seen) == seen


def test_rejects_bad_temperature():
    with pytest.raises(ValueError, match="dwa_temperature"):
        DWAWeighting(["a", "b"], temperature=0.0)
