"""The interface shared by all task-weighting strategies, and the distributed helpers.

One call replaces ``loss.backward()`` in the trainer::

    losses = compute_losses(tasks, outputs, batch)           # {task: scalar}
    weights = strategy.backward(losses, model.shared_parameters())
    sync_gradients(all_params)                               # no-op without torch.distributed
    optimizer.step()

The trainer never branches on a strategy's name: every strategy accumulates gradients
into the ``.grad`` of all parameters (shared, task heads and its own, e.g. uncertainty's
log-variances) and returns the per-task weight it used, for logging.

Distributed data parallel (DDP) design
--------------------------------------
Strategies whose ``backward`` is one ``.backward()`` of a combined loss
(``single_backward``: equal, static, uncertainty, DWA, FAMO) run it as DDP intends: DDP's
bucketed all-reduce averages the model's gradients while the backward pass runs (only the
last micro-batch of a gradient-accumulation step syncs), and :func:`sync_gradients` then
averages the strategy's own parameters (uncertainty's log-variances). The gradient of a
weighted sum is the weighted sum of gradients, so this is the same average.

* Strategies that derive weights from loss values (DWA, FAMO) first average the loss
  values over ranks (:func:`all_reduce_mean`), so every rank computes the same weights
  and updates the same state.

Strategies that take per-task gradients run forward and ``backward`` inside DDP's
``model.no_sync()``, so that DDP's all-reduce does not fire on their several backward
passes, and the trainer then calls :func:`sync_gradients` once: one coalesced all-reduce
averaging every ``.grad`` over the world.
* Strategies that manipulate per-task gradients (PCGrad, GradNorm) compute the per-task
  gradients of the shared parameters (``torch.autograd.grad``/``backward`` with
  ``retain_graph``), flatten them into one (T, P) tensor and average it over ranks with
  ONE :func:`all_reduce_mean`; every rank then manipulates the same global task
  gradients and writes identical shared ``.grad``. The later :func:`sync_gradients`
  leaves those unchanged (the average of identical values) and averages the heads'.

Per-task gradients through the encoder
--------------------------------------
A per-task gradient of the shared parameters costs one backward pass through the encoder
per task. Where the model hands over its shared representation (``model(images,
representation=True)`` returns ``(outputs, (features, leaf))``: the heads read ``leaf``, a
detached copy of ``features``), a strategy that sets :attr:`WeightingStrategy.uses_representation`
gets it as ``backward(..., representation=(features, leaf))`` and splits the backward in two:

* :func:`representation_gradients`: each task's loss backward stops at ``leaf`` (the heads
  only, cheap); the heads' ``.grad`` fill as ``loss.backward()`` fills them, and the (T, ...)
  gradients at the representation come back.
* exact: :func:`encoder_gradients` pulls the T representation gradients through the encoder,
  one backward each or in ONE batched backward (``torch.autograd.grad(...,
  is_grads_batched=True)``, vmap over the backward): the exact (T, P) per-task gradients of
  the shared parameters, by the chain rule.
  vmap still runs T encoder backwards' worth of arithmetic (batched into wider kernels), so
  it saves the per-pass overhead, not the FLOPs, and holds T activation-sized gradients at
  once (memory grows with T).
* ``rep_grad`` (LibMTL's representation-gradient mode, an approximation): the strategy works
  on the representation gradients themselves and runs ONE encoder backward,
  ``features.backward(combined)``. See :mod:`mtseg.weighting.pcgrad`, :mod:`mtseg.weighting.gradnorm`.

Forward under ``no_sync`` also skips DDP's buffer broadcast, so after each optimiser step
the trainer calls :func:`sync_buffers` (whichever path ran), which broadcasts every buffer
(BatchNorm running statistics, strategy state) from rank 0: all ranks then hold the same
parameters and buffers after every step. ``model.sync_batchnorm`` additionally makes
BatchNorm normalise with statistics of the global batch (SyncBatchNorm).

Every strategy keeps its state (learned log-variances, loss history, FAMO's logits,
GradNorm's weights) in parameters or buffers, so ``state_dict()`` checkpoints it.
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
    """Average ``tensor`` over all ranks (a new tensor); returns it unchanged without torch.distributed.

    Args:
        tensor: the same shape and dtype on every rank; not modified.

    Returns:
        The mean over ranks.
    """
    if not _distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out.div_(dist.get_world_size())


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
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    world = dist.get_world_size()
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view(g.shape))
            offset += n


def sync_buffers(buffers: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's buffers to every rank, in one coalesced broadcast per device and dtype.

    mtseg averages gradients itself (:func:`sync_gradients`) and runs DDP's forward under
    ``no_sync``, so DDP's own start-of-forward buffer broadcast never happens. Without this,
    BatchNorm running statistics drift apart across ranks: each rank would then validate
    with its own statistics while the checkpoint holds rank 0's. Broadcasting from rank 0
    is what DDP does with ``broadcast_buffers=True``. No-op without torch.distributed.

    Args:
        buffers: the buffers (the same list, in the same order, on every rank).
    """
    if not _distributed():
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for b in buffers:
        groups.setdefault((b.device, b.dtype), []).append(b)
    for tensors in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.broadcast(flat, src=0)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.detach().copy_(flat[offset : offset + n].view(t.shape))
            offset += n


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


def per_task_gradients(
    losses: list[torch.Tensor], params: list[torch.Tensor], *, accumulate_others: bool
) -> torch.Tensor:
    """Flattened gradient of each loss w.r.t. ``params``: a (T, P) tensor.

    Args:
        losses: the T scalar losses, sharing one graph. Pass the tensors the tasks
            returned, not elements of a ``torch.stack`` of them: backward through a stack
            would send zero gradients down every other task's branch.
        params: the parameters to differentiate (the shared ones).
        accumulate_others: also accumulate each loss's gradient into the ``.grad`` of every
            other parameter it reaches (the task heads), as ``loss.backward()`` would; the
            ``.grad`` of ``params`` is left as it was, and the graph is freed after the last
            loss. Without it the graph is kept for a later backward.

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


def representation_gradients(
    losses: list[torch.Tensor], leaf: torch.Tensor, scales: torch.Tensor | None = None
) -> torch.Tensor:
    """Each loss's gradient at the representation the heads read, by one backward per loss.

    The backward passes stop at ``leaf`` (a leaf tensor: the encoder is not reached) and
    accumulate into the heads' ``.grad`` as ``loss.backward()`` would; the graph is freed
    after the last loss. ``leaf.grad`` is left as it was.

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

    ``grad_theta L_i = J^T grad_features L_i``: one vector-Jacobian product per task, run as
    ONE batched backward (``is_grads_batched``, vmap over the backward) or, with
    ``batched=False`` or where an op of the encoder has no batched backward, one backward per
    task (the reason is logged once). The graph of ``features`` is freed afterwards.

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
            grads = torch.autograd.grad(
                features, params, rep_grads, retain_graph=first, is_grads_batched=True, allow_unused=True
            )
            _batched["checked"] = True
            return torch.cat([(torch.zeros(t, p.numel(), device=p.device, dtype=p.dtype) if g is None
                               else g.reshape(t, -1)) for g, p in zip(grads, params)], dim=1)
        except RuntimeError as e:
            if not first:
                raise
            _batched["unavailable"] = str(e).splitlines()[0]
            log.warning("weighting: no batched backward through the encoder, one backward per task: %s",
                        _batched["unavailable"])
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

    #: Whether :meth:`backward` is a single ``.backward()`` of one combined loss. Then the
    #: trainer lets DDP average the model's gradients during that pass (bucketed, overlapping
    #: the backward); strategies that take per-task gradients (PCGrad, GradNorm) run under
    #: ``no_sync`` and :func:`sync_gradients` averages everything after them.
    single_backward: ClassVar[bool] = True

    #: Whether :meth:`backward` takes ``representation=(features, leaf)``: the trainer then
    #: runs the model with ``representation=True`` (see "Per-task gradients through the encoder").
    uses_representation: bool = False

    def __init__(self, task_names: list[str]):
        super().__init__()
        if not task_names:
            raise ValueError("weighting: at least one task is required")
        self.task_names = list(task_names)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

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
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """One Adam step (Kingma and Ba 2015; L2 weight decay as ``torch.optim.Adam``) on buffers, in place.

    Strategies that update their own weights inside ``backward`` (GradNorm, FAMO) keep
    the optimiser state in buffers, so it is part of ``state_dict()``.
    """
    with torch.no_grad():
        if weight_decay:
            grad = grad + weight_decay * param
        step.add_(1)
        t = float(step)
        exp_avg.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
        exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
        bias1 = 1 - betas[0] ** t
        bias2 = 1 - betas[1] ** t
        denom = (exp_avg_sq / bias2).sqrt_().add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / bias1)
