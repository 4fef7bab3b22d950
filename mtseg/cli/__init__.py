"""The ``mtseg`` command line: all of mtseg's argparse code, one module per command group.

    mtseg demo                                   # the main job, end to end, on the embedded default
    mtseg cluster up|down|status                 # local SeaweedFS + Ray head on 127.0.0.1
    mtseg data synth --out DIR [--train N --val N --size PX --seed S]
    mtseg data shard --coco-root DIR|URI --split NAME --out URI [--annotations instances|panoptic] [--images-per-shard N] [--create-bucket]
    mtseg data import-masks --images DIR|URI --masks DIR|URI --classes classes.yaml --out DIR|URI --split NAME
    mtseg train --config FILE [key=value ...] [--restart]
    mtseg evaluate --checkpoint URI [--data URI] [--split NAME]
    mtseg predict --checkpoint URI IMAGE_OR_DIR_OR_URI... --out DIR
    mtseg tune --config FILE [key=value ...] [--resume]
    mtseg study --config FILE [key=value ...] [--resume | --restart]
    mtseg submit prepare|train|tune|study|evaluate|predict [--address URL] [--wait] ...
    mtseg jobs list|status ID|logs ID [--follow]|stop ID

Every command fails with one line (``mtseg: error: ...``) and one of the exit codes below. The
library never imports this package; a command imports torch and Ray inside its function, so
that ``mtseg --help`` and ``mtseg jobs list`` start fast.
"""

from __future__ import annotations

import argparse
import sys

from mtseg.errors import MtsegError

EXIT_OK = 0
# The command ran and its work failed: training failed, predict skipped an image, the demo
# missed its target, a submitted job FAILED.
EXIT_FAILED = 1
# An MtsegError: bad input or an unusable environment (config, data, storage, cluster), found
# before any work starts wherever it can be.
EXIT_USAGE = 2
EXIT_STOPPED = 3  # a submitted job was STOPPED
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
# `mtseg submit --wait` and `mtseg jobs logs --follow` exit with the job's outcome; 2 stays
# mtseg's own "bad input" code (bad config, missing token, unreachable cluster).
JOB_EXIT_CODES = {"SUCCEEDED": EXIT_OK, "FAILED": EXIT_FAILED, "STOPPED": EXIT_STOPPED}


def build_parser() -> argparse.ArgumentParser:
    """The ``mtseg`` parser; each parsed command carries its function as ``args.fn``."""
    from mtseg.cli import cluster, data, demo, evaluate, jobs, predict, study, train, tune

    p = argparse.ArgumentParser(prog="mtseg", description="Multi-task segmentation on COCO with Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    for group in (demo, cluster, data, train, jobs, evaluate, predict, tune, study):
        group.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one ``mtseg`` command and return its exit code.

    An :class:`~mtseg.errors.MtsegError` is printed as one line and exits with its ``exit_code``;
    anything else is a bug in mtseg and keeps its traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except MtsegError as e:
        print(f"mtseg: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mtseg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
