"""Step time of the multi-task model and of each weighting strategy, side by side.

    .venv/bin/python benchmarks/multitask.py                 # ~2-3 min on 2 CPU cores
    .venv/bin/python benchmarks/multitask.py --device cuda --image-size 256 --batch-size 32

One training step = task input transform + forward + per-task losses + strategy.backward +
optimizer step, on a synthetic COCO-shaped batch (80 categories, 12 supercategories).
Configurations run interleaved, round after round, so that drift in machine load hits
all of them alike; step times are medians over the rounds and each ratio is the median
over rounds of the two configurations' times in the same round.

Prints one JSON line and writes benchmarks/results/multitask.json and .md:
  multitask_over_single: all five tasks (equal weighting) over semantic only, same backbone
                         (target <= 1.25)
  strategy_over_equal:   each strategy over equal weighting, five tasks (targets:
                         uncertainty, DWA, FAMO <= 1.05; GradNorm <= 1.5). pcgrad is exact
                         PCGrad as configured by default, pcgrad_batched the same with one
                         batched (vmap) encoder backward, pcgrad_rep_grad and
                         gradnorm_rep_grad the representation-gradient mode (weighting.rep_grad,
                         target <= 1.5); exact PCGrad has no target: it pays T encoder backwards
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from _results import RESULTS_DIR, write_results

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mtseg.config import TASK_NAMES, WEIGHTING_NAMES, load_config  # noqa: E402
from mtseg.data.categories import CategoryIndex  # noqa: E402
from mtseg.models import build_model  # noqa: E402
from mtseg.tasks import build_tasks, compute_losses, model_inputs  # noqa: E402
from mtseg.weighting import build_weighting  # noqa: E402

TARGETS = {
    "multitask_over_single": 1.25,
    "uncertainty": 1.05,
    "dwa": 1.05,
    "famo": 1.05,
    "gradnorm": 1.5,
    "pcgrad_rep_grad": 1.5,
    "gradnorm_rep_grad": 1.5,
}
# Variants of a strategy: configuration name -> (strategy, extra overrides).
VARIANTS = {
    "pcgrad_batched": ("pcgrad", ["weighting.pcgrad_batched=true"]),
    "pcgrad_rep_grad": ("pcgrad", ["weighting.rep_grad=true"]),
    "gradnorm_rep_grad": ("gradnorm", ["weighting.rep_grad=true"]),
}


def coco_like_categories(num_classes: int = 80, num_supers: int = 12) -> CategoryIndex:
    return CategoryIndex.from_categories(
        [{"id": i + 1, "name": f"c{i}", "supercategory": f"s{i % num_supers}"} for i in range(num_classes)]
    )


def synthetic_batch(categories: CategoryIndex, batch_size: int, size: int, device: torch.device) -> dict:
    """Targets with the contract's dtypes and plausible sparsity (a few square instances)."""
    g = torch.Generator().manual_seed(0)
    b, h = batch_size, size
    semantic = torch.zeros(b, h, h, dtype=torch.int64)
    center = torch.zeros(b, 1, h, h)
    offset = torch.zeros(b, 2, h, h)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="ij")
    for i in range(b):
        for _ in range(3):
            s = int(torch.randint(h // 8, h // 3, (1,), generator=g))
            y0, x0 = (int(v) for v in torch.randint(0, h - s, (2,), generator=g))
            cls = int(torch.randint(1, categories.num_classes, (1,), generator=g))
            semantic[i, y0 : y0 + s, x0 : x0 + s] = cls
            cy, cx = y0 + (s - 1) / 2, x0 + (s - 1) / 2
            center[i, 0] = torch.maximum(center[i, 0], torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / 8.0))
            offset[i, 0, y0 : y0 + s, x0 : x0 + s] = cy - ys[y0 : y0 + s, x0 : x0 + s]
            offset[i, 1, y0 : y0 + s, x0 : x0 + s] = cx - xs[y0 : y0 + s, x0 : x0 + s]
    c2s = torch.tensor(categories.class_to_super)
    batch = {
        "image": torch.rand(b, 3, h, h, generator=g),
        "semantic": semantic,
        "supercategory": c2s[semantic],
        "boundary": (torch.rand(b, h, h, generator=g) > 0.93).float(),
        "center": center,
        "offset": offset,
        "thing_mask": (semantic > 0).float(),
        "image_id": torch.arange(b),
        "orig_size": torch.full((b, 2), h),
    }
    return {k: v.to(device) for k, v in batch.items()}


class Runner:
    """One configuration: model + tasks + strategy + optimizer, stepping on a fixed batch."""

    def __init__(self, overrides: list[str], categories, batch, device, amp: bool):
        self.cfg = load_config(None, overrides)
        self.model = build_model(self.cfg, categories).to(device)
        self.tasks = build_tasks(self.cfg, categories)
        self.strategy = build_weighting(self.cfg.weighting, list(self.tasks)).to(device)
        params = list(self.model.parameters()) + list(self.strategy.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=1e-3)
        self.batch, self.device, self.amp = batch, device, amp
        self.shared = self.model.shared_parameters()
        self.times: list[float] = []

    def step(self) -> None:
        batch = dict(self.batch)
        images = model_inputs(batch, self.tasks, self.cfg, train=True)
        extra = {}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if self.strategy.uses_representation:
                outputs, extra["representation"] = self.model(images, representation=True)
            else:
                outputs = self.model(images)
        losses = compute_losses(self.tasks, outputs, batch)
        self.strategy.backward(losses, self.shared, **extra)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_step(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--decoder", default="fpn")
    ap.add_argument("--decoder-channels", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds; each steps every configuration once")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op CPU threads; 1 by default because on a shared machine OpenMP barriers stall "
        "whenever another process preempts one thread, which swamps the differences measured",
    )
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    ap.add_argument("--out", default=RESULTS_DIR, help="directory for multitask.json and .md")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    categories = coco_like_categories()
    batch = synthetic_batch(categories, args.batch_size, args.image_size, device)
    common = [
        f"model.backbone={args.backbone}",
        f"model.decoder={args.decoder}",
        f"model.decoder_channels={args.decoder_channels}",
        f"data.image_size={args.image_size}",
        f"model.channels_last={device.type == 'cuda'}",
    ]
    all_tasks = f"tasks.names=[{','.join(TASK_NAMES)}]"
    runners = {"single/semantic": Runner(common + ["tasks.names=[semantic]"], categories, batch, device, args.amp)}
    configurations = {name: (name, []) for name in WEIGHTING_NAMES}
    configurations["static"] = (
        "static",
        ["weighting.static={semantic: 1.0, supercategory: 0.5, boundary: 2.0, instance: 1.0, reconstruction: 0.5}"],
    )
    configurations.update(VARIANTS)
    for key, (name, extra) in configurations.items():
        runners[f"multi/{key}"] = Runner(
            common + [all_tasks, f"weighting.name={name}"] + extra, categories, batch, device, args.amp
        )

    for _ in range(args.warmup):
        for r in runners.values():
            r.step()
    started = time.perf_counter()
    for i in range(args.rounds):
        # Rotate the starting configuration so none always runs right after the same one.
        keys = list(runners)
        keys = keys[i % len(keys) :] + keys[: i % len(keys)]
        for k in keys:
            runners[k].timed_step()
    elapsed = time.perf_counter() - started

    ms = {k: 1000 * statistics.median(r.times) for k, r in runners.items()}
    ratios = {"multitask_over_single": _paired_ratio(runners["multi/equal"], runners["single/semantic"])}
    strategy_ratios = {n: _paired_ratio(runners[f"multi/{n}"], runners["multi/equal"]) for n in configurations if n != "equal"}
    checks = {k: ratios[k] <= v for k, v in TARGETS.items() if k in ratios}
    checks.update({k: strategy_ratios[k] <= v for k, v in TARGETS.items() if k in strategy_ratios})
    result = {
        "benchmark": "multitask",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "backbone": args.backbone,
        "decoder": args.decoder,
        "decoder_channels": args.decoder_channels,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "amp": args.amp,
        "rounds": args.rounds,
        "timed_seconds": round(elapsed, 1),
        "step_ms_median": {k: round(v, 2) for k, v in ms.items()},
        "step_ms_iqr": {k: round(1000 * _iqr(r.times), 2) for k, r in runners.items()},
        "multitask_over_single": round(ratios["multitask_over_single"], 3),
        "strategy_over_equal": {k: round(v, 3) for k, v in strategy_ratios.items()},
        "targets": TARGETS,
        "meets_target": checks,
    }
    return write_results(result, out=os.path.join(args.out, "multitask.json"), markdown=_markdown(result))


def _paired_ratio(a: Runner, b: Runner) -> float:
    """Median over rounds of a's step time over b's in the same round.

    Pairing within a round cancels the load drift that both see; the median drops the
    rounds where another process preempted one of them.
    """
    return statistics.median(x / y for x, y in zip(a.times, b.times))


def _iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def _markdown(r: dict) -> str:
    head = (
        f"{r['backbone']}+{r['decoder']}({r['decoder_channels']}), {r['image_size']} px, batch {r['batch_size']}, {r['device']}"
    )
    lines = [f"# multi-task step time ({head})", "", "| configuration | median step (ms) | ratio | target |", "|---|---|---|---|"]
    ms = r["step_ms_median"]
    lines.append(f"| single/semantic | {ms['single/semantic']} | 1 | |")
    lines.append(f"| multi/equal (5 tasks) | {ms['multi/equal']} | {r['multitask_over_single']} vs single | <= 1.25 |")
    for name, ratio in r["strategy_over_equal"].items():
        target = r["targets"].get(name)
        lines.append(f"| multi/{name} | {ms['multi/' + name]} | {ratio} vs equal | {'<= ' + str(target) if target else ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
