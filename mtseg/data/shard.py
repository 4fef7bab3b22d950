"""COCO (images + instances or panoptic annotations, local or ``s3://``) → parquet shards + ``manifest.json``.

One row per image (:data:`SHARD_SCHEMA`): the image file's bytes and its annotations with
every segmentation as compressed RLE, so readers decode every mask the same way.

* **Two annotation formats.** ``instances`` reads ``annotations/instances_<split>.json``
  (things only; unannotated pixels are background). ``panoptic`` reads
  ``annotations/panoptic_<split>.json`` and its PNGs (:mod:`mtseg.data.coco_panoptic`):
  every segment, thing or stuff, becomes one annotation row, and the manifest's categories
  keep ``isthing`` (so the label space is panoptic: unlabelled pixels are void). An image
  whose PNG is missing, unreadable, of another size, or disagrees with its ``segments_info``
  (a listed segment absent from the PNG or the reverse, an unknown category) is skipped whole.

* **Atomic.** Every object is written whole (:func:`mtseg.storage.write_bytes`); the manifest
  (:mod:`mtseg.data.manifest`) goes last, so its presence means the split is complete.
* **Resumable.** Shard boundaries are fixed; a sidecar per shard (``_progress/``, kept out of
  parquet discovery by the ``_``) lets a re-run skip every shard already complete for this input.
* **Readable later.** Every image is decoded with the decoder training uses; a format it does
  not read (BMP, TIFF, ...) is converted once to a lossless PNG.
* **Parallel.** ``executor="ray"`` builds each shard as a Ray task (the annotation file is
  parsed once here; a task gets only its shard's entries) with the same bytes and the same
  resume; ``mtseg submit prepare`` runs that way on the cluster's cores.
* **Never silent.** Bad input is skipped, counted per reason and listed in the manifest; more
  than ``max_bad_fraction`` bad images fails the run. Storage failures stop it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mtseg import storage
from mtseg.data import coco_panoptic
from mtseg.data.categories import CategoryIndex
from mtseg.data.manifest import SCHEMA_VERSION, write_manifest
from mtseg.data.transforms import prepare_image
from mtseg.errors import MtsegError

SHARD_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64()),
        pa.field("file_name", pa.string()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("image", pa.binary()),
        pa.field(
            "annotations",
            pa.list_(
                pa.struct(
                    [
                        pa.field("id", pa.int64()),
                        pa.field("category_id", pa.int32()),
                        pa.field("iscrowd", pa.int8()),
                        pa.field("bbox", pa.list_(pa.float64())),
                        pa.field("area", pa.float64()),
                        pa.field("segmentation_size", pa.list_(pa.int32())),
                        pa.field("segmentation_counts", pa.binary()),
                    ]
                )
            ),
        ),
    ],
    metadata={"mtseg.schema_version": str(SCHEMA_VERSION)},
)
"""Parquet schema of a shard row (the data contract shared with the Ray Data pipeline)."""

# Small row groups let a reader stream a shard a few dozen images at a time.
ROW_GROUP_SIZE = 64
PROGRESS_DIR = "_progress"
# Bumped when what a shard stores of an image changes (2: checked with the training decoder,
# other formats converted to PNG), so that resuming over older shards rewrites them.
IMAGE_RULES_VERSION = 2
# Enough examples to find the bad files, bounded so a badly broken dataset keeps a small manifest.
MAX_DETAILS = 200
_DETAILS_PER_SHARD = 50
EXECUTORS = ("local", "ray")
ANNOTATION_FORMATS = ("instances", "panoptic")
# A panoptic segment's annotation id is image_id x this + its rank in the image (1-based).
PANOPTIC_IDS_PER_IMAGE = 1 << 16


class ShardError(MtsegError, ValueError):
    """Sharding cannot proceed (unusable annotation file, too many bad images); one line, names the split."""


@dataclass
class _Tally:
    """What was skipped, and why, in one shard (or in the annotation file as a whole)."""

    images: Counter = field(default_factory=Counter)
    annotations: Counter = field(default_factory=Counter)
    details: list = field(default_factory=list)
    #: images kept after conversion to PNG, per source format (not skipped: counted apart)
    converted: Counter = field(default_factory=Counter)

    def image(self, reason: str, entry: Any, detail: str = "") -> None:
        self.images[reason] += 1
        self._detail(
            {
                "kind": "image",
                "reason": reason,
                "image_id": _get(entry, "id"),
                "file_name": _get(entry, "file_name"),
                "detail": detail,
            }
        )

    def annotation(self, reason: str, ann: Any, detail: str = "") -> None:
        self.annotations[reason] += 1
        self._detail(
            {
                "kind": "annotation",
                "reason": reason,
                "annotation_id": _get(ann, "id"),
                "image_id": _get(ann, "image_id"),
                "detail": detail,
            }
        )

    def _detail(self, item: dict) -> None:
        if len(self.details) < _DETAILS_PER_SHARD:
            self.details.append({k: v for k, v in item.items() if v not in (None, "")})

    def merge(self, other: dict) -> None:
        self.images.update(other.get("images", {}))
        self.annotations.update(other.get("annotations", {}))
        self.details.extend(other.get("details", []))

    def to_dict(self, limit: int = _DETAILS_PER_SHARD) -> dict:
        return {
            "images": dict(sorted(self.images.items())),
            "annotations": dict(sorted(self.annotations.items())),
            "details": self.details[:limit],
        }


def _get(obj: Any, key: str) -> Any:
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None


# ----------------------------------------------------------------------------- annotation file


def _load_coco(raw: bytes, where: str, tally: _Tally, panoptic: bool = False) -> tuple[COCO, list[dict], list[int]]:
    """Parse, clean and index the instances JSON: (coco, categories by id, valid image ids sorted).

    With ``panoptic``, the file is a panoptic one: categories must say ``isthing`` and each
    image's one ``annotations`` entry (PNG ``file_name`` and ``segments_info``) is indexed as
    its only annotation. Malformed or duplicate entries are counted in ``tally`` and left out
    of the index.
    """
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ShardError(f"{where}: not a COCO instances file (no 'images' list)")
    categories = data.get("categories")
    if not isinstance(categories, list) or not categories:
        raise ShardError(f"{where}: no 'categories' (a COCO instances file lists its categories)")
    cat_ids: set[int] = set()
    clean_cats = []
    for cat in categories:
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise ShardError(f"{where}: category entry {cat!r} needs an integer 'id' and a 'name'")
        if cat["id"] in cat_ids:
            raise ShardError(f"{where}: duplicate category id {cat['id']}")
        cat_ids.add(cat["id"])
        clean = {"id": cat["id"], "name": cat["name"], "supercategory": str(cat.get("supercategory") or cat["name"])}
        if panoptic:
            if cat.get("isthing") not in (0, 1):
                raise ShardError(
                    f"{where}: category {cat['id']} needs 'isthing' 0 or 1 (a panoptic file says it for every category)"
                )
            clean["isthing"] = int(cat["isthing"])
        if "color" in cat:
            clean["color"] = cat["color"]
        clean_cats.append(clean)
    clean_cats.sort(key=lambda c: c["id"])
    try:  # the same checks as every reader of the manifest: fail here, not in training
        CategoryIndex.from_categories(clean_cats)
    except ValueError as e:
        raise ShardError(f"{where}: {e}") from None

    images: dict[int, dict] = {}
    for entry in data["images"]:
        problem = _image_entry_problem(entry)
        if problem:
            tally.image("malformed_entry", entry, problem)
        elif entry["id"] in images:
            tally.image("duplicate_image_id", entry)
        else:
            images[entry["id"]] = entry

    annotations = []
    raw_anns = data.get("annotations", [])  # image_info files (COCO test) have none
    if not isinstance(raw_anns, list):
        raise ShardError(f"{where}: 'annotations' must be a list")
    if panoptic:
        return _index_panoptic(raw_anns, images, clean_cats, tally)
    for ann in raw_anns:
        if not isinstance(ann, dict) or not _is_int(ann.get("image_id")) or not _is_int(ann.get("id")):
            tally.annotation("malformed_annotation", ann, "needs integer 'id' and 'image_id'")
        elif ann["image_id"] not in images:
            tally.annotation("unknown_image", ann)
        elif not _is_int(ann.get("category_id")) or ann["category_id"] not in cat_ids:
            tally.annotation("unknown_category", ann, f"category_id {ann.get('category_id')!r}")
        else:
            annotations.append(ann)

    coco = COCO()
    coco.dataset = {"images": list(images.values()), "annotations": annotations, "categories": clean_cats}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco, clean_cats, sorted(images)


def _index_panoptic(raw_anns: list, images: dict[int, dict], categories: list[dict], tally: _Tally):
    """The panoptic file's per-image entries indexed as each image's one annotation.

    The segments are checked against the PNG when the image's shard is built; here only the
    entry's shape. An image without a (valid) entry is skipped.
    """
    coco = COCO()
    by_image: dict[int, dict] = {}
    for n, ann in enumerate(raw_anns):
        name = ann.get("file_name") if isinstance(ann, dict) else None
        if not isinstance(ann, dict) or not _is_int(ann.get("image_id")) or not isinstance(ann.get("segments_info"), list):
            tally.annotation("malformed_annotation", ann, "needs an integer 'image_id' and a 'segments_info' list")
        elif not isinstance(name, str) or not name or name.startswith("/") or ".." in name.split("/"):
            tally.annotation("malformed_annotation", ann, f"bad PNG file_name {name!r}")
        elif ann["image_id"] not in images:
            tally.annotation("unknown_image", ann)
        elif ann["image_id"] in by_image:
            tally.annotation("duplicate_annotation", ann, "a second panoptic entry for this image")
        else:
            by_image[ann["image_id"]] = {**ann, "id": n}
    for image_id in [i for i in images if i not in by_image]:
        tally.image("missing_panoptic_annotation", images.pop(image_id), "no entry in the panoptic JSON's 'annotations'")
    coco.dataset = {"images": list(images.values()), "annotations": [], "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    for image_id, ann in by_image.items():
        coco.imgToAnns[image_id] = [ann]
    coco.dataset["annotations"] = list(by_image.values())
    return coco, categories, sorted(images)


def _panoptic_rows(png: bytes | None, entry: dict, ann: dict, categories: dict[int, dict]) -> tuple[list[dict] | None, str, str]:
    """An image's segments from its panoptic PNG and ``segments_info``: (rows, "", "") or (None, reason, detail)."""
    if png is None:
        return None, "missing_panoptic_png", ann["file_name"]
    try:
        ids = coco_panoptic.read_png(png)
    except ValueError as e:
        return None, "unreadable_panoptic_png", f"{ann['file_name']}: {e}"
    if ids.shape != (entry["height"], entry["width"]):
        return (
            None,
            "panoptic_size_mismatch",
            f"PNG is {ids.shape[1]}x{ids.shape[0]}, image is {entry['width']}x{entry['height']}",
        )
    listed: dict[int, dict] = {}
    for seg in ann["segments_info"]:
        if not isinstance(seg, dict) or not _is_int(seg.get("id")) or seg["id"] == coco_panoptic.VOID or seg["id"] in listed:
            return None, "malformed_segment", f"segment {seg!r}: needs a unique nonzero integer 'id'"
        if seg.get("category_id") not in categories:
            return None, "unknown_category", f"segment {seg['id']}: category_id {seg.get('category_id')!r}"
        if seg.get("iscrowd", 0) not in (0, 1):
            return None, "malformed_segment", f"segment {seg['id']}: iscrowd {seg.get('iscrowd')!r}"
        listed[seg["id"]] = seg
    present, counts = np.unique(ids, return_counts=True)
    area = dict(zip(present.tolist(), counts.tolist()))
    area.pop(coco_panoptic.VOID, None)
    if set(listed) - set(area):
        return None, "segment_not_in_png", f"segments {sorted(set(listed) - set(area))[:5]} are listed but absent from the PNG"
    if set(area) - set(listed):
        return None, "png_segment_not_listed", f"PNG ids {sorted(set(area) - set(listed))[:5]} are not in segments_info"
    if len(listed) >= PANOPTIC_IDS_PER_IMAGE:
        return None, "malformed_segment", f"{len(listed)} segments, more than {PANOPTIC_IDS_PER_IMAGE - 1}"
    rows = []
    for k, seg_id in enumerate(sorted(listed)):
        seg, mask = listed[seg_id], ids == seg_id
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rows.append(
            {
                # A PNG's segment ids are unique only within its image; an annotation id must be
                # unique in the split (COCOeval keys matches by it), and the PNG's work is done.
                "id": entry["id"] * PANOPTIC_IDS_PER_IMAGE + k + 1,
                "category_id": seg["category_id"],
                "iscrowd": int(seg.get("iscrowd", 0)),
                # The PNG is the truth: the JSON's bbox and area are derived, and may be stale.
                "bbox": [float(v) for v in coco_panoptic.segment_bbox(mask)],
                "area": float(area[seg_id]),
                "segmentation_size": [entry["height"], entry["width"]],
                "segmentation_counts": bytes(rle["counts"]),
            }
        )
    return rows, "", ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _image_entry_problem(entry: Any) -> str:
    if not isinstance(entry, dict):
        return "not an object"
    if not _is_int(entry.get("id")):
        return "needs an integer 'id'"
    name = entry.get("file_name")
    if not isinstance(name, str) or not name or name.startswith("/") or ".." in name.split("/"):
        return f"bad file_name {name!r}"
    for key in ("height", "width"):
        if not _is_int(entry.get(key)) or entry[key] <= 0:
            return f"needs a positive integer '{key}'"
    return ""


# ----------------------------------------------------------------------------- segmentations


def _rle_string_sum(counts: bytes) -> int | None:
    """Sum of the run lengths of a compressed RLE string, or None if it is malformed.

    Checked before pycocotools touches the string: its decoder trusts the runs and would write
    past the mask when they add up to more than height x width.
    """
    total, runs, pos, n = 0, [], 0, len(counts)
    while pos < n:
        x, k, more = 0, 0, True
        while more:
            if pos >= n:
                return None
            c = counts[pos] - 48
            if c < 0 or c > 63:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            pos += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return None
        runs.append(x)
        total += x
    return total


def _shoelace(poly: list) -> float:
    xs, ys = poly[0::2], poly[1::2]
    return 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))


def _to_rle(segm: Any, height: int, width: int, tally: _Tally, ann: dict) -> dict | None:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) → compressed RLE, or None (counted)."""
    if isinstance(segm, list):
        parts = [segm] if segm and all(isinstance(v, (int, float)) for v in segm) else segm  # flat single polygon
        valid = []
        for poly in parts:
            if not isinstance(poly, list) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in poly):
                tally.annotation("malformed_polygon", ann)
                return None
            # < 3 points or zero area: also guards pycocotools reading a 4-number "polygon" as a box.
            if len(poly) >= 6 and len(poly) % 2 == 0 and _shoelace(poly) > 0:
                valid.append([float(v) for v in poly])
        if not valid:
            tally.annotation("degenerate_polygon", ann, f"{len(parts)} part(s), none with 3+ points and nonzero area")
            return None
        if len(valid) < len(parts):
            tally.annotations["degenerate_polygon_part_dropped"] += len(parts) - len(valid)
        return mask_utils.merge(mask_utils.frPyObjects(valid, height, width))
    if isinstance(segm, dict) and "counts" in segm:
        size = segm.get("size")
        if not isinstance(size, list) or [*size] != [height, width]:
            tally.annotation("invalid_rle", ann, f"size {size!r} != image [{height}, {width}]")
            return None
        counts = segm["counts"]
        if isinstance(counts, list):  # uncompressed, as COCO stores crowd regions
            if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
                tally.annotation("invalid_rle", ann, "uncompressed counts must be non-negative and sum to height*width")
                return None
            return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        if isinstance(counts, str):
            counts = counts.encode("ascii", errors="replace")
        if isinstance(counts, bytes) and _rle_string_sum(counts) == height * width:
            return {"size": [height, width], "counts": counts}
        tally.annotation("invalid_rle", ann, "compressed counts do not decode to height*width pixels")
        return None
    tally.annotation("missing_segmentation", ann)
    return None


def _annotation_rows(anns: list[dict], entry: dict, tally: _Tally) -> list[dict]:
    height, width = entry["height"], entry["width"]
    rows = []
    for ann in sorted(anns, key=lambda a: a["id"]):
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1):
            tally.annotation("malformed_annotation", ann, f"iscrowd {iscrowd!r}")
            continue
        rle = _to_rle(ann.get("segmentation"), height, width, tally, ann)
        if rle is None:
            continue
        mask_area = float(mask_utils.area(rle))
        if mask_area <= 0:
            tally.annotation("empty_mask", ann)
            continue
        bbox = ann.get("bbox")
        if not (
            isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
        ):
            bbox = mask_utils.toBbox(rle).tolist()
        area = ann.get("area")
        # COCOeval buckets objects by the annotation's own area, so keep it when it is usable.
        area = float(area) if isinstance(area, (int, float)) and math.isfinite(area) and area > 0 else mask_area
        rows.append(
            {
                "id": ann["id"],
                "category_id": ann["category_id"],
                "iscrowd": int(iscrowd),
                "bbox": [float(v) for v in bbox],
                "area": area,
                "segmentation_size": [height, width],
                "segmentation_counts": bytes(rle["counts"]),
            }
        )
    return rows


# ----------------------------------------------------------------------------- images


def _read_image(image_uri: str, entry: dict) -> tuple[bytes | None, str, str]:
    """(bytes the training decoder reads, "", converted-from format or "") for a good image,
    or (None, reason, detail). Storage outages raise.

    Decoded whole here (:func:`mtseg.data.transforms.prepare_image`) so a shard never holds an
    image that fails later.
    """
    try:
        data = storage.read_bytes(image_uri)
    except storage.NotFoundError:
        return None, "missing_file", ""
    try:
        data, pixels, converted = prepare_image(data)
    except ValueError as e:
        text = str(e).removeprefix("image: ")
        return None, ("truncated_image" if "truncated" in text.lower() else "corrupt_image"), text
    height, width = int(pixels.shape[1]), int(pixels.shape[2])
    if (width, height) != (entry["width"], entry["height"]):
        return None, "size_mismatch", f"file is {width}x{height}, JSON says {entry['width']}x{entry['height']}"
    return data, "", converted


# ----------------------------------------------------------------------------- shards


_SHARD_FILE = re.compile(r"shard-(\d{5})\.(parquet|json)$")


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def _sidecar_uri(split_uri: str, index: int) -> str:
    return storage.join(split_uri, PROGRESS_DIR, f"shard-{index:05d}.json")


def _remove_stale(split_uri: str, shard_files: set[str], num_chunks: int, log: Callable[[str], None]) -> None:
    """Delete shards and sidecars of an earlier run (another ``images_per_shard``) this run does not produce.

    Left in place, anything that globs the directory would read images twice. Sidecars of the
    ``num_chunks`` slots of this run are kept, even of slots with no shard file (all bad).
    """
    for uri in storage.list_files(split_uri) + storage.list_files(storage.join(split_uri, PROGRESS_DIR)):
        name = uri.rsplit("/", 1)[-1]
        match = _SHARD_FILE.match(name)
        if not match:
            continue
        stale = name not in shard_files if match.group(2) == "parquet" else int(match.group(1)) >= num_chunks
        if stale:
            storage.delete(uri)
            log(f"removed stale {name} from an earlier run")


def _fingerprint(annotations_sha256: str, image_ids: list[int]) -> str:
    # Same annotation file + same images in this shard + same image rules ⇒ same shard;
    # anything else is rewritten.
    text = f"v{SCHEMA_VERSION}|i{IMAGE_RULES_VERSION}|{annotations_sha256}|" + ",".join(map(str, image_ids))
    return hashlib.sha256(text.encode()).hexdigest()


def _completed(split_uri: str, index: int, fingerprint: str) -> dict | None:
    """The sidecar of a shard that is already complete for this input, else None."""
    sidecar_uri = _sidecar_uri(split_uri, index)
    try:
        if not storage.exists(sidecar_uri):
            return None
        sidecar = json.loads(storage.read_bytes(sidecar_uri))
    except (storage.StorageError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(sidecar, dict) or sidecar.get("fingerprint") != fingerprint:
        return None
    if sidecar.get("rows", 0) == 0:
        return sidecar
    fs, path = storage.resolve(storage.join(split_uri, _shard_name(index)))
    try:
        info = fs.get_file_info(path)
        if info.size != sidecar.get("bytes"):
            return None
        with fs.open_input_file(path) as f:  # footer only; the images are not read again
            if pq.read_metadata(f).num_rows != sidecar.get("rows"):
                return None
    except Exception:  # noqa: BLE001 - missing or unreadable shard: write it again
        return None
    return sidecar


def _write_shard(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP_SIZE)
    return buf.getvalue()


def _read_optional(uri: str) -> bytes | None:
    try:
        return storage.read_bytes(uri)
    except storage.NotFoundError:
        return None


def _build_shard(
    entries: list[dict],
    anns: list[list[dict]],
    coco_root: str,
    split: str,
    workers: int,
    categories: list[dict] | None = None,
) -> tuple[list[dict], _Tally]:
    """The rows of one shard; ``categories`` (the manifest's) means the annotations are panoptic entries."""
    tally = _Tally()
    uris = [storage.join(coco_root, split, *e["file_name"].split("/")) for e in entries]
    # Threads overlap the object-store round trips; a shard's worth of bytes is the memory bound.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_read_image, uris, entries))
        pngs = [None] * len(entries)
        if categories is not None:
            png_dir = storage.join(coco_root, "annotations", f"panoptic_{split}")
            png_uris = [storage.join(png_dir, *a[0]["file_name"].split("/")) for a in anns]
            pngs = list(pool.map(_read_optional, png_uris))
    cats = {c["id"]: c for c in categories or []}
    rows = []
    for entry, image_anns, (data, reason, note), png in zip(entries, anns, results, pngs):
        if data is None:
            tally.image(reason, entry, note)
            continue
        if categories is not None:
            ann_rows, reason, detail = _panoptic_rows(png, entry, image_anns[0], cats)
            if ann_rows is None:
                tally.image(reason, entry, detail)
                continue
        else:
            ann_rows = _annotation_rows(image_anns, entry, tally)
        if note:
            tally.converted[note] += 1
        rows.append(
            {
                "image_id": entry["id"],
                "file_name": entry["file_name"],
                "height": entry["height"],
                "width": entry["width"],
                "image": data,
                "annotations": ann_rows,
            }
        )
    return rows, tally


def _make_shard(
    split_uri: str,
    index: int,
    fingerprint: str,
    entries: list[dict],
    anns: list[list[dict]],
    coco_root: str,
    split: str,
    workers: int,
    categories: list[dict] | None = None,
) -> dict:
    """Build, write and record one shard; returns its sidecar. Runs in the driver or as a Ray task.

    Takes only its own image entries and their annotations, so a Ray task is sent a shard's
    worth of the annotation file, never the whole of it. ``categories`` is given for a panoptic split.
    """
    rows, tally = _build_shard(entries, anns, coco_root, split, workers, categories)
    sidecar = {
        "fingerprint": fingerprint,
        "path": _shard_name(index) if rows else None,
        "rows": len(rows),
        "bytes": 0,
        "sha256": None,
        "counts": {
            "annotations": sum(len(r["annotations"]) for r in rows),
            "crowd_annotations": sum(a["iscrowd"] for r in rows for a in r["annotations"]),
            "images_without_annotations": sum(not r["annotations"] for r in rows),
        },
        "skipped": tally.to_dict(),
        "converted": dict(sorted(tally.converted.items())),
    }
    if rows:  # a shard whose every image is bad is recorded, not written
        data = _write_shard(rows)
        del rows
        sidecar.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        storage.write_bytes(storage.join(split_uri, _shard_name(index)), data)
    # The sidecar goes after its shard: a crash in between only costs rewriting the shard.
    storage.write_bytes(_sidecar_uri(split_uri, index), json.dumps(sidecar, sort_keys=True).encode())
    return sidecar


@functools.lru_cache(maxsize=1)
def _ray_shard_task():
    import ray

    # One CPU per task; its threads overlap the reads with the decodes of one shard.
    return ray.remote(num_cpus=1)(_make_shard)


def _run_on_ray(jobs: list[tuple], max_in_flight: int | None) -> Iterator[tuple[int, dict]]:
    """(index, sidecar) of each job as its Ray task finishes, at most ``max_in_flight`` running or queued.

    The bound keeps the queued tasks' arguments (image entries, annotations) out of the object
    store until a CPU is near; a job is ``(split_uri, index, fingerprint, entries, anns, ...)``.
    """
    import ray

    if not ray.is_initialized():
        raise ShardError("executor='ray': Ray is not initialised (call mtseg.cluster.init_local_ray or ray.init first)")
    task = _ray_shard_task()
    if max_in_flight is None:
        max_in_flight = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    pending = list(reversed(jobs))
    running: dict = {}
    try:
        while pending or running:
            while pending and len(running) < max_in_flight:
                job = pending.pop()
                running[task.options(name=f"shard-{job[1]:05d}").remote(*job)] = job[1]
            done, _ = ray.wait(list(running), num_returns=1)
            index = running.pop(done[0])
            try:
                sidecar = ray.get(done[0])
            except ray.exceptions.RayTaskError as e:
                # The task's own one-line error (a storage failure), not Ray's traceback around it.
                if isinstance(e.cause, MtsegError):
                    raise e.cause from None
                raise
            yield index, sidecar
    finally:
        # A failure (or a bad share over the limit) stops the rest; what they wrote is whole.
        for ref in running:
            ray.cancel(ref)


def _check_bad_share(split: str, reasons: Counter, listed: int, max_bad_fraction: float) -> None:
    bad = sum(reasons.values())
    if bad > max_bad_fraction * listed:
        raise ShardError(
            f"split {split}: {bad} of {listed} images are bad ({bad / listed:.1%}), more than max_bad_fraction={max_bad_fraction:g}; "
            f"reasons: {dict(sorted(reasons.items()))}"
        )


def shard_coco(
    coco_root: str,
    split: str,
    out_uri: str,
    *,
    images_per_shard: int = 256,
    max_bad_fraction: float = 0.05,
    workers: int = 8,
    executor: str = "local",
    max_in_flight: int | None = None,
    create_bucket: bool = False,
    annotations: str = "instances",
    log: Callable[[str], None] = print,
) -> dict:
    """Shard one COCO split into ``<out_uri>/<split>/shard-NNNNN.parquet`` plus, last, its ``manifest.json``.

    Reads ``<coco_root>/annotations/instances_<split>.json`` (or, for ``annotations="panoptic"``,
    ``panoptic_<split>.json`` and the PNGs in ``annotations/panoptic_<split>/``) and the images
    under ``<coco_root>/<split>/``. Shards already complete for this input are not written again.

    Args:
        coco_root, out_uri: a local directory or ``s3://bucket/prefix``.
        max_bad_fraction: largest tolerated share of bad images among those listed, in [0, 1].
        workers: threads reading and decoding the images of one shard concurrently.
        executor: ``"local"`` builds the shards one after another in this process; ``"ray"``
            builds each as a Ray task (one CPU each, on the Ray this process is connected to),
            with the same shards, sidecars and manifest byte for byte.
        max_in_flight: Ray tasks submitted and not yet finished (default twice the cluster's CPUs).
        create_bucket: create the bucket of an ``s3://`` ``out_uri`` when it does not exist.
        annotations: ``"instances"`` or ``"panoptic"`` (things and stuff, see the module docstring).
        log: receives one progress line per shard.

    Returns:
        The manifest.

    Raises:
        ShardError: bad arguments, an unusable annotation file, or too many bad images.
        mtseg.storage.StorageError: a malformed URI, an output that cannot be written, or the
            store failed.
    """
    if not isinstance(split, str) or not split or "/" in split:
        raise ShardError(f"split: must be a plain name like 'train2017', got {split!r}")
    if not _is_int(images_per_shard) or images_per_shard < 1:
        raise ShardError(f"images_per_shard: must be an integer >= 1, got {images_per_shard!r}")
    if not isinstance(max_bad_fraction, (int, float)) or not 0.0 <= max_bad_fraction <= 1.0:
        raise ShardError(f"max_bad_fraction: must be in [0, 1], got {max_bad_fraction!r}")
    if not _is_int(workers) or workers < 1:
        raise ShardError(f"workers: must be an integer >= 1, got {workers!r}")
    if executor not in EXECUTORS:
        raise ShardError(f"executor: must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if max_in_flight is not None and (not _is_int(max_in_flight) or max_in_flight < 1):
        raise ShardError(f"max_in_flight: must be an integer >= 1, got {max_in_flight!r}")
    if annotations not in ANNOTATION_FORMATS:
        raise ShardError(f"annotations: must be one of {', '.join(ANNOTATION_FORMATS)}, got {annotations!r}")
    panoptic = annotations == "panoptic"
    # Both URIs are checked, and the output proven writable, before anything is read or written.
    coco_root, out_uri = storage.check_uri(coco_root), storage.check_uri(out_uri)
    if create_bucket and storage.is_s3(out_uri):
        storage.ensure_bucket(storage.split_s3(out_uri)[0])
    storage.check_access(out_uri)

    ann_uri = storage.join(coco_root, "annotations", f"{annotations}_{split}.json")
    if not storage.exists(ann_uri):
        raise ShardError(f"split {split}: annotation file {ann_uri} not found")
    raw = storage.read_bytes(ann_uri)
    annotations_sha256 = hashlib.sha256(raw).hexdigest()
    file_tally = _Tally()
    coco, categories, image_ids = _load_coco(raw, ann_uri, file_tally, panoptic=panoptic)
    listed = len(coco.dataset["images"]) + sum(file_tally.images.values())
    annotations_listed = sum(file_tally.annotations.values()) + (
        sum(len(a["segments_info"]) for a in coco.dataset["annotations"]) if panoptic else len(coco.dataset["annotations"])
    )
    del raw
    if listed == 0:
        raise ShardError(f"split {split}: {ann_uri} lists no images")
    _check_bad_share(split, file_tally.images, listed, max_bad_fraction)

    split_uri = storage.join(out_uri, split)
    chunks = [image_ids[i : i + images_per_shard] for i in range(0, len(image_ids), images_per_shard)]
    log(f"{split}: {listed} images listed, {len(chunks)} shard(s) of up to {images_per_shard} -> {split_uri}")

    sidecars: dict[int, dict] = {}
    jobs = []
    for index, chunk in enumerate(chunks):
        fingerprint = _fingerprint(annotations_sha256, chunk)
        sidecar = _completed(split_uri, index, fingerprint)
        if sidecar is not None:
            log(f"{split}: {_shard_name(index)} already complete ({sidecar['rows']} rows), skipped")
            sidecars[index] = sidecar
        else:
            entries = [coco.imgs[i] for i in chunk]
            anns = [coco.imgToAnns.get(i, []) for i in chunk]
            jobs.append(
                (split_uri, index, fingerprint, entries, anns, coco_root, split, workers, categories if panoptic else None)
            )
    del coco
    skipped_so_far = Counter(file_tally.images)
    for sidecar in sidecars.values():
        skipped_so_far.update(sidecar["skipped"]["images"])
    _check_bad_share(split, skipped_so_far, listed, max_bad_fraction)

    done = ((job[1], _make_shard(*job)) for job in jobs) if executor == "local" else _run_on_ray(jobs, max_in_flight)
    for index, sidecar in done:
        sidecars[index] = sidecar
        skipped = sum(sidecar["skipped"]["images"].values())
        converted = sum(sidecar["converted"].values())
        log(
            f"{split}: {_shard_name(index)} written ({sidecar['rows']} rows, {skipped} image(s) skipped, "
            f"{converted} converted to PNG, {sidecar['bytes'] / 1e6:.1f} MB)"
        )
        skipped_so_far.update(sidecar["skipped"]["images"])
        _check_bad_share(split, skipped_so_far, listed, max_bad_fraction)

    # Merged in shard order whatever order the shards finished in: the same manifest either way.
    total = _Tally()
    total.merge(file_tally.to_dict())
    shards, counts = [], Counter()
    for index in range(len(chunks)):
        sidecar = sidecars[index]
        total.merge(sidecar["skipped"])
        total.converted.update(sidecar.get("converted", {}))
        counts.update(sidecar["counts"])
        if sidecar["path"]:
            shards.append({k: sidecar[k] for k in ("path", "rows", "bytes", "sha256")})

    _remove_stale(split_uri, {s["path"] for s in shards}, len(chunks), log)
    image_skips = sum(total.images.values())
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "split": split,
        "annotation_format": annotations,
        "categories": categories,
        "counts": {
            "images_listed": listed,
            "images": sum(s["rows"] for s in shards),
            "images_skipped": image_skips,
            "images_converted": sum(total.converted.values()),
            "images_without_annotations": counts["images_without_annotations"],
            "annotations_listed": annotations_listed,
            "annotations": counts["annotations"],
            "annotations_skipped": sum(v for k, v in total.annotations.items() if not k.endswith("_part_dropped")),
            "crowd_annotations": counts["crowd_annotations"],
            "shards": len(shards),
        },
        "shards": shards,
        "skipped": total.to_dict(limit=MAX_DETAILS),
        "converted": dict(sorted(total.converted.items())),
        "source": {
            "coco_root": storage.redact(str(coco_root)),
            "annotation_file": storage.redact(ann_uri),
            "annotations_sha256": annotations_sha256,
            "images_per_shard": images_per_shard,
            "max_bad_fraction": max_bad_fraction,
        },
    }
    uri = write_manifest(out_uri, split, manifest)
    log(
        f"{split}: {manifest['counts']['images']} images in {len(shards)} shard(s), "
        f"{image_skips} image(s) and {manifest['counts']['annotations_skipped']} annotation(s) skipped -> {uri}"
    )
    return manifest
