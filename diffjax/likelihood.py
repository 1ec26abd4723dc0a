"""Likelihoods: exact through the probability-flow ODE (Song et al. 2021, app. D.2), or the
variational bound (`elbo`): of a discrete-time chain (Ho et al. 2020; diffjax.elbo) or of a
continuous process (VDM, Kingma et al. 2021; diffjax.vlb).

log p_0(x) = log p_T(x_T) + int_{t_min}^{T} div f~(x_t, t) dt, with f~ the probability-flow drift,
solved forwards in time with diffrax as one jit-compiled program. The divergence is the
Hutchinson-Skilling estimate z^T (df~/dx) z (one Rademacher or Gaussian probe per example, fixed
over the solve) or, for low-dimensional data, the exact trace.
"""

from __future__ import annotations

import math
from functools import partial

import diffrax
import jax
import jax.numpy as jnp

from diffjax import elbo as discrete_elbo
from diffjax import vlb
from diffjax.denoiser import Denoiser
from diffjax.processes import Process
from diffjax.samplers import ODE_PRECISION, probability_flow_drift

Array = jax.Array
TRACES = ("hutchinson", "exact")
PROBES = ("rademacher", "gaussian")


def elbo(denoiser: Denoiser, process: Process, key: Array, x0: Array, **kwargs) -> tuple[Array, dict]:
    """A lower bound on log p(x0) in nats per example (B,), and an info dict (bpd, bpd_stderr, ...).

    Discrete chains: `diffjax.elbo.elbo` (its keywords). Continuous processes: `diffjax.vlb.elbo`
    (num_terms: K antithetic times per example, default 16; decoder, data_range, num_bins); the
    discrete bound's reverse-step options (variance, clip_x0) do not apply there and are ignored."""
    if process.discrete:
        return discrete_elbo.elbo(denoiser, process, key, x0, **kwargs)
    if kwargs.get("time_weights") is not None:
        raise ValueError("time_weights is for the discrete chain's K-term estimator")
    kwargs = {k: v for k, v in kwargs.items() if k not in ("variance", "clip_x0", "time_weights")}
    kwargs["num_terms"] = 16 if kwargs.get("num_terms") is None else kwargs["num_terms"]
    return vlb.elbo(denoiser, process, key, x0, **kwargs)


def _per_example_sum(v: Array) -> Array:
    return jnp.sum(v.reshape(v.shape[0], -1), axis=-1)


@partial(jax.jit, static_argnames=("process", "trace", "probe", "rtol", "atol"))
def _log_likelihood(denoiser, key, x, cond, *, process, trace, probe, rtol, atol):
    drift = probability_flow_drift(denoiser, process, cond)
    if probe == "rademacher":
        z = jax.random.rademacher(key, x.shape, x.dtype)
    else:
        z = jax.random.normal(key, x.shape, x.dtype)

    def divergence(t, y):
        f = lambda v: drift(t, v)
        if trace == "hutchinson":
            fy, jz = jax.jvp(f, (y,), (z,))
            return fy, _per_example_sum(z * jz)
        flat = y.reshape(y.shape[0], -1)
        basis = jnp.eye(flat.shape[1], dtype=y.dtype)

        def diag_entry(e):  # e_i^T J e_i for every example at once
            _, je = jax.jvp(f, (y,), (jnp.broadcast_to(e, flat.shape).reshape(y.shape),))
            return je.reshape(flat.shape) @ e

        return f(y), jnp.sum(jax.vmap(diag_entry)(basis), axis=0)

    def vector_field(t, state, _):
        fy, div = divergence(t, state[0])
        return fy, div

    with jax.default_matmul_precision(ODE_PRECISION):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            diffrax.Tsit5(),
            t0=process.t_min,
            t1=process.t_max,
            dt0=(process.t_max - process.t_min) / 64,
            y0=(x, jnp.zeros(x.shape[0], x.dtype)),
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=8192,
        )
    x_T, delta = sol.ys[0][-1], sol.ys[1][-1]
    return process.prior_logp(x_T) + delta, 6 * sol.stats["num_steps"] + 1


def log_likelihood(
    denoiser: Denoiser,
    process: Process,
    key: Array,
    x: Array,
    *,
    cond: Array | None = None,
    trace: str = "hutchinson",
    probe: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> tuple[Array, dict]:
    """log p(x) in nats per example (B,), and {"nfe": ...}."""
    process._require_continuous("probability-flow ODE likelihood")
    if trace not in TRACES:
        raise ValueError(f"trace must be one of {TRACES}, got {trace!r}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    x = jnp.asarray(x, jnp.float32)
    if x.ndim < 2:
        raise ValueError(f"x must be a batch (B, ...) with at least 2 dims, got shape {x.shape}")
    logp, nfe = _log_likelihood(
        denoiser, key, x, cond, process=process, trace=trace, probe=probe, rtol=float(rtol), atol=float(atol)
    )
    return logp, {"nfe": int(nfe)}


def bits_per_dim(
    denoiser: Denoiser,
    process: Process,
    key: Array,
    x: Array,
    *,
    data_range=(-1.0, 1.0),
    num_bins: int = 256,
    dequantize: bool = True,
    **kwargs,
) -> tuple[Array, dict]:
    """Bits per dimension of quantised data as in score_sde (per example, (B,)).

    x holds values on the grid lo + (hi - lo) u / (num_bins - 1), u in {0..num_bins-1} (e.g. uint8
    images scaled to [-1, 1]). Each u is moved into its bin, y = (u + U) / num_bins with U ~ U(0, 1)
    (dequantize) or U = 1/2, mapped to the model space lo + (hi - lo) y, and
    bpd = -(log p(x') + D log(hi - lo) - D log(num_bins)) / (D ln 2), an upper bound on the
    discrete code length.
    """
    lo, hi = map(float, data_range)
    if not hi > lo:
        raise ValueError(f"data_range must be (lo, hi) with hi > lo, got {data_range}")
    key_deq, key_ll = jax.random.split(key)
    x = jnp.asarray(x, jnp.float32)
    u = jnp.clip(jnp.round((x - lo) / (hi - lo) * (num_bins - 1)), 0, num_bins - 1)
    offset = jax.random.uniform(key_deq, x.shape) if dequantize else 0.5
    x_model = lo + (hi - lo) * (u + offset) / num_bins
    logp, info = log_likelihood(denoiser, process, key_ll, x_model, **kwargs)
    d = math.prod(x.shape[1:])
    bpd = -(logp + d * math.log(hi - lo) - d * math.log(num_bins)) / (d * math.log(2.0))
    return bpd, info
