"""Pictures of segmentations: the drawing primitives ``mtseg predict``, the tasks and the demo share.

Maps are drawn as ``(H, W, 3)`` uint8 RGB arrays; the pieces that hold text (:func:`legend`,
:func:`beside`, :func:`panel`) are PIL images. A map of labels is drawn as a :class:`Picture`:
its pixels and the key to their colours, which :func:`panel` merges into one legend per row
and :meth:`Picture.image` draws beside the pixels. Class ``i`` of a dataset has the colour
``class_colours(categories)[i]`` everywhere: the dataset's own where it gives one
(COCO panoptic's ``color``, import-masks' ``classes.yaml``), :func:`palette` where it does not.

Text is DejaVu Sans (matplotlib's bundled font) sized from the picture it labels, so it reads
the same on a 64 px tile and a 4000 px photo.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mtseg.data.categories import IGNORE_INDEX

if TYPE_CHECKING:
    from mtseg.data.categories import CategoryIndex

#: Overlay colour of the labelled pixels (background pixels keep the image).
BLEND_ALPHA = 0.55

#: Smallest text drawn, in pixels: legible on a 32 px tile, where height-relative sizing would give 1 px.
MIN_FONT_PX = 12

#: Text height as a fraction of the picture's height (17 px beside a 480 px photo).
FONT_FRACTION = 1 / 28

#: :func:`panel` enlarges small tiles (nearest neighbour, by a whole factor) to at least this height.
MIN_TILE_PX = 160

#: Entries a legend column holds however short the picture beside it.
MIN_LEGEND_ROWS = 6

#: A legend name longer than this is cut (with an ellipsis): one long name must not widen every column.
MAX_NAME_CHARS = 28

WHITE = (255, 255, 255)
TEXT = (20, 20, 20)


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


def class_colours(categories: CategoryIndex) -> np.ndarray:
    """(256, 3) uint8 colour of every class index: the dataset's palette, :func:`palette` where it has none.

    Args:
        categories: the label space; ``categories.colors[i]`` colours class ``i + 1``.

    Returns:
        A table like :func:`palette`'s: 0 (background or void) black, IGNORE_INDEX grey.
    """
    colours = palette()
    for i, colour in enumerate(categories.colors[: IGNORE_INDEX - 1]):
        if colour is not None:
            colours[i + 1] = colour
    return colours


def colorize(labels: np.ndarray, colours: np.ndarray | None = None) -> np.ndarray:
    """(H, W) integer labels -> (H, W, 3) uint8 in ``colours`` (default :func:`palette`)."""
    table = palette() if colours is None else colours
    return table[np.clip(labels, 0, len(table) - 1).astype(np.int64)]


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


def blend(image: np.ndarray, labels: np.ndarray, alpha: float = BLEND_ALPHA, colours: np.ndarray | None = None) -> np.ndarray:
    """Labels over an image in ``colours`` (default :func:`palette`); background (0) pixels stay the image."""
    colour = colorize(labels, colours).astype(np.float32)
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


# ---------------------------------------------------------------------------- text


@functools.lru_cache(maxsize=64)
def _truetype(size: int) -> ImageFont.FreeTypeFont:
    from matplotlib import font_manager

    # matplotlib ships DejaVu Sans in its own package data: the same font on every machine, with
    # no system fonts needed (PIL's built-in bitmap font only scales by blowing up its pixels).
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def font_size(height: int) -> int:
    """Text height in pixels for a picture ``height`` pixels tall: :data:`FONT_FRACTION` of it, at least :data:`MIN_FONT_PX`."""
    return max(MIN_FONT_PX, round(height * FONT_FRACTION))


def font(height: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans at :func:`font_size` for a picture ``height`` pixels tall."""
    return _truetype(font_size(height))


def _short(name: str) -> str:
    return name if len(name) <= MAX_NAME_CHARS else name[: MAX_NAME_CHARS - 1] + "\u2026"


def legend(entries: Sequence[tuple[int, str]], height: int, colours: np.ndarray | None = None) -> Image.Image:
    """A colour key on white: a swatch and a name per ``(label, name)``, in columns no taller than ``height``.

    Args:
        entries: the labels to name, in reading order (down each column, then across).
        height: the height of the picture the key goes beside; it sets the text size and how
            many entries a column holds (at least :data:`MIN_LEGEND_ROWS`), so many classes make
            more columns rather than a key much taller than the picture.
        colours: the colour of each label (default :func:`palette`).

    Returns:
        The key; ``(nothing labelled)`` when ``entries`` is empty.
    """
    table = palette() if colours is None else colours
    f = font(height)
    size = f.size
    pad = max(3, size // 3)
    row = round(size * 1.45)
    names = [_short(name) for _, name in entries] or ["(nothing labelled)"]
    # A short picture still gets a readable column rather than one entry per column.
    per_column = max(MIN_LEGEND_ROWS, (height - 2 * pad) // row)
    columns = math.ceil(len(names) / per_column)
    per_column = math.ceil(len(names) / columns)  # balanced: no column of one straggler
    text_w = max(math.ceil(f.getlength(n)) for n in names)
    column_w = size + pad + text_w + 2 * pad
    img = Image.new("RGB", (pad + columns * column_w, 2 * pad + per_column * row), WHITE)
    draw = ImageDraw.Draw(img)
    if not entries:
        draw.text((pad, pad + row // 2), names[0], fill=(110, 110, 110), font=f, anchor="lm")
        return img
    for n, ((label, _), name) in enumerate(zip(entries, names)):
        x = pad + (n // per_column) * column_w
        y = pad + (n % per_column) * row
        top = y + (row - size) // 2
        colour = tuple(int(c) for c in table[int(label) % len(table)])
        draw.rectangle([x, top, x + size - 1, top + size - 1], fill=colour, outline=(90, 90, 90))
        draw.text((x + size + pad, y + row // 2), name, fill=TEXT, font=f, anchor="lm")
    return img


def beside(picture: np.ndarray | Image.Image, right: Image.Image) -> Image.Image:
    """``picture`` with ``right`` (e.g. its :func:`legend`) to its right, top-aligned, on white."""
    left = picture if isinstance(picture, Image.Image) else Image.fromarray(picture)
    canvas = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), WHITE)
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


# ---------------------------------------------------------------------------- labelled pictures


@dataclass(frozen=True, eq=False)
class Picture:
    """A map drawn over its image, with the key to its colours.

    Attributes:
        pixels: (H, W, 3) uint8 RGB.
        entries: ``(label, name)`` of every label the pixels show, by label.
        colours: the colour of each label (a table like :func:`palette`'s).
    """

    pixels: np.ndarray
    entries: tuple[tuple[int, str], ...]
    colours: np.ndarray

    def image(self) -> Image.Image:
        """The pixels with their :func:`legend` beside."""
        return beside(self.pixels, legend(self.entries, self.pixels.shape[0], self.colours))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.asarray(self.image())
        return out if dtype is None else out.astype(dtype)


def labelled(image: np.ndarray, labels: np.ndarray, names: Sequence[str], colours: np.ndarray | None = None) -> Picture:
    """``labels`` blended over ``image``, keyed by the names of the labels present.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) integers: 0 shows the image (background or void), ``i`` is ``names[i - 1]``,
            IGNORE_INDEX is drawn grey and named ``ignored``.
        names: the name of label ``i + 1``.
        colours: the colour of each label (default :func:`palette`).

    Returns:
        A :class:`Picture` whose key lists only the labels that occur in ``labels``.
    """
    table = palette() if colours is None else colours
    present = [int(v) for v in np.unique(labels)]
    entries = [(v, names[v - 1]) for v in present if 0 < v <= len(names) and v != IGNORE_INDEX]
    if IGNORE_INDEX in present:
        entries.append((IGNORE_INDEX, "ignored"))
    return Picture(blend(image, labels, colours=table), tuple(entries), table)


def class_picture(image: np.ndarray, labels: np.ndarray, categories: CategoryIndex) -> Picture:
    """A map of class indices over ``image`` in the dataset's colours, keyed by its class names (see :func:`labelled`)."""
    return labelled(image, labels, categories.names, class_colours(categories))


# ---------------------------------------------------------------------------- grids


Tile = np.ndarray | Image.Image | Picture


def panel(rows: Sequence[tuple[str, Sequence[tuple[str, Tile]]]], scale: int | None = None) -> Image.Image:
    """A compact grid of titled tiles, one legend per row.

    Every tile keeps its own aspect; a column is as wide as its widest tile. The :class:`Picture`
    tiles of a row share one legend at the row's end, naming what any of them shows (ground
    truth and prediction together).

    Args:
        rows: ``[(row title, [(tile title, tile), ...]), ...]``, e.g. one row per task of
            image | ground truth | prediction. A tile is an (H, W, 3) uint8 array, a PIL image
            or a :class:`Picture`.
        scale: whole-number enlargement of every tile (nearest neighbour: pixels stay sharp);
            default the smallest that makes the tallest tile :data:`MIN_TILE_PX` high.

    Returns:
        The grid, on white.
    """
    grid: list[tuple[str, list[tuple[str, Image.Image]], Picture | None]] = []
    for row_title, row in rows:
        tiles, keyed = [], []
        for title, tile in row:
            if isinstance(tile, Picture):
                keyed.append(tile)
                tile = tile.pixels
            tiles.append((title, tile.convert("RGB") if isinstance(tile, Image.Image) else Image.fromarray(tile)))
        key = None
        if keyed:
            entries = sorted({e for p in keyed for e in p.entries})
            key = Picture(keyed[0].pixels, tuple(entries), keyed[0].colours)
        grid.append((row_title, tiles, key))
    tallest = max([t.height for _, tiles, _ in grid for _, t in tiles] + [1])
    if scale is None:
        scale = max(1, math.ceil(MIN_TILE_PX / tallest))
    tile_h = tallest * scale
    f = font(tile_h)
    gap = max(4, f.size // 2)
    title_h = round(f.size * 1.4)

    def size(t: Image.Image) -> tuple[int, int]:
        return t.width * scale, t.height * scale

    ncols = max([len(tiles) for _, tiles, _ in grid] + [0])
    col_w = [0] * ncols
    for _, tiles, _ in grid:
        for c, (title, t) in enumerate(tiles):
            col_w[c] = max(col_w[c], size(t)[0], math.ceil(f.getlength(title)))
    left = gap + max([math.ceil(f.getlength(title)) for title, _, _ in grid] + [0]) + gap
    placed = []  # (y, row height, legend)
    y, width = gap, 0
    for _, tiles, key in grid:
        h = max([size(t)[1] for _, t in tiles] + [1])
        key_img = legend(key.entries, h, key.colours) if key is not None else None
        row_h = title_h + max(h, key_img.height if key_img is not None else 0)
        x_end = left + sum(col_w[: len(tiles)]) + gap * max(0, len(tiles) - 1)
        width = max(width, x_end + (gap + key_img.width if key_img is not None else 0) + gap)
        placed.append((y, h, key_img))
        y += row_h + gap
    canvas = Image.new("RGB", (width, y), WHITE)
    draw = ImageDraw.Draw(canvas)
    for (row_title, tiles, _), (y, h, key_img) in zip(grid, placed):
        draw.text((gap, y + title_h + h // 2), row_title, fill=TEXT, font=f, anchor="lm")
        x = left
        for c, (title, t) in enumerate(tiles):
            draw.text((x, y + title_h // 2), title, fill=TEXT, font=f, anchor="lm")
            canvas.paste(t.resize(size(t), Image.NEAREST), (x, y + title_h))
            x += col_w[c] + gap
        if key_img is not None:
            canvas.paste(key_img, (x, y + title_h))
    return canvas
