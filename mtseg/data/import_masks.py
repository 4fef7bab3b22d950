"""Label-mask PNGs (one class value per pixel) → a COCO panoptic split (``mtseg data import-masks``).

Most teams' own data, CamVid and Cityscapes arrive as an image plus a single-channel PNG of
label values. :func:`import_masks` pairs them by file stem and writes COCO's panoptic layout,
which ``mtseg data shard --annotations panoptic`` reads like COCO's own::

    <out>/<split>/<image file>                          the image, copied byte for byte
    <out>/annotations/panoptic_<split>/<stem>.png       segment ids as RGB (id = R + 256·G + 256²·B, 0 = void)
    <out>/annotations/panoptic_<split>.json             images, segments_info, categories (isthing, color)

A ``classes.yaml`` (schema: :func:`parse_classes`) names every label value and says whether it is a
thing or stuff; the category id is the label value itself, so predictions map back to the
values the masks hold.

* **Segments.** Each stuff class present in an image is one segment (all its pixels, even
  disconnected ones). Each 8-connected component of a thing class is one segment.
  **Limit:** a label mask holds classes, not instances, so touching instances of one thing
  class (two cars side by side, diagonal contact included) become a single segment; data
  with instance ids needs its own converter. Ignore values are void (segment id 0).
* **Streaming.** One image at a time is read, converted and written; only the JSON (small)
  is built in memory.
* **Atomic.** Every file is written whole (:func:`mtseg.storage.write_bytes`); an earlier
  run's JSON is removed before the first write and the new one is written last, so its
  presence means the split is complete. A re-run rewrites; files it no longer lists are left.
* **Never silent.** An image without a mask, a mask without an image, a size mismatch, an
  unreadable image or mask, or a label value that ``classes.yaml`` does not know is skipped,
  counted per reason and named in one ``skip <file>: <reason> (<detail>)`` line; more than
  ``max_bad_fraction`` of the stems considered fails the run.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import posixpath
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml
from PIL import Image
from scipy import ndimage

from mtseg import storage
from mtseg.data import coco_panoptic
from mtseg.errors import MtsegError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MASK_EXTENSIONS = (".png",)
# Image formats copied as they are: what the training decoder (torchvision) reads. MPO is how
# PIL names the JPEGs many cameras write (a JPEG with a second, preview frame).
_IMAGE_FORMATS = ("JPEG", "MPO", "PNG")
# Single-channel PNG modes whose pixel values are the labels (a palette image's are its indices).
_MASK_MODES = ("1", "L", "P", "I;16", "I;16B", "I;16L", "I")
# 8-connectivity: pixels touching at a corner belong to one component.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# Category ids are stored as int32 by the shards.
_MAX_LABEL = 2**31 - 1
_CLASS_KEYS = ("name", "supercategory", "isthing", "color")
_PROGRESS_EVERY = 1000

# Why a stem is skipped: the keys of the summary's "skipped" counts and of every skip line.
MISSING_MASK = "missing_mask"
MISSING_IMAGE = "missing_image"
DUPLICATE_STEM = "duplicate_stem"
UNREADABLE_IMAGE = "unreadable_image"
UNREADABLE_MASK = "unreadable_mask"
SIZE_MISMATCH = "size_mismatch"
UNKNOWN_LABEL = "unknown_label"


class ImportMasksError(MtsegError, ValueError):
    """The import cannot proceed (bad arguments, a bad classes.yaml, too many bad pairs); one line."""


@dataclass(frozen=True)
class MaskClass:
    """One label value of the masks: a COCO panoptic category whose id is the value."""

    value: int
    name: str
    supercategory: str
    isthing: bool
    color: tuple[int, int, int] | None = None

    def category(self) -> dict:
        """The COCO panoptic ``categories`` entry (``color`` only when given)."""
        entry: dict[str, Any] = {
            "id": self.value,
            "name": self.name,
            "supercategory": self.supercategory,
            "isthing": int(self.isthing),
        }
        if self.color is not None:
            entry["color"] = list(self.color)
        return entry


@dataclass(frozen=True)
class LabelSpec:
    """What ``classes.yaml`` says: the classes by label value and the void (ignore) values."""

    classes: dict[int, MaskClass]
    ignore: frozenset[int]

    def categories(self) -> list[dict]:
        """COCO panoptic ``categories``, sorted by id."""
        return [self.classes[v].category() for v in sorted(self.classes)]


# ----------------------------------------------------------------------------- classes.yaml


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # '<<' may override on purpose
            continue
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (list, dict)):  # unhashable: construct_mapping reports it
            continue
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_label(value: Any) -> bool:
    return _is_int(value) and 0 <= value <= _MAX_LABEL


def parse_classes(text: str | bytes, where: str = "classes.yaml") -> LabelSpec:
    """Parse and validate a ``classes.yaml``.

    The schema::

        ignore: [255]                 # optional: label value(s) that are void, one int or a list
        classes:                      # required: every other label value the masks hold
          0: {name: sky, supercategory: background, isthing: false, color: [128, 128, 128]}
          8: {name: car, supercategory: vehicle, isthing: true}

    Keys of ``classes`` are label values (integers 0..2³¹-1); ``name`` (unique) and ``isthing``
    (true/false) are required; ``supercategory`` defaults to the name; ``color`` is optional
    ([r, g, b], integers 0..255). Unknown keys are refused, so a typo cannot pass unnoticed.

    Args:
        text: the file's contents.
        where: the file's name or URI, for the messages.

    Returns:
        The classes and ignore values.

    Raises:
        ImportMasksError: one line naming ``where`` and the bad entry.
    """
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ImportMasksError(f"{where}: not valid YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        raise ImportMasksError(f"{where}: expected a mapping with 'classes' (and optionally 'ignore'), got {type(data).__name__}")
    unknown = sorted(map(str, set(data) - {"classes", "ignore"}))
    if unknown:
        raise ImportMasksError(f"{where}: unknown top-level key(s) {', '.join(unknown)} (allowed: classes, ignore)")

    ignore_raw = data.get("ignore")
    ignore_list = [] if ignore_raw is None else ignore_raw if isinstance(ignore_raw, list) else [ignore_raw]
    for value in ignore_list:
        if not _is_label(value):
            raise ImportMasksError(f"{where}: ignore: {value!r} is not a label value (an integer 0..{_MAX_LABEL})")
    ignore = frozenset(ignore_list)

    raw_classes = data.get("classes")
    if not isinstance(raw_classes, dict) or not raw_classes:
        raise ImportMasksError(f"{where}: classes: must be a non-empty mapping of label value -> {{name, isthing, ...}}")
    classes: dict[int, MaskClass] = {}
    names: dict[str, int] = {}
    for value, entry in raw_classes.items():
        classes[value] = _parse_class(value, entry, where, ignore)
        name = classes[value].name
        if name in names:
            raise ImportMasksError(f"{where}: classes[{value}]: name {name!r} is also the name of classes[{names[name]}]")
        names[name] = value
    return LabelSpec(classes=classes, ignore=ignore)


def _parse_class(value: Any, entry: Any, where: str, ignore: frozenset[int]) -> MaskClass:
    if not _is_label(value):
        raise ImportMasksError(f"{where}: classes: key {value!r} is not a label value (an integer 0..{_MAX_LABEL})")
    at = f"{where}: classes[{value}]"
    if value in ignore:
        raise ImportMasksError(f"{at}: {value} is also an ignore value (a value is a class or void, not both)")
    if not isinstance(entry, dict):
        raise ImportMasksError(f"{at}: expected a mapping like {{name: car, isthing: true}}, got {entry!r}")
    unknown = sorted(map(str, set(entry) - set(_CLASS_KEYS)))
    if unknown:
        raise ImportMasksError(f"{at}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(_CLASS_KEYS)})")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ImportMasksError(
            f"{at}: missing 'name' (a non-empty string)" if name is None else f"{at}: name {name!r} is not a non-empty string"
        )
    supercategory = entry.get("supercategory", name)
    if not isinstance(supercategory, str) or not supercategory.strip():
        raise ImportMasksError(f"{at}: supercategory {supercategory!r} is not a non-empty string")
    if "isthing" not in entry:
        raise ImportMasksError(f"{at}: missing 'isthing' (true for countable objects, false for stuff)")
    isthing = entry["isthing"]
    if not isinstance(isthing, bool):
        raise ImportMasksError(f"{at}: isthing {isthing!r} is not true or false")
    color = entry.get("color")
    if color is not None and not (
        isinstance(color, list) and len(color) == 3 and all(_is_int(c) and 0 <= c <= 255 for c in color)
    ):
        raise ImportMasksError(f"{at}: color {color!r} is not [r, g, b] with integers 0..255")
    return MaskClass(
        value=value, name=name, supercategory=supercategory, isthing=isthing, color=tuple(color) if color is not None else None
    )


def load_classes(uri: str) -> LabelSpec:
    """Read and validate ``classes.yaml`` from a local path or ``s3://`` (see :func:`parse_classes`).

    Raises:
        ImportMasksError: the file is invalid (one line naming it and the bad entry).
        mtseg.storage.StorageError: it cannot be read.
    """
    return parse_classes(storage.read_bytes(uri), where=uri)


# ----------------------------------------------------------------------------- one image


def _read_image(data: bytes) -> tuple[int, int]:
    """(height, width) of an image that decodes whole; ValueError with the reason otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # the whole decode: a truncated file fails here, not in training
            fmt, (width, height) = img.format, img.size
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
        raise ValueError(f"cannot decode ({type(e).__name__}: {e})") from None
    if fmt not in _IMAGE_FORMATS:
        raise ValueError(f"a {fmt} file, not JPEG or PNG")
    return height, width


def _read_mask(data: bytes) -> np.ndarray:
    """(H, W) label values of a single-channel PNG; ValueError with the reason otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            fmt, mode = img.format, img.mode
            labels = np.asarray(img) if mode in _MASK_MODES else None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
        raise ValueError(f"cannot decode ({type(e).__name__}: {e})") from None
    if fmt != "PNG":
        # A lossy format would have changed label values at every edge.
        raise ValueError(f"a {fmt} file, not PNG")
    if labels is None:
        why = "an RGB mask" if mode.startswith("RGB") else f"mode {mode}"
        raise ValueError(f"{why}: label masks are single-channel PNGs of label values (8-bit L or P, 16-bit I;16)")
    return labels.astype(np.int64)


def _segments(values: np.ndarray, classes: np.ndarray, spec: LabelSpec) -> tuple[np.ndarray, list[dict]]:
    """An image's labels → (H, W) segment ids (0 = void) and its ``segments_info``.

    Ids are 1..N: classes in ascending value, a thing's components in raster order of their
    first pixel (``scipy.ndimage.label``'s order).

    Args:
        values: the label values present, ascending, every one known to ``spec``.
        classes: (H, W) index into ``values`` of each pixel (``np.unique``'s inverse).
    """
    ids = np.zeros(classes.shape, dtype=np.int64)
    segments: list[dict] = []
    # Each class is handled inside its own bounding box: an image with many small classes
    # costs a few passes over it, not one per class.
    for k, (value, box) in enumerate(zip(values.tolist(), ndimage.find_objects(classes + 1))):
        if value in spec.ignore:
            continue
        region, first = classes[box] == k, len(segments) + 1
        if spec.classes[value].isthing:
            components, count = ndimage.label(region, structure=_EIGHT_CONNECTED)
            ids[box][region] = components[region] + (first - 1)
        else:
            ids[box][region], count = first, 1
        segments.extend({"id": first + n, "category_id": value, "iscrowd": 0} for n in range(count))
    if segments:
        # One pass over the image for every box and area, however many segments it holds.
        areas = np.bincount(ids.ravel(), minlength=len(segments) + 1)
        for seg, (rows, cols) in zip(segments, ndimage.find_objects(ids)):
            seg["bbox"] = [cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start]
            seg["area"] = int(areas[seg["id"]])
    return ids, segments


class _Skip(Exception):
    """A pair that is skipped: the file to name, the reason (a summary key) and the detail."""

    def __init__(self, name: str, reason: str, detail: str):
        super().__init__(detail)
        self.name, self.reason, self.detail = name, reason, detail


def _convert(image_uri: str, mask_uri: str, spec: LabelSpec, classes_uri: str) -> tuple[bytes, int, int, np.ndarray, list[dict]]:
    """Read and check one pair: (image bytes, height, width, segment ids, segments_info).

    Raises:
        _Skip: the pair is bad. Storage failures other than a file gone since listing propagate.
    """
    image_name, mask_name = _stem(image_uri)[0], _stem(mask_uri)[0]
    try:
        image_bytes = storage.read_bytes(image_uri)
        height, width = _read_image(image_bytes)
    except (storage.NotFoundError, ValueError) as e:  # NotFound: removed since it was listed
        raise _Skip(image_name, UNREADABLE_IMAGE, str(e)) from None
    try:
        labels = _read_mask(storage.read_bytes(mask_uri))
    except (storage.NotFoundError, ValueError) as e:
        raise _Skip(mask_name, UNREADABLE_MASK, str(e)) from None
    if labels.shape != (height, width):
        raise _Skip(image_name, SIZE_MISMATCH, f"image {width}x{height}, mask {labels.shape[1]}x{labels.shape[0]}")
    values, classes = np.unique(labels, return_inverse=True)
    unknown = [v for v in values.tolist() if v not in spec.classes and v not in spec.ignore]
    if unknown:
        shown = ", ".join(map(str, unknown[:10])) + (", ..." if len(unknown) > 10 else "")
        raise _Skip(mask_name, UNKNOWN_LABEL, f"label value(s) {shown} not in {classes_uri}")
    ids, segments = _segments(values, classes.reshape(height, width), spec)
    return image_bytes, height, width, ids, segments


# ----------------------------------------------------------------------------- pairing


def _stem(uri: str) -> tuple[str, str, str]:
    """``dir/a.b.JPG`` -> (``a.b.JPG``, ``a.b``, ``.jpg``)."""
    name = posixpath.basename(uri)
    stem, ext = posixpath.splitext(name)
    return name, stem, ext.lower()


def _by_stem(uris: list[str], extensions: tuple[str, ...], ignored: list[str]) -> dict[str, list[str]]:
    """Files with one of ``extensions``, grouped by stem; the names of the others go to ``ignored``."""
    groups: dict[str, list[str]] = {}
    for uri in uris:
        name, stem, ext = _stem(uri)
        if ext in extensions:
            groups.setdefault(stem, []).append(uri)
        else:
            ignored.append(name)
    return groups


def _same_place(a: str, b: str) -> bool:
    if storage.is_s3(a) or storage.is_s3(b):
        return storage.check_uri(a) == storage.check_uri(b)
    return os.path.realpath(storage.resolve(a)[1]) == os.path.realpath(storage.resolve(b)[1])


def _list_dir(uri: str, what: str, extensions: tuple[str, ...]) -> list[str]:
    if not storage.exists(uri):
        raise ImportMasksError(f"{what}: {uri} not found")
    files = storage.list_files(uri)
    if not any(_stem(f)[2] in extensions for f in files):
        sub = " (sub-directories are not searched)" if storage.list_dirs(uri) else ""
        raise ImportMasksError(f"{what}: no {'/'.join(extensions)} files directly under {uri}{sub}")
    return files


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _check_bad_share(split: str, reasons: Counter, considered: int, max_bad_fraction: float, done: bool) -> None:
    # The same message as mtseg.data.shard's check, counted in stems (pairs and orphans).
    bad = sum(reasons.values())
    if bad > max_bad_fraction * considered:
        so_far = "" if done else " so far"
        raise ImportMasksError(
            f"split {split}: {bad} of {considered} image/mask pairs are bad{so_far} ({bad / considered:.1%}), "
            f"more than max_bad_fraction={max_bad_fraction:g}; reasons: {dict(sorted(reasons.items()))}"
        )


# ----------------------------------------------------------------------------- the import


def import_masks(
    images: str,
    masks: str,
    classes: str,
    out: str,
    split: str,
    *,
    max_bad_fraction: float = 0.05,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    log: Callable[[str], None] = _stderr,
) -> dict:
    """Convert images + label-mask PNGs into a COCO panoptic split under ``out``.

    Images (``.jpg``, ``.jpeg``, ``.png``, any case) directly under ``images`` are paired with
    the ``.png`` of the same stem directly under ``masks``; other files are ignored (and named).
    Image ids are 1.. in sorted stem order of the images written.

    Args:
        images, masks: directories, local or ``s3://bucket/prefix``.
        classes: the ``classes.yaml`` (local or ``s3://``), see :func:`parse_classes`.
        out: where the split is written, local or ``s3://bucket/prefix``.
        split: the split's name (``train``, ``val2017``, ...).
        max_bad_fraction: largest tolerated share of skipped stems among all stems found
            (pairs, images without a mask, masks without an image), in [0, 1].
        include, exclude: shell patterns (``fnmatch``) on the file stem: only stems matching one
            of ``include`` (all when empty) and none of ``exclude`` are imported; the others are
            left out before anything is read, and counted (``left_out``). One video sequence
            (``0001TP_*``) can so become a split of its own, a domain the model never saw.
        log: receives one line per skipped or ignored file and a few progress lines.

    Returns:
        A summary: ``split``, ``annotation_file`` and ``counts`` (``considered`` stems,
        ``left_out`` by the patterns, ``images`` written, ``skipped``, ``ignored_files``, ``segments``, ``things``, ``stuff``)
        and ``skipped`` per reason; ``log`` has named every skipped and ignored file.

    Raises:
        ImportMasksError: bad arguments, a bad classes.yaml, nothing to import, or more than
            ``max_bad_fraction`` bad stems.
        mtseg.storage.StorageError: a malformed URI, an unwritable output, or a failing store.
    """
    if not isinstance(split, str) or not split or "/" in split or split in (".", ".."):
        raise ImportMasksError(f"split: must be a plain name like 'train', got {split!r}")
    if isinstance(max_bad_fraction, bool) or not isinstance(max_bad_fraction, (int, float)) or not 0.0 <= max_bad_fraction <= 1.0:
        raise ImportMasksError(f"max_bad_fraction: must be in [0, 1], got {max_bad_fraction!r}")
    # Every location is checked, and the output proven writable, before anything is read or written.
    images, masks, classes, out = (storage.check_uri(u) for u in (images, masks, classes, out))
    storage.check_access(out)
    spec = load_classes(classes)
    if _same_place(images, masks):
        raise ImportMasksError(f"masks: {masks} is the images directory; keep the masks in a directory of their own")
    image_dir = storage.join(out, split)
    png_dir = storage.join(out, "annotations", f"panoptic_{split}")
    json_uri = storage.join(out, "annotations", f"panoptic_{split}.json")
    # No output may land among the inputs, except the images onto themselves: copying an
    # image onto itself changes nothing, so an in-place import (--out above --images) skips the copy.
    for source, flag in ((images, "--images"), (masks, "--masks")):
        for target, what in ((png_dir, "panoptic PNGs"), (image_dir, "images")):
            if _same_place(source, target) and (source, target) != (images, image_dir):
                raise ImportMasksError(
                    f"out: the {what} would be written into {source} ({flag}); choose another --out or --split"
                )
    copy_images = not _same_place(images, image_dir)

    ignored: list[str] = []
    image_groups = _by_stem(_list_dir(images, "images", IMAGE_EXTENSIONS), IMAGE_EXTENSIONS, ignored)
    mask_groups = _by_stem(_list_dir(masks, "masks", MASK_EXTENSIONS), MASK_EXTENSIONS, ignored)
    for name in ignored:
        log(f"skip {name}: ignored (not a {'/'.join(IMAGE_EXTENSIONS)} image or .png mask)")

    reasons: Counter = Counter()

    def skip(name: str, reason: str, detail: str) -> None:
        reasons[reason] += 1
        log(f"skip {name}: {reason} ({detail})")

    found = sorted(set(image_groups) | set(mask_groups))
    stems = [
        stem
        for stem in found
        if (not include or any(fnmatch.fnmatchcase(stem, p) for p in include))
        and not any(fnmatch.fnmatchcase(stem, p) for p in exclude)
    ]
    if found and not stems:
        raise ImportMasksError(f"split {split}: the --include/--exclude patterns leave none of the {len(found)} stem(s)")
    considered = len(stems)
    pairs: list[tuple[str, str, str]] = []
    for stem in stems:
        found_images, found_masks = image_groups.get(stem, []), mask_groups.get(stem, [])
        if len(found_images) > 1 or len(found_masks) > 1:
            names = ", ".join(_stem(u)[0] for u in found_images + found_masks)
            skip(stem, DUPLICATE_STEM, f"{names}: one image and one mask per stem")
        elif not found_masks:
            skip(_stem(found_images[0])[0], MISSING_MASK, f"no {stem}.png under {masks}")
        elif not found_images:
            skip(_stem(found_masks[0])[0], MISSING_IMAGE, f"no {stem}.jpg/.jpeg/.png under {images}")
        else:
            pairs.append((stem, found_images[0], found_masks[0]))
    _check_bad_share(split, reasons, considered, max_bad_fraction, done=False)
    log(f"{split}: {len(pairs)} image/mask pair(s) of {considered} stem(s) -> {out}")

    # From here the output changes: without its JSON it no longer claims to be complete.
    storage.delete(json_uri)
    dataset: dict[str, Any] = {
        "info": {
            "description": f"{split}: label masks imported by mtseg data import-masks",
            "images": storage.redact(images),
            "masks": storage.redact(masks),
            "classes": storage.redact(classes),
        },
        "licenses": [],
        "images": [],
        "annotations": [],
        "categories": spec.categories(),
    }
    counts = Counter()
    for n, (stem, image_uri, mask_uri) in enumerate(pairs, 1):
        try:
            image_bytes, height, width, ids, segments = _convert(image_uri, mask_uri, spec, classes)
        except _Skip as bad:
            skip(bad.name, bad.reason, bad.detail)
            _check_bad_share(split, reasons, considered, max_bad_fraction, done=False)
            continue
        image_name = _stem(image_uri)[0]
        image_id = len(dataset["images"]) + 1
        if copy_images:
            storage.write_bytes(storage.join(image_dir, image_name), image_bytes)
        storage.write_bytes(storage.join(png_dir, f"{stem}.png"), coco_panoptic.write_png(ids))
        dataset["images"].append({"id": image_id, "file_name": image_name, "height": height, "width": width})
        dataset["annotations"].append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments})
        things = sum(spec.classes[s["category_id"]].isthing for s in segments)
        counts.update(segments=len(segments), things=things, stuff=len(segments) - things)
        if n % _PROGRESS_EVERY == 0:
            log(f"{split}: {n} of {len(pairs)} pair(s) done, {len(dataset['images'])} written")

    _check_bad_share(split, reasons, considered, max_bad_fraction, done=True)
    if not dataset["images"]:
        raise ImportMasksError(f"split {split}: no image/mask pair could be imported; reasons: {dict(sorted(reasons.items()))}")
    storage.write_bytes(json_uri, json.dumps(dataset, separators=(",", ":")).encode())
    summary = {
        "split": split,
        "annotation_file": storage.redact(json_uri),
        "counts": {
            "considered": considered,
            "left_out": len(found) - considered,
            "images": len(dataset["images"]),
            "skipped": sum(reasons.values()),
            "ignored_files": len(ignored),
            "segments": counts["segments"],
            "things": counts["things"],
            "stuff": counts["stuff"],
        },
        "skipped": dict(sorted(reasons.items())),
    }
    log(
        f"{split}: {len(dataset['images'])} image(s), {counts['segments']} segment(s) "
        f"({counts['things']} things, {counts['stuff']} stuff), {sum(reasons.values())} skipped -> {json_uri}"
    )
    return summary


__all__ = ["ImportMasksError", "LabelSpec", "MaskClass", "import_masks", "load_classes", "parse_classes"]
