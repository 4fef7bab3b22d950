"""``mtseg submit`` and ``mtseg jobs``: run and manage jobs through the Ray Jobs API (:mod:`mtseg.submit`)."""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import sys
from collections.abc import Sequence

from mtseg import submit
from mtseg.cli import EXIT_FAILED, EXIT_INTERRUPTED, JOB_EXIT_CODES, build_parser


def check_arguments(name: str, argv: Sequence[str]) -> None:
    """Parse ``argv`` with the parser of the job's ``mtseg`` subcommand, as the job will.

    Raises:
        SubmitError: the arguments are wrong (the message is argparse's, on one line).
    """
    command = submit.JOBS[name].command
    if not command:
        return
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args([command, *argv])
    except SystemExit as e:
        if e.code:
            lines = [line for line in err.getvalue().splitlines() if line.strip()]
            reason = lines[-1].split("error: ", 1)[-1] if lines else "bad arguments"
            raise submit.SubmitError(f"{name}: {reason} (checked before submission)") from None


def _resource(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    try:
        if not sep or not key:
            raise ValueError
        return key, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a resource is NAME=AMOUNT, e.g. accelerator_type:A10G=0.01") from None


def _fmt_time(ms: int | None) -> str:
    if not ms:
        return "-"
    return _dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _follow_and_exit(jobs: submit.JobsClient, sid: str) -> int:
    try:
        status = jobs.follow(sid, sys.stdout)
    except KeyboardInterrupt:
        print(f"\nmtseg: stopped following; job {sid} keeps running (mtseg jobs stop {sid})", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"[submit] job {sid} {status}", file=sys.stderr)
    return JOB_EXIT_CODES.get(status, EXIT_FAILED)


def cmd_submit(args: argparse.Namespace) -> int:
    """``mtseg submit NAME ...``."""
    spec = submit.JOBS[args.job]
    script_args: list[str] = []
    if args.job == "prepare":
        script_args += ["--coco-root", args.coco_root]
    if getattr(args, "restart", False):  # only `submit train` and `submit study` have --restart
        script_args.append("--restart")
    if getattr(args, "resume", False):  # only `submit study` has --resume
        script_args.append("--resume")
    if spec.takes_config:
        config, overrides = args.config, args.overrides
    else:
        config, overrides = None, []
        script_args += args.script_args
    sid = submit.submit(
        args.job,
        config,
        overrides,
        address=args.address,
        working_dir=args.working_dir,
        submission_id=args.submission_id,
        script_args=script_args,
        entrypoint_num_cpus=args.num_cpus,
        entrypoint_num_gpus=args.num_gpus,
        entrypoint_memory=args.memory,
        entrypoint_resources=dict(args.resource or []),
        pass_storage_env=not args.no_storage_env,
        forward_credentials=args.forward_credentials,
        check_args=check_arguments,
    )
    print(sid, flush=True)
    if not args.wait:
        print(f"# follow it: mtseg jobs logs {sid} --follow", file=sys.stderr)
        return 0
    return _follow_and_exit(submit.JobsClient(args.address), sid)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _list_jobs(jobs: submit.JobsClient, *, drivers: bool) -> None:
    rows = [("SUBMISSION_ID", "STATUS", "START", "END", "ENTRYPOINT")]
    hidden = 0
    for j in jobs.list_jobs():
        if j.submission_id:
            status = str(j.status.value)
            run = submit.run_outcome(j)
            if run:
                status += f" (run: {_shorten(run, 60)})"
        elif drivers:
            # A script that called ray.init on this cluster: Ray only knows whether it is still
            # connected (it reports every disconnect as SUCCEEDED, a SIGKILL or a crash too).
            status = "driver: " + ("connected" if str(j.status.value) == "RUNNING" else "disconnected")
        else:
            hidden += 1
            continue
        rows.append(
            (
                j.submission_id or j.job_id or "-",
                status,
                _fmt_time(j.start_time),
                _fmt_time(j.end_time),
                _shorten(j.entrypoint, 70),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    if hidden:
        print(
            f"# {hidden} driver connection(s) not listed (scripts that called ray.init here; Ray cannot "
            "tell how they ended): mtseg jobs list --drivers",
            file=sys.stderr,
        )


def cmd_jobs(args: argparse.Namespace) -> int:
    """``mtseg jobs list|status|logs|stop``."""
    jobs = submit.JobsClient(args.address)
    if args.action == "list":
        _list_jobs(jobs, drivers=args.drivers)
        return 0
    if not args.id:
        raise submit.SubmitError(f"jobs {args.action}: a submission id is required")
    if args.action == "status":
        info = jobs.info(args.id)
        print(f"{args.id}: {info.status.value}")
        run = submit.run_outcome(info)
        if run:
            print(f"run: {run}")
        if info.message:
            print(f"message: {info.message}")
        print(f"entrypoint: {info.entrypoint}")
        print(f"start: {_fmt_time(info.start_time)}  end: {_fmt_time(info.end_time)}")
        for k, v in sorted((info.metadata or {}).items()):
            print(f"{k}: {v}")
        return 0
    if args.action == "logs":
        if args.follow:
            return _follow_and_exit(jobs, args.id)
        sys.stdout.write(jobs._redact(jobs.logs(args.id)))
        return 0
    # stop
    was_running = jobs.stop(args.id)
    print(f"{args.id}: stop requested" if was_running else f"{args.id}: was not running ({jobs.status(args.id)})")
    if args.wait and was_running:
        print(f"{args.id}: {jobs.wait(args.id)}")
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``submit`` and ``jobs`` commands to mtseg's argparse ``subparsers``."""
    address_help = (
        "Ray Jobs API address, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, "
        "RAY_ADDRESS, then the head of `mtseg cluster up`)"
    )

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=None, help=address_help)
    common.add_argument(
        "--wait", action="store_true", help="follow the logs until the job ends; exit 0 SUCCEEDED, 1 FAILED, 3 STOPPED"
    )
    common.add_argument("--submission-id", default=None, help="default mtseg-<job>-<run_name>-<UTC time>-<hex>")
    common.add_argument(
        "--working-dir", default=None, help="directory uploaded as the job's working_dir (default: this checkout)"
    )
    common.add_argument(
        "--no-storage-env",
        action="store_true",
        help="do not pass this shell's AWS endpoint and region settings; the cluster's own apply",
    )
    common.add_argument(
        "--forward-credentials",
        action="store_true",
        help="also pass this shell's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN "
        "(Ray writes them in plain text to its logs and `ray job list`; by default the "
        "cluster's own credentials apply)",
    )
    common.add_argument(
        "--num-cpus", type=float, default=None, help="CPUs the driver reserves (default: per job; 0 = on the head)"
    )
    common.add_argument("--num-gpus", type=float, default=None, help="GPUs the driver reserves (default 0)")
    common.add_argument("--memory", type=int, default=None, help="bytes of memory the driver reserves")
    common.add_argument(
        "--resource",
        type=_resource,
        action="append",
        metavar="NAME=AMOUNT",
        help="custom resource the driver reserves (repeatable)",
    )

    submit_p = subparsers.add_parser("submit", help="run a job on a Ray cluster through the Ray Jobs API")
    jobs_sub = submit_p.add_subparsers(dest="job", required=True, metavar="JOB")
    for name, spec in submit.JOBS.items():
        p = jobs_sub.add_parser(name, parents=[common], help=spec.help, description=f"{spec.help}: submits {spec.script}")
        if spec.takes_config:
            p.add_argument(
                "--config", default=None, help="YAML config inside the project (jobs/configs/*.yaml); validated before submission"
            )
            p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=0.01")
        else:
            p.add_argument(
                "script_args",
                nargs="*",
                metavar="-- ARG",
                help=f"arguments of `mtseg {spec.command}`, after --, e.g. -- --checkpoint s3://bucket/runs/demo",
            )
        if name == "prepare":
            p.add_argument(
                "--coco-root", required=True, help="COCO root with images and annotations (a path on the cluster or s3://...)"
            )
        if name == "train":
            p.add_argument("--restart", action="store_true", help="delete the run's checkpoints and start over")
        if name == "study":
            p.add_argument("--resume", action="store_true", help="continue the interrupted study (finished runs are kept)")
            p.add_argument("--restart", action="store_true", help="delete the study and start over")
        p.set_defaults(fn=cmd_submit)

    jobs = subparsers.add_parser("jobs", help="list, inspect, follow and stop jobs on a Ray cluster")
    jobs.add_argument("action", choices=("list", "status", "logs", "stop"))
    jobs.add_argument("id", nargs="?", default=None, help="submission id (all but list)")
    jobs.add_argument("--address", default=None, help=address_help)
    jobs.add_argument("--follow", action="store_true", help="logs: stream until the job ends; exit with its outcome")
    jobs.add_argument("--wait", action="store_true", help="stop: wait until the job has stopped")
    jobs.add_argument(
        "--drivers",
        action="store_true",
        help="list: also scripts that called ray.init on the cluster (Ray knows only whether they are connected)",
    )
    jobs.set_defaults(fn=cmd_jobs)
