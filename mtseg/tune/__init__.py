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

Modules: :mod:`~mtseg.tune.space` (parsing, validation, trial configs, where an experiment
lives), :mod:`~mtseg.tune.objective` (Δm% and baselines), :mod:`~mtseg.tune.trial` (the
Trainable, PBT checkpoint rebase), :mod:`~mtseg.tune.results` (table, best config),
:mod:`~mtseg.tune.search` (schedulers, ``Tuner``, resume, the CLI).
"""

from mtseg.tune.objective import (
    DELTA_M,
    baseline_config,
    baseline_key,
    delta_m,
    ensure_baselines,
    task_objective,
)
from mtseg.tune.results import TuneOutcome, best_train_config, summarize, to_csv, to_markdown, write_results
from mtseg.tune.search import build_tuner, check_options, run_tune
from mtseg.tune.space import (
    PBT_MUTABLE,
    Param,
    SearchError,
    experiment_uri,
    parse_param,
    trial_config,
    validate_search,
)
from mtseg.tune.trial import (
    TRIAL_DRIVER_CPUS,
    TrialSpec,
    rebase_checkpoint,
    start_from_checkpoint,
    trial_class,
    trial_metrics,
)

__all__ = [
    "DELTA_M",
    "PBT_MUTABLE",
    "TRIAL_DRIVER_CPUS",
    "Param",
    "SearchError",
    "TrialSpec",
    "TuneOutcome",
    "baseline_config",
    "baseline_key",
    "best_train_config",
    "build_tuner",
    "check_options",
    "delta_m",
    "ensure_baselines",
    "experiment_uri",
    "parse_param",
    "rebase_checkpoint",
    "start_from_checkpoint",
    "run_tune",
    "summarize",
    "task_objective",
    "to_csv",
    "to_markdown",
    "trial_config",
    "trial_class",
    "trial_metrics",
    "validate_search",
    "write_results",
]
