"""GradNorm: Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient Normalization
for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018.

Learned task weights ``w_i`` (sum fixed to T) are tuned so that each task's gradient
norm on the last shared layer ``W`` tracks its relative training rate:

    G_i = || grad_W (w_i L_i) ||,   G_bar = mean_i G_i
    r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))
    L_grad = sum_i | G_i - G_bar * r_i^alpha |     (the target G_bar r_i^alpha is held constant)

The network descends ``sum_i w_i L_i``; the weights descend ``L_grad`` (Adam, ``lr``) and
are renormalised to sum to T. A task that trains slower than the others (larger
``r_i``) gets a larger target norm and so a larger weight.

``W`` is the last weight tensor of ``shared_params`` (the paper's choice, "to save on
compute"): no pass through the encoder per task. Since ``grad_W (w_i L_i) = w_i grad_W
L_i``, ``dL_grad/dw_i = sign(G_i - target_i) * ||grad_W L_i||`` in closed form (no double
backward). DDP: the (T, |W|) gradients and the T losses travel in ONE all-reduce (mean).

``rep_grad=True``: LibMTL's representation-gradient mode (Lin and Zhang, "LibMTL: A Python
Library for Multi-Task Learning", JMLR 2023), an approximation: ``G_i`` is the norm at the
shared representation the heads read instead of at ``W``. The encoder runs ONE backward of
the summed representation gradients, so the network's update is still exactly the gradient
of ``sum_i w_i L_i``; only the norms the weights follow differ. DDP: each rank's squared
norms travel with the losses in the one all-reduce (the norm over the global batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mtseg.weighting.base import (
    Representation,
    WeightingStrategy,
    adam_update,
    all_reduce_mean,
    ordered_losses,
    per_task_gradients,
    representation_gradients,
    stack_losses,
)


def last_shared_layer(shared_params: list[torch.Tensor]) -> torch.Tensor:
    """The last weight tensor (ndim > 1) in ``shared_params``: GradNorm's ``W``."""
    weights = [p for p in shared_params if p.ndim > 1 and p.requires_grad]
    if not weights:
        raise ValueError("weighting: gradient-based strategies need shared parameters with a weight matrix; got none")
    return weights[-1]


class GradNormWeighting(WeightingStrategy):
    """GradNorm loss balancing.

    Args:
        task_names: the tasks.
        alpha: restoring-force strength (paper: 0.12 to 3; 1.5 for NYUv2).
        lr: learning rate of the weights' Adam.
        rep_grad: measure the gradient norms at the shared representation (an
            approximation; see the module docstring).
    """

    single_backward = False  # per-task gradients first: averaged by sync_gradients

    def __init__(self, task_names: list[str], alpha: float = 1.5, lr: float = 0.025, *, rep_grad: bool = False):
        super().__init__(task_names)
        t = len(task_names)
        self.alpha, self.lr = float(alpha), float(lr)
        self.rep_grad = self.uses_representation = bool(rep_grad)
        self.register_buffer("weights", torch.ones(t))
        self.register_buffer("initial_losses", torch.zeros(t))
        self.register_buffer("has_initial", torch.zeros((), dtype=torch.bool))
        self.register_buffer("exp_avg", torch.zeros(t))
        self.register_buffer("exp_avg_sq", torch.zeros(t))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.int64))

    def weight_gradient(self, grad_norms: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """``dL_grad/dw`` from the unweighted per-task gradient norms ``||grad_W L_i||`` and the losses."""
        w = self.weights
        g = w * grad_norms
        ratio = losses / self.initial_losses.clamp_min(1e-12)
        rate = ratio / ratio.mean().clamp_min(1e-12)
        target = g.mean() * rate.pow(self.alpha)
        return torch.sign(g - target) * grad_norms

    def backward(
        self,
        losses: dict[str, torch.Tensor],
        shared_params: list[torch.Tensor],
        representation: Representation | None = None,
    ) -> dict[str, float]:
        vec = stack_losses(losses, self.task_names)
        t = len(self.task_names)
        used = self.weights.clone()
        if self.rep_grad:
            if representation is None:
                raise ValueError("weighting.rep_grad: the model passed no representation (model(images, representation=True))")
            features, leaf = representation
            scales = used.to(vec.device)
            rep = representation_gradients(ordered_losses(losses, self.task_names), leaf, scales)
            features.backward(rep.sum(0))
            sq_norms = rep.reshape(t, -1).float().pow(2).sum(1) / scales.pow(2)
            payload = all_reduce_mean(torch.cat([sq_norms, vec.detach().to(sq_norms)]))
            # Each rank's share of the global mean loss is 1/world of its own: the global norm.
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            grad_norms, global_losses = (payload[:t] / world).sqrt(), payload[t:]
        else:
            layer = last_shared_layer(shared_params)
            grads = per_task_gradients(ordered_losses(losses, self.task_names), [layer], accumulate_others=False)
            payload = all_reduce_mean(torch.cat([grads.reshape(-1), vec.detach().to(grads)]))
            grads, global_losses = payload[:-t].view(t, -1), payload[-t:]
            grad_norms = grads.norm(dim=1)
            (used.to(vec.device) * vec).sum().backward()
        with torch.no_grad():
            global_losses = global_losses.to(self.weights)
            if not bool(self.has_initial):
                self.initial_losses.copy_(global_losses)
                self.has_initial.fill_(True)
            grad_w = self.weight_gradient(grad_norms.to(self.weights), global_losses)
            adam_update(self.weights, grad_w, self.exp_avg, self.exp_avg_sq, self.adam_step, lr=self.lr)
            # Renormalise to sum T (paper), keeping every weight positive.
            self.weights.clamp_(min=1e-3)
            self.weights.mul_(t / self.weights.sum())
        return self._report(used)
