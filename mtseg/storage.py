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

import errno
import functools
import os
import posixpath
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from mtseg.errors import MtsegError

T = TypeVar("T")

# Access key ids are identifiers, not secrets (AWS prints them in errors); the rest are secrets.
_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")


class StorageError(MtsegError, RuntimeError):
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


# S3's naming rules for general-purpose buckets, which S3-compatible stores (SeaweedFS, MinIO)
# also enforce: 3-63 characters, lowercase letters, digits, '.' and '-', starting and ending
# with a letter or digit.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _parse(uri: str) -> tuple[str, str, str]:
    """``uri`` -> (scheme, bucket, path): ``("s3", bucket, key)`` or ``("", "", local path)``.

    Raises:
        StorageError: one line naming the URI and what is wrong with it.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"{uri!r}: empty URI (expected a local path or s3://bucket/prefix)")
    if "\x00" in uri:
        raise StorageError(f"{uri!r}: contains a NUL byte")
    scheme = _SCHEME.match(uri)
    if scheme is None:
        return "", "", uri
    if scheme.group(1) == "file":
        path = uri[len("file://") :]
        # file:///abs or file://localhost/abs; file://name/x would silently mean the path "name/x".
        if path.startswith("localhost/"):
            path = path[len("localhost") :]
        if not path.startswith("/"):
            raise StorageError(f"{uri}: a file:// URI needs an absolute path (file:///path)")
        return "", "", path
    if scheme.group(1) != "s3":
        raise StorageError(f"{uri}: unsupported URI scheme (use a local path, file:// or s3://)")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name (expected s3://bucket/prefix)")
    if not _BUCKET_NAME.match(bucket) or ".." in bucket:
        raise StorageError(
            f"{uri}: {bucket!r} is not a valid bucket name (3-63 lowercase letters, digits, '.' and '-')"
        )
    key = key.rstrip("/")
    if key and any(part in ("", ".", "..") for part in key.split("/")):
        # An object store keeps "a//b" and "a/../b" as literal keys that no path-style
        # reader (pyarrow, Ray) finds again, so they are refused rather than written.
        raise StorageError(f"{uri}: empty, '.' or '..' path segment in the key")
    return "s3", bucket, key


def check_uri(uri: str) -> str:
    """Parse and validate a URI given by a user, before anything is read or written.

    Every command checks each URI it takes with this, so that a typo fails at once with one
    line instead of writing somewhere unintended (``s3://`` alone would otherwise become a
    bucket named after the first path part joined onto it) or failing half-way.

    Args:
        uri: a local path, ``file:///abs/path`` or ``s3://bucket[/prefix]``.

    Returns:
        The URI without trailing slashes (``s3://b/p/`` -> ``s3://b/p``; a local path as given).

    Raises:
        StorageError: empty, an unsupported scheme, no or an invalid bucket name, an empty,
            ``.`` or ``..`` key segment, or a ``file://`` URI that is not absolute.
    """
    scheme, bucket, key = _parse(uri)
    if scheme == "s3":
        return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    return uri


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``); StorageError for anything else (see :func:`check_uri`)."""
    scheme, bucket, key = _parse(str(uri))
    if scheme != "s3":
        raise StorageError(f"{uri}: not an s3://bucket/prefix URI")
    return bucket, key


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
    scheme, bucket, path = _parse(str(uri))
    if scheme == "s3":
        return s3_filesystem(), f"{bucket}/{path}".rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(path)


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


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


# Local write failures worth their own words; anything else keeps the OS's message.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


def _os_reason(path: str, exc: OSError, needed: int | None = None) -> str:
    """What a local OSError means for ``path``, with the space needed and free on a full disk."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        parent = path
        while parent and not os.path.isdir(parent):
            parent = os.path.dirname(parent)
        try:
            free = f", {_size(shutil.disk_usage(parent or '/').free)} free"
        except OSError:
            free = ""
        need = f"{_size(needed)} to write" if needed is not None else "more space needed"
        return f"no space left on the device ({need}{free})"
    return (exc.strerror or str(exc)).rstrip(".")


def describe_error(uri: str, exc: BaseException) -> str:
    """A one-line, secret-free reason for a storage failure on ``uri``."""
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return redact(f"{uri}: {_os_reason(str(uri), exc)}")
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
    """Write ``data`` to ``uri`` atomically: complete under its final name or not at all.

    Raises:
        StorageError: one line naming ``uri`` and the reason (a full disk states the bytes to
            write and the space free; also a read-only or missing directory, access denied).
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _wrap(uri, lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    _, path = resolve(uri)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        # A full disk, a read-only directory or a file in the way: one line naming the path.
        raise StorageError(f"{uri}: {_os_reason(path, e, needed=len(data))}") from None
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


def is_inside(uri: str, root: str) -> bool:
    """True when ``uri`` lies strictly below ``root`` (same store; local paths with links resolved)."""
    (s1, b1, p1), (s2, b2, p2) = _parse(uri), _parse(root)
    if (s1, b1) != (s2, b2):
        return False
    if s1 == "s3":  # _parse has refused '.', '..' and empty key segments
        return p1 != p2 and (p2 == "" or p1.startswith(p2 + "/"))
    p1, p2 = os.path.realpath(p1), os.path.realpath(p2)
    return p1 != p2 and os.path.commonpath([p1, p2]) == p2


def delete(uri: str, recursive: bool = False, *, within: str | None = None) -> None:
    """Delete a file, or a directory tree with ``recursive``; missing is not an error.

    Args:
        within: refuse (StorageError) unless ``uri`` lies strictly inside this URI, e.g. a
            run's own prefix: a delete built from user input can then never reach outside it.
    """
    if within is not None and not is_inside(uri, within):
        raise StorageError(f"{uri}: refusing to delete outside {within}")
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

    For S3 this asks the server about the bucket; for a local path it checks that the nearest
    existing ancestor is a writable directory (not a file in the way).

    Raises:
        StorageError: the URI is malformed (see :func:`check_uri`) or cannot be written.
    """
    check_uri(uri)
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
    parent = parent or "/"
    if not os.path.isdir(parent):
        raise StorageError(f"{uri}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK):
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
    "check_uri",
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
