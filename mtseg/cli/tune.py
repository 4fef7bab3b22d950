"""``mtseg tune``: a Ray Tune search over task weighting and architecture (:func:`mtseg.tune.run_tune`)."""

from __future__ import annotations

import argparse
import os


def cmd_tune(args: argparse.Namespace) -> int:
    """``mtseg tune``: validate, connect to Ray, search, print the table."""
    from mtseg.config import load_config
    from mtseg.tune import check_options, run_tune

    cfg = load_config(args.config, args.overrides)
    # A bad search space or option fails here, before anything starts.
    check_options(cfg, resume=args.resume, restart=args.restart, delta_m=not args.no_delta_m)
    from mtseg.cluster import init_local_ray, storage_env
    from mtseg.train.trainer import preflight

    preflight(cfg)
    if cfg.cluster.address:
        os.environ["RAY_ADDRESS"] = cfg.cluster.address
    init_local_ray(env=storage_env(credentials=True), dashboard=True, log_to_driver=True)
    outcome = run_tune(cfg, resume=args.resume, restart=args.restart, delta_m=not args.no_delta_m)
    print(outcome.markdown)
    for name, uri in outcome.paths.items():
        print(f"{name}: {uri}")
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mtseg tune``."""
    p = subparsers.add_parser("tune", help="Ray Tune search over task weighting and architecture")
    p.add_argument("--config", default=None, help="YAML config with a tune: section (jobs/configs/tune.yaml)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted experiment (finished trials are kept)")
    p.add_argument("--restart", action="store_true", help="delete the experiment and start over")
    p.add_argument("--no-delta-m", action="store_true", help="skip the single-task baselines and val/delta_m")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. tune.num_samples=8")
    p.set_defaults(fn=cmd_tune)
