"""Samplers: each call is ONE jit-compiled program (lax.scan or a diffrax solve).

`sample(name, denoiser, process, key, shape, num_steps, ...) -> (x, info)`; `info["nfe"]` counts
network evaluations (a guided denoiser's two branches run as one batched evaluation).

Samplers only use the process through alpha, sigma (and f, g^2 for the SDE/ODE ones), so they work
for every process and any Denoiser: a network, the exact mixture denoiser or a guided wrapper.
Noise is drawn per example from fold_in(key, example index), so the first n samples of a batch
do not depend on the batch size.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.denoiser import Denoiser, guided
from diffjax.processes import Process, bcast, check_steps

Array = jax.Array
INIT_NOISE = 0x7FFFFFFF  # fold-in index of the initial noise x_T (steps use 0, 1, ...)
# Adaptive ODE solves (sampling and likelihood) trace their float32 matmuls and convolutions at
# full precision: TPUs default to bf16 passes and recent NVIDIA GPUs to TF32, whose ~1e-3 relative
# error perturbs the solver's error control and the divergence integral.
ODE_PRECISION = "highest"


# ---- shared pieces ------------------------------------------------------------------------------
def example_keys(key: Array, batch: int) -> Array:
    """One key per example, independent of the batch size."""
    return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(batch))


def example_noise(keys: Array, shape: tuple[int, ...], *step: Array | int) -> Array:
    """Standard normal noise for (step, substep, ...), one draw per example key.

    Each step index is a scalar or one index per example (the server's slots are at different steps).
    """
    steps = [jnp.broadcast_to(jnp.asarray(s, jnp.int32), keys.shape[:1]) for s in step]

    def draw(k, *ss):
        for s in ss:
            k = jax.random.fold_in(k, s)
        return jax.random.normal(k, shape)

    return jax.vmap(draw)(keys, *steps)


def predict(denoiser: Denoiser, process: Process, x: Array, t: Array, cond, kind: str) -> Array:
    return process.convert(denoiser.prediction, kind, denoiser(x, t, cond), x, t)


def _coefs(process: Process, t: Array, x: Array) -> tuple[Array, Array]:
    a, s = process.coefficients(t)
    return bcast(a, x), bcast(s, x)


def posterior_step(process: Process, x: Array, x0: Array, t: Array, s: Array, noise: Array,
                   eta: float | Array = 1.0) -> Array:
    """Move x_t to time s < t given an x0 estimate (DDPM posterior / DDIM, any process).

    With alpha_ts = a_t / a_s and s_ts^2 = s_t^2 - alpha_ts^2 s_s^2 (the forward s -> t step),
    q(x_s | x_t, x0) has variance c^2 = s_ts^2 s_s^2 / s_t^2. DDIM (Song et al. 2021, eq. 12):
    x_s = a_s x0 + sqrt(s_s^2 - eta^2 c^2) eps_hat + eta c z; eta = 1 is the ancestral sampler.
    """
    a_t, s_t = _coefs(process, t, x)
    a_s, s_s = _coefs(process, s, x)
    eps_hat = (x - a_t * x0) / s_t
    var_ts = jnp.maximum(s_t**2 - (a_t / a_s) ** 2 * s_s**2, 0.0)
    c2 = eta**2 * var_ts * s_s**2 / s_t**2
    return a_s * x0 + jnp.sqrt(jnp.maximum(s_s**2 - c2, 0.0)) * eps_hat + jnp.sqrt(c2) * noise


def _scan_grid(body: Callable, x: Array, grid: Array, num_steps: int):
    """Run body(x, (index, t, s)) over consecutive grid pairs (t_i, t_{i+1}), i < num_steps."""
    xs = (jnp.arange(num_steps), grid[:-1], grid[1:])
    x, _ = jax.lax.scan(lambda c, inp: (body(c, inp), None), x, xs)
    return x


# ---- samplers: fn(denoiser, process, x, keys, cond, num_steps, **opts) -> (x, nfe) -------------
def ancestral(denoiser, process, x, keys, cond, num_steps, spacing: str = "default",
              clip_x0: tuple[float, float] | None = None):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) with posterior variance beta-tilde."""
    return ddim(denoiser, process, x, keys, cond, num_steps, eta=1.0, spacing=spacing, clip_x0=clip_x0)


def ddim(denoiser, process, x, keys, cond, num_steps, eta: float = 0.0, spacing: str = "default",
         clip_x0: tuple[float, float] | None = None):
    """DDIM (Song, Meng & Ermon 2021); eta = 0 deterministic, eta = 1 ancestral.

    clip_x0 = (lo, hi): each step's x0 estimate is clipped to the data range and the step uses the
    eps implied by it (Ho et al.'s clip_denoised; diffusers' clip_sample with use_clipped_model_output)."""
    grid = process.time_grid(num_steps, spacing)

    def body(x, inp):
        i, t, s = inp
        x0 = predict(denoiser, process, x, t, cond, "x0")
        if clip_x0 is not None:
            x0 = jnp.clip(x0, *clip_x0)
        noise = example_noise(keys, x.shape[1:], i) if eta != 0 else jnp.zeros_like(x)  # eta is static
        return posterior_step(process, x, x0, t, s, noise, eta)

    return _scan_grid(body, x, grid, num_steps), num_steps


def pc(denoiser, process, x, keys, cond, num_steps, predictor: str = "reverse_diffusion",
       corrector: str = "langevin", snr: float = 0.16, n_steps_each: int = 1, norm: str = "batch",
       spacing: str = "default"):
    """Predictor-corrector sampling (Song et al. 2021, Alg. 1-3), corrector first as score_sde.

    Predictors: 'reverse_diffusion' (the reverse of the discretised forward step) or
    'euler_maruyama'; corrector: 'langevin' or 'none'. Langevin step size
    2 a_i (snr ||z|| / ||score||)^2 with norms averaged over the batch (norm='batch', score_sde)
    or per example (norm='example': no dependence on batch-mates; needs high-dimensional x,
    where per-example norms concentrate).
    """
    if predictor not in ("reverse_diffusion", "euler_maruyama"):
        raise ValueError(f"pc predictor must be 'reverse_diffusion' or 'euler_maruyama', got {predictor!r}")
    if corrector not in ("langevin", "none"):
        raise ValueError(f"pc corrector must be 'langevin' or 'none', got {corrector!r}")
    if norm not in ("batch", "example"):
        raise ValueError(f"pc norm must be 'batch' or 'example', got {norm!r}")
    n_corr = n_steps_each if corrector == "langevin" else 0
    grid = process.time_grid(num_steps, spacing)

    def norm_of(v):
        n = jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1) ** 2, -1))
        return jnp.mean(n) if norm == "batch" else n

    def body(x, inp):
        i, t, s = inp
        a_t, s_t = _coefs(process, t, x)
        a_s, s_s = _coefs(process, s, x)
        for j in range(n_corr):  # Langevin corrector at time t (static unroll, n_corr is tiny)
            score = predict(denoiser, process, x, t, cond, "score")
            z = example_noise(keys, x.shape[1:], i, j + 1)
            ratio = snr * norm_of(z) / norm_of(score)
            step = bcast(2.0 * ratio**2, x) * (a_t / a_s) ** 2
            x = x + step * score + jnp.sqrt(2.0 * step) * z
        score = predict(denoiser, process, x, t, cond, "score")
        z = example_noise(keys, x.shape[1:], i)
        last = jnp.reshape(s <= 0, (1,) * x.ndim)
        if predictor == "reverse_diffusion":
            alpha_ts = a_t / a_s
            var_ts = jnp.maximum(s_t**2 - alpha_ts**2 * s_s**2, 0.0)
            mean = (x + var_ts * score) / alpha_ts
            noise_std = jnp.sqrt(var_ts)
        else:
            f, g2 = process.sde(t)
            dt = jnp.asarray(s - t, x.dtype)
            mean = x + (bcast(f, x) * x - bcast(g2, x) * score) * dt
            noise_std = jnp.sqrt(bcast(g2, x) * -dt)
        return jnp.where(last, mean, mean + noise_std * z)  # no noise on the final (denoising) step

    return _scan_grid(body, x, grid, num_steps), num_steps * (n_corr + 1)


def dpm_solver_pp(denoiser, process, x, keys, cond, num_steps, spacing: str = "default"):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in the data-prediction form.

    x_s = (s_s / s_t) x_t + a_s (1 - exp(-h)) D with h = lambda_s - lambda_t and D the 2nd-order
    multistep combination of x0 estimates; the first step and the final step to t = 0 are 1st order.
    """
    del keys
    grid = process.time_grid(num_steps, spacing)
    a, s = process.coefficients(grid)
    ratio = s / a  # exp(-lambda); 0 at the clean time
    lam = -jnp.log(jnp.where(ratio > 0, ratio, 1.0))
    h = jnp.concatenate([jnp.ones(1), lam[1:-1] - lam[:-2], jnp.ones(1)])  # h_i for steps i-1 -> i, i < N

    def body(carry, inp):
        x, d_prev = carry
        i, t, t_next = inp
        d = predict(denoiser, process, x, t, cond, "x0")
        second = (i > 0) & (i < num_steps - 1)
        r = h[i] / jnp.where(second, h[i + 1], 1.0)
        d_comb = jnp.where(second, (1 + 0.5 / r) * d - (0.5 / r) * d_prev, d)
        exp_neg_h = ratio[i + 1] / ratio[i]
        x_next = (s[i + 1] / s[i]) * x + a[i + 1] * (1.0 - exp_neg_h) * d_comb
        return (x_next, d), None

    xs = (jnp.arange(num_steps), grid[:-1], grid[1:])
    (x, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), xs)
    return x, num_steps


def heun(denoiser, process, x, keys, cond, num_steps, s_churn: float = 0.0, s_tmin: float = 0.0,
         s_tmax: float = float("inf"), s_noise: float = 1.0, spacing: str = "default"):
    """EDM's 2nd-order Heun sampler (Karras et al. 2022, Alg. 2) with optional churn.

    Runs in the scaled space x~ = x / alpha, sigma~ = sigma / alpha, where the probability-flow
    ODE of every process is dx~/dsigma~ = (x~ - D) / sigma~. N grid points: N - 1 Heun steps and a
    final Euler step to sigma = 0, i.e. 2N - 1 evaluations (18 steps -> 35 NFE).
    """
    grid = process.time_grid(num_steps, spacing)
    a, s = process.coefficients(grid)
    sig = s / a
    gamma = min(s_churn / num_steps, math.sqrt(2.0) - 1.0) if s_churn > 0 else 0.0

    def slope(xs, t, sig_t):
        x0 = predict(denoiser, process, xs * bcast(process.alpha(t), xs), t, cond, "x0")
        return (xs - x0) / sig_t

    def body(xs, inp):
        i, t, t_next = inp
        sig_t, sig_next = sig[i], sig[i + 1]
        if gamma > 0:  # churn: raise the noise level to sig_hat, then step from there
            churn = (sig_t >= s_tmin) & (sig_t <= s_tmax)
            sig_hat = jnp.where(churn, sig_t * (1 + gamma), sig_t)
            z = example_noise(keys, xs.shape[1:], i)
            xs = xs + jnp.sqrt(sig_hat**2 - sig_t**2) * s_noise * z
            sig_t, t = sig_hat, jnp.where(churn, process.time_at_ratio(sig_hat), t)
        d = slope(xs, t, sig_t)
        x_euler = xs + (sig_next - sig_t) * d
        d2 = slope(x_euler, t_next, sig_next)
        return xs + (sig_next - sig_t) * 0.5 * (d + d2)

    xs = x / a[0]
    xs = _scan_grid(body, xs, grid[:-1], num_steps - 1)
    x0 = predict(denoiser, process, xs * a[num_steps - 1], grid[num_steps - 1], cond, "x0")
    return x0, 2 * num_steps - 1  # Euler to sigma = 0 lands exactly on the x0 estimate


def probability_flow_drift(denoiser: Denoiser, process: Process, cond) -> Callable:
    """dx/dt = f(t) x - g(t)^2 / 2 * score(x, t): the probability-flow ODE (Song et al. 2021, eq. 13)."""

    def drift(t, x):
        f, g2 = process.sde(t)
        score = predict(denoiser, process, x, t, cond, "score")
        return f * x - 0.5 * g2 * score

    return drift


def ode(denoiser, process, x, keys, cond, num_steps, rtol: float = 1e-5, atol: float = 1e-5,
        solver: str = "tsit5", denoise: bool = True):
    """Probability-flow ODE with an adaptive diffrax solver from t_max to t_min, then (denoise)
    one x0 estimate at t_min. `num_steps` is the initial step count dt0 = (t_max - t_min) / N.
    NFE: 6 per attempted Tsit5/Dopri5 step (first-same-as-last) + 1, + 1 for denoise.
    """
    del keys
    process._require_continuous("probability-flow ODE")
    solvers = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}
    if solver not in solvers:
        raise ValueError(f"ode solver must be one of {sorted(solvers)}, got {solver!r}")
    drift = probability_flow_drift(denoiser, process, cond)
    t0, t1 = process.t_max, process.t_min
    with jax.default_matmul_precision(ODE_PRECISION):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, _: drift(t, y)), solvers[solver](), t0=t0, t1=t1,
            dt0=(t1 - t0) / num_steps, y0=x, stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=4096,
        )
        x = sol.ys[-1]
        nfe = 6 * sol.stats["num_steps"] + 1
        if denoise:
            x = predict(denoiser, process, x, jnp.float32(t1), cond, "x0")
            nfe = nfe + 1
    return x, nfe


SAMPLERS: dict[str, Callable] = {
    "ancestral": ancestral, "ddim": ddim, "pc": pc, "ode": ode, "dpm_solver++": dpm_solver_pp, "heun": heun,
}


# ---- entry point ------------------------------------------------------------------------------
def sampler_options(name: str) -> dict[str, object]:
    """The options (and defaults) sampler `name` takes beyond the common arguments."""
    import inspect

    params = list(inspect.signature(SAMPLERS[name]).parameters.values())[6:]
    return {p.name: p.default for p in params}


@partial(jax.jit, static_argnames=("name", "process", "num_steps", "shape", "opts"))
def _run(denoiser, key, x_T, cond, indices=None, *, name, process, num_steps, shape, opts):
    if indices is None:
        keys = example_keys(key, shape[0])
    else:  # global example indices: sample i's noise does not depend on the batch it is drawn in
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, indices)
    if x_T is None:
        x_T = process.prior_std() * example_noise(keys, shape[1:], INIT_NOISE)
    x, nfe = SAMPLERS[name](denoiser, process, x_T, keys, cond, num_steps, **dict(opts))
    return x, jnp.asarray(nfe)


def sample(name: str, denoiser: Denoiser, process: Process, key: Array, shape: tuple[int, ...],
           num_steps: int = 100, *, x_T: Array | None = None, cond: Array | None = None,
           guidance_scale: float | None = None, indices: Array | None = None, **opts) -> tuple[Array, dict]:
    """Draw samples of `shape` (batch first) with sampler `name`; returns (x, {"nfe": int, ...}).

    indices: the examples' global indices (B,) int32 (default 0..B-1): example i's noise comes from
    fold_in(key, i), so a large set drawn in batches (sharded as `indices` is) equals one drawn at once.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    check_steps(num_steps)
    if name == "heun" and num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 for heun, got {num_steps}")
    shape = tuple(int(d) for d in shape)
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive sizes (batch first), got {shape}")
    allowed = sampler_options(name)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(f"sampler {name!r} takes no option(s) {unknown}; its options are {sorted(allowed)}")
    if x_T is not None and tuple(x_T.shape) != shape:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape is {shape}")
    if cond is not None:
        cond = jnp.asarray(cond)
        if cond.shape != shape[:1] or not jnp.issubdtype(cond.dtype, jnp.integer):
            raise ValueError(f"cond must be integer class labels of shape {shape[:1]}, got {cond.dtype}{cond.shape}")
    if guidance_scale is not None:
        if not np.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        if cond is None:
            raise ValueError("guidance_scale needs class labels in cond")
        denoiser = guided(denoiser, guidance_scale)
    if indices is not None and (tuple(indices.shape) != shape[:1] or not jnp.issubdtype(indices.dtype, jnp.integer)):
        raise ValueError(f"indices must be integers of shape {shape[:1]}, got {indices.dtype}{tuple(indices.shape)}")
    x, nfe = _run(denoiser, key, x_T, cond, indices, name=name, process=process, num_steps=int(num_steps),
                  shape=shape, opts=tuple(sorted(opts.items())))
    return x, {"nfe": int(nfe), "sampler": name, "num_steps": int(num_steps)}
