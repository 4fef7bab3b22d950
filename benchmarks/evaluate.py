"""Evaluation throughput: Ray Data batch inference vs a plain loop, and COCOeval time per 1,000 instances.

Run (about three minutes on 2 otherwise idle CPUs)::

    .venv/bin/python benchmarks/evaluate.py                  # 1200 synthetic 64 px images
    .venv/bin/python benchmarks/evaluate.py --images 4000 --passes 3

Inference, same model and same images on both sides, each doing the whole evaluation work
per image (decode + resize + targets, forward, fusion, per-batch metric updates):

* ``ray_data``: :func:`mtseg.evaluate.build_eval_dataset` on a local Ray with 2 CPUs, the
  plan ``mtseg evaluate`` picks by default (:func:`mtseg.evaluate.plan_inference`: on CPUs the
  model runs in the read + decode tasks), iterated to the last per-batch state;
* ``actor_pool``: the same with ``--concurrency 2`` (one single-threaded actor per CPU, the
  plan GPUs get), for comparison;
* ``plain``: one process, torch on every core, :func:`mtseg.data.pipeline.iter_local_batches`
  feeding :func:`mtseg.train.loop.evaluate` (training validation's loop) and one Evaluator.

Both read the same parquet shards from local disk. The model is the demo's (resnet18 + FPN,
five tasks) at random init: throughput does not depend on what the weights learned. After a
short warm-up of each side, ``--passes`` timed passes alternate side by side, so that
background load on a shared machine hits both alike; figures are medians over the passes.

Two rates per side. ``*_images_per_s`` and ``ratio`` are the steady-state throughput: the
images after the first results came back over the time after that, which leaves out each
side's start-up (the plain loop's model build; Ray's worker processes importing torch and
loading the model, a fixed cost of seconds that a real evaluation pays once, whatever its
size). ``end_to_end`` has the plain images / wall time of a pass, start-up included, and
the time to the first results; ``end_to_end_ratio`` is its ratio. ``cold_first_results_s``
is that time in the warm-up pass, where Ray's worker processes import torch for the first
time (what a single ``mtseg evaluate`` job pays once); the timed passes reuse them, as a
job's later evaluations do. Actors cannot be reused: each pass starts new ones.

COCOeval: ground truth from the same shards, detections made from it (each object detected
``--detections-per-object`` times with masks shifted by up to two pixels and falling scores,
one false positive per image), scored by plain single-process pycocotools (``evaluate`` +
``accumulate`` + ``summarize``) and by ``CocoMaskEvaluator.compute`` with the per-image
matching in Ray tasks (the two must agree exactly); time per 1,000 detected instances.

Robustness (``--robustness``, or ``--robustness-only`` for this part alone): a clean
:func:`mtseg.evaluate.evaluate_loaded` pass and the whole corruption suite
(:func:`mtseg.evaluate.evaluate_robustness`: clean + 15 corruptions x 5 severities) on the same
first ``--robustness-images`` images, the suite timed between two clean passes (after a warm-up
one); ``corruption_suite_over_clean`` is the suite's wall time over the mean clean pass (the goal
is at most 100: 76 evaluations plus the corruptions' own cost). Beside it, what each corruption
costs on its own, in this process: seconds per image at the benchmark's image size and at
COCO's (``--coco-px``, the same images upscaled), over the severities, and the first call's cost
(the library's import; numba compiling glass blur's pixel shuffle, once per process)::

    .venv/bin/python benchmarks/evaluate.py --robustness-only --robustness-images 32   # ~5 min on 2 CPUs

One JSON line goes to stdout and to ``benchmarks/results/evaluate.json`` (``--robustness-only``:
``benchmarks/results/evaluate_robustness.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from _results import write_results

SPLIT = "val2017"


def _make_checkpoint(directory: str, data_uri: str, batch_size: int) -> str:
    from mtseg.config import load_config, to_yaml
    from mtseg.data.manifest import read_manifest
    from mtseg.data.pipeline import categories_of
    from mtseg.models import build_model
    from mtseg.train import checkpoint as ckpt

    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "configs", "demo.yaml")
    cfg = load_config(config, [f"data.uri={data_uri}", f"data.batch_size={batch_size}"])
    categories = categories_of(read_manifest(data_uri, SPLIT))
    torch.manual_seed(0)
    model = build_model(cfg, categories)
    ckpt.save(directory, {"model": model.state_dict()}, {"step": 0, "categories": categories.to_categories()}, to_yaml(cfg))
    return directory


@dataclass
class Pass:
    """One pass over the images: the total, and when the first results came back."""

    images: int
    seconds: float
    first_images: int = 0
    first_seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def steady_images_per_s(self) -> float:
        """Throughput after the first results (start-up excluded): images after them / time after them."""
        return (self.images - self.first_images) / max(self.seconds - self.first_seconds, 1e-9)


def plain_pass(loaded, data_uri: str, batch_size: int, coco_gt, limit: int | None = None) -> Pass:
    """Training validation's loop in one process over the split (model build included)."""
    from mtseg.data.pipeline import iter_local_batches
    from mtseg.fusion import has_instances
    from mtseg.metrics import Evaluator
    from mtseg.tasks import build_tasks
    from mtseg.train.checkpoint import build_inference_model
    from mtseg.train.loop import evaluate

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    cfg, cats = loaded.cfg, loaded.categories
    model = build_inference_model(cfg, cats, loaded.model_state)
    tasks = build_tasks(cfg, cats)
    evaluator = Evaluator(cats, tasks, coco_gt=coco_gt if has_instances(tasks) else None)
    result = Pass(0, 0.0)
    for batch in iter_local_batches(data_uri, SPLIT, cats, cfg, False, tasks=tasks, batch_size=batch_size, limit=limit):
        evaluate(model, [batch], tasks, cfg, cats, evaluator, torch.device("cpu"))
        result.images += int(batch["image_id"].shape[0])
        if not result.first_images:
            result.first_images, result.first_seconds = result.images, time.perf_counter() - start
    result.seconds = time.perf_counter() - start
    return result


def ray_pass(
    loaded, data_uri: str, batch_size: int, limit: int | None = None, concurrency: int | None = None
) -> tuple[Pass, dict]:
    """``mtseg evaluate``'s pipeline with its default plan (or ``concurrency`` actors), to the last per-batch state."""
    import ray

    from mtseg.evaluate import build_eval_dataset, plan_inference

    start = time.perf_counter()
    plan = plan_inference(ray.cluster_resources(), concurrency=concurrency)
    ds, _ = build_eval_dataset(loaded, data_uri, SPLIT, batch_size=batch_size, plan=plan, limit=limit)
    result = Pass(0, 0.0)
    for row in ds.iter_rows():
        result.images += int(row["images"])
        if not result.first_images:
            result.first_images, result.first_seconds = result.images, time.perf_counter() - start
    result.seconds = time.perf_counter() - start
    return result, plan


def ground_truth(data_uri: str):
    """The split's COCO ground truth, from the shards' annotation columns (no pixels read)."""
    import pyarrow.parquet as pq

    from mtseg import storage
    from mtseg.data.manifest import read_manifest, shard_uris
    from mtseg.metrics import coco_gt_from_rows

    manifest = read_manifest(data_uri, SPLIT)
    rows = []
    for uri in shard_uris(data_uri, SPLIT, manifest):
        fs, path = storage.resolve(uri)
        rows += pq.read_table(path, filesystem=fs, columns=["image_id", "height", "width", "annotations"]).to_pylist()
    return coco_gt_from_rows(rows, manifest["categories"])


def _fake_detections(gt, copies: int, seed: int = 0) -> list[dict]:
    """Detections derived from the ground truth, as a detector's output looks.

    Every object is detected ``copies`` times (its mask shifted by up to two pixels, scores
    falling with each copy: one good match and near-duplicates), and every image has one
    false positive (another image's object pasted in).
    """
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    anns_by_image: dict[int, list[dict]] = {}
    for ann in gt.dataset["annotations"]:
        anns_by_image.setdefault(int(ann["image_id"]), []).append(ann)
    image_ids = sorted(gt.imgs)
    results = []
    for n, image_id in enumerate(image_ids):
        h, w = int(gt.imgs[image_id]["height"]), int(gt.imgs[image_id]["width"])
        objects = [(a, k) for a in anns_by_image.get(image_id, []) if not a["iscrowd"] for k in range(copies)]
        donor = [a for a in anns_by_image.get(image_ids[(n + 1) % len(image_ids)], []) if not a["iscrowd"]][:1]
        for ann, k in objects + [(a, copies) for a in donor]:
            m = mask_utils.decode(gt.annToRLE(ann))
            if m.shape != (h, w):
                continue
            m = np.roll(m, tuple(int(v) for v in rng.integers(-2, 3, size=2)), axis=(0, 1))
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(ann["category_id"]),
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                    "score": float(rng.uniform(0.5, 1.0) / (1 + k)),
                }
            )
    return results


def coco_timing(gt, shards: int, copies: int) -> dict:
    """Seconds per 1,000 detections: single-process pycocotools vs CocoMaskEvaluator + ray_map.

    The Ray side runs twice: the first call pays for the task workers' imports, the second
    is what every later evaluation in the same cluster costs.
    """
    from pycocotools.cocoeval import COCOeval

    from mtseg.metrics import CocoMaskEvaluator, ray_map

    results = _fake_detections(gt, copies)

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        ev = COCOeval(gt, gt.loadRes([dict(r) for r in results]), iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    single_s = time.perf_counter() - start

    ray_s = []
    for _ in range(2):
        start = time.perf_counter()
        dist = CocoMaskEvaluator(gt)
        dist.update(results)
        dist.compute(num_shards=shards, executor=ray_map())
        ray_s.append(time.perf_counter() - start)
        if not np.array_equal(dist.stats, ev.stats):
            raise AssertionError(f"distributed COCOeval {dist.stats} != single-process {ev.stats}")
    per_k = 1000.0 / len(results)
    return {
        "images": len(gt.imgs),
        "gt_instances": len(gt.dataset["annotations"]),
        "detections": len(results),
        "mask_ap": round(float(ev.stats[0]), 4),
        "single_process_s": round(single_s, 3),
        "ray_tasks_first_s": round(ray_s[0], 3),
        "ray_tasks_s": round(ray_s[1], 3),
        "ray_shards": shards,
        "single_process_s_per_1000_instances": round(single_s * per_k, 3),
        "ray_tasks_s_per_1000_instances": round(ray_s[1] * per_k, 3),
        "stats_identical": True,
    }


def _timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def corruption_costs(data_uri: str, images: int, corruptions, severities, coco_px: tuple[int, int]) -> dict:
    """Seconds per image of each corruption alone, in this process, at the images' size and upscaled to COCO's.

    Each corruption's first call (imports; numba compiling glass blur) is timed apart and left out
    of its rate; the rates are means over the images and ``severities``.
    """
    import pyarrow.parquet as pq
    from PIL import Image

    from mtseg import storage
    from mtseg.data.corruptions import corrupt
    from mtseg.data.manifest import read_manifest, shard_uris
    from mtseg.data.transforms import decode_image

    rows: list[dict] = []
    for uri in shard_uris(data_uri, SPLIT, read_manifest(data_uri, SPLIT)):
        fs, path = storage.resolve(uri)
        rows += pq.read_table(path, filesystem=fs, columns=["image_id", "image"]).to_pylist()
        if len(rows) >= images:
            break
    rows = rows[:images]
    small = [(r["image_id"], decode_image(r["image"]).permute(1, 2, 0).numpy()) for r in rows]
    # COCO-sized images: a few of the same, upscaled (a corruption's cost grows with the pixels).
    big = [(k, np.asarray(Image.fromarray(p).resize(coco_px, Image.Resampling.BILINEAR))) for k, p in small[:2]]
    first_call, small_rate, big_rate = {}, {}, {}
    for name in corruptions:
        first_call[name] = round(_timed(corrupt, small[0][1], name, severities[0], key=-1)[0], 4)
        for rates, sample in ((small_rate, small), (big_rate, big)):
            seconds = sum(_timed(corrupt, p, name, s, key=k)[0] for s in severities for k, p in sample)
            rates[name] = round(seconds / (len(sample) * len(severities)), 5)
    ranked = sorted(big_rate, key=big_rate.get, reverse=True)
    total = sum(big_rate.values())
    return {
        "s_per_image": small_rate,
        "s_per_image_coco_px": big_rate,
        "coco_px": f"{coco_px[0]}x{coco_px[1]}",
        "first_call_s": first_call,
        "dominant_coco_px": [
            {"corruption": n, "s_per_image": big_rate[n], "share": round(big_rate[n] / total, 3)} for n in ranked[:3]
        ],
    }


def robustness_timing(loaded, data_uri: str, *, images: int, batch_size: int, corruptions, severities, coco_px) -> dict:
    """The corruption suite against a clean evaluation of the same images, side by side (see the module docstring)."""
    from mtseg.evaluate import evaluate_loaded, evaluate_robustness

    quiet = {"log": lambda _: None, "limit": images, "batch_size": batch_size}
    evaluate_loaded(loaded, data_uri, SPLIT, **quiet)  # warm-up: Ray's workers import torch and mtseg
    before, _ = _timed(evaluate_loaded, loaded, data_uri, SPLIT, **quiet)
    suite_s, suite = _timed(evaluate_robustness, loaded, data_uri, SPLIT, corruptions=corruptions, severities=severities, **quiet)
    after, clean = _timed(evaluate_loaded, loaded, data_uri, SPLIT, **quiet)
    clean_s = (before + after) / 2
    passes = {name: round(sum(by.values()), 2) for name, by in suite.seconds.items()}
    clean_pass = suite.clean.timing["total_s"]
    costs = corruption_costs(data_uri, images, corruptions, severities, coco_px)
    return {
        "images": clean.images,
        "corruptions": len(corruptions),
        "severities": list(severities),
        "evaluations": 1 + len(corruptions) * len(severities),
        "clean_pass_s": [round(before, 2), round(after, 2)],
        "suite_s": round(suite_s, 1),
        "corruption_suite_over_clean": round(suite_s / clean_s, 1),
        "target_over_clean": 100,
        # Each corruption's passes in the suite (inference + metrics, as evaluate_loaded times them),
        # and what they cost beyond as many clean passes, per image.
        "suite_passes_s": passes,
        "suite_extra_s_per_image": {
            name: round((t - clean_pass * len(severities)) / (clean.images * len(severities)), 4) for name, t in passes.items()
        },
        "corruption_cost": costs,
        "summary": {k: {n: None if math.isnan(v) else round(v, 4) for n, v in row.items()} for k, row in suite.summary.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1200, help="synthetic validation images")
    parser.add_argument("--size", type=int, default=64, help="synthetic image side, pixels")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--images-per-shard",
        type=int,
        default=16,
        help="small shards: results stream back shard by shard, so the steady-state window starts early",
    )
    parser.add_argument("--passes", type=int, default=2, help="timed passes per side (after a short warm-up)")
    parser.add_argument("--coco-shards", type=int, default=4, help="Ray tasks for the COCO per-image matching")
    parser.add_argument("--detections-per-object", type=int, default=8, help="detections made from each object")
    parser.add_argument("--out", help="results JSON file (default benchmarks/results/evaluate.json)")
    parser.add_argument("--robustness", action="store_true", help="also time the corruption suite against a clean pass")
    parser.add_argument("--robustness-only", action="store_true", help="only the corruption suite against a clean pass")
    parser.add_argument("--robustness-images", type=int, default=32, help="images the robustness section evaluates")
    parser.add_argument("--corruptions", default="all", help="the suite's corruptions (as mtseg evaluate --corruptions)")
    parser.add_argument("--severities", default="1-5", help="the suite's severities (as mtseg evaluate --severities)")
    parser.add_argument("--coco-px", default="640x480", help="WIDTHxHEIGHT at which each corruption alone is timed too")
    args = parser.parse_args(argv)
    robustness = args.robustness or args.robustness_only
    if args.robustness_only:
        args.images = args.robustness_images

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    from mtseg.cluster import init_local_ray
    from mtseg.data.corruptions import parse_corruptions, parse_severities
    from mtseg.data.shard import shard_coco
    from mtseg.data.synth import synthesize
    from mtseg.train.checkpoint import load_for_inference

    corruptions, severities = parse_corruptions(args.corruptions), parse_severities(args.severities)
    coco_px = tuple(int(v) for v in args.coco_px.lower().split("x"))
    t_start = time.perf_counter()
    robust: dict = {}
    with tempfile.TemporaryDirectory(prefix="mtseg-bench-eval-") as tmp:
        coco_root, data_uri = os.path.join(tmp, "coco"), os.path.join(tmp, "shards")
        synthesize(coco_root, train=0, val=args.images, size=args.size, seed=0)
        manifest = shard_coco(coco_root, SPLIT, data_uri, images_per_shard=args.images_per_shard, log=lambda _: None)
        loaded = load_for_inference(_make_checkpoint(os.path.join(tmp, "run", "checkpoint_000000"), data_uri, args.batch_size))
        gt = ground_truth(data_uri)  # built once, outside the timings, as training validation does
        init_local_ray(num_cpus=2, log_to_driver=False)
        try:
            if robustness:
                robust = robustness_timing(
                    loaded,
                    data_uri,
                    images=min(args.robustness_images, args.images),
                    batch_size=args.batch_size,
                    corruptions=corruptions,
                    severities=severities,
                    coco_px=coco_px,
                )
            if args.robustness_only:
                return write_results(_robustness_figures(robust, args, loaded, t_start), out=args.out)
            # Warm-up on a few images: imports, Ray's worker pool, the page cache.
            plain_pass(loaded, data_uri, args.batch_size, gt, limit=2 * args.batch_size)
            cold, _ = ray_pass(loaded, data_uri, args.batch_size, limit=2 * args.batch_size)
            actors = int(ray.cluster_resources()["CPU"])
            plain_runs, ray_runs, actor_runs, plan = [], [], [], {}
            for _ in range(args.passes):
                plain_runs.append(plain_pass(loaded, data_uri, args.batch_size, gt))
                run, plan = ray_pass(loaded, data_uri, args.batch_size)
                ray_runs.append(run)
                actor_runs.append(ray_pass(loaded, data_uri, args.batch_size, concurrency=actors)[0])
            coco = coco_timing(gt, args.coco_shards, args.detections_per_object)
        finally:
            ray.shutdown()

    def median(runs: list[Pass], attr: str) -> float:
        return round(statistics.median(getattr(r, attr) for r in runs), 2)

    ray_steady, plain_steady = median(ray_runs, "steady_images_per_s"), median(plain_runs, "steady_images_per_s")
    ray_total, plain_total = median(ray_runs, "images_per_s"), median(plain_runs, "images_per_s")
    actor_steady, actor_total = median(actor_runs, "steady_images_per_s"), median(actor_runs, "images_per_s")
    result = {
        "benchmark": "evaluate",
        "images": args.images,
        "image_px": args.size,
        "model_px": loaded.cfg.data.image_size,
        "model": f"{loaded.cfg.model.backbone}+{loaded.cfg.model.decoder}, tasks {','.join(loaded.cfg.tasks.names)}",
        "batch_size": args.batch_size,
        "shards": len(manifest["shards"]),
        "cpus": os.cpu_count(),
        "ray_plan": {k: plan[k] for k in ("mode", "actors", "device", "num_cpus", "threads")},
        "ray_data_images_per_s": ray_steady,
        "plain_loop_images_per_s": plain_steady,
        "ratio": round(ray_steady / plain_steady, 3),
        "target_ratio": 0.9,
        "end_to_end_ratio": round(ray_total / plain_total, 3),
        "end_to_end": {
            "ray_data_images_per_s": ray_total,
            "plain_loop_images_per_s": plain_total,
            "ratio": round(ray_total / plain_total, 3),
            "ray_first_results_s": [round(r.first_seconds, 2) for r in ray_runs],
            "plain_first_results_s": [round(r.first_seconds, 2) for r in plain_runs],
            "cold_first_results_s": round(cold.first_seconds, 2),
        },
        "actor_pool": {
            "actors": actors,
            "images_per_s": actor_steady,
            "ratio": round(actor_steady / plain_steady, 3),
            "end_to_end_ratio": round(actor_total / plain_total, 3),
            "first_results_s": [round(r.first_seconds, 2) for r in actor_runs],
        },
        "ray_passes_steady_images_per_s": [round(r.steady_images_per_s, 2) for r in ray_runs],
        "plain_passes_steady_images_per_s": [round(r.steady_images_per_s, 2) for r in plain_runs],
        "cocoeval": coco,
        "cocoeval_s_per_1000_instances": coco["single_process_s_per_1000_instances"],
        **({"corruption_suite_over_clean": robust["corruption_suite_over_clean"], "robustness": robust} if robust else {}),
        "seconds": round(time.perf_counter() - t_start, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    return write_results(result, out=args.out)


def _robustness_figures(robust: dict, args: argparse.Namespace, loaded, t_start: float) -> dict:
    """The JSON of ``--robustness-only``."""
    return {
        "benchmark": "evaluate_robustness",
        "image_px": args.size,
        "model_px": loaded.cfg.data.image_size,
        "model": f"{loaded.cfg.model.backbone}+{loaded.cfg.model.decoder}, tasks {','.join(loaded.cfg.tasks.names)}",
        "batch_size": args.batch_size,
        "cpus": os.cpu_count(),
        "corruption_suite_over_clean": robust["corruption_suite_over_clean"],
        "robustness": robust,
        "seconds": round(time.perf_counter() - t_start, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
