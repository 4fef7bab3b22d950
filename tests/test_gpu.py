"""The GPU path: bf16 autocast + channels_last training of every task and weighting strategy on CUDA,
``train.compile``, and one Ray Train step on a GPU worker. The ``gpu`` tests skip without CUDA.

benchmarks/gpu.py measures the same path; ``make bench`` runs its CPU smoke.
"""

from __future__ import annotations

import math

import pytest
import torch

from mtseg.config import WEIGHTING_NAMES, load_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(local shard root, categories, every task's training batches) from 8 synthetic 64 px images."""
    from mtseg.data.categories import CategoryIndex
    from mtseg.data.manifest import read_manifest
    from mtseg.data.shard import shard_coco
    from mtseg.data.synth import synthesize

    root = tmp_path_factory.mktemp("coco")
    synthesize(str(root), train=8, val=2, size=64, seed=3)
    uri = str(root / "shards")
    shard_coco(str(root), "train2017", uri, images_per_shard=8, log=lambda *a: None)
    return uri, CategoryIndex.from_categories(read_manifest(uri, "train2017")["categories"])


def _cfg(uri: str, *overrides: str):
    return load_config(
        None,
        [
            f"data.uri={uri}",
            "data.image_size=64",
            "data.batch_size=4",
            "model.decoder_channels=16",
            "model.channels_last=true",
            "train.amp=true",
            "train.warmup_steps=0",
            *overrides,
        ],
    )


def _batches(cfg, uri, categories):
    from mtseg.data.pipeline import iter_local_batches
    from mtseg.tasks import build_tasks

    return list(
        iter_local_batches(uri, "train2017", categories, cfg, train=True, tasks=build_tasks(cfg, categories), drop_last=True)
    )


def _train_steps(cfg, uri, categories, device, steps=2):
    """``steps`` optimiser steps; returns (state, per-step metrics, parameters before)."""
    from mtseg.train.loop import build_state, train_one_epoch

    state = build_state(cfg, categories, total_steps=steps, device=device)
    before = [p.detach().clone() for p in state.module.parameters()]
    seen = []
    train_one_epoch(
        state, iter(_batches(cfg, uri, categories) * steps), steps=steps, on_step=lambda st, metrics, ids: seen.append(metrics)
    )
    return state, seen, before


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("weighting", WEIGHTING_NAMES)
def test_every_task_trains_in_bf16_channels_last_on_cuda(dataset, weighting):
    """All five tasks in one model under each strategy: finite losses, every parameter moved, NHWC weights."""
    uri, categories = dataset
    cfg = _cfg(uri, f"weighting.name={weighting}")
    assert len(cfg.tasks.names) == 5
    state, seen, before = _train_steps(cfg, uri, categories, torch.device("cuda"))
    assert len(seen) == 2
    for name in cfg.tasks.names:
        assert all(math.isfinite(m[f"train/loss/{name}"]) for m in seen), name
    moved = [not torch.equal(b, p.detach()) for b, p in zip(before, state.module.parameters())]
    assert all(moved), f"{moved.count(False)} parameters did not move"
    conv = next(m for m in state.module.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = state.model(torch.rand(2, 3, 64, 64, device="cuda"))
    assert {v.dtype for v in out.values()} == {torch.bfloat16}  # the forward really ran in bf16


@pytest.mark.gpu
@needs_cuda
def test_compiled_model_trains_on_cuda_and_checkpoints_like_the_eager_one(dataset):
    uri, categories = dataset
    state, seen, before = _train_steps(
        _cfg(uri, "train.compile=true", "tasks.names=[semantic, boundary]"), uri, categories, torch.device("cuda")
    )
    assert all(math.isfinite(m["train/loss"]) for m in seen)
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, state.module.parameters()))
    assert not any(k.startswith("_orig_mod") for k in state.state_dict()["model"])


def test_train_compile_wraps_the_model_and_checkpoints_keep_the_bare_keys(dataset):
    """``train.compile`` (off by default): state.model is compiled, state.module and its state_dict are the bare model's."""
    from mtseg.train.loop import build_state

    uri, categories = dataset
    assert load_config(None, [f"data.uri={uri}"]).train.compile is False
    eager = build_state(_cfg(uri), categories, total_steps=1, device=torch.device("cpu"))
    compiled = build_state(_cfg(uri, "train.compile=true"), categories, total_steps=1, device=torch.device("cpu"))
    assert isinstance(compiled.model, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.module is compiled.model._orig_mod
    assert list(compiled.state_dict()["model"]) == list(eager.state_dict()["model"])
    compiled.load_state_dict(eager.state_dict())  # an eager run's checkpoint resumes a compiled one


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
def test_one_ray_train_step_on_a_gpu_worker(ray_local, tiny_dataset, s3_bucket, tmp_path, monkeypatch):
    """``train.use_gpu=true``: the TorchTrainer asks for one GPU per worker and the run trains a step on it."""
    from mtseg.train.trainer import build_trainer, run_training

    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        None,
        [
            f"data.uri={tiny_dataset}",
            f"train.storage_path={s3_bucket}",
            "train.run_name=gpu-step",
            "data.image_size=32",
            "data.batch_size=48",
            "data.map_num_cpus=0.25",
            "model.decoder_channels=16",
            "model.channels_last=true",
            "tasks.patch_size=4",
            "train.use_gpu=true",
            "train.num_workers=1",
            "train.cpus_per_worker=1",
            "train.epochs=1",
            "train.warmup_steps=0",
            "train.checkpoint_every_steps=0",
        ],
    )
    scaling = build_trainer(cfg).scaling_config
    assert scaling.use_gpu and scaling.resources_per_worker["GPU"] == 1
    result = run_training(cfg)
    assert result.error is None
    assert result.metrics["train/step"] == 1
    assert math.isfinite(result.metrics["val/miou"])
