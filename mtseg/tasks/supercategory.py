"""Supercategory segmentation, tied to the category head through the COCO hierarchy.

Target ``batch["supercategory"]`` (B, H, W) int64, 0 = background, 1..S, 255 = crowd.
Head: S+1 logits. Loss: cross-entropy. Metric: mIoU (``supercategory_miou``). Picture: the
supercategories over the image, with a legend.

Hierarchical tie (``cfg.tasks.hierarchical``): the category output becomes
``log p(c) = log p(super(c)) + log p(c | super(c))``, with ``p(c | s)`` a softmax of the
category logits restricted to the categories of ``s`` (``CategoryIndex.class_to_super``,
built from the manifest's categories). The category loss then trains both heads, and a
category's probability can only be high where its supercategory's is. The fusion step
(:func:`mtseg.fusion.fuse_semantic`) makes the final argmax consistent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from mtseg.data.categories import IGNORE_INDEX
from mtseg.data.targets import Instances, WireField, label_field
from mtseg.metrics.dense import ConfusionMatrix
from mtseg.render import labelled
from mtseg.tasks.base import Task, image_weights, masked_cross_entropy, resize_map


def hierarchical_log_probs(
    category_logits: torch.Tensor, super_logits: torch.Tensor, class_to_super: torch.Tensor
) -> torch.Tensor:
    """Category log-probabilities factorised through the supercategory.

    Args:
        category_logits: (B, K+1, h, w) raw category logits (class 0 = background).
        super_logits: (B, S+1, h, w) supercategory logits (0 = background).
        class_to_super: (K+1,) int64 supercategory index of every category index.

    Returns:
        (B, K+1, h, w) float32 ``log p(super(c)) + log softmax_{c' in super(c)}(z)_c``;
        its softmax sums to 1 over categories, so it is a valid logit tensor.
    """
    z = category_logits.float()
    b, k, h, w = z.shape
    s = super_logits.shape[1]
    index = class_to_super.view(1, k, 1, 1).expand(b, k, h, w)
    # Log-sum-exp within each supercategory group, stabilised by the group's own max so
    # that a group far below the global max does not underflow to log(0).
    group_max = z.new_full((b, s, h, w), float("-inf")).scatter_reduce(1, index, z, "amax", include_self=True)
    shifted = z - group_max.index_select(1, class_to_super)
    group_sum = z.new_zeros((b, s, h, w)).scatter_add(1, index, shifted.exp())
    log_conditional = shifted - group_sum.index_select(1, class_to_super).log()
    log_super = torch.log_softmax(super_logits.float(), dim=1)
    return log_super.index_select(1, class_to_super) + log_conditional


@dataclass(frozen=True)
class SupercategoryTask(Task):
    """Per-pixel supercategory classification.

    Attributes:
        num_supercategories: S supercategories + background.
        class_to_super: supercategory index of each category index (0 = background).
        hierarchical: tie the ``semantic`` output to this head (see the module docstring).
    """

    num_supercategories: int
    class_to_super: tuple[int, ...]
    hierarchical: bool = True
    name: ClassVar[str] = "supercategory"
    head_width: ClassVar[float] = 0.5
    target_keys: ClassVar[tuple[str, ...]] = ("supercategory",)
    objective: ClassVar[str] = "supercategory_miou"
    requires: ClassVar[tuple[str, ...]] = ("semantic",)
    _index_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_config(cls, cfg, categories) -> SupercategoryTask:
        return cls(
            num_supercategories=categories.num_supercategories,
            class_to_super=tuple(categories.class_to_super),
            hierarchical=cfg.tasks.hierarchical,
        )

    def target_fields(self, image_size: int) -> dict[str, WireField]:
        return {"supercategory": label_field(image_size, self.num_supercategories)}

    def build_targets(self, instances: Instances) -> dict[str, np.ndarray]:
        # Category map -> supercategory map through a lookup table; crowd (ignore) stays ignore.
        lut = np.full(256, IGNORE_INDEX, np.int64)
        lut[: len(self.class_to_super)] = self.class_to_super
        return {"supercategory": lut[instances.semantic]}

    @property
    def out_channels(self) -> int:
        return self.num_supercategories

    def _index(self, device: torch.device) -> torch.Tensor:
        # Cached per device: a host-to-device copy every step would be wasted work.
        if device not in self._index_cache:
            self._index_cache[device] = torch.tensor(self.class_to_super, dtype=torch.int64, device=device)
        return self._index_cache[device]

    def refine_outputs(self, outputs: dict[str, torch.Tensor]) -> None:
        if not self.hierarchical or "semantic" not in outputs:
            return
        semantic = outputs["semantic"]
        if semantic.shape[1] != len(self.class_to_super):
            raise ValueError(
                f"task supercategory: semantic output has {semantic.shape[1]} classes, "
                f"the hierarchy has {len(self.class_to_super)}"
            )
        outputs["semantic"] = hierarchical_log_probs(semantic, outputs[self.name], self._index(semantic.device))

    def loss(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check_batch(output, batch)
        target = batch["supercategory"]
        return masked_cross_entropy(output, target, image_weights(batch, target))

    def metric(self) -> ConfusionMatrix:
        return ConfusionMatrix(self.num_supercategories)

    def update_metric(self, metric, output, batch, prediction=None) -> None:
        metric.update(output.argmax(1) if prediction is None else prediction, batch["supercategory"])

    def compute_metric(self, metric) -> dict[str, float]:
        return {"supercategory_miou": metric.compute()["miou"]}

    def output_map(self, output, size):
        return resize_map(output.argmax(0, keepdim=True), size, "nearest")[0].numpy()

    def target_map(self, batch, index):
        return batch["supercategory"][index].cpu().numpy()

    def draw(self, image, values, categories):
        return labelled(image, values, categories.supercategories)
