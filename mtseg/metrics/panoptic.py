"""Panoptic quality (PQ = SQ x RQ) over things and stuff (Kirillov et al., "Panoptic Segmentation", CVPR 2019).

The numbers are those of the reference ``panopticapi`` (cocodataset/panopticapi,
``evaluation.py``: ``pq_compute_single_core`` and ``PQStat.pq_average``), checked against a
transcription of it in ``tests/metrics/test_metrics_panoptic_reference.py``:

- per image, a prediction and a ground-truth segment of the same class match when
  ``IoU > 0.5``, the union leaving out the prediction's void pixels; crowd ground truth is
  never matched;
- an unmatched ground-truth segment (not crowd) is a false negative; an unmatched prediction
  is a false positive unless more than half of it lies on void plus the crowd region *of its
  own class* (a crowd region is void for predictions of its class only);
- PQ, SQ and RQ are averaged over the classes with at least one TP, FP or FN, for All,
  Things and Stuff; class 0 (background or void) is never evaluated.

Input per image is two lists of disjoint segments, ``(mask, class)`` or
``(mask, class, iscrowd)``, plus an optional void mask; or, in COCO's panoptic format, a
PNG of segment ids (:func:`read_panoptic_png`, :func:`rgb2id`) with its ``segments_info``
(:func:`segments_from_panoptic`, :meth:`PanopticQuality.update_from_coco`).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mtseg.data.categories import CategoryIndex
from mtseg.data.coco_panoptic import MAX_SEGMENT_ID, id2rgb, rgb2id
from mtseg.metrics.base import SumMetric

# (bool mask (H, W) as ndarray or tensor, class index) or (mask, class index, iscrowd).
Segment = tuple[Any, ...]

#: Segment ids of a COCO panoptic PNG are 24-bit (``id = R + 256 G + 256^2 B``); 0 is void.


def _as_bool_array(mask: Any) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask).astype(bool, copy=False)


def _unpack(segment: Segment, what: str, n: int) -> tuple[Any, int, bool]:
    if len(segment) == 2:
        mask, cls = segment
        return mask, int(cls), False
    if len(segment) == 3:
        mask, cls, crowd = segment
        return mask, int(cls), bool(crowd)
    raise ValueError(f"{what}[{n}]: expected (mask, class) or (mask, class, iscrowd), got {len(segment)} items")


def _paint(
    segments: Sequence[tuple[Any, int, bool]], shape: tuple[int, int] | None, what: str, keep_empty: bool
) -> tuple[np.ndarray | None, list[int], list[bool]]:
    """Segments -> id map (0 = none, k = k-th kept segment), their classes and crowd flags; rejects overlaps."""
    id_map = None if shape is None else np.zeros(shape, dtype=np.int64)
    classes: list[int] = []
    crowd: list[bool] = []
    for n, (mask, cls, is_crowd) in enumerate(segments):
        m = _as_bool_array(mask)
        if id_map is None:
            id_map = np.zeros(m.shape, dtype=np.int64)
        if m.shape != id_map.shape:
            raise ValueError(f"{what}[{n}]: mask shape {m.shape} != {id_map.shape}")
        if not keep_empty and not m.any():
            continue
        if (id_map[m] != 0).any():
            raise ValueError(f"{what}[{n}]: overlaps an earlier segment (segments must be disjoint)")
        classes.append(cls)
        crowd.append(is_crowd)
        id_map[m] = len(classes)
    return id_map, classes, crowd


class PanopticQuality(SumMetric):
    """PQ, SQ, RQ for All, Things and Stuff, accumulated as per-class TP / FP / FN counts and summed TP IoU.

    Args:
        num_classes: number of class indices, background or void 0 included.
        isthing: for every class index whether it is a thing (entry 0 is ignored), e.g.
            ``CategoryIndex.thing_classes``; default: every class but 0 is a thing.
    """

    def __init__(self, num_classes: int, isthing: Sequence[bool] | None = None):
        if num_classes < 2:
            raise ValueError(f"num_classes: must be >= 2 (background + one class), got {num_classes}")
        self.num_classes = int(num_classes)
        if isthing is None:
            isthing = [True] * self.num_classes
        if len(isthing) != self.num_classes:
            raise ValueError(f"isthing: needs {self.num_classes} entries (one per class index), got {len(isthing)}")
        # Entry 0 is normalised so that the default and an explicit CategoryIndex.thing_classes
        # configure the same metric (merge and from_state compare configs).
        self.isthing = (False, *(bool(t) for t in list(isthing)[1:]))
        self.reset()

    def _config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "isthing": self.isthing}

    def _empty_state(self) -> torch.Tensor:
        return torch.zeros(4, self.num_classes, dtype=torch.float64)  # TP, FP, FN, sum of TP IoU

    def _checked(self, segments: Sequence[Segment], what: str) -> list[tuple[Any, int, bool]]:
        out = []
        for n, seg in enumerate(segments):
            mask, c, crowd = _unpack(seg, what, n)
            if not 0 <= c < self.num_classes:
                raise ValueError(f"{what}[{n}]: class {c} is not in 0..{self.num_classes - 1}")
            if c != 0:  # class 0 is background or void: its pixels belong to no segment
                out.append((mask, c, crowd))
        return out

    def update(self, pred_segments: Sequence[Segment], gt_segments: Sequence[Segment], void: Any = None) -> None:
        """Count one image.

        A pixel is void only where ``void`` says and no ground-truth segment is; a pixel that
        no segment covers and ``void`` leaves out is background (class 0): a prediction there
        is wrong. Segments of class 0 are background too.

        Args:
            pred_segments: predicted ``(mask, class)`` pairs, masks (H, W) bool and disjoint;
                an ``iscrowd`` third item is ignored (as panopticapi ignores it), and so is an
                empty mask.
            gt_segments: ground-truth ``(mask, class)`` or ``(mask, class, iscrowd)``, disjoint.
                A crowd segment is never matched; an unmatched prediction of its class does
                not count when more than half of it lies on void plus that crowd region. As in
                panopticapi, a class has one crowd region per image: the last crowd segment of
                the class listed (COCO panoptic ground truth has at most one). An empty
                segment that is not crowd is a false negative.
            void: optional (H, W) bool mask of pixels without a label.
        """
        shape = None if void is None else _as_bool_array(void).shape
        gt_map, gt_cls, gt_crowd = _paint(self._checked(gt_segments, "gt_segments"), shape, "gt_segments", keep_empty=True)
        if gt_map is not None:
            shape = gt_map.shape
        pred_map, pred_cls, _ = _paint(self._checked(pred_segments, "pred_segments"), shape, "pred_segments", keep_empty=False)
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
        g_cls = np.array([0, *gt_cls], dtype=np.int64)
        g_crowd = np.array([False, *gt_crowd])
        p_cls = np.array([0, *pred_cls], dtype=np.int64)

        tp = np.zeros(self.num_classes)
        fp = np.zeros(self.num_classes)
        fn = np.zeros(self.num_classes)
        iou_sum = np.zeros(self.num_classes)

        g, p = np.nonzero(joint[1 : n_gt + 1, 1:])
        g, p = g + 1, p + 1
        keep = ~g_crowd[g] & (g_cls[g] == p_cls[p])
        g, p = g[keep], p[keep]
        inter = joint[g, p]
        iou = inter / (pred_area[p] + gt_area[g] - inter - pred_void[p])
        # IoU > 0.5 between disjoint segments makes every match one-to-one.
        match = iou > 0.5
        np.add.at(tp, g_cls[g[match]], 1)
        np.add.at(iou_sum, g_cls[g[match]], iou[match])
        gt_matched = np.zeros(n_gt + 1, dtype=bool)
        pred_matched = np.zeros(n_pred + 1, dtype=bool)
        gt_matched[g[match]] = True
        pred_matched[p[match]] = True

        unmatched_gt = np.flatnonzero(~gt_matched[1:] & ~g_crowd[1:]) + 1
        np.add.at(fn, g_cls[unmatched_gt], 1)

        crowd_row = np.zeros(self.num_classes, dtype=np.int64)  # class -> its crowd segment's id, 0 = none
        for gid in np.flatnonzero(g_crowd):
            crowd_row[g_cls[gid]] = gid  # later ones replace earlier ones, as in panopticapi
        unmatched_pred = np.flatnonzero(~pred_matched[1:]) + 1
        rows = crowd_row[p_cls[unmatched_pred]]
        ignored = pred_void[unmatched_pred] + np.where(rows > 0, joint[rows, unmatched_pred], 0)
        is_fp = ignored / pred_area[unmatched_pred] <= 0.5
        np.add.at(fp, p_cls[unmatched_pred[is_fp]], 1)

        state = self._state_on(torch.device("cpu"))
        state += torch.from_numpy(np.stack([tp, fp, fn, iou_sum]))

    def update_from_coco(
        self,
        pred_id_map: Any,
        pred_segments_info: Sequence[dict],
        gt_id_map: Any,
        gt_segments_info: Sequence[dict],
        categories: CategoryIndex,
    ) -> None:
        """Count one image given in COCO's panoptic format, read as panopticapi reads it.

        Args:
            pred_id_map: (H, W) predicted segment ids (:func:`read_panoptic_png`); 0 = no segment.
            pred_segments_info: its ``segments_info`` (``id``, ``category_id``); every id of the
                PNG must be listed and every listed id must be in the PNG.
            gt_id_map: (H, W) ground-truth segment ids; 0 = void.
            gt_segments_info: its ``segments_info`` (``id``, ``category_id``, ``iscrowd``).
            categories: maps COCO category ids to this metric's class indices.
        """
        pred, _ = segments_from_panoptic(pred_id_map, pred_segments_info, categories, strict=True)
        gt, void = segments_from_panoptic(gt_id_map, gt_segments_info, categories, strict=False)
        if np.shape(pred_id_map) != void.shape:
            raise ValueError(f"pred_id_map: shape {np.shape(pred_id_map)} != gt_id_map shape {void.shape}")
        self.update(pred, gt, void)

    def compute(self) -> dict[str, Any]:
        """Returns:
        ``"pq"``, ``"sq"``, ``"rq"`` (All), ``"pq_things"``, ``"sq_things"``, ``"rq_things"``,
        ``"pq_stuff"``, ``"sq_stuff"``, ``"rq_stuff"``: each the mean over the evaluated classes
        of the group (NaN when it has none); ``"pq_per_class"``, ``"sq_per_class"``,
        ``"rq_per_class"``: lists over all class indices, NaN where not evaluated; and
        ``"num_classes_evaluated"``, ``"num_things_evaluated"``, ``"num_stuff_evaluated"``.
        """
        tp, fp, fn, iou_sum = self._state.cpu().numpy()
        denom = tp + 0.5 * fp + 0.5 * fn
        present = (tp + fp + fn > 0) & (np.arange(self.num_classes) > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            pq = np.where(present, iou_sum / denom, np.nan)
            sq = np.where(present, np.where(tp > 0, iou_sum / np.maximum(tp, 1), 0.0), np.nan)
            rq = np.where(present, tp / denom, np.nan)
        thing = np.array(self.isthing)
        out: dict[str, Any] = {}
        for suffix, group in (("", present), ("_things", present & thing), ("_stuff", present & ~thing)):
            n = int(group.sum())
            for name, values in (("pq", pq), ("sq", sq), ("rq", rq)):
                # panopticapi divides by zero here; NaN says "nothing to average" without raising.
                out[name + suffix] = float(values[group].sum() / n) if n else math.nan
        out.update(
            pq_per_class=[float(v) for v in pq],
            sq_per_class=[float(v) for v in sq],
            rq_per_class=[float(v) for v in rq],
            num_classes_evaluated=int(present.sum()),
            num_things_evaluated=int((present & thing).sum()),
            num_stuff_evaluated=int((present & ~thing).sum()),
        )
        return out


# ---------------------------------------------------------------------- COCO panoptic format


def write_panoptic_png(id_map: Any, path: str | os.PathLike | None = None) -> bytes:
    """Encode a segment-id map as a COCO panoptic PNG (RGB, :func:`id2rgb`).

    Args:
        id_map: (H, W) segment ids, 0 = void (ndarray or tensor).
        path: where to write the PNG too, if given.

    Returns:
        The PNG bytes.
    """
    if isinstance(id_map, torch.Tensor):
        id_map = id_map.detach().cpu().numpy()
    id_map = np.asarray(id_map)
    if id_map.ndim != 2:
        raise ValueError(f"id_map: expected (H, W), got shape {id_map.shape}")
    buf = io.BytesIO()
    Image.fromarray(id2rgb(id_map)).save(buf, format="PNG")
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def read_panoptic_png(source: bytes | str | os.PathLike | BinaryIO) -> np.ndarray:
    """Decode a COCO panoptic PNG to segment ids (as panopticapi reads it: :func:`rgb2id` of the pixels).

    Args:
        source: PNG bytes, a path or a binary file object.

    Returns:
        (H, W) int64 segment ids, 0 = void.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    with Image.open(source) as img:
        if img.mode not in ("RGB", "RGBA"):
            raise ValueError(f"panoptic PNG: expected an RGB image, got mode {img.mode}")
        pixels = np.array(img, dtype=np.uint32)
    return rgb2id(pixels)


def segments_from_panoptic(
    id_map: Any, segments_info: Sequence[dict], categories: CategoryIndex, *, strict: bool = True
) -> tuple[list[Segment], np.ndarray]:
    """COCO panoptic annotation of one image -> the segments and void mask :class:`PanopticQuality` takes.

    Areas come from the PNG. (panopticapi takes a ground-truth segment's area from its JSON;
    the two agree for data written by panopticapi's converters and :func:`segments_to_panoptic`.)

    Args:
        id_map: (H, W) segment ids (:func:`read_panoptic_png`); 0 = void.
        segments_info: the image's ``segments_info`` (``id``, ``category_id``, optional ``iscrowd``).
        categories: maps ``category_id`` to a class index (``CategoryIndex.class_of``).
        strict: demand what panopticapi demands of a prediction: every nonzero id of the PNG
            listed, every listed id in the PNG, every category known. False reads as
            panopticapi reads ground truth: an unlisted id and a segment of an unknown
            category are neither void nor a segment (background), and a listed segment absent
            from the PNG is an empty segment (a false negative unless crowd).

    Returns:
        (``(mask, class, iscrowd)`` segments in ``segments_info`` order, (H, W) bool void mask).
    """
    if isinstance(id_map, torch.Tensor):
        id_map = id_map.detach().cpu().numpy()
    id_map = np.asarray(id_map)
    if id_map.ndim != 2:
        raise ValueError(f"id_map: expected (H, W), got shape {id_map.shape}")
    listed: set[int] = set()
    entries = []
    for n, s in enumerate(segments_info):
        sid = int(s["id"])
        if not 0 < sid <= MAX_SEGMENT_ID:
            raise ValueError(f"segments_info[{n}]: id {sid} is not in 1..{MAX_SEGMENT_ID} (0 is void)")
        if sid in listed:
            raise ValueError(f"segments_info[{n}]: id {sid} is listed twice")
        listed.add(sid)
        try:
            cls = categories.class_of(int(s["category_id"]))
        except KeyError:
            if strict:
                raise ValueError(f"segments_info[{n}]: category_id {s['category_id']} is not in the categories") from None
            continue
        entries.append((sid, cls, int(bool(s.get("iscrowd", 0)))))
    if strict:
        present = {int(i) for i in np.unique(id_map)} - {0}
        if present - listed:
            raise ValueError(f"id_map: segment ids {sorted(present - listed)} are in the PNG but not in segments_info")
        if listed - present:
            raise ValueError(f"segments_info: segment ids {sorted(listed - present)} are not in the PNG")
    segments: list[Segment] = [(id_map == sid, cls, crowd) for sid, cls, crowd in entries]
    return segments, id_map == 0


def segments_to_panoptic(
    segments: Sequence[Segment], categories: CategoryIndex, *, shape: tuple[int, int] | None = None
) -> tuple[np.ndarray, list[dict]]:
    """Segments with class indices -> COCO panoptic id map and ``segments_info``.

    Segment ``k`` (counting the written ones) gets id ``k``; ``bbox`` ``[x, y, w, h]`` and
    ``area`` are the segment's pixels', as panopticapi's converters compute them. Empty segments
    and class 0 (void) are left out: the converters have no bbox for an empty mask.

    Args:
        segments: disjoint ``(mask, class)`` or ``(mask, class, iscrowd)``.
        categories: maps class indices to COCO category ids (``CategoryIndex.coco_id_of``).
        shape: (H, W) of the image; needed only when ``segments`` is empty.

    Returns:
        ((H, W) int64 id map, 0 = void; ``segments_info`` of dicts with ``id``, ``category_id``,
        ``iscrowd``, ``bbox``, ``area``).
    """
    id_map = None if shape is None else np.zeros(shape, dtype=np.int64)
    info: list[dict] = []
    for n, seg in enumerate(segments):
        mask, cls, crowd = _unpack(seg, "segments", n)
        m = _as_bool_array(mask)
        if id_map is None:
            id_map = np.zeros(m.shape, dtype=np.int64)
        if m.shape != id_map.shape:
            raise ValueError(f"segments[{n}]: mask shape {m.shape} != {id_map.shape}")
        if not 0 <= cls < categories.num_classes:
            raise ValueError(f"segments[{n}]: class {cls} is not in 0..{categories.num_classes - 1}")
        if cls == 0 or not m.any():
            continue
        if (id_map[m] != 0).any():
            raise ValueError(f"segments[{n}]: overlaps an earlier segment (segments must be disjoint)")
        rows = np.flatnonzero(m.any(1))
        cols = np.flatnonzero(m.any(0))
        sid = len(info) + 1
        id_map[m] = sid
        info.append(
            {
                "id": sid,
                "category_id": categories.coco_id_of(cls),
                "iscrowd": int(crowd),
                "bbox": [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)],
                "area": int(m.sum()),
            }
        )
    if id_map is None:
        raise ValueError("segments: empty, so shape is needed")
    return id_map, info


# ---------------------------------------------------------------------- COCO instances


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

    A pixel covered by several instances goes to the first (file order). The crowd
    annotations of a category become one crowd segment ``(mask, class, 1)`` on the pixels no
    instance has (first category first where crowds of two categories overlap): panopticapi
    knows one crowd region per category and image. Instance annotations leave no pixel
    void: one without an annotation is background.

    Args:
        coco_gt: the ground truth.
        image_id: the image.
        class_of: maps ``category_id`` to a class index.

    Returns:
        (disjoint segments, (H, W) bool void mask, all False).
    """
    info = coco_gt.imgs[int(image_id)]
    h, w = int(info["height"]), int(info["width"])
    taken = np.zeros((h, w), dtype=bool)
    crowds: dict[int, np.ndarray] = {}
    segments: list[Segment] = []
    for ann in coco_gt.imgToAnns.get(int(image_id), []):
        mask = coco_gt.annToMask(ann).astype(bool)
        cls = class_of(int(ann["category_id"]))
        if ann.get("iscrowd"):
            crowds[cls] = crowds[cls] | mask if cls in crowds else mask
            continue
        free = mask & ~taken
        if not free.any():
            continue
        taken |= free
        segments.append((free, cls))
    for cls, mask in crowds.items():
        free = mask & ~taken
        if free.any():
            taken |= free
            segments.append((free, cls, 1))
    return segments, np.zeros((h, w), dtype=bool)
