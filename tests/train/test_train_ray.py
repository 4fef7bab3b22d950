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
    for name in sorted(n for n in os.listdir(d) if n.startswith("rank")):
        with open(os.path.join(d, name)) as f:
            out += [json.loads(line) | {"rank": name} for line in f]
    return out


def _restarts(cfg) -> list[dict]:
    """The id log's restart records: the step each rank resumed from and the records it superseded."""
    from mtseg.train.trainer import local_run_dir

    d = os.path.join(local_run_dir(cfg), "image_ids")
    out = []
    for name in sorted(n for n in os.listdir(d) if n.startswith("restarts")):
        with open(os.path.join(d, name)) as f:
            out += [json.loads(line) for line in f]
    return out


def _assert_each_image_once_per_epoch(cfg) -> None:
    log = _read_id_log(cfg)
    for epoch in range(cfg.train.epochs):
        ids = [i for rec in log if rec["epoch"] == epoch for i in rec["ids"]]
        assert len(ids) == len(set(ids)) == TRAIN_IMAGES, f"epoch {epoch}"


# The second Ray beside the first tests here, and the node-removal test's run: 8 epochs, so that
# it trains through the session's 2-worker run and 2-trial search beside it.
OTHER_RAY = ("noderemoved", "train.epochs=8")


@pytest.fixture(scope="module")
def other_ray(tiny_dataset, s3_env, seaweedfs, tmp_path_factory):
    """A second, independent Ray on the machine, training: tests/train/node_removal.py in its own process.

    A multi-node ``ray.cluster_utils.Cluster`` on loopback (it records itself in
    /tmp/ray/ray_current_cluster, as ``ray start`` does) trains a 2-worker run and loses the
    node that hosts its workers mid-epoch. Yields once its run has a checkpoint, i.e. while it
    trains; the process, its cluster and the overrides it ran with.
    """
    script = os.path.join(os.path.dirname(__file__), "node_removal.py")
    name, *extra = OTHER_RAY
    overrides = _overrides(tiny_dataset, f"s3://{seaweedfs.bucket}/t-other-ray-{os.getpid()}", name, *extra)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cwd = tmp_path_factory.mktemp("other_ray")
    # To files, not pipes: nobody reads a pipe while the tests run, and a full one would stall it.
    with open(cwd / "stdout", "w") as out, open(cwd / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, script, *overrides], env=env, cwd=cwd, stdout=out, stderr=err, text=True)
    proc.outputs = cwd / "stdout", cwd / "stderr"
    try:
        _wait_for_checkpoint(run_uri_of(overrides), timeout=300)
        yield proc, overrides
    finally:
        if proc.poll() is None:
            try:
                proc.wait(timeout=840)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_uri_of(overrides: list[str]) -> str:
    from mtseg.train.trainer import run_uri

    return run_uri(load_config(None, overrides))


def test_two_workers_stream_from_s3_and_checkpoint_into_the_bucket(ray_local, tiny_dataset, s3_bucket, tmp_path, other_ray):
    """A 2-worker run, on a busy machine shared with a second Ray that trains (``other_ray``).

    Load: the second Ray (3 CPUs in Ray's books: a 2-worker run with 0.25-CPU map tasks that
    loses a node mid-epoch and restarts its workers) and this session's Ray (2 CPUs: this run's
    two half-CPU workers and their data tasks; then two 1-worker trials at once in the next
    test) share the machine's 2 cores: 4 to 5 runnable training processes plus their data
    tasks, a load average of 4 to 8 while both train.

    With a second Ray on the machine, Ray Train's placement-group cleaner used to ask that Ray
    (or the dashboard on 8265, whoever's it was) whether this run's controller lived, read "not
    found" as dead and removed the live run's placement group: its workers died "since its
    placement group was removed" and the run restarted. ``train.max_failures=0`` fails on any
    restart; the id log shows each image once per epoch and no restart record.
    """
    import ray
    from ray.util.state import get_actor

    from mtseg.train.trainer import run_training, run_uri

    proc, _ = other_ray
    assert proc.poll() is None, "the second Ray must be training"

    # What the cleaner asks, from a worker of this session's Ray: is a live actor of ours alive?
    @ray.remote(num_cpus=0)
    class Alive:
        def ping(self) -> bool:
            return True

    @ray.remote(num_cpus=0)
    def state_of(actor_id: str):
        found = get_actor(actor_id, timeout=30)
        return found.state if found else None

    alive = Alive.remote()
    ray.get(alive.ping.remote())
    assert ray.get(state_of.remote(alive._actor_id.hex())) == "ALIVE"

    cfg = _cfg(tiny_dataset, s3_bucket, "basic", "train.log_image_ids=true", "train.max_failures=0")
    result = run_training(cfg)
    assert result.error is None
    assert result.metrics["train/step"] == _steps(cfg)
    for key in ("val/miou", "val/supercategory_miou", "val/boundary_f1", "val/mask_ap", "val/psnr"):
        assert key in result.metrics
    cks = ckpt.list_checkpoints(run_uri(cfg))
    assert cks and all(c.startswith("s3://") for c in cks)
    assert len(cks) <= cfg.train.keep_checkpoints + 1
    assert ckpt.latest_valid(run_uri(cfg))[1]["step"] == _steps(cfg)
    # Every epoch, every worker sees a disjoint slice; together each image once.
    _assert_each_image_once_per_epoch(cfg)
    assert not _restarts(cfg)
    # The validation a run reports is the saved model's: both workers held rank 0's BatchNorm
    # statistics, so `mtseg evaluate` on the final checkpoint gives the same numbers.
    from mtseg.evaluate import evaluate_checkpoint

    final = ckpt.latest_valid(run_uri(cfg))[0]
    evaluated = evaluate_checkpoint(final, log=lambda *a: None, out=str(tmp_path)).metrics
    reported = {k: v for k, v in result.metrics.items() if k.startswith("val/")}
    assert reported.keys() <= evaluated.keys()
    for key, value in reported.items():
        assert value == pytest.approx(evaluated[key], abs=1e-9, nan_ok=True), key


def test_a_search_finishes_beside_another_rays_training(ray_local, tiny_dataset, s3_bucket, other_ray):
    """A 2-trial search (two 1-worker trials at once) beside the second Ray of ``other_ray``: the
    load of the test above. No trial restarts (``train.max_failures=0``), and no worker of this
    session's Ray printed "Found multiple active Ray instances" (Ray's helpers looking their
    Ray up among the two)."""
    import ray

    from mtseg.tune import run_tune

    search = _cfg(
        tiny_dataset,
        s3_bucket,
        "search",
        "train.num_workers=1",
        "train.epochs=1",
        "train.max_failures=0",
        "tasks.names=[semantic,boundary]",
    )
    search.tune.space = {"train.lr": "grid[0.003, 0.01]"}
    search.tune.scheduler, search.tune.num_samples, search.tune.experiment_name = "fifo", 1, "beside"
    outcome = run_tune(search, delta_m=False)
    assert [(r["state"], r["epochs"]) for r in outcome.rows] == [("TERMINATED", 1)] * 2

    logs = ray._private.worker._global_node.get_logs_dir_path()
    for name in os.listdir(logs):
        if name.endswith((".err", ".out")):
            with open(os.path.join(logs, name), errors="replace") as f:
                assert "Found multiple active Ray instances" not in f.read(), name


def test_node_removed_mid_epoch_is_survived_with_the_same_step_count(other_ray):
    """A multi-node ``ray.cluster_utils.Cluster`` on loopback loses the node that hosts the workers.

    It runs in its own process (tests/train/node_removal.py, the ``other_ray`` fixture): the
    session's in-process Ray cannot also drive a second cluster.
    """
    proc, overrides = other_ray
    proc.wait(timeout=840)
    stdout, stderr = (path.read_text() for path in proc.outputs)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, stdout[-3000:] + stderr[-3000:]
    report = json.loads(lines[-1])
    assert report["workers_on_removed_node"] >= 1
    assert report["error"] is None and report["finished"], report
    cfg = load_config(None, overrides)
    assert 0 < report["step_at_removal"] < _steps(cfg)
    assert report["step"] == _steps(cfg)


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


def _wait_for_checkpoint(run: str, timeout: float = 120, after_step: int = 0) -> int:
    """Wait for a complete checkpoint in ``run`` past ``after_step``; its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = ckpt.latest_valid(run, log=lambda *a: None)
        if found and found[1]["step"] > after_step:
            return found[1]["step"]
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint past step {after_step} in {run} after {timeout}s")


def test_a_killed_worker_then_the_store_down_for_seconds_are_survived_with_the_same_step_count(
    ray_local, tiny_dataset, s3_bucket, seaweedfs
):
    """One run, two faults (one run instead of two keeps the suite short): a Train worker is
    SIGKILLed after the first checkpoint; once the restarted workers have checkpointed again,
    the object store stops for 3 s."""
    from mtseg.train.trainer import run_training, run_uri

    cfg = _cfg(tiny_dataset, s3_bucket, "faults", "train.epochs=3", "train.log_image_ids=true")
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("result", run_training(cfg)))
    t.start()
    killed_after = _wait_for_checkpoint(run_uri(cfg))
    victims = _worker_pids()
    assert victims, "no Ray Train worker process found"
    os.kill(victims[-1], signal.SIGKILL)
    _wait_for_checkpoint(run_uri(cfg), after_step=killed_after, timeout=300)
    seaweedfs.stop()
    time.sleep(3)
    seaweedfs.start()
    t.join(timeout=600)
    result = out["result"]
    assert result.error is None
    assert result.metrics["train/step"] == _steps(cfg)
    # Ray restarted the worker group from the last checkpoint: the steps logged after it were
    # superseded (named in the restart record) and redone, so the log holds each image once.
    restarts = _restarts(cfg)
    assert restarts and {r["resumed_from_step"] for r in restarts} <= set(range(1, _steps(cfg)))
    _assert_each_image_once_per_epoch(cfg)


def test_driver_killed_then_same_run_name_resumes_and_sees_each_image_once(ray_local, tiny_dataset, s3_bucket, tmp_path):
    """Kill the `mtseg train` process mid-epoch, start it again: it resumes from the latest checkpoint."""
    import ray

    from mtseg.train.trainer import local_run_dir, run_uri

    args = _overrides(tiny_dataset, s3_bucket, "killdriver", "train.log_image_ids=true", "train.keep_checkpoints=1")
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
    # A checkpoint written as the driver died, and so never tracked by Ray Train, is gone too.
    assert len(ckpt.list_checkpoints(run_uri(cfg))) <= cfg.train.keep_checkpoints + 1
    # Steps logged before the kill but after the checkpoint were rolled back and redone: the
    # log holds the redone ones, the restart record the checkpoint's step.
    _assert_each_image_once_per_epoch(cfg)
    assert {r["resumed_from_step"] for r in _restarts(cfg)} == {killed_at["step"]}
    assert read_outcome(run_uri(cfg))["status"] == "finished"
    # TensorBoard: every step once, no gap at the resume point (the checkpoint's step included).
    from mtseg.report import read_scalars

    steps = [int(s) for s, _ in read_scalars(os.path.join(local_run_dir(cfg), "tensorboard"))["train/loss"]]
    assert steps == list(range(1, _steps(cfg) + 1))
