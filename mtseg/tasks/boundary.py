"""Boundary detection: instance and class edges, a few pixels wide.

Target ``batch["boundary"]`` (B, H, W) float32, 1 on edges. Head: 1 logit.
Loss: BCE with a positive weight balancing edge against non-edge pixels (Xie and Tu
2015, HED), since edges cover a few percent of the pixels and plain BCE learns to
predict none. Metric: boundary F1, precision and recall (:class:`mtseg.metrics.BoundaryF1`) of
``logit > 0`` against the target, matching within :data:`BOUNDARY_TOLERANCE` pixels (Euclidean
distance: a disk). Picture: the boundary probability on a fixed 0..1 scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from mtseg.data.targets import Instances, WireField
from mtseg.metrics.dense import BoundaryF1
from mtseg.render import heatmap
from mtseg.tasks.base import Task, resize_map, valid_pixels, weighted_mean

# Caps the balancing weight: a crop with a handful of edge pixels would otherwise weight
# each of them by thousands and make the loss spike.
MAX_POS_WEIGHT = 20.0

#: Pixels a predicted edge may lie from a true one (and back) and still match: edges are a
#: few pixels wide and upsampled logits blur them by about as much.
BOUNDARY_TOLERANCE = 2


def boundary_map(segments: np.ndarray, width: int) -> np.ndarray:
    """(H, W) float32: 1 on the pixels of a segment with a different segment within ``width`` px (Chebyshev).

    Every segment's edge (instance or crowd region, so every class change too), on its inside.
    The image border is not an edge: after a crop it is not an object's outline.

    A (2w+1)^2 window holds two ids exactly when it holds two neighbouring pixels (a
    horizontal or a vertical pair) that differ, since the window is connected. So the edge
    map is the map of differing pairs, each spread over the windows that contain it: a few
    shifted boolean ORs along each axis, instead of a max- and a min-pool over the ids.

    Args:
        segments: (H, W) integer id of the segment owning each pixel, 0 = background.
        width: edge thickness, pixels (>= 1).
    """
    h, w = segments.shape
    if not segments.any():
        return np.zeros((h, w), np.float32)
    # Pair (x, x+1) lies in the window of column c when c - width <= x <= c + width - 1.
    across = _spread(segments[:, 1:] != segments[:, :-1], width, 1, 2 * width)
    across = _spread(across, width, 0, 2 * width + 1)
    down = _spread(segments[1:, :] != segments[:-1, :], width, 0, 2 * width)
    down = _spread(down, width, 1, 2 * width + 1)
    edge = (across | down) & (segments > 0)
    return edge.astype(np.float32)


def _spread(changes: np.ndarray, width: int, axis: int, span: int) -> np.ndarray:
    """OR over ``span`` consecutive entries along ``axis``, starting ``width`` places back (False beyond the ends).

    Along ``axis`` the result has ``len + 2 * width - span + 1`` entries: n for the n - 1
    pairs between n pixels (span 2w) and for the n pixels themselves (span 2w + 1).
    """
    pad = [(0, 0), (0, 0)]
    pad[axis] = (width, width)
    padded = np.pad(changes, pad)
    n_out = padded.shape[axis] - span + 1
    window = (lambda k: padded[k : k + n_out]) if axis == 0 else (lambda k: padded[:, k : k + n_out])
    out = window(0).copy()
    for k in range(1, span):
        out |= window(k)
    return out


def balanced_bce(logit: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """BCE with ``pos_weight = #negatives / #positives`` (capped), averaged over counted pixels.

    Args:
        logit: (B, H, W) edge logits.
        target: (B, H, W) float edge map in {0, 1}.
        weight: (B, H, W) pixel weights (0 = not counted) or None.

    Returns:
        The scalar loss.
    """
    logit, target = logit.float(), target.float()
    with torch.no_grad():
        counted = target.numel() if weight is None else weight.sum()
        pos = target.sum() if weight is None else (target * weight).sum()
        pos_weight = ((counted - pos) / pos.clamp_min(1.0)).clamp(1.0, MAX_POS_WEIGHT)
    loss = F.binary_cross_entropy_with_logits(logit, target, pos_weight=pos_weight, reduction="none")
    return weighted_mean(loss, weight)


@dataclass(frozen=True)
class BoundaryTask(Task):
    """Per-pixel edge detection (crowd pixels are not counted).

    Attributes:
        width: thickness of the target's edges, pixels (``tasks.boundary_width``).
    """

    width: int = 2
    name: ClassVar[str] = "boundary"
    head_width: ClassVar[float] = 0.5
    target_keys: ClassVar[tuple[str, ...]] = ("boundary",)
    objective: ClassVar[str] = "boundary_f1"
    requires: ClassVar[tuple[str, ...]] = ("semantic",)

    @classmethod
    def from_config(cls, cfg, categories) -> BoundaryTask:
        return cls(width=cfg.tasks.boundary_width)

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"tasks.boundary_width: must be >= 1, got {self.width}")

    def target_fields(self, image_size: int) -> dict[str, WireField]:
        return {"boundary": WireField((image_size, image_size), np.dtype(np.uint8), torch.float32)}

    def build_targets(self, instances: Instances) -> dict[str, np.ndarray]:
        return {"boundary": boundary_map(instances.segments, self.width)}

    @property
    def out_channels(self) -> int:
        return 1

    def loss(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check_batch(output, batch)
        target = batch["boundary"]
        return balanced_bce(output[:, 0], target, valid_pixels(batch, target))

    def metric(self) -> BoundaryF1:
        return BoundaryF1(BOUNDARY_TOLERANCE)

    def update_metric(self, metric, output, batch, prediction=None) -> None:
        # sigmoid(x) > 0.5 <=> x > 0, without computing the sigmoid.
        metric.update_from_maps(output[:, 0] > 0, batch["boundary"] > 0.5)

    def compute_metric(self, metric) -> dict[str, float]:
        return metric.compute()

    def output_map(self, output, size):
        return resize_map(torch.sigmoid(output[:1]), size, "bilinear")[0].numpy()

    def target_map(self, batch, index):
        return batch["boundary"][index].cpu().numpy()

    def draw(self, image, values, categories):
        return heatmap(values, stretch=False)
