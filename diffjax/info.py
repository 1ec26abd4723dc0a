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

from diffjax import commandline
from diffjax.configuration import load_config
from diffjax.flops import step_flops

__all__ = ["load_config", "input_shape", "training_flops", "main"]

DESCRIPTION = """Print the network of a config, its parameter count (abstract, no weights allocated) and the
training FLOPs per example (XLA cost analysis of forward + backward of an eps-MSE loss)."""


def input_shape(config, batch: int = 1) -> tuple[int, ...]:
    if config.model.name == "mlp":
        return (batch, int(config.model.data_dim))
    return (batch, int(config.data.image_size), int(config.data.image_size), int(config.data.num_channels))


def training_flops(model_config, shape: Sequence[int]) -> float:
    """FLOPs of one forward + backward pass of an eps-MSE loss at input `shape` (abstract)."""
    from diffjax import models

    # flax types split's states as `State, *tuple[State, ...]`, whatever the number of filters
    graphdef, params, rest = nnx.split(models.abstract_model(model_config), nnx.Param, ...)  # type: ignore[misc]

    def loss(params, rest, x, noise_cond, eps, key):
        net = nnx.merge(graphdef, params, rest)
        out = net(x, noise_cond, train=True, rngs=nnx.Rngs(dropout=key))
        return jnp.mean(jnp.square(out - eps) if out.shape == eps.shape else jnp.square(out))  # classifiers: logits

    sds = lambda s, d=jnp.float32: jax.ShapeDtypeStruct(tuple(s), d)  # noqa: E731
    key = jax.eval_shape(lambda: jax.random.key(0))
    # Lowered for the CPU whatever the default backend: GPU plugins (PJRT C API) have no cost
    # analysis before compilation, and after it cuDNN convolutions are custom calls it does not count.
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        lowered = jax.jit(jax.grad(loss)).lower(params, rest, sds(shape), sds(shape[:1]), sds(shape), key)
    flops = step_flops(lowered)
    if flops is None:  # older jax: only the compiled executable has a cost model
        flops = step_flops(lowered.compile())
        if flops is None:
            raise RuntimeError("jax gives no cost analysis of the training step on this backend")
    return flops


def main(argv: list[str]) -> int:
    parser = commandline.Parser("diffjax info", DESCRIPTION, config_overrides=True)
    parser.add_argument("--config", required=True, help="a config file, e.g. configs/ve/cifar10_ncsnpp.py")
    parser.add_argument("--batch", type=commandline.positive_int, default=1, help="batch of the FLOP count")
    args = parser.parse(argv)
    config = parser.load_config(args.config, args.overrides)
    path, batch = args.config, args.batch
    from diffjax import models

    shape = input_shape(config, batch)
    try:
        n_params = models.abstract_param_count(config.model, shape)
    except ValueError as e:
        commandline.usage_error(parser.prog, str(e))
    flops = training_flops(config.model, shape) / batch
    print(f"config        {path}")
    print(f"network       {config.model.name}  (dtype {config.model.get('dtype', 'float32')}, input {shape[1:]})")
    print(f"parameters    {n_params:,}")
    print(f"train FLOPs   {flops / 1e9:,.2f} GFLOP per example (forward + backward, XLA cost analysis)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
