"""Synthetic images that look like COCO's to the data plane: ``mtseg data synth --profile coco``.

The default profile (:mod:`mtseg.data.synth`) is made for learning at 64 px; this one is made
for measuring the data plane at COCO's scale, so it copies what costs time and memory there:

* 640x480 JPEGs, a quarter of them portrait (480x640), at quality 90 over textured
  backgrounds and textured objects, so the files weigh about what COCO's do (~160 KB);
* COCO's 80 categories with their own ids (1..90 with gaps), names and 12 supercategories
  (:data:`COCO_CATEGORIES`, written out here: nothing is downloaded);
* about 7 instances per image, drawn from a long-tailed count distribution, with COCO's
  size mix (:data:`AREA_MIX`: about 41% small < 32^2 px, 34% medium, 25% large by visible
  area); large objects are placed first, so smaller ones occlude them as in photographs,
  and an annotation is the object's visible part;
* about one image in ten holds a crowd region (``iscrowd=1``, uncompressed RLE); unoccluded
  objects are polygons, occluded ones compressed RLE, as COCO stores them.

Everything is drawn from a generator seeded by ``(seed, split, index)``: the same arguments
give the same bytes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

#: COCO 2017's categories: (id, name, supercategory).
# fmt: off
COCO_CATEGORIES: tuple[tuple[int, str, str], ...] = (
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"), (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"), (6, "bus", "vehicle"), (7, "train", "vehicle"), (8, "truck", "vehicle"),
    (9, "boat", "vehicle"), (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"), (14, "parking meter", "outdoor"), (15, "bench", "outdoor"),
    (16, "bird", "animal"), (17, "cat", "animal"), (18, "dog", "animal"), (19, "horse", "animal"),
    (20, "sheep", "animal"), (21, "cow", "animal"), (22, "elephant", "animal"), (23, "bear", "animal"),
    (24, "zebra", "animal"), (25, "giraffe", "animal"), (27, "backpack", "accessory"),
    (28, "umbrella", "accessory"), (31, "handbag", "accessory"), (32, "tie", "accessory"),
    (33, "suitcase", "accessory"), (34, "frisbee", "sports"), (35, "skis", "sports"),
    (36, "snowboard", "sports"), (37, "sports ball", "sports"), (38, "kite", "sports"),
    (39, "baseball bat", "sports"), (40, "baseball glove", "sports"), (41, "skateboard", "sports"),
    (42, "surfboard", "sports"), (43, "tennis racket", "sports"), (44, "bottle", "kitchen"),
    (46, "wine glass", "kitchen"), (47, "cup", "kitchen"), (48, "fork", "kitchen"), (49, "knife", "kitchen"),
    (50, "spoon", "kitchen"), (51, "bowl", "kitchen"), (52, "banana", "food"), (53, "apple", "food"),
    (54, "sandwich", "food"), (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"),
    (58, "hot dog", "food"), (59, "pizza", "food"), (60, "donut", "food"), (61, "cake", "food"),
    (62, "chair", "furniture"), (63, "couch", "furniture"), (64, "potted plant", "furniture"),
    (65, "bed", "furniture"), (67, "dining table", "furniture"), (70, "toilet", "furniture"),
    (72, "tv", "electronic"), (73, "laptop", "electronic"), (74, "mouse", "electronic"),
    (75, "remote", "electronic"), (76, "keyboard", "electronic"), (77, "cell phone", "electronic"),
    (78, "microwave", "appliance"), (79, "oven", "appliance"), (80, "toaster", "appliance"),
    (81, "sink", "appliance"), (82, "refrigerator", "appliance"), (84, "book", "indoor"),
    (85, "clock", "indoor"), (86, "vase", "indoor"), (87, "scissors", "indoor"),
    (88, "teddy bear", "indoor"), (89, "hair drier", "indoor"), (90, "toothbrush", "indoor"),
)
# fmt: on

#: COCO's size mix of instances by area (small < 32^2, medium < 96^2, large), and the range
#: of drawn areas in each, in pixels (log-uniform within a range).
AREA_MIX = (0.41, 0.34, 0.25)
# Drawn with a little more weight on large: occlusion moves some of them down a class.
_DRAW_MIX = (0.39, 0.31, 0.30)
_AREA_RANGES = ((24.0, 1024.0), (1024.0, 9216.0), (9216.0, 0.45))  # large: up to 45% of the image

JPEG_QUALITY = 90
#: Long side of the images; the short side is 3/4 of it.
DEFAULT_SIDE = 640
_PORTRAIT_SHARE = 0.25
_CROWD_SHARE = 0.1
# Instances per image: 1 + negative binomial (mean 6.3, long tail), so the mean is ~7.3 as
# in COCO train2017, with a few images holding dozens.
_COUNT_R, _COUNT_MEAN = 1.2, 6.3
_GRAIN = 0.075
_MIN_VISIBLE = 12  # a sliver smaller than this is dropped (not drawn, not annotated)


def categories() -> list[dict]:
    """COCO's ``categories`` entries (``id``, ``name``, ``supercategory``)."""
    return [{"id": i, "name": n, "supercategory": s} for i, n, s in COCO_CATEGORIES]


def _octave_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Texture in about [-0.5, 0.5]: smooth noise summed over octaves, coarse to fine."""
    out = np.zeros((h, w), np.float32)
    amp = 0.5
    for grid in (4, 16, 64, 256):
        coarse = Image.fromarray((rng.random((max(2, grid * h // max(h, w)), grid)) * 255).astype(np.uint8))
        out += amp * (np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), np.float32) / 255.0 - 0.5)
        amp *= 0.55
    return out


def _blob(rng: np.random.Generator, cx: float, cy: float, area: float) -> list[float]:
    """A star-convex polygon of about ``area`` px around (cx, cy), as a flat COCO polygon."""
    n = int(rng.integers(8, 25))
    t = np.sort(rng.uniform(0.0, 2 * np.pi, n))
    aspect = np.exp(rng.uniform(-0.7, 0.7))
    radius = rng.uniform(0.65, 1.0, n)
    # Area of the polygon with unit scale, to hit the drawn area.
    x, y = radius * np.cos(t) * aspect, radius * np.sin(t) / aspect
    unit = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    s = np.sqrt(area / max(unit, 1e-6))
    angle = rng.uniform(0, np.pi)
    ca, sa = np.cos(angle), np.sin(angle)
    px, py = cx + s * (ca * x - sa * y), cy + s * (sa * x + ca * y)
    return [float(v) for xy in zip(px, py) for v in xy]


def _clean(poly: list[float], h: int, w: int) -> list[float]:
    # COCO stores 2-decimal coordinates inside the image; rasterise exactly what is written.
    xs = [round(min(max(v, 0.0), float(w)), 2) for v in poly[0::2]]
    ys = [round(min(max(v, 0.0), float(h)), 2) for v in poly[1::2]]
    return [v for xy in zip(xs, ys) for v in xy]


def _rasterize(polygons: list[list[float]], h: int, w: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))).astype(bool)


def _draw_area(rng: np.random.Generator, image_area: float) -> float:
    lo, hi = _AREA_RANGES[int(rng.choice(3, p=_DRAW_MIX))]
    # Below COCO's 640 px the absolute size classes no longer fit: cap at the largest share.
    cap = _AREA_RANGES[2][1] * image_area
    hi = cap if hi < 1.0 else min(hi, cap)
    lo = min(lo, hi)
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def render(rng: np.random.Generator, side: int = DEFAULT_SIDE):
    """One COCO-profile image and its objects.

    Args:
        rng: the image's own generator.
        side: long side, pixels.

    Returns:
        ``(image, objects)``: a PIL RGB image and ``[(category_id, iscrowd, polygons or None,
        visible bool mask)]``, bottom to top; polygons only for unoccluded non-crowd objects.
    """
    short = max(1, round(side * 3 / 4))
    h, w = (side, short) if rng.random() < _PORTRAIT_SHARE else (short, side)
    n = 1 + int(rng.negative_binomial(_COUNT_R, _COUNT_R / (_COUNT_R + _COUNT_MEAN)))
    drawn = []
    for _ in range(n):
        cat = COCO_CATEGORIES[int(rng.integers(len(COCO_CATEGORIES)))]
        area = _draw_area(rng, h * w)
        r = np.sqrt(area / np.pi)
        cx, cy = rng.uniform(-0.3 * r, w + 0.3 * r), rng.uniform(-0.3 * r, h + 0.3 * r)
        poly = _clean(_blob(rng, cx, cy, area), h, w)
        drawn.append((area, cat[0], 0, [poly]))
    if rng.random() < _CROWD_SHARE:
        cat = COCO_CATEGORIES[int(rng.integers(len(COCO_CATEGORIES)))]
        cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        spread = rng.uniform(0.05, 0.15) * min(h, w)
        polys = [
            _clean(_blob(rng, cx + ox, cy + oy, rng.uniform(80.0, 600.0)), h, w)
            for ox, oy in rng.normal(0.0, spread, (int(rng.integers(6, 16)), 2))
        ]
        drawn.append((float(h * w), cat[0], 1, polys))  # behind everything
    # Large objects first, so smaller ones occlude them as nearer objects do in photographs.
    drawn.sort(key=lambda d: -d[0])
    masks = [_rasterize(polys, h, w) for _, _, _, polys in drawn]
    owner = np.full((h, w), -1, np.int16)
    for k, m in enumerate(masks):
        owner[m] = k
    objects = []
    tint = rng.uniform(0.6, 1.4, 3).astype(np.float32)
    pixels = 0.5 + 0.5 * _octave_noise(rng, h, w)[..., None] * tint + rng.uniform(-0.15, 0.15, 3).astype(np.float32)
    shade = _octave_noise(rng, h, w)
    for k, ((_, cid, crowd, polys), full) in enumerate(zip(drawn, masks)):
        visible = owner == k
        if visible.sum() < _MIN_VISIBLE:
            continue
        colour = rng.uniform(0.1, 0.9, 3).astype(np.float32)
        pixels[visible] = colour + 0.6 * shade[visible][:, None]
        unoccluded = not crowd and np.array_equal(visible, full)
        objects.append((cid, crowd, polys if unoccluded else None, visible))
    # Sensor-like grain: what makes a photograph's JPEG weigh ~160 KB rather than ~60.
    pixels += _GRAIN * rng.uniform(0.7, 1.3) * rng.standard_normal(pixels.shape, dtype=np.float32)
    image = Image.fromarray((np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    return image, objects


__all__ = ["AREA_MIX", "COCO_CATEGORIES", "DEFAULT_SIDE", "JPEG_QUALITY", "categories", "render"]
