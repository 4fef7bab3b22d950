"""The epoch plan of the training stream: an exact, resumable position.

Ray Data's iterators cannot resume mid-epoch (ray #37633, #48224), and ``streaming_split``
hands blocks to whichever worker asks first, so mtseg plans each epoch itself, from the
manifest alone: the order is a deterministic function of (seed, epoch) (shards permuted, rows
inside each shard permuted), cut into ``world_size`` contiguous slices, one per worker. A
worker's position is the number of images it has consumed in the epoch; a checkpoint records
it, and after a restart each worker streams its slice
(:func:`mtseg.data.pipeline.worker_batches`) from that offset on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    """Rows ``rows`` (in this order) of one shard file."""

    path: str
    rows: tuple[int, ...]


def plan_epoch(
    shards: list[tuple[str, int]],
    *,
    seed: int,
    epoch: int,
    world_size: int,
    rank: int,
    start: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> list[Segment]:
    """This worker's slice of the epoch, from image ``start`` of the slice on.

    Args:
        shards: (shard path, rows) in manifest order.
        shuffle: False keeps manifest order (validation).
        drop_remainder: True gives every worker ``total // world_size`` images (training, so
            all take the same number of steps); False spreads the remainder (validation, so
            every image is evaluated once).
    """
    rows = [n for _, n in shards]
    if shuffle:  # shards permuted by (seed, epoch), each shard's rows by (seed, epoch, shard)
        shard_order = np.random.default_rng([seed, epoch]).permutation(len(rows))
        order = [(int(s), np.random.default_rng([seed, epoch, int(s)]).permutation(rows[s])) for s in shard_order]
    else:
        order = [(i, np.arange(n)) for i, n in enumerate(rows)]
    total = sum(rows)
    if drop_remainder:
        per = total // world_size
        lo, hi = rank * per, (rank + 1) * per
    else:
        lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    lo = min(hi, lo + start)
    segments = []
    pos = 0
    for shard_index, perm in order:
        n = len(perm)
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            segments.append(Segment(shards[shard_index][0], tuple(int(r) for r in perm[a - pos : b - pos])))
        pos += n
        if pos >= hi:
            break
    return segments


def steps_per_epoch(total: int, world_size: int, batch_size: int, grad_accum: int) -> int:
    """Optimiser steps per epoch: whole steps of ``batch_size * grad_accum`` images per worker."""
    return (total // world_size) // (batch_size * grad_accum)
