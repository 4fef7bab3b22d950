"""Uncertainty weighting: Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty
to Weigh Losses for Scene Geometry and Semantics", CVPR 2018.

Each task has a learned log-variance ``s_i = log sigma_i^2`` and the combined loss is

    L = sum_i 0.5 * exp(-s_i) * L_i + 0.5 * s_i

(the paper's regression form; LibMTL uses it for every task). For fixed ``L_i`` it is
minimised at ``s_i = log L_i``, where task i's weight ``0.5 * exp(-s_i)`` equals
``1 / (2 L_i)``: tasks with larger loss are down-weighted. The ``s_i`` are parameters of
this module, optimised by the trainer's optimiser (they should get no weight decay).
"""

from __future__ import annotations

import torch
from torch import nn

from mtseg.weighting.base import WeightingStrategy


class UncertaintyWeighting(WeightingStrategy):
    """Homoscedastic-uncertainty weighting with learned log-variances (initialised to 0)."""

    def __init__(self, task_names: list[str]):
        super().__init__(task_names)
        self.log_vars = nn.Parameter(torch.zeros(len(task_names)))

    def combine(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.log_vars.to(losses.device)
        weights = 0.5 * torch.exp(-s)
        return (weights * losses + 0.5 * s).sum(), weights
