"""Training checkpoints: complete or absent, and the one way a checkpoint is loaded.

A checkpoint is a directory of ``state.pt`` (training state), ``meta.json`` (counters, metrics,
the SHA-256 of ``state.pt``) and ``config.yaml``. Ray Train uploads it file by file, so a run
killed mid-upload leaves a partial one: :func:`verify` rejects it and :func:`latest_valid` walks
back to the newest complete one. :func:`load_for_inference` and :func:`build_inference_model`
serve ``mtseg evaluate``, ``mtseg predict`` and the demo.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import posixpath
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import yaml
from torch import nn

from mtseg import storage
from mtseg.config import Config, ConfigError, config_from_dict
from mtseg.data.categories import CategoryIndex
from mtseg.errors import MtsegError

STATE_FILE = "state.pt"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
FORMAT_VERSION = 1


class CheckpointError(MtsegError, RuntimeError):
    """A checkpoint is missing, incomplete or corrupt, or does not fit its model; the message names the file."""


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def strict_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``value`` with every undefined number (NaN, infinite), at any depth, as ``null``.

    ``json.dumps`` writes ``NaN``, which is not JSON (strict parsers, ``jq``, browsers refuse the
    file); a metric with nothing to measure (mask AP without instances) is undefined, not 0.
    """
    return json.dumps(_finite_or_none(value), allow_nan=False, **kwargs)


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
    files = [
        (STATE_FILE, blob),
        *([(CONFIG_FILE, config_yaml.encode())] if config_yaml else []),
        (META_FILE, strict_json(full_meta, indent=2, sort_keys=True).encode()),
    ]
    path = directory
    try:
        os.makedirs(directory, exist_ok=True)
        for name, data in files:
            path = os.path.join(directory, name)
            with open(path, "wb") as f:
                f.write(data)
    except OSError as e:  # a full disk names the file, the bytes to write and the space free
        raise CheckpointError(storage.describe_error(path, e)) from None


def _read_verified(uri: str) -> tuple[dict[str, Any], bytes]:
    """(meta, ``state.pt`` bytes) of the checkpoint at ``uri`` (local or s3://), if it is complete."""
    try:
        meta = json.loads(storage.read_bytes(storage.join(uri, META_FILE)))
    except storage.NotFoundError:
        raise CheckpointError(f"{uri}: no {META_FILE} (incomplete checkpoint)") from None
    except ValueError as e:
        raise CheckpointError(f"{uri}: unreadable {META_FILE} ({e})") from None
    try:
        blob = storage.read_bytes(storage.join(uri, STATE_FILE))
    except storage.NotFoundError:
        raise CheckpointError(f"{uri}: no {STATE_FILE} (incomplete checkpoint)") from None
    if len(blob) != meta.get("state_bytes") or _sha256(blob) != meta.get("state_sha256"):
        raise CheckpointError(f"{uri}: {STATE_FILE} does not match its hash (partial upload)")
    return meta, blob


def verify(uri: str) -> dict[str, Any]:
    """The meta of the complete checkpoint at ``uri`` (local or s3://); CheckpointError otherwise."""
    return _read_verified(uri)[0]


def load(uri: str, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify and load the checkpoint at ``uri`` (local or s3://): (state, meta).

    ``state.pt`` is checked against its hash, then unpickled with ``weights_only=True``, so a
    crafted file (anyone who can write to the bucket) cannot run code.

    Raises:
        CheckpointError: one line naming the file, when it is incomplete, corrupt or holds
            anything but tensors and plain values.
    """
    meta, blob = _read_verified(uri)
    path = storage.join(uri, STATE_FILE)
    try:
        state = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        # torch reports a forbidden global with a page of advice; the first line names it.
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused to load: not a plain tensor checkpoint ({reason})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: refused to load: expected a dict of training state, got {type(state).__name__}")
    return state, meta


def list_checkpoints(run_uri: str) -> list[str]:
    """Checkpoint directory URIs of a run (Ray Train's ``checkpoint_*`` dirs), any state."""
    return [d for d in storage.list_dirs(run_uri) if os.path.basename(d.rstrip("/")).startswith("checkpoint_")]


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
            return uri, verify(uri)
        except (CheckpointError, storage.StorageError, ValueError) as e:
            log(f"[checkpoint] skipping {uri}: {e}")
    return None


def _score(meta: dict[str, Any], metric: str) -> float:
    value = (meta.get("metrics") or {}).get(metric)
    # null (a metric with nothing to measure) or an old file's NaN ranks below every real score.
    return value if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


def prune(run_uri: str, keep: int, *, metric: str, tracked: set[str] | frozenset[str] = frozenset(), log=print) -> list[str]:
    """Delete every checkpoint of a run but the best ``keep`` by ``metric`` and the latest (by step).

    Ray Train applies the same rule while it runs, but only to the checkpoints it registered: one
    uploaded just before the driver was killed is complete, never registered, and would stay for
    good. Incomplete checkpoints go too (a resume skips them).

    Args:
        metric: the meta's ``metrics`` key to rank by (higher is better).
        tracked: names of the checkpoint directories Ray Train kept; on a tie they win, so that
            the ``Result`` of the run that just ended never points at a deleted checkpoint.

    Returns:
        The URIs deleted.
    """
    checkpoints = list_checkpoints(run_uri)
    metas: dict[str, dict[str, Any]] = {}
    for uri in checkpoints:
        try:
            metas[uri] = json.loads(storage.read_bytes(storage.join(uri, META_FILE)))
        except (storage.StorageError, ValueError):
            continue  # incomplete: not kept

    def name(uri: str) -> str:
        return posixpath.basename(uri.rstrip("/"))

    @functools.cache
    def complete(uri: str) -> bool:
        try:
            verify(uri)
            return True
        except (CheckpointError, storage.StorageError, ValueError):
            return False

    # Ray's names are timestamps: on a tie a later one was reported later, as Ray Train ranks them.
    by_step = sorted(metas, key=lambda u: (int(metas[u].get("step", -1)), name(u) in tracked, name(u)), reverse=True)
    by_score = sorted(metas, key=lambda u: (_score(metas[u], metric), name(u) in tracked, name(u)), reverse=True)
    # Only candidates are hashed (a state.pt may be large), in rank order, until enough pass.
    kept = set(itertools.islice(filter(complete, by_step), 1))
    kept.update(itertools.islice(filter(complete, by_score), keep))
    deleted = [uri for uri in checkpoints if uri not in kept]
    for uri in deleted:
        storage.delete(uri, recursive=True, within=run_uri)
    if deleted:
        log(f"[checkpoint] deleted {len(deleted)} checkpoint(s) outside the best {keep} by {metric} and the latest")
    return deleted


def download(uri: str, local_dir: str) -> str:
    """Copy a checkpoint directory from storage into ``local_dir``; returns ``local_dir``."""
    os.makedirs(local_dir, exist_ok=True)
    for name in (STATE_FILE, META_FILE, CONFIG_FILE):
        src = storage.join(uri, name)
        if storage.exists(src):
            with open(os.path.join(local_dir, name), "wb") as f:
                f.write(storage.read_bytes(src))
    return local_dir


# ---------------------------------------------------------------------------- inference


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint: its directory, the run's config, label space, meta and model weights."""

    uri: str
    cfg: Config
    categories: CategoryIndex
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor] = field(repr=False)


def resolve(uri: str) -> str:
    """The checkpoint directory ``uri`` names: itself, or a run directory's newest complete checkpoint.

    Raises:
        CheckpointError: neither a checkpoint nor a run with a complete checkpoint.
    """
    uri = str(uri).rstrip("/")
    if storage.exists(storage.join(uri, META_FILE)):
        return uri
    if list_checkpoints(uri):
        found = latest_valid(uri, log=lambda *a: None)
        if found is None:
            raise CheckpointError(f"{uri}: the run has no complete checkpoint")
        return found[0]
    raise CheckpointError(f"{uri}: not a checkpoint directory (no {META_FILE}) nor a run with checkpoint_* directories")


def read_config(uri: str) -> Config:
    """The checkpoint's config.yaml; a Ray Train checkpoint without one falls back to its run's."""
    run = posixpath.dirname(uri.rstrip("/")) if storage.is_s3(uri) else os.path.dirname(os.path.abspath(uri))
    for where in (storage.join(uri, CONFIG_FILE), storage.join(run, CONFIG_FILE)):
        if storage.exists(where):
            try:
                data = yaml.safe_load(storage.read_bytes(where).decode())
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise ConfigError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
            return config_from_dict(data or {})
    raise CheckpointError(f"{uri}: no {CONFIG_FILE} in the checkpoint or its run directory")


def _categories(meta: dict[str, Any], cfg: Config, data_uri: str | None) -> CategoryIndex:
    """The label space: the checkpoint's own record, else a manifest of the run's data, else of ``data_uri``."""
    if meta.get("categories"):
        return CategoryIndex.from_categories(meta["categories"])
    from mtseg.data.manifest import ManifestError, read_manifest

    errors = []
    for root in dict.fromkeys(r for r in (cfg.data.uri, data_uri) if r):
        # The trainer builds its label space from the training split; COCO's val split has the same.
        for split in dict.fromkeys((cfg.data.train_split, cfg.data.val_split)):
            try:
                return CategoryIndex.from_categories(read_manifest(root, split)["categories"])
            except (ManifestError, storage.StorageError) as e:
                errors.append(str(e))
    raise CheckpointError(
        f"the checkpoint records no categories and no dataset manifest could be read ({errors[0]}); "
        "pass a dataset with the model's label space with --data"
    )


def load_for_inference(uri: str, *, categories: CategoryIndex | None = None, data_uri: str | None = None) -> LoadedCheckpoint:
    """Verify and load a checkpoint's model for inference (the optimiser state is dropped).

    Args:
        uri: checkpoint or run directory, local or ``s3://`` (see :func:`resolve`).
        categories: the label space; default the checkpoint's own, else the run's dataset manifest.
        data_uri: a dataset to read the label space from when neither of those has it.

    Raises:
        CheckpointError: not a checkpoint, incomplete or corrupt, no model state, or no label space.
        mtseg.config.ConfigError: its config.yaml is invalid.
    """
    uri = resolve(uri)
    cfg = read_config(uri)
    state, meta = load(uri)
    if "model" not in state:
        raise CheckpointError(f"{uri}: {STATE_FILE} has no 'model' state")
    if categories is None:
        categories = _categories(meta, cfg, data_uri)
    return LoadedCheckpoint(uri=uri, cfg=cfg, categories=categories, meta=meta, model_state=state["model"])


def build_inference_model(
    cfg: Config, categories: CategoryIndex, model_state: dict[str, torch.Tensor], device: torch.device | str = "cpu"
) -> nn.Module:
    """The trained model described by ``cfg`` and ``categories``, ``eval()``, on ``device``.

    Raises:
        CheckpointError: the weights do not fit that model (e.g. another number of categories).
    """
    from mtseg.models import build_model

    # The backbone weights file named in the config was only the training's starting point.
    cfg = replace(cfg, model=replace(cfg.model, weights=""))
    model = build_model(cfg, categories)
    try:
        model.load_state_dict(model_state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(
            f"checkpoint weights do not fit a {cfg.model.backbone}+{cfg.model.decoder} model for "
            f"{categories.num_classes - 1} categories and tasks {cfg.tasks.names}: {detail}"
        ) from None
    model = model.to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()
