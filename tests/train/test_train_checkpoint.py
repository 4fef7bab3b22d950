"""Checkpoints are complete or absent: a partial upload is never loaded; one loader serves inference."""

import json
import os

import pytest
import torch

from mtseg import storage
from mtseg.config import load_config, to_yaml
from mtseg.data.categories import CategoryIndex
from mtseg.train import checkpoint as ckpt
from mtseg.train.optim import lr_factor


def _save(root, name, step):
    d = os.path.join(root, name)
    ckpt.save(d, {"w": torch.full((3,), float(step))}, {"epoch": 0, "step": step, "epoch_rows": step * 4}, "a: 1\n")
    return d


def test_roundtrip(tmp_path):
    d = _save(str(tmp_path), "checkpoint_a", 5)
    state, meta = ckpt.load(d)
    assert meta["step"] == 5 and torch.equal(state["w"], torch.full((3,), 5.0))


def test_truncated_state_is_rejected(tmp_path):
    d = _save(str(tmp_path), "checkpoint_a", 5)
    with open(os.path.join(d, ckpt.STATE_FILE), "r+b") as f:
        f.truncate(10)
    with pytest.raises(ckpt.CheckpointError, match="does not match its hash"):
        ckpt.load(d)


class _RunsCode:
    """What an attacker pickles: unpickling it calls ``os.system``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    # A crafted state.pt with a matching meta.json (the hash proves completeness, not trust).
    marker = tmp_path / "pwned"
    d = str(tmp_path / "checkpoint_evil")
    ckpt.save(d, {"model": {}, "payload": _RunsCode(marker)}, {"epoch": 0, "step": 1, "epoch_rows": 0})
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load(d)
    message = str(err.value)
    assert "\n" not in message and message.startswith(os.path.join(d, ckpt.STATE_FILE)) and "refused" in message
    assert not marker.exists()


def test_a_full_training_state_loads_with_weights_only(tmp_path):
    """Everything the trainer checkpoints (model, optimiser, schedule, strategy, RNG) is plain-typed."""
    from mtseg.train.loop import build_state

    cats = CategoryIndex.from_categories(
        [{"id": 1, "name": "a", "supercategory": "x"}, {"id": 3, "name": "b", "supercategory": "y"}]
    )
    for weighting in ("uncertainty", "famo", "gradnorm", "dwa"):
        cfg = load_config(None, [f"weighting.name={weighting}", "data.image_size=32"])
        state = build_state(cfg, cats, total_steps=4, device=torch.device("cpu"))
        d = str(tmp_path / weighting)
        ckpt.save(d, state.state_dict(), state.meta())
        loaded, _ = ckpt.load(d)
        state.load_state_dict(loaded)


def test_missing_meta_is_rejected(tmp_path):
    d = _save(str(tmp_path), "checkpoint_a", 5)
    os.unlink(os.path.join(d, ckpt.META_FILE))
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.verify(d)


def test_latest_valid_walks_back_past_partial_uploads(tmp_path):
    run = str(tmp_path)
    _save(run, "checkpoint_2026-01-01_00-00-01", 10)
    newer = _save(run, "checkpoint_2026-01-01_00-00-02", 20)
    newest = _save(run, "checkpoint_2026-01-01_00-00-03", 30)
    with open(os.path.join(newer, ckpt.STATE_FILE), "r+b") as f:  # upload cut short
        f.truncate(7)
    os.unlink(os.path.join(newest, ckpt.META_FILE))  # meta never arrived
    os.makedirs(os.path.join(run, "checkpoint_2026-01-01_00-00-04"))  # an emptied prefix: nothing written
    logged: list[str] = []
    uri, meta = ckpt.latest_valid(run, log=logged.append)
    assert meta["step"] == 10 and uri.endswith("00-00-01")
    assert [line.split()[2].rstrip(":").rsplit("/", 1)[-1] for line in logged] == [
        "checkpoint_2026-01-01_00-00-03",
        "checkpoint_2026-01-01_00-00-02",
    ]  # the empty one is not news


def test_lr_schedule_warmup_then_decay():
    cfg = load_config(None, ["train.warmup_steps=4", "train.schedule=poly"]).train
    factors = [lr_factor(s, 20, cfg) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    cfg = load_config(None, ["train.warmup_steps=0", "train.schedule=cosine"]).train
    assert lr_factor(0, 10, cfg) == 1.0 and lr_factor(10, 10, cfg) == pytest.approx(0.0)


def test_a_full_disk_while_checkpointing_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import builtins
    import errno

    real_open = builtins.open

    def full(path, mode="r", *a, **k):
        if "w" in mode and str(path).endswith(ckpt.STATE_FILE):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", full)
    with pytest.raises(ckpt.CheckpointError) as err:
        _save(str(tmp_path), "checkpoint_full", 1)
    message = str(err.value)
    assert "\n" not in message and ckpt.STATE_FILE in message and "no space left" in message


def _refuse_constant(constant):
    raise ValueError(f"not JSON: {constant}")


def test_meta_json_is_strict_json_with_null_for_undefined_metrics(tmp_path):
    """No mask AP without instances: json.dumps wrote NaN, which strict JSON readers refuse."""
    d = str(tmp_path / "checkpoint_a")
    metrics = {"val/miou": 0.5, "val/mask_ap": float("nan"), "val/pq": float("inf"), "per_class": [float("-inf"), 1.0]}
    ckpt.save(d, {"w": torch.zeros(1)}, {"epoch": 0, "step": 1, "epoch_rows": 4, "metrics": metrics})
    with open(os.path.join(d, ckpt.META_FILE)) as f:
        written = json.loads(f.read(), parse_constant=_refuse_constant)
    assert written["metrics"] == {"val/miou": 0.5, "val/mask_ap": None, "val/pq": None, "per_class": [None, 1.0]}
    assert ckpt.load(d)[1]["metrics"]["val/mask_ap"] is None


def test_a_meta_json_with_nan_written_before_still_loads(tmp_path):
    d = _save(str(tmp_path), "checkpoint_a", 5)
    path = os.path.join(d, ckpt.META_FILE)
    with open(path) as f:
        meta = json.load(f)
    with open(path, "w") as f:  # as the old writer did
        json.dump({**meta, "metrics": {"val/mask_ap": float("nan")}}, f)
    state, meta = ckpt.load(d)
    assert meta["step"] == 5 and meta["metrics"]["val/mask_ap"] != meta["metrics"]["val/mask_ap"]


def _scored(run, stamp, step, miou, tmp_path):
    """A real checkpoint as the trainer reports it (step and val/miou in its meta, a Ray-style
    timestamp name), saved locally and uploaded file by file as Ray Train does."""
    name = f"checkpoint_2026-01-01_00-00-{stamp:02d}.000000"
    local = str(tmp_path / "saved" / name)
    ckpt.save(
        local, {"w": torch.full((3,), float(step))}, {"epoch": 0, "step": step, "epoch_rows": 0, "metrics": {"val/miou": miou}}
    )
    for file in sorted(os.listdir(local)):
        with open(os.path.join(local, file), "rb") as f:
            storage.write_bytes(storage.join(run, name, file), f.read())
    return storage.join(run, name)


def _names(uris):
    return sorted(u.rstrip("/").rsplit("/", 1)[-1] for u in uris)


def _prune_cases(run, tmp_path):
    worst = _scored(run, 1, 10, 0.3, tmp_path)
    best = _scored(run, 2, 20, 0.5, tmp_path)
    untracked = _scored(run, 3, 30, 0.4, tmp_path)
    unscored = _scored(run, 4, 35, None, tmp_path)  # no val/miou to rank by (null): never among the best
    latest = _scored(run, 5, 40, 0.2, tmp_path)
    partial = _scored(run, 6, 50, 0.9, tmp_path)  # newest and best on paper, but its upload was cut short
    storage.write_bytes(storage.join(partial, ckpt.STATE_FILE), b"cut short")
    no_meta = storage.join(run, "checkpoint_2026-01-01_00-00-07.000000")
    storage.write_bytes(storage.join(no_meta, ckpt.STATE_FILE), b"meta.json never arrived")
    for name in ("config.yaml", "outcome.json"):
        storage.write_bytes(storage.join(run, name), b"{}")

    deleted = ckpt.prune(run, 2, metric="val/miou", log=lambda *a: None)
    assert _names(deleted) == _names([worst, unscored, partial, no_meta])
    assert _names(ckpt.list_checkpoints(run)) == _names([best, untracked, latest])
    assert ckpt.prune(run, 2, metric="val/miou", log=lambda *a: None) == []
    ckpt.prune(run, 1, metric="val/miou", log=lambda *a: None)
    assert _names(ckpt.list_checkpoints(run)) == _names([best, latest])
    left = storage.list_files(run, recursive=True)
    assert _names(u for u in left if "/checkpoint_" not in u) == ["config.yaml", "outcome.json"]
    assert all(ckpt.verify(u) for u in ckpt.list_checkpoints(run))


def test_prune_keeps_the_best_by_the_metric_and_the_latest_and_deletes_every_other(tmp_path):
    """A driver killed between a checkpoint's upload and Ray registering it left one nobody tracks."""
    _prune_cases(str(tmp_path / "run"), tmp_path)


@pytest.mark.slow
def test_prune_on_s3(s3_bucket, tmp_path):
    _prune_cases(f"{s3_bucket}/run", tmp_path)


def test_prune_breaks_a_tie_for_the_checkpoints_ray_train_kept(tmp_path):
    """The untracked one scores as the checkpoint it followed: the run's Result must still point at a kept one."""
    run = str(tmp_path / "run")
    tracked_best = _scored(run, 1, 10, 0.5, tmp_path)
    _scored(run, 2, 15, 0.5, tmp_path)  # mid-epoch after it, the same val/miou, never registered
    latest = _scored(run, 3, 20, 0.1, tmp_path)
    tracked = {os.path.basename(tracked_best), os.path.basename(latest)}
    ckpt.prune(run, 1, metric="val/miou", tracked=tracked, log=lambda *a: None)
    assert _names(ckpt.list_checkpoints(run)) == _names([tracked_best, latest])


# ---------------------------------------------------------------------------- loading for inference

CATEGORIES = [
    {"id": 1, "name": "disc", "supercategory": "round"},
    {"id": 3, "name": "ring", "supercategory": "round"},
    {"id": 7, "name": "box", "supercategory": "angular"},
]


def _model_checkpoint(directory, *, with_categories=True, step=1) -> str:
    """A tiny randomly initialised model saved as the trainer saves it (config.yaml beside)."""
    from mtseg.models import build_model

    cfg = load_config(
        None, ["data.image_size=32", "model.decoder_channels=16", "tasks.patch_size=4", "data.uri=/nonexistent/shards"]
    )
    torch.manual_seed(0)
    model = build_model(cfg, CategoryIndex.from_categories(CATEGORIES))
    meta = {"epoch": 0, "step": step, "epoch_rows": 0, **({"categories": CATEGORIES} if with_categories else {})}
    ckpt.save(str(directory), {"model": model.state_dict(), "optimizer": {"state": {}}}, meta, to_yaml(cfg))
    return str(directory)


def test_load_for_inference_gives_config_label_space_and_model_weights_only(tmp_path):
    loaded = ckpt.load_for_inference(_model_checkpoint(tmp_path / "checkpoint_000001"))
    assert loaded.uri == str(tmp_path / "checkpoint_000001") and loaded.cfg.data.image_size == 32
    assert loaded.categories.coco_ids == (1, 3, 7) and loaded.meta["step"] == 1
    model = ckpt.build_inference_model(loaded.cfg, loaded.categories, loaded.model_state)
    assert not model.training
    assert all(torch.equal(v, loaded.model_state[k]) for k, v in model.state_dict().items())


def test_checkpoint_without_categories_reads_the_dataset_manifest(tmp_path):
    from mtseg.data.manifest import MANIFEST_NAME

    # A minimal manifest with the label space (no shards needed to read categories).
    data = tmp_path / "shards"
    (data / "train2017").mkdir(parents=True)
    manifest = {"schema_version": 1, "split": "train2017", "categories": CATEGORIES, "counts": {}, "shards": [], "skipped": {}}
    (data / "train2017" / MANIFEST_NAME).write_text(json.dumps(manifest))
    path = _model_checkpoint(tmp_path / "run" / "checkpoint_000003", with_categories=False)
    with pytest.raises(ckpt.CheckpointError, match="--data"):
        ckpt.load_for_inference(path)
    loaded = ckpt.load_for_inference(path, data_uri=str(data))
    assert loaded.categories.coco_ids == (1, 3, 7)
    assert "optimizer" not in loaded.model_state and loaded.cfg.data.image_size == 32


def test_run_directory_resolves_to_its_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    _model_checkpoint(run / "checkpoint_000001", step=1)
    newest = _model_checkpoint(run / "checkpoint_000002", step=2)
    broken = run / "checkpoint_000003"
    broken.mkdir()
    (broken / "state.pt").write_bytes(b"truncated")  # no meta.json: an interrupted upload
    assert ckpt.resolve(str(run)) == newest
    assert ckpt.load_for_inference(str(run)).uri == newest
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint"):
        ckpt.resolve(str(tmp_path))


def test_a_tampered_model_is_refused_in_one_line_naming_the_file(tmp_path):
    """The hash in meta.json is checked before any unpickling (issue 11), on the inference path too."""
    path = _model_checkpoint(tmp_path / "checkpoint_000001")
    with open(os.path.join(path, ckpt.STATE_FILE), "r+b") as f:
        f.seek(200)
        f.write(b"\x00" * 8)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_for_inference(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(path) and "does not match its hash" in str(err.value)


def test_weights_that_do_not_fit_the_label_space_are_a_checkpoint_error(tmp_path):
    loaded = ckpt.load_for_inference(_model_checkpoint(tmp_path / "checkpoint_000001"))
    other = CategoryIndex.from_categories(CATEGORIES[:2])
    with pytest.raises(ckpt.CheckpointError, match="do not fit"):
        ckpt.build_inference_model(loaded.cfg, other, loaded.model_state)
