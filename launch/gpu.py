"""Multi-node GPU launcher: `python -m launch.gpu [flags] -- diffjax train --config ... --workdir ...`

Run it once per node (one process per node sees all of that node's GPUs; or one per GPU with
CUDA_VISIBLE_DEVICES set by the scheduler). It works out the JAX coordinator address, the
process count and this process's id, exports them as DIFFJAX_COORDINATOR_ADDRESS,
DIFFJAX_NUM_PROCESSES and DIFFJAX_PROCESS_ID (which `diffjax train` passes to
jax.distributed.initialize) and replaces itself with the command.

Where the values come from, first match wins:
  1. flags: --coordinator-address HOST:PORT --num-processes N --process-id I
  2. SLURM (under srun): SLURM_NTASKS, SLURM_PROCID, the first host of SLURM_JOB_NODELIST and
     a port derived from SLURM_JOB_ID (--port overrides it)
  3. Open MPI (under mpirun): OMPI_COMM_WORLD_SIZE / OMPI_COMM_WORLD_RANK, with --coordinator-address
  4. torchrun-style variables: MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys

from launch.local import resolve_command


class LaunchError(ValueError):
    pass


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-006,9],cpu1' -> 'gpu003'."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise LaunchError("empty SLURM_JOB_NODELIST")
    # The first comma at bracket depth 0 ends the first entry.
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end]
    match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", entry)
    if match is None:
        return entry
    prefix, ranges, suffix = match.groups()
    first = ranges.split(",")[0].split("-")[0]  # zero padding is kept: '003-006' -> '003'
    if "[" in suffix:
        suffix = first_host(suffix)  # e.g. rack[1-2]-node[01-04]
    return f"{prefix}{first}{suffix}"


def slurm_port(job_id: str | None, base: int = 20000, span: int = 20000) -> int:
    """A coordinator port per job, so two jobs sharing a first node do not collide."""
    return base + (int(job_id) % span if job_id and job_id.isdigit() else 0)


def resolve(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    port: int | None,
    environ: dict[str, str],
) -> dict[str, str]:
    """The DIFFJAX_* variables for this process (LaunchError when they cannot be found)."""
    source = "flags"
    if num_processes is None or process_id is None:
        if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
            source = "SLURM"
            num_processes = int(environ["SLURM_NTASKS"]) if num_processes is None else num_processes
            process_id = int(environ["SLURM_PROCID"]) if process_id is None else process_id
            if coordinator_address is None:
                nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", "")
                host = first_host(nodelist)
                coordinator_address = f"{host}:{port or slurm_port(environ.get('SLURM_JOB_ID'))}"
        elif "OMPI_COMM_WORLD_RANK" in environ:
            source = "Open MPI"
            num_processes = int(environ["OMPI_COMM_WORLD_SIZE"]) if num_processes is None else num_processes
            process_id = int(environ["OMPI_COMM_WORLD_RANK"]) if process_id is None else process_id
        elif "RANK" in environ and "WORLD_SIZE" in environ:
            source = "RANK/WORLD_SIZE"
            num_processes = int(environ["WORLD_SIZE"]) if num_processes is None else num_processes
            process_id = int(environ["RANK"]) if process_id is None else process_id
            if coordinator_address is None and environ.get("MASTER_ADDR"):
                coordinator_address = f"{environ['MASTER_ADDR']}:{port or environ.get('MASTER_PORT', '12355')}"
    if num_processes is None or process_id is None:
        raise LaunchError(
            "no process count / id: pass --num-processes and --process-id, or run under srun "
            "(SLURM_NTASKS, SLURM_PROCID), mpirun or torchrun-style RANK/WORLD_SIZE"
        )
    if coordinator_address is None:
        raise LaunchError(
            f"no coordinator address ({source} gave the process count): pass "
            "--coordinator-address HOST:PORT (the host of process 0)"
        )
    if not re.fullmatch(r"\[?[^\s\[\]]+\]?:\d{1,5}", coordinator_address):
        raise LaunchError(f"--coordinator-address {coordinator_address!r} is not HOST:PORT")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise LaunchError(f"process id {process_id} is not in [0, {num_processes})")
    return {
        "DIFFJAX_COORDINATOR_ADDRESS": coordinator_address,
        "DIFFJAX_NUM_PROCESSES": str(num_processes),
        "DIFFJAX_PROCESS_ID": str(process_id),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.gpu",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--coordinator-address", help="HOST:PORT of process 0")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--port", type=int, help="coordinator port when the host comes from SLURM / MASTER_ADDR")
    parser.add_argument("--dry-run", action="store_true", help="print the variables and the command, run nothing")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, e.g. diffjax train ...")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- diffjax train --config configs/X.py --workdir DIR")
    try:
        variables = resolve(args.coordinator_address, args.num_processes, args.process_id, args.port, os.environ)
    except LaunchError as err:
        print(f"launch.gpu: error: {err}", file=sys.stderr)
        return 2
    command = resolve_command(command)
    line = shlex.join([f"{k}={v}" for k, v in variables.items()] + command)
    print(f"launch.gpu: {line}", file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    os.environ.update(variables)
    try:
        os.execvp(command[0], command)
    except OSError as err:
        print(f"launch.gpu: cannot run {command[0]!r}: {err.strerror}", file=sys.stderr)
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
