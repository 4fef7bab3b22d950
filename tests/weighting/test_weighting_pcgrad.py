"""PCGrad (Yu et al. 2020) on hand-made task gradients."""

from __future__ import annotations

import torch

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
    strategy = PCGradWeighting(NAMES, seed=3)
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
