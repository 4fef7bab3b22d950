"""Equal weighting: the plain sum of the task losses (the baseline every method is compared to)."""

from __future__ import annotations

import torch

from mtseg.weighting.base import WeightingStrategy


class EqualWeighting(WeightingStrategy):
    """``L = sum_i L_i``: every task weighted 1."""

    def combine(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return losses.sum(), torch.ones_like(losses)
