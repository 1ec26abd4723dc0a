"""Score networks (Flax NNX) and their registry.

Every network is built from a model config (``config.model``) and called as::

    model(x, noise_cond, labels=None, *, train=False) -> array of x.shape (float32)

- ``x``: NHWC images (B, H, W, C) for the image networks, (B, D) for ``mlp``.
- ``noise_cond``: (B,) float, the noise-conditioning input as score_sde feeds it. With
  ``embedding_type='positional'`` it is embedded directly (DDPM: the integer timestep; VP
  continuous: 999 t); with ``'fourier'`` the network embeds ``log(noise_cond)``, noise_cond
  being sigma. ``scale_by_sigma=True`` divides the output by noise_cond.
- ``labels``: (B,) int or None. Used when ``num_classes > 0``: label -1 (and labels=None) is the
  null label of classifier-free guidance (embedding row ``num_classes``).
- ``train``: enables dropout. Dropout draws from the module's own ``'dropout'`` (else
  ``'default'``) RNG stream; pass ``rngs=`` to the call to override it.

Parameters are float32 ``nnx.Param``s (``nnx.split(model, nnx.Param, ...)`` gives a State that
orbax can save); ``config.model.dtype`` ('float32' / 'bfloat16') is the compute dtype and
outputs are float32. Large kernels carry ``out_sharding`` metadata naming their output axis
``'fsdp'`` (see ``fsdp_partition_specs``).

Each network's ``__init__`` takes explicit keyword arguments whose defaults are the only home of
the defaults; ``create`` passes it the model config's keys. ``name`` (the registry) and
``prediction`` (read by diffjax.network) are consumed elsewhere; any other key the network does not
take is an error naming it, except score_sde's ``normalization`` / ``attention_type`` /
``conv_size`` at the one value diffjax implements (``FIXED_VALUES``). ``default_config(name)``
gives a network's full config block. Image networks take ``image_size`` and ``num_channels``
(the configs link them to ``config.data`` by reference) because attention placement depends on
the resolution.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping

import jax
import ml_collections
from flax import nnx
from jax.sharding import PartitionSpec

from diffjax.models.classifier import ClassifierMLP, ClassifierUNet
from diffjax.models.ddpm_unet import DDPMUNet
from diffjax.models.dit import DiT
from diffjax.models.mlp import MLP
from diffjax.models.ncsnpp import NCSNpp

_REGISTRY: dict[str, Callable[..., nnx.Module]] = {
    "ddpm_unet": DDPMUNet,
    "ncsnpp": NCSNpp,
    "mlp": MLP,
    "classifier_unet": ClassifierUNet,  # noise-conditional classifiers: logits, for classifier guidance
    "classifier_mlp": ClassifierMLP,
    "dit": DiT,  # Peebles & Xie 2023: adaLN-Zero transformer on patches
}

# config.model keys read outside the network: the registry's name, diffjax.network's prediction.
READ_ELSEWHERE = ("name", "prediction")
# score_sde's keys whose only value diffjax implements: a model config may carry them (old
# workdirs' config.json, score_sde users' configs) at that value, another value is an error.
FIXED_VALUES: dict[str, Any] = {"normalization": "GroupNorm", "attention_type": "ddpm", "conv_size": 3}

__all__ = [
    "available",
    "get",
    "parameters",
    "default_config",
    "network_kwargs",
    "create",
    "abstract_model",
    "abstract_shapes",
    "abstract_param_count",
    "param_count",
    "fsdp_partition_specs",
    "DDPMUNet",
    "NCSNpp",
    "MLP",
    "DiT",
]


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(model_config_or_name: Mapping[str, Any] | str) -> Callable[..., nnx.Module]:
    """The network class named by ``model_config.name`` (or a name string)."""
    name = model_config_or_name if isinstance(model_config_or_name, str) else model_config_or_name["name"]
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model name {name!r}; available models: {', '.join(available())}") from None


def parameters(name: str) -> dict[str, Any]:
    """{keyword: default} of network ``name``'s ``__init__`` (rngs left out), in signature order."""
    signature = inspect.signature(get(name).__init__)
    return {k: p.default for k, p in signature.parameters.items() if p.kind is p.KEYWORD_ONLY and k != "rngs"}


def default_config(name: str) -> ml_collections.ConfigDict:
    """``name`` plus every keyword of the network's ``__init__`` at its default: a full model block."""
    return ml_collections.ConfigDict(dict(name=name, **parameters(name)))


def network_kwargs(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments ``create`` passes the network of ``model_config`` (a ConfigDict or dict).

    READ_ELSEWHERE keys and FIXED_VALUES keys at their value are dropped, None values leave the
    default; any other key the network does not take raises ValueError naming it."""
    items = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    name = items["name"]
    params = parameters(name)
    for key, allowed in FIXED_VALUES.items():
        if key in items and (value := items.pop(key)) != allowed:
            raise ValueError(f"config.model.{key}={value!r} is not implemented; diffjax supports {allowed!r}")
    unread = sorted(k for k in items if k not in params and k not in READ_ELSEWHERE)
    if unread:
        raise ValueError(
            f"{', '.join(f'config.model.{k}' for k in unread)} {'is' if len(unread) == 1 else 'are'} not read by "
            f"model {name!r}; its keys are: {', '.join([*READ_ELSEWHERE, *params])}"
        )
    return {k: v for k, v in items.items() if k in params and v is not None}


def create(model_config: Mapping[str, Any], rngs: nnx.Rngs | int | jax.Array) -> nnx.Module:
    """Build the network of ``model_config``; the same rngs (seed/key) give the same parameters.

    Keys missing from the config take the network's defaults; unknown keys are errors (network_kwargs)."""
    if not isinstance(rngs, nnx.Rngs):
        rngs = nnx.Rngs(rngs)
    return get(model_config)(**network_kwargs(model_config), rngs=rngs)


def _with_input_shape(model_config, input_shape):
    cfg = ml_collections.ConfigDict(model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config))
    if input_shape is not None:
        if len(input_shape) == 4:
            cfg.image_size, cfg.num_channels = int(input_shape[1]), int(input_shape[3])
        elif len(input_shape) == 2:
            cfg.data_dim = int(input_shape[1])
    return cfg


def param_count(tree) -> int:
    """Number of scalars in a pytree of arrays / ShapeDtypeStructs (e.g. an nnx.State)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def abstract_model(model_config, input_shape=None) -> nnx.Module:
    """The network with jax.ShapeDtypeStruct leaves (nnx.eval_shape): no weights are allocated."""
    cfg = _with_input_shape(model_config, input_shape)

    def build(key):
        # The key is traced, so every initialiser is staged out; the RNG stream counters stay
        # concrete (compile-time eval), which keeps tracing linear in the model size.
        with jax.ensure_compile_time_eval():
            return create(cfg, nnx.Rngs(key))

    return nnx.eval_shape(build, jax.random.key(0))


def abstract_shapes(model_config, input_shape=None):
    """(graphdef, abstract param State) of the network: nothing is allocated."""
    graphdef, params, _ = nnx.split(abstract_model(model_config, input_shape), nnx.Param, ...)
    return graphdef, params


def abstract_param_count(model_config, input_shape=None) -> int:
    """Parameter count of the network without allocating weights.

    input_shape (e.g. (1, 32, 32, 3) or (1, 2)) overrides image_size/num_channels (data_dim)."""
    return param_count(abstract_shapes(model_config, input_shape)[1])


def fsdp_partition_specs(
    params, fsdp_size: int | None, axis: str = "fsdp", *, model_size: int | None = None, model_axis: str = "model"
):
    """PartitionSpecs from the ``out_sharding`` annotations for a mesh with an ``axis`` (FSDP) and,
    optionally, a ``model_axis`` (tensor parallelism: Megatron-layout kernels name it on their
    column / row dimension). A name is dropped where its size is None (that sharding is off: no
    ``model_size`` drops every ``'model'``) or does not divide the dimension (e.g. the 3-channel
    output conv)."""
    specs = nnx.get_partition_spec(params)
    sizes = {axis: fsdp_size, model_axis: model_size}

    def keep(name, dim: int):
        if name not in sizes:
            return name
        size = sizes[name]
        return name if size is not None and dim % size == 0 else None

    def fix(spec, leaf):
        if not isinstance(spec, PartitionSpec):
            return spec
        return PartitionSpec(*(keep(n, leaf.shape[i]) for i, n in enumerate(spec)))

    return jax.tree.map(fix, specs, params, is_leaf=lambda x: isinstance(x, PartitionSpec))
