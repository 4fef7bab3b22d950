"""The interface shared by all task-weighting strategies, and the distributed helpers.

One call replaces ``loss.backward()`` in the trainer::

    losses = compute_losses(tasks, outputs, batch)           # {task: scalar}
    weights = strategy.backward(losses, model.shared_parameters())
    sync_gradients(all_params)                               # no-op without torch.distributed
    optimizer.step()

The trainer never branches on a strategy's name: every strategy accumulates gradients into
the ``.grad`` of all parameters (shared, heads and its own) and returns the per-task weights
it used, for logging. Its state lives in parameters or buffers, so ``state_dict()`` holds it.

DDP. A strategy whose ``backward`` is one ``.backward()`` of a combined loss
(``single_backward``: equal, static, uncertainty, DWA, FAMO) lets DDP's bucketed all-reduce
average the model's gradients during that pass (the gradient of a weighted sum is the
weighted sum of gradients); :func:`sync_gradients` then averages its own parameters. Those
that derive weights from loss values (DWA, FAMO) average the values over ranks first, so
every rank computes the same weights. Strategies that take per-task gradients (PCGrad,
GradNorm) run under DDP's ``no_sync()`` (its all-reduce would fire on each of their
backward passes), average the (T, P) per-task gradients in ONE :func:`all_reduce_mean` so
every rank writes the same shared ``.grad``, and the trainer's :func:`sync_gradients`
averages the heads'. Forward under ``no_sync`` skips DDP's buffer broadcast, so the trainer
calls :func:`sync_buffers` after every step.

Per-task gradients through the encoder. Given ``model(images, representation=True)``'s
``(features, leaf)`` (the heads read ``leaf``, a detached copy of ``features``), a strategy
with :attr:`WeightingStrategy.uses_representation` stops each task's backward at ``leaf``
(:func:`representation_gradients`: the heads only, cheap), then either pulls the T gradients
through the encoder for the exact (T, P) gradients (:func:`encoder_gradients`, one backward
per task or one batched vmap backward: it saves per-pass overhead, not FLOPs, and holds T
activation-sized gradients), or, in LibMTL's approximate ``rep_grad`` mode, works on the
representation gradients and runs ONE encoder backward (see :mod:`~mtseg.weighting.pcgrad`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

#: ``(features, leaf)``: the encoder's output and the detached copy the task heads read.
Representation = tuple[torch.Tensor, torch.Tensor]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` (same shape and dtype on every rank) over all ranks, as a new tensor.

    Without torch.distributed, ``tensor`` itself.
    """
    if not _distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out.div_(dist.get_world_size())


def _coalesced(tensors: Iterable[torch.Tensor], collective) -> None:
    """Run ``collective`` in place on ``tensors``, one flat tensor per device and dtype."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        collective(flat)
        offset = 0
        for t in group:
            n = t.numel()
            t.detach().copy_(flat[offset : offset + n].view(t.shape))
            offset += n


def sync_gradients(params: Iterable[torch.Tensor]) -> None:
    """Average every parameter's ``.grad`` over all ranks in one coalesced all-reduce per dtype.

    A parameter that requires grad but has none gets a zero gradient first, so that every
    rank contributes the same layout. No-op without torch.distributed.

    Args:
        params: the parameters (the same list, in the same order, on every rank).
    """
    if not _distributed():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = dist.get_world_size()

    def mean(flat: torch.Tensor) -> None:
        dist.all_reduce(flat)
        flat.div_(world)

    _coalesced([p.grad for p in params], mean)


def sync_buffers(buffers: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's buffers to every rank, in one coalesced broadcast per device and dtype.

    DDP's forward runs under ``no_sync``, so its own buffer broadcast never happens; without
    this, BatchNorm running statistics drift apart across ranks while the checkpoint holds
    rank 0's. No-op without torch.distributed.

    Args:
        buffers: the buffers (the same list, in the same order, on every rank).
    """
    if _distributed():
        _coalesced(buffers, lambda flat: dist.broadcast(flat, src=0))


def ordered_losses(losses: dict[str, torch.Tensor], task_names: list[str]) -> list[torch.Tensor]:
    """The scalar losses in ``task_names`` order, with one clear error on a mismatch."""
    if set(losses) != set(task_names):
        raise ValueError(f"weighting: losses are for tasks {sorted(losses)}, the strategy was built for {sorted(task_names)}")
    for name in task_names:
        if losses[name].dim() != 0:
            raise ValueError(f"weighting: loss {name!r} must be a scalar, got shape {tuple(losses[name].shape)}")
    return [losses[name] for name in task_names]


def stack_losses(losses: dict[str, torch.Tensor], task_names: list[str]) -> torch.Tensor:
    """``{task: scalar}`` -> (T,) float tensor in ``task_names`` order."""
    return torch.stack([loss.float() for loss in ordered_losses(losses, task_names)])


def per_task_gradients(losses: list[torch.Tensor], params: list[torch.Tensor], *, accumulate_others: bool) -> torch.Tensor:
    """Flattened gradient of each loss w.r.t. ``params``: a (T, P) tensor.

    Args:
        losses: the T scalar losses, sharing one graph: the tensors the tasks returned, not
            elements of a ``torch.stack`` (backward through a stack visits every branch).
        params: the parameters to differentiate (the shared ones).
        accumulate_others: also accumulate into the ``.grad`` of the other parameters the
            losses reach (the heads), as ``loss.backward()`` would, and free the graph; the
            ``.grad`` of ``params`` is left as it was. Without it the graph is kept.

    Returns:
        The (T, P) per-task gradients (zeros where a loss does not reach a parameter).
    """
    rows = []
    if accumulate_others:
        # backward() fills the heads' .grad in the same pass; the shared .grad is read
        # out and restored after each task so the caller can write the combined one.
        saved = [p.grad for p in params]
        for i, loss in enumerate(losses):
            for p in params:
                p.grad = None
            loss.backward(retain_graph=i < len(losses) - 1)
            rows.append(_flatten([p.grad for p in params], params))
        for p, g in zip(params, saved):
            p.grad = g
    else:
        for loss in losses:
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            rows.append(_flatten(grads, params))
    return torch.stack(rows)


def representation_gradients(losses: list[torch.Tensor], leaf: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Each loss's gradient at the representation the heads read, by one backward per loss.

    The passes stop at ``leaf`` (the encoder is not reached), accumulate into the heads'
    ``.grad`` as ``loss.backward()`` would and free the graph; ``leaf.grad`` is left as it was.

    Args:
        losses: the T scalar losses (the tensors the tasks returned).
        leaf: the detached representation the heads consumed (``requires_grad``).
        scales: (T,) multipliers applied to each loss before its backward (e.g. task weights).

    Returns:
        (T, *leaf.shape) gradients (zeros for a loss that does not reach ``leaf``).
    """
    saved, rows = leaf.grad, []
    for i, loss in enumerate(losses):
        leaf.grad = None
        (loss if scales is None else loss * scales[i]).backward(retain_graph=i < len(losses) - 1)
        rows.append(torch.zeros_like(leaf) if leaf.grad is None else leaf.grad)
    leaf.grad = saved
    return torch.stack(rows)


# Whether the batched backward ran once, and why it cannot run here (None: it can).
_batched = {"checked": False, "unavailable": None}


def encoder_gradients(
    features: torch.Tensor, rep_grads: torch.Tensor, params: list[torch.Tensor], *, batched: bool = True
) -> torch.Tensor:
    """The exact per-task gradients of ``params``, from the tasks' gradients at ``features``.

    ``grad_theta L_i = J^T grad_features L_i``, as ONE batched backward (``is_grads_batched``)
    or, with ``batched=False`` or where an encoder op has no batched backward (logged once),
    one backward per task. The graph of ``features`` is freed afterwards.

    Args:
        features: the encoder's output (attached to the graph).
        rep_grads: (T, *features.shape) gradients at ``features``.
        params: the parameters to differentiate (the shared ones).
        batched: use the batched backward.

    Returns:
        The flattened (T, P) per-task gradients (zeros where ``features`` does not depend on a
        parameter).
    """
    t = rep_grads.shape[0]
    rep_grads = rep_grads.to(features.dtype)
    if batched and _batched["unavailable"] is None:
        # The first call keeps the graph, so that a failure can still fall back to the loop.
        first = not _batched["checked"]
        try:
            grads = torch.autograd.grad(features, params, rep_grads, retain_graph=first, is_grads_batched=True, allow_unused=True)
            _batched["checked"] = True
            return torch.cat(
                [
                    (torch.zeros(t, p.numel(), device=p.device, dtype=p.dtype) if g is None else g.reshape(t, -1))
                    for g, p in zip(grads, params)
                ],
                dim=1,
            )
        except RuntimeError as e:
            if not first:
                raise
            _batched["unavailable"] = str(e).splitlines()[0]
            log.warning("weighting: no batched backward through the encoder, one backward per task: %s", _batched["unavailable"])
    rows = []
    for i in range(t):
        grads = torch.autograd.grad(features, params, rep_grads[i], retain_graph=i < t - 1, allow_unused=True)
        rows.append(_flatten(grads, params))
    return torch.stack(rows)


def _flatten(grads, params) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def add_flat_gradient(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Accumulate a flat gradient vector into ``params``' ``.grad`` (like ``backward`` does)."""
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset : offset + n].view(p.shape).to(p.dtype)
        if p.grad is None:
            p.grad = torch.empty_like(p).copy_(g)  # keeps the parameter's memory format
        else:
            p.grad.add_(g)
        offset += n


class WeightingStrategy(nn.Module):
    """Base class: turns per-task losses into gradients.

    Subclasses implement :meth:`backward`, or, when the update is the gradient of one
    combined loss, just :meth:`combine`.

    Args:
        task_names: the tasks, in the order losses are reported.
    """

    #: :meth:`backward` is one ``.backward()`` of a combined loss: DDP may average during it.
    single_backward: ClassVar[bool] = True

    #: :meth:`backward` takes ``representation=(features, leaf)`` from ``model(images, representation=True)``.
    uses_representation: bool = False

    def __init__(self, task_names: list[str]):
        super().__init__()
        if not task_names:
            raise ValueError("weighting: at least one task is required")
        self.task_names = list(task_names)

    def combine(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Combined loss and the per-task weights used, from the (T,) loss vector."""
        raise NotImplementedError(f"{type(self).__name__} implements backward() directly")

    def backward(
        self,
        losses: dict[str, torch.Tensor],
        shared_params: list[torch.Tensor],
        representation: Representation | None = None,
    ) -> dict[str, float]:
        """Accumulate gradients into ``.grad`` of every parameter the losses reach.

        Args:
            losses: ``{task: scalar loss}`` from one forward pass.
            shared_params: the parameters every task shares (``model.shared_parameters()``,
                in forward order); strategies that manipulate gradients work on these.
            representation: ``(features, leaf)`` from ``model(images, representation=True)``,
                for a strategy with :attr:`uses_representation`; the others ignore it.

        Returns:
            ``{task: weight used}`` for logging.
        """
        vec = stack_losses(losses, self.task_names)
        total, weights = self.combine(vec)
        total.backward()
        return self._report(weights)

    def on_epoch_end(self) -> None:
        """Called once per epoch on every rank (collective for strategies that keep loss history)."""

    def _report(self, weights: torch.Tensor) -> dict[str, float]:
        # One device-to-host copy for all tasks.
        return dict(zip(self.task_names, weights.detach().float().cpu().tolist()))


def adam_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    *,
    lr: float,
    weight_decay: float = 0.0,
) -> None:
    """One Adam step (Kingma and Ba 2015; L2 weight decay as ``torch.optim.Adam``) on buffers, in place.

    GradNorm and FAMO update their weights inside ``backward``; buffers keep the optimiser
    state in ``state_dict()``.
    """
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    with torch.no_grad():
        if weight_decay:
            grad = grad + weight_decay * param
        step.add_(1)
        t = float(step)
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1**t
        bias2 = 1 - beta2**t
        denom = (exp_avg_sq / bias2).sqrt_().add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / bias1)
