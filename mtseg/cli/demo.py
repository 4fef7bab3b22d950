"""``mtseg demo``: the main job end to end (:func:`mtseg.demo.run_demo`)."""

from __future__ import annotations

import argparse


def cmd_demo(args: argparse.Namespace) -> int:
    from mtseg.demo import run_demo

    return run_demo(out_dir=args.out, train_images=args.train, val_images=args.val, epochs=args.epochs, overrides=args.overrides)


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mtseg demo``."""
    demo = subparsers.add_parser("demo", help="the main job end to end on local Ray + SeaweedFS with synthetic COCO")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--train", type=int, default=None, help="synthetic training images (default 1536)")
    demo.add_argument("--val", type=int, default=96, help="synthetic validation images")
    demo.add_argument("--epochs", type=int, default=None, help="override the demo config's epochs")
    demo.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="demo config overrides, e.g. train.num_workers=2 data.batch_size=8 (data parallelism)",
    )
    demo.set_defaults(fn=cmd_demo)
