"""Sampling a workdir's network, and the `diffjax sample` command.

`generate` draws samples of a network's weights with the config's sampler (or a given one),
`save_samples` writes a PNG grid (a scatter for 2-D data) and an .npz; `diffjax sample` does both
for a workdir's newest checkpoint, or writes an evaluation-scale shard set (`--out_dir`,
diffjax.evaluation.generate). Training-time hooks (sample grids at snapshots, eval loss) are in
diffjax.snapshots; opening a workdir is diffjax.workdir.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import commandline, distributed, guidance, plotting, processes, samplers, storage
from diffjax.workdir import Workdir, load_workdir

__all__ = [
    "host_array",
    "data_range",
    "config_sampler",
    "generate",
    "is_image_data",
    "output_range",
    "clip_output",
    "save_samples",
    "main",
]

Array = jax.Array


def host_array(x: Array) -> np.ndarray:
    """A replicated (or fully addressable) array as numpy on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def data_range(config) -> tuple[float, float]:
    return (-1.0, 1.0) if config.data.centered else (0.0, 1.0)


def config_sampler(config, sampler: str | None, steps: int | None, opts: dict) -> tuple[str, int, dict]:
    """(sampler, steps, options): the given ones, else the config's sampling block (for 'pc', the
    predictor, corrector, snr and corrector steps not given in opts; for 'ancestral' and 'ddim',
    sampling.clip_x0 = True clips the x0 estimate to the data range; for 'ancestral',
    sampling.variance, passed on when it is not the default 'fixed_small')."""
    sampler = sampler or config.sampling.sampler
    steps = int(steps or config.sampling.num_steps)
    s = config.sampling
    variance = s.get("variance", "fixed_small")
    processes.check_variance(variance, "sampling.variance")
    if sampler == "ancestral" and variance != "fixed_small" and "variance" not in opts:
        opts = {**opts, "variance": variance}
    if sampler == "pc":  # options not given explicitly come from the config
        opts = {
            **dict(predictor=s.predictor, corrector=s.corrector, snr=float(s.snr), n_steps_each=int(s.n_steps_each)),
            **opts,
        }
    if sampler == "ode" and "ode_solver" in s and "solver" not in opts:  # e.g. dopri5 (Rectified Flow's RK45)
        opts = {**opts, "solver": s.ode_solver}
    if sampler in ("ancestral", "ddim") and s.get("clip_x0", False) and "clip_x0" not in opts:
        opts = {**opts, "clip_x0": data_range(config)}
    return sampler, steps, opts


def generate(
    config,
    graphdef,
    rest,
    process,
    weights,
    num: int,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    labels=None,
    guidance_scale=None,
    wrap=None,
    **opts,
) -> np.ndarray:
    """`num` samples from the network with params `weights`, clipped by `output_range` (images only).

    The batch is split over every device of every process (the config's mesh; padded to a multiple
    of the device count), so a sample grid or a training-time FID set does not run whole on each
    chip. Example i's noise is fold_in(key(seed), i), as in one unsharded call. `wrap(denoiser)`, if
    given, replaces the network's denoiser (classifier guidance: diffjax.guidance)."""
    from diffjax import network, trainer

    den = network.network_denoiser(graphdef, rest, process, config, weights)
    den = den if wrap is None else wrap(den)
    sampler, steps, opts = config_sampler(config, sampler, steps, opts)
    mesh = trainer.make_mesh(config)
    padded = -(-num // mesh.devices.size) * mesh.devices.size
    order = np.arange(padded, dtype=np.int32)
    sharding = trainer.batch_sharding(mesh)
    indices = jax.make_array_from_callback((padded,), sharding, lambda i: order[i])
    if labels is not None:
        given = np.asarray(labels, np.int32).reshape(-1)
        filled = np.concatenate([given, np.repeat(given[-1:], padded - num)])
        labels = jax.make_array_from_callback((padded,), sharding, lambda i: filled[i])
    shape = (padded, *network.data_shape(config))
    x, _ = samplers.sample(
        sampler,
        den,
        process,
        jax.random.PRNGKey(seed),
        shape,
        steps,
        cond=labels,
        guidance_scale=guidance_scale,
        indices=indices,
        **opts,
    )
    return clip_output(config, host_array(x)[:num])


def is_image_data(config) -> bool:
    """Whether the config's samples are images (H, W, C) of 8-bit pixels mapped to `data_range`,
    rather than points such as the 2-D toys' (an mlp's (D,) vectors, which have no bounded range)."""
    from diffjax import network

    return len(network.data_shape(config)) == 3


def output_range(config) -> tuple[float, float] | None:
    """The range final samples are clipped to: `data_range` for image data, None (no clipping) for
    other data. The one rule of every output: `generate` (so `diffjax sample` and the snapshots'
    grids) and the server's FLOAT32 and PNG responses."""
    return data_range(config) if is_image_data(config) else None


def clip_output(config, x: np.ndarray) -> np.ndarray:
    """Final samples `x` clipped by `output_range(config)` (unchanged where it is None)."""
    bounds = output_range(config)
    return x if bounds is None else np.clip(x, *bounds)


def save_samples(x: np.ndarray, out: str, data_range: tuple[float, float]) -> tuple[str, str | None]:
    """Write a PNG (grid for images, scatter for 2-D data) and an .npz beside it."""
    out_path = storage.path(out)
    npz = str(out_path.parent / (out_path.stem + ".npz"))  # local or gs://
    storage.save_npz(npz, samples=x)
    if x.ndim == 2:
        plotting.scatter_png([("samples", x)], out)
    else:
        scale = max(1, 256 // (int(np.ceil(np.sqrt(len(x)))) * x.shape[1]))
        plotting.save_png(plotting.image_grid(x, data_range, scale=scale), out)
    return out, npz


def main(argv: list[str]) -> int:
    parser = commandline.Parser("diffjax sample", "Sample from the latest checkpoint (EMA).")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num", type=commandline.positive_int, default=64)
    parser.add_argument("--sampler", default=None, choices=sorted(samplers.SAMPLERS))
    parser.add_argument("--steps", type=commandline.positive_int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--spacing",
        default=None,
        choices=processes.SPACINGS,
        help="time grid of the sampler (default: its own); 'leading' = DDIM's / diffusers' T//N skip (ddpm)",
    )
    parser.add_argument("--label", type=int, default=None, help="class label for every sample (conditional models)")
    parser.add_argument("--guidance_scale", type=float, default=None)
    guidance.add_flags(parser)
    parser.add_argument("--out", default="grid.png")
    parser.add_argument(
        "--out_dir",
        default=None,
        help="instead of one grid: a uint8 .npz shard set for evaluation (sharded over all devices, "
        "resumable; see diffjax.evaluation.generate)",
    )
    parser.add_argument("--shard_size", type=commandline.positive_int, default=1000, help="samples per shard with --out_dir")
    parser.add_argument(
        "--quantize",
        default="round",
        choices=("round", "floor"),
        help="uint8 rounding with --out_dir: round (EDM, diffusers) or floor (score_sde)",
    )
    parser.add_argument("--no_progress", action="store_true")
    commandline.add_ema_flag(parser)
    args = distributed.parse(parser, argv)  # --tpu / --coordinator_address: every host takes part, process 0 writes
    from diffjax import compile_cache

    compile_cache.enable()
    if args.out_dir is not None:
        storage.check_writable(args.out_dir, parser.prog, "--out_dir")
        return _sample_set(args)
    storage.check_writable(storage.path(args.out).parent, parser.prog, "--out", args.out)
    config, graphdef, rest, process, state, step = load_workdir(args.workdir, only=("ema",), ema=args.ema)
    labels = None if args.label is None else jnp.full((args.num,), args.label, jnp.int32)
    wrap = guidance.from_flags(args, config, parser.prog, labels)
    opts = {} if args.spacing is None else {"spacing": args.spacing}
    start = time.perf_counter()
    try:
        x = generate(
            config,
            graphdef,
            rest,
            process,
            state["ema"],
            args.num,
            sampler=args.sampler,
            steps=args.steps,
            seed=args.seed,
            labels=labels,
            guidance_scale=args.guidance_scale,
            wrap=wrap,
            **opts,
        )
    except ValueError as err:
        commandline.usage_error(parser.prog, str(err))
    if jax.process_index() != 0:
        return 0  # process 0 writes
    png, npz = save_samples(x, args.out, data_range(config))
    rate = config.training.ema_rate if args.ema is None else args.ema
    print(f"{args.num} samples from step {step} (EMA {rate}) in {time.perf_counter() - start:.1f}s -> {png}, {npz}")
    return 0


def _sample_set(args) -> int:
    """`diffjax sample --out_dir`: the evaluation-scale shard set."""
    from diffjax.evaluation import generate

    w = Workdir(args.workdir, inference=True, ema=args.ema)
    state, step = w.restore(only=("ema",))
    label = None if args.label is None else [args.label]  # --classifier without --label: labels drawn (eval sets)
    guide = guidance.from_flags(args, w.config, "diffjax sample", label, need_labels=False)
    try:
        protocol = generate.write_samples(
            w,
            state,
            step,
            args.out_dir,
            args.num,
            sampler=args.sampler,
            steps=args.steps,
            seed=args.seed,
            shard_size=args.shard_size,
            quantize_rule=args.quantize,
            label=args.label,
            guidance_scale=args.guidance_scale,
            progress=not args.no_progress,
            guide=guide,
            **({} if args.spacing is None else {"spacing": args.spacing}),
        )
    except ValueError as err:
        commandline.usage_error("diffjax sample", str(err))
    print(
        f"{args.num} samples of step {step} (EMA {w.ema_rate}, {protocol['sampler']}, {protocol['steps']} steps) in "
        f"{args.out_dir} ({protocol['seconds_this_run']:.1f}s this run)"
    )
    return 0
