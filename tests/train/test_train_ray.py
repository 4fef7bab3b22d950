"""Ray Train end to end on a local Ray head, streaming from SeaweedFS, checkpoints in the bucket.

Tiny on purpose (32 px images, a narrow resnet18), so the whole module runs in a few minutes
on 2 cores. Failures are real: worker processes are SIGKILLed, the driver process is killed,
the object store is stopped and restarted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mtseg.config import load_config
from mtseg.train import checkpoint as ckpt

pytestmark = pytest.mark.slow

TRAIN_IMAGES, VAL_IMAGES = 48, 8


@pytest.fixture(autouse=True)
def _run_dir_in_tmp(tmp_path, monkeypatch):
    """TensorBoard events and image-id logs of S3-stored runs go to ./runs/<name>: keep them per test."""
    monkeypatch.chdir(tmp_path)


# The tiny run every test here trains: 2 workers, 2 epochs of 6 steps, a checkpoint every 2 steps.
TINY = [
    "data.image_size=32",
    "data.batch_size=4",
    "data.rows_per_read_task=8",
    "data.map_num_cpus=0.25",
    "model.decoder_channels=16",
    "tasks.patch_size=4",
    "tasks.center_sigma=1.5",
    "train.num_workers=2",
    "train.cpus_per_worker=0.5",
    "train.epochs=2",
    "train.warmup_steps=2",
    "train.checkpoint_every_steps=2",
    "train.log_every_steps=1",
    "train.max_failures=2",
]


def _overrides(data_uri, storage_path, run_name, *extra) -> list[str]:
    return [f"data.uri={data_uri}", f"train.storage_path={storage_path}", f"train.run_name={run_name}", *TINY, *extra]


def _cfg(data_uri, storage_path, run_name, *extra):
    return load_config(None, _overrides(data_uri, storage_path, run_name, *extra))


def _steps(cfg) -> int:
    return (TRAIN_IMAGES // cfg.train.num_workers) // (cfg.data.batch_size * cfg.train.grad_accum) * cfg.train.epochs


def _read_id_log(cfg) -> list[dict]:
    from mtseg.train.trainer import local_run_dir

    out = []
    d = os.path.join(local_run_dir(cfg), "image_ids")
    for name in sorted(os.listdir(d)):
        with open(os.path.join(d, name)) as f:
            out += [json.loads(line) | {"rank": name} for line in f]
    return out


def test_two_workers_stream_from_s3_and_checkpoint_into_the_bucket(ray_local, tiny_dataset, s3_bucket, tmp_path):
    from mtseg.train.trainer import run_training, run_uri

    cfg = _cfg(tiny_dataset, s3_bucket, "basic", "train.log_image_ids=true")
    result = run_training(cfg)
    assert result.error is None
    assert result.metrics["train/step"] == _steps(cfg)
    for key in ("val/miou", "val/supercategory_miou", "val/boundary_f1", "val/mask_ap", "val/psnr"):
        assert key in result.metrics
    cks = ckpt.list_checkpoints(run_uri(cfg))
    assert cks and all(c.startswith("s3://") for c in cks)
    assert len(cks) <= cfg.train.keep_checkpoints + 1
    assert ckpt.latest_valid(run_uri(cfg))[1]["step"] == _steps(cfg)
    # Every epoch, every worker sees a disjoint slice; together each image at most once.
    log = _read_id_log(cfg)
    for epoch in range(cfg.train.epochs):
        ids = [i for rec in log if rec["epoch"] == epoch for i in rec["ids"]]
        assert len(ids) == len(set(ids)) == _steps(cfg) // cfg.train.epochs * 4 * 2
    # The validation a run reports is the saved model's: both workers held rank 0's BatchNorm
    # statistics, so `mtseg evaluate` on the final checkpoint gives the same numbers.
    from mtseg.evaluate import evaluate_checkpoint

    final = ckpt.latest_valid(run_uri(cfg))[0]
    evaluated = evaluate_checkpoint(final, log=lambda *a: None, out=str(tmp_path)).metrics
    reported = {k: v for k, v in result.metrics.items() if k.startswith("val/")}
    assert reported.keys() <= evaluated.keys()
    for key, value in reported.items():
        assert value == pytest.approx(evaluated[key], abs=1e-9, nan_ok=True), key


def test_bad_config_fails_before_any_worker_starts(ray_local, tiny_dataset, s3_bucket):
    from mtseg.cli import main

    assert main(["train", "train.lr=fast"]) == 2
    assert main(["train", f"data.uri={tiny_dataset}-missing", f"train.storage_path={s3_bucket}"]) == 2


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _is_ours(pid: int) -> bool:
    """Whether ``pid`` descends from this process: the local Ray's raylet is our child, its workers
    its children; a Ray Train worker of anyone else's Ray on this machine (a user's demo) is not."""
    while pid > 1:
        if pid == os.getpid():
            return True
        pid = _parent(pid)
    return False


def _worker_pids() -> list[int]:
    """Ray Train worker processes of this session's Ray."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"RayTrainWorker" in f.read() and _is_ours(int(entry)):
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def _wait_for_checkpoint(run: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ckpt.latest_valid(run, log=lambda *a: None):
            return
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint in {run} after {timeout}s")


def test_worker_killed_mid_epoch_is_survived_with_the_same_step_count(ray_local, tiny_dataset, s3_bucket):
    from mtseg.train.trainer import run_training, run_uri

    cfg = _cfg(tiny_dataset, s3_bucket, "killworker", "train.epochs=3", "train.log_image_ids=true")
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("result", run_training(cfg)))
    t.start()
    _wait_for_checkpoint(run_uri(cfg))
    victims = _worker_pids()
    assert victims, "no Ray Train worker process found"
    os.kill(victims[-1], signal.SIGKILL)
    t.join(timeout=600)
    result = out["result"]
    assert result.error is None
    assert result.metrics["train/step"] == _steps(cfg)


def test_object_store_down_for_seconds_is_survived(ray_local, tiny_dataset, s3_bucket, seaweedfs):
    from mtseg.train.trainer import run_training, run_uri

    cfg = _cfg(tiny_dataset, s3_bucket, "storeblink", "train.epochs=3")
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("result", run_training(cfg)))
    t.start()
    _wait_for_checkpoint(run_uri(cfg))
    seaweedfs.stop()
    time.sleep(3)
    seaweedfs.start()
    t.join(timeout=600)
    result = out["result"]
    assert result.error is None
    assert result.metrics["train/step"] == _steps(cfg)


def test_driver_killed_then_same_run_name_resumes_and_sees_each_image_once(ray_local, tiny_dataset, s3_bucket, tmp_path):
    """Kill the `mtseg train` process mid-epoch, start it again: it resumes from the latest checkpoint."""
    import ray

    from mtseg.train.trainer import local_run_dir, run_uri

    args = _overrides(tiny_dataset, s3_bucket, "killdriver", "train.log_image_ids=true")
    cfg = load_config(None, args)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "mtseg.cli", "train", *args]
    first = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(run_uri(cfg), timeout=180)
    # A second driver on the live run is refused at once, naming the owner, and changes nothing.
    twin = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert twin.returncode == 2, twin.stdout[-2000:] + twin.stderr[-2000:]
    assert "in use by " in twin.stderr
    assert f":{first.pid}" in twin.stderr and len(twin.stderr.strip().splitlines()) == 1
    assert first.poll() is None, "the twin must not disturb the live driver"
    first.send_signal(signal.SIGKILL)
    first.wait()
    # The killed driver could not say so itself; its dead lease does.
    from mtseg.train.runstate import read_outcome

    assert read_outcome(run_uri(cfg))["status"] == "interrupted"
    killed_at = ckpt.latest_valid(run_uri(cfg), log=lambda *a: None)[1]
    assert 0 < killed_at["step"] < _steps(cfg)
    second = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming it" in second.stdout + second.stderr
    final = ckpt.latest_valid(run_uri(cfg), log=lambda *a: None)[1]
    assert final["step"] == _steps(cfg)
    # Steps logged before the kill but after the checkpoint were rolled back and redone.
    log = _read_id_log(cfg)
    per_epoch = _steps(cfg) // cfg.train.epochs
    for epoch in range(cfg.train.epochs):
        kept = {}
        for rec in log:
            if rec["epoch"] == epoch:
                kept[(rec["rank"], rec["step"])] = rec["ids"]  # a redone step replaces the rolled-back one
        ids = [i for v in kept.values() for i in v]
        assert len(ids) == len(set(ids)) == per_epoch * 4 * 2
    assert read_outcome(run_uri(cfg))["status"] == "finished"
    # TensorBoard: every step once, no gap at the resume point (the checkpoint's step included).
    from mtseg.report import read_scalars

    steps = [int(s) for s, _ in read_scalars(os.path.join(local_run_dir(cfg), "tensorboard"))["train/loss"]]
    assert steps == list(range(1, _steps(cfg) + 1))


def test_node_removed_mid_epoch_is_survived_with_the_same_step_count(tiny_dataset, s3_bucket, tmp_path):
    """A multi-node ``ray.cluster_utils.Cluster`` on loopback loses the node that hosts the workers.

    It runs in its own process (tests/train/node_removal.py): the session's in-process Ray
    cannot also drive a second cluster.
    """
    script = os.path.join(os.path.dirname(__file__), "node_removal.py")
    overrides = _overrides(tiny_dataset, s3_bucket, "noderemoved")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, script, *overrides], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=840
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(lines[-1])
    assert report["workers_on_removed_node"] >= 1
    assert report["error"] is None and report["finished"], report
    cfg = load_config(None, overrides)
    assert 0 < report["step_at_removal"] < _steps(cfg)
    assert report["step"] == _steps(cfg)
