"""The stream: synth -> shard -> manifest -> batches, without Ray, through Ray Data, and from SeaweedFS."""

import json
import pickle
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

from mtseg.config import load_config
from mtseg.data.categories import IGNORE_INDEX
from mtseg.data.manifest import ManifestError, read_manifest, shard_uris
from mtseg.data.pipeline import (
    CHUNK_ROWS,
    ChunkedTransform,
    SampleTransform,
    categories_of,
    is_labeled,
    iter_local_batches,
    read_split,
    to_torch,
    worker_batches,
)
from mtseg.data.shard import shard_coco
from mtseg.data.synth import synthesize
from mtseg.data.targets import Instances, WireField, decode_annotations, label_field
from mtseg.tasks import TASKS, build_tasks, register
from mtseg.tasks.base import Task
from mtseg.train.data import plan_epoch

SPLIT = "train2017"
N_IMAGES = 20
SIZE = 32

DTYPES = {
    "image": torch.float32,
    "semantic": torch.int64,
    "supercategory": torch.int64,
    "boundary": torch.float32,
    "center": torch.float32,
    "offset": torch.float32,
    "thing_mask": torch.float32,
    "image_id": torch.int64,
    "orig_size": torch.int64,
}  # the batch contract, spelled out independently of the module under test


def _shapes(b, s):
    return {
        "image": (b, 3, s, s),
        "semantic": (b, s, s),
        "supercategory": (b, s, s),
        "boundary": (b, s, s),
        "center": (b, 1, s, s),
        "offset": (b, 2, s, s),
        "thing_mask": (b, s, s),
        "image_id": (b,),
        "orig_size": (b, 2),
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


@pytest.fixture
def tasks(shards, cfg):
    return build_tasks(cfg, categories_of(read_manifest(shards, SPLIT)))


def _collect(batches):
    out = {}
    for b in batches:
        for k, v in b.items():
            out.setdefault(k, []).append(v)
    cat = {k: torch.cat(v) for k, v in out.items()}
    order = torch.argsort(cat["image_id"])
    return {k: v[order] for k, v in cat.items()}


def test_local_stream_follows_the_batch_contract(shards, cfg, tasks):
    batches = list(iter_local_batches(shards, SPLIT, None, cfg, tasks=tasks, train=True))
    assert [len(b["image_id"]) for b in batches] == [8, 8, 4]
    for b in batches:
        assert set(b) == set(DTYPES)
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


def test_images_without_annotations_give_background_targets(shards, cfg, tasks):
    allb = _collect(iter_local_batches(shards, SPLIT, None, cfg, tasks=tasks, train=False))
    empty = (allb["semantic"] == 0).flatten(1).all(1)
    assert empty.any(), "the synthetic set has images without objects"
    assert not allb["center"][empty].any() and not allb["offset"][empty].any()


def test_labeled_fraction_withholds_the_labels_of_a_fixed_share_of_train_images(shards, cfg, tasks):
    ids = range(20_000)
    quarter = {i for i in ids if is_labeled(i, 0.25)}
    half = {i for i in ids if is_labeled(i, 0.5)}
    assert abs(len(quarter) / len(ids) - 0.25) < 0.01 and abs(len(half) / len(ids) - 0.5) < 0.01
    assert quarter < half  # a larger share keeps every image a smaller one kept
    assert all(is_labeled(i, 1.0) for i in range(100))

    semi = load_config(None, [f"data.image_size={SIZE}", "data.batch_size=8", "tasks.patch_size=4", "data.labeled_fraction=0.5"])
    full = _collect(iter_local_batches(shards, SPLIT, None, cfg, tasks=tasks, train=True, epoch=1, seed=5))
    part = _collect(iter_local_batches(shards, SPLIT, None, semi, tasks=tasks, train=True, epoch=1, seed=5))
    assert "labeled" not in full and part["labeled"].dtype == torch.bool
    keep = torch.tensor([is_labeled(i, 0.5) for i in part["image_id"].tolist()])
    assert torch.equal(part["labeled"], keep) and keep.any() and not keep.all()
    assert torch.equal(part["image"], full["image"])  # the same images and crops: only labels differ
    for key in ("semantic", "supercategory", "boundary", "center", "offset", "thing_mask"):
        assert torch.equal(part[key][keep], full[key][keep]), key
        assert not part[key][~keep].any(), key  # withheld: no objects at all
    assert any(full[key][~keep].any() for key in ("semantic", "boundary"))  # and they had some
    # Evaluation reads every label.
    assert "labeled" not in _collect(iter_local_batches(shards, SPLIT, None, semi, tasks=tasks, train=False))


def test_validation_is_deterministic_and_training_reproducible(shards, cfg, tasks):
    a = _collect(iter_local_batches(shards, SPLIT, None, cfg, tasks=tasks, train=False))
    b = _collect(iter_local_batches(shards, SPLIT, None, cfg, tasks=tasks, train=False, batch_size=3))
    for k in DTYPES:
        assert torch.equal(a[k], b[k]), k
    t1 = _collect(iter_local_batches(shards, SPLIT, None, cfg, tasks=tasks, train=True, epoch=1, seed=5))
    t2 = _collect(iter_local_batches(shards, SPLIT, None, cfg, tasks=tasks, train=True, epoch=1, seed=5))
    t3 = _collect(iter_local_batches(shards, SPLIT, None, cfg, tasks=tasks, train=True, epoch=2, seed=5))
    assert torch.equal(t1["image"], t2["image"]) and torch.equal(t1["semantic"], t2["semantic"])
    assert not torch.equal(t1["image"], t3["image"])


def test_limit_drop_last_and_shard_subset(shards, cfg, tasks):
    assert sum(len(b["image_id"]) for b in iter_local_batches(shards, SPLIT, None, cfg, tasks=tasks, train=False, limit=11)) == 11
    sizes = [len(b["image_id"]) for b in iter_local_batches(shards, SPLIT, None, cfg, tasks=tasks, train=False, drop_last=True)]
    assert sizes == [8, 8]
    manifest = read_manifest(shards, SPLIT)
    first = manifest["shards"][0]
    n = sum(
        len(b["image_id"]) for b in iter_local_batches(shards, SPLIT, None, cfg, tasks=tasks, train=False, shards=[first["path"]])
    )
    assert n == first["rows"]
    with pytest.raises(ValueError, match="not listed in the manifest"):
        next(iter_local_batches(shards, SPLIT, None, cfg, tasks=tasks, train=False, shards=["shard-99999.parquet"]))


def test_missing_split_fails_clearly(shards, cfg, tasks):
    with pytest.raises(ManifestError, match="no manifest"):
        next(iter_local_batches(shards, "val2017", None, cfg, tasks=tasks, train=False))


def test_sample_transform_pickles_and_names_bad_images(shards, cfg, tasks):
    cats = categories_of(read_manifest(shards, SPLIT))
    fn = pickle.loads(pickle.dumps(SampleTransform.from_config(cats, cfg, tasks, train=True)))
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
    assert fn.to_torch(chunks[1])["image"].shape == (3, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="missing columns"):
        fn(rows.drop_columns(["annotations"]))


def test_chunks_carry_each_images_ground_truth(shards, cfg, tasks):
    import pyarrow.parquet as pq

    cats = categories_of(read_manifest(shards, SPLIT))
    fn = SampleTransform.from_config(cats, cfg, tasks, train=False)
    rows = pq.read_table(shards + "/" + SPLIT + "/" + read_manifest(shards, SPLIT)["shards"][0]["path"])
    (chunk,) = ChunkedTransform(fn, with_gt=True)(rows)
    gt = [json.loads(s) for s in chunk["gt"]]
    assert [g["image_id"] for g in gt] == chunk["image_id"].tolist() == rows.column("image_id").to_pylist()
    for g, row in zip(gt, rows.to_pylist()):
        assert (g["height"], g["width"]) == (row["height"], row["width"])
        assert [a["segmentation_counts"].encode("ascii") for a in g["annotations"]] == [
            a["segmentation_counts"] for a in row["annotations"]
        ]


def test_wire_layout_is_exact_and_to_torch_gives_the_contract(shards, cfg, tasks):
    cats = categories_of(read_manifest(shards, SPLIT))
    fn = SampleTransform.from_config(cats, cfg, tasks, train=False)
    import pyarrow.parquet as pq

    path = shards + "/" + SPLIT + "/" + read_manifest(shards, SPLIT)["shards"][0]["path"]
    rows = pq.read_table(path).slice(0, 4)
    wire = fn(rows)
    assert set(fn.fields) == set(DTYPES)
    for k, field in fn.fields.items():
        assert wire[k].shape == (4, *field.shape) and wire[k].dtype == field.wire, k
    # The same image straight through the tasks' targets, in float: the wire loses nothing that matters.
    from mtseg.data.transforms import apply_joint, decode_image

    row = rows.to_pylist()[0]
    masks, labels, crowd = decode_annotations(row["annotations"], row["height"], row["width"], cats)
    px, masks = apply_joint(fn._transform, decode_image(row["image"]), masks)
    instances = Instances(masks, labels, crowd, cats)
    ref = {}
    for task in tasks.values():
        ref.update(task.build_targets(instances))
    # Read-only inputs, as Ray hands them out, must convert without copies being forgotten.
    for v in wire.values():
        v.setflags(write=False)
    batch = to_torch(wire, fn.fields)
    for k, dtype in DTYPES.items():
        assert batch[k].dtype == dtype, k
    for k in ("semantic", "supercategory", "boundary", "offset", "thing_mask"):
        np.testing.assert_array_equal(batch[k][0].numpy(), ref[k].astype(batch[k].numpy().dtype), err_msg=k)
    np.testing.assert_allclose(batch["center"][0].numpy(), ref["center"], atol=1e-3)
    np.testing.assert_allclose(batch["image"][0].numpy(), px.numpy() / 255.0, atol=1e-6)
    assert batch["image_id"].tolist()[0] == row["image_id"]
    # Already-converted batches pass through unchanged.
    again = to_torch(batch, fn.fields)
    assert all(torch.equal(again[k], batch[k]) for k in batch)


def test_label_maps_widen_for_large_label_spaces():
    assert label_field(SIZE, 255).wire == np.uint8  # classes 0..254 and 255 (ignore) fit
    assert label_field(SIZE, 256).wire == np.int32


@dataclass(frozen=True)
class ProbeTask(Task):
    """A task defined outside mtseg: 1 on every annotated pixel (a foreground mask)."""

    name: ClassVar[str] = "probe"
    target_keys: ClassVar[tuple[str, ...]] = ("probe",)

    @classmethod
    def from_config(cls, cfg, categories):
        return cls()

    @property
    def out_channels(self) -> int:
        return 1

    def target_fields(self, image_size):
        return {"probe": WireField((image_size, image_size), np.dtype(np.uint8), torch.float32)}

    def build_targets(self, instances):
        return {"probe": instances.segments > 0}

    def loss(self, output, batch):
        return torch.nn.functional.binary_cross_entropy_with_logits(output[:, 0], batch["probe"])

    def metric(self):
        return None


def test_a_task_defined_outside_mtseg_builds_its_target_in_the_stream(shards, cfg, tasks):
    cats = categories_of(read_manifest(shards, SPLIT))
    with_probe = {**tasks, "probe": ProbeTask()}
    fn = pickle.loads(pickle.dumps(SampleTransform.from_config(cats, cfg, with_probe, train=True, seed=2)))
    assert fn.fields["probe"].dtype == torch.float32
    batches = _collect(iter_local_batches(shards, SPLIT, cats, cfg, train=True, tasks=with_probe, seed=2))
    assert batches["probe"].dtype == torch.float32
    # Annotated pixels: a class or crowd (ignore) in the semantic target.
    assert torch.equal(batches["probe"], (batches["semantic"] > 0).float())
    assert batches["probe"].any()
    # Its key sits beside the others; the rest of the batch is what it is without it.
    plain = _collect(iter_local_batches(shards, SPLIT, cats, cfg, train=True, tasks=tasks, seed=2))
    assert set(batches) == set(plain) | {"probe"}
    assert all(torch.equal(batches[k], plain[k]) for k in plain)


def test_two_tasks_cannot_claim_one_batch_key(shards, cfg, tasks):
    @dataclass(frozen=True)
    class Clash(ProbeTask):
        name: ClassVar[str] = "clash"

        def target_fields(self, image_size):
            return {"semantic": label_field(image_size, 3)}

    cats = categories_of(read_manifest(shards, SPLIT))
    with pytest.raises(ValueError, match="task clash: batch key 'semantic' is already taken"):
        SampleTransform.from_config(cats, cfg, {**tasks, "clash": Clash()}, train=False)


def test_register_adds_a_task_with_one_call():
    import mtseg.config

    tasks, names = dict(TASKS), list(getattr(mtseg.config, "KNOWN_TASK_NAMES", ()))
    try:
        assert register(ProbeTask) is ProbeTask and TASKS["probe"] is ProbeTask
        register(ProbeTask)  # again: the same class, no error

        @dataclass(frozen=True)
        class Other(ProbeTask):
            pass

        with pytest.raises(ValueError, match="task 'probe' is already"):
            register(Other)
        with pytest.raises(TypeError, match="not a subclass"):
            register(dict)
    finally:  # the registry as it was, for the tests that follow
        TASKS.clear()
        TASKS.update(tasks)
        if names:
            mtseg.config.KNOWN_TASK_NAMES[:] = names


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


def _eval_stream(uri, shards, fn):
    """Evaluation's stream: read + transform fused, one task per shard; batches and gt rows."""
    ds = read_split(uri, SPLIT, shards=shards)[0]
    ds = ds.map_batches(ChunkedTransform(fn, with_gt=True), batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
    batches = list(ds.iter_batches(batch_size=8, batch_format="numpy"))
    gt = [json.loads(s) for b in batches for s in b["gt"]]
    return ds, _collect(fn.to_torch({k: v for k, v in b.items() if k != "gt"}) for b in batches), gt


@pytest.mark.slow
def test_ray_streams_match_the_local_path(ray_local, shards, cfg, tasks):
    manifest = read_manifest(shards, SPLIT)
    cats = categories_of(manifest)
    fn = SampleTransform.from_config(cats, cfg, tasks, train=False)
    ds, got, gt = _eval_stream(shards, None, fn)
    want = _collect(iter_local_batches(shards, SPLIT, None, cfg, tasks=tasks, train=False))
    for k in DTYPES:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k
    assert sorted(g["image_id"] for g in gt) == want["image_id"].tolist()
    # One fused read + map task per shard, nothing materialized: what a task holds is bounded
    # by one shard, however many shards there are.
    assert f"ReadParquet->MapBatches(ChunkedTransform): {len(manifest['shards'])} tasks executed" in ds.stats()
    # Training: two workers' slices of the epoch plan make up the epoch, and the draws depend on
    # (seed, epoch, image_id) only, not on which worker decoded what.
    plan = list(zip(shard_uris(shards, SPLIT, manifest), (s["rows"] for s in manifest["shards"])))
    train = SampleTransform.from_config(cats, cfg, tasks, train=True, epoch=3, seed=1)
    got_t = _collect(
        b
        for rank in (0, 1)
        for b in worker_batches(
            plan_epoch(plan, seed=1, epoch=3, world_size=2, rank=rank),
            train,
            batch_size=5,
            drop_last=False,
            rows_per_task=4,
            num_cpus=0.5,
        )
    )
    want_t = _collect(iter_local_batches(shards, SPLIT, None, cfg, tasks=tasks, train=True, epoch=3, seed=1))
    for k in DTYPES:
        assert torch.equal(got_t[k], want_t[k]), k


@pytest.mark.slow
def test_synth_shard_stream_round_trip_through_seaweedfs(ray_local, s3_bucket, coco_root, shards, cfg, tasks):
    manifest = shard_coco(coco_root, SPLIT, s3_bucket, images_per_shard=7, log=lambda _: None)
    assert read_manifest(s3_bucket, SPLIT)["shards"] == manifest["shards"]
    fn = SampleTransform.from_config(categories_of(manifest), cfg, tasks, train=False)
    _, got, _ = _eval_stream(s3_bucket, [s["path"] for s in reversed(manifest["shards"])], fn)
    assert len(got["image_id"]) == N_IMAGES
    # Same bytes in, same batches out: S3 shards give what the local shards give.
    want = _collect(iter_local_batches(shards, SPLIT, None, cfg, tasks=tasks, train=False))
    for k in DTYPES:
        assert torch.equal(got[k], want[k]), k
    # The non-Ray path reads S3 too.
    n = sum(len(b["image_id"]) for b in iter_local_batches(s3_bucket, SPLIT, None, cfg, tasks=tasks, train=False))
    assert n == N_IMAGES
