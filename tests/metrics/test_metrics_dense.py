"""Dense metrics (mtseg/metrics/dense.py): ConfusionMatrix, BoundaryF1 and PSNR against hand-computed values."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from mtseg.data.categories import IGNORE_INDEX
from mtseg.metrics import PSNR, BoundaryF1, ConfusionMatrix

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
