"""Instance centers and offsets (Panoptic-DeepLab, Cheng et al. 2020).

Targets: ``center`` (B, 1, H, W) Gaussian heatmap, ``offset`` (B, 2, H, W) (dy, dx) from
each thing pixel to its instance center, ``thing_mask`` (B, H, W). Head: 3 channels
(center heatmap, dy, dx in input pixels). Loss: ``center_weight * MSE(center)`` over
non-crowd pixels + ``offset_weight * L1(offset)`` over thing pixels, with the paper's
weights 200 and 0.01. Metric: center MSE and offset end-point error; COCO mask AP comes
from :mod:`mtseg.fusion`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mtseg.tasks.base import Task, TaskMetric, image_weights, valid_pixels, weighted_mean


class InstanceMetric(TaskMetric):
    """Center heatmap MSE (non-crowd pixels) and mean offset end-point error (thing pixels)."""

    def update(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        center, offset = output[:, 0].float(), output[:, 1:3].float()
        weight = valid_pixels(batch, center)
        weight = torch.ones_like(center) if weight is None else weight
        sq = (center - batch["center"][:, 0].float()) ** 2
        things = batch["thing_mask"].float()
        image_w = image_weights(batch, things)
        if image_w is not None:
            things = things * image_w
        epe = (offset - batch["offset"].float()).norm(dim=1)
        self._add(torch.stack([(sq * weight).sum(), weight.sum(), (epe * things).sum(), things.sum()]))

    def compute(self) -> dict[str, float]:
        if self.totals is None:
            return {"center_mse": 0.0, "offset_epe": 0.0}
        se, n, epe, m = self.totals.tolist()
        return {"center_mse": se / n if n else 0.0, "offset_epe": epe / m if m else 0.0}


@dataclass(frozen=True)
class InstanceTask(Task):
    """Center heatmap regression and center-offset regression.

    Attributes:
        center_weight: weight of the center MSE (Panoptic-DeepLab: 200).
        offset_weight: weight of the offset L1 (Panoptic-DeepLab: 0.01).
    """

    center_weight: float = 200.0
    offset_weight: float = 0.01
    name: ClassVar[str] = "instance"
    head_width: ClassVar[float] = 0.5
    target_keys: ClassVar[tuple[str, ...]] = ("center", "offset", "thing_mask")

    @classmethod
    def from_config(cls, cfg, categories) -> InstanceTask:
        return cls()

    @property
    def out_channels(self) -> int:
        return 3

    def loss(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check_batch(output, batch)
        center, offset = output[:, 0].float(), output[:, 1:3].float()
        center_loss = weighted_mean((center - batch["center"][:, 0].float()) ** 2, valid_pixels(batch, center))
        things = batch["thing_mask"].float()
        image_w = image_weights(batch, things)
        if image_w is not None:
            things = things * image_w
        l1 = (offset - batch["offset"].float()).abs().sum(dim=1)
        offset_loss = (l1 * things).sum() / things.sum().clamp_min(1.0)
        return self.center_weight * center_loss + self.offset_weight * offset_loss

    def metric(self) -> InstanceMetric:
        return InstanceMetric()
