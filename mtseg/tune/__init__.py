"""Ray Tune search over task weighting and architecture, in Ray 2.60's Train V2 form.

    mtseg tune --config jobs/configs/tune.yaml [key=value ...]            # ASHA on val/miou
    mtseg tune --config jobs/configs/tune_pbt.yaml                        # PBT over task weights
    mtseg tune --config jobs/configs/tune.yaml --resume                   # continue an interrupted search

``tune.space`` maps dotted keys of ``mtseg train`` to ``choice[..]``, ``grid[..]``, ``uniform[lo, hi]``,
``loguniform[lo, hi]`` or ``randint[lo, hi]`` (both ends included); :mod:`~mtseg.tune.space` checks every
value against the typed config before Ray starts.

A trial (:mod:`~mtseg.tune.trial`) fits one ``TorchTrainer`` (:func:`mtseg.train.trainer.build_trainer`)
and turns each epoch end into a Tune result (ASHA's and PBT's time axis is ``train/epoch``); PBT's
exploit starts a new Train run from the donor's checkpoint, rebased to the mutated hyperparameters.
:mod:`~mtseg.tune.objective` adds Δm% over cached single-task baselines, :mod:`~mtseg.tune.results`
writes the trial table and the best config, :mod:`~mtseg.tune.search` builds the ``Tuner`` and resumes.
"""

from mtseg.tune.objective import DELTA_M, baseline_config, baseline_key, delta_m, ensure_baselines, task_objective
from mtseg.tune.results import best_train_config, summarize, to_csv, to_markdown, write_results
from mtseg.tune.search import check_options, run_tune
from mtseg.tune.space import SearchError, experiment_uri, parse_param, trial_config, validate_search
from mtseg.tune.trial import rebase_checkpoint, trial_metrics

__all__ = [
    "DELTA_M",
    "SearchError",
    "baseline_config",
    "baseline_key",
    "best_train_config",
    "check_options",
    "delta_m",
    "ensure_baselines",
    "experiment_uri",
    "parse_param",
    "rebase_checkpoint",
    "run_tune",
    "summarize",
    "task_objective",
    "to_csv",
    "to_markdown",
    "trial_config",
    "trial_metrics",
    "validate_search",
    "write_results",
]
