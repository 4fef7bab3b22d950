"""Instance centers and offsets (Panoptic-DeepLab, Cheng et al. 2020).

Targets: ``center`` (B, 1, H, W) Gaussian heatmap, ``offset`` (B, 2, H, W) (dy, dx) from
each thing pixel to its instance center, ``thing_mask`` (B, H, W). Head: 3 channels
(center heatmap, dy, dx in input pixels). Loss: ``center_weight * MSE(center)`` over
non-crowd pixels + ``offset_weight * L1(offset)`` over thing pixels, with the paper's
weights 200 and 0.01. Metric: COCO mask AP and panoptic quality of the instances
:mod:`mtseg.fusion` groups from this head and the semantic one (the evaluator scores them when
given the COCO ground truth); Δm% takes the mask AP. Picture: the center heatmap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from mtseg.data.targets import Instances, WireField
from mtseg.render import heatmap
from mtseg.tasks.base import Task, image_weights, resize_map, valid_pixels, weighted_mean

# The Gaussian is cut at this many sigmas: beyond it the values are < 1.2e-4 and only cost time.
_GAUSSIAN_RADIUS_SIGMAS = 3.0

_MAX_IMAGE_SIZE = np.iinfo(np.int16).max


def center_targets(instances: np.ndarray, n: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Center heatmap and offsets from a map of visible instance ids.

    Args:
        instances: (H, W) int64 id (1..n) of the non-crowd instance owning each pixel, 0 = none.
        n: the number of ids (annotations) the map may hold.
        sigma: Gaussian sigma, pixels.

    Returns:
        ``center`` float32 (1, H, W): max over instances of a Gaussian with peak 1 at each
        instance's mass centroid (rounded to the pixel grid); ``offset`` float32 (2, H, W):
        (dy, dx) from each instance pixel to its centroid, 0 elsewhere.
    """
    h, w = instances.shape
    center = np.zeros((1, h, w), np.float32)
    offset = np.zeros((2, h, w), np.float32)
    if n == 0 or not instances.any():
        return center, offset
    # The map as horizontal runs of one id (a few per row where instances are): per-instance
    # sums over runs instead of pixels, and the offsets written run by run with one repeat.
    # Every sum is of integers, exact in float64 in any order, so the centroids are those of
    # a pixel loop.
    starts = np.ones((h, w), bool)
    starts[:, 1:] = instances[:, 1:] != instances[:, :-1]
    ys, xs = np.nonzero(starts)
    ids = instances[ys, xs]
    stops = np.empty_like(xs)
    stops[:-1] = np.where(ys[1:] == ys[:-1], xs[1:], w)
    stops[-1] = w
    lengths = stops - xs
    count = np.bincount(ids, weights=lengths, minlength=n + 1)
    rows = np.bincount(ids, weights=ys * lengths, minlength=n + 1)
    cols = np.bincount(ids, weights=(xs + stops - 1) * lengths // 2, minlength=n + 1)  # x + ... + (stop - 1)
    visible = count > 0
    visible[0] = False
    safe = np.maximum(count, 1.0)
    # Rounded to the pixel grid so the heatmap peaks at exactly 1.0 where the offsets point.
    cy, cx = np.rint(rows / safe), np.rint(cols / safe)

    # Whole pixels, exact in float32 (|offset| < 2**24); 0 outside instances.
    inside = ids > 0
    dy = np.where(inside, cy[ids] - ys, 0.0).astype(np.float32)
    offset[0] = np.repeat(dy, lengths).reshape(h, w)
    np.subtract(
        np.repeat(cx.astype(np.float32)[ids], lengths).reshape(h, w),
        np.arange(w, dtype=np.float32),
        out=offset[1],
        where=instances > 0,
    )

    radius = int(np.ceil(_GAUSSIAN_RADIUS_SIGMAS * sigma))
    g = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(g[:, None] ** 2 + g[None, :] ** 2) / (2.0 * sigma**2)).astype(np.float32)
    heat = center[0]
    for i in np.flatnonzero(visible):  # one window per instance, not per pixel
        y, x = int(cy[i]), int(cx[i])
        y0, y1, x0, x1 = max(0, y - radius), min(h, y + radius + 1), max(0, x - radius), min(w, x + radius + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        patch = kernel[y0 - y + radius : y1 - y + radius, x0 - x + radius : x1 - x + radius]
        np.maximum(heat[y0:y1, x0:x1], patch, out=heat[y0:y1, x0:x1])
    return center, offset


@dataclass(frozen=True)
class InstanceTask(Task):
    """Center heatmap regression and center-offset regression.

    Attributes:
        center_weight: weight of the center MSE (Panoptic-DeepLab: 200).
        offset_weight: weight of the offset L1 (Panoptic-DeepLab: 0.01).
        center_sigma: sigma of the target's center Gaussians, pixels (``tasks.center_sigma``).
    """

    center_weight: float = 200.0
    offset_weight: float = 0.01
    center_sigma: float = 2.0
    name: ClassVar[str] = "instance"
    head_width: ClassVar[float] = 0.5
    target_keys: ClassVar[tuple[str, ...]] = ("center", "offset", "thing_mask")
    objective: ClassVar[str] = "mask_ap"
    requires: ClassVar[tuple[str, ...]] = ("semantic",)

    @classmethod
    def from_config(cls, cfg, categories) -> InstanceTask:
        return cls(center_sigma=cfg.tasks.center_sigma)

    def __post_init__(self) -> None:
        if self.center_sigma <= 0:
            raise ValueError(f"tasks.center_sigma: must be > 0, got {self.center_sigma}")

    def target_fields(self, image_size: int) -> dict[str, WireField]:
        if image_size > _MAX_IMAGE_SIZE:
            raise ValueError(f"data.image_size: the instance offsets need it <= {_MAX_IMAGE_SIZE}, got {image_size}")
        s = image_size
        # Offsets are whole pixels (centers are rounded to the grid), exact as int16.
        return {
            "center": WireField((1, s, s), np.dtype(np.float16), torch.float32),
            "offset": WireField((2, s, s), np.dtype(np.int16), torch.float32),
            "thing_mask": WireField((s, s), np.dtype(np.uint8), torch.float32),
        }

    def build_targets(self, instances: Instances) -> dict[str, np.ndarray]:
        things = instances.things
        center, offset = center_targets(np.where(things, instances.segments, 0), len(instances.labels), self.center_sigma)
        return {"center": center, "offset": offset, "thing_mask": things.astype(np.float32)}

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

    def output_map(self, output, size):
        return resize_map(output[:1].clamp(0, 1), size, "bilinear")[0].clamp(0, 1).numpy()

    def target_map(self, batch, index):
        return batch["center"][index, 0].cpu().numpy()

    def draw(self, image, values, categories):
        return heatmap(values, stretch=False)
