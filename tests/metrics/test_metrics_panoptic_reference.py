"""PanopticQuality (mtseg/metrics/panoptic.py) against panopticapi's pq_compute on the same PNGs and JSON.

Six 24 x 32 images in COCO's panoptic format: five random (stuff bands, thing boxes, crowds,
void, predictions shifted, relabelled, dropped or made up) and one built by hand around
panopticapi's edge cases (crowd per category, the last crowd of a category winning, a
prediction exactly half on crowd, ground-truth ids missing from the JSON or from the PNG).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

# tests/metrics is on sys.path (pytest rootdir-relative import of a test module without __init__.py).
from panopticapi_reference import pq_compute

from mtseg.data.categories import CategoryIndex
from mtseg.metrics import PanopticQuality, read_panoptic_png, segments_to_panoptic, write_panoptic_png

H, W = 24, 32
THINGS = {1: "person", 3: "car", 18: "dog", 44: "bottle", 90: "toothbrush"}  # bottle: predicted only; toothbrush: nowhere
STUFF = {100: "sky", 120: "road", 130: "wall"}
CATEGORIES = [{"id": i, "name": n, "supercategory": n, "isthing": 1} for i, n in THINGS.items()] + [
    {"id": i, "name": n, "supercategory": n, "isthing": 0} for i, n in STUFF.items()
]
VOID, UNLISTED = -1, -2  # pixel labels of the index maps below: void, and an id the JSON does not list


def _rect(y0, y1, x0, x1):
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _shift(mask, dy, dx):
    out = np.zeros_like(mask)
    out[max(dy, 0) : H + min(dy, 0), max(dx, 0) : W + min(dx, 0)] = mask[
        max(-dy, 0) : H - max(dy, 0), max(-dx, 0) : W - max(dx, 0)
    ]
    return out


class _Canvas:
    """Segments painted in turn (a later one takes the pixels it covers): ``label[y, x]`` is the segment's index."""

    def __init__(self, fill=VOID):
        self.label = np.full((H, W), fill, dtype=np.int64)
        self.segments: list[tuple[int, int]] = []  # (COCO category id, iscrowd)

    def paint(self, mask, category_id, crowd=0):
        self.segments.append((category_id, crowd))
        self.label[mask] = len(self.segments) - 1

    def masks(self):
        return [(self.label == i, cat, crowd) for i, (cat, crowd) in enumerate(self.segments)]


def _random_image(rng):
    gt = _Canvas()
    r = int(rng.integers(6, 12))
    gt.paint(_rect(0, r, 0, W), 100)
    gt.paint(_rect(r, H, 0, W), 120)
    if rng.random() < 0.6:
        x0 = int(rng.integers(0, 20))
        gt.paint(_rect(r - 3, r + 3, x0, x0 + int(rng.integers(4, 12))), 130)
    for _ in range(int(rng.integers(2, 5))):
        y0, x0 = int(rng.integers(0, H - 3)), int(rng.integers(0, W - 3))
        gt.paint(_rect(y0, y0 + int(rng.integers(4, 10)), x0, x0 + int(rng.integers(4, 11))), int(rng.choice([1, 3, 18])))
    if rng.random() < 0.7:
        y0, x0 = int(rng.integers(0, H - 4)), int(rng.integers(0, W - 4))
        gt.paint(_rect(y0, y0 + int(rng.integers(3, 8)), x0, x0 + int(rng.integers(4, 10))), int(rng.choice([1, 3])), crowd=1)
    y0, x0 = int(rng.integers(0, H - 3)), int(rng.integers(0, W - 3))
    gt.label[_rect(y0, y0 + int(rng.integers(2, 6)), x0, x0 + int(rng.integers(2, 7)))] = VOID

    pred = _Canvas()
    for mask, cat, crowd in gt.masks():
        if not mask.any() or (crowd and rng.random() < 0.5):
            continue
        u = rng.random()
        if u < 0.15:
            continue  # missed: a FN
        if u < 0.3:
            cat = int(rng.choice([c for c in ((1, 3, 18, 44) if cat in THINGS else (100, 120, 130)) if c != cat]))
        pred.paint(_shift(mask, int(rng.integers(-1, 2)), int(rng.integers(-1, 2))), cat)
    for _ in range(int(rng.integers(1, 4))):
        y0, x0 = int(rng.integers(0, H - 2)), int(rng.integers(0, W - 2))
        pred.paint(
            _rect(y0, y0 + int(rng.integers(2, 7)), x0, x0 + int(rng.integers(2, 8))), int(rng.choice([1, 3, 18, 44, 130]))
        )
    y0, x0 = int(rng.integers(0, H - 3)), int(rng.integers(0, W - 3))
    pred.label[_rect(y0, y0 + 3, x0, x0 + 5)] = VOID  # left unpredicted
    return gt, pred


def _hand_image():
    gt = _Canvas()
    gt.paint(_rect(0, 8, 0, W) & ~_rect(0, 4, 28, W), 100)  # sky, less the corner the JSON leaves out
    gt.paint(_rect(8, H, 0, W), 120)  # road
    gt.paint(_rect(2, 7, 12, 20), 18)  # dog
    gt.paint(_rect(10, 16, 0, 8), 1, crowd=1)  # person crowd A
    gt.paint(_rect(10, 16, 24, W), 1, crowd=1)  # person crowd B: listed last, the only one panopticapi uses
    gt.paint(_rect(16, 22, 8, 16), 3, crowd=1)  # car crowd
    gt.label[_rect(18, H, 24, W)] = VOID
    gt.label[_rect(0, 4, 28, W)] = UNLISTED

    pred = _Canvas()
    pred.paint(_rect(0, 9, 0, W), 100)  # sky, over the unlisted corner and a road row
    pred.paint(_rect(9, H, 0, W), 120)
    pred.paint(_rect(2, 7, 12, 20), 18)  # dog: IoU 1
    # Two on person crowd A, which panopticapi forgets: two FPs (were crowd A the one, B's would be one FP).
    pred.paint(_rect(10, 13, 0, 8), 1)
    pred.paint(_rect(13, 16, 0, 8), 1)
    pred.paint(_rect(10, 16, 24, W), 1)  # on person crowd B: ignored
    pred.paint(_rect(16, 22, 8, 12), 18)  # on the car crowd, but a dog: a FP
    pred.paint(_rect(16, 22, 12, 20), 3)  # exactly half on the car crowd: a FP (ignored only above half)
    pred.paint(_rect(18, H, 24, W), 44)  # bottle on void: ignored
    pred.paint(_rect(8, 10, 0, 6), 44)  # bottle on road: a FP
    return gt, pred


def _write(canvas, idx, folder, file_name, rng, extra_info=()):
    masks = [(m, idx.class_of(cat), crowd) for m, cat, crowd in canvas.masks()]
    id_map, info = segments_to_panoptic(masks, idx, shape=(H, W))
    # Random 24-bit ids, so that all three colour channels carry them.
    new_ids = rng.choice(256**3 - 1, size=len(info) + 2, replace=False) + 1
    lut = np.concatenate([[0], new_ids[: len(info)]])
    id_map = lut[id_map]
    for s in info:
        s["id"] = int(lut[s["id"]])
    id_map[canvas.label == UNLISTED] = int(new_ids[-1])
    info += [dict(s, id=int(new_ids[-2])) for s in extra_info]
    write_panoptic_png(id_map, folder / file_name)
    return {"file_name": file_name, "segments_info": info}


def write_dataset(root):
    """Write the six images in COCO's panoptic format under ``root``.

    Returns:
        ``(gt_json, pred_json, gt_folder, pred_folder)``, the arguments of ``pq_compute``.
    """
    gt_dir, pred_dir = root / "gt", root / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    idx = CategoryIndex.from_categories(CATEGORIES)
    rng = np.random.default_rng(0)
    images, gt_anns, pred_anns = [], [], []
    for image_id in range(1, 7):
        gt, pred = _hand_image() if image_id == 6 else _random_image(rng)
        # The hand image's JSON lists a car that is not in its PNG: a FN.
        extra = [{"category_id": 3, "iscrowd": 0, "bbox": [0, 0, 0, 0], "area": 0}] if image_id == 6 else []
        name = f"{image_id:012d}.png"
        images.append({"id": image_id, "file_name": name.replace(".png", ".jpg"), "height": H, "width": W})
        gt_anns.append({"image_id": image_id, **_write(gt, idx, gt_dir, name, rng, extra)})
        pred_anns.append({"image_id": image_id, **_write(pred, idx, pred_dir, name, rng)})
    gt_json, pred_json = root / "gt.json", root / "pred.json"
    gt_json.write_text(json.dumps({"images": images, "annotations": gt_anns, "categories": CATEGORIES}))
    pred_json.write_text(json.dumps({"annotations": pred_anns}))
    return str(gt_json), str(pred_json), str(gt_dir), str(pred_dir)


@pytest.fixture(scope="module")
def panoptic_files(tmp_path_factory):
    """``write_dataset`` in a temporary directory."""
    return write_dataset(tmp_path_factory.mktemp("panoptic"))


def _mtseg_pq(gt_json, pred_json, gt_dir, pred_dir):
    gt, pred = json.loads(Path(gt_json).read_text()), json.loads(Path(pred_json).read_text())
    idx = CategoryIndex.from_categories(gt["categories"])
    metric = PanopticQuality(idx.num_classes, isthing=idx.thing_classes)
    preds = {a["image_id"]: a for a in pred["annotations"]}
    n_pred_segments = 0
    for g in gt["annotations"]:
        p = preds[g["image_id"]]
        n_pred_segments += len(p["segments_info"])
        metric.update_from_coco(
            read_panoptic_png(f"{pred_dir}/{p['file_name']}"),
            p["segments_info"],
            read_panoptic_png(f"{gt_dir}/{g['file_name']}"),
            g["segments_info"],
            idx,
        )
    return metric, idx, n_pred_segments


def test_panoptic_quality_equals_panopticapi(panoptic_files):
    ref = pq_compute(*panoptic_files)
    metric, idx, n_pred_segments = _mtseg_pq(*panoptic_files)
    ours = metric.compute()

    # The data reach every branch: matches, misses, false and ignored predictions, things and stuff.
    tp, fp, fn, _ = metric.state_dict()["state"].numpy()
    assert tp.sum() >= 15 and fp.sum() >= 15 and fn.sum() >= 10
    assert n_pred_segments - tp.sum() - fp.sum() >= 3  # ignored on void or crowd
    assert fp[idx.class_of(44)] > 0 and tp[idx.class_of(44)] == 0 and fn[idx.class_of(44)] == 0

    for group, suffix in (("All", ""), ("Things", "_things"), ("Stuff", "_stuff")):
        for name in ("pq", "sq", "rq"):
            assert ours[name + suffix] == pytest.approx(ref[group][name], abs=1e-9, rel=0), (group, name)
    assert ours["num_classes_evaluated"] == ref["All"]["n"] == len(CATEGORIES) - 1
    assert ours["num_things_evaluated"] == ref["Things"]["n"] == len(THINGS) - 1
    assert ours["num_stuff_evaluated"] == ref["Stuff"]["n"] == len(STUFF)
    for cat_id, values in ref["per_class"].items():
        c = idx.class_of(cat_id)
        for name in ("pq", "sq", "rq"):
            mine = ours[f"{name}_per_class"][c]
            if cat_id == 90:  # never seen: panopticapi says 0.0, mtseg NaN ("not evaluated")
                assert math.isnan(mine) and values[name] == 0.0
            else:
                assert mine == pytest.approx(values[name], abs=1e-9, rel=0), (cat_id, name)
