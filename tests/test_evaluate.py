"""``mtseg evaluate``: Ray Data batch inference over a split streamed from SeaweedFS, then metrics.

The checkpoint comes from a short training run (a few optimiser steps of the training loop on
the local stream, saved with :func:`mtseg.train.checkpoint.save` and uploaded to the bucket).
The numbers must be those of the plain single-process loop that training validation runs.
"""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch

from mtseg import storage
from mtseg.config import load_config, to_yaml
from mtseg.data.categories import CategoryIndex
from mtseg.evaluate import plan_inference
from mtseg.predict import PredictError
from mtseg.train import checkpoint as ckpt

TRAIN_IMAGES, VAL_IMAGES = 16, 10


@pytest.fixture(scope="module")
def tiny_data(synthetic_dataset):
    """Val in two shards (6 + 4 images)."""
    return synthetic_dataset("evaluate-data", train=TRAIN_IMAGES, val=VAL_IMAGES, seed=2, images_per_shard=6)


def _cfg(data_uri: str):
    return load_config(
        None,
        [
            f"data.uri={data_uri}",
            "data.image_size=32",
            "data.batch_size=4",
            "model.decoder_channels=16",
            "tasks.patch_size=4",
            "tasks.center_sigma=1.5",
            "train.warmup_steps=1",
            "train.lr=0.01",
        ],
    )


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_data, tmp_path_factory, seaweedfs):
    """A checkpoint after 3 optimiser steps, in the bucket as Ray Train lays it out: <run>/checkpoint_*/."""
    from mtseg.data.manifest import read_manifest
    from mtseg.data.pipeline import categories_of, iter_local_batches
    from mtseg.tasks import build_tasks
    from mtseg.train.loop import build_state, train_one_epoch

    cfg = _cfg(tiny_data)
    categories = categories_of(read_manifest(tiny_data, cfg.data.train_split))
    state = build_state(cfg, categories, total_steps=3, device=torch.device("cpu"))
    batches = iter_local_batches(
        tiny_data, cfg.data.train_split, categories, cfg, True, tasks=build_tasks(cfg, categories), drop_last=True
    )
    train_one_epoch(state, batches, steps=3)
    local = str(tmp_path_factory.mktemp("ckpt") / "checkpoint_000000")
    # Saved as the trainer does today: meta without categories (read from the dataset instead).
    ckpt.save(local, state.state_dict(), state.meta(), to_yaml(cfg))
    run = f"s3://{seaweedfs.bucket}/evaluate-runs/short"
    for name in os.listdir(local):
        with open(os.path.join(local, name), "rb") as f:
            storage.write_bytes(storage.join(run, "checkpoint_000000", name), f.read())
    return run, storage.join(run, "checkpoint_000000"), cfg, categories


def _plain_loop_metrics(checkpoint_uri: str, cfg, categories) -> dict[str, float]:
    """Training validation's own code, in one process: iter_local_batches -> loop.evaluate -> Evaluator."""
    import pyarrow.parquet as pq

    from mtseg.data.manifest import read_manifest, shard_uris
    from mtseg.data.pipeline import iter_local_batches
    from mtseg.metrics import Evaluator, coco_gt_from_rows
    from mtseg.tasks import build_tasks
    from mtseg.train.loop import evaluate

    loaded = ckpt.load_for_inference(checkpoint_uri)
    model = ckpt.build_inference_model(loaded.cfg, categories, loaded.model_state)
    manifest = read_manifest(cfg.data.uri, cfg.data.val_split)
    rows = []
    for uri in shard_uris(cfg.data.uri, cfg.data.val_split, manifest):
        fs, path = storage.resolve(uri)
        rows += pq.read_table(path, filesystem=fs, columns=["image_id", "height", "width", "annotations"]).to_pylist()
    evaluator = Evaluator(categories, build_tasks(cfg, categories), coco_gt=coco_gt_from_rows(rows, manifest["categories"]))
    batches = iter_local_batches(cfg.data.uri, cfg.data.val_split, categories, cfg, False, tasks=build_tasks(cfg, categories))
    evaluate(model, batches, build_tasks(cfg, categories), cfg, categories, evaluator, torch.device("cpu"))
    return evaluator.compute()


@pytest.mark.slow
def test_evaluate_streams_from_seaweedfs_and_matches_the_plain_loop(ray_local, trained_checkpoint, tiny_data, capsys):
    from mtseg.cli import main

    run, checkpoint_uri, cfg, categories = trained_checkpoint
    expected = _plain_loop_metrics(checkpoint_uri, cfg, categories)
    # The run directory resolves to its newest complete checkpoint. By default the read + decode
    # tasks run the model; --concurrency asks for an actor pool. Both give the plain loop's numbers.
    for extra, mode, actors in (([], "tasks", 0), (["--concurrency", "2"], "actors", 2)):
        code = main(["evaluate", "--checkpoint", run, "--data", tiny_data, "--split", "val2017", "--batch-size", "4", *extra])
        out = capsys.readouterr().out
        assert code == 0
        assert "| `val/miou` |" in out and "| `val/mask_ap` |" in out

        written = json.loads(storage.read_bytes(storage.join(checkpoint_uri, "metrics.json")))
        assert written["images"] == VAL_IMAGES and written["split"] == "val2017"
        assert (written["setup"]["mode"], written["setup"]["actors"]) == (mode, actors)
        table = storage.read_bytes(storage.join(checkpoint_uri, "metrics.md")).decode()
        assert "| `val/pixel_acc` |" in table

        assert set(written["metrics"]) == set(expected)
        for key, want in expected.items():
            got = written["metrics"][key]
            if math.isnan(want):
                assert got is None, key  # undefined (NaN) is written as null
            else:
                assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (mode, key)


def _image_ids(shard_uri: str) -> list[int]:
    import pyarrow.parquet as pq

    from mtseg import storage

    fs, path = storage.resolve(shard_uri)
    return pq.read_table(path, filesystem=fs, columns=["image_id"]).column("image_id").to_pylist()


@pytest.mark.slow
def test_evaluate_limit_and_label_space_check(ray_local, trained_checkpoint, tiny_data, tmp_path):
    from mtseg.data.manifest import read_manifest, write_manifest
    from mtseg.evaluate import evaluate_checkpoint

    run, checkpoint_uri, cfg, categories = trained_checkpoint
    result = evaluate_checkpoint(
        checkpoint_uri, tiny_data, "val2017", out=str(tmp_path), limit=3, batch_size=2, concurrency=1, log=lambda *a: None
    )
    assert result.images == 3  # the ground truth holds the evaluated images only
    assert json.loads((tmp_path / "metrics.json").read_text())["images"] == 3
    assert 0.0 <= result.metrics["val/miou"] <= 1.0

    # A semi-supervised run's train-set figures: only the images it kept labelled, then the limit.
    from mtseg.data.manifest import shard_uris
    from mtseg.data.pipeline import is_labeled
    from mtseg.evaluate import evaluate_loaded, load_for_evaluation

    loaded, data_uri, split = load_for_evaluation(checkpoint_uri, tiny_data, "val2017")
    ids = [i for uri in shard_uris(tiny_data, "val2017", read_manifest(tiny_data, "val2017")) for i in _image_ids(uri)]
    kept = [i for i in ids if is_labeled(i, 0.5)]
    assert 2 <= len(kept) < len(ids)  # the hash keeps 2 of these 10 ids
    half = evaluate_loaded(loaded, data_uri, split, labeled_fraction=0.5, batch_size=4, log=lambda *a: None)
    assert half.images == len(kept) and half.setup["labeled_fraction"] == 0.5
    assert evaluate_loaded(loaded, data_uri, split, labeled_fraction=0.5, limit=1, batch_size=4, log=lambda *a: None).images == 1

    # A dataset with another label space is refused before any inference.
    other = f"{tiny_data}-other"
    manifest = read_manifest(tiny_data, "val2017")
    manifest["categories"] = manifest["categories"][:-1]
    write_manifest(other, "val2017", manifest)
    with pytest.raises(PredictError, match="differ from the checkpoint"):
        evaluate_checkpoint(checkpoint_uri, other, "val2017", out=str(tmp_path), log=lambda *a: None)


@pytest.mark.slow
def test_robustness_of_a_named_subset_and_severity_zero_is_the_clean_pass(
    ray_local, trained_checkpoint, tiny_data, tmp_path, capsys
):
    from mtseg.cli import main
    from mtseg.evaluate import HEADLINE_METRICS, evaluate_loaded, load_for_evaluation

    run, checkpoint_uri, cfg, categories = trained_checkpoint
    out = tmp_path / "robustness"
    args = ["--limit", "4", "--batch-size", "4", "--corruptions", "gaussian_noise,jpeg_compression", "--severities", "1,3"]
    code = main(["evaluate", "--checkpoint", checkpoint_uri, "--data", tiny_data, "--split", "val2017", "--out", str(out), *args])
    printed = capsys.readouterr().out
    assert code == 0

    doc = json.loads((out / "metrics.json").read_text())
    clean, section = doc["metrics"], doc["robustness"]
    assert doc["images"] == 4
    assert section["corruptions"] == ["gaussian_noise", "jpeg_compression"] and section["severities"] == [1, 3]
    assert {name: sorted(by) for name, by in section["by_corruption"].items()} == {
        "gaussian_noise": ["1", "3"],
        "jpeg_compression": ["1", "3"],
    }
    assert set(section["summary"]) == {k for k in HEADLINE_METRICS if k in clean} and "val/miou" in section["summary"]
    for key, row in section["summary"].items():
        values = [section["by_corruption"][name][s][key] for name in section["corruptions"] for s in ("1", "3")]
        assert row["clean"] == clean[key]
        if None in values or clean[key] is None:
            continue
        assert row["mPC"] == pytest.approx(sum(values) / 4, rel=1e-12), key
        if clean[key] == 0:
            assert row["rPC"] is None, key  # undefined, written as null
        else:
            assert row["rPC"] == pytest.approx(row["mPC"] / clean[key], rel=1e-12), key
    assert section["by_corruption"]["gaussian_noise"]["3"] != clean  # the noise reached the model

    table = (out / "metrics.md").read_text()
    assert (
        "## Robustness to common corruptions" in table and "| `val/miou` |" in table and "| jpeg_compression | digital |" in table
    )
    assert "## Robustness to common corruptions" in printed
    assert (out / "robustness.png").read_bytes().startswith(b"\x89PNG")

    # Severity 0 is no corruption call at all: the clean pass, bit for bit.
    loaded, data_uri, split = load_for_evaluation(checkpoint_uri, tiny_data, "val2017")
    zero = evaluate_loaded(loaded, data_uri, split, limit=4, batch_size=4, corruption=("gaussian_noise", 0), log=lambda *a: None)
    assert {k: (None if math.isnan(v) else v) for k, v in zero.metrics.items()} == clean


def test_robustness_summary_is_michaelis_mpc_and_rpc():
    from mtseg.evaluate import summarize_robustness

    by = {"fog": {1: {"val/miou": 0.5}, 3: {"val/miou": 0.3}}, "snow": {1: {"val/miou": 0.4}, 3: {"val/miou": 0.2}}}
    summary = summarize_robustness({"val/miou": 0.6, "val/pixel_acc": 0.9}, by)
    assert list(summary) == ["val/miou"]  # the headline metrics the model has
    assert summary["val/miou"]["clean"] == 0.6
    assert summary["val/miou"]["mPC"] == pytest.approx(0.35)
    assert summary["val/miou"]["rPC"] == pytest.approx(0.35 / 0.6)
    assert math.isnan(summarize_robustness({"val/miou": 0.0}, by)["val/miou"]["rPC"])


def test_inference_plan_runs_in_the_read_tasks_on_cpus_and_uses_every_gpu():
    cpu = plan_inference({"CPU": 8.0})
    assert cpu == {"mode": "tasks", "actors": 0, "device": "cpu", "num_cpus": 1.0, "num_gpus": 0.0, "threads": 1}
    pool = plan_inference({"CPU": 8.0}, concurrency=8)
    assert pool == {"mode": "actors", "actors": 8, "device": "cpu", "num_cpus": 0.875, "num_gpus": 0.0, "threads": 1}
    small = plan_inference({"CPU": 2.0}, concurrency=2)
    assert small["actors"] == 2 and small["num_cpus"] == 0.5  # 1 CPU stays free for read + decode
    assert plan_inference({"CPU": 2.0}, concurrency=1)["num_cpus"] == 1.0
    assert plan_inference({"CPU": 1.0}, concurrency=1)["num_cpus"] == 0.0  # still runs: the actor reserves nothing
    assert plan_inference({"CPU": 16.0}, concurrency=2, actor_cpus=4.0)["threads"] == 4
    gpu = plan_inference({"CPU": 16.0, "GPU": 4.0})
    assert gpu["device"] == "cuda" and gpu["actors"] == 4 and gpu["num_gpus"] == 1.0 and gpu["num_cpus"] == 1.0
    assert plan_inference({"CPU": 16.0, "GPU": 4.0}, use_gpu="false")["device"] == "cpu"
    with pytest.raises(PredictError, match="no GPUs"):
        plan_inference({"CPU": 2.0}, use_gpu="true")
    with pytest.raises(PredictError, match="--concurrency"):
        plan_inference({"CPU": 2.0}, concurrency=0)
    with pytest.raises(PredictError, match="read \\+ decode"):
        plan_inference({"CPU": 2.0}, concurrency=2, actor_cpus=1.0)


def test_bad_checkpoint_fails_before_ray_starts(tmp_path, capsys, monkeypatch):
    import mtseg.cluster
    from mtseg.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a command that was bound to fail")

    monkeypatch.setattr(mtseg.cluster, "init_local_ray", no_ray)
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


def _model_with_data_in_the_store(out_dir) -> str:
    """``out_dir/model``: a tiny checkpoint, with the synthetic label space, whose run read s3://mtseg/demo/shards."""
    from mtseg.data.synth import categories
    from mtseg.models import build_model

    cfg = load_config(None, ["data.uri=s3://mtseg/demo/shards", "data.image_size=32", "model.decoder_channels=16"])
    model = build_model(cfg, CategoryIndex.from_categories(categories()))
    model_dir = str(out_dir / "model")
    ckpt.save(model_dir, {"model": model.state_dict()}, {"epoch": 0, "step": 1, "categories": categories()}, to_yaml(cfg))
    return model_dir


@pytest.fixture
def store_down(monkeypatch):
    """The S3 endpoint is a closed loopback port, as when the demo's SeaweedFS has been stopped."""
    from mtseg.cluster import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    # Credentials set, so that no SDK goes looking for some off this machine (EC2 metadata).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_data_in_a_store_that_cannot_be_reached_fails_fast_in_one_line(tmp_path, store_down, capsys):
    from mtseg.cli import main

    model_dir = _model_with_data_in_the_store(tmp_path)
    t0 = time.monotonic()
    code = main(["evaluate", "--checkpoint", model_dir])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err.strip()
    assert code == 2 and elapsed < 10, (code, elapsed, err)
    assert err.startswith("mtseg: error: ") and "\n" not in err, err
    assert "s3://mtseg/demo/shards" in err and "cannot be reached" in err, err
    assert f"--data {tmp_path / 'shards'}" in err, err  # where a local copy of the split would be


def test_the_local_copy_beside_the_model_is_used_when_the_store_cannot_be_reached(tmp_path, store_down, capsys):
    from mtseg.data.shard import shard_coco
    from mtseg.data.synth import synthesize
    from mtseg.evaluate import load_for_evaluation

    model_dir = _model_with_data_in_the_store(tmp_path)
    synthesize(str(tmp_path / "coco"), train=0, val=2, size=32, seed=0)
    # As `mtseg demo` leaves it: runs/demo/model and the val split in runs/demo/shards.
    shard_coco(str(tmp_path / "coco"), "val2017", str(tmp_path / "shards"), log=lambda *a: None)
    capsys.readouterr()

    t0 = time.monotonic()
    _, data_uri, split = load_for_evaluation(model_dir)
    elapsed = time.monotonic() - t0
    out = capsys.readouterr().out.strip()
    assert (data_uri, split) == (str(tmp_path / "shards"), "val2017") and elapsed < 10, (data_uri, elapsed)
    assert "\n" not in out and "s3://mtseg/demo/shards cannot be reached" in out and f"local copy {data_uri}" in out, out

    # A --data the user typed is not swapped for the copy.
    with pytest.raises(PredictError, match="cannot be reached"):
        load_for_evaluation(model_dir, "s3://mtseg/demo/shards")
