"""Static weighting: fixed per-task weights from the config (the weights Ray Tune searches)."""

from __future__ import annotations

import torch

from mtseg.weighting.base import WeightingStrategy


class StaticWeighting(WeightingStrategy):
    """``L = sum_i w_i L_i`` with constant ``w_i``.

    Args:
        task_names: the tasks.
        weights: ``{task: weight}``; a task not named gets 1.0; weights must be >= 0.
    """

    def __init__(self, task_names: list[str], weights: dict[str, float] | None = None):
        super().__init__(task_names)
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(task_names))
        if unknown:
            raise ValueError(f"weighting.static: {unknown[0]!r} is not a task of this run ({', '.join(task_names)})")
        values = [float(weights.get(name, 1.0)) for name in task_names]
        for name, w in zip(task_names, values):
            if w < 0:
                raise ValueError(f"weighting.static.{name}: weight {w} must be >= 0")
        # A buffer, so the weights a checkpoint was trained with travel with it.
        self.register_buffer("weights", torch.tensor(values, dtype=torch.float32))

    def combine(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weights.to(losses.device)
        return (w * losses).sum(), w
