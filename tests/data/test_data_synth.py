"""Synthetic COCO: deterministic, COCO-shaped, and carrying COCO's quirks."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from mtseg.data.categories import CategoryIndex
from mtseg.data.synth import SPLITS, synthesize


def _tree_digest(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    result = synthesize(str(root), train=32, val=12, size=48, seed=3)
    return root, result


def _coco(root, split="train2017") -> COCO:
    return COCO(os.path.join(root, "annotations", f"instances_{split}.json"))


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = synthesize(str(tmp_path / "a"), train=6, val=3, size=32, seed=7)
    synthesize(str(tmp_path / "b"), train=6, val=3, size=32, seed=7)
    synthesize(str(tmp_path / "c"), train=6, val=3, size=32, seed=8)
    digest_a = _tree_digest(tmp_path / "a")
    assert digest_a == _tree_digest(tmp_path / "b")
    assert digest_a != _tree_digest(tmp_path / "c")
    assert len(digest_a) == 6 + 3 + 2
    assert a["splits"]["train2017"]["images"] == 6 and a["splits"]["val2017"]["images"] == 3


def test_layout_and_counts(synth):
    root, result = synth
    assert set(result["splits"]) == set(SPLITS)
    for split, info in result["splits"].items():
        assert info["annotation_file"] == os.path.join(root, "annotations", f"instances_{split}.json")
        data = json.loads(open(info["annotation_file"]).read())
        assert len(data["images"]) == info["images"] and len(data["annotations"]) == info["annotations"]
        for img in data["images"]:
            assert os.path.isfile(os.path.join(root, split, img["file_name"]))
    train_ids = {i["id"] for i in json.loads(open(result["splits"]["train2017"]["annotation_file"]).read())["images"]}
    val_ids = {i["id"] for i in json.loads(open(result["splits"]["val2017"]["annotation_file"]).read())["images"]}
    assert not train_ids & val_ids  # image ids are unique across splits, as in COCO


def test_categories_have_gaps_and_supercategories(synth):
    _, result = synth
    cats = result["categories"]
    ids = sorted(c["id"] for c in cats)
    assert 5 <= len(ids) <= 6
    assert ids != list(range(ids[0], ids[0] + len(ids)))  # not contiguous
    index = CategoryIndex.from_categories(cats)
    assert 2 <= len(index.supercategories) <= 3
    assert index.num_classes == len(cats) + 1


def test_quirks_present(synth):
    root, result = synth
    info = result["splits"]["train2017"]
    assert info["empty_images"] > 0 and info["grayscale_images"] > 0 and info["crowd_annotations"] > 0
    coco = _coco(root)
    anns = coco.loadAnns(coco.getAnnIds())
    crowd = [a for a in anns if a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)  # uncompressed, like COCO
    polygons = [a for a in anns if isinstance(a["segmentation"], list)]
    assert polygons and any(len(a["segmentation"]) > 1 for a in polygons)  # multi-part polygons
    compressed = [a for a in anns if isinstance(a["segmentation"], dict) and isinstance(a["segmentation"]["counts"], str)]
    assert compressed
    without = [i for i in coco.getImgIds() if not coco.getAnnIds(imgIds=i)]
    assert without
    modes = {Image.open(os.path.join(root, "train2017", coco.imgs[i]["file_name"])).mode for i in coco.getImgIds()}
    assert modes == {"RGB", "L"}


def test_annotations_decode_and_match_their_boxes(synth):
    root, _ = synth
    coco = _coco(root, "val2017")
    for img_id in coco.getImgIds():
        img = coco.imgs[img_id]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        union = np.zeros((img["height"], img["width"]), np.int32)
        for ann in anns:
            mask = coco.annToMask(ann)
            assert mask.shape == (img["height"], img["width"])
            assert mask.sum() == ann["area"] > 0
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [
                float(xs.min()),
                float(ys.min()),
                float(xs.max() - xs.min() + 1),
                float(ys.max() - ys.min() + 1),
            ]
            union += mask
        # Occluded objects are annotated by their visible part: annotations never overlap.
        assert union.max() <= 1


def test_objects_are_painted_in_their_colour_family(synth):
    # Learnability: pixels inside an object differ clearly from the low-saturation background.
    root, _ = synth
    coco = _coco(root)
    inside, outside = [], []
    for img_id in coco.getImgIds():
        rgb = np.asarray(Image.open(os.path.join(root, "train2017", coco.imgs[img_id]["file_name"])), dtype=np.float32) / 255
        if rgb.ndim == 2:
            continue
        sat = rgb.max(-1) - rgb.min(-1)
        fg = np.zeros(sat.shape, bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
            fg |= coco.annToMask(ann).astype(bool)
        inside.append(sat[fg])
        outside.append(sat[~fg])
    assert np.median(np.concatenate(inside)) > 0.35 > np.median(np.concatenate(outside))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"size": 8}, "size"),
        ({"train": -1}, "train"),
        ({"val": 1.5}, "val"),
        ({"seed": -2}, "seed"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthesize(str(tmp_path), **kwargs)


def test_rejects_object_storage_output():
    with pytest.raises(ValueError, match="local directory"):
        synthesize("s3://bucket/prefix", train=1, val=0)


def test_empty_split_is_valid_coco(tmp_path):
    result = synthesize(str(tmp_path), train=0, val=2, size=32)
    data = json.loads(open(result["splits"]["train2017"]["annotation_file"]).read())
    assert data["images"] == [] and data["annotations"] == [] and data["categories"]


# ----------------------------------------------------------------------------- the coco profile


@pytest.fixture(scope="module")
def coco_synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_coco")
    result = synthesize(str(root), train=30, val=2, seed=5, profile="coco")
    return root, result


def test_coco_profile_has_cocos_80_categories_and_12_supercategories(coco_synth):
    root, result = coco_synth
    cats = _coco(root).dataset["categories"]
    ids = [c["id"] for c in cats]
    assert len(ids) == 80 and len(set(ids)) == 80 and min(ids) == 1 and max(ids) == 90
    assert {12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(ids) == set()  # COCO's gaps
    by_id = {c["id"]: (c["name"], c["supercategory"]) for c in cats}
    assert by_id[1] == ("person", "person") and by_id[18] == ("dog", "animal") and by_id[90] == ("toothbrush", "indoor")
    index = CategoryIndex.from_categories(cats)
    assert index.num_classes == 81 and index.num_supercategories == 13
    assert result["profile"] == "coco" and result["categories"] == cats


def test_coco_profile_images_are_640x480_jpegs_of_cocos_weight(coco_synth):
    root, _ = coco_synth
    coco = _coco(root)
    shapes, weights = set(), []
    for info in coco.dataset["images"]:
        path = os.path.join(root, "train2017", info["file_name"])
        weights.append(os.path.getsize(path))
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert img.size == (info["width"], info["height"])
        shapes.add((info["height"], info["width"]))
    assert shapes == {(480, 640), (640, 480)}  # landscape and some portrait
    assert 100_000 < np.mean(weights) < 250_000, np.mean(weights)


def test_coco_profile_instances_are_drawn_like_cocos(coco_synth):
    root, result = coco_synth
    coco = _coco(root)
    anns = [a for a in coco.dataset["annotations"] if not a["iscrowd"]]
    per_image = len(anns) / len(coco.dataset["images"])
    assert 4.5 < per_image < 10.5, per_image
    areas = np.array([a["area"] for a in anns])
    small, large = (areas < 32**2).mean(), (areas >= 96**2).mean()
    assert 0.3 < small < 0.52 and 0.14 < large < 0.35, (small, large)
    # Occlusion: some annotations are visible parts only (RLE), the rest polygons.
    split = result["splits"]["train2017"]
    assert split["rle_annotations"] > 0 and split["polygon_annotations"] > split["rle_annotations"]
    for ann in anns[:40]:  # masks are the stated areas and inside their boxes
        mask = coco.annToMask(ann)
        assert mask.sum() == ann["area"]


def test_coco_profile_has_crowd_regions_and_is_deterministic(tmp_path):
    a = synthesize(str(tmp_path / "a"), train=12, val=0, seed=2, profile="coco", size=128)
    synthesize(str(tmp_path / "b"), train=12, val=0, seed=2, profile="coco", size=128)
    synthesize(str(tmp_path / "c"), train=12, val=0, seed=3, profile="coco", size=128)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b") != _tree_digest(tmp_path / "c")
    assert {(i["height"], i["width"]) for i in _coco(tmp_path / "a").dataset["images"]} <= {(96, 128), (128, 96)}
    crowd = sum(
        synthesize(str(tmp_path / f"s{s}"), train=12, val=0, seed=s, profile="coco", size=128)["splits"]["train2017"][
            "crowd_annotations"
        ]
        for s in range(4)
    )
    assert crowd > 0
    assert a["splits"]["train2017"]["grayscale_images"] == 0


@pytest.mark.parametrize("kwargs, match", [({"profile": "lvis"}, "profile"), ({"profile": "coco", "size": 32}, "size")])
def test_coco_profile_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthesize(str(tmp_path), train=1, val=0, **kwargs)
