"""benchmarks/ingest.py's data helper: the 10x split of the memory section is a valid split."""

from __future__ import annotations

import os

from mtseg.data.manifest import read_manifest
from mtseg.data.shard import shard_coco
from mtseg.data.synth import synthesize
from mtseg.train.data import plan_epoch


def test_replicate_split_lists_every_copy_in_a_manifest_the_stream_reads(tmp_path, load_benchmark):
    ingest = load_benchmark("ingest")
    synthesize(str(tmp_path / "coco"), train=5, val=0, seed=0)
    uri = str(tmp_path / "shards")
    one = shard_coco(str(tmp_path / "coco"), "train2017", uri, images_per_shard=2, log=lambda _: None)

    ten = ingest.replicate_split(uri, "train2017", "train2017-3x", 3)

    assert read_manifest(uri, "train2017-3x") == ten
    assert len(ten["shards"]) == 3 * len(one["shards"]) and ten["counts"]["shards"] == len(ten["shards"])
    assert sum(s["rows"] for s in ten["shards"]) == ten["counts"]["images"] == 15
    for entry in ten["shards"]:
        original = entry["path"].split("-", 1)[1]
        assert (tmp_path / "shards" / "train2017-3x" / entry["path"]).read_bytes() == (
            tmp_path / "shards" / "train2017" / original
        ).read_bytes()
    shards = [(os.path.join(uri, "train2017-3x", s["path"]), s["rows"]) for s in ten["shards"]]
    assert sum(len(s.rows) for s in plan_epoch(shards, seed=0, epoch=0, world_size=1, rank=0)) == 15
