"""The GPU path: multi-task ResNet-50 FPN training at 512 px in bf16 + channels_last, measured.

On a CUDA machine (one prepared run within ``--budget-s``, 7 minutes by default)::

    .venv/bin/python benchmarks/gpu.py

writes ``benchmarks/results/gpu.json`` and, a GPU figure being one that CPU machines cannot
measure again, the same to ``benchmarks/reference/gpu-<device>.json`` to commit.

On this workplace's lent GPU machines (their image has torch, torchvision, pyarrow and Pillow
but not Ray, pycocotools or boto3, and nothing can be fetched there), carry a cp312 pycocotools
wheel (``pip download pycocotools --python-version 3.12 --only-binary=:all: -d wheels``) and run::

    pip install --no-index --no-deps wheels/pycocotools-*.whl && PYTHONPATH=. python3 benchmarks/gpu.py

The phases that need Ray (``stream``, ``evaluate``) are then skipped and named in ``skipped``.

Without CUDA it runs a CPU smoke of the same code (32 px images, 2 steps, no torch.compile)
and says so (``"smoke": true, "device": "cpu"``); ``--smoke`` forces it on a GPU machine.

Phases, in order of importance (a phase that no longer fits ``--budget-s`` is skipped and
named in ``skipped``; on a GPU an error in one phase is recorded in ``errors`` and the others
still run, the exit status then being 1):

* ``in_memory``: the multi-task model (five tasks, equal weighting, ``mtseg.train.loop``'s
  ``train_one_epoch``) on batches pre-built on the device: the model's cost alone. Its img/s
  is ``img_per_s``, ``in_memory_img_per_s`` and ``compile.off``.
* ``flops``: FLOPs of one training step of each model (``torch.utils.flop_counter``), and
  MFU = FLOPs/step x steps/s over the device's dense bf16 peak (:data:`BF16_PEAK_TFLOPS`;
  ``mfu`` is null on a device not in the table).
* ``anchor``: torchvision's ``deeplabv3_resnet50`` (random init, semantic only) in a plain
  PyTorch loop, same images, batch, resolution, bf16 autocast, channels_last and optimiser.
* ``stream``: the multi-task model fed by the real stream, mtseg's Ray Data pipeline
  (:func:`mtseg.data.pipeline.worker_batches` over the epoch plan, parquet shards on local
  disk; decode, augmentation and every task's target on the CPUs): ``stream_img_per_s``.
* ``compile``: the multi-task model with ``train.compile=true`` (``torch.compile``, default
  mode), in-memory batches; ``compile.on`` with the compile time.
* ``evaluate``: ``mtseg evaluate`` (:func:`mtseg.evaluate.evaluate_checkpoint`) of the
  in-memory model's checkpoint on the validation split, with one GPU actor.

Data: the COCO profile of ``mtseg data synth`` where it exists (else the default synthetic
images at 512 px, and ``data_profile`` says so), sharded to a temporary directory.

Goals on an H100/H200: multi-task img/s >= 0.8x the anchor's, MFU >= 0.30, stream img/s >=
0.95x in-memory (the data plane is not the bottleneck); each figure sits next to its goal in
``goals``. One JSON line goes to stdout and to ``benchmarks/results/gpu.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
import traceback

import torch
from _results import write_results

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Dense (no sparsity) bf16 tensor-core peak, TFLOPS, by a substring of the CUDA device name
#: (first match wins): NVIDIA's datasheets.
BF16_PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))

GOALS = {"multitask_over_anchor": 0.8, "mfu": 0.30, "stream_over_in_memory": 0.95}

#: (image side, batch, warm-up steps, timed steps, train images, val images) per mode.
GPU_SIZES = {"image_size": 512, "batch_size": 32, "warmup": 5, "steps": 30, "train_images": 256, "val_images": 64}
SMOKE_SIZES = {"image_size": 32, "batch_size": 2, "warmup": 1, "steps": 2, "train_images": 8, "val_images": 4}

PHASES = ("in_memory", "flops", "anchor", "stream", "compile", "evaluate")
NEEDS_RAY = ("stream", "evaluate")
#: Seconds a phase needs at least on a GPU (with margin); skipped when fewer are left.
PHASE_MIN_S = {"in_memory": 30, "flops": 10, "anchor": 30, "stream": 60, "compile": 150, "evaluate": 60}


def bf16_peak_flops(device_name: str) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None when it is not in :data:`BF16_PEAK_TFLOPS`."""
    for key, tflops in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def synthesize_data(root: str, *, train: int, val: int, size: int, coco: bool) -> str:
    """Synthetic COCO under ``root`` (COCO profile when asked and available); returns its description."""
    from mtseg.data import synth

    if coco and "profile" in inspect.signature(synth.synthesize).parameters:
        synth.synthesize(root, train=train, val=val, seed=0, profile="coco")
        return "coco"
    synth.synthesize(root, train=train, val=val, size=size, seed=0)
    why = "smoke run" if not coco else "mtseg.data.synth.synthesize has no COCO profile in this tree"
    return f"default, {size} px square images ({why})"


def shard_data(root: str, uri: str, images_per_shard: int) -> None:
    from mtseg.data.shard import shard_coco

    for split in ("train2017", "val2017"):
        shard_coco(root, split, uri, images_per_shard=images_per_shard, log=lambda *a: None)


def build_config(uri: str, sizes: dict, *, compile: bool = False):
    from mtseg.config import load_config

    return load_config(
        None,
        [
            f"data.uri={uri}",
            f"data.image_size={sizes['image_size']}",
            f"data.batch_size={sizes['batch_size']}",
            "data.map_num_cpus=1",
            "data.rows_per_read_task=16",
            "model.backbone=resnet50",
            "model.decoder=fpn",
            "model.decoder_channels=256",
            "model.channels_last=true",
            "weighting.name=equal",
            "train.amp=true",
            "train.warmup_steps=0",
            f"train.compile={compile}",
        ],
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> int:
    """Start a phase's peak-memory count; returns what earlier phases still hold (bytes)."""
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_gib(device: torch.device, held: int) -> float | None:
    """The phase's own peak (its model, optimiser state, activations): the peak less what it found held."""
    return round((torch.cuda.max_memory_allocated(device) - held) / 2**30, 2) if device.type == "cuda" else None


def _rates(images: int, steps: int, seconds: float) -> dict:
    return {"img_per_s": round(images / seconds, 2), "step_ms": round(1000 * seconds / steps, 2)}


def train_multitask(cfg, categories, batches, device: torch.device, *, warmup: int, steps: int) -> dict:
    """img/s and step time of ``train_one_epoch`` over ``batches`` (an iterable), after ``warmup`` steps."""
    from mtseg.train.loop import build_state, train_one_epoch

    held = _reset_peak(device)
    state = build_state(cfg, categories, warmup + steps, device)
    it = iter(batches)
    t0 = time.perf_counter()
    train_one_epoch(state, it, steps=warmup)
    _sync(device)
    t1 = time.perf_counter()
    train_one_epoch(state, it, steps=steps)
    _sync(device)
    out = _rates(steps * cfg.data.batch_size, steps, time.perf_counter() - t1)
    out.update(warmup_s=round(t1 - t0, 2), peak_mem_gib=_peak_gib(device, held))
    if hasattr(batches, "close"):  # a stream: stop its Ray Data pipeline while Ray is still up
        batches.close()
    return out | {"_state": state}


def build_anchor(num_classes: int, device: torch.device):
    """torchvision's DeepLabV3-ResNet-50 (random init), channels_last, and its AdamW."""
    from torchvision.models.segmentation import deeplabv3_resnet50

    torch.manual_seed(0)
    model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=num_classes)
    model = model.to(device).to(memory_format=torch.channels_last)
    return model, torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)


def anchor_step(model, optimizer, batch: dict, device: torch.device) -> None:
    """One step of a plain torchvision-reference-style loop: normalise, forward, CE, backward, step."""
    from mtseg.models.multitask import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    images = ((batch["image"] - mean) / std).contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        out = model(images)["out"]
    loss = torch.nn.functional.cross_entropy(out.float(), batch["semantic"], ignore_index=255)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def train_anchor(num_classes: int, batches: list[dict], device: torch.device, *, warmup: int, steps: int) -> dict:
    held = _reset_peak(device)
    model, optimizer = build_anchor(num_classes, device)
    model.train()
    it = itertools.cycle(batches)
    t0 = time.perf_counter()
    for _ in range(warmup):
        anchor_step(model, optimizer, next(it), device)
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        anchor_step(model, optimizer, next(it), device)
    _sync(device)
    batch = int(batches[0]["image"].shape[0])
    out = _rates(steps * batch, steps, time.perf_counter() - t1)
    out.update(warmup_s=round(t1 - t0, 2), peak_mem_gib=_peak_gib(device, held))
    return out | {"_model": (model, optimizer)}


def count_flops(step) -> int:
    """FLOPs of one call of ``step`` (forward and backward), by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def stream_batches(cfg, categories, tasks, uri: str, images: int):
    """The training stream of one Ray Train worker (world size 1), over as many epochs as ``images`` needs."""
    from mtseg.data.manifest import read_manifest, shard_uris
    from mtseg.data.pipeline import SampleTransform, worker_batches
    from mtseg.train.data import plan_epoch

    manifest = read_manifest(uri, cfg.data.train_split)
    shards = list(zip(shard_uris(uri, cfg.data.train_split, manifest), (int(s["rows"]) for s in manifest["shards"])))
    per_epoch = sum(n for _, n in shards)
    # One dataset over several epochs' plans: no per-epoch pipeline start inside the timed steps.
    segments = [
        s for epoch in range(math.ceil(images / per_epoch)) for s in plan_epoch(shards, seed=0, epoch=epoch, world_size=1, rank=0)
    ]
    transform = SampleTransform.from_config(categories, cfg, tasks, train=True, epoch=0, seed=0)
    return worker_batches(
        segments,
        transform,
        batch_size=cfg.data.batch_size,
        drop_last=True,
        rows_per_task=cfg.data.rows_per_read_task,
        num_cpus=cfg.data.map_num_cpus,
    )


def save_checkpoint(directory: str, state) -> str:
    from mtseg.config import to_yaml
    from mtseg.train import checkpoint as ckpt

    ckpt.save(
        directory,
        {"model": state.module.state_dict()},
        {"step": state.step, "categories": state.categories.to_categories()},
        to_yaml(state.cfg),
    )
    return directory


def _goal(value: float | None, goal: float, smoke: bool) -> dict:
    met = None if smoke or value is None else value >= goal
    return {"value": None if value is None else round(value, 3), "goal": goal, "met": met}


def run(args: argparse.Namespace) -> dict:
    """Every phase that fits the budget; returns the figures (see the module docstring)."""
    start = time.monotonic()
    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    device = torch.device("cuda" if cuda and not args.smoke else "cpu")
    sizes = dict(SMOKE_SIZES if smoke else GPU_SIZES)
    for key in ("batch_size", "steps", "warmup", "image_size"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    phases = [p for p in (args.phases.split(",") if args.phases else PHASES) if p]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise SystemExit(f"--phases: unknown {', '.join(unknown)}; phases are {', '.join(PHASES)}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = bf16_peak_flops(name) if device.type == "cuda" else None
    figures: dict = {
        "benchmark": "gpu",
        "device": name,
        "smoke": smoke,
        "torch": torch.__version__,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "bf16_peak_tflops": None if peak is None else peak / 1e12,
        "model": "resnet50 + fpn256, tasks semantic/supercategory/boundary/instance/reconstruction, equal weighting",
        "anchor_model": "torchvision deeplabv3_resnet50 (semantic only, plain loop)",
        "amp": "bf16" if device.type == "cuda" else "off (CPU)",
        "channels_last": True,
        **{k: sizes[k] for k in ("image_size", "batch_size", "warmup", "steps")},
        "phases_s": {},
        "skipped": {},
        "errors": {},
    }
    work = tempfile.mkdtemp(prefix="mtseg-gpu-bench-")
    from mtseg.data.categories import CategoryIndex
    from mtseg.data.manifest import read_manifest
    from mtseg.data.pipeline import iter_local_batches
    from mtseg.tasks import build_tasks
    from mtseg.train.loop import to_device

    t = time.monotonic()
    uri = os.path.join(work, "shards")
    figures["data_profile"] = synthesize_data(
        work, train=sizes["train_images"], val=sizes["val_images"], size=sizes["image_size"], coco=not smoke
    )
    shard_data(work, uri, images_per_shard=64)
    cfg = build_config(uri, sizes)
    categories = CategoryIndex.from_categories(read_manifest(uri, "train2017")["categories"])
    tasks = build_tasks(cfg, categories)
    # Pre-built batches, on the device: the in-memory passes measure the model alone.
    local = iter_local_batches(uri, "train2017", categories, cfg, train=True, tasks=tasks, drop_last=True)
    resident = [to_device(b, device, channels_last=True) for b in itertools.islice(local, args.resident_batches)]
    figures["phases_s"]["setup"] = round(time.monotonic() - t, 1)
    warmup, steps, batch = sizes["warmup"], sizes["steps"], sizes["batch_size"]
    results: dict = {}

    def phase(key: str, fn) -> None:
        if key not in phases:
            return
        if key in NEEDS_RAY and importlib.util.find_spec("ray") is None:
            # The lent GPU machines' image has torch but no Ray, and Ray's wheel (79 MB) is over
            # what a run may carry (64 MiB): the model phases still run there.
            figures["skipped"][key] = "Ray is not installed on this machine"
            return
        left = args.budget_s - (time.monotonic() - start)
        if not smoke and left < PHASE_MIN_S[key]:
            figures["skipped"][key] = f"{left:.0f} s of the {args.budget_s} s budget left, the phase needs {PHASE_MIN_S[key]}"
            return
        t = time.monotonic()
        try:
            results[key] = fn()
        except Exception as e:  # noqa: BLE001 - on a GPU the other phases' figures are still worth having
            if smoke:
                raise
            figures["errors"][key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            traceback.print_exc()
        finally:
            figures["phases_s"][key] = round(time.monotonic() - t, 1)

    phase("in_memory", lambda: train_multitask(cfg, categories, itertools.cycle(resident), device, warmup=warmup, steps=steps))

    def flops() -> dict:
        from mtseg.train.loop import build_state, train_one_epoch

        state = results["in_memory"]["_state"] if "in_memory" in results else build_state(cfg, categories, 1, device)
        out = {"multitask": count_flops(lambda: train_one_epoch(state, iter(resident), steps=1))}
        model, optimizer = results["anchor"]["_model"] if "anchor" in results else build_anchor(categories.num_classes, device)
        out["anchor"] = count_flops(lambda: anchor_step(model, optimizer, resident[0], device))
        return out

    phase("anchor", lambda: train_anchor(categories.num_classes, resident, device, warmup=warmup, steps=steps))
    phase("flops", flops)

    def stream() -> dict:
        import ray

        from mtseg.cluster import init_local_ray

        init_local_ray(num_cpus=max(1, (os.cpu_count() or 2) - 1), log_to_driver=False)
        try:
            batches = stream_batches(cfg, categories, tasks, uri, (warmup + steps) * batch)
            out = train_multitask(cfg, categories, batches, device, warmup=warmup, steps=steps)
        finally:
            ray.shutdown()
        out.pop("_state")
        return out

    phase("stream", stream)
    if smoke and "compile" in phases and not args.compile_on_cpu:
        figures["skipped"]["compile"] = "smoke run: torch.compile on CPU takes minutes (--compile-on-cpu runs it)"
    else:
        phase(
            "compile",
            lambda: train_multitask(
                build_config(uri, sizes, compile=True), categories, itertools.cycle(resident), device, warmup=warmup, steps=steps
            ),
        )

    def evaluate() -> dict:
        import ray

        from mtseg.cluster import init_local_ray
        from mtseg.evaluate import evaluate_checkpoint

        state = results["in_memory"]["_state"] if "in_memory" in results else None
        if state is None:
            from mtseg.train.loop import build_state

            state = build_state(cfg, categories, 1, device)
        ckpt_dir = save_checkpoint(os.path.join(work, "checkpoint"), state)
        init_local_ray(num_cpus=max(2, (os.cpu_count() or 2) - 1), log_to_driver=False)
        try:
            t0 = time.monotonic()
            res = evaluate_checkpoint(
                ckpt_dir,
                uri,
                "val2017",
                out=os.path.join(work, "eval"),
                log=lambda *a: None,
                use_gpu="true" if device.type == "cuda" else "false",
                concurrency=1,
                batch_size=batch,
            )
            total = time.monotonic() - t0
        finally:
            ray.shutdown()
        return {
            "images": res.images,
            "device": res.setup["device"],
            "actors": res.setup["actors"],
            "img_per_s": res.timing["images_per_s"],
            "inference_s": res.timing["inference_s"],
            "metrics_s": res.timing["metrics_s"],
            "end_to_end_s": round(total, 2),
            "val_miou": res.metrics.get("val/miou"),
        }

    phase("evaluate", evaluate)

    mem = results.get("in_memory", {})
    figures["img_per_s"] = figures["in_memory_img_per_s"] = mem.get("img_per_s")
    figures["step_ms"] = mem.get("step_ms")
    figures["peak_mem_gib"] = mem.get("peak_mem_gib")
    anchor = results.get("anchor", {})
    figures["anchor_img_per_s"] = anchor.get("img_per_s")
    figures["anchor"] = {k: v for k, v in anchor.items() if not k.startswith("_")}
    figures["stream_img_per_s"] = results.get("stream", {}).get("img_per_s")
    figures["stream"] = results.get("stream")
    figures["compile"] = {
        "off": {k: v for k, v in mem.items() if not k.startswith("_")} or None,
        "on": {k: v for k, v in results.get("compile", {}).items() if not k.startswith("_")} or None,
    }
    fl = results.get("flops", {})
    figures["flops_per_step"] = fl or None
    figures["mfu"] = figures["anchor_mfu"] = None
    if peak and fl:
        if mem:
            figures["mfu"] = round(fl["multitask"] * mem["img_per_s"] / batch / peak, 4)
        if anchor:
            figures["anchor_mfu"] = round(fl["anchor"] * anchor["img_per_s"] / batch / peak, 4)
    figures["evaluate"] = results.get("evaluate")

    def ratio(a, b):
        return a / b if a is not None and b else None

    figures["goals"] = {
        "multitask_over_anchor": _goal(
            ratio(figures["img_per_s"], figures["anchor_img_per_s"]), GOALS["multitask_over_anchor"], smoke
        ),
        "mfu": _goal(figures["mfu"], GOALS["mfu"], smoke),
        "stream_over_in_memory": _goal(
            ratio(figures["stream_img_per_s"], figures["in_memory_img_per_s"]), GOALS["stream_over_in_memory"], smoke
        ),
    }
    figures["total_s"] = round(time.monotonic() - start, 1)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the CPU smoke run even where CUDA is present")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip the phases that no longer fit (GPU runs)")
    ap.add_argument("--phases", default="", help=f"comma-separated subset of {','.join(PHASES)} (default all)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--resident-batches", type=int, default=4, help="distinct pre-built batches the in-memory passes cycle")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads on CPU (one: no OpenMP barrier stalls on a shared machine)"
    )
    ap.add_argument("--compile-on-cpu", action="store_true", help="smoke run: run the torch.compile phase too")
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/gpu.json)")
    return ap.parse_args(argv)


def reference_path(device_name: str) -> str:
    """``benchmarks/reference/gpu-<device>.json``, the device name in lower case with dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference", f"gpu-{slug}.json")


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    args = parse_args(argv)
    figures = write_results(run(args), out=args.out)
    if not figures["smoke"] and args.out is None:
        with open(reference_path(figures["device"]), "w") as f:
            json.dump(figures, f, indent=1)
            f.write("\n")
    if figures["errors"]:
        raise SystemExit(1)
    return figures


if __name__ == "__main__":
    main()
