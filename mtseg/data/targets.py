"""Task decomposition: one image's COCO instances -> the target of every task.

Two steps, both pure numpy (with torch only for pooling):

* :func:`decode_annotations` turns a shard row's annotations (compressed RLE, COCO category
  ids) into binary instance masks with contiguous class labels;
* :func:`build_targets` turns those masks (usually after joint augmentation, at the model's
  input size) into the arrays of the training-batch contract: ``semantic``,
  ``supercategory``, ``boundary``, ``center``, ``offset`` and ``thing_mask``.

The reconstruction task needs only the image, so it has no target here.

Overlapping instances are resolved the way panoptic conversions of COCO do it: smaller
instances are painted over larger ones, so every pixel belongs to at most one instance and
the instance targets (centers, offsets) are computed on the visible part of each instance.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from mtseg.data.categories import IGNORE_INDEX, CategoryIndex

#: Keys :func:`build_targets` returns, in the order of the batch contract.
TARGET_KEYS = ("semantic", "supercategory", "boundary", "center", "offset", "thing_mask")

# The Gaussian is cut at this many sigmas: beyond it the values are < 1.2e-4 and only cost time.
_GAUSSIAN_RADIUS_SIGMAS = 3.0


def decode_annotations(
    annotations: Iterable[Mapping[str, Any]] | None,
    height: int,
    width: int,
    categories: CategoryIndex,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode a shard row's annotations into instance masks.

    Args:
        annotations: the row's ``annotations`` entries (``category_id``, ``iscrowd``,
            ``segmentation_size`` [h, w], ``segmentation_counts`` compressed RLE bytes, or str
            as in COCO JSON);
            None or empty for an image without labels.
        height: image height in pixels; every mask must have this size.
        width: image width in pixels.
        categories: the dataset's label space; annotations of unknown categories are dropped.

    Returns:
        ``masks`` uint8 (N, height, width) with values 0/1, ``labels`` int64 (N,) contiguous
        class indices (1..K), ``iscrowd`` bool (N,).

    Raises:
        ValueError: an annotation's mask size differs from (height, width) or its RLE is bad.
    """
    rles, labels, crowd = [], [], []
    for ann in annotations or ():
        try:
            label = categories.class_of(int(ann["category_id"]))
        except KeyError:
            continue  # a category outside this dataset's label space
        size = [int(v) for v in ann["segmentation_size"]]
        if size != [height, width]:
            raise ValueError(
                f"annotation {ann.get('id')}: mask size {size} differs from the image size {[height, width]}"
            )
        counts = ann["segmentation_counts"]
        # bytes as stored in shards; str as in COCO JSON's compressed RLE
        counts = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
        rles.append({"size": size, "counts": counts})
        labels.append(label)
        crowd.append(bool(ann.get("iscrowd", 0)))
    if not rles:
        return np.zeros((0, height, width), np.uint8), np.zeros((0,), np.int64), np.zeros((0,), bool)
    try:
        decoded = mask_utils.decode(rles)  # (H, W, N), Fortran order
    except Exception as e:  # noqa: BLE001 - pycocotools raises bare exceptions on bad counts
        raise ValueError(f"annotations: cannot decode RLE ({e})") from None
    masks = np.ascontiguousarray(decoded.transpose(2, 0, 1))
    return masks, np.asarray(labels, np.int64), np.asarray(crowd, bool)


def build_targets(
    masks: np.ndarray,
    labels: np.ndarray,
    iscrowd: np.ndarray,
    categories: CategoryIndex,
    *,
    boundary_width: int,
    center_sigma: float,
) -> dict[str, np.ndarray]:
    """Build every task's target from instance masks.

    Args:
        masks: (N, H, W) binary instance masks (any integer or bool dtype); N may be 0.
        labels: (N,) contiguous class index (1..K) of each instance.
        iscrowd: (N,) whether each annotation is a crowd region.
        categories: the label space (for the class -> supercategory map).
        boundary_width: thickness of the boundary target, pixels (>= 1).
        center_sigma: sigma of the center heatmap Gaussian, pixels (> 0).

    Returns:
        A dict, arrays for one image of HxW:
        ``semantic`` int64 (H, W): 0 background, 1..K class, 255 crowd not covered by an instance;
        ``supercategory`` int64 (H, W): the same through ``categories.class_to_super``;
        ``boundary`` float32 (H, W): 1 within ``boundary_width`` px inside the edge of every
        segment (instance or crowd region), which includes every class change;
        ``center`` float32 (1, H, W): max over instances of a Gaussian with peak 1 at each
        non-crowd instance's mass centroid (rounded to the pixel grid);
        ``offset`` float32 (2, H, W): (dy, dx) from each instance pixel to its centroid, 0 elsewhere;
        ``thing_mask`` float32 (H, W): 1 on pixels of non-crowd instances.

    Raises:
        ValueError: shapes disagree, a label is outside 1..K, or a parameter is out of range.
    """
    masks = np.asarray(masks)
    labels = np.asarray(labels, np.int64).reshape(-1)
    iscrowd = np.asarray(iscrowd, bool).reshape(-1)
    if masks.ndim != 3:
        raise ValueError(f"masks: expected (N, H, W), got shape {masks.shape}")
    n, h, w = masks.shape
    if labels.shape != (n,) or iscrowd.shape != (n,):
        raise ValueError(f"labels/iscrowd: expected {n} entries each, got {labels.shape[0]} and {iscrowd.shape[0]}")
    if n and (labels.min() < 1 or labels.max() >= categories.num_classes):
        raise ValueError(f"labels: class indices must lie in 1..{categories.num_classes - 1}, got {labels.tolist()}")
    if boundary_width < 1:
        raise ValueError(f"boundary_width: must be >= 1, got {boundary_width}")
    if center_sigma <= 0:
        raise ValueError(f"center_sigma: must be > 0, got {center_sigma}")

    segments = _segment_map(masks.astype(bool, copy=False), iscrowd)
    # Segment s (1-based) is annotation s-1; 0 is background.
    seg_label = np.concatenate([[0], labels])
    seg_crowd = np.concatenate([[False], iscrowd])

    semantic = seg_label[segments]
    semantic[seg_crowd[segments]] = IGNORE_INDEX
    super_lut = np.full(256, IGNORE_INDEX, np.int64)
    super_lut[: categories.num_classes] = categories.class_to_super
    supercategory = super_lut[semantic]

    things = (segments > 0) & ~seg_crowd[segments]
    center, offset = _instance_targets(np.where(things, segments, 0), n, center_sigma)
    return {
        "semantic": semantic.astype(np.int64, copy=False),
        "supercategory": supercategory,
        "boundary": _boundary(segments, boundary_width),
        "center": center,
        "offset": offset,
        "thing_mask": things.astype(np.float32),
    }


def empty_targets(height: int, width: int) -> dict[str, np.ndarray]:
    """Targets of an image without instances (all background): :func:`build_targets` with N = 0."""
    return {
        "semantic": np.zeros((height, width), np.int64),
        "supercategory": np.zeros((height, width), np.int64),
        "boundary": np.zeros((height, width), np.float32),
        "center": np.zeros((1, height, width), np.float32),
        "offset": np.zeros((2, height, width), np.float32),
        "thing_mask": np.zeros((height, width), np.float32),
    }


# ---------------------------------------------------------------------------- helpers


def _segment_map(masks: np.ndarray, iscrowd: np.ndarray) -> np.ndarray:
    """(H, W) int64 map of the annotation (1-based) that owns each pixel, 0 for background.

    Non-crowd instances win over crowd regions (a crowd region is only "ignore" where no
    individual instance is labelled); within each group smaller areas are painted last so a
    small object in front of a large one stays visible.
    """
    n, h, w = masks.shape
    segments = np.zeros((h, w), np.int64)
    if n == 0:
        return segments
    areas = masks.reshape(n, -1).sum(1)
    # Paint order: crowd first, then instances; each by decreasing area (stable for ties).
    order = np.lexsort((-areas, ~iscrowd))
    for i in order:  # one vectorised assignment per instance
        segments[masks[i]] = i + 1
    return segments


def _boundary(segments: np.ndarray, width: int) -> np.ndarray:
    """1 on foreground pixels with a differently-labelled pixel within ``width`` px (Chebyshev).

    A pixel is on a boundary when the max and min segment id in its (2w+1)^2 window differ:
    one max-pool and one min-pool instead of a loop over neighbours. The image border is not
    an edge (replicate padding): after a crop it is not an object's outline.
    """
    h, w = segments.shape
    if not segments.any():
        return np.zeros((h, w), np.float32)
    x = torch.from_numpy(segments).to(torch.float32)[None, None]  # exact for ids < 2**24
    x = F.pad(x, (width, width, width, width), mode="replicate")
    k = 2 * width + 1
    hi = F.max_pool2d(x, k, stride=1)
    lo = -F.max_pool2d(-x, k, stride=1)
    edge = (hi != lo)[0, 0].numpy() & (segments > 0)
    return edge.astype(np.float32)


def _instance_targets(instances: np.ndarray, n: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Center heatmap (1, H, W) and offsets (2, H, W) from a map of visible instance ids (0 = none)."""
    h, w = instances.shape
    center = np.zeros((1, h, w), np.float32)
    offset = np.zeros((2, h, w), np.float32)
    if n == 0 or not instances.any():
        return center, offset
    ys, xs = np.indices((h, w), dtype=np.float64)
    flat = instances.reshape(-1)
    count = np.bincount(flat, minlength=n + 1).astype(np.float64)
    visible = count > 0
    visible[0] = False
    safe = np.maximum(count, 1.0)
    # Rounded to the pixel grid so the heatmap peaks at exactly 1.0 where the offsets point.
    cy = np.rint(np.bincount(flat, weights=ys.reshape(-1), minlength=n + 1) / safe)
    cx = np.rint(np.bincount(flat, weights=xs.reshape(-1), minlength=n + 1) / safe)

    inside = instances > 0
    offset[0][inside] = (cy[instances] - ys)[inside]
    offset[1][inside] = (cx[instances] - xs)[inside]

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


__all__ = ["TARGET_KEYS", "build_targets", "decode_annotations", "empty_targets"]
