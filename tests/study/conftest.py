"""Shared by the study tests: a study config over the tiny search recipe of tests/tune, and fabricated runs."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from mtseg.config import config_from_dict

ARMS = {"single": {"tasks.names": "[semantic]"}, "mtl": {"tasks.names": "[semantic, boundary, instance]"}}


@pytest.fixture
def study_cfg(tmp_path):
    """``study_cfg(**study)``: a config with a two-arm study section (``single`` the reference)."""

    def make(**study):
        section = {"name": "s", "seeds": 3, "reference": "single", "arms": json.loads(json.dumps(ARMS)), **study}
        return config_from_dict({"train": {"storage_path": str(tmp_path / "store")}, "study": section})

    return make


@pytest.fixture
def fake_runs():
    """``fake_runs(seeds, corruptions=())``: finished runs of both arms with plausible metrics (and a
    robustness record per run when corruptions are named), seeded so every call gives the same numbers."""

    def make(seeds, corruptions=()):
        rng = random.Random(0)
        runs = []
        for arm, base in (("single", 0.50), ("mtl", 0.54)):
            for seed in seeds:
                miou = base + rng.uniform(-0.02, 0.02)
                val = {"val/miou": miou, "val/pixel_acc": 0.8}
                if arm == "mtl":
                    val.update({"val/pq": 0.3 + rng.uniform(-0.02, 0.02), "val/boundary_f1": 0.4})
                train = {"val/miou": miou + 0.05}
                by = {c: {str(s): {"val/miou": miou * (1 - 0.1 * s)} for s in (1, 2, 3)} for c in corruptions}
                metrics = {**val, **{f"train/{k[4:]}": v for k, v in train.items()}, "gap/miou": train["val/miou"] - miou}
                robustness = None
                if corruptions:
                    mpc = miou * 0.8
                    robustness = {"by_corruption": by, "summary": {"val/miou": {"clean": miou, "mPC": mpc, "rPC": 0.8}}}
                    metrics.update({"mpc/miou": mpc, "rpc/miou": 0.8})
                runs.append(
                    {
                        "arm": arm,
                        "seed": seed,
                        "trial": f"{arm}{seed}",
                        "state": "TERMINATED",
                        "epochs": 1,
                        "run": f"runs/{arm}{seed}",
                        "trial_dir": f"trial_{arm}{seed}",
                        "error": None,
                        "checkpoint": f"runs/{arm}{seed}/checkpoint_000001",
                        "splits": {"val": val, "train": train},
                        "robustness": robustness,
                        "metrics": metrics,
                    }
                )
        return runs

    return make


def read_yaml(text: str) -> dict:
    return yaml.safe_load(text)
