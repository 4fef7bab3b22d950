"""Semantic segmentation: one of K COCO categories or background per pixel.

Target ``batch["semantic"]`` (B, H, W) int64, 0 = background, 1..K, 255 = crowd (ignored).
Head: K+1 logits. Loss: cross-entropy. Metric: mIoU and pixel accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from mtseg.data.targets import Instances, WireField, label_field
from mtseg.tasks.base import ConfusionMatrix, Task, image_weights, labeled_mask, masked_cross_entropy


class SemanticMetric(ConfusionMatrix):
    """mIoU and pixel accuracy of the argmax of the semantic logits."""

    def update(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        target = batch["semantic"]
        keep = labeled_mask(batch, target)
        self.update_labels(output.argmax(1), target, None if keep is None else keep.expand_as(target))


@dataclass(frozen=True)
class SemanticTask(Task):
    """Per-pixel category classification.

    Attributes:
        num_classes: K categories + background.
    """

    num_classes: int
    name: ClassVar[str] = "semantic"
    target_keys: ClassVar[tuple[str, ...]] = ("semantic",)

    @classmethod
    def from_config(cls, cfg, categories) -> SemanticTask:
        return cls(num_classes=categories.num_classes)

    def target_fields(self, image_size: int) -> dict[str, WireField]:
        return {"semantic": label_field(image_size, self.num_classes)}

    def build_targets(self, instances: Instances) -> dict[str, np.ndarray]:
        return {"semantic": instances.semantic}

    @property
    def out_channels(self) -> int:
        return self.num_classes

    def loss(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check_batch(output, batch)
        target = batch["semantic"]
        return masked_cross_entropy(output, target, image_weights(batch, target))

    def metric(self) -> SemanticMetric:
        return SemanticMetric(self.num_classes)
