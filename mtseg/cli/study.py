"""``mtseg study``: named arms x seeds, each a Ray Train run scheduled as Ray Tune trials (:func:`mtseg.study.run_study`)."""

from __future__ import annotations

import argparse
import os


def cmd_study(args: argparse.Namespace) -> int:
    """``mtseg study``: validate every arm, connect to Ray, train, evaluate, print the arm table."""
    from mtseg.config import load_config
    from mtseg.study import check_study, run_study

    cfg = load_config(args.config, args.overrides)
    # A bad arm, option or missing corruption suite fails here, before anything starts.
    arms = check_study(cfg, resume=args.resume, restart=args.restart)
    from mtseg.cluster import init_local_ray, quiet_progress_bars_unless_tty, storage_env
    from mtseg.train.trainer import preflight

    for arm_cfg in arms.values():
        preflight(arm_cfg)
    if cfg.cluster.address:
        os.environ["RAY_ADDRESS"] = cfg.cluster.address
    # The evaluations' Ray Data progress bars would bury the study's own lines.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    quiet_progress_bars_unless_tty()  # and no colour codes in a log file
    init_local_ray(env=storage_env(credentials=True), dashboard=True, log_to_driver=True)
    outcome = run_study(cfg, resume=args.resume, restart=args.restart)
    print(outcome.markdown)
    for name, uri in outcome.paths.items():
        print(f"{name}: {uri}")
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mtseg study``."""
    p = subparsers.add_parser("study", help="arms x seeds on Ray Tune, evaluated and summarised with intervals")
    p.add_argument("--config", default=None, help="YAML config with a study: section (jobs/configs/study-synth.yaml)")
    # Exclusive in the parser, so that `mtseg submit study` refuses the pair before submission too.
    when = p.add_mutually_exclusive_group()
    when.add_argument(
        "--resume", action="store_true", help="continue the interrupted study (finished runs and evaluations are kept)"
    )
    when.add_argument("--restart", action="store_true", help="delete the study and start over")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. study.seeds=5")
    p.set_defaults(fn=cmd_study)
