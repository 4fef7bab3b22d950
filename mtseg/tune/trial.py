"""One trial: a Ray Train run of the trial's config, one Tune result per epoch end.

PBT's exploit starts a trial from a donor's checkpoint, rebased to the trial's mutated
hyperparameters (:func:`rebase_checkpoint`).
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

from mtseg import storage
from mtseg.config import Config, to_yaml
from mtseg.tune.objective import DELTA_M, delta_m
from mtseg.tune.space import SearchError, trial_config

# The trial function only waits on its Train run; the Train workers hold the CPUs. Tune
# cannot reserve zero resources for a trial, so it reserves a sliver.
TRIAL_DRIVER_CPUS = 0.01


def rebase_checkpoint(src_dir: str, dst_dir: str, cfg: Config) -> dict[str, Any]:
    """Copy a local checkpoint ``src_dir`` to ``dst_dir`` with ``cfg``'s (PBT-mutated) learning rate,
    weight decay, momentum and static task weights; loading the donor's as is would undo the
    mutation. Returns the checkpoint's meta."""
    import torch

    from mtseg.train import checkpoint as ckpt
    from mtseg.weighting import build_weighting

    state, meta = ckpt.load(src_dir)
    t = cfg.train
    groups = state["optimizer"]["param_groups"]
    for g in groups:
        old = float(g.get("initial_lr", 0.0))
        # The group's current LR is base x schedule factor: keep the factor, swap the base.
        g["lr"] = g["lr"] * t.lr / old if old > 0 else t.lr
        g["initial_lr"] = t.lr
        g["weight_decay"] = t.weight_decay
        if "momentum" in g:
            g["momentum"] = t.momentum
    sched = state["scheduler"]
    sched["base_lrs"] = [t.lr] * len(groups)
    sched["_last_lr"] = [g["lr"] for g in groups]
    if cfg.weighting.name == "static":
        # Static weights are config, held in a buffer so they travel with a checkpoint.
        fresh = build_weighting(cfg.weighting, list(cfg.tasks.names)).state_dict()
        state["weighting"]["weights"] = torch.as_tensor(fresh["weights"]).clone()
    keep = {k: v for k, v in meta.items() if k not in ("format", "state_sha256", "state_bytes")}
    ckpt.save(dst_dir, state, keep, to_yaml(cfg))
    return keep


def _upload_dir(local_dir: str, uri: str) -> None:
    from mtseg.train import checkpoint as ckpt

    # meta.json last: its hash of state.pt is what makes the upload complete.
    names = sorted(os.listdir(local_dir), key=lambda n: n == ckpt.META_FILE)
    for name in names:
        with open(os.path.join(local_dir, name), "rb") as f:
            storage.write_bytes(storage.join(uri, name), f.read())


# ---------------------------------------------------------------------------- the trial


@dataclass
class TrialSpec:
    """What every trial of one search shares (shipped once through the object store): the base
    config (storage paths absolute), where Train runs and PBT start checkpoints go, the Δm%
    baselines, and the task classes to register in each trial's process."""

    base: dict
    runs_uri: str
    init_uri: str
    baselines: dict = field(default_factory=dict)
    tasks: tuple = ()

    def config(self, values: dict) -> Config:
        """The trial's config: the base with the trial's sampled ``values``."""
        from mtseg.tasks import register

        for task in self.tasks:
            register(task)
        return trial_config(self.base, values)


def _epoch_end_forwarder(queue):
    """A Train callback (in the Train controller) that hands the trial its epoch ends, and first
    the controller's handle, so the trial can abort the run."""
    from ray.train import UserCallback

    class EpochEndForwarder(UserCallback):
        def __init__(self, q):
            self.queue = q
            self.introduced = False

        def after_report(self, run_context, metrics, checkpoint):
            import ray

            if not self.introduced:
                self.queue.put({"controller": ray.get_runtime_context().current_actor})
                self.introduced = True
            m = dict(metrics[0]) if metrics else {}
            if "train/loss" not in m:  # an epoch end: step reports carry train/loss, epoch ends val/*
                # Blocks while the trial has not taken the previous epoch (a queue of one).
                self.queue.put({"metrics": m, "checkpoint": checkpoint.path if checkpoint else None})

    return EpochEndForwarder(queue)


def trial_metrics(train_metrics: dict, cfg: Config, baselines: dict) -> dict[str, Any]:
    """What a trial reports to Tune for one epoch end: Train's metrics plus ``val/delta_m``."""
    out = {k: v for k, v in train_metrics.items() if isinstance(v, (int, float, str, bool))}
    if baselines:
        out[DELTA_M] = delta_m(out, baselines, cfg.tasks.names)
    return out


def start_from_checkpoint(checkpoint_dir: str, cfg: Config, spec: TrialSpec, trial_id: str) -> tuple[str, str]:
    """Prepare a trial start from a Tune checkpoint (PBT exploit or pause, a resumed PBT search).

    The trial starts a *new* Train run named after the checkpoint (its own run's newer
    checkpoints must not win) from a rebased copy in storage; a resumed search, started from
    the same checkpoint again, resumes that run.

    Returns:
        (run name, init checkpoint URI) for ``build_trainer``.
    """
    from mtseg.train import checkpoint as ckpt

    meta = ckpt.verify(checkpoint_dir)
    run_name = f"{trial_id}-{meta['state_sha256'][:8]}"
    init = storage.join(spec.init_uri, run_name)
    with tempfile.TemporaryDirectory() as dst:
        rebase_checkpoint(checkpoint_dir, dst, cfg)
        _upload_dir(dst, init)
    print(
        f"[tune] trial {trial_id}: run {run_name} starts from a checkpoint at epoch {meta.get('epoch')}, step {meta.get('step')}"
    )
    return run_name, init


@functools.cache
def trial_class():
    """The Ray Tune ``Trainable`` of one trial (built on first use: importing Ray is slow).

    A class, for its ``cleanup`` hook: when Tune stops or pauses a trial it aborts the Train run,
    freeing its placement group (otherwise only Train's cleaner, which needs the dashboard, does).
    """
    import ray
    from ray import tune
    from ray.exceptions import GetTimeoutError, RayError
    from ray.util.queue import Empty, Queue

    class MTSegTrial(tune.Trainable):
        """``step`` starts ``run_training`` in a thread, then returns each forwarded epoch end;
        ``save_checkpoint``/``load_checkpoint`` copy a Train checkpoint out for PBT and start from one."""

        def setup(self, config: dict, spec: TrialSpec):
            self.spec = spec
            self.cfg = spec.config(config)
            self.run_name, self.init = self.trial_id, ""
            self.queue = None
            self.thread: threading.Thread | None = None
            self.controller = None
            self.outcome: dict[str, Any] = {}
            self.last: dict[str, Any] = {}

        def load_checkpoint(self, checkpoint_dir: str):
            self.run_name, self.init = start_from_checkpoint(checkpoint_dir, self.cfg, self.spec, self.trial_id)

        def _start(self) -> None:
            from mtseg.train.trainer import run_training

            cfg = self.cfg
            cfg.train.run_name = self.run_name
            cfg.train.storage_path = self.spec.runs_uri
            self.queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
            callbacks = [_epoch_end_forwarder(self.queue)]

            def fit() -> None:
                try:  # the run's lease and outcome, as for `mtseg train`
                    self.outcome["result"] = run_training(cfg, callbacks=callbacks, init_checkpoint=self.init)
                except BaseException as e:  # noqa: BLE001 - raised in step()
                    self.outcome["error"] = e

            self.thread = threading.Thread(target=fit, name=f"fit-{self.run_name}", daemon=True)
            self.thread.start()

        def _next_item(self) -> dict | None:
            while True:
                try:
                    item = self.queue.get(timeout=1.0)
                except Empty:
                    if not self.thread.is_alive() and self.queue.empty():
                        return None
                    continue
                if "controller" in item:
                    self.controller = item["controller"]
                    continue
                return item

        def step(self) -> dict:
            if self.thread is None:
                self._start()
            item = self._next_item()
            if item is None:  # the run ended without another epoch end
                self.thread.join()
                if "error" in self.outcome:
                    raise self.outcome["error"]
                result = self.outcome["result"]
                if result.error:
                    raise SearchError(f"trial {self.trial_id}: training failed: {result.error}")
                return {**self.last, "done": True}
            metrics = trial_metrics(item["metrics"], self.cfg, self.spec.baselines)
            metrics["run_name"] = self.run_name
            if item["checkpoint"]:  # Ray reports an S3 path without its scheme
                path = item["checkpoint"]
                metrics["checkpoint_uri"] = "s3://" + path.lstrip("/") if storage.is_s3(self.spec.runs_uri) else path
            self.last = metrics
            if metrics.get("train/epoch", 0) >= self.cfg.train.epochs:
                metrics = {**metrics, "done": True}
            return metrics

        def save_checkpoint(self, checkpoint_dir: str):
            from mtseg.train import checkpoint as ckpt

            uri = self.last.get("checkpoint_uri")
            if not uri:
                raise SearchError(f"trial {self.trial_id}: no epoch-end checkpoint to save yet")
            ckpt.download(uri, checkpoint_dir)
            return checkpoint_dir

        def cleanup(self):
            if self.thread is None or not self.thread.is_alive():
                return
            if self.last.get("train/epoch", 0) >= self.cfg.train.epochs:
                self.thread.join(timeout=60)  # finished: fit() is returning
            if self.thread.is_alive() and self.controller is not None:
                try:
                    ray.get(self.controller.abort.remote(), timeout=60)
                except (RayError, GetTimeoutError):
                    pass  # the controller exits as it answers
                self.thread.join(timeout=30)

    return MTSegTrial
