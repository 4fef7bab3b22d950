"""The stream: synth -> shard -> manifest -> batches, without Ray, through Ray Data, and from SeaweedFS."""

import pickle

import numpy as np
import pytest
import torch

from mtseg.config import load_config
from mtseg.data.categories import IGNORE_INDEX
from mtseg.data.manifest import ManifestError, read_manifest
from mtseg.data.pipeline import (
    BATCH_KEYS,
    CHUNK_ROWS,
    CONTRACT_DTYPES,
    ChunkedTransform,
    SampleTransform,
    build_stream,
    categories_of,
    iter_local_batches,
    iter_torch,
    label_dtype,
    read_split,
    to_torch,
    wire_spec,
)
from mtseg.data.shard import shard_coco
from mtseg.data.synth import synthesize

SPLIT = "train2017"
N_IMAGES = 20
SIZE = 32

DTYPES = {
    "image": torch.float32, "semantic": torch.int64, "supercategory": torch.int64, "boundary": torch.float32,
    "center": torch.float32, "offset": torch.float32, "thing_mask": torch.float32, "image_id": torch.int64,
    "orig_size": torch.int64,
}  # the batch contract, spelled out independently of the module under test


def _shapes(b, s):
    return {
        "image": (b, 3, s, s), "semantic": (b, s, s), "supercategory": (b, s, s), "boundary": (b, s, s),
        "center": (b, 1, s, s), "offset": (b, 2, s, s), "thing_mask": (b, s, s), "image_id": (b,), "orig_size": (b, 2),
    }


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    synthesize(str(root), train=N_IMAGES, val=0, size=48, seed=3)
    return str(root)


@pytest.fixture(scope="module")
def shards(coco_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards"))
    shard_coco(coco_root, SPLIT, out, images_per_shard=6, log=lambda _: None)
    return out


@pytest.fixture
def cfg():
    return load_config(None, [f"data.image_size={SIZE}", "data.batch_size=8", "tasks.patch_size=4"])


def _collect(batches):
    out = {}
    for b in batches:
        for k, v in b.items():
            out.setdefault(k, []).append(v)
    cat = {k: torch.cat(v) for k, v in out.items()}
    order = torch.argsort(cat["image_id"])
    return {k: v[order] for k, v in cat.items()}


def test_local_stream_follows_the_batch_contract(shards, cfg):
    batches = list(iter_local_batches(shards, SPLIT, None, cfg, train=True))
    assert [len(b["image_id"]) for b in batches] == [8, 8, 4]
    for b in batches:
        assert set(b) == set(BATCH_KEYS)
        for k, shape in _shapes(len(b["image_id"]), SIZE).items():
            assert tuple(b[k].shape) == shape, k
            assert b[k].dtype == DTYPES[k], k
    allb = _collect(batches)
    assert len(set(allb["image_id"].tolist())) == N_IMAGES
    assert allb["orig_size"].tolist() == [[48, 48]] * N_IMAGES
    assert 0.0 <= allb["image"].min() and allb["image"].max() <= 1.0
    sem = allb["semantic"]
    assert ((sem >= 0) & (sem < 7) | (sem == IGNORE_INDEX)).all()  # 6 synthetic classes + background
    assert (sem > 0).any() and (allb["boundary"] > 0).any() and (allb["center"] == 1.0).any()


def test_images_without_annotations_give_background_targets(shards, cfg):
    allb = _collect(iter_local_batches(shards, SPLIT, None, cfg, train=False))
    empty = (allb["semantic"] == 0).flatten(1).all(1)
    assert empty.any(), "the synthetic set has images without objects"
    assert not allb["center"][empty].any() and not allb["offset"][empty].any()


def test_validation_is_deterministic_and_training_reproducible(shards, cfg):
    a = _collect(iter_local_batches(shards, SPLIT, None, cfg, train=False))
    b = _collect(iter_local_batches(shards, SPLIT, None, cfg, train=False, batch_size=3))
    for k in BATCH_KEYS:
        assert torch.equal(a[k], b[k]), k
    t1 = _collect(iter_local_batches(shards, SPLIT, None, cfg, train=True, epoch=1, seed=5))
    t2 = _collect(iter_local_batches(shards, SPLIT, None, cfg, train=True, epoch=1, seed=5))
    t3 = _collect(iter_local_batches(shards, SPLIT, None, cfg, train=True, epoch=2, seed=5))
    assert torch.equal(t1["image"], t2["image"]) and torch.equal(t1["semantic"], t2["semantic"])
    assert not torch.equal(t1["image"], t3["image"])


def test_limit_drop_last_and_shard_subset(shards, cfg):
    assert sum(len(b["image_id"]) for b in iter_local_batches(shards, SPLIT, None, cfg, train=False, limit=11)) == 11
    sizes = [len(b["image_id"]) for b in iter_local_batches(shards, SPLIT, None, cfg, train=False, drop_last=True)]
    assert sizes == [8, 8]
    manifest = read_manifest(shards, SPLIT)
    first = manifest["shards"][0]
    n = sum(len(b["image_id"]) for b in iter_local_batches(shards, SPLIT, None, cfg, train=False, shards=[first["path"]]))
    assert n == first["rows"]
    with pytest.raises(ValueError, match="not listed in the manifest"):
        next(iter_local_batches(shards, SPLIT, None, cfg, train=False, shards=["shard-99999.parquet"]))


def test_missing_split_fails_clearly(shards, cfg):
    with pytest.raises(ManifestError, match="no manifest"):
        next(iter_local_batches(shards, "val2017", None, cfg, train=False))


def test_sample_transform_pickles_and_names_bad_images(shards, cfg):
    cats = categories_of(read_manifest(shards, SPLIT))
    fn = pickle.loads(pickle.dumps(SampleTransform.from_config(cats, cfg, train=True)))
    with pytest.raises(ValueError, match="image 77: image: cannot decode"):
        fn.sample(b"garbage", [], 77, 48, 48)
    out = fn.sample(_jpeg(48, 40), [], 78, 48, 40)
    assert out["image"].shape == (3, SIZE, SIZE) and out["orig_size"].tolist() == [48, 40]
    with pytest.raises(ValueError, match="image 79: decoded size"):
        fn.sample(_jpeg(48, 40), [], 79, 48, 48)
    rows = _rows([(_jpeg(48, 48), i) for i in range(CHUNK_ROWS + 3)])
    assert fn(rows)["image_id"].tolist() == list(range(CHUNK_ROWS + 3))
    chunks = list(ChunkedTransform(fn)(rows))
    assert [len(c["image_id"]) for c in chunks] == [CHUNK_ROWS, 3]
    assert to_torch(chunks[1])["image"].shape == (3, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="missing columns"):
        fn(rows.drop_columns(["annotations"]))


def test_wire_layout_is_exact_and_to_torch_gives_the_contract(shards, cfg):
    cats = categories_of(read_manifest(shards, SPLIT))
    fn = SampleTransform.from_config(cats, cfg, train=False)
    spec = wire_spec(SIZE, cats)
    import pyarrow.parquet as pq

    path = shards + "/" + SPLIT + "/" + read_manifest(shards, SPLIT)["shards"][0]["path"]
    rows = pq.read_table(path).slice(0, 4)
    wire = fn(rows)
    for k, (shape, dtype) in spec.items():
        assert wire[k].shape == (4, *shape) and wire[k].dtype == dtype, k
    # The same image straight through build_targets, in float: the wire loses nothing that matters.
    from mtseg.data.targets import build_targets, decode_annotations
    from mtseg.data.transforms import apply_joint, decode_image

    row = rows.to_pylist()[0]
    masks, labels, crowd = decode_annotations(row["annotations"], row["height"], row["width"], cats)
    px, masks = apply_joint(fn._transform, decode_image(row["image"]), masks)
    ref = build_targets(masks, labels, crowd, cats, boundary_width=cfg.tasks.boundary_width, center_sigma=cfg.tasks.center_sigma)
    # Read-only inputs, as Ray hands them out, must convert without copies being forgotten.
    for v in wire.values():
        v.setflags(write=False)
    batch = to_torch(wire)
    for k, dtype in CONTRACT_DTYPES.items():
        assert batch[k].dtype == dtype, k
    for k in ("semantic", "supercategory", "boundary", "offset", "thing_mask"):
        np.testing.assert_array_equal(batch[k][0].numpy(), ref[k].astype(batch[k].numpy().dtype), err_msg=k)
    np.testing.assert_allclose(batch["center"][0].numpy(), ref["center"], atol=1e-3)
    np.testing.assert_allclose(batch["image"][0].numpy(), px.numpy() / 255.0, atol=1e-6)
    assert batch["image_id"].tolist()[0] == row["image_id"]
    # Already-converted batches pass through unchanged.
    again = to_torch(batch)
    assert all(torch.equal(again[k], batch[k]) for k in batch)


def test_label_dtype_widens_for_large_label_spaces():
    from mtseg.data.categories import CategoryIndex

    small = CategoryIndex.from_categories([{"id": i, "name": str(i), "supercategory": "s"} for i in range(1, 81)])
    large = CategoryIndex.from_categories([{"id": i, "name": str(i), "supercategory": "s"} for i in range(1, 300)])
    assert label_dtype(small) == np.uint8 and label_dtype(large) == np.int32


def _jpeg(h, w):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _rows(items):
    import pyarrow as pa

    from mtseg.data.shard import SHARD_SCHEMA

    rows = [
        {"image_id": iid, "file_name": f"{iid}.jpg", "height": 48, "width": 48, "image": img, "annotations": []}
        for img, iid in items
    ]
    return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)


# ---------------------------------------------------------------------------- Ray Data


@pytest.mark.slow
def test_ray_stream_matches_the_local_path(ray_local, shards, cfg):
    ds, manifest = read_split(shards, SPLIT)
    stream = build_stream(ds, categories_of(manifest), cfg, train=False)
    got = _collect(iter_torch(stream, cfg.data.batch_size))
    want = _collect(iter_local_batches(shards, SPLIT, None, cfg, train=False))
    for k in BATCH_KEYS:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k
    # One fused read + map task per shard, nothing materialized: what a task holds is bounded
    # by one shard, however many shards there are.
    assert f"ReadParquet->MapBatches(ChunkedTransform): {len(manifest['shards'])} tasks executed" in stream.stats()
    # Training draws depend on (seed, epoch, image_id) only, not on which worker decoded what.
    train = build_stream(read_split(shards, SPLIT)[0], categories_of(manifest), cfg, train=True, epoch=3, seed=1)
    got_t = _collect(iter_torch(train, 5))
    want_t = _collect(iter_local_batches(shards, SPLIT, None, cfg, train=True, epoch=3, seed=1))
    assert torch.equal(got_t["image"], want_t["image"]) and torch.equal(got_t["offset"], want_t["offset"])


@pytest.mark.slow
def test_synth_shard_stream_round_trip_through_seaweedfs(ray_local, s3_bucket, coco_root, shards, cfg):
    manifest = shard_coco(coco_root, SPLIT, s3_bucket, images_per_shard=7, log=lambda _: None)
    assert read_manifest(s3_bucket, SPLIT)["shards"] == manifest["shards"]
    ds, manifest = read_split(s3_bucket, SPLIT, shards=[s["path"] for s in reversed(manifest["shards"])])
    stream = build_stream(ds, categories_of(manifest), cfg, train=False)
    got = _collect(iter_torch(stream, cfg.data.batch_size))
    assert len(got["image_id"]) == N_IMAGES
    # Same bytes in, same batches out: S3 shards give what the local shards give.
    want = _collect(iter_local_batches(shards, SPLIT, None, cfg, train=False))
    for k in BATCH_KEYS:
        assert torch.equal(got[k], want[k]), k
    # The non-Ray path reads S3 too.
    assert sum(len(b["image_id"]) for b in iter_local_batches(s3_bucket, SPLIT, None, cfg, train=False)) == N_IMAGES
