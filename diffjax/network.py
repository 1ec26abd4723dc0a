"""The config's network as a Denoiser: what sampling, serving, evaluation, import and training share.

- `build_process(config)`: the config's noise process.
- `abstract_model(config)`, `data_shape(config)`, `inference_rest(config)`: the network's
  definition, its parameter shapes and its eval-mode non-parameter state, nothing allocated.
- `network_denoiser(graphdef, rest, process, config, weights)`: a `Denoiser` whose apply is
  `NetworkApply` (the network at the process's noise conditioning), wrapped in `EDMPrecond`
  (D(x; s) = c_skip x + c_out F(c_in x; c_noise), as EDM's `EDMPrecond`) for the edm process.
  With model.learn_sigma the network's channels are split into (prediction, v): a denoiser with
  `learned_variance` (diffjax.denoiser).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from diffjax import models, processes
from diffjax.denoiser import Denoiser
from diffjax.processes import EDM, Process, bcast

Array = jax.Array


def build_process(config) -> Process:
    params = {k: v for k, v in config.process.items() if k != "name"}
    process = processes.get(config.process.name, **params)
    if "prediction" in config.get("model", {}):  # e.g. 'flow' on a discrete chain, 'eps' on flow: one line
        process.require_prediction(config.model.prediction)
    return process


@dataclasses.dataclass(frozen=True)
class NetworkApply:
    """apply(params=(weights, rest, dropout_key, augment_labels), x, t, cond) for a Flax NNX network:
    the network's output at the process's noise conditioning of t.

    augment_labels: EDM's augmentation labels of the batch being denoised (training with
    data.augment_p > 0), or None (no augmentation: sampling, evaluation). learn_sigma: the output's
    last axis holds the prediction then the variance output v; the pair (prediction, v) is returned."""

    graphdef: Any
    process: Process
    train: bool = False
    learn_sigma: bool = False

    def __call__(self, params, x, t, cond):
        weights, rest, dropout_key, augment_labels = params
        model = nnx.merge(self.graphdef, nnx.State(weights), rest)
        kw = dict(train=self.train, rngs=nnx.Rngs(dropout=dropout_key) if self.train else None)
        if augment_labels is not None:
            kw["augment_labels"] = augment_labels
        out = model(x, self.process.noise_cond(t), cond, **kw)
        return tuple(jnp.split(out, 2, axis=-1)) if self.learn_sigma else out


@dataclasses.dataclass(frozen=True)
class EDMPrecond:
    """EDM's preconditioning around a network apply: D(x; s) = c_skip x + c_out F(c_in x; c_noise)."""

    inner: Any
    process: EDM

    def __call__(self, params, x, t, cond):
        c_skip, c_out, c_in = (bcast(c, x) for c in self.process.precondition(t))
        return c_skip * x + c_out * self.inner(params, c_in * x, t, cond)


def network_denoiser(
    graphdef,
    rest,
    process: Process,
    config,
    weights,
    *,
    train: bool = False,
    dropout_key: Array | None = None,
    augment_labels: Array | None = None,
) -> Denoiser:
    """The network with `weights` as a Denoiser of the config's prediction kind (EDM: x0), with a
    learned variance when model.learn_sigma."""
    learn_sigma = bool(config.model.get("learn_sigma", False))
    apply: Any = NetworkApply(graphdef, process, train, learn_sigma)
    prediction = config.model.prediction
    if isinstance(process, EDM):
        if learn_sigma:
            raise ValueError("model.learn_sigma (a learned reverse variance) is not supported with the 'edm' process")
        apply, prediction = EDMPrecond(apply, process), "x0"
    key = jax.random.PRNGKey(0) if dropout_key is None else dropout_key
    return Denoiser(apply, (weights, rest, key, augment_labels), prediction, learn_sigma)


def data_shape(config) -> tuple[int, ...]:
    if config.model.name == "mlp":
        return (int(config.model.data_dim),)
    return (int(config.data.image_size), int(config.data.image_size), int(config.data.num_channels))


def abstract_model(config):
    """(graphdef, abstract param State with its sharding annotations, abstract rest): no weights allocated."""
    shape = data_shape(config)
    graphdef, params, rest = nnx.split(models.abstract_model(config.model, (1, *shape)), nnx.Param, ...)
    return graphdef, params, rest


def inference_rest(config):
    """The network's non-parameter state (dropout RNG streams) for eval-mode use, without
    initialising the network: keys are key(0), counters 0. Eval (train=False) never draws from them."""
    _, _, abstract = abstract_model(config)

    def make(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jnp.broadcast_to(jax.random.key(0), leaf.shape)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree.map(make, abstract)
