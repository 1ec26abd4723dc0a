"""`diffjax demo`: sample the 8-Gaussians oracle with a chosen sampler and write a scatter PNG.

The exact denoiser of the diffused mixture stands in for a trained network, so the picture shows
what the sampler alone does: left, fresh true samples; right, generated ones.

`--evolution OUT.png` draws the diffusion over time instead: at five times from noise (left) to
data (right), the exact density of the diffused mixture (closed form: a Gaussian mixture convolved
with the forward process is again one) as a heat map, with probability-flow ODE samples of the
exact denoiser at the same times on top.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from diffjax import commandline, plotting, processes, samplers, toy
from diffjax.processes import Process

Array = jax.Array
# sigma / alpha of the inner columns of --evolution; the outer ones are t_max (noise) and t = 0 (data)
EVOLUTION_RATIOS = (1.0, 0.5, 0.2)
EVOLUTION_POINTS = 600  # samples drawn over each heat map (all --num of them go into the statistics)


@dataclasses.dataclass(frozen=True)
class Evolution:
    """What `--evolution` draws: per column (noise first), its time, the diffused density on a pixel
    grid of the square [-lim, lim]^2 (row 0 at y = +lim) and the ODE samples at that time."""

    times: np.ndarray  # (C,)
    densities: np.ndarray  # (C, size, size), each a probability density (integrates to ~1 over the plane)
    samples: np.ndarray  # (C, num, 2)
    lim: float


def evolution_times(process: Process, ratios: tuple[float, ...] = EVOLUTION_RATIOS) -> np.ndarray:
    """Column times from noise to data: t_max, the times where sigma / alpha equals each ratio, then 0."""
    inner = [float(process.time_at_ratio(jnp.float32(r))) for r in ratios]
    return np.asarray([process.t_max, *inner, 0.0], np.float32)


@partial(jax.jit, static_argnames=("process", "num"))
def ode_snapshots(mixture: toy.GaussianMixture, process: Process, key: Array, num: int, times: Array) -> Array:
    """(C, num, D): probability-flow ODE samples (diffrax Tsit5, as the `ode` sampler) of the mixture's
    exact denoiser at the decreasing `times` (t_max first); a last time 0 gets the x0 estimate at t_min."""
    den = mixture.denoiser(process)
    drift = samplers.probability_flow_drift(den, process, None)
    x_T = process.prior_std() * jax.random.normal(key, (num, mixture.dim))
    save = jnp.maximum(times, process.t_min)  # within [t_min, t_max]; t = 0 is reached by denoising
    with jax.default_matmul_precision(samplers.ODE_PRECISION):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, _: drift(t, y)),
            diffrax.Tsit5(),
            t0=process.t_max,
            t1=process.t_min,
            dt0=(process.t_min - process.t_max) / 50,
            y0=x_T,
            saveat=diffrax.SaveAt(ts=save),
            stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-5),
            max_steps=4096,
        )
        ys = sol.ys
        x0 = samplers.predict(den, process, ys[-1], jnp.float32(process.t_min), None, "x0")
    assert ys is not None  # SaveAt(ts=...) saves
    return jnp.where((times <= 0)[:, None, None], x0[None], ys)


def diffused_density(mixture: toy.GaussianMixture, process: Process, t: float, points: Array) -> Array:
    """q_t(points): the closed-form density of the mixture diffused to time t (t = 0: the mixture)."""
    alpha, sigma = process.coefficients(jnp.float32(t))
    return jnp.exp(mixture.diffused(alpha, sigma).log_prob(points))


def evolution(
    mixture: toy.GaussianMixture,
    process: Process,
    key: Array,
    num: int,
    *,
    times: np.ndarray | None = None,
    size: int = 220,
    lim: float | None = None,
) -> Evolution:
    """The densities and ODE samples of `--evolution` (default times: `evolution_times(process)`)."""
    if process.discrete:
        raise ValueError(f"--evolution needs a continuous process (an ODE and closed-form times), not {process.name!r}")
    times = evolution_times(process) if times is None else np.asarray(times, np.float32)
    lim = float(lim or max(3.0, 1.5 * float(jnp.abs(mixture.means).max())))
    points = jnp.asarray(plotting.pixel_centres(lim, size), jnp.float32)
    densities = np.stack([np.asarray(diffused_density(mixture, process, float(t), points)) for t in times])
    samples = np.asarray(ode_snapshots(mixture, process, key, num, jnp.asarray(times)))
    return Evolution(times, densities.reshape(len(times), size, size), samples, lim)


def _evolution(args, process: Process, mixture: toy.GaussianMixture) -> int:
    start = time.perf_counter()
    try:
        evo = evolution(mixture, process, jax.random.key(args.seed), args.num)
    except ValueError as err:
        commandline.usage_error("diffjax demo", str(err))
    elapsed = time.perf_counter() - start
    panels = []
    for t, density, x in zip(evo.times, evo.densities, evo.samples):
        alpha, sigma = (float(v) for v in process.coefficients(jnp.float32(t)))
        panels.append((f"t = {t:.3g}, sigma/alpha = {sigma / alpha:.3g}", density, x[:EVOLUTION_POINTS]))
    plotting.heatmap_strip_png(panels, args.evolution, evo.lim)
    stats = toy.mode_statistics(mixture, evo.samples[-1])
    print(
        f"probability-flow ODE on {args.process}: {args.num} samples at t = {[round(float(t), 4) for t in evo.times]} "
        f"in {elapsed:.2f}s (compile included)"
    )
    print(
        f"at t = 0: mode weights {np.round(stats['weights'], 3).tolist()}; "
        f"mean per-mode std {np.nanmean(stats['stds']):.4f} (true {float(mixture.stds[0]):.4g})"
    )
    print(f"wrote {args.evolution}")
    return 0


def main(argv: list[str]) -> int:
    parser = commandline.Parser("diffjax demo", __doc__)
    parser.add_argument("--process", default="vp", choices=sorted(processes.REGISTRY))
    parser.add_argument("--sampler", default="dpm_solver++", choices=sorted(samplers.SAMPLERS))
    parser.add_argument("--steps", type=commandline.positive_int, default=20)
    parser.add_argument("--spacing", default="logsnr", choices=processes.SPACINGS)
    parser.add_argument("--num", type=commandline.positive_int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="samples.png")
    parser.add_argument(
        "--evolution",
        default=None,
        metavar="OUT.png",
        help="instead of the scatter: the diffused density at five times, noise to data, with probability-flow "
        "ODE samples of the exact denoiser drawn on it (a PNG strip; --sampler, --steps, --spacing unused)",
    )
    args = parser.parse(argv)

    process = processes.get(args.process)
    mixture = toy.eight_gaussians()
    if args.evolution is not None:
        return _evolution(args, process, mixture)
    opts = {} if args.sampler == "ode" else {"spacing": args.spacing}
    start = time.perf_counter()
    x, info = samplers.sample(
        args.sampler, mixture.denoiser(process), process, jax.random.key(args.seed), (args.num, 2), args.steps, **opts
    )
    samples = np.asarray(x)  # waits for the device
    elapsed = time.perf_counter() - start
    truth = mixture.sample(jax.random.key(args.seed + 1), args.num)
    sw = float(toy.sliced_wasserstein(x, truth, jax.random.key(7)))
    stats = toy.mode_statistics(mixture, samples)
    title = f"{args.sampler} on {args.process}, {info['nfe']} NFE"
    plotting.scatter_png([("8 Gaussians: true samples", np.asarray(truth)), (title, samples)], args.out)
    print(f"{title}: {args.num} samples in {elapsed:.2f}s (compile included)")
    print(
        f"sliced W2 to fresh true samples: {sw:.4f}; mode weights {np.round(stats['weights'], 3).tolist()}; "
        f"mean per-mode std {np.nanmean(stats['stds']):.4f} (true 0.1)"
    )
    print(f"wrote {args.out}")
    return 0
