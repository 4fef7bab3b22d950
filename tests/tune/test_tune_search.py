"""Running a search (mtseg/tune/search.py): no overwrite without --resume, restorable search algorithms; end to end on a local Ray head with trials streaming from SeaweedFS (ASHA, Optuna, resume after a kill)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from mtseg import storage
from mtseg.config import config_from_dict, load_config
from mtseg.train import checkpoint as ckpt
from mtseg.tune import DELTA_M, SearchError, run_tune


def test_invalid_space_fails_in_the_cli_before_anything_starts(tmp_path, capsys):
    from mtseg.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "train": {"storage_path": str(tmp_path / "store")},
                "tasks": {"names": ["semantic", "boundary"]},
                "tune": {"space": {"weighting.name": "choice[equal, nonsense]"}},
            }
        )
    )
    assert main(["tune", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtseg: error: tune.space.weighting.name:") and err.count("\n") == 1
    assert not (tmp_path / "store").exists()


def test_an_existing_experiment_is_not_overwritten_without_resume(tmp_path, make_cfg):
    cfg = make_cfg(
        {"weighting.name": "grid[equal, uncertainty]"}, train={"storage_path": str(tmp_path)}, tune={"experiment_name": "exp"}
    )
    storage.write_bytes(str(tmp_path / "exp" / "tune_config.yaml"), b"{}\n")
    with pytest.raises(SearchError, match="pass --resume"):
        run_tune(cfg, delta_m=False)
    with pytest.raises(SearchError, match="no experiment to resume"):
        run_tune(
            config_from_dict({**cfg.to_dict(), "tune": {**cfg.to_dict()["tune"], "experiment_name": "none"}}),
            resume=True,
            delta_m=False,
        )


def test_a_restored_generator_does_not_count_trials_as_running(tmp_path, make_cfg):
    """Tune's experiment and generator states upload separately; a kill between them must not
    leave the generator waiting for a trial that already finished."""
    from ray.tune.experiment import Experiment

    from mtseg.tune.search import _search_alg

    cfg = make_cfg({"weighting.name": "grid[equal, uncertainty]"}, tune={"max_concurrent_trials": 1})
    gen = _search_alg(cfg)
    gen.add_configurations(
        Experiment(
            "exp",
            lambda config: None,
            storage_path=str(tmp_path),
            config={"weighting.name": {"grid_search": ["equal", "uncertainty"]}},
        )
    )
    first = gen.next_trial()
    assert first is not None and gen.next_trial() is None  # one running, limit reached
    restored = _search_alg(cfg)
    restored.set_state(gen.get_state())  # the trial finished, but this state predates that
    assert restored.next_trial() is not None


def test_a_restored_optuna_search_does_not_count_trials_as_running(make_cfg):
    pytest.importorskip("optuna")
    from ray import tune

    from mtseg.tune.search import _search_alg

    cfg = make_cfg({"train.lr": "loguniform[0.001, 0.01]"}, tune={"search_alg": "optuna", "max_concurrent_trials": 1})
    alg = _search_alg(cfg)
    alg.set_search_properties("val/miou", "max", {"train.lr": tune.loguniform(0.001, 0.01)})
    assert 0.001 <= alg.suggest("a")["train.lr"] <= 0.01
    assert alg.suggest("b") is None  # one running, limit reached
    restored = _search_alg(cfg)
    restored.set_search_properties("val/miou", "max", {"train.lr": tune.loguniform(0.001, 0.01)})
    restored.set_state(alg.get_state())
    assert restored.suggest("c") is not None


@pytest.mark.slow
def test_asha_search_stops_weak_trials_and_its_best_config_trains(
    ray_local, tiny_dataset, s3_bucket, tmp_path, in_tmp, search_yaml, runs_of
):
    import ray.util

    from mtseg.train.trainer import run_training

    path = search_yaml(
        tiny_dataset,
        s3_bucket,
        {
            "experiment_name": "asha",
            "scheduler": "asha",
            "grace_period": 1,
            "reduction_factor": 2,
            "max_concurrent_trials": 2,
            "num_samples": 1,
            # Training is seeded, so each config's epoch-1 mIoU is fixed. In grid order the last
            # trial is (static, semantic only), the slowest starter here: with two trials at once it
            # reaches the epoch-1 rung after at least two others, below their median.
            "space": {"weighting.name": "grid[uncertainty, static]", "weighting.static.semantic": "grid[0.0, 1.0]"},
        },
    )
    cfg = load_config(path)
    before = set(ray.util.placement_group_table())
    outcome = run_tune(cfg, delta_m=False)

    # Every trial's workers were released, the one ASHA stopped included (its Train controller
    # went with the trial; Ray Train's placement-group cleaner removed the reservation).
    deadline = time.monotonic() + 60
    while left := [
        pg for pg_id, pg in ray.util.placement_group_table().items() if pg_id not in before and pg["state"] != "REMOVED"
    ]:
        assert time.monotonic() < deadline, f"reservations still held after the search: {left}"
        time.sleep(0.5)
    rows = {(r["weighting.name"], r["weighting.static.semantic"]): r for r in outcome.rows}
    assert len(rows) == 4 and all(r["state"] != "ERROR" for r in rows.values())
    weak = rows[("static", 1.0)]
    assert weak["state"] == "STOPPED" and weak["epochs"] == 1
    assert any(r["state"] == "TERMINATED" and r["epochs"] == 2 for r in rows.values())
    assert outcome.best["state"] == "TERMINATED" and outcome.best["val/miou"] > weak["val/miou"]
    # Each trial trained in its own Train run, streaming from and checkpointing into the bucket.
    runs = runs_of(cfg)
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
def test_optuna_samples_the_ranges_and_writes_the_table(ray_local, tiny_dataset, s3_bucket, tmp_path, in_tmp, search_yaml):
    pytest.importorskip("optuna")
    path = search_yaml(
        tiny_dataset,
        s3_bucket,
        {
            "experiment_name": "optuna",
            "scheduler": "fifo",
            "search_alg": "optuna",
            # Two points, both at once: one round of trials on 2 cores.
            "num_samples": 2,
            "max_concurrent_trials": 2,
            "space": {"weighting.static.boundary": "loguniform[0.1, 10]", "train.lr": "loguniform[0.001, 0.01]"},
        },
        train={"epochs": 1},
    )
    outcome = run_tune(load_config(path), delta_m=False)

    assert [(r["state"], r["epochs"]) for r in outcome.rows] == [("TERMINATED", 1)] * 2
    assert all(0.1 <= r["weighting.static.boundary"] <= 10 and 0.001 <= r["train.lr"] <= 0.01 for r in outcome.rows)
    assert len({r["train.lr"] for r in outcome.rows}) == 2  # two points, not one
    assert outcome.best_config.train.lr == outcome.best["train.lr"]
    assert storage.exists(outcome.paths["best_config"])


def _terminated_trials(exp_dir_uri: str) -> int:
    count = 0
    for uri in storage.list_files(exp_dir_uri):
        if os.path.basename(uri).startswith("experiment_state") and uri.endswith(".json"):
            count = max(count, storage.read_bytes(uri).decode().count('\\"status\\": \\"TERMINATED\\"'))
    return count


def _checkpointed_runs(runs: dict[str, str]) -> list[str]:
    return [name for name, uri in runs.items() if ckpt.latest_valid(uri, log=lambda *a: None)]


@pytest.mark.slow
def test_killed_search_resumes_without_rerunning_finished_trials(
    ray_local, tiny_dataset, s3_bucket, tmp_path, in_tmp, search_yaml, runs_of
):
    import ray

    from mtseg.tune import experiment_uri

    path = search_yaml(
        tiny_dataset,
        s3_bucket,
        {
            "experiment_name": "resume",
            "scheduler": "fifo",
            "max_concurrent_trials": 1,
            "num_samples": 1,
            "space": {"weighting.name": "grid[equal, uncertainty]"},
        },
        train={"epochs": 1, "checkpoint_every_steps": 4},
    )
    cfg = load_config(path)
    exp = experiment_uri(cfg)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "mtseg.cli", "tune", "--config", path]  # with Δm%: baselines first
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill when the first trial is finished (in Tune's state) and the second has a
        # mid-epoch checkpoint: a point in training, not in Tune's own state uploads.
        deadline = time.monotonic() + 420
        while _terminated_trials(exp) < 1 or len(_checkpointed_runs(runs_of(cfg))) < 2:
            assert first.poll() is None, "the search ended before it could be killed"
            assert time.monotonic() < deadline, "no trial finished within 420 s"
            time.sleep(0.5)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    finished = {
        name: ckpt.list_checkpoints(uri)
        for name, uri in runs_of(cfg).items()
        if (found := ckpt.latest_valid(uri, log=lambda *a: None)) and found[1]["epoch"] == 1
    }
    assert len(finished) == 1

    logged: list[str] = []
    outcome = run_tune(cfg, resume=True, log=logged.append)
    assert [(r["state"], r["epochs"]) for r in outcome.rows] == [("TERMINATED", 1)] * 2
    runs_after = runs_of(cfg)
    assert len(runs_after) == 2
    for name, checkpoints in finished.items():
        assert ckpt.list_checkpoints(runs_after[name]) == checkpoints  # not trained again

    # Δm%: the killed run trained the single-task baselines; the resumed one reused them.
    assert {t: b["metric"] for t, b in outcome.baselines.items()} == {"semantic": "val/miou", "boundary": "val/boundary_f1"}
    assert all(b["value"] > 0 for b in outcome.baselines.values())
    assert sum("(cached" in line for line in logged) == 2
    assert len(storage.list_files(storage.join(s3_bucket, "baselines"))) == 2
    assert all(math.isfinite(r[DELTA_M]) for r in outcome.rows)
