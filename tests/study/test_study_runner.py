"""The study driver's parts that need no Ray (mtseg/study/runner.py): Tune's results as rows, one run's
metric names, mPC and rPC, and an evaluation reused while it matches its checkpoint and settings."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

import mtseg.evaluate
from mtseg import storage
from mtseg.config import arm_configs
from mtseg.study.runner import EVALUATION_FILE, collect_runs, evaluate_run, flat_metrics, robustness_summary, study_uri
from mtseg.train import checkpoint as ckpt


def _result(arm, seed, epoch, *, error=None, trial="t"):
    return SimpleNamespace(
        config={"arm": arm, "train.seed": seed},
        metrics={"trial_id": trial, "train/epoch": epoch, "run_name": trial},
        error=error,
        path=f"bucket/prefix/s/trial_{trial}",
    )


def test_tune_results_become_rows_in_arm_then_seed_order(study_cfg):
    cfg = study_cfg(arms={"single": {}, "mtl": {"tasks.names": "[semantic, boundary]", "train.epochs": 3}})
    arms = arm_configs(cfg)
    cfg_epochs = cfg.train.epochs
    results = [
        _result("mtl", 1, 3, trial="m1"),
        _result("mtl", 0, 2, trial="m0"),  # stopped before the arm's own 3 epochs
        _result("single", 1, cfg_epochs, error=RuntimeError("boom\nlast line"), trial="s1"),
        _result("single", 0, cfg_epochs, trial="s0"),
        SimpleNamespace(config={}, metrics={}, error=None, path="x"),  # not a study trial
    ]
    rows = collect_runs(results, cfg, arms)
    assert [(r["arm"], r["seed"], r["state"]) for r in rows] == [
        ("single", 0, "TERMINATED"),
        ("single", 1, "ERROR"),
        ("mtl", 0, "STOPPED"),
        ("mtl", 1, "TERMINATED"),
    ]
    # A run that had finished when its driver was lost ends its resumed trial with no epoch result.
    ckpt.save(storage.join(study_uri(cfg), "runs", "m0", "checkpoint_000003"), {"model": {}}, {"epoch": 3, "step": 18})
    results[1].metrics = {"trial_id": "m0"}
    assert [(r["arm"], r["seed"], r["state"], r["epochs"]) for r in collect_runs(results, cfg, arms)][2] == (
        "mtl",
        0,
        "TERMINATED",
        3,
    )
    # The reference arm comes first, whatever the order of the arms.
    reordered = study_cfg(arms={"mtl": {"tasks.names": "[semantic, boundary]"}, "single": {}})
    assert [r["arm"] for r in collect_runs(results, reordered, arm_configs(reordered))] == ["single", "single", "mtl", "mtl"]
    assert rows[1]["error"] == "last line"
    assert rows[0]["run"] == storage.join(study_uri(cfg), "runs", "s0")
    assert rows[0]["trial_dir"] == storage.join(study_uri(cfg), "trial_s0")


def test_metric_names_per_split_and_the_train_val_gap():
    splits = {"val": {"val/miou": 0.5, "val/pq": math.nan}, "train": {"val/miou": 0.7}, "domain_b": {"val/miou": 0.3}}
    robustness = {"summary": {"val/miou": {"clean": 0.5, "mPC": 0.4, "rPC": 0.8}}}
    out = flat_metrics(splits, robustness)
    assert out["val/miou"] == 0.5 and out["train/miou"] == 0.7 and out["domain_b/miou"] == 0.3
    assert out["gap/miou"] == pytest.approx(0.2) and "gap/pq" not in out
    assert (out["mpc/miou"], out["rpc/miou"]) == (0.4, 0.8)


def test_mpc_and_rpc_are_those_of_the_corruption_suite():
    clean = {"val/miou": 0.5, "val/boundary_f1": 0.4}
    by = {"fog": {1: {"val/miou": 0.45, "val/boundary_f1": 0.3}, 2: {"val/miou": 0.35, "val/boundary_f1": 0.2}}}
    by["snow"] = {1: {"val/miou": 0.4, "val/boundary_f1": 0.3}, 2: {"val/miou": 0.2, "val/boundary_f1": 0.1}}
    out = robustness_summary(clean, by, ["val/miou", "val/boundary_f1", "val/pq"])
    assert set(out) == {"val/miou", "val/boundary_f1"}  # the model has no PQ
    assert out["val/miou"]["mPC"] == pytest.approx(0.35) and out["val/miou"]["rPC"] == pytest.approx(0.7)
    assert out["val/boundary_f1"]["mPC"] == pytest.approx(0.225)
    if hasattr(mtseg.evaluate, "summarize_robustness"):
        theirs = mtseg.evaluate.summarize_robustness(clean, by, ["val/miou"])
        assert theirs["val/miou"]["mPC"] == pytest.approx(out["val/miou"]["mPC"])
        assert theirs["val/miou"]["rPC"] == pytest.approx(out["val/miou"]["rPC"])


def test_an_evaluation_is_reused_while_its_checkpoint_and_settings_match(tmp_path, study_cfg, monkeypatch):
    cfg = study_cfg(train_split_limit=4)
    arm_cfg = arm_configs(cfg)["single"]
    run = {
        "arm": "single",
        "seed": 0,
        "trial": "t0",
        "run": str(tmp_path / "runs" / "t0"),
        "trial_dir": str(tmp_path / "trial_t0"),
    }
    ckpt.save(str(tmp_path / "runs" / "t0" / "checkpoint_000001"), {"model": {}}, {"epoch": 1, "step": 6})
    calls: list[tuple[str, int | None]] = []

    def load_for_evaluation(checkpoint, data_uri, split, *, limit=None, log=print):
        return SimpleNamespace(uri=checkpoint), "data", split

    fractions: list[float] = []

    def evaluate_loaded(loaded, data_uri, split, *, limit=None, use_gpu="auto", labeled_fraction=1.0, log=print):
        calls.append((split, limit))
        fractions.append(labeled_fraction)
        return SimpleNamespace(metrics={"val/miou": 0.5 if split == "val2017" else 0.75, "val/pq": math.nan})

    monkeypatch.setattr(mtseg.evaluate, "load_for_evaluation", load_for_evaluation)
    monkeypatch.setattr(mtseg.evaluate, "evaluate_loaded", evaluate_loaded)
    first = evaluate_run(run, cfg, arm_cfg, log=lambda line: None)
    assert calls == [("val2017", None), ("train2017", 4)]
    assert first["metrics"]["gap/miou"] == pytest.approx(0.25) and first["metrics"]["val/pq"] is None
    stored = json.loads(storage.read_bytes(str(tmp_path / "trial_t0" / EVALUATION_FILE)))
    assert stored == first and stored["checkpoint"].endswith("checkpoint_000001")

    logged: list[str] = []
    assert evaluate_run(run, cfg, arm_cfg, log=logged.append) == first and len(calls) == 2
    assert logged == [f"[study] single seed 0: evaluation reused from {tmp_path / 'trial_t0' / EVALUATION_FILE}"]
    # Another setting, or a newer checkpoint: evaluated again.
    evaluate_run(run, study_cfg(train_split_limit=8), arm_cfg, log=lambda line: None)
    assert calls[-1] == ("train2017", 8)
    ckpt.save(str(tmp_path / "runs" / "t0" / "checkpoint_000002"), {"model": {}}, {"epoch": 2, "step": 12})
    assert evaluate_run(run, study_cfg(train_split_limit=8), arm_cfg, log=lambda line: None)["epoch"] == 2
    assert len(calls) == 6
    assert fractions == [1.0] * 6
    # A semi-supervised arm's gap is to the train images it kept labelled.
    semi = arm_configs(study_cfg(train_split_limit=8, arms={"single": {"data.labeled_fraction": 0.25}, "mtl": {}}))["single"]
    evaluate_run(run, study_cfg(train_split_limit=8), semi, log=lambda line: None)
    assert calls[-2:] == [("val2017", None), ("train2017", 8)] and fractions[-2:] == [1.0, 0.25]


def test_corruptions_run_the_suite_on_the_val_split(tmp_path, study_cfg, monkeypatch):
    if not hasattr(mtseg.evaluate, "evaluate_robustness"):
        pytest.skip("no corruption suite in this mtseg")
    cfg = study_cfg(corruptions="fog, snow", severities="1-2")
    run = {
        "arm": "single",
        "seed": 1,
        "trial": "t1",
        "run": str(tmp_path / "runs" / "t1"),
        "trial_dir": str(tmp_path / "trial_t1"),
    }
    ckpt.save(str(tmp_path / "runs" / "t1" / "checkpoint_000001"), {"model": {}}, {"epoch": 1, "step": 6})
    asked = {}

    def evaluate_robustness(loaded, data_uri, split, *, corruptions, severities, log=print, **options):
        asked.update(split=split, corruptions=corruptions, severities=severities)
        by = {c: {s: {"val/miou": 0.5 - 0.1 * s} for s in severities} for c in corruptions}
        return SimpleNamespace(clean=SimpleNamespace(metrics={"val/miou": 0.5}), by_corruption=by, summary={})

    monkeypatch.setattr(mtseg.evaluate, "load_for_evaluation", lambda c, d, s, **k: (SimpleNamespace(uri=c), "data", s))
    monkeypatch.setattr(mtseg.evaluate, "evaluate_robustness", evaluate_robustness)
    record = evaluate_run(run, cfg, arm_configs(cfg)["single"], log=lambda line: None)
    assert asked == {"split": "val2017", "corruptions": ["fog", "snow"], "severities": [1, 2]}
    assert record["robustness"]["by_corruption"]["fog"] == {"1": {"val/miou": 0.4}, "2": {"val/miou": 0.3}}
    assert record["metrics"]["mpc/miou"] == pytest.approx(0.35) and record["metrics"]["rpc/miou"] == pytest.approx(0.7)
