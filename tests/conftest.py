"""Session fixtures: one SeaweedFS object store and one local Ray per test session, on loopback."""

from __future__ import annotations

import os
import uuid

import pytest

from mtseg.cluster import SeaweedFS, apply_loopback_env, init_local_ray

apply_loopback_env()
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Data's progress bars flood the test log.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


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
    """One local Ray (2 CPUs, loopback) for the whole session, with the store's env shipped to workers."""
    import ray

    init_local_ray(num_cpus=2, env=s3_env, log_to_driver=False)
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
