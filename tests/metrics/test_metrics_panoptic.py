"""Panoptic quality (mtseg/metrics/panoptic.py) and its segments from COCO results and ground truth, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from mtseg.data.categories import CategoryIndex
from mtseg.metrics import (
    PanopticQuality,
    coco_gt_from_rows,
    gt_segments_from_coco,
    segments_from_results,
)

# ---------------------------------------------------------------------- PanopticQuality


def test_panoptic_quality_hand_computed(box):
    s = (6, 6)
    gt = [(box(s, (0, 2), (0, 4)), 1), (box(s, (3, 6), (0, 2)), 1), (box(s, (3, 6), (4, 6)), 2)]
    pred = [
        (box(s, (0, 2), (0, 3)), 1),  # IoU 6/8 with gt 0: TP
        (box(s, (4, 6), (0, 2)), 1),  # IoU 4/6 with gt 1: TP
        (box(s, (3, 6), (4, 6)), 1),  # right place, wrong class: FP for 1, gt 2 is a FN
    ]
    pq = PanopticQuality(num_classes=3)
    pq.update(pred, gt)
    r = pq.compute()
    iou_sum = 0.75 + 2 / 3
    pq1, sq1, rq1 = iou_sum / 2.5, iou_sum / 2, 2 / 2.5
    assert r["pq_per_class"][1] == pytest.approx(pq1)
    assert r["pq_per_class"][2] == 0.0
    assert math.isnan(r["pq_per_class"][0])  # background is not a thing
    assert r["num_classes_evaluated"] == 2
    assert r["pq"] == pytest.approx(pq1 / 2)
    assert r["sq"] == pytest.approx(sq1 / 2)
    assert r["rq"] == pytest.approx(rq1 / 2)


def test_panoptic_quality_void(box):
    s = (6, 6)
    void = box(s, (2, 3), (0, 6))  # row 2 is unlabeled
    gt = [(box(s, (3, 6), (0, 2)), 1)]
    pred = [
        (box(s, (2, 6), (0, 2)), 1),  # 8 px, 2 on void: union 8 + 6 - 6 - 2 = 6 -> IoU 1
        (box(s, (2, 3), (3, 6)), 2),  # entirely on void: neither TP nor FP
    ]
    pq = PanopticQuality(num_classes=3)
    pq.update(pred, gt, void=void)
    r = pq.compute()
    assert r["pq"] == pytest.approx(1.0) and r["num_classes_evaluated"] == 1


def test_panoptic_quality_perfect_empty_and_errors(box):
    s = (4, 4)
    segs = [(box(s, (0, 2), (0, 2)), 1), (torch.from_numpy(box(s, (2, 4), (2, 4))), 2)]
    pq = PanopticQuality(num_classes=3)
    pq.update(segs, segs)
    pq.update([], [])  # an image with nothing: no change
    pq.update([(np.zeros(s, dtype=bool), 1)], [])  # an empty predicted segment is not a FP
    assert pq.compute()["pq"] == 1.0
    other = PanopticQuality.from_state(pq.state_dict())
    other.merge(pq)
    assert other.compute()["pq"] == 1.0
    assert math.isnan(PanopticQuality(3).compute()["pq"])
    with pytest.raises(ValueError, match="overlaps"):
        pq.update([], [(box(s, (0, 2), (0, 2)), 1), (box(s, (1, 3), (1, 3)), 1)])
    with pytest.raises(ValueError, match="class 7"):
        pq.update([(box(s, (0, 1), (0, 1)), 7)], [])


def _rle_result(image_id, category_id, mask, score):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "image_id": image_id,
        "category_id": category_id,
        "score": score,
        "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
    }


def test_segments_from_results_pastes_by_score(box):
    s = (6, 6)
    results = [
        _rle_result(1, 3, box(s, (0, 4), (0, 4)), 0.6),  # 16 px, 9 of them taken by the 0.9 one
        _rle_result(1, 1, box(s, (1, 4), (1, 4)), 0.9),  # 9 px, pasted first
        _rle_result(1, 18, box(s, (4, 6), (4, 6)), 0.4),  # below the score threshold
        _rle_result(1, 1, box(s, (4, 6), (0, 2)), 0.7),  # disjoint: kept whole
    ]
    segs = segments_from_results(results, 6, 6, class_of={1: 1, 3: 2, 18: 3}.__getitem__)
    assert [c for _, c in segs] == [1, 1]  # the 0.6 one keeps 7/16 < 0.5 of its mask: dropped
    assert [int(m.sum()) for m, _ in segs] == [9, 4]


def test_gt_segments_from_coco(categories, tiny_rows):
    rows, objects = tiny_rows()
    gt = coco_gt_from_rows(rows, categories)
    segs, void = gt_segments_from_coco(gt, 11, class_of=CategoryIndex.from_categories(categories).class_of)
    assert [c for _, c in segs] == [3]
    assert np.array_equal(segs[0][0], objects[11][0][0])
    assert void.sum() == 3 * 24
