"""One place that turns a URI into a filesystem: ``/path``, ``file:///path`` or ``s3://bucket/prefix``.

Everything in mtseg that reads or writes data, shards, checkpoints or results goes through
here, so the S3 endpoint and credentials are handled once:

* endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (pyarrow does not reliably read
  them, so they are passed explicitly);
* credentials from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``);
* secrets never appear in messages: every error goes through :func:`redact`.

Writes are atomic: an object is either complete under its final name or absent. Locally that
is a temp file + ``os.replace``; on S3 a single PUT (boto3 ``put_object``) is atomic by itself,
whereas a streamed multipart upload can be completed with partial data when interrupted.
"""

from __future__ import annotations

import functools
import os
import posixpath
import random
import time
import uuid
from typing import Callable, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

T = TypeVar("T")

# Access key ids are identifiers, not secrets (AWS prints them in errors); the rest are secrets.
_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and the reason, with no secrets."""


def redact(text: str) -> str:
    """Remove credential values from ``text``."""
    for var in _SECRET_VARS:
        secret = os.environ.get(var)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its scheme."""
    uri = str(uri)
    if is_s3(uri):
        return "s3://" + posixpath.join(uri[len("s3://") :].rstrip("/"), *parts)
    if uri.startswith("file://"):
        return "file://" + os.path.join(uri[len("file://") :], *parts)
    return os.path.join(uri, *parts)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"{uri}: not an s3://bucket/prefix URI")
    return parsed.netloc, parsed.path.lstrip("/")


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, key: str | None, secret: str | None, token: str | None, region: str):
    kwargs: dict = {"region": region, "connect_timeout": 5, "request_timeout": 30}
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=token)
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "http"
        # S3-compatible servers (SeaweedFS, MinIO) want path-style addressing.
        kwargs["force_virtual_addressing"] = False
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=5)
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem configured from the environment (cached per settings)."""
    return _s3_filesystem(
        s3_endpoint(),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("AWS_SECRET_ACCESS_KEY"),
        os.environ.get("AWS_SESSION_TOKEN"),
        os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    )


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Turn a URI into (pyarrow filesystem, path inside it).

    ``/abs``, ``rel/path`` and ``file:///abs`` give a LocalFileSystem and an absolute path;
    ``s3://bucket/prefix`` gives an S3FileSystem and ``bucket/prefix``.
    """
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_filesystem(), f"{bucket}/{key}".rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        raise StorageError(f"{uri}: unsupported URI scheme (use a local path, file:// or s3://)")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def s3_client():
    """A boto3 S3 client for bucket and object admin, with the same endpoint and credentials."""
    import boto3
    from botocore.config import Config as BotoConfig

    # A fresh session each time: boto3's default session caches the credentials it first
    # read, and a client must follow the environment it is created in.
    session = boto3.session.Session(
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=os.environ.get("AWS_SESSION_TOKEN"),
    )
    return session.client(
        "s3",
        endpoint_url=s3_endpoint(),
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=BotoConfig(
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
            s3={"addressing_style": "path"},
        ),
    )


def describe_error(uri: str, exc: BaseException) -> str:
    """A one-line, secret-free reason for a storage failure on ``uri``."""
    text = str(exc)
    low = text.lower()
    code = ""
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        code = str(resp.get("Error", {}).get("Code", ""))
    if code in ("NoSuchBucket",) or "nosuchbucket" in low or "bucket does not exist" in low:
        reason = "bucket does not exist"
    elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403") or any(
        s in low
        for s in ("invalidaccesskeyid", "signaturedoesnotmatch", "access denied", "accessdenied", "access_denied", "http status 403", "forbidden")
    ):
        reason = "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    elif any(s in low for s in ("connection refused", "could not connect", "couldn't connect", "connect timeout", "timed out", "endpoint url", "curlcode: 7", "failed to connect")):
        reason = f"cannot reach the S3 endpoint {s3_endpoint() or '(AWS default)'}"
    elif isinstance(exc, FileNotFoundError) or code in ("NoSuchKey", "404") or "not found" in low or "nosuchkey" in low:
        reason = "not found"
    else:
        reason = text.splitlines()[0] if text else type(exc).__name__
    return redact(f"{uri}: {reason}")


def _wrap(uri: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - every backend error becomes one clear line
        raise StorageError(describe_error(uri, e)) from None


def retry(fn: Callable[[], T], *, what: str, attempts: int = 6, base_delay: float = 0.5, max_delay: float = 8.0) -> T:
    """Call ``fn`` with exponential backoff on transient storage errors (connection, 5xx, throttling).

    Used for checkpoint uploads: an object store down for a few seconds must not kill training.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            msg = describe_error(what, e)
            permanent = any(s in msg for s in ("access denied", "bucket does not exist", "unsupported URI"))
            if permanent or attempt == attempts - 1:
                raise StorageError(msg) from None
            delay = min(max_delay, base_delay * 2**attempt) * (0.5 + random.random() / 2)
            time.sleep(delay)
    raise AssertionError("unreachable")


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically: complete under its final name or not at all."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _wrap(uri, lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    _, path = resolve(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)

    def _read():
        with fs.open_input_stream(path) as f:
            return f.read()

    return _wrap(uri, _read)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    info = _wrap(uri, lambda: fs.get_file_info(path))
    return info.type != pafs.FileType.NotFound


def list_files(uri: str, recursive: bool = False) -> list[str]:
    """Files directly under (or, with ``recursive``, anywhere below) ``uri``, as URIs, sorted."""
    fs, path = resolve(uri)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
    infos = _wrap(uri, lambda: fs.get_file_info(selector))
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File)


def list_dirs(uri: str) -> list[str]:
    """Immediate sub-directories of ``uri`` as URIs, sorted."""
    fs, path = resolve(uri)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    infos = _wrap(uri, lambda: fs.get_file_info(selector))
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.Directory)


def delete(uri: str, recursive: bool = False) -> None:
    """Delete a file, or a directory tree with ``recursive``; missing is not an error."""
    fs, path = resolve(uri)
    info = _wrap(uri, lambda: fs.get_file_info(path))
    if info.type == pafs.FileType.NotFound:
        return
    if info.type == pafs.FileType.Directory:
        if recursive:
            _wrap(uri, lambda: fs.delete_dir(path))
        return
    _wrap(uri, lambda: fs.delete_file(path))


def ensure_bucket(name: str) -> None:
    """Create bucket ``name`` if it does not exist (idempotent)."""
    client = s3_client()
    try:
        client.head_bucket(Bucket=name)
        return
    except Exception as e:  # noqa: BLE001
        reason = describe_error(f"s3://{name}", e)
        if "not found" not in reason and "does not exist" not in reason:
            raise StorageError(reason) from None
    _wrap(f"s3://{name}", lambda: client.create_bucket(Bucket=name))


def check_access(uri: str) -> None:
    """Fail fast, with one clear line, if ``uri`` cannot be used (missing bucket, bad credentials, endpoint down).

    For S3 this asks the server about the bucket; for a local path it checks the parent is writable.
    """
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        try:
            s3_client().head_bucket(Bucket=bucket)
        except Exception as e:  # noqa: BLE001
            reason = describe_error(uri, e)
            # HEAD on a bucket has no body, so a missing bucket is a bare 404.
            if reason.endswith(": not found"):
                reason = f"{uri}: bucket {bucket!r} does not exist"
            raise StorageError(reason) from None
        return
    _, path = resolve(uri)
    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent or "/", os.W_OK):
        raise StorageError(f"{uri}: not writable")


# ---------------------------------------------------------------------------- fault-tolerant filesystem


class _UploadOnClose:
    """A writable file that buffers in memory and PUTs the whole object on close, with retries.

    A streamed upload interrupted half-way can leave a truncated object (or fail the whole
    checkpoint); one PUT of the complete bytes, retried with backoff, cannot. The PUT goes
    through boto3, not pyarrow: this runs on one of Arrow's I/O threads (inside ``copy_files``),
    and a pyarrow S3 stream would queue its multipart parts on that same, possibly exhausted,
    pool and deadlock.
    """

    def __init__(self, uri: str):
        import io

        self._uri, self._buf = uri, io.BytesIO()
        self.closed = False

    def write(self, data) -> int:
        return self._buf.write(data)

    def tell(self) -> int:
        return self._buf.tell()

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if self.closed:
            return
        data = self._buf.getvalue()
        retry(lambda: write_bytes(self._uri, data), what=self._uri)
        self.closed = True


class RetryingFileSystemHandler(pafs.FileSystemHandler):
    """Wraps a pyarrow filesystem so every operation retries transient errors with backoff.

    Given to Ray Train as ``RunConfig(storage_filesystem=...)``: checkpoint uploads and the
    checkpoint manager's bookkeeping survive an object store that is down for a few seconds.
    """

    def __init__(self, fs: pafs.S3FileSystem, attempts: int = 8):
        if not isinstance(fs, pafs.S3FileSystem):
            raise TypeError(f"RetryingFileSystemHandler wraps an S3FileSystem, not {type(fs).__name__}")
        self.fs = fs
        self.attempts = attempts

    def __eq__(self, other):
        return isinstance(other, RetryingFileSystemHandler) and self.fs.equals(other.fs)

    def __ne__(self, other):
        return not self == other

    def _r(self, fn, what):
        return retry(fn, what=what, attempts=self.attempts)

    def get_type_name(self):
        return "retrying+" + self.fs.type_name

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self._r(lambda: self.fs.get_file_info(paths), str(paths[:1]))

    def get_file_info_selector(self, selector):
        return self._r(lambda: self.fs.get_file_info(selector), selector.base_dir)

    def create_dir(self, path, recursive):
        return self._r(lambda: self.fs.create_dir(path, recursive=recursive), path)

    def delete_dir(self, path):
        return self._r(lambda: self.fs.delete_dir(path), path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        return self._r(lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok), path)

    def delete_root_dir_contents(self):
        return self._r(lambda: self.fs.delete_dir_contents("/", accept_root_dir=True), "/")

    def delete_file(self, path):
        return self._r(lambda: self.fs.delete_file(path), path)

    def move(self, src, dest):
        return self._r(lambda: self.fs.move(src, dest), src)

    def copy_file(self, src, dest):
        return self._r(lambda: self.fs.copy_file(src, dest), src)

    def _get(self, path):
        # boto3, not pyarrow, for the same reason as _UploadOnClose: no nested Arrow I/O.
        import pyarrow as pa

        bucket, _, key = path.partition("/")
        data = self._r(lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read(), "s3://" + path)
        return pa.BufferReader(data)

    def open_input_stream(self, path):
        return self._get(path)

    def open_input_file(self, path):
        return self._get(path)

    def open_output_stream(self, path, metadata):
        import pyarrow as pa

        return pa.PythonFile(_UploadOnClose("s3://" + path), mode="w")

    def open_append_stream(self, path, metadata):
        raise NotImplementedError("append is not supported on object storage")


def retrying_filesystem(fs: pafs.S3FileSystem) -> pafs.FileSystem:
    """``fs`` wrapped so each operation retries transient storage errors (see RetryingFileSystemHandler)."""
    return pafs.PyFileSystem(RetryingFileSystemHandler(fs))


__all__ = [
    "StorageError",
    "check_access",
    "delete",
    "describe_error",
    "ensure_bucket",
    "exists",
    "is_s3",
    "join",
    "list_dirs",
    "list_files",
    "read_bytes",
    "redact",
    "resolve",
    "retry",
    "retrying_filesystem",
    "s3_client",
    "s3_endpoint",
    "s3_filesystem",
    "split_s3",
    "write_bytes",
]
