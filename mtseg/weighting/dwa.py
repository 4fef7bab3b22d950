"""Dynamic Weight Average: Liu, Johns and Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019.

Task weights follow the rate at which each task's loss falls:

    w_k(t) = K * exp(r_k(t-1) / T) / sum_i exp(r_i(t-1) / T),   r_k(t-1) = L_k(t-1) / L_k(t-2)

with ``L_k(t)`` the average loss of task k over epoch t, ``T`` the temperature and
``w_k = 1`` for the first two epochs. A task whose loss stopped falling (ratio near 1)
gets more weight than one still improving fast.

The strategy tracks the epoch averages from ``backward`` calls; :meth:`DWAWeighting.on_epoch_end`
averages them over ranks (call it on every rank), so every rank derives the same weights.
"""

from __future__ import annotations

import torch

from mtseg.weighting.base import WeightingStrategy, all_reduce_mean


class DWAWeighting(WeightingStrategy):
    """Dynamic Weight Average.

    Args:
        task_names: the tasks.
        temperature: ``T``; larger values flatten the weights toward 1.
    """

    def __init__(self, task_names: list[str], temperature: float = 2.0):
        super().__init__(task_names)
        if temperature <= 0:
            raise ValueError(f"weighting.dwa_temperature: {temperature} must be > 0")
        self.temperature = float(temperature)
        t = len(task_names)
        self.register_buffer("weights", torch.ones(t))
        self.register_buffer("epoch_sum", torch.zeros(t, dtype=torch.float64))
        self.register_buffer("epoch_count", torch.zeros((), dtype=torch.float64))
        # Average losses of the last two finished epochs: row 0 = t-2, row 1 = t-1.
        self.register_buffer("history", torch.zeros(2, t, dtype=torch.float64))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.int64))

    def combine(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            self.epoch_sum += losses.detach().to(self.epoch_sum)
            self.epoch_count += 1
        w = self.weights.to(losses.device)
        return (w * losses).sum(), w

    def on_epoch_end(self) -> None:
        """Close the epoch: record its average losses (over all ranks) and set the next weights."""
        totals = all_reduce_mean(torch.cat([self.epoch_sum, self.epoch_count.view(1)]))
        sums, count = totals[:-1], totals[-1]
        self.epoch_sum.zero_()
        self.epoch_count.zero_()
        if count <= 0:
            return  # an epoch without steps changes nothing
        self.history[0] = self.history[1]
        self.history[1] = sums / count
        self.epochs_seen += 1
        if int(self.epochs_seen) >= 2:
            self.weights.copy_(dwa_weights(self.history[1], self.history[0], self.temperature).to(self.weights))


def dwa_weights(last: torch.Tensor, before: torch.Tensor, temperature: float) -> torch.Tensor:
    """DWA weights from the last two epoch-average losses: ``K * softmax((last / before) / T)``."""
    ratio = last / before.clamp_min(1e-12)
    return len(last) * torch.softmax(ratio / temperature, dim=0)
