"""Shared by the metrics tests: three COCO categories, box masks, and two tiny images' shard rows."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
]


def _box(shape, rows, cols):
    m = np.zeros(shape, dtype=bool)
    m[rows[0] : rows[1], cols[0] : cols[1]] = True
    return m


def _tiny_rows():
    h0, w0, h1, w1 = 16, 16, 20, 24
    car = _box((h0, w0), (2, 8), (2, 10))
    dog = _box((h1, w1), (5, 15), (3, 20))
    crowd = _box((h1, w1), (0, 3), (0, 24))

    def ann(i, cat, m, crowd_flag=0):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        return {
            "id": i,
            "category_id": cat,
            "iscrowd": crowd_flag,
            "bbox": list(mask_utils.toBbox(rle)),
            "area": float(mask_utils.area(rle)),
            "segmentation_size": list(m.shape),
            "segmentation_counts": rle["counts"],
        }

    rows = [
        {"image_id": 10, "height": h0, "width": w0, "annotations": [ann(1, 3, car)]},
        {"image_id": 11, "height": h1, "width": w1, "annotations": [ann(2, 18, dog), ann(3, 1, crowd, 1)]},
    ]
    return rows, {10: [(car, 3)], 11: [(dog, 18)]}


@pytest.fixture
def categories():
    """Three COCO categories (person, car, dog) in three supercategories."""
    return CATEGORIES


@pytest.fixture
def box():
    """``box(shape, rows, cols)``: a boolean mask of ``shape``, True on ``[rows) x [cols)``."""
    return _box


@pytest.fixture
def tiny_rows():
    """``tiny_rows()``: ``(rows, objects)``: shard rows of two images (a car; a dog and a crowd), and
    each image's non-crowd ``(mask, category id)`` objects."""
    return _tiny_rows
