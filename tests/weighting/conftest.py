"""Fixtures of the weighting tests: a two-task toy model whose task gradients are known."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TwoTasks(nn.Module):
    """A shared 1x2 weight and one scalar head per task: L_i = exp(W . x_i) + h_i^2.

    exp keeps the losses positive (loss-ratio methods divide by them); at W = 0 the shared
    gradients are x_a and x_b themselves.
    """

    def __init__(self, x_a=(1.0, 0.0), x_b=(-1.0, 1.0)):
        super().__init__()
        self.shared = nn.Parameter(torch.tensor([[0.5, -0.5]]))
        self.head_a = nn.Parameter(torch.tensor(1.0))
        self.head_b = nn.Parameter(torch.tensor(2.0))
        self.register_buffer("x_a", torch.tensor(x_a))
        self.register_buffer("x_b", torch.tensor(x_b))

    def losses(self):
        return {
            "a": torch.exp(self.shared[0] @ self.x_a) + self.head_a**2,
            "b": torch.exp(self.shared[0] @ self.x_b) + self.head_b**2,
        }


@pytest.fixture
def two_tasks():
    """The :class:`TwoTasks` class: ``two_tasks()`` or ``two_tasks(x_a=..., x_b=...)`` builds one."""
    return TwoTasks
