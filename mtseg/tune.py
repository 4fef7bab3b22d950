"""Ray Tune search over task weighting and architecture, in Ray 2.60's Train V2 form.

    mtseg tune --config jobs/configs/tune.yaml [key=value ...]            # ASHA on val/miou
    mtseg tune --config jobs/configs/tune_pbt.yaml                        # PBT over task weights
    mtseg tune --config jobs/configs/tune.yaml --resume                   # continue an interrupted search

The search space is written in the YAML config against the dotted keys of ``mtseg train``::

    tune:
      space:
        weighting.name: choice[equal, uncertainty, dwa, pcgrad, famo]
        weighting.static.semantic: loguniform[0.1, 10]
        model.decoder_channels: choice[64, 128, 256]
        train.lr: loguniform[0.0005, 0.005]

Forms: ``choice[a, b, ...]`` (sampled), ``grid[a, b, ...]`` (every value, times ``num_samples``),
``uniform[lo, hi]`` and ``loguniform[lo, hi]`` (float keys), ``randint[lo, hi]`` (int keys, both
ends included). Every value is checked against the typed config before Ray starts.

How a search runs
-----------------
* Each trial (:func:`trial_class`) builds a ``TorchTrainer`` with
  :func:`mtseg.train.trainer.build_trainer` and fits it: the trial's Train run is named after
  the trial id and lives under ``<storage_path>/<experiment_name>/runs/``. The trial itself
  reserves almost nothing (:data:`TRIAL_DRIVER_CPUS`); its Train workers reserve
  ``train.num_workers x train.cpus_per_worker`` (and GPUs) in Train's own placement group, so
  on a multi-node cluster Train places them, and ``tune.max_concurrent_trials`` bounds how
  many trials hold workers at once.
* Every epoch end (fresh ``val/*`` metrics and a checkpoint) is forwarded from the Train
  controller to the trial through a Ray queue and becomes one Tune result; ASHA's and PBT's
  time axis is ``train/epoch``. A trial Tune stops aborts its Train run.
* Population Based Training: PBT saves a strong trial as a copy of its last epoch-end Train
  checkpoint and hands it to an exploiting trial. That trial starts a *new* Train run (its
  own older checkpoints must not be resumed) from the donor's checkpoint, rewritten to carry
  the trial's mutated learning rate and static task weights (:func:`rebase_checkpoint`).
* Multi-task objective Δm% (Maninis et al. 2019; MTAN's definition): the mean relative gain of
  each task's metric over a single-task baseline. Baselines are trained once per relevant
  config and cached under ``<storage_path>/baselines/`` (:func:`ensure_baselines`); every trial
  reports ``val/delta_m``, which can be the search metric.
* Results: a table of trials (config, best metric, ``val/mask_ap``, epochs run, state) as CSV
  and markdown, and the best trial's config as a ready ``mtseg train`` YAML, under
  ``<storage_path>/<experiment_name>/results/``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import math
import os
import re
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import yaml

from mtseg import storage
from mtseg.config import Config, ConfigError, TuneConfig, coerce_value, config_from_dict, field_spec, to_yaml

# The trial function only waits on its Train run; the Train workers hold the CPUs. Tune
# cannot reserve zero resources for a trial, so it reserves a sliver.
TRIAL_DRIVER_CPUS = 0.01
# Synchronous PBT perturbs the whole population at once (reproducible, but every member pauses
# and restarts its Train run at each perturbation); asynchronous is Ray's default. A candidate
# for a config field (tune.pbt_synch).
PBT_SYNCH = False
# Tune checkpoints kept per PBT trial: enough that a donor's checkpoint outlives the exploit
# that copies it (Tune warns about <= 2).
PBT_CHECKPOINTS_TO_KEEP = 4

RUNS_DIR = "runs"
PBT_INIT_DIR = "pbt_init"
RESULTS_DIR = "results"
BASELINES_DIR = "baselines"
CONFIG_FILE = "tune_config.yaml"

# Keys PBT may change in a running trial: hyperparameters that leave the checkpoint's layout
# intact (model, task set and strategy stay as the donor's; a key in ``grid[...]`` only sets
# the initial population).
PBT_MUTABLE = (
    "train.lr", "train.weight_decay", "train.momentum", "weighting.static.",
    "weighting.dwa_temperature", "weighting.gradnorm_alpha", "weighting.gradnorm_lr",
    "weighting.famo_lr", "weighting.famo_gamma",
)


@dataclass(frozen=True)
class TaskObjective:
    """A task's validation metric and the task set of its single-task baseline run."""

    metric: str
    baseline_tasks: tuple[str, ...]
    higher_is_better: bool = True


# supercategory, boundary and instance refine semantic (config validation requires it), so
# their "single-task" baselines train semantic + that task and take only that task's metric.
OBJECTIVES: dict[str, TaskObjective] = {
    "semantic": TaskObjective("val/miou", ("semantic",)),
    "supercategory": TaskObjective("val/supercategory_miou", ("semantic", "supercategory")),
    "boundary": TaskObjective("val/boundary_f1", ("semantic", "boundary")),
    "instance": TaskObjective("val/mask_ap", ("semantic", "instance")),
    "reconstruction": TaskObjective("val/psnr", ("reconstruction",)),
}
DELTA_M = "val/delta_m"

_FORM = re.compile(r"^\s*(choice|grid|uniform|loguniform|randint)\s*\[(.*)\]\s*$", re.DOTALL)
_FORMS = "choice[a, b, ...] | grid[a, b, ...] | uniform[lo, hi] | loguniform[lo, hi] | randint[lo, hi]"


class SearchError(RuntimeError):
    """A search cannot start, resume or finish; the message is one line saying why."""


# ---------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class Param:
    """One searched key.

    Attributes:
        key: dotted config key (``weighting.static.semantic``).
        kind: ``choice``, ``grid``, ``uniform``, ``loguniform`` or ``randint``.
        values: the candidate values (choice, grid) or the inclusive bounds (the ranges), each
            already in the key's type.
    """

    key: str
    kind: str
    values: tuple

    def domain(self):
        """The Ray Tune domain (or ``grid_search`` spec) of this key."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        lo, hi = self.values
        if self.kind == "uniform":
            return tune.uniform(lo, hi)
        if self.kind == "loguniform":
            return tune.loguniform(lo, hi)
        return tune.randint(lo, hi + 1)  # Tune's upper bound is exclusive; ours is not


def parse_param(key: str, text: Any) -> Param:
    """Parse one search-space entry and check it against the typed config.

    Args:
        key: dotted config key, as in ``mtseg train`` overrides.
        text: ``choice[..]``, ``grid[..]``, ``uniform[lo, hi]``, ``loguniform[lo, hi]`` or
            ``randint[lo, hi]``.

    Returns:
        The parsed :class:`Param`.

    Raises:
        ConfigError: one line naming ``tune.space.<key>`` and what is wrong.
    """
    where = f"tune.space.{key}"
    try:
        tp, _ = field_spec(key)
    except ConfigError as e:
        raise ConfigError(f"tune.space: {e}") from None
    match = _FORM.match(str(text))
    if not match:
        raise ConfigError(f"{where}: {text!r} is not one of {_FORMS}")
    kind, inner = match.groups()
    try:
        items = yaml.safe_load(f"[{inner}]")
    except yaml.YAMLError:
        raise ConfigError(f"{where}: cannot read the values in {text!r}") from None

    def coerce(value):
        try:
            return coerce_value(key, value)
        except ConfigError as e:
            raise ConfigError(f"tune.space.{e}") from None

    if kind in ("choice", "grid"):
        if not items:
            raise ConfigError(f"{where}: {kind}[] needs at least one value")
        return Param(key, kind, tuple(coerce(v) for v in items))
    if len(items) != 2:
        raise ConfigError(f"{where}: {kind}[lo, hi] takes two bounds, got {len(items)}")
    if kind == "randint" and tp is not int:
        raise ConfigError(f"{where}: randint needs an integer key; use choice[...] for this {getattr(tp, '__name__', tp)} key")
    if kind in ("uniform", "loguniform") and tp is not float:
        hint = "randint[lo, hi]" if tp is int else "choice[...]"
        raise ConfigError(f"{where}: {kind} needs a float key; use {hint} for this {getattr(tp, '__name__', tp)} key")
    lo, hi = (coerce(v) for v in items)
    if not lo < hi:
        raise ConfigError(f"{where}: {kind}[{lo}, {hi}] needs lo < hi")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs bounds > 0, got {lo}")
    return Param(key, kind, (lo, hi))


def trial_config(base: dict, values: dict[str, Any]) -> Config:
    """The resolved config of one trial: ``base`` (a ``Config.to_dict()``) with dotted ``values`` set.

    Raises:
        ConfigError: the combination is invalid (e.g. ``dwa`` with one task).
    """
    tree = copy.deepcopy(base)
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = copy.deepcopy(value)
    return config_from_dict(tree)


def _is_pbt_mutable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in PBT_MUTABLE)


def _optuna_available() -> bool:
    try:
        import optuna  # noqa: F401
    except ImportError:
        return False
    return True


# Above this many combinations of discrete values, each key is checked on its own.
_MAX_CHECKED_COMBINATIONS = 4096


def _check_combinations(cfg: Config, params: dict[str, Param]) -> None:
    """Build the config of every combination of discrete values (ranges at each bound)."""
    base = cfg.to_dict()
    discrete = [p for p in params.values() if p.kind in ("choice", "grid")]
    ranges = [p for p in params.values() if p.kind not in ("choice", "grid")]
    lows = {p.key: p.values[0] for p in ranges}
    combos: list[dict] = []
    if math.prod(len(p.values) for p in discrete) <= _MAX_CHECKED_COMBINATIONS:
        for values in itertools.product(*(p.values for p in discrete)):
            combos.append({**lows, **{p.key: v for p, v in zip(discrete, values)}})
    else:
        combos += [{p.key: v} for p in discrete for v in p.values]
    combos += [{**lows, p.key: p.values[1]} for p in ranges]
    for values in combos or [lows]:
        try:
            trial_config(base, values)
        except ConfigError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise ConfigError(f"tune.space: {shown} gives an invalid config ({e})") from None


def validate_search(cfg: Config) -> dict[str, Param]:
    """Check ``cfg.tune`` and its search space against the typed config, before Ray starts.

    Every combination of the discrete values (choice, grid), with each range at its bounds, is
    put into the base config and validated, so a trial can't fail on its config.

    Returns:
        ``{dotted key: Param}`` in the order written.

    Raises:
        ConfigError: one line naming the key and what is wrong.
    """
    t = cfg.tune
    if not t.space:
        raise ConfigError("tune.space: empty; name at least one dotted key, e.g. 'weighting.name: choice[equal, uncertainty]'")
    params = {key: parse_param(key, text) for key, text in t.space.items()}
    _check_combinations(cfg, params)
    tasks = set(cfg.tasks.names)
    if "tasks.names" in params:
        tasks = {n for names in params["tasks.names"].values for n in names}
    for key in params:
        if key.startswith("weighting.static.") and key.split(".")[2] not in tasks:
            raise ConfigError(f"tune.space.{key}: task {key.split('.')[2]!r} is not trained (tasks.names: {', '.join(cfg.tasks.names)})")
    has_grid = any(p.kind == "grid" for p in params.values())
    if t.search_alg == "optuna":
        if not _optuna_available():
            raise ConfigError("tune.search_alg: optuna is not installed (pip install optuna), use random")
        if has_grid:
            raise ConfigError("tune.search_alg: optuna samples its own points; write choice[...] instead of grid[...]")
    if t.scheduler == "asha" and t.grace_period > cfg.train.epochs:
        raise ConfigError(f"tune.grace_period: {t.grace_period} epochs exceeds train.epochs {cfg.train.epochs}")
    if t.scheduler == "pbt":
        _validate_pbt(cfg, params)
    return params


def _validate_pbt(cfg: Config, params: dict[str, Param]) -> None:
    t = cfg.tune
    if t.search_alg != "random":
        raise ConfigError(f"tune.search_alg: PBT chooses configs itself; {t.search_alg} cannot be combined with it")
    if t.perturbation_interval >= cfg.train.epochs:
        raise ConfigError(f"tune.perturbation_interval: {t.perturbation_interval} epochs leaves no perturbation within train.epochs {cfg.train.epochs}")
    mutated = [p for p in params.values() if p.kind != "grid"]
    if not mutated:
        raise ConfigError("tune.space: PBT needs at least one mutated key (choice/uniform/loguniform/randint); grid[...] only seeds the population")
    for p in mutated:
        if not _is_pbt_mutable(p.key):
            raise ConfigError(
                f"tune.space.{p.key}: PBT cannot change it inside a running trial (the checkpoint's layout depends on it); "
                f"use grid[...] to seed the population, or mutate one of "
                f"{', '.join(k + '<task>' if k.endswith('.') else k for k in PBT_MUTABLE)}"
            )
        if p.key.startswith("weighting.static."):
            names = params["weighting.name"].values if "weighting.name" in params else (cfg.weighting.name,)
            if any(n != "static" for n in names):
                raise ConfigError(f"tune.space.{p.key}: PBT mutates static task weights only with weighting.name: static")


# ---------------------------------------------------------------------------- Δm% and baselines

# Fields that say where or how verbosely a run goes, not what it learns: left out of the
# baseline cache key so a cached baseline serves every experiment with the same recipe.
_NOT_RECIPE = {
    "train": ("run_name", "storage_path", "checkpoint_every_steps", "keep_checkpoints", "log_every_steps",
              "max_failures", "log_image_ids", "use_gpu", "cpus_per_worker"),
    "data": ("map_num_cpus", "rows_per_read_task", "max_bad_fraction", "images_per_shard"),
}


def baseline_config(cfg: Config, task: str) -> Config:
    """The single-task baseline of ``task`` for ``cfg``'s recipe (model, data, schedule).

    Equal weighting over :data:`OBJECTIVES`'s task set; the search space is not applied, so
    trials that vary the architecture are compared with the base architecture's baselines.
    """
    if task not in OBJECTIVES:
        raise ConfigError(f"tasks.names: no objective for task {task!r}")
    base = cfg.to_dict()
    base["tune"] = dataclasses.asdict(TuneConfig())
    base["weighting"]["name"] = "equal"
    base["weighting"]["static"] = {}
    return trial_config(base, {"tasks.names": list(OBJECTIVES[task].baseline_tasks)})


def baseline_key(cfg: Config) -> str:
    """Content hash of the parts of ``cfg`` that decide a baseline's metrics."""
    d = cfg.to_dict()
    d.pop("tune", None)
    d.pop("cluster", None)
    for section, keys in _NOT_RECIPE.items():
        for k in keys:
            d[section].pop(k, None)
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def delta_m(metrics: dict[str, Any], baselines: dict[str, dict], tasks: list[str] | tuple[str, ...]) -> float:
    """Δm% = mean over tasks of the relative gain over the single-task baseline, x 100.

    ``Δm = 100 / T * Σ_i (-1)^{l_i} (M_i - B_i) / B_i`` with ``l_i = 1`` when lower is better
    (every metric here is higher-better). A task whose baseline is missing, not finite or
    not positive (e.g. mask AP 0 on a tiny run) has no relative gain and is left out.

    Args:
        metrics: a trial's validation metrics (``val/miou``, ...).
        baselines: ``{task: {"metric": key, "value": float|None, ...}}`` from :func:`ensure_baselines`.
        tasks: the trial's tasks.

    Returns:
        Δm in percent; NaN when no task has a usable baseline and metric.
    """
    gains = []
    for task in tasks:
        b = baselines.get(task)
        if not b:
            continue
        base, value = b.get("value"), metrics.get(b["metric"])
        if not (_finite(base) and _finite(value)) or base <= 0:
            continue
        sign = 1.0 if OBJECTIVES.get(task, TaskObjective("", ())).higher_is_better else -1.0
        gains.append(sign * (value - base) / base)
    return 100.0 * sum(gains) / len(gains) if gains else math.nan


def baselines_uri(cfg: Config) -> str:
    return storage.join(cfg.train.storage_path, BASELINES_DIR)


def ensure_baselines(cfg: Config, *, log=print) -> dict[str, dict]:
    """Single-task baselines of ``cfg``'s tasks: read from the cache, trained where missing.

    Each baseline is cached as ``<storage_path>/baselines/<key>.json`` (``key`` =
    :func:`baseline_key` of its config), so later searches with the same recipe reuse it.
    Missing ones train as ordinary Train runs (resumable by name), up to
    ``tune.max_concurrent_trials`` at once. Needs a connected Ray.

    Returns:
        ``{task: {"task", "metric", "value", "key", "tasks", "run"}}``; ``value`` is None
        where the metric was undefined (NaN).
    """
    root = baselines_uri(cfg)
    out: dict[str, dict] = {}
    missing: dict[str, tuple[Config, str]] = {}
    for task in cfg.tasks.names:
        bcfg = baseline_config(cfg, task)
        key = baseline_key(bcfg)
        uri = storage.join(root, f"{key}.json")
        if storage.exists(uri):
            out[task] = json.loads(storage.read_bytes(uri))
            log(f"[tune] baseline {task}: {out[task]['metric']}={out[task]['value']} (cached {uri})")
        else:
            missing[task] = (bcfg, key)
    if not missing:
        return out

    from mtseg.train.trainer import run_training

    def train(task: str) -> dict:
        bcfg, key = missing[task]
        bcfg.train.storage_path = storage.join(root, RUNS_DIR)
        bcfg.train.run_name = f"{task}-{key}"
        log(f"[tune] training the {task} baseline ({', '.join(bcfg.tasks.names)}) as run {bcfg.train.run_name}")
        result = run_training(bcfg, log=log)
        if result.error:
            raise SearchError(f"baseline {task}: training failed: {result.error}")
        metric = OBJECTIVES[task].metric
        value = (result.metrics or {}).get(metric)
        record = {"task": task, "metric": metric, "value": float(value) if _finite(value) else None, "key": key,
                  "tasks": list(bcfg.tasks.names), "run": storage.join(bcfg.train.storage_path, bcfg.train.run_name)}
        storage.write_bytes(storage.join(root, f"{key}.json"), json.dumps(record, indent=2).encode())
        log(f"[tune] baseline {task}: {metric}={record['value']}")
        return record

    with ThreadPoolExecutor(max_workers=max(1, cfg.tune.max_concurrent_trials)) as pool:
        for task, record in zip(missing, pool.map(train, list(missing))):
            out[task] = record
    return out


# ---------------------------------------------------------------------------- PBT checkpoints


def rebase_checkpoint(src_dir: str, dst_dir: str, cfg: Config) -> dict[str, Any]:
    """Copy a training checkpoint, replacing the hyperparameters PBT may have mutated.

    A checkpoint carries the donor's learning rate (optimiser param groups, LR schedule base)
    and static task weights (a buffer of the strategy); loading it as is would undo the
    mutation. The model, optimiser moments, counters and the rest are kept.

    Args:
        src_dir: local checkpoint directory (see mtseg.train.checkpoint).
        dst_dir: local directory to write the rebased checkpoint into.
        cfg: the trial's (mutated) config.

    Returns:
        The checkpoint's meta (epoch, step, ...).
    """
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
    """What every trial of one search shares (shipped once through the object store).

    Attributes:
        base: the base config as a dict, storage paths absolute.
        runs_uri: where the trials' Train runs live.
        init_uri: where rebased PBT start checkpoints are written.
        baselines: single-task baselines for Δm% (empty: no Δm).
    """

    base: dict
    runs_uri: str
    init_uri: str
    baselines: dict = field(default_factory=dict)


def _is_epoch_end(metrics: dict) -> bool:
    # The trainer's epoch-end report carries fresh val/* and no train/loss (its step reports
    # carry train/loss and only a repeated val/miou).
    return "train/loss" not in metrics


def _epoch_end_forwarder(queue):
    """A Train callback (it runs in the Train controller) that hands the trial its epoch ends.

    The first report also sends the controller's own handle, so the trial can abort the run.
    """
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
            if _is_epoch_end(m):
                # Blocks while the trial has not taken the previous epoch (a queue of one).
                self.queue.put({"metrics": m, "checkpoint": checkpoint.path if checkpoint else None})

    return EpochEndForwarder(queue)


def trial_metrics(train_metrics: dict, cfg: Config, baselines: dict) -> dict[str, Any]:
    """What a trial reports to Tune for one epoch end: Train's metrics plus ``val/delta_m``."""
    out = {k: v for k, v in train_metrics.items() if isinstance(v, (int, float, str, bool))}
    if baselines:
        out[DELTA_M] = delta_m(out, baselines, cfg.tasks.names)
    return out


def _uri_of(path: str, like: str) -> str:
    """A storage URI for ``path`` as Ray reports it (an S3 path without its scheme)."""
    return "s3://" + path.lstrip("/") if storage.is_s3(like) else path


def start_from_checkpoint(checkpoint_dir: str, cfg: Config, spec: TrialSpec, trial_id: str) -> tuple[str, str]:
    """Prepare a trial start from a Tune checkpoint (PBT exploit or pause, a resumed PBT search).

    The trial starts a *new* Train run named after the checkpoint (its own run's newer
    checkpoints must not win over the one handed in) from a rebased copy of it in storage
    (:func:`rebase_checkpoint`). Started again from the same checkpoint (a resumed search),
    the trial resumes that run from its own latest checkpoint.

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
    print(f"[tune] trial {trial_id}: run {run_name} starts from a checkpoint at epoch {meta.get('epoch')}, step {meta.get('step')}")
    return run_name, init


@functools.cache
def trial_class():
    """The Ray Tune ``Trainable`` of one trial (built on first use: importing Ray is slow).

    A class trainable rather than a function, for its ``cleanup`` hook: when Tune stops a
    trial (ASHA) or pauses it (PBT), ``cleanup`` aborts the trial's Train run, which removes
    the run's placement group. Without it the run's controller dies with the trial's actor
    and its workers' reservation is only released by Train's cleaner, which needs the Ray
    State API (the dashboard).
    """
    import ray
    from ray import tune
    from ray.exceptions import GetTimeoutError, RayError
    from ray.util.queue import Empty, Queue

    class MTSegTrial(tune.Trainable):
        """One trial: a Train run of the trial's config; a Tune result per epoch end.

        ``step`` starts ``build_trainer(cfg).fit()`` in a thread on first call and then
        returns each epoch end the Train controller forwards; ``save_checkpoint`` copies the
        Train checkpoint of the last epoch end (PBT asks for it); ``load_checkpoint``
        prepares a new Train run from one (PBT's exploit).
        """

        def setup(self, config: dict, spec: TrialSpec):
            self.spec = spec
            self.cfg = trial_config(spec.base, config)
            self.run_name, self.init = self.trial_id, ""
            self.queue = None
            self.thread: threading.Thread | None = None
            self.controller = None
            self.outcome: dict[str, Any] = {}
            self.last: dict[str, Any] = {}

        def load_checkpoint(self, checkpoint_dir: str):
            self.run_name, self.init = start_from_checkpoint(checkpoint_dir, self.cfg, self.spec, self.trial_id)

        def _start(self) -> None:
            from mtseg.train.trainer import build_trainer, run_uri

            cfg = self.cfg
            cfg.train.run_name = self.run_name
            cfg.train.storage_path = self.spec.runs_uri
            storage.write_bytes(storage.join(run_uri(cfg), "config.yaml"), to_yaml(cfg).encode())
            self.queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
            trainer = build_trainer(cfg, callbacks=[_epoch_end_forwarder(self.queue)], init_checkpoint=self.init)

            def fit() -> None:
                try:
                    self.outcome["result"] = trainer.fit()
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
            if item["checkpoint"]:
                metrics["checkpoint_uri"] = _uri_of(item["checkpoint"], self.spec.runs_uri)
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



# ---------------------------------------------------------------------------- the search


def experiment_uri(cfg: Config) -> str:
    """``<storage_path>/<tune.experiment_name>``: Tune's state, the trials' runs, the results."""
    return storage.join(cfg.train.storage_path, cfg.tune.experiment_name)


def _absolute(cfg: Config) -> Config:
    # Trials run with Tune's trial directory as working directory: a relative local
    # storage path would land there.
    cfg = copy.deepcopy(cfg)
    if not storage.is_s3(cfg.train.storage_path):
        cfg.train.storage_path = os.path.abspath(storage.resolve(cfg.train.storage_path)[1])
    if not storage.is_s3(cfg.data.uri) and "://" not in cfg.data.uri:
        cfg.data.uri = os.path.abspath(cfg.data.uri)
    return cfg


def _scheduler(cfg: Config, params: dict[str, Param]):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    t = cfg.tune
    if t.scheduler == "asha":
        return ASHAScheduler(time_attr="train/epoch", max_t=cfg.train.epochs, grace_period=t.grace_period,
                             reduction_factor=t.reduction_factor)
    if t.scheduler == "pbt":
        return PopulationBasedTraining(
            time_attr="train/epoch", perturbation_interval=t.perturbation_interval,
            hyperparam_mutations={p.key: p.domain() for p in params.values() if p.kind != "grid"},
            synch=PBT_SYNCH,
        )
    return FIFOScheduler()


def _search_alg(cfg: Config):
    """Optuna (Tune bounds its concurrency), or random sampling and grid[...] that bound their own."""
    if cfg.tune.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch()
    from ray.tune.search import BasicVariantGenerator

    class ResumableVariantGenerator(BasicVariantGenerator):
        """Tune's random/grid generator, with a restore that cannot stall the search.

        Tune uploads its experiment state and this generator's state as separate files. A
        driver killed between the two leaves a generator that still counts a finished trial
        as running; at ``max_concurrent`` it then never hands out another trial and the
        resumed search waits forever. Restored trials are re-queued by Tune itself, so the
        running set starts empty after a restore (at worst a resumed search briefly runs the
        restored trials on top of ``max_concurrent`` new ones).
        """

        def set_state(self, state):
            super().set_state(state)
            self._live_trials = set()

    return ResumableVariantGenerator(max_concurrent=cfg.tune.max_concurrent_trials)


def _trainable(spec: TrialSpec):
    from ray import tune

    return tune.with_resources(tune.with_parameters(trial_class(), spec=spec), {"CPU": TRIAL_DRIVER_CPUS})


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def build_tuner(cfg: Config, params: dict[str, Param], spec: TrialSpec):
    """The ``ray.tune.Tuner`` of a new search (see :func:`run_tune`)."""
    from ray import tune

    fs, path = storage.resolve(cfg.train.storage_path)
    if storage.is_s3(cfg.train.storage_path):
        fs = storage.retrying_filesystem(fs)
    t = cfg.tune
    return tune.Tuner(
        _trainable(spec),
        param_space={p.key: p.domain() for p in params.values()},
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=t.mode, num_samples=t.num_samples, scheduler=_scheduler(cfg, params),
            search_alg=_search_alg(cfg),
            max_concurrent_trials=t.max_concurrent_trials if t.search_alg == "optuna" else None,
            # A stopped trial's actor must go: it holds the thread that runs its Train run.
            reuse_actors=False, trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=t.experiment_name, storage_path=path, storage_filesystem=fs, verbose=1,
            failure_config=tune.FailureConfig(max_failures=0),
            # Tune checkpoints only when PBT asks (a copy of a Train checkpoint); none at the end.
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=PBT_CHECKPOINTS_TO_KEEP if t.scheduler == "pbt" else None, checkpoint_at_end=False),
        ),
    )


@dataclass
class TuneOutcome:
    """What a finished search produced.

    Attributes:
        rows: one dict per trial (see :func:`summarize`), best first.
        best: the best trial's row, or None if no trial reported the metric.
        best_config: the best trial's config as a ready ``mtseg train`` config.
        paths: ``{"csv", "markdown", "best_config"}`` URIs written.
        baselines: the Δm% baselines used (empty if off).
        markdown: the trial table as markdown.
        grid: Tune's ``ResultGrid`` (every trial's reports), where the search ran here.
    """

    rows: list[dict]
    best: dict | None
    best_config: Config | None
    paths: dict[str, str]
    baselines: dict
    markdown: str = ""
    grid: Any = None


def _state(result, epochs_run: int, epochs: int) -> str:
    if result.error is not None:
        return "ERROR"
    return "TERMINATED" if epochs_run >= epochs else "STOPPED"


def summarize(results, cfg: Config, params: dict[str, Param]) -> list[dict]:
    """One row per trial: trial id, state, epochs run, its config, its best epoch's metrics.

    The best epoch is the one with the best ``tune.metric``; ``val/mask_ap`` (and Δm%) are
    taken from that epoch. Rows are sorted best first; trials without the metric go last.
    """
    metric, sign = cfg.tune.metric, (1.0 if cfg.tune.mode == "max" else -1.0)
    rows = []
    for r in results:
        df = r.metrics_dataframe
        best_row: dict = {}
        epochs_run = 0
        if df is not None and len(df):
            if "train/epoch" in df:
                epochs_run = int(df["train/epoch"].max())
            if metric in df and df[metric].notna().any():
                best_row = df.loc[(df[metric] * sign).idxmax()].to_dict()
        trial_id = (r.metrics or {}).get("trial_id") or os.path.basename(str(r.path)).removeprefix("trial_")
        row = {"trial": trial_id, "state": _state(r, epochs_run, cfg.train.epochs), "epochs": epochs_run}
        row.update({k: (r.config or {}).get(k) for k in params})
        for key in dict.fromkeys((metric, "val/miou", "val/mask_ap", DELTA_M)):
            value = best_row.get(key)
            row[key] = float(value) if _finite(value) else None
        row["checkpoint"] = best_row.get("checkpoint_uri")
        rows.append(row)
    rows.sort(key=lambda row: (row[metric] is None, -sign * (row[metric] or 0.0)))
    if metric != DELTA_M and all(row[DELTA_M] is None for row in rows):
        for row in rows:
            del row[DELTA_M]  # no baselines: no column
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v)


def to_markdown(rows: list[dict]) -> str:
    """The trial table as GitHub markdown."""
    if not rows:
        return "(no trials)\n"
    cols = [c for c in rows[0] if c != "checkpoint"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(row[c]).replace("|", "\\|") for c in cols) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    """The trial table as CSV (lists written as JSON)."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else ("" if v is None else v)
                             for k, v in row.items()})
    return buf.getvalue()


def best_train_config(cfg: Config, row: dict, params: dict[str, Param]) -> Config:
    """The best trial's config as a standalone ``mtseg train`` config.

    The base config with the trial's values (for PBT, its last mutated values), run name
    ``<experiment_name>-best`` in the base ``storage_path``, and no search section.
    """
    base = cfg.to_dict()
    base["tune"] = dataclasses.asdict(TuneConfig())
    out = trial_config(base, {k: row[k] for k in params if row.get(k) is not None})
    out.train.run_name = f"{cfg.tune.experiment_name}-best"
    return out


def write_results(cfg: Config, rows: list[dict], params: dict[str, Param], baselines: dict) -> TuneOutcome:
    """Write the trial table (CSV, markdown) and the best config under the experiment's results/."""
    root = storage.join(experiment_uri(cfg), RESULTS_DIR)
    md = to_markdown(rows)
    paths = {"csv": storage.join(root, "trials.csv"), "markdown": storage.join(root, "trials.md")}
    storage.write_bytes(paths["csv"], to_csv(rows).encode())
    storage.write_bytes(paths["markdown"], md.encode())
    best = next((r for r in rows if r[cfg.tune.metric] is not None and r["state"] != "ERROR"), None)
    best_cfg = None
    if best is not None:
        best_cfg = best_train_config(cfg, best, params)
        paths["best_config"] = storage.join(root, "best.yaml")
        header = (f"# Best trial {best['trial']} of experiment {cfg.tune.experiment_name}: "
                  f"{cfg.tune.metric}={best[cfg.tune.metric]:.4f}\n# mtseg train --config best.yaml\n")
        storage.write_bytes(paths["best_config"], (header + to_yaml(best_cfg)).encode())
    if baselines:
        storage.write_bytes(storage.join(root, "baselines.json"), json.dumps(baselines, indent=2).encode())
    return TuneOutcome(rows=rows, best=best, best_config=best_cfg, paths=paths, baselines=baselines, markdown=md)


def check_options(cfg: Config, *, resume: bool = False, restart: bool = False, delta_m: bool = True) -> dict[str, Param]:
    """Everything about a search that can be checked without Ray or storage.

    Returns:
        The parsed search space (see :func:`validate_search`).

    Raises:
        ConfigError: one line naming the option or key.
    """
    if resume and restart:
        raise ConfigError("--resume and --restart exclude each other")
    if cfg.tune.metric == DELTA_M and not delta_m:
        raise ConfigError("tune.metric: val/delta_m needs the single-task baselines; drop --no-delta-m")
    return validate_search(cfg)


def run_tune(cfg: Config, *, resume: bool = False, restart: bool = False, delta_m: bool = True, log=print) -> TuneOutcome:
    """Run (or resume) the search ``cfg.tune`` describes on the connected Ray cluster.

    Args:
        cfg: resolved config; ``cfg.tune.space`` is validated first.
        resume: continue the experiment ``<storage_path>/<experiment_name>`` (Tune's restore):
            finished trials are kept, unfinished and errored ones run again (a trial's Train
            run resumes from its own checkpoints). Its saved config is used.
        restart: delete that experiment first and start over.
        delta_m: train/reuse single-task baselines and report ``val/delta_m`` for every trial
            (required when ``tune.metric`` is ``val/delta_m``).

    Returns:
        The :class:`TuneOutcome` (table rows, best config, paths written).

    Raises:
        ConfigError: bad search space or options. SearchError: nothing to resume, an
        experiment already there, or every trial failed.
    """
    from ray import tune

    check_options(cfg, resume=resume, restart=restart, delta_m=delta_m)
    exp = experiment_uri(cfg)
    saved = storage.join(exp, CONFIG_FILE)
    fs, path = storage.resolve(cfg.train.storage_path)
    if storage.is_s3(cfg.train.storage_path):
        fs = storage.retrying_filesystem(fs)
    exp_path = f"{path}/{cfg.tune.experiment_name}"
    if restart:
        log(f"[tune] --restart: deleting {exp}")
        storage.delete(exp, recursive=True)
    if resume:
        if not tune.Tuner.can_restore(exp_path, storage_filesystem=fs) or not storage.exists(saved):
            raise SearchError(f"{exp}: no experiment to resume (start it without --resume)")
        stored = config_from_dict(yaml.safe_load(storage.read_bytes(saved)))
        if stored.tune.space != cfg.tune.space:
            log(f"[tune] resuming with the experiment's own search space from {saved}")
        cfg = stored
    elif storage.exists(saved) or tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        raise SearchError(f"{exp}: an experiment is already there; pass --resume to continue it or --restart to start over")
    else:
        storage.write_bytes(saved, to_yaml(cfg).encode())
    params = validate_search(cfg)

    baselines = ensure_baselines(cfg, log=log) if delta_m else {}
    run_cfg = _absolute(cfg)
    spec = TrialSpec(base=run_cfg.to_dict(), runs_uri=storage.join(experiment_uri(run_cfg), RUNS_DIR),
                     init_uri=storage.join(experiment_uri(run_cfg), PBT_INIT_DIR), baselines=baselines)
    if resume:
        log(f"[tune] resuming {exp}")
        tuner = tune.Tuner.restore(exp_path, trainable=_trainable(spec), resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        log(f"[tune] {cfg.tune.scheduler} search of {len(params)} keys, {cfg.tune.num_samples} sample(s), "
            f"{cfg.tune.max_concurrent_trials} at once, into {exp}")
        tuner = build_tuner(run_cfg, params, spec)
    grid = tuner.fit()
    rows = summarize(grid, cfg, params)
    if rows and all(r["state"] == "ERROR" for r in rows):
        first = next(iter(grid)).error
        raise SearchError(f"all {len(rows)} trials failed; first: {str(first).strip().splitlines()[-1] if first else 'unknown'}")
    outcome = write_results(cfg, rows, params, baselines)
    outcome.grid = grid
    return outcome


# ---------------------------------------------------------------------------- CLI


def cmd_tune(args) -> int:
    """``mtseg tune``: validate, connect to Ray, search, print the table."""
    from mtseg.config import load_config

    cfg = load_config(args.config, args.overrides)
    # A bad search space or option fails here, before anything starts.
    check_options(cfg, resume=args.resume, restart=args.restart, delta_m=not args.no_delta_m)
    from mtseg.cli import _storage_env
    from mtseg.cluster import init_local_ray
    from mtseg.train.trainer import preflight

    preflight(cfg)
    if cfg.cluster.address:
        os.environ["RAY_ADDRESS"] = cfg.cluster.address
    init_local_ray(env=_storage_env(), log_to_driver=True)
    outcome = run_tune(cfg, resume=args.resume, restart=args.restart, delta_m=not args.no_delta_m)
    print(outcome.markdown)
    for name, uri in outcome.paths.items():
        print(f"{name}: {uri}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``mtseg tune`` to the CLI's sub-command parsers."""
    p = subparsers.add_parser("tune", help="Ray Tune search over task weighting and architecture")
    p.add_argument("--config", default=None, help="YAML config with a tune: section (jobs/configs/tune.yaml)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted experiment (finished trials are kept)")
    p.add_argument("--restart", action="store_true", help="delete the experiment and start over")
    p.add_argument("--no-delta-m", action="store_true", help="skip the single-task baselines and val/delta_m")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. tune.num_samples=8")
    p.set_defaults(fn=cmd_tune)
    return p


__all__ = [
    "DELTA_M",
    "OBJECTIVES",
    "PBT_MUTABLE",
    "TRIAL_DRIVER_CPUS",
    "Param",
    "SearchError",
    "TaskObjective",
    "TrialSpec",
    "TuneOutcome",
    "add_parser",
    "baseline_config",
    "baseline_key",
    "best_train_config",
    "build_tuner",
    "check_options",
    "cmd_tune",
    "delta_m",
    "ensure_baselines",
    "experiment_uri",
    "parse_param",
    "rebase_checkpoint",
    "start_from_checkpoint",
    "run_tune",
    "summarize",
    "to_csv",
    "to_markdown",
    "trial_config",
    "trial_class",
    "trial_metrics",
    "validate_search",
    "write_results",
]
