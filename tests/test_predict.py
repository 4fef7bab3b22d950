"""``mtseg predict``: any image in, pictures + COCO results out (checkpoint loading: tests/train/test_train_checkpoint.py).

No Ray: a tiny randomly initialised model saved as a checkpoint, images written on the fly.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from mtseg.config import load_config, to_yaml
from mtseg.data.categories import CategoryIndex
from mtseg.predict import (
    ImagePrediction,
    PredictError,
    Predictor,
    find_images,
    label_id_table,
    pick_device,
    predict_images,
    render,
    semantic_png,
    void_label,
)
from mtseg.render import class_colours
from mtseg.train import checkpoint as ckpt

CATEGORIES = [
    {"id": 1, "name": "disc", "supercategory": "round"},
    {"id": 3, "name": "ring", "supercategory": "round"},
    {"id": 7, "name": "box", "supercategory": "angular"},
]


def _cfg(**extra):
    overrides = [
        "data.image_size=32",
        "data.batch_size=2",
        "model.decoder_channels=16",
        "tasks.patch_size=4",
        "data.uri=/nonexistent/shards",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    return load_config(None, overrides)


def _save_checkpoint(directory, cfg, *, with_categories=True) -> str:
    from mtseg.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg, CategoryIndex.from_categories(CATEGORIES))
    meta = {"epoch": 0, "step": 1, "epoch_rows": 0}
    if with_categories:
        meta["categories"] = CATEGORIES
    ckpt.save(str(directory), {"model": model.state_dict()}, meta, to_yaml(cfg))
    return str(directory)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _save_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint_000001", _cfg())


def _png(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_predict_grayscale_rgba_and_corrupt_in_one_call(checkpoint, tmp_path, capsys):
    from mtseg.cli import main

    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    (images / "gray.png").write_bytes(_png(rng.integers(0, 255, (40, 52), dtype=np.uint8), "L"))
    (images / "rgba.png").write_bytes(_png(rng.integers(0, 255, (29, 37, 4), dtype=np.uint8), "RGBA"))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (70, 45, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (images / "photo.jpg").write_bytes(buf.getvalue())
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    out = tmp_path / "out"

    code = main(
        [
            "predict",
            "--checkpoint",
            checkpoint,
            str(images / "gray.png"),
            str(images / "rgba.png"),
            str(images / "broken.png"),
            str(images / "photo.jpg"),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--batch-size",
            "2",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1  # something was skipped; the rest ran
    assert "broken.png" in captured.err and "4/4 images, 1 skipped" in captured.err

    summary = json.loads((out / "summary.json").read_text())
    assert [s["source"] for s in summary["skipped"]] == [str(images / "broken.png")]
    categories = CategoryIndex.from_categories(CATEGORIES)
    sizes = {"gray": (40, 52), "rgba": (29, 37), "photo": (70, 45)}
    assert {im["name"]: (im["height"], im["width"]) for im in summary["images"]} == sizes
    # Ids follow input order, the skipped file included.
    assert {im["name"]: im["image_id"] for im in summary["images"]} == {"gray": 1, "rgba": 2, "photo": 4}
    all_results = json.loads((out / "coco_results.json").read_text())
    for name, (h, w) in sizes.items():
        for task in ("boundary", "instance", "reconstruction"):
            with Image.open(out / f"{name}_{task}.png") as im:
                assert im.size == (w, h) and im.mode == "RGB"
        for picture in ("overlay", "supercategory"):  # the image plus a legend beside it
            with Image.open(out / f"{name}_{picture}.png") as im:
                assert im.width > w and im.height >= h
        # For a program: the class of every pixel as the dataset's ids, at the image's size, palette embedded.
        with Image.open(out / f"{name}_semantic.png") as im:
            assert im.mode == "P" and im.size == (w, h)
            ids = np.asarray(im)
            assert set(np.unique(ids).tolist()) <= {0, 1, 3, 7}  # 0: background, COCO has no category 0
            assert im.getpalette()[3 * 7 : 3 * 8] == [int(c) for c in class_colours(categories)[3]]
        image_entry = next(e for e in summary["images"] if e["name"] == name)
        assert f"{name}_semantic.png" in image_entry["files"]
        results = json.loads((out / f"{name}_instances.json").read_text())
        for r in results:
            assert r["category_id"] in {c["id"] for c in CATEGORIES}
            assert mask_utils.decode(r["segmentation"]).shape == (h, w)
        assert all(r in all_results for r in results)
    assert not list(out.glob("broken*"))


def _space(*ids: int, panoptic: bool) -> CategoryIndex:
    colours = [[10 * i % 256, 0, 200] for i in range(len(ids))]
    return CategoryIndex.from_categories(
        [
            {"id": cid, "name": f"c{cid}", "supercategory": "s", **({"isthing": 1} if panoptic else {}), "color": colour}
            for cid, colour in zip(ids, colours)
        ]
    )


def test_the_class_index_png_holds_label_ids_with_void_by_the_label_space():
    semantic = np.array([[0, 1, 2], [2, 2, 0]])
    # instances (COCO): no category 0, so 0 is background
    coco = _space(1, 90, panoptic=False)
    assert void_label(coco) == 0
    # panoptic (import-masks: a mask value may be 0): class index 0 is void, written 255
    masks = _space(0, 8, panoptic=True)
    assert void_label(masks) == 255
    for space, expected in ((coco, [[0, 1, 90], [90, 90, 0]]), (masks, [[255, 0, 8], [8, 8, 255]])):
        buf = io.BytesIO()
        semantic_png(semantic, space).save(buf, format="PNG")
        with Image.open(buf) as im:
            assert im.mode == "P" and im.size == (3, 2)
            assert np.asarray(im).tolist() == expected
            palette = np.array(im.getpalette()[: 256 * 3]).reshape(-1, 3)
            for c, cid in enumerate(space.coco_ids, start=1):
                assert tuple(palette[cid]) == space.colors[c - 1]


@pytest.mark.parametrize(
    "ids, panoptic, needle",
    [((1, 255), True, "[255]"), ((1, 300), False, "[300]"), ((0, 5), False, "[0]")],
)
def test_label_ids_the_png_cannot_hold_fail_clearly(ids, panoptic, needle):
    with pytest.raises(PredictError, match=re.escape(needle)):
        label_id_table(_space(*ids, panoptic=panoptic))


def test_the_overlay_draws_and_names_the_classes_present_in_the_datasets_colours():
    space = _space(1, 90, 7, panoptic=False)
    image = np.full((48, 64, 3), 128, np.uint8)
    semantic = np.zeros((48, 64), np.int64)
    semantic[10:20, 10:30] = 2
    overlay = np.asarray(render(image, ImagePrediction(image_id=1, semantic=semantic), space, {})["overlay"])
    assert overlay.shape[0] >= 48 and overlay.shape[1] > 64

    def has(colour) -> bool:
        return bool((overlay == np.array(colour, np.uint8)).all(-1).any())

    assert has(space.colors[1]) and not has(space.colors[0]) and not has(space.colors[2])  # only the class present


def test_16_bit_bmp_and_8_bit_png_of_the_same_pixels_give_the_same_prediction(checkpoint, tmp_path):
    """A 16-bit PNG reached the model as values up to 65535; a BMP was skipped as undecodable."""
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (40, 52), dtype=np.uint16)
    (tmp_path / "eight.png").write_bytes(_png(gray.astype(np.uint8), "L"))
    (tmp_path / "sixteen.png").write_bytes(_png(gray * 256 + 128, None))  # 16-bit; >> 8 gives gray back
    buf = io.BytesIO()
    Image.fromarray(gray.astype(np.uint8)).save(buf, format="BMP")
    (tmp_path / "bmp.jpg").write_bytes(buf.getvalue())  # a BMP under a .jpg name
    out = tmp_path / "out"
    summary = predict_images(
        checkpoint, [str(tmp_path / n) for n in ("eight.png", "sixteen.png", "bmp.jpg")], str(out), device="cpu", progress=False
    )
    assert summary.skipped == []
    with Image.open(out / "eight_overlay.png") as reference:
        for name in ("sixteen", "bmp"):
            with Image.open(out / f"{name}_overlay.png") as other:
                assert np.array_equal(np.asarray(other), np.asarray(reference)), name
    results = [json.loads((out / f"{n}_instances.json").read_text()) for n in ("eight", "sixteen", "bmp")]
    assert [[r["segmentation"] for r in rs] for rs in results[1:]] == [[r["segmentation"] for r in results[0]]] * 2


def test_a_huge_image_is_decoded_reduced_and_its_outputs_downscaled(checkpoint, tmp_path, capsys):
    """12000x12000 took 13 GB and 4 minutes; now it is decoded at most data.max_image_side wide."""
    from mtseg.cli import main

    big = np.zeros((3000, 4000, 3), np.uint8)
    big[1000:2000, 1500:2500] = (230, 20, 20)  # flat: large, but tiny to encode
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="JPEG", quality=90)
    (tmp_path / "huge.jpg").write_bytes(buf.getvalue())
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                checkpoint,
                str(tmp_path / "huge.jpg"),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--max-image-side",
                "400",
                "--quiet",
            ]
        )
        == 0
    )
    assert "huge.jpg: 4000x3000 downscaled to 400x300 (max image side 400)" in capsys.readouterr().err
    (image,) = json.loads((out / "summary.json").read_text())["images"]
    assert (image["height"], image["width"]) == (300, 400)
    assert image["downscaled_from"] == {"height": 3000, "width": 4000}
    with Image.open(out / "huge_boundary.png") as im:
        assert im.size == (400, 300)


def test_predictor_maps_come_back_at_each_image_size(checkpoint):
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    images = [torch.randint(0, 255, (3, 17, 90), dtype=torch.uint8), torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)]
    preds = predictor.predict(images, [5, 6])
    for image, pred, image_id in zip(images, preds, (5, 6)):
        h, w = image.shape[1:]
        assert pred.image_id == image_id
        maps = pred.maps
        assert set(maps) == {"supercategory", "boundary", "instance", "reconstruction"}  # semantic: fused
        assert pred.semantic.shape == maps["supercategory"].shape == maps["boundary"].shape == maps["instance"].shape == (h, w)
        assert maps["reconstruction"].shape == (h, w, 3) and maps["reconstruction"].dtype == np.uint8
        assert 0 <= maps["boundary"].min() and maps["boundary"].max() <= 1
        assert pred.semantic.max() < 4 and maps["supercategory"].max() < 3
        assert all(r["image_id"] == image_id for r in pred.instances)


def test_predictor_at_model_size_equals_the_validation_forward(checkpoint):
    """An image already at data.image_size goes through predict_batch unchanged."""
    from mtseg.train.loop import predict_batch

    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    image = torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)
    (pred,) = predictor.predict([image], [1])
    _, semantic, _ = predict_batch(
        predictor.model, {"image": image[None].float() / 255}, predictor.tasks, predictor.cfg, predictor.categories
    )
    assert np.array_equal(pred.semantic, semantic[0].numpy())


def test_directories_are_expanded_and_repeated_names_kept_apart(checkpoint, tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "x.png").write_bytes(_png(np.zeros((20, 20, 3), np.uint8), "RGB"))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    sources = find_images([str(tmp_path / "a"), str(tmp_path / "b")])
    assert sources == [str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png")]
    summary = predict_images(
        checkpoint, [str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"), device="cpu", progress=False
    )
    assert [im["name"] for im in summary.images] == ["x", "x-2"] and not summary.skipped
    assert (tmp_path / "out" / "x-2_overlay.png").exists()


def test_directory_links_lead_to_each_real_directory_and_file_once(tmp_path):
    """``sub/up -> ..`` made 7 images 287 predictions, 40 levels deep; links elsewhere still count."""
    image = _png(np.zeros((32, 32, 3), np.uint8), "RGB")
    root, other = tmp_path / "in", tmp_path / "other"
    (root / "sub").mkdir(parents=True)
    other.mkdir()
    for path in (root / "a.png", root / "sub" / "b.png", other / "c.png", tmp_path / "outside.png"):
        path.write_bytes(image)
    (root / "sub" / "up").symlink_to("..")  # a cycle
    (root / "alias.png").symlink_to("a.png")  # a second path to a.png
    (root / "linked").symlink_to(other)  # a directory elsewhere
    (root / "ext.png").symlink_to(tmp_path / "outside.png")  # a file elsewhere
    # other/c.png named again by its own path: the same file as linked/c.png.
    assert find_images([str(root), str(other / "c.png"), str(root / "sub" / "up" / "a.png")]) == [
        str(root / "a.png"),
        str(root / "ext.png"),
        str(root / "linked" / "c.png"),
        str(root / "sub" / "b.png"),
    ]


def test_an_empty_folder_is_skipped_with_one_line_and_exit_1(checkpoint, tmp_path, capsys):
    """It exited 0, having done nothing."""
    from mtseg.cli import main

    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", checkpoint, str(tmp_path / "empty"), "--out", str(out), "--device", "cpu"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert (
        line
        == f"[predict] skipping {tmp_path / 'empty'}: no image files (.jpg, .jpeg, .png, .webp, .gif, .bmp, .tif, .tiff) found"
    )
    assert [s["source"] for s in json.loads((out / "summary.json").read_text())["skipped"]] == [str(tmp_path / "empty")]


def test_a_named_file_that_is_no_image_says_which_formats_mtseg_reads(checkpoint, tmp_path, capsys):
    """The message was torchvision's "Only jpeg, png, webp and gif ...", though mtseg converts BMP and TIFF.

    One file of every format the message names is read, so the message cannot promise more than mtseg reads.
    """
    from mtseg.cli import main
    from mtseg.predict import IMAGE_EXTENSIONS

    pixels = np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    named = []
    for ext in IMAGE_EXTENSIONS:
        named.append(tmp_path / f"{ext[1:]}{ext}")
        Image.fromarray(pixels).save(named[-1])  # in the format Pillow gives the ending
    (tmp_path / "notes.txt").write_text("not an image\n")
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            "--checkpoint",
            checkpoint,
            *map(str, named),
            str(tmp_path / "notes.txt"),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    message = (
        f"{tmp_path / 'notes.txt'}: not an image mtseg reads (JPEG, PNG, WEBP, GIF, BMP, TIFF or another format Pillow opens)"
    )
    assert f"[predict] skipping {message}\n" in err and "Only jpeg" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == [{"source": str(tmp_path / "notes.txt"), "error": message}]
    assert [im["source"] for im in summary["images"]] == list(map(str, named))


def _images(directory, count):
    directory.mkdir()
    for n in range(count):
        (directory / f"im{n}.png").write_bytes(_png(np.full((20, 20, 3), 10 * n, np.uint8), "RGB"))
    return str(directory)


def test_progress_in_a_log_is_a_plain_line_per_tenth(checkpoint, tmp_path, capsys):
    """stderr not a terminal (a job log): lines, not a bar redrawn with carriage returns."""
    predict_images(checkpoint, [_images(tmp_path / "in", 20)], str(tmp_path / "out"), device="cpu", batch_size=4)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"[predict] {n}/20 images" for n in (4, 8, 12, 16, 20)]
    assert all(", 0 skipped, " in line and line.endswith(" img/s") for line in lines)


def test_progress_on_a_terminal_is_a_tqdm_bar(checkpoint, tmp_path, monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    predict_images(checkpoint, [_images(tmp_path / "in", 3)], str(tmp_path / "out"), device="cpu", batch_size=2)
    assert "\r[predict]: 100%|" in term.getvalue() and "3/3" in term.getvalue() and "skipped=0" in term.getvalue()
    term.seek(0), term.truncate()
    predict_images(checkpoint, [_images(tmp_path / "in2", 3)], str(tmp_path / "out2"), device="cpu", progress=False)
    assert term.getvalue() == ""


def test_missing_input_and_unavailable_device_fail_with_one_line(checkpoint, tmp_path, capsys):
    from mtseg.cli import main

    with pytest.raises(PredictError, match="no such file"):
        find_images([str(tmp_path / "nope.jpg")])
    assert main(["predict", "--checkpoint", checkpoint, str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "o")]) == 2
    assert "mtseg: error:" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(PredictError, match="CUDA is not available"):
            pick_device("cuda")
    with pytest.raises(PredictError, match="expected auto, cpu or cuda"):
        pick_device("tpu")


@pytest.mark.slow
def test_images_from_and_results_to_the_object_store(checkpoint, s3_bucket):
    from mtseg import storage

    storage.write_bytes(storage.join(s3_bucket, "in", "a.png"), _png(np.full((24, 30, 3), 200, np.uint8), "RGB"))
    storage.write_bytes(storage.join(s3_bucket, "in", "sub", "b.jpg"), b"not a jpeg")
    out = storage.join(s3_bucket, "out")
    summary = predict_images(checkpoint, [storage.join(s3_bucket, "in")], out, device="cpu", progress=False)
    assert [im["name"] for im in summary.images] == ["a"]
    assert [s["source"] for s in summary.skipped] == [storage.join(s3_bucket, "in", "sub", "b.jpg")]
    with Image.open(io.BytesIO(storage.read_bytes(storage.join(out, "a_boundary.png")))) as im:
        assert im.size == (30, 24)
    assert storage.exists(storage.join(out, "a_overlay.png")) and storage.exists(storage.join(out, "coco_results.json"))
    assert json.loads(storage.read_bytes(storage.join(out, "summary.json")))["images"][0]["width"] == 30


def test_a_panoptic_model_writes_cocos_panoptic_png_and_segments_beside_the_overlay(tmp_path):
    from mtseg.data.coco_panoptic import read_png
    from mtseg.models import build_model

    categories = [
        {"id": 1, "name": "disc", "supercategory": "round", "isthing": 1},
        {"id": 100, "name": "sky", "supercategory": "sky", "isthing": 0},
        {"id": 120, "name": "ground", "supercategory": "ground", "isthing": 0},
    ]
    cfg = _cfg(**{"tasks.panoptic_min_area": 0.0})
    torch.manual_seed(0)
    model = build_model(cfg, CategoryIndex.from_categories(categories))
    directory = str(tmp_path / "run" / "checkpoint_000001")
    ckpt.save(
        directory, {"model": model.state_dict()}, {"epoch": 0, "step": 1, "epoch_rows": 0, "categories": categories}, to_yaml(cfg)
    )
    image = tmp_path / "street.png"
    image.write_bytes(_png(np.random.default_rng(1).integers(0, 255, (30, 44, 3), dtype=np.uint8), "RGB"))
    predict_images(directory, [str(image)], str(tmp_path / "out"), device="cpu", progress=False)
    ids = read_png((tmp_path / "out" / "street_panoptic.png").read_bytes())
    entry = json.loads((tmp_path / "out" / "street_panoptic.json").read_text())
    assert ids.shape == (30, 44) and entry["file_name"] == "street_panoptic.png"
    segments = entry["segments_info"]
    assert segments and {s["id"] for s in segments} == set(np.unique(ids)) - {0}
    for s in segments:
        assert s["category_id"] in {1, 100, 120} and s["area"] == int((ids == s["id"]).sum())
    # Every pixel of the panoptic PNG agrees with the class-index PNG (min_area 0: no segment made void).
    label = np.asarray(Image.open(tmp_path / "out" / "street_semantic.png"))
    by_id = {s["id"]: s["category_id"] for s in segments}
    np.testing.assert_array_equal(np.vectorize(lambda i: by_id.get(int(i), 255))(ids)[ids > 0], label[ids > 0])
