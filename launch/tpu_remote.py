"""What runs on the TPU workers: the ssh / scp argv lists and the shell scripts they carry
(setup, train, sample / eval, logs, stop). Pure functions; a multislice target gets one command
per node (NAME-0 .. NAME-(N-1)), each reaching every worker of its slice with --worker=all.

Multislice and MEGASCALE: on a queued resource with several slices the TPU runtime publishes
MEGASCALE_COORDINATOR_ADDRESS / MEGASCALE_NUM_SLICES / MEGASCALE_SLICE_ID in every worker's
`tpu-env` metadata, and `jax.distributed.initialize()` (what `--tpu` calls) reads them there when
they are not in the environment. So the scripts here set nothing of the kind: the only variable
they export is TFDS_DATA_DIR, and an exported MEGASCALE_* (or JAX coordinator variable) would
override the runtime's values.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence

from launch.tpu_spec import GCLOUD, Accelerator, LaunchError, Target

ARCHIVE = "diffjax-src.tar.gz"
LOG_DIR = "diffjax-logs"
LOCK = "requirements.lock"
# The worker's index in its slice: $TPU_WORKER_ID where set (GKE sets it), else the TPU VM's
# metadata attribute agent-worker-number (what jax's Cloud TPU cluster detection reads).
WORKER_ID = (
    "w=${TPU_WORKER_ID:-$(curl -sf -H Metadata-Flavor:Google "
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || echo 0)}"
)


def _nodes(target: Target, node: str | None) -> list[str]:
    """node: None or 'all' (every node), or an index into target.nodes."""
    if node in (None, "all"):
        return target.nodes
    if not str(node).isdigit() or int(node) >= target.num_slices:
        raise LaunchError(f"--node {node!r}: a slice index 0..{target.num_slices - 1} or 'all'")
    return [target.nodes[int(node)]]


def ssh_command(target: Target, remote: str | None, worker: str = "all", node: str | None = None) -> list[str]:
    """`node`: a node name (default: the target's name; see Target.nodes for multislice)."""
    if worker != "all" and not str(worker).isdigit():
        raise LaunchError(f"--worker {worker!r}: a worker index (0, 1, ...) or 'all'")
    if remote is None and worker == "all":
        raise LaunchError("an interactive ssh goes to one worker (--worker=0); give -- COMMAND for --worker=all")
    cmd = [GCLOUD, "compute", "tpus", "tpu-vm", "ssh", node or target.name, *target.flags(), f"--worker={worker}"]
    cmd += ["--internal-ip"] * target.internal_ip
    return cmd + ([f"--command={remote}"] if remote is not None else [])


def scp_command(target: Target, local: str, remote: str, worker: str = "all", node: str | None = None) -> list[str]:
    cmd = [GCLOUD, "compute", "tpus", "tpu-vm", "scp", local, f"{node or target.name}:{remote}", *target.flags()]
    return cmd + [f"--worker={worker}"] + ["--internal-ip"] * target.internal_ip


def ssh_commands(target: Target, remote: str | None, worker: str = "all", node: str | None = None) -> list[list[str]]:
    """One ssh per node (node: an index, or None / 'all' for every node)."""
    nodes = _nodes(target, node)
    if remote is None and len(nodes) > 1:
        raise LaunchError("an interactive ssh goes to one slice (--node=0); give -- COMMAND for --node=all")
    return [ssh_command(target, remote, worker, node=n) for n in nodes]


# ---------------------------------------------------------------------------------------------
# Setup.


def setup_remote_script(
    remote_dir: str,
    *,
    python: str = "python3.11",
    repo_url: str | None = None,
    ref: str = "HEAD",
    extras: str = "tpu",
    lock: str | None = LOCK,
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
    # -c requirements.lock: every package the CPU install uses at the tested version, jax and
    # jaxlib included (gcsfs, for gs:// through etils.epath, is a base dependency now). libtpu,
    # which the jax[tpu] extra pulls, is not in the lock: it follows jax's own pin of it.
    constraint = f"-c {q(lock)} " if lock else ""
    steps += [
        f"cd {q(remote_dir)}",
        f"{{ [ -x .venv/bin/python ] || {q(python)} -m venv .venv; }}",
        ".venv/bin/pip install -q --upgrade pip",
        f".venv/bin/pip install -q {constraint}-e {q('.[' + extras + ']')}",
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
    lock: str | None = LOCK,
) -> list[list[str]]:
    """Without repo_url: `git archive REF` here, scp to every worker of every node, unpack; else
    git clone there. Then the same install script on every worker."""
    commands = []
    archive = local_archive or os.path.join("/tmp", ARCHIVE)
    if not repo_url:
        commands.append(["git", "archive", "--format=tar.gz", f"--output={archive}", ref])
    script = setup_remote_script(remote_dir, python=python, repo_url=repo_url, ref=ref, extras=extras, lock=lock)
    for node in target.nodes:
        if not repo_url:
            commands.append(scp_command(target, archive, ARCHIVE, node=node))
        commands.append(ssh_command(target, script, node=node))
    return commands


# ---------------------------------------------------------------------------------------------
# Train, sample, eval.


def train_argv(config: str, workdir: str, overrides: Sequence[str] = ()) -> list[str]:
    """The one command every worker runs. --tpu: jax.distributed.initialize() finds the pod."""
    return [".venv/bin/diffjax", "train", f"--config={config}", f"--workdir={workdir}", "--tpu", *overrides]


def _env(tfds_data_dir: str | None) -> list[str]:
    return ["env"] + ([f"TFDS_DATA_DIR={tfds_data_dir}"] if tfds_data_dir else [])


def run_remote_script(
    config: str,
    workdir: str,
    tfds_data_dir: str | None,
    overrides: Sequence[str] = (),
    *,
    remote_dir: str = "diffjax",
    foreground: bool = False,
    no_progress: bool = True,
) -> str:
    q = shlex.quote
    argv = train_argv(config, workdir, list(overrides) + (["--no_progress"] if no_progress else []))
    command = shlex.join(_env(tfds_data_dir) + argv)
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


def check_workdir(workdir: str, accelerator: Accelerator | None, allow_local: bool, num_slices: int = 1) -> None:
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
    if num_slices > 1:
        raise LaunchError(f"--workdir {workdir!r}: {num_slices} slices need storage every worker sees: gs://BUCKET/PATH")
    if accelerator is not None and accelerator.multi_host:
        raise LaunchError(
            f"--workdir {workdir!r}: a multi-host {accelerator.type} ({accelerator.hosts} hosts) "
            "needs storage every worker sees: gs://BUCKET/PATH"
        )


def _check_tfds(tfds_data_dir: str | None) -> None:
    if tfds_data_dir and not tfds_data_dir.startswith("gs://"):
        raise LaunchError(f"--tfds-data-dir {tfds_data_dir!r}: use gs://BUCKET/PATH (read by every worker)")


def run_commands(
    target: Target,
    config: str,
    workdir: str,
    *,
    tfds_data_dir: str | None = None,
    overrides: Sequence[str] = (),
    remote_dir: str = "diffjax",
    foreground: bool = False,
    accelerator: Accelerator | None = None,
    allow_local_workdir: bool = False,
) -> list[list[str]]:
    """One ssh per node; in the foreground the runner starts them together (launch.runner)."""
    check_workdir(workdir, accelerator, allow_local_workdir, target.num_slices)
    _check_tfds(tfds_data_dir)
    bad = [o for o in overrides if not o.startswith("--")]
    if bad:
        raise LaunchError(f"extra diffjax train arguments must be flags (--config.a.b=v, --keep=N), got {bad}")
    script = run_remote_script(config, workdir, tfds_data_dir, overrides, remote_dir=remote_dir, foreground=foreground)
    return ssh_commands(target, script)


JOBS = ("sample", "eval")


def job_remote_script(
    job: str,
    args: Sequence[str],
    tfds_data_dir: str | None = None,
    *,
    remote_dir: str = "diffjax",
    detach: bool = False,
    show: bool = True,
) -> str:
    """`diffjax sample|eval ARGS --tpu` on a worker. In the foreground worker 0 (of the first
    slice: show) streams its output and every other worker writes only its log; a failing
    worker prints its log's last lines. Detached: nohup, like a detached `run`."""
    q = shlex.quote
    command = shlex.join(_env(tfds_data_dir) + [".venv/bin/diffjax", job, *args, "--tpu"])
    log = f"$HOME/{LOG_DIR}/{job}.log"
    prefix = f"mkdir -p $HOME/{LOG_DIR} && cd {q(remote_dir)} && "
    if detach:
        return (
            f"{prefix}{{ nohup {command} > {log} 2>&1 < /dev/null & "
            f'echo "{job} started on $(hostname): pid $!, log {log}"; }}'
        )
    quiet = (
        f"{{ {command} > {log} 2>&1 < /dev/null || {{ c=$?; "
        f'echo "{job} failed ($c) on $(hostname), worker $w; the end of {log}:"; tail -n 20 {log}; exit $c; }}; }}'
    )
    if not show:
        return f"{prefix}{WORKER_ID}; {quiet}"
    show0 = f"{command} 2>&1 < /dev/null | tee {log}"
    return f'set -o pipefail; {prefix}{WORKER_ID}; if [ "$w" = 0 ]; then {show0}; else {quiet}; fi'


def job_commands(
    target: Target,
    job: str,
    args: Sequence[str],
    *,
    tfds_data_dir: str | None = None,
    remote_dir: str = "diffjax",
    detach: bool = False,
) -> list[list[str]]:
    """`diffjax sample` / `diffjax eval` on every worker of every node, like `run`."""
    if job not in JOBS:
        raise LaunchError(f"unknown job {job!r}; one of {', '.join(JOBS)}")
    _check_tfds(tfds_data_dir)
    if "--" in args:
        raise LaunchError(f"diffjax {job} arguments go after one `--`; a second `--` is not passed on")
    if not args:
        raise LaunchError(f"give the diffjax {job} arguments after --, e.g. -- --workdir gs://BUCKET/runs/RUN")
    return [
        ssh_command(
            target,
            job_remote_script(job, args, tfds_data_dir, remote_dir=remote_dir, detach=detach, show=i == 0),
            node=node,
        )
        for i, node in enumerate(target.nodes)
    ]


# ---------------------------------------------------------------------------------------------
# Logs and stop.


def logs_commands(
    target: Target, worker: str = "0", follow: bool = False, lines: int = 100, node: str | None = "0", job: str = "train"
) -> list[list[str]]:
    tail = f"tail -n {int(lines)}" + (" -F" if follow else "") + f" $HOME/{LOG_DIR}/{job}.log"
    return ssh_commands(target, tail, worker=worker, node=node)


def stop_commands(target: Target) -> list[list[str]]:
    script = (
        f"if [ -f $HOME/{LOG_DIR}/train.pid ]; then kill -TERM $(cat $HOME/{LOG_DIR}/train.pid) "
        f'&& echo "SIGTERM sent on $(hostname)"; rm -f $HOME/{LOG_DIR}/train.pid; fi'
    )
    return ssh_commands(target, script)
