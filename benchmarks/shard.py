"""``mtseg data shard`` throughput on COCO-profile images: one thread, the thread pool, Ray tasks.

Run (about a minute on 2 CPUs, most of it synthesising the images)::

    .venv/bin/python benchmarks/shard.py                   # 160 synthetic COCO-profile images
    .venv/bin/python benchmarks/shard.py --images 400 --images-per-shard 32

The images (``mtseg data synth --profile coco``: 640x480 JPEGs of COCO-like size, ~7
instances each, polygons and crowd RLE) are read from local disk and sharded into a SeaweedFS
S3 bucket started here on 127.0.0.1, three ways, each into its own prefix:

* ``serial``: :func:`mtseg.data.shard.shard_coco` with one thread and torch on one thread:
  the cost of an image on one core;
* ``threads``: the default local run (a thread pool per shard, as ``mtseg data shard``);
* ``ray``: ``executor="ray"`` on a local Ray with 2 CPUs (as ``mtseg submit prepare`` runs on a
  cluster), a cold run (worker processes start and import mtseg) then a warm one.

The three must write the same shards (``identical``: same sha256 per shard, same manifest
counts). ``cost_ms_per_image`` splits the one-core cost into its steps, measured one by one
on the same images: ``read`` (the file's bytes), ``decode`` (the full decode the training
decoder makes, :func:`~mtseg.data.transforms.prepare_image`), ``rle`` (annotations to
compressed RLE), ``parquet`` (encoding the shard) and ``upload`` (the atomic put to S3).

``coco_118k_estimate`` scales the serial run's seconds per image to COCO train2017
(118,287 images): hours on one core, and on a node of N cores assuming the shards scale
linearly over cores (they share nothing but the store; the driver parses the annotation file
once). One JSON line goes to stdout and to ``benchmarks/results/shard.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch
from _results import write_results
from _store import local_store

from mtseg import storage
from mtseg.cluster import init_local_ray
from mtseg.data import shard as shard_mod
from mtseg.data.synth import synthesize
from mtseg.data.transforms import prepare_image

SPLIT = "train2017"
COCO_TRAIN_IMAGES = 118_287
NODE_CORES = (8, 16, 32, 64)


def _quiet(_msg: str) -> None:
    pass


def _timed_shard(coco_root: str, uri: str, **kwargs) -> tuple[dict, float]:
    start = time.perf_counter()
    manifest = shard_mod.shard_coco(coco_root, SPLIT, uri, log=_quiet, **kwargs)
    return manifest, time.perf_counter() - start


def _cost_split(coco_root: str, out_uri: str, images_per_shard: int) -> dict:
    """ms per image of each step of a shard, one step at a time, on one thread."""
    ann_uri = storage.join(coco_root, "annotations", f"instances_{SPLIT}.json")
    coco, _, image_ids = shard_mod._load_coco(storage.read_bytes(ann_uri), ann_uri, shard_mod._Tally())
    totals = dict.fromkeys(("read", "decode", "rle", "parquet", "upload"), 0.0)
    tally = shard_mod._Tally()
    for start in range(0, len(image_ids), images_per_shard):
        rows = []
        for image_id in image_ids[start : start + images_per_shard]:
            entry = coco.imgs[image_id]
            t0 = time.perf_counter()
            data = storage.read_bytes(storage.join(coco_root, SPLIT, *entry["file_name"].split("/")))
            t1 = time.perf_counter()
            data, _, _ = prepare_image(data)
            t2 = time.perf_counter()
            anns = shard_mod._annotation_rows(coco.imgToAnns.get(image_id, []), entry, tally)
            t3 = time.perf_counter()
            totals["read"] += t1 - t0
            totals["decode"] += t2 - t1
            totals["rle"] += t3 - t2
            rows.append(
                {
                    "image_id": image_id,
                    "file_name": entry["file_name"],
                    "height": entry["height"],
                    "width": entry["width"],
                    "image": data,
                    "annotations": anns,
                }
            )
        t0 = time.perf_counter()
        blob = shard_mod._write_shard(rows)
        t1 = time.perf_counter()
        storage.write_bytes(storage.join(out_uri, f"shard-{start // images_per_shard:05d}.parquet"), blob)
        totals["upload"] += time.perf_counter() - t1
        totals["parquet"] += t1 - t0
    split = {k: round(v / len(image_ids) * 1e3, 2) for k, v in totals.items()}
    split["total"] = round(sum(split.values()), 2)
    return split


def _run(manifest: dict, seconds: float) -> dict:
    images = manifest["counts"]["images"]
    return {"seconds": round(seconds, 2), "images_per_s": round(images / seconds, 1), "shards": len(manifest["shards"])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=160, help="synthetic COCO-profile images (~0.15 s each to make)")
    parser.add_argument("--images-per-shard", type=int, default=16, help="small, so that 2 CPUs have shards to share")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--out", help="results JSON file (default benchmarks/results/shard.json)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="mtseg-shard-") as tmp:
        coco_root = os.path.join(tmp, "coco")
        synthesize(coco_root, train=args.images, val=0, seed=0, profile="coco")
        source_mb = (
            sum(os.path.getsize(os.path.join(coco_root, SPLIT, n)) for n in os.listdir(os.path.join(coco_root, SPLIT))) / 1e6
        )
        with local_store(os.path.join(tmp, "seaweedfs")) as store:
            bucket = f"s3://{store.bucket}"
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # per core: what sizes a cluster
            try:
                cost = _cost_split(coco_root, f"{bucket}/split", args.images_per_shard)
                serial, serial_s = _timed_shard(coco_root, f"{bucket}/serial", images_per_shard=args.images_per_shard, workers=1)
            finally:
                torch.set_num_threads(threads)
            pooled, pooled_s = _timed_shard(coco_root, f"{bucket}/threads", images_per_shard=args.images_per_shard)
            import ray

            init_local_ray(num_cpus=args.ray_cpus, env=store.env(), log_to_driver=False)
            try:
                cold, cold_s = _timed_shard(
                    coco_root, f"{bucket}/ray-cold", images_per_shard=args.images_per_shard, executor="ray"
                )
                warm, warm_s = _timed_shard(coco_root, f"{bucket}/ray", images_per_shard=args.images_per_shard, executor="ray")
            finally:
                ray.shutdown()

    manifests = (serial, pooled, cold, warm)
    identical = all(m["shards"] == serial["shards"] and m["counts"] == serial["counts"] for m in manifests)
    s_per_image = serial_s / serial["counts"]["images"]
    one_core_h = COCO_TRAIN_IMAGES * s_per_image / 3600
    result = {
        "benchmark": "shard",
        "images": args.images,
        "image_px": [640, 480],
        "profile": "coco",
        "source_mb_per_image": round(source_mb / args.images, 3),
        "images_per_shard": args.images_per_shard,
        "cpus": os.cpu_count(),
        "ray_cpus": args.ray_cpus,
        "serial_images_per_s": _run(serial, serial_s)["images_per_s"],
        "threads_images_per_s": _run(pooled, pooled_s)["images_per_s"],
        "ray_images_per_s": _run(warm, warm_s)["images_per_s"],
        "ray_over_serial": round(serial_s / warm_s, 3),
        "runs": {
            "serial": _run(serial, serial_s),
            "threads": _run(pooled, pooled_s),
            "ray_cold": _run(cold, cold_s),
            "ray": _run(warm, warm_s),
        },
        "identical": identical,
        "cost_ms_per_image": cost,
        "coco_118k_estimate": {
            "images": COCO_TRAIN_IMAGES,
            "s_per_image_per_core": round(s_per_image, 4),
            "hours_one_core": round(one_core_h, 2),
            "hours_per_node": {str(n): round(one_core_h / n, 3) for n in NODE_CORES},
            "assumes": "serial s/image of this run (torch on 1 thread, local disk -> local S3), linear over cores",
        },
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    write_results(result, out=args.out)
    if not identical:
        sys.exit("shard.py: the runs wrote different shards")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
