"""Samplers: each call is ONE jit-compiled program (lax.scan or a diffrax solve).

`sample(name, denoiser, process, key, shape, num_steps, ...) -> (x, info)`; `info["nfe"]` counts
network evaluations (a guided denoiser's two branches run as one batched evaluation).

Samplers only use the process through alpha, sigma (and f, g^2 for the SDE/ODE ones), so they work
for every process and any Denoiser: a network, the exact mixture denoiser or a guided wrapper.
Noise is drawn per example from fold_in(key, example index), so the first n samples of a batch
do not depend on the batch size.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from diffjax import steppers
from diffjax.denoiser import Denoiser, guided
from diffjax.models.layers import inference_groupnorm
from diffjax.processes import Process, check_steps

posterior_step = steppers.posterior_step  # the DDPM posterior / DDIM step (re-exported)

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


def predict_with_variance(denoiser: Denoiser, process: Process, x: Array, t: Array, cond, kind: str) -> tuple[Array, Array]:
    """(prediction of `kind`, v): `predict` plus the denoiser's learned-variance output (ValueError without one)."""
    out, v = denoiser.with_variance(x, t, cond)
    return process.convert(denoiser.prediction, kind, out, x, t), v


def example_noise_coded(keys: Array, shape: tuple[int, ...], step: Array | int, code: Array | int) -> Array:
    """A stepper's noise: example_noise(keys, shape, step) for code 0, else example_noise(keys, shape,
    step, code); step and code may be per-example arrays (the server's slots)."""
    step = jnp.broadcast_to(jnp.asarray(step, jnp.int32), keys.shape[:1])
    code = jnp.broadcast_to(jnp.asarray(code, jnp.int32), keys.shape[:1])

    def draw(k, i, c):
        k = jax.random.fold_in(k, i)
        k = jax.lax.cond(c > 0, lambda: jax.random.fold_in(k, c), lambda: k)
        return jax.random.normal(k, shape)

    return jax.vmap(draw)(keys, step, code)


def run_stepper(
    stepper: steppers.Stepper, denoiser: Denoiser, process: Process, x: Array, keys: Array, cond, num_steps: int
) -> tuple[Array, int]:
    """Drive a stepper over its time grid: one lax.scan over the first N - 1 steps, then the last."""
    grid = process.time_grid(num_steps, stepper.grid_spacing(process))
    check_start(stepper, process, grid)
    batch, shape = x.shape[0], x.shape[1:]
    per_example = lambda v: jnp.broadcast_to(jnp.asarray(v), (batch,))  # noqa: E731

    def one_step(state, i, t_prev, t, t_next, last, evals: int):
        step = steppers.Step(per_example(i), num_steps, per_example(t_prev), per_example(t), per_example(t_next), last)
        noise = lambda code: example_noise_coded(keys, shape, i, code)  # noqa: E731
        for sub in range(evals):  # static unroll: evals is 1, 2 (Heun) or 1 + corrector steps (PC)
            state, x_in, t_in = stepper.prepare(process, state, sub, step, noise)
            if stepper.learned_variance:
                out, v = predict_with_variance(denoiser, process, x_in, t_in, cond, stepper.kind)
                state = stepper.update(process, state, out, sub, step, noise, v=v)  # type: ignore[call-arg]
            else:
                out = predict(denoiser, process, x_in, t_in, cond, stepper.kind)
                state = stepper.update(process, state, out, sub, step, noise)
        return state

    state = stepper.init(process, x, per_example(grid[0]))
    # One scan over the steps (the last one flagged per example); a stepper with fewer evaluations
    # on the last step (Heun) scans the first N - 1 and runs the last after it.
    scanned = num_steps if stepper.evals_last == stepper.evals else num_steps - 1
    if scanned:
        i = jnp.arange(scanned)
        xs = (i, grid[jnp.maximum(i - 1, 0)], grid[:scanned], grid[1 : scanned + 1])

        def body(st, inp):
            i, t_prev, t, t_next = inp
            return one_step(st, i, t_prev, t, t_next, per_example(i == num_steps - 1), stepper.evals), None

        state, _ = jax.lax.scan(body, state, xs)
    if scanned < num_steps:
        n = num_steps - 1
        state = one_step(state, n, grid[max(n - 1, 0)], grid[n], grid[n + 1], True, stepper.evals_last)
    return stepper.output(state), stepper.nfe(num_steps)


def check_start(stepper: steppers.Stepper, process: Process, grid: Array) -> None:
    """A stepper that divides by alpha (`Stepper.needs_signal`) cannot start where alpha = 0 (flow at t = 1)."""
    if not stepper.needs_signal:
        return
    with jax.ensure_compile_time_eval():
        t0 = float(np.asarray(grid[0]))
        a0 = float(np.asarray(process.alpha(jnp.float32(t0))))
    if a0 == 0:
        name = next((k for k, v in steppers.STEPPERS.items() if v is type(stepper)), type(stepper).__name__)
        raise ValueError(
            f"sampler {name!r} divides by alpha(t), which is 0 at the grid's first time t = {t0:g} on process "
            f"{process.name!r}; use spacing 'karras' or 'logsnr' (they start at 1 - t_min) or sampler 'ddim' / 'ode'"
        )


def probability_flow_drift(denoiser: Denoiser, process: Process, cond) -> Callable:
    """dx/dt = f(t) x - g(t)^2 / 2 * score(x, t), the probability-flow ODE (Song et al. 2021, eq. 13),
    evaluated as the velocity alpha' x0 + sigma' eps (prediction kind 'flow': the same drift, finite
    where alpha = 0, e.g. the flow process at t = 1)."""

    def drift(t, x):
        return predict(denoiser, process, x, t, cond, "flow")

    return drift


def ode(
    denoiser,
    process,
    x,
    keys,
    cond,
    num_steps,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    solver: str = "tsit5",
    denoise: bool = True,
):
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
            diffrax.ODETerm(lambda t, y, _: drift(t, y)),
            solvers[solver](),
            t0=t0,
            t1=t1,
            dt0=(t1 - t0) / num_steps,
            y0=x,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=4096,
        )
        x = sol.ys[-1]
        nfe = 6 * sol.stats["num_steps"] + 1
        if denoise:
            x = predict(denoiser, process, x, jnp.float32(t1), cond, "x0")
            nfe = nfe + 1
    return x, nfe


SAMPLERS: tuple[str, ...] = ("ancestral", "ddim", "pc", "ode", "dpm_solver++", "heun")  # all but ode are steppers


# ---- entry point ------------------------------------------------------------------------------
def sampler_options(name: str) -> dict[str, object]:
    """The options (and defaults) sampler `name` takes beyond the common arguments."""
    if name == "ode":
        import inspect

        return {p.name: p.default for p in list(inspect.signature(ode).parameters.values())[6:]}
    return steppers.options(name)


@partial(jax.jit, static_argnames=("name", "process", "num_steps", "shape", "opts"))
def _run(denoiser, key, x_T, cond, indices=None, *, name, process, num_steps, shape, opts):
    if indices is None:
        keys = example_keys(key, shape[0])
    else:  # global example indices: sample i's noise does not depend on the batch it is drawn in
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, indices)
    if x_T is None:
        x_T = process.prior_std() * example_noise(keys, shape[1:], INIT_NOISE)
    with inference_groupnorm():  # forward-only: the server's GroupNorm reduction order (faster on CPU)
        return _solve(denoiser, process, x_T, keys, cond, name, num_steps, opts)


def _solve(denoiser, process, x_T, keys, cond, name, num_steps, opts):
    if name == "ode":
        x, nfe = ode(denoiser, process, x_T, keys, cond, num_steps, **dict(opts))
    else:
        x, nfe = run_stepper(steppers.make(name, **dict(opts)), denoiser, process, x_T, keys, cond, num_steps)
    return x, jnp.asarray(nfe)


def sample(
    name: str,
    denoiser: Denoiser,
    process: Process,
    key: Array,
    shape: tuple[int, ...],
    num_steps: int = 100,
    *,
    x_T: Array | None = None,
    cond: Array | None = None,
    guidance_scale: float | None = None,
    indices: Array | None = None,
    **opts,
) -> tuple[Array, dict]:
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
    x, nfe = _run(
        denoiser,
        key,
        x_T,
        cond,
        indices,
        name=name,
        process=process,
        num_steps=int(num_steps),
        shape=shape,
        opts=tuple(sorted(opts.items())),
    )
    return x, {"nfe": int(nfe), "sampler": name, "num_steps": int(num_steps)}
