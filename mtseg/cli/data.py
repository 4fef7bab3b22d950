"""``mtseg data synth|shard|import-masks``: synthetic COCO-format data, COCO into parquet shards, label masks into COCO panoptic."""

from __future__ import annotations

import argparse
import json


def cmd_synth(args: argparse.Namespace) -> int:
    from mtseg.data.synth import synthesize

    info = synthesize(
        args.out,
        train=args.train,
        val=args.val,
        size=args.size,
        seed=args.seed,
        profile=args.profile,
        annotations=args.annotations,
    )
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from mtseg.data.shard import shard_coco

    if args.ray:  # a local Ray, or the cluster of RAY_ADDRESS (set inside a Ray job)
        from mtseg.cluster import init_local_ray, storage_env

        init_local_ray(env=storage_env(credentials=True), log_to_driver=False)
    manifest = shard_coco(
        args.coco_root,
        args.split,
        args.out,
        images_per_shard=args.images_per_shard,
        max_bad_fraction=args.max_bad_fraction,
        executor="ray" if args.ray else "local",
        create_bucket=args.create_bucket,
        annotations=args.annotations,
    )
    print(
        json.dumps(
            {
                "counts": manifest["counts"],
                "converted": manifest["converted"],
                "skipped": {k: v for k, v in manifest["skipped"].items() if k != "details"},
            },
            indent=2,
        )
    )
    return 0


def cmd_import_masks(args: argparse.Namespace) -> int:
    from mtseg.data.import_masks import import_masks

    summary = import_masks(
        args.images,
        args.masks,
        args.classes,
        args.out,
        args.split,
        max_bad_fraction=args.max_bad_fraction,
        include=args.include,
        exclude=args.exclude,
    )
    print(json.dumps(summary, indent=2))
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mtseg data synth`` and ``mtseg data shard``."""
    data = subparsers.add_parser("data", help="make and shard COCO-format data").add_subparsers(
        dest="data_command", required=True
    )
    synth = data.add_parser("synth", help="synthesise a COCO-format dataset")
    synth.add_argument("--out", required=True)
    synth.add_argument("--train", type=int, default=320)
    synth.add_argument("--val", type=int, default=80)
    synth.add_argument("--size", type=int, default=None, help="default profile: image side (64); coco profile: long side (640)")
    synth.add_argument(
        "--profile",
        choices=("default", "coco"),
        default="default",
        help="default: the demo's small shapes; coco: 640x480 JPEGs with COCO's 80 categories and statistics",
    )
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--annotations",
        choices=("instances", "panoptic"),
        default="instances",
        help="instances: things only; panoptic: stuff bands (sky, wall, ground) under the things, COCO's panoptic PNGs + JSON",
    )
    synth.set_defaults(fn=cmd_synth)
    shard = data.add_parser("shard", help="COCO images + instances or panoptic annotations -> parquet shards + manifest")
    shard.add_argument("--coco-root", required=True)
    shard.add_argument("--split", required=True)
    shard.add_argument("--out", required=True)
    shard.add_argument(
        "--annotations",
        choices=("instances", "panoptic"),
        default="instances",
        help="instances: annotations/instances_<split>.json; panoptic: annotations/panoptic_<split>.json and its PNGs (things and stuff)",
    )
    shard.add_argument("--images-per-shard", type=int, default=256)
    shard.add_argument("--max-bad-fraction", type=float, default=0.05)
    shard.add_argument("--create-bucket", action="store_true", help="create the --out bucket if it does not exist")
    shard.add_argument(
        "--ray",
        action="store_true",
        help="build the shards as Ray tasks on every CPU of the Ray cluster (RAY_ADDRESS, else a local Ray)",
    )
    shard.set_defaults(fn=cmd_shard)
    masks = data.add_parser(
        "import-masks", help="images + label-mask PNGs -> COCO panoptic (then: data shard --annotations panoptic)"
    )
    masks.add_argument("--images", required=True, help="directory of .jpg/.jpeg/.png images (local or s3://)")
    masks.add_argument("--masks", required=True, help="directory of single-channel .png label masks, same stems")
    masks.add_argument(
        "--classes", required=True, help="classes.yaml: name, supercategory, isthing, color per label value; ignore"
    )
    masks.add_argument("--out", required=True, help="COCO root to write (local or s3://)")
    masks.add_argument("--split", required=True)
    masks.add_argument("--max-bad-fraction", type=float, default=0.05)
    masks.add_argument(
        "--include", action="append", default=[], metavar="GLOB", help="import only stems matching GLOB (repeatable)"
    )
    masks.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="leave out stems matching GLOB (repeatable)"
    )
    masks.set_defaults(fn=cmd_import_masks)
