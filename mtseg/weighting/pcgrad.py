"""PCGrad: Yu, Kumar, Gupta, Levine, Hausman and Finn, "Gradient Surgery for Multi-Task
Learning", NeurIPS 2020.

For each task i, in a random order over the other tasks j: if the (already projected)
gradient ``g_i`` conflicts with ``g_j`` (``g_i . g_j < 0``), remove the conflicting
component, ``g_i <- g_i - (g_i . g_j) / ||g_j||^2 g_j``. The shared parameters get the
sum of the projected gradients; each head gets its own task's gradient.

Every projected ``g_i`` stays a linear combination of the original task gradients, so
the surgery runs on the T x T Gram matrix ``G G^T`` and yields coefficients ``w`` with
``update = w^T G``: the same result as projecting the vectors, at O(T^2) instead of
O(T^2 P) work after the Gram product. ``w`` is reported as the tasks' weights.

DDP: the per-task gradients of the shared parameters (T backward passes, inside
``no_sync``) are averaged over ranks in ONE all-reduce of the (T, P) matrix; the random
order comes from a generator seeded by the step count, so every rank computes the same
``w`` and writes the same shared ``.grad``.
"""

from __future__ import annotations

import torch

from mtseg.weighting.base import (
    WeightingStrategy,
    add_flat_gradient,
    all_reduce_mean,
    ordered_losses,
    per_task_gradients,
)


def pcgrad_coefficients(gram: torch.Tensor, order: list[list[int]]) -> torch.Tensor:
    """PCGrad on a Gram matrix.

    Args:
        gram: (T, T) inner products of the task gradients, ``gram[i, j] = g_i . g_j``.
        order: for each task i, the other tasks in the order they are projected against.

    Returns:
        (T,) coefficients ``w``: the PCGrad update is ``sum_k w_k g_k``.
    """
    t = gram.shape[0]
    coef = torch.eye(t, dtype=gram.dtype)  # row i: projected g_i in the basis of the original g_k
    for i in range(t):
        for j in order[i]:
            dot = coef[i] @ gram[:, j]
            if dot < 0 and gram[j, j] > 0:
                coef[i, j] -= dot / gram[j, j]
    return coef.sum(dim=0)


class PCGradWeighting(WeightingStrategy):
    """Projecting Conflicting Gradients on the shared parameters.

    Args:
        task_names: the tasks.
        seed: seeds the projection order (with the step count), identical on every rank.
    """

    single_backward = False  # per-task gradients first: averaged by sync_gradients

    def __init__(self, task_names: list[str], seed: int = 0):
        super().__init__(task_names)
        self.seed = int(seed)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def _order(self) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.steps))
        t = self.num_tasks
        return [[j for j in torch.randperm(t, generator=gen).tolist() if j != i] for i in range(t)]

    def backward(self, losses: dict[str, torch.Tensor], shared_params: list[torch.Tensor]) -> dict[str, float]:
        params = [p for p in shared_params if p.requires_grad]
        grads = per_task_gradients(ordered_losses(losses, self.task_names), params, accumulate_others=True)
        grads = all_reduce_mean(grads)
        gram = (grads @ grads.T).double().cpu()
        coef = pcgrad_coefficients(gram, self._order())
        add_flat_gradient(params, coef.to(grads) @ grads)
        self.steps += 1
        return self._report(coef)
