"""The continuous-time variational bound of any continuous process (VDM, Kingma et al. 2021, eq. 11-17).

-log p(x) <= L_prior + L_recon + L_diffusion, in nats per example:

- L_prior = KL(q(x_T | x) || p_T): `diffjax.elbo.prior_kl`, no network.
- L_recon = -E log p(x | z_{t_min}): the decoder N(x_hat(z, t_min), (sigma / alpha)^2 at t_min) per
  dimension, integrated over the 8-bit bin of x ('discretized', `elbo.discretized_gaussian_log_likelihood`)
  or its density for continuous data ('gaussian').
- L_diffusion = 1/2 int_{t_min}^{t_max} -SNR'(t) E ||x - x_hat(z_t, t)||^2 dt
  = 1/2 int -lambda'(t) E ||eps - eps_hat(z_t, t)||^2 dt, lambda = log SNR (`Process.log_snr`, its
  slope by autodiff): the same for every alpha, sigma and any prediction kind (`Process.convert`).
  Estimated by (t_max - t_min) times the integrand at K times per example, low-discrepancy
  (antithetic) in t: t_k = t_min + (t_max - t_min) ((u + k / K) mod 1), u ~ U(0, 1); its standard
  error is the K values' std / sqrt(K) (conservative for stratified draws).

`elbo` evaluates it (eval bpd --method elbo); `training_loss` is `training.loss = 'elbo'` for a
fixed schedule (the batch's times antithetic, as VDM); `vdm_value_and_grad` trains VDM's learned
schedule with VDM's variance-minimising update (sec. 5.2): the schedule's shape gets the gradient of
the squared per-example diffusion loss, the network and the end points the ELBO's gradient.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffjax.denoiser import Denoiser
from diffjax.elbo import discretized_gaussian_log_likelihood, gaussian_kl, gaussian_log_likelihood
from diffjax.models.layers import inference_groupnorm
from diffjax.processes import Process, bcast
from diffjax.processes.vdm import VDM, gamma, split_ends
from diffjax.samplers import example_keys, example_noise

Array = jax.Array
DECODERS = ("discretized", "gaussian")
LOG2 = math.log(2.0)


def _sum(v: Array) -> Array:
    return jnp.sum(v.reshape(v.shape[0], -1), axis=-1)


@dataclasses.dataclass(frozen=True)
class _Coefficients(Process):
    """A transient process with given per-example (alpha, sigma): `convert` at a learned schedule."""

    a: Any = None
    s: Any = None

    def alpha(self, t):
        return self.a

    def sigma(self, t):
        return self.s


def log_snr_slope(process: Process, t: Array) -> Array:
    """d lambda / dt at t (any shape), by autodiff of `process.log_snr`."""
    return jnp.vectorize(jax.grad(lambda s: process.log_snr(s)))(jnp.asarray(t, jnp.float32))


def antithetic_times(key: Array, shape: tuple[int, ...], t_min: float, t_max: float) -> Array:
    """Low-discrepancy times over the leading axis: ((u + k / n) mod 1) scaled to [t_min, t_max]."""
    n = shape[0]
    u = jax.random.uniform(key, shape[1:])
    k = jnp.arange(n, dtype=jnp.float32).reshape((n,) + (1,) * (len(shape) - 1))
    return t_min + (t_max - t_min) * jnp.mod(u + k / n, 1.0)


def _noisy(x0: Array, eps: Array, a: Array, s: Array) -> Array:
    return bcast(a, x0) * x0 + bcast(s, x0) * eps


def _paired(den: Denoiser, x0, eps, eps0, t, t0, coefficients, cond) -> list[Array]:
    """The network at (z_t, t) and at (z_{t_min}, t_min) as one batch of 2B (one network in the graph)."""
    (a, s), (a0, s0) = coefficients
    z = jnp.concatenate([_noisy(x0, eps, a, s), _noisy(x0, eps0, a0, s0)])
    return jnp.split(den(z, jnp.concatenate([t, t0]), None if cond is None else jnp.concatenate([cond, cond])), 2)


def _diffusion(den: Denoiser, x0, eps, t, a, s, slope, cond, out=None) -> Array:
    """1/2 (-lambda') ||eps - eps_hat||^2 per example at z = a x0 + s eps (a, s, slope: (B,)); out: the
    network's output there if already computed."""
    z = _noisy(x0, eps, a, s)
    eps_hat = _Coefficients(a=a, s=s).convert(den.prediction, "eps", den(z, t, cond) if out is None else out, z, t)
    return 0.5 * -slope * _sum((eps - eps_hat) ** 2)


def diffusion_term(den: Denoiser, process: Process, x0: Array, t: Array, eps: Array, cond=None) -> Array:
    """(t_max - t_min) x the diffusion integrand at t (B,): an unbiased estimate of L_diffusion for t ~ U."""
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x0.shape[:1])
    a, s, slope = process.alpha(t), process.sigma(t), log_snr_slope(process, t)
    return (process.t_max - process.t_min) * _diffusion(den, x0, eps, t, a, s, slope, cond)


def _recon(den, x0, eps, t0, a, s, cond, decoder, data_range, num_bins, out=None) -> Array:
    z = _noisy(x0, eps, a, s)
    mean = _Coefficients(a=a, s=s).convert(den.prediction, "x0", den(z, t0, cond) if out is None else out, z, t0)
    log_scale = bcast(jnp.log(s) - jnp.log(a), x0)
    if decoder == "discretized":
        logp = discretized_gaussian_log_likelihood(x0, mean, log_scale, data_range=data_range, num_bins=num_bins)
    else:
        logp = gaussian_log_likelihood(x0, mean, log_scale)
    return -_sum(logp)


def reconstruction_term(den: Denoiser, process: Process, x0: Array, eps: Array, cond=None, **decoder_opts) -> Array:
    """-log p(x0 | z_{t_min}) per example (B,) at z = alpha x0 + sigma eps (decoder, data_range, num_bins)."""
    t0 = jnp.full(x0.shape[:1], process.t_min, jnp.float32)
    return _recon(den, x0, eps, t0, process.alpha(t0), process.sigma(t0), cond, **_decoder(**decoder_opts))


def prior_term(process: Process, x0: Array) -> Array:
    """KL(q(x_T | x0) || p_T) per example (B,)."""
    t = jnp.full(x0.shape[:1], process.t_max, jnp.float32)
    return _prior(x0, process.alpha(t), process.sigma(t), process.prior_std())


def _prior(x0, a, s, prior_std) -> Array:
    return _sum(gaussian_kl(bcast(a, x0) * x0, bcast(2.0 * jnp.log(s), x0), 0.0, 2.0 * math.log(prior_std)))


def _decoder(decoder: str = "discretized", data_range=(-1.0, 1.0), num_bins: int = 256) -> dict:
    return dict(decoder=decoder, data_range=tuple(map(float, data_range)), num_bins=int(num_bins))


@partial(jax.jit, static_argnames=("process", "num_terms", "opts"))
def _elbo(den, key, x0, cond, *, process, num_terms, opts):
    keys = example_keys(key, x0.shape[0])
    shape = x0.shape[1:]
    with inference_groupnorm():  # forward-only (see samplers._run)
        recon = reconstruction_term(den, process, x0, example_noise(keys, shape, 0, 0), cond, **dict(opts))
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1)))(keys)

        def draw(c, k):  # the k-th antithetic time of every example, its noise (code 2)
            t = process.t_min + (process.t_max - process.t_min) * jnp.mod(u + k / num_terms, 1.0)
            return c, diffusion_term(den, process, x0, t, example_noise(keys, shape, k, 2), cond)

        _, values = jax.lax.scan(draw, None, jnp.arange(num_terms, dtype=jnp.int32))
    stderr = jnp.std(values, 0, ddof=1) / math.sqrt(num_terms) if num_terms > 1 else jnp.full(x0.shape[:1], jnp.nan)
    return prior_term(process, x0), recon, jnp.mean(values, 0), stderr


def elbo(
    denoiser: Denoiser,
    process: Process,
    key: Array,
    x0: Array,
    *,
    cond: Array | None = None,
    num_terms: int = 16,
    decoder: str = "discretized",
    data_range: tuple[float, float] = (-1.0, 1.0),
    num_bins: int = 256,
) -> tuple[Array, dict]:
    """The continuous-time lower bound on log p(x0) in nats per example (B,), and an info dict:
    bpd, bpd_stderr, stderr (nats), prior, reconstruction, diffusion (B,), num_terms, nfe.

    num_terms K: diffusion-integrand evaluations per example (antithetic times). decoder
    'discretized' needs x0 on the num_bins-level grid of data_range (8-bit images); 'gaussian' is
    the density bound for continuous data."""
    _check(process, x0, num_terms, decoder, data_range, num_bins)
    x0 = jnp.asarray(x0, jnp.float32)
    opts = tuple(sorted(_decoder(decoder, data_range, num_bins).items()))
    prior, recon, diff, stderr = _elbo(denoiser, key, x0, cond, process=process, num_terms=int(num_terms), opts=opts)
    value = -(prior + recon + diff)
    bits = math.prod(x0.shape[1:]) * LOG2
    info = dict(bpd=-value / bits, bpd_stderr=stderr / bits, stderr=stderr, prior=prior, reconstruction=recon)
    info.update(diffusion=diff, num_terms=int(num_terms), nfe=int(num_terms) + 1)
    return value, info


def _check(process, x0, num_terms, decoder, data_range, num_bins) -> None:
    process._require_continuous("continuous-time ELBO (use diffjax.elbo for the discrete chain)")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if isinstance(num_terms, bool) or not isinstance(num_terms, int) or num_terms < 1:
        raise ValueError(f"num_terms must be a positive integer, got {num_terms!r}")
    if jnp.ndim(x0) < 2:
        raise ValueError(f"x0 must be a batch (B, ...) with at least 2 dims, got shape {jnp.shape(x0)}")
    if decoder == "discretized" and not isinstance(x0, jax.core.Tracer):
        check_grid(x0, data_range, num_bins)


def check_grid(x0: Array, data_range: tuple[float, float], num_bins: int = 256) -> None:
    """A ValueError unless x0 lies on the num_bins-level grid of data_range (the discretised decoder's bins)."""
    lo, hi = map(float, data_range)
    if not (hi > lo and num_bins >= 2):
        raise ValueError(f"the discretized decoder needs data_range (lo, hi), hi > lo, num_bins >= 2, got {data_range}")
    levels = (jnp.asarray(x0, jnp.float32) - lo) * ((num_bins - 1) / (hi - lo))  # a global array: reduced on device
    if float(jnp.max(jnp.abs(levels - jnp.clip(jnp.round(levels), 0, num_bins - 1)))) > 1e-3:
        raise ValueError(
            f"the continuous-time ELBO's discretized decoder: x0 is not {num_bins}-level data in data_range "
            f"{(lo, hi)}: quantize it, or use decoder='gaussian' for continuous data"
        )


# ---- training ------------------------------------------------------------------------------------
def _batch(batch: dict, key: Array):
    x0 = batch["x"]
    k_t, k_eps, k_eps0 = jax.random.split(key, 3)
    eps, eps0 = jax.random.normal(k_eps, x0.shape, x0.dtype), jax.random.normal(k_eps0, x0.shape, x0.dtype)
    return x0, batch.get("label"), k_t, eps, eps0


def training_loss(denoiser: Denoiser, process: Process, batch: dict, key: Array, **decoder_opts) -> Array:
    """`training.loss = 'elbo'`: the batch mean of the bound in bits/dim (VDM's loss), one antithetic
    time per example; decoder 'gaussian' unless decoder_opts say otherwise (training data need not
    be on the 8-bit grid)."""
    x0, labels, k_t, eps, eps0 = _batch(batch, key)
    opts = _decoder(**{"decoder": "gaussian", **decoder_opts})
    t = antithetic_times(k_t, x0.shape[:1], process.t_min, process.t_max)
    t0 = jnp.full(x0.shape[:1], process.t_min, jnp.float32)
    coefficients = [(process.alpha(u), process.sigma(u)) for u in (t, t0)]
    out, out0 = _paired(denoiser, x0, eps, eps0, t, t0, coefficients, labels)
    diff = _diffusion(denoiser, x0, eps, t, *coefficients[0], log_snr_slope(process, t), labels, out)
    recon = _recon(denoiser, x0, eps0, t0, *coefficients[1], labels, **opts, out=out0)
    total = prior_term(process, x0) + recon + (process.t_max - process.t_min) * diff
    return jnp.mean(total) / (math.prod(x0.shape[1:]) * LOG2)


def training_decoder(config) -> dict:
    """The decoder a learned schedule trains with: the discretised one on the data's 8-bit range for
    images (a density on 8-bit data grows without bound as gamma_min falls: the end point would drift),
    the Gaussian density for the continuous toy data (or uniformly dequantised images)."""
    from diffjax.data import TOY_DATASETS
    from diffjax.sample import data_range

    if config.data.dataset in TOY_DATASETS or config.data.get("uniform_dequantization", False):
        return dict(decoder="gaussian")
    return dict(decoder="discretized", data_range=data_range(config))


def vdm_terms(
    make_denoiser: Callable[[Any], Denoiser], weights, schedule: dict, process: VDM, x0, t, eps, eps0, cond=None, **opts
) -> dict[str, Array]:
    """Per-example prior, reconstruction and diffusion terms (B,) in bits/dim under the schedule
    params `schedule` (traced; `diffjax.processes.vdm.gamma`)."""
    t0, t1 = process.t_min, process.t_max
    g, slope = jax.vmap(jax.value_and_grad(lambda s: gamma(schedule, s, t0, t1)))(t)
    return _terms(
        make_denoiser(weights), g, slope, schedule["gamma_min"], schedule["gamma_max"], process, x0, t, eps, eps0, cond, opts
    )


def _terms(den, g, slope, g_min, g_max, process, x0, t, eps, eps0, cond, opts):
    bits = math.prod(x0.shape[1:]) * LOG2
    ab = lambda gg: (jnp.sqrt(jax.nn.sigmoid(-gg)), jnp.sqrt(jax.nn.sigmoid(gg)))  # noqa: E731
    t0 = jnp.full(x0.shape[:1], process.t_min, jnp.float32)
    coefficients = [ab(g), ab(g_min * jnp.ones(x0.shape[:1]))]
    out, out0 = _paired(den, x0, eps, eps0, t, t0, coefficients, cond)
    diff = (process.t_max - process.t_min) * _diffusion(den, x0, eps, t, *coefficients[0], -slope, cond, out)
    recon = _recon(den, x0, eps0, t0, *coefficients[1], cond, **_decoder(**{"decoder": "gaussian", **opts}), out=out0)
    prior = _prior(x0, *ab(g_max * jnp.ones(x0.shape[:1])), process.prior_std())
    return dict(prior=prior / bits, reconstruction=recon / bits, diffusion=diff / bits)


def vdm_loss(
    make_denoiser: Callable[[Any], Denoiser], weights, schedule: dict, process: VDM, batch: dict, key: Array, **opts
) -> Array:
    """The bound's batch mean in bits/dim under traced schedule params: the value of
    `vdm_value_and_grad` (the eval loss of a learned schedule)."""
    x0, labels, k_t, eps, eps0 = _batch(batch, key)
    t = antithetic_times(k_t, x0.shape[:1], process.t_min, process.t_max)
    return jnp.mean(sum(vdm_terms(make_denoiser, weights, schedule, process, x0, t, eps, eps0, labels, **opts).values()))


def vdm_value_and_grad(
    make_denoiser: Callable[[Any], Denoiser], weights, schedule: dict, process: VDM, batch: dict, key: Array, **opts
) -> tuple[Array, tuple[Any, dict]]:
    """(the bound's batch mean in bits/dim, (network grads, schedule grads)) with VDM's
    variance-minimising update: the schedule's shape params get grad mean_b L_diffusion,b^2, the
    network and the end points (gamma_min, gamma_max) the ELBO's gradient.

    One forward and one backward pass through the network: gamma(t_b) and its slope enter the bound
    as per-example inputs, whose cotangents (each example's alone) are scaled by 2 L_diffusion,b and
    pulled back through the (cheap) schedule network."""
    x0, labels, k_t, eps, eps0 = _batch(batch, key)
    t = antithetic_times(k_t, x0.shape[:1], process.t_min, process.t_max)
    t0, t1 = process.t_min, process.t_max
    shape_params, ends = split_ends(schedule)

    def per_example(shape_p, ends_p):
        sched = {**shape_p, **ends_p}
        return jax.vmap(jax.value_and_grad(lambda s: gamma(sched, s, t0, t1)))(t)

    (g, slope), pullback = jax.vjp(per_example, shape_params, ends)

    def bound(w, g, slope, g_min, g_max):
        terms = _terms(make_denoiser(w), g, slope, g_min, g_max, process, x0, t, eps, eps0, labels, opts)
        return jnp.mean(sum(terms.values())), terms["diffusion"]

    (loss, diff), (g_w, g_g, g_slope, g_min, g_max) = jax.value_and_grad(bound, argnums=(0, 1, 2, 3, 4), has_aux=True)(
        weights, g, slope, ends["gamma_min"], ends["gamma_max"]
    )
    _, g_ends = pullback((g_g, g_slope))  # the ELBO's gradient of the end points through gamma(t)
    scale = 2.0 * jax.lax.stop_gradient(diff)
    g_shape, _ = pullback((g_g * scale, g_slope * scale))  # grad of mean_b diff_b^2
    grads = {**g_shape, "gamma_min": g_ends["gamma_min"] + g_min, "gamma_max": g_ends["gamma_max"] + g_max}
    return loss, (g_w, grads)
