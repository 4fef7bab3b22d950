"""Ingest throughput: the Ray Data stream from S3 vs a plain torch DataLoader from local files.

Run (about four minutes on 2 CPUs)::

    .venv/bin/python benchmarks/ingest.py                # 4000 synthetic 64 px images
    .venv/bin/python benchmarks/ingest.py --images 1000 --size 256   # larger JPEGs, same 64 px crops

Both sides do the same work per image on the same synthetic images, through the same
function (:meth:`mtseg.data.pipeline.SampleTransform.sample`: JPEG decode, RLE decode, joint
random-resized-crop + flip, task targets) and end with the same training batches:

* ``ray_data``: ``mtseg data shard`` output in a SeaweedFS S3 bucket (started here on
  127.0.0.1), streamed on a local Ray with 2 CPUs as ``mtseg evaluate`` streams a split
  (:func:`~mtseg.data.pipeline.read_split` + :class:`~mtseg.data.pipeline.ChunkedTransform`,
  the transform fused with the read into one task per shard), consumed as batches of the
  contract;
* ``dataloader``: ``torch.utils.data.DataLoader`` with 2 worker processes reading the COCO
  JPEG files and instances JSON from local disk (pycocotools turns each annotation into RLE
  per item, as a plain COCO dataset class does).

``coco_profile`` repeats the comparison on COCO-sized data (``mtseg data synth --profile
coco``: 640x480 JPEGs of ~155 KB, ~7 instances each) at 512 px crops, and adds what a user
sizes cores per GPU with, measured in this process on one core (``torch.set_num_threads(1)``):

* ``sample_ms_per_core``: the full multi-task sample (JPEG and RLE decode, joint augmentation,
  every task's target), ms per image;
* ``reference_semantic_ms_per_core``: a semantic-only pipeline written the way torchvision's
  ``references/segmentation`` writes it with ``transforms.v2`` (masks merged into one class
  map as its ``ConvertCocoPolysToMask`` does, ``RandomResize(0.5..2x base)``,
  ``RandomHorizontalFlip``, ``RandomCrop`` padded with 255) on the same images and
  annotations, decoded by the same decoder; without ``ToDtype``/``Normalize``, which mtseg
  does on the training device;
* ``stages_ms``: the sample's stages (decode, augment, targets, transfer = stacking into a
  batch and turning the wire layout into the batch contract), ms per image each.

``memory`` (first, ``--no-memory`` skips it) streams 1x and 10x a COCO-profile split through
the training stream (:func:`~mtseg.data.pipeline.worker_batches` over the epoch plan) from
SeaweedFS and reports the peak RSS of the consumer plus Ray's worker processes and the peak
object-store use of each pass, and their 10x/1x ratios (goal <= 1.10). The 10x split is the 1x
shard files copied ten times under new names with one manifest (:func:`replicate_split`), so
the data volume grows tenfold while synthesis is paid once.

Each side makes one warm-up pass (process start-up, Ray's worker pool) and then ``--passes``
timed passes, each a full epoch over the images; images/s is the median over the timed
passes, and the ratio is ray_data / dataloader. The two sides alternate pass by pass (never
at the same time), so that background load on a shared machine hits both alike. One JSON
line goes to stdout and to ``benchmarks/results/ingest.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import platform
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import torch
from _results import write_results
from _store import local_store
from torch.utils.data import DataLoader, Dataset

from mtseg import storage
from mtseg.cluster import init_local_ray
from mtseg.config import load_config
from mtseg.data.manifest import read_manifest, shard_uris, write_manifest
from mtseg.data.pipeline import ChunkedTransform, SampleTransform, categories_of, read_split, worker_batches
from mtseg.data.shard import shard_coco
from mtseg.data.synth import synthesize
from mtseg.data.targets import augment, decode_annotations, decode_layers
from mtseg.data.transforms import decode_image, sample_seed
from mtseg.tasks import build_tasks
from mtseg.train.data import plan_epoch

SPLIT = "train2017"
MEMORY_SPLIT_10X = "train2017-10x"
MEMORY_COPIES = 10


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

    def __init__(self, fn: SampleTransform):
        self.fn = fn

    def __call__(self, samples):
        return self.fn.to_torch(self.fn.stack(samples))


def _one_pass(batches) -> tuple[int, float]:
    start = time.perf_counter()
    n = 0
    for batch in batches:
        n += len(batch["image_id"])
    return n, time.perf_counter() - start


def _summary(runs: list[tuple[int, float]]) -> dict:
    (n0, t0), timed = runs[0], runs[1:]
    rates = [n / t for n, t in timed]
    return {
        "images_per_s": round(statistics.median(rates), 1),
        "passes_images_per_s": [round(r, 1) for r in rates],
        "images_per_pass": timed[0][0],
        "warmup_pass": {"images": n0, "seconds": round(t0, 3), "images_per_s": round(n0 / t0, 1)},
    }


def run_both(uri: str, coco_root: str, cfg, passes: int, env: dict) -> tuple[dict, dict]:
    """Alternate Ray Data and DataLoader passes so both see the same background load.

    Ray stays up (idle) during the DataLoader passes; its daemons then cost the DataLoader a
    little CPU, which is small next to a pass and is the price of pairing the passes.
    """
    import ray

    init_local_ray(num_cpus=2, env=env, log_to_driver=False)
    try:
        manifest = read_manifest(uri, SPLIT)
        cats = categories_of(manifest)
        fn = SampleTransform.from_config(cats, cfg, build_tasks(cfg, cats), train=True)
        dataset = CocoFiles(coco_root, SPLIT, fn)
        ray_runs, dl_runs = [], []
        for _ in range(passes + 1):  # the first pass of each is the warm-up
            stream = read_split(uri, SPLIT)[0].map_batches(
                ChunkedTransform(fn), batch_format="pyarrow", batch_size=None, zero_copy_batch=True
            )
            batches = stream.iter_batches(batch_size=cfg.data.batch_size, batch_format="numpy")
            ray_runs.append(_one_pass(fn.to_torch(b) for b in batches))
            loader = DataLoader(dataset, batch_size=cfg.data.batch_size, num_workers=2, collate_fn=_Collate(fn))
            dl_runs.append(_one_pass(loader))
        return _summary(ray_runs), _summary(dl_runs)
    finally:
        ray.shutdown()


def _rows(dataset: CocoFiles) -> list[tuple]:
    """Every image's (bytes, annotations, id, height, width) as the stream hands them to a sample."""
    rows = []
    for image_id in dataset.ids:
        info = dataset.coco.imgs[image_id]
        with open(os.path.join(dataset.image_dir, info["file_name"]), "rb") as f:
            data = f.read()
        anns = [
            {
                "id": a["id"],
                "category_id": a["category_id"],
                "iscrowd": a.get("iscrowd", 0),
                "segmentation_size": (rle := dataset.coco.annToRLE(a))["size"],
                "segmentation_counts": rle["counts"],
            }
            for a in dataset.coco.imgToAnns.get(image_id, [])
        ]
        rows.append((data, anns, image_id, info["height"], info["width"]))
    return rows


class ReferenceSemantic:
    """torchvision references/segmentation's training transform (v2), semantic masks only.

    ``ConvertCocoPolysToMask`` (every annotation's mask, merged by ``max`` of mask x class,
    overlaps 255; crowd 255 as mtseg does), then ``RandomResize(0.5 * base, 2 * base)``,
    ``RandomHorizontalFlip(0.5)``, ``RandomCrop(crop, pad_if_needed, fill 255 for the mask)``.
    ``base`` keeps the reference's base:crop ratio of 520:480.
    """

    def __init__(self, categories, crop: int):
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        base = round(crop * 520 / 480)
        self.categories, self.tv_tensors = categories, tv_tensors
        self.transform = v2.Compose(
            [
                v2.RandomResize(min_size=int(0.5 * base), max_size=int(2.0 * base)),
                v2.RandomHorizontalFlip(0.5),
                v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Mask: 255, "others": 0}),
            ]
        )

    def __call__(self, data: bytes, anns, image_id: int, height: int, width: int):
        image = decode_image(data)
        masks, labels, crowd = decode_annotations(anns, height, width, self.categories)
        if len(labels):
            masks_t = torch.from_numpy(masks)
            cats = torch.as_tensor(np.where(crowd, 255, labels), dtype=torch.uint8)
            target, _ = (masks_t * cats[:, None, None]).max(dim=0)
            target[masks_t.sum(0) > 1] = 255
        else:
            target = torch.zeros((height, width), dtype=torch.uint8)
        return self.transform(self.tv_tensors.Image(image), self.tv_tensors.Mask(target))


def _per_image_ms(fn, rows, passes: int = 2) -> float:
    """ms per image of ``fn(*row)`` over all rows, the best of ``passes`` (after one warm-up image)."""
    fn(*rows[0])
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for row in rows:
            fn(*row)
        best = min(best, (time.perf_counter() - start) / len(rows))
    return round(best * 1e3, 2)


def _stages_ms(fn: SampleTransform, rows) -> dict:
    """The stages of :meth:`SampleTransform.sample`, timed one by one, ms per image."""
    totals = dict.fromkeys(("decode", "augment", "targets", "transfer"), 0.0)
    samples = []
    for data, anns, image_id, height, width in rows:
        t0 = time.perf_counter()
        pixels = decode_image(data)
        layers, labels, crowd = decode_layers(anns, height, width, fn.categories)
        t1 = time.perf_counter()
        seed = sample_seed(fn.seed, fn.epoch, image_id)
        pixels, instances = augment(fn._transform, pixels, layers, labels, crowd, fn.categories, seed=seed)
        t2 = time.perf_counter()
        values = {"image": pixels.numpy(), "image_id": np.int64(image_id), "orig_size": np.array([height, width], np.int64)}
        for task in fn.tasks:
            values.update(task.build_targets(instances))
        samples.append({k: np.asarray(values[k]).astype(f.wire, copy=False) for k, f in fn.fields.items()})
        t3 = time.perf_counter()
        totals["decode"] += t1 - t0
        totals["augment"] += t2 - t1
        totals["targets"] += t3 - t2
    start = time.perf_counter()
    for i in range(0, len(samples), 8):
        fn.to_torch(fn.stack(samples[i : i + 8]))
    totals["transfer"] = time.perf_counter() - start
    return {k: round(v / len(rows) * 1e3, 2) for k, v in totals.items()}


def coco_profile(tmp: str, args) -> dict:
    """The COCO-profile figures: per-core sample cost, the reference beside it, stages, Ray vs DataLoader."""
    coco_root = os.path.join(tmp, "coco-profile")
    synthesize(coco_root, train=args.coco_images, val=0, seed=0, profile="coco")
    cfg = load_config(None, [f"data.image_size={args.coco_crop}", "data.batch_size=8"])
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        cats = categories_of(
            {"categories": COCO(os.path.join(coco_root, "annotations", f"instances_{SPLIT}.json")).dataset["categories"]}
        )
    fn = SampleTransform.from_config(cats, cfg, build_tasks(cfg, cats), train=True)
    rows = _rows(CocoFiles(coco_root, SPLIT, fn))
    reference = ReferenceSemantic(cats, args.coco_crop)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: what a sizing of cores per GPU divides by
    try:
        # Alternated, so that background load hits both alike.
        sample_ms = min(_per_image_ms(fn.sample, rows, 1) for _ in range(2))
        reference_ms = min(_per_image_ms(reference, rows, 1) for _ in range(2))
        stages = min((_stages_ms(fn, rows) for _ in range(2)), key=lambda st: sum(st.values()))
    finally:
        torch.set_num_threads(threads)

    with local_store(os.path.join(tmp, "seaweedfs-coco")) as store:
        uri = f"s3://{store.bucket}/ingest-coco"
        shard_coco(coco_root, SPLIT, uri, images_per_shard=16, log=lambda _: None)
        ray_result, dl_result = run_both(uri, coco_root, cfg, args.coco_passes, store.env())
    return {
        "images": args.coco_images,
        "image_px": [640, 480],
        "crop_px": args.coco_crop,
        "sample_ms_per_core": sample_ms,
        "reference_semantic_ms_per_core": reference_ms,
        "sample_over_reference": round(sample_ms / reference_ms, 3),
        "target_sample_over_reference": 1.3,
        "target_sample_ms_per_core": 20.0,
        "stages_ms": stages,
        "ray_over_dataloader": round(ray_result["images_per_s"] / dl_result["images_per_s"], 3),
        "ray_data": ray_result,
        "dataloader": dl_result,
    }


def replicate_split(uri: str, split: str, out_split: str, copies: int) -> dict:
    """Write ``copies`` copies of a sharded split's files as a new split beside it, with its manifest.

    The copies carry the same rows (image ids included), so the data volume grows ``copies``
    times while synthesis and sharding are paid once.

    Returns:
        The new split's manifest (every copy of every shard, copy by copy).
    """
    manifest = read_manifest(uri, split)
    shards = []
    for entry in manifest["shards"]:
        data = storage.read_bytes(storage.join(uri, split, entry["path"]))
        for copy in range(copies):
            path = f"copy{copy:03d}-{entry['path']}"
            storage.write_bytes(storage.join(uri, out_split, path), data)
            shards.append(entry | {"path": path})
    shards.sort(key=lambda e: e["path"])
    counts = {k: v * copies if isinstance(v, int) else v for k, v in manifest["counts"].items()}
    out = manifest | {"split": out_split, "shards": shards, "counts": counts | {"shards": len(shards)}}
    write_manifest(uri, out_split, out)
    return out


#: Ray's per-node daemons that retitle themselves like workers but run no part of the stream.
_RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _ray_workers(me: psutil.Process) -> list[psutil.Process]:
    """Ray worker processes under this driver (its raylet's children), idle ones and Ray Data's actors included."""
    workers = []
    for proc in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmdline = proc.cmdline()
            title = cmdline[0] if cmdline else ""
            if (title.startswith("ray::") and title not in _RAY_AGENTS) or any("default_worker.py" in c for c in cmdline):
                workers.append(proc)
    return workers


class PeakMemory:
    """Peak RSS of this process plus Ray's worker processes, and peak object store use, sampled in a thread.

    The object store's use is its total capacity less what ``ray.available_resources()``
    reports free (Ray counts the objects held against the ``object_store_memory`` resource).
    """

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.rss_peak = self.store_peak = 0
        self.at_peak: dict = {}  # who held the peak RSS: the consumer's share and the workers'
        self.trace: list[tuple[float, int, int]] = []  # (time, rss, object store) of every sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int, dict]:
        """(RSS of this process + Ray workers, object store bytes in use, the RSS by process) now."""
        import ray

        me = psutil.Process()
        consumer = me.memory_info().rss
        workers = []
        for proc in _ray_workers(me):
            with contextlib.suppress(psutil.Error):
                workers.append(proc.memory_info().rss)
        total = ray.cluster_resources().get("object_store_memory", 0)
        store = total - ray.available_resources().get("object_store_memory", total)
        parts = {
            "consumer_mib": round(consumer / 2**20, 1),
            "workers": len(workers),
            "workers_mib": round(sum(workers) / 2**20, 1),
        }
        return consumer + sum(workers), int(store), parts

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, store, parts = self.sample()
            if rss > self.rss_peak:
                self.rss_peak, self.at_peak = rss, parts
            self.store_peak = max(self.store_peak, store)
            self.trace.append((time.perf_counter(), rss, store))
            self._stop.wait(self.interval)

    def by_quarter(self) -> dict[str, list[float]]:
        """Peak RSS and object store (MiB) in each quarter of the sampled time: flat, or growing with the data read."""
        t0, t1 = self.trace[0][0], self.trace[-1][0]
        quarters = [[] for _ in range(4)]
        for t, rss, store in self.trace:
            quarters[min(3, int(4 * (t - t0) / max(t1 - t0, 1e-9)))].append((rss, store))
        return {
            "rss_mib": [round(max(r for r, _ in q) / 2**20, 1) if q else None for q in quarters],
            "object_store_mib": [round(max(s for _, s in q) / 2**20, 1) if q else None for q in quarters],
        }

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _stream_peak(uri: str, split: str, cfg, categories, tasks) -> dict:
    """Stream one epoch of ``split`` through the training stream (one worker's plan) and sample memory throughout."""
    manifest = read_manifest(uri, split)
    shards = list(zip(shard_uris(uri, split, manifest), (int(s["rows"]) for s in manifest["shards"])))
    segments = plan_epoch(shards, seed=0, epoch=0, world_size=1, rank=0)
    transform = SampleTransform.from_config(categories, cfg, tasks, train=True, epoch=0, seed=0)
    gc.collect()
    with PeakMemory() as peak:
        baseline_rss, baseline_store, _ = peak.sample()
        start = time.perf_counter()
        images = 0
        for batch in worker_batches(
            segments,
            transform,
            batch_size=cfg.data.batch_size,
            drop_last=True,
            rows_per_task=cfg.data.rows_per_read_task,
            num_cpus=cfg.data.map_num_cpus,
        ):
            images += len(batch["image_id"])
        seconds = time.perf_counter() - start
    mib = 2**20
    return {
        "images": images,
        "seconds": round(seconds, 1),
        "rss_peak_mib": round(peak.rss_peak / mib, 1),
        "rss_before_mib": round(baseline_rss / mib, 1),
        "rss_at_peak": peak.at_peak,
        "object_store_peak_mib": round(peak.store_peak / mib, 1),
        "object_store_before_mib": round(baseline_store / mib, 1),
        "samples": len(peak.trace),
        "peak_by_quarter": peak.by_quarter(),
    }


def memory(tmp: str, args) -> dict:
    """Peak memory of the training stream at 1x and 10x the data (the shards copied 10 times)."""
    coco_root = os.path.join(tmp, "coco-memory")
    synthesize(coco_root, train=args.memory_images, val=0, seed=0, profile="coco")
    cfg = load_config(None, [f"data.image_size={args.memory_crop}", "data.batch_size=8"])
    import ray

    with local_store(os.path.join(tmp, "seaweedfs-memory")) as store:
        uri = f"s3://{store.bucket}/ingest-memory"
        manifest = shard_coco(coco_root, SPLIT, uri, images_per_shard=args.memory_images_per_shard, log=lambda _: None)
        replicate_split(uri, SPLIT, MEMORY_SPLIT_10X, MEMORY_COPIES)
        categories = categories_of(manifest)
        tasks = build_tasks(cfg, categories)
        init_local_ray(num_cpus=2, env=store.env(), log_to_driver=False)
        try:
            # A warm-up pass starts Ray's worker pool, so that the 1x peak is the stream's, not a
            # burst of outputs from tasks that waited on workers starting; 1x before 10x, so that
            # what a pass leaves behind counts against 10x.
            warmup = _stream_peak(uri, SPLIT, cfg, categories, tasks)
            one = _stream_peak(uri, SPLIT, cfg, categories, tasks)
            ten = _stream_peak(uri, MEMORY_SPLIT_10X, cfg, categories, tasks)
        finally:
            ray.shutdown()
    rss_ratio = round(ten["rss_peak_mib"] / one["rss_peak_mib"], 3)
    store_ratio = round(ten["object_store_peak_mib"] / one["object_store_peak_mib"], 3) if one["object_store_peak_mib"] else None
    return {
        "method": (
            f"{args.memory_images} COCO-profile images (640x480) sharded once, {len(manifest['shards'])} shards; "
            f"10x = the same shard files copied {MEMORY_COPIES} times under new names in the bucket, one manifest "
            f"listing them all (data volume 10x, same rows and image ids). Each pass streams one epoch through "
            f"the training stream (mtseg.data.pipeline.worker_batches over plan_epoch, world size 1) from "
            f"SeaweedFS on a local Ray with 2 CPUs, {args.memory_crop} px crops, batch 8; 1x then 10x in one Ray "
            f"session after a warm-up 1x pass. RSS: this process (the consumer) + every Ray worker process, summed, sampled every 0.2 s, "
            f"peak of the sum. Object store: ray.cluster_resources() - ray.available_resources() "
            f"'object_store_memory', same sampling."
        ),
        "crop_px": args.memory_crop,
        "images_1x": one["images"],
        "images_10x": ten["images"],
        "rss_peak_mib_1x": one["rss_peak_mib"],
        "rss_peak_mib_10x": ten["rss_peak_mib"],
        "rss_ratio_10x": rss_ratio,
        "object_store_peak_mib_1x": one["object_store_peak_mib"],
        "object_store_peak_mib_10x": ten["object_store_peak_mib"],
        "object_store_ratio_10x": store_ratio,
        "goal": {
            "ratio_max": 1.10,
            "rss_met": rss_ratio <= 1.10,
            "object_store_met": None if store_ratio is None else store_ratio <= 1.10,
        },
        "passes": {"warmup_1x": warmup, "1x": one, "10x": ten},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4000, help="synthetic training images (one pass = one epoch over them)")
    parser.add_argument("--size", type=int, default=64, help="synthetic image side, pixels")
    parser.add_argument("--image-size", type=int, default=64, help="model input side (crop), pixels")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images-per-shard", type=int, default=256)
    parser.add_argument("--passes", type=int, default=3, help="timed passes per side (after one warm-up)")
    parser.add_argument("--coco-images", type=int, default=64, help="COCO-profile images (0 skips coco_profile)")
    parser.add_argument("--coco-crop", type=int, default=512, help="COCO-profile crop side, pixels")
    parser.add_argument("--coco-passes", type=int, default=2, help="COCO-profile timed passes per side")
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="peak memory of the training stream at 1x and 10x the data (--no-memory skips it)",
    )
    parser.add_argument("--memory-images", type=int, default=200, help="COCO-profile images of the 1x pass")
    # Small shards: the 1x pass must span several windows of read tasks in flight (4 on 2 CPUs,
    # one shard each), or its peak is the whole 1x data set rather than the stream's window.
    parser.add_argument("--memory-images-per-shard", type=int, default=10)
    parser.add_argument("--memory-crop", type=int, default=128, help="crop side of the memory passes, pixels")
    parser.add_argument("--out", help="results JSON file (default benchmarks/results/ingest.json)")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    cfg = load_config(None, [f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}", "tasks.patch_size=4"])
    with tempfile.TemporaryDirectory(prefix="mtseg-ingest-") as tmp:
        # First, while this process (the consumer it measures) holds nothing of the other sections.
        mem = memory(tmp, args) if args.memory else None
        coco_root = os.path.join(tmp, "coco")
        synthesize(coco_root, train=args.images, val=0, size=args.size, seed=0)
        with local_store(os.path.join(tmp, "seaweedfs")) as store:
            uri = f"s3://{store.bucket}/ingest"
            manifest = shard_coco(coco_root, SPLIT, uri, images_per_shard=args.images_per_shard, log=lambda _: None)
            ray_result, dl_result = run_both(uri, coco_root, cfg, args.passes, store.env())
        coco = coco_profile(tmp, args) if args.coco_images else None

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
        # Each Ray pass against the DataLoader pass right after it: the two saw the same load.
        "pass_ratios": [round(r / d, 3) for r, d in zip(ray_result["passes_images_per_s"], dl_result["passes_images_per_s"])],
        "target_ratio": 1.0,
        "ray_data": ray_result,
        "dataloader": dl_result,
        "coco_profile": coco,
        "memory": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    return write_results(result, out=args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
