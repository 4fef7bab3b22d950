"""The epoch loop without Ray: :func:`mtseg.train.loop.fit` on plain batches, resumed mid-epoch."""

from __future__ import annotations

import pytest
import torch

from mtseg.config import load_config
from mtseg.train import checkpoint as ckpt
from mtseg.train.loop import build_state, fit

STEPS_PER_EPOCH = 3  # 12 images, batch 4


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """(config, categories, the 3 training batches of every epoch) from 12 synthetic 32 px images."""
    from mtseg.data.categories import CategoryIndex
    from mtseg.data.manifest import read_manifest
    from mtseg.data.pipeline import iter_local_batches
    from mtseg.data.shard import shard_coco
    from mtseg.data.synth import synthesize
    from mtseg.tasks import build_tasks

    root = tmp_path_factory.mktemp("coco")
    synthesize(str(root), train=12, val=2, size=32, seed=5)
    uri = str(root / "shards")
    shard_coco(str(root), "train2017", uri, images_per_shard=12, log=lambda *a: None)
    cfg = load_config(
        None,
        [
            f"data.uri={uri}",
            "data.image_size=32",
            "data.batch_size=4",
            "model.decoder_channels=8",
            "tasks.names=[semantic, boundary]",
            "tasks.patch_size=4",
            "weighting.name=uncertainty",
            "train.warmup_steps=1",
            "train.epochs=2",
        ],
    )
    categories = CategoryIndex.from_categories(read_manifest(uri, "train2017")["categories"])
    tasks = build_tasks(cfg, categories)
    return cfg, categories, list(iter_local_batches(uri, "train2017", categories, cfg, train=True, tasks=tasks, drop_last=True))


def _fit(state, data, reports, stop_at_step=None):
    """fit() as a worker runs it: batches from the recorded position, a fake validation per epoch."""

    def train_batches(epoch, start_rows):
        return iter(data[start_rows // state.cfg.data.batch_size :])

    def on_step(st, metrics, ids):
        if st.step == stop_at_step:
            raise KeyboardInterrupt  # the worker dies right after this step's checkpoint

    def validate():
        return {"val/miou": 0.1 * (state.epoch + 1), "val/step": float(state.step)}

    fit(
        state,
        steps_per_epoch=STEPS_PER_EPOCH,
        train_batches=train_batches,
        validate=validate,
        report=reports.append,
        on_step=on_step,
        log=lambda *a: None,
    )


def test_fit_runs_every_epoch_and_reports_its_validation(batches):
    cfg, categories, data = batches
    state = build_state(cfg, categories, total_steps=2 * STEPS_PER_EPOCH, device=torch.device("cpu"))
    reports = []
    _fit(state, data, reports)
    assert reports == [{"val/miou": 0.1, "val/step": 3.0}, {"val/miou": 0.2, "val/step": 6.0}]
    assert (state.epoch, state.step, state.epoch_rows) == (2, 2 * STEPS_PER_EPOCH, 0)
    assert state.last_val == reports[-1]


def test_fit_resumed_mid_epoch_from_a_checkpoint_ends_bit_identical(batches, tmp_path):
    cfg, categories, data = batches
    total = 2 * STEPS_PER_EPOCH
    straight = build_state(cfg, categories, total_steps=total, device=torch.device("cpu"))
    _fit(straight, data, [])

    first = build_state(cfg, categories, total_steps=total, device=torch.device("cpu"))
    with pytest.raises(KeyboardInterrupt):
        _fit(first, data, [], stop_at_step=STEPS_PER_EPOCH + 1)  # one step into epoch 2
    ckpt.save(str(tmp_path / "c"), first.state_dict(), first.meta())
    resumed = build_state(cfg, categories, total_steps=total, device=torch.device("cpu"))
    resumed.load_state_dict(ckpt.load(str(tmp_path / "c"))[0])
    assert (resumed.epoch, resumed.epoch_rows) == (1, 4) and resumed.last_val["val/miou"] == 0.1
    reports = []
    _fit(resumed, data, reports)
    assert reports == [{"val/miou": 0.2, "val/step": 6.0}]
    for key, value in straight.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[key], value), key
    assert torch.equal(resumed.strategy.log_vars, straight.strategy.log_vars)


def test_last_val_is_where_checkpoints_have_always_kept_it(batches, tmp_path):
    cfg, categories, _ = batches
    state = build_state(cfg, categories, total_steps=4, device=torch.device("cpu"))
    state.last_val = {"val/miou": 0.25}
    saved = state.state_dict()
    assert saved["best"] == {"last_val": {"val/miou": 0.25}}  # the on-disk format is unchanged
    ckpt.save(str(tmp_path / "c"), saved, state.meta())
    fresh = build_state(cfg, categories, total_steps=4, device=torch.device("cpu"))
    fresh.load_state_dict(ckpt.load(str(tmp_path / "c"))[0])
    assert fresh.last_val == {"val/miou": 0.25}
    fresh.load_state_dict({k: v for k, v in saved.items() if k != "best"})  # no validation yet
    assert fresh.last_val == {}


def test_val_every_epochs_validates_and_reports_every_nth_epoch_and_the_last(batches):
    cfg, categories, data = batches
    cfg = load_config(
        None,
        [
            f"data.uri={cfg.data.uri}",
            "data.image_size=32",
            "data.batch_size=4",
            "model.decoder_channels=8",
            "tasks.names=[semantic, boundary]",
            "tasks.patch_size=4",
            "weighting.name=uncertainty",
            "train.warmup_steps=1",
            "train.epochs=5",
            "train.val_every_epochs=2",
        ],
    )
    state = build_state(cfg, categories, total_steps=5 * STEPS_PER_EPOCH, device=torch.device("cpu"))
    reports = []
    _fit(state, data, reports)
    # Epochs 2 and 4, and 5 (the last); each report holds its own epoch's validation.
    assert [r["val/step"] for r in reports] == [2 * STEPS_PER_EPOCH, 4 * STEPS_PER_EPOCH, 5 * STEPS_PER_EPOCH]
    assert (state.epoch, state.step) == (5, 5 * STEPS_PER_EPOCH)
