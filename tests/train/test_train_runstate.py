"""One live driver per run (the lease), what became of each run (the outcome), and --restart's reach."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from mtseg import storage
from mtseg.train import runstate
from mtseg.train.runstate import RunLease, RunLockedError, guard_run, read_outcome


def _write_lease(run: str, **fields) -> None:
    holder = runstate.Holder.me(ttl_s=60.0)
    record = {**holder.__dict__, **fields}
    storage.write_bytes(storage.join(run, runstate.LEASE_FILE), json.dumps(record).encode())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lease_cases(run: str) -> None:
    logged: list[str] = []
    with RunLease(run, log=logged.append) as first:
        with pytest.raises(RunLockedError) as err:
            RunLease(run).acquire()
        message = str(err.value)
        assert first.holder.owner in message and "\n" not in message
    # Released: the next driver takes it at once.
    with RunLease(run):
        pass
    # A driver on this host that is gone (kill -9, then restart): taken over at once.
    _write_lease(run, pid=_dead_pid(), owner="someone@here:1")
    with RunLease(run, log=logged.append):
        assert any("no longer running" in line for line in logged)
    # Another host: live while it heartbeats, taken over once the heartbeat is older than the ttl.
    _write_lease(run, host="elsewhere", owner="u@elsewhere:7", heartbeat_at=time.time())
    with pytest.raises(RunLockedError, match="u@elsewhere:7"):
        RunLease(run).acquire()
    _write_lease(run, host="elsewhere", owner="u@elsewhere:7", heartbeat_at=time.time() - 600)
    with RunLease(run, log=logged.append):
        assert any("stopped heartbeating" in line for line in logged)


def test_lease_on_a_local_run(tmp_path):
    _lease_cases(str(tmp_path / "run"))


@pytest.mark.slow
def test_lease_on_s3_uses_conditional_writes(s3_bucket):
    run = f"{s3_bucket}/run"
    _lease_cases(run)
    # Two drivers racing for a free run: the conditional create lets exactly one win.
    winners, losers = [], []
    barrier = threading.Barrier(2)

    def race():
        lease = RunLease(run)
        barrier.wait()
        try:
            lease.acquire()
            winners.append(lease)
        except RunLockedError:
            losers.append(lease)

    threads = [threading.Thread(target=race) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(losers) == 1
    winners[0].release()


def test_heartbeat_keeps_the_lease_fresh(tmp_path):
    run = str(tmp_path / "run")
    with RunLease(run, ttl_s=2.0, heartbeat_s=0.2) as lease:
        time.sleep(1.0)
        with open(os.path.join(run, runstate.LEASE_FILE)) as f:
            record = json.load(f)
        assert record["token"] == lease.holder.token and time.time() - record["heartbeat_at"] < 1.0
    assert not os.path.exists(os.path.join(run, runstate.LEASE_FILE))


def test_outcome_is_recorded_for_each_way_a_run_ends(tmp_path):
    run = str(tmp_path / "run")
    with guard_run(run):
        assert read_outcome(run)["status"] == "running"
    assert read_outcome(run)["status"] == "finished"
    with guard_run(run) as lease:
        lease.fail("TrainingFailedError: worker died")
    assert read_outcome(run)["status"] == "failed" and "worker died" in read_outcome(run)["reason"]
    with pytest.raises(KeyboardInterrupt), guard_run(run):
        raise KeyboardInterrupt
    assert read_outcome(run)["status"] == "interrupted" and "Ctrl-C" in read_outcome(run)["reason"]
    with pytest.raises(OSError), guard_run(run):
        raise OSError(28, "No space left on device")
    assert read_outcome(run)["status"] == "failed" and "No space left" in read_outcome(run)["reason"]
    # A driver killed with SIGKILL cannot write its outcome: the dead lease says it.
    runstate.write_outcome(run, "running", owner="someone@here:1")
    _write_lease(run, pid=_dead_pid())
    outcome = read_outcome(run)
    assert outcome["status"] == "interrupted" and "no longer running" in outcome["reason"]


# ---------------------------------------------------------------------------- names and deletes


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../other", ""])
def test_run_names_that_leave_the_run_are_refused_before_anything_runs(tmp_path, name, capsys):
    from mtseg.cli import main

    storage_path = tmp_path / "runs"
    (storage_path / "other-run").mkdir(parents=True)
    (storage_path / "other-run" / "keep.txt").write_text("x")
    (tmp_path / "unrelated.txt").write_text("x")
    assert main(["train", f"train.storage_path={storage_path}", f"train.run_name={name}", "--restart"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtseg: error: train.run_name") and "\n" not in err
    assert (storage_path / "other-run" / "keep.txt").exists() and (tmp_path / "unrelated.txt").exists()


def _restart_keeps_everything_outside_the_run(root: str) -> None:
    from mtseg.config import load_config
    from mtseg.train.trainer import clear_run

    cfg = load_config(None, [f"train.storage_path={root}/runs", "train.run_name=mine"])
    for uri in (
        f"{root}/runs/mine/checkpoint_1/state.pt",
        f"{root}/runs/mine/config.yaml",
        f"{root}/runs/other/config.yaml",
        f"{root}/runs/mine-2/config.yaml",
        f"{root}/unrelated.txt",
    ):
        storage.write_bytes(uri, b"x")
    with RunLease(f"{root}/runs/mine"):
        clear_run(cfg, log=lambda *a: None)
        left = storage.list_files(f"{root}/runs/mine", recursive=True)
        assert [os.path.basename(u) for u in left] == [runstate.LEASE_FILE]
    for uri in (f"{root}/runs/other/config.yaml", f"{root}/runs/mine-2/config.yaml", f"{root}/unrelated.txt"):
        assert storage.exists(uri), uri
    # The second line of defence: a delete outside the run is refused whatever built it.
    with pytest.raises(storage.StorageError, match="refusing to delete outside"):
        storage.delete(f"{root}/runs/other", recursive=True, within=f"{root}/runs/mine")
    with pytest.raises(storage.StorageError, match="refusing to delete outside"):
        storage.delete(f"{root}/runs/mine", recursive=True, within=f"{root}/runs/mine")


def test_restart_deletes_only_inside_the_run_locally(tmp_path):
    _restart_keeps_everything_outside_the_run(str(tmp_path))
    assert not storage.is_inside(str(tmp_path / "runs" / "mine" / ".." / "other"), str(tmp_path / "runs" / "mine"))


@pytest.mark.slow
def test_restart_deletes_only_inside_the_run_on_s3(s3_bucket):
    _restart_keeps_everything_outside_the_run(s3_bucket)
    with pytest.raises(storage.StorageError):
        storage.is_inside(f"{s3_bucket}/runs/mine/../other", f"{s3_bucket}/runs/mine")


def test_a_ray_worker_error_becomes_its_root_cause_line():
    text = (
        "Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    save()\n'
        "mtseg.train.checkpoint.CheckpointError: /tmp/c/state.pt: no space left on the device\n"
    )
    assert (
        runstate.error_line(RuntimeError(text))
        == "mtseg.train.checkpoint.CheckpointError: /tmp/c/state.pt: no space left on the device"
    )
    assert runstate.error_line(ValueError("bad\nmore")) == "ValueError: bad"


def test_a_folder_that_holds_no_mtseg_run_is_refused_in_one_line(tmp_path):
    """No lease, no outcome, no complete checkpoint: someone's folder, not a run to resume."""
    import torch

    from mtseg.train import checkpoint as ckpt

    runstate.check_is_run(str(tmp_path / "missing"))  # a new run
    (tmp_path / "empty").mkdir()
    runstate.check_is_run(str(tmp_path / "empty"))
    theirs = tmp_path / "theirs"
    (theirs / "checkpoint_old").mkdir(parents=True)
    (theirs / "checkpoint_old" / "state.pt").write_bytes(b"half an upload")  # no meta.json
    (theirs / "config.yaml").write_text("their: config\n")
    with pytest.raises(runstate.NotARunError) as err:
        runstate.check_is_run(str(theirs))
    message = str(err.value)
    assert message.startswith(f"train.run_name: {theirs} ") and "not an mtseg run" in message and "\n" not in message
    assert err.value.exit_code == 2
    # Any one sign of a run makes it one: a complete checkpoint, an outcome, a lease.
    ckpt.save(str(theirs / "checkpoint_new"), {"w": torch.zeros(1)}, {"epoch": 0, "step": 1, "epoch_rows": 4})
    runstate.check_is_run(str(theirs))
    for name in (runstate.OUTCOME_FILE, runstate.LEASE_FILE):
        run = tmp_path / name
        run.mkdir()
        (run / name).write_text("{}")
        runstate.check_is_run(str(run))
