"""The interface every task implements, and helpers shared by the task modules.

A task owns its targets, built from each image's decoded instances in the data stream, and
their keys in the batch (``build_targets`` / ``target_fields``), which batch keys its loss
reads (``target_keys``), its head (``build_head``), its loss (``loss``, stateless) and its
metric (``metric``). It may
also transform the model's input (``transform_inputs``: the reconstruction task masks
patches) and refine the raw head outputs (``refine_outputs``: the supercategory task
ties the category head to the COCO hierarchy). The model and the trainer call these
hooks on every task alike; nothing branches on a task's name.

Images without annotations (``batch["labeled"] == False``, optional, default all
labeled) contribute only to unsupervised losses: supervised tasks weight each image by
that flag, so one batch may mix labeled and unlabeled images.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from mtseg.data.categories import IGNORE_INDEX

if TYPE_CHECKING:
    import numpy as np

    from mtseg.config import Config
    from mtseg.data.categories import CategoryIndex
    from mtseg.data.targets import Instances, WireField


class TaskMetric(ABC):
    """A streaming metric: ``update`` per batch, ``reduce_from_all_processes`` once, ``compute``."""

    def __init__(self) -> None:
        self.totals: torch.Tensor | None = None

    @abstractmethod
    def update(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Accumulate one batch (``output`` is this task's model output)."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """The metric values so far (names without a prefix, e.g. ``miou``)."""

    def reset(self) -> None:
        self.totals = None

    def _add(self, values: torch.Tensor) -> None:
        # Sums live in one float64 tensor so that merging across workers is one all_reduce.
        values = values.detach().to(torch.float64)
        self.totals = values if self.totals is None else self.totals + values.to(self.totals.device)

    def reduce_from_all_processes(self) -> None:
        """Sum the accumulated totals over all workers (collective: call on every rank)."""
        if self.totals is not None and dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.totals)


class Task(ABC):
    """One task of the multi-task model.

    Attributes:
        name: the task's key in configs, model outputs and losses.
        target_keys: the batch keys its loss reads.
    """

    name: ClassVar[str]
    target_keys: ClassVar[tuple[str, ...]]
    # Hidden width of the head relative to the decoder's. Heads predicting a few channels
    # (edges, centers, offsets, RGB) do with half, as Panoptic-DeepLab's instance head does;
    # this keeps the multi-task step close to the single-task one.
    head_width: ClassVar[float] = 1.0

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: Config, categories: CategoryIndex) -> Task:
        """Build the task from the resolved config and the dataset's label spaces."""

    def target_fields(self, image_size: int) -> dict[str, WireField]:
        """This task's targets in the batch: ``{key: WireField}`` for images of ``image_size`` px a side.

        Default: none (the task learns from the image alone, which the stream always carries).
        """
        return {}

    def build_targets(self, instances: Instances) -> dict[str, np.ndarray]:
        """One image's targets, an array per key of :meth:`target_fields` (batch dimension left out).

        Runs in the Ray Data workers, once per image after joint augmentation, on a task
        object shipped there with the stream (so it must pickle: a plain dataclass does).

        Args:
            instances: the image's decoded instances and the maps tasks share.
        """
        return {}

    @property
    @abstractmethod
    def out_channels(self) -> int:
        """Channels of the head output."""

    def build_head(self, in_channels: int) -> nn.Module:
        """The head: shared decoder feature ``(B, in_channels, h, w)`` -> ``(B, out_channels, h, w)``."""
        return conv_head(in_channels, self.out_channels, head_hidden(in_channels, self.head_width))

    def transform_inputs(
        self, images: torch.Tensor, batch: dict[str, torch.Tensor], *, train: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Change the model input for this task (default: unchanged); may add keys to ``batch``."""
        return images

    def refine_outputs(self, outputs: dict[str, torch.Tensor]) -> None:
        """Adjust raw head outputs in place, at decoder resolution, before upsampling (default: none)."""

    @abstractmethod
    def loss(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar loss of this task's output (at input resolution) against the batch targets."""

    @abstractmethod
    def metric(self) -> TaskMetric:
        """A fresh metric for this task."""

    def check_batch(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Raise one clear error if a target is missing or does not match the output's size."""
        for key in self.target_keys:
            if key not in batch:
                raise KeyError(f"task {self.name}: the batch has no {key!r} (has {', '.join(sorted(batch))})")
            if batch[key].shape[-2:] != output.shape[-2:]:
                raise ValueError(
                    f"task {self.name}: batch[{key!r}] is {tuple(batch[key].shape)}, "
                    f"output is {tuple(output.shape)}: spatial sizes differ"
                )


def conv_head(in_channels: int, out_channels: int, hidden: int | None = None) -> nn.Sequential:
    """A task head: 3x3 conv + BN + ReLU, then a 1x1 conv to ``out_channels``."""
    hidden = hidden or in_channels
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, out_channels, 1),
    )


def head_hidden(in_channels: int, width: float) -> int:
    """Hidden channels of a head: ``width * in_channels``, at least 16 (or ``in_channels`` if smaller)."""
    return min(in_channels, max(16, int(round(in_channels * width))))


def image_weights(batch: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor | None:
    """Per-image weight ``(B, 1, 1)`` from ``batch["labeled"]``, or None when every image is labeled."""
    labeled = batch.get("labeled")
    if labeled is None:
        return None
    return labeled.to(device=like.device, dtype=torch.float32).reshape(-1, 1, 1)


def labeled_mask(batch: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor | None:
    """``(B, 1, 1)`` bool of labeled images, or None when all are labeled."""
    labeled = batch.get("labeled")
    if labeled is None:
        return None
    return labeled.to(device=like.device, dtype=torch.bool).reshape(-1, 1, 1)


def valid_pixels(batch: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor | None:
    """``(B, H, W)`` float weight: 0 on crowd pixels (semantic target 255) and unlabeled images.

    Returns None when every pixel counts, so callers can take the cheaper plain mean.
    """
    weight = image_weights(batch, like)
    semantic = batch.get("semantic")
    if semantic is not None and semantic.shape[-2:] == like.shape[-2:]:
        keep = (semantic != IGNORE_INDEX).to(torch.float32)
        weight = keep if weight is None else keep * weight
    elif weight is not None:
        weight = weight.expand(-1, *like.shape[-2:])
    return weight


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` weighted by ``weight`` (broadcastable); 0 when all weights are 0."""
    if weight is None:
        return values.mean()
    weight = weight.expand_as(values)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, image_weight: torch.Tensor | None) -> torch.Tensor:
    """Pixel cross-entropy ignoring :data:`IGNORE_INDEX`, averaged over the counted pixels.

    Unlike ``F.cross_entropy(..., ignore_index=255)`` it returns 0, not NaN, when no pixel
    counts (an all-crowd crop, or a batch of unlabeled images).
    """
    loss = nn.functional.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="none")
    valid = (target != IGNORE_INDEX).to(torch.float32)
    if image_weight is not None:
        valid = valid * image_weight
    return (loss * valid).sum() / valid.sum().clamp_min(1.0)


class ConfusionMatrix(TaskMetric):
    """Confusion matrix over ``num_classes`` (bincount), ignoring :data:`IGNORE_INDEX`.

    Subclasses implement ``update`` (which output and target to compare) on top of
    :meth:`update_labels`.

    ``compute`` gives ``miou`` (mean over classes present in prediction or target) and
    ``pixel_acc``.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def update_labels(self, pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Accumulate predicted and true labels ``(B, H, W)``; ``keep`` masks pixels out."""
        n = self.num_classes
        valid = target != IGNORE_INDEX
        if keep is not None:
            valid &= keep
        idx = target[valid].to(torch.int64) * n + pred[valid].to(torch.int64)
        self._add(torch.bincount(idx, minlength=n * n).reshape(-1))

    def matrix(self) -> torch.Tensor:
        n = self.num_classes
        if self.totals is None:
            return torch.zeros(n, n, dtype=torch.float64)
        return self.totals.reshape(n, n).cpu()

    def compute(self) -> dict[str, float]:
        m = self.matrix()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        present = union > 0
        iou = tp[present] / union[present]
        total = m.sum()
        return {
            "miou": float(iou.mean()) if present.any() else 0.0,
            "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
        }
