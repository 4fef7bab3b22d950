"""One live driver per run, and what became of each run.

Two files beside a run's checkpoints (``<storage_path>/<run_name>/``):

* ``lease.json``: who drives the run, with a heartbeat. Every run start (``mtseg train``, a
  Tune trial, a submitted job) goes through :func:`guard_run`; a live lease stops it with one
  line naming the owner. A lease is taken over when its heartbeat is older than ``ttl_s``, or
  at once when its holder ran on this host and that process is gone (``kill -9``, then resume).
  It is created atomically: an S3 conditional write (best effort where the store has none),
  locally ``O_EXCL``.
* ``outcome.json``: ``running``, then ``finished``, ``failed`` or ``interrupted`` with a
  one-line reason; a ``running`` outcome whose lease went stale reads back as ``interrupted``.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from mtseg import storage
from mtseg.errors import MtsegError

_CAUSE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt): ")
LEASE_FILE = "lease.json"
OUTCOME_FILE = "outcome.json"
TTL_S = 90.0
HEARTBEAT_S = 15.0


class RunLockedError(MtsegError, RuntimeError):
    """Another live driver holds the run's lease."""


class NotARunError(MtsegError, ValueError):
    """``train.run_name`` names an existing folder that holds no mtseg run."""


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since boot), 0.0 where the OS does not say, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Field 22 (starttime, in clock ticks); the name in field 2 may contain spaces.
            return int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError):  # no /proc (macOS): alive or not is all we know
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0.0


@dataclass
class Holder:
    """Who holds a lease."""

    owner: str
    host: str
    pid: int
    pid_started: float  # seconds since boot; 0.0 where unknown
    token: str
    acquired_at: float
    heartbeat_at: float
    ttl_s: float

    @classmethod
    def me(cls, ttl_s: float) -> Holder:
        now = time.time()
        pid = os.getpid()
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "unknown"
        host = socket.gethostname()
        return cls(f"{user}@{host}:{pid}", host, pid, _process_start(pid) or 0.0, uuid.uuid4().hex, now, now, ttl_s)

    def stale_reason(self, now: float | None = None) -> str | None:
        """Why this lease no longer protects a live driver, or None while it does."""
        now = time.time() if now is None else now
        if self.host == socket.gethostname():
            started = _process_start(self.pid)
            # A reused pid belongs to another process, with another start time.
            if started is None or (started and self.pid_started and abs(started - self.pid_started) > 0.05):
                return f"its driver {self.owner} is no longer running"
        age = now - self.heartbeat_at
        if age > self.ttl_s:
            return f"its driver {self.owner} stopped heartbeating {age:.0f}s ago"
        return None


def _read_json(uri: str) -> tuple[dict | None, str | None]:
    """(JSON object, S3 ETag) of ``uri``, or (None, None) when it does not exist or is unreadable."""
    try:
        if storage.is_s3(uri):
            bucket, key = storage.split_s3(uri)
            obj = storage.s3_client().get_object(Bucket=bucket, Key=key)
            return json.loads(obj["Body"].read()), obj.get("ETag")
        with open(storage.resolve(uri)[1], "rb") as f:
            return json.loads(f.read()), None
    except (OSError, ValueError, storage.StorageError):
        return None, None
    except Exception as e:  # noqa: BLE001 - botocore's NoSuchKey and friends
        if storage.s3_error_code(e) in ("NoSuchKey", "404"):
            return None, None
        raise storage.StorageError(storage.describe_error(uri, e)) from None


class _Unsupported(Exception):
    """The store rejects conditional writes."""


def _put_conditional(uri: str, body: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> bool:
    """S3 PUT with a precondition: True when written, False when the precondition failed."""
    bucket, key = storage.split_s3(uri)
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Body": body}
    if if_none_match:
        kwargs["IfNoneMatch"] = "*"
    if if_match is not None:
        kwargs["IfMatch"] = if_match
    try:
        storage.s3_client().put_object(**kwargs)
        return True
    except Exception as e:  # noqa: BLE001
        code = storage.s3_error_code(e)
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            return False
        if code in ("NotImplemented", "501"):
            raise _Unsupported from None
        raise storage.StorageError(storage.describe_error(uri, e)) from None


class RunLease:
    """The lease on ``run_uri`` (see the module docstring); take-overs and a lost lease go to ``log``."""

    def __init__(
        self, run_uri: str, *, ttl_s: float = TTL_S, heartbeat_s: float = HEARTBEAT_S, log: Callable[[str], None] = print
    ):
        self.run_uri = run_uri
        self.uri = storage.join(run_uri, LEASE_FILE)
        self.ttl_s, self.heartbeat_s, self.log = ttl_s, heartbeat_s, log
        self.holder = Holder.me(ttl_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: str | None = None

    def fail(self, reason: str) -> None:
        """Record that the run failed without an exception reaching :func:`guard_run` (Ray's ``Result.error``)."""
        self.failure = reason

    def _body(self) -> bytes:
        return json.dumps(asdict(self.holder), indent=2, sort_keys=True).encode()

    # ------------------------------------------------------------------ acquire

    def acquire(self) -> None:
        """Take the lease, or raise :class:`RunLockedError` naming the live owner."""
        for _ in range(3):  # a lost race re-reads the winner's lease
            current, etag = _read_json(self.uri)
            if current is not None:
                other = _holder(current)
                if other is not None and other.token == self.holder.token:
                    return
                reason = _refuse_live(self.run_uri, other)
                self.log(f"[train] taking over the lease on {self.run_uri}: {reason}")
            if self._create(replace_etag=etag if current is not None else None, exists=current is not None):
                self._thread = threading.Thread(target=self._beat, name="mtseg-run-lease", daemon=True)
                self._thread.start()
                return
        raise RunLockedError(f"run {self.run_uri}: another driver took the lease at the same time")

    def _create(self, *, replace_etag: str | None, exists: bool) -> bool:
        self.holder.acquired_at = self.holder.heartbeat_at = time.time()
        body = self._body()
        if storage.is_s3(self.uri):
            try:
                if exists:
                    return _put_conditional(self.uri, body, if_match=replace_etag)
                return _put_conditional(self.uri, body, if_none_match=True)
            except _Unsupported:
                return self._best_effort(body)
        path = storage.resolve(self.uri)[1]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if exists:
            try:  # only one of several racing drivers renames the stale lease away
                os.rename(path, f"{path}.stale-{self.holder.token[:8]}")
            except FileNotFoundError:
                return False
            os.unlink(f"{path}.stale-{self.holder.token[:8]}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        return True

    def _best_effort(self, body: bytes) -> bool:
        """For stores without conditional writes: write, let a racing writer land, read back."""
        storage.write_bytes(self.uri, body)
        time.sleep(1.0)
        current, _ = _read_json(self.uri)
        return current is not None and current.get("token") == self.holder.token

    # ------------------------------------------------------------------ heartbeat, release

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                current, _ = _read_json(self.uri)
                if current is None or current.get("token") != self.holder.token:
                    owner = current.get("owner") if current else "nobody"
                    self.log(f"[train] WARNING: lost the lease on {self.run_uri} (now held by {owner})")
                    return
                self.holder.heartbeat_at = time.time()
                storage.write_bytes(self.uri, self._body())
            except storage.StorageError as e:  # a store down for a while: try again next beat
                self.log(f"[train] lease heartbeat failed: {e}")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if this driver still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        current, _ = _read_json(self.uri)
        if current is not None and current.get("token") == self.holder.token:
            with contextlib.suppress(storage.StorageError):
                storage.delete(self.uri)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _refuse_live(run_uri: str, other: Holder | None) -> str:
    """Raise RunLockedError while ``other`` holds a live lease; else say why it can be taken over."""
    reason = other.stale_reason() if other is not None else "it is unreadable"
    if reason is None:
        age = time.time() - other.heartbeat_at
        raise RunLockedError(
            f"run {run_uri} is in use by {other.owner} (heartbeat {age:.0f}s ago); "
            f"stop that driver, or wait {other.ttl_s:.0f}s after it died, or pick another train.run_name"
        )
    return reason


def check_free(run_uri: str) -> None:
    """Fail before a cluster is touched when another live driver holds the run (:func:`guard_run`
    takes the lease later; this spares the user a Ray start).

    Raises:
        RunLockedError: one line naming the owner.
    """
    current, _ = _read_json(storage.join(run_uri, LEASE_FILE))
    if current is not None:
        _refuse_live(run_uri, _holder(current))


def check_is_run(run_uri: str) -> None:
    """Refuse a run directory that holds files but no mtseg run (no lease, no outcome, no complete
    checkpoint), e.g. a folder of someone's files: "resuming" it would train from step 0 over
    its ``config.yaml``, and ``--restart`` would delete its files. A missing or empty directory
    is a new run.

    Raises:
        NotARunError: one line naming the directory; nothing was written.
    """
    if not storage.list_files(run_uri, recursive=True):
        return
    if any(storage.exists(storage.join(run_uri, name)) for name in (LEASE_FILE, OUTCOME_FILE)):
        return
    from mtseg.train import checkpoint as ckpt  # torch: only for a folder with neither file

    if ckpt.latest_valid(run_uri, log=lambda *a: None) is None:
        raise NotARunError(
            f"train.run_name: {run_uri} exists and is not an mtseg run (no {LEASE_FILE}, {OUTCOME_FILE} or complete "
            "checkpoint); pick another train.run_name or empty that folder"
        )


def _holder(data: dict) -> Holder | None:
    try:
        return Holder(**{k: data[k] for k in Holder.__dataclass_fields__})
    except (KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------- outcome


def write_outcome(run_uri: str, status: str, reason: str = "", *, owner: str = "", started_at: float | None = None) -> None:
    """Record what became of a run (``running``, ``finished``, ``failed``, ``interrupted``).

    Never raises: a run that failed because its disk is full must still end with its own error.
    """
    record = {
        "status": status,
        "reason": reason,
        "owner": owner,
        "started_at": started_at,
        "ended_at": None if status == "running" else time.time(),
    }
    try:
        storage.write_bytes(storage.join(run_uri, OUTCOME_FILE), json.dumps(record, indent=2).encode())
    except storage.StorageError:
        pass


def read_outcome(run_uri: str) -> dict | None:
    """What became of a run: ``outcome.json``, with a ``running`` run whose lease went stale as ``interrupted``.

    Returns:
        ``{"status", "reason", "owner", "started_at", "ended_at"}`` or None when the run
        recorded nothing.
    """
    outcome, _ = _read_json(storage.join(run_uri, OUTCOME_FILE))
    if outcome is None:
        return None
    if outcome.get("status") == "running":
        lease, _ = _read_json(storage.join(run_uri, LEASE_FILE))
        holder = _holder(lease) if lease else None
        reason = holder.stale_reason() if holder is not None else "its driver ended without recording an outcome"
        if reason is not None:
            outcome = {**outcome, "status": "interrupted", "reason": reason}
    return outcome


def describe_exit(exc: BaseException | None) -> tuple[str, str]:
    """(status, one-line reason) for how a driver's run ended."""
    if exc is None:
        return "finished", ""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", "stopped with Ctrl-C (SIGINT)"
    if isinstance(exc, SystemExit):
        # Ray Train's SIGINT handler aborts the run and exits; so does mtseg's SIGTERM handler.
        return "interrupted", f"the driver was stopped (exit code {exc.code}: Ctrl-C or SIGTERM)"
    return "failed", storage.redact(error_line(exc))


def error_line(exc: BaseException) -> str:
    """One line for an error: the root cause, which in Ray Train's errors (each worker's traceback
    quoted) is the last ``SomeError: message`` line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if _CAUSE.match(line)]
    if causes:
        return causes[-1]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


@contextlib.contextmanager
def guard_run(run_uri: str, *, log: Callable[[str], None] = print) -> Iterator[RunLease]:
    """Hold the run's lease and record its outcome for the duration of the block.

    Raises:
        RunLockedError: another live driver holds the run; nothing was written.
    """
    with RunLease(run_uri, log=log) as lease:
        started = time.time()
        write_outcome(run_uri, "running", owner=lease.holder.owner, started_at=started)
        try:
            yield lease
        except BaseException as e:
            status, reason = describe_exit(e)
            write_outcome(run_uri, status, reason, owner=lease.holder.owner, started_at=started)
            raise
        status, reason = ("failed", lease.failure) if lease.failure else ("finished", "")
        write_outcome(run_uri, status, reason, owner=lease.holder.owner, started_at=started)
