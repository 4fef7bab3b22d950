"""The sharded dataset's table of contents: ``<root>/<split>/manifest.json``.

``mtseg data shard`` writes it last, so its presence means the split is ready to read. Keys:

* ``schema_version``: :data:`SCHEMA_VERSION`, bumped when the shard row layout changes;
* ``split``; ``categories``: the COCO categories (``id``, ``name``, ``supercategory``) by id;
* ``counts``: images and annotations listed / written / skipped / converted, crowd, shards;
* ``shards``: ``[{"path": "shard-00000.parquet", "rows", "bytes", "sha256"}]``, relative paths;
* ``skipped``: per-reason counts of skipped images and annotations, with the first examples;
* ``converted``: images converted to PNG, per source format (``{"BMP": 2}``);
* ``source``: COCO root, annotation file and its sha256, ``images_per_shard``.
"""

from __future__ import annotations

import json

from mtseg import storage
from mtseg.errors import MtsegError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

_REQUIRED_KEYS = ("schema_version", "split", "categories", "counts", "shards", "skipped")
_SHARD_KEYS = ("path", "rows", "bytes", "sha256")


class ManifestError(MtsegError, ValueError):
    """A manifest is missing, unreadable or malformed; the message names the file."""


def manifest_uri(root: str, split: str) -> str:
    """URI of the manifest of ``split`` under dataset ``root``."""
    return storage.join(root, split, MANIFEST_NAME)


def validate_manifest(manifest: dict, where: str = "manifest") -> dict:
    """Check a manifest's shape (``where`` names it in errors); return it unchanged.

    Raises:
        ManifestError: a key is missing or has the wrong type, or another schema version.
    """
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ManifestError(f"{where}: missing keys {missing}")
    version = manifest["schema_version"]
    if version != SCHEMA_VERSION:
        raise ManifestError(
            f"{where}: schema_version {version!r} is not supported (this mtseg reads {SCHEMA_VERSION}); re-run `mtseg data shard`"
        )
    categories = manifest["categories"]
    if not isinstance(categories, list) or not categories:
        raise ManifestError(f"{where}: 'categories' must be a non-empty list")
    for cat in categories:
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise ManifestError(f"{where}: every category needs 'id' and 'name', got {cat!r}")
    shards = manifest["shards"]
    if not isinstance(shards, list):
        raise ManifestError(f"{where}: 'shards' must be a list")
    for entry in shards:
        if not isinstance(entry, dict) or any(k not in entry for k in _SHARD_KEYS):
            raise ManifestError(f"{where}: every shard entry needs {list(_SHARD_KEYS)}, got {entry!r}")
        if "/" in entry["path"] or entry["path"].startswith("."):
            # Paths are relative names inside the split directory; anything else could escape it.
            raise ManifestError(f"{where}: shard path {entry['path']!r} must be a plain file name")
    if not isinstance(manifest["counts"], dict) or not isinstance(manifest["skipped"], dict):
        raise ManifestError(f"{where}: 'counts' and 'skipped' must be objects")
    return manifest


def read_manifest(root: str, split: str) -> dict:
    """Load and validate ``<root>/<split>/manifest.json`` (``root`` local or ``s3://``).

    Raises:
        ManifestError: the manifest is missing (never sharded, or not finished), not JSON, or malformed.
        mtseg.storage.StorageError: the store itself failed.
    """
    uri = manifest_uri(root, split)
    if not storage.exists(uri):
        raise ManifestError(
            f"{uri}: no manifest; run `mtseg data shard --split {split}` (a manifest is written only when every shard is complete)"
        )
    try:
        manifest = json.loads(storage.read_bytes(uri))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{uri}: not valid JSON ({e.msg} at line {e.lineno})") from None
    validate_manifest(manifest, uri)
    if manifest["split"] != split:
        raise ManifestError(f"{uri}: manifest is for split {manifest['split']!r}, expected {split!r}")
    return manifest


def write_manifest(root: str, split: str, manifest: dict) -> str:
    """Validate ``manifest`` and write it atomically to ``<root>/<split>/manifest.json``; returns that URI."""
    uri = manifest_uri(root, split)
    validate_manifest(manifest, uri)
    storage.write_bytes(uri, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return uri


def shard_uris(root: str, split: str, manifest: dict) -> list[str]:
    """Full URIs of a manifest's shards (``<root>/<split>/shard-00000.parquet`` ...), in manifest order."""
    return [storage.join(root, split, entry["path"]) for entry in manifest["shards"]]
