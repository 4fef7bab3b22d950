"""Every strategy gives the same update on two gloo ranks as in one process on the averaged losses.

Each rank sees its own batch; the strategy runs as the trainer runs per-task-gradient
strategies (backward without DDP's hooks, then one ``sync_gradients``; for single-pass
strategies the trainer lets DDP average the model's gradients, the same mean:
tests/train/test_train_loop_ddp.py). Both ranks must end with identical parameters
and strategy state, equal to a single process fed the mean of the two ranks' losses,
i.e. to the update of the global batch.
"""

from __future__ import annotations

import textwrap

from mtseg.config import WEIGHTING_NAMES

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from mtseg.config import load_config
    from mtseg.weighting import build_weighting, sync_gradients

    NAMES = ["a", "b", "c"]
    WORLD = 2


    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(4, 3)
            self.heads = nn.ModuleList(nn.Linear(3, 1) for _ in NAMES)

        def losses(self, x, y):
            h = torch.tanh(self.shared(x))
            return {n: ((head(h)[:, 0] - y[:, i]) ** 2).mean() + 0.1 for i, (n, head) in enumerate(zip(NAMES, self.heads))}


    def data(rank, step):
        g = torch.Generator().manual_seed(100 * step + rank)
        return torch.randn(5, 4, generator=g), 3 * torch.randn(5, 3, generator=g)


    def run(name, rank=None):
        torch.manual_seed(0)
        model = Toy()
        strategy = build_weighting(load_config(None, [f"weighting.name={name}"]).weighting, NAMES)
        params = list(model.parameters()) + list(strategy.parameters())
        opt = torch.optim.SGD(params, lr=0.05)
        for step in range(4):
            opt.zero_grad()
            if rank is None:  # one process, the mean of both ranks' losses
                per_rank = [model.losses(*data(r, step)) for r in range(WORLD)]
                losses = {n: sum(l[n] for l in per_rank) / WORLD for n in NAMES}
            else:
                losses = model.losses(*data(rank, step))
            strategy.backward(losses, list(model.shared.parameters()))
            sync_gradients(params)
            opt.step()
            strategy.on_epoch_end()
        state = {k: v.double().flatten().tolist() for k, v in strategy.state_dict().items()}
        return {"params": torch.cat([p.detach().flatten() for p in params]).tolist(), "state": state}


    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    out = {name: run(name, rank) for name in sys.argv[2].split(",")}
    dist.destroy_process_group()
    if rank == 0:
        out = {"distributed": out, "single": {name: run(name) for name in sys.argv[2].split(",")}}
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    """
)


def _close(a, b, tol=1e-5):
    return len(a) == len(b) and all(abs(x - y) <= tol * (1 + abs(y)) for x, y in zip(a, b))


def test_strategies_are_rank_consistent_and_match_the_global_batch(two_ranks):
    rank0, rank1 = two_ranks(WORKER, ",".join(WEIGHTING_NAMES), timeout=180)
    for name in WEIGHTING_NAMES:
        d0, d1, single = rank0["distributed"][name], rank1[name], rank0["single"][name]
        assert d0["params"] == d1["params"], f"{name}: ranks diverged"
        assert d0["state"] == d1["state"], f"{name}: strategy state differs between ranks"
        assert _close(d0["params"], single["params"]), f"{name}: differs from the global-batch update"
        for key, value in single["state"].items():
            assert _close(d0["state"][key], value), f"{name}: state {key} differs from the global-batch run"
