"""Denoisers: any callable (x, t, cond) -> prediction, tagged with its parametrisation.

A `Denoiser` is a pytree: its `params` are leaves (traced by jit, so new weights never recompile),
its `apply` function and `prediction` kind are static. Networks, the exact Gaussian-mixture
denoiser and classifier-free-guided wrappers are all Denoisers, so every sampler, loss and the
likelihood accept any of them.

Learned variances (Nichol & Dhariwal 2021): a Denoiser with `learned_variance=True` has an apply
that returns the pair (prediction, v), v per dimension the interpolation weight of the reverse
step's log variance, v log beta_t + (1 - v) log beta-tilde_t (iDDPM eq. 15). Calling it still returns
only the prediction (every sampler, loss and likelihood is unchanged); `with_variance` returns both.
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
    learned_variance: apply returns (prediction, v) instead, v of x's shape (the module docstring).
    """

    apply: Callable[[Any, Array, Array, Array | None], Array] = dataclasses.field(metadata=dict(static=True))
    params: Any
    prediction: str = dataclasses.field(default="eps", metadata=dict(static=True))
    learned_variance: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def __post_init__(self):
        check_prediction(self.prediction)

    def _apply(self, x: Array, t: Array, cond: Array | None) -> Any:
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
        return self.apply(self.params, x, t, cond)

    def __call__(self, x: Array, t: Array, cond: Array | None = None) -> Array:
        out = self._apply(x, t, cond)
        return out[0] if self.learned_variance else out

    def with_variance(self, x: Array, t: Array, cond: Array | None = None) -> tuple[Array, Array]:
        """(prediction, v): the prediction and the interpolation weight v of its learned log variance."""
        require_learned_variance(self)
        return self._apply(x, t, cond)


def require_learned_variance(denoiser: Denoiser | bool, what: str = "sampling.variance='learned'") -> None:
    """The one-line error for a learned-variance computation on a denoiser (or a config's network:
    its model.learn_sigma) without a variance output."""
    if not (denoiser.learned_variance if isinstance(denoiser, Denoiser) else denoiser):
        raise ValueError(
            f"{what} needs a network that also outputs its variance: train one with model.learn_sigma=True "
            "(or choose sampling.variance 'fixed_small' / 'fixed_large')"
        )


def from_fn(
    fn: Callable[[Array, Array, Array | None], Any], prediction: str = "eps", learned_variance: bool = False
) -> Denoiser:
    """Wrap a closure fn(x, t, cond) (returning (prediction, v) with learned_variance); its captured
    arrays become jit constants."""
    return Denoiser(lambda _, x, t, cond: fn(x, t, cond), None, prediction, learned_variance)


@dataclasses.dataclass(frozen=True)
class _GuidedApply:
    """apply function of a guided denoiser; equal (same jit cache entry) when `inner` is equal.

    An inner apply with a learned variance returns (prediction, v): the prediction is guided, v is
    the conditional branch's (as DiT's forward_with_cfg)."""

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
        pred, v = both if isinstance(both, tuple) else (both, None)
        conditional, unconditional = jnp.split(pred, 2)
        out = unconditional + bcast(scale, x) * (conditional - unconditional)
        return out if v is None else (out, jnp.split(v, 2)[0])


def guided(denoiser: Denoiser, scale: float | Array) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022): u + w (c - u) in the denoiser's own
    parametrisation; w = 1 is the plain conditional model, w = 0 the unconditional one.

    Both branches run as one batch of 2B. `scale` is traced, so changing it never recompiles.
    """
    params = (jnp.asarray(scale, jnp.float32), denoiser.params)
    return Denoiser(_GuidedApply(denoiser.apply), params, denoiser.prediction, denoiser.learned_variance)
