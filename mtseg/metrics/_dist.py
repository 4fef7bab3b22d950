"""torch.distributed helpers shared by the metrics.

Python objects (COCO results, per-image matchings) travel over a gloo group even when
training uses NCCL, so they pass through host memory rather than GPU memory (as
detectron2's ``comm`` does).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a default process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (left untouched) summed over all ranks, on its device; itself when not distributed."""
    if not is_distributed():
        return tensor
    # NCCL only reduces CUDA tensors; metric state may sit on the CPU (e.g. after merge()).
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        buf = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    else:
        buf = tensor.clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(tensor.device)


@functools.cache
def _object_group_for(_default_group_id: int):
    # Keyed by the default group's id so that a re-initialised process group gets a new one.
    # new_group is collective: every rank reaches it from the same all_reduce() call.
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def object_group():
    """A gloo process group spanning the world, for object collectives."""
    return _object_group_for(id(dist.group.WORLD))


def all_gather_int(value: int) -> list[int]:
    """Every rank's ``value``, in rank order."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, int(value), group=object_group())
    return [int(v) for v in out]


def exchange_objects(buckets: list[Any]) -> list[Any]:
    """All-to-all for Python objects: ``buckets[d]`` goes to rank ``d``; returns what each rank sent here."""
    rank, world = rank_and_world()
    if len(buckets) != world:
        raise ValueError(f"exchange_objects: {len(buckets)} buckets for a world of {world}")
    group = object_group()
    received = []
    for src in range(world):
        out: list[Any] = [None]
        # Global rank of src is src: the object group spans the whole world in rank order.
        dist.scatter_object_list(out, buckets if rank == src else None, src=src, group=group)
        received.append(out[0])
    return received


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """``obj`` from every rank, in rank order, on rank ``dst`` (None elsewhere)."""
    rank, world = rank_and_world()
    out = [None] * world if rank == dst else None
    dist.gather_object(obj, out, dst=dst, group=object_group())
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=object_group())
    return box[0]
