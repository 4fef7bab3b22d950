"""Semantic segmentation: one of K COCO categories or background per pixel.

Target ``batch["semantic"]`` (B, H, W) int64, 0 = background, 1..K, 255 = crowd (ignored).
Head: K+1 logits. Loss: cross-entropy. Metric: mIoU and pixel accuracy of the fused semantic
map (:func:`mtseg.fusion.fuse_semantic`), the argmax of the logits without one. Picture: the
categories over the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from mtseg.data.targets import Instances, WireField, label_field
from mtseg.metrics.dense import ConfusionMatrix
from mtseg.render import class_picture
from mtseg.tasks.base import Task, image_weights, masked_cross_entropy, resize_map


@dataclass(frozen=True)
class SemanticTask(Task):
    """Per-pixel category classification.

    Attributes:
        num_classes: K categories + background.
    """

    num_classes: int
    name: ClassVar[str] = "semantic"
    target_keys: ClassVar[tuple[str, ...]] = ("semantic",)
    objective: ClassVar[str] = "miou"

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

    def metric(self) -> ConfusionMatrix:
        return ConfusionMatrix(self.num_classes)

    def update_metric(self, metric, output, batch, prediction=None) -> None:
        metric.update(output.argmax(1) if prediction is None else prediction, batch["semantic"])

    def compute_metric(self, metric) -> dict[str, float]:
        r = metric.compute()
        return {"miou": r["miou"], "pixel_acc": r["pixel_acc"]}

    def output_map(self, output, size):
        return resize_map(output.argmax(0, keepdim=True), size, "nearest")[0].numpy()

    def target_map(self, batch, index):
        return batch["semantic"][index].cpu().numpy()

    def draw(self, image, values, categories):
        return class_picture(image, values, categories)
