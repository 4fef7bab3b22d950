"""The training and evaluation loop, as library functions that run with or without Ray.

``train_fn_per_worker`` (mtseg/train/trainer.py) builds a :class:`TrainState` and calls
:func:`fit` on the worker's Ray Data stream; tests call it on plain iterables.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mtseg.config import Config
from mtseg.data.categories import CategoryIndex
from mtseg.fusion import (
    fuse_instances,
    fuse_panoptic,
    fuse_semantic,
    fused_predictions,
    has_instances,
    instances_to_coco,
)
from mtseg.models import build_model
from mtseg.tasks import build_tasks, compute_losses, model_inputs
from mtseg.train.optim import build_optimizer, build_scheduler
from mtseg.weighting import build_weighting, sync_buffers, sync_gradients


@dataclass
class TrainState:
    """Everything a checkpoint holds, plus the objects that own it.

    ``epoch`` is 0-based; ``step`` counts optimiser steps of the run; ``epoch_rows`` the images each
    worker has consumed this epoch (the same on every worker, so one integer locates the stream).
    """

    cfg: Config
    categories: CategoryIndex
    model: nn.Module
    tasks: dict
    strategy: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    total_steps: int
    epoch: int = 0
    step: int = 0
    epoch_rows: int = 0
    last_val: dict[str, float] = field(default_factory=dict)

    @property
    def module(self) -> nn.Module:
        """The bare model (unwrapped from torch.compile and DistributedDataParallel)."""
        model = getattr(self.model, "_orig_mod", self.model)
        return getattr(model, "module", model)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "weighting": self.strategy.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "epoch_rows": self.epoch_rows,
            # Where checkpoints have always kept it (the on-disk format is unchanged).
            "best": {"last_val": dict(self.last_val)},
            "rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.strategy.load_state_dict(state["weighting"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.epoch_rows = int(state["epoch_rows"])
        last_val = state.get("best", {}).get("last_val", {})
        self.last_val = dict(last_val) if isinstance(last_val, dict) else {}
        if "rng" in state:
            torch.set_rng_state(state["rng"])

    def meta(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "epoch_rows": self.epoch_rows}


def build_state(
    cfg: Config,
    categories: CategoryIndex,
    total_steps: int,
    device: torch.device,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
) -> TrainState:
    """Model, tasks, weighting strategy, optimiser and schedule for a run.

    Args:
        wrap_model: e.g. ``ray.train.torch.prepare_model`` (moves to device, wraps in DDP).
    """
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, categories)
    if cfg.model.sync_batchnorm and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if wrap_model is not None:
        model = wrap_model(model)
    if cfg.train.compile:
        # After DDP, so that compile splits the graph at DDP's gradient buckets (DDPOptimizer).
        model = torch.compile(model)
    tasks = build_tasks(cfg, categories)
    strategy = build_weighting(cfg.weighting, list(tasks)).to(device)
    optimizer = build_optimizer(_trainable(model, strategy), cfg.train)
    scheduler = build_scheduler(optimizer, total_steps, cfg.train)
    return TrainState(cfg, categories, model, tasks, strategy, optimizer, scheduler, device, total_steps)


def _trainable(*modules: nn.Module) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _grad_sync(model: nn.Module, ddp_averages: bool, last_micro_batch: bool):
    """DDP's all-reduce on the last micro-batch of a single-pass backward (``ddp_averages``);
    otherwise none, and :func:`sync_gradients` averages after backward (see :mod:`mtseg.weighting.base`)."""
    if not hasattr(model, "no_sync") or (ddp_averages and last_micro_batch):
        return contextlib.nullcontext()
    return model.no_sync()


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool = False) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and v.ndim == 4 and k == "image":
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def train_one_epoch(
    state: TrainState,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    steps: int,
    on_step: Callable[[TrainState, dict[str, float], list[int]], None] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Run ``steps`` optimiser steps over ``batches`` (``train.grad_accum`` batches per step).

    Args:
        batches: this worker's training batches, already positioned at ``state.epoch_rows``.
        steps: optimiser steps to take in this (rest of the) epoch; every worker takes the same.
        on_step: called after each optimiser step with (state, metrics, image ids of the step).

    Returns:
        Mean loss per task over the steps taken.
    """
    cfg = state.cfg
    state.model.train()
    accum = cfg.train.grad_accum
    shared = list(state.module.shared_parameters())
    all_params = _trainable(state.model, state.strategy)
    buffers = list(state.model.buffers()) + list(state.strategy.buffers())
    # DDP averages the model's gradients during a single-pass backward; what it does not
    # reach (the strategy's own parameters) is averaged after it.
    ddp_averages = state.strategy.single_backward and hasattr(state.model, "no_sync")
    to_sync = _trainable(state.strategy) if ddp_averages else all_params
    sums: dict[str, float] = {}
    it: Iterator = iter(batches)
    for _ in range(steps):
        t0 = time.perf_counter()
        step_losses: dict[str, float] = {}
        weights: dict[str, float] = {}
        ids: list[int] = []
        images = 0
        state.optimizer.zero_grad(set_to_none=True)
        for micro in range(accum):
            batch = to_device(next(it), state.device, cfg.model.channels_last)
            ids.extend(int(i) for i in batch["image_id"].tolist())
            images += int(batch["image"].shape[0])
            with _grad_sync(state.model, ddp_averages, micro == accum - 1):
                with _autocast(state.device, cfg.train.amp):
                    inputs = model_inputs(batch, state.tasks, cfg, train=True, generator=generator)
                    extra = {}
                    if state.strategy.uses_representation:
                        outputs, extra["representation"] = state.model(inputs, representation=True)
                    else:
                        outputs = state.model(inputs)
                    losses = compute_losses(state.tasks, {k: v.float() for k, v in outputs.items()}, batch)
                weights = state.strategy.backward(losses, shared, **extra)
            for name, value in losses.items():
                step_losses[name] = step_losses.get(name, 0.0) + float(value.detach()) / accum
        if accum > 1:
            for p in all_params:
                if p.grad is not None:
                    p.grad.div_(accum)
        sync_gradients(to_sync)
        grad_norm = 0.0
        if cfg.train.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(all_params, cfg.train.grad_clip))
        state.optimizer.step()
        state.scheduler.step()
        # Every rank leaves the step with rank 0's buffers (BatchNorm statistics included).
        sync_buffers(buffers)
        state.step += 1
        state.epoch_rows += images
        for name, value in step_losses.items():
            sums[name] = sums.get(name, 0.0) + value
        if on_step is not None:
            dt = max(time.perf_counter() - t0, 1e-9)
            metrics = {f"train/loss/{k}": v for k, v in step_losses.items()}
            metrics.update({f"train/weight/{k}": float(w) for k, w in weights.items()})
            metrics["train/loss"] = sum(step_losses.values())
            metrics["train/lr"] = state.optimizer.param_groups[0]["lr"]
            metrics["train/img_per_s"] = images / dt
            metrics["train/grad_norm"] = grad_norm
            on_step(state, metrics, ids)
    return {k: v / max(1, steps) for k, v in sums.items()}


@torch.no_grad()
def predict_batch(model: nn.Module, batch: dict[str, torch.Tensor], tasks: dict, cfg: Config, categories: CategoryIndex):
    """Forward + fusion for one batch: (outputs, semantic map, per-image instances)."""
    inputs = model_inputs(batch, tasks, cfg, train=False)
    outputs = {k: v.float() for k, v in model(inputs).items()}
    semantic = fuse_semantic(outputs, categories, hierarchical=cfg.tasks.hierarchical)
    instances = fuse_instances(outputs, semantic, categories) if has_instances(outputs) else None
    return outputs, semantic, instances


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    tasks: dict,
    cfg: Config,
    categories: CategoryIndex,
    evaluator,
    device: torch.device,
    on_panoptic: Callable[[int, np.ndarray, list[dict]], None] | None = None,
) -> None:
    """Feed this worker's validation batches to ``evaluator`` (a metrics.Evaluator); training
    validation and ``mtseg evaluate`` share it.

    ``on_panoptic(image_id, id_map, segments_info)`` receives each image's panoptic
    segmentation (a panoptic label space and an instance head), e.g. to export it.
    """
    model.eval()
    for batch in batches:
        batch = to_device(batch, device, cfg.model.channels_last)
        with _autocast(device, cfg.train.amp):
            outputs, semantic, instances = predict_batch(model, batch, tasks, cfg, categories)
        results = panoptic = None
        if instances is not None:
            results, panoptic = [], [] if categories.panoptic else None
            for i, inst in enumerate(instances):
                h, w = (int(x) for x in batch["orig_size"][i].tolist())
                results.extend(instances_to_coco(inst, int(batch["image_id"][i]), categories, orig_size=(h, w)))
                if panoptic is not None:
                    panoptic.append(
                        fuse_panoptic(semantic[i], inst, categories, min_area=cfg.tasks.panoptic_min_area, orig_size=(h, w))
                    )
                    if on_panoptic is not None:
                        on_panoptic(int(batch["image_id"][i]), *panoptic[-1])
        evaluator.process(batch, outputs, fused_predictions(semantic), results, panoptic=panoptic)


def validate(state: TrainState, batches: Iterable[dict[str, torch.Tensor]], evaluator) -> dict[str, float]:
    """Evaluate this worker's validation batches, merge ``evaluator`` across workers, compute.

    Returns:
        The numeric metrics (``val/miou``, ...) as floats, the same on every worker.
    """
    evaluate(state.model, batches, state.tasks, state.cfg, state.categories, evaluator, state.device)
    evaluator.all_reduce()
    return {k: float(v) for k, v in evaluator.compute().items() if isinstance(v, (int, float))}


def fit(
    state: TrainState,
    *,
    steps_per_epoch: int,
    train_batches: Callable[[int, int], Iterable[dict[str, torch.Tensor]]],
    validate: Callable[[], dict[str, float]],
    report: Callable[[dict[str, float]], None],
    on_step: Callable[[TrainState, dict[str, float], list[int]], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
    log: Callable[[str], None] = print,
) -> None:
    """Train from where ``state`` stands to the end of ``train.epochs``.

    Every ``train.val_every_epochs`` epochs and after the last: validate into ``state.last_val``,
    count the epoch, then ``report`` (the caller checkpoints there, so a checkpoint's metrics are
    its own model's).

    Args:
        steps_per_epoch: optimiser steps of a full epoch (every worker takes the same).
        train_batches: ``(epoch, start_rows)`` -> this worker's batches from that position.
        validate: runs validation and returns the merged metrics (see :func:`validate`).
        report: called after each validation with its metrics.
        on_step: passed to :func:`train_one_epoch`.
        rank, world_size: seed each worker's step-dependent randomness (masking, ...).
    """
    cfg = state.cfg
    rows_per_step = cfg.data.batch_size * cfg.train.grad_accum
    while state.epoch < cfg.train.epochs:
        done = state.epoch_rows // rows_per_step
        if done < steps_per_epoch:
            batches = train_batches(state.epoch, state.epoch_rows)
            generator = torch.Generator().manual_seed(cfg.train.seed * 1000003 + state.step * world_size + rank)
            train_one_epoch(state, batches, steps=steps_per_epoch - done, on_step=on_step, generator=generator)
        state.strategy.on_epoch_end()
        if (state.epoch + 1) % cfg.train.val_every_epochs and state.epoch + 1 < cfg.train.epochs:
            state.epoch += 1
            state.epoch_rows = 0
            continue
        state.last_val = validate()
        log("[val] epoch {}: {}".format(state.epoch + 1, "  ".join(f"{k}={v:.4f}" for k, v in sorted(state.last_val.items()))))
        state.epoch += 1
        state.epoch_rows = 0
        report(dict(state.last_val))
