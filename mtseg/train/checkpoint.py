"""Training checkpoints: complete or absent.

A checkpoint is a directory holding ``state.pt`` (model, optimiser, scheduler, weighting state,
counters) and ``meta.json`` (counters, metrics, and the SHA-256 of ``state.pt``), plus the
resolved ``config.yaml``. Ray Train uploads the directory file by file, in no fixed order, so a
run killed mid-upload can leave a directory with a truncated ``state.pt`` or no ``meta.json``;
:func:`verify` rejects those, and :func:`latest_valid` walks back to the newest one that passes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
from typing import Any

import torch

from mtseg import storage

STATE_FILE = "state.pt"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
FORMAT_VERSION = 1
_CKPT_DIR = re.compile(r"^checkpoint_")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete or corrupt."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(directory: str, state: dict[str, Any], meta: dict[str, Any], config_yaml: str = "") -> None:
    """Write a checkpoint into a local ``directory`` (which Ray Train then uploads).

    ``meta`` must hold plain JSON values (``epoch``, ``step``, ``epoch_rows``, metrics).
    """
    buf = io.BytesIO()
    torch.save(state, buf)
    blob = buf.getvalue()
    full_meta = {**meta, "format": FORMAT_VERSION, "state_sha256": _sha256(blob), "state_bytes": len(blob)}
    # meta.json is written last locally; on upload its hash is what proves state.pt complete.
    files = [(STATE_FILE, blob), *([(CONFIG_FILE, config_yaml.encode())] if config_yaml else []),
             (META_FILE, json.dumps(full_meta, indent=2, sort_keys=True).encode())]
    path = directory
    try:
        os.makedirs(directory, exist_ok=True)
        for name, data in files:
            path = os.path.join(directory, name)
            with open(path, "wb") as f:
                f.write(data)
    except OSError as e:  # a full disk names the file, the bytes to write and the space free
        raise CheckpointError(storage.describe_error(path, e)) from None


def verify(directory: str) -> dict[str, Any]:
    """Return the meta of a complete checkpoint in a local ``directory``; CheckpointError otherwise."""
    meta_path = os.path.join(directory, META_FILE)
    state_path = os.path.join(directory, STATE_FILE)
    if not os.path.exists(meta_path):
        raise CheckpointError(f"{directory}: no {META_FILE} (incomplete checkpoint)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: unreadable {META_FILE} ({e})") from None
    if not os.path.exists(state_path):
        raise CheckpointError(f"{directory}: no {STATE_FILE} (incomplete checkpoint)")
    with open(state_path, "rb") as f:
        blob = f.read()
    if len(blob) != meta.get("state_bytes") or _sha256(blob) != meta.get("state_sha256"):
        raise CheckpointError(f"{directory}: {STATE_FILE} does not match its hash (partial upload)")
    return meta


def load(directory: str, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify and load a local checkpoint directory: (state, meta).

    ``state.pt`` is checked against ``meta.json``'s SHA-256 first, then unpickled with
    ``weights_only=True``: tensors and plain containers only, so a crafted file (anyone who
    can write to the bucket, or a model from the internet) cannot run code; it is refused.

    Raises:
        CheckpointError: one line naming the file, when it is incomplete, corrupt or holds
            anything but tensors and plain values.
    """
    meta = verify(directory)
    path = os.path.join(directory, STATE_FILE)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        # torch reports a forbidden global as UnpicklingError with a page of advice; the
        # first line names what the file tried to load.
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused to load: not a plain tensor checkpoint ({reason})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: refused to load: expected a dict of training state, got {type(state).__name__}")
    return state, meta


def verify_remote(uri: str) -> dict[str, Any]:
    """:func:`verify` for a checkpoint directory in storage (local or s3://)."""
    meta = json.loads(storage.read_bytes(storage.join(uri, META_FILE)))
    blob = storage.read_bytes(storage.join(uri, STATE_FILE))
    if len(blob) != meta.get("state_bytes") or _sha256(blob) != meta.get("state_sha256"):
        raise CheckpointError(f"{uri}: {STATE_FILE} does not match its hash (partial upload)")
    return meta


def list_checkpoints(run_uri: str) -> list[str]:
    """Checkpoint directory URIs of a run (Ray Train's ``checkpoint_*`` dirs), any state."""
    return [d for d in storage.list_dirs(run_uri) if _CKPT_DIR.match(os.path.basename(d.rstrip("/")))]


def latest_valid(run_uri: str, log=print) -> tuple[str, dict[str, Any]] | None:
    """The newest complete checkpoint of a run, by optimiser step, skipping incomplete ones.

    Returns:
        (checkpoint URI, meta) or None when the run has no complete checkpoint.
    """
    candidates = []
    for uri in list_checkpoints(run_uri):
        try:
            meta = json.loads(storage.read_bytes(storage.join(uri, META_FILE)))
        except (storage.StorageError, ValueError):
            # An empty prefix is what a deleted run leaves on stores with real directories
            # (SeaweedFS): nothing was written there, so there is nothing to report.
            if storage.list_files(uri, recursive=True):
                log(f"[checkpoint] skipping {uri}: incomplete (no readable {META_FILE})")
            continue
        candidates.append((int(meta.get("step", -1)), uri))
    for _, uri in sorted(candidates, reverse=True):
        try:
            return uri, verify_remote(uri)
        except (CheckpointError, storage.StorageError, ValueError) as e:
            log(f"[checkpoint] skipping {uri}: {e}")
    return None


def download(uri: str, local_dir: str) -> str:
    """Copy a checkpoint directory from storage into ``local_dir``; returns ``local_dir``."""
    os.makedirs(local_dir, exist_ok=True)
    for name in (STATE_FILE, META_FILE, CONFIG_FILE):
        src = storage.join(uri, name)
        if storage.exists(src):
            with open(os.path.join(local_dir, name), "wb") as f:
                f.write(storage.read_bytes(src))
    return local_dir
