"""One trial (mtseg/tune/trial.py): what it reports to Tune, the PBT checkpoint rebase, and PBT end to end (exploit restarts a trial from the donor's checkpoint)."""

from __future__ import annotations

import json

import pytest
import torch

from mtseg import storage
from mtseg.config import load_config
from mtseg.train import checkpoint as ckpt
from mtseg.tune import DELTA_M, rebase_checkpoint, run_tune, trial_metrics


def test_trial_metrics_add_delta_m_only_with_baselines(make_cfg):
    cfg = make_cfg({"train.lr": "loguniform[1e-3, 1e-2]"})
    m = {"val/miou": 0.5, "val/boundary_f1": 0.5, "train/epoch": 1}
    base = {"semantic": {"metric": "val/miou", "value": 0.25}}
    assert trial_metrics(m, cfg, base)[DELTA_M] == pytest.approx(100.0)
    assert DELTA_M not in trial_metrics(m, cfg, {})


def test_rebase_checkpoint_swaps_lr_and_static_weights_and_keeps_the_rest(tmp_path):
    from mtseg.data.categories import CategoryIndex
    from mtseg.train.loop import build_state

    cats = CategoryIndex.from_categories(
        [{"id": 1, "name": "a", "supercategory": "s"}, {"id": 5, "name": "b", "supercategory": "s"}]
    )
    donor = load_config(
        None,
        [
            "tasks.names=[semantic, boundary]",
            "weighting.name=static",
            "weighting.static={semantic: 1.0, boundary: 2.0}",
            "train.lr=0.004",
            "train.warmup_steps=0",
            "model.decoder_channels=8",
            "data.image_size=32",
            "tasks.patch_size=4",
        ],
    )
    state = build_state(donor, cats, total_steps=10, device=torch.device("cpu"))
    for _ in range(3):
        state.optimizer.step()
        state.scheduler.step()
    state.step, state.epoch = 3, 1
    lr_now = state.optimizer.param_groups[0]["lr"]
    ckpt.save(str(tmp_path / "src"), state.state_dict(), state.meta())

    mutated = load_config(
        None,
        [
            "tasks.names=[semantic, boundary]",
            "weighting.name=static",
            "weighting.static={semantic: 1.0, boundary: 0.5}",
            "train.lr=0.002",
            "train.warmup_steps=0",
            "model.decoder_channels=8",
            "data.image_size=32",
            "tasks.patch_size=4",
        ],
    )
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


STEPS_PER_EPOCH = 48 // 4  # one worker, batch 4, the tiny dataset's 48 training images


def _epoch_checkpoint(run: str, epoch: int, load) -> dict:
    """ "The state of a run's end-of-``epoch`` checkpoint (``load``: the checkpoint_state fixture)."""
    for uri in ckpt.list_checkpoints(run):
        meta = json.loads(storage.read_bytes(storage.join(uri, ckpt.META_FILE)))
        if meta["epoch"] == epoch and meta["epoch_rows"] == 0:
            return load(uri)[0]
    raise AssertionError(f"{run} has no checkpoint at the end of epoch {epoch}")


def _same_model(a: dict, b: dict) -> bool:
    return all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Consider boosting PBT performance")  # actors are not reused on purpose
def test_pbt_mutates_task_weights_and_restarts_trials_from_the_donors_checkpoint(
    ray_local, tiny_dataset, s3_bucket, tmp_path, in_tmp, search_yaml, runs_of, checkpoint_state
):
    from mtseg.tune import experiment_uri

    # Synchronous PBT: at the epoch-1 perturbation the weaker member exploits the stronger,
    # whatever order they report in.
    path = search_yaml(
        tiny_dataset,
        s3_bucket,
        {
            "experiment_name": "pbt",
            "scheduler": "pbt",
            "perturbation_interval": 1,
            "max_concurrent_trials": 2,
            "num_samples": 1,
            "pbt_synch": True,
            "space": {
                "weighting.static.semantic": "grid[0.0, 1.0]",  # two different members
                "weighting.static.boundary": "uniform[0.5, 2.0]",
                "train.lr": "loguniform[0.002, 0.005]",
            },
        },
    )
    cfg = load_config(path)
    outcome = run_tune(cfg, delta_m=False)

    rows = outcome.rows
    assert len(rows) == 2 and all(r["state"] == "TERMINATED" and r["epochs"] == 2 for r in rows)
    runs = runs_of(cfg)
    init_root = storage.join(experiment_uri(cfg), "pbt_init")
    exploited = []
    for name in runs:
        if "-" not in name:
            continue  # a first run, started from scratch
        trial = next(r for r in rows if name.startswith(r["trial"]))
        init_state, init_meta = checkpoint_state(storage.join(init_root, name))
        assert init_meta["epoch"] == 1 and init_meta["step"] == STEPS_PER_EPOCH
        # Which first run does the start checkpoint come from? Compare the model weights.
        source = next(r for r in rows if _same_model(init_state, _epoch_checkpoint(runs[r["trial"]], 1, checkpoint_state)))
        # Whatever the source, the start carries this trial's (possibly mutated) weights and LR.
        assert init_state["weighting"]["weights"].tolist() == pytest.approx(
            [trial["weighting.static.semantic"], trial["weighting.static.boundary"]]
        )
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
