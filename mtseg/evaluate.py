"""``mtseg evaluate``: a checkpoint's metrics on a whole split, with Ray Data batch inference.

    mtseg evaluate --checkpoint s3://bucket/runs/demo/checkpoint_000012 --data s3://bucket/shards --split val2017

The pipeline streams; only per-batch metric states and ground-truth rows reach the driver::

    read_parquet(split shards)
      └ map_batches(ChunkedTransform)    CPU tasks fused with the read: validation transform +
                                         targets + each image's ground truth as JSON
      └ map_batches(EvalTask)            on CPUs, fused too: one task reads, decodes and scores
        or map_batches(EvalActor)        with GPUs: an actor pool, one GPU each; both run the
                                         per-batch Evaluator of :func:`mtseg.train.loop.evaluate`
    driver: states merged into one Evaluator, COCO matching in parallel Ray tasks

The per-batch work is the code training validation runs, so both report the same numbers.

**Robustness** (:func:`evaluate_robustness`, ``mtseg evaluate --corruptions``): the same pipeline
once clean and once per (corruption, severity), the corruption applied in the read + decode tasks
to each decoded image at its original size (:mod:`mtseg.data.corruptions`), so that it scales out
as the clean evaluation does; every pass shares one copy of the weights in the object store, and a
worker builds the model once for all of them. Reported as Michaelis et al. (2019) do for COCO-C:
each headline metric's mPC (mean over corruptions and severities) and rPC = mPC / clean.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mtseg import storage
from mtseg.data.categories import CategoryIndex
from mtseg.data.corruptions import CORRUPTIONS, FAMILIES, check_corruptions, check_severities
from mtseg.predict import PredictError

# torch, Ray and the data pipeline are imported where used, so that building the CLI parser
# (which imports this module) stays fast.
if TYPE_CHECKING:
    from mtseg.train.checkpoint import LoadedCheckpoint

#: CPUs a read + decode task reserves: Ray Data's default for a read task, which the decode
#: map keeps so that the two fuse into one task per shard.
PREPROCESS_TASK_CPUS = 1.0

#: Images per COCO matching task, roughly: enough to amortise a task's start.
IMAGES_PER_COCO_SHARD = 64

METRICS_JSON = "metrics.json"
#: ``--export-panoptic DIR`` writes ``DIR/panoptic.json`` and the PNGs in ``DIR/panoptic/`` (COCO's layout)
PANOPTIC_JSON, PANOPTIC_DIR = "panoptic.json", "panoptic"
METRICS_MD = "metrics.md"
#: ``mtseg evaluate --corruptions``: metric vs severity per corruption family, beside metrics.json
ROBUSTNESS_PNG = "robustness.png"

#: The metrics mPC and rPC are reported for, those of them the model has.
HEADLINE_METRICS = ("val/miou", "val/pq", "val/mask_ap")

#: Where a local copy of a checkpoint's data sits, beside the model directory: ``mtseg demo``
#: exports the val split to ``runs/demo/shards`` next to ``runs/demo/model``.
LOCAL_DATA_DIR = "shards"

# The first read of an s3:// dataset retries for about half a minute (mtseg.storage), which rides
# out a store restarting mid-run; whether a checkpoint's store is there at all is asked once, briefly.
PROBE_CONNECT_TIMEOUT_S = 2
PROBE_READ_TIMEOUT_S = 5


class EvalActor:
    """Ray Data UDF (actor pool): batch -> one row with the batch's Evaluator state; loads the model once.

    Args:
        cfg: ``Config.to_dict()``; categories: ``CategoryIndex.to_categories()``.
        model_state: the ``state_dict`` or an ObjectRef to it (the driver reads the checkpoint once).
        tasks: the driver's registered task classes, registered here before the config is read.
    """

    def __init__(
        self,
        cfg: dict,
        categories: list[dict],
        model_state: Any,
        device: str = "cpu",
        num_threads: int = 1,
        tasks: tuple = (),
        export_dir: str | None = None,
    ):
        import ray
        import torch

        from mtseg.config import config_from_dict
        from mtseg.fusion import has_instances
        from mtseg.tasks import build_tasks, register
        from mtseg.train import checkpoint as ckpt

        for task in tasks:
            register(task)
        if isinstance(model_state, ray.ObjectRef):
            model_state = ray.get(model_state)
        if device == "cpu":
            torch.set_num_threads(max(1, int(num_threads)))
        self.cfg = config_from_dict(cfg)
        self.coco_categories = list(categories)
        self.categories = CategoryIndex.from_categories(self.coco_categories)
        self.device = torch.device(device)
        self.model = ckpt.build_inference_model(self.cfg, self.categories, model_state, self.device)
        self.tasks = build_tasks(self.cfg, self.categories)
        self.with_instances = has_instances(self.cfg.tasks.names)
        self.export_dir = export_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mtseg.data.pipeline import batch_fields, to_torch
        from mtseg.metrics import Evaluator, coco_gt_from_rows
        from mtseg.train.loop import evaluate

        gt_json = [str(s) for s in batch["gt"]]
        fields = batch_fields(self.cfg.data.image_size, self.tasks.values())
        tensors = to_torch({k: batch[k] for k in fields}, fields)  # wire layout -> batch contract
        coco_gt = None
        if self.with_instances:
            coco_gt = coco_gt_from_rows([json.loads(s) for s in gt_json], self.coco_categories)
        evaluator = Evaluator(self.categories, self.tasks, coco_gt=coco_gt)
        exported: list[dict] = []
        on_panoptic = None
        if self.export_dir:
            names = {g["image_id"]: g.get("file_name") or f"{g['image_id']}" for g in map(json.loads, gt_json)}

            def on_panoptic(image_id: int, id_map: np.ndarray, segments: list[dict]) -> None:
                exported.append(export_panoptic_png(self.export_dir, image_id, names[image_id], id_map, segments))

        evaluate(self.model, [tensors], self.tasks, self.cfg, self.categories, evaluator, self.device, on_panoptic)
        return {
            "state": np.array([pickle.dumps(evaluator.state_dict(), protocol=pickle.HIGHEST_PROTOCOL)], dtype=object),
            "gt": np.array(["[" + ",".join(gt_json) + "]"], dtype=object),
            "images": np.array([len(gt_json)], dtype=np.int64),
            "panoptic": np.array([json.dumps(exported)], dtype=object),
        }


def export_panoptic_png(export_dir: str, image_id: int, file_name: str, id_map: np.ndarray, segments: list[dict]) -> dict:
    """Write one image's panoptic PNG into ``<export_dir>/panoptic/`` and return its COCO annotation entry."""
    from mtseg.data.coco_panoptic import annotation_entry, write_png

    png_name = file_name.rsplit("/", 1)[-1].rsplit(".", 1)[0] + ".png"
    storage.write_bytes(storage.join(export_dir, PANOPTIC_DIR, png_name), write_png(id_map))
    return annotation_entry(image_id, png_name, segments)


def check_export_panoptic(loaded: LoadedCheckpoint, export_dir: str | None) -> None:
    """Refuse ``--export-panoptic`` for a model that makes no panoptic segmentation, in one line."""
    from mtseg.fusion import has_instances

    if not export_dir:
        return
    if not loaded.categories.panoptic:
        raise PredictError(
            f"--export-panoptic: {loaded.uri} was trained on an instances dataset (no stuff); "
            "shard a panoptic one with `mtseg data shard --annotations panoptic`"
        )
    if not has_instances(loaded.cfg.tasks.names):
        raise PredictError(f"--export-panoptic: {loaded.uri} has no instance task, so it cannot separate things")
    storage.check_access(export_dir)


def write_panoptic_json(export_dir: str, entries: list[dict], gt_rows: list[dict], categories: CategoryIndex) -> str:
    """Write ``<export_dir>/panoptic.json`` (COCO's panoptic predictions format); returns its URI.

    With the PNGs in ``<export_dir>/panoptic/``, panopticapi scores it:
    ``pq_compute(gt_json, "<export_dir>/panoptic.json", gt_folder, "<export_dir>/panoptic")``.
    """
    images = [
        {"id": int(g["image_id"]), "file_name": g.get("file_name"), "height": int(g["height"]), "width": int(g["width"])}
        for g in gt_rows
    ]
    doc = {
        "info": {"description": "mtseg panoptic predictions"},
        "images": sorted(images, key=lambda i: i["id"]),
        "annotations": sorted(entries, key=lambda e: e["image_id"]),
        "categories": categories.to_categories(),
    }
    uri = storage.join(export_dir, PANOPTIC_JSON)
    storage.write_bytes(uri, json.dumps(doc).encode())  # last: its presence means the export is complete
    return uri


#: The model of the evaluation running in this worker process: ``{model key: EvalActor}``.
_WORKER_MODEL: dict[str, EvalActor] = {}


class EvalTask:
    """Ray Data UDF (tasks, fused with the read): an :class:`EvalActor` built once per worker process.

    Ray reuses a job's task workers, and the read + decode already imported torch in them, so
    the model costs one build per worker. An actor pool would start new processes instead, each
    spending 4-5 CPU-seconds importing torch and torchvision before its first batch: on 2 CPUs,
    most of a 1,000-image evaluation. A worker keeps one model, that of the newest ``key``.

    Args:
        key: names the model (the ObjectRef of its state, one per evaluation).
        kwargs: :class:`EvalActor`'s arguments.
        batch_size: images per forward; the fused map gets each decoded chunk whole.
    """

    def __init__(self, key: str, kwargs: dict[str, Any], batch_size: int):
        self.key, self.kwargs, self.batch_size = key, kwargs, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        if self.key not in _WORKER_MODEL:
            _WORKER_MODEL.clear()
            _WORKER_MODEL[self.key] = EvalActor(**self.kwargs)
        actor = _WORKER_MODEL[self.key]
        # Evaluations of one model share the worker's model (robustness: clean, then corrupted
        # passes), each with its own export directory (the clean pass's only).
        actor.export_dir = self.kwargs.get("export_dir")
        for start in range(0, len(batch["gt"]), self.batch_size):
            yield actor({k: v[start : start + self.batch_size] for k, v in batch.items()})


@dataclass
class EvaluationResult:
    """Metrics of one checkpoint on one split.

    Attributes:
        metrics: ``{"val/miou": ..., ...}`` (NaN where undefined).
        timing: ``inference_s``, ``images_per_s``, ``metrics_s`` (merge + COCO matching), ``total_s``.
        setup: how the pipeline ran (actors, device, batch size, COCO shards).
        files: URIs of the written ``metrics.json`` and ``metrics.md`` (empty if not written).
        per_class: ``{"iou": {class name: value}, "pq": ..., "sq": ..., "rq": ...}`` where measured.
    """

    metrics: dict[str, float]
    images: int
    checkpoint: str
    data: str
    split: str
    timing: dict[str, float] = field(default_factory=dict)
    setup: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict; undefined metrics (NaN) become null."""

        def clean_dict(d: dict) -> dict:
            return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}

        clean = clean_dict(self.metrics)
        return {
            "per_class": {k: clean_dict(v) for k, v in self.per_class.items()},
            "checkpoint": self.checkpoint,
            "data": self.data,
            "split": self.split,
            "images": self.images,
            "metrics": clean,
            "timing": self.timing,
            "setup": self.setup,
        }

    def table(self) -> str:
        """The markdown report: what was evaluated, then one row per metric."""
        from mtseg.report import metrics_table

        s = self.setup
        where = (
            f"{s['actors']} {s.get('device', '?')} inference actor(s)"
            if s.get("actors")
            else "inference in the read + decode tasks"
        )
        lines = [
            f"# Evaluation of `{self.checkpoint}`",
            "",
            f"Split `{self.split}` of `{self.data}`: {self.images} images; {where}, batch {s.get('batch_size', '?')}; "
            f"{self.timing.get('images_per_s', 0.0):.1f} images/s; metrics {self.timing.get('metrics_s', 0.0):.1f}s "
            f"(COCO matching in {s.get('coco_shards', 1)} Ray tasks).",
            "",
            metrics_table(self.metrics),
        ]
        if self.per_class:
            kinds = list(self.per_class)
            names = list(dict.fromkeys(n for values in self.per_class.values() for n in values))
            lines += ["", "| class | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
            for n in names:
                cells = [self.per_class[k].get(n, math.nan) for k in kinds]
                lines.append(f"| {n} | " + " | ".join("–" if math.isnan(v) else f"{v:.3f}" for v in cells) + " |")
        return "\n".join(lines) + "\n"


def plan_inference(
    resources: dict[str, float], *, use_gpu: str = "auto", concurrency: int | None = None, actor_cpus: float | None = None
) -> dict[str, Any]:
    """Where the forward passes run, with which resources.

    With GPUs, one actor per GPU (``mode`` ``actors``). On CPUs, by default, in the read +
    decode tasks themselves (``mode`` ``tasks``, one single-threaded :class:`EvalTask` per CPU:
    several small forwards use the CPUs better than one multi-threaded one, and no actor has
    to start). ``concurrency`` or ``actor_cpus`` on CPUs ask for an actor pool; it leaves
    :data:`PREPROCESS_TASK_CPUS` free: with every CPU held by an actor no read + decode task
    could run and the stream stalls.

    Args:
        resources: ``ray.cluster_resources()``.
        use_gpu: ``auto`` (GPUs when the cluster has them), ``true`` or ``false``.
        concurrency: number of actors; default as above.
        actor_cpus: CPUs each actor reserves; default its share of the CPUs left over (at most 1).

    Returns:
        ``{"mode", "actors", "device", "num_cpus", "num_gpus", "threads"}``; ``actors`` is 0 in
        ``tasks`` mode.

    Raises:
        PredictError: GPUs asked for and absent, or bad numbers.
    """
    preprocess_cpus = PREPROCESS_TASK_CPUS
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 0))
    if use_gpu not in ("auto", "true", "false"):
        raise PredictError(f"--use-gpu: expected auto, true or false, got {use_gpu!r}")
    if use_gpu == "true" and gpus == 0:
        raise PredictError("--use-gpu true: the Ray cluster has no GPUs")
    if concurrency is not None and concurrency < 1:
        raise PredictError(f"--concurrency: must be >= 1, got {concurrency}")
    if actor_cpus is not None and actor_cpus < 0:
        raise PredictError(f"--actor-cpus: must be >= 0, got {actor_cpus}")
    on_gpu = gpus > 0 and use_gpu != "false"
    if not on_gpu and concurrency is None and actor_cpus is None:
        return {"mode": "tasks", "actors": 0, "device": "cpu", "num_cpus": preprocess_cpus, "num_gpus": 0.0, "threads": 1}
    actors = concurrency or (gpus if on_gpu else max(1, int(cpus)))
    if actor_cpus is None:
        actor_cpus = max(0.0, min(1.0, (cpus - preprocess_cpus) / actors))
    if actors * actor_cpus > max(0.0, cpus - preprocess_cpus) + 1e-9:
        raise PredictError(
            f"{actors} actors x {actor_cpus} CPUs leave less than the {preprocess_cpus} CPU a read + decode task "
            f"needs on a cluster of {cpus:g} CPUs; lower --concurrency or --actor-cpus"
        )
    return {
        "mode": "actors",
        "actors": actors,
        "device": "cuda" if on_gpu else "cpu",
        "num_cpus": round(actor_cpus, 4),
        "num_gpus": 1.0 if on_gpu else 0.0,
        "threads": max(1, int(actor_cpus)),
    }


def build_eval_dataset(
    loaded: LoadedCheckpoint,
    data_uri: str,
    split: str,
    *,
    batch_size: int,
    plan: dict[str, Any],
    limit: int | None = None,
    export_panoptic: str | None = None,
    corruption: tuple[str, int] | None = None,
    model_ref: Any = None,
    labeled_fraction: float = 1.0,
):
    """The lazy Ray Dataset of per-batch evaluator states (see the module docstring).

    Args:
        batch_size: images per model forward.
        plan: from :func:`plan_inference`.
        limit: evaluate the first ``limit`` images only.
        export_panoptic: a directory the workers write each image's panoptic PNG into.
        corruption: ``(name, severity)``: corrupt each decoded image in the read + decode tasks
            (:class:`~mtseg.data.pipeline.SampleTransform`); None or severity 0: clean.
        model_ref: ``ray.put(loaded.model_state)`` done by the caller; evaluations sharing it
            share each worker's built model. Default: put here, for this evaluation.
        labeled_fraction: < 1: only the images a run with this ``data.labeled_fraction`` trained
            on with their labels (:func:`mtseg.data.pipeline.is_labeled`), before ``limit``.

    Returns:
        (dataset with rows ``{"state", "gt", "images", "panoptic"}``, the split's manifest).
    """
    import ray
    import ray.data

    from mtseg.data.pipeline import ChunkedTransform, SampleTransform, read_split, row_is_labeled
    from mtseg.tasks import build_tasks, task_classes

    cfg = loaded.cfg
    ds, manifest = read_split(data_uri, split)
    if labeled_fraction < 1.0:
        ds = ds.filter(functools.partial(row_is_labeled, fraction=labeled_fraction))
    if limit:
        ds = ds.limit(int(limit))
    transform = SampleTransform.from_config(
        loaded.categories, cfg, build_tasks(cfg, loaded.categories), train=False, corruption=corruption
    )
    # Each image's ground truth travels beside it: an actor scores a batch against its own images.
    ds = ds.map_batches(ChunkedTransform(transform, with_gt=True), batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
    state_ref = model_ref if model_ref is not None else ray.put(loaded.model_state)
    kwargs = {
        "cfg": cfg.to_dict(),
        "categories": loaded.categories.to_categories(),
        "model_state": state_ref,
        "device": plan["device"],
        "num_threads": plan["threads"],
        "tasks": task_classes(),
        "export_dir": export_panoptic,
    }
    if plan["mode"] == "tasks":
        return ds.map_batches(EvalTask(state_ref.hex(), kwargs, batch_size), batch_size=None, batch_format="numpy"), manifest
    ds.context.op_resource_reservation_enabled = True  # the actors keep their share of the CPUs
    return ds.map_batches(
        EvalActor,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
        num_cpus=plan["num_cpus"],
        num_gpus=plan["num_gpus"],
    ), manifest


def _check_label_space(loaded: LoadedCheckpoint, manifest: dict, where: str) -> None:
    data = CategoryIndex.from_categories(manifest["categories"])
    if data.coco_ids != loaded.categories.coco_ids:
        raise PredictError(
            f"{where}: its categories (COCO ids {list(data.coco_ids)[:8]}...) differ from the checkpoint's "
            f"({list(loaded.categories.coco_ids)[:8]}...); evaluate on data with the label space the model was trained on"
        )


def _check_counts(**counts: int | None) -> None:
    # 0 is a value the user typed, not "use the default" (which is None).
    for name, value in counts.items():
        if value is not None and value < 1:
            raise PredictError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")


def evaluate_loaded(
    loaded: LoadedCheckpoint,
    data_uri: str,
    split: str,
    *,
    batch_size: int | None = None,
    concurrency: int | None = None,
    actor_cpus: float | None = None,
    use_gpu: str = "auto",
    limit: int | None = None,
    coco_shards: int | None = None,
    export_panoptic: str | None = None,
    corruption: tuple[str, int] | None = None,
    model_ref: Any = None,
    labeled_fraction: float = 1.0,
    log: Callable[[str], None] = print,
) -> EvaluationResult:
    """Evaluate a loaded checkpoint on a split with Ray Data (``ray.init`` first).

    Args:
        loaded: from :func:`load_for_evaluation`, which checked the counts and the label space.
        batch_size: images per forward pass; default the run's ``data.batch_size``.
        concurrency, actor_cpus, use_gpu: see :func:`plan_inference`.
        limit: only the first ``limit`` images.
        coco_shards: Ray tasks for the COCO per-image matching; default by image count and CPUs.
        export_panoptic: write the panoptic predictions in COCO's format into this directory
            (local or ``s3://``): ``panoptic.json`` and ``panoptic/<image stem>.png``, for
            panopticapi's ``pq_compute``. Needs a panoptic dataset and an instance head.
        corruption: ``(name, severity)`` of :mod:`mtseg.data.corruptions`: evaluate on the images
            corrupted so (at their original size, before the resize); None or severity 0: clean,
            the very same pass.
        model_ref: the ObjectRef of ``loaded.model_state`` when the caller put it for several
            evaluations (:func:`evaluate_robustness`); default put for this one.
        labeled_fraction: < 1: only the images a run with this ``data.labeled_fraction`` kept
            labelled (a semi-supervised run's train-set figures).

    Returns:
        An :class:`EvaluationResult` (nothing written).

    Raises:
        PredictError: bad arguments or an empty split.
    """
    import ray

    from mtseg.fusion import has_instances
    from mtseg.metrics import Evaluator, coco_gt_from_rows, ray_map
    from mtseg.tasks import build_tasks

    batch_size = batch_size if batch_size is not None else loaded.cfg.data.batch_size
    check_export_panoptic(loaded, export_panoptic)
    if corruption is not None:
        name, severity = corruption
        check_corruptions([name])
        if severity != 0:
            check_severities([severity])
    resources = dict(ray.cluster_resources())
    plan = plan_inference(resources, use_gpu=use_gpu, concurrency=concurrency, actor_cpus=actor_cpus)
    try:
        ds, manifest = build_eval_dataset(
            loaded,
            data_uri,
            split,
            batch_size=batch_size,
            plan=plan,
            limit=limit,
            export_panoptic=export_panoptic,
            corruption=corruption,
            model_ref=model_ref,
            labeled_fraction=labeled_fraction,
        )
    except ValueError as e:  # e.g. a split whose manifest lists no shards
        raise PredictError(str(e)) from None
    where = f"{plan['actors']} {plan['device']} actor(s)" if plan["actors"] else "the read + decode tasks"
    corrupted = f", corrupted by {corruption[0]} at severity {corruption[1]}" if corruption and corruption[1] else ""
    log(f"[evaluate] {storage.join(data_uri, split)}{corrupted}: inference in {where}, batch {batch_size}")

    t0 = time.monotonic()
    states: list[bytes] = []
    gt_rows: list[dict] = []
    exported: list[dict] = []
    images = 0
    for row in ds.iter_rows():
        states.append(row["state"])
        gt_rows.extend(json.loads(row["gt"]))
        exported.extend(json.loads(row["panoptic"]))
        images += int(row["images"])
    inference_s = time.monotonic() - t0
    if images == 0:
        raise PredictError(f"{storage.join(data_uri, split)}: no images to evaluate")
    log(f"[evaluate] {images} images in {inference_s:.1f}s ({images / inference_s:.1f} img/s); computing metrics")

    t1 = time.monotonic()
    tasks = build_tasks(loaded.cfg, loaded.categories)
    coco_gt = coco_gt_from_rows(gt_rows, manifest["categories"]) if has_instances(tasks) else None
    evaluator = Evaluator(loaded.categories, tasks, coco_gt=coco_gt)
    for blob in states:
        part = Evaluator(loaded.categories, tasks, coco_gt=coco_gt)
        part.load_state_dict(pickle.loads(blob))
        evaluator.merge(part)
    shards = coco_shards or max(1, min(math.ceil(images / IMAGES_PER_COCO_SHARD), 2 * int(resources.get("CPU", 1))))
    metrics = evaluator.compute(num_shards=shards, executor=ray_map())
    metrics_s = time.monotonic() - t1
    if export_panoptic:
        log(
            f"[evaluate] panoptic predictions of {len(exported)} images -> {write_panoptic_json(export_panoptic, exported, gt_rows, loaded.categories)}"
        )
    return EvaluationResult(
        metrics=metrics,
        images=images,
        per_class=evaluator.per_class(),
        checkpoint=loaded.uri,
        data=data_uri,
        split=split,
        timing={
            "inference_s": round(inference_s, 3),
            "images_per_s": round(images / inference_s, 2),
            "metrics_s": round(metrics_s, 3),
            "total_s": round(inference_s + metrics_s, 3),
        },
        setup={
            "mode": plan["mode"],
            "actors": plan["actors"],
            "device": plan["device"],
            "actor_cpus": plan["num_cpus"],
            "batch_size": batch_size,
            "coco_shards": shards,
            "limit": limit,
            **({"labeled_fraction": labeled_fraction} if labeled_fraction < 1.0 else {}),
            **({"corruption": [corruption[0], int(corruption[1])]} if corruption and corruption[1] else {}),
        },
    )


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


@dataclass
class RobustnessResult:
    """A checkpoint's metrics on a split clean and under common corruptions (:func:`evaluate_robustness`).

    Attributes:
        clean: the clean evaluation, as :func:`evaluate_loaded` gives it.
        by_corruption: corruption -> severity -> metrics (``{"val/miou": ...}``), every metric of
            each pass, corruptions in the order evaluated.
        summary: headline metric (:data:`HEADLINE_METRICS`, those the model has) ->
            ``{"clean", "mPC", "rPC"}`` (:func:`summarize_robustness`).
        seconds: corruption -> severity -> seconds of that pass (inference + metrics).
    """

    clean: EvaluationResult
    by_corruption: dict[str, dict[int, dict[str, float]]]
    summary: dict[str, dict[str, float]]
    seconds: dict[str, dict[int, float]] = field(default_factory=dict)

    @property
    def severities(self) -> list[int]:
        """Every severity evaluated, ascending."""
        return sorted({s for by in self.by_corruption.values() for s in by})

    def _shown(self) -> list[str]:
        # A metric undefined on the clean split (no ground truth of its kind) has nothing to draw.
        return [k for k, row in self.summary.items() if math.isfinite(row["clean"])] or list(self.summary)

    def to_json(self) -> dict[str, Any]:
        """``metrics.json``: the clean evaluation's document with a ``robustness`` section; NaN becomes null.

        Returns:
            ``clean.to_json()`` plus ``robustness``: ``corruptions``, ``severities``, ``families``,
            ``by_corruption`` (corruption -> severity as a string -> metrics), ``summary``
            (metric -> clean / mPC / rPC), ``seconds`` (as ``by_corruption``) and ``definition``.
        """
        doc = self.clean.to_json()
        doc["robustness"] = {
            "corruptions": list(self.by_corruption),
            "severities": self.severities,
            "families": {name: CORRUPTIONS[name] for name in self.by_corruption},
            "by_corruption": {
                name: {str(s): {k: _json_value(v) for k, v in m.items()} for s, m in by.items()}
                for name, by in self.by_corruption.items()
            },
            "summary": {k: {n: _json_value(v) for n, v in row.items()} for k, row in self.summary.items()},
            "seconds": {name: {str(s): t for s, t in by.items()} for name, by in self.seconds.items()},
            "definition": "Michaelis et al. (2019): mPC = mean over corruptions of the mean over severities; rPC = mPC / clean",
        }
        return doc

    def table(self) -> str:
        """The markdown report: the clean evaluation's, then clean / mPC / rPC and one table per headline metric."""
        from mtseg.report import format_metric

        severities = self.severities
        lines = [
            self.clean.table().rstrip("\n"),
            "",
            "## Robustness to common corruptions",
            "",
            f"{len(self.by_corruption)} corruptions (Hendrycks & Dietterich) at severities "
            f"{', '.join(map(str, severities))}, applied to each image at its original size. mPC is the mean "
            "over corruptions and severities, rPC = mPC / clean (Michaelis et al., 2019).",
            "",
            "| metric | clean | mPC | rPC |",
            "|---|---:|---:|---:|",
        ]
        for key, row in self.summary.items():
            lines.append(f"| `{key}` | " + " | ".join(format_metric(key, row[n]) for n in ("clean", "mPC", "rPC")) + " |")
        for key in self._shown():
            lines += [
                "",
                f"### `{key}` by corruption and severity",
                "",
                "| corruption | family | " + " | ".join(map(str, severities)) + " | mean |",
                "|---|---|" + "---:|" * (len(severities) + 1),
            ]
            for name, by in self.by_corruption.items():
                values = [by[s].get(key, math.nan) if s in by else math.nan for s in severities]
                cells = [f"{v:.4f}" if math.isfinite(v) else "–" for v in [*values, float(np.mean(values))]]
                lines.append(f"| {name} | {CORRUPTIONS[name]} | " + " | ".join(cells) + " |")
        lines += ["", f"![metric vs severity per corruption family]({ROBUSTNESS_PNG})"]
        return "\n".join(lines) + "\n"

    def figure(self):
        """Metric vs severity, one panel per corruption family (noise, blur, weather, digital) and row per
        headline metric, one line per corruption, the clean value dashed: a matplotlib Figure on Agg."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from mtseg.report import DPI

        keys = self._shown()
        fig = Figure(figsize=(13.0, 2.9 * max(1, len(keys)) + 0.3), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)  # no pyplot: no global state, no display
        axes = fig.subplots(max(1, len(keys)), len(FAMILIES), squeeze=False, sharey="row")
        for r, key in enumerate(keys):
            for c, family in enumerate(FAMILIES):
                ax = axes[r][c]
                names = [n for n in self.by_corruption if CORRUPTIONS[n] == family]
                for i, name in enumerate(names):
                    by = self.by_corruption[name]
                    severities = sorted(by)
                    values = [by[s].get(key, math.nan) for s in severities]
                    ax.plot(severities, values, marker="o", markersize=3.5, linewidth=1.5, color=f"C{i}", label=name)
                ax.axhline(self.summary[key]["clean"], color="black", linestyle="--", linewidth=1.2, label="clean")
                if not names:
                    ax.text(0.5, 0.5, "not evaluated", transform=ax.transAxes, ha="center", va="center", color="gray")
                ax.set_title(family)
                ax.set_xticks(list(range(1, 6)))
                ax.set_xlim(0.7, 5.3)
                ax.set_xlabel("severity")
                if c == 0:
                    ax.set_ylabel(key)
                ax.grid(True, alpha=0.35)
                ax.legend(fontsize="x-small", loc="lower left", frameon=False)
        return fig


def summarize_robustness(
    clean: dict[str, float], by_corruption: dict[str, dict[int, dict[str, float]]], metrics: Sequence[str] = HEADLINE_METRICS
) -> dict[str, dict[str, float]]:
    """mPC and rPC of each headline metric, as Michaelis et al. (2019) define them for COCO-C.

    mPC = (1/N_c) sum over corruptions of (1/N_s) sum over severities of the metric; with the same
    severities for every corruption, the mean of all the (corruption, severity) values. rPC = mPC / clean.

    Args:
        clean: the clean evaluation's metrics.
        by_corruption: corruption -> severity -> metrics.
        metrics: the metrics to summarise, those of them ``clean`` has; when it has none of them, its
            first metric by name.

    Returns:
        metric -> ``{"clean", "mPC", "rPC"}``; NaN where undefined (an undefined value among the
        passes, a clean value of 0).
    """
    keys = [k for k in metrics if k in clean] or sorted(clean)[:1]
    summary = {}
    for key in keys:
        per_corruption = [np.mean([by[s].get(key, math.nan) for s in by]) for by in by_corruption.values() if by]
        mpc = float(np.mean(per_corruption)) if per_corruption else math.nan
        base = float(clean[key])
        rpc = mpc / base if math.isfinite(base) and base != 0 else math.nan
        summary[key] = {"clean": base, "mPC": mpc, "rPC": rpc}
    return summary


def evaluate_robustness(
    loaded: LoadedCheckpoint,
    data_uri: str,
    split: str,
    *,
    corruptions: Sequence[str],
    severities: Sequence[int],
    log: Callable[[str], None] = print,
    **options: Any,
) -> RobustnessResult:
    """Evaluate a loaded checkpoint clean and under each corruption at each severity (``ray.init`` first).

    One :func:`evaluate_loaded` pass clean, then one per (corruption, severity), each corrupting the
    images in the read + decode tasks (deterministic per image, corruption and severity). The weights
    go to the object store once for all the passes.

    Args:
        loaded: from :func:`load_for_evaluation`.
        corruptions: names from :data:`mtseg.data.corruptions.CORRUPTIONS` (see
            :func:`~mtseg.data.corruptions.parse_corruptions`); duplicates dropped.
        severities: from 1 to 5 (:func:`~mtseg.data.corruptions.parse_severities`).
        log: one line per pass and the summary.
        **options: :func:`evaluate_loaded`'s (``batch_size``, ``concurrency``, ``limit``,
            ``use_gpu``...); ``export_panoptic`` exports the clean pass only.

    Returns:
        A :class:`RobustnessResult` (nothing written; :func:`write_results` writes it).

    Raises:
        mtseg.data.corruptions.CorruptionError: an unknown corruption or a severity outside 1-5.
        PredictError: bad options (as :func:`evaluate_loaded`), or ``corruption`` among them.
    """
    import ray

    corruptions = check_corruptions(corruptions)
    severities = check_severities(severities)
    if "corruption" in options:
        raise PredictError("evaluate_robustness: give corruptions and severities, not corruption")
    export_panoptic = options.pop("export_panoptic", None)
    if options.get("model_ref") is None:
        options["model_ref"] = ray.put(loaded.model_state)
    passes = len(corruptions) * len(severities)
    log(f"[robustness] clean, then {len(corruptions)} corruption(s) x {len(severities)} severities: {passes} passes")
    clean = evaluate_loaded(loaded, data_uri, split, export_panoptic=export_panoptic, log=log, **options)
    headline = [k for k in HEADLINE_METRICS if k in clean.metrics]
    by_corruption: dict[str, dict[int, dict[str, float]]] = {}
    seconds: dict[str, dict[int, float]] = {}
    for name in corruptions:
        for severity in severities:
            result = evaluate_loaded(loaded, data_uri, split, corruption=(name, severity), log=lambda _: None, **options)
            by_corruption.setdefault(name, {})[severity] = result.metrics
            seconds.setdefault(name, {})[severity] = result.timing["total_s"]
            shown = ", ".join(f"{k} {result.metrics[k]:.4f}" for k in headline)
            log(
                f"[robustness] {sum(map(len, by_corruption.values()))}/{passes} {name} severity {severity}: "
                f"{shown} ({result.timing['total_s']:.1f}s)"
            )
    summary = summarize_robustness(clean.metrics, by_corruption)
    for key, row in summary.items():
        log(f"[robustness] {key}: clean {row['clean']:.4f}, mPC {row['mPC']:.4f}, rPC {row['rPC']:.3f}")
    return RobustnessResult(clean=clean, by_corruption=by_corruption, summary=summary, seconds=seconds)


def write_results(result: EvaluationResult | RobustnessResult, out: str) -> list[str]:
    """Write ``metrics.json`` and ``metrics.md`` into ``out`` (local or ``s3://``), and for a
    :class:`RobustnessResult` ``robustness.png`` too; returns their URIs (also set as ``files``
    of the clean :class:`EvaluationResult`)."""
    json_uri, md_uri = storage.join(out, METRICS_JSON), storage.join(out, METRICS_MD)
    storage.write_bytes(json_uri, (json.dumps(result.to_json(), indent=2, sort_keys=True) + "\n").encode())
    storage.write_bytes(md_uri, result.table().encode())
    files = [json_uri, md_uri]
    if isinstance(result, RobustnessResult):
        from mtseg.report import png_bytes

        png_uri = storage.join(out, ROBUSTNESS_PNG)
        storage.write_bytes(png_uri, png_bytes(result.figure()))
        files.append(png_uri)
        result = result.clean
    result.files = files
    return result.files


def evaluate_checkpoint(
    checkpoint: str,
    data_uri: str | None = None,
    split: str | None = None,
    *,
    out: str | None = None,
    log: Callable[[str], None] = print,
    **options: Any,
) -> EvaluationResult:
    """Load a checkpoint, evaluate it on a split, write ``metrics.json`` + ``metrics.md``.

    Args:
        checkpoint: checkpoint or run directory (its newest complete checkpoint), local or ``s3://``.
        data_uri, split: default the run's ``data.uri`` and ``data.val_split``.
        out: where the two files go; default the checkpoint directory itself.
        **options: :func:`evaluate_loaded` keyword arguments.

    Returns:
        The :class:`EvaluationResult`, with ``files`` set.
    """
    loaded, data_uri, split = load_for_evaluation(checkpoint, data_uri, split, out=out, log=log)
    result = evaluate_loaded(loaded, data_uri, split, log=log, **options)
    write_results(result, out or loaded.uri)
    return result


def load_for_evaluation(
    checkpoint: str,
    data_uri: str | None = None,
    split: str | None = None,
    *,
    batch_size: int | None = None,
    limit: int | None = None,
    out: str | None = None,
    log: Callable[[str], None] = print,
) -> tuple[LoadedCheckpoint, str, str]:
    """Load a checkpoint and check everything :func:`evaluate_loaded` would refuse, before Ray starts.

    ``batch_size``, ``limit`` and ``out`` are only checked; the rest are :func:`evaluate_checkpoint`'s.
    Without ``data_uri``, when the run's data is in an object store that cannot be reached, its local
    copy beside the model (``<model>/../shards``, as ``mtseg demo`` exports it) is used instead.

    Returns:
        ``(loaded, data_uri, split)`` with the defaults filled in.

    Raises:
        PredictError: a count below 1, a label space that differs from the checkpoint's, or data in
            an object store that cannot be reached (and no local copy to use instead).
        mtseg.storage.StorageError: ``out`` is not a writable directory.
        mtseg.train.checkpoint.CheckpointError: not a usable checkpoint.
    """
    from mtseg.data.manifest import read_manifest
    from mtseg.train import checkpoint as ckpt

    _check_counts(batch_size=batch_size, limit=limit)
    if out:
        storage.check_access(out)  # not found to be a file only after the inference
    # The data's store is asked about before the weights are read: when it is gone, that is all there is to say.
    checkpoint = ckpt.resolve(checkpoint)
    cfg = ckpt.read_config(checkpoint)
    split = split or cfg.data.val_split
    data_uri = _reachable_data(checkpoint, data_uri or cfg.data.uri, split, typed=data_uri is not None, log=log)
    loaded = ckpt.load_for_inference(checkpoint, data_uri=data_uri)
    _check_label_space(loaded, read_manifest(data_uri, split), storage.join(data_uri, split))
    return loaded, data_uri, split


def _reachable_data(checkpoint: str, uri: str, split: str, *, typed: bool, log: Callable[[str], None]) -> str:
    """``uri``, or when it is in an object store that cannot be reached and was not ``typed`` by the user
    (it is the run's ``data.uri``), the local copy beside the model (:data:`LOCAL_DATA_DIR`) if it has ``split``.

    Raises:
        PredictError: the store cannot be reached and there is no local copy to use instead.
    """
    reason = _unreachable(uri)
    if reason is None:
        return uri
    local = "DIR"
    if not storage.is_s3(checkpoint):
        local = os.path.join(os.path.dirname(checkpoint.rstrip("/")), LOCAL_DATA_DIR)
        # A --data the user typed is never swapped for another.
        if not typed and storage.exists(storage.join(local, split, "manifest.json")):
            log(f"[evaluate] the checkpoint's data {uri} cannot be reached ({reason}); using its local copy {local}")
            return local
    whose = "" if typed else "the checkpoint's data "
    raise PredictError(
        f"{whose}{uri} is in an object store that cannot be reached ({reason}); "
        f"start that store, or evaluate on a local copy of split {split}: --data {local}"
    )


def _unreachable(uri: str) -> str | None:
    """Why the object store holding ``uri`` cannot be reached, known within seconds; None if it answers or ``uri`` is local."""
    if not storage.is_s3(uri):
        return None
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    endpoint = storage.s3_endpoint()
    # Unsigned: any answer, "access denied" included, shows the store is there, and no credential
    # is looked up (botocore's search for one ends at the EC2 metadata service).
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=BotoConfig(
            signature_version=UNSIGNED,
            retries={"total_max_attempts": 1},
            connect_timeout=PROBE_CONNECT_TIMEOUT_S,
            read_timeout=PROBE_READ_TIMEOUT_S,
            s3={"addressing_style": "path"},
        ),
    )
    try:
        client.head_bucket(Bucket=storage.split_s3(uri)[0])
    except (BotoConnectionError, HTTPClientError):  # refused, timed out, no such host
        return f"cannot reach the S3 endpoint {endpoint or '(AWS default)'}"
    except Exception:  # noqa: BLE001 - an answer (403, 404...): the reads that follow say what is wrong
        return None
    return None
