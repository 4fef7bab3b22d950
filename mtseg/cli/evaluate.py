"""``mtseg evaluate``: a checkpoint's metrics on a split (:mod:`mtseg.evaluate`)."""

from __future__ import annotations

import argparse
import os
import sys


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``mtseg evaluate``: prints the table."""
    from mtseg import evaluate
    from mtseg.cluster import init_local_ray, storage_env
    from mtseg.data.corruptions import CorruptionError, parse_corruptions, parse_severities

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    # Everything that can fail on bad input fails before Ray starts.
    corruptions = severities = None
    if args.corruptions is not None:
        corruptions = parse_corruptions(args.corruptions)
        severities = parse_severities(args.severities or "1-5")
    elif args.severities is not None:
        raise CorruptionError("--severities: only with --corruptions (e.g. --corruptions all --severities 1-5)")
    loaded, data_uri, split = evaluate.load_for_evaluation(
        args.checkpoint, args.data, args.split, batch_size=args.batch_size, limit=args.limit, out=args.out, log=log
    )
    evaluate.check_export_panoptic(loaded, args.export_panoptic)
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    init_local_ray(env=storage_env(credentials=True), log_to_driver=False)
    options = {
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "actor_cpus": args.actor_cpus,
        "use_gpu": args.use_gpu,
        "limit": args.limit,
        "export_panoptic": args.export_panoptic,
    }
    if corruptions:
        result = evaluate.evaluate_robustness(
            loaded, data_uri, split, corruptions=corruptions, severities=severities, log=log, **options
        )
    else:
        result = evaluate.evaluate_loaded(loaded, data_uri, split, log=log, **options)
    files = evaluate.write_results(result, args.out or loaded.uri)
    print(result.table())
    print(f"written: {', '.join(files)}")
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mtseg evaluate``."""
    p = subparsers.add_parser("evaluate", help="metrics of a checkpoint on a split (Ray Data batch inference)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory (local or s3://)")
    p.add_argument(
        "--data",
        default=None,
        help="dataset root (default: the run's data.uri, or its local copy beside the checkpoint when that store is down)",
    )
    p.add_argument("--split", default=None, help="split name (default: the run's data.val_split)")
    p.add_argument("--out", default=None, help="where metrics.json and metrics.md go (default: the checkpoint directory)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: data.batch_size)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="inference actors (default: one per GPU; without GPUs the read + decode tasks run the model, "
        "and this asks for an actor pool instead)",
    )
    p.add_argument(
        "--actor-cpus",
        type=float,
        default=None,
        help="CPUs each actor reserves (default: its share of the CPUs the read + decode tasks leave); "
        "without GPUs, asks for an actor pool",
    )
    p.add_argument("--use-gpu", default="auto", choices=("auto", "true", "false"))
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument(
        "--export-panoptic",
        default=None,
        metavar="DIR",
        help="also write the panoptic predictions in COCO's format (DIR/panoptic.json + DIR/panoptic/*.png) for "
        "panopticapi (of the clean pass, with --corruptions)",
    )
    p.add_argument(
        "--corruptions",
        default=None,
        metavar="all|NAME,...",
        help="also evaluate under common corruptions (ImageNet-C / COCO-C): all 15, or names such as "
        "gaussian_noise,motion_blur,jpeg_compression; writes mPC and rPC into metrics.json and metrics.md, "
        "and robustness.png beside them",
    )
    p.add_argument(
        "--severities",
        default=None,
        metavar="1-5|N,...",
        help="corruption severities, 1 to 5 (default with --corruptions: 1-5)",
    )
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    p.set_defaults(fn=cmd_evaluate)
