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
- 'flow': flow matching, target the velocity alpha' x0 + sigma' eps, w = 1; on the 'flow' process
  with prediction 'flow' exactly rectified flow's ||(eps - x0) - v_hat||^2 (Liu et al. 2022, eq. 1),
  t from the process's time_distribution (uniform or SD3's logit-normal). Continuous processes only.
- 'hybrid': L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, sec. 3.1) for a network with a
  learned variance (model.learn_sigma) on the discrete ddpm process: see `hybrid_loss`.

Pure functions of (denoiser, process, batch, key); they are jit-compiled inside the train step.
Optional class labels (batch["label"]) are replaced by the null label with prob. `label_dropout`
to train a classifier-free-guidance model.
"""

from __future__ import annotations

import math
from typing import cast

import jax
import jax.numpy as jnp

from diffjax.denoiser import NULL_LABEL, Denoiser, require_learned_variance
from diffjax.elbo import bound_term
from diffjax.processes import EDM, Process, bcast

Array = jax.Array
LOSSES = ("eps", "dsm", "v", "edm", "hybrid", "flow")
_TARGET = {"eps": "eps", "dsm": "score", "v": "v", "edm": "x0", "hybrid": "eps", "flow": "flow"}


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
    vlb_weight: float = 0.001,
    data_range: tuple[float, float] = (-1.0, 1.0),
) -> Array:
    """The scalar training loss `name` of `denoiser` on batch {"x": (B, ...), "label": (B,) optional}.

    vlb_weight and data_range (the discretised decoder's 8-bit grid) are the 'hybrid' loss's."""
    if name == "elbo":  # the continuous-time ELBO in bits/dim (VDM; diffjax.vlb)
        from diffjax import vlb

        return vlb.training_loss(denoiser, process, batch, key)
    check_loss(name, process, denoiser.learned_variance)
    process.require_prediction(denoiser.prediction)
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
    if name == "hybrid":
        return jnp.mean(hybrid_loss(denoiser, process, x0, t, eps, labels, vlb_weight, data_range, reduce_mean))
    out = process.convert(denoiser.prediction, _TARGET[name], denoiser(x_t, t, labels), x_t, t)

    alpha, sigma = process.alpha(t), process.sigma(t)
    if name == "eps":
        target, weight = eps, jnp.ones_like(t)
    elif name == "dsm":
        target = -eps / bcast(sigma, eps)
        weight = process.sde(t)[1] if likelihood_weighting else sigma**2
    elif name == "v":
        target, weight = bcast(alpha, eps) * eps - bcast(sigma, x0) * x0, jnp.ones_like(t)
    elif name == "flow":
        d_alpha, d_sigma = process.velocity_coefficients(t)
        target, weight = bcast(d_alpha, x0) * x0 + bcast(d_sigma, eps) * eps, jnp.ones_like(t)
    else:  # "edm": an EDM process, checked above
        target, weight = x0, cast(EDM, process).loss_weight(sigma)
    return jnp.mean(weight * _squared_error(out, target, reduce_mean))


def _squared_error(out: Array, target: Array, reduce_mean: bool) -> Array:
    squared = ((out - target) ** 2).reshape(out.shape[0], -1)
    return jnp.mean(squared, axis=-1) if reduce_mean else 0.5 * jnp.sum(squared, axis=-1)


def check_loss(name: str, process: Process, learned_variance: bool) -> None:
    """One-line ValueErrors for a loss the process or network cannot train (learned_variance: the
    network outputs its variance, model.learn_sigma); the trainer calls it before compiling."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")
    if name == "edm" and not isinstance(process, EDM):
        raise ValueError(f"loss 'edm' needs the 'edm' process, got {process.name!r}")
    if name == "flow" and process.discrete:
        raise ValueError(f"training.loss='flow' (the velocity) needs a continuous process, got {process.name!r}")
    if name == "hybrid":
        require_learned_variance(learned_variance, "training.loss='hybrid'")
        if not process.discrete:
            raise ValueError(
                f"training.loss='hybrid' needs the discrete ddpm process (its bound's terms), got {process.name!r}"
            )


def hybrid_loss(
    denoiser: Denoiser,
    process: Process,
    x0: Array,
    t: Array,
    eps: Array,
    labels: Array | None = None,
    vlb_weight: float = 0.001,
    data_range: tuple[float, float] = (-1.0, 1.0),
    reduce_mean: bool = True,
) -> Array:
    """iDDPM's hybrid loss per example (B,) at integer times t (Nichol & Dhariwal 2021, sec. 3.1):

        L_simple + vlb_weight * T * L_t / (D ln 2)

    L_simple = mean_dims (eps_hat - eps)^2 (reduce_mean=False: 0.5 sum_dims); L_t = `elbo.bound_term`
    in nats: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t >= 2, the discretised decoder's
    -log p(x0 | x_1) for t = 1 (x0 on the 8-bit grid of data_range), with the learned variance and the
    model's mean under stop_gradient, so L_vlb trains only v and L_simple only the mean. T L_t estimates
    L_vlb = sum_t L_t at t ~ U{1..T}; / (D ln 2) makes it bits per dimension. vlb_weight = 0.001 is the
    paper's lambda and equals improved-diffusion's RESCALED_MSE (its vb term, bits per dimension,
    times T / 1000); vlb_weight = 1 / T is its plain MSE with a learned variance."""
    x_t = process.marginal(x0, t, eps)
    out, v = denoiser.with_variance(x_t, t, labels)
    eps_hat = process.convert(denoiser.prediction, "eps", out, x_t, t)
    x0_hat = process.convert(denoiser.prediction, "x0", jax.lax.stop_gradient(out), x_t, t)
    vlb = bound_term(process, x0, x_t, t, x0_hat, variance="learned", v=v, data_range=data_range)
    dims = math.prod(x0.shape[1:])
    scale = float(vlb_weight) * float(process.t_max) / (dims * math.log(2.0))
    return _squared_error(eps_hat, eps, reduce_mean) + scale * vlb
