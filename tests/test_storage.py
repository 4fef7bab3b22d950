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
    with pytest.raises(OSError):
        storage.write_bytes(uri, b"data")
    assert os.listdir(tmp_path) == []


def test_uri_parsing():
    fs, path = storage.resolve("file:///tmp/x")
    assert path == "/tmp/x"
    assert storage.join("s3://b/p", "q", "r") == "s3://b/p/q/r"
    assert storage.split_s3("s3://b/p/q") == ("b", "p/q")
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.resolve("gs://bucket/x")


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
