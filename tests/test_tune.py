"""Ray Tune search: space parsing and validation, Δm%, checkpoint rebasing, results; and end to end
on a local Ray head with trials streaming from SeaweedFS (ASHA, PBT, resume after a kill).

The end-to-end searches are tiny (32 px, 48 images, one worker of half a CPU per trial, two
trials at once on 2 cores). A trial that can't learn (static weights of zero) makes the early
stop and the exploit deterministic.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml

from mtseg import storage
from mtseg.config import ConfigError, config_from_dict, load_config
from mtseg.train import checkpoint as ckpt
from mtseg.tune import (
    DELTA_M,
    OBJECTIVES,
    SearchError,
    baseline_config,
    baseline_key,
    best_train_config,
    delta_m,
    ensure_baselines,
    parse_param,
    rebase_checkpoint,
    run_tune,
    summarize,
    to_csv,
    to_markdown,
    trial_config,
    trial_metrics,
    validate_search,
    write_results,
)

# ---------------------------------------------------------------------------- search space


def _cfg(space: dict, **sections) -> object:
    data = {"tasks": {"names": ["semantic", "boundary"]}, "tune": {"space": space}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data)


def test_every_form_parses_into_the_keys_type():
    assert parse_param("weighting.name", "choice[equal, uncertainty]").values == ("equal", "uncertainty")
    assert parse_param("model.decoder_channels", "grid[64, 128]").values == (64, 128)
    assert parse_param("train.lr", "loguniform[1e-4, 1e-2]").values == (1e-4, 1e-2)
    assert parse_param("weighting.static.semantic", "uniform[0.5, 2]").values == (0.5, 2.0)
    assert parse_param("train.epochs", "randint[2, 4]").values == (2, 4)
    names = parse_param("tasks.names", "choice[[semantic], [semantic, boundary]]")
    assert names.values == (["semantic"], ["semantic", "boundary"])


def test_randint_includes_its_upper_bound():
    domain = parse_param("train.epochs", "randint[2, 3]").domain()
    assert {domain.sample() for _ in range(200)} == {2, 3}


@pytest.mark.parametrize("key, text, message", [
    ("weighting.name", "choice[equal, bogus]", "'bogus' is not one of"),
    ("train.lr", "0.01", "is not one of choice["),
    ("train.lr", "uniform[0.1]", "takes two bounds"),
    ("train.lr", "loguniform[0, 1]", "bounds > 0"),
    ("train.epochs", "uniform[1, 3]", "use randint"),
    ("model.backbone", "loguniform[1, 2]", "needs a float key"),
    ("train.lr", "randint[1, 3]", "needs an integer key"),
    ("train.epochs", "randint[3, 1]", "lo < hi"),
    ("data.scale_min", "uniform[0.01, 0.5]", "below the minimum"),
    ("weighting.nmae", "choice[equal]", "unknown key"),
    ("model.backbone", "choice[]", "at least one value"),
])
def test_a_bad_entry_is_one_line_naming_the_key(key, text, message):
    with pytest.raises(ConfigError, match="^tune.space") as e:
        parse_param(key, text)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_space_combinations_are_validated_before_any_trial():
    cfg = _cfg({"weighting.name": "choice[equal, dwa]", "tasks.names": "choice[[semantic], [semantic, boundary]]"})
    with pytest.raises(ConfigError, match="dwa needs at least two tasks"):
        validate_search(cfg)
    cfg = _cfg({"weighting.static.instance": "uniform[0.5, 2]"}, weighting={"name": "static"})
    with pytest.raises(ConfigError, match="'instance' is not trained"):
        validate_search(cfg)
    with pytest.raises(ConfigError, match="tune.space: empty"):
        validate_search(_cfg({}))


def test_scheduler_and_search_rules():
    space = {"weighting.name": "grid[equal, uncertainty]"}
    with pytest.raises(ConfigError, match="grace_period"):
        validate_search(_cfg(space, tune={"grace_period": 5}, train={"epochs": 2}))
    optuna_cfg = _cfg({"weighting.name": "choice[equal, uncertainty]"}, tune={"search_alg": "optuna"})
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="optuna is not installed"):
            validate_search(optuna_cfg)
    else:
        validate_search(optuna_cfg)
        with pytest.raises(ConfigError, match="write choice"):
            validate_search(_cfg(space, tune={"search_alg": "optuna"}))
    pbt = {"scheduler": "pbt", "perturbation_interval": 1}
    with pytest.raises(ConfigError, match="cannot change it inside a running trial"):
        validate_search(_cfg({"model.decoder_channels": "choice[16, 32]"}, tune=pbt, train={"epochs": 3}))
    with pytest.raises(ConfigError, match="only with weighting.name: static"):
        validate_search(_cfg({"weighting.static.semantic": "uniform[0.5, 2]"}, tune=pbt, train={"epochs": 3}))
    with pytest.raises(ConfigError, match="needs at least one mutated key"):
        validate_search(_cfg(space, tune=pbt, train={"epochs": 3}))
    with pytest.raises(ConfigError, match="perturbation_interval"):
        validate_search(_cfg({"train.lr": "loguniform[1e-3, 1e-2]"}, tune=pbt, train={"epochs": 1}))
    ok = _cfg({"weighting.static.semantic": "uniform[0.5, 2]", "model.decoder_channels": "grid[16, 32]"},
              tune=pbt, train={"epochs": 3}, weighting={"name": "static"})
    assert list(validate_search(ok)) == ["weighting.static.semantic", "model.decoder_channels"]


def test_trial_config_sets_dotted_keys_including_dict_entries():
    base = _cfg({"train.lr": "loguniform[1e-3, 1e-2]"}).to_dict()
    cfg = trial_config(base, {"weighting.name": "static", "weighting.static.semantic": 0.3, "train.lr": 0.004})
    assert cfg.weighting.static == {"semantic": 0.3} and cfg.train.lr == 0.004
    assert base["weighting"]["static"] == {}  # the base is not modified


def test_invalid_space_fails_in_the_cli_before_anything_starts(tmp_path, capsys):
    from mtseg.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({
        "train": {"storage_path": str(tmp_path / "store")},
        "tasks": {"names": ["semantic", "boundary"]},
        "tune": {"space": {"weighting.name": "choice[equal, nonsense]"}},
    }))
    assert main(["tune", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtseg: error: tune.space.weighting.name:") and err.count("\n") == 1
    assert not (tmp_path / "store").exists()


def test_an_existing_experiment_is_not_overwritten_without_resume(tmp_path):
    cfg = _cfg({"weighting.name": "grid[equal, uncertainty]"}, train={"storage_path": str(tmp_path)},
               tune={"experiment_name": "exp"})
    storage.write_bytes(str(tmp_path / "exp" / "tune_config.yaml"), b"{}\n")
    with pytest.raises(SearchError, match="pass --resume"):
        run_tune(cfg, delta_m=False)
    with pytest.raises(SearchError, match="no experiment to resume"):
        run_tune(config_from_dict({**cfg.to_dict(), "tune": {**cfg.to_dict()["tune"], "experiment_name": "none"}}),
                 resume=True, delta_m=False)


def test_a_restored_generator_does_not_count_trials_as_running(tmp_path):
    """Tune's experiment and generator states upload separately; a kill between them must not
    leave the generator waiting for a trial that already finished."""
    from ray.tune.experiment import Experiment

    from mtseg.tune.search import _search_alg

    cfg = _cfg({"weighting.name": "grid[equal, uncertainty]"}, tune={"max_concurrent_trials": 1})
    gen = _search_alg(cfg)
    gen.add_configurations(Experiment("exp", lambda config: None, storage_path=str(tmp_path),
                                      config={"weighting.name": {"grid_search": ["equal", "uncertainty"]}}))
    first = gen.next_trial()
    assert first is not None and gen.next_trial() is None  # one running, limit reached
    restored = _search_alg(cfg)
    restored.set_state(gen.get_state())  # the trial finished, but this state predates that
    assert restored.next_trial() is not None


def test_a_restored_optuna_search_does_not_count_trials_as_running():
    pytest.importorskip("optuna")
    from ray import tune

    from mtseg.tune.search import _search_alg

    cfg = _cfg({"train.lr": "loguniform[0.001, 0.01]"}, tune={"search_alg": "optuna", "max_concurrent_trials": 1})
    alg = _search_alg(cfg)
    alg.set_search_properties("val/miou", "max", {"train.lr": tune.loguniform(0.001, 0.01)})
    assert 0.001 <= alg.suggest("a")["train.lr"] <= 0.01
    assert alg.suggest("b") is None  # one running, limit reached
    restored = _search_alg(cfg)
    restored.set_search_properties("val/miou", "max", {"train.lr": tune.loguniform(0.001, 0.01)})
    restored.set_state(alg.get_state())
    assert restored.suggest("c") is not None


# ---------------------------------------------------------------------------- Δm%


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


def test_trial_metrics_add_delta_m_only_with_baselines():
    cfg = _cfg({"train.lr": "loguniform[1e-3, 1e-2]"})
    m = {"val/miou": 0.5, "val/boundary_f1": 0.5, "train/epoch": 1}
    base = {"semantic": {"metric": "val/miou", "value": 0.25}}
    assert trial_metrics(m, cfg, base)[DELTA_M] == pytest.approx(100.0)
    assert DELTA_M not in trial_metrics(m, cfg, {})


def test_baselines_train_each_task_on_its_own_recipe():
    cfg = _cfg({"weighting.name": "grid[equal, uncertainty]"}, tasks={"names": list(OBJECTIVES)},
               weighting={"name": "static", "static": {"semantic": 3.0}})
    for task, objective in OBJECTIVES.items():
        b = baseline_config(cfg, task)
        assert tuple(b.tasks.names) == objective.baseline_tasks
        assert b.weighting.name == "equal" and b.weighting.static == {}
    assert OBJECTIVES["reconstruction"].baseline_tasks == ("reconstruction",)


def test_baseline_key_follows_the_recipe_not_the_location():
    cfg = _cfg({"weighting.name": "grid[equal, uncertainty]"})
    key = baseline_key(baseline_config(cfg, "semantic"))
    moved = _cfg({"train.lr": "loguniform[1e-3, 1e-2]"}, train={"storage_path": "s3://other/x", "run_name": "r"},
                 tune={"experiment_name": "other"}, weighting={"name": "uncertainty"})
    assert baseline_key(baseline_config(moved, "semantic")) == key
    assert baseline_key(baseline_config(_cfg({}, model={"backbone": "resnet34"}), "semantic")) != key
    assert baseline_key(baseline_config(_cfg({}, train={"epochs": 3}), "semantic")) != key
    assert baseline_key(baseline_config(cfg, "boundary")) != key


def test_cached_baselines_are_reused_without_training(tmp_path):
    cfg = _cfg({"weighting.name": "grid[equal, uncertainty]"}, train={"storage_path": str(tmp_path)})
    for task, value in (("semantic", 0.3), ("boundary", 0.6)):
        key = baseline_key(baseline_config(cfg, task))
        record = {"task": task, "metric": OBJECTIVES[task].metric, "value": value, "key": key}
        storage.write_bytes(str(tmp_path / "baselines" / f"{key}.json"), json.dumps(record).encode())
    # No Ray here: a cache miss would try to train and fail.
    got = ensure_baselines(cfg, log=lambda *a: None)
    assert {t: b["value"] for t, b in got.items()} == {"semantic": 0.3, "boundary": 0.6}


# ---------------------------------------------------------------------------- PBT checkpoints


def test_rebase_checkpoint_swaps_lr_and_static_weights_and_keeps_the_rest(tmp_path):
    from mtseg.data.categories import CategoryIndex
    from mtseg.train.loop import build_state

    cats = CategoryIndex.from_categories([{"id": 1, "name": "a", "supercategory": "s"}, {"id": 5, "name": "b", "supercategory": "s"}])
    donor = load_config(None, ["tasks.names=[semantic, boundary]", "weighting.name=static", "weighting.static={semantic: 1.0, boundary: 2.0}",
                               "train.lr=0.004", "train.warmup_steps=0", "model.decoder_channels=8", "data.image_size=32", "tasks.patch_size=4"])
    state = build_state(donor, cats, total_steps=10, device=torch.device("cpu"))
    for _ in range(3):
        state.optimizer.step()
        state.scheduler.step()
    state.step, state.epoch = 3, 1
    lr_now = state.optimizer.param_groups[0]["lr"]
    ckpt.save(str(tmp_path / "src"), state.state_dict(), state.meta())

    mutated = load_config(None, ["tasks.names=[semantic, boundary]", "weighting.name=static", "weighting.static={semantic: 1.0, boundary: 0.5}",
                                 "train.lr=0.002", "train.warmup_steps=0", "model.decoder_channels=8", "data.image_size=32", "tasks.patch_size=4"])
    meta = rebase_checkpoint(str(tmp_path / "src"), str(tmp_path / "dst"), mutated)
    assert meta["step"] == 3 and meta["epoch"] == 1
    loaded, _ = ckpt.load(str(tmp_path / "dst"))
    assert loaded["weighting"]["weights"].tolist() == [1.0, 0.5]
    assert loaded["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr_now / 2)
    assert loaded["scheduler"]["base_lrs"] == [0.002]
    for k, v in state.module.state_dict().items():
        assert torch.equal(loaded["model"][k], v)

    # The rebased state loads into a run of the mutated config and continues its schedule.
    fresh = build_state(mutated, cats, total_steps=10, device=torch.device("cpu"))
    fresh.load_state_dict(loaded)
    fresh.optimizer.step()
    fresh.scheduler.step()
    from mtseg.train.optim import lr_factor

    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(0.002 * lr_factor(4, 10, mutated.train))
    assert fresh.strategy.weights.tolist() == [1.0, 0.5]


# ---------------------------------------------------------------------------- results


def _fake_result(trial, config, rows, error=None):
    return SimpleNamespace(config=config, metrics={"trial_id": trial, **rows[-1]}, error=error,
                           path=f"/x/trial_{trial}", metrics_dataframe=pd.DataFrame(rows))


def test_summary_table_and_best_config(tmp_path):
    space = {"weighting.name": "grid[equal, uncertainty]", "train.lr": "loguniform[1e-3, 1e-2]"}
    cfg = _cfg(space, train={"epochs": 2, "storage_path": str(tmp_path)}, tune={"experiment_name": "exp"})
    params = validate_search(cfg)
    results = [
        _fake_result("a", {"weighting.name": "equal", "train.lr": 0.002},
                     [{"train/epoch": 1, "val/miou": 0.2, "val/mask_ap": 0.01}, {"train/epoch": 2, "val/miou": 0.3, "val/mask_ap": 0.02}]),
        _fake_result("b", {"weighting.name": "uncertainty", "train.lr": 0.005},
                     [{"train/epoch": 1, "val/miou": 0.1, "val/mask_ap": 0.0}]),
        _fake_result("c", {"weighting.name": "equal", "train.lr": 0.001}, [{"train/epoch": 1, "val/miou": 0.5}], error=RuntimeError("x")),
    ]
    rows = summarize(results, cfg, params)
    assert [(r["trial"], r["state"], r["epochs"]) for r in rows] == [("c", "ERROR", 1), ("a", "TERMINATED", 2), ("b", "STOPPED", 1)]
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


# ---------------------------------------------------------------------------- end to end (Ray + SeaweedFS)

BASE = {
    "data": {"image_size": 32, "batch_size": 4, "rows_per_read_task": 8, "map_num_cpus": 0.25},
    "model": {"decoder_channels": 16},
    "tasks": {"names": ["semantic", "boundary"], "patch_size": 4, "center_sigma": 1.5},
    "weighting": {"name": "static", "static": {"semantic": 1.0, "boundary": 0.0}},
    "train": {"num_workers": 1, "cpus_per_worker": 0.5, "epochs": 2, "warmup_steps": 2, "lr": 0.003,
              "checkpoint_every_steps": 0, "log_every_steps": 4, "keep_checkpoints": 2, "max_failures": 1},
}
STEPS_PER_EPOCH = 48 // 4  # one worker, batch 4, the tiny dataset's 48 training images


def _write_cfg(tmp_path, data_uri, storage_path, tune: dict, **sections) -> str:
    tree = json.loads(json.dumps(BASE))
    tree["data"]["uri"] = data_uri
    tree["train"]["storage_path"] = storage_path
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    tree["tune"] = tune
    path = tmp_path / f"{tune['experiment_name']}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


@pytest.fixture
def _in_tmp(tmp_path, monkeypatch):
    """TensorBoard events of S3-stored runs go to ./runs/<name>: keep them per test."""
    monkeypatch.chdir(tmp_path)


def _runs(cfg) -> dict[str, str]:
    from mtseg.tune import experiment_uri

    return {os.path.basename(d.rstrip("/")): d for d in storage.list_dirs(storage.join(experiment_uri(cfg), "runs"))}


def _load_checkpoint(uri: str) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory() as d:
        return ckpt.load(ckpt.download(uri, d))


@pytest.mark.slow
def test_asha_search_stops_weak_trials_and_its_best_config_trains(ray_local, tiny_dataset, s3_bucket, tmp_path, _in_tmp):
    from mtseg.train.trainer import run_training

    path = _write_cfg(tmp_path, tiny_dataset, s3_bucket, {
        "experiment_name": "asha", "scheduler": "asha", "grace_period": 1, "reduction_factor": 2,
        "max_concurrent_trials": 2, "num_samples": 1,
        # Training is seeded, so each config's epoch-1 mIoU is fixed. In grid order the last
        # trial is (static, semantic only), the slowest starter here: with two trials at once it
        # reaches the epoch-1 rung after at least two others, below their median.
        "space": {"weighting.name": "grid[uncertainty, static]", "weighting.static.semantic": "grid[0.0, 1.0]"},
    })
    cfg = load_config(path)
    outcome = run_tune(cfg, delta_m=False)

    rows = {(r["weighting.name"], r["weighting.static.semantic"]): r for r in outcome.rows}
    assert len(rows) == 4 and all(r["state"] != "ERROR" for r in rows.values())
    weak = rows[("static", 1.0)]
    assert weak["state"] == "STOPPED" and weak["epochs"] == 1
    assert any(r["state"] == "TERMINATED" and r["epochs"] == 2 for r in rows.values())
    assert outcome.best["state"] == "TERMINATED" and outcome.best["val/miou"] > weak["val/miou"]
    # Each trial trained in its own Train run, streaming from and checkpointing into the bucket.
    runs = _runs(cfg)
    assert set(runs) == {r["trial"] for r in rows.values()}
    assert all(c.startswith("s3://") for c in ckpt.list_checkpoints(runs[weak["trial"]]))
    md = storage.read_bytes(outcome.paths["markdown"]).decode()
    assert md.count("\n") == 6 and "STOPPED" in md
    assert len(storage.read_bytes(outcome.paths["csv"]).decode().strip().splitlines()) == 5

    with tempfile.TemporaryDirectory() as d:
        best_path = os.path.join(d, "best.yaml")
        with open(best_path, "wb") as f:
            f.write(storage.read_bytes(outcome.paths["best_config"]))
        best = load_config(best_path, ["train.epochs=1", f"train.storage_path={s3_bucket}/best"])
    assert best.weighting.name == outcome.best["weighting.name"] and best.data.uri == tiny_dataset
    result = run_training(best)
    assert result.error is None and "val/miou" in result.metrics


@pytest.mark.slow
def test_optuna_samples_the_ranges_and_writes_the_table(ray_local, tiny_dataset, s3_bucket, tmp_path, _in_tmp):
    pytest.importorskip("optuna")
    path = _write_cfg(tmp_path, tiny_dataset, s3_bucket, {
        "experiment_name": "optuna", "scheduler": "fifo", "search_alg": "optuna", "num_samples": 3,
        "max_concurrent_trials": 2,
        "space": {"weighting.static.boundary": "loguniform[0.1, 10]", "train.lr": "loguniform[0.001, 0.01]"},
    }, train={"epochs": 1})
    outcome = run_tune(load_config(path), delta_m=False)

    assert [(r["state"], r["epochs"]) for r in outcome.rows] == [("TERMINATED", 1)] * 3
    assert all(0.1 <= r["weighting.static.boundary"] <= 10 and 0.001 <= r["train.lr"] <= 0.01 for r in outcome.rows)
    assert len({r["train.lr"] for r in outcome.rows}) == 3  # three points, not one
    assert outcome.best_config.train.lr == outcome.best["train.lr"]
    assert storage.exists(outcome.paths["best_config"])


def _epoch_checkpoint(run: str, epoch: int) -> dict:
    """The state of a run's end-of-``epoch`` checkpoint."""
    for uri in ckpt.list_checkpoints(run):
        meta = json.loads(storage.read_bytes(storage.join(uri, ckpt.META_FILE)))
        if meta["epoch"] == epoch and meta["epoch_rows"] == 0:
            return _load_checkpoint(uri)[0]
    raise AssertionError(f"{run} has no checkpoint at the end of epoch {epoch}")


def _same_model(a: dict, b: dict) -> bool:
    return all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Consider boosting PBT performance")  # actors are not reused on purpose
def test_pbt_mutates_task_weights_and_restarts_trials_from_the_donors_checkpoint(
        ray_local, tiny_dataset, s3_bucket, tmp_path, _in_tmp):
    from mtseg.tune import experiment_uri

    # Synchronous PBT: at the epoch-1 perturbation the weaker member exploits the stronger,
    # whatever order they report in.
    path = _write_cfg(tmp_path, tiny_dataset, s3_bucket, {
        "experiment_name": "pbt", "scheduler": "pbt", "perturbation_interval": 1, "max_concurrent_trials": 2,
        "num_samples": 1, "pbt_synch": True,
        "space": {
            "weighting.static.semantic": "grid[0.0, 1.0]",  # two different members
            "weighting.static.boundary": "uniform[0.5, 2.0]",
            "train.lr": "loguniform[0.002, 0.005]",
        },
    })
    cfg = load_config(path)
    outcome = run_tune(cfg, delta_m=False)

    rows = outcome.rows
    assert len(rows) == 2 and all(r["state"] == "TERMINATED" and r["epochs"] == 2 for r in rows)
    runs = _runs(cfg)
    init_root = storage.join(experiment_uri(cfg), "pbt_init")
    exploited = []
    for name in runs:
        if "-" not in name:
            continue  # a first run, started from scratch
        trial = next(r for r in rows if name.startswith(r["trial"]))
        init_state, init_meta = _load_checkpoint(storage.join(init_root, name))
        assert init_meta["epoch"] == 1 and init_meta["step"] == STEPS_PER_EPOCH
        # Which first run does the start checkpoint come from? Compare the model weights.
        source = next(r for r in rows if _same_model(init_state, _epoch_checkpoint(runs[r["trial"]], 1)))
        # Whatever the source, the start carries this trial's (possibly mutated) weights and LR.
        assert init_state["weighting"]["weights"].tolist() == pytest.approx(
            [trial["weighting.static.semantic"], trial["weighting.static.boundary"]])
        assert init_state["scheduler"]["base_lrs"] == pytest.approx([trial["train.lr"]])
        # The new run went on from that checkpoint to the end.
        _, meta = ckpt.latest_valid(runs[name], log=lambda *a: None)
        assert meta["epoch"] == 2 and meta["step"] == 2 * STEPS_PER_EPOCH
        if source is not trial:
            exploited.append((trial, source))
    assert len(exploited) == 1, f"expected one exploit, runs: {sorted(runs)}"
    trial, donor = exploited[0]
    assert trial["weighting.static.semantic"] == donor["weighting.static.semantic"]  # copied from the donor
    assert trial["weighting.static.boundary"] != donor["weighting.static.boundary"]  # then mutated


def _terminated_trials(exp_dir_uri: str) -> int:
    count = 0
    for uri in storage.list_files(exp_dir_uri):
        if os.path.basename(uri).startswith("experiment_state") and uri.endswith(".json"):
            count = max(count, storage.read_bytes(uri).decode().count('\\"status\\": \\"TERMINATED\\"'))
    return count


def _checkpointed_runs(cfg) -> list[str]:
    return [name for name, uri in _runs(cfg).items() if ckpt.latest_valid(uri, log=lambda *a: None)]


@pytest.mark.slow
def test_killed_search_resumes_without_rerunning_finished_trials(ray_local, tiny_dataset, s3_bucket, tmp_path, _in_tmp):
    import ray

    from mtseg.tune import experiment_uri

    path = _write_cfg(tmp_path, tiny_dataset, s3_bucket, {
        "experiment_name": "resume", "scheduler": "fifo", "max_concurrent_trials": 1, "num_samples": 1,
        "space": {"weighting.name": "grid[equal, uncertainty]"},
    }, train={"epochs": 1, "checkpoint_every_steps": 4})
    cfg = load_config(path)
    exp = experiment_uri(cfg)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "mtseg.cli", "tune", "--config", path]  # with Δm%: baselines first
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill when the first trial is finished (in Tune's state) and the second has a
        # mid-epoch checkpoint: a point in training, not in Tune's own state uploads.
        deadline = time.monotonic() + 420
        while _terminated_trials(exp) < 1 or len(_checkpointed_runs(cfg)) < 2:
            assert first.poll() is None, "the search ended before it could be killed"
            assert time.monotonic() < deadline, "no trial finished within 420 s"
            time.sleep(0.5)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    finished = {name: ckpt.list_checkpoints(uri) for name, uri in _runs(cfg).items()
                if (found := ckpt.latest_valid(uri, log=lambda *a: None)) and found[1]["epoch"] == 1}
    assert len(finished) == 1

    logged: list[str] = []
    outcome = run_tune(cfg, resume=True, log=logged.append)
    assert [(r["state"], r["epochs"]) for r in outcome.rows] == [("TERMINATED", 1)] * 2
    runs_after = _runs(cfg)
    assert len(runs_after) == 2
    for name, checkpoints in finished.items():
        assert ckpt.list_checkpoints(runs_after[name]) == checkpoints  # not trained again

    # Δm%: the killed run trained the single-task baselines; the resumed one reused them.
    assert {t: b["metric"] for t, b in outcome.baselines.items()} == {"semantic": "val/miou", "boundary": "val/boundary_f1"}
    assert all(b["value"] > 0 for b in outcome.baselines.values())
    assert sum("(cached" in line for line in logged) == 2
    assert len(storage.list_files(storage.join(s3_bucket, "baselines"))) == 2
    assert all(math.isfinite(r[DELTA_M]) for r in outcome.rows)
