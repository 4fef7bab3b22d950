"""One place that turns a URI into a filesystem: ``/path``, ``file:///path`` or ``s3://bucket/prefix``.

All of mtseg's reads and writes go through here, so the S3 endpoint (``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``, passed explicitly: pyarrow does not reliably read them) and credentials
are handled once, and no secret appears in a message (:func:`redact`).

Writes are atomic: a temp file + ``os.replace`` locally, a single PUT on S3 (a streamed
multipart upload can be completed with partial data when interrupted). Retries are the S3
clients' own (botocore's and the AWS SDK's ``standard`` mode); a failure left after them
becomes one line, classified by exception type and S3 error code.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import posixpath
import re
import shutil
import uuid
from collections.abc import Iterator
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from mtseg.errors import MtsegError

# Access key ids are identifiers, not secrets (AWS prints them in errors); the rest are secrets.
_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")


class StorageError(MtsegError, RuntimeError):
    """A storage operation failed; the message names the URI and the reason, with no secrets."""


class NotFoundError(StorageError):
    """The object or file asked for does not exist."""


# Attempts per request, retries included. botocore backs off from 50 ms and the AWS SDK in
# pyarrow from 1 s (doubling, up to 20 s, times a random factor): with these counts each waits
# about half a minute on average before giving up, which rides out an object store restarting
# (tests/train/test_train_ray.py stops one for seconds mid-run). The checks a command makes
# before it starts (check_access, ensure_bucket) report a store that is down within a second.
BOTO_MAX_ATTEMPTS = 12
ARROW_MAX_ATTEMPTS = 7
CHECK_MAX_ATTEMPTS = 5
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 30


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
        raise StorageError(f"{uri}: {bucket!r} is not a valid bucket name (3-63 lowercase letters, digits, '.' and '-')")
    key = key.rstrip("/")
    if key and any(part in ("", ".", "..") for part in key.split("/")):
        # An object store keeps "a//b" and "a/../b" as literal keys that no path-style
        # reader (pyarrow, Ray) finds again, so they are refused rather than written.
        raise StorageError(f"{uri}: empty, '.' or '..' path segment in the key")
    return "s3", bucket, key


def check_uri(uri: str) -> str:
    """Validate a user's URI (local path, ``file:///abs`` or ``s3://bucket[/prefix]``) before any I/O,
    so that a typo fails at once (StorageError) instead of writing somewhere unintended.

    Returns:
        The URI without trailing slashes (``s3://b/p/`` -> ``s3://b/p``; a local path as given).
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
    kwargs: dict = {"region": region, "connect_timeout": CONNECT_TIMEOUT_S, "request_timeout": READ_TIMEOUT_S}
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=token)
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "http"
        # S3-compatible servers (SeaweedFS, MinIO) want path-style addressing.
        kwargs["force_virtual_addressing"] = False
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=ARROW_MAX_ATTEMPTS)
    return pafs.S3FileSystem(**kwargs)


def _s3_settings() -> tuple[str | None, str | None, str | None, str | None, str]:
    """Endpoint, access key, secret, session token and region from the environment: the cache key of a client."""
    return (
        s3_endpoint(),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("AWS_SECRET_ACCESS_KEY"),
        os.environ.get("AWS_SESSION_TOKEN"),
        os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    )


def s3_filesystem() -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem configured from the environment (cached per settings)."""
    return _s3_filesystem(*_s3_settings())


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """``uri`` -> (pyarrow filesystem, path inside it): a local absolute path, or ``bucket/prefix`` on S3."""
    scheme, bucket, path = _parse(str(uri))
    if scheme == "s3":
        return s3_filesystem(), f"{bucket}/{path}".rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(path)


def s3_client(max_attempts: int | None = None):
    """A boto3 S3 client with the same endpoint and credentials, cached per settings (one takes ~0.3 s of CPU to build).

    Args:
        max_attempts: per request, retries included; default :data:`BOTO_MAX_ATTEMPTS`.
    """
    return _s3_client(*_s3_settings(), max_attempts or BOTO_MAX_ATTEMPTS)


@functools.lru_cache(maxsize=16)
def _s3_client(endpoint: str | None, key: str | None, secret: str | None, token: str | None, region: str, max_attempts: int):
    import boto3
    from botocore.config import Config as BotoConfig

    # Its own session with the credentials given: boto3's default session caches the
    # credentials it first read, and a client must follow the environment (the cache key).
    session = boto3.session.Session(aws_access_key_id=key, aws_secret_access_key=secret, aws_session_token=token)
    return session.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        config=BotoConfig(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
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


ACCESS_DENIED = "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
NOT_FOUND, NO_BUCKET = "not found", "bucket does not exist"
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "403"}
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}


def s3_error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ``ClientError`` (``NoSuchKey``, ``AccessDenied``, ``404``...), else ""."""
    from botocore.exceptions import ClientError

    return str(exc.response.get("Error", {}).get("Code", "")) if isinstance(exc, ClientError) else ""


def _boto_reason(exc: BaseException) -> str | None:
    """What a botocore exception means, or None when ``exc`` is not one."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    # Refused, connect or read timeout, closed without a response, proxy, TLS.
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return f"cannot reach the S3 endpoint {s3_endpoint() or '(AWS default)'}"
    if not isinstance(exc, ClientError):
        return None
    code = s3_error_code(exc)
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code == "NoSuchBucket":
        return NO_BUCKET
    if code in _DENIED_CODES or status == 403:
        return ACCESS_DENIED
    if code in _NOT_FOUND_CODES or status == 404:
        return NOT_FOUND
    return str(exc).splitlines()[0]


def _bucket_reason(uri: str) -> str | None:
    """Why the bucket of ``uri`` cannot be used, asked once through boto3, or None when it can.

    pyarrow reports S3 failures other than a missing object as a plain OSError whose only
    detail is its text; boto3 answers the same question with an exception type and a code.
    """
    bucket, _ = split_s3(uri)
    try:
        s3_client(max_attempts=1).head_bucket(Bucket=bucket)
    except Exception as e:  # noqa: BLE001 - classified below
        reason = _boto_reason(e)
        return NO_BUCKET if reason == NOT_FOUND else reason  # a HEAD answers a missing bucket with a bare 404
    return None


def _reason(uri: str, exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return _os_reason(str(uri), exc)
    reason = _boto_reason(exc)
    if reason is None and isinstance(exc, FileNotFoundError):
        reason = NOT_FOUND
    if reason is None and isinstance(exc, OSError) and is_s3(uri):
        reason = _bucket_reason(uri)
    if reason is None:
        text = str(exc)
        reason = text.splitlines()[0] if text else type(exc).__name__
    return reason


def describe_error(uri: str, exc: BaseException) -> str:
    """A one-line, secret-free reason for a storage failure on ``uri``."""
    if isinstance(exc, StorageError):
        return str(exc)
    return redact(f"{uri}: {_reason(uri, exc)}")


@contextlib.contextmanager
def translate_errors(uri: str) -> Iterator[None]:
    """Turn any backend error raised inside into a one-line :class:`StorageError` (:class:`NotFoundError`) on ``uri``."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - every backend error becomes one clear line
        reason = _reason(uri, e)
        raise (NotFoundError if reason == NOT_FOUND else StorageError)(redact(f"{uri}: {reason}")) from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically: complete under its final name or not at all.

    A full disk's StorageError states the bytes to write and the space free.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with translate_errors(uri):
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
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
    with translate_errors(uri), fs.open_input_stream(path) as f:
        return f.read()


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    with translate_errors(uri):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def _list(uri: str, kind: pafs.FileType, recursive: bool) -> list[str]:
    fs, path = resolve(uri)
    with translate_errors(uri):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + i.path for i in infos if i.type == kind)


def list_files(uri: str, recursive: bool = False) -> list[str]:
    """Files directly under (or, with ``recursive``, anywhere below) ``uri``, as URIs, sorted."""
    return _list(uri, pafs.FileType.File, recursive)


def list_dirs(uri: str) -> list[str]:
    """Immediate sub-directories of ``uri`` as URIs, sorted."""
    return _list(uri, pafs.FileType.Directory, False)


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
    with translate_errors(uri):
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.Directory and recursive:
            fs.delete_dir(path)
        elif kind == pafs.FileType.File:
            fs.delete_file(path)


def _bucket_exists(uri: str, bucket: str) -> bool:
    try:
        with translate_errors(uri):
            s3_client(max_attempts=CHECK_MAX_ATTEMPTS).head_bucket(Bucket=bucket)
    except NotFoundError:  # a HEAD answers a missing bucket with a bare 404
        return False
    return True


def ensure_bucket(name: str) -> None:
    """Create bucket ``name`` if it does not exist (idempotent)."""
    uri = f"s3://{name}"
    if not _bucket_exists(uri, name):
        with translate_errors(uri):
            s3_client().create_bucket(Bucket=name)


def check_access(uri: str) -> None:
    """Fail fast with a one-line StorageError if ``uri`` is malformed or unusable (missing bucket, bad credentials,
    endpoint down; locally, the nearest existing ancestor is not a writable directory)."""
    check_uri(uri)
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        if not _bucket_exists(uri, bucket):
            raise StorageError(f"{uri}: bucket {bucket!r} does not exist")
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


# ---------------------------------------------------------------------------- Ray's storage filesystem


class _UploadOnClose(io.BytesIO):
    """A writable file that buffers in memory and PUTs the whole object on close (:func:`write_bytes`).

    One PUT cannot leave a truncated object. It goes through boto3: this runs on one of Arrow's
    I/O threads (inside ``copy_files``), where a pyarrow S3 stream would queue its multipart
    parts on that same, possibly exhausted, pool and deadlock.
    """

    def __init__(self, uri: str):
        super().__init__()
        self._uri = uri

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue()
            super().close()  # first: a failed PUT is not tried again when the object is collected
            write_bytes(self._uri, data)


class _WholeObjectHandler(pafs.FileSystemHandler):
    """An S3FileSystem whose files are read and written whole, each with one boto3 GET or PUT.

    Ray Train and Tune copy checkpoints with ``pyarrow.fs.copy_files`` (see :class:`_UploadOnClose`).
    """

    def __init__(self, fs: pafs.S3FileSystem):
        self.fs = fs

    def __eq__(self, other):
        return isinstance(other, _WholeObjectHandler) and self.fs.equals(other.fs)

    def get_type_name(self):
        return "whole-object+" + self.fs.type_name

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        return self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        return self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        return self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        return self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        return self.fs.delete_file(path)

    def move(self, src, dest):
        return self.fs.move(src, dest)

    def copy_file(self, src, dest):
        return self.fs.copy_file(src, dest)

    def open_input_file(self, path):
        bucket, _, key = path.partition("/")
        with translate_errors("s3://" + path):
            return pa.BufferReader(s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())

    open_input_stream = open_input_file

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_UploadOnClose("s3://" + path), mode="w")

    def open_append_stream(self, path, metadata):
        raise NotImplementedError("append is not supported on object storage")


def ray_storage(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(storage_filesystem, storage_path)`` for Ray's ``RunConfig``; on S3, files are read and written whole."""
    fs, path = resolve(uri)
    if is_s3(uri):
        fs = pafs.PyFileSystem(_WholeObjectHandler(fs))
    return fs, path
