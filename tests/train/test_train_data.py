"""The epoch plan: deterministic, disjoint, equal per worker, resumable at any image."""

import pytest

from mtseg.train.data import plan_epoch, steps_per_epoch

SHARDS = [("s0", 10), ("s1", 7), ("s2", 10), ("s3", 4)]  # 31 images


def _ids(segments):
    return [(s.path, r) for s in segments for r in s.rows]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_slices_are_disjoint_equal_and_deterministic(world):
    slices = [_ids(plan_epoch(SHARDS, seed=1, epoch=0, world_size=world, rank=r)) for r in range(world)]
    per = 31 // world
    assert all(len(s) == per for s in slices)
    flat = [x for s in slices for x in s]
    assert len(set(flat)) == len(flat)
    again = [_ids(plan_epoch(SHARDS, seed=1, epoch=0, world_size=world, rank=r)) for r in range(world)]
    assert again == slices


def test_order_changes_with_epoch_and_seed():
    a = _ids(plan_epoch(SHARDS, seed=1, epoch=0, world_size=1, rank=0))
    b = _ids(plan_epoch(SHARDS, seed=1, epoch=1, world_size=1, rank=0))
    c = _ids(plan_epoch(SHARDS, seed=2, epoch=0, world_size=1, rank=0))
    assert sorted(a) == sorted(b) == sorted(c)
    assert a != b and a != c


@pytest.mark.parametrize("start", [0, 1, 5, 9, 14, 15])
def test_resume_continues_exactly_where_it_stood(start):
    full = _ids(plan_epoch(SHARDS, seed=3, epoch=2, world_size=2, rank=1))
    rest = _ids(plan_epoch(SHARDS, seed=3, epoch=2, world_size=2, rank=1, start=start))
    assert rest == full[start:]


def test_validation_plan_covers_every_image_once_in_order():
    slices = [
        _ids(plan_epoch(SHARDS, seed=0, epoch=0, world_size=3, rank=r, shuffle=False, drop_remainder=False)) for r in range(3)
    ]
    flat = [x for s in slices for x in s]
    assert flat == [(p, i) for p, n in SHARDS for i in range(n)]


def test_steps_per_epoch():
    assert steps_per_epoch(31, world_size=2, batch_size=4, grad_accum=1) == 3
    assert steps_per_epoch(31, world_size=2, batch_size=4, grad_accum=2) == 1
