"""mtseg.render: the drawing primitives predict, the tasks and the report share."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from mtseg.data.categories import IGNORE_INDEX, CategoryIndex
from mtseg.render import (
    MIN_FONT_PX,
    Picture,
    beside,
    blend,
    class_colours,
    class_picture,
    colorize,
    font,
    heatmap,
    instance_map,
    labelled,
    legend,
    outlines,
    palette,
    panel,
    to_uint8_image,
)

# COCO panoptic style: a palette of its own for some classes, none for the last.
CATEGORIES = CategoryIndex.from_categories(
    [
        {"id": 1, "name": "person", "supercategory": "person", "isthing": 1, "color": [220, 20, 60]},
        {"id": 3, "name": "car", "supercategory": "vehicle", "isthing": 1, "color": [0, 0, 142]},
        {"id": 184, "name": "tree-merged", "supercategory": "plant", "isthing": 0},
    ]
)


def _has_colour(picture, colour) -> bool:
    return bool((np.asarray(picture)[..., :3] == np.array(colour, np.uint8)).all(-1).any())


def test_palette_background_black_ignore_grey_and_labels_distinct():
    colours = palette()
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    assert tuple(colours[0]) == (0, 0, 0) and tuple(colours[IGNORE_INDEX]) == (128, 128, 128)
    assert len({tuple(c) for c in colours[1:15]}) == 14
    labels = np.array([[0, 1], [2, IGNORE_INDEX]])
    assert np.array_equal(colorize(labels), colours[labels])


def test_blend_keeps_background_pixels_and_tints_labelled_ones():
    image = np.full((4, 4, 3), 100, np.uint8)
    labels = np.zeros((4, 4), np.int64)
    labels[0, 0] = 1
    out = blend(image, labels)
    assert np.array_equal(out[1:], image[1:]) and np.array_equal(out[0, 1:], image[0, 1:])
    assert not np.array_equal(out[0, 0], image[0, 0])


def test_heatmap_stretches_by_default_and_keeps_probabilities_on_a_fixed_scale():
    flat = np.full((3, 3), 0.02, np.float32)
    assert heatmap(flat, stretch=False).max() <= 6  # an empty probability map stays dark
    ramp = np.linspace(0.0, 0.1, 9, dtype=np.float32).reshape(3, 3)
    assert tuple(heatmap(ramp)[2, 2]) == (255, 220, 40)  # stretched: the max is full yellow
    assert tuple(heatmap(np.ones((1, 1)), stretch=False)[0, 0]) == (255, 220, 40)


def test_outlines_draw_the_border_of_instances_above_the_threshold_only():
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    image = np.zeros((8, 8, 3), np.uint8)
    drawn = outlines(image, [{"score": 0.9, "segmentation": rle}], 0.5)
    white = drawn.sum(-1) == 3 * 255
    assert white[2, 2:6].all() and white[2:6, 2].all() and not white[3:5, 3:5].any() and not white[0].any()
    assert not outlines(image, [{"score": 0.1, "segmentation": rle}], 0.5).any()


def test_instance_map_numbers_instances_by_rising_score():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    out = instance_map([{"score": 0.9, "mask": a}, {"score": 0.2, "mask": b}], (4, 4))
    # The higher score is drawn last, over the overlap.
    assert out[0, 0] == 2 and out[1, 0] == 2 and out[2, 0] == 1 and out[3, 0] == 0


def test_legend_beside_and_panel_compose_the_pictures():
    image = to_uint8_image(np.random.default_rng(0).random((3, 20, 30)))
    assert image.shape == (20, 30, 3) and image.dtype == np.uint8
    key = legend([(0, "background"), (1, "a rather long category name")], 20)
    both = beside(image, key)
    assert both.size == (30 + key.width, max(20, key.height))
    assert np.array_equal(np.asarray(both)[:20, :30], image)
    grid = panel([("row", [("image", image), ("again", image)]), ("other", [("one", image)])], scale=2)
    assert grid.width > 2 * 60 and grid.height > 2 * 40


def test_class_colours_are_the_datasets_where_it_gives_them_and_the_palette_elsewhere():
    colours = class_colours(CATEGORIES)
    assert tuple(colours[1]) == (220, 20, 60) and tuple(colours[2]) == (0, 0, 142)
    assert tuple(colours[3]) == tuple(palette()[3]) and tuple(colours[0]) == (0, 0, 0)
    labels = np.array([[0, 2]])
    assert np.array_equal(colorize(labels, colours), colours[labels])


def test_a_class_picture_keys_only_the_classes_present_in_the_datasets_colours():
    image = np.zeros((40, 60, 3), np.uint8)
    labels = np.zeros((40, 60), np.int64)
    labels[:10] = 2
    labels[30:, :5] = IGNORE_INDEX
    picture = class_picture(image, labels, CATEGORIES)
    assert picture.entries == ((2, "car"), (IGNORE_INDEX, "ignored"))
    drawn = picture.image()
    assert drawn.height >= 40 and drawn.width > 60
    assert np.array_equal(np.asarray(drawn)[:40, :60], picture.pixels)
    # the legend's swatch is the dataset's own colour; the person class is absent from the key
    assert _has_colour(drawn, (0, 0, 142)) and not _has_colour(drawn, (220, 20, 60))
    assert np.array_equal(np.asarray(picture), np.asarray(drawn))  # what a task's draw gives, as an array


def test_text_is_a_scalable_font_sized_from_the_picture():
    assert font(32).size == MIN_FONT_PX  # legible on a tiny tile
    assert font(480).size > MIN_FONT_PX and font(4000).size > 4 * font(480).size
    assert font(480).getbbox("Ag")[3] > 0.7 * font(480).size  # a real font at that size, not a blown-up bitmap


def test_a_legend_of_many_classes_is_columns_no_taller_than_the_picture():
    entries = [(i, f"class {i}") for i in range(1, 41)]
    key = legend(entries, 480)
    assert key.height <= 480 and key.width > 2 * key.height / 5  # several columns
    one = legend(entries[:1], 480)
    assert one.height < 60  # a short key stays short
    assert legend([], 100).width > 0  # "(nothing labelled)"


def test_panel_tiles_keep_their_aspect_and_a_row_shares_one_legend():
    wide, narrow = np.zeros((10, 40, 3), np.uint8), np.zeros((40, 10, 3), np.uint8)
    grid = panel([("row", [("wide", wide), ("narrow", narrow)])], scale=1)
    # Every cell the size of the largest tile, the old grid was 198 px wide (two 40 px cells beside a 110 px margin).
    assert grid.width < 150 and grid.height < 40 + 4 * MIN_FONT_PX

    image = np.zeros((16, 16, 3), np.uint8)
    truth, pred = np.zeros((16, 16), np.int64), np.zeros((16, 16), np.int64)
    truth[:4], pred[-4:] = 1, 2
    gt, pr = class_picture(image, truth, CATEGORIES), class_picture(image, pred, CATEGORIES)
    grid = panel([("semantic", [("image", image), ("ground truth", gt), ("prediction", pr)])])
    # the tiles are blended, so a pure class colour is a legend swatch: both classes are in the one legend
    assert _has_colour(grid, (220, 20, 60)) and _has_colour(grid, (0, 0, 142))
    assert grid.height >= 160  # small tiles are enlarged to be seen
    assert isinstance(labelled(image, truth, ["a"]), Picture)
