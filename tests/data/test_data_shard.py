"""COCO → parquet shards + manifest: round trip, COCO's quirks, bad input, threshold, resume."""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mtseg import storage
from mtseg.data import shard as shard_mod
from mtseg.data.manifest import SCHEMA_VERSION, ManifestError, read_manifest, shard_uris
from mtseg.data.shard import SHARD_SCHEMA, ShardError, shard_coco
from mtseg.data.synth import synthesize

SPLIT = "train2017"


def _ann_file(root) -> str:
    return os.path.join(root, "annotations", f"instances_{SPLIT}.json")


def _load(root) -> dict:
    with open(_ann_file(root)) as f:
        return json.load(f)


def _save(root, data: dict) -> None:
    with open(_ann_file(root), "w") as f:
        json.dump(data, f)


@pytest.fixture
def coco_root(tmp_path):
    """20 synthetic 32-px images: polygons, multi-part polygons, RLE, crowd, grayscale, empty images."""
    root = tmp_path / "coco"
    synthesize(str(root), train=20, val=0, size=32, seed=1)
    return str(root)


def _rows(out, split=SPLIT) -> list[dict]:
    manifest = read_manifest(out, split)
    rows = []
    for uri in shard_uris(out, split, manifest):
        rows.extend(pq.read_table(uri).to_pylist())
    return rows


def _quiet(_msg: str) -> None:
    pass


def test_round_trip(coco_root, tmp_path):
    out = str(tmp_path / "shards")
    manifest = shard_coco(coco_root, SPLIT, out, images_per_shard=7, log=_quiet)
    source = COCO(_ann_file(coco_root))

    assert manifest == read_manifest(out, SPLIT)
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["split"] == SPLIT
    assert manifest["categories"] == sorted(source.dataset["categories"], key=lambda c: c["id"])
    assert [s["path"] for s in manifest["shards"]] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert [s["rows"] for s in manifest["shards"]] == [7, 7, 6]
    counts = manifest["counts"]
    assert counts["images_listed"] == counts["images"] == 20 and counts["images_skipped"] == 0
    assert counts["annotations"] == counts["annotations_listed"] == len(source.anns) and counts["annotations_skipped"] == 0
    assert counts["crowd_annotations"] == sum(a["iscrowd"] for a in source.anns.values()) > 0
    assert counts["images_without_annotations"] > 0 and counts["shards"] == 3
    assert manifest["skipped"] == {"images": {}, "annotations": {}, "details": []}

    for entry, uri in zip(manifest["shards"], shard_uris(out, SPLIT, manifest)):
        data = storage.read_bytes(uri)
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert pq.read_schema(uri).remove_metadata().equals(SHARD_SCHEMA.remove_metadata())

    rows = _rows(out)
    assert [r["image_id"] for r in rows] == sorted(source.imgs)
    for row in rows:
        img = source.imgs[row["image_id"]]
        with open(os.path.join(coco_root, SPLIT, img["file_name"]), "rb") as f:
            assert row["image"] == f.read()  # original bytes, untouched
        assert (row["file_name"], row["height"], row["width"]) == (img["file_name"], img["height"], img["width"])
        assert [a["id"] for a in row["annotations"]] == sorted(source.getAnnIds(imgIds=row["image_id"]))
        for ann in row["annotations"]:
            src = source.anns[ann["id"]]
            rle = {"size": ann["segmentation_size"], "counts": ann["segmentation_counts"]}
            np.testing.assert_array_equal(mask_utils.decode(rle), source.annToMask(src))
            assert (ann["category_id"], ann["iscrowd"], ann["bbox"], ann["area"]) == (
                src["category_id"],
                src["iscrowd"],
                src["bbox"],
                src["area"],
            )


def test_images_the_training_decoder_cannot_read_are_converted_once(coco_root, tmp_path):
    """A BMP or TIFF named .jpg used to pass sharding (PIL reads it) and kill training; a 16-bit
    PNG reached the model as values up to 65535."""
    from mtseg.config import load_config
    from mtseg.data.pipeline import SampleTransform, categories_of
    from mtseg.data.transforms import decode_image
    from mtseg.tasks import build_tasks

    entries = _load(coco_root)["images"][:3]
    expected = {}
    for entry, fmt in zip(entries, ("BMP", "TIFF", "PNG16")):
        path = os.path.join(coco_root, SPLIT, entry["file_name"])  # keeps its .jpg name
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
        if fmt == "PNG16":
            gray = rgb[..., 0].astype(np.uint16)
            Image.fromarray(gray * 257).save(path, format="PNG")  # 16-bit; >> 8 gives gray back
            expected[entry["id"]] = np.repeat(gray[..., None], 3, axis=2).astype(np.uint8)
        else:
            Image.fromarray(rgb).save(path, format=fmt)
            expected[entry["id"]] = rgb

    out = str(tmp_path / "shards")
    manifest = shard_coco(coco_root, SPLIT, out, images_per_shard=50, log=_quiet)
    assert manifest["converted"] == {"BMP": 1, "TIFF": 1}
    assert manifest["counts"]["images_converted"] == 2 and manifest["counts"]["images"] == 20

    rows = _rows(out)
    for row in rows:
        pixels = decode_image(row["image"])  # the decoder training and predict use
        assert pixels.dtype == torch.uint8
        if row["image_id"] in expected:
            np.testing.assert_array_equal(pixels.permute(1, 2, 0).numpy(), expected[row["image_id"]])
    converted = [r for r in rows if r["image_id"] in {e["id"] for e in entries[:2]}]
    assert all(r["image"].startswith(b"\x89PNG") for r in converted)  # lossless, once

    cfg, categories = load_config(None), categories_of(manifest)
    transform = SampleTransform.from_config(categories, cfg, build_tasks(cfg, categories), train=True)
    for row in rows:  # what a training worker does with each row
        sample = transform.sample(row["image"], row["annotations"], row["image_id"], row["height"], row["width"])
        assert sample["image"].dtype == np.uint8


def test_coco_quirks_are_kept(coco_root, tmp_path):
    """Grayscale JPEGs, images without annotations, uncompressed crowd RLE, multi-part polygons, id gaps."""
    data = _load(coco_root)
    # A flat (non-nested) polygon, as some exporters write it.
    poly = next(a for a in data["annotations"] if isinstance(a["segmentation"], list) and len(a["segmentation"]) == 1)
    poly["segmentation"] = poly["segmentation"][0]
    _save(coco_root, data)
    out = str(tmp_path / "shards")
    manifest = shard_coco(coco_root, SPLIT, out, log=_quiet)
    assert manifest["counts"]["images_skipped"] == 0 and manifest["counts"]["annotations_skipped"] == 0
    ids = [c["id"] for c in manifest["categories"]]
    assert ids != list(range(1, len(ids) + 1)) and all(c["supercategory"] for c in manifest["categories"])

    source = COCO(_ann_file(coco_root))
    rows = {r["image_id"]: r for r in _rows(out)}
    modes = {Image.open(io.BytesIO(r["image"])).mode for r in rows.values()}
    assert "L" in modes
    assert any(not r["annotations"] for r in rows.values())
    crowd = [a for r in rows.values() for a in r["annotations"] if a["iscrowd"]]
    assert crowd and all(isinstance(source.anns[a["id"]]["segmentation"]["counts"], list) for a in crowd)
    multipart = [a for a in source.anns.values() if isinstance(a["segmentation"], list) and len(a["segmentation"]) > 1]
    assert multipart
    flat = rows[poly["image_id"]]["annotations"]
    stored = next(a for a in flat if a["id"] == poly["id"])
    assert mask_utils.area({"size": stored["segmentation_size"], "counts": stored["segmentation_counts"]}) == poly["area"]


def _break(coco_root) -> dict:
    """Inject every kind of bad input; return {name: image entry or annotation} for the checks."""
    data = _load(coco_root)
    images = {i["id"]: i for i in data["images"]}
    with_anns = sorted({a["image_id"] for a in data["annotations"] if not a["iscrowd"]})
    corrupt, truncated, missing, mismatched, host = (images[i] for i in with_anns[:5])
    path = lambda img: os.path.join(coco_root, SPLIT, img["file_name"])  # noqa: E731
    with open(path(corrupt), "wb") as f:
        f.write(b"this is not an image at all" * 4)
    with open(path(truncated), "rb") as f:
        blob = f.read()
    with open(path(truncated), "wb") as f:
        f.write(blob[: len(blob) // 2])
    os.remove(path(missing))
    Image.new("RGB", (mismatched["width"] + 3, mismatched["height"])).save(path(mismatched), format="JPEG")

    next_id = max(a["id"] for a in data["annotations"]) + 1
    h, w = host["height"], host["width"]

    def ann(seg, **kw):
        nonlocal next_id
        a = {
            "id": next_id,
            "image_id": host["id"],
            "category_id": data["categories"][0]["id"],
            "segmentation": seg,
            "iscrowd": 0,
            "bbox": [0, 0, 1, 1],
            "area": 1.0,
        }
        a.update(kw)
        next_id += 1
        data["annotations"].append(a)
        return a

    bad = {
        "corrupt": corrupt,
        "truncated": truncated,
        "missing": missing,
        "mismatched": mismatched,
        "two_points": ann([[1, 1, 5, 5]]),
        "collinear": ann([[0, 0, 4, 4, 8, 8]]),
        "unknown_image": ann([[0, 0, 4, 0, 4, 4]], image_id=987654321),
        "unknown_category": ann([[0, 0, 4, 0, 4, 4]], category_id=2),  # a gap in the synthetic ids
        "bad_rle_sum": ann({"size": [h, w], "counts": [3, 4]}, iscrowd=1),
        "bad_rle_size": ann({"size": [h + 1, w], "counts": [(h + 1) * w]}, iscrowd=1),
        "bad_rle_string": ann({"size": [h, w], "counts": "zzzz"}),
        "part_dropped": ann([[0, 0, 6, 0, 6, 6, 0, 6], [1, 1, 2, 2]]),
    }
    _save(coco_root, data)
    return bad


def test_bad_input_is_skipped_counted_and_reported(coco_root, tmp_path):
    bad = _break(coco_root)
    out = str(tmp_path / "shards")
    manifest = shard_coco(coco_root, SPLIT, out, images_per_shard=6, max_bad_fraction=0.25, log=_quiet)

    skipped = manifest["skipped"]
    assert skipped["images"] == {"corrupt_image": 1, "missing_file": 1, "size_mismatch": 1, "truncated_image": 1}
    assert skipped["annotations"] == {
        "degenerate_polygon": 2,
        "degenerate_polygon_part_dropped": 1,
        "invalid_rle": 3,
        "unknown_category": 1,
        "unknown_image": 1,
    }
    counts = manifest["counts"]
    assert counts["images_listed"] == 20 and counts["images"] == 16 and counts["images_skipped"] == 4
    assert counts["annotations_skipped"] == 7
    by_reason = {}
    for d in skipped["details"]:
        by_reason.setdefault(d["reason"], []).append(d)
    assert by_reason["missing_file"][0]["file_name"] == bad["missing"]["file_name"]
    assert by_reason["corrupt_image"][0]["image_id"] == bad["corrupt"]["id"]
    assert by_reason["unknown_image"][0]["annotation_id"] == bad["unknown_image"]["id"]

    rows = {r["image_id"]: r for r in _rows(out)}
    assert len(rows) == 16
    for name in ("corrupt", "truncated", "missing", "mismatched"):
        assert bad[name]["id"] not in rows
    host_ids = {a["id"] for a in rows[bad["two_points"]["image_id"]]["annotations"]}
    assert bad["part_dropped"]["id"] in host_ids  # one good part left: kept
    assert not host_ids & {bad[k]["id"] for k in ("two_points", "collinear", "bad_rle_sum", "bad_rle_size", "bad_rle_string")}


def test_too_many_bad_images_fails_with_one_line(coco_root, tmp_path):
    _break(coco_root)  # 4 bad images of 20
    out = str(tmp_path / "shards")
    with pytest.raises(ShardError) as info:
        shard_coco(coco_root, SPLIT, out, images_per_shard=50, max_bad_fraction=0.1, log=_quiet)
    msg = str(info.value)
    assert "\n" not in msg
    assert "train2017" in msg and "4 of 20" in msg and "max_bad_fraction=0.1" in msg
    assert not storage.exists(os.path.join(out, SPLIT, "manifest.json"))


def test_malformed_entries_count_as_bad(coco_root, tmp_path):
    data = _load(coco_root)
    data["images"].append(dict(data["images"][0]))  # duplicate id
    data["images"].append({"id": 5, "file_name": "../escape.jpg", "height": 32, "width": 32})
    data["images"].append({"id": "x"})
    data["annotations"].append({"category_id": 1})
    _save(coco_root, data)
    manifest = shard_coco(coco_root, SPLIT, str(tmp_path / "out"), max_bad_fraction=0.2, log=_quiet)
    assert manifest["skipped"]["images"] == {"duplicate_image_id": 1, "malformed_entry": 2}
    assert manifest["skipped"]["annotations"] == {"malformed_annotation": 1}
    assert manifest["counts"]["images_listed"] == 23 and manifest["counts"]["images"] == 20


def _mtimes(out) -> dict[str, int]:
    split_dir = os.path.join(out, SPLIT)
    return {n: os.stat(os.path.join(split_dir, n)).st_mtime_ns for n in os.listdir(split_dir) if n.endswith(".parquet")}


def _written(log: list[str]) -> list[str]:
    return [line.split()[1] for line in log if " written (" in line]


def test_resume_rewrites_only_missing_shards(coco_root, tmp_path):
    out = str(tmp_path / "shards")
    first = shard_coco(coco_root, SPLIT, out, images_per_shard=5, log=_quiet)
    os.remove(os.path.join(out, SPLIT, "manifest.json"))
    os.remove(os.path.join(out, SPLIT, "shard-00002.parquet"))
    before = _mtimes(out)

    log: list[str] = []
    second = shard_coco(coco_root, SPLIT, out, images_per_shard=5, log=log.append)
    assert _written(log) == ["shard-00002.parquet"]
    assert sum("already complete" in line for line in log) == 3
    assert second == first
    after = _mtimes(out)
    assert all(after[n] == t for n, t in before.items())


def test_resume_after_crash(coco_root, tmp_path, monkeypatch):
    out = str(tmp_path / "shards")
    real_write = storage.write_bytes
    calls = []

    def crash_on_third_shard(uri, data):
        if uri.endswith(".parquet"):
            calls.append(uri)
            if len(calls) == 3:
                raise RuntimeError("simulated crash")
        real_write(uri, data)

    monkeypatch.setattr(shard_mod.storage, "write_bytes", crash_on_third_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        shard_coco(coco_root, SPLIT, out, images_per_shard=5, log=_quiet)
    monkeypatch.setattr(shard_mod.storage, "write_bytes", real_write)
    assert not os.path.exists(os.path.join(out, SPLIT, "manifest.json"))
    assert sorted(_mtimes(out)) == ["shard-00000.parquet", "shard-00001.parquet"]  # nothing half-written
    assert not [n for n in os.listdir(os.path.join(out, SPLIT)) if ".tmp" in n]

    log: list[str] = []
    manifest = shard_coco(coco_root, SPLIT, out, images_per_shard=5, log=log.append)
    assert _written(log) == ["shard-00002.parquet", "shard-00003.parquet"]
    assert manifest["counts"]["images"] == 20


def test_shard_without_sidecar_is_rewritten(coco_root, tmp_path):
    # A crash between a shard and its sidecar: the shard cannot be trusted as complete.
    out = str(tmp_path / "shards")
    shard_coco(coco_root, SPLIT, out, images_per_shard=10, log=_quiet)
    os.remove(os.path.join(out, SPLIT, "_progress", "shard-00001.json"))
    log: list[str] = []
    shard_coco(coco_root, SPLIT, out, images_per_shard=10, log=log.append)
    assert _written(log) == ["shard-00001.parquet"]


def test_changed_input_rewrites_everything(coco_root, tmp_path):
    out = str(tmp_path / "shards")
    shard_coco(coco_root, SPLIT, out, images_per_shard=10, log=_quiet)
    data = _load(coco_root)
    data["annotations"] = data["annotations"][1:]
    _save(coco_root, data)
    log: list[str] = []
    manifest = shard_coco(coco_root, SPLIT, out, images_per_shard=10, log=log.append)
    assert _written(log) == ["shard-00000.parquet", "shard-00001.parquet"]
    assert manifest["counts"]["annotations"] == len(data["annotations"])


def test_shard_of_only_bad_images_is_recorded_not_written(coco_root, tmp_path):
    data = _load(coco_root)
    first = min(data["images"], key=lambda i: i["id"])
    os.remove(os.path.join(coco_root, SPLIT, first["file_name"]))
    out = str(tmp_path / "shards")
    manifest = shard_coco(coco_root, SPLIT, out, images_per_shard=1, max_bad_fraction=0.1, log=_quiet)
    assert len(manifest["shards"]) == 19 and "shard-00000.parquet" not in _mtimes(out)
    log: list[str] = []
    assert shard_coco(coco_root, SPLIT, out, images_per_shard=1, max_bad_fraction=0.1, log=log.append) == manifest
    assert not _written(log) and "shard-00000.parquet already complete (0 rows)" in log[1]


def test_reshard_with_other_size_removes_stale_shards(coco_root, tmp_path):
    out = str(tmp_path / "shards")
    shard_coco(coco_root, SPLIT, out, images_per_shard=5, log=_quiet)
    manifest = shard_coco(coco_root, SPLIT, out, images_per_shard=10, log=_quiet)
    assert sorted(_mtimes(out)) == [s["path"] for s in manifest["shards"]] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert sorted(os.listdir(os.path.join(out, SPLIT, "_progress"))) == ["shard-00000.json", "shard-00001.json"]
    assert len(_rows(out)) == 20


def test_storage_outage_is_fatal_not_bad_input(coco_root, tmp_path, monkeypatch):
    real_read = storage.read_bytes

    def denied(uri):
        if uri.endswith(".jpg"):
            raise storage.StorageError(f"{uri}: access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        return real_read(uri)

    monkeypatch.setattr(shard_mod.storage, "read_bytes", denied)
    with pytest.raises(storage.StorageError, match="access denied"):
        shard_coco(coco_root, SPLIT, str(tmp_path / "out"), max_bad_fraction=1.0, log=_quiet)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"images_per_shard": 0}, "images_per_shard"),
        ({"max_bad_fraction": 1.5}, "max_bad_fraction"),
        ({"workers": 0}, "workers"),
        ({"executor": "dask"}, "executor: must be one of local, ray"),
        ({"executor": "ray", "max_in_flight": 0}, "max_in_flight"),
    ],
)
def test_bad_arguments(coco_root, tmp_path, kwargs, match):
    with pytest.raises(ShardError, match=match):
        shard_coco(coco_root, SPLIT, str(tmp_path / "out"), log=_quiet, **kwargs)


def test_unusable_annotation_file(coco_root, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(ShardError, match="instances_test2017.json not found"):
        shard_coco(coco_root, "test2017", out, log=_quiet)
    with open(_ann_file(coco_root), "w") as f:
        f.write("{not json")
    with pytest.raises(ShardError, match="not valid JSON"):
        shard_coco(coco_root, SPLIT, out, log=_quiet)
    _save(coco_root, {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]})
    with pytest.raises(ShardError, match="lists no images"):
        shard_coco(coco_root, SPLIT, out, log=_quiet)
    _save(coco_root, {"images": [], "annotations": []})
    with pytest.raises(ShardError, match="categories"):
        shard_coco(coco_root, SPLIT, out, log=_quiet)


def test_read_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        read_manifest(str(tmp_path), SPLIT)
    path = tmp_path / SPLIT / "manifest.json"
    path.parent.mkdir()
    path.write_text("[]")
    with pytest.raises(ManifestError, match="JSON object"):
        read_manifest(str(tmp_path), SPLIT)
    path.write_text(
        json.dumps({"schema_version": 99, "split": SPLIT, "categories": [], "counts": {}, "shards": [], "skipped": {}})
    )
    with pytest.raises(ManifestError, match="schema_version 99"):
        read_manifest(str(tmp_path), SPLIT)


@pytest.mark.slow
def test_s3_round_trip_and_resume(tmp_path, s3_bucket):
    local = tmp_path / "coco"
    synthesize(str(local), train=12, val=0, size=32, seed=2)
    src = storage.join(s3_bucket, "coco")
    for dirpath, _, files in os.walk(local):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(src, os.path.relpath(path, local)), f.read())
    os.remove(local / SPLIT / sorted(os.listdir(local / SPLIT))[0])  # the S3 copy is what is read

    out = storage.join(s3_bucket, "shards")
    manifest = shard_coco(src, SPLIT, out, images_per_shard=5, log=_quiet)
    assert manifest == read_manifest(out, SPLIT)
    assert manifest["counts"]["images"] == 12 and len(manifest["shards"]) == 3
    for entry, uri in zip(manifest["shards"], shard_uris(out, SPLIT, manifest)):
        assert hashlib.sha256(storage.read_bytes(uri)).hexdigest() == entry["sha256"]

    storage.delete(storage.join(out, SPLIT, "manifest.json"))
    storage.delete(storage.join(out, SPLIT, "shard-00001.parquet"))
    log: list[str] = []
    again = shard_coco(src, SPLIT, out, images_per_shard=5, log=log.append)
    assert _written(log) == ["shard-00001.parquet"]
    assert again == manifest


def _split_files(out) -> dict[str, bytes]:
    """Every file of the split (shards, sidecars, manifest) by relative path."""
    split_dir = os.path.join(out, SPLIT)
    files = {}
    for dirpath, _, names in os.walk(split_dir):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, split_dir)] = f.read()
    return files


@pytest.mark.slow
def test_ray_tasks_write_the_same_shards_and_resume(coco_root, tmp_path, ray_local):
    _break(coco_root)  # skipped images and annotations land in the sidecars and the manifest too
    local, parallel = str(tmp_path / "local"), str(tmp_path / "ray")
    expected = shard_coco(coco_root, SPLIT, local, images_per_shard=3, max_bad_fraction=0.25, log=_quiet)
    log: list[str] = []
    # Two in flight over seven shards: tasks finish out of order and are queued behind the bound.
    manifest = shard_coco(
        coco_root, SPLIT, parallel, images_per_shard=3, max_bad_fraction=0.25, executor="ray", max_in_flight=2, log=log.append
    )
    assert manifest == expected and manifest["counts"]["images_skipped"] == 4
    assert sorted(_written(log)) == [f"shard-{i:05d}.parquet" for i in range(7)]
    assert _split_files(parallel) == _split_files(local)  # byte for byte, sidecars and manifest included

    # A run killed part-way leaves whole shards with their sidecars and no manifest: only the rest is rebuilt.
    os.remove(os.path.join(parallel, SPLIT, "manifest.json"))
    os.remove(os.path.join(parallel, SPLIT, "shard-00004.parquet"))
    os.remove(os.path.join(parallel, SPLIT, "_progress", "shard-00006.json"))
    before = _mtimes(parallel)
    log = []
    again = shard_coco(coco_root, SPLIT, parallel, images_per_shard=3, max_bad_fraction=0.25, executor="ray", log=log.append)
    assert sorted(_written(log)) == ["shard-00004.parquet", "shard-00006.parquet"]
    assert sum("already complete" in line for line in log) == 5
    assert again == expected and _split_files(parallel) == _split_files(local)
    after = _mtimes(parallel)
    assert all(after[n] == t for n, t in before.items() if n not in ("shard-00006.parquet",))


@pytest.mark.slow
def test_ray_tasks_stop_on_too_many_bad_images(coco_root, tmp_path, ray_local):
    _break(coco_root)
    out = str(tmp_path / "ray")
    with pytest.raises(ShardError, match=r"split train2017: \d of 20 images are bad"):
        shard_coco(coco_root, SPLIT, out, images_per_shard=3, max_bad_fraction=0.05, executor="ray", log=_quiet)
    assert not os.path.exists(os.path.join(out, SPLIT, "manifest.json"))


@pytest.mark.slow
def test_ray_task_storage_failure_is_one_line(coco_root, tmp_path, ray_local):
    out = tmp_path / "ray"
    (out / SPLIT / "shard-00001.parquet" / "in-the-way").mkdir(parents=True)  # the shard cannot be put there
    with pytest.raises(storage.StorageError) as raised:
        shard_coco(coco_root, SPLIT, str(out), images_per_shard=5, executor="ray", log=_quiet)
    assert "shard-00001.parquet" in str(raised.value) and "\n" not in str(raised.value)
    assert not os.path.exists(out / SPLIT / "manifest.json")


# ----------------------------------------------------------------------------- panoptic

from mtseg.data import coco_panoptic  # noqa: E402


@pytest.fixture
def panoptic_root(tmp_path):
    """12 synthetic 32-px panoptic images: stuff bands with void seams, things, crowd, empty images."""
    root = tmp_path / "panoptic"
    synthesize(str(root), train=12, val=0, size=32, seed=2, annotations="panoptic")
    return str(root)


def _panoptic_json(root) -> tuple[str, dict]:
    path = os.path.join(root, "annotations", f"panoptic_{SPLIT}.json")
    with open(path) as f:
        return path, json.load(f)


def test_panoptic_round_trip_keeps_every_segment_and_isthing(panoptic_root, tmp_path):
    out = str(tmp_path / "shards")
    manifest = shard_coco(panoptic_root, SPLIT, out, images_per_shard=5, annotations="panoptic", log=_quiet)
    _, data = _panoptic_json(panoptic_root)
    assert manifest["annotation_format"] == "panoptic"
    assert {c["name"]: c["isthing"] for c in manifest["categories"]} == {c["name"]: c["isthing"] for c in data["categories"]}
    assert manifest["counts"]["images"] == 12 and manifest["counts"]["images_skipped"] == 0
    segments = sum(len(a["segments_info"]) for a in data["annotations"])
    assert manifest["counts"]["annotations"] == manifest["counts"]["annotations_listed"] == segments
    rows = {r["image_id"]: r for r in _rows(out)}
    for entry in data["annotations"]:
        png = open(os.path.join(panoptic_root, "annotations", f"panoptic_{SPLIT}", entry["file_name"]), "rb").read()
        ids = coco_panoptic.read_png(png)
        stored = rows[entry["image_id"]]["annotations"]  # in segment-id order, ids unique in the split
        assert [a["id"] for a in stored] == [entry["image_id"] * 65536 + k for k in range(1, len(stored) + 1)]
        for seg, a in zip(sorted(entry["segments_info"], key=lambda s: s["id"]), stored, strict=True):
            mask = mask_utils.decode({"size": a["segmentation_size"], "counts": a["segmentation_counts"]}).astype(bool)
            np.testing.assert_array_equal(mask, ids == seg["id"])
            assert a["category_id"] == seg["category_id"] and a["iscrowd"] == seg["iscrowd"]
            assert a["area"] == seg["area"] and a["bbox"] == seg["bbox"]
    # Stuff and void both occur: the bands and their seams.
    stuff = {c["id"] for c in data["categories"] if not c["isthing"]}
    assert any(a["category_id"] in stuff for r in rows.values() for a in r["annotations"])


def test_panoptic_bad_input_is_skipped_counted_and_named(panoptic_root, tmp_path):
    path, data = _panoptic_json(panoptic_root)
    png_dir = os.path.join(panoptic_root, "annotations", f"panoptic_{SPLIT}")
    entries = data["annotations"]
    png = lambda e: os.path.join(png_dir, e["file_name"])  # noqa: E731
    os.remove(png(entries[0]))  # missing PNG
    open(png(entries[1]), "wb").write(b"not a png")  # unreadable
    Image.new("RGB", (7, 5)).save(png(entries[2]))  # another size
    entries[3]["segments_info"].append({"id": 9999, "category_id": entries[3]["segments_info"][0]["category_id"]})
    entries[4]["segments_info"] = entries[4]["segments_info"][1:]  # a PNG segment no longer listed
    entries[5]["segments_info"][0]["category_id"] = 999  # unknown category
    missing_entry = entries.pop(6)  # an image without its panoptic entry
    with open(path, "w") as f:
        json.dump(data, f)
    out = str(tmp_path / "shards")
    manifest = shard_coco(panoptic_root, SPLIT, out, annotations="panoptic", max_bad_fraction=0.75, log=_quiet)
    assert manifest["skipped"]["images"] == {
        "missing_panoptic_png": 1,
        "unreadable_panoptic_png": 1,
        "panoptic_size_mismatch": 1,
        "segment_not_in_png": 1,
        "png_segment_not_listed": 1,
        "unknown_category": 1,
        "missing_panoptic_annotation": 1,
    }
    named = {d["reason"]: d["image_id"] for d in manifest["skipped"]["details"]}
    assert named["missing_panoptic_png"] == entries[0]["image_id"]
    assert named["missing_panoptic_annotation"] == missing_entry["image_id"]
    assert manifest["counts"]["images"] == 5
    with pytest.raises(ShardError, match="of 12 images are bad"):
        shard_coco(panoptic_root, SPLIT, str(tmp_path / "again"), annotations="panoptic", log=_quiet)


def test_panoptic_categories_must_say_isthing(panoptic_root, tmp_path):
    path, data = _panoptic_json(panoptic_root)
    del data["categories"][0]["isthing"]
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(ShardError, match="needs 'isthing'"):
        shard_coco(panoptic_root, SPLIT, str(tmp_path / "shards"), annotations="panoptic", log=_quiet)
    with pytest.raises(ShardError, match="annotations: must be one of"):
        shard_coco(panoptic_root, SPLIT, str(tmp_path / "shards"), annotations="semantic", log=_quiet)
