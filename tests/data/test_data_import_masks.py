"""``mtseg data import-masks`` (mtseg/data/import_masks.py): label-mask PNGs -> COCO panoptic."""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from mtseg import storage
from mtseg.cli import main
from mtseg.data.import_masks import ImportMasksError, import_masks, parse_classes

SPLIT = "train"
H, W = 24, 32
VOID = 11

CLASSES_YAML = """\
ignore: [11]
classes:
  0: {name: sky, supercategory: background, isthing: false, color: [128, 128, 128]}
  3: {name: road, isthing: false}
  8: {name: car, supercategory: vehicle, isthing: true, color: [64, 0, 128]}
  300: {name: sign, supercategory: object, isthing: true}
"""


def _jpeg(h: int = H, w: int = W, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _mask(labels: np.ndarray, mode: str = "L") -> bytes:
    if mode == "P":  # a palette image: its indices are the labels, whatever colours they show
        img = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.astype(np.uint8).tobytes())
        img.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
        return _png(img)
    return _png(Image.fromarray(labels.astype(np.uint16 if mode == "I;16" else np.uint8)))


def _scene() -> np.ndarray:
    """Sky, two cars (one of two diagonally touching blocks), road in two parts, a void strip."""
    labels = np.zeros((H, W), dtype=np.int64)
    labels[2:6, 2:6] = 8
    labels[6:8, 6:8] = 8  # touches the block above only at a corner: the same segment
    labels[15:19, 20:26] = 8  # apart: a second car
    labels[20:24, 0:4] = 3
    labels[20:24, 28:32] = 3  # disconnected, still one road segment
    labels[10:12, 10:21] = VOID
    return labels


def _write_files(root, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = os.path.join(str(root), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def _ids(png: bytes) -> np.ndarray:
    """panopticapi's rgb2id, written out here rather than imported from the code under test."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _load(out: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(out, "annotations", f"panoptic_{SPLIT}.json")))


def _png_of(out: str, name: str) -> np.ndarray:
    return _ids(storage.read_bytes(storage.join(out, "annotations", f"panoptic_{SPLIT}", name)))


def _check_segments(ids: np.ndarray, labels: np.ndarray, segments: list[dict]) -> None:
    """The PNG, the segments and the mask agree: ids, categories, areas and boxes."""
    assert sorted({s["id"] for s in segments}) == sorted(set(np.unique(ids).tolist()) - {0})
    assert len({s["id"] for s in segments}) == len(segments) and all(s["id"] > 0 for s in segments)
    assert (ids == 0).sum() == np.isin(labels, [VOID]).sum()
    for seg in segments:
        where = ids == seg["id"]
        assert set(np.unique(labels[where]).tolist()) == {seg["category_id"]}
        ys, xs = np.nonzero(where)
        assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert seg["area"] == where.sum() and seg["iscrowd"] == 0


@pytest.fixture
def dataset(tmp_path):
    """images/ + masks/ + classes.yaml: a.jpg (L mask), b.PNG (palette mask), c.jpeg (16-bit mask)."""
    sign = np.zeros((H, W), dtype=np.int64)
    sign[4:9, 4:9] = 300
    sign[12:14, 20:30] = 3
    files = {
        "images/a.jpg": _jpeg(seed=1),
        "images/b.PNG": _png(Image.fromarray(np.full((H, W, 3), 90, np.uint8))),
        "images/c.jpeg": _jpeg(seed=2),
        "masks/a.png": _mask(_scene()),
        "masks/b.png": _mask(_scene(), "P"),
        "masks/c.png": _mask(sign, "I;16"),
        "classes.yaml": CLASSES_YAML.encode(),
    }
    _write_files(tmp_path, files)
    return tmp_path, files, {"a": _scene(), "b": _scene(), "c": sign}


def _run(root, out=None, **kwargs) -> tuple[dict, list[str]]:
    lines: list[str] = []
    summary = import_masks(
        str(root / "images"),
        str(root / "masks"),
        str(root / "classes.yaml"),
        out or str(root / "out"),
        SPLIT,
        log=lines.append,
        **kwargs,
    )
    return summary, lines


def test_round_trip_segments_ids_and_categories(dataset):
    root, files, labels = dataset
    summary, _ = _run(root)
    out = str(root / "out")
    data = _load(out)

    assert set(data) == {"info", "licenses", "images", "annotations", "categories"} and data["licenses"] == []
    assert data["images"] == [
        {"id": 1, "file_name": "a.jpg", "height": H, "width": W},
        {"id": 2, "file_name": "b.PNG", "height": H, "width": W},
        {"id": 3, "file_name": "c.jpeg", "height": H, "width": W},
    ]
    assert data["categories"] == [
        {"id": 0, "name": "sky", "supercategory": "background", "isthing": 0, "color": [128, 128, 128]},
        {"id": 3, "name": "road", "supercategory": "road", "isthing": 0},
        {"id": 8, "name": "car", "supercategory": "vehicle", "isthing": 1, "color": [64, 0, 128]},
        {"id": 300, "name": "sign", "supercategory": "object", "isthing": 1},
    ]
    for name in ("a.jpg", "b.PNG", "c.jpeg"):  # copied byte for byte
        assert (root / "out" / SPLIT / name).read_bytes() == files[f"images/{name}"]

    anns = {a["file_name"]: a for a in data["annotations"]}
    assert [a["image_id"] for a in data["annotations"]] == [1, 2, 3] and set(anns) == {"a.png", "b.png", "c.png"}
    for stem in ("a", "b", "c"):
        _check_segments(_png_of(out, f"{stem}.png"), labels[stem], anns[f"{stem}.png"]["segments_info"])
    # a: sky, road (two parts, one segment), car with the diagonal touch, the car apart.
    by_cat = [(s["category_id"], s["area"], s["bbox"]) for s in anns["a.png"]["segments_info"]]
    assert by_cat == [
        (0, H * W - 16 - 4 - 24 - 32 - 22, [0, 0, W, H]),
        (3, 32, [0, 20, W, 4]),
        (8, 20, [2, 2, 6, 6]),
        (8, 24, [20, 15, 6, 4]),
    ]
    assert anns["b.png"]["segments_info"] == anns["a.png"]["segments_info"]  # P mask: its indices
    assert [s["category_id"] for s in anns["c.png"]["segments_info"]] == [0, 3, 300]  # 16-bit values
    assert summary["counts"] == {
        "considered": 3,
        "left_out": 0,
        "images": 3,
        "skipped": 0,
        "ignored_files": 0,
        "segments": 11,
        "things": 5,
        "stuff": 6,
    }

    # A re-run rewrites the same bytes.
    before = (root / "out" / "annotations" / f"panoptic_{SPLIT}.json").read_bytes()
    assert _run(root)[0] == summary
    assert (root / "out" / "annotations" / f"panoptic_{SPLIT}.json").read_bytes() == before


def test_every_bad_input_is_skipped_counted_and_named(tmp_path):
    good = _scene()
    unknown = good.copy()
    unknown[0, 0], unknown[0, 1] = 5, 77
    truncated = _jpeg(seed=3)
    _write_files(
        tmp_path,
        {
            "classes.yaml": CLASSES_YAML.encode(),
            "images/good.jpg": _jpeg(),
            "masks/good.png": _mask(good),
            "images/nomask.jpg": _jpeg(),
            "masks/noimage.png": _mask(good),
            "images/dup.jpg": _jpeg(),
            "images/dup.png": _png(Image.new("RGB", (W, H))),
            "masks/dup.png": _mask(good),
            "images/size.jpg": _jpeg(),
            "masks/size.png": _mask(np.zeros((16, 16))),
            "images/garbage.jpg": b"not an image at all",
            "masks/garbage.png": _mask(good),
            "images/truncated.jpg": truncated[: len(truncated) // 2],
            "masks/truncated.png": _mask(good),
            "images/badmask.jpg": _jpeg(),
            "masks/badmask.png": b"\x89PNG\r\n\x1a\n broken",
            "images/rgbmask.jpg": _jpeg(),
            "masks/rgbmask.png": _png(Image.new("RGB", (W, H))),
            "images/jpegmask.jpg": _jpeg(),
            "masks/jpegmask.png": _png(Image.fromarray(good.astype(np.uint8)), "JPEG"),
            "images/unknown.jpg": _jpeg(),
            "masks/unknown.png": _mask(unknown),
            "images/notes.txt": b"a file that is no image",
        },
    )
    summary, lines = _run(tmp_path, max_bad_fraction=1.0)

    assert summary["skipped"] == {
        "duplicate_stem": 1,
        "missing_image": 1,
        "missing_mask": 1,
        "size_mismatch": 1,
        "unknown_label": 1,
        "unreadable_image": 2,
        "unreadable_mask": 3,
    }
    assert summary["counts"]["considered"] == 11 and summary["counts"]["images"] == 1
    assert summary["counts"]["skipped"] == 10 and summary["counts"]["ignored_files"] == 1
    skips = [line for line in lines if line.startswith("skip ")]
    expected = {
        "skip notes.txt: ignored": "",
        "skip nomask.jpg: missing_mask": "no nomask.png",
        "skip noimage.png: missing_image": "no noimage.jpg",
        "skip dup: duplicate_stem": "dup.jpg, dup.png, dup.png",
        "skip size.jpg: size_mismatch": "image 32x24, mask 16x16",
        "skip garbage.jpg: unreadable_image": "cannot decode",
        "skip truncated.jpg: unreadable_image": "cannot decode",
        "skip badmask.png: unreadable_mask": "cannot decode",
        "skip rgbmask.png: unreadable_mask": "an RGB mask",
        "skip jpegmask.png: unreadable_mask": "a JPEG file, not PNG",
        "skip unknown.png: unknown_label": "label value(s) 5, 77 not in",
    }
    assert len(skips) == len(expected), skips
    for head, detail in expected.items():
        assert any(line.startswith(head) and detail in line for line in skips), (head, skips)
    data = _load(str(tmp_path / "out"))
    assert [i["file_name"] for i in data["images"]] == ["good.jpg"]
    assert sorted(os.listdir(tmp_path / "out" / "annotations" / f"panoptic_{SPLIT}")) == ["good.png"]


def test_more_bad_than_max_bad_fraction_fails_with_one_line(dataset):
    root, _, _ = dataset
    _run(root)  # a complete earlier import
    json_path = root / "out" / "annotations" / f"panoptic_{SPLIT}.json"
    assert json_path.exists()

    os.remove(root / "masks" / "a.png")  # found before anything is written: the earlier JSON stays
    with pytest.raises(ImportMasksError) as info:
        _run(root)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"split {SPLIT}: 1 of 3 image/mask pairs are bad so far (33.3%), more than max_bad_fraction=0.05")
    assert "{'missing_mask': 1}" in message
    assert json_path.exists()

    # Found while converting: the output is no longer complete, so it no longer has its JSON.
    _write_files(root, {"masks/a.png": _mask(np.full((H, W), 99))})
    with pytest.raises(ImportMasksError, match=r"1 of 3 image/mask pairs are bad so far .*'unknown_label': 1"):
        _run(root, max_bad_fraction=0.3)
    assert not json_path.exists()
    assert _run(root, max_bad_fraction=0.5)[0]["counts"]["images"] == 2


@pytest.mark.parametrize(
    "text, needle",
    [
        ("classes: {1: {isthing: true}}", "classes[1]: missing 'name'"),
        ("classes: {1: {name: '', isthing: true}}", "classes[1]: name '' is not a non-empty string"),
        (
            "classes: {1: {name: a, isthing: true}, 2: {name: a, isthing: false}}",
            "classes[2]: name 'a' is also the name of classes[1]",
        ),
        (
            "classes: {1: {name: a, isthing: true, color: [1, 2]}}",
            "classes[1]: color [1, 2] is not [r, g, b] with integers 0..255",
        ),
        ("classes: {1: {name: a, isthing: true, color: [0, 0, 256]}}", "classes[1]: color [0, 0, 256] is not [r, g, b]"),
        ("classes: {1: {name: a, isthing: true, color: red}}", "classes[1]: color 'red' is not [r, g, b]"),
        ("ignore: 1\nclasses: {1: {name: a, isthing: true}}", "classes[1]: 1 is also an ignore value"),
        ("classes: {car: {name: car, isthing: true}}", "classes: key 'car' is not a label value"),
        ("classes: {-1: {name: a, isthing: true}}", "classes: key -1 is not a label value"),
        ("classes: {true: {name: a, isthing: true}}", "classes: key True is not a label value"),
        ("classes: {1: {name: a, isthing: 'yes'}}", "classes[1]: isthing 'yes' is not true or false"),
        ("classes: {1: {name: a, isthing: 1}}", "classes[1]: isthing 1 is not true or false"),
        ("classes: {1: {name: a}}", "classes[1]: missing 'isthing'"),
        ("classes: {1: {name: a, isthing: true, colour: [1, 2, 3]}}", "classes[1]: unknown key(s) colour"),
        ("classes: {1: a}", "classes[1]: expected a mapping"),
        (
            "classes:\n  1: {name: a, isthing: true}\n  1: {name: b, isthing: true}",
            "not valid YAML at line 3: key 1 appears twice",
        ),
        ("classes: {1: {name: a", "not valid YAML"),
        ("classes: {}", "classes: must be a non-empty mapping"),
        ("[1, 2]", "expected a mapping with 'classes'"),
        ("clases: {1: {name: a, isthing: true}}", "unknown top-level key(s) clases"),
        ("ignore: [-1]\nclasses: {1: {name: a, isthing: true}}", "ignore: -1 is not a label value"),
        ("ignore: [x]\nclasses: {1: {name: a, isthing: true}}", "ignore: 'x' is not a label value"),
    ],
)
def test_a_bad_classes_yaml_is_one_line_naming_the_file_and_entry(text, needle):
    with pytest.raises(ImportMasksError) as info:
        parse_classes(text, where="cls.yaml")
    message = str(info.value)
    assert message.startswith("cls.yaml: ") and "\n" not in message, message
    assert needle in message, message


def test_classes_yaml_defaults():
    spec = parse_classes("classes:\n  7: {name: wall, isthing: false}\n")
    assert spec.ignore == frozenset()
    assert spec.categories() == [{"id": 7, "name": "wall", "supercategory": "wall", "isthing": 0}]


@pytest.mark.parametrize(
    "masks, out, needle",
    [
        ("images", "out", "masks: {root}/images is the images directory"),
        ("out/annotations/panoptic_train", "out", "out: the panoptic PNGs would be written into {root}/out/"),
        ("out/train", "out", "out: the images would be written into {root}/out/train (--masks)"),
        ("nowhere", "out", "masks: {root}/nowhere not found"),
        ("empty", "out", "masks: no .png files directly under {root}/empty"),
    ],
)
def test_refuses_bad_locations_before_writing(dataset, masks, out, needle):
    root, _, _ = dataset
    (root / "empty").mkdir()
    os.makedirs(root / "out" / "annotations" / "panoptic_train", exist_ok=True)
    os.makedirs(root / "out" / "train", exist_ok=True)
    with pytest.raises(ImportMasksError, match="^" + re.escape(needle.format(root=root))):
        import_masks(str(root / "images"), str(root / masks), str(root / "classes.yaml"), str(root / out), SPLIT)
    assert os.listdir(root / "out" / SPLIT) == []


def test_in_place_import_leaves_the_images_as_they_are(dataset):
    root, files, _ = dataset
    os.rename(root / "images", root / SPLIT)  # COCO's layout already: <root>/<split>/<image>
    summary = import_masks(str(root / SPLIT), str(root / "masks"), str(root / "classes.yaml"), str(root), SPLIT, log=print)
    assert summary["counts"]["images"] == 3
    assert sorted(os.listdir(root / SPLIT)) == ["a.jpg", "b.PNG", "c.jpeg"]
    assert (root / SPLIT / "a.jpg").read_bytes() == files["images/a.jpg"]


@pytest.mark.slow
def test_s3_round_trip(dataset, s3_bucket):
    root, files, labels = dataset
    src, out = storage.join(s3_bucket, "src"), storage.join(s3_bucket, "out")
    for name, data in files.items():
        storage.write_bytes(storage.join(src, name), data)
    lines: list[str] = []
    summary = import_masks(
        storage.join(src, "images"),
        storage.join(src, "masks"),
        storage.join(src, "classes.yaml"),
        out,
        SPLIT,
        log=lines.append,
    )
    assert summary["counts"]["images"] == 3 and summary["skipped"] == {}
    data = _load(out)
    assert [i["file_name"] for i in data["images"]] == ["a.jpg", "b.PNG", "c.jpeg"]
    assert storage.read_bytes(storage.join(out, SPLIT, "b.PNG")) == files["images/b.PNG"]
    for ann in data["annotations"]:
        stem = ann["file_name"].removesuffix(".png")
        _check_segments(_png_of(out, ann["file_name"]), labels[stem], ann["segments_info"])


def test_cli_prints_the_summary(dataset, capsys):
    root, _, _ = dataset
    out = root / "cli-out"
    argv = ["data", "import-masks", "--images", str(root / "images"), "--masks", str(root / "masks")]
    argv += ["--classes", str(root / "classes.yaml"), "--out", str(out), "--split", SPLIT]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"]["images"] == 3 and summary["counts"]["segments"] == 11
    assert (out / "annotations" / f"panoptic_{SPLIT}.json").exists()

    # One sequence as a split of its own: --include and --exclude on the stem, the rest counted as left out.
    assert main([*argv[:-1], "heldout", "--include", "[ab]", "--exclude", "b"]) == 0
    counts = json.loads(capsys.readouterr().out)["counts"]
    assert (counts["considered"], counts["left_out"], counts["images"]) == (1, 2, 1)
    assert [i["file_name"] for i in json.loads((out / "annotations" / "panoptic_heldout.json").read_text())["images"]] == [
        "a.jpg"
    ]
    assert main([*argv, "--include", "z*"]) == 2
    assert "the --include/--exclude patterns leave none of the 3 stem(s)" in capsys.readouterr().err

    (root / "classes.yaml").write_text("classes: {0: {name: sky}}\n")
    assert main([*argv, "--max-bad-fraction", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"mtseg: error: {root / 'classes.yaml'}: classes[0]: missing 'isthing' (true for countable objects, false for stuff)"
    )


CAMVID = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "camvid")


@pytest.mark.skipif(
    not os.path.isdir(os.path.join(CAMVID, "valannot")),
    reason="the real CamVid frames (../shared/data/camvid) exist on this team's machines only",
)
def test_real_camvid_frames_import_and_shard_with_the_recipes_classes(tmp_path):
    """Four real val frames through import-masks (jobs/configs/camvid-classes.yaml) and the panoptic shard."""
    from mtseg.data.categories import CategoryIndex
    from mtseg.data.shard import shard_coco

    stems = sorted(f[:-4] for f in os.listdir(os.path.join(CAMVID, "valannot")) if f.endswith(".png"))[:4]
    images, masks = tmp_path / "frames", tmp_path / "labels"
    images.mkdir()
    masks.mkdir()
    for stem in stems:
        (images / f"{stem}.jpg").write_bytes(open(os.path.join(CAMVID, "val", f"{stem}.jpg"), "rb").read())
        (masks / f"{stem}.png").write_bytes(open(os.path.join(CAMVID, "valannot", f"{stem}.png"), "rb").read())
    classes = os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "configs", "camvid-classes.yaml")
    out = str(tmp_path / "coco")
    summary = import_masks(str(images), str(masks), classes, out, "val", log=lambda *a: None)
    assert summary["counts"]["images"] == 4 and summary["counts"]["skipped"] == 0
    data = json.loads(storage.read_bytes(summary["annotation_file"]))
    assert {(c["name"], c["isthing"]) for c in data["categories"]} >= {("road", 0), ("car", 1), ("sky", 0)}
    assert all((e["height"], e["width"]) == (360, 480) for e in data["images"])
    manifest = shard_coco(out, "val", str(tmp_path / "shards"), annotations="panoptic", log=lambda *a: None)
    assert manifest["counts"]["images"] == 4 and manifest["counts"]["annotations"] == summary["counts"]["segments"]
    cats = CategoryIndex.from_categories(manifest["categories"])
    assert cats.panoptic and cats.num_classes == 12 and sum(cats.isthing) == 3
