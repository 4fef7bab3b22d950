"""What a search leaves (mtseg/tune/results.py): the trial table and the best config."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import yaml

from mtseg import storage
from mtseg.config import load_config
from mtseg.tune import best_train_config, summarize, to_csv, to_markdown, validate_search, write_results


def _fake_result(trial, config, rows, error=None):
    return SimpleNamespace(
        config=config,
        metrics={"trial_id": trial, **rows[-1]},
        error=error,
        path=f"/x/trial_{trial}",
        metrics_dataframe=pd.DataFrame(rows),
    )


def test_summary_table_and_best_config(tmp_path, make_cfg):
    space = {"weighting.name": "grid[equal, uncertainty]", "train.lr": "loguniform[1e-3, 1e-2]"}
    cfg = make_cfg(space, train={"epochs": 2, "storage_path": str(tmp_path)}, tune={"experiment_name": "exp"})
    params = validate_search(cfg)
    results = [
        _fake_result(
            "a",
            {"weighting.name": "equal", "train.lr": 0.002},
            [{"train/epoch": 1, "val/miou": 0.2, "val/mask_ap": 0.01}, {"train/epoch": 2, "val/miou": 0.3, "val/mask_ap": 0.02}],
        ),
        _fake_result(
            "b", {"weighting.name": "uncertainty", "train.lr": 0.005}, [{"train/epoch": 1, "val/miou": 0.1, "val/mask_ap": 0.0}]
        ),
        _fake_result(
            "c", {"weighting.name": "equal", "train.lr": 0.001}, [{"train/epoch": 1, "val/miou": 0.5}], error=RuntimeError("x")
        ),
    ]
    rows = summarize(results, cfg, params)
    assert [(r["trial"], r["state"], r["epochs"]) for r in rows] == [
        ("c", "ERROR", 1),
        ("a", "TERMINATED", 2),
        ("b", "STOPPED", 1),
    ]
    assert rows[1]["val/miou"] == 0.3 and rows[1]["val/mask_ap"] == 0.02 and rows[1]["train.lr"] == 0.002
    md = to_markdown(rows)
    assert md.splitlines()[0].startswith("| trial | state | epochs | weighting.name | train.lr | val/miou")
    assert len(to_csv(rows).strip().splitlines()) == 4

    outcome = write_results(cfg, rows, params, {})
    assert outcome.best["trial"] == "a"  # the errored trial is never the best
    text = storage.read_bytes(outcome.paths["best_config"]).decode()
    best = yaml.safe_load(text)
    assert best["weighting"]["name"] == "equal" and best["train"]["lr"] == 0.002
    assert best["train"]["run_name"] == "exp-best" and best["tune"]["space"] == {}
    assert load_config(outcome.paths["best_config"]).train.lr == 0.002
    assert storage.exists(outcome.paths["csv"]) and storage.exists(outcome.paths["markdown"])
    assert best_train_config(cfg, rows[1], params).train.storage_path == str(tmp_path)
