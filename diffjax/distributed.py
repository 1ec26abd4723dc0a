"""Multi-host start-up shared by every command that runs a network (train, sample, eval, serve).

On Cloud TPU `--tpu` calls `jax.distributed.initialize()` with no arguments (the TPU runtime
knows the slice); elsewhere `--coordinator_address HOST:PORT --num_processes N --process_id I`
(or DIFFJAX_COORDINATOR_ADDRESS / DIFFJAX_NUM_PROCESSES / DIFFJAX_PROCESS_ID, as
launch/local.py and launch/gpu.py set them). CPU processes use gloo collectives. Without any of
them a command runs as one process.
"""

from __future__ import annotations

import argparse
import os

from diffjax import commandline


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator_address", default=os.environ.get("DIFFJAX_COORDINATOR_ADDRESS"))
    parser.add_argument(
        "--num_processes", type=commandline.positive_int, default=_env_int(parser.prog, "DIFFJAX_NUM_PROCESSES")
    )
    parser.add_argument(
        "--process_id", type=commandline.non_negative_int, default=_env_int(parser.prog, "DIFFJAX_PROCESS_ID")
    )
    parser.add_argument(
        "--tpu", action="store_true", help="every worker of a TPU slice: jax.distributed.initialize() with no arguments"
    )


def check_flags(parser: commandline.Parser, args: argparse.Namespace) -> None:
    if args.coordinator_address and (args.num_processes is None or args.process_id is None):
        parser.error("--coordinator_address needs --num_processes and --process_id")


def _env_int(prog: str, name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    if not value.isdigit():
        commandline.usage_error(prog, f"${name} must be a non-negative integer, got {value!r}")
    return int(value)


def initialize(args: argparse.Namespace) -> None:
    """jax.distributed.initialize as the flags say (nothing for a single process)."""
    import jax

    if args.tpu:
        jax.distributed.initialize()
    elif args.coordinator_address:
        platforms = jax.config.jax_platforms  # type: ignore[attr-defined]  # jax.Config's options are dynamic attributes
        if platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator_address, num_processes=args.num_processes, process_id=args.process_id)


def parse(parser: commandline.Parser, argv) -> argparse.Namespace:
    """parser.parse(argv) with the multi-host flags added, checked and acted on."""
    add_flags(parser)
    args = parser.parse(argv)
    check_flags(parser, args)
    initialize(args)
    return args


def refuse_multihost(prog: str, args: argparse.Namespace) -> None:
    """One line and exit 2 on every process of a multi-process run (a command that runs on one host)."""
    if not (args.tpu or args.coordinator_address):
        return
    import jax

    if jax.process_count() > 1:
        commandline.usage_error(
            prog,
            f"runs on one host, but this is process {jax.process_index()} of {jax.process_count()}: start it on one "
            "machine (a single-host TPU slice such as v5litepod-8, or one GPU node) without --tpu / --coordinator_address",
        )
