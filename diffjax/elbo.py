"""The variational bound (ELBO) of a discrete-time diffusion model (Ho et al. 2020, eq. 5).

-log p(x0) <= L_T + sum_{t=2}^{T} L_{t-1} + L_0, in nats per example:

- L_T = KL(q(x_T | x0) || p(x_T)): `prior_kl`, no network.
- L_{t-1} = E_q KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), both Gaussian: the model's mean is the
  posterior mean at its x0 estimate (`Process.posterior`), its variance fixed
  (`Process.step_variance`: 'fixed_small' beta-tilde or 'fixed_large' beta) or learned (the network's
  v per dimension: exp(v log beta_t + (1 - v) log beta-tilde_t), Nichol & Dhariwal 2021, eq. 15). The
  two means differ by c0 (x0 - x0_hat) exactly, so the KL is computed without cancellation.
- L_0 = -E_q log p(x0 | x1): the decoder N(x0_hat(x1), var) integrated over the bin of x0 on the
  8-bit grid (`discretized_gaussian_log_likelihood`: bins (hi - lo) / 255 wide, the end bins open to
  -inf / +inf), or its density for continuous data (decoder='gaussian'). As in Ho et al.'s code, the
  decoder's variance is beta-tilde_2 (the posterior variance of step 2) for both fixed choices; the
  learned one interpolates between beta-tilde_2 and beta_1 (iDDPM's posterior_log_variance_clipped).

`bound_term` is one term given the model's x0 estimate (and v): the ELBO and the hybrid training
loss (losses.py) share it.

Each expectation is one draw x_t ~ q(x_t | x0) per term and example (noise from fold_in(key, example
index), so an example's value does not depend on its batch). `elbo` sums all T terms in one
lax.scan, or estimates the sum from K terms at t_k ~ p(t) (uniform, or proportional to
`time_weights`) as (1/K) sum_k L(t_k) / p(t_k): unbiased, with its standard error.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

from diffjax.denoiser import Denoiser, require_learned_variance
from diffjax.models.layers import inference_groupnorm
from diffjax.processes import Process, bcast, check_variance
from diffjax.processes.base import learned_log_variance
from diffjax.samplers import example_keys, example_noise, predict, predict_with_variance

Array = jax.Array
DECODERS = ("discretized", "gaussian")
LOG2 = math.log(2.0)


def _sum(v: Array) -> Array:
    return jnp.sum(v.reshape(v.shape[0], -1), axis=-1)


def gaussian_kl(mean1: Array, logvar1: Array, mean2: Array | float, logvar2: Array | float) -> Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (expm1(d) - d, d the
    log-variance ratio: accurate when the variances nearly agree)."""
    d = logvar1 - logvar2
    return 0.5 * (jnp.expm1(d) - d + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def gaussian_log_likelihood(x: Array, mean: Array, log_scale: Array) -> Array:
    """log N(x; mean, exp(log_scale)^2) elementwise (a density)."""
    z = (x - mean) * jnp.exp(-log_scale)
    return -0.5 * (z**2 + math.log(2 * math.pi)) - log_scale


def _log_ndtr_diff(a: Array, b: Array) -> Array:
    """log(Phi(b) - Phi(a)) for a <= b, accurate in both tails (a bin above 0 is mirrored below it)."""
    upper = a + b > 0
    lo, hi = jnp.where(upper, -b, a), jnp.where(upper, -a, b)
    log_hi = log_ndtr(hi)
    d = log_ndtr(lo) - log_hi  # <= 0
    return log_hi + jnp.where(d > -LOG2, jnp.log(-jnp.expm1(jnp.minimum(d, 0.0))), jnp.log1p(-jnp.exp(d)))


def discretized_gaussian_log_likelihood(
    x: Array, mean: Array, log_scale: Array, *, data_range: tuple[float, float] = (-1.0, 1.0), num_bins: int = 256
) -> Array:
    """log P(x) elementwise: N(mean, exp(log_scale)^2) integrated over the bin of x.

    x lies on the grid of num_bins values spanning data_range (8-bit images: 256); each value's bin
    is (hi - lo) / (num_bins - 1) wide around it, the lowest bin extends to -inf, the highest to +inf,
    so the bins' probabilities sum to 1."""
    lo, hi = map(float, data_range)
    half = 0.5 * (hi - lo) / (num_bins - 1)
    inv = jnp.exp(-log_scale)
    a = jnp.where(x <= lo + half, -jnp.inf, (x - half - mean) * inv)
    b = jnp.where(x >= hi - half, jnp.inf, (x + half - mean) * inv)
    return _log_ndtr_diff(a, b)


def prior_kl(process: Process, x0: Array) -> Array:
    """L_T = KL(q(x_T | x0) || N(0, prior_std^2 I)) in nats per example (B,)."""
    t = jnp.full(x0.shape[:1], process.t_max, jnp.float32)
    a, s = bcast(process.alpha(t), x0), bcast(process.sigma(t), x0)
    return _sum(gaussian_kl(a * x0, 2.0 * jnp.log(s), 0.0, 2.0 * math.log(process.prior_std())))


def model_log_variance(process: Process, t: Array, variance: str = "fixed_small", v: Array | None = None) -> Array:
    """log of the model's step variance at integer times t: `Process.step_variance(t, t - 1)`; at t = 1
    (the decoder) beta-tilde_2 for both fixed choices, as Ho et al.'s code (beta-tilde_1 is 0).

    'learned' (v of x's shape, t per example): v log beta_t + (1 - v) log beta-tilde_t, with
    beta-tilde_2 in place of beta-tilde_1 at t = 1 (iDDPM); of v's shape, the fixed ones of t's."""
    t = jnp.asarray(t, jnp.float32)
    safe = jnp.maximum(t, 2.0)
    var_2 = process.posterior(jnp.float32(2.0), jnp.float32(1.0))[2]
    if variance == "learned":
        if v is None:
            raise ValueError("model_log_variance('learned') needs the network's variance output v")
        small = jnp.where(t <= 1, var_2, process.posterior(safe, safe - 1.0)[2])
        return learned_log_variance(v, bcast(small, v), bcast(process.transition(t, t - 1.0)[1], v))
    var = process.step_variance(safe, safe - 1.0, variance)
    return jnp.log(jnp.where(t <= 1, var_2, var))


def bound_term(
    process: Process,
    x0: Array,
    x_t: Array,
    t: Array,
    x0_hat: Array,
    *,
    variance: str = "fixed_small",
    v: Array | None = None,
    decoder: str = "discretized",
    data_range: tuple[float, float] = (-1.0, 1.0),
    num_bins: int = 256,
) -> Array:
    """The bound's term at integer times t (B,) given the model's x0 estimate x0_hat at x_t (and its
    variance output v for variance='learned'), in nats per example (B,): KL(q(x_{t-1} | x_t, x0) ||
    p(x_{t-1} | x_t)) for t >= 2, the decoder's -log p(x0 | x_1) for t = 1."""
    first = t <= 1
    c0, ct, var_q = process.posterior(t, t - 1.0)
    logvar_p = bcast(model_log_variance(process, t, variance, v), x0)
    logvar_q = bcast(jnp.log(jnp.where(first, 1.0, var_q)), x0)
    kl = gaussian_kl(bcast(c0, x0) * (x0 - x0_hat), logvar_q, 0.0, logvar_p)
    mean = bcast(c0, x0) * x0_hat + bcast(ct, x0) * x_t  # t = 1: c0 = 1, ct = 0, the mean is x0_hat
    if decoder == "discretized":
        logp = discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar_p, data_range=data_range, num_bins=num_bins)
    else:
        logp = gaussian_log_likelihood(x0, mean, 0.5 * logvar_p)
    return jnp.where(first, -_sum(logp), _sum(kl))


def elbo_terms(
    denoiser: Denoiser,
    process: Process,
    x0: Array,
    t: Array,
    eps: Array,
    *,
    cond: Array | None = None,
    variance: str = "fixed_small",
    decoder: str = "discretized",
    data_range: tuple[float, float] = (-1.0, 1.0),
    num_bins: int = 256,
    clip_x0: tuple[float, float] | None = None,
) -> Array:
    """The bound's term at integer time t (a scalar or one per example) in nats per example (B,):
    L_{t-1} for t >= 2, the decoder's L_0 for t = 1, at x_t = alpha_t x0 + sigma_t eps.

    clip_x0 = (lo, hi): the model clips its x0 estimate (Ho et al.'s clip_denoised; a different model,
    still a bound)."""
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x0.shape[:1])
    x_t = process.marginal(x0, t, eps)
    v = None
    if variance == "learned":
        x0_hat, v = predict_with_variance(denoiser, process, x_t, t, cond, "x0")
    else:
        x0_hat = predict(denoiser, process, x_t, t, cond, "x0")
    if clip_x0 is not None:
        x0_hat = jnp.clip(x0_hat, *clip_x0)
    return bound_term(
        process, x0, x_t, t, x0_hat, variance=variance, v=v, decoder=decoder, data_range=data_range, num_bins=num_bins
    )


@partial(jax.jit, static_argnames=("process", "num_terms", "opts"))
def _elbo(denoiser, key, x0, cond, log_p, *, process, num_terms, opts):
    keys = example_keys(key, x0.shape[0])
    shape = x0.shape[1:]

    def term(t, eps):
        return elbo_terms(denoiser, process, x0, t, eps, cond=cond, **dict(opts))

    prior = prior_kl(process, x0)
    with inference_groupnorm():  # forward-only (see samplers._run)
        if num_terms is None:  # all T terms, t = 1..T, one scan
            steps = jnp.arange(1, _chain_length(process) + 1, dtype=jnp.int32)
            _, terms = jax.lax.scan(lambda c, t: (c, term(t, example_noise(keys, shape, t))), None, steps)
            return prior, jnp.sum(terms, 0), jnp.zeros(x0.shape[:1]), terms.T

        def draw(c, k):  # t_k ~ p per example (draw code 0), its noise (code 1); the value L(t_k) / p(t_k)
            t_keys = jax.vmap(lambda kk: jax.random.fold_in(jax.random.fold_in(kk, k), 0))(keys)
            idx = jax.vmap(lambda kk: jax.random.categorical(kk, log_p))(t_keys)
            value = term(idx + 1, example_noise(keys, shape, k, 1)) * jnp.exp(-log_p[idx])
            return c, value

        _, values = jax.lax.scan(draw, None, jnp.arange(num_terms, dtype=jnp.int32))
        stderr = jnp.std(values, 0, ddof=1) / math.sqrt(num_terms) if num_terms > 1 else jnp.full(x0.shape[:1], jnp.nan)
        return prior, jnp.mean(values, 0), stderr, None


def elbo(
    denoiser: Denoiser,
    process: Process,
    key: Array,
    x0: Array,
    *,
    cond: Array | None = None,
    num_terms: int | None = None,
    time_weights: Array | None = None,
    variance: str = "fixed_small",
    decoder: str = "discretized",
    data_range: tuple[float, float] = (-1.0, 1.0),
    num_bins: int = 256,
    clip_x0: tuple[float, float] | None = None,
) -> tuple[Array, dict]:
    """A lower bound on log p(x0) in nats per example (B,), and an info dict.

    num_terms=None: all T terms (one lax.scan); K: K terms at t ~ p(t), p uniform or proportional to
    time_weights (T,) (all positive), each scaled by 1 / p(t). decoder='discretized' needs x0 on the
    num_bins-level grid of data_range (8-bit images in [-1, 1]); 'gaussian' is the density bound for
    continuous data. info: bpd (B,) = -elbo / (D ln 2) and bpd_stderr; stderr (B,) in nats (0 for all
    T terms, nan for K = 1); prior (B,) = L_T; terms (B, T) with all T terms; num_terms; nfe.
    """
    _check(process, x0, num_terms, time_weights, variance, decoder, data_range, num_bins)
    if variance == "learned":
        require_learned_variance(denoiser)
    x0 = jnp.asarray(x0, jnp.float32)
    log_p = None
    if num_terms is not None:
        w = jnp.ones(_chain_length(process)) if time_weights is None else jnp.asarray(time_weights, jnp.float32)
        log_p = jnp.log(w) - jnp.log(jnp.sum(w))
    clip = None if clip_x0 is None else tuple(float(v) for v in clip_x0)
    opts = dict(
        variance=variance, decoder=decoder, data_range=tuple(map(float, data_range)), num_bins=int(num_bins), clip_x0=clip
    )
    prior, total, stderr, terms = _elbo(
        denoiser, key, x0, cond, log_p, process=process, num_terms=num_terms, opts=tuple(sorted(opts.items()))
    )
    value = -(prior + total)
    bits = math.prod(x0.shape[1:]) * LOG2
    info = dict(bpd=-value / bits, bpd_stderr=stderr / bits, stderr=stderr, prior=prior)
    info.update(num_terms=int(num_terms or _chain_length(process)), nfe=int(num_terms or _chain_length(process)))
    if terms is not None:
        info["terms"] = terms
    return value, info


def _chain_length(process: Process) -> int:
    """T, the number of steps of a discrete chain (its time runs over 1..T)."""
    return int(process.t_max)


def _check(process, x0, num_terms, time_weights, variance, decoder, data_range, num_bins) -> None:
    if not process.discrete:
        raise ValueError(
            f"the ELBO is implemented for the discrete ddpm process; {process.name!r} is continuous-time (its "
            "ELBO, VDM's, is not implemented yet): use the probability-flow ODE likelihood (likelihood.log_likelihood)"
        )
    T = _chain_length(process)
    if T < 2:
        raise ValueError(f"the ELBO needs a chain of T >= 2 steps, got T={T}")
    check_variance(variance)
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if num_terms is not None and (isinstance(num_terms, bool) or not isinstance(num_terms, int) or num_terms < 1):
        raise ValueError(f"num_terms must be None (all T terms) or a positive integer, got {num_terms!r}")
    if time_weights is not None:
        w = jnp.asarray(time_weights, jnp.float32)
        if num_terms is None:
            raise ValueError("time_weights is for the K-term estimator: give num_terms too")
        if w.shape != (T,) or not bool(jnp.all(jnp.isfinite(w) & (w > 0))):
            raise ValueError(f"time_weights must be {T} positive finite weights (one per t), got shape {w.shape}")
    if jnp.ndim(x0) < 2:
        raise ValueError(f"x0 must be a batch (B, ...) with at least 2 dims, got shape {jnp.shape(x0)}")
    lo, hi = map(float, data_range)
    if decoder == "discretized" and not isinstance(x0, jax.core.Tracer):
        if not (hi > lo and num_bins >= 2):
            raise ValueError(f"the discretized decoder needs data_range (lo, hi), hi > lo, num_bins >= 2, got {data_range}")
        u = (jnp.asarray(x0, jnp.float32) - lo) / (hi - lo) * (num_bins - 1)
        off = float(jnp.max(jnp.maximum(jnp.abs(u - jnp.round(u)), jnp.maximum(-u, u - (num_bins - 1)))))
        if off > 1e-3:
            raise ValueError(
                f"x0 is not {num_bins}-level data in data_range {(lo, hi)} (the discretized decoder's bins): "
                "quantize it, or use decoder='gaussian' for continuous data"
            )
