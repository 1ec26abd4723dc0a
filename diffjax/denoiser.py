"""Denoisers: any callable (x, t, cond) -> prediction, tagged with its parametrisation.

A `Denoiser` is a pytree: its `params` are leaves (traced by jit, so new weights never recompile),
its `apply` function and `prediction` kind are static. Networks, the exact Gaussian-mixture
denoiser and classifier-free-guided wrappers are all Denoisers, so every sampler, loss and the
likelihood accept any of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffjax.processes import bcast, check_prediction

Array = jax.Array
NULL_LABEL = -1  # the "no class" label used for classifier-free guidance and label dropout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Denoiser:
    """prediction = apply(params, x, t, cond), of kind `prediction` ('eps', 'x0', 'v' or 'score').

    `t` is the process time, one value per example (B,); `cond` is None or class labels (B,).
    """

    apply: Callable[[Any, Array, Array, Array | None], Array] = dataclasses.field(metadata=dict(static=True))
    params: Any
    prediction: str = dataclasses.field(default="eps", metadata=dict(static=True))

    def __post_init__(self):
        check_prediction(self.prediction)

    def __call__(self, x: Array, t: Array, cond: Array | None = None) -> Array:
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
        return self.apply(self.params, x, t, cond)


def from_fn(fn: Callable[[Array, Array, Array | None], Array], prediction: str = "eps") -> Denoiser:
    """Wrap a closure fn(x, t, cond); its captured arrays become jit constants."""
    return Denoiser(lambda _, x, t, cond: fn(x, t, cond), None, prediction)


@dataclasses.dataclass(frozen=True)
class _GuidedApply:
    """apply function of a guided denoiser; equal (same jit cache entry) when `inner` is equal."""

    inner: Callable

    def __call__(self, scale_and_params, x, t, cond):
        scale, params = scale_and_params
        if cond is None:
            raise ValueError("classifier-free guidance needs class labels (cond)")
        both = self.inner(
            params,
            jnp.concatenate([x, x]),
            jnp.concatenate([t, t]),
            jnp.concatenate([cond, jnp.full_like(cond, NULL_LABEL)]),
        )
        conditional, unconditional = jnp.split(both, 2)
        return unconditional + bcast(scale, x) * (conditional - unconditional)


def guided(denoiser: Denoiser, scale: float | Array) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022): u + w (c - u) in the denoiser's own
    parametrisation; w = 1 is the plain conditional model, w = 0 the unconditional one.

    Both branches run as one batch of 2B. `scale` is traced, so changing it never recompiles.
    """
    return Denoiser(_GuidedApply(denoiser.apply), (jnp.asarray(scale, jnp.float32), denoiser.params), denoiser.prediction)
