"""PCGrad: Yu, Kumar, Gupta, Levine, Hausman and Finn, "Gradient Surgery for Multi-Task
Learning", NeurIPS 2020.

For each task i, in a random order over the other tasks j: if the (already projected)
gradient ``g_i`` conflicts with ``g_j`` (``g_i . g_j < 0``), remove the conflicting
component, ``g_i <- g_i - (g_i . g_j) / ||g_j||^2 g_j``. The shared parameters get the
sum of the projected gradients; each head gets its own task's gradient.

Every projected ``g_i`` stays a linear combination of the original task gradients, so
the surgery runs on the T x T Gram matrix ``G G^T`` and yields coefficients ``w`` with
``update = w^T G`` (O(T^2) work after the Gram product). ``w`` is reported as the weights.

Two modes (see "Per-task gradients through the encoder" in :mod:`mtseg.weighting.base`):

* exact (default): the surgery on the per-task gradients of the shared parameters, the T
  encoder backwards looped or, with ``batched=True``, as one vmap backward. The loop is the
  default because it measured faster on CPU (benchmarks/multitask.py: 4.0x equal
  weighting's step looped, 5.0x batched): vmap does the same arithmetic plus the copies of
  its batching rules; on a GPU batching may win (``weighting.pcgrad_batched``). DDP: the
  (T, P) matrix is averaged over ranks in ONE all-reduce.
* ``rep_grad=True``: LibMTL's representation-gradient mode (Lin and Zhang, "LibMTL: A
  Python Library for Multi-Task Learning", JMLR 2023), an approximation: the Gram matrix
  ``R R^T`` of the gradients at the shared representation stands in for ``G G^T = R J J^T
  R^T``, and the encoder runs ONE backward of ``w^T R``. Unlike LibMTL, which sums R over
  the batch first, every sample's features are coordinates of R. DDP: the (T, T) Gram
  matrix is averaged in one all-reduce (the global batch's, up to a scale PCGrad ignores).

The random order comes from a generator seeded by the step count, so every rank computes
the same ``w`` and writes the same shared ``.grad``.
"""

from __future__ import annotations

import torch

from mtseg.weighting.base import (
    Representation,
    WeightingStrategy,
    add_flat_gradient,
    all_reduce_mean,
    encoder_gradients,
    ordered_losses,
    per_task_gradients,
    representation_gradients,
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
        rep_grad: project the gradients at the shared representation instead (an
            approximation, one encoder backward; see the module docstring).
        batched: exact mode: the per-task encoder backwards as one batched backward (vmap).
    """

    single_backward = False  # per-task gradients first: averaged by sync_gradients
    uses_representation = True

    def __init__(self, task_names: list[str], *, rep_grad: bool = False, batched: bool = False):
        super().__init__(task_names)
        self.rep_grad, self.batched = bool(rep_grad), bool(batched)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def _order(self) -> list[list[int]]:
        gen = torch.Generator().manual_seed(int(self.steps))
        t = len(self.task_names)
        return [[j for j in torch.randperm(t, generator=gen).tolist() if j != i] for i in range(t)]

    def backward(
        self,
        losses: dict[str, torch.Tensor],
        shared_params: list[torch.Tensor],
        representation: Representation | None = None,
    ) -> dict[str, float]:
        params = [p for p in shared_params if p.requires_grad]
        ordered = ordered_losses(losses, self.task_names)
        if representation is None:
            if self.rep_grad:
                raise ValueError("weighting.rep_grad: the model passed no representation (model(images, representation=True))")
            grads = per_task_gradients(ordered, params, accumulate_others=True)
        else:
            features, leaf = representation
            rep = representation_gradients(ordered, leaf)
            if self.rep_grad:
                flat = rep.reshape(len(self.task_names), -1).float()
                coef = pcgrad_coefficients(all_reduce_mean(flat @ flat.T).double().cpu(), self._order())
                features.backward(torch.einsum("t,t...->...", coef.to(rep), rep))
                self.steps += 1
                return self._report(coef)
            grads = encoder_gradients(features, rep, params, batched=self.batched)
        grads = all_reduce_mean(grads)
        gram = (grads @ grads.T).double().cpu()
        coef = pcgrad_coefficients(gram, self._order())
        add_flat_gradient(params, coef.to(grads) @ grads)
        self.steps += 1
        return self._report(coef)
