"""`diffjax import diffusers SRC --workdir W [--config BASE.py] [--config.a.b=value ...]`.

Writes a diffjax workdir from a diffusers UNet2DModel directory (see diffjax.interop.diffusers);
every mistake (a missing or truncated file, a tensor of the wrong shape, an unsupported block)
is one line on stderr and exit 2, with no workdir left behind.
"""

from __future__ import annotations

from diffjax import commandline

USAGE_EPILOG = """examples:
  diffjax import diffusers ~/ddpm-cifar10-32 --workdir workdir/ddpm_cifar10_released --config configs/ddpm_cifar10.py
  diffjax sample --workdir workdir/ddpm_cifar10_released --sampler ddim --steps 100
  diffjax eval --workdir workdir/ddpm_cifar10_released"""


def main(argv: list[str]) -> int:
    parser = commandline.Parser("diffjax import", __doc__.split("\n\n")[0], epilog=USAGE_EPILOG, config_overrides=True)
    parser.add_argument("format", choices=("diffusers",), help="the source format")
    parser.add_argument("src", help="a diffusers model directory (config.json + weights) or pipeline directory")
    parser.add_argument("--workdir", required=True, help="the new workdir (must not exist or be empty)")
    parser.add_argument(
        "--config",
        default=None,
        help="base config for data, training and the evaluation protocol (default configs/default.py); "
        "the model, process and sampler come from SRC",
    )
    args = parser.parse(argv)
    if args.overrides and args.config is None:
        parser.error("--config.a.b=value overrides need --config BASE.py")
    base = parser.load_config(args.config, args.overrides) if args.config else None
    from diffjax.interop import diffusers

    try:
        summary = diffusers.import_diffusers(args.src, args.workdir, base)
    except (OSError, ValueError) as err:  # missing files, unsupported model, bad weights
        commandline.usage_error(parser.prog, str(err))
    print(
        f"imported {summary['family']} ({summary['params']:,} parameters) -> {summary['workdir']}\n"
        f"  process {summary['process']} (scheduler: {summary['scheduler']}), default sampler "
        f"{summary['sampler']} {summary['steps']} steps\n"
        f"  next: diffjax sample --workdir {args.workdir}  |  diffjax serve --workdir {args.workdir}  |  "
        f"diffjax eval --workdir {args.workdir}"
    )
    return 0
