"""`diffjax import diffusers SRC --workdir W [--config BASE.py] [--config.a.b=value ...]`.

Writes a diffjax workdir from a diffusers UNet2DModel directory (see diffjax.interop.diffusers);
every mistake (a missing or truncated file, a tensor of the wrong shape, an unsupported block)
is one line on stderr and exit 2, with no workdir left behind.
"""

from __future__ import annotations

import argparse
import sys

USAGE_EPILOG = """examples:
  diffjax import diffusers ~/ddpm-cifar10-32 --workdir workdir/ddpm_cifar10_released --config configs/ddpm_cifar10.py
  diffjax sample --workdir workdir/ddpm_cifar10_released --sampler ddim --steps 100
  diffjax eval --workdir workdir/ddpm_cifar10_released"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="diffjax import",
        description=__doc__.split("\n\n")[0],
        epilog=USAGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("format", choices=("diffusers",), help="the source format")
    parser.add_argument("src", help="a diffusers model directory (config.json + weights) or pipeline directory")
    parser.add_argument("--workdir", required=True, help="the new workdir (must not exist or be empty)")
    parser.add_argument(
        "--config",
        default=None,
        help="base config for data, training and the evaluation protocol (default configs/default.py); "
        "the model, process and sampler come from SRC",
    )
    overrides = [a for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    if overrides and args.config is None:
        parser.error("--config.a.b=value overrides need --config BASE.py")
    from diffjax import configuration
    from diffjax.interop import diffusers

    try:
        base = configuration.load_config(args.config, overrides) if args.config else None
        summary = diffusers.import_diffusers(args.src, args.workdir, base)
    except (OSError, ValueError) as err:  # missing files, unsupported model, bad weights, bad overrides
        print(f"diffjax import: {err}", file=sys.stderr)
        return 2
    print(
        f"imported {summary['family']} ({summary['params']:,} parameters) -> {summary['workdir']}\n"
        f"  process {summary['process']} (scheduler: {summary['scheduler']}), default sampler "
        f"{summary['sampler']} {summary['steps']} steps\n"
        f"  next: diffjax sample --workdir {args.workdir}  |  diffjax serve --workdir {args.workdir}  |  "
        f"diffjax eval --workdir {args.workdir}"
    )
    return 0
