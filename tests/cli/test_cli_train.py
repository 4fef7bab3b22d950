"""``mtseg train`` (mtseg/cli/train.py): a bad config is one line and exit 2 before anything
starts, the metrics are strict JSON, and Ctrl-C exits 130."""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import types

import pytest

from mtseg.cli import main


@pytest.mark.parametrize(
    "content, needle",
    [
        (None, "is a directory, not a config file"),
        (b"train:\n  epochs: 2 \xff\n", "not UTF-8 text"),
        (b"- train\n- model\n", "the top level must be a mapping"),
        (b"base: &b\n  more: *b\n", "the YAML alias at base.more refers to"),
    ],
)
def test_unusable_config_file(tmp_path, one_line_error, content, needle):
    path = tmp_path / "config.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    assert main(["train", "--config", str(path), "train.epochs=1"]) == 2
    one_line_error(str(path), needle)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lr=.nan", "train.lr: expected a finite number, got nan"),
        ("train.lr=inf", "train.lr: expected a finite number, got inf"),
        ("weighting.static.semantic=-1", "weighting.static.semantic: -1.0 is below the minimum 0.0"),
        ("train.storage_path=s3://", "train.storage_path: s3://: no bucket name"),
    ],
)
def test_values_accepted_until_now_are_refused(one_line_error, override, needle):
    assert main(["train", override]) == 2
    one_line_error(needle)


def test_train_prints_strict_json_with_null_for_undefined_metrics(monkeypatch, capsys, tmp_path):
    """No val/mask_ap without instances: the result said NaN, which is not JSON."""
    from mtseg import cluster
    from mtseg.train import trainer

    monkeypatch.chdir(tmp_path)  # the default run dir (runs/demo) must not be a checkout's `make demo` output

    result = types.SimpleNamespace(
        error=None, metrics={"val/miou": 0.5, "val/mask_ap": math.nan, "val/pq": math.inf, "train/loss": 1.0}
    )
    # The cluster parts are beside the point here (the Ray Train tests run them): the printing is.
    monkeypatch.setattr(trainer, "preflight", lambda cfg: None)
    monkeypatch.setattr(trainer, "run_training", lambda cfg, restart=False: result)
    monkeypatch.setattr(cluster, "init_local_ray", lambda **kw: None)
    assert main(["train"]) == 0

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    printed = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert printed == {"val/miou": 0.5, "val/mask_ap": None, "val/pq": None}


def _without_a_cluster(monkeypatch, result) -> list:
    """``mtseg train`` with Ray Train's ``fit()`` answering ``result``: what the driver does around it
    (lease, config, refusals, pruning) runs for real. Returns the list ``init_local_ray`` calls land in."""
    from mtseg import cluster
    from mtseg.train import trainer

    started: list = []
    monkeypatch.setattr(trainer, "preflight", lambda cfg: None)  # the dataset is beside the point here
    monkeypatch.setattr(cluster, "init_local_ray", lambda **kw: started.append(kw))
    monkeypatch.setattr(trainer, "build_trainer", lambda cfg, **kw: types.SimpleNamespace(fit=lambda: result))
    return started


def test_a_run_name_naming_a_folder_that_is_no_run_is_refused_before_ray_and_left_alone(tmp_path, monkeypatch, one_line_error):
    """It said "has checkpoints ... resuming it", trained from step 0 and overwrote the folder's config.yaml."""
    folder = tmp_path / "runs" / "photos"
    (folder / "checkpoint_album").mkdir(parents=True)
    (folder / "checkpoint_album" / "cat.jpg").write_bytes(b"\xff\xd8")
    (folder / "config.yaml").write_text("their: settings\n")
    before = sorted((str(p), p.read_bytes()) for p in folder.rglob("*") if p.is_file())
    started = _without_a_cluster(monkeypatch, types.SimpleNamespace(error=None, metrics={}, checkpoint=None, best_checkpoints=[]))
    assert main(["train", f"train.storage_path={tmp_path / 'runs'}", "train.run_name=photos"]) == 2
    one_line_error("train.run_name", str(folder), "not an mtseg run")
    assert sorted((str(p), p.read_bytes()) for p in folder.rglob("*") if p.is_file()) == before
    assert not started
    # An empty folder is a new run.
    (tmp_path / "runs" / "fresh").mkdir()
    assert main(["train", f"train.storage_path={tmp_path / 'runs'}", "train.run_name=fresh"]) == 0
    assert started and (tmp_path / "runs" / "fresh" / "config.yaml").exists()


def test_a_finished_run_keeps_only_the_best_and_the_latest_checkpoints(tmp_path, monkeypatch):
    """A driver killed by kill -9 at a checkpoint boundary left one Ray never registered: the resume's end deletes it."""
    import torch

    from mtseg.train import checkpoint as ckpt

    run = tmp_path / "runs" / "killed"

    def scored(stamp: int, step: int, miou: float) -> types.SimpleNamespace:
        path = str(run / f"checkpoint_2026-01-01_00-00-{stamp:02d}.000000")
        meta = {"epoch": 0, "step": step, "epoch_rows": 0, "metrics": {"val/miou": miou}}
        ckpt.save(path, {"w": torch.zeros(1)}, meta)
        return types.SimpleNamespace(path=path)

    best, untracked, latest = scored(1, 10, 0.5), scored(2, 20, 0.4), scored(3, 30, 0.3)
    result = types.SimpleNamespace(
        error=None, metrics={"val/miou": 0.3}, checkpoint=latest, best_checkpoints=[(best, {"val/miou": 0.5})]
    )
    _without_a_cluster(monkeypatch, result)
    args = ["train", f"train.storage_path={run.parent}", "train.run_name=killed", "train.keep_checkpoints=1"]
    assert main(args) == 0
    assert sorted(ckpt.list_checkpoints(str(run))) == [best.path, latest.path]
    assert not os.path.exists(untracked.path)


# One Ray Train worker on 32 px images, more epochs than the test waits for.
TINY = [
    "data.image_size=32",
    "data.batch_size=4",
    "data.rows_per_read_task=8",
    "data.map_num_cpus=0.25",
    "model.decoder_channels=16",
    "tasks.patch_size=4",
    "tasks.center_sigma=1.5",
    "train.num_workers=1",
    "train.cpus_per_worker=0.5",
    "train.epochs=50",
    "train.warmup_steps=1",
    "train.log_every_steps=1",
    "train.max_failures=0",
]


def _lines(proc: subprocess.Popen) -> queue.Queue:
    """The process's output, line by line, read in a thread so the test can wait with a timeout."""
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@pytest.mark.slow
def test_ctrl_c_stops_training_with_exit_code_130(ray_local, tiny_dataset, s3_bucket, tmp_path):
    """SIGINT while Ray Train runs: Ray's own handler aborts the run, mtseg still exits 130."""
    import ray

    from mtseg.train.runstate import read_outcome

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    args = [f"data.uri={tiny_dataset}", f"train.storage_path={s3_bucket}", "train.run_name=ctrlc", *TINY]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtseg.cli", "train", *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines, seen = _lines(proc), []
        deadline = time.monotonic() + 300
        while not any("[train] epoch 1" in line and "step" in line for line in seen):  # fit() is running
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)[-3000:]
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) == 130, "".join(seen)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)  # the pump thread drains what is left
    while not lines.empty():
        seen.append(lines.get())
    assert seen[-1].strip() == "mtseg: interrupted"
    outcome = read_outcome(f"{s3_bucket}/ctrlc")
    assert outcome["status"] == "interrupted", outcome


def test_imagenet_weights_missing_from_the_cache_fail_before_ray_in_one_line(tmp_path, monkeypatch, one_line_error):
    import torch.hub

    def offline(url, dst, *args, **kwargs):
        raise OSError("no network here")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    from mtseg import cluster

    started: list = []
    monkeypatch.setattr(cluster, "init_local_ray", lambda **kw: started.append(kw))
    args = ["train", f"train.storage_path={tmp_path / 'runs'}", f"data.uri={tmp_path / 'shards'}", "model.weights=imagenet"]
    assert main([*args, "model.backbone=resnet18"]) == 2
    one_line_error(
        "model.weights=imagenet", str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-"), "download.pytorch.org"
    )
    assert not started
