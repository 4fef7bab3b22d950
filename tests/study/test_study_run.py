"""A study end to end (mtseg/study/runner.py): 2 arms x 2 seeds as Ray Tune trials on the session's local Ray,
streaming from and checkpointing into SeaweedFS; killed mid-way, resumed without re-running finished pairs,
then resumed again without re-evaluating any."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from mtseg import storage
from mtseg.config import load_config
from mtseg.study import run_study, study_uri
from mtseg.study.runner import EVALUATION_FILE
from mtseg.train import checkpoint as ckpt

# The tiny recipe of tests/tune (32 px, one worker of half a CPU per run), three runs at once on 2 cores
# so that the four runs take two rounds, killed one included; one epoch of 6 steps with a checkpoint
# after 3, so that a kill lands mid-run. The train-split evaluation and the gap are left to the unit
# tests (tests/study/test_study_runner.py): here they would double the evaluations.
STUDY = {
    "data": {"image_size": 32, "batch_size": 8, "rows_per_read_task": 8, "map_num_cpus": 0.25},
    "model": {"decoder_channels": 16},
    "tasks": {"names": ["semantic"], "patch_size": 4, "center_sigma": 1.5},
    "train": {
        "num_workers": 1,
        "cpus_per_worker": 0.5,
        "epochs": 1,
        "warmup_steps": 1,
        "lr": 0.003,
        "checkpoint_every_steps": 3,
        "log_every_steps": 4,
        "keep_checkpoints": 2,  # nothing pruned: a finished run's checkpoints stay as they were
        "max_failures": 1,
    },
    "tune": {"max_concurrent_trials": 3},
    "study": {
        "name": "killed",
        "seeds": 2,
        "reference": "single",
        "arms": {"single": {}, "mtl": {"tasks.names": "[semantic, boundary]"}},
        "metrics": ["val/miou", "val/boundary_f1"],
    },
}


def _terminated_trials(exp_uri: str) -> int:
    count = 0
    for uri in storage.list_files(exp_uri):
        if os.path.basename(uri).startswith("experiment_state") and uri.endswith(".json"):
            count = max(count, storage.read_bytes(uri).decode().count('\\"status\\": \\"TERMINATED\\"'))
    return count


def _runs(exp_uri: str) -> dict[str, str]:
    return {os.path.basename(d.rstrip("/")): d for d in storage.list_dirs(storage.join(exp_uri, "runs"))}


@pytest.mark.slow
def test_killed_study_resumes_without_rerunning_finished_pairs(ray_local, tiny_dataset, s3_bucket, tmp_path, monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)  # TensorBoard events of S3-stored runs go to ./runs/<name>
    tree = json.loads(json.dumps(STUDY))
    tree["data"]["uri"], tree["train"]["storage_path"] = tiny_dataset, s3_bucket
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    cfg = load_config(str(path))
    exp = study_uri(cfg)

    t0 = time.monotonic()
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    first = subprocess.Popen(
        [sys.executable, "-m", "mtseg.cli", "study", "--config", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Kill when one pair is finished (in Tune's state) and another has a mid-epoch checkpoint.
        deadline = time.monotonic() + 300
        while _terminated_trials(exp) < 1 or sum(bool(ckpt.list_checkpoints(u)) for u in _runs(exp).values()) < 2:
            assert first.poll() is None, "the study ended before it could be killed"
            assert time.monotonic() < deadline, "no run finished within 300 s"
            time.sleep(0.5)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    finished = {
        name: ckpt.list_checkpoints(uri)
        for name, uri in _runs(exp).items()
        if (found := ckpt.latest_valid(uri, log=lambda *a: None)) and found[1]["epoch"] == 1
    }
    assert len(finished) >= 1

    t1 = time.monotonic()
    logged: list[tuple[float, str]] = []
    outcome = run_study(load_config(str(path)), resume=True, log=lambda line: logged.append((time.monotonic(), line)))
    t2 = time.monotonic()
    runs = outcome.results["runs"]
    assert [(r["arm"], r["seed"], r["state"]) for r in runs] == [
        ("single", 0, "TERMINATED"),
        ("single", 1, "TERMINATED"),
        ("mtl", 0, "TERMINATED"),
        ("mtl", 1, "TERMINATED"),
    ]
    after = _runs(exp)
    assert len(after) == 4
    for name, checkpoints in finished.items():
        assert ckpt.list_checkpoints(after[name]) == checkpoints  # not trained again
    for r in runs:
        # Each run trained its arm with its seed, and its final model was evaluated.
        run_cfg = yaml.safe_load(storage.read_bytes(storage.join(r["run"], "config.yaml")))
        assert run_cfg["train"]["seed"] == r["seed"] and len(run_cfg["tasks"]["names"]) == (1 if r["arm"] == "single" else 2)
        assert storage.exists(storage.join(r["trial_dir"], EVALUATION_FILE))
        m = r["metrics"]
        assert math.isfinite(m["val/miou"]) and r["checkpoint"].startswith(r["run"] + "/checkpoint_")
        assert ("val/boundary_f1" in m) == (r["arm"] == "mtl")
    # The seed matters: two seeds of an arm are two different models.
    assert runs[0]["metrics"]["val/miou"] != runs[1]["metrics"]["val/miou"]

    summary = outcome.results["summary"]
    assert summary["keys"] == ["val/miou", "val/boundary_f1"]
    mtl = summary["arms"]["mtl"]
    assert mtl["n_seeds"] == 2 and mtl["paired"]["val/miou"]["n"] == 2 and mtl["delta_m"]["n"] == 2
    assert math.isfinite(mtl["paired"]["val/miou"]["ci_low"]) and math.isfinite(mtl["delta_m"]["ci_low"])
    page = storage.read_bytes(outcome.paths["report.html"]).decode()
    assert "<h3>mtl</h3>" in page and page.count('src="data:image/png;base64,') == 2
    assert json.loads(storage.read_bytes(outcome.paths["results.json"]))["study"]["seeds"] == [0, 1]

    # Resumed once more: nothing to train, and every evaluation is read back, none redone.
    again: list[str] = []
    second = run_study(load_config(str(path)), resume=True, log=again.append)
    evaluated = next(t for t, line in logged if "evaluating" in line)
    print(
        f"killed after {t1 - t0:.0f}s, resumed in {t2 - t1:.0f}s (evaluations from {evaluated - t1:.0f}s), "
        f"resumed again in {time.monotonic() - t2:.0f}s"
    )
    assert sum("evaluation reused" in line for line in again) == 4
    assert not any("evaluating" in line for line in again)
    assert second.results["summary"]["arms"]["mtl"]["delta_m"]["values"] == mtl["delta_m"]["values"]
