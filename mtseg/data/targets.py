"""Task decomposition, the shared half: a shard row's annotations -> decoded instances.

Every task builds its own target (:meth:`mtseg.tasks.base.Task.build_targets`, in its own
module) from the same per-image input, built here:

* :func:`decode_layers` turns a shard row's annotations (compressed RLE, COCO category ids)
  into a few instance-id maps (*layers*: one when no masks overlap) with contiguous class
  labels, without building N full masks (:func:`decode_annotations` gives the masks);
* :func:`augment` transforms the image and the layers jointly into :class:`Instances`, which
  holds the instances at the model's input size and the maps several tasks share (which
  annotation owns each pixel, the category map, the thing pixels), each computed once per
  image on first use;
* :class:`WireField` is how a task declares a target key in the batch: its shape, its dtype
  on the wire (between Ray Data workers and the training loop) and in the batch contract.

Overlapping instances are resolved the way panoptic conversions of COCO do it: smaller
instances are painted over larger ones, so every pixel belongs to at most one instance and
the instance targets (centers, offsets) are computed on the visible part of each instance.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from pycocotools import mask as mask_utils

from mtseg.data.categories import IGNORE_INDEX, CategoryIndex
from mtseg.data.transforms import apply_joint


@dataclass(frozen=True)
class WireField:
    """One key of a batch, per image: how it travels and what the training loop gets.

    Attributes:
        shape: the array's shape without the batch dimension.
        wire: numpy dtype between the Ray Data workers and the consumer; it must hold every
            value exactly (uint8 masks and labels, float16 heatmaps, int16 whole-pixel
            offsets: about a quarter of the bytes of the contract).
        dtype: torch dtype in the batch contract (what models, losses and metrics see).
        scale: when set, the contract is ``wire * scale`` (the uint8 image -> [0, 1]);
            otherwise a plain cast.
    """

    shape: tuple[int, ...]
    wire: np.dtype
    dtype: torch.dtype
    scale: float | None = None


class TargetBuilder(Protocol):
    """What the stream needs of a task (:class:`mtseg.tasks.base.Task` implements it)."""

    name: str

    def target_fields(self, image_size: int) -> dict[str, WireField]: ...

    def build_targets(self, instances: Instances) -> dict[str, np.ndarray]: ...


def label_field(image_size: int, num_labels: int) -> WireField:
    """A (S, S) label map of ``num_labels`` classes plus :data:`IGNORE_INDEX`: uint8 on the wire while they fit."""
    wire = np.uint8 if num_labels <= IGNORE_INDEX else np.int32
    return WireField((image_size, image_size), np.dtype(wire), torch.int64)


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
    rles, labels, crowd = _read_annotations(annotations, height, width, categories)
    if not rles:
        return np.zeros((0, height, width), np.uint8), labels, crowd
    try:
        decoded = mask_utils.decode(rles)  # (H, W, N), Fortran order
    except Exception as e:  # noqa: BLE001 - pycocotools raises bare exceptions on bad counts
        raise ValueError(f"annotations: cannot decode RLE ({e})") from None
    masks = np.ascontiguousarray(decoded.transpose(2, 0, 1))
    return masks, labels, crowd


def _read_annotations(annotations, height: int, width: int, categories: CategoryIndex):
    """The known-category annotations' RLEs (pycocotools dicts), class indices and crowd flags."""
    rles, labels, crowd = [], [], []
    for ann in annotations or ():
        try:
            label = categories.class_of(int(ann["category_id"]))
        except KeyError:
            continue  # a category outside this dataset's label space
        size = [int(v) for v in ann["segmentation_size"]]
        if size != [height, width]:
            raise ValueError(f"annotation {ann.get('id')}: mask size {size} differs from the image size {[height, width]}")
        counts = ann["segmentation_counts"]
        # bytes as stored in shards; str as in COCO JSON's compressed RLE
        counts = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
        rles.append({"size": size, "counts": counts})
        labels.append(label)
        crowd.append(bool(ann.get("iscrowd", 0)))
    return rles, np.asarray(labels, np.int64), np.asarray(crowd, bool)


def decode_layers(
    annotations: Iterable[Mapping[str, Any]] | None,
    height: int,
    width: int,
    categories: CategoryIndex,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode a shard row's annotations straight into id layers: ``id_layers(decode_annotations(...)[0])``.

    The N full masks are never built: each RLE string is parsed to its runs, overlaps are
    found on the RLEs themselves (pycocotools), and each layer is written by one ``repeat`` of
    its runs and the gaps between them.

    Args:
        annotations, height, width, categories: as for :func:`decode_annotations`.

    Returns:
        ``layers`` (K, height, width) (see :func:`id_layers`), ``labels`` int64 (N,),
        ``iscrowd`` bool (N,).

    Raises:
        ValueError: an annotation's mask size differs from (height, width) or its RLE is bad.
    """
    rles, labels, crowd = _read_annotations(annotations, height, width, categories)
    n, size = len(rles), height * width
    dtype = _layer_dtype(n)
    if not rles:
        return np.zeros((1, height, width), dtype), labels, crowd
    members: list[list[int]] = []  # annotation indices of each layer
    unions: list[dict] = []  # each layer's pixels, as an RLE
    bounds: list[list[np.ndarray]] = []  # each layer's run starts, ends and ids
    for i, rle in enumerate(rles):
        counts = _rle_counts(rle["counts"])
        if counts.size == 0 or counts.sum() != size or (counts < 0).any():
            raise ValueError(f"annotations: cannot decode RLE (annotation {i}: runs do not cover the {height}x{width} mask)")
        for k, union in enumerate(unions):
            if not mask_utils.area(mask_utils.merge([union, rle], intersect=True)):
                break
        else:
            k = len(unions)
            members.append([]), unions.append(None), bounds.append([])
        members[k].append(i)
        unions[k] = rle if unions[k] is None else mask_utils.merge([unions[k], rle])
        ends = np.cumsum(counts)
        bounds[k].append(np.stack([ends[:-1:2], ends[1::2], np.full(counts.size // 2, i + 1)]))
    layers = np.empty((len(unions), height, width), dtype)
    for k, parts in enumerate(bounds):
        starts, stops, ids = np.concatenate(parts, axis=1)
        # Runs in one layer are disjoint: sorted, they alternate with the gaps between them,
        # and one repeat writes the whole layer.
        order = np.argsort(starts, kind="stable")
        starts, stops, ids = starts[order], stops[order], ids[order]
        lengths = np.empty(2 * starts.size + 1, np.int64)
        lengths[0:-1:2] = starts - np.concatenate([[0], stops[:-1]])
        lengths[1::2] = stops - starts
        lengths[-1] = size - stops[-1] if stops.size else size
        values = np.zeros(lengths.size, dtype)
        values[1::2] = ids
        layers[k] = np.repeat(values, lengths).reshape(width, height).T  # RLE runs go down the columns
    return layers, labels, crowd


def _rle_counts(counts: bytes) -> np.ndarray:
    """Run lengths of a COCO compressed RLE string (pycocotools' ``rleFrString``, vectorised)."""
    c = np.frombuffer(counts, np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return c
    # Each count is a little-endian run of 5-bit groups; bit 0x20 says another group follows,
    # bit 0x10 of the last group is the sign.
    ends = np.flatnonzero((c & 0x20) == 0)
    if ends.size == 0 or ends[-1] != c.size - 1:
        return np.zeros(0, np.int64)  # a truncated count
    starts = np.concatenate([[0], ends[:-1] + 1])
    shift = 5 * (np.arange(c.size) - np.repeat(starts, ends - starts + 1))
    x = np.add.reduceat((c & 0x1F) << shift, starts)
    negative = (c[ends] & 0x10) != 0
    x[negative] -= np.left_shift(1, 5 * (ends[negative] - starts[negative] + 1))
    # From the fourth count on, each is stored as the difference to the count two before it.
    out = x.copy()
    out[2::2] = np.cumsum(x[2::2])
    out[1::2] = np.cumsum(x[1::2])
    return out


def _layer_dtype(n: int) -> np.dtype:
    # uint8 while the ids fit (a quarter of int32's bytes to resample); COCO's most crowded
    # image has 93 annotations.
    return np.dtype(np.uint8 if n < 255 else np.int32)


class Instances:
    """One image's instances after joint augmentation, and the maps tasks build targets from.

    The derived maps are computed on first use and shared by every task that reads them:
    treat them as read-only.

    Args:
        masks: (N, H, W) binary instance masks (any integer or bool dtype); N may be 0.
        labels: (N,) contiguous class index (1..K) of each instance.
        iscrowd: (N,) whether each annotation is a crowd region.
        categories: the label space.

    Raises:
        ValueError: shapes disagree or a label is outside 1..K.
    """

    def __init__(self, masks: np.ndarray, labels: np.ndarray, iscrowd: np.ndarray, categories: CategoryIndex):
        masks = np.asarray(masks)
        labels = np.asarray(labels, np.int64).reshape(-1)
        iscrowd = np.asarray(iscrowd, bool).reshape(-1)
        if masks.ndim != 3:
            raise ValueError(f"masks: expected (N, H, W), got shape {masks.shape}")
        n = masks.shape[0]
        if labels.shape != (n,) or iscrowd.shape != (n,):
            raise ValueError(f"labels/iscrowd: expected {n} entries each, got {labels.shape[0]} and {iscrowd.shape[0]}")
        if n and (labels.min() < 1 or labels.max() >= categories.num_classes):
            raise ValueError(f"labels: class indices must lie in 1..{categories.num_classes - 1}, got {labels.tolist()}")
        self.masks, self.labels, self.iscrowd, self.categories = masks, labels, iscrowd, categories

    @classmethod
    def from_layers(cls, layers: np.ndarray, labels: np.ndarray, iscrowd: np.ndarray, categories: CategoryIndex) -> Instances:
        """Instances from id layers (:func:`id_layers`, after augmentation), without N masks.

        Args:
            layers: (K, H, W) integer maps, 0 = none, ``i + 1`` = annotation ``i``; every
                annotation's mask is exactly its pixels in one of the layers.
            labels: (N,) contiguous class index of each annotation.
            iscrowd: (N,) crowd flags.
            categories: the label space.

        Returns:
            The same :class:`Instances` as built from the masks (``masks`` and ``segments``
            are derived on first use).
        """
        layers = np.asarray(layers)
        if layers.ndim != 3 or layers.shape[0] < 1:
            raise ValueError(f"layers: expected (K >= 1, H, W), got shape {layers.shape}")
        n = np.asarray(labels).reshape(-1).shape[0]
        out = cls(np.zeros((n, 0, 0), np.uint8), labels, iscrowd, categories)  # validates labels, flags
        del out.masks  # derived from the layers on first use
        out._layers = layers
        return out

    @functools.cached_property
    def masks(self) -> np.ndarray:
        """(N, H, W) binary instance masks (as given, or derived from :meth:`from_layers`' layers)."""
        ids = np.arange(1, len(self.labels) + 1).reshape(-1, 1, 1)
        return (self._layers[:, None] == ids[None]).any(0).astype(np.uint8)

    @functools.cached_property
    def segments(self) -> np.ndarray:
        """(H, W) int64: the annotation (1-based) that owns each pixel, 0 for background (see :func:`segment_map`)."""
        layers = getattr(self, "_layers", None)
        if layers is not None:
            return _layered_segment_map(layers, self.iscrowd)
        return segment_map(self.masks.astype(bool, copy=False), self.iscrowd)

    @functools.cached_property
    def crowd(self) -> np.ndarray:
        """(H, W) bool: pixels owned by a crowd region."""
        return np.concatenate([[False], self.iscrowd])[self.segments]

    @functools.cached_property
    def semantic(self) -> np.ndarray:
        """(H, W) int64: 0 background, 1..K class, :data:`IGNORE_INDEX` crowd not covered by an instance.

        In a panoptic label space (``categories.panoptic``) no pixel is background: those no
        segment owns are void, and :data:`IGNORE_INDEX` like crowd, as panopticapi scores them.
        """
        unowned = IGNORE_INDEX if self.categories.panoptic else 0
        semantic = np.concatenate([[unowned], self.labels])[self.segments]
        semantic[self.crowd] = IGNORE_INDEX
        return semantic

    @functools.cached_property
    def things(self) -> np.ndarray:
        """(H, W) bool: pixels of non-crowd instances of thing classes (stuff has no instances)."""
        thing_class = np.asarray(self.categories.thing_classes, bool)
        return np.concatenate([[False], thing_class[self.labels] & ~self.iscrowd])[self.segments]


def augment(
    transform: Any,
    image: torch.Tensor,
    layers: np.ndarray,
    labels: np.ndarray,
    iscrowd: np.ndarray,
    categories: CategoryIndex,
    *,
    seed: int | None = None,
) -> tuple[torch.Tensor, Instances]:
    """Augment an image and its instances jointly (:func:`~mtseg.data.transforms.apply_joint`) into :class:`Instances`.

    The K id layers (:func:`decode_layers`, :func:`id_layers`; K = 1 when no two masks
    overlap) are transformed instead of N masks: the same instances bit for bit as
    transforming the masks, for about the cost of K masks.

    Args:
        transform: from :func:`~mtseg.data.transforms.build_transform`.
        image: uint8 (3, H, W).
        layers: (K, H, W) id layers of the image's instances.
        labels: (N,) class indices.
        iscrowd: (N,) crowd flags.
        categories: the label space.
        seed: the image's random seed (None: the global generator).

    Returns:
        ``(image, instances)`` at the transform's output size.
    """
    image, layers = apply_joint(transform, image, layers, seed=seed)
    return image, Instances.from_layers(layers, labels, iscrowd, categories)


def id_layers(masks: np.ndarray) -> np.ndarray:
    """The masks packed into a few uint8 id maps: (K, H, W), 0 = none, ``i + 1`` on mask ``i``.

    Masks go, in order, into the first layer they do not overlap, so disjoint masks (visible
    parts, as panoptic annotations and the synthetic data have) make one layer and COCO's
    occasional overlaps a second or third. A resampling that picks source pixels (nearest
    resize, crop, flip) acts on every id alike, so transforming the K layers transforms all N
    masks exactly, and :class:`Instances` resolves the overlaps afterwards from the layers
    (with the areas after augmentation, as :func:`segment_map` does). uint8 while the ids fit,
    int32 beyond.
    """
    n = masks.shape[0]
    dtype = _layer_dtype(n)
    layers = [np.zeros(masks.shape[1:], dtype)]
    for i in range(n):
        mask = masks[i].astype(bool, copy=False)
        for layer in layers:
            if not layer[mask].any():
                break
        else:
            layer = np.zeros(masks.shape[1:], dtype)
            layers.append(layer)
        layer[mask] = i + 1
    return np.stack(layers)


def _layered_segment_map(layers: np.ndarray, iscrowd: np.ndarray) -> np.ndarray:
    """:func:`segment_map` of the masks held by :func:`id_layers`' layers."""
    if layers.shape[0] == 1:  # disjoint masks: the owner is the only mask there is
        return layers[0].astype(np.int64)
    n = iscrowd.shape[0]
    areas = np.bincount(layers.reshape(-1), minlength=n + 1)[1 : n + 1]
    # segment_map paints in this order, so the last painted (highest rank) of the masks
    # covering a pixel owns it.
    rank = np.zeros(n + 1, np.int64)
    rank[np.lexsort((-areas, ~iscrowd)) + 1] = np.arange(1, n + 1)
    winner = rank[layers].argmax(0)
    return np.take_along_axis(layers, winner[None], 0)[0].astype(np.int64)


def segment_map(masks: np.ndarray, iscrowd: np.ndarray) -> np.ndarray:
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


__all__ = [
    "Instances",
    "TargetBuilder",
    "WireField",
    "augment",
    "decode_annotations",
    "decode_layers",
    "id_layers",
    "label_field",
    "segment_map",
]
