"""The combined Evaluator (mtseg/metrics/evaluator.py): every task's metrics in one dict, merged and shipped as one pass."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from mtseg.config import config_from_dict
from mtseg.data.categories import IGNORE_INDEX, CategoryIndex
from mtseg.fusion import fused_predictions
from mtseg.metrics import (
    Evaluator,
    coco_gt_from_rows,
    masks_to_coco_results,
)
from mtseg.tasks import build_tasks

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


def _perfect_instances(cats: CategoryIndex, tiny_rows):
    _, objects = tiny_rows()
    out = []
    for image_id, objs in objects.items():
        masks = torch.from_numpy(np.stack([m for m, _ in objs]))
        labels = [cats.class_of(c) for _, c in objs]
        out.extend(masks_to_coco_results(image_id, masks, labels, [0.9] * len(objs), cats))
    return out


def test_evaluator_perfect_predictions(categories, tiny_rows):
    cats = CategoryIndex.from_categories(categories)
    rows, _ = tiny_rows()
    ev = _evaluator(cats, ALL_TASKS, coco_gt=coco_gt_from_rows(rows, categories))
    batch, outputs = _perfect_batch(cats)
    ev.process(batch, outputs, fused_predictions(outputs["semantic"].argmax(1)), _perfect_instances(cats, tiny_rows))
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


def test_evaluator_only_reports_present_tasks(categories):
    cats = CategoryIndex.from_categories(categories)
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


def test_fused_semantic_map_replaces_the_argmax(categories):
    cats = CategoryIndex.from_categories(categories)
    batch, outputs = _perfect_batch(cats)
    ev = _evaluator(cats, ["semantic", "supercategory"])
    ev.process(batch, outputs, fused_predictions(torch.zeros_like(batch["semantic"])))
    m = ev.compute()
    assert m["val/miou"] < 1.0 and m["val/supercategory_miou"] == 1.0  # the fused map is scored, not the logits


def test_evaluator_state_dict_and_merge_equal_one_pass(categories, tiny_rows):
    cats = CategoryIndex.from_categories(categories)
    rows, _ = tiny_rows()
    gt = coco_gt_from_rows(rows, categories)
    tasks = ALL_TASKS
    batches = [_perfect_batch(cats, seed) for seed in range(3)]
    g = torch.Generator().manual_seed(7)
    for _, outputs in batches:  # imperfect outputs so that the numbers are not all 1.0
        for key in ("semantic", "supercategory", "boundary"):
            outputs[key] = outputs[key] + torch.randn(outputs[key].shape, generator=g) * 8
        outputs["reconstruction"] = outputs["reconstruction"] + 0.1
    inst = _perfect_instances(cats, tiny_rows)

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
