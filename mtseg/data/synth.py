"""A small synthetic COCO dataset that a model can learn from in minutes on a CPU.

It is the demo's and the tests' data, and it goes through exactly the path real COCO does
(``mtseg data shard`` → parquet → Ray Data), so it carries COCO's quirks on purpose:

* category ids with gaps (1, 3, 7, 18, 44, 62) in three supercategories;
* objects overlap; a later object occludes an earlier one and the earlier object's
  annotation is its visible part only;
* segmentations as polygons (multi-part for the two-part ``pair``), as compressed RLE (rings,
  which have a hole, and occluded objects) and, for crowd regions (``iscrowd=1``), as
  uncompressed RLE with a ``counts`` list, as COCO stores them;
* some images with no objects, some grayscale JPEGs (PIL mode ``L``).

Each category is one shape in one colour family (hue), and backgrounds are low-saturation
textures, so a small CNN separates the categories at 64 px; grayscale images keep only the
shape cue. Every pixel of an object's annotation is painted with that object's colour and
nothing else is (the masks are rasterised by pycocotools from the very polygons that are
written), so labels are exact.

Output layout (COCO's)::

    <out>/train2017/000000000001.jpg ...
    <out>/val2017/...
    <out>/annotations/instances_train2017.json, instances_val2017.json

**Panoptic** (``annotations="panoptic"``, default profile): the background becomes two or
three horizontal bands of stuff (``sky`` on top, ``wall``, ``ground`` at the bottom), each its
own low-saturation texture, with wavy borders whose pixels are void, as COCO's panoptic
annotators leave thin unlabelled seams. The same objects are drawn on top. Written as COCO's
panoptic format (:mod:`mtseg.data.coco_panoptic`)::

    <out>/annotations/panoptic_train2017.json, panoptic_train2017/000000000001.png, ...

The same arguments give the same bytes: every image draws from its own random generator
seeded by ``(seed, split, index)``.
"""

from __future__ import annotations

import colorsys
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from mtseg import storage
from mtseg.data import coco_panoptic, coco_profile
from mtseg.errors import MtsegError


@dataclass(frozen=True)
class SynthCategory:
    """One synthetic category: a COCO id, a shape and a colour family (hue in degrees)."""

    id: int
    name: str
    supercategory: str
    hue: float


# Ids with gaps, like COCO's 1..90, so nothing downstream can assume contiguity.
CATEGORIES: tuple[SynthCategory, ...] = (
    SynthCategory(1, "disc", "round", 0.0),
    SynthCategory(3, "ring", "round", 48.0),
    SynthCategory(7, "box", "angular", 220.0),
    SynthCategory(18, "triangle", "angular", 120.0),
    SynthCategory(44, "cross", "compound", 295.0),
    SynthCategory(62, "pair", "compound", 180.0),
)
_BY_NAME = {c.name: c for c in CATEGORIES}
# Stuff of the panoptic variant, top to bottom; hue only tints the low-saturation texture.
STUFF: tuple[SynthCategory, ...] = (
    SynthCategory(100, "sky", "sky", 205.0),
    SynthCategory(110, "wall", "wall", 30.0),
    SynthCategory(120, "ground", "ground", 90.0),
)
ANNOTATION_FORMATS = ("instances", "panoptic")
# Shapes that still look like themselves when drawn tiny inside a crowd region.
_CROWD_SHAPES = ("disc", "box", "triangle")

SPLITS = ("train2017", "val2017")
# Image and annotation ids are unique across splits, as in COCO.
_ID_BASE = {"train2017": 0, "val2017": 10_000_000}
_JPEG_QUALITY = 95
_MIN_SIZE = 16
_MIN_COCO_SIZE = 64  # COCO's size classes are in absolute pixels: 32^2 and 96^2

# Deterministic schedule of the quirks so that even a dozen images carry each of them.
_EMPTY_EVERY, _EMPTY_AT = 12, 1
_GRAY_EVERY, _GRAY_AT = 16, 2
_CROWD_EVERY, _CROWD_AT = 8, 3

Polygons = list[list[float]]


@dataclass
class _Object:
    category: SynthCategory
    mask: np.ndarray  # full (unoccluded) mask, bool HxW
    polygons: Polygons | None  # None: not representable as polygons (ring, crowd)
    iscrowd: int = 0


# ----------------------------------------------------------------------------- shapes


def _regular(cx: float, cy: float, rx: float, ry: float, n: int, angle: float) -> list[float]:
    """Vertices of an n-gon inscribed in a rotated ellipse, as a flat COCO polygon."""
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    ca, sa = np.cos(angle), np.sin(angle)
    return _flat(cx + ca * x - sa * y, cy + sa * x + ca * y)


def _flat(xs: np.ndarray, ys: np.ndarray) -> list[float]:
    return [float(v) for xy in zip(xs, ys) for v in xy]


def _rotated(points: np.ndarray, cx: float, cy: float, angle: float) -> list[float]:
    ca, sa = np.cos(angle), np.sin(angle)
    x, y = points[:, 0], points[:, 1]
    return _flat(cx + ca * x - sa * y, cy + sa * x + ca * y)


def _disc(rng: np.random.Generator, cx: float, cy: float, r: float) -> Polygons:
    return [_regular(cx, cy, r, r * rng.uniform(0.7, 1.0), 24, rng.uniform(0, np.pi))]


def _box(rng: np.random.Generator, cx: float, cy: float, r: float) -> Polygons:
    hw, hh = r * rng.uniform(0.6, 1.0), r * rng.uniform(0.6, 1.0)
    corners = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
    return [_rotated(corners, cx, cy, rng.uniform(0, np.pi / 2))]


def _triangle(rng: np.random.Generator, cx: float, cy: float, r: float) -> Polygons:
    # Jittered equilateral: varied but never a sliver.
    t = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.3, 0.3, 3)
    rad = r * rng.uniform(0.85, 1.15, 3)
    pts = np.stack([rad * np.cos(t), rad * np.sin(t)], axis=1)
    return [_rotated(pts, cx, cy, rng.uniform(0, 2 * np.pi))]


def _cross(rng: np.random.Generator, cx: float, cy: float, r: float) -> Polygons:
    a, b = r, r * rng.uniform(0.3, 0.42)  # arm half-length, arm half-width
    pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]])
    return [_rotated(pts, cx, cy, rng.uniform(0, np.pi / 2))]


def _pair(rng: np.random.Generator, cx: float, cy: float, r: float) -> Polygons:
    # One object in two separate parts: COCO's multi-part polygon.
    angle = rng.uniform(0, np.pi)
    d, pr = r * 0.7, r * rng.uniform(0.42, 0.52)
    dx, dy = d * np.cos(angle), d * np.sin(angle)
    return [_regular(cx - dx, cy - dy, pr, pr, 16, 0.0), _regular(cx + dx, cy + dy, pr, pr, 16, 0.0)]


_POLYGON_SHAPES: dict[str, Callable[[np.random.Generator, float, float, float], Polygons]] = {
    "disc": _disc,
    "box": _box,
    "triangle": _triangle,
    "cross": _cross,
    "pair": _pair,
}


def _clean(polygons: Polygons, size: int) -> Polygons:
    # COCO stores 2-decimal coordinates inside the image; rasterise exactly what is written.
    return [[round(min(max(v, 0.0), float(size)), 2) for v in poly] for poly in polygons]


def _rasterize(polygons: Polygons, size: int) -> np.ndarray:
    rles = mask_utils.frPyObjects(polygons, size, size)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _make_object(rng: np.random.Generator, cat: SynthCategory, cx: float, cy: float, r: float, size: int) -> _Object:
    if cat.name == "ring":
        outer = _rasterize(_clean([_regular(cx, cy, r, r, 28, 0.0)], size), size)
        inner_r = r * rng.uniform(0.45, 0.6)
        inner = _rasterize(_clean([_regular(cx, cy, inner_r, inner_r, 28, 0.0)], size), size)
        # A hole cannot be a COCO polygon: rings are always RLE.
        return _Object(cat, outer & ~inner, None)
    polygons = _clean(_POLYGON_SHAPES[cat.name](rng, cx, cy, r), size)
    return _Object(cat, _rasterize(polygons, size), polygons)


def _make_crowd(rng: np.random.Generator, size: int, scale: float) -> _Object:
    cat = _BY_NAME[_CROWD_SHAPES[rng.integers(len(_CROWD_SHAPES))]]
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    mask = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(4, 8))):
        ox, oy = rng.normal(0.0, 6.0 * scale, 2)
        mask |= _rasterize(_clean(_POLYGON_SHAPES[cat.name](rng, cx + ox, cy + oy, rng.uniform(2.0, 3.5) * scale), size), size)
    return _Object(cat, mask, None, iscrowd=1)


# ----------------------------------------------------------------------------- pixels


def _smooth_noise(rng: np.random.Generator, size: int, grid: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bicubically."""
    coarse = Image.fromarray((rng.random((grid, grid)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured, low-saturation background (HxWx3 in [0, 1]) that never looks like an object colour."""
    value = rng.uniform(0.25, 0.75) + rng.uniform(0.15, 0.3) * (_smooth_noise(rng, size, int(rng.integers(3, 9))) - 0.5)
    if rng.random() < 0.5:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        theta, period = rng.uniform(0, np.pi), rng.uniform(4.0, 12.0)
        value = value + rng.uniform(0.04, 0.1) * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    value = value + rng.normal(0.0, 0.03, (size, size))
    tint = 1.0 + rng.uniform(-0.06, 0.06, 3)  # saturation stays below ~0.12
    return np.clip(value[..., None] * tint[None, None, :], 0.0, 1.0)


def _stuff_background(
    rng: np.random.Generator, size: int
) -> tuple[np.ndarray, list[tuple[SynthCategory, np.ndarray]], np.ndarray]:
    """Bands of stuff: (pixels HxWx3 in [0, 1], [(category, mask)] top to bottom, void seam mask)."""
    names = [STUFF[0], STUFF[2]] if rng.random() < 0.4 else list(STUFF)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Wavy borders between bands, each at a random height within its third of the image.
    cuts = []
    for k in range(len(names) - 1):
        lo, hi = (k + 1) / len(names) - 0.12, (k + 1) / len(names) + 0.12
        phase, period, amp = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.5) * size, rng.uniform(0.02, 0.06) * size
        cuts.append(rng.uniform(lo, hi) * size + amp * np.sin(2 * np.pi * xx[0] / period + phase))
    band = np.zeros((size, size), np.int64)
    for cut in cuts:
        band += yy >= cut[None, :]
    pixels = np.zeros((size, size, 3), np.float32)
    for k, cat in enumerate(names):
        value = rng.uniform(0.3, 0.75) + rng.uniform(0.1, 0.25) * (_smooth_noise(rng, size, int(rng.integers(3, 9))) - 0.5)
        if cat.name == "wall":  # a brick-like grid: texture, not colour, tells wall from sky
            value = value - 0.12 * ((yy % 6 < 1) | ((xx + 3 * (yy // 6 % 2)) % 8 < 1))
        elif cat.name == "ground":
            value = value + 0.08 * np.sin(2 * np.pi * xx / rng.uniform(3.0, 6.0))
        rgb = np.array(colorsys.hsv_to_rgb(cat.hue / 360.0, rng.uniform(0.1, 0.25), 1.0), np.float32)
        inside = band == k
        pixels[inside] = np.clip(value[inside][:, None] * rgb[None, :], 0.0, 1.0)
    pixels = np.clip(pixels + rng.normal(0.0, 0.03, (size, size, 1)), 0.0, 1.0)
    seam = np.zeros((size, size), bool)
    seam[1:] |= band[1:] != band[:-1]
    seam[:-1] |= band[1:] != band[:-1]
    return pixels, [(cat, (band == k) & ~seam) for k, cat in enumerate(names)], seam


def _object_colour(rng: np.random.Generator, cat: SynthCategory) -> np.ndarray:
    hue = ((cat.hue + rng.uniform(-8.0, 8.0)) % 360.0) / 360.0
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0)), dtype=np.float32)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a bool mask: column-major run lengths, starting with zeros."""
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


# ----------------------------------------------------------------------------- images


def _render(
    rng: np.random.Generator, index: int, size: int, stuff: list | None = None
) -> tuple[Image.Image, list[tuple[_Object, np.ndarray]]]:
    """One image and its visible objects [(object, visible mask)], bottom to top.

    With ``stuff`` (a list), the background is :func:`_stuff_background`'s bands, and the list
    receives its ``[(category, mask)]`` and void seam; the instances variant's draws are unchanged.
    """
    scale = size / 64.0
    objects: list[_Object] = []
    if index % _EMPTY_EVERY != _EMPTY_AT:
        centres: list[tuple[float, float, float]] = []
        for _ in range(int(rng.integers(1, 5))):
            cat = CATEGORIES[rng.integers(len(CATEGORIES))]
            r = rng.uniform(7.0, 14.0) * scale
            if centres and rng.random() < 0.35:
                # Near an earlier object, so that occlusion is common rather than luck.
                px, py, pr = centres[rng.integers(len(centres))]
                ang = rng.uniform(0, 2 * np.pi)
                cx, cy = px + (pr + r) * 0.6 * np.cos(ang), py + (pr + r) * 0.6 * np.sin(ang)
            else:
                cx, cy = rng.uniform(0.12, 0.88, 2) * size
            cx, cy = float(np.clip(cx, 0.1 * size, 0.9 * size)), float(np.clip(cy, 0.1 * size, 0.9 * size))
            centres.append((cx, cy, r))
            objects.append(_make_object(rng, cat, cx, cy, r, size))
        if index % _CROWD_EVERY == _CROWD_AT:
            objects.insert(int(rng.integers(len(objects) + 1)), _make_crowd(rng, size, scale))

    min_visible = max(4, int(round(8 * scale * scale)))
    # Objects hidden almost entirely are dropped (not drawn, not annotated); removing one can
    # only uncover more of the others, so one pass settles it.
    visible = _visible_masks(objects)
    keep = [o for o, v in zip(objects, visible) if v.sum() >= min_visible]
    visible = _visible_masks(keep)

    if stuff is None:
        pixels = _background(rng, size)
    else:
        pixels, bands, seam = _stuff_background(rng, size)
        stuff.extend([bands, seam])
    shade = 1.0 + 0.25 * (_smooth_noise(rng, size, 3) - 0.5) + rng.normal(0.0, 0.025, (size, size))
    for obj, vis in zip(keep, visible):
        colour = _object_colour(rng, obj.category)
        pixels[vis] = np.clip(colour[None, :] * shade[vis][:, None], 0.0, 1.0)
    image = Image.fromarray((pixels * 255.0 + 0.5).astype(np.uint8))
    if index % _GRAY_EVERY == _GRAY_AT:
        image = image.convert("L")  # COCO has a few grayscale JPEGs; readers must cope
    return image, list(zip(keep, visible))


def _visible_masks(objects: list[_Object]) -> list[np.ndarray]:
    if not objects:
        return []
    owner = np.full(objects[0].mask.shape, -1, dtype=np.int16)
    for k, obj in enumerate(objects):
        owner[obj.mask] = k
    return [owner == k for k in range(len(objects))]


def _annotation(obj: _Object, visible: np.ndarray, ann_id: int, image_id: int) -> dict:
    polygons = obj.polygons if obj.polygons is not None and np.array_equal(visible, obj.mask) else None
    return _make_annotation(obj.category.id, obj.iscrowd, polygons, visible, ann_id, image_id)


def _make_annotation(
    category_id: int, iscrowd: int, polygons: Polygons | None, visible: np.ndarray, ann_id: int, image_id: int
) -> dict:
    """COCO's annotation of a visible mask: uncompressed RLE for crowd, else the polygons when given, else RLE."""
    fortran = np.asfortranarray(visible.astype(np.uint8))
    rle = mask_utils.encode(fortran)
    if iscrowd:
        segmentation: object = _uncompressed_rle(visible)
    elif polygons is not None:
        segmentation = polygons
    else:
        segmentation = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": iscrowd,
    }


class SynthError(MtsegError, ValueError):
    """Bad arguments to :func:`synthesize`; the message is one line naming the argument."""


def _write(path: str, data: bytes) -> None:
    # Not storage.write_bytes: a demo writes hundreds of small images, and an fsync each is
    # time for nothing (the annotation file, written last and atomically, marks completion).
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise storage.StorageError(storage.describe_error(path, e)) from None


def _panoptic_entry(objects: list, stuff: list, image_id: int, file_name: str, size: int) -> tuple[dict, np.ndarray]:
    """COCO's panoptic annotation of one image and its segment-id map: stuff under the objects, seams void."""
    bands, seam = stuff
    ids = np.zeros((size, size), np.int64)
    segments = []
    things = np.zeros((size, size), bool)
    for obj, visible in objects:
        things |= visible
    layers = [(cat, mask & ~things, 0) for cat, mask in bands] + [(o.category, v, o.iscrowd) for o, v in objects]
    for cat, mask, crowd in layers:
        if not mask.any():
            continue
        seg_id = len(segments) + 1
        ids[mask] = seg_id
        segments.append(
            {
                "id": seg_id,
                "category_id": cat.id,
                "iscrowd": int(crowd),
                "bbox": coco_panoptic.segment_bbox(mask),
                "area": int(mask.sum()),
            }
        )
    del seam  # void: owned by no segment
    return {"image_id": image_id, "file_name": file_name.rsplit(".", 1)[0] + ".png", "segments_info": segments}, ids


def _synthesize_split(
    out_dir: str, split: str, count: int, size: int, seed: int, profile: str = "default", annotation_format: str = "instances"
) -> dict:
    panoptic = annotation_format == "panoptic"
    png_dir = os.path.join(out_dir, "annotations", f"panoptic_{split}")
    image_dir = os.path.join(out_dir, split)
    for folder in [image_dir, png_dir] if panoptic else [image_dir]:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise storage.StorageError(storage.describe_error(folder, e)) from None
    split_code = SPLITS.index(split)
    images, annotations, entries = [], [], []
    stats = {"empty_images": 0, "grayscale_images": 0, "crowd_annotations": 0, "polygon_annotations": 0, "rle_annotations": 0}
    for index in range(count):
        rng = np.random.default_rng([seed, split_code, index])
        image_id = _ID_BASE[split] + index + 1
        if profile == "coco":
            image, drawn = coco_profile.render(rng, size)
            quality = coco_profile.JPEG_QUALITY
            objects = [((cid, crowd, polys), visible) for cid, crowd, polys, visible in drawn]
        else:
            stuff = [] if panoptic else None
            image, objects = _render(rng, index, size, stuff)
            quality = _JPEG_QUALITY
        file_name = f"{image_id:012d}.jpg"
        if panoptic:
            entry, ids = _panoptic_entry(objects, stuff, image_id, file_name, size)
            _write(os.path.join(png_dir, entry["file_name"]), coco_panoptic.write_png(ids))
            entries.append(entry)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        _write(os.path.join(image_dir, file_name), buf.getvalue())
        images.append({"id": image_id, "file_name": file_name, "height": image.height, "width": image.width})
        stats["empty_images"] += not objects
        stats["grayscale_images"] += image.mode == "L"
        for obj, visible in objects:
            ann_id = _ID_BASE[split] * 10 + len(annotations) + 1
            if isinstance(obj, _Object):
                ann = _annotation(obj, visible, ann_id, image_id)
            else:
                ann = _make_annotation(*obj, visible, ann_id, image_id)
            annotations.append(ann)
            stats["crowd_annotations"] += ann["iscrowd"]
            stats["polygon_annotations"] += isinstance(ann["segmentation"], list)
            stats["rle_annotations"] += isinstance(ann["segmentation"], dict)
    coco = {
        "info": {"description": _description(split, seed, size, profile), "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": entries if panoptic else annotations,
        "categories": categories(profile, annotation_format),
    }
    ann_file = os.path.join(out_dir, "annotations", f"{annotation_format}_{split}.json")
    # Atomic, and written after every image: its presence means the split is complete.
    storage.write_bytes(ann_file, json.dumps(coco, separators=(",", ":")).encode())
    return {"images": len(images), "annotations": len(annotations), "image_dir": image_dir, "annotation_file": ann_file, **stats}


def _description(split: str, seed: int, size: int, profile: str) -> str:
    if profile == "coco":
        return f"mtseg synthetic COCO, coco profile ({split}, seed {seed}, {size}px long side)"
    return f"mtseg synthetic COCO ({split}, seed {seed}, {size}px)"


def categories(profile: str = "default", annotations: str = "instances") -> list[dict]:
    """The synthetic dataset's COCO ``categories`` entries (``id``, ``name``, ``supercategory``).

    Args:
        profile: ``"default"`` (six shapes) or ``"coco"`` (COCO's 80 categories).
        annotations: ``"panoptic"`` adds the stuff categories and ``isthing`` to every entry.
    """
    if profile == "coco":
        return coco_profile.categories()
    if annotations == "panoptic":
        return [{"id": c.id, "name": c.name, "supercategory": c.supercategory, "isthing": 1} for c in CATEGORIES] + [
            {"id": c.id, "name": c.name, "supercategory": c.supercategory, "isthing": 0} for c in STUFF
        ]
    return [{"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in CATEGORIES]


PROFILES = ("default", "coco")


def synthesize(
    out_dir: str,
    *,
    train: int = 320,
    val: int = 80,
    size: int | None = None,
    seed: int = 0,
    profile: str = "default",
    annotations: str = "instances",
) -> dict:
    """Write a synthetic COCO-format dataset (``train2017``, ``val2017``) under ``out_dir``.

    Args:
        out_dir: local directory to write to (created if missing). Existing files of the same
            names are overwritten.
        train: number of training images (>= 0).
        val: number of validation images (>= 0).
        size: ``default`` profile: image side in pixels (square images, >= 16; default 64).
            ``coco`` profile: long side (default 640, >= 64; the short side is 3/4 of it).
        seed: random seed; the same arguments give byte-identical output.
        profile: ``"default"``: the demo's small learnable shapes (see the module docstring);
            ``"coco"``: images that cost what COCO's do (:mod:`mtseg.data.coco_profile`).
        annotations: ``"instances"`` (things only) or ``"panoptic"`` (stuff bands under the
            things, COCO's panoptic PNGs and JSON; default profile only).

    Returns:
        ``{"root": out_dir, "profile": profile, "categories": [...], "splits": {split: {"images",
        "annotations", "image_dir", "annotation_file", "empty_images", "grayscale_images",
        "crowd_annotations", "polygon_annotations", "rle_annotations"}}}``.

    Raises:
        SynthError: a count is negative, the size is too small, the profile unknown, or
            ``out_dir`` is not local.
        mtseg.storage.StorageError: ``out_dir`` cannot be written (a file in the way, read-only,
            a full disk).
    """
    out_dir = str(out_dir)
    if "://" in out_dir and not out_dir.startswith("file://"):
        raise SynthError(f"out_dir: {out_dir!r} must be a local directory (shard it to object storage afterwards)")
    if profile not in PROFILES:
        raise SynthError(f"profile: must be one of {', '.join(PROFILES)}, got {profile!r}")
    if annotations not in ANNOTATION_FORMATS:
        raise SynthError(f"annotations: must be one of {', '.join(ANNOTATION_FORMATS)}, got {annotations!r}")
    if annotations == "panoptic" and profile != "default":
        raise SynthError(f"annotations: 'panoptic' is made for the default profile only, not {profile!r}")
    for name, value in (("train", train), ("val", val)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SynthError(f"{name}: image count must be an integer >= 0, got {value!r}")
    min_size = _MIN_SIZE if profile == "default" else _MIN_COCO_SIZE
    if size is None:
        size = 64 if profile == "default" else coco_profile.DEFAULT_SIDE
    if isinstance(size, bool) or not isinstance(size, int) or size < min_size:
        raise SynthError(f"size: image side must be an integer >= {min_size} pixels, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SynthError(f"seed: must be an integer >= 0, got {seed!r}")
    storage.check_access(out_dir)
    out_dir = storage.resolve(out_dir)[1]  # absolute, without file://
    splits = {
        split: _synthesize_split(out_dir, split, n, size, seed, profile, annotations) for split, n in zip(SPLITS, (train, val))
    }
    return {"root": out_dir, "profile": profile, "categories": categories(profile, annotations), "splits": splits}


__all__ = ["CATEGORIES", "PROFILES", "SPLITS", "SynthCategory", "SynthError", "categories", "synthesize"]
