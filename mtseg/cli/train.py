"""``mtseg train``: distributed training on Ray Train (:func:`mtseg.train.trainer.run_training`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from mtseg.cli import EXIT_FAILED


def json_metrics(metrics: dict) -> str:
    """Metrics as strict JSON: an undefined value (NaN, infinite) is ``null``, as in metrics.json and meta.json."""
    from mtseg.train.checkpoint import strict_json  # loaded already: this prints a training's result

    return strict_json(metrics, indent=2)


@contextlib.contextmanager
def sigint_seen() -> Iterator[Callable[[], bool]]:
    """Yield a function telling whether SIGINT arrived in the block, whoever handled it.

    Ray Train's ``fit()`` installs a SIGINT handler that aborts the run and exits, so no
    KeyboardInterrupt reaches mtseg; the interpreter still writes every handled signal to the
    wakeup fd. The previous handler is put back on the way out.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield lambda: False
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    handler = signal.getsignal(signal.SIGINT)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    seen = False

    def interrupted() -> bool:
        nonlocal seen
        with contextlib.suppress(BlockingIOError):
            while data := os.read(read_fd, 512):
                seen = seen or signal.SIGINT in data
        return seen

    try:
        yield interrupted
    finally:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGINT, handler)
        os.close(read_fd)
        os.close(write_fd)


def cmd_train(args: argparse.Namespace) -> int:
    from mtseg.config import load_config

    cfg = load_config(args.config, args.overrides)  # a bad config fails here, before anything starts
    from mtseg.cluster import init_local_ray, storage_env
    from mtseg.train.runstate import check_is_run
    from mtseg.train.trainer import preflight, run_training, run_uri

    preflight(cfg)  # fail on bad storage/data before any cluster resource is used
    check_is_run(run_uri(cfg))  # a folder of someone's files is not resumed over (preflight also serves tune)
    if cfg.cluster.address:
        os.environ["RAY_ADDRESS"] = cfg.cluster.address
    init_local_ray(env=storage_env(credentials=True), dashboard=True, log_to_driver=True)
    with sigint_seen() as interrupted:
        try:
            result = run_training(cfg, restart=args.restart)
        finally:
            if interrupted():
                # Ray Train took the Ctrl-C and aborted the run; however fit() ended, the user
                # stopped it: main() exits 130.
                raise KeyboardInterrupt
    if result.error:
        from mtseg.train.runstate import error_line

        print(f"mtseg: error: training failed: {error_line(result.error)}", file=sys.stderr)
        return EXIT_FAILED
    print(json_metrics({k: v for k, v in (result.metrics or {}).items() if k.startswith("val/")}))
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mtseg train``."""
    train = subparsers.add_parser("train", help="distributed training on Ray Train")
    train.add_argument("--config", default=None, help="YAML config (jobs/configs/*.yaml)")
    train.add_argument("--restart", action="store_true", help="delete the run's checkpoints and start over")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=0.01")
    train.set_defaults(fn=cmd_train)
