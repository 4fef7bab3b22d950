import errno
import os

import pytest

from mtseg import storage
from mtseg.storage import StorageError


def test_local_roundtrip_and_atomic_write(tmp_path):
    uri = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(uri, b"x" * 10)
    assert storage.read_bytes(uri) == b"x" * 10
    assert storage.exists(uri)
    assert storage.list_files(str(tmp_path / "a")) == [uri]
    # No temp file is left beside the object.
    assert os.listdir(tmp_path / "a") == ["b.bin"]
    storage.delete(uri)
    assert not storage.exists(uri)


def test_local_failed_write_leaves_nothing(tmp_path, monkeypatch):
    uri = str(tmp_path / "c.bin")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(StorageError, match=r"c\.bin: disk full$"):
        storage.write_bytes(uri, b"data")
    assert os.listdir(tmp_path) == []


def test_full_disk_is_one_line_with_the_path_and_the_space_needed(tmp_path, monkeypatch):
    uri = str(tmp_path / "shards" / "shard-00000.parquet")
    real_open = open

    def full_disk(file, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(StorageError) as info:
        storage.write_bytes(uri, b"x" * 3_000_000)
    msg = str(info.value)
    assert msg.startswith(f"{uri}: no space left on the device (3.0 MB to write, ") and msg.endswith(" free)")
    assert "\n" not in msg
    assert os.listdir(tmp_path / "shards") == []  # no temp file left behind


def test_uri_parsing():
    fs, path = storage.resolve("file:///tmp/x")
    assert path == "/tmp/x"
    assert storage.join("s3://bkt/p", "q", "r") == "s3://bkt/p/q/r"
    assert storage.split_s3("s3://bkt/p/q#1?v") == ("bkt", "p/q#1?v")
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.resolve("gs://bucket/x")


@pytest.mark.parametrize(
    "uri, reason",
    [
        ("s3://", "no bucket name"),
        ("s3:///x", "no bucket name"),
        ("s3://mtseg//x", "empty, '.' or '..' path segment in the key"),
        ("s3://mtseg/a/../b", "empty, '.' or '..' path segment in the key"),
        ("s3://My_Bucket/x", "'My_Bucket' is not a valid bucket name"),
        ("s3://ab/x", "'ab' is not a valid bucket name"),
        ("file://relative/x", "a file:// URI needs an absolute path"),
        ("gs://bucket/x", "unsupported URI scheme"),
    ],
)
def test_bad_uris_are_one_line_naming_what_is_wrong(uri, reason):
    with pytest.raises(StorageError) as info:
        storage.check_uri(uri)
    assert str(info.value).startswith(f"{uri}: {reason}") and "\n" not in str(info.value)


def test_good_uris_come_back_without_trailing_slashes():
    assert storage.check_uri("s3://mtseg/a/b/") == "s3://mtseg/a/b"
    assert storage.check_uri("s3://mtseg/") == "s3://mtseg"
    assert storage.check_uri("file:///tmp/x") == "file:///tmp/x"
    assert storage.check_uri("runs/demo") == "runs/demo"
    with pytest.raises(StorageError, match="empty URI"):
        storage.check_uri("")


def test_check_access_names_a_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match=r"/f/out: .*/f is a file, not a directory$"):
        storage.check_access(str(tmp_path / "f" / "out"))


@pytest.mark.slow
def test_s3_roundtrip(s3_bucket):
    uri = storage.join(s3_bucket, "dir", "obj.txt")
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.list_files(storage.join(s3_bucket, "dir")) == [uri]
    storage.delete(uri)
    assert not storage.exists(uri)


@pytest.mark.slow
def test_s3_missing_bucket(s3_env):
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket-x/p: bucket 'no-such-bucket-x' does not exist$"):
        storage.check_access("s3://no-such-bucket-x/p")


@pytest.mark.slow
def test_s3_wrong_credentials_never_leak_the_secret(s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    storage._s3_filesystem.cache_clear()
    try:
        with pytest.raises(StorageError) as info:
            storage.check_access(s3_bucket)
        assert "access denied" in str(info.value)
        with pytest.raises(StorageError) as info:
            storage.read_bytes(storage.join(s3_bucket, "x"))
        assert "access denied" in str(info.value)
        assert "definitely-wrong-secret" not in str(info.value)
    finally:
        storage._s3_filesystem.cache_clear()


@pytest.mark.slow
def test_s3_unreachable_endpoint(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    storage._s3_filesystem.cache_clear()
    try:
        with pytest.raises(StorageError, match=r"^s3://mtseg: cannot reach the S3 endpoint http://127.0.0.1:9$"):
            storage.check_access("s3://mtseg")
    finally:
        storage._s3_filesystem.cache_clear()


def test_redact(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    assert storage.redact("key=s3cr3t-value") == "key=***"
