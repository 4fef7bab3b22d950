"""The ``mtseg`` command line.

    mtseg demo                                   # the main job, end to end, on the embedded default
    mtseg cluster up|down|status                 # local SeaweedFS + Ray head on 127.0.0.1
    mtseg data synth --out DIR [--train N --val N --size PX --seed S]
    mtseg data shard --coco-root DIR|URI --split NAME --out URI [--images-per-shard N] [--create-bucket]
    mtseg train --config FILE [key=value ...] [--restart]
    mtseg evaluate --checkpoint URI [--data URI] [--split NAME]
    mtseg predict --checkpoint URI IMAGE_OR_DIR_OR_URI... --out DIR
    mtseg tune --config FILE [key=value ...] [--resume]
    mtseg submit prepare|train|tune|evaluate|predict [--address URL] [--wait] ...
    mtseg jobs list|status ID|logs ID [--follow]|stop ID

Every command fails with one line (``mtseg: error: ...``) naming what was wrong, and exit code 2
(``predict`` exits 1 when it skipped unreadable images; ``submit --wait`` mirrors the job's outcome).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator


def _errors():
    from mtseg.cluster import ClusterError
    from mtseg.config import ConfigError
    from mtseg.storage import StorageError

    errors: list[type[BaseException]] = [ConfigError, StorageError, ClusterError]
    try:
        from mtseg.data.manifest import ManifestError

        errors.append(ManifestError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from mtseg.data.shard import ShardError

        errors.append(ShardError)
    except ImportError:  # pragma: no cover
        pass
    from mtseg.data.synth import SynthError

    errors.append(SynthError)
    try:
        from mtseg.train.checkpoint import CheckpointError

        errors.append(CheckpointError)
    except ImportError:  # pragma: no cover
        pass
    from mtseg.train.runstate import RunLockedError

    errors.append(RunLockedError)
    from mtseg.submit import SubmitError

    errors.append(SubmitError)
    from mtseg.tune import SearchError

    errors.append(SearchError)
    return tuple(errors)


# ---------------------------------------------------------------------------- commands


def json_metrics(metrics: dict) -> str:
    """Metrics as strict JSON: an undefined value (NaN, infinite) is ``null``, as in metrics.json.

    ``json.dumps`` would write ``NaN``, which JSON parsers other than Python's refuse.
    """
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    return json.dumps(clean, indent=2, allow_nan=False)


def cmd_synth(args) -> int:
    from mtseg.data.synth import synthesize

    info = synthesize(args.out, train=args.train, val=args.val, size=args.size, seed=args.seed)
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_shard(args) -> int:
    from mtseg.data.shard import shard_coco

    manifest = shard_coco(
        args.coco_root, args.split, args.out,
        images_per_shard=args.images_per_shard, max_bad_fraction=args.max_bad_fraction,
        create_bucket=args.create_bucket,
    )
    print(json.dumps({"counts": manifest["counts"], "converted": manifest["converted"],
                      "skipped": {k: v for k, v in manifest["skipped"].items() if k != "details"}}, indent=2))
    return 0


def cmd_cluster(args) -> int:
    from mtseg.cluster import LocalStack

    stack = LocalStack.load(args.dir)
    if args.action == "up":
        env = stack.up(ray_head=not args.no_ray, num_cpus=args.num_cpus)
        print("# local stack is up; for a client shell:")
        for k, v in env.items():
            print(f"export {k}={v}")
    elif args.action == "down":
        for line in stack.down():
            print(line)
    else:
        for name, line in stack.status().items():
            print(f"{name}: {line}")
    return 0


def _storage_env() -> dict[str, str]:
    keys = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")
    return {k: os.environ[k] for k in keys if os.environ.get(k)}


@contextlib.contextmanager
def _sigint_seen() -> Iterator[Callable[[], bool]]:
    """Yield a function telling whether SIGINT arrived in the block, whoever handled it.

    Ray Train's ``fit()`` replaces the SIGINT handler with one that aborts the run and then
    calls ``sys.exit(0)``, which ``ray.get`` re-raises as ``SystemExit(1)``: no
    KeyboardInterrupt reaches mtseg, and a Ctrl-C looked like a failed run (exit 1). The
    interpreter writes the number of every signal it handles to the wakeup fd, whichever
    handler then runs. Ray's handler stays installed after ``fit()``: the previous one is
    put back on the way out.
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


def cmd_train(args) -> int:
    from mtseg.config import load_config

    cfg = load_config(args.config, args.overrides)  # a bad config fails here, before anything starts
    from mtseg.cluster import init_local_ray
    from mtseg.train.trainer import preflight, run_training

    preflight(cfg)  # fail on bad storage/data before any cluster resource is used
    if cfg.cluster.address:
        os.environ["RAY_ADDRESS"] = cfg.cluster.address
    init_local_ray(env=_storage_env(), dashboard=True, log_to_driver=True)
    with _sigint_seen() as interrupted:
        try:
            result = run_training(cfg, restart=args.restart)
        finally:
            if interrupted():
                # Ray Train took the Ctrl-C and aborted the run; however fit() ended, the user
                # stopped it: main() exits 130.
                raise KeyboardInterrupt
    if result.error:
        from mtseg.train.runstate import error_line

        raise SystemExit(f"mtseg: error: training failed: {error_line(result.error)}")
    print(json_metrics({k: v for k, v in (result.metrics or {}).items() if k.startswith("val/")}))
    return 0


def cmd_demo(args) -> int:
    from mtseg.demo import run_demo

    return run_demo(out_dir=args.out, train_images=args.train, val_images=args.val, epochs=args.epochs)


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtseg", description="Multi-task segmentation on COCO with Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job end to end on local Ray + SeaweedFS with synthetic COCO")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--train", type=int, default=None, help="synthetic training images (default 1536)")
    demo.add_argument("--val", type=int, default=96, help="synthetic validation images")
    demo.add_argument("--epochs", type=int, default=None, help="override the demo config's epochs")
    demo.set_defaults(fn=cmd_demo)

    cl = sub.add_parser("cluster", help="local SeaweedFS + Ray head on 127.0.0.1")
    cl.add_argument("action", choices=("up", "down", "status"))
    cl.add_argument("--dir", default=os.path.join("runs", "stack"), help="state and data of the local stack")
    cl.add_argument("--no-ray", action="store_true", help="only the object store")
    cl.add_argument("--num-cpus", type=int, default=None)
    cl.set_defaults(fn=cmd_cluster)

    data = sub.add_parser("data", help="make and shard COCO-format data").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="synthesise a COCO-format dataset")
    synth.add_argument("--out", required=True)
    synth.add_argument("--train", type=int, default=320)
    synth.add_argument("--val", type=int, default=80)
    synth.add_argument("--size", type=int, default=64)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(fn=cmd_synth)
    shard = data.add_parser("shard", help="COCO images + instances json -> parquet shards + manifest")
    shard.add_argument("--coco-root", required=True)
    shard.add_argument("--split", required=True)
    shard.add_argument("--out", required=True)
    shard.add_argument("--images-per-shard", type=int, default=256)
    shard.add_argument("--max-bad-fraction", type=float, default=0.05)
    shard.add_argument("--create-bucket", action="store_true", help="create the --out bucket if it does not exist")
    shard.set_defaults(fn=cmd_shard)

    train = sub.add_parser("train", help="distributed training on Ray Train")
    train.add_argument("--config", default=None, help="YAML config (jobs/configs/*.yaml)")
    train.add_argument("--restart", action="store_true", help="delete the run's checkpoints and start over")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=0.01")
    train.set_defaults(fn=cmd_train)

    from mtseg import submit

    submit.add_parsers(sub)

    from mtseg import evaluate, predict

    evaluate.add_parser(sub)
    predict.add_parser(sub)

    from mtseg import tune

    tune.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except _errors() as e:
        print(f"mtseg: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
