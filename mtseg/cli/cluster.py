"""``mtseg cluster up|down|status``: the local SeaweedFS + Ray head (:class:`mtseg.cluster.LocalStack`)."""

from __future__ import annotations

import argparse
import os


def cmd_cluster(args: argparse.Namespace) -> int:
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


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mtseg cluster``."""
    cl = subparsers.add_parser("cluster", help="local SeaweedFS + Ray head on 127.0.0.1")
    cl.add_argument("action", choices=("up", "down", "status"))
    cl.add_argument("--dir", default=os.path.join("runs", "stack"), help="state and data of the local stack")
    cl.add_argument("--no-ray", action="store_true", help="only the object store")
    cl.add_argument("--num-cpus", type=int, default=None)
    cl.set_defaults(fn=cmd_cluster)
