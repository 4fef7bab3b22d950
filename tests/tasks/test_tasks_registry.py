"""A task defined outside mtseg: one file, one ``register`` call, and every part of mtseg uses it.

``ForegroundTask`` below (object vs background, built from the instance maps) is written here,
in the test, with its own head, loss, metric, picture and Δm% objective, and registered with
``mtseg.tasks.register``. Without any edit under ``mtseg/``: a 1-worker Ray Train run trains it
beside the five built-in tasks, validation and ``mtseg evaluate`` report its metric, ``mtseg
predict`` draws it, and a 2-trial Tune search reports a Δm% that counts it. Tiny sizes, as the
other Ray tests (32 px, 48 images, one epoch); they share the session's Ray and SeaweedFS
(tests/conftest.py).

After them, unit tests of the registry's own functions on the built-in tasks: ``build_tasks``
and ``compute_losses``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from mtseg import storage
from mtseg.config import TASK_NAMES, load_config
from mtseg.data.categories import IGNORE_INDEX
from mtseg.data.targets import WireField
from mtseg.metrics import ConfusionMatrix
from mtseg.render import blend
from mtseg.tasks import TASKS, build_tasks, compute_losses, register
from mtseg.tasks.base import Task, image_weights, masked_cross_entropy, resize_map


@dataclass(frozen=True)
class ForegroundTask(Task):
    """Is this pixel part of an object? 0 = background, 1 = object, crowd regions ignored."""

    name: ClassVar[str] = "foreground"
    target_keys: ClassVar[tuple[str, ...]] = ("foreground",)
    head_width: ClassVar[float] = 0.5
    objective: ClassVar[str] = "foreground_iou"

    @classmethod
    def from_config(cls, cfg, categories) -> ForegroundTask:
        return cls()

    @property
    def out_channels(self) -> int:
        return 2

    def target_fields(self, image_size):
        return {"foreground": WireField((image_size, image_size), np.dtype(np.uint8), torch.int64)}

    def build_targets(self, instances):
        semantic = instances.semantic
        return {"foreground": np.where(semantic == IGNORE_INDEX, IGNORE_INDEX, semantic > 0).astype(np.uint8)}

    def loss(self, output, batch):
        self.check_batch(output, batch)
        target = batch["foreground"]
        return masked_cross_entropy(output, target, image_weights(batch, target))

    def metric(self):
        return ConfusionMatrix(2)

    def update_metric(self, metric, output, batch, prediction=None):
        metric.update(output.argmax(1), batch["foreground"])

    def compute_metric(self, metric):
        return {"foreground_iou": metric.compute()["iou_per_class"][1]}

    def output_map(self, output, size):
        return resize_map(output.argmax(0, keepdim=True), size, "nearest")[0].numpy()

    def target_map(self, batch, index):
        return batch["foreground"][index].cpu().numpy()

    def draw(self, image, values, categories):
        return blend(image, values)


register(ForegroundTask)

SIX_TASKS = ["semantic", "supercategory", "boundary", "instance", "reconstruction", "foreground"]
TINY = {
    "data": {"image_size": 32, "batch_size": 4, "rows_per_read_task": 8, "map_num_cpus": 0.25},
    "model": {"decoder_channels": 16},
    "tasks": {"names": SIX_TASKS, "patch_size": 4, "center_sigma": 1.5},
    "train": {
        "num_workers": 1,
        "cpus_per_worker": 0.5,
        "epochs": 1,
        "warmup_steps": 2,
        "lr": 0.003,
        "checkpoint_every_steps": 0,
        "log_every_steps": 4,
        "keep_checkpoints": 1,
        "max_failures": 0,
    },
}


def _cfg(data_uri: str, storage_path: str, **sections):
    from mtseg.config import config_from_dict

    tree = json.loads(json.dumps(TINY))
    tree["data"]["uri"] = data_uri
    tree["train"]["storage_path"] = storage_path
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return config_from_dict(tree)


@pytest.fixture
def _in_tmp(tmp_path, monkeypatch):
    """TensorBoard events of S3-stored runs go to ./runs/<name>: keep them per test."""
    monkeypatch.chdir(tmp_path)


def test_one_register_call_makes_a_task_known():
    from mtseg.tune import task_objective

    assert TASKS["foreground"] is ForegroundTask
    register(ForegroundTask)  # the same class again (a module imported twice) is fine
    assert task_objective("foreground") == ("val/foreground_iou", True, ("foreground",))


@pytest.mark.slow
def test_a_registered_task_trains_validates_and_is_drawn(ray_local, tiny_dataset, s3_bucket, tmp_path, _in_tmp):
    from mtseg.cli import main
    from mtseg.report import read_scalars
    from mtseg.train.trainer import local_run_dir, run_training, run_uri

    cfg = _cfg(tiny_dataset, s3_bucket, train={"run_name": "six"})
    result = run_training(cfg)
    assert result.error is None
    losses = read_scalars(os.path.join(local_run_dir(cfg), "tensorboard"))["train/loss/foreground"]
    assert losses and all(math.isfinite(v) for _, v in losses)  # it trained
    assert 0.0 <= result.metrics["val/foreground_iou"] <= 1.0  # validation reports its metric
    assert "val/miou" in result.metrics and "val/mask_ap" in result.metrics  # beside the other five

    # mtseg evaluate's Ray Data actors score it too
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                run_uri(cfg),
                "--data",
                tiny_dataset,
                "--split",
                "val2017",
                "--batch-size",
                "4",
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["metrics"]["val/foreground_iou"] == pytest.approx(result.metrics["val/foreground_iou"], abs=1e-9)

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", run_uri(cfg), str(image), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    with Image.open(out / "photo_foreground.png") as picture:
        assert picture.size == (52, 40) and picture.mode == "RGB"


@pytest.mark.slow
def test_a_registered_task_counts_in_the_tune_objective(ray_local, tiny_dataset, s3_bucket, _in_tmp):
    from mtseg.tune import baseline_config, baseline_key, delta_m, run_tune, task_objective

    cfg = _cfg(
        tiny_dataset,
        s3_bucket,
        tune={
            "experiment_name": "six",
            "max_concurrent_trials": 2,
            "num_samples": 1,
            "space": {"train.lr": "grid[0.003, 0.01]"},
        },
    )
    # Cached single-task baselines (training six of them would dwarf the search): foreground's
    # and semantic's are usable, the others' metrics undefined (left out of Δm%).
    values = {"semantic": 0.2, "foreground": 0.3}
    for task in SIX_TASKS:
        key = baseline_key(baseline_config(cfg, task))
        record = {"task": task, "metric": task_objective(task)[0], "value": values.get(task), "key": key}
        storage.write_bytes(storage.join(s3_bucket, "baselines", f"{key}.json"), json.dumps(record).encode())

    outcome = run_tune(cfg, delta_m=True)
    assert len(outcome.rows) == 2 and all(r["state"] == "TERMINATED" for r in outcome.rows)
    for result in outcome.grid:  # one epoch: each trial's one report
        metrics = result.metrics
        gains = [(metrics["val/miou"] - 0.2) / 0.2, (metrics["val/foreground_iou"] - 0.3) / 0.3]
        assert metrics["val/delta_m"] == pytest.approx(100 * sum(gains) / 2)
        assert metrics["val/delta_m"] == pytest.approx(delta_m(metrics, outcome.baselines, SIX_TASKS))
        assert metrics["val/delta_m"] != pytest.approx(delta_m(metrics, outcome.baselines, SIX_TASKS[:-1]))


# ------------------------------------------------------- build_tasks and compute_losses


def test_registry_and_build_order(categories):
    assert tuple(TASKS)[: len(TASK_NAMES)] == TASK_NAMES  # the built-in ones first (tests may register more)
    cfg = load_config(None, ["tasks.names=[semantic,reconstruction,boundary]"])
    tasks = build_tasks(cfg, categories)
    assert list(tasks) == ["semantic", "reconstruction", "boundary"]
    assert tasks["semantic"].out_channels == categories.num_classes
    cfg.tasks.names = ["semantic", "depth"]
    with pytest.raises(ValueError, match="unknown task 'depth'"):
        build_tasks(cfg, categories)


def test_compute_losses_errors_name_what_is_missing(categories):
    cfg = load_config(None, ["tasks.names=[semantic,boundary]"])
    tasks = build_tasks(cfg, categories)
    out = {"semantic": torch.randn(1, 4, 8, 8), "boundary": torch.randn(1, 1, 8, 8)}
    with pytest.raises(KeyError, match="task boundary: the batch has no 'boundary'"):
        compute_losses(tasks, out, {"semantic": torch.zeros(1, 8, 8, dtype=torch.long)})
    with pytest.raises(KeyError, match="no 'boundary' output"):
        compute_losses(tasks, {"semantic": out["semantic"]}, {})
    with pytest.raises(ValueError, match="spatial sizes differ"):
        compute_losses(tasks, out, {"semantic": torch.zeros(1, 4, 4, dtype=torch.long), "boundary": torch.zeros(1, 8, 8)})
