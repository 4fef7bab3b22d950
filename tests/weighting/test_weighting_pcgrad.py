"""PCGrad (Yu et al. 2020) on hand-made task gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtseg.weighting import PCGradWeighting
from mtseg.weighting.pcgrad import pcgrad_coefficients

NAMES = ["a", "b"]


def test_removes_the_conflicting_component(two_tasks):
    # Shared gradients at W: g_a = x_a e^{W.x_a}, g_b = x_b e^{W.x_b}; x_a . x_b < 0: they conflict.
    model = two_tasks(x_a=(1.0, 0.0), x_b=(-1.0, 1.0))
    with torch.no_grad():
        model.shared.zero_()  # e^0 = 1: g_a = (1, 0), g_b = (-1, 1)
    weights = PCGradWeighting(NAMES).backward(model.losses(), [model.shared])
    g_a, g_b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    pa = g_a - (g_a @ g_b) / (g_b @ g_b) * g_b  # (0.5, 0.5): no component against g_b left
    pb = g_b - (g_b @ g_a) / (g_a @ g_a) * g_a  # (0, 1): no component against g_a left
    assert abs(float(pa @ g_b)) < 1e-6 and abs(float(pb @ g_a)) < 1e-6
    assert torch.allclose(model.shared.grad[0], pa + pb)  # (0.5, 1.5)
    assert weights == {"a": 2.0, "b": 1.5}  # pa + pb = 2 g_a + 1.5 g_b
    # Heads keep their own task's gradient, untouched by the surgery.
    assert model.head_a.grad.item() == 2.0 and model.head_b.grad.item() == 4.0


def test_leaves_agreeing_gradients_alone(two_tasks):
    model = two_tasks(x_a=(1.0, 0.0), x_b=(1.0, 1.0))
    with torch.no_grad():
        model.shared.zero_()
    weights = PCGradWeighting(NAMES).backward(model.losses(), [model.shared])
    assert weights == {"a": 1.0, "b": 1.0}
    assert torch.allclose(model.shared.grad[0], torch.tensor([2.0, 1.0]))


def test_accumulates_like_backward(two_tasks):
    model = two_tasks()
    strategy = PCGradWeighting(NAMES)
    strategy.backward(model.losses(), [model.shared])
    once = model.shared.grad.clone()
    strategy.backward(model.losses(), [model.shared])
    assert torch.allclose(model.shared.grad, 2 * once)


def _reference_pcgrad(grads, order):
    """The paper's algorithm on the vectors themselves."""
    out = []
    for i, g in enumerate(grads):
        g = g.clone()
        for j in order[i]:
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        out.append(g)
    return torch.stack(out).sum(0)


def test_gram_matrix_form_equals_projecting_vectors():
    gen = torch.Generator().manual_seed(0)
    for t in (2, 3, 5):
        for _ in range(20):
            grads = torch.randn(t, 7, generator=gen, dtype=torch.float64)
            order = [[j for j in torch.randperm(t, generator=gen).tolist() if j != i] for i in range(t)]
            coef = pcgrad_coefficients(grads @ grads.T, order)
            assert torch.allclose(coef @ grads, _reference_pcgrad(grads, order), atol=1e-10)


class RepToy(nn.Module):
    """Representation z = W x (W: 2x2, x = (1, 2)), heads L_a = a . z + h_a^2, L_b = b . z + h_b^2.

    The tasks' gradients at z are a and b, whatever W is; the shared gradient of a
    representation gradient r is the outer product r x^T.
    """

    def __init__(self, a=(1.0, 0.0), b=(-1.0, 1.0)):
        super().__init__()
        self.shared = nn.Parameter(torch.tensor([[0.5, -0.5], [0.25, 1.0]]))
        self.head_a = nn.Parameter(torch.tensor(1.0))
        self.head_b = nn.Parameter(torch.tensor(2.0))
        self.x, self.a, self.b = torch.tensor([1.0, 2.0]), torch.tensor(a), torch.tensor(b)

    def forward(self):
        features = self.shared @ self.x
        leaf = features.detach().requires_grad_()
        losses = {"a": self.a @ leaf + self.head_a**2, "b": self.b @ leaf + self.head_b**2}
        return losses, (features, leaf)


def test_rep_grad_projects_the_gradients_at_the_representation():
    model = RepToy()  # a . b < 0: the representation gradients conflict
    losses, rep = model()
    weights = PCGradWeighting(NAMES, rep_grad=True).backward(losses, [model.shared], rep)
    # pa = a - (a.b)/|b|^2 b = (0.5, 0.5), pb = b - (b.a)/|a|^2 a = (0, 1): ONE encoder backward of pa + pb.
    assert weights == {"a": 2.0, "b": 1.5}
    assert torch.allclose(model.shared.grad, torch.outer(torch.tensor([0.5, 1.5]), model.x))
    assert model.head_a.grad.item() == 2.0 and model.head_b.grad.item() == 4.0
    assert rep[1].grad is None  # the leaf's gradient is read out, not left behind


def test_rep_grad_leaves_agreeing_representation_gradients_alone():
    model = RepToy(a=(1.0, 0.0), b=(1.0, 1.0))
    losses, rep = model()
    assert PCGradWeighting(NAMES, rep_grad=True).backward(losses, [model.shared], rep) == {"a": 1.0, "b": 1.0}
    assert torch.allclose(model.shared.grad, torch.outer(torch.tensor([2.0, 1.0]), model.x))


def test_rep_grad_needs_the_representation(two_tasks):
    model = two_tasks()
    with pytest.raises(ValueError, match="weighting.rep_grad: the model passed no representation"):
        PCGradWeighting(NAMES, rep_grad=True).backward(model.losses(), [model.shared])
