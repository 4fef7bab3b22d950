"""COCO category ids -> contiguous class indices, and the category -> supercategory hierarchy.

COCO's ids run 1..90 with gaps; a contiguous index is built from the annotation file's
``categories`` (as copied into a shard manifest), never assumed. Index 0 is background in
both the category and the supercategory index; :data:`IGNORE_INDEX` marks crowd pixels.
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
    """

    coco_ids: tuple[int, ...]
    names: tuple[str, ...]
    supercategories: tuple[str, ...]
    class_to_super: tuple[int, ...] = field(repr=False)

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
        return cls(
            coco_ids=tuple(ids),
            names=tuple(str(c["name"]) for c in cats),
            supercategories=tuple(supers),
            class_to_super=tuple(class_to_super),
        )

    @property
    def num_classes(self) -> int:
        """Categories + background."""
        return len(self.coco_ids) + 1

    @property
    def num_supercategories(self) -> int:
        """Supercategories + background."""
        return len(self.supercategories) + 1

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
        """Back to COCO ``categories`` entries."""
        return [
            {"id": cid, "name": name, "supercategory": self.supercategories[self.class_to_super[i + 1] - 1]}
            for i, (cid, name) in enumerate(zip(self.coco_ids, self.names))
        ]
