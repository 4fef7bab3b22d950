"""FAMO: Liu, Liu, Jin, Stone and Liu, "FAMO: Fast Adaptive Multitask Optimization",
NeurIPS 2023.

FAMO keeps task logits ``xi`` (weights ``z = softmax(xi)``) and descends along

    d = sum_i  z_i / (c * l_i) * grad l_i,        c = sum_i z_i / l_i

(the gradient of ``sum_i z_i log l_i`` normalised by ``c``), so that all tasks' losses
decrease at a balanced *log* rate, with O(1) cost per step: no per-task gradients. After
a step, ``xi`` moves to favour the tasks whose log-loss fell least:

    delta_i = log l_i(t) - log l_i(t+1);   xi <- Adam(xi, grad = J_softmax(xi)^T delta, lr, weight_decay=gamma)

The paper's code evaluates ``l(t+1)`` with an extra forward pass on the same batch after
the optimiser step; here it is the next step's loss (the next batch), which costs nothing,
so the ``xi`` update for step t runs at the start of step t+1. Loss values are averaged
over ranks first, so every rank updates the same ``xi``. The paper's minimum losses ``l*``
are 0 (every loss here is >= 0).
"""

from __future__ import annotations

import torch

from mtseg.weighting.base import WeightingStrategy, adam_update, all_reduce_mean, stack_losses

# Keeps log() finite for a zero loss, as the paper's code does.
EPS = 1e-8


class FAMOWeighting(WeightingStrategy):
    """Fast Adaptive Multitask Optimization.

    Args:
        task_names: the tasks.
        lr: learning rate of the logits' Adam (paper: 0.025).
        gamma: weight decay of the logits (paper: 0.001 to 0.01), pulling them back to uniform.
    """

    def __init__(self, task_names: list[str], lr: float = 0.025, gamma: float = 0.001):
        super().__init__(task_names)
        t = len(task_names)
        self.lr, self.gamma = float(lr), float(gamma)
        self.register_buffer("logits", torch.zeros(t))
        self.register_buffer("exp_avg", torch.zeros(t))
        self.register_buffer("exp_avg_sq", torch.zeros(t))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("prev_losses", torch.zeros(t))
        self.register_buffer("has_prev", torch.zeros((), dtype=torch.bool))

    def update_logits(self, prev_losses: torch.Tensor, curr_losses: torch.Tensor) -> None:
        """The paper's logit update from the losses before and after one step."""
        delta = (prev_losses + EPS).log() - (curr_losses + EPS).log()
        z = torch.softmax(self.logits, dim=0)
        grad = z * (delta - (z * delta).sum())  # J_softmax(xi)^T delta
        adam_update(self.logits, grad, self.exp_avg, self.exp_avg_sq, self.adam_step, lr=self.lr, weight_decay=self.gamma)

    def backward(self, losses: dict[str, torch.Tensor], shared_params: list[torch.Tensor]) -> dict[str, float]:
        vec = stack_losses(losses, self.task_names)
        with torch.no_grad():
            current = all_reduce_mean(vec.detach()).to(self.logits)
            if bool(self.has_prev):
                self.update_logits(self.prev_losses, current)
            self.prev_losses.copy_(current)
            self.has_prev.fill_(True)
            z = torch.softmax(self.logits, dim=0)
            d = current + EPS
            c = (z / d).sum()
            weights = z / (c * d)  # d(sum z_i log l_i)/c = sum z_i / (c l_i) grad l_i
        (weights.to(vec.device) * vec).sum().backward()
        return self._report(weights)
