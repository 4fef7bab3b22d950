"""Fusion: perfect head outputs must give back the hand-built instances exactly."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mtseg.data.categories import CategoryIndex
from mtseg.fusion import find_centers, fuse_instances, fuse_semantic, instances_to_coco

H = W = 48
SIGMA = 2.0

CATEGORIES = CategoryIndex.from_categories(
    [
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 3, "name": "car", "supercategory": "vehicle"},
        {"id": 4, "name": "motorcycle", "supercategory": "vehicle"},
        {"id": 18, "name": "dog", "supercategory": "animal"},
    ]
)
PERSON, CAR, MOTORCYCLE, DOG = (CATEGORIES.class_of(i) for i in (1, 3, 4, 18))


def _rect(y0, y1, x0, x1):
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _scene():
    """Two images of instances: (mask, contiguous category) lists."""
    yy, xx = np.mgrid[:H, :W]
    disk = (yy - 30) ** 2 + (xx - 22) ** 2 <= 36
    dog = _rect(34, 45, 30, 34) | _rect(41, 45, 30, 45)  # L-shaped: centroid off the pixel grid
    return [
        [
            (_rect(4, 13, 4, 13), PERSON),  # odd side: integer centroid (8, 8)
            (_rect(20, 30, 6, 16), CAR),  # even sides: centroid (24.5, 10.5), four tied heatmap peaks
            (_rect(20, 30, 16, 25), CAR),  # touches the first car: same class, split only by offsets
            (dog, DOG),
        ],
        [(disk, MOTORCYCLE)],
    ]


def _perfect_outputs(scene):
    """Head outputs a perfect model would give for ``scene``."""
    b = len(scene)
    sem = torch.zeros(b, H, W, dtype=torch.int64)
    center = torch.zeros(b, H, W)
    offset = torch.zeros(b, 2, H, W)
    ids = torch.zeros(b, H, W, dtype=torch.int64)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    for i, instances in enumerate(scene):
        for k, (mask, cls) in enumerate(instances):
            m = torch.from_numpy(mask)
            sem[i][m] = cls
            ids[i][m] = k + 1
            cy, cx = ys[m].mean(), xs[m].mean()
            center[i] = torch.maximum(center[i], torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * SIGMA**2)))
            offset[i, 0][m] = cy - ys[m]
            offset[i, 1][m] = cx - xs[m]
    c2s = torch.tensor(CATEGORIES.class_to_super)
    pooled_max = F.max_pool2d(ids[:, None].float(), 3, 1, 1)[:, 0]
    pooled_min = -F.max_pool2d(-ids[:, None].float(), 3, 1, 1)[:, 0]
    edges = pooled_max != pooled_min
    return {
        "semantic": 10.0 * F.one_hot(sem, CATEGORIES.num_classes).permute(0, 3, 1, 2).float(),
        "supercategory": 10.0 * F.one_hot(c2s[sem], CATEGORIES.num_supercategories).permute(0, 3, 1, 2).float(),
        "boundary": torch.where(edges, 10.0, -10.0)[:, None],
        "instance": torch.cat([center[:, None], offset], dim=1),
    }, sem


def _coco_ground_truth(scene) -> COCO:
    images, annotations = [], []
    for i, instances in enumerate(scene):
        images.append({"id": i + 1, "height": H, "width": W})
        for mask, cls in instances:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": CATEGORIES.coco_id_of(cls),
                    "segmentation": rle,
                    "area": float(mask.sum()),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": 0,
                }
            )
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": CATEGORIES.to_categories()}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def test_fusion_recovers_instances_and_their_rle():
    scene = _scene()
    outputs, sem = _perfect_outputs(scene)

    fused = fuse_semantic(outputs, CATEGORIES)
    assert torch.equal(fused, sem)

    instances = fuse_instances(outputs, fused, CATEGORIES)
    for found, expected in zip(instances, scene):
        assert len(found) == len(expected)
        for mask, cls in expected:
            matches = [d for d in found if np.array_equal(d["mask"], mask)]
            assert len(matches) == 1, "each hand-built instance comes back exactly once"
            assert matches[0]["category"] == cls
            assert 0.9 <= matches[0]["score"] <= 1.0  # peak heat (below 1 off the pixel grid) x class probability

    results = []
    for i, found in enumerate(instances):
        results += instances_to_coco(found, i + 1, CATEGORIES)
    expected_rles = {
        (i + 1, CATEGORIES.coco_id_of(cls), mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode())
        for i, instances_ in enumerate(scene)
        for mask, cls in instances_
    }
    got_rles = {(r["image_id"], r["category_id"], r["segmentation"]["counts"]) for r in results}
    assert got_rles == expected_rles
    assert all(isinstance(r["segmentation"]["counts"], str) and r["segmentation"]["size"] == [H, W] for r in results)

    gt = _coco_ground_truth(scene)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # AP@[.5:.95]
    assert ev.stats[1] == pytest.approx(1.0)  # AP@.5


def test_instances_to_coco_resizes_to_original_size():
    mask = _rect(4, 13, 4, 13)
    (result,) = instances_to_coco([{"mask": mask, "category": PERSON, "score": 0.9}], 7, CATEGORIES, orig_size=(96, 96))
    decoded = mask_utils.decode(result["segmentation"]).astype(bool)
    assert np.array_equal(decoded, np.kron(mask, np.ones((2, 2), dtype=bool)))
    assert result["category_id"] == 1 and result["image_id"] == 7 and result["score"] == pytest.approx(0.9)
    assert "bbox" not in result


def test_instances_to_coco_accepts_tensor_masks_and_rejects_bad_shapes():
    mask = torch.from_numpy(_rect(0, 5, 0, 5))
    (result,) = instances_to_coco([{"mask": mask, "category": DOG, "score": 0.5}], 1, CATEGORIES, orig_size=torch.tensor([H, W]))
    assert result["category_id"] == 18
    with pytest.raises(ValueError, match="must be \\(H, W\\)"):
        instances_to_coco([{"mask": np.zeros((2, H, W), bool), "category": DOG, "score": 0.5}], 1, CATEGORIES)


def test_fuse_semantic_keeps_category_inside_supercategory():
    sem = torch.zeros(1, CATEGORIES.num_classes, 1, 2)
    sem[0, CAR] = 5.0  # the category head says car (a vehicle) ...
    sem[0, DOG] = 4.0
    sup = torch.zeros(1, CATEGORIES.num_supercategories, 1, 2)
    sup[0, CATEGORIES.class_to_super[DOG], :, 0] = 9.0  # ... the supercategory head says animal on pixel 0
    sup[0, CATEGORIES.class_to_super[CAR], :, 1] = 9.0
    outputs = {"semantic": sem, "supercategory": sup}
    assert fuse_semantic(outputs, CATEGORIES).tolist() == [[[DOG, CAR]]]
    assert fuse_semantic(outputs, CATEGORIES, hierarchical=False).tolist() == [[[CAR, CAR]]]
    sup[0, 0, :, 1] = 20.0  # background supercategory allows only background
    assert fuse_semantic(outputs, CATEGORIES).tolist() == [[[DOG, 0]]]


def test_fuse_semantic_snaps_blurred_edge_pixels():
    sem = torch.zeros(1, CATEGORIES.num_classes, 1, 4)
    sem[0, CAR, 0, :2] = 8.0  # confident car on the left
    sem[0, DOG, 0, 2:] = 8.0  # confident dog on the right ...
    sem[0, CAR, 0, 2] = 7.9  # ... except a blurred pixel that is nearly a tie
    boundary = torch.full((1, 1, 1, 4), -10.0)
    plain = fuse_semantic({"semantic": sem}, CATEGORIES)
    assert plain.tolist() == [[[CAR, CAR, DOG, DOG]]]
    boundary[0, 0, 0, 2] = 10.0
    snapped = fuse_semantic({"semantic": sem, "boundary": boundary}, CATEGORIES)
    assert snapped.tolist() == [[[CAR, CAR, CAR, DOG]]]  # takes the more confident neighbour's label


def test_find_centers_threshold_nms_and_top_k():
    heat = torch.zeros(20, 20)
    heat[5, 5], heat[7, 7], heat[15, 15], heat[10, 2] = 0.9, 0.8, 0.5, 0.05
    centers, scores = find_centers(heat, threshold=0.1, nms_kernel=3, top_k=10)
    assert centers.tolist() == [[5, 5], [7, 7], [15, 15]] and scores.tolist() == pytest.approx([0.9, 0.8, 0.5])
    centers, _ = find_centers(heat, threshold=0.1, nms_kernel=5, top_k=10)
    assert centers.tolist() == [[5, 5], [15, 15]]  # (7, 7) is suppressed by the stronger neighbour
    centers, _ = find_centers(heat, threshold=0.1, nms_kernel=3, top_k=1)
    assert centers.tolist() == [[5, 5]]
    with pytest.raises(ValueError, match="nms_kernel"):
        find_centers(heat, threshold=0.1, nms_kernel=4, top_k=1)


def test_fuse_instances_without_centers_or_things():
    outputs, sem = _perfect_outputs([[]])
    assert fuse_instances(outputs, sem, CATEGORIES) == [[]]
    with pytest.raises(ValueError, match="does not match"):
        fuse_instances(outputs, sem[:, :10], CATEGORIES)
    with pytest.raises(ValueError, match="semantic output"):
        fuse_semantic({"semantic": torch.zeros(1, 3, 4, 4)}, CATEGORIES)


def test_fuse_panoptic_merges_things_and_stuff_and_voids_specks():
    from mtseg.fusion import fuse_panoptic

    cats = CategoryIndex.from_categories(
        [
            {"id": 1, "name": "person", "supercategory": "person", "isthing": 1},
            {"id": 100, "name": "sky", "supercategory": "sky", "isthing": 0},
            {"id": 120, "name": "ground", "supercategory": "ground", "isthing": 0},
        ]
    )
    person, sky, ground = (cats.class_of(i) for i in (1, 100, 120))
    sem = torch.full((H, W), ground)
    sem[: H // 2] = sky
    sem[0, 0] = person  # a thing-class pixel no instance claims
    sem[20:30, 10:20] = person
    sem[40:50, 30:40] = person
    one, two = _rect(20, 30, 10, 20), _rect(40, 50, 30, 40)
    instances = [{"mask": one, "category": person, "score": 0.9}, {"mask": two, "category": person, "score": 0.8}]
    logits = 10.0 * F.one_hot(sem, cats.num_classes).permute(2, 0, 1)[None].float()
    logits[0, 0] = 100.0  # void would win the argmax: fusion never predicts it in a panoptic space
    assert fuse_semantic({"semantic": logits}, cats).min() > 0
    ids, segments = fuse_panoptic(sem, instances, cats, min_area=0.01)
    by_cat = {}
    for s in segments:
        by_cat.setdefault(s["category_id"], []).append(s)
        assert s["area"] == int((ids == s["id"]).sum()) and s["area"] >= 0.01 * H * W
    assert [s["isthing"] for s in by_cat[1]] == [1, 1] and len(by_cat[100]) == len(by_cat[120]) == 1
    assert {s["id"] for s in segments} == set(np.unique(ids)) - {0}
    assert ids[0, 0] == 0  # the thing-class pixel no instance claimed is void
    np.testing.assert_array_equal(ids == by_cat[1][0]["id"], one)
    assert by_cat[1][0]["bbox"] == [10, 20, 10, 10]
    big, _ = fuse_panoptic(sem, instances, cats, min_area=0.05)  # 100 px < 5% of the image: things become void
    assert not (big[one] > 0).any() and (big > 0).any()
    small, _ = fuse_panoptic(sem, instances, cats, min_area=0.01, orig_size=(2 * H, 2 * W))
    assert small.shape == (2 * H, 2 * W)
