"""COCO's panoptic format: PNGs of segment ids and the segments JSON (Kirillov et al. 2019).

A panoptic split is ``annotations/panoptic_<split>.json`` (``images``, ``categories`` with
``isthing``, and per image one ``annotations`` entry: ``file_name`` of its PNG and
``segments_info`` [{``id``, ``category_id``, ``iscrowd``, ``bbox``, ``area``}]) plus the PNGs
in ``annotations/panoptic_<split>/``, each pixel's segment id written as RGB, id = R + 256·G +
256²·B, 0 = void. The encoding is panopticapi's (``panopticapi.utils.rgb2id`` / ``id2rgb``);
this module is the one place mtseg reads and writes it.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

#: segment id of pixels no segment owns (panopticapi's VOID)
VOID = 0
#: the largest id three 8-bit channels hold
MAX_SEGMENT_ID = 256**3 - 1


def rgb2id(color: Any) -> Any:
    """Segment ids from COCO panoptic PNG colours, ``id = R + 256 G + 256^2 B`` (panopticapi.utils).

    Args:
        color: (H, W, 3) array (an alpha channel, if any, is ignored) or one ``[r, g, b]``.

    Returns:
        (H, W) int64 id map, or an int for one colour.
    """
    if isinstance(color, np.ndarray) and color.ndim == 3:
        if color.shape[2] < 3:
            raise ValueError(f"rgb2id: expected (H, W, 3) colours, got shape {color.shape}")
        c = color[..., :3].astype(np.int64)
        return c[..., 0] + 256 * c[..., 1] + 256 * 256 * c[..., 2]
    return int(color[0]) + 256 * int(color[1]) + 256 * 256 * int(color[2])


def id2rgb(id_map: Any) -> Any:
    """COCO panoptic PNG colours of segment ids, the inverse of :func:`rgb2id` (panopticapi.utils).

    Args:
        id_map: array of ids in ``0..256^3 - 1``, or one id.

    Returns:
        uint8 array of shape ``id_map.shape + (3,)``, or ``[r, g, b]`` for one id.
    """
    if isinstance(id_map, np.ndarray):
        ids = id_map.astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() > MAX_SEGMENT_ID):
            raise ValueError(f"id2rgb: ids must be in 0..{MAX_SEGMENT_ID}, got {ids.min()}..{ids.max()}")
        return np.stack([ids % 256, ids // 256 % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)
    i = int(id_map)
    if not 0 <= i <= MAX_SEGMENT_ID:
        raise ValueError(f"id2rgb: id must be in 0..{MAX_SEGMENT_ID}, got {i}")
    return [i % 256, i // 256 % 256, i // (256 * 256)]


def read_png(data: bytes) -> np.ndarray:
    """A panoptic PNG's bytes → (H, W) int64 segment ids.

    Raises:
        ValueError: the bytes are not a readable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = np.asarray(img.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
        raise ValueError(f"panoptic PNG: cannot decode ({type(e).__name__}: {e})") from None
    return rgb2id(rgb)


def write_png(id_map: np.ndarray) -> bytes:
    """(H, W) segment ids → the bytes of COCO's panoptic PNG."""
    buf = io.BytesIO()
    Image.fromarray(id2rgb(id_map), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def annotation_entry(image_id: int, file_name: str, segments: list[dict]) -> dict:
    """COCO's panoptic annotation entry of one image: its PNG's ``file_name`` and ``segments_info``
    (each segment's ``id``, ``category_id``, ``iscrowd``, ``bbox``, ``area``; other keys dropped)."""
    info = [{k: s[k] for k in ("id", "category_id", "iscrowd", "bbox", "area")} for s in segments]
    return {"image_id": int(image_id), "file_name": file_name, "segments_info": info}


def segment_bbox(mask: np.ndarray) -> list[int]:
    """[x, y, w, h] of a non-empty bool mask, integers, as panopticapi's converters write it."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
