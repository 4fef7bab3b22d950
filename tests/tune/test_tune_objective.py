"""Δm% and the single-task baselines it is measured against (mtseg/tune/objective.py)."""

from __future__ import annotations

import json
import math

import pytest

from mtseg import storage
from mtseg.config import TASK_NAMES
from mtseg.tune import baseline_config, baseline_key, delta_m, ensure_baselines, task_objective


def test_delta_m_is_the_mean_relative_gain_in_percent():
    baselines = {
        "semantic": {"metric": "val/miou", "value": 0.40},
        "boundary": {"metric": "val/boundary_f1", "value": 0.50},
    }
    metrics = {"val/miou": 0.44, "val/boundary_f1": 0.45}
    assert delta_m(metrics, baselines, ["semantic", "boundary"]) == pytest.approx(100 * (0.10 + -0.10) / 2)
    assert delta_m(metrics, baselines, ["semantic"]) == pytest.approx(10.0)


def test_delta_m_leaves_out_tasks_without_a_usable_baseline():
    baselines = {
        "semantic": {"metric": "val/miou", "value": 0.40},
        "instance": {"metric": "val/mask_ap", "value": 0.0},  # no relative gain over zero
        "boundary": {"metric": "val/boundary_f1", "value": None},
    }
    metrics = {"val/miou": 0.50, "val/mask_ap": 0.1, "val/boundary_f1": 0.3}
    assert delta_m(metrics, baselines, ["semantic", "instance", "boundary"]) == pytest.approx(25.0)
    assert math.isnan(delta_m(metrics, {}, ["semantic"]))
    assert math.isnan(delta_m({"val/miou": float("nan")}, baselines, ["semantic"]))


def test_baselines_train_each_task_on_its_own_recipe(make_cfg):
    cfg = make_cfg(
        {"weighting.name": "grid[equal, uncertainty]"},
        tasks={"names": list(TASK_NAMES)},
        weighting={"name": "static", "static": {"semantic": 3.0}},
    )
    # supercategory, boundary and instance refine semantic: their baselines train it beside them.
    expected = {
        "semantic": ("semantic",),
        "supercategory": ("semantic", "supercategory"),
        "boundary": ("semantic", "boundary"),
        "instance": ("semantic", "instance"),
        "reconstruction": ("reconstruction",),
    }
    for task in TASK_NAMES:
        b = baseline_config(cfg, task)
        assert tuple(b.tasks.names) == expected[task] == task_objective(task)[2]
        assert b.weighting.name == "equal" and b.weighting.static == {}
    assert {t: task_objective(t)[:2] for t in TASK_NAMES} == {
        "semantic": ("val/miou", True),
        "supercategory": ("val/supercategory_miou", True),
        "boundary": ("val/boundary_f1", True),
        "instance": ("val/mask_ap", True),
        "reconstruction": ("val/psnr", True),
    }


def test_baseline_key_follows_the_recipe_not_the_location(make_cfg):
    cfg = make_cfg({"weighting.name": "grid[equal, uncertainty]"})
    key = baseline_key(baseline_config(cfg, "semantic"))
    moved = make_cfg(
        {"train.lr": "loguniform[1e-3, 1e-2]"},
        train={"storage_path": "s3://other/x", "run_name": "r"},
        tune={"experiment_name": "other"},
        weighting={"name": "uncertainty"},
    )
    assert baseline_key(baseline_config(moved, "semantic")) == key
    assert baseline_key(baseline_config(make_cfg({}, model={"backbone": "resnet34"}), "semantic")) != key
    assert baseline_key(baseline_config(make_cfg({}, train={"epochs": 3}), "semantic")) != key
    assert baseline_key(baseline_config(cfg, "boundary")) != key


def test_cached_baselines_are_reused_without_training(tmp_path, make_cfg):
    cfg = make_cfg({"weighting.name": "grid[equal, uncertainty]"}, train={"storage_path": str(tmp_path)})
    for task, value in (("semantic", 0.3), ("boundary", 0.6)):
        key = baseline_key(baseline_config(cfg, task))
        record = {"task": task, "metric": task_objective(task)[0], "value": value, "key": key}
        storage.write_bytes(str(tmp_path / "baselines" / f"{key}.json"), json.dumps(record).encode())
    # No Ray here: a cache miss would try to train and fail.
    got = ensure_baselines(cfg, log=lambda *a: None)
    assert {t: b["value"] for t, b in got.items()} == {"semantic": 0.3, "boundary": 0.6}
