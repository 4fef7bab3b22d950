"""Ray Jobs entrypoint for data preparation: COCO -> parquet shards + manifest, for each split.

    ray job submit --working-dir . -- python jobs/prepare_data.py --config jobs/configs/demo.yaml --coco-root s3://bucket/coco data.uri=s3://bucket/shards
    mtseg submit prepare --config jobs/configs/demo.yaml --coco-root s3://bucket/coco data.uri=s3://bucket/shards   # the same, through mtseg

Thin on purpose: parse, call ``mtseg data shard`` once per split of the config
(``data.train_split``, ``data.val_split``) with the config's ``data.uri`` as the output and its
``data.images_per_shard`` / ``data.max_bad_fraction``, exit with the first failure's code. As a
Ray job (``RAY_ADDRESS`` set) it adds ``--ray``: the shards are built as Ray tasks on the
cluster's CPUs, and a killed job resubmitted skips the shards it completed. Run by hand without
``RAY_ADDRESS``, it shards in this process.
"""

import argparse
import os
import sys

from mtseg.cli import main
from mtseg.config import ConfigError, load_config


def _args(argv):
    p = argparse.ArgumentParser(prog="prepare_data.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML config (jobs/configs/*.yaml)")
    p.add_argument(
        "--coco-root", required=True, help="COCO root: <root>/<split>/ images and <root>/annotations/instances_<split>.json"
    )
    p.add_argument(
        "--split", action="append", default=None, help="only this split (repeatable; default: the config's train and val splits)"
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.uri=s3://bucket/shards")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = _args(sys.argv[1:])
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"prepare_data.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    for split in args.split or [cfg.data.train_split, cfg.data.val_split]:
        code = main(
            [
                "data",
                "shard",
                "--coco-root",
                args.coco_root,
                "--split",
                split,
                "--out",
                cfg.data.uri,
                "--images-per-shard",
                str(cfg.data.images_per_shard),
                "--max-bad-fraction",
                str(cfg.data.max_bad_fraction),
                *(["--ray"] if os.environ.get("RAY_ADDRESS") else []),
            ]
        )
        if code:
            sys.exit(code)
    sys.exit(0)
