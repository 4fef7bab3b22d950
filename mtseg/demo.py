"""``make demo`` / ``mtseg demo``: the main job end to end on the embedded default.

SeaweedFS and Ray on 127.0.0.1, synthetic COCO-format data sharded into the object store,
2 Ray Train workers streaming from it, evaluation, overlays and a report; everything it
started is stopped at the end. Each step prints what it does; a failure names the step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mtseg import storage
from mtseg.cluster import SeaweedFS, init_local_ray
from mtseg.config import load_config

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "jobs" / "configs" / "demo.yaml"
TARGET_MIOU = 0.70
STEPS = 7


class DemoError(RuntimeError):
    pass


def _step(n: int, text: str) -> float:
    print(f"\n[demo {n}/{STEPS}] {text}", flush=True)
    return time.monotonic()


def run_demo(out_dir: str = "runs/demo", train_images: int = 384, val_images: int = 96, epochs: int | None = None,
             config_path: str | None = None, overrides: list[str] | None = None) -> int:
    """Run the demo; returns 0 when val mIoU reaches the target, 1 otherwise."""
    import ray

    out_dir = os.path.abspath(out_dir)
    # SIGTERM (a job stopped, a terminal closed) still stops what the demo started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.makedirs(out_dir, exist_ok=True)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    t_start = time.monotonic()
    store = None
    current = "setup"
    try:
        current = "1/7 start SeaweedFS"
        _step(1, "starting SeaweedFS (S3 API) on 127.0.0.1")
        store = SeaweedFS(data_dir=os.path.join(out_dir, "seaweedfs")).start()
        os.environ.update(store.env())
        print(f"  S3 endpoint {store.endpoint}, bucket s3://{store.bucket}")

        current = "2/7 start Ray"
        _step(2, "starting a local Ray on 127.0.0.1")
        ctx = init_local_ray(num_cpus=max(2, os.cpu_count() or 2), dashboard=True, env=store.env(), log_to_driver=True)
        print(f"  Ray resources: {ray.cluster_resources()}; dashboard http://{getattr(ctx, 'dashboard_url', '')}")

        current = "3/7 synthesise data"
        _step(3, f"synthesising a COCO-format dataset ({train_images} train / {val_images} val images, 64 px)")
        from mtseg.data.synth import synthesize

        coco_root = os.path.join(out_dir, "coco")
        synthesize(coco_root, train=train_images, val=val_images, size=64, seed=0)

        current = "4/7 shard into the object store"
        data_uri = f"s3://{store.bucket}/demo/shards"
        _step(4, f"sharding into {data_uri}")
        from mtseg.data.shard import shard_coco

        for split in ("train2017", "val2017"):
            manifest = shard_coco(coco_root, split, data_uri, images_per_shard=64)
            print(f"  {split}: {manifest['counts']}")

        current = "5/7 train"
        storage_path = f"s3://{store.bucket}/demo/runs"
        cfg = load_config(config_path or str(DEMO_CONFIG), [
            f"data.uri={data_uri}", f"train.storage_path={storage_path}",
            *([f"train.epochs={epochs}"] if epochs else []), *(overrides or []),
        ])
        _step(5, f"training {cfg.model.backbone}+{cfg.model.decoder} on {', '.join(cfg.tasks.names)} with "
                 f"{cfg.train.num_workers} Ray Train workers, {cfg.train.epochs} epochs, weighting={cfg.weighting.name}")
        from mtseg.train.trainer import local_run_dir, run_training

        result = run_training(cfg, restart=True)
        if result.error:
            raise DemoError(f"training failed: {result.error}")
        metrics = {k: float(v) for k, v in (result.metrics or {}).items() if k.startswith("val/")}

        current = "6/7 evaluate and report"
        _step(6, "evaluating the best checkpoint, writing overlays and the report")
        best = _best_checkpoint(result)
        images = _write_overlays(best, cfg, data_uri, out_dir, count=4)
        from mtseg.report import read_scalars, write_report

        scalars = read_scalars(os.path.join(local_run_dir(cfg), "tensorboard"))
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            # NaN (e.g. AP of an area range with no objects) is not JSON: write null.
            json.dump({k: (v if v == v else None) for k, v in metrics.items()}, f, indent=2, sort_keys=True)
        elapsed = time.monotonic() - t_start
        md, html_path = write_report(
            out_dir, "mtseg demo", metrics, scalars, images,
            notes=[f"{cfg.train.num_workers} Ray Train workers streaming from SeaweedFS; {cfg.train.epochs} epochs; "
                   f"weighting {cfg.weighting.name}; checkpoint {best.path}; wall time {elapsed:.0f}s."],
        )
        print(f"  metrics: {os.path.join(out_dir, 'metrics.json')}\n  report: {md}, {html_path}")
        for k in sorted(metrics):
            print(f"  {k:28s} {metrics[k]:.4f}")
        miou = metrics.get("val/miou", 0.0)
        verdict = "reached" if miou >= TARGET_MIOU else "MISSED"
        print(f"\n[demo] val/miou = {miou:.4f} ({verdict} the {TARGET_MIOU:.2f} target) in {elapsed / 60:.1f} min")
        return 0 if miou >= TARGET_MIOU else 1
    except Exception as e:  # noqa: BLE001 - one line naming the step, then the cause
        print(f"\n[demo] FAILED at step {current}: {storage.redact(str(e)).splitlines()[0] if str(e) else type(e).__name__}")
        raise
    finally:
        _step(7, "stopping what the demo started (Ray, SeaweedFS)")
        if ray.is_initialized():
            ray.shutdown()
        if store is not None:
            store.stop()


def _best_checkpoint(result):
    """The kept checkpoint with the highest val/miou (the latest if none is scored)."""
    scored = [(m.get("val/miou", 0.0), c) for c, m in (result.best_checkpoints or [])]
    if scored:
        return max(scored, key=lambda x: x[0])[1]
    if result.checkpoint is None:
        raise DemoError("training produced no checkpoint")
    return result.checkpoint


def _write_overlays(checkpoint, cfg, data_uri: str, out_dir: str, count: int) -> list[str]:
    """image | ground truth | prediction, one row per task, for ``count`` validation images."""
    from mtseg.data.manifest import read_manifest
    from mtseg.data.pipeline import categories_of, iter_local_batches
    from mtseg.models import build_model
    from mtseg.report import blend, colorize, heatmap, instance_map, panel, to_uint8_image
    from mtseg.tasks import build_tasks
    from mtseg.train import checkpoint as ckpt
    from mtseg.train.loop import predict_batch

    categories = categories_of(read_manifest(data_uri, cfg.data.val_split))
    model = build_model(cfg, categories)
    with checkpoint.as_directory() as d:
        state, _ = ckpt.load(d)
    model.load_state_dict(state["model"])
    model.eval()
    tasks = build_tasks(cfg, categories)
    batch = next(iter_local_batches(data_uri, cfg.data.val_split, categories, cfg, train=False, batch_size=count))
    outputs, semantic, instances = predict_batch(model, batch, tasks, cfg, categories)
    paths = []
    overlay_dir = os.path.join(out_dir, "overlays")
    os.makedirs(overlay_dir, exist_ok=True)
    for i in range(batch["image"].shape[0]):
        image = to_uint8_image(batch["image"][i].numpy())
        rows = [("semantic", [("image", image), ("ground truth", blend(image, batch["semantic"][i].numpy())),
                              ("prediction (fused)", blend(image, semantic[i].numpy()))])]
        if "supercategory" in outputs:
            rows.append(("supercategory", [("image", image), ("ground truth", colorize(batch["supercategory"][i].numpy())),
                                           ("prediction", colorize(outputs["supercategory"][i].argmax(0).numpy()))]))
        if "boundary" in outputs:
            rows.append(("boundary", [("image", image), ("ground truth", heatmap(batch["boundary"][i].numpy())),
                                      ("prediction", heatmap(torch.sigmoid(outputs["boundary"][i, 0]).numpy()))]))
        if "instance" in outputs:
            inst = instance_map(instances[i], tuple(semantic[i].shape)) if instances is not None else np.zeros(semantic[i].shape, int)
            rows.append(("instance", [("image", image), ("gt centers", heatmap(batch["center"][i, 0].numpy())),
                                      ("pred centers", heatmap(outputs["instance"][i, 0].numpy())),
                                      ("pred instances", colorize(inst % 254 + (inst > 0)))]))
        if "reconstruction" in outputs:
            rows.append(("reconstruction", [("image", image), ("ground truth", image),
                                            ("prediction", to_uint8_image(outputs["reconstruction"][i].numpy()))]))
        path = os.path.join(overlay_dir, f"val_{int(batch['image_id'][i])}.png")
        panel(rows).save(path)
        paths.append(path)
    return paths
