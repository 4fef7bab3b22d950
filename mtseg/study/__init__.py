"""Studies: named arms (override sets) x seeds, each (arm, seed) a Ray Train run scheduled as a Ray Tune trial.

    mtseg study --config jobs/configs/study-synth.yaml              # train, evaluate, summarise
    mtseg study --config jobs/configs/study-synth.yaml --resume     # continue an interrupted study

:mod:`~mtseg.study.runner` schedules the runs with :mod:`mtseg.tune`'s trial and evaluates each
final model (clean val split, corruption suite, train split, extra splits);
:mod:`~mtseg.study.stats` computes intervals over seeds, paired differences and Δm% against the
reference arm; :mod:`~mtseg.study.report` draws ``report.html`` from ``results.json``.
"""

from mtseg.study.report import arm_table_markdown, claims_tables_markdown, contrast_table_markdown, render_html
from mtseg.study.runner import (
    StudyError,
    StudyOutcome,
    build_results,
    check_study,
    collect_runs,
    evaluate_run,
    run_study,
    study_uri,
    write_outputs,
)
from mtseg.study.stats import delta_m_per_seed, flags, interval, paired_difference, summarize

__all__ = [
    "StudyError",
    "StudyOutcome",
    "arm_table_markdown",
    "build_results",
    "check_study",
    "claims_tables_markdown",
    "collect_runs",
    "contrast_table_markdown",
    "delta_m_per_seed",
    "evaluate_run",
    "flags",
    "interval",
    "paired_difference",
    "render_html",
    "run_study",
    "study_uri",
    "summarize",
    "write_outputs",
]
