"""`diffjax info --config configs/X.py [--config.model.nf=32 ...]`: network, size and cost.

Prints the config's network name, its parameter count (from nnx.eval_shape: no weights are
allocated) and the training FLOPs per example: XLA's cost analysis of forward + backward of an
eps-MSE loss, lowered with jax.ShapeDtypeStruct inputs only.

The config loader is diffjax.configuration.load_config (re-exported here for older callers).
"""

from __future__ import annotations

import sys
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from diffjax.configuration import load_config

__all__ = ["load_config", "input_shape", "training_flops", "main"]

USAGE = """usage: diffjax info --config configs/X.py [--config.a.b=value ...] [--batch N]

Print the network of a config, its parameter count (abstract, no weights allocated) and the
training FLOPs per example (XLA cost analysis of forward + backward of an eps-MSE loss)."""


def _split_args(argv: Sequence[str]) -> tuple[str | None, list[str], int]:
    path, overrides, batch, it = None, [], 1, iter(argv)
    for arg in it:
        if arg == "--config":
            path = next(it, None)
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--batch":
            batch = int(next(it, "1"))
        elif arg.startswith("--batch="):
            batch = int(arg.split("=", 1)[1])
        elif arg.startswith("--config."):
            overrides.append(arg)
        else:
            raise ValueError(f"unexpected argument {arg!r}")
    return path, overrides, batch


def input_shape(config, batch: int = 1) -> tuple[int, ...]:
    if config.model.name == "mlp":
        return (batch, int(config.model.data_dim))
    return (batch, int(config.data.image_size), int(config.data.image_size), int(config.data.num_channels))


def training_flops(model_config, shape: Sequence[int]) -> float:
    """FLOPs of one forward + backward pass of an eps-MSE loss at input `shape` (abstract)."""
    from diffjax import models

    graphdef, params, rest = nnx.split(models.abstract_model(model_config), nnx.Param, ...)

    def loss(params, rest, x, noise_cond, eps, key):
        net = nnx.merge(graphdef, params, rest)
        out = net(x, noise_cond, train=True, rngs=nnx.Rngs(dropout=key))
        return jnp.mean(jnp.square(out - eps))

    sds = lambda s, d=jnp.float32: jax.ShapeDtypeStruct(tuple(s), d)  # noqa: E731
    key = jax.eval_shape(lambda: jax.random.key(0))
    # Lowered for the CPU whatever the default backend: GPU plugins (PJRT C API) have no cost
    # analysis before compilation, and after it cuDNN convolutions are custom calls it does not count.
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        lowered = jax.jit(jax.grad(loss)).lower(params, rest, sds(shape), sds(shape[:1]), sds(shape), key)
    cost = lowered.cost_analysis()
    if not cost or "flops" not in cost:  # older jax: only the compiled executable has a cost model
        cost = lowered.compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    try:
        path, overrides, batch = _split_args(argv)
        if path is None:
            raise ValueError("--config is required")
        config = load_config(path, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"diffjax info: {e}\n\n{USAGE}", file=sys.stderr)
        return 2
    from diffjax import models

    shape = input_shape(config, batch)
    try:
        n_params = models.abstract_param_count(config.model, shape)
    except ValueError as e:
        print(f"diffjax info: {e}", file=sys.stderr)
        return 2
    flops = training_flops(config.model, shape) / batch
    print(f"config        {path}")
    print(f"network       {config.model.name}  (dtype {config.model.get('dtype', 'float32')}, input {shape[1:]})")
    print(f"parameters    {n_params:,}")
    print(f"train FLOPs   {flops / 1e9:,.2f} GFLOP per example (forward + backward, XLA cost analysis)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
