"""Dense metrics, panoptic quality and the combined Evaluator against hand-computed values."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from mtseg.config import config_from_dict
from mtseg.data.categories import IGNORE_INDEX, CategoryIndex
from mtseg.fusion import fused_predictions
from mtseg.metrics import (
    PSNR,
    BoundaryF1,
    ConfusionMatrix,
    Evaluator,
    PanopticQuality,
    coco_gt_from_rows,
    gt_segments_from_coco,
    masks_to_coco_results,
    segments_from_results,
)
from mtseg.tasks import build_tasks

CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
]

# ------------------------------------------------------------------------ ConfusionMatrix

TARGET = torch.tensor([[[0, 0, 1, 1], [2, 2, IGNORE_INDEX, 1]]])
PRED = torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 2]]])


def test_confusion_matrix_hand_computed():
    cm = ConfusionMatrix(num_classes=4)
    cm.update(PRED, TARGET)
    r = cm.compute()
    # 7 counted pixels (one ignored), 4 correct.
    assert r["pixel_acc"] == pytest.approx(4 / 7)
    # class 0: tp 1, gt 2, pred 2 -> 1/3; class 1: tp 2, gt 3, pred 3 -> 2/4; class 2: tp 1, gt 2, pred 2 -> 1/3
    assert r["iou_per_class"][:3] == pytest.approx([1 / 3, 1 / 2, 1 / 3])
    # class 3 is in neither target nor prediction: undefined and left out of the mean
    assert math.isnan(r["iou_per_class"][3])
    assert r["miou"] == pytest.approx(7 / 18)
    assert cm._state.sum() == 7 and cm._state[1, 2] == 1  # rows = target, columns = prediction


def test_confusion_matrix_counts_class_only_predicted():
    cm = ConfusionMatrix(num_classes=3)
    cm.update(torch.tensor([[[0, 2]]]), torch.tensor([[[0, 0]]]))
    r = cm.compute()
    assert r["iou_per_class"][2] == 0.0  # a false-positive-only class has IoU 0 and counts
    assert r["miou"] == pytest.approx((0.5 + 0.0) / 2)


def test_confusion_matrix_accumulates_over_batches_and_merges():
    whole = ConfusionMatrix(4)
    whole.update(PRED, TARGET)
    whole.update(TARGET.clamp(max=3), TARGET)
    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    a.update(PRED, TARGET)
    b.update(TARGET.clamp(max=3), TARGET)
    shipped = ConfusionMatrix.from_state(pickle.loads(pickle.dumps(b.state_dict())))
    a.merge(shipped)
    assert torch.equal(a._state, whole._state)
    a.all_reduce()  # no process group: no-op
    assert torch.equal(a._state, whole._state)
    a.reset()
    assert a._state.sum() == 0 and math.isnan(a.compute()["miou"])


def test_confusion_matrix_rejects_bad_input():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shapes differ"):
        cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cm.update(torch.full((1, 2, 2), 5), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="argmax"):
        cm.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="merge"):
        cm.merge(ConfusionMatrix(4))


# ----------------------------------------------------------------------------- BoundaryF1


def _line_maps():
    gt = torch.zeros(1, 5, 5, dtype=torch.bool)
    gt[0, :, 2] = True  # a vertical boundary, 5 px
    pred = torch.zeros(1, 5, 5, dtype=torch.bool)
    pred[0, :, 3] = True  # one pixel off
    pred[0, 0, 0] = True  # a stray pixel, 2 px from the boundary
    return pred, gt


@pytest.mark.parametrize(
    ("tolerance", "precision", "recall"),
    [(0, 0.0, 0.0), (1, 5 / 6, 1.0), (2, 1.0, 1.0)],
)
def test_boundary_f1_hand_computed(tolerance, precision, recall):
    pred, gt = _line_maps()
    bf = BoundaryF1(tolerance)
    bf.update_from_maps(pred, gt)
    r = bf.compute()
    assert r["boundary_precision"] == pytest.approx(precision)
    assert r["boundary_recall"] == pytest.approx(recall)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    assert r["boundary_f1"] == pytest.approx(f1)  # 10/11 at tolerance 1


def test_boundary_f1_tolerance_is_euclidean():
    gt = torch.zeros(1, 3, 3, dtype=torch.bool)
    pred = torch.zeros(1, 3, 3, dtype=torch.bool)
    gt[0, 0, 0], pred[0, 1, 1] = True, True  # sqrt(2) apart
    bf = BoundaryF1(1)
    bf.update_from_maps(pred, gt)
    assert bf.compute()["boundary_f1"] == 0.0


def test_boundary_f1_pools_counts_over_images():
    bf = BoundaryF1(0)
    pred = torch.zeros(2, 4, 4, dtype=torch.bool)
    gt = torch.zeros(2, 4, 4, dtype=torch.bool)
    gt[0, 0, 0] = pred[0, 0, 0] = True  # image 0: 1 of 1 correct
    gt[1, 3, 3] = True
    pred[1, 0, :3] = True  # image 1: 0 of 3 correct
    bf.update_from_maps(pred[:1], gt[:1])
    bf.update_from_maps(pred[1:], gt[1:])
    r = bf.compute()
    # Pooled: precision 1/4 (a per-image mean would give 1/2), recall 1/2.
    assert r["boundary_precision"] == pytest.approx(1 / 4)
    assert r["boundary_recall"] == pytest.approx(1 / 2)
    assert r["boundary_f1"] == pytest.approx(1 / 3)


def test_boundary_f1_edge_cases_and_state():
    bf = BoundaryF1(1)
    assert math.isnan(bf.compute()["boundary_f1"])
    bf.update_from_maps(torch.zeros(1, 4, 4), torch.ones(1, 4, 4))
    assert bf.compute() == {"boundary_f1": 0.0, "boundary_precision": 0.0, "boundary_recall": 0.0}
    copy = BoundaryF1.from_state(bf.state_dict())
    assert copy.tolerance == 1 and torch.equal(copy._state, bf._state)
    with pytest.raises(ValueError, match="tolerance"):
        BoundaryF1(-1)


# ----------------------------------------------------------------------------------- PSNR


def test_psnr_hand_computed():
    target = torch.zeros(2, 3, 4, 4)
    pred = target.clone()
    pred[..., :2] = 0.5  # squared error 0.25 on half the pixels
    p = PSNR()
    p.update(pred, target)
    assert p.compute()["mse"] == pytest.approx(0.125)
    assert p.compute()["psnr"] == pytest.approx(10 * math.log10(1 / 0.125))
    perfect = PSNR()
    perfect.update(target, target)
    assert perfect.compute()["psnr"] == math.inf
    assert math.isnan(PSNR().compute()["psnr"])
    with pytest.raises(ValueError, match="shapes differ"):
        p.update(pred, target[:1])


# ---------------------------------------------------------------------- PanopticQuality


def _box(shape, rows, cols):
    m = np.zeros(shape, dtype=bool)
    m[rows[0] : rows[1], cols[0] : cols[1]] = True
    return m


def test_panoptic_quality_hand_computed():
    s = (6, 6)
    gt = [(_box(s, (0, 2), (0, 4)), 1), (_box(s, (3, 6), (0, 2)), 1), (_box(s, (3, 6), (4, 6)), 2)]
    pred = [
        (_box(s, (0, 2), (0, 3)), 1),  # IoU 6/8 with gt 0: TP
        (_box(s, (4, 6), (0, 2)), 1),  # IoU 4/6 with gt 1: TP
        (_box(s, (3, 6), (4, 6)), 1),  # right place, wrong class: FP for 1, gt 2 is a FN
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


def test_panoptic_quality_void():
    s = (6, 6)
    void = _box(s, (2, 3), (0, 6))  # row 2 is unlabeled
    gt = [(_box(s, (3, 6), (0, 2)), 1)]
    pred = [
        (_box(s, (2, 6), (0, 2)), 1),  # 8 px, 2 on void: union 8 + 6 - 6 - 2 = 6 -> IoU 1
        (_box(s, (2, 3), (3, 6)), 2),  # entirely on void: neither TP nor FP
    ]
    pq = PanopticQuality(num_classes=3)
    pq.update(pred, gt, void=void)
    r = pq.compute()
    assert r["pq"] == pytest.approx(1.0) and r["num_classes_evaluated"] == 1


def test_panoptic_quality_perfect_empty_and_errors():
    s = (4, 4)
    segs = [(_box(s, (0, 2), (0, 2)), 1), (torch.from_numpy(_box(s, (2, 4), (2, 4))), 2)]
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
        pq.update([], [(_box(s, (0, 2), (0, 2)), 1), (_box(s, (1, 3), (1, 3)), 1)])
    with pytest.raises(ValueError, match="class 7"):
        pq.update([(_box(s, (0, 1), (0, 1)), 7)], [])


def _rle_result(image_id, category_id, mask, score):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "image_id": image_id,
        "category_id": category_id,
        "score": score,
        "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
    }


def test_segments_from_results_pastes_by_score():
    s = (6, 6)
    results = [
        _rle_result(1, 3, _box(s, (0, 4), (0, 4)), 0.6),  # 16 px, 9 of them taken by the 0.9 one
        _rle_result(1, 1, _box(s, (1, 4), (1, 4)), 0.9),  # 9 px, pasted first
        _rle_result(1, 18, _box(s, (4, 6), (4, 6)), 0.4),  # below the score threshold
        _rle_result(1, 1, _box(s, (4, 6), (0, 2)), 0.7),  # disjoint: kept whole
    ]
    segs = segments_from_results(results, 6, 6, class_of={1: 1, 3: 2, 18: 3}.__getitem__)
    assert [c for _, c in segs] == [1, 1]  # the 0.6 one keeps 7/16 < 0.5 of its mask: dropped
    assert [int(m.sum()) for m, _ in segs] == [9, 4]


def _tiny_rows():
    h0, w0, h1, w1 = 16, 16, 20, 24
    car = _box((h0, w0), (2, 8), (2, 10))
    dog = _box((h1, w1), (5, 15), (3, 20))
    crowd = _box((h1, w1), (0, 3), (0, 24))

    def ann(i, cat, m, crowd_flag=0):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        return {
            "id": i,
            "category_id": cat,
            "iscrowd": crowd_flag,
            "bbox": list(mask_utils.toBbox(rle)),
            "area": float(mask_utils.area(rle)),
            "segmentation_size": list(m.shape),
            "segmentation_counts": rle["counts"],
        }

    rows = [
        {"image_id": 10, "height": h0, "width": w0, "annotations": [ann(1, 3, car)]},
        {"image_id": 11, "height": h1, "width": w1, "annotations": [ann(2, 18, dog), ann(3, 1, crowd, 1)]},
    ]
    return rows, {10: [(car, 3)], 11: [(dog, 18)]}


def test_gt_segments_from_coco():
    rows, objects = _tiny_rows()
    gt = coco_gt_from_rows(rows, CATEGORIES)
    segs, void = gt_segments_from_coco(gt, 11, class_of=CategoryIndex.from_categories(CATEGORIES).class_of)
    assert [c for _, c in segs] == [3]
    assert np.array_equal(segs[0][0], objects[11][0][0])
    assert void.sum() == 3 * 24


# ---------------------------------------------------------------------------- Evaluator


ALL_TASKS = ["semantic", "supercategory", "boundary", "instance", "reconstruction"]


def _evaluator(cats: CategoryIndex, names: list[str], **kwargs) -> Evaluator:
    return Evaluator(cats, build_tasks(config_from_dict({"tasks": {"names": names}}), cats), **kwargs)


def _perfect_batch(cats: CategoryIndex, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, h, w = 2, 16, 16
    semantic = torch.randint(0, cats.num_classes, (b, h, w), generator=g)
    semantic[0, :2] = IGNORE_INDEX
    supercat = torch.tensor(cats.class_to_super)[semantic.clamp(max=cats.num_classes - 1)]
    boundary = (semantic != semantic.roll(1, dims=2)).float()  # class edges along x
    image = torch.rand(b, 3, h, w, generator=g)
    batch = {
        "image": image,
        "semantic": semantic,
        "supercategory": supercat,
        "boundary": boundary,
        "image_id": torch.tensor([10, 11]),
        "orig_size": torch.tensor([[16, 16], [20, 24]]),
    }

    def onehot(t: torch.Tensor, n: int) -> torch.Tensor:  # confident logits for class map t
        return torch.nn.functional.one_hot(t.clamp(max=n - 1), n).permute(0, 3, 1, 2).float() * 10

    outputs = {
        "semantic": onehot(semantic, cats.num_classes),
        "supercategory": onehot(supercat, cats.num_supercategories),
        "boundary": (boundary[:, None] * 2 - 1) * 5,
        "reconstruction": image.clone(),
        "instance": torch.zeros(b, 3, h, w),
    }
    return batch, outputs


def _perfect_instances(cats: CategoryIndex):
    _, objects = _tiny_rows()
    out = []
    for image_id, objs in objects.items():
        masks = torch.from_numpy(np.stack([m for m, _ in objs]))
        labels = [cats.class_of(c) for _, c in objs]
        out.extend(masks_to_coco_results(image_id, masks, labels, [0.9] * len(objs), cats))
    return out


def test_evaluator_perfect_predictions():
    cats = CategoryIndex.from_categories(CATEGORIES)
    rows, _ = _tiny_rows()
    ev = _evaluator(cats, ALL_TASKS, coco_gt=coco_gt_from_rows(rows, CATEGORIES))
    batch, outputs = _perfect_batch(cats)
    ev.process(batch, outputs, fused_predictions(outputs["semantic"].argmax(1)), _perfect_instances(cats))
    m = ev.compute()
    assert set(m) == {
        "val/miou",
        "val/pixel_acc",
        "val/supercategory_miou",
        "val/boundary_f1",
        "val/boundary_precision",
        "val/boundary_recall",
        "val/psnr",
        "val/mask_ap",
        "val/mask_ap50",
        "val/mask_ap75",
        "val/mask_ap_s",
        "val/mask_ap_m",
        "val/mask_ap_l",
        "val/pq",
        "val/sq",
        "val/rq",
    }
    for key in ("miou", "pixel_acc", "supercategory_miou", "boundary_f1", "mask_ap", "mask_ap50", "pq", "sq", "rq"):
        assert m[f"val/{key}"] == pytest.approx(1.0), key
    assert m["val/psnr"] == math.inf
    assert math.isnan(m["val/mask_ap_l"])  # no large objects in 16-24 px images


def test_evaluator_only_reports_present_tasks():
    cats = CategoryIndex.from_categories(CATEGORIES)
    ev = _evaluator(cats, ["semantic"])
    batch, outputs = _perfect_batch(cats)
    ev.process(batch, {"semantic": outputs["semantic"]})  # argmax of the logits when no fused map
    assert set(ev.compute()) == {"val/miou", "val/pixel_acc"}
    # instance without ground truth: no mask metrics
    assert set(_evaluator(cats, ["semantic", "instance"]).compute()) == {"val/miou", "val/pixel_acc"}
    with pytest.raises(ValueError, match="outputs: missing 'boundary'"):
        _evaluator(cats, ["semantic", "boundary"]).process(batch, {"semantic": outputs["semantic"]})
    with pytest.raises(ValueError, match="batch: missing 'boundary'"):
        _evaluator(cats, ["semantic", "boundary"]).process({"semantic": batch["semantic"]}, outputs)


def test_fused_semantic_map_replaces_the_argmax():
    cats = CategoryIndex.from_categories(CATEGORIES)
    batch, outputs = _perfect_batch(cats)
    ev = _evaluator(cats, ["semantic", "supercategory"])
    ev.process(batch, outputs, fused_predictions(torch.zeros_like(batch["semantic"])))
    m = ev.compute()
    assert m["val/miou"] < 1.0 and m["val/supercategory_miou"] == 1.0  # the fused map is scored, not the logits


def test_evaluator_state_dict_and_merge_equal_one_pass():
    cats = CategoryIndex.from_categories(CATEGORIES)
    rows, _ = _tiny_rows()
    gt = coco_gt_from_rows(rows, CATEGORIES)
    tasks = ALL_TASKS
    batches = [_perfect_batch(cats, seed) for seed in range(3)]
    g = torch.Generator().manual_seed(7)
    for _, outputs in batches:  # imperfect outputs so that the numbers are not all 1.0
        for key in ("semantic", "supercategory", "boundary"):
            outputs[key] = outputs[key] + torch.randn(outputs[key].shape, generator=g) * 8
        outputs["reconstruction"] = outputs["reconstruction"] + 0.1
    inst = _perfect_instances(cats)

    one = _evaluator(cats, tasks, coco_gt=gt)
    for (batch, outputs), instances in zip(batches, [inst, [], []]):
        one.process(batch, outputs, None, instances)
    a, b = _evaluator(cats, tasks, coco_gt=gt), _evaluator(cats, tasks, coco_gt=gt)
    a.process(*batches[0], None, inst)
    for batch, outputs in batches[1:]:
        b.process(batch, outputs, None, [])
    shipped = _evaluator(cats, tasks, coco_gt=gt)
    shipped.load_state_dict(pickle.loads(pickle.dumps(b.state_dict())))
    a.merge(shipped)
    a.all_reduce()  # no process group: no-op
    want, got = one.compute(), a.compute(num_shards=2)
    assert 0.0 < want["val/miou"] < 1.0
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], nan_ok=True), key
    a.reset()
    assert math.isnan(a.compute()["val/miou"])
