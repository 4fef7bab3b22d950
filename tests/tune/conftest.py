"""Shared by the Ray Tune tests: configs with a search space, and the end-to-end searches' setup.

The end-to-end searches are tiny (32 px, 48 images, one worker of half a CPU per trial, two
trials at once on 2 cores); they share the session's Ray and SeaweedFS (tests/conftest.py).
A trial that can't learn (static weights of zero) makes the early stop and the exploit
deterministic.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

from mtseg import storage
from mtseg.config import config_from_dict
from mtseg.train import checkpoint as ckpt

BASE = {
    "data": {"image_size": 32, "batch_size": 4, "rows_per_read_task": 8, "map_num_cpus": 0.25},
    "model": {"decoder_channels": 16},
    "tasks": {"names": ["semantic", "boundary"], "patch_size": 4, "center_sigma": 1.5},
    "weighting": {"name": "static", "static": {"semantic": 1.0, "boundary": 0.0}},
    "train": {
        "num_workers": 1,
        "cpus_per_worker": 0.5,
        "epochs": 2,
        "warmup_steps": 2,
        "lr": 0.003,
        "checkpoint_every_steps": 0,
        "log_every_steps": 4,
        "keep_checkpoints": 2,
        "max_failures": 1,
    },
}


@pytest.fixture
def make_cfg():
    """``make_cfg(space, **sections)``: a config of two tasks with ``tune.space`` and the sections given."""

    def make(space: dict, **sections):
        data = {"tasks": {"names": ["semantic", "boundary"]}, "tune": {"space": space}}
        for name, values in sections.items():
            data.setdefault(name, {}).update(values)
        return config_from_dict(data)

    return make


@pytest.fixture
def search_yaml(tmp_path):
    """``search_yaml(data_uri, storage_path, tune, **sections)``: the tiny search's YAML (:data:`BASE`), its path."""

    def write(data_uri: str, storage_path: str, tune: dict, **sections) -> str:
        tree = json.loads(json.dumps(BASE))
        tree["data"]["uri"] = data_uri
        tree["train"]["storage_path"] = storage_path
        for name, values in sections.items():
            tree.setdefault(name, {}).update(values)
        tree["tune"] = tune
        path = tmp_path / f"{tune['experiment_name']}.yaml"
        path.write_text(yaml.safe_dump(tree))
        return str(path)

    return write


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """TensorBoard events of S3-stored runs go to ./runs/<name>: keep them per test."""
    monkeypatch.chdir(tmp_path)


def _experiment_runs(cfg) -> dict[str, str]:
    """The Train runs of a search's trials: {run name: URI}."""
    from mtseg.tune import experiment_uri

    return {os.path.basename(d.rstrip("/")): d for d in storage.list_dirs(storage.join(experiment_uri(cfg), "runs"))}


@pytest.fixture
def runs_of():
    """``runs_of(cfg)``: the Train runs of a search's trials, {run name: URI}."""
    return _experiment_runs


@pytest.fixture
def checkpoint_state():
    """``checkpoint_state(uri)``: (state, meta) of a checkpoint in storage."""
    return ckpt.load
