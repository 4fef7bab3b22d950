"""Run mtseg's jobs on a Ray cluster through the Ray Jobs API, and manage them.

    mtseg submit train --config jobs/configs/demo.yaml train.epochs=2 --wait
    mtseg submit evaluate -- --checkpoint s3://bucket/runs/demo
    mtseg jobs list | status ID | logs ID [--follow] | stop ID [--wait]

``submit`` validates the config here, then sends ``jobs/<script>.py`` with the project as its
``working_dir`` and the storage endpoint and region as environment variables. Credentials are
not sent unless ``--forward-credentials``: Ray writes a job's ``runtime_env`` in plain text to
its logs and ``ray job list``, so the job uses the cluster's own.

The address is the head's dashboard URL: ``--address``, ``RAY_API_SERVER_ADDRESS``,
``RAY_ADDRESS``, then the head of ``mtseg cluster up``. Ray's auth token is read as Ray reads
it and sent on every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mtseg.cluster import PIN_RAY_ADDRESS_HOOK, storage_env
from mtseg.errors import MtsegError


@dataclass(frozen=True)
class JobSpec:
    """One job mtseg knows how to submit.

    Args:
        script: the entry script, relative to the project root.
        entrypoint_num_cpus: CPUs the driver reserves. Preparing, training, tuning and
            evaluation drivers only coordinate (prepare's shards are Ray tasks), so they
            reserve none and run on the head; predict does the work itself and reserves a CPU
            (a worker node when the head has none).
        help: one line for ``mtseg submit --help``.
        takes_config: the script takes ``--config FILE`` and ``key=value`` overrides; otherwise
            its own arguments (``mtseg submit evaluate -- --checkpoint ...``).
        command: the ``mtseg`` subcommand whose parser checks the arguments before submission
            (None: the script has its own parser).
    """

    script: str
    entrypoint_num_cpus: float
    help: str
    takes_config: bool = True
    command: str | None = None


JOBS: dict[str, JobSpec] = {
    "prepare": JobSpec("jobs/prepare_data.py", 0.0, "shard COCO into parquet shards + manifest at data.uri"),
    "train": JobSpec("jobs/train.py", 0.0, "distributed training (Ray Train)", command="train"),
    "tune": JobSpec("jobs/tune.py", 0.0, "task-weighting / architecture search (Ray Tune)", command="tune"),
    "study": JobSpec("jobs/study.py", 0.0, "arms x seeds study with intervals (Ray Tune)", command="study"),
    "evaluate": JobSpec(
        "jobs/evaluate.py", 0.0, "metrics of a checkpoint (Ray Data batch inference)", takes_config=False, command="evaluate"
    ),
    "predict": JobSpec("jobs/predict.py", 1.0, "predictions on image files", takes_config=False, command="predict"),
}

# Kept out of the uploaded working_dir on top of .gitignore (which Ray also honours): the
# patterns are anchored at the project root, so the package's own mtseg/data/ stays in.
WORKING_DIR_EXCLUDES = (
    "/.git",
    "/.venv",
    "/venv",
    "/runs",
    "/data",
    "/ray_results",
    "/build",
    "/htmlcov",
    "/.pytest_cache",
    "/benchmarks/results",
    "__pycache__",
    "*.egg-info",
    "*.pyc",
)

ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# A training job's metadata names its run, so that `jobs list` can show the run's own outcome.
RUN_METADATA_KEY = "mtseg.run"
DEFAULT_TOKEN_PATH = Path("~/.ray/auth_token")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# A head that has just started answers HTTP before its job agent has registered; submissions
# in that window fail with this message and succeed a moment later.
_AGENT_NOT_READY = "No available agent"


class SubmitError(MtsegError, RuntimeError):
    """A job could not be submitted or managed; the message is one line naming what was wrong."""


# ---------------------------------------------------------------------------- address and token


def resolve_address(address: str | None = None, *, environ: Mapping[str, str] | None = None, stack_dir: str | None = None) -> str:
    """The Ray Jobs API address to use: the head's dashboard URL.

    Args:
        address: ``--address``; wins over everything else.
        stack_dir: state dir of ``mtseg cluster up`` (default ``runs/stack``), the last resort.

    Returns:
        The URL with no trailing slash, e.g. ``http://127.0.0.1:8265``.

    Raises:
        SubmitError: no address anywhere, or one that is not an ``http(s)://`` URL.
    """
    environ = os.environ if environ is None else environ
    candidates = [("--address", address), *((k, environ.get(k)) for k in ADDRESS_ENV_VARS)]
    found = next(((src, v.strip().rstrip("/")) for src, v in candidates if v and v.strip()), None)
    if found is None:
        from mtseg.cluster import DEFAULT_STACK_DIR, LocalStack

        stack = LocalStack.load(stack_dir or DEFAULT_STACK_DIR)
        if not stack.ray:
            raise SubmitError(
                "no Ray address: pass --address http://HEAD:8265, set RAY_API_SERVER_ADDRESS or RAY_ADDRESS, "
                "or start a local head with `mtseg cluster up`"
            )
        found = ("mtseg cluster up", stack.env()["RAY_API_SERVER_ADDRESS"])
    source, url = found
    if not re.match(r"^https?://[^/\s]+", url):
        raise SubmitError(
            f"{source}={url}: the Jobs API is the head's dashboard URL, e.g. http://HEAD:8265 "
            "(a GCS address host:6379 or a ray:// address does not serve it)"
        )
    return url


def load_token(environ: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """Find the Ray auth token the way Ray itself does.

    Returns:
        ``(token, source)``: token None when there is none; source (``RAY_AUTH_TOKEN``, a file
        path, or ``none``) is safe to print.

    Raises:
        SubmitError: ``RAY_AUTH_TOKEN_PATH`` names a missing or empty file (Ray does not fall
            back either).
    """
    environ = os.environ if environ is None else environ
    token = (environ.get("RAY_AUTH_TOKEN") or "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path = environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        token = _read_token_file(Path(path).expanduser())
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is missing or empty")
        return token, path
    default = DEFAULT_TOKEN_PATH.expanduser()
    token = _read_token_file(default)
    return (token, str(default)) if token else (None, "none")


def _read_token_file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


@contextlib.contextmanager
def _without_env(names: Sequence[str]) -> Iterator[None]:
    # JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is
    # given; hide them while it is built so that --address wins, as the CLI documents.
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def _quiet_ray_logs() -> Iterator[None]:
    # Ray's working_dir packaging (see mtseg.compat) and its job SDK log when a log stream
    # closes; mtseg prints its own one-line summaries instead.
    import logging

    from mtseg.compat import RUNTIME_ENV_LOG_LEVELS

    levels = {
        **RUNTIME_ENV_LOG_LEVELS,
        "ray.dashboard.modules.dashboard_sdk": logging.WARNING,
        "ray.dashboard.modules.job.sdk": logging.WARNING,
    }
    saved = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


class JobsClient:
    """A Ray ``JobSubmissionClient`` with mtseg's address and token rules; Ray's errors become one secret-free line.

    Args:
        token: the auth token; default :func:`load_token`. Pass ``""`` to send none.

    Raises:
        SubmitError: no address, cluster unreachable, or the token is missing or wrong.
    """

    def __init__(self, address: str | None = None, *, token: str | None = None):
        from ray.job_submission import JobSubmissionClient

        self.address = resolve_address(address)
        if token is None:
            token, self.token_source = load_token()
        else:
            self.token_source = "argument" if token else "none"
        self._token = token or None
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        with self._errors(), _without_env(ADDRESS_ENV_VARS):
            self._client = JobSubmissionClient(self.address, headers=headers)

    def _redact(self, text: str) -> str:
        from mtseg.storage import redact

        text = redact(text)
        return text.replace(self._token, "***") if self._token else text

    @contextlib.contextmanager
    def _errors(self, job: str | None = None) -> Iterator[None]:
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except SubmitError:
            raise
        except AuthenticationError as e:
            raise SubmitError(self._auth_message(str(e))) from None
        except (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout):
            raise SubmitError(
                f"cannot reach the Ray Jobs API at {self.address}: is the head running and its dashboard port reachable?"
            ) from None
        except (RuntimeError, ValueError) as e:
            text = self._redact(str(e)).strip()
            if job and re.search(r"status code 404|does not exist|not found", text, re.IGNORECASE):
                raise SubmitError(f"job {job} not found on the Ray cluster at {self.address}") from None
            first = text.splitlines()[0] if text else type(e).__name__
            raise SubmitError(f"Ray Jobs API at {self.address}: {first}") from None

    def _auth_message(self, text: str) -> str:
        head = f"Ray Jobs API at {self.address} refused the request"
        if "Authentication required" in text or not self._token:
            return f"{head}: missing auth token (set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
        return (
            f"{head}: wrong auth token (from {self.token_source}); set RAY_AUTH_TOKEN or ~/.ray/auth_token to the cluster's token"
        )

    def submit_job(self, *, agent_wait_s: float = 60.0, **kwargs: Any) -> str:
        """``JobSubmissionClient.submit_job``, retried while a freshly started head's agent registers."""
        deadline = time.monotonic() + agent_wait_s
        with _quiet_ray_logs():
            while True:
                try:
                    with self._errors():
                        return self._client.submit_job(**kwargs)
                except SubmitError as e:
                    if _AGENT_NOT_READY not in str(e):
                        raise
                    if time.monotonic() > deadline:
                        raise SubmitError(
                            f"Ray Jobs API at {self.address}: the head's job agent did not come up within "
                            f"{agent_wait_s:.0f}s (another Ray on the same machine holding its port? see "
                            "dashboard_agent.log in the head's session logs)"
                        ) from None
                time.sleep(1.0)

    def status(self, submission_id: str) -> str:
        """The job's status name (``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED``, ``STOPPED``)."""
        with self._errors(submission_id):
            return str(self._client.get_job_status(submission_id).value)

    def info(self, submission_id: str):
        """The job's ``JobDetails`` (status, message, entrypoint, times, metadata)."""
        with self._errors(submission_id):
            return self._client.get_job_info(submission_id)

    def logs(self, submission_id: str) -> str:
        """The job's driver log so far."""
        with self._errors(submission_id):
            return self._client.get_job_logs(submission_id)

    def list_jobs(self) -> list:
        """Every job the cluster knows, oldest first."""
        with self._errors():
            jobs = self._client.list_jobs()
        return sorted(jobs, key=lambda j: (j.start_time or 0, j.submission_id or ""))

    def stop(self, submission_id: str) -> bool:
        """Ask the cluster to stop a job. Returns True if it was still running."""
        with self._errors(submission_id):
            return bool(self._client.stop_job(submission_id))

    def wait(self, submission_id: str, *, poll_s: float = 1.0) -> str:
        """Block until the job reaches a terminal status and return it."""
        while (status := self.status(submission_id)) not in TERMINAL:
            time.sleep(poll_s)
        return status

    def follow(self, submission_id: str, out: IO[str] | None = None, *, poll_s: float = 1.0) -> str:
        """Stream the job's log to ``out`` until the job ends (polling if the websocket breaks); return its status."""
        out = out or sys.stdout
        progress = [0]  # characters written so far, kept when the stream breaks half-way
        try:
            with _quiet_ray_logs():
                asyncio.run(self._tail(submission_id, out, progress))
        except Exception:  # noqa: BLE001, S110 - any websocket failure: poll instead (which reports real errors)
            pass
        written = progress[0]
        # The websocket closes when the driver exits, a moment before the status is final; the
        # polling loop also prints anything the stream missed.
        while True:
            status = self.status(submission_id)
            text = self.logs(submission_id)
            if len(text) > written:
                out.write(self._redact(text[written:]))
                out.flush()
                written = len(text)
            if status in TERMINAL:
                return status
            time.sleep(poll_s)

    async def _tail(self, submission_id: str, out: IO[str], progress: list[int]) -> None:
        async for chunk in self._client.tail_job_logs(submission_id):
            out.write(self._redact(chunk))
            out.flush()
            progress[0] += len(chunk)


# ---------------------------------------------------------------------------- what is submitted


def project_root() -> Path:
    """The job's ``working_dir``: the nearest checkout (``pyproject.toml`` + ``jobs/``) at or above
    the current directory, else the one mtseg was imported from; SubmitError if neither is."""
    here = Path.cwd().resolve()
    for d in (here, *here.parents, Path(__file__).resolve().parent.parent):
        if (d / "pyproject.toml").is_file() and (d / "jobs").is_dir():
            return d
    raise SubmitError(f"{here}: not inside an mtseg checkout (no pyproject.toml + jobs/ here or above); pass working_dir")


def _relative_to_root(path: str, root: Path, what: str) -> str:
    full = Path(path).expanduser()
    full = (full if full.is_absolute() else Path.cwd() / full).resolve()
    try:
        rel = full.relative_to(root)
    except ValueError:
        raise SubmitError(
            f"{what} {path}: outside the project {root}, which is all the cluster receives; put it under jobs/configs/"
        ) from None
    from mtseg.compat import excluded_by_ray

    if excluded_by_ray(rel.as_posix(), WORKING_DIR_EXCLUDES):
        raise SubmitError(f"{what} {path}: in a directory that is not uploaded to the cluster; put it under jobs/configs/")
    return rel.as_posix()


def build_entrypoint(script: str, argv: Sequence[str] = ()) -> str:
    """The shell command the job runs, e.g. ``python jobs/train.py --config jobs/configs/demo.yaml train.lr=0.01``."""
    return shlex.join(["python", script, *argv])


def build_runtime_env(working_dir: str | os.PathLike, env_vars: Mapping[str, str]) -> dict[str, Any]:
    """The job's runtime_env: the project as working_dir, minus data and caches, plus ``env_vars``."""
    env = dict(env_vars)
    # mtseg's driver calls ray.init(runtime_env={"env_vars": <storage vars>}) so that its own
    # workers get them when it runs outside a job; inside a job those keys are already in the
    # job's runtime_env, and Ray refuses the duplicate (printing both values) unless told to
    # let the driver's identical values win.
    env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    return {"working_dir": str(working_dir), "excludes": list(WORKING_DIR_EXCLUDES), "env_vars": env, **PIN_RAY_ADDRESS_HOOK}


def make_submission_id(name: str, run_name: str) -> str:
    """``mtseg-<job>-<run>-<UTC time>-<4 hex>``: readable in ``mtseg jobs list``, unique per submit."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    safe_run = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name).strip("-")[:40] or "run"
    return f"mtseg-{name}-{safe_run}-{stamp}-{secrets.token_hex(2)}"


def _relative_local(path: str) -> bool:
    """A relative local path: on the cluster, in the job's scratch working_dir (gone with the job)."""
    from mtseg.storage import is_s3

    return not is_s3(path) and not os.path.isabs(path.removeprefix("file://"))


def _warn_local_paths(name: str, cfg, log) -> None:
    paths = {"data.uri": cfg.data.uri}
    if name != "prepare":
        paths["train.storage_path"] = cfg.train.storage_path
    for key, value in paths.items():
        if value and _relative_local(value):
            log(f"[submit] warning: {key}={value!r} is a relative local path on the cluster; use s3://... to keep it")


def submit(
    name: str,
    config_path: str | None = None,
    overrides: Sequence[str] = (),
    *,
    address: str | None = None,
    working_dir: str | os.PathLike | None = None,
    submission_id: str | None = None,
    script_args: Sequence[str] = (),
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
    entrypoint_memory: int | None = None,
    entrypoint_resources: Mapping[str, float] | None = None,
    pass_storage_env: bool = True,
    forward_credentials: bool = False,
    token: str | None = None,
    log=None,
    check_args: Callable[[str, list[str]], None] | None = None,
) -> str:
    """Validate the job locally, then submit ``jobs/<script>.py`` through the Ray Jobs API.

    Args:
        name: a key of :data:`JOBS` (``prepare``, ``train``, ``tune``, ``study``, ``evaluate``, ``predict``).
        config_path: the YAML config, inside the project (the cluster sees only the project);
            None runs on the built-in defaults.
        overrides: dotted ``key=value`` overrides, validated here and passed to the script.
        address: see :func:`resolve_address`.
        working_dir: the directory uploaded as the job's working_dir; default :func:`project_root`.
        submission_id: a plain name (letters, digits, ``-_.``); default :func:`make_submission_id`.
        script_args: arguments for the entry script (after ``--config``, before the overrides).
        entrypoint_num_cpus, entrypoint_num_gpus, entrypoint_memory, entrypoint_resources: what
            the driver reserves; default the job's :class:`JobSpec` CPUs and nothing else.
        pass_storage_env: pass the storage endpoint and region set in this shell to the job.
        forward_credentials: pass the storage credentials too (Ray logs them in plain text).
        token: the Ray auth token; default :func:`load_token`.
        log: one-line progress messages (default: print to stderr).
        check_args: ``check_args(name, argv)`` raises :class:`SubmitError` when the entry script
            would refuse ``argv`` (:func:`mtseg.cli.jobs.check_arguments`); None skips it.

    Returns:
        The submission id.

    Raises:
        ConfigError: the config, an override or the submission id is wrong (nothing was sent).
        SubmitError: the job, its arguments or config are wrong, or the cluster refused it.
    """
    from mtseg.config import load_config, validate_name
    from mtseg.storage import join

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if name not in JOBS:
        raise SubmitError(f"unknown job {name!r}; jobs are {', '.join(JOBS)}")
    if submission_id is not None:
        validate_name("--submission-id", submission_id)
    if forward_credentials and not pass_storage_env:
        raise SubmitError("--forward-credentials and --no-storage-env contradict each other: pass one")
    spec = JOBS[name]
    root = Path(working_dir).resolve() if working_dir else project_root()
    if not (root / spec.script).is_file():
        raise SubmitError(f"{spec.script} not found in {root}: the {name!r} job is not available in this checkout")

    config_rel = None
    if spec.takes_config:
        # Resolved here exactly as the job will resolve it, so a bad config stops now.
        cfg = load_config(config_path, list(overrides))
        config_rel = _relative_to_root(config_path, root, "config") if config_path else None
        _warn_local_paths(name, cfg, log)
        run_name = cfg.study.name if name == "study" else cfg.train.run_name
        storage_path = cfg.train.storage_path
        run = join(storage_path, run_name) if name == "train" and not _relative_local(storage_path) else None
    else:
        if config_path or overrides:
            raise SubmitError(f"{name}: takes no --config or key=value overrides; pass its own arguments after --")
        run_name, run = "run", None
    argv = [*(["--config", config_rel] if config_rel else []), *script_args, *overrides]
    if check_args is not None:
        check_args(name, argv)

    env_vars = storage_env(credentials=forward_credentials) if pass_storage_env else {}
    entrypoint = build_entrypoint(spec.script, argv)
    sid = submission_id or make_submission_id(name, run_name)
    jobs = JobsClient(address, token=token)
    log(f"[submit] {name} -> {jobs.address} (auth token from {jobs.token_source}; uploading {root})")
    if pass_storage_env:
        log(f"[submit] storage settings passed by name: {', '.join(env_vars) or 'none set in this shell'}")
    else:
        log("[submit] storage settings: the cluster's own (--no-storage-env)")
    if pass_storage_env and not forward_credentials:
        log(
            "[submit] storage credentials not sent: the cluster's own apply "
            "(--forward-credentials sends this shell's, and Ray logs them in plain text)"
        )
    metadata = {"mtseg.job": name, "mtseg.config": config_rel or "", "mtseg.run_name": run_name}
    if run:
        metadata[RUN_METADATA_KEY] = run
    submitted = jobs.submit_job(
        entrypoint=entrypoint,
        submission_id=sid,
        runtime_env=build_runtime_env(root, env_vars),
        metadata=metadata,
        entrypoint_num_cpus=spec.entrypoint_num_cpus if entrypoint_num_cpus is None else entrypoint_num_cpus,
        entrypoint_num_gpus=entrypoint_num_gpus or None,
        entrypoint_memory=entrypoint_memory or None,
        entrypoint_resources=dict(entrypoint_resources) if entrypoint_resources else None,
    )
    log(f"[submit] submitted {submitted}: {entrypoint}")
    return submitted


# ---------------------------------------------------------------------------- runs


def run_outcome(info) -> str | None:
    """How a training job's run says it ended (``finished``, ``interrupted: REASON``), beside Ray's status.

    Returns:
        None when the job's ``JobDetails`` name no run; ``not started`` when the run has recorded
        nothing yet; ``unreadable (...)`` when its storage cannot be read from here.
    """
    from mtseg.storage import StorageError

    run = (info.metadata or {}).get(RUN_METADATA_KEY)
    if not run:
        return None
    from mtseg.train.runstate import read_outcome

    try:
        outcome = read_outcome(run)
    except (StorageError, ValueError) as e:
        return f"unreadable ({e})"
    if outcome is None:
        return "not started"
    status, reason = outcome.get("status", "unknown"), outcome.get("reason")
    return f"{status}: {reason}" if reason and status != "finished" else status
