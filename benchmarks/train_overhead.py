"""Ray Train overhead: steady-state img/s of the Ray Train path over a plain PyTorch loop.

    .venv/bin/python benchmarks/train_overhead.py [--steps 30] [--warmup 5] [--threads 2]

Same model (the demo's: resnet18 + FPN, five tasks, uncertainty weighting), same in-memory
batches, same torch threads, same library function (``train_one_epoch``); one Ray Train
worker (Train V2, DDP process group of one) against a plain loop in this process. The plain
loop runs before and after the Ray run and their mean is the baseline, so drift on a noisy
machine hits both sides. Also reports the time from ``trainer.fit()`` to the first finished
step. Target: ratio >= 0.90 (Ray's own gate is 1/1.15 = 0.87).

Prints one JSON line and writes benchmarks/results/train_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from _results import write_results

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtseg.config import load_config  # noqa: E402
from mtseg.data.categories import CategoryIndex  # noqa: E402

CATEGORIES = [
    {"id": 1, "name": "disc", "supercategory": "round"},
    {"id": 3, "name": "ring", "supercategory": "round"},
    {"id": 7, "name": "box", "supercategory": "angular"},
    {"id": 18, "name": "triangle", "supercategory": "angular"},
    {"id": 44, "name": "cross", "supercategory": "compound"},
    {"id": 62, "name": "pair", "supercategory": "compound"},
]
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "configs", "demo.yaml")


def make_batches(n: int, batch_size: int, size: int, num_classes: int, num_super: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        sem = torch.randint(0, num_classes, (batch_size, size, size), generator=g)
        out.append(
            {
                "image": torch.rand(batch_size, 3, size, size, generator=g),
                "semantic": sem,
                "supercategory": torch.randint(0, num_super, (batch_size, size, size), generator=g),
                "boundary": (torch.rand(batch_size, size, size, generator=g) > 0.9).float(),
                "center": torch.rand(batch_size, 1, size, size, generator=g),
                "offset": torch.randn(batch_size, 2, size, size, generator=g),
                "thing_mask": (sem > 0).float(),
                "image_id": torch.arange(i * batch_size, (i + 1) * batch_size),
                "orig_size": torch.full((batch_size, 2), size),
            }
        )
    return out


def timed_loop(cfg, steps: int, warmup: int, wrap=None, on_first=None) -> float:
    """img/s of train_one_epoch over ``steps`` steps after ``warmup`` steps."""
    from mtseg.train.loop import build_state, train_one_epoch

    categories = CategoryIndex.from_categories(CATEGORIES)
    state = build_state(cfg, categories, steps + warmup, torch.device("cpu"), wrap_model=wrap)
    batches = make_batches(
        steps + warmup, cfg.data.batch_size, cfg.data.image_size, categories.num_classes, categories.num_supercategories
    )
    marks = []
    train_one_epoch(state, iter(batches[:warmup]), steps=warmup, on_step=lambda *a: marks.append(time.perf_counter()))
    if on_first:
        on_first(marks[0])
    t0 = time.perf_counter()
    train_one_epoch(state, iter(batches[warmup:]), steps=steps)
    return steps * cfg.data.batch_size / (time.perf_counter() - t0)


def ray_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from mtseg.config import config_from_dict

    torch.set_num_threads(config["threads"])
    cfg = config_from_dict(config["cfg"])
    first = {}
    ips = timed_loop(
        cfg,
        config["steps"],
        config["warmup"],
        wrap=ray.train.torch.prepare_model,
        on_first=lambda t: first.setdefault("t", time.time() - time.perf_counter() + t),
    )
    import tempfile

    # Train V2 keeps the metrics that come with a checkpoint: attach an empty one.
    with tempfile.TemporaryDirectory() as d:
        ray.train.report({"img_per_s": ips, "first_step_wall": first["t"]}, checkpoint=ray.train.Checkpoint.from_directory(d))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    torch.set_num_threads(args.threads)
    cfg = load_config(CONFIG, ["train.num_workers=1", "train.amp=false"])

    plain_before = timed_loop(cfg, args.steps, args.warmup)

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mtseg.cluster import init_local_ray

    init_local_ray(num_cpus=args.threads, log_to_driver=False)
    import tempfile

    with tempfile.TemporaryDirectory() as storage:
        t_fit = time.time()
        trainer = TorchTrainer(
            ray_worker,
            train_loop_config={"cfg": cfg.to_dict(), "steps": args.steps, "warmup": args.warmup, "threads": args.threads},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": args.threads}),
            run_config=RunConfig(name="overhead", storage_path=storage),
        )
        result = trainer.fit()
    ray.shutdown()
    if result.error:
        raise SystemExit(f"Ray Train run failed: {result.error}")
    ray_ips = result.metrics["img_per_s"]
    first_step_s = result.metrics["first_step_wall"] - t_fit

    plain_after = timed_loop(cfg, args.steps, args.warmup)
    plain = (plain_before + plain_after) / 2
    figures = {
        "benchmark": "train_overhead",
        "model": f"{cfg.model.backbone}+{cfg.model.decoder}{cfg.model.decoder_channels}",
        "tasks": len(cfg.tasks.names),
        "weighting": cfg.weighting.name,
        "batch_size": cfg.data.batch_size,
        "image_size": cfg.data.image_size,
        "threads": args.threads,
        "steps": args.steps,
        "plain_img_per_s": round(plain, 2),
        "plain_before": round(plain_before, 2),
        "plain_after": round(plain_after, 2),
        "ray_train_img_per_s": round(ray_ips, 2),
        "ratio": round(ray_ips / plain, 3),
        "target_ratio": 0.90,
        "ray_time_to_first_step_s": round(first_step_s, 2),
    }
    write_results(figures)


if __name__ == "__main__":
    main()
