"""Cloud TPU launcher: `python -m launch.tpu [--dry-run] <command> [flags]`.

    create  a TPU VM (or a queued resource with --queued): accelerator type, zone, runtime
            version, --spot / --preemptible
    setup   put the repository on every worker (a `git archive` copied with scp, or a
            `git clone`) and pip-install it with jax[tpu] into a virtualenv there
    run     start the same `diffjax train ... --tpu` on every worker (--worker=all), with
            TFDS_DATA_DIR and the workdir on gs://; detached (nohup) unless --foreground
    logs    the training log of one worker (default 0), --follow to keep reading
    stop    SIGTERM to the training on every worker (diffjax train saves a checkpoint first)
    ssh     a shell, or a command, on one worker or all
    delete  the TPU VM (or the queued resource and its TPU)

`--dry-run` prints the exact commands, one per line, ready to paste, and runs none of them.
Every argument is checked (accelerator type, zone, workdir) before any gcloud call, and a bad
one is reported naming the flag and what it accepts.

The module is pure functions that build argv lists (`create_commands`, `setup_commands`, ...)
and a thin runner (`execute`): tests check the lists, users run them.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass

GCLOUD = "gcloud"


class LaunchError(ValueError):
    """A bad launcher argument; reported as `launch.tpu: error: ...` before any gcloud call."""


# ---------------------------------------------------------------------------------------------
# Accelerator types.


@dataclass(frozen=True)
class Generation:
    """One TPU generation: its accelerator-type prefix, the sizes gcloud accepts, and hosts."""

    prefix: str
    sizes: tuple[int, ...]
    runtime: str  # default runtime (software) version for JAX
    single_host_max: int  # sizes up to this run on one TPU VM host
    per_host: int  # size units (TensorCores or chips) per host in multi-host slices

    def hosts(self, size: int) -> int:
        return 1 if size <= self.single_host_max else size // self.per_host


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= 2
    return tuple(out)


# The size after the dash counts TensorCores for v2, v3, v4 and v5p (2 per chip, 4 chips per
# host: 8 per host) and chips for v5e ("v5litepod") and v6e (up to 8 chips on one host, 4 chips
# per host in larger slices). Runtime versions: the Cloud TPU "TPU software versions" page.
GENERATIONS: dict[str, Generation] = {
    "v2": Generation("v2", (8, 32, 128, 256, 512), "tpu-ubuntu2204-base", 8, 8),
    "v3": Generation("v3", (8, 32, 64, 128, 256, 512, 1024, 2048), "tpu-ubuntu2204-base", 8, 8),
    "v4": Generation("v4", _powers_of_two(8, 4096) + (1536,), "tpu-ubuntu2204-base", 8, 8),
    "v5litepod": Generation("v5litepod", (1, 4, 8, 16, 32, 64, 128, 256), "v2-alpha-tpuv5-lite", 8, 4),
    "v5p": Generation("v5p", _powers_of_two(8, 8192) + (12288,), "v2-alpha-tpuv5", 8, 8),
    "v6e": Generation("v6e", (1, 4, 8, 16, 32, 64, 128, 256), "v2-alpha-tpuv6e", 8, 4),
}
ALIASES = {"v5e": "v5litepod"}  # "v5e-32" is how people say it; gcloud wants "v5litepod-32"


@dataclass(frozen=True)
class Accelerator:
    type: str  # as gcloud wants it, e.g. "v4-32", "v5litepod-32"
    generation: Generation
    size: int

    @property
    def hosts(self) -> int:
        return self.generation.hosts(self.size)

    @property
    def multi_host(self) -> bool:
        return self.hosts > 1


def allowed_accelerator_types() -> str:
    rows = [f"{g.prefix}-{{{','.join(map(str, sorted(g.sizes)))}}}" for g in GENERATIONS.values()]
    return "; ".join(rows) + " (v5e-N means v5litepod-N)"


def parse_accelerator(text: str | None) -> Accelerator:
    """'v4-32' -> Accelerator; anything gcloud would not accept raises LaunchError."""
    if not text:
        raise LaunchError(f"--accelerator-type is required; allowed: {allowed_accelerator_types()}")
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text.strip().lower())
    if match is None:
        raise LaunchError(f"--accelerator-type {text!r} is not GENERATION-SIZE; allowed: {allowed_accelerator_types()}")
    prefix, size = ALIASES.get(match.group(1), match.group(1)), int(match.group(2))
    generation = GENERATIONS.get(prefix)
    if generation is None:
        raise LaunchError(
            f"--accelerator-type {text!r}: unknown TPU generation {match.group(1)!r}; allowed: {allowed_accelerator_types()}"
        )
    if size not in generation.sizes:
        raise LaunchError(
            f"--accelerator-type {text!r}: {prefix} has no size {size}; allowed: "
            f"{prefix}-{{{','.join(map(str, sorted(generation.sizes)))}}}"
        )
    return Accelerator(f"{prefix}-{size}", generation, size)


# ---------------------------------------------------------------------------------------------
# Common settings: name, zone, project.

ZONE_ENV = ("DIFFJAX_TPU_ZONE", "CLOUDSDK_COMPUTE_ZONE")
NAME_ENV = "DIFFJAX_TPU_NAME"


@dataclass(frozen=True)
class Target:
    name: str
    zone: str
    project: str | None = None

    def flags(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])


def resolve_target(name: str | None, zone: str | None, project: str | None, environ: dict[str, str] | None = None) -> Target:
    environ = os.environ if environ is None else environ
    name = name or environ.get(NAME_ENV)
    if not name:
        raise LaunchError(f"--name is required (or set {NAME_ENV}): the TPU VM's name")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
        raise LaunchError(f"--name {name!r}: lowercase letters, digits and '-', starting with a letter")
    zone = zone or next((environ[k] for k in ZONE_ENV if environ.get(k)), None)
    if not zone:
        raise LaunchError(
            f"--zone is required (or set {' or '.join(ZONE_ENV)}), e.g. us-central2-b for v4, us-west4-a for v5e"
        )
    if not re.fullmatch(r"[a-z]+(-[a-z]+)*\d+-[a-z]", zone):
        raise LaunchError(f"--zone {zone!r} is not a zone name like us-central2-b")
    return Target(name, zone, project or environ.get("CLOUDSDK_CORE_PROJECT") or None)


# ---------------------------------------------------------------------------------------------
# Command builders: each returns a list of argv lists, run in order.


def create_commands(
    target: Target,
    accelerator: Accelerator,
    *,
    runtime_version: str | None = None,
    spot: bool = False,
    preemptible: bool = False,
    queued: bool = False,
    extra: list[str] = (),
) -> list[list[str]]:
    if spot and preemptible:
        raise LaunchError("--spot and --preemptible exclude each other (spot is the newer kind)")
    if queued and preemptible:
        raise LaunchError("--preemptible is not available for queued resources; use --spot")
    runtime = runtime_version or accelerator.generation.runtime
    if queued:
        cmd = [
            GCLOUD,
            "compute",
            "tpus",
            "queued-resources",
            "create",
            target.name,
            f"--node-id={target.name}",
            *target.flags(),
            f"--accelerator-type={accelerator.type}",
            f"--runtime-version={runtime}",
        ]
    else:
        cmd = [
            GCLOUD,
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            target.name,
            *target.flags(),
            f"--accelerator-type={accelerator.type}",
            f"--version={runtime}",
        ]
    cmd += ["--spot"] * spot + ["--preemptible"] * preemptible + list(extra)
    return [cmd]


def ssh_command(target: Target, remote: str | None, worker: str = "all") -> list[str]:
    if worker != "all" and not str(worker).isdigit():
        raise LaunchError(f"--worker {worker!r}: a worker index (0, 1, ...) or 'all'")
    if remote is None and worker == "all":
        raise LaunchError("an interactive ssh goes to one worker (--worker=0); give -- COMMAND for --worker=all")
    cmd = [GCLOUD, "compute", "tpus", "tpu-vm", "ssh", target.name, *target.flags(), f"--worker={worker}"]
    return cmd + ([f"--command={remote}"] if remote is not None else [])


def scp_command(target: Target, local: str, remote: str, worker: str = "all") -> list[str]:
    return [
        GCLOUD,
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        local,
        f"{target.name}:{remote}",
        *target.flags(),
        f"--worker={worker}",
    ]


ARCHIVE = "diffjax-src.tar.gz"


def setup_remote_script(
    remote_dir: str, *, python: str = "python3.11", repo_url: str | None = None, ref: str = "HEAD", extras: str = "tpu"
) -> str:
    """The shell script every worker runs: the source in place, a venv, pip install -e .[tpu]."""
    q = shlex.quote
    steps = [  # diffjax needs Python >= 3.11; the TPU images are Ubuntu 22.04 (Python 3.10).
        f"if ! command -v {q(python)} >/dev/null; then sudo apt-get update -q && "
        f"sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q {q(python)} {q(python + '-venv')}; fi"
    ]
    if repo_url:
        git = f"git -C {q(remote_dir)}"
        steps.append(
            f"if [ -d {q(remote_dir + '/.git')} ]; then {git} fetch -q origin; "
            f"else git clone -q {q(repo_url)} {q(remote_dir)}; fi"
        )
        # A branch is taken from origin (fresh after the fetch); HEAD is origin's default branch.
        steps.append(
            f"{{ {git} checkout -q --detach {q('origin/' + ref)} 2>/dev/null || {git} checkout -q --detach {q(ref)}; }}"
        )
    else:
        steps.append(f"mkdir -p {q(remote_dir)} && tar -xzf {ARCHIVE} -C {q(remote_dir)} && rm -f {ARCHIVE}")
    steps += [
        f"cd {q(remote_dir)}",
        f"{{ [ -x .venv/bin/python ] || {q(python)} -m venv .venv; }}",
        ".venv/bin/pip install -q --upgrade pip",
        # gcsfs: orbax and TFDS reach gs:// through etils.epath, which needs it (no TensorFlow).
        f".venv/bin/pip install -q -e {q('.[' + extras + ']')} gcsfs",
        ".venv/bin/python -c 'import diffjax, jax; print(\"diffjax ok, jax\", jax.__version__)'",
    ]
    return " && ".join(steps)


def setup_commands(
    target: Target,
    *,
    remote_dir: str = "diffjax",
    repo_url: str | None = None,
    ref: str = "HEAD",
    python: str = "python3.11",
    local_archive: str | None = None,
    extras: str = "tpu",
) -> list[list[str]]:
    """Without repo_url: `git archive REF` here, scp to every worker, unpack; else git clone there."""
    commands = []
    if not repo_url:
        local_archive = local_archive or os.path.join("/tmp", ARCHIVE)
        commands.append(["git", "archive", "--format=tar.gz", f"--output={local_archive}", ref])
        commands.append(scp_command(target, local_archive, ARCHIVE))
    script = setup_remote_script(remote_dir, python=python, repo_url=repo_url, ref=ref, extras=extras)
    commands.append(ssh_command(target, script))
    return commands


LOG_DIR = "diffjax-logs"


def train_argv(config: str, workdir: str, overrides: list[str] = ()) -> list[str]:
    """The one command every worker runs. --tpu: jax.distributed.initialize() finds the pod."""
    return [".venv/bin/diffjax", "train", f"--config={config}", f"--workdir={workdir}", "--tpu", *overrides]


def run_remote_script(
    config: str,
    workdir: str,
    tfds_data_dir: str | None,
    overrides: list[str] = (),
    *,
    remote_dir: str = "diffjax",
    foreground: bool = False,
    no_progress: bool = True,
) -> str:
    q = shlex.quote
    argv = train_argv(config, workdir, list(overrides) + (["--no_progress"] if no_progress else []))
    env = ["env"] + ([f"TFDS_DATA_DIR={tfds_data_dir}"] if tfds_data_dir else [])
    command = shlex.join(env + argv)
    log = f"$HOME/{LOG_DIR}/train.log"
    prefix = f"mkdir -p $HOME/{LOG_DIR} && cd {q(remote_dir)} && "
    if foreground:
        return f"set -o pipefail; {prefix}{command} 2>&1 | tee {log}"
    # Detached: survives the ssh session; the pid file is what `stop` signals.
    # Braces: `&` detaches the training command alone, so $! is its pid (nohup and env exec it).
    return (
        f"{prefix}{{ nohup {command} > {log} 2>&1 < /dev/null & "
        f'echo $! > $HOME/{LOG_DIR}/train.pid; echo "started on $(hostname): pid $!, log {log}"; }}'
    )


def check_workdir(workdir: str, accelerator: Accelerator | None, allow_local: bool) -> None:
    if workdir.startswith("gs://"):
        if not re.fullmatch(r"gs://[a-z0-9][-_.a-z0-9]{1,220}(/.*)?", workdir):
            raise LaunchError(f"--workdir {workdir!r} is not a gs://BUCKET/PATH")
        return
    if not allow_local:
        raise LaunchError(
            f"--workdir {workdir!r}: use a gs://BUCKET/PATH (every worker writes its part of "
            "each checkpoint there, and it outlives the VM); --allow-local-workdir for a "
            "single-host TPU"
        )
    if accelerator is not None and accelerator.multi_host:
        raise LaunchError(
            f"--workdir {workdir!r}: a multi-host {accelerator.type} ({accelerator.hosts} hosts) "
            "needs storage every worker sees: gs://BUCKET/PATH"
        )


def run_commands(
    target: Target,
    config: str,
    workdir: str,
    *,
    tfds_data_dir: str | None = None,
    overrides: list[str] = (),
    remote_dir: str = "diffjax",
    foreground: bool = False,
    accelerator: Accelerator | None = None,
    allow_local_workdir: bool = False,
) -> list[list[str]]:
    check_workdir(workdir, accelerator, allow_local_workdir)
    if tfds_data_dir and not tfds_data_dir.startswith("gs://"):
        raise LaunchError(f"--tfds-data-dir {tfds_data_dir!r}: use gs://BUCKET/PATH (read by every worker)")
    bad = [o for o in overrides if not o.startswith("--")]
    if bad:
        raise LaunchError(f"extra diffjax train arguments must be flags (--config.a.b=v, --keep=N), got {bad}")
    script = run_remote_script(config, workdir, tfds_data_dir, overrides, remote_dir=remote_dir, foreground=foreground)
    return [ssh_command(target, script)]


def logs_commands(target: Target, worker: str = "0", follow: bool = False, lines: int = 100) -> list[list[str]]:
    tail = f"tail -n {int(lines)}" + (" -F" if follow else "") + f" $HOME/{LOG_DIR}/train.log"
    return [ssh_command(target, tail, worker=worker)]


def stop_commands(target: Target) -> list[list[str]]:
    script = (
        f"if [ -f $HOME/{LOG_DIR}/train.pid ]; then kill -TERM $(cat $HOME/{LOG_DIR}/train.pid) "
        f'&& echo "SIGTERM sent on $(hostname)"; rm -f $HOME/{LOG_DIR}/train.pid; fi'
    )
    return [ssh_command(target, script)]


def delete_commands(target: Target, queued: bool = False) -> list[list[str]]:
    if queued:  # --force deletes the TPU VM the queued resource made, too
        return [
            [GCLOUD, "compute", "tpus", "queued-resources", "delete", target.name, *target.flags(), "--force", "--quiet"]
        ]
    return [[GCLOUD, "compute", "tpus", "tpu-vm", "delete", target.name, *target.flags(), "--quiet"]]


# ---------------------------------------------------------------------------------------------
# Runner and command line.


def execute(commands: list[list[str]], dry_run: bool, out=None) -> int:
    """Print each command (shell-quoted, pasteable); unless dry_run, run it and stop at a failure."""
    out = sys.stdout if out is None else out
    for cmd in commands:
        print(("" if dry_run else "+ ") + shlex.join(cmd), file=out, flush=True)
        if dry_run:
            continue
        try:
            code = subprocess.run(cmd).returncode
        except FileNotFoundError:
            print(f"launch.tpu: {cmd[0]!r} not found: install the Google Cloud CLI (gcloud)", file=sys.stderr)
            return 127
        if code != 0:
            return code
    return 0


def build_parser() -> argparse.ArgumentParser:
    # Accepted before or after the command. SUPPRESS: a subcommand's unset flag must not
    # overwrite the value given before the command (argparse copies subparser defaults).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default=argparse.SUPPRESS, help=f"TPU VM name (or ${NAME_ENV})")
    common.add_argument("--zone", default=argparse.SUPPRESS, help=f"zone, e.g. us-central2-b (or ${' / $'.join(ZONE_ENV)})")
    common.add_argument("--project", default=argparse.SUPPRESS, help="GCP project (default: gcloud's)")
    common.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS, help="print the commands, run nothing")

    parser = argparse.ArgumentParser(
        prog="python -m launch.tpu",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("create", parents=[common], help="create a TPU VM or queued resource")
    p.add_argument("--accelerator-type", help="e.g. v4-8, v4-32, v5litepod-32 (v5e-32), v5p-8, v6e-8")
    p.add_argument(
        "--runtime-version",
        help="default per generation (tpu-ubuntu2204-base for v2-v4, v2-alpha-tpuv5-lite, v2-alpha-tpuv5, v2-alpha-tpuv6e)",
    )
    p.add_argument("--spot", action="store_true", help="Spot VM (preemptible, cheaper)")
    p.add_argument("--preemptible", action="store_true", help="legacy preemptible TPU")
    p.add_argument("--queued", action="store_true", help="queued resource: waits until capacity is there")

    p = sub.add_parser("setup", parents=[common], help="copy / clone the repo and pip install it on all workers")
    p.add_argument("--repo-url", help="git clone this on the workers instead of copying a `git archive`")
    p.add_argument("--ref", default="HEAD", help="git commit / branch to archive or check out")
    p.add_argument("--remote-dir", default="diffjax", help="directory under $HOME on the workers")
    p.add_argument("--python", default="python3.11", help="interpreter for the workers' venv (>= 3.11)")
    p.add_argument("--archive", help="local path of the source archive (default /tmp/diffjax-src.tar.gz)")

    p = sub.add_parser(
        "run",
        parents=[common],
        help="diffjax train --tpu on every worker",
        description="Extra arguments after -- go to diffjax train (e.g. --config.training.batch_size=256).",
    )
    p.add_argument("--config", required=True, help="config file, relative to the repo, e.g. configs/ddpm_cifar10.py")
    p.add_argument("--workdir", required=True, help="gs://BUCKET/PATH")
    p.add_argument("--tfds-data-dir", help="gs:// TFDS data directory (sets TFDS_DATA_DIR on every worker)")
    p.add_argument("--accelerator-type", help="optional: checks that a multi-host slice gets a gs:// workdir")
    p.add_argument("--remote-dir", default="diffjax")
    p.add_argument("--foreground", action="store_true", help="stream the output; stops when ssh does")
    p.add_argument("--allow-local-workdir", action="store_true", help="single-host only: a path on the VM")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="-- then diffjax train flags")

    p = sub.add_parser("logs", parents=[common], help="training log of one worker")
    p.add_argument("--worker", default="0", help="worker index, or 'all'")
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--lines", type=int, default=100)

    sub.add_parser("stop", parents=[common], help="SIGTERM the training on every worker (checkpoints first)")

    p = sub.add_parser("ssh", parents=[common], help="ssh to a worker (or run -- COMMAND on --worker=all)")
    p.add_argument("--worker", default="0")
    p.add_argument("remote", nargs=argparse.REMAINDER, help="-- then a command to run")

    p = sub.add_parser("delete", parents=[common], help="delete the TPU VM (or --queued resource)")
    p.add_argument("--queued", action="store_true")
    return parser


def _rest(args: list[str]) -> list[str]:
    return args[1:] if args and args[0] == "--" else list(args)


def plan(args: argparse.Namespace, environ: dict[str, str] | None = None) -> list[list[str]]:
    """Validated commands for parsed arguments (LaunchError on bad input)."""
    target = resolve_target(
        getattr(args, "name", None), getattr(args, "zone", None), getattr(args, "project", None), environ
    )
    if args.command == "create":
        return create_commands(
            target,
            parse_accelerator(args.accelerator_type),
            runtime_version=args.runtime_version,
            spot=args.spot,
            preemptible=args.preemptible,
            queued=args.queued,
        )
    if args.command == "setup":
        return setup_commands(
            target,
            remote_dir=args.remote_dir,
            repo_url=args.repo_url,
            ref=args.ref,
            python=args.python,
            local_archive=args.archive,
        )
    if args.command == "run":
        accelerator = parse_accelerator(args.accelerator_type) if args.accelerator_type else None
        return run_commands(
            target,
            args.config,
            args.workdir,
            tfds_data_dir=args.tfds_data_dir,
            overrides=_rest(args.overrides),
            remote_dir=args.remote_dir,
            foreground=args.foreground,
            accelerator=accelerator,
            allow_local_workdir=args.allow_local_workdir,
        )
    if args.command == "logs":
        return logs_commands(target, worker=args.worker, follow=args.follow, lines=args.lines)
    if args.command == "stop":
        return stop_commands(target)
    if args.command == "ssh":
        remote = _rest(args.remote)
        return [ssh_command(target, shlex.join(remote) if remote else None, worker=args.worker)]
    if args.command == "delete":
        return delete_commands(target, queued=args.queued)
    raise LaunchError(f"unknown command {args.command!r}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        commands = plan(args)
    except LaunchError as err:
        print(f"launch.tpu: error: {err}", file=sys.stderr)
        return 2
    return execute(commands, getattr(args, "dry_run", False))


if __name__ == "__main__":
    sys.exit(main())
