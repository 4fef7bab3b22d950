"""The interface every task implements, and helpers shared by the task modules.

A task owns: its targets, built from each image's decoded instances in the data stream, and
their keys in the batch (``build_targets`` / ``target_fields``), which batch keys its loss
reads (``target_keys``), its head (``build_head``), its
loss (``loss``, stateless), its validation metric (``metric`` / ``update_metric`` /
``compute_metric``, built from the classes of :mod:`mtseg.metrics`), the metric Δm%
compares with its single-task baseline (``objective``, ``higher_is_better``, ``requires``)
and how its prediction is drawn (``output_map`` / ``target_map`` / ``draw``, with the
primitives of :mod:`mtseg.render`). It may also transform the model's input
(``transform_inputs``: the reconstruction task masks patches) and refine the raw head
outputs (``refine_outputs``: the supercategory task ties the category head to the COCO
hierarchy). The model, trainer, evaluator, predict, the demo and the Tune objective call
these hooks on every task alike; nothing outside ``mtseg/tasks/`` branches on a task's name
(:mod:`mtseg.fusion` combines specific heads by design).

Images without annotations (``batch["labeled"] == False``, optional, default all
labeled) contribute only to unsupervised losses: supervised tasks weight each image by
that flag, so one batch may mix labeled and unlabeled images.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from mtseg.data.categories import IGNORE_INDEX

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from mtseg.config import Config
    from mtseg.data.categories import CategoryIndex
    from mtseg.data.targets import Instances, WireField
    from mtseg.metrics.base import SumMetric


class Task(ABC):
    """One task of the multi-task model.

    Attributes:
        name: the task's key in configs, model outputs and losses.
        target_keys: the batch keys its loss reads.
        objective: the validation metric (key without the ``val/`` prefix) Δm% compares
            with the task's single-task baseline; a Tune search with Δm% needs one per task.
        higher_is_better: the direction of ``objective``.
        requires: tasks this one refines: its single-task baseline trains them beside it.
    """

    name: ClassVar[str]
    target_keys: ClassVar[tuple[str, ...]]
    objective: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ()
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

    def metric(self) -> SumMetric | None:
        """A fresh validation accumulator (a class of :mod:`mtseg.metrics`), or None (default)."""
        return None

    def update_metric(
        self, metric: SumMetric, output: torch.Tensor, batch: dict[str, torch.Tensor], prediction: torch.Tensor | None = None
    ) -> None:
        """Add one batch to ``metric`` (from :meth:`metric`).

        Args:
            metric: this task's accumulator.
            output: this task's model output at input resolution.
            batch: the batch with the task's targets.
            prediction: the fused prediction of this task when :mod:`mtseg.fusion` made one
                (the final semantic map); None: the task decides from ``output``.
        """

    def compute_metric(self, metric: SumMetric) -> dict[str, float]:
        """The values of ``metric``, keyed as reported without the ``val/`` prefix (e.g. ``miou``)."""
        return {}

    def output_map(self, output: torch.Tensor, size: tuple[int, int]) -> np.ndarray | None:
        """One image's output ``(C, h, w)`` as the map its picture shows, resized to ``size`` (H, W).

        None (default): the task draws no picture.
        """
        return None

    def target_map(self, batch: dict[str, torch.Tensor], index: int) -> np.ndarray | None:
        """Image ``index``'s target in :meth:`output_map`'s form (the demo draws it beside the prediction)."""
        return None

    def draw(self, image: np.ndarray, values: np.ndarray, categories: CategoryIndex) -> np.ndarray | Image.Image:
        """The picture of a map from :meth:`output_map` or :meth:`target_map`.

        Args:
            image: (H, W, 3) uint8 RGB at the map's size.
            values: the map.
            categories: label names for legends.

        Returns:
            (H, W, 3) uint8 RGB, a PIL image, or a :class:`mtseg.render.Picture` (a map of
            labels with the key to its colours, drawn beside it or merged into a row's legend).
        """
        raise NotImplementedError(f"task {self.name}: output_map without draw")

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


def resize_map(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(C, h, w) -> (C, H, W): ``nearest`` for labels (as float: exact below 2**24), else bilinear."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return nn.functional.interpolate(x[None].float(), size=size, mode="nearest")[0].to(x.dtype)
    return nn.functional.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False)[0]


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
