"""Training losses: one weighted regression, four published weightings.

Every loss draws t from the process (`sample_train_time`), forms x_t = alpha x0 + sigma eps,
converts the denoiser's output (whatever its parametrisation) to the loss's target space and
returns mean_batch[ w(t) * mean_dims (prediction - target)^2 ] (reduce_mean=False: score_sde's
0.5 * sum_dims instead of mean_dims, as its VE configs train):

- 'eps': DDPM's L_simple, target eps, w = 1 (Ho et al. 2020, eq. 14).
- 'dsm': denoising score matching, target -eps / sigma, w = sigma^2 (score_sde), or g(t)^2 with
  likelihood weighting (Song et al. 2021b, "Maximum likelihood training of score-based models").
- 'v': v-prediction, target a eps - s x0, w = 1 (Salimans & Ho 2022).
- 'edm': target x0, w = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, ln sigma ~ N(-1.2, 1.2^2)
  (Karras et al. 2022, table 1); needs the 'edm' process.

Pure functions of (denoiser, process, batch, key); they are jit-compiled inside the train step.
Optional class labels (batch["label"]) are replaced by the null label with prob. `label_dropout`
to train a classifier-free-guidance model.
"""

from __future__ import annotations

from typing import cast

import jax
import jax.numpy as jnp

from diffjax.denoiser import NULL_LABEL, Denoiser
from diffjax.processes import EDM, Process, bcast

Array = jax.Array
LOSSES = ("eps", "dsm", "v", "edm")
_TARGET = {"eps": "eps", "dsm": "score", "v": "v", "edm": "x0"}


def drop_labels(key: Array, labels: Array, rate: float) -> Array:
    """Replace each label by NULL_LABEL with probability `rate`."""
    return jnp.where(jax.random.bernoulli(key, rate, labels.shape), NULL_LABEL, labels)


def loss(
    name: str,
    denoiser: Denoiser,
    process: Process,
    batch: dict,
    key: Array,
    *,
    likelihood_weighting: bool = False,
    label_dropout: float = 0.0,
    reduce_mean: bool = True,
) -> Array:
    """The scalar training loss `name` of `denoiser` on batch {"x": (B, ...), "label": (B,) optional}."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")
    if name == "edm" and not isinstance(process, EDM):
        raise ValueError(f"loss 'edm' needs the 'edm' process, got {process.name!r}")
    if likelihood_weighting and name != "dsm":
        raise ValueError("likelihood_weighting applies to the 'dsm' loss only")
    x0 = batch["x"]
    labels = batch.get("label")
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    if labels is not None and label_dropout > 0:
        labels = drop_labels(k_drop, labels, label_dropout)
    t = process.sample_train_time(k_t, x0.shape[0])
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    x_t = process.marginal(x0, t, eps)
    out = process.convert(denoiser.prediction, _TARGET[name], denoiser(x_t, t, labels), x_t, t)

    alpha, sigma = process.alpha(t), process.sigma(t)
    if name == "eps":
        target, weight = eps, jnp.ones_like(t)
    elif name == "dsm":
        target = -eps / bcast(sigma, eps)
        weight = process.sde(t)[1] if likelihood_weighting else sigma**2
    elif name == "v":
        target, weight = bcast(alpha, eps) * eps - bcast(sigma, x0) * x0, jnp.ones_like(t)
    else:  # "edm": an EDM process, checked above
        target, weight = x0, cast(EDM, process).loss_weight(sigma)
    squared = ((out - target) ** 2).reshape(x0.shape[0], -1)
    per_example = jnp.mean(squared, axis=-1) if reduce_mean else 0.5 * jnp.sum(squared, axis=-1)
    return jnp.mean(weight * per_example)
