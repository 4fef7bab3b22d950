"""COCO category ids -> contiguous class indices, and the category -> supercategory hierarchy.

COCO's ids run 1..90 with gaps; a contiguous index is built from the annotation file's
``categories`` (as copied into a shard manifest), never assumed. Index 0 is background in
both the category and the supercategory index; :data:`IGNORE_INDEX` marks crowd pixels.

**Panoptic label spaces.** When every category says ``isthing`` (COCO's panoptic
categories do, and so does ``mtseg data import-masks``), the dataset is panoptic: every
pixel belongs to a thing or a stuff category or is void. Index 0 then means void, never a
class to predict: its pixels are ignored in the targets, and fusion never predicts it.
Categories may also carry a ``color`` ([r, g, b]), the dataset's palette for drawing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

IGNORE_INDEX = 255


@dataclass(frozen=True)
class CategoryIndex:
    """The label spaces of one dataset.

    Attributes:
        coco_ids: COCO category id of contiguous class ``i + 1`` (sorted ascending).
        names: category name of contiguous class ``i + 1``.
        supercategories: supercategory name of contiguous supercategory ``j + 1`` (sorted).
        class_to_super: for every contiguous class index (0 = background) its supercategory
            index (0 = background); length ``num_classes``.
        isthing: whether contiguous class ``i + 1`` is a thing (countable, has instances);
            every class is a thing unless the categories say otherwise.
        colors: the dataset's (r, g, b) for contiguous class ``i + 1``, or None where it gives none.
        panoptic: every category said ``isthing``: class 0 is void, not background.
    """

    coco_ids: tuple[int, ...]
    names: tuple[str, ...]
    supercategories: tuple[str, ...]
    class_to_super: tuple[int, ...] = field(repr=False)
    isthing: tuple[bool, ...] = field(default=(), repr=False)
    colors: tuple[tuple[int, int, int] | None, ...] = field(default=(), repr=False)
    panoptic: bool = False

    def __post_init__(self) -> None:
        n = len(self.coco_ids)
        if not self.isthing:
            object.__setattr__(self, "isthing", (True,) * n)
        if not self.colors:
            object.__setattr__(self, "colors", (None,) * n)
        if len(self.isthing) != n or len(self.colors) != n:
            raise ValueError(f"categories: isthing and colors need {n} entries each")

    @classmethod
    def from_categories(cls, categories: list[dict]) -> CategoryIndex:
        """Build from COCO ``categories`` entries (``id``, ``name``, ``supercategory``)."""
        if not categories:
            raise ValueError("categories: the dataset defines no categories")
        cats = sorted(categories, key=lambda c: int(c["id"]))
        ids = [int(c["id"]) for c in cats]
        if len(set(ids)) != len(ids):
            raise ValueError(f"categories: duplicate category ids in {ids}")
        super_of = [str(c.get("supercategory") or c["name"]) for c in cats]
        supers = sorted(set(super_of))
        super_index = {s: j + 1 for j, s in enumerate(supers)}
        class_to_super = [0] + [super_index[s] for s in super_of]
        for c in cats:
            if "isthing" in c and c["isthing"] not in (0, 1, True, False):
                raise ValueError(f"categories: category {c['id']} has isthing {c['isthing']!r}, expected 0 or 1")
        return cls(
            coco_ids=tuple(ids),
            names=tuple(str(c["name"]) for c in cats),
            supercategories=tuple(supers),
            class_to_super=tuple(class_to_super),
            isthing=tuple(bool(c.get("isthing", 1)) for c in cats),
            colors=tuple(_color(c) for c in cats),
            panoptic=all("isthing" in c for c in cats),
        )

    @property
    def num_classes(self) -> int:
        """Categories + background."""
        return len(self.coco_ids) + 1

    @property
    def num_supercategories(self) -> int:
        """Supercategories + background."""
        return len(self.supercategories) + 1

    @property
    def thing_classes(self) -> tuple[bool, ...]:
        """For every contiguous class index (0 = background or void: False) whether it is a thing."""
        return (False, *self.isthing)

    def class_of(self, coco_id: int) -> int:
        """Contiguous class index of a COCO category id; KeyError if unknown."""
        return self._id_to_class[int(coco_id)]

    def coco_id_of(self, class_index: int) -> int:
        """COCO category id of a contiguous class index (>= 1)."""
        return self.coco_ids[class_index - 1]

    @cached_property
    def _id_to_class(self) -> dict[int, int]:
        return {cid: i + 1 for i, cid in enumerate(self.coco_ids)}

    def to_categories(self) -> list[dict]:
        """Back to COCO ``categories`` entries (``isthing`` for a panoptic space, ``color`` where known)."""
        out = []
        for i, (cid, name) in enumerate(zip(self.coco_ids, self.names)):
            entry = {"id": cid, "name": name, "supercategory": self.supercategories[self.class_to_super[i + 1] - 1]}
            if self.panoptic:
                entry["isthing"] = int(self.isthing[i])
            if self.colors[i] is not None:
                entry["color"] = list(self.colors[i])
            out.append(entry)
        return out


def _color(category: dict) -> tuple[int, int, int] | None:
    color = category.get("color")
    if color is None:
        return None
    if not (
        isinstance(color, (list, tuple))
        and len(color) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in color)
    ):
        raise ValueError(f"categories: category {category['id']} has color {color!r}, expected [r, g, b] in 0..255")
    return (int(color[0]), int(color[1]), int(color[2]))
