"""Config files: `load_config(path, overrides)`, the one loader every CLI command uses.

A config file is a Python module with `get_config()` returning an ml_collections.ConfigDict
(configs/*.py, one per reproduction). Overrides are `--config.a.b=value` strings, parsed by
ml_collections.config_flags on a locked config: types are checked and unknown keys are errors
naming the key, exactly as with `--config.a.b=value` on any absl program.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags


def _add_config_root(path: str) -> None:
    """Put the directory that holds the `configs` package on sys.path (configs import each other)."""
    d = os.path.dirname(os.path.abspath(path))
    while os.path.exists(os.path.join(d, "__init__.py")):
        d = os.path.dirname(d)
    if d not in sys.path:
        sys.path.insert(0, d)


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load `path`'s get_config() and apply `--config.a.b=value` overrides (type-checked).

    Raises FileNotFoundError for a missing file and ValueError (with absl's message) for an
    unknown key, a wrong type or an argument that is not a `--config.` override."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file not found: {path}")
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise ValueError(f"overrides must look like --config.a.b=value, got {bad}")
    _add_config_root(path)
    argv = ["diffjax", f"--config={path}", *overrides]
    fv = flags.FlagValues()
    # sys_argv: config_flags defines the override flags from this list (default: sys.argv).
    config_flags.DEFINE_config_file("config", default=path, flag_values=fv, lock_config=True, sys_argv=argv)
    try:
        fv(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"bad config override in {list(overrides)}: {e}") from e
    validate(fv.config)
    return fv.config


# score_sde's keys whose only value diffjax implements: a config may carry them (score_sde users'
# configs do), but another value is an error naming the key, never silently ignored. The model
# section's are diffjax.models.FIXED_VALUES, checked with the rest of config.model.
FIXED_VALUES = {
    ("sampling", "noise_removal"): (True,),  # every sampler ends with the denoising step to t = 0
    ("sampling", "probability_flow"): (False,),  # the probability-flow ODE is the sampler 'ode'
}


def _validate_ema_rates(training) -> None:
    """training.ema_rates: each in (0, 1), no duplicates, none equal to training.ema_rate."""
    rates = training.get("ema_rates", ()) or ()
    if not isinstance(rates, (tuple, list)):
        raise ValueError(f"training.ema_rates={rates!r} must be a tuple of rates, e.g. (0.999,)")
    seen: set[float] = set()
    for rate in rates:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < float(rate) < 1.0:
            raise ValueError(f"training.ema_rates: {rate!r} must be a number in (0, 1)")
        if float(rate) in seen:
            raise ValueError(f"training.ema_rates: {rate!r} is listed twice")
        if "ema_rate" in training and float(rate) == float(training.ema_rate):
            raise ValueError(f"training.ema_rates: {rate!r} is training.ema_rate already (kept in state['ema'])")
        seen.add(float(rate))


def validate(config: ml_collections.ConfigDict) -> None:
    """Refuse values diffjax cannot run: an EMA rate outside [0, 1) (training.ema_rates: (0, 1),
    distinct, none equal to ema_rate), grad_accum_steps < 1, score_sde
    keys with a value diffjax does not implement (FIXED_VALUES) and model keys the network does not
    read (diffjax.models.network_kwargs)."""
    training = config.get("training", {})
    if "ema_rate" in training and not 0.0 <= float(training.ema_rate) < 1.0:
        raise ValueError(f"training.ema_rate={training.ema_rate} must be in [0, 1) (0: the EMA is the raw params)")
    _validate_ema_rates(training)
    if int(training.get("grad_accum_steps", 1)) < 1:
        raise ValueError(f"training.grad_accum_steps={training.grad_accum_steps} must be >= 1")
    for (section, key), allowed in FIXED_VALUES.items():
        if section in config and key in config[section] and config[section][key] not in allowed:
            hint = " (use the sampler 'ode' for the probability-flow ODE)" if key == "probability_flow" else ""
            raise ValueError(
                f"config.{section}.{key}={config[section][key]!r} is not implemented; diffjax "
                f"supports {', '.join(map(repr, allowed))}{hint}"
            )
    if "model" in config:
        from diffjax import models

        models.network_kwargs(config.model)
