"""``mtseg data synth|shard`` (mtseg/cli/data.py): bad input is one line and exit 2, found before
anything is written."""

from __future__ import annotations

import errno
import os

import pytest

from mtseg import storage
from mtseg.cli import main
from mtseg.data.synth import synthesize

SPLIT = "train2017"


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "coco"
    synthesize(str(root), train=4, val=0, size=32, seed=0)
    return str(root)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--out", "s3://mtseg/x"], "out_dir: 's3://mtseg/x' must be a local directory"),
        (["--out", "{tmp}/out", "--train", "-1"], "train: image count must be an integer >= 0, got -1"),
        (["--out", "{tmp}/file/x"], "{tmp}/file is a file, not a directory"),
    ],
)
def test_synth_bad_arguments(tmp_path, one_line_error, args, needle):
    (tmp_path / "file").write_text("x")
    assert main(["data", "synth", *(a.format(tmp=tmp_path) for a in args)]) == 2
    one_line_error(needle.format(tmp=tmp_path))


@pytest.mark.parametrize(
    "out, needle",
    [
        ("s3://", "s3://: no bucket name"),
        ("s3://mtseg//x", "s3://mtseg//x: empty, '.' or '..' path segment in the key"),
    ],
)
def test_shard_refuses_a_bad_out_uri_before_writing(coco_root, one_line_error, out, needle):
    assert main(["data", "shard", "--coco-root", coco_root, "--split", SPLIT, "--out", out]) == 2
    one_line_error(needle)


def _fail_writes_under(monkeypatch, root: str, code: int) -> None:
    """Make every file opened for writing under ``root`` fail with ``code`` (EACCES, ENOSPC)."""
    real_open = open

    def failing_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax") and os.path.abspath(str(file)).startswith(root):
            raise OSError(code, os.strerror(code), file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)


def test_shard_into_a_read_only_directory(coco_root, tmp_path, monkeypatch, one_line_error):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    # root ignores the mode bits: the write itself fails as it would for anyone else.
    _fail_writes_under(monkeypatch, str(out), errno.EACCES)
    try:
        assert main(["data", "shard", "--coco-root", coco_root, "--split", SPLIT, "--out", str(out)]) == 2
    finally:
        out.chmod(0o755)
    err = one_line_error(str(out))
    assert "not writable" in err or "Permission denied" in err


def test_shard_on_a_full_disk_names_the_path_and_the_space_needed(coco_root, tmp_path, monkeypatch, one_line_error):
    out = tmp_path / "shards"
    _fail_writes_under(monkeypatch, str(out), errno.ENOSPC)
    assert main(["data", "shard", "--coco-root", coco_root, "--split", SPLIT, "--out", str(out)]) == 2
    one_line_error(f"{out}/{SPLIT}/shard-00000.parquet: no space left on the device (", " to write, ", " free)")


@pytest.mark.slow
def test_shard_into_a_missing_bucket_fails_like_train_unless_asked_to_create_it(coco_root, s3_env, one_line_error):
    out = "s3://mtseg-created-by-shard/shards"
    args = ["data", "shard", "--coco-root", coco_root, "--split", SPLIT, "--out", out]
    assert main(args) == 2
    one_line_error("bucket 'mtseg-created-by-shard' does not exist")
    assert main([*args, "--create-bucket"]) == 0
    assert storage.exists(f"{out}/{SPLIT}/manifest.json")


# ---------------------------------------------------------------------------- predict, evaluate
