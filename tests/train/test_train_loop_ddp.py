"""Data-parallel replicas stay identical: every parameter AND buffer, bit for bit, after every step.

Two gloo ranks run :func:`mtseg.train.loop.train_one_epoch` as a Ray Train worker does (the
model wrapped in DDP, whose bucketed all-reduce averages the gradients during backward for
these single-pass strategies) on the real multi-task model with BatchNorm, each rank on its
own batches. BatchNorm running
statistics are computed from each rank's batch, so without the buffer broadcast they would
differ after the first step.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from mtseg.config import load_config
    from mtseg.data.manifest import read_manifest
    from mtseg.data.categories import CategoryIndex
    from mtseg.data.pipeline import iter_local_batches
    from mtseg.tasks import build_tasks
    from mtseg.train.loop import build_state, train_one_epoch

    out_dir, data_uri, weightings, backend = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=2)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    wrap = (lambda m: DDP(m, device_ids=[rank])) if backend == "nccl" else DDP
    categories = CategoryIndex.from_categories(read_manifest(data_uri, "train2017")["categories"])
    out = {}
    for weighting in weightings:
        cfg = load_config(None, [
            f"data.uri={data_uri}", "data.image_size=32", "data.batch_size=4", "model.decoder_channels=16",
            "tasks.patch_size=4", f"weighting.name={weighting}", "train.warmup_steps=0",
            f"model.sync_batchnorm={backend == 'nccl'}"])
        state = build_state(cfg, categories, total_steps=3, device=device, wrap_model=wrap)
        batches = list(iter_local_batches(data_uri, "train2017", categories, cfg, train=True,
                                          tasks=build_tasks(cfg, categories), drop_last=True))
        mine = batches[rank::2]  # each rank trains on its own images
        steps = {"n": 0, "identical_every_step": True}

        def snapshot():
            return [t.detach().clone() for t in (*state.model.parameters(), *state.model.buffers(),
                                                 *state.strategy.parameters(), *state.strategy.buffers())]

        def on_step(st, metrics, ids):
            # Gather rank 1's tensors on rank 0 after every step.
            mine_now = torch.cat([t.double().flatten() for t in snapshot()])
            both = [torch.zeros_like(mine_now) for _ in range(2)]
            dist.all_gather(both, mine_now)
            steps["n"] += 1
            steps["identical_every_step"] &= bool(torch.equal(both[0], both[1]))

        train_one_epoch(state, mine, steps=3, on_step=on_step)
        differ = []
        for key, value in {**state.module.state_dict(), **state.strategy.state_dict()}.items():
            both = [torch.zeros_like(value) for _ in range(2)]
            dist.all_gather(both, value.contiguous())
            if not torch.equal(both[0], both[1]):
                differ.append(key)
        out[weighting] = {
            "steps": steps["n"],
            "identical_every_step": steps["identical_every_step"],
            "running_stats": sum(k.endswith("running_mean") for k in state.module.state_dict()),
            "differ": differ,
        }
    # gloo aborts the process ("terminate called without an active exception") when a peer
    # tears its connections down first; agree that both are done before either does.
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    """
)

# Loss scaling with learned parameters, and weights from loss values (both stateful). The
# per-task-gradient strategies (PCGrad, GradNorm) all-reduce a (tasks x parameters) matrix,
# too slow over gloo here for a resnet18; tests/weighting/test_weighting_ddp.py covers them.
WEIGHTINGS = ("uncertainty", "dwa")


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory):
    """24 synthetic 32 px training images sharded into a local directory."""
    from mtseg.data.shard import shard_coco
    from mtseg.data.synth import synthesize

    root = tmp_path_factory.mktemp("coco")
    synthesize(str(root), train=24, val=4, size=32, seed=3)
    uri = str(root / "shards")
    shard_coco(str(root), "train2017", uri, images_per_shard=8, log=lambda *a: None)
    return uri


def _assert_identical(rank0: dict, rank1: dict) -> None:
    for name in WEIGHTINGS:
        r0, r1 = rank0[name], rank1[name]
        assert r0["steps"] == 3 and r0["running_stats"] > 0
        assert r0["differ"] == r1["differ"] == [], f"{name}: differ between ranks: {r0['differ'][:5]}"
        assert r0["identical_every_step"] and r1["identical_every_step"], f"{name}: ranks diverged during the epoch"


def test_parameters_and_buffers_are_bit_identical_across_ranks_after_every_step(local_dataset, two_ranks):
    """The default path: BatchNorm per rank, rank 0's buffers broadcast after each step."""
    _assert_identical(*two_ranks(WORKER, local_dataset, ",".join(WEIGHTINGS), "gloo"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_sync_batchnorm_replicas_are_bit_identical_on_two_gpus(local_dataset, two_ranks):
    """``model.sync_batchnorm``: SyncBatchNorm (CUDA only) on two NCCL ranks, same guarantee."""
    _assert_identical(*two_ranks(WORKER, local_dataset, ",".join(WEIGHTINGS), "nccl"))
