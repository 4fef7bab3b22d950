"""COCO mask AP: sharded / pooled / distributed evaluation equals one plain pycocotools run."""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mtseg.config import config_from_dict
from mtseg.data.categories import CategoryIndex
from mtseg.metrics import (
    CocoMaskEvaluator,
    Evaluator,
    coco_gt_from_rows,
    evaluate_image_shard,
    masks_to_coco_results,
    merge_eval_imgs,
    ray_map,
)
from mtseg.tasks import build_tasks

CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
]


def _rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def make_rows(seed: int = 0, n_images: int = 10) -> list[dict]:
    """Shard rows (the data contract) with random boxes and ellipses, some crowd, some empty images."""
    rng = np.random.default_rng(seed)
    rows, ann_id = [], 500
    for i in range(n_images):
        h, w = (int(v) for v in rng.integers(40, 131, size=2))
        if i == 1:
            h = w = 128  # room for a 'large' (> 96^2 px) object
        anns = []
        for k in range(int(rng.integers(0, 8)) if i else 0):  # image 0 has no objects
            mask = np.zeros((h, w), dtype=bool)
            bh, bw = (110, 105) if (i, k) == (1, 0) else (int(rng.integers(3, h)), int(rng.integers(3, w)))
            y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            if rng.random() < 0.5 or (i, k) == (1, 0):
                mask[y0 : y0 + bh, x0 : x0 + bw] = True
            else:
                yy, xx = np.mgrid[:h, :w]
                mask = ((yy - y0 - bh / 2) / (bh / 2)) ** 2 + ((xx - x0 - bw / 2) / (bw / 2)) ** 2 <= 1
            if not mask.any():
                continue
            rle = _rle(mask)
            anns.append(
                {
                    "id": ann_id,
                    "category_id": int(rng.choice([c["id"] for c in CATEGORIES])),
                    "iscrowd": int(rng.random() < 0.15),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "area": float(mask_utils.area(rle)),
                    "segmentation_size": [h, w],
                    "segmentation_counts": rle["counts"],  # bytes, as in the parquet shards
                }
            )
            ann_id += 1
        rows.append(
            {"image_id": 1000 + 7 * i, "file_name": f"{i:06d}.jpg", "height": h, "width": w, "image": b"", "annotations": anns}
        )
    return rows


def make_results(rows: list[dict], seed: int = 1) -> list[dict]:
    """Shifted copies of most objects, some with the wrong class, plus false positives; coarse
    scores so that ties across images exercise accumulate()'s stable sort."""
    rng = np.random.default_rng(seed)
    results = []
    for row in rows:
        h, w = row["height"], row["width"]
        for ann in row["annotations"]:
            if rng.random() < 0.2:
                continue
            gt = mask_utils.decode({"size": [h, w], "counts": ann["segmentation_counts"]}).astype(bool)
            pred = np.roll(gt, (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), axis=(0, 1))
            cat = ann["category_id"] if rng.random() < 0.85 else int(rng.choice([c["id"] for c in CATEGORIES]))
            for _ in range(1 + int(rng.random() < 0.2)):  # occasional duplicate detection
                results.append(_result(row["image_id"], cat, pred, round(float(rng.random()), 1)))
        for _ in range(int(rng.integers(0, 3))):
            fp = np.zeros((h, w), dtype=bool)
            y0, x0 = int(rng.integers(0, h - 5)), int(rng.integers(0, w - 5))
            fp[y0 : y0 + int(rng.integers(2, 30)), x0 : x0 + int(rng.integers(2, 30))] = True
            results.append(_result(row["image_id"], int(rng.choice([1, 3, 18])), fp, round(float(rng.random()), 1)))
    rng.shuffle(results)
    return results


def _result(image_id: int, category_id: int, mask: np.ndarray, score: float) -> dict:
    rle = _rle(mask)
    return {
        "image_id": image_id,
        "category_id": category_id,
        "score": score,
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
    }


def write_gt_json(rows: list[dict], path: Path) -> Path:
    """The 'original annotation file' the shard rows came from."""
    dataset = copy.deepcopy(coco_gt_from_rows(rows, CATEGORIES).dataset)
    path.write_text(json.dumps(dataset))
    return path


def direct_eval(gt_json: Path, results: list[dict]) -> COCOeval:
    """A plain single-process pycocotools run, as its README shows."""
    gt = COCO(str(gt_json))
    ev = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iouType="segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = make_rows()
    results = make_results(rows)
    gt_json = write_gt_json(rows, tmp_path_factory.mktemp("coco") / "instances_val.json")
    reference = direct_eval(gt_json, results)
    return rows, results, gt_json, reference


def assert_eval_imgs_equal(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is None:
            continue
        assert g.keys() == w.keys()
        for key in g:
            np.testing.assert_array_equal(np.asarray(g[key]), np.asarray(w[key]), err_msg=key)


# ------------------------------------------------------------------------------- ground truth


def test_coco_gt_from_rows_builds_pycocotools_dataset():
    rows = make_rows()
    gt = coco_gt_from_rows(rows, CATEGORIES)
    assert sorted(gt.getImgIds()) == [r["image_id"] for r in rows]
    assert len(gt.getAnnIds()) == sum(len(r["annotations"]) for r in rows)
    ann = gt.dataset["annotations"][0]
    assert isinstance(ann["segmentation"]["counts"], str)
    src = next(a for row in rows for a in row["annotations"] if a["id"] == ann["id"])
    np.testing.assert_array_equal(
        gt.annToMask(ann),
        mask_utils.decode({"size": src["segmentation_size"], "counts": src["segmentation_counts"]}),
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda a: a.update(category_id=2), "unknown category_id 2"),
        (lambda a: a.update(id=0), "annotation id 0"),
        (lambda a: a.update(segmentation_size=[1, 1]), "mask size"),
    ],
)
def test_coco_gt_from_rows_rejects_bad_rows(edit, message):
    rows = make_rows(n_images=3)
    edit(rows[1]["annotations"][0])
    with pytest.raises(ValueError, match=message):
        coco_gt_from_rows(rows, CATEGORIES)


# --------------------------------------------------------------------- distributed == single run


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7, 20])
def test_sharded_stats_equal_single_pycocotools_run(data, num_shards):
    rows, results, _, reference = data
    ev = CocoMaskEvaluator(coco_gt_from_rows(rows, CATEGORIES))
    ev.update(results)
    metrics = ev.compute(num_shards=num_shards)
    np.testing.assert_allclose(ev.stats, reference.stats, rtol=0, atol=1e-9)
    assert metrics["mask_ap"] == pytest.approx(reference.stats[0], abs=1e-9)
    assert metrics["mask_ap50"] == pytest.approx(reference.stats[1], abs=1e-9)
    # Sanity: the fixture exercises a non-trivial AP.
    assert 0.05 < metrics["mask_ap"] < 0.95


def test_merged_eval_imgs_equal_single_run_eval_imgs(data):
    """Not only the numbers: the merged per-image matchings, ids included, are the single run's."""
    rows, results, _, reference = data
    gt = coco_gt_from_rows(rows, CATEGORIES)
    numbered = [{**r, "id": n + 1} for n, r in enumerate(results)]
    ids = sorted(gt.getImgIds())
    shards = [ids[0:2], ids[2:3], ids[3:]]
    evals = [evaluate_image_shard(gt.dataset, numbered, s) for s in shards]
    all_ids, merged = merge_eval_imgs(shards, evals, len(CATEGORIES), len(reference.params.areaRng))
    assert all_ids == ids
    assert_eval_imgs_equal(merged, reference.evalImgs)


def test_process_pool_executor_equals_single_run(data):
    rows, results, _, reference = data
    ev = CocoMaskEvaluator(coco_gt_from_rows(rows, CATEGORIES))
    ev.update(results)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        ev.compute(num_shards=4, executor=pool.map)
    np.testing.assert_allclose(ev.stats, reference.stats, rtol=0, atol=1e-9)


def test_perfect_prediction_gives_ap_one(data):
    rows, _, gt_json, _ = data
    perfect = [
        _result(
            row["image_id"],
            a["category_id"],
            mask_utils.decode({"size": a["segmentation_size"], "counts": a["segmentation_counts"]}),
            1.0,
        )
        for row in rows
        for a in row["annotations"]
        if not a["iscrowd"]
    ]
    ev = CocoMaskEvaluator(coco_gt_from_rows(rows, CATEGORIES))
    ev.update(perfect)
    metrics = ev.compute(num_shards=3)
    assert metrics["mask_ap"] == 1.0
    assert metrics["mask_ap50"] == metrics["mask_ap75"] == 1.0
    np.testing.assert_allclose(ev.stats, direct_eval(gt_json, perfect).stats, rtol=0, atol=1e-9)


def test_empty_results_give_ap_zero(data):
    rows = data[0]
    ev = CocoMaskEvaluator(coco_gt_from_rows(rows, CATEGORIES))
    metrics = ev.compute(num_shards=3)
    assert metrics["mask_ap"] == 0.0
    assert metrics["mask_ap50"] == 0.0
    # Undefined numbers (no ground truth in an area range) are NaN, never -1.
    assert all(v == 0.0 or np.isnan(v) for v in metrics.values())


def test_compute_does_not_modify_inputs(data):
    rows, results, _, _ = data
    gt = coco_gt_from_rows(rows, CATEGORIES)
    before_gt, before_results = copy.deepcopy(gt.dataset), copy.deepcopy(results)
    ev = CocoMaskEvaluator(gt)
    ev.update(results)
    ev.compute(num_shards=2)
    assert gt.dataset == before_gt
    assert results == before_results


def test_merge_and_state_dict_equal_one_evaluator(data):
    rows, results, _, reference = data
    gt = coco_gt_from_rows(rows, CATEGORIES)
    a, b = CocoMaskEvaluator(gt), CocoMaskEvaluator(gt)
    a.update(results[: len(results) // 2])
    b.update(results[len(results) // 2 :])
    shipped = CocoMaskEvaluator.from_state(pickle.loads(pickle.dumps(b.state_dict())), gt)
    a.merge(shipped)
    assert len(a.state_dict()["results"]) == len(results)
    a.compute(num_shards=3)
    np.testing.assert_allclose(a.stats, reference.stats, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(image_id=1), "image_id 1 is not in the ground truth"),
        (lambda r: r.update(category_id=2), "category_id 2 is not a ground-truth COCO category"),
        (lambda r: r["segmentation"].update(size=[5, 5]), "mask size"),
        (lambda r: r.pop("score"), "missing"),
        (lambda r: r.update(segmentation=[[0, 0, 1, 1, 2, 2]]), "compressed RLE"),
    ],
)
def test_update_rejects_bad_results(data, edit, message):
    rows, results, _, _ = data
    bad = copy.deepcopy(results[0])
    edit(bad)
    with pytest.raises(ValueError, match=message):
        CocoMaskEvaluator(coco_gt_from_rows(rows, CATEGORIES)).update([bad])


def test_update_rejects_mixed_bbox_presence(data):
    rows, results, _, _ = data
    ev = CocoMaskEvaluator(coco_gt_from_rows(rows, CATEGORIES))
    with pytest.raises(ValueError, match="bbox"):
        ev.update([results[0], {**results[1], "bbox": [0.0, 0.0, 1.0, 1.0]}])


def test_masks_to_coco_results_maps_ids_and_resizes():
    cats = CategoryIndex.from_categories(CATEGORIES)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = True
    masks[1, 4:, 2:] = True
    out = masks_to_coco_results(42, masks, torch.tensor([3, 1]), torch.tensor([0.9, 0.4]), cats, orig_size=(16, 24))
    assert [r["category_id"] for r in out] == [18, 1]
    assert [r["score"] for r in out] == pytest.approx([0.9, 0.4])
    assert out[0]["segmentation"]["size"] == [16, 24]
    assert isinstance(out[0]["segmentation"]["counts"], str)
    decoded = mask_utils.decode(out[0]["segmentation"])
    assert decoded.sum() == 8 * 12 and decoded[:8, :12].all()
    with pytest.raises(ValueError, match="class 4"):
        masks_to_coco_results(42, masks, torch.tensor([4, 1]), torch.tensor([0.9, 0.4]), cats)


# ----------------------------------------------------------------------------- torch.distributed

_WORKER = textwrap.dedent(
    """
    import pickle, sys
    import torch.distributed as dist
    from mtseg.config import config_from_dict
    from mtseg.data.categories import CategoryIndex
    from mtseg.metrics import Evaluator
    from mtseg.metrics.coco import _coco_from_dataset
    from mtseg.tasks import build_tasks

    rank, world, tmp = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    with open(f"{tmp}/inputs.pkl", "rb") as f:
        inputs = pickle.load(f)
    cats = CategoryIndex.from_categories(inputs["categories"])
    tasks = build_tasks(config_from_dict({"tasks": {"names": inputs["tasks"]}}), cats)
    ev = Evaluator(cats, tasks, coco_gt=_coco_from_dataset(inputs["gt"]))
    for batch, outputs, instances in inputs["parts"][rank]:
        ev.process(batch, outputs, None, instances)
    ev.all_reduce(num_shards=2)
    metrics = ev.compute()
    with open(f"{tmp}/out{rank}.pkl", "wb") as f:
        pickle.dump({"metrics": metrics, "stats": ev.metrics["mask"].stats}, f)
    # gloo aborts the process ("terminate called without an active exception") when a peer
    # tears its connections down first; agree that both are done before either does.
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _batches(rows: list[dict], results: list[dict], per_batch: int, seed: int = 3):
    """(batch, outputs, instances) triples over ``rows`` with random tiny dense maps."""
    g = torch.Generator().manual_seed(seed)
    cats = CategoryIndex.from_categories(CATEGORIES)
    parts = []
    for start in range(0, len(rows), per_batch):
        chunk = rows[start : start + per_batch]
        b = len(chunk)
        batch = {
            "image": torch.rand(b, 3, 16, 16, generator=g),
            "semantic": torch.randint(0, cats.num_classes, (b, 16, 16), generator=g),
            "supercategory": torch.randint(0, cats.num_supercategories, (b, 16, 16), generator=g),
            "boundary": (torch.rand(b, 16, 16, generator=g) > 0.8).float(),
            "image_id": torch.tensor([r["image_id"] for r in chunk]),
        }
        outputs = {
            "semantic": torch.randn(b, cats.num_classes, 16, 16, generator=g),
            "supercategory": torch.randn(b, cats.num_supercategories, 16, 16, generator=g),
            "boundary": torch.randn(b, 1, 16, 16, generator=g),
            "reconstruction": torch.rand(b, 3, 16, 16, generator=g),
        }
        ids = {r["image_id"] for r in chunk}
        parts.append((batch, outputs, [r for r in results if r["image_id"] in ids]))
    return parts


def test_all_reduce_over_two_gloo_ranks_equals_one_process(data, tmp_path):
    rows, results, _, reference = data
    tasks = ["semantic", "supercategory", "boundary", "instance", "reconstruction"]
    gt = coco_gt_from_rows(rows, CATEGORIES)
    parts = _batches(rows, results, per_batch=2)
    # Uneven split: rank 0 gets one batch, rank 1 the rest; image ownership for matching differs.
    rank_parts = [parts[:1], parts[1:]]
    (tmp_path / "inputs.pkl").write_bytes(
        pickle.dumps({"categories": CATEGORIES, "tasks": tasks, "gt": copy.deepcopy(gt.dataset), "parts": rank_parts})
    )
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=240)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)

    cats = CategoryIndex.from_categories(CATEGORIES)
    single = Evaluator(cats, build_tasks(config_from_dict({"tasks": {"names": tasks}}), cats), coco_gt=gt)
    for batch, outputs, instances in parts:
        single.process(batch, outputs, None, instances)
    want = single.compute()
    np.testing.assert_allclose(single.metrics["mask"].stats, reference.stats, rtol=0, atol=1e-9)
    for r in range(2):
        got = pickle.loads((tmp_path / f"out{r}.pkl").read_bytes())
        assert got["metrics"].keys() == want.keys()
        for key, value in want.items():
            assert got["metrics"][key] == pytest.approx(value, abs=1e-9, nan_ok=True), key
        np.testing.assert_allclose(got["stats"], reference.stats, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------- Ray


@pytest.mark.slow
def test_ray_tasks_executor_equals_single_run(data, ray_local):
    rows, results, _, reference = data
    ev = CocoMaskEvaluator(coco_gt_from_rows(rows, CATEGORIES))
    ev.update(results)
    ev.compute(num_shards=3, executor=ray_map())
    np.testing.assert_allclose(ev.stats, reference.stats, rtol=0, atol=1e-9)
