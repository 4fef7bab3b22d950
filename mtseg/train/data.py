"""The training stream with an exact, resumable position.

Ray Data's iterators cannot resume mid-epoch (ray #37633, #48224), and ``streaming_split``
hands blocks to whichever worker asks first, so a worker's position says nothing about which
images it has seen. mtseg therefore plans each epoch itself, from the shard manifest alone:

1. the epoch order is a deterministic function of (seed, epoch): shards are permuted, and the
   rows inside each shard are permuted;
2. the ordered sequence is cut into ``world_size`` contiguous, equal slices, one per worker
   (the ``total % world_size`` images left over rotate with the permutation across epochs);
3. a worker's position is the number of images it has consumed in the epoch (the same on every
   worker, since all take ``batch_size`` per micro-step); a checkpoint records it, and after a
   restart each worker streams its slice from that offset on.

The slice is then streamed by Ray Data: read tasks of ``rows_per_read_task`` images pull their
rows from the parquet shards (S3 or local) and decode + augment + build targets in
``map_batches``, in order, never holding more than a few tasks' worth of images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    """Rows ``rows`` (in this order) of one shard file."""

    path: str
    rows: tuple[int, ...]


def epoch_order(shard_rows: list[int], seed: int, epoch: int) -> list[tuple[int, np.ndarray]]:
    """The epoch's global order: (shard index, permuted row indices) per shard, in shard order."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(shard_rows))
    return [(int(s), np.random.default_rng([seed, epoch, int(s)]).permutation(shard_rows[s])) for s in order]


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
    if shuffle:
        order = epoch_order(rows, seed, epoch)
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


def images_per_worker(total: int, world_size: int) -> int:
    return total // world_size


def steps_per_epoch(total: int, world_size: int, batch_size: int, grad_accum: int) -> int:
    """Optimiser steps per epoch: whole steps of ``batch_size * grad_accum`` images per worker."""
    return images_per_worker(total, world_size) // (batch_size * grad_accum)


def read_tasks(segments: list[Segment], rows_per_task: int) -> list[dict]:
    """Split segments into Ray Data read tasks of at most ``rows_per_task`` rows of one shard."""
    tasks = []
    for seg in segments:
        for i in range(0, len(seg.rows), rows_per_task):
            tasks.append({"path": seg.path, "rows": list(seg.rows[i : i + rows_per_task])})
    return tasks


def read_and_transform(task: dict, transform, out_rows: int):
    """Ray Data UDF: read tasks (one shard's rows each, in order) -> batches of the batch contract.

    Reads only the needed columns of the shard (through mtseg.storage, with retries, so an
    object store that blinks does not fail the epoch) and yields ``out_rows`` images at a time,
    so a large shard never becomes one huge block.
    """
    import pyarrow.parquet as pq

    from mtseg import storage
    from mtseg.data.pipeline import READ_COLUMNS

    for path, rows in zip(task["path"], task["rows"]):
        path = str(path)
        fs, fs_path = storage.resolve(path)
        table = storage.retry(lambda: pq.read_table(fs_path, filesystem=fs, columns=list(READ_COLUMNS)), what=path)
        picked = table.take([int(r) for r in rows])
        for i in range(0, picked.num_rows, out_rows):
            yield transform(picked.slice(i, out_rows))


def worker_stream(segments: list[Segment], transform, *, rows_per_task: int, num_cpus: float):
    """A Ray Data dataset over this worker's segments, in plan order (``preserve_order``)."""
    import ray.data

    from mtseg.compat import quiet_idle_executor

    tasks = [{"path": s.path, "rows": list(s.rows)} for s in segments]
    if not tasks:
        return None
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    # The plan fixes the order; Ray Data must not reorder blocks finishing out of turn.
    ds.context.execution_options.preserve_order = True
    # One dataset per worker per epoch: its plan would be logged every epoch on every worker.
    ds.context.print_on_execution_start = False
    # Ray 2.60's executor spins while training holds it back (see mtseg.compat).
    quiet_idle_executor(ds.context)
    return ds.map_batches(
        read_and_transform,
        fn_kwargs={"transform": transform, "out_rows": rows_per_task},
        batch_size=1,
        batch_format="numpy",
        num_cpus=num_cpus,
    )
