"""Bad input to any command is one line on stderr (``mtseg: error: ...``) and exit code 2, found
before anything is written or any model runs; ``mtseg train`` prints strict JSON."""

from __future__ import annotations

import errno
import json
import math
import os
import types

import pytest

from mtseg import storage
from mtseg.cli import main
from mtseg.data.synth import synthesize

SPLIT = "train2017"


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtseg: error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "coco"
    synthesize(str(root), train=4, val=0, size=32, seed=0)
    return str(root)


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "content, needle",
    [
        (None, "is a directory, not a config file"),
        (b"train:\n  epochs: 2 \xff\n", "not UTF-8 text"),
        (b"- train\n- model\n", "the top level must be a mapping"),
        (b"base: &b\n  more: *b\n", "the YAML alias at base.more refers to"),
    ],
)
def test_unusable_config_file(tmp_path, capsys, content, needle):
    path = tmp_path / "config.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    assert main(["train", "--config", str(path), "train.epochs=1"]) == 2
    _one_line_error(capsys, str(path), needle)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lr=.nan", "train.lr: expected a finite number, got nan"),
        ("train.lr=inf", "train.lr: expected a finite number, got inf"),
        ("weighting.static.semantic=-1", "weighting.static.semantic: -1.0 is below the minimum 0.0"),
        ("train.storage_path=s3://", "train.storage_path: s3://: no bucket name"),
    ],
)
def test_values_accepted_until_now_are_refused(capsys, override, needle):
    assert main(["train", override]) == 2
    _one_line_error(capsys, needle)


def test_train_prints_strict_json_with_null_for_undefined_metrics(monkeypatch, capsys):
    """No val/mask_ap without instances: the result said NaN, which is not JSON."""
    from mtseg import cluster
    from mtseg.train import trainer

    result = types.SimpleNamespace(error=None, metrics={"val/miou": 0.5, "val/mask_ap": math.nan, "val/pq": math.inf, "train/loss": 1.0})
    # The cluster parts are beside the point here (the Ray Train tests run them): the printing is.
    monkeypatch.setattr(trainer, "preflight", lambda cfg: None)
    monkeypatch.setattr(trainer, "run_training", lambda cfg, restart=False: result)
    monkeypatch.setattr(cluster, "init_local_ray", lambda **kw: None)
    assert main(["train"]) == 0

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    printed = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert printed == {"val/miou": 0.5, "val/mask_ap": None, "val/pq": None}


# ---------------------------------------------------------------------------- data synth, data shard


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--out", "s3://mtseg/x"], "out_dir: 's3://mtseg/x' must be a local directory"),
        (["--out", "{tmp}/out", "--train", "-1"], "train: image count must be an integer >= 0, got -1"),
        (["--out", "{tmp}/file/x"], "{tmp}/file is a file, not a directory"),
    ],
)
def test_synth_bad_arguments(tmp_path, capsys, args, needle):
    (tmp_path / "file").write_text("x")
    assert main(["data", "synth", *(a.format(tmp=tmp_path) for a in args)]) == 2
    _one_line_error(capsys, needle.format(tmp=tmp_path))



@pytest.mark.parametrize(
    "out, needle",
    [
        ("s3://", "s3://: no bucket name"),
        ("s3://mtseg//x", "s3://mtseg//x: empty, '.' or '..' path segment in the key"),
    ],
)
def test_shard_refuses_a_bad_out_uri_before_writing(coco_root, capsys, out, needle):
    assert main(["data", "shard", "--coco-root", coco_root, "--split", SPLIT, "--out", out]) == 2
    _one_line_error(capsys, needle)


def _fail_writes_under(monkeypatch, root: str, code: int) -> None:
    """Make every file opened for writing under ``root`` fail with ``code`` (EACCES, ENOSPC)."""
    real_open = open

    def failing_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax") and os.path.abspath(str(file)).startswith(root):
            raise OSError(code, os.strerror(code), file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)


def test_shard_into_a_read_only_directory(coco_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    # root ignores the mode bits: the write itself fails as it would for anyone else.
    _fail_writes_under(monkeypatch, str(out), errno.EACCES)
    try:
        assert main(["data", "shard", "--coco-root", coco_root, "--split", SPLIT, "--out", str(out)]) == 2
    finally:
        out.chmod(0o755)
    err = _one_line_error(capsys, str(out))
    assert "not writable" in err or "Permission denied" in err


def test_shard_on_a_full_disk_names_the_path_and_the_space_needed(coco_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "shards"
    _fail_writes_under(monkeypatch, str(out), errno.ENOSPC)
    assert main(["data", "shard", "--coco-root", coco_root, "--split", SPLIT, "--out", str(out)]) == 2
    _one_line_error(capsys, f"{out}/{SPLIT}/shard-00000.parquet: no space left on the device (", " to write, ", " free)")


@pytest.mark.slow
def test_shard_into_a_missing_bucket_fails_like_train_unless_asked_to_create_it(coco_root, s3_env, capsys):
    out = "s3://mtseg-created-by-shard/shards"
    args = ["data", "shard", "--coco-root", coco_root, "--split", SPLIT, "--out", out]
    assert main(args) == 2
    _one_line_error(capsys, "bucket 'mtseg-created-by-shard' does not exist")
    assert main([*args, "--create-bucket"]) == 0
    assert storage.exists(f"{out}/{SPLIT}/manifest.json")


# ---------------------------------------------------------------------------- predict, evaluate


def test_predict_out_that_is_a_file_fails_before_the_model_loads(tmp_path, capsys):
    image, out = tmp_path / "a.png", tmp_path / "out"
    image.write_bytes(b"")
    out.write_text("an existing file")
    # The checkpoint does not exist either: the --out check comes first, before any loading.
    assert main(["predict", "--checkpoint", str(tmp_path / "no-checkpoint"), str(image), "--out", str(out)]) == 2
    _one_line_error(capsys, f"--out {out}: {out} is a file, not a directory")
    assert out.read_text() == "an existing file"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["predict", "{tmp}/image", "--out", "{tmp}/out", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
        (["predict", "{tmp}/image", "--out", "{tmp}/out", "--max-image-side", "0"], "--max-image-side: must be >= 16, got 0"),
        (["evaluate", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
        (["evaluate", "--limit", "0"], "--limit: must be >= 1, got 0"),
    ],
)
def test_zero_is_refused_not_replaced_by_the_default(tmp_path, capsys, args, needle):
    (tmp_path / "image").write_bytes(b"")
    assert main([*(a.format(tmp=tmp_path) for a in args), "--checkpoint", str(tmp_path / "no-checkpoint")]) == 2
    _one_line_error(capsys, needle)
