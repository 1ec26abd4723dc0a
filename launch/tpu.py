"""Cloud TPU launcher: `python -m launch.tpu [--dry-run] <command> [NAME] [flags]`.

    create     a TPU VM (or a queued resource with --queued): accelerator type, zone, runtime
               version, --spot / --preemptible / --reserved, --network / --subnetwork,
               --service-account, --internal-ips, --labels; --num-slices N (with --queued):
               N slices as one multislice queued resource
    setup      put the repository on every worker (a `git archive` copied with scp, or a
               `git clone`) and pip-install it with jax[tpu], constrained by requirements.lock
    run        start the same `diffjax train ... --tpu` on every worker (--worker=all), with
               TFDS_DATA_DIR and the workdir on gs://; detached (nohup) unless --foreground
    supervise  create if missing, wait until READY / ACTIVE, setup, run in the foreground; on a
               preemption delete, re-create and run again (resuming), up to --max-restarts
    sample     `diffjax sample ... --tpu` on every worker, in the foreground: worker 0's output
    eval       `diffjax eval ... --tpu` likewise
    logs       the training log of one worker (default 0), --follow to keep reading
    stop       SIGTERM to the training on every worker (diffjax train saves a checkpoint first)
    ssh        a shell, or a command, on one worker or all
    delete     the TPU VM (or the queued resource and its TPUs)

NAME is the TPU's name, given after the command, as --name or as $DIFFJAX_TPU_NAME. With
--num-slices N (N >= 2, v4 or later, created with --queued) the TPU is one queued resource whose
slices are the nodes NAME-0 .. NAME-(N-1); setup, run, supervise, sample, eval, stop and ssh act on
every node, logs on --node (default 0). Nothing extra is needed for Multislice: the TPU runtime
gives every worker of a multislice queued resource its MEGASCALE_* settings (in the VM's tpu-env
metadata, where jax.distributed.initialize() reads them), and the scripts export nothing that
would override them (only TFDS_DATA_DIR). A foreground run / sample / eval starts its per-slice
ssh commands together, since every slice must join.

`--dry-run` prints the exact commands, one per line, ready to paste (commands that run together
end in ` &`, then `wait`), and runs none of them. Every argument is checked (accelerator type,
zone, workdir, labels, ...) before any gcloud call, and a bad one is reported on one line naming
the flag and what it accepts.

The modules are pure functions that build argv lists (launch.tpu_spec: create / describe / delete;
launch.tpu_remote: setup / run / sample / eval / logs / stop / ssh) and a thin runner
(launch.runner.execute); launch.supervise is the supervise loop. Tests check the lists, users run
them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from launch.runner import execute
from launch.tpu_remote import (  # noqa: F401  (re-exported: the launcher's public builders)
    ARCHIVE,
    JOBS,
    LOCK,
    LOG_DIR,
    check_workdir,
    job_commands,
    job_remote_script,
    logs_commands,
    run_commands,
    run_remote_script,
    scp_command,
    setup_commands,
    setup_remote_script,
    ssh_command,
    ssh_commands,
    stop_commands,
    train_argv,
)
from launch.tpu_spec import (  # noqa: F401
    ALIASES,
    GCLOUD,
    GENERATIONS,
    NAME_ENV,
    ZONE_ENV,
    Accelerator,
    Generation,
    LaunchError,
    Target,
    allowed_accelerator_types,
    create_commands,
    create_flags,
    delete_commands,
    describe_command,
    parse_accelerator,
    parse_labels,
    resolve_target,
)

if TYPE_CHECKING:
    from launch.supervise import Supervision

COMMANDS = ("create", "setup", "run", "supervise", "sample", "eval", "logs", "stop", "ssh", "delete")
_VALUE_OPTIONS = ("--name", "--zone", "--project", "--num-slices")


def name_from_position(argv: Sequence[str]) -> list[str]:
    """`create NAME ...` -> `create --name=NAME ...`: the word right after the command, if it is
    not a flag, is the TPU's name (options before the command may take a separate value)."""
    out, i = list(argv), 0
    while i < len(out):
        word = out[i]
        if word == "--":
            break
        if word in COMMANDS:
            if i + 1 < len(out) and not out[i + 1].startswith("-"):
                out[i + 1] = f"--name={out[i + 1]}"
            break
        i += 2 if word in _VALUE_OPTIONS else 1
    return out


def build_parser() -> argparse.ArgumentParser:
    # Accepted before or after the command. SUPPRESS: a subcommand's unset flag must not
    # overwrite the value given before the command (argparse copies subparser defaults).
    S = argparse.SUPPRESS
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default=S, help=f"TPU name (or NAME after the command, or ${NAME_ENV})")
    common.add_argument("--zone", default=S, help=f"zone, e.g. us-central2-b (or ${' / $'.join(ZONE_ENV)})")
    common.add_argument("--project", default=S, help="GCP project (default: gcloud's)")
    common.add_argument("--num-slices", type=int, default=S, help="multislice: N slices, nodes NAME-0 .. NAME-(N-1)")
    common.add_argument("--internal-ip", action="store_true", default=S, help="ssh / scp to the workers' internal IPs")
    common.add_argument("--dry-run", action="store_true", default=S, help="print the commands, run nothing")

    create = argparse.ArgumentParser(add_help=False)
    create.add_argument("--accelerator-type", "--accelerator", help="e.g. v4-8, v4-32, v5litepod-32 (v5e-32), v5p-16, v6e-8")
    create.add_argument(
        "--runtime-version",
        help="default per generation (tpu-ubuntu2204-base for v2-v4, v2-alpha-tpuv5-lite, v2-alpha-tpuv5, v2-alpha-tpuv6e)",
    )
    create.add_argument("--spot", action="store_true", help="Spot VM (preemptible, cheaper)")
    create.add_argument("--preemptible", action="store_true", help="legacy preemptible TPU")
    create.add_argument("--reserved", action="store_true", help="use a reservation")
    create.add_argument("--queued", action="store_true", help="queued resource: waits until capacity is there")
    create.add_argument("--network", help="VPC network (name or projects/P/global/networks/N)")
    create.add_argument("--subnetwork", help="subnetwork (name or projects/P/regions/R/subnetworks/N)")
    create.add_argument("--service-account", help="service account email the workers run as")
    create.add_argument("--internal-ips", action="store_true", help="no external IPs (then ssh with --internal-ip)")
    create.add_argument("--labels", help="KEY=VALUE,... (lowercase keys and values, GCP label rules)")

    setup = argparse.ArgumentParser(add_help=False)
    setup.add_argument("--repo-url", help="git clone this on the workers instead of copying a `git archive`")
    setup.add_argument("--ref", default="HEAD", help="git commit / branch to archive or check out")
    setup.add_argument("--python", default="python3.11", help="interpreter for the workers' venv (>= 3.11)")
    setup.add_argument("--archive", help="local path of the source archive (default /tmp/diffjax-src.tar.gz)")
    setup.add_argument("--lock", default=LOCK, help="pip constraints file in the repo ('' for none)")

    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--remote-dir", default="diffjax", help="directory under $HOME on the workers")

    train = argparse.ArgumentParser(add_help=False)
    train.add_argument("--config", required=True, help="config file, relative to the repo, e.g. configs/ddpm_cifar10.py")
    train.add_argument("--workdir", required=True, help="gs://BUCKET/PATH")
    train.add_argument("--tfds-data-dir", help="gs:// TFDS data directory (sets TFDS_DATA_DIR on every worker)")
    train.add_argument("--allow-local-workdir", action="store_true", help="single-host only: a path on the VM")
    train.add_argument("overrides", nargs=argparse.REMAINDER, help="-- then diffjax train flags")

    parser = argparse.ArgumentParser(
        prog="python -m launch.tpu",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("create", parents=[common, create], help="create a TPU VM or queued resource")
    sub.add_parser("setup", parents=[common, setup, remote], help="copy / clone the repo and pip install it on all workers")

    p = sub.add_parser(
        "run",
        parents=[common, remote, train],
        help="diffjax train --tpu on every worker",
        description="Extra arguments after -- go to diffjax train (e.g. --config.training.batch_size=256).",
    )
    p.add_argument(
        "--accelerator-type", "--accelerator", help="optional: checks that a multi-host slice gets a gs:// workdir"
    )
    p.add_argument("--foreground", action="store_true", help="stream the output; stops when ssh does")

    p = sub.add_parser(
        "supervise",
        parents=[common, create, setup, remote, train],
        help="create, setup and run until the run ends, re-creating the TPU after preemptions",
        description="create / setup flags as for those commands; extra arguments after -- go to diffjax train.",
    )
    p.add_argument("--max-restarts", type=int, default=10, help="deletes + re-creates allowed (default 10)")
    p.add_argument("--poll-interval", type=float, default=30.0, help="seconds between state checks (default 30)")
    p.add_argument("--watch-interval", type=float, default=60.0, help="seconds between state checks during the run")
    p.add_argument("--ready-timeout", type=float, default=0.0, help="seconds to wait for READY / ACTIVE (0: no limit)")
    p.add_argument("--settle", type=float, default=120.0, help="after a failed run, seconds to wait for a state change")

    for job in JOBS:
        p = sub.add_parser(
            job,
            parents=[common, remote],
            help=f"diffjax {job} ... --tpu on every worker (worker 0's output)",
            description=f"The diffjax {job} arguments go after --; --tpu is added.",
        )
        p.add_argument("--tfds-data-dir", help="gs:// TFDS data directory (sets TFDS_DATA_DIR on every worker)")
        p.add_argument("--detach", action="store_true", help=f"nohup, log in ~/{LOG_DIR}/{job}.log")
        p.add_argument("args", nargs=argparse.REMAINDER, help=f"-- then diffjax {job} arguments")

    p = sub.add_parser("logs", parents=[common], help="training log of one worker")
    p.add_argument("--worker", default="0", help="worker index, or 'all'")
    p.add_argument("--node", default="0", help="multislice: slice index, or 'all'")
    p.add_argument("--job", default="train", choices=("train", *JOBS), help="whose log")
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--lines", type=int, default=100)

    sub.add_parser("stop", parents=[common], help="SIGTERM the training on every worker (checkpoints first)")

    p = sub.add_parser("ssh", parents=[common], help="ssh to a worker (or run -- COMMAND on --worker=all)")
    p.add_argument("--worker", default="0")
    p.add_argument("--node", help="multislice: slice index or 'all' (default: all for --worker=all, else 0)")
    p.add_argument("remote", nargs=argparse.REMAINDER, help="-- then a command to run")

    p = sub.add_parser("delete", parents=[common], help="delete the TPU VM (or --queued resource)")
    p.add_argument("--queued", action="store_true")
    return parser


def _rest(args: Sequence[str]) -> list[str]:
    return list(args[1:]) if args and args[0] == "--" else list(args)


def _target(args: argparse.Namespace, environ: Mapping[str, str] | None) -> Target:
    return resolve_target(
        getattr(args, "name", None),
        getattr(args, "zone", None),
        getattr(args, "project", None),
        environ,
        num_slices=getattr(args, "num_slices", None),
        internal_ip=getattr(args, "internal_ip", False),
    )


def _create(args: argparse.Namespace, target: Target) -> list[list[str]]:
    extra = create_flags(
        network=args.network,
        subnetwork=args.subnetwork,
        service_account=args.service_account,
        internal_ips=args.internal_ips,
        reserved=args.reserved,
        labels=args.labels,
    )
    return create_commands(
        target,
        parse_accelerator(args.accelerator_type),
        runtime_version=args.runtime_version,
        spot=args.spot,
        preemptible=args.preemptible,
        queued=args.queued,
        extra=extra,
    )


def _setup(args: argparse.Namespace, target: Target) -> list[list[str]]:
    return setup_commands(
        target,
        remote_dir=args.remote_dir,
        repo_url=args.repo_url,
        ref=args.ref,
        python=args.python,
        local_archive=args.archive,
        lock=args.lock or None,
    )


def _run(args: argparse.Namespace, target: Target, accelerator: Accelerator | None, foreground: bool) -> list[list[str]]:
    return run_commands(
        target,
        args.config,
        args.workdir,
        tfds_data_dir=args.tfds_data_dir,
        overrides=_rest(args.overrides),
        remote_dir=args.remote_dir,
        foreground=foreground,
        accelerator=accelerator,
        allow_local_workdir=args.allow_local_workdir,
    )


def plan(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> tuple[list[list[str]], bool]:
    """Validated commands for parsed arguments, and whether they run together (LaunchError on bad input)."""
    target = _target(args, environ)
    if args.command == "create":
        return _create(args, target), False
    if args.command == "setup":
        return _setup(args, target), False
    if args.command == "run":
        accelerator = parse_accelerator(args.accelerator_type) if args.accelerator_type else None
        return _run(args, target, accelerator, args.foreground), args.foreground
    if args.command in JOBS:
        commands = job_commands(
            target,
            args.command,
            _rest(args.args),
            tfds_data_dir=args.tfds_data_dir,
            remote_dir=args.remote_dir,
            detach=args.detach,
        )
        return commands, not args.detach
    if args.command == "logs":
        return logs_commands(
            target, worker=args.worker, follow=args.follow, lines=args.lines, node=args.node, job=args.job
        ), False
    if args.command == "stop":
        return stop_commands(target), False
    if args.command == "ssh":
        remote = _rest(args.remote)
        node = args.node if args.node is not None else ("all" if args.worker == "all" else "0")
        return ssh_commands(target, shlex.join(remote) if remote else None, worker=args.worker, node=node), False
    if args.command == "delete":
        return delete_commands(target, queued=args.queued), False
    raise LaunchError(f"unknown command {args.command!r}")


def supervision(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Supervision:
    """The supervise loop's commands and bounds, checked like create, setup and run --foreground."""
    from launch.supervise import Supervision

    target = _target(args, environ)
    accelerator = parse_accelerator(args.accelerator_type)
    create = _create(args, target)
    run = _run(args, target, accelerator, foreground=True)
    for flag, value in (("--max-restarts", args.max_restarts), ("--ready-timeout", args.ready_timeout)):
        if value < 0:
            raise LaunchError(f"{flag} {value}: 0 or more")
    for flag, value in (("--poll-interval", args.poll_interval), ("--watch-interval", args.watch_interval)):
        if not value > 0:
            raise LaunchError(f"{flag} {value}: seconds, more than 0")
    return Supervision(
        name=target.name,
        describe=describe_command(target, queued=args.queued),
        create=create,
        delete=delete_commands(target, queued=args.queued),
        setup=_setup(args, target),
        run=run,
        max_restarts=args.max_restarts,
        poll_s=args.poll_interval,
        watch_s=args.watch_interval,
        ready_timeout_s=args.ready_timeout,
        settle_s=max(0.0, args.settle),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(name_from_position(sys.argv[1:] if argv is None else argv))
    dry_run = getattr(args, "dry_run", False)
    try:
        if args.command == "supervise":
            from launch.supervise import SuperviseError, supervise

            s = supervision(args)
            try:
                return supervise(s, dry_run=dry_run)
            except SuperviseError as err:
                print(f"launch.tpu: error: supervise: {err}", file=sys.stderr)
                return 1
        commands, parallel = plan(args)
    except LaunchError as err:
        print(f"launch.tpu: error: {err}", file=sys.stderr)
        return 2
    return execute(commands, dry_run, parallel=parallel)


if __name__ == "__main__":
    sys.exit(main())
