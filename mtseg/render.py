"""Pictures of segmentations: the drawing primitives ``mtseg predict``, the tasks and the report share.

Everything takes and returns ``(H, W, 3)`` uint8 RGB arrays, except the pieces that hold text
(:func:`legend`, :func:`beside`, :func:`panel`), which are PIL images. Label ``i`` has colour
``palette()[i]`` everywhere, so a legend beside one picture names the colours of any other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mtseg.data.categories import IGNORE_INDEX

#: Overlay colour of the labelled pixels (background pixels keep the image).
BLEND_ALPHA = 0.55


def palette() -> np.ndarray:
    """(256, 3) uint8 colours, one per label: 0 (background) black, IGNORE_INDEX grey.

    The first 14 labels get hand-picked distinct colours; the rest are drawn from a fixed seed.
    """
    rng = np.random.default_rng(12345)
    colours = np.zeros((256, 3), np.uint8)
    base = np.array(
        [
            [230, 25, 75],
            [60, 180, 75],
            [255, 225, 25],
            [0, 130, 200],
            [245, 130, 48],
            [145, 30, 180],
            [70, 240, 240],
            [240, 50, 230],
            [210, 245, 60],
            [250, 190, 212],
            [0, 128, 128],
            [220, 190, 255],
            [170, 110, 40],
            [128, 0, 0],
        ],
        np.uint8,
    )
    for i in range(1, 256):
        colours[i] = base[i - 1] if i - 1 < len(base) else rng.integers(40, 255, 3)
    colours[IGNORE_INDEX] = (128, 128, 128)
    return colours


def colorize(labels: np.ndarray) -> np.ndarray:
    """(H, W) integer labels -> (H, W, 3) uint8 in :func:`palette` colours."""
    return palette()[np.clip(labels, 0, 255).astype(np.int64)]


def heatmap(values: np.ndarray, *, stretch: bool = True) -> np.ndarray:
    """(H, W) floats -> (H, W, 3) uint8, black -> yellow.

    Args:
        values: the map.
        stretch: map the map's own min..max to black..yellow (targets, raw logits); False for
            a probability on the fixed scale 0..1, so that a flat, empty map stays black
            instead of showing as full of signal.
    """
    v = values.astype(np.float32)
    if stretch:
        v = (v - v.min()) / max(float(v.max() - v.min()), 1e-6)
        return np.stack([v * 255, v * 220, v * 40], -1).astype(np.uint8)
    v = np.clip(v, 0.0, 1.0)
    return np.stack([v * 255, v * 220, v * 40], -1).round().astype(np.uint8)


def to_uint8_image(image_chw: np.ndarray) -> np.ndarray:
    """(3, H, W) float in [0, 1] (the model's input) -> (H, W, 3) uint8."""
    return (np.clip(np.transpose(image_chw, (1, 2, 0)), 0, 1) * 255).round().astype(np.uint8)


def blend(image: np.ndarray, labels: np.ndarray, alpha: float = BLEND_ALPHA) -> np.ndarray:
    """Labels over an image in :func:`palette` colours; background (0) pixels stay the image."""
    colour = colorize(labels).astype(np.float32)
    out = image.astype(np.float32)
    fg = (labels > 0)[..., None]
    return np.where(fg, (1 - alpha) * out + alpha * colour, out).astype(np.uint8)


def outlines(
    image: np.ndarray, instances: Iterable[dict], score_threshold: float, colour: tuple[int, int, int] = (255, 255, 255)
) -> np.ndarray:
    """A copy of ``image`` with one-pixel outlines of the instances (COCO results at (H, W)) scoring at least ``score_threshold``."""
    from pycocotools import mask as mask_utils

    out = image.copy()
    for inst in instances:
        if float(inst["score"]) < score_threshold:
            continue
        m = mask_utils.decode(inst["segmentation"]).astype(bool)
        inner = m.copy()
        inner[1:, :] &= m[:-1, :]
        inner[:-1, :] &= m[1:, :]
        inner[:, 1:] &= m[:, :-1]
        inner[:, :-1] &= m[:, 1:]
        out[m & ~inner] = colour
    return out


def instance_map(instances: Sequence[dict], shape: tuple[int, int]) -> np.ndarray:
    """Per-pixel instance number (1..N by rising score, 0 = none) from fused instances (``mask`` arrays)."""
    out = np.zeros(shape, np.int64)
    for i, inst in enumerate(sorted(instances, key=lambda d: d["score"])):
        mask = np.asarray(inst["mask"], bool)
        if mask.shape == shape:
            out[mask] = i + 1
    return out


def font(height: int) -> ImageFont.FreeTypeFont:
    """PIL's default font at a size readable beside a picture ``height`` pixels tall (32 px to 4000 px)."""
    return ImageFont.load_default(size=int(min(48, max(11, height // 28))))


def legend(entries: Sequence[tuple[int, str]], height: int) -> Image.Image:
    """A colour legend on white: one row per ``(label, name)``, sized for a picture ``height`` pixels tall."""
    colours = palette()
    f = font(height)
    row = int(f.size * 1.5)
    width = max([int(f.getlength(name)) for _, name in entries] + [f.size * 4]) + row + 12
    img = Image.new("RGB", (width, row * max(1, len(entries)) + 6), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for n, (index, name) in enumerate(entries):
        y = 3 + n * row
        draw.rectangle([4, y + 2, 4 + row - 6, y + row - 4], fill=tuple(int(c) for c in colours[index]), outline=(0, 0, 0))
        draw.text((row + 4, y + (row - f.size) // 2), name, fill=(0, 0, 0), font=f)
    return img


def beside(picture: np.ndarray | Image.Image, right: Image.Image) -> Image.Image:
    """``picture`` with ``right`` (e.g. its :func:`legend`) to its right, top-aligned, on white."""
    left = picture if isinstance(picture, Image.Image) else Image.fromarray(picture)
    canvas = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


def panel(rows: Sequence[tuple[str, Sequence[tuple[str, np.ndarray]]]], scale: int = 3) -> Image.Image:
    """A grid of titled tiles, each scaled up ``scale`` times (nearest neighbour).

    Args:
        rows: ``[(row title, [(tile title, (H, W, 3) uint8), ...]), ...]``, e.g. one row per
            task of image | ground truth | prediction.
        scale: enlargement of every tile.
    """
    tiles = [t for _, r in rows for _, t in r]
    h = max(t.shape[0] for t in tiles) * scale
    w = max(t.shape[1] for t in tiles) * scale
    ncols = max(len(r) for _, r in rows)
    title_h, left = 14, 110
    canvas = Image.new("RGB", (left + ncols * (w + 4), len(rows) * (h + title_h + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for ri, (row_title, row) in enumerate(rows):
        y = ri * (h + title_h + 4)
        draw.text((4, y + title_h + h // 2 - 6), row_title[:16], fill=(0, 0, 0))
        for ci, (title, tile) in enumerate(row):
            x = left + ci * (w + 4)
            draw.text((x, y), title[:24], fill=(0, 0, 0))
            img = Image.fromarray(tile).resize((tile.shape[1] * scale, tile.shape[0] * scale), Image.NEAREST)
            canvas.paste(img, (x, y + title_h))
    return canvas
