"""FAMO (Liu et al. 2023): the weights and the logit update follow the paper's code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtseg.weighting import FAMOWeighting


class PaperFAMO:
    """The update rule of the paper's released code (github.com/Cranial-XIX/FAMO), min losses 0."""

    def __init__(self, n, lr, gamma):
        self.w = torch.zeros(n, requires_grad=True)
        self.opt = torch.optim.Adam([self.w], lr=lr, weight_decay=gamma)
        self.prev = None

    def weighted_loss(self, losses):
        self.prev = losses.detach()
        z = F.softmax(self.w, -1)
        d = losses + 1e-8
        c = (z / d).sum().detach()
        return (d.log() * z / c).sum()

    def update(self, curr):
        delta = (self.prev + 1e-8).log() - (curr + 1e-8).log()
        (d,) = torch.autograd.grad(F.softmax(self.w, -1), self.w, grad_outputs=delta)
        self.opt.zero_grad()
        self.w.grad = d
        self.opt.step()


def test_first_step_weights_and_gradient():
    strategy = FAMOWeighting(["a", "b"])
    la = torch.tensor(2.0, requires_grad=True)
    lb = torch.tensor(0.5, requires_grad=True)
    weights = strategy.backward({"a": la, "b": lb}, [])
    # z uniform: c = 0.5 / 2 + 0.5 / 0.5 = 1.25; w_i = z_i / (c l_i)
    assert weights["a"] == pytest.approx(0.5 / (1.25 * 2.0)) and weights["b"] == pytest.approx(0.5 / (1.25 * 0.5))
    assert la.grad.item() == pytest.approx(weights["a"]) and lb.grad.item() == pytest.approx(weights["b"])
    assert torch.equal(strategy.logits, torch.zeros(2))  # nothing to compare with yet


def test_logits_and_gradients_follow_the_paper_over_steps():
    gen = torch.Generator().manual_seed(0)
    strategy = FAMOWeighting(["a", "b", "c"], lr=0.025, gamma=0.001)
    paper = PaperFAMO(3, lr=0.025, gamma=0.001)
    for step in range(6):
        values = torch.rand(3, generator=gen) * 2 + 0.1
        if step > 0:
            paper.update(values)  # the paper's update for the previous step, with these losses
        ours = [torch.tensor(float(v), requires_grad=True) for v in values]
        strategy.backward(dict(zip("abc", ours)), [])
        theirs = values.clone().requires_grad_()
        paper.weighted_loss(theirs).backward()
        assert torch.allclose(strategy.logits, paper.w.detach(), atol=1e-6)
        assert torch.allclose(torch.stack([o.grad for o in ours]), theirs.grad, atol=1e-6)


def test_task_whose_loss_stalls_gains_weight():
    strategy = FAMOWeighting(["a", "b"], lr=0.1)
    for la in (1.0, 0.5, 0.25, 0.125):  # a keeps improving, b stalls at 1.0
        strategy.backward({"a": torch.tensor(la, requires_grad=True), "b": torch.tensor(1.0, requires_grad=True)}, [])
    z = torch.softmax(strategy.logits, 0)
    assert z[1] > z[0]
