"""Shared by the task tests: a small label space."""

from __future__ import annotations

import pytest

from mtseg.data.categories import CategoryIndex

CATEGORIES = CategoryIndex.from_categories([{"id": cid, "name": f"c{cid}", "supercategory": f"s{cid % 2}"} for cid in (1, 4, 6)])


@pytest.fixture
def categories():
    """Three categories (ids 1, 4, 6) in two supercategories."""
    return CATEGORIES
