"""Distributed training on Ray Train (V2): ``TorchTrainer`` + a thin ``train_fn_per_worker``.

``mtseg train --config jobs/configs/demo.yaml [key=value ...]`` (or ``jobs/train.py`` through the
Ray Jobs API) runs :func:`run_training`. Each worker streams its slice of a deterministic epoch
plan (mtseg/train/data.py) from the checkpointed position and runs :func:`mtseg.train.loop.fit`
(which runs without Ray). Checkpoints go through ``ray.train.report`` every
``train.checkpoint_every_steps`` and at each validation; Ray Train keeps the best
``train.keep_checkpoints`` by ``val/miou`` and restores the latest after a failure or when the
same run name starts again.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from typing import Any

import torch

from mtseg import storage
from mtseg.config import Config, ConfigError, config_from_dict, save_config, to_yaml
from mtseg.data.categories import CategoryIndex
from mtseg.data.manifest import read_manifest, shard_uris
from mtseg.data.pipeline import SampleTransform, worker_batches
from mtseg.models.backbones import ensure_weights
from mtseg.tasks import build_tasks, task_classes
from mtseg.train import checkpoint as ckpt
from mtseg.train.data import plan_epoch, steps_per_epoch
from mtseg.train.loop import TrainState, build_state, fit, validate
from mtseg.train.runstate import LEASE_FILE, OUTCOME_FILE, check_free, check_is_run, describe_exit, guard_run

VAL_METRIC = "val/miou"


def run_uri(cfg: Config) -> str:
    """Where a run's checkpoints and results live: ``<storage_path>/<run_name>``."""
    return storage.join(cfg.train.storage_path, cfg.train.run_name)


def local_run_dir(cfg: Config) -> str:
    """A local directory for the run's TensorBoard events and reports (the run dir itself when local)."""
    if storage.is_s3(cfg.train.storage_path):
        return os.path.abspath(os.path.join("runs", cfg.train.run_name))
    return os.path.abspath(run_uri(cfg))


class DataPlan:
    """The training and validation splits as this worker sees them."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.train_manifest = read_manifest(cfg.data.uri, cfg.data.train_split)
        self.val_manifest = read_manifest(cfg.data.uri, cfg.data.val_split)
        self.categories = CategoryIndex.from_categories(self.train_manifest["categories"])
        # The stream's own task objects (they travel to the Ray Data workers and build the targets).
        self.tasks = build_tasks(cfg, self.categories)
        self.train_shards = _shards(cfg.data.uri, cfg.data.train_split, self.train_manifest)
        self.val_shards = _shards(cfg.data.uri, cfg.data.val_split, self.val_manifest)
        if cfg.train.val_max_images:
            self.val_shards = _truncate(self.val_shards, cfg.train.val_max_images)
        self.train_images = sum(n for _, n in self.train_shards)

    def steps_per_epoch(self, world_size: int) -> int:
        return steps_per_epoch(self.train_images, world_size, self.cfg.data.batch_size, self.cfg.train.grad_accum)

    def train_batches(self, epoch: int, start: int, world_size: int, rank: int):
        cfg = self.cfg
        segments = plan_epoch(self.train_shards, seed=cfg.train.seed, epoch=epoch, world_size=world_size, rank=rank, start=start)
        transform = SampleTransform.from_config(self.categories, cfg, self.tasks, train=True, epoch=epoch, seed=cfg.train.seed)
        return self._batches(segments, transform, drop_last=True)

    def val_batches(self, world_size: int, rank: int):
        cfg = self.cfg
        segments = plan_epoch(
            self.val_shards, seed=0, epoch=0, world_size=world_size, rank=rank, shuffle=False, drop_remainder=False
        )
        transform = SampleTransform.from_config(self.categories, cfg, self.tasks, train=False)
        return self._batches(segments, transform, drop_last=False)

    def _batches(self, segments, transform, *, drop_last: bool):
        data = self.cfg.data
        return worker_batches(
            segments,
            transform,
            batch_size=data.batch_size,
            drop_last=drop_last,
            rows_per_task=data.rows_per_read_task,
            num_cpus=data.map_num_cpus,
        )

    @functools.cached_property
    def coco_gt(self):
        """COCO ground truth of the validation images, from the shards' annotations (no images read)."""
        import pyarrow.parquet as pq

        from mtseg.metrics import coco_gt_from_rows

        rows = []
        for uri, n in self.val_shards:
            fs, path = storage.resolve(uri)
            table = pq.read_table(path, filesystem=fs, columns=["image_id", "height", "width", "annotations"])
            rows.extend(table.slice(0, n).to_pylist())
        return coco_gt_from_rows(rows, self.val_manifest["categories"])


def _shards(uri: str, split: str, manifest: dict) -> list[tuple[str, int]]:
    return list(zip(shard_uris(uri, split, manifest), (int(s["rows"]) for s in manifest["shards"])))


def _truncate(shards: list[tuple[str, int]], limit: int) -> list[tuple[str, int]]:
    out, left = [], limit
    for path, n in shards:
        if left <= 0:
            break
        out.append((path, min(n, left)))
        left -= n
    return out


# ---------------------------------------------------------------------------- worker side


def _all_reduce_mean(values: dict[str, float], device) -> dict[str, float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _restore(state: TrainState, run: str, log, init_checkpoint: str = "") -> bool:
    """Load Ray's latest checkpoint, else the run's newest complete one in storage, else
    ``init_checkpoint`` (another run's, e.g. the trial PBT exploits); False when there is none."""
    import ray.train

    def resume(where: str, shown: str) -> bool:
        loaded, meta = ckpt.load(where)
        state.load_state_dict(loaded)
        log(f"[train] resumed from {shown} (epoch {meta['epoch']}, step {meta['step']})")
        return True

    reported = ray.train.get_checkpoint()
    if reported is not None:
        with reported.as_directory() as d:
            try:
                return resume(d, reported.path)
            except ckpt.CheckpointError as e:
                log(f"[train] latest reported checkpoint is unusable: {e}")
    found = ckpt.latest_valid(run, log=log)
    uri = found[0] if found is not None else init_checkpoint
    return bool(uri) and resume(uri, uri)


def _supersede_id_log(path: str, step: int, restarts_path: str) -> None:
    """On a resume from ``step``: the steps logged after it were rolled back, and are redone.

    They leave ``path`` (so the log holds each image once per completed epoch) and go, with
    the step resumed from, as one line to ``restarts_path``: a restart is never silent.
    """
    kept, superseded = [], []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # the line a killed process was writing
                    continue
                if record["step"] <= step:
                    kept.append(line)
                else:
                    superseded.append(record)
    with open(restarts_path, "a") as f:
        f.write(json.dumps({"resumed_from_step": step, "superseded": superseded}) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class _Reporter:
    """Ray Train reports (every rank; checkpoints from rank 0), TensorBoard (rank 0), image ids."""

    def __init__(
        self,
        state: TrainState,
        cfg: Config,
        plan: DataPlan,
        *,
        rank: int,
        per_epoch: int,
        total_steps: int,
        local_dir: str,
        restored: bool,
    ):
        self.state, self.cfg, self.rank = state, cfg, rank
        self.per_epoch, self.total_steps = per_epoch, total_steps
        self.config_yaml = to_yaml(cfg)
        self.categories = plan.categories.to_categories()  # the label space travels with every checkpoint
        self.writer = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run replaces what was logged after its checkpoint (step S), and keeps S itself.
            self.writer = SummaryWriter(os.path.join(local_dir, "tensorboard"), purge_step=state.step + 1 if restored else None)
        self.id_log = None
        if cfg.train.log_image_ids:
            log_dir = os.path.join(local_dir, "image_ids")
            os.makedirs(log_dir, exist_ok=True)
            path = os.path.join(log_dir, f"rank{rank}.jsonl")
            if restored:
                _supersede_id_log(path, state.step, os.path.join(log_dir, f"restarts-rank{rank}.jsonl"))
            # A run that starts from step 0 starts its audit log afresh; a resumed one appends.
            self.id_log = open(path, "a" if restored else "w")

    def report(self, metrics: dict[str, float], with_checkpoint: bool = True) -> None:
        """``ray.train.report`` the metrics with the counters (and, from rank 0, a checkpoint)."""
        import ray.train
        from ray.train import Checkpoint

        state = self.state
        metrics = {
            **metrics,
            "train/epoch": state.epoch,
            "train/step": state.step,
            "train/total_steps": self.total_steps,
            "train/epoch_rows": state.epoch_rows,
        }
        metrics.setdefault(VAL_METRIC, state.last_val.get(VAL_METRIC, 0.0))
        if not with_checkpoint or self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            ckpt.save(
                d, state.state_dict(), {**state.meta(), "metrics": metrics, "categories": self.categories}, self.config_yaml
            )
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))

    def scalars(self, metrics: dict[str, float], step: int, *, flush: bool = False) -> None:
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
            if flush:
                self.writer.flush()

    def on_step(self, st: TrainState, metrics: dict[str, float], ids: list[int]) -> None:
        """After each optimiser step: the id log; every ``log_every_steps`` a report; a mid-epoch checkpoint."""
        cfg = self.cfg
        if self.id_log is not None:
            self.id_log.write(json.dumps({"epoch": st.epoch, "step": st.step, "ids": ids}) + "\n")
            self.id_log.flush()
        every = cfg.train.checkpoint_every_steps
        rows_per_step = cfg.data.batch_size * cfg.train.grad_accum
        at_checkpoint = bool(every) and st.step % every == 0 and st.epoch_rows < self.per_epoch * rows_per_step
        if st.step % cfg.train.log_every_steps == 0 or at_checkpoint:
            metrics = _all_reduce_mean(metrics, st.device)
            # At a checkpoint what came before must be on disk: a run resumed from it purges
            # the events after it, and a killed driver would leave a gap (the writer otherwise
            # flushes every 120 s).
            self.scalars(metrics, st.step, flush=at_checkpoint)
            self.report(metrics, with_checkpoint=at_checkpoint)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.id_log is not None:
            self.id_log.close()


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point: build the state, resume it, :func:`~mtseg.train.loop.fit`."""
    import ray.train
    import ray.train.torch

    from mtseg.compat import quiet_train_report_log
    from mtseg.fusion import has_instances
    from mtseg.metrics import Evaluator
    from mtseg.tasks import register

    for task in config.get("tasks", ()):  # tasks registered in the driver, e.g. in a user's script
        register(task)
    cfg = config_from_dict(config["cfg"])
    quiet_train_report_log(cfg.train.ray_log_level)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.set_num_threads(max(1, int(round(cfg.train.cpus_per_worker))))
    device = ray.train.torch.get_device()

    plan = DataPlan(cfg)
    per_epoch = plan.steps_per_epoch(world)
    if per_epoch < 1:
        raise ValueError(
            f"data.batch_size: {cfg.data.batch_size} x {world} workers exceeds the {plan.train_images} training images"
        )
    total_steps = per_epoch * cfg.train.epochs
    state = build_state(cfg, plan.categories, total_steps, device, wrap_model=ray.train.torch.prepare_model)
    restored = _restore(state, run_uri(cfg), log, config.get("init_checkpoint", ""))
    # Chosen on the driver: a worker's working directory is Ray's, not the user's.
    reporter = _Reporter(
        state,
        cfg,
        plan,
        rank=rank,
        per_epoch=per_epoch,
        total_steps=total_steps,
        local_dir=config.get("local_dir") or local_run_dir(cfg),
        restored=restored,
    )

    def validate_epoch() -> dict[str, float]:
        # Every worker evaluates its part; the accumulators merge across workers.
        evaluator = Evaluator(plan.categories, state.tasks, coco_gt=plan.coco_gt if has_instances(cfg.tasks.names) else None)
        val = validate(state, plan.val_batches(world, rank), evaluator)
        reporter.scalars(val, state.step, flush=True)
        return val

    fit(
        state,
        steps_per_epoch=per_epoch,
        train_batches=lambda epoch, start: plan.train_batches(epoch, start, world, rank),
        validate=validate_epoch,
        report=reporter.report,
        on_step=reporter.on_step,
        rank=rank,
        world_size=world,
        log=log,
    )
    reporter.close()


# ---------------------------------------------------------------------------- driver side


def _progress_callback():
    from ray.train import UserCallback

    class Progress(UserCallback):
        """Prints one progress line per report on the driver: epoch, step, loss, img/s, ETA."""

        t0: float | None = None
        step0 = 0

        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0] if metrics else {}
            step, total = int(m.get("train/step", 0)), int(m.get("train/total_steps", 0)) or 1
            if self.t0 is None:
                self.t0, self.step0 = time.monotonic(), step
            rate = (step - self.step0) / max(time.monotonic() - self.t0, 1e-6)
            eta = (total - step) / rate if rate > 0 else float("nan")
            parts = [f"epoch {int(m.get('train/epoch', 0)) + ('train/loss' in m)}", f"step {step}/{total}"]
            if "train/loss" in m:
                parts += [f"loss {m['train/loss']:.4f}", f"{m.get('train/img_per_s', 0.0):.1f} img/s/worker"]
            else:
                parts.append(f"val/miou {m.get(VAL_METRIC, 0.0):.4f}")
            if eta == eta:
                parts.append(f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")
            if checkpoint is not None:
                parts.append(f"checkpoint {os.path.basename(checkpoint.path)}")
            print("[train] " + "  ".join(parts), flush=True)

    return Progress()


def preflight(cfg: Config) -> DataPlan:
    """Everything that can fail before a worker starts: storage reachable, dataset readable, run not in use."""
    storage.check_access(cfg.train.storage_path)
    storage.check_access(cfg.data.uri)
    # ImageNet weights: found in (or, with internet, fetched into) torch's cache here, once, so
    # that a missing file is one line now and not a worker failure after Ray has started.
    ensure_weights(cfg.model.backbone, cfg.model.weights, download=True)
    check_free(run_uri(cfg))
    plan = DataPlan(cfg)
    if plan.steps_per_epoch(cfg.train.num_workers) < 1:
        raise ValueError(
            f"data.batch_size: {cfg.data.batch_size} x {cfg.train.num_workers} workers x train.grad_accum "
            f"{cfg.train.grad_accum} exceeds the {plan.train_images} training images"
        )
    return plan


def build_trainer(cfg: Config, *, callbacks: list | None = None, init_checkpoint: str = ""):
    """The ``TorchTrainer`` for ``cfg``: scaling, storage, failures, checkpoint policy.

    Args:
        callbacks: Ray Train callbacks, after the driver's progress printer.
        init_checkpoint: checkpoint directory URI to start from when the run has none of its own.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mtseg.cluster import quiet_progress_bars_unless_tty

    # Before the TorchTrainer exists: it hands this process's DataContext to its workers.
    quiet_progress_bars_unless_tty()
    fs, path = storage.ray_storage(cfg.train.storage_path)
    use_gpu = cfg.train.use_gpu == "true" or (cfg.train.use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    if cfg.model.sync_batchnorm and not use_gpu and cfg.train.num_workers > 1:
        # torch's SyncBatchNorm runs on CUDA only; on CPU workers the broadcast of rank 0's
        # buffers after each step (always on) is what keeps replicas identical.
        raise ConfigError("model.sync_batchnorm: SyncBatchNorm needs GPU workers (train.use_gpu); the cluster has none")
    resources = {"CPU": cfg.train.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "local_dir": local_run_dir(cfg),
            "init_checkpoint": init_checkpoint,
            "tasks": task_classes(),
        },
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.train.run_name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=VAL_METRIC,
                checkpoint_score_order="max",
            ),
            callbacks=[_progress_callback(), *(callbacks or [])],
            # Train logs every report at INFO; the progress callback already says what matters.
            logging_config=LoggingConfig(log_level=cfg.train.ray_log_level),
        ),
    )


def run_training(cfg: Config, *, restart: bool = False, log=print, callbacks: list | None = None, init_checkpoint: str = ""):
    """Train ``cfg`` on the connected Ray cluster, holding the run's lease (:mod:`mtseg.train.runstate`).

    A run name with checkpoints in ``storage_path`` resumes; ``restart=True`` deletes them first.
    A run that ends well keeps only the checkpoints ``train.keep_checkpoints`` says.

    Args:
        callbacks, init_checkpoint: passed to :func:`build_trainer`.

    Returns:
        The ``ray.train.Result`` (metrics of the last report, best checkpoints).

    Raises:
        RunLockedError: another live driver holds the run.
        NotARunError: the run name names a folder that holds no mtseg run.
    """
    preflight(cfg)
    run = run_uri(cfg)
    check_is_run(run)
    with guard_run(run, log=log) as lease:
        if restart:
            clear_run(cfg, log=log)
        elif ckpt.list_checkpoints(run):
            log(f"[train] run {cfg.train.run_name!r} has checkpoints in {run}: resuming it (pass --restart to start over)")
        save_config(cfg, storage.join(run, "config.yaml"))
        result = build_trainer(cfg, callbacks=callbacks, init_checkpoint=init_checkpoint).fit()
        if result.error:
            lease.fail(describe_exit(result.error)[1])
        else:  # a failed run keeps everything for its resume; the resume's end prunes
            prune_checkpoints(cfg, result, log=log)
        return result


def prune_checkpoints(cfg: Config, result, *, log=print) -> list[str]:
    """Delete the run's checkpoints outside the best ``train.keep_checkpoints`` by ``val/miou`` and the latest.

    Ray Train deletes only those it registered: a driver killed after a checkpoint's upload but
    before Ray registered it leaves one nobody tracks. Returns the URIs deleted.
    """
    ray_kept = [result.checkpoint, *(c for c, _ in result.best_checkpoints or [])]
    tracked = {os.path.basename(c.path.rstrip("/")) for c in ray_kept if c is not None}
    try:
        return ckpt.prune(run_uri(cfg), cfg.train.keep_checkpoints, metric=VAL_METRIC, tracked=tracked, log=log)
    except storage.StorageError as e:  # the training itself succeeded; what is left is only disk space
        log(f"[train] WARNING: could not delete the checkpoints outside train.keep_checkpoints: {e}")
        return []


def clear_run(cfg: Config, *, log=print) -> None:
    """``--restart``: delete what a run wrote (checkpoints, config), keeping the lease and outcome
    :func:`run_training` holds. Every delete is checked to lie inside the run (a second line of
    defence after the plain-name check of ``train.run_name``)."""
    run = run_uri(cfg)
    if not storage.is_inside(run, cfg.train.storage_path):
        raise storage.StorageError(f"{run}: the run is not inside train.storage_path {cfg.train.storage_path}")
    log(f"[train] --restart: deleting {run}")
    for entry in [*storage.list_dirs(run), *storage.list_files(run)]:
        if os.path.basename(entry.rstrip("/")) not in (LEASE_FILE, OUTCOME_FILE):
            storage.delete(entry, recursive=True, within=run)
    for owned in ("tensorboard", "image_ids"):  # only what training writes there
        shutil.rmtree(os.path.join(local_run_dir(cfg), owned), ignore_errors=True)
