"""The multi-task objective Δm% (Maninis et al. 2019; MTAN's definition) and its single-task
baselines, trained once per recipe and cached under ``<storage_path>/baselines/``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mtseg import storage
from mtseg.config import Config, ConfigError, TuneConfig
from mtseg.tune.space import BASELINES_DIR, RUNS_DIR, SearchError, trial_config

DELTA_M = "val/delta_m"


def task_objective(task: str) -> tuple[str, bool, tuple[str, ...]]:
    """What Δm% takes from ``task``: ``(metric key, higher_is_better, baseline task set)``.

    The baseline trains the task with the tasks it refines (``Task.requires``).
    """
    from mtseg.tasks import TASKS

    cls = TASKS.get(task)
    if cls is None or not cls.objective:
        raise ConfigError(f"tasks.names: no objective for task {task!r}")
    return f"val/{cls.objective}", cls.higher_is_better, (*cls.requires, task)


# Fields that say where or how verbosely a run goes, not what it learns: left out of the
# baseline cache key so a cached baseline serves every experiment with the same recipe.
_NOT_RECIPE = {
    "train": (
        "run_name",
        "storage_path",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "log_every_steps",
        "max_failures",
        "log_image_ids",
        "use_gpu",
        "cpus_per_worker",
        "ray_log_level",
    ),
    "data": ("map_num_cpus", "rows_per_read_task", "max_bad_fraction", "images_per_shard"),
}


def baseline_config(cfg: Config, task: str) -> Config:
    """The single-task baseline of ``task`` for ``cfg``'s recipe: equal weighting, no search space
    (trials that vary the architecture compare with the base architecture's baselines)."""
    _, _, baseline_tasks = task_objective(task)
    base = cfg.to_dict()
    base["tune"] = dataclasses.asdict(TuneConfig())
    base["weighting"]["name"] = "equal"
    base["weighting"]["static"] = {}
    return trial_config(base, {"tasks.names": list(baseline_tasks)})


def baseline_key(cfg: Config) -> str:
    """Content hash of the parts of ``cfg`` that decide a baseline's metrics."""
    d = cfg.to_dict()
    d.pop("tune", None)
    d.pop("cluster", None)
    d.pop("study", None)  # how runs are compared, not how one trains: cached baselines keep their keys
    for section, keys in _NOT_RECIPE.items():
        for k in keys:
            d[section].pop(k, None)
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def delta_m(metrics: dict[str, Any], baselines: dict[str, dict], tasks: list[str] | tuple[str, ...]) -> float:
    """Δm% = mean over tasks of the relative gain over the single-task baseline, x 100.

    ``Δm = 100 / T * Σ_i (-1)^{l_i} (M_i - B_i) / B_i`` with ``l_i = 1`` when lower is better.
    A task whose baseline is missing, not finite or not positive (mask AP 0 on a tiny run) is
    left out.

    Args:
        metrics: a trial's validation metrics.
        baselines: from :func:`ensure_baselines`.
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
        higher = b["higher_is_better"] if "higher_is_better" in b else task_objective(task)[1]
        sign = 1.0 if higher else -1.0
        gains.append(sign * (value - base) / base)
    return 100.0 * sum(gains) / len(gains) if gains else math.nan


def ensure_baselines(cfg: Config, *, log=print) -> dict[str, dict]:
    """Single-task baselines of ``cfg``'s tasks: read from ``<storage_path>/baselines/<key>.json``,
    trained where missing (Train runs, ``tune.max_concurrent_trials`` at once; needs Ray).

    Returns:
        ``{task: {"task", "metric", "value", "key", "tasks", "run", "higher_is_better"}}``;
        ``value`` is None where the metric was undefined. The direction travels with the record
        so that Δm% needs no task registry where it is computed (a Train controller).
    """
    root = storage.join(cfg.train.storage_path, BASELINES_DIR)
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

    def train(task: str) -> dict:
        from mtseg.train.trainer import run_training

        bcfg, key = missing[task]
        bcfg.train.storage_path = storage.join(root, RUNS_DIR)
        bcfg.train.run_name = f"{task}-{key}"
        log(f"[tune] training the {task} baseline ({', '.join(bcfg.tasks.names)}) as run {bcfg.train.run_name}")
        result = run_training(bcfg, log=log)
        if result.error:
            raise SearchError(f"baseline {task}: training failed: {result.error}")
        metric = task_objective(task)[0]
        value = (result.metrics or {}).get(metric)
        record = {
            "task": task,
            "metric": metric,
            "value": float(value) if _finite(value) else None,
            "key": key,
            "tasks": list(bcfg.tasks.names),
            "run": storage.join(bcfg.train.storage_path, bcfg.train.run_name),
        }
        storage.write_bytes(storage.join(root, f"{key}.json"), json.dumps(record, indent=2).encode())
        log(f"[tune] baseline {task}: {metric}={record['value']}")
        return record

    with ThreadPoolExecutor(max_workers=max(1, cfg.tune.max_concurrent_trials)) as pool:
        out.update(zip(missing, pool.map(train, list(missing))))
    for task, record in out.items():
        record["higher_is_better"] = task_objective(task)[1]
    return out
