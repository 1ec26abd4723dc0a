"""The one way every `diffjax` command parses its flags.

`Parser` is argparse with diffjax's conventions: a usage mistake (an unknown flag, a bad value, a
missing config file, a bad `--config.a.b=value` override) is one line on stderr naming it and
exit status 2, never a traceback. Commands that take a config split its `--config.a.b=value`
overrides off (`Parser(..., config_overrides=True)` -> `args.overrides`); ml_collections
type-checks them against the locked config in `diffjax.configuration.load_config`.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Sequence


def usage_error(prog: str, message: str) -> NoReturn:
    """A command-line mistake: `prog: message` on stderr, exit status 2."""
    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line + exit 2.

    config_overrides=True: `--config.a.b=value` arguments are collected in `args.overrides`
    (in order) instead of being parsed as flags."""

    def __init__(self, prog: str, description: str | None = None, *, config_overrides: bool = False, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(prog=prog, description=description, **kwargs)
        self.config_overrides = config_overrides

    def error(self, message: str) -> NoReturn:
        usage_error(self.prog, f"{message} (see '{self.prog} --help')")

    def parse(self, argv: Sequence[str]) -> argparse.Namespace:
        argv = list(argv)
        overrides = [a for a in argv if a.startswith("--config.")]
        if overrides and not self.config_overrides:
            self.error(f"{self.prog} takes no --config.a.b=value overrides, got {overrides[0]!r}")
        for item in overrides:
            if "=" not in item:
                self.error(f"a config override looks like --config.a.b=value, got {item!r}")
        args = self.parse_args([a for a in argv if not a.startswith("--config.")])
        if self.config_overrides:
            args.overrides = overrides
        return args

    def load_config(self, path: str, overrides: Sequence[str] = ()):
        """configuration.load_config, a missing file or a bad override being a usage error."""
        from diffjax import configuration

        try:
            return configuration.load_config(path, overrides)
        except (OSError, ValueError) as err:
            usage_error(self.prog, str(err))


def add_ema_flag(parser: argparse.ArgumentParser) -> None:
    """`--ema RATE` on a command that reads a workdir's weights: args.ema for diffjax.workdir.Workdir(ema=...)."""
    parser.add_argument(
        "--ema",
        type=float,
        default=None,
        metavar="RATE",
        help="which EMA of the weights to use: training.ema_rate (the default) or one of training.ema_rates",
    )


def _number(kind, test, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = f"{what} {kind.__name__}"
    return parse


positive_int = _number(int, lambda v: v > 0, "positive")
non_negative_int = _number(int, lambda v: v >= 0, ">= 0")
positive_float = _number(float, lambda v: v > 0, "positive")
non_negative_float = _number(float, lambda v: v >= 0, ">= 0")
port = _number(int, lambda v: 0 <= v <= 65535, "in [0, 65535]")


def name_number(text: str) -> tuple[str, float]:
    """NAME=NUMBER (e.g. a sampler option `eta=0.5`)."""
    name, sep, value = text.partition("=")
    try:
        if sep and name:
            return name, float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"must look like NAME=NUMBER, got {text!r}")
