"""Run a search: Tune's scheduler, search algorithm and ``Tuner``; resume (``mtseg tune`` is in mtseg.cli.tune)."""

from __future__ import annotations

import copy
import os

import yaml

from mtseg import storage
from mtseg.config import Config, ConfigError, config_from_dict, to_yaml
from mtseg.tasks import task_classes
from mtseg.tune.objective import DELTA_M, ensure_baselines
from mtseg.tune.results import TuneOutcome, summarize, write_results
from mtseg.tune.space import (
    CONFIG_FILE,
    PBT_INIT_DIR,
    RUNS_DIR,
    Param,
    SearchError,
    experiment_uri,
    validate_search,
)
from mtseg.tune.trial import TRIAL_DRIVER_CPUS, TrialSpec, trial_class

# Tune checkpoints kept per PBT trial: enough that a donor's checkpoint outlives the exploit
# that copies it (Tune warns about <= 2).
PBT_CHECKPOINTS_TO_KEEP = 4


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
        return ASHAScheduler(
            time_attr="train/epoch", max_t=cfg.train.epochs, grace_period=t.grace_period, reduction_factor=t.reduction_factor
        )
    if t.scheduler == "pbt":
        return PopulationBasedTraining(
            time_attr="train/epoch",
            perturbation_interval=t.perturbation_interval,
            hyperparam_mutations={p.key: p.domain() for p in params.values() if p.kind != "grid"},
            synch=t.pbt_synch,
        )
    return FIFOScheduler()


def _search_alg(cfg: Config):
    """Random/grid (``BasicVariantGenerator``) or Optuna TPE behind a ``ConcurrencyLimiter``.

    After a restore neither counts a trial as running (:func:`mtseg.compat.forget_running_trials`):
    a driver killed between Tune's two state uploads would otherwise leave the search waiting forever.
    """
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    from mtseg.compat import forget_running_trials

    def resumable(cls):
        class Resumable(cls):
            def set_state(self, state):
                super().set_state(state)
                forget_running_trials(self)

        return Resumable

    limit = cfg.tune.max_concurrent_trials
    if cfg.tune.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return resumable(ConcurrencyLimiter)(OptunaSearch(seed=cfg.train.seed), max_concurrent=limit)
    return resumable(BasicVariantGenerator)(max_concurrent=limit)


def _trainable(spec: TrialSpec):
    from ray import tune

    return tune.with_resources(tune.with_parameters(trial_class(), spec=spec), {"CPU": TRIAL_DRIVER_CPUS})


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def build_tuner(cfg: Config, params: dict[str, Param], spec: TrialSpec):
    """The ``ray.tune.Tuner`` of a new search (see :func:`run_tune`)."""
    from ray import tune

    fs, path = storage.ray_storage(cfg.train.storage_path)
    t = cfg.tune
    return tune.Tuner(
        _trainable(spec),
        param_space={p.key: p.domain() for p in params.values()},
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode=t.mode,
            num_samples=t.num_samples,
            scheduler=_scheduler(cfg, params),
            search_alg=_search_alg(cfg),
            # A stopped trial's actor must go: it holds the thread that runs its Train run.
            reuse_actors=False,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=t.experiment_name,
            storage_path=path,
            storage_filesystem=fs,
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=0),
            # Tune checkpoints only when PBT asks (a copy of a Train checkpoint); none at the end.
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=PBT_CHECKPOINTS_TO_KEEP if t.scheduler == "pbt" else None, checkpoint_at_end=False
            ),
        ),
    )


def check_options(cfg: Config, *, resume: bool = False, restart: bool = False, delta_m: bool = True) -> dict[str, Param]:
    """Check what can be checked without Ray or storage; return the parsed search space.

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
        resume: continue the experiment with its saved config (Tune's restore); unfinished and
            errored trials run again, resuming their Train runs.
        restart: delete that experiment first and start over.
        delta_m: train/reuse single-task baselines and report ``val/delta_m`` for every trial.

    Returns:
        The :class:`TuneOutcome`.

    Raises:
        ConfigError: bad search space or options. SearchError: nothing to resume, an
        experiment already there, or every trial failed.
    """
    from ray import tune

    check_options(cfg, resume=resume, restart=restart, delta_m=delta_m)
    exp = experiment_uri(cfg)
    saved = storage.join(exp, CONFIG_FILE)
    fs, path = storage.ray_storage(cfg.train.storage_path)
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
    spec = TrialSpec(
        base=run_cfg.to_dict(),
        runs_uri=storage.join(experiment_uri(run_cfg), RUNS_DIR),
        init_uri=storage.join(experiment_uri(run_cfg), PBT_INIT_DIR),
        baselines=baselines,
        tasks=task_classes(),
    )
    if resume:
        log(f"[tune] resuming {exp}")
        tuner = tune.Tuner.restore(
            exp_path, trainable=_trainable(spec), resume_unfinished=True, resume_errored=True, storage_filesystem=fs
        )
    else:
        log(
            f"[tune] {cfg.tune.scheduler} search of {len(params)} keys, {cfg.tune.num_samples} sample(s), "
            f"{cfg.tune.max_concurrent_trials} at once, into {exp}"
        )
        tuner = build_tuner(run_cfg, params, spec)
    grid = tuner.fit()
    rows = summarize(grid, cfg, params)
    if rows and all(r["state"] == "ERROR" for r in rows):
        first = next(iter(grid)).error
        raise SearchError(f"all {len(rows)} trials failed; first: {str(first).strip().splitlines()[-1] if first else 'unknown'}")
    outcome = write_results(cfg, rows, params, baselines)
    outcome.grid = grid
    return outcome
