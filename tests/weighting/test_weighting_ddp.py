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

        def losses(self, x, y, representation=False):
            features = torch.tanh(self.shared(x))
            h = features.detach().requires_grad_() if representation else features
            out = {n: ((head(h)[:, 0] - y[:, i]) ** 2).mean() + 0.1 for i, (n, head) in enumerate(zip(NAMES, self.heads))}
            return (out, (features, h)) if representation else out


    def data(rank, step):
        g = torch.Generator().manual_seed(100 * step + rank)
        return torch.randn(5, 4, generator=g), 3 * torch.randn(5, 3, generator=g)


    def run(variant, rank=None):
        # "pcgrad+rep_grad": weighting.name=pcgrad weighting.rep_grad=true
        name, *flags = variant.split("+")
        torch.manual_seed(0)
        model = Toy()
        cfg = load_config(None, [f"weighting.name={name}"] + [f"weighting.{f}=true" for f in flags])
        strategy = build_weighting(cfg.weighting, NAMES)
        rep = strategy.uses_representation
        params = list(model.parameters()) + list(strategy.parameters())
        opt = torch.optim.SGD(params, lr=0.05)
        identical = True
        for step in range(4):
            opt.zero_grad()
            extra = {}
            if rank is None and rep:  # one process, both ranks' samples in one batch: the same mean loss
                x, y = (torch.cat(t) for t in zip(*(data(r, step) for r in range(WORLD))))
                losses, extra["representation"] = model.losses(x, y, representation=True)
            elif rank is None:  # one process, the mean of both ranks' losses
                per_rank = [model.losses(*data(r, step)) for r in range(WORLD)]
                losses = {n: sum(l[n] for l in per_rank) / WORLD for n in NAMES}
            elif rep:
                losses, extra["representation"] = model.losses(*data(rank, step), representation=True)
            else:
                losses = model.losses(*data(rank, step))
            strategy.backward(losses, list(model.shared.parameters()), **extra)
            sync_gradients(params)
            opt.step()
            strategy.on_epoch_end()
            if rank is not None:  # bit for bit after every step: parameters and every buffer
                mine = torch.cat([t.detach().double().flatten() for t in (*params, *strategy.buffers())])
                both = [torch.zeros_like(mine) for _ in range(WORLD)]
                dist.all_gather(both, mine)
                identical &= bool(torch.equal(both[0], both[1]))
        state = {k: v.double().flatten().tolist() for k, v in strategy.state_dict().items()}
        return {"params": torch.cat([p.detach().flatten() for p in params]).tolist(), "state": state,
                "identical_every_step": identical}


    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    out = {name: run(name, rank) for name in sys.argv[2].split(",")}
    # gloo aborts the process ("terminate called without an active exception") when a peer
    # tears its connections down first; agree that both are done before either does.
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        out = {"distributed": out, "single": {name: run(name) for name in sys.argv[2].split(",")}}
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    """
)


def _close(a, b, tol=1e-5):
    return len(a) == len(b) and all(abs(x - y) <= tol * (1 + abs(y)) for x, y in zip(a, b))


# Exact PCGrad through the toy's representation (looped and batched encoder backward), and
# the representation-gradient mode of PCGrad and GradNorm.
VARIANTS = (*WEIGHTING_NAMES, "pcgrad+pcgrad_batched", "pcgrad+rep_grad", "gradnorm+rep_grad")


def test_strategies_are_rank_consistent_and_match_the_global_batch(two_ranks):
    rank0, rank1 = two_ranks(WORKER, ",".join(VARIANTS), timeout=240)
    for name in VARIANTS:
        d0, d1, single = rank0["distributed"][name], rank1[name], rank0["single"][name]
        assert d0["identical_every_step"] and d1["identical_every_step"], f"{name}: ranks diverged during the run"
        assert d0["params"] == d1["params"], f"{name}: ranks diverged"
        assert d0["state"] == d1["state"], f"{name}: strategy state differs between ranks"
        assert _close(d0["params"], single["params"]), f"{name}: differs from the global-batch update"
        for key, value in single["state"].items():
            assert _close(d0["state"][key], value), f"{name}: state {key} differs from the global-batch run"
