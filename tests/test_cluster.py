"""The local stack (mtseg/cluster.py): ``mtseg cluster up|down|status`` and the SeaweedFS store.

The stack tests run the CLI in a subprocess with their own ``--dir`` (short, under /tmp: Ray's
socket paths live under it) and check that every process started from that directory is gone
at the end; nothing else on the machine is touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from mtseg.cluster import LocalStack, SeaweedFS, _pid_alive, _pids_with_arg, _port_open

REPO = Path(__file__).resolve().parents[1]


def _cli(args: list[str], home: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``mtseg ARGS`` with ``HOME`` replaced (so ~/.ray/auth_token is that home's) and no Ray/S3 settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS", "RAY_API_SERVER", "AWS_"))}
    env["HOME"] = home
    # -P: the mtseg this test imported (PYTHONPATH's, the installed one), not the one in its working directory.
    return subprocess.run(
        [sys.executable, "-P", "-m", "mtseg.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _started_with(var: str, value: str) -> list[int]:
    """Pids of the processes whose environment holds ``var=value``, and of all their descendants.

    The descendants are looked up by parent pid: a process that renames itself (Ray's ``ray::...``)
    may overwrite its environment with the name. Read here, not with mtseg.cluster's helpers under test.
    """
    roots, children = [], {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError):
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
            if f"{var}={value}".encode() in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                roots.append(int(entry))
    found = set()
    while roots:
        pid = roots.pop()
        if pid not in found:
            found.add(pid)
            roots.extend(children.get(pid, []))
    return sorted(found)


def _argv0(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
    return ""


def _listening_ports(pids: list[int]) -> set[int]:
    """The TCP ports ``pids`` listen on, from their socket fds and /proc/net/tcp{,6}."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    inodes.add(os.readlink(f"/proc/{pid}/fd/{fd}").removeprefix("socket:[").removesuffix("]"))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture
def stack_dir():
    """A fresh stack directory; whatever still runs from it at the end is stopped and reported."""
    d = tempfile.mkdtemp(prefix="mtseg-stack-", dir="/tmp")
    yield d
    leftover = _pids_with_arg(d)
    if leftover:
        LocalStack(dir=d).down()
    shutil.rmtree(d, ignore_errors=True)
    assert not leftover, f"processes left running from {d}: {leftover}"


@pytest.mark.slow
def test_up_without_a_token_makes_one_and_down_stops_everything(stack_dir, tmp_path):
    home = str(tmp_path / "home")
    os.makedirs(home)
    up = _cli(["cluster", "up", "--dir", stack_dir, "--num-cpus", "1"], home)
    assert up.returncode == 0, up.stderr
    token = Path(home, ".ray", "auth_token")
    assert token.read_text().strip() and oct(token.stat().st_mode & 0o777) == "0o600"
    assert token.read_text().strip() not in up.stdout + up.stderr
    settings = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines() if line.startswith("export "))

    # The head answers with that token and refuses requests without it.
    from mtseg.submit import JobsClient, SubmitError

    assert JobsClient(settings["RAY_API_SERVER_ADDRESS"], token=token.read_text().strip()).list_jobs() == []
    with pytest.raises(SubmitError, match="missing auth token"):
        JobsClient(settings["RAY_API_SERVER_ADDRESS"], token="")
    status = _cli(["cluster", "status", "--dir", stack_dir], home)
    assert status.stdout.startswith("seaweedfs: up http://127.0.0.1:") and "\nray: up 127.0.0.1:" in status.stdout

    # Everything `up` started got that HOME, and their children are theirs; some of them (Ray's client
    # proxy, the dashboard and runtime-env agents) have no trace of the stack directory on their command
    # line. The raylet starts the agents after `up` returns: a stack in use has them.
    agents = {"ray::DashboardAgent", "ray::RuntimeEnvAgent"}
    deadline = time.monotonic() + 60
    while not agents <= {_argv0(p) for p in _started_with("HOME", home)} and time.monotonic() < deadline:
        time.sleep(0.5)
    started = _started_with("HOME", home)
    assert agents <= {_argv0(p) for p in started}
    ports = _listening_ports(started)
    assert int(settings["RAY_ADDRESS"].rsplit(":", 1)[1]) in ports and len(ports) >= 5, (started, ports)

    down = _cli(["cluster", "down", "--dir", stack_dir], home)
    assert down.returncode == 0, down.stderr
    assert "ray: stopped" in down.stdout and "seaweedfs: stopped" in down.stdout
    # Gone right when down returns, not a minute later.
    assert [p for p in started if _pid_alive(p)] == []
    assert sorted(p for p in ports if _port_open(p)) == []
    assert _pids_with_arg(stack_dir) == []
    assert _cli(["cluster", "status", "--dir", stack_dir], home).stdout == "seaweedfs: not started\nray: not started\n"


@pytest.mark.slow
def test_failed_up_stops_what_it_started(stack_dir, tmp_path):
    # A HOME that is a file: the token cannot be written, so the Ray head cannot start after
    # SeaweedFS has.
    home = tmp_path / "not-a-dir"
    home.write_text("")
    up = _cli(["cluster", "up", "--dir", stack_dir], str(home))
    assert up.returncode == 2
    assert up.stderr.startswith(
        "mtseg: error: cluster up failed, stopped what it had started: could not create the Ray auth token"
    )
    assert len(up.stderr.splitlines()) == 1 and "Traceback" not in up.stderr
    assert _pids_with_arg(stack_dir) == []
    assert not os.path.exists(os.path.join(stack_dir, "stack.json"))


@pytest.mark.slow
def test_down_finds_a_store_the_state_file_does_not_record(stack_dir):
    # What an `up` killed between starting SeaweedFS and recording its pid leaves behind.
    store = SeaweedFS(data_dir=os.path.join(stack_dir, "seaweedfs")).start()
    try:
        stack = LocalStack(dir=stack_dir)
        assert stack.status()["seaweedfs"].startswith(f"not answering, but process(es) {store.pid} run from")
        assert stack.down() == ["ray: not running", f"seaweedfs: stopped (pid {store.pid})"]
        assert _pids_with_arg(stack_dir) == []
    finally:
        store.stop()


@pytest.mark.parametrize("content", ['{"seaweedfs": ', "[1, 2]", '{"ray": {"temp_dir": "x", "colour": 1}}', "\xff\xfe"])
@pytest.mark.parametrize("action", ["status", "down"])
def test_corrupt_state_file_is_one_line(stack_dir, capsys, action, content):
    from mtseg.cli import main

    Path(stack_dir, "stack.json").write_bytes(content.encode("latin-1"))
    assert main(["cluster", action, "--dir", stack_dir]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mtseg: error: {stack_dir}/stack.json: not a readable stack state (")
    assert len(err.splitlines()) == 1


@pytest.mark.slow
def test_vacuum_reclaims_deleted_objects(s3_env, seaweedfs):
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=seaweedfs.endpoint,
        region_name="us-east-1",
        aws_access_key_id=seaweedfs.access_key,
        aws_secret_access_key=seaweedfs.secret_key,
    )
    prefix = f"vacuum-{uuid.uuid4().hex[:8]}"
    blob = os.urandom(8 << 20)

    def used_mb() -> float:
        return sum(f.stat().st_blocks * 512 for f in Path(seaweedfs.data_dir).rglob("*.dat")) / 2**20

    seaweedfs.vacuum(garbage_threshold=0.0001)  # other tests' deletions: start from a compact store
    before = used_mb()
    for i in range(6):
        s3.put_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/{i}", Body=blob)
    assert used_mb() >= before + 40
    for i in range(6):
        s3.delete_object(Bucket=seaweedfs.bucket, Key=f"{prefix}/{i}")
    # The filer frees a deleted object's chunks in the background: vacuum until they are reclaimed.
    deadline = time.monotonic() + 30
    while True:
        seaweedfs.vacuum(garbage_threshold=0.0001)
        if used_mb() <= before + 8 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert used_mb() <= before + 8


@pytest.mark.slow
def test_local_ray_reuses_an_idle_worker_while_the_cpus_are_held(ray_local):
    """Ray 2.60 kills idle workers beyond the node's *available* CPUs after 1 s unless
    mtseg.compat.worker_pool_config raises the limit: with Train holding the CPUs, every Ray
    Data read task would start (and import torch in) a new process."""
    import ray

    @ray.remote(num_cpus=1.75)
    class Holder:  # what Ray Train's workers hold during training
        def ready(self):
            return True

    @ray.remote(num_cpus=0.25)
    def pid():
        return os.getpid()

    holder = Holder.remote()
    try:
        ray.get(holder.ready.remote())
        pids = []
        for _ in range(3):
            pids.append(ray.get(pid.remote()))
            time.sleep(2.5)  # idle for longer than Ray's 1 s killing threshold
        assert len(set(pids)) == 1, f"a new worker process per task: {pids}"
    finally:
        ray.kill(holder)


class _Stream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_bars_go_off_when_the_driver_writes_to_a_file_and_stay_on_a_terminal(monkeypatch):
    """`mtseg train > train.log 2>&1` carried hundreds of Ray Data bar frames (ANSI escapes, \\r) per epoch."""
    import ray.data

    from mtseg.cluster import quiet_progress_bars_unless_tty

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    monkeypatch.setattr(ctx, "enable_operator_progress_bars", True)
    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    assert not quiet_progress_bars_unless_tty(_Stream(True), _Stream(True))
    assert ctx.enable_progress_bars and ctx.enable_operator_progress_bars and "RAY_COLOR_PREFIX" not in os.environ

    assert quiet_progress_bars_unless_tty(_Stream(True), _Stream(False))
    assert not ctx.enable_progress_bars and not ctx.enable_operator_progress_bars
    assert os.environ["RAY_COLOR_PREFIX"] == "0"  # no colour codes around the forwarded lines' prefixes

    # stdout to a file, stderr on a terminal: the bars stay there; a user's own colour setting is kept.
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")
    assert not quiet_progress_bars_unless_tty(_Stream(False), _Stream(True))
    assert ctx.enable_progress_bars and os.environ["RAY_COLOR_PREFIX"] == "1"
