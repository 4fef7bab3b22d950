import errno
import os
import socket
import threading
import uuid

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


@pytest.fixture
def dropping_endpoint(monkeypatch):
    """An S3 endpoint that closes every connection unanswered; ``count()`` is connections so far.

    Each attempt of a request is one connection, so the count shows how many times the one
    retry layer tried, where nested retries would multiply it.
    """
    server = socket.create_server(("127.0.0.1", 0))
    connections = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed at teardown
                return
            connections.append(1)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-value")
    monkeypatch.setattr(storage, "BOTO_MAX_ATTEMPTS", 3)
    monkeypatch.setattr(storage, "ARROW_MAX_ATTEMPTS", 3)
    storage._s3_filesystem.cache_clear()
    yield lambda: len(connections)
    server.close()
    storage._s3_filesystem.cache_clear()


def _one_line(info) -> str:
    assert "\n" not in str(info.value)
    return str(info.value)


# botocore's urllib3 opens one more connection when the first is closed without a reply.
def test_boto3_calls_try_max_attempts_times_then_one_line(dropping_endpoint):
    endpoint = os.environ["AWS_ENDPOINT_URL_S3"]
    with pytest.raises(StorageError) as info:
        storage.write_bytes("s3://bkt/p/x", b"x")
    assert _one_line(info) == f"s3://bkt/p/x: cannot reach the S3 endpoint {endpoint}"
    assert dropping_endpoint() in (3, 4)


def test_pyarrow_calls_try_max_attempts_times_then_ask_boto3_once(dropping_endpoint):
    endpoint = os.environ["AWS_ENDPOINT_URL_S3"]
    with pytest.raises(StorageError) as info:
        storage.exists("s3://bkt/p/x")
    assert _one_line(info) == f"s3://bkt/p/x: cannot reach the S3 endpoint {endpoint}"
    # 3 by pyarrow, then one HEAD of the bucket to classify pyarrow's untyped OSError.
    assert dropping_endpoint() in (4, 5)


def test_checks_before_a_command_fail_within_their_attempts(dropping_endpoint):
    with pytest.raises(StorageError, match=r"^s3://bkt/p: cannot reach the S3 endpoint http://127.0.0.1:\d+$"):
        storage.check_access("s3://bkt/p")
    assert dropping_endpoint() in (storage.CHECK_MAX_ATTEMPTS, storage.CHECK_MAX_ATTEMPTS + 1)


def test_ray_storage_uploads_whole_objects_with_no_retry_of_its_own(dropping_endpoint):
    fs, path = storage.ray_storage("s3://bkt/run")
    assert path == "bkt/run"
    with pytest.raises(StorageError, match="s3://bkt/run/ckpt/state.pt: cannot reach the S3 endpoint"):
        with fs.open_output_stream(f"{path}/ckpt/state.pt") as f:
            f.write(b"state")
    assert dropping_endpoint() in (3, 4)  # one PUT of the whole file, tried by botocore alone


@pytest.mark.slow
def test_s3_missing_key_is_not_found_by_type_and_code(s3_bucket):
    uri = storage.join(s3_bucket, "missing.bin")
    with pytest.raises(storage.NotFoundError) as info:  # pyarrow: FileNotFoundError
        storage.read_bytes(uri)
    assert _one_line(info) == f"{uri}: not found"
    bucket, key = storage.split_s3(uri)
    with pytest.raises(Exception) as info:  # boto3: ClientError NoSuchKey
        storage.s3_client().get_object(Bucket=bucket, Key=key)
    assert storage.s3_error_code(info.value) == "NoSuchKey"
    assert storage.describe_error(uri, info.value) == f"{uri}: not found"


@pytest.mark.slow
def test_s3_missing_bucket_is_classified_for_pyarrow_and_boto3(s3_env):
    import pyarrow.fs as pafs

    bucket = f"no-such-{uuid.uuid4().hex[:10]}"
    with pytest.raises(OSError) as info:  # pyarrow says so only in its message
        storage.s3_filesystem().get_file_info(pafs.FileSelector(f"{bucket}/p"))
    assert storage.describe_error(f"s3://{bucket}/p", info.value) == f"s3://{bucket}/p: bucket does not exist"
    with pytest.raises(StorageError, match=rf"^s3://{bucket}/p: bucket '{bucket}' does not exist$"):
        storage.check_access(f"s3://{bucket}/p")
    storage.ensure_bucket(bucket)  # a HEAD's bare 404 is what makes ensure_bucket create it
    storage.ensure_bucket(bucket)
    storage.check_access(f"s3://{bucket}/p")
    storage.s3_client().delete_bucket(Bucket=bucket)


@pytest.mark.slow
def test_s3_access_denied_is_classified_for_writes_too(s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    uri = storage.join(s3_bucket, "x")
    with pytest.raises(StorageError) as info:  # boto3: SignatureDoesNotMatch, 403, not retried
        storage.write_bytes(uri, b"x")
    assert _one_line(info) == f"{uri}: {storage.ACCESS_DENIED}"
