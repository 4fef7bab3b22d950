"""Ingest throughput: the Ray Data stream from S3 vs a plain torch DataLoader from local files.

Run (about a minute on 2 CPUs)::

    .venv/bin/python benchmarks/ingest.py                # 2000 synthetic 64 px images
    .venv/bin/python benchmarks/ingest.py --images 4000 --size 128

Both sides do the same work per image on the same synthetic images, through the same
function (:meth:`mtseg.data.pipeline.SampleTransform.sample`: JPEG decode, RLE decode, joint
random-resized-crop + flip, task targets) and end with the same training batches:

* ``ray_data``: ``mtseg data shard`` output in a SeaweedFS S3 bucket (started here on
  127.0.0.1), read by :func:`~mtseg.data.pipeline.read_split` + :func:`build_stream` on a
  local Ray with 2 CPUs, consumed with ``iter_torch_batches``;
* ``dataloader``: ``torch.utils.data.DataLoader`` with 2 worker processes reading the COCO
  JPEG files and instances JSON from local disk (pycocotools turns each annotation into RLE
  per item, as a plain COCO dataset class does).

Each side makes one warm-up pass (process start-up, Ray's worker pool and file listing) and
then ``--passes`` timed passes; images/s is the median over the timed passes, and the ratio
is ray_data / dataloader. One JSON line goes to stdout and to ``benchmarks/results/ingest.json``.
The machine is shared by whatever else runs on it, so figures move between runs; the two
sides run one after the other, never at the same time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mtseg import storage
from mtseg.cluster import SeaweedFS, init_local_ray
from mtseg.config import load_config
from mtseg.data.categories import CategoryIndex
from mtseg.data.pipeline import SampleTransform, build_stream, categories_of, read_split, stack_samples, to_torch
from mtseg.data.shard import shard_coco
from mtseg.data.synth import synthesize

SPLIT = "train2017"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ingest.json")


class CocoFiles(Dataset):
    """A plain map-style COCO dataset: one JPEG file + its annotations per item, from local disk."""

    def __init__(self, coco_root: str, split: str, fn: SampleTransform):
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO(os.path.join(coco_root, "annotations", f"instances_{split}.json"))
        self.image_dir = os.path.join(coco_root, split)
        self.ids = sorted(self.coco.getImgIds())
        self.fn = fn

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        info = self.coco.imgs[self.ids[i]]
        with open(os.path.join(self.image_dir, info["file_name"]), "rb") as f:
            data = f.read()
        anns = []
        for ann in self.coco.imgToAnns.get(info["id"], []):
            rle = self.coco.annToRLE(ann)  # polygons / uncompressed RLE -> compressed RLE
            anns.append(
                {
                    "id": ann["id"],
                    "category_id": ann["category_id"],
                    "iscrowd": ann.get("iscrowd", 0),
                    "segmentation_size": rle["size"],
                    "segmentation_counts": rle["counts"],
                }
            )
        return self.fn.sample(data, anns, info["id"], info["height"], info["width"])


class _Collate:
    """Stack per-image dicts into the batch contract (picklable for worker processes)."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, samples):
        return to_torch(stack_samples(samples, self.image_size))


def _timed_passes(make_iter, passes: int) -> dict:
    """Run one warm-up pass and ``passes`` timed ones; images/s per pass."""
    rates, first = [], None
    for p in range(passes + 1):
        start = time.perf_counter()
        n = 0
        for batch in make_iter():
            n += len(batch["image_id"])
        elapsed = time.perf_counter() - start
        if p == 0:
            first = {"images": n, "seconds": round(elapsed, 3), "images_per_s": round(n / elapsed, 1)}
        else:
            rates.append(n / elapsed)
    return {
        "images_per_s": round(statistics.median(rates), 1),
        "passes_images_per_s": [round(r, 1) for r in rates],
        "warmup_pass": first,
    }


def bench_ray(uri: str, cfg, passes: int, env: dict) -> dict:
    import ray

    init_local_ray(num_cpus=2, env=env, log_to_driver=False)
    try:
        _, manifest = read_split(uri, SPLIT)
        cats = categories_of(manifest)

        def make_iter():
            ds, _ = read_split(uri, SPLIT)
            stream = build_stream(ds, cats, cfg, train=True)
            return stream.iter_torch_batches(batch_size=cfg.data.batch_size)

        return _timed_passes(make_iter, passes)
    finally:
        ray.shutdown()


def bench_dataloader(coco_root: str, cats: CategoryIndex, cfg, passes: int) -> dict:
    fn = SampleTransform.from_config(cats, cfg, train=True)
    dataset = CocoFiles(coco_root, SPLIT, fn)

    def make_iter():
        return DataLoader(dataset, batch_size=cfg.data.batch_size, num_workers=2, collate_fn=_Collate(cfg.data.image_size))

    return _timed_passes(make_iter, passes)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="synthetic training images")
    parser.add_argument("--size", type=int, default=64, help="synthetic image side, pixels")
    parser.add_argument("--image-size", type=int, default=64, help="model input side (crop), pixels")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images-per-shard", type=int, default=256)
    parser.add_argument("--passes", type=int, default=3, help="timed passes per side (after one warm-up)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    cfg = load_config(None, [f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}", "tasks.patch_size=4"])
    with tempfile.TemporaryDirectory(prefix="mtseg-ingest-") as tmp:
        coco_root = os.path.join(tmp, "coco")
        synthesize(coco_root, train=args.images, val=0, size=args.size, seed=0)
        store = SeaweedFS(data_dir=os.path.join(tmp, "seaweedfs")).start()
        saved = {k: os.environ.get(k) for k in store.env()}
        try:
            os.environ.update(store.env())
            storage._s3_filesystem.cache_clear()  # the store's endpoint and keys, not earlier ones
            uri = f"s3://{store.bucket}/ingest"
            manifest = shard_coco(coco_root, SPLIT, uri, images_per_shard=args.images_per_shard, log=lambda _: None)
            ray_result = bench_ray(uri, cfg, args.passes, store.env())
            dl_result = bench_dataloader(coco_root, categories_of(manifest), cfg, args.passes)
        finally:
            store.stop()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            storage._s3_filesystem.cache_clear()

    result = {
        "benchmark": "ingest",
        "images": args.images,
        "image_px": args.size,
        "crop_px": args.image_size,
        "batch_size": args.batch_size,
        "shards": len(manifest["shards"]),
        "cpus": os.cpu_count(),
        "ray_data_s3_images_per_s": ray_result["images_per_s"],
        "dataloader_local_images_per_s": dl_result["images_per_s"],
        "ratio": round(ray_result["images_per_s"] / dl_result["images_per_s"], 3),
        "target_ratio": 1.0,
        "ray_data": ray_result,
        "dataloader": dl_result,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
