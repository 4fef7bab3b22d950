"""Session fixtures: one SeaweedFS object store and one local Ray per test session, on loopback."""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid

import pytest

from mtseg.cluster import SeaweedFS, apply_loopback_env, init_local_ray

apply_loopback_env()
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Data's progress bars flood the test log.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Some 30 tiny Train runs: each controller notices its workers' end at its next poll (every 2 s by
# default) and starts a spot-preemption watcher actor (one more process importing Ray Train) that
# a loopback test never needs.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """A running SeaweedFS (S3 API on 127.0.0.1) with its own credentials."""
    store = SeaweedFS(data_dir=str(tmp_path_factory.mktemp("seaweedfs"))).start()
    yield store
    store.stop()


@pytest.fixture(scope="session")
def s3_env(seaweedfs):
    """Point this process (and the Ray workers it starts) at the session's SeaweedFS."""
    saved = {k: os.environ.get(k) for k in seaweedfs.env()}
    os.environ.update(seaweedfs.env())
    from mtseg import storage

    storage._s3_filesystem.cache_clear()
    yield seaweedfs.env()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_env, seaweedfs):
    """``s3://<bucket>/<unique prefix>``: a fresh prefix per test in the session's bucket."""
    return f"s3://{seaweedfs.bucket}/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def ray_local(s3_env):
    """One local Ray (2 CPUs, loopback) for the whole session, with the store's env shipped to workers.

    With its dashboard, as ``mtseg train`` and ``tune`` start one: Ray Train's placement-group
    cleaner asks its State API whether a run's controller still lives.
    """
    import ray

    init_local_ray(num_cpus=2, dashboard=True, env=s3_env, log_to_driver=False)
    yield ray
    ray.shutdown()


# The tiny dataset of the Ray Train and Ray Tune end-to-end tests (48 train, 8 val images).
TRAIN_IMAGES, VAL_IMAGES = 48, 8


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory, s3_env, seaweedfs):
    """Factory: synthetic COCO (32 px) sharded into the session's bucket as s3://<bucket>/<name>."""
    from mtseg.data.shard import shard_coco
    from mtseg.data.synth import synthesize

    def make(name: str, *, train: int, val: int, seed: int, images_per_shard: int) -> str:
        root = str(tmp_path_factory.mktemp("coco"))
        synthesize(root, train=train, val=val, size=32, seed=seed)
        uri = f"s3://{seaweedfs.bucket}/{name}"
        for split in ("train2017", "val2017"):
            shard_coco(root, split, uri, images_per_shard=images_per_shard, log=lambda *a: None)
        return uri

    return make


@pytest.fixture(scope="session")
def tiny_dataset(synthetic_dataset):
    """s3://<bucket>/tiny: 48 train and 8 val images in shards of 16."""
    return synthetic_dataset("tiny", train=TRAIN_IMAGES, val=VAL_IMAGES, seed=1, images_per_shard=16)


@pytest.fixture(scope="module")
def one_cpu_thread():
    """One intra-op torch thread for a module of many tiny convolutions: as fast, and free of
    OpenMP barrier stalls when other processes share the two cores.

    Opt in with ``pytestmark = pytest.mark.usefixtures("one_cpu_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def two_ranks(tmp_path):
    """Run a worker script as two torch.distributed ranks on loopback; returns each rank's JSON.

    The script gets ``RANK``, ``MASTER_ADDR``/``MASTER_PORT`` in its environment and
    ``<out dir> <args...>`` on its command line, and writes ``<out dir>/rank<r>.json``.
    """
    import json
    import socket
    import subprocess
    import sys

    def run(worker: str, *args: str, timeout: float = 300) -> tuple[dict, dict]:
        script = tmp_path / "worker.py"
        script.write_text(worker)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            GLOO_SOCKET_IFNAME="lo",
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
        )
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), str(tmp_path), *args],
                env={**env, "RANK": str(r)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in range(2)
        ]
        for p in procs:
            try:
                out, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                pytest.fail("the two ranks timed out")
            assert p.returncode == 0, out[-3000:]
        return tuple(json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))

    return run


BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def load_benchmark():
    """Factory: the module of ``benchmarks/<name>.py``, loaded from its path (benchmarks/ is no package)."""

    def load(name: str):
        sys.path.insert(0, BENCHMARKS)  # it imports its siblings (_results, _store)
        try:
            spec = importlib.util.spec_from_file_location(f"{name}_benchmark", os.path.join(BENCHMARKS, f"{name}.py"))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        finally:
            sys.path.remove(BENCHMARKS)

    return load
