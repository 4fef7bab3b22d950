"""Common corruptions (mtseg/data/corruptions.py): the benchmark's 15, deterministic, and the pipeline's hook."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torchvision.transforms import v2

from mtseg.data.corruptions import (
    CORRUPTIONS,
    FAMILIES,
    CorruptionError,
    corrupt,
    parse_corruptions,
    parse_severities,
)

# Those that draw nothing: the same for every image key.
KEY_INDEPENDENT = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}


@pytest.fixture(scope="module")
def image():
    """A 40x48 photo-like image: smooth gradients plus texture, so that blurs and JPEG change it."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:40, 0:48]
    base = np.stack([x * 5, y * 6, (x + y) * 3], axis=-1) + rng.integers(0, 40, size=(40, 48, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def test_the_fifteen_benchmark_corruptions_in_the_library_order_and_families():
    from imagecorruptions import get_corruption_names

    assert list(CORRUPTIONS) == get_corruption_names("common")
    for family in FAMILIES:
        assert [n for n, f in CORRUPTIONS.items() if f == family] == get_corruption_names(family)


# numba compiles glass blur's pixel shuffle on its first call in a process: 3-10 s.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "glass_blur" else n for n in CORRUPTIONS])
def test_each_corruption_is_deterministic_per_image_and_severity_and_leaves_numpy_alone(image, name):
    before = image.copy()
    np.random.seed(123)
    out = corrupt(image, name, 3, key=7)
    assert np.random.random() == np.random.RandomState(123).random()  # the caller's draws go on as if untouched
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.array_equal(image, before)  # the input is not modified
    assert corrupt(image, name, 3, key=7).tobytes() == out.tobytes()  # the same call, the same bytes
    assert not np.array_equal(out, image)
    assert not np.array_equal(corrupt(image, name, 5, key=7), out)  # severities differ
    if name not in KEY_INDEPENDENT:
        assert not np.array_equal(corrupt(image, name, 3, key=8), out)  # images get their own draws


def test_severity_zero_is_the_image_itself(image):
    assert corrupt(image, "gaussian_noise", 0, key=1) is image


def test_threads_do_not_mix_their_draws(image):
    keys = list(range(8))
    serial = [corrupt(image, "gaussian_noise", 2, key=k) for k in keys]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda k: corrupt(image, "gaussian_noise", 2, key=k), keys))
    assert all(np.array_equal(a, b) for a, b in zip(serial, threaded))


def test_another_process_makes_the_same_bytes(image):
    # What a Ray worker elsewhere computes for the same image: global numpy, scikit-image's rng, a library file.
    names = ("gaussian_noise", "impulse_noise", "frost", "elastic_transform")
    script = (
        "import sys, hashlib, numpy as np\n"
        "from mtseg.data.corruptions import corrupt\n"
        "image = np.frombuffer(sys.stdin.buffer.read(), np.uint8).reshape(40, 48, 3)\n"
        f"for name in {names!r}:\n"
        "    print(hashlib.sha256(corrupt(image, name, 4, key=11).tobytes()).hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], input=image.tobytes(), capture_output=True, check=True, timeout=120)
    here = [hashlib.sha256(corrupt(image, name, 4, key=11).tobytes()).hexdigest() for name in names]
    assert out.stdout.decode().split() == here


def test_bad_images_are_refused_in_one_line(image):
    with pytest.raises(CorruptionError, match="at least 32x32"):
        corrupt(image[:20], "fog", 1, key=1)
    with pytest.raises(CorruptionError, match="uint8"):
        corrupt(image.astype(np.float32), "fog", 1, key=1)
    with pytest.raises(CorruptionError, match="--severities"):
        corrupt(image, "fog", 6, key=1)


def test_parse_corruptions():
    assert parse_corruptions("all") == tuple(CORRUPTIONS)
    assert parse_corruptions(" gaussian_noise, jpeg_compression ,gaussian_noise") == ("gaussian_noise", "jpeg_compression")
    for text, needle in (("gaussian_noise,speckle_noise,Fog", "unknown speckle_noise, Fog"), ("", "none given"), (",", "none")):
        with pytest.raises(CorruptionError) as e:
            parse_corruptions(text)
        message = str(e.value)
        assert "\n" not in message and needle in message, message
        assert "expected all or a comma-separated list of: gaussian_noise, shot_noise" in message
        assert message.endswith("jpeg_compression")


def test_parse_severities():
    assert parse_severities("1-5") == (1, 2, 3, 4, 5)
    assert parse_severities("3,1, 3") == (1, 3)
    assert parse_severities("1,3-4") == (1, 3, 4)
    for text, needle in (
        ("0", "got 0"),
        ("1-9", "got 6, 7, 8, 9"),
        ("x", "cannot read 'x'"),
        ("", "cannot read ''"),
        ("4-2", "backwards"),
    ):
        with pytest.raises(CorruptionError) as e:
            parse_severities(text)
        assert "\n" not in str(e.value) and needle in str(e.value) and "--severities" in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def shard_rows(tmp_path_factory):
    """Three synthetic 40 px validation images as shard rows, and their manifest."""
    from mtseg.data.manifest import read_manifest, shard_uris
    from mtseg.data.shard import shard_coco
    from mtseg.data.synth import synthesize

    root = tmp_path_factory.mktemp("corrupt")
    synthesize(str(root / "coco"), train=0, val=3, size=40, seed=4)
    shards = str(root / "shards")
    shard_coco(str(root / "coco"), "val2017", shards, log=lambda *a: None)
    manifest = read_manifest(shards, "val2017")
    return pq.read_table(shard_uris(shards, "val2017", manifest)[0]), manifest


def test_the_pipeline_corrupts_the_original_image_before_the_resize_and_severity_zero_is_clean(shard_rows):
    from mtseg.config import load_config
    from mtseg.data.pipeline import SampleTransform, categories_of
    from mtseg.data.transforms import decode_image
    from mtseg.tasks import build_tasks

    shard_rows, manifest = shard_rows
    cfg = load_config(None, ["data.image_size=32", "tasks.patch_size=4"])
    categories = categories_of(manifest)
    tasks = build_tasks(cfg, categories)

    def transform(corruption):
        return SampleTransform.from_config(categories, cfg, tasks, train=False, corruption=corruption)

    clean = transform(None)(shard_rows)
    zero = transform(("gaussian_noise", 0))
    assert zero.corruption is None
    assert all(np.array_equal(clean[k], v) for k, v in zero(shard_rows).items())  # bit for bit

    noisy = transform(("gaussian_noise", 3))(shard_rows)
    assert noisy["image"].tobytes() == transform(("gaussian_noise", 3))(shard_rows)["image"].tobytes()
    assert not np.array_equal(noisy["image"], clean["image"])
    assert all(np.array_equal(clean[k], noisy[k]) for k in clean if k != "image")  # the targets are the clean ones

    # At the original size, then resized: what the transform gives equals corrupting the decoded image by hand.
    row = shard_rows.slice(0, 1).to_pylist()[0]
    by_hand = corrupt(decode_image(row["image"]).permute(1, 2, 0).numpy(), "gaussian_noise", 3, key=row["image_id"])
    resized = v2.functional.resize(torch.from_numpy(by_hand).permute(2, 0, 1), [32, 32], antialias=True)
    assert np.array_equal(noisy["image"][0], resized.numpy())

    with pytest.raises(CorruptionError, match="unknown blur"):
        transform(("blur", 1))
