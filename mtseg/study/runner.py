"""Run a study: every (arm, seed) a Ray Train run, scheduled as Ray Tune trials; then each final model's evaluation.

A study lives in ``<train.storage_path>/<study.name>/``: Tune's state and one ``trial_<id>/``
directory per (arm, seed) (with that pair's ``study_evaluation.json``), ``runs/`` (the Train runs),
``study_config.yaml`` and ``results/`` (``results.csv``, ``runs.csv``, ``results.json``, ``report.html``).

The trials are a grid over ``arm`` x ``train.seed`` run FIFO, ``tune.max_concurrent_trials`` at
once, by :mod:`mtseg.tune`'s trial (:func:`mtseg.tune.trial.trial_class`), so a study scales with
the cluster as a search does and resumes as one does (Tune's restore).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from mtseg import storage
from mtseg.config import (
    Config,
    ConfigError,
    arm_configs,
    arm_overrides,
    config_from_dict,
    parse_contrast,
    to_yaml,
)
from mtseg.errors import MtsegError
from mtseg.study.stats import flags, summarize
from mtseg.tune.results import to_csv
from mtseg.tune.search import _absolute, _search_alg, _trainable, _trial_dirname
from mtseg.tune.space import PBT_INIT_DIR, RESULTS_DIR, RUNS_DIR
from mtseg.tune.trial import TrialSpec

STUDY_CONFIG_FILE = "study_config.yaml"
#: One (arm, seed)'s evaluation, in its Tune trial directory; a resume reuses it while it matches.
EVALUATION_FILE = "study_evaluation.json"
RESULTS_JSON, RESULTS_CSV, RUNS_CSV, REPORT_HTML = "results.json", "results.csv", "runs.csv", "report.html"
#: Study fields a resume takes from the command line (they change what is evaluated and summarised,
#: not what was trained); everything else comes from the study's own ``study_config.yaml``.
EVALUATION_FIELDS = ("reference", "metrics", "corruptions", "severities", "extra_splits", "train_split_limit", "contrasts")


class StudyError(MtsegError, RuntimeError):
    """A study cannot start, resume or finish; the message is one line saying why."""


def study_uri(cfg: Config) -> str:
    """``<train.storage_path>/<study.name>``."""
    return storage.join(cfg.train.storage_path, cfg.study.name)


def study_seeds(cfg: Config) -> list[int]:
    """The seeds every arm runs: ``train.seed``, ``train.seed + 1``, ... (``study.seeds`` of them)."""
    return [cfg.train.seed + i for i in range(cfg.study.seeds)]


def lower_is_better(metrics: list[str]) -> list[str]:
    """The metrics among ``metrics`` where a smaller value is better: a task objective that says so
    (``Task.higher_is_better``), or a loss."""
    from mtseg.tasks import TASKS

    lower = {f"val/{c.objective}" for c in TASKS.values() if c.objective and not c.higher_is_better}
    return [m for m in metrics if m in lower or "loss" in m.split("/")[-1]]


def _robustness_fn():
    """``mtseg.evaluate.evaluate_robustness``, imported when corruptions are asked for."""
    try:
        from mtseg.evaluate import evaluate_robustness
    except ImportError:
        raise StudyError(
            "study.corruptions: this mtseg has no corruption suite (mtseg.evaluate.evaluate_robustness); "
            "set study.corruptions to '' to evaluate on clean data only"
        ) from None
    return evaluate_robustness


def corruption_plan(cfg: Config) -> tuple[list[str], list[int]]:
    """The corruptions and severities ``study.corruptions`` and ``study.severities`` ask for, read by
    the corruption suite's own parser (``all`` is its 15); ``([], [])`` for clean evaluation only.

    Raises:
        StudyError: corruptions asked for and no corruption suite. ConfigError: an unknown corruption.
    """
    if not cfg.study.corruptions.strip():
        return [], []
    _robustness_fn()
    from mtseg.data.corruptions import CorruptionError, parse_corruptions, parse_severities

    try:
        return list(parse_corruptions(cfg.study.corruptions)), list(parse_severities(cfg.study.severities))
    except CorruptionError as e:  # its messages name the evaluate options: --corruptions, --severities
        raise ConfigError("study." + str(e).removeprefix("--")) from None


def check_study(cfg: Config, *, resume: bool = False, restart: bool = False) -> dict[str, Config]:
    """Check what can be checked without Ray or storage; return each arm's config (before its seed).

    Raises:
        ConfigError: options, or a study section without arms (one line naming the key).
        StudyError: corruptions asked for and no corruption suite to run them.
    """
    if resume and restart:
        raise ConfigError("--resume and --restart exclude each other")
    if not cfg.study.arms:
        raise ConfigError(
            "study.arms: empty; name the arms (arm name -> dotted overrides, e.g. 'mtl: {tasks.names: [semantic, boundary]}') "
            "and study.reference"
        )
    corruption_plan(cfg)
    return arm_configs(cfg)


# ---------------------------------------------------------------------------- trials


@dataclass
class StudySpec(TrialSpec):
    """:class:`~mtseg.tune.trial.TrialSpec` of a study: a trial's ``{"arm", "train.seed"}`` pick the
    arm's resolved config (storage paths absolute) and set its seed."""

    arms: dict[str, dict] = field(default_factory=dict)

    def config(self, values: dict) -> Config:
        """The config of the trial's (arm, seed)."""
        from mtseg.tasks import register
        from mtseg.tune.space import trial_config

        for task in self.tasks:
            register(task)
        values = dict(values)
        return trial_config(self.arms[values.pop("arm")], values)


def build_tuner(cfg: Config, spec: StudySpec):
    """The ``ray.tune.Tuner`` of a new study: a grid over arm x seed, FIFO, ``tune.max_concurrent_trials`` at once."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    fs, path = storage.ray_storage(cfg.train.storage_path)
    # The random generator runs every grid point once; Optuna has nothing to choose here.
    grid_cfg = dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, search_alg="random"))
    return tune.Tuner(
        _trainable(spec),
        param_space={"arm": tune.grid_search(list(spec.arms)), "train.seed": tune.grid_search(study_seeds(cfg))},
        tune_config=tune.TuneConfig(
            num_samples=1,
            scheduler=FIFOScheduler(),
            search_alg=_search_alg(grid_cfg),
            reuse_actors=False,  # as for a search: a trial's actor holds its Train run's thread
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=cfg.study.name,
            storage_path=path,
            storage_filesystem=fs,
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=0),  # Train retries a run itself (train.max_failures)
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
        ),
    )


def _resumed_config(stored: Config, cfg: Config, log) -> Config:
    """The study's own config, with this command's :data:`EVALUATION_FIELDS`."""
    tree = stored.to_dict()
    for name in EVALUATION_FIELDS:
        tree["study"][name] = copy.deepcopy(getattr(cfg.study, name))
    merged = config_from_dict(tree)
    changed = [f"study.{n}" for n in EVALUATION_FIELDS if getattr(stored.study, n) != getattr(cfg.study, n)]
    if changed:
        log(f"[study] resuming with this command's {', '.join(changed)}")
    if merged.to_dict() != cfg.to_dict():
        log("[study] resuming with the study's own arms, seeds and training config")
    return merged


def collect_runs(results, cfg: Config, arms: dict[str, Config]) -> list[dict[str, Any]]:
    """One row per trial: arm, seed, trial id, state, epochs, its Train run and trial directory.

    Args:
        results: Tune's ``ResultGrid`` (or any iterable of its ``Result``).
        arms: each arm's config (its ``train.epochs`` says when a run is finished).

    Returns:
        Rows by arm (the reference first), then by seed; ``state`` is ``TERMINATED``, ``STOPPED`` or ``ERROR``.
    """
    from mtseg.train import checkpoint as ckpt

    exp = study_uri(cfg)
    rows = []
    for r in results:
        config, metrics = r.config or {}, r.metrics or {}
        arm, seed = config.get("arm"), config.get("train.seed")
        if arm not in arms or seed is None:
            continue
        dirname = os.path.basename(str(r.path).rstrip("/"))
        trial = metrics.get("trial_id") or dirname.removeprefix("trial_")
        run = storage.join(exp, RUNS_DIR, metrics.get("run_name") or trial)  # a trial's run is named after it
        epochs, wanted = int(metrics.get("train/epoch") or 0), arms[arm].train.epochs
        if r.error is None and epochs < wanted:
            # A run that finished its last epoch just before the driver was lost resumes with nothing
            # left to train, and its trial ends without an epoch-end result: its checkpoint says how far it got.
            found = ckpt.latest_valid(run, log=lambda *a: None)
            epochs = max(epochs, int(found[1].get("epoch") or 0)) if found else epochs
        error = str(r.error).strip().splitlines()[-1] if r.error is not None and str(r.error).strip() else None
        rows.append(
            {
                "arm": arm,
                "seed": int(seed),
                "trial": trial,
                "state": "ERROR" if r.error is not None else "TERMINATED" if epochs >= wanted else "STOPPED",
                "epochs": epochs,
                "run": run,
                "trial_dir": storage.join(exp, dirname),
                "error": error,
            }
        )
    order = list(dict.fromkeys([cfg.study.reference, *arms]))
    rows.sort(key=lambda row: (order.index(row["arm"]), row["seed"]))
    return rows


# ---------------------------------------------------------------------------- evaluation


def _renamed(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    # The evaluator names every metric val/<name>, whichever split it measured.
    return {f"{prefix}/{k.split('/', 1)[-1]}": v for k, v in metrics.items()}


def robustness_summary(clean: dict[str, Any], by_corruption: dict, metrics: list[str]) -> dict[str, dict[str, float]]:
    """mPC and rPC of each of ``metrics`` (Michaelis et al. 2019, as :func:`mtseg.evaluate.summarize_robustness`
    defines them for its headline metrics): mPC = mean over corruptions of the mean over severities,
    rPC = mPC / clean. NaN where a pass left the metric undefined.

    Returns:
        metric -> ``{"clean", "mPC", "rPC"}`` for the metrics the clean evaluation has.
    """
    out = {}
    for metric in metrics:
        if metric not in clean:
            continue
        per_corruption = []
        for by_severity in by_corruption.values():
            values = [_number(m.get(metric)) for m in by_severity.values()]
            if values:
                per_corruption.append(sum(values) / len(values))
        mpc = sum(per_corruption) / len(per_corruption) if per_corruption else math.nan
        base = _number(clean[metric])
        out[metric] = {"clean": base, "mPC": mpc, "rPC": mpc / base if math.isfinite(base) and base != 0 else math.nan}
    return out


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def flat_metrics(splits: dict[str, dict[str, Any]], robustness: dict[str, Any] | None) -> dict[str, Any]:
    """One run's metrics under one namespace each.

    ``val/<m>`` on the clean val split, ``train/<m>`` on the (limited) train split, ``gap/<m>`` =
    ``train/<m> - val/<m>`` (positive: better on the images it trained on), ``<split>/<m>`` on each
    extra split, ``mpc/<m>`` and ``rpc/<m>`` (mean performance under corruption, and its ratio
    to the clean value) when corruptions ran.
    """
    out: dict[str, Any] = {}
    for split, metrics in splits.items():
        out.update(_renamed(metrics, split))
    for key, value in splits.get("train", {}).items():
        name = key.split("/", 1)[-1]
        clean = splits.get("val", {}).get(f"val/{name}")
        if isinstance(value, (int, float)) and isinstance(clean, (int, float)):
            out[f"gap/{name}"] = value - clean
    for metric, values in ((robustness or {}).get("summary") or {}).items():
        name = metric.split("/", 1)[-1]
        out[f"mpc/{name}"] = values.get("mPC")
        out[f"rpc/{name}"] = values.get("rPC")
    return out


def evaluation_settings(cfg: Config, arm_cfg: Config, checkpoint: str, meta: dict[str, Any]) -> dict[str, Any]:
    """What one evaluation depends on: a stored one is reused while these are equal (as JSON)."""
    st = cfg.study
    corruptions, severities = corruption_plan(cfg)
    settings = {
        "checkpoint": checkpoint,
        "state_sha256": meta.get("state_sha256"),
        "val_split": arm_cfg.data.val_split,
        "train_split": arm_cfg.data.train_split if st.train_split_limit else None,
        "train_split_limit": st.train_split_limit,
        "train_labeled_fraction": arm_cfg.data.labeled_fraction,
        "extra_splits": list(st.extra_splits),
        "corruptions": corruptions,
        "severities": severities,
    }
    return json.loads(json.dumps(settings))


def evaluate_run(run: dict[str, Any], cfg: Config, arm_cfg: Config, *, log=print) -> dict[str, Any]:
    """Evaluate one finished (arm, seed)'s final model, or reuse its stored evaluation.

    The final model is the run's newest complete checkpoint. It is evaluated with Ray Data (as
    ``mtseg evaluate``) on the clean val split (with the corruption suite when ``study.corruptions``
    names any), on the first ``study.train_split_limit`` train images (of those with labels when the
    arm sets ``data.labeled_fraction``), and on each extra split.

    Args:
        run: a row of :func:`collect_runs`.
        arm_cfg: the arm's config.

    Returns:
        ``{"settings", "checkpoint", "splits": {split: metrics}, "robustness", "metrics"}``, also
        written to ``<trial dir>/study_evaluation.json``.

    Raises:
        StudyError: the run has no complete checkpoint.
    """
    from mtseg.evaluate import evaluate_loaded, load_for_evaluation
    from mtseg.train import checkpoint as ckpt

    where = f"{run['arm']} seed {run['seed']}"
    found = ckpt.latest_valid(run["run"], log=log)
    if found is None:
        raise StudyError(f"{where}: the run {run['run']} has no complete checkpoint to evaluate")
    checkpoint, meta = found
    settings = evaluation_settings(cfg, arm_cfg, checkpoint, meta)
    uri = storage.join(run["trial_dir"], EVALUATION_FILE)
    if storage.exists(uri):
        try:
            stored = json.loads(storage.read_bytes(uri))
        except ValueError:
            stored = {}
        if stored.get("settings") == settings:
            log(f"[study] {where}: evaluation reused from {uri}")
            return stored
    use_gpu = arm_cfg.train.use_gpu

    def measure(split: str, *, limit: int | None = None, labeled_fraction: float = 1.0) -> dict[str, Any]:
        loaded, data_uri, split = load_for_evaluation(checkpoint, None, split, limit=limit, log=log)
        return evaluate_loaded(
            loaded, data_uri, split, limit=limit, use_gpu=use_gpu, labeled_fraction=labeled_fraction, log=log
        ).metrics

    log(f"[study] {where}: evaluating {checkpoint}")
    splits: dict[str, dict[str, Any]] = {}
    robustness = None
    if settings["corruptions"]:
        evaluate_robustness = _robustness_fn()
        loaded, data_uri, split = load_for_evaluation(checkpoint, None, settings["val_split"], log=log)
        result = evaluate_robustness(
            loaded,
            data_uri,
            split,
            corruptions=settings["corruptions"],
            severities=settings["severities"],
            log=log,
            use_gpu=use_gpu,
        )
        splits["val"] = dict(result.clean.metrics)
        robustness = {
            "by_corruption": result.by_corruption,
            "summary": robustness_summary(splits["val"], result.by_corruption, list(cfg.study.metrics)),
        }
    else:
        splits["val"] = measure(settings["val_split"])
    if settings["train_split_limit"]:
        # The gap is to the images the run learned labels from: a semi-supervised run's labelled share.
        splits["train"] = measure(
            settings["train_split"], limit=settings["train_split_limit"], labeled_fraction=settings["train_labeled_fraction"]
        )
    for split in settings["extra_splits"]:
        splits[split] = measure(split)
    record = {
        "arm": run["arm"],
        "seed": run["seed"],
        "trial": run["trial"],
        "settings": settings,
        "checkpoint": checkpoint,
        "epoch": meta.get("epoch"),
        "splits": splits,
        "robustness": robustness,
        "metrics": flat_metrics(splits, robustness),
    }
    from mtseg.train.checkpoint import strict_json

    storage.write_bytes(uri, (strict_json(record, indent=2) + "\n").encode())
    return json.loads(strict_json(record))  # as a reader of the file sees it: undefined values are None


# ---------------------------------------------------------------------------- results


@dataclass
class StudyOutcome:
    """What a finished study produced: ``results.json``'s content, the URIs written, Tune's ``ResultGrid``."""

    results: dict[str, Any]
    paths: dict[str, str]
    markdown: str = ""
    grid: Any = None


def summary_keys(metrics: list[str], extra_splits: list[str], runs: list[dict[str, Any]]) -> list[str]:
    """The keys summarised: each study metric, then its train, gap, extra-split, mPC and rPC
    variants that some run has."""
    present = {k for run in runs for k in (run.get("metrics") or {})}
    keys = []
    for metric in metrics:
        name = metric.split("/", 1)[-1]
        keys += [metric] + [
            k
            for k in (f"train/{name}", f"gap/{name}", *(f"{s}/{name}" for s in extra_splits), f"mpc/{name}", f"rpc/{name}")
            if k in present
        ]
    return keys


def build_results(cfg: Config, arms: dict[str, Config], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``results.json``: the study's settings, each arm's overrides and exact config, every run's
    metrics, the summary (:func:`mtseg.study.stats.summarize`) and the intervals that include 0."""
    st = cfg.study
    corruptions, severities = corruption_plan(cfg)
    overrides = arm_overrides(cfg)
    lower = lower_is_better(list(st.metrics))
    keys = summary_keys(list(st.metrics), list(st.extra_splits), runs)
    summary = summarize(
        runs,
        reference=st.reference,
        keys=keys,
        delta_metrics=list(st.metrics),
        lower_is_better=lower,
        arms=list(arms),
        contrasts=[parse_contrast(text, list(arms)) for text in st.contrasts],
    )
    return {
        "study": {
            "name": st.name,
            "reference": st.reference,
            "seeds": study_seeds(cfg),
            "metrics": list(st.metrics),
            "lower_is_better": lower,
            "corruptions": corruptions,
            "severities": severities,
            "extra_splits": list(st.extra_splits),
            "train_split_limit": st.train_split_limit,
            "contrasts": list(st.contrasts),
            "storage": study_uri(cfg),
        },
        "arms": {
            name: {
                "overrides": overrides[name],
                # train.seed is each run's own (study.seeds); the rest is exactly what every run of the arm trained.
                "config": to_yaml(arm_cfg),
            }
            for name, arm_cfg in arms.items()
        },
        "runs": runs,
        "summary": summary,
        "flags": flags(summary),
    }


def _csv_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return [{k: row.get(k) for k in keys} for row in rows]


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """``results.csv``: one row per arm and key (and ``delta_m``), with its interval and the comparison with the
    reference, then one row per contrast (``arm`` reads ``"a - b"``) and key."""
    rows = []
    for arm, entry in results["summary"]["arms"].items():
        for key, m in entry["metrics"].items():
            p = (entry.get("paired") or {}).get(key) or {}
            rows.append(
                {
                    "arm": arm,
                    "metric": key,
                    "n": m["n"],
                    "mean": m["mean"],
                    "ci_low": m["ci_low"],
                    "ci_high": m["ci_high"],
                    "diff": p.get("mean"),
                    "diff_ci_low": p.get("ci_low"),
                    "diff_ci_high": p.get("ci_high"),
                    "diff_n": p.get("n"),
                    "p_value": p.get("p_value"),
                    "diff_includes_zero": p.get("includes_zero"),
                }
            )
        dm = entry.get("delta_m")
        if dm is not None:
            rows.append(
                {
                    "arm": arm,
                    "metric": "delta_m",
                    "n": dm["n"],
                    "mean": dm["mean"],
                    "ci_low": dm["ci_low"],
                    "ci_high": dm["ci_high"],
                    "diff": dm["mean"],
                    "diff_ci_low": dm["ci_low"],
                    "diff_ci_high": dm["ci_high"],
                    "diff_n": dm["n"],
                    "p_value": dm["p_value"],
                    "diff_includes_zero": dm["includes_zero"],
                }
            )
    for name, by in results["summary"].get("contrasts", {}).items():
        for key, p in by.items():
            rows.append(
                {
                    "arm": name,
                    "metric": key,
                    "n": p["n"],
                    "diff": p["mean"],
                    "diff_ci_low": p["ci_low"],
                    "diff_ci_high": p["ci_high"],
                    "diff_n": p["n"],
                    "p_value": p["p_value"],
                    "diff_includes_zero": p["includes_zero"],
                }
            )
    return _csv_rows(rows)


def write_outputs(cfg: Config, results: dict[str, Any]) -> dict[str, str]:
    """Write ``results.json``, ``results.csv``, ``runs.csv``, ``report.html`` and the report's plots as PNG files
    (:data:`mtseg.study.report.FIGURES`) under the study's ``results/``."""
    from mtseg.study.report import figures, render_html
    from mtseg.train.checkpoint import strict_json

    root = storage.join(study_uri(cfg), RESULTS_DIR)
    paths = {name: storage.join(root, name) for name in (RESULTS_JSON, RESULTS_CSV, RUNS_CSV, REPORT_HTML)}
    run_rows = _csv_rows(
        [
            {k: v for k, v in run.items() if k not in ("metrics", "splits", "robustness", "trial_dir")}
            | (run.get("metrics") or {})
            for run in results["runs"]
        ]
    )
    storage.write_bytes(paths[RESULTS_JSON], (strict_json(results, indent=2) + "\n").encode())
    storage.write_bytes(paths[RESULTS_CSV], to_csv(summary_rows(results)).encode())
    storage.write_bytes(paths[RUNS_CSV], to_csv(run_rows).encode())
    readable = json.loads(strict_json(results))
    storage.write_bytes(paths[REPORT_HTML], render_html(readable).encode())
    for name, png in figures(readable).items():
        paths[name] = storage.join(root, name)
        storage.write_bytes(paths[name], png)
    return paths


# ---------------------------------------------------------------------------- the driver


def run_study(cfg: Config, *, resume: bool = False, restart: bool = False, log=print) -> StudyOutcome:
    """Run (or resume) the study ``cfg.study`` describes on the connected Ray cluster, evaluate every
    finished (arm, seed), and write the results.

    Args:
        cfg: resolved config with a ``study`` section.
        resume: continue the study with its saved config (Tune's restore): finished pairs are
            kept, unfinished and errored ones run again, resuming their Train runs; evaluations
            already stored are reused. :data:`EVALUATION_FIELDS` come from ``cfg``.
        restart: delete the study first and start over.

    Returns:
        The :class:`StudyOutcome`.

    Raises:
        ConfigError: a bad study section or options. StudyError: nothing to resume, a study already
        there, every run failed, or a run left no checkpoint.
    """
    from ray import tune

    from mtseg.study.report import arm_table_markdown, claims_tables_markdown, contrast_table_markdown
    from mtseg.tasks import task_classes

    check_study(cfg, resume=resume, restart=restart)
    exp = study_uri(cfg)
    saved = storage.join(exp, STUDY_CONFIG_FILE)
    fs, path = storage.ray_storage(cfg.train.storage_path)
    exp_path = f"{path}/{cfg.study.name}"
    if restart:
        log(f"[study] --restart: deleting {exp}")
        storage.delete(exp, recursive=True)
    if resume:
        if not tune.Tuner.can_restore(exp_path, storage_filesystem=fs) or not storage.exists(saved):
            raise StudyError(f"{exp}: no study to resume (start it without --resume)")
        cfg = _resumed_config(config_from_dict(yaml.safe_load(storage.read_bytes(saved))), cfg, log)
    elif storage.exists(saved) or tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        raise StudyError(f"{exp}: a study is already there; pass --resume to continue it or --restart to start over")
    else:
        storage.write_bytes(saved, to_yaml(cfg).encode())
    arms = arm_configs(cfg)

    run_cfg = _absolute(cfg)
    spec = StudySpec(
        base=_absolute(arms[cfg.study.reference]).to_dict(),
        runs_uri=storage.join(study_uri(run_cfg), RUNS_DIR),
        init_uri=storage.join(study_uri(run_cfg), PBT_INIT_DIR),
        tasks=task_classes(),
        arms={name: _absolute(arm_cfg).to_dict() for name, arm_cfg in arms.items()},
    )
    if resume:
        log(f"[study] resuming {exp}")
        tuner = tune.Tuner.restore(
            exp_path, trainable=_trainable(spec), resume_unfinished=True, resume_errored=True, storage_filesystem=fs
        )
    else:
        log(
            f"[study] {len(arms)} arms x {cfg.study.seeds} seeds ({', '.join(map(str, study_seeds(cfg)))}), "
            f"{cfg.tune.max_concurrent_trials} runs at once, into {exp}"
        )
        tuner = build_tuner(run_cfg, spec)
    grid = tuner.fit()

    runs = collect_runs(grid, cfg, arms)
    finished = [r for r in runs if r["state"] == "TERMINATED"]
    if not finished:
        first = next((r["error"] for r in runs if r["error"]), None) or "unknown"
        raise StudyError(f"no run of the study finished ({len(runs)} trials); first error: {first}")
    for run in runs:
        if run["state"] != "TERMINATED":
            log(f"[study] WARNING: {run['arm']} seed {run['seed']} {run['state']}: {run['error'] or 'not finished'}; left out")
            run["metrics"] = None
            continue
        record = evaluate_run(run, cfg, arms[run["arm"]], log=log)
        run.update(
            checkpoint=record["checkpoint"], splits=record["splits"], robustness=record["robustness"], metrics=record["metrics"]
        )
    results = build_results(cfg, arms, runs)
    paths = write_outputs(cfg, results)
    for line in results["flags"]:
        log(f"[study] note: {line}")
    return StudyOutcome(
        results=results,
        paths=paths,
        markdown="\n".join(
            t for t in (arm_table_markdown(results), contrast_table_markdown(results), claims_tables_markdown(results)) if t
        ),
        grid=grid,
    )
