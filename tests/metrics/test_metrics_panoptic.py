"""Panoptic quality (mtseg/metrics/panoptic.py), its segments from COCO results, ground truth and panoptic PNG + JSON,
against hand-computed values (panopticapi itself: test_metrics_panoptic_reference.py)."""

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
    id2rgb,
    read_panoptic_png,
    rgb2id,
    segments_from_panoptic,
    segments_from_results,
    segments_to_panoptic,
    write_panoptic_png,
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


def test_panoptic_quality_things_and_stuff(box):
    s = (6, 8)
    # Class 1 a thing (person), 2 and 3 stuff (sky, grass), 4 stuff (sand) only ever predicted.
    gt = [(box(s, (0, 3), (0, 8)), 2), (box(s, (3, 6), (0, 6)), 3), (box(s, (3, 6), (6, 8)), 1)]
    pred = [
        (box(s, (0, 4), (0, 8)), 2),  # 32 px over the 24 of sky: IoU 0.75
        (box(s, (4, 6), (0, 5)), 3),  # 10 of grass's 18: IoU 10/18, a TP
        (box(s, (4, 6), (6, 8)), 1),  # 4 of the person's 6: IoU 2/3
        (box(s, (4, 6), (5, 6)), 4),  # sand where grass is: a FP
    ]
    pq = PanopticQuality(num_classes=5, isthing=[False, True, False, False, False])
    pq.update(pred, gt)
    r = pq.compute()
    sky, grass, person = 0.75, 10 / 18, 2 / 3
    assert r["pq_per_class"][1:] == pytest.approx([person, sky, grass, 0.0])
    assert r["sq_per_class"][1:] == pytest.approx([person, sky, grass, 0.0])
    assert r["rq_per_class"][1:] == [1.0, 1.0, 1.0, 0.0]
    assert (r["num_classes_evaluated"], r["num_things_evaluated"], r["num_stuff_evaluated"]) == (4, 1, 3)
    assert r["pq_things"] == pytest.approx(person) and r["rq_things"] == 1.0
    assert r["pq_stuff"] == pytest.approx((sky + grass) / 3) and r["sq_stuff"] == pytest.approx((sky + grass) / 3)
    assert r["rq_stuff"] == pytest.approx(2 / 3)
    assert r["pq"] == pytest.approx((person + sky + grass) / 4)
    # No stuff class evaluated: NaN, where panopticapi would divide by zero.
    things_only = PanopticQuality(num_classes=5, isthing=[False, True, False, False, False])
    things_only.update([(box(s, (3, 6), (6, 8)), 1)], [(box(s, (3, 6), (6, 8)), 1)])
    r = things_only.compute()
    assert r["pq_things"] == 1.0 and math.isnan(r["pq_stuff"]) and r["num_stuff_evaluated"] == 0


def test_panoptic_quality_crowd_is_per_category(box):
    s = (4, 10)
    pq = PanopticQuality(num_classes=3)  # 1 person, 2 car
    gt = [(box(s, (0, 4), (0, 6)), 1, 1), (box(s, (0, 4), (7, 10)), 2, 0)]  # a person crowd, a car
    pred = [
        (box(s, (0, 4), (0, 4)), 1),  # all on the person crowd: ignored
        (box(s, (0, 4), (4, 7)), 2),  # 8 of 12 px on the person crowd, which is no crowd for a car: a FP
        (box(s, (0, 4), (7, 10)), 2),  # the car: IoU 1
    ]
    pq.update(pred, gt)
    gt = [(box(s, (0, 4), (0, 3)), 2, 1)]  # a car crowd, void beside it
    pred = [
        (box(s, (0, 4), (1, 7)), 2),  # 8 px on the car crowd + 8 on void of 24: ignored (neither alone is half)
        (box(s, (0, 4), (7, 10)), 1),  # a person on background: a FP
    ]
    pq.update(pred, gt, void=box(s, (0, 4), (3, 5)))
    r = pq.compute()
    assert math.isnan(r["pq_per_class"][0]) and r["pq_per_class"][1:] == pytest.approx([0.0, 1 / 1.5])
    assert r["rq"] == pytest.approx(1 / 3) and r["num_classes_evaluated"] == 2

    # Of two crowd segments of one class only the last listed is its crowd region (panopticapi).
    pq = PanopticQuality(num_classes=2)
    gt = [(box(s, (0, 4), (0, 3)), 1, 1), (box(s, (0, 4), (5, 8)), 1, 1)]
    pq.update([(box(s, (0, 4), (0, 3)), 1), (box(s, (0, 4), (5, 8)), 1)], gt)
    assert pq.state_dict()["state"][:3, 1].tolist() == [0.0, 1.0, 0.0]  # TP, FP, FN


def test_panoptic_quality_empty_gt_segment_and_bad_input(box):
    s = (4, 4)
    pq = PanopticQuality(num_classes=3)
    pq.update([], [(np.zeros(s, dtype=bool), 1)])  # a listed segment with no pixels is missed (panopticapi)
    assert pq.compute()["pq_per_class"][1] == 0.0
    assert PanopticQuality(3, isthing=[False, True, True])._config() == PanopticQuality(3)._config()
    assert PanopticQuality.from_state(PanopticQuality(3, isthing=[0, 0, 1]).state_dict()).isthing == (False, False, True)
    with pytest.raises(ValueError, match="isthing: needs 3"):
        PanopticQuality(3, isthing=[True, True])
    with pytest.raises(ValueError, match="got 4 items"):
        pq.update([(box(s, (0, 1), (0, 1)), 1, 0, 0)], [])


# ---------------------------------------------------------------------- COCO panoptic format


def test_rgb2id_id2rgb_and_png_round_trip(tmp_path):
    assert rgb2id([1, 2, 3]) == 1 + 2 * 256 + 3 * 65536
    assert id2rgb(1 + 2 * 256 + 3 * 65536) == [1, 2, 3]
    ids = np.array([[0, 1, 255], [256, 65536, 256**3 - 1]])
    assert np.array_equal(rgb2id(id2rgb(ids)), ids)
    data = write_panoptic_png(ids, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes() == data
    assert np.array_equal(read_panoptic_png(data), ids)
    assert np.array_equal(read_panoptic_png(tmp_path / "a.png"), ids)
    with pytest.raises(ValueError, match="ids must be in"):
        id2rgb(np.array([256**3]))
    with pytest.raises(ValueError, match="expected an RGB image"):
        read_panoptic_png(_gray_png())


def _gray_png():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_segments_to_and_from_panoptic(box, categories):
    idx = CategoryIndex.from_categories(categories)  # classes 1 person, 2 car, 3 dog
    s = (5, 8)
    segs = [
        (box(s, (1, 4), (2, 6)), 3),
        (np.zeros(s, dtype=bool), 1),  # empty: left out
        (box(s, (4, 5), (0, 8)), 1, 1),
        (box(s, (0, 1), (0, 1)), 0),  # void: left out
    ]
    id_map, info = segments_to_panoptic(segs, idx)
    assert info == [
        {"id": 1, "category_id": 18, "iscrowd": 0, "bbox": [2, 1, 4, 3], "area": 12},
        {"id": 2, "category_id": 1, "iscrowd": 1, "bbox": [0, 4, 8, 1], "area": 8},
    ]
    assert id_map.sum() == 12 + 2 * 8
    back, void = segments_from_panoptic(id_map, info, idx)
    assert [(c, k) for _, c, k in back] == [(3, 0), (1, 1)]
    assert np.array_equal(back[0][0], segs[0][0]) and np.array_equal(void, id_map == 0)
    assert segments_to_panoptic([], idx, shape=s)[0].shape == s
    with pytest.raises(ValueError, match="overlaps"):
        segments_to_panoptic([(box(s, (0, 2), (0, 2)), 1), (box(s, (1, 3), (1, 3)), 2)], idx)

    # strict (a prediction, as panopticapi demands) vs lenient (ground truth, as panopticapi reads it)
    id_map[0, 0] = 7  # an id the JSON does not list
    with pytest.raises(ValueError, match=r"ids \[7\] are in the PNG"):
        segments_from_panoptic(id_map, info, idx)
    extra = [*info, {"id": 9, "category_id": 3}, {"id": 10, "category_id": 99}]
    with pytest.raises(ValueError, match="category_id 99"):
        segments_from_panoptic(id_map, extra, idx)
    with pytest.raises(ValueError, match=r"ids \[9\] are not in the PNG"):
        segments_from_panoptic(np.where(id_map == 7, 0, id_map), extra[:3], idx)
    lenient, void = segments_from_panoptic(id_map, extra, idx, strict=False)
    assert [(c, k, int(m.sum())) for m, c, k in lenient] == [(3, 0, 12), (1, 1, 8), (2, 0, 0)]
    assert not void[0, 0]  # the unlisted id is neither void nor a segment
    with pytest.raises(ValueError, match="listed twice"):
        segments_from_panoptic(id_map, [info[0], info[0]], idx, strict=False)


def test_update_from_coco_equals_update(box, categories):
    idx = CategoryIndex.from_categories(categories)
    s = (4, 10)
    gt_map, gt_info = segments_to_panoptic([(box(s, (0, 4), (0, 6)), 1, 1), (box(s, (0, 4), (7, 10)), 2)], idx)
    # Column 6 is in no segment: id 0, void.
    pred_segs = [(box(s, (0, 4), (0, 4)), 1), (box(s, (0, 4), (4, 7)), 2), (box(s, (0, 3), (7, 10)), 2)]
    pred_map, pred_info = segments_to_panoptic(pred_segs, idx)
    a, b = PanopticQuality(idx.num_classes), PanopticQuality(idx.num_classes)
    a.update_from_coco(pred_map, pred_info, gt_map, gt_info, idx)
    b.update(pred_segs, [(box(s, (0, 4), (0, 6)), 1, 1), (box(s, (0, 4), (7, 10)), 2)], void=box(s, (0, 4), (6, 7)))
    assert torch.equal(a.state_dict()["state"], b.state_dict()["state"])
    assert a.state_dict()["state"][:3, 2].tolist() == [1.0, 1.0, 0.0]  # car: TP (IoU 9/12), the FP 4/12 on void
    with pytest.raises(ValueError, match="shape"):
        a.update_from_coco(np.zeros((4, 5), dtype=np.int64), [], gt_map, gt_info, idx)


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
    # The dog, then the person crowd as a crowd segment of its category (panopticapi), not void.
    assert [seg[1:] for seg in segs] == [(3,), (1, 1)]
    assert np.array_equal(segs[0][0], objects[11][0][0])
    assert segs[1][0].sum() == 3 * 24 and not void.any()
