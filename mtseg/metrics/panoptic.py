"""Panoptic quality (PQ = SQ x RQ) over thing classes (Kirillov et al., "Panoptic Segmentation", CVPR 2019).

Input per image is two lists of disjoint ``(mask, class)`` segments plus an optional void
mask; matching, void and averaging follow the reference ``panopticapi`` (``pq_compute``):
segments of one class match when ``IoU > 0.5`` (the union leaving out the prediction's
void pixels); an unmatched prediction is a false positive unless more than half of it lies
on void; PQ, SQ and RQ are each averaged over the classes with at least one TP, FP or FN.
Any crowd pixel is void (:func:`gt_segments_from_coco`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mtseg.metrics.base import SumMetric

Segment = tuple[Any, int]  # (bool mask (H, W) as ndarray or tensor, class index)


def _as_bool_array(mask: Any) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask).astype(bool, copy=False)


def _paint(segments: Sequence[Segment], shape: tuple[int, int] | None, what: str) -> tuple[np.ndarray | None, list[int]]:
    """Segments -> id map (0 = none, k = k-th non-empty segment) and their classes; rejects overlaps."""
    id_map = None if shape is None else np.zeros(shape, dtype=np.int64)
    classes = []
    for n, (mask, cls) in enumerate(segments):
        m = _as_bool_array(mask)
        if id_map is None:
            id_map = np.zeros(m.shape, dtype=np.int64)
        if m.shape != id_map.shape:
            raise ValueError(f"{what}[{n}]: mask shape {m.shape} != {id_map.shape}")
        if not m.any():
            continue  # an empty segment can neither match nor be wrong
        if (id_map[m] != 0).any():
            raise ValueError(f"{what}[{n}]: overlaps an earlier segment (segments must be disjoint)")
        classes.append(int(cls))
        id_map[m] = len(classes)
    return id_map, classes


class PanopticQuality(SumMetric):
    """PQ, SQ, RQ accumulated as per-class TP / FP / FN counts and summed TP IoU.

    Args:
        num_classes: number of class indices; every class but background 0 is a thing.
    """

    def __init__(self, num_classes: int):
        if num_classes < 2:
            raise ValueError(f"num_classes: must be >= 2 (background + one thing), got {num_classes}")
        self.num_classes = int(num_classes)
        self.reset()

    def _config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def _empty_state(self) -> torch.Tensor:
        return torch.zeros(4, self.num_classes, dtype=torch.float64)  # TP, FP, FN, sum of TP IoU

    def _things_only(self, segments: Sequence[Segment], what: str) -> list[Segment]:
        for n, (_, c) in enumerate(segments):
            if not 0 <= int(c) < self.num_classes:
                raise ValueError(f"{what}[{n}]: class {c} is not in 0..{self.num_classes - 1}")
        return [(m, int(c)) for m, c in segments if int(c) != 0]

    def update(self, pred_segments: Sequence[Segment], gt_segments: Sequence[Segment], void: Any = None) -> None:
        """Count one image.

        Args:
            pred_segments: predicted ``(mask, class)`` pairs, masks (H, W) bool and disjoint.
            gt_segments: ground-truth ``(mask, class)`` pairs, same convention.
            void: optional (H, W) bool mask of pixels without a label (crowd, unlabeled).
        """
        shape = None if void is None else _as_bool_array(void).shape
        gt_map, gt_cls = _paint(self._things_only(gt_segments, "gt_segments"), shape, "gt_segments")
        if gt_map is not None:
            shape = gt_map.shape
        pred_map, pred_cls = _paint(self._things_only(pred_segments, "pred_segments"), shape, "pred_segments")
        if gt_map is None and pred_map is None:
            return
        if gt_map is None:
            gt_map = np.zeros_like(pred_map)
        if pred_map is None:
            pred_map = np.zeros_like(gt_map)
        n_gt, n_pred = len(gt_cls), len(pred_cls)
        void_id = n_gt + 1
        if void is not None:
            # Void only where no ground-truth segment is: a labelled pixel is never void.
            gt_map = np.where(_as_bool_array(void) & (gt_map == 0), void_id, gt_map)

        # joint[g, p]: pixels with ground-truth id g and predicted id p (row void_id = void).
        joint = np.bincount((gt_map * (n_pred + 1) + pred_map).ravel(), minlength=(n_gt + 2) * (n_pred + 1))
        joint = joint.reshape(n_gt + 2, n_pred + 1)
        gt_area = joint[: n_gt + 1].sum(1)
        pred_area = joint.sum(0)
        pred_void = joint[void_id]

        tp = np.zeros(self.num_classes)
        fp = np.zeros(self.num_classes)
        fn = np.zeros(self.num_classes)
        iou_sum = np.zeros(self.num_classes)
        gt_matched = np.zeros(n_gt + 1, dtype=bool)
        pred_matched = np.zeros(n_pred + 1, dtype=bool)
        for g, p in zip(*np.nonzero(joint[1 : n_gt + 1, 1:])):
            g, p = g + 1, p + 1
            if gt_cls[g - 1] != pred_cls[p - 1]:
                continue
            inter = joint[g, p]
            union = pred_area[p] + gt_area[g] - inter - pred_void[p]
            iou = inter / union
            if iou > 0.5:  # at most one match per segment
                c = gt_cls[g - 1]
                tp[c] += 1
                iou_sum[c] += iou
                gt_matched[g] = pred_matched[p] = True
        for g in range(1, n_gt + 1):
            if not gt_matched[g]:
                fn[gt_cls[g - 1]] += 1
        for p in range(1, n_pred + 1):
            if not pred_matched[p] and pred_void[p] / pred_area[p] <= 0.5:
                fp[pred_cls[p - 1]] += 1
        state = self._state_on(torch.device("cpu"))
        state += torch.from_numpy(np.stack([tp, fp, fn, iou_sum]))

    def compute(self) -> dict[str, Any]:
        """Returns:
        ``{"pq", "sq", "rq"}`` averaged over evaluated classes (NaN when none), plus
        ``"pq_per_class"`` (list over all class indices, NaN where not evaluated) and
        ``"num_classes_evaluated"``.
        """
        tp, fp, fn, iou_sum = self._state.cpu().numpy()
        denom = tp + 0.5 * fp + 0.5 * fn
        present = denom > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            pq = np.where(present, iou_sum / denom, np.nan)
            sq = np.where(present, np.where(tp > 0, iou_sum / np.maximum(tp, 1), 0.0), np.nan)
            rq = np.where(present, tp / denom, np.nan)
        n = int(present.sum())

        def mean(values: np.ndarray) -> float:
            return float(values[present].mean()) if n else math.nan

        return {
            "pq": mean(pq),
            "sq": mean(sq),
            "rq": mean(rq),
            "pq_per_class": [float(v) for v in pq],
            "num_classes_evaluated": n,
        }


def segments_from_results(results: Sequence[dict], height: int, width: int, class_of: Callable[[int], int]) -> list[Segment]:
    """Overlapping scored instance masks (COCO results of one image) -> disjoint segments.

    As Panoptic FPN / detectron2 do: instances scoring at least 0.5 are pasted in decreasing
    score order onto free pixels; one keeping less than half of its mask is dropped.

    Args:
        results: COCO result dicts of one image (RLE ``segmentation``, ``score``, ``category_id``).
        height: image height the masks have.
        width: image width.
        class_of: maps ``category_id`` to the class index (``CategoryIndex.class_of``).

    Returns:
        Disjoint ``(mask, class)`` segments.
    """
    taken = np.zeros((height, width), dtype=bool)
    segments: list[Segment] = []
    order = sorted(range(len(results)), key=lambda i: -float(results[i]["score"]))
    for i in order:
        r = results[i]
        if float(r["score"]) < 0.5:
            break
        mask = mask_utils.decode(r["segmentation"]).astype(bool)
        if mask.shape != taken.shape:
            raise ValueError(f"results[{i}]: mask shape {mask.shape} != image size {(height, width)}")
        area = int(mask.sum())
        free = mask & ~taken
        if area == 0 or free.sum() < 0.5 * area:
            continue
        taken |= free
        segments.append((free, class_of(int(r["category_id"]))))
    return segments


def gt_segments_from_coco(coco_gt: COCO, image_id: int, class_of: Callable[[int], int]) -> tuple[list[Segment], np.ndarray]:
    """Ground-truth segments and void mask of one image from COCO instance annotations.

    A pixel covered by several instances goes to the first (file order); crowds become void.

    Args:
        coco_gt: the ground truth.
        image_id: the image.
        class_of: maps ``category_id`` to a class index.

    Returns:
        (disjoint ``(mask, class)`` segments, (H, W) bool void mask).
    """
    info = coco_gt.imgs[int(image_id)]
    h, w = int(info["height"]), int(info["width"])
    taken = np.zeros((h, w), dtype=bool)
    void = np.zeros((h, w), dtype=bool)
    segments: list[Segment] = []
    for ann in coco_gt.imgToAnns.get(int(image_id), []):
        mask = coco_gt.annToMask(ann).astype(bool)
        if ann.get("iscrowd"):
            void |= mask
            continue
        free = mask & ~taken
        if not free.any():
            continue
        taken |= free
        segments.append((free, class_of(int(ann["category_id"]))))
    return segments, void & ~taken
