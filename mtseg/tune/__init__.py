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

A trial (:mod:`~mtseg.tune.trial`) fits one ``TorchTrainer`` (:func:`mtseg.train.trainer.build_trainer`)
and turns each epoch end into a Tune result (ASHA's and PBT's time axis is ``train/epoch``); PBT's
exploit starts a new Train run from the donor's checkpoint, rebased to the mutated hyperparameters.
:mod:`~mtseg.tune.objective` adds Δm% over cached single-task baselines,
:mod:`~mtseg.tune.space` parses and checks the space, :mod:`~mtseg.tune.results` writes the trial
table and the best config, :mod:`~mtseg.tune.search` builds the ``Tuner`` and resumes.
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
