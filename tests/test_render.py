"""mtseg.render: the drawing primitives predict, the tasks and the report share."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from mtseg.data.categories import IGNORE_INDEX
from mtseg.render import (
    beside,
    blend,
    colorize,
    heatmap,
    instance_map,
    legend,
    outlines,
    palette,
    panel,
    to_uint8_image,
)


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
