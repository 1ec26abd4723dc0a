"""The `diffjax` command: one subcommand per module, each with its own `main(argv) -> int` parsing its
flags with diffjax.commandline.Parser (one line + exit 2 for every usage mistake)."""

from __future__ import annotations

import faulthandler
import importlib
import os
import signal
import sys
import traceback

from diffjax import commandline

# subcommand -> (module, one-line help). Modules are imported lazily so `diffjax --help` is instant.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("diffjax.demo", "sample the 8-Gaussians oracle and write a scatter PNG"),
    "info": ("diffjax.info", "print a config's network, parameter count and training FLOPs"),
    "data": ("diffjax.data_prepare", "prepare a TFDS dataset as ArrayRecord (the one step that downloads)"),
    "train": ("diffjax.train", "train a config into a workdir (sharded, checkpointed, resumable)"),
    "sample": ("diffjax.sample", "sample from a workdir's latest checkpoint -> PNG grid + .npz"),
    "eval": ("diffjax.evaluation.cli", "metrics of sample sets: FID / IS / KID / precision-recall, digits-FID"),
    "import": ("diffjax.interop.cli", "import released weights (diffusers UNet2DModel) as a workdir"),
    "serve": ("diffjax.serving.server", "serve a workdir's checkpoint over gRPC (continuous batching)"),
    "client": ("diffjax.serving.client", "call a sampling server: sample -> PNG grid, info, status, health"),
}


def _usage() -> str:
    rows = "\n".join(f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items())
    return f"usage: diffjax <command> [flags]\n\ncommands:\n{rows}\n\n'diffjax <command> --help' for flags."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        commandline.usage_error("diffjax", f"unknown command {name!r}; choose one of {', '.join(SUBCOMMANDS)}")
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID`: every thread's Python stack on stderr (a hung run)
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (OSError, ValueError, AttributeError):  # a stderr without a file descriptor (captured)
            pass
    from diffjax import storage

    storage.configure()  # $STORAGE_EMULATOR_HOST reaches every GCS client in the process
    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except BaseException as err:
        if _in_multiprocess_run():  # JAX's exit-time shutdown would wait for the other processes forever
            code = err.code if isinstance(err, SystemExit) and isinstance(err.code, int) else 1
            if not isinstance(err, SystemExit):
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise


def _in_multiprocess_run() -> bool:
    """Whether jax.distributed was initialised in this process (a failure in one process must end
    it at once: the others are blocked in a collective, so an orderly shutdown never completes)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import distributed  # the client handle; no public accessor

    return distributed.global_state.client is not None


if __name__ == "__main__":
    raise SystemExit(main())
