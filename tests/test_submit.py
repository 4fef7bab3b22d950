"""Job submission through the Ray Jobs API (mtseg/submit.py).

The fast tests check what is sent and what is refused without a cluster. The slow ones start a
separate Ray head on loopback with the dashboard and token authentication on, and drive it only
through the Jobs API and the ``mtseg`` CLI (in subprocesses, so the token never enters this
process's environment): plumbing with a trivial entry script, ``submit train --wait`` end to end
with checkpoints in the SeaweedFS bucket, ``jobs stop``, and the refusals (no token, wrong token,
bad config).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import ClassVar

import pytest

from mtseg import submit as sub
from mtseg.cli import JOB_EXIT_CODES, main
from mtseg.cluster import CREDENTIAL_ENV_VARS, LOOPBACK, RayHead, free_port
from mtseg.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = [  # the tiny training of tests/train/test_train_ray.py, one epoch
    "data.image_size=32",
    "data.batch_size=4",
    "data.rows_per_read_task=8",
    "data.map_num_cpus=0.25",
    "model.decoder_channels=16",
    "tasks.patch_size=4",
    "tasks.center_sigma=1.5",
    "train.num_workers=2",
    "train.cpus_per_worker=0.5",
    "train.epochs=1",
    "train.warmup_steps=1",
    "train.checkpoint_every_steps=1",
    "train.log_every_steps=1",
    "train.max_failures=0",
]


# ---------------------------------------------------------------------------- fast: no cluster


def test_address_precedence(monkeypatch, tmp_path):
    env = {"RAY_API_SERVER_ADDRESS": "http://api:8265/", "RAY_ADDRESS": "http://addr:8265"}
    assert sub.resolve_address("http://flag:8265", environ=env) == "http://flag:8265"
    assert sub.resolve_address(None, environ=env) == "http://api:8265"
    assert sub.resolve_address(None, environ={"RAY_ADDRESS": "http://addr:8265"}) == "http://addr:8265"
    # Last resort: the head `mtseg cluster up` recorded.
    (tmp_path / "stack.json").write_text(json.dumps({"seaweedfs": {}, "ray": {"temp_dir": "x", "port": 1, "dashboard_port": 2}}))
    assert sub.resolve_address(None, environ={}, stack_dir=str(tmp_path)) == f"http://{LOOPBACK}:2"
    with pytest.raises(sub.SubmitError, match="no Ray address"):
        sub.resolve_address(None, environ={}, stack_dir=str(tmp_path / "none"))
    # A GCS address does not serve the Jobs API: refused at once, naming where it came from.
    with pytest.raises(sub.SubmitError, match=r"^RAY_ADDRESS=127.0.0.1:6379: the Jobs API is the head's dashboard URL"):
        sub.resolve_address(None, environ={"RAY_ADDRESS": "127.0.0.1:6379"})


def test_token_is_read_like_ray_reads_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert sub.load_token({}) == (None, "none")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-file\n")
    assert sub.load_token({}) == ("from-file", str(tmp_path / ".ray" / "auth_token"))
    other = tmp_path / "tok"
    other.write_text("from-path")
    assert sub.load_token({"RAY_AUTH_TOKEN_PATH": str(other)}) == ("from-path", str(other))
    assert sub.load_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(other)}) == ("from-env", "RAY_AUTH_TOKEN")
    with pytest.raises(sub.SubmitError, match="RAY_AUTH_TOKEN_PATH"):
        sub.load_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_storage_env_is_taken_by_name_and_credentials_only_on_request():
    env = {
        "AWS_ENDPOINT_URL_S3": "http://s3:8333",
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "AWS_SESSION_TOKEN": "tok",
        "AWS_REGION": "",
        "HOME": "/root",
    }
    assert sub.storage_env(env) == {"AWS_ENDPOINT_URL_S3": "http://s3:8333"}
    assert sub.storage_env(env, credentials=True) == {
        "AWS_ENDPOINT_URL_S3": "http://s3:8333",
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "AWS_SESSION_TOKEN": "tok",
    }


class _RecordingClient:
    """Stands in for the Jobs API client: records what ``submit`` would send, sends nothing."""

    sent: ClassVar[list[dict]] = []

    def __init__(self, address=None, *, token=None):
        self.address, self.token_source = address, "argument"

    def submit_job(self, **kwargs):
        self.sent.append(kwargs)
        return kwargs["submission_id"]


def test_credentials_are_sent_only_with_forward_credentials(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sub, "JobsClient", _RecordingClient)
    monkeypatch.setattr(_RecordingClient, "sent", [])
    for k, v in {"AWS_ENDPOINT_URL_S3": "http://s3:8333", "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}.items():
        monkeypatch.setenv(k, v)
    logged: list[str] = []
    sub.submit("train", "jobs/configs/demo.yaml", address="http://127.0.0.1:9", log=logged.append)
    sub.submit("train", "jobs/configs/demo.yaml", address="http://127.0.0.1:9", forward_credentials=True, log=lambda m: None)
    default, forwarded = (s["runtime_env"]["env_vars"] for s in _RecordingClient.sent)
    assert default["AWS_ENDPOINT_URL_S3"] == "http://s3:8333"
    assert not set(CREDENTIAL_ENV_VARS) & set(default)
    assert forwarded["AWS_SECRET_ACCESS_KEY"] == "s3cr3t" and forwarded["AWS_ACCESS_KEY_ID"] == "id"
    assert sum("credentials not sent" in line for line in logged) == 1
    assert "s3cr3t" not in "\n".join(logged)
    with pytest.raises(sub.SubmitError, match="contradict"):
        sub.submit("train", None, forward_credentials=True, pass_storage_env=False, address="http://127.0.0.1:9")


def test_training_job_metadata_names_its_run_when_this_machine_can_read_it(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sub, "JobsClient", _RecordingClient)
    monkeypatch.setattr(_RecordingClient, "sent", [])
    for storage in ("s3://bucket/runs", str(tmp_path), "runs"):
        sub.submit(
            "train",
            "jobs/configs/demo.yaml",
            [f"train.storage_path={storage}", "train.run_name=r1"],
            address="http://127.0.0.1:9",
            log=lambda m: None,
        )
    s3, local, relative = (s["metadata"] for s in _RecordingClient.sent)
    assert s3[sub.RUN_METADATA_KEY] == "s3://bucket/runs/r1"
    assert local[sub.RUN_METADATA_KEY] == str(tmp_path / "r1")
    assert sub.RUN_METADATA_KEY not in relative  # relative to the job's scratch dir on the cluster


def test_run_outcome_is_what_the_run_recorded(tmp_path):
    from types import SimpleNamespace

    from mtseg.train.runstate import write_outcome

    run = str(tmp_path / "r1")
    job = SimpleNamespace(metadata={sub.RUN_METADATA_KEY: run})
    assert sub.run_outcome(SimpleNamespace(metadata={"mtseg.job": "prepare"})) is None
    assert sub.run_outcome(job) == "not started"
    write_outcome(run, "failed", "OSError: [Errno 28] No space left on device", owner="h:1", started_at=1.0)
    assert sub.run_outcome(job) == "failed: OSError: [Errno 28] No space left on device"
    write_outcome(run, "running", owner="h:1", started_at=1.0)  # and no lease: its driver is gone
    assert sub.run_outcome(job).startswith("interrupted: ")
    write_outcome(run, "finished", owner="h:1", started_at=1.0)
    assert sub.run_outcome(job) == "finished"


@pytest.mark.parametrize("bad", ["..", ".", "a/b", "../x", "a b", ""])
def test_submission_id_is_a_plain_name_checked_before_submission(monkeypatch, capsys, bad):
    monkeypatch.chdir(REPO)
    _no_cluster(monkeypatch)
    with pytest.raises(ConfigError, match="--submission-id"):
        sub.submit("train", "jobs/configs/demo.yaml", submission_id=bad, address="http://127.0.0.1:9")
    assert (
        main(["submit", "train", "--config", "jobs/configs/demo.yaml", "--address", "http://127.0.0.1:9", "--submission-id", bad])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mtseg: error: --submission-id")


def test_runtime_env_uploads_code_not_data():
    from mtseg.compat import excluded_by_ray

    renv = sub.build_runtime_env(REPO, {"AWS_ACCESS_KEY_ID": "id"})
    assert renv["working_dir"] == str(REPO)
    assert renv["env_vars"]["AWS_ACCESS_KEY_ID"] == "id"
    # Every worker of the job looks up its own Ray, not another one on the head's machine.
    assert renv["worker_process_setup_hook"] == "mtseg.compat.pin_ray_address"
    for kept in ("mtseg/data/shard.py", "jobs/train.py", "jobs/configs/demo.yaml", "pyproject.toml"):
        assert not excluded_by_ray(kept, renv["excludes"]), kept
    for dropped in ("data/coco/x.jpg", "runs/demo/ckpt.pt", ".venv/bin/python", ".git/HEAD", "mtseg/__pycache__/x.pyc"):
        assert excluded_by_ray(dropped, renv["excludes"]), dropped


def test_entrypoint_and_submission_id():
    cmd = sub.build_entrypoint("jobs/train.py", ["--config", "jobs/configs/demo.yaml", "--restart", "train.run_name=a b"])
    assert cmd == "python jobs/train.py --config jobs/configs/demo.yaml --restart 'train.run_name=a b'"
    a, b = sub.make_submission_id("train", "my run/1"), sub.make_submission_id("train", "my run/1")
    assert a != b and a.startswith("mtseg-train-my-run-1-")


def _no_cluster(monkeypatch):
    """Make any attempt to reach a cluster fail the test: refusals must happen before it."""

    def boom(*a, **k):
        raise AssertionError("a cluster was contacted")

    monkeypatch.setattr(sub, "JobsClient", boom)


def test_bad_config_is_refused_before_submission(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    _no_cluster(monkeypatch)
    with pytest.raises(ConfigError, match="train.lr"):
        sub.submit("train", "jobs/configs/demo.yaml", ["train.lr=fast"], address="http://127.0.0.1:9")
    assert (
        main(["submit", "train", "--config", "jobs/configs/demo.yaml", "--address", "http://127.0.0.1:9", "model.backbone=vgg"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[-1]] and err[-1].startswith("mtseg: error: model.backbone")
    assert main(["submit", "train", "--config", "jobs/configs/nope.yaml", "--address", "http://127.0.0.1:9"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_what_the_cluster_cannot_see_is_refused(monkeypatch, tmp_path):
    _no_cluster(monkeypatch)
    outside = tmp_path / "c.yaml"
    outside.write_text("train: {epochs: 1}\n")
    with pytest.raises(sub.SubmitError, match="outside the project"):
        sub.submit("train", str(outside), address="http://127.0.0.1:9", working_dir=REPO)
    (tmp_path / "jobs").mkdir()
    with pytest.raises(sub.SubmitError, match="jobs/tune.py not found"):
        sub.submit("tune", None, address="http://127.0.0.1:9", working_dir=tmp_path)
    with pytest.raises(sub.SubmitError, match="unknown job"):
        sub.submit("nope", None)


def test_job_arguments_are_checked_before_submission(monkeypatch):
    monkeypatch.chdir(REPO)
    _no_cluster(monkeypatch)
    with pytest.raises(sub.SubmitError, match="takes no --config"):
        sub.submit("evaluate", "jobs/configs/demo.yaml", address="http://127.0.0.1:9", working_dir=REPO)

    def refuse(name, argv):
        raise sub.SubmitError(f"{name}: {argv} refused")

    with pytest.raises(sub.SubmitError, match="refused"):  # the CLI passes its parser's check (tests/cli)
        sub.submit(
            "evaluate",
            None,
            script_args=["--split", "val2017"],
            address="http://127.0.0.1:9",
            working_dir=REPO,
            check_args=refuse,
        )


def test_prepare_requires_coco_root(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        main(["submit", "prepare", "--config", "jobs/configs/demo.yaml"])
    assert e.value.code == 2


def test_unreachable_cluster_is_one_line(capsys):
    port = free_port()  # nothing listens there
    with pytest.raises(sub.SubmitError, match=f"cannot reach the Ray Jobs API at http://127.0.0.1:{port}"):
        sub.JobsClient(f"http://127.0.0.1:{port}", token="x")
    assert main(["jobs", "list", "--address", f"http://127.0.0.1:{port}"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_prepare_data_script_shards_every_split_of_the_config(tmp_path):
    from mtseg.data.manifest import read_manifest
    from mtseg.data.synth import synthesize

    synthesize(str(tmp_path / "coco"), train=4, val=2, size=32, seed=3)
    out = tmp_path / "shards"
    proc = subprocess.run(
        [
            sys.executable,
            "jobs/prepare_data.py",
            "--config",
            "jobs/configs/demo.yaml",
            "--coco-root",
            str(tmp_path / "coco"),
            f"data.uri={out}",
            "data.images_per_shard=3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_manifest(str(out), "train2017")["counts"]["images"] == 4
    assert read_manifest(str(out), "val2017")["counts"]["images"] == 2
    bad = subprocess.run(
        [sys.executable, "jobs/prepare_data.py", "--coco-root", "x", "train.lr=fast"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert bad.returncode == 2 and "train.lr" in bad.stderr


# ---------------------------------------------------------------------------- slow: a Ray head with token auth


@pytest.fixture(scope="module")
def head(s3_env):
    """A Ray head on loopback with the dashboard and token auth, the object store's env, 2 CPUs.

    Yields ``(head, token)``. The job driver runs ``python ...``: the venv's bin comes first on
    the head's PATH so that it is this venv's Python, as it would be in the cluster's image.
    """
    token = "mtseg-test-" + secrets.token_hex(16)
    temp_dir = tempfile.mkdtemp(prefix="mtseg-head-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {
        **s3_env,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    h = RayHead(temp_dir=temp_dir, num_cpus=2).start(env=env)
    try:
        yield h, token
    finally:
        h.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _cli(
    args: list[str], *, token: str | None, home: str | None = None, address: str | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``mtseg ARGS`` in a subprocess with this token (None: no RAY_AUTH_TOKEN at all)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    }
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    if home is not None:
        env["HOME"] = home  # hides ~/.ray/auth_token
    if address is not None:
        env["RAY_API_SERVER_ADDRESS"] = address
    return subprocess.run(
        [sys.executable, "-m", "mtseg.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


TRIVIAL_JOB = textwrap.dedent('''
    """A stand-in for jobs/train.py: reports what it received, then behaves as the run name says."""
    import os, sys, time
    print("argv:", " ".join(sys.argv[1:]), flush=True)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        print(name, "set" if os.environ.get(name) else "missing", flush=True)
    print("config exists:", os.path.exists(sys.argv[2]), flush=True)
    if "train.run_name=sleep" in sys.argv:
        print("sleeping", flush=True)
        time.sleep(600)
    sys.exit(3 if "train.run_name=fail" in sys.argv else 0)
''')


@pytest.fixture(scope="module")
def trivial_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    (root / "jobs" / "configs").mkdir(parents=True)
    (root / "jobs" / "train.py").write_text(TRIVIAL_JOB)
    (root / "jobs" / "configs" / "t.yaml").write_text("train:\n  epochs: 1\n")
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    return root


@pytest.mark.slow
def test_plumbing_with_a_trivial_entrypoint(head, trivial_project, s3_env, capsys, monkeypatch):
    h, token = head
    monkeypatch.chdir(trivial_project)
    out = io.StringIO()
    sid = sub.submit(
        "train", "jobs/configs/t.yaml", ["train.lr=0.5"], address=h.dashboard_url, token=token, working_dir=trivial_project
    )
    jobs = sub.JobsClient(h.dashboard_url, token=token)
    assert jobs.follow(sid, out) == "SUCCEEDED"
    log = out.getvalue()
    assert "argv: --config jobs/configs/t.yaml train.lr=0.5" in log
    assert "config exists: True" in log
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert f"{name} set" in log
    info = jobs.info(sid)
    assert info.metadata["mtseg.job"] == "train" and info.metadata["mtseg.config"] == "jobs/configs/t.yaml"
    assert sid in [j.submission_id for j in jobs.list_jobs()]
    # The endpoint travels with the job; the credentials come from the head's own environment.
    assert info.runtime_env["env_vars"]["AWS_ENDPOINT_URL_S3"] == s3_env["AWS_ENDPOINT_URL_S3"]
    assert not set(CREDENTIAL_ENV_VARS) & set(info.runtime_env["env_vars"])
    # Names are printed, values never.
    printed = capsys.readouterr()
    assert "AWS_ENDPOINT_URL_S3" in printed.err and "credentials not sent" in printed.err
    for value in (s3_env["AWS_SECRET_ACCESS_KEY"], token):
        assert value not in printed.err + printed.out + log
    # A failing job: --wait exits with the job's outcome.
    sid = sub.submit(
        "train", "jobs/configs/t.yaml", ["train.run_name=fail"], address=h.dashboard_url, token=token, working_dir=trivial_project
    )
    assert jobs.follow(sid, io.StringIO()) == "FAILED"
    proc = _cli(
        [
            "submit",
            "train",
            "--wait",
            "--working-dir",
            str(trivial_project),
            "--config",
            str(trivial_project / "jobs/configs/t.yaml"),
            "train.run_name=fail",
        ],
        token=token,
        address=h.dashboard_url,
    )
    assert proc.returncode == JOB_EXIT_CODES["FAILED"], proc.stderr[-2000:]


@pytest.mark.slow
def test_jobs_stop_stops_a_running_job(head, trivial_project):
    h, token = head
    jobs = sub.JobsClient(h.dashboard_url, token=token)
    sid = sub.submit(
        "train",
        str(trivial_project / "jobs/configs/t.yaml"),
        ["train.run_name=sleep"],
        address=h.dashboard_url,
        token=token,
        working_dir=trivial_project,
        log=lambda *a: None,
    )
    deadline = time.monotonic() + 120
    while "sleeping" not in jobs.logs(sid):
        assert time.monotonic() < deadline, f"job never started: {jobs.status(sid)}"
        time.sleep(0.5)
    proc = _cli(["jobs", "stop", sid, "--wait", "--address", h.dashboard_url], token=token)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "STOPPED" in proc.stdout
    assert jobs.status(sid) == "STOPPED"
    proc = _cli(["jobs", "status", sid], token=token, address=h.dashboard_url)
    assert proc.returncode == 0 and f"{sid}: STOPPED" in proc.stdout
    with pytest.raises(sub.SubmitError, match="job no-such-job not found"):
        jobs.status("no-such-job")


@pytest.mark.slow
def test_missing_or_wrong_token_is_refused(head, tmp_path):
    h, token = head
    with pytest.raises(sub.SubmitError, match="missing auth token"):
        sub.JobsClient(h.dashboard_url, token="")
    with pytest.raises(sub.SubmitError, match="wrong auth token"):
        sub.JobsClient(h.dashboard_url, token="not-" + token)
    args = ["submit", "train", "--config", "jobs/configs/demo.yaml", "--address", h.dashboard_url]
    proc = _cli(args, token=None, home=str(tmp_path))  # no env token, no ~/.ray/auth_token
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"mtseg: error: Ray Jobs API at {h.dashboard_url} refused the request: missing auth token "
        "(set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
    )
    proc = _cli(["jobs", "list", "--address", h.dashboard_url], token="wrong-token", home=str(tmp_path))
    assert proc.returncode == 2
    assert "refused the request: wrong auth token (from RAY_AUTH_TOKEN)" in proc.stderr
    assert token not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_bad_config_never_reaches_the_cluster(head):
    h, token = head
    jobs = sub.JobsClient(h.dashboard_url, token=token)
    before = len(jobs.list_jobs())
    proc = _cli(["submit", "train", "--config", "jobs/configs/demo.yaml", "train.epochs=0"], token=token, address=h.dashboard_url)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("mtseg: error: train.epochs")
    assert len(jobs.list_jobs()) == before


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory, s3_env, seaweedfs):
    """16 + 8 synthetic 32 px images sharded into the session's bucket."""
    from mtseg.data.shard import shard_coco
    from mtseg.data.synth import synthesize

    root = str(tmp_path_factory.mktemp("submit-coco"))
    synthesize(root, train=16, val=8, size=32, seed=2)
    uri = f"s3://{seaweedfs.bucket}/submit-tiny-{uuid.uuid4().hex[:6]}"
    for split in ("train2017", "val2017"):
        shard_coco(root, split, uri, images_per_shard=8, log=lambda *a: None)
    return uri


@pytest.mark.slow
def test_submit_train_wait_runs_to_success_with_checkpoints_in_the_bucket(head, tiny_shards, s3_bucket):
    from mtseg.config import load_config
    from mtseg.train import checkpoint as ckpt
    from mtseg.train.trainer import run_uri

    h, token = head
    overrides = [f"data.uri={tiny_shards}", f"train.storage_path={s3_bucket}", "train.run_name=submitted", *TINY]
    proc = _cli(
        ["submit", "train", "--wait", "--config", "jobs/configs/demo.yaml", *overrides], token=token, address=h.dashboard_url
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-2000:])
    sid = proc.stdout.splitlines()[0].strip()
    assert sid.startswith("mtseg-train-submitted-")
    assert "[train] " in proc.stdout and "step 2/2" in proc.stdout  # progress streamed while waiting
    assert f"job {sid} SUCCEEDED" in proc.stderr
    assert "credentials not sent" in proc.stderr and os.environ["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr

    cfg = load_config(str(REPO / "jobs/configs/demo.yaml"), overrides)
    checkpoints = ckpt.list_checkpoints(run_uri(cfg))
    assert checkpoints and all(c.startswith(s3_bucket) for c in checkpoints)

    logs = _cli(["jobs", "logs", sid], token=token, address=h.dashboard_url)
    assert logs.returncode == 0 and "[train] epoch 1" in logs.stdout and "step 2/2" in logs.stdout
    listed = _cli(["jobs", "list"], token=token, address=h.dashboard_url)
    assert any(line.startswith(sid) and "SUCCEEDED (run: finished)" in line for line in listed.stdout.splitlines())
    status = _cli(["jobs", "status", sid], token=token, address=h.dashboard_url)
    assert "run: finished" in status.stdout.splitlines()

    # The job ran with the head's credentials: none is in Ray's logs, its job list or mtseg's.
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    leaks = [str(p) for p in Path(h.temp_dir).rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaks
    ray_list = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "list", "--address", h.dashboard_url],
        env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ray_list.returncode == 0 and sid in ray_list.stdout, ray_list.stderr[-2000:]
    assert secret not in ray_list.stdout + ray_list.stderr + listed.stdout + listed.stderr + status.stdout


@pytest.mark.slow
def test_jobs_list_does_not_report_a_killed_driver_as_succeeded(head):
    """A script that connects with ray.init is a "driver" job, which Ray reports SUCCEEDED when it disconnects."""
    h, token = head
    killed = textwrap.dedent(f"""
        import os, signal, ray
        ray.init(address="{h.address}")
        print(ray.get_runtime_context().get_job_id(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", killed], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    job_id = proc.stdout.split()[-1]
    jobs = sub.JobsClient(h.dashboard_url, token=token)
    deadline = time.monotonic() + 60
    while not any(j.job_id == job_id and j.status.value == "SUCCEEDED" for j in jobs.list_jobs()):  # Ray's view
        assert time.monotonic() < deadline, "Ray never noticed the driver's end"
        time.sleep(0.5)
    listed = _cli(["jobs", "list"], token=token, address=h.dashboard_url)
    assert listed.returncode == 0 and job_id not in listed.stdout
    assert "driver connection(s) not listed" in listed.stderr
    listed = _cli(["jobs", "list", "--drivers"], token=token, address=h.dashboard_url)
    row = next(line for line in listed.stdout.splitlines() if line.startswith(job_id))
    assert "driver: disconnected" in row and "SUCCEEDED" not in row
