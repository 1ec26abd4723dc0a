"""The cases of benchmarks/accelerator.py that measure one thing in one process (`accelerator.py
--case ...`): train (UNet configs), dit, sample, workdir, torch / dit_torch (PyTorch peers),
inception, info. Each returns the dict of its table row."""

from __future__ import annotations

import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {"ddpm_cifar10": "configs/ddpm_cifar10.py", "ddpmpp_vp": "configs/vp/cifar10_ddpmpp_continuous.py"}
# --quick: the same code paths on networks small enough for a CPU
QUICK_MODEL = {
    "ddpm_cifar10": ["--config.model.nf=32", "--config.model.ch_mult=(1,2)", "--config.model.num_res_blocks=1"],
    "ddpmpp_vp": ["--config.model.nf=16", "--config.model.num_res_blocks=1"],
}
DIT_SIZES = ("B", "XL")
# --quick: DiT-B/2 and DiT-XL/2 cut to (hidden, depth, heads) a CPU trains in seconds
QUICK_DIT = {"B": (64, 2, 4), "XL": (96, 3, 6)}


def _device_peak(dtype: str) -> tuple[float | None, str]:
    """(the first device's datasheet peak in `dtype` (diffjax.flops.PEAKS) or None, where it came from)."""
    import jax

    from diffjax.flops import device_peak

    kind = jax.devices()[0].device_kind
    peak = device_peak(kind, dtype)
    return (peak, f"{kind} datasheet") if peak is not None else (None, kind)


def _matmul_rate(dtype: str, n: int) -> float:
    """FLOP/s of an n^3 jnp.dot in `dtype` (median of 5 after a warm-up)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def _peak_memory() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# ---- cases (each runs in its own process) -------------------------------------------------------
def _config(name: str, quick: bool, extra=()):
    from diffjax.info import load_config

    return load_config(os.path.join(ROOT, CONFIGS[name]), [*(QUICK_MODEL[name] if quick else []), *extra])


def case_train(name: str, dtype: str, args) -> dict:
    import jax

    n_dev = jax.device_count()
    config = _config(
        name, args.quick, [f"--config.model.dtype={dtype}", f"--config.training.batch_size={args.batch * n_dev}"]
    )
    return _train_step_case(config, args.batch, dtype, args)


def _dit_config(size: str, remat: str, args):
    """DiT-`size`/2 on 32x32x4 latents at bf16 compute (train_step.dit_config); --quick: QUICK_DIT."""
    import jax
    from train_step import dit_config

    tiny = dict(zip(("hidden_size", "num_res_blocks", "num_heads"), QUICK_DIT[size])) if args.quick else {}
    config = dit_config(size, dtype="bfloat16", remat=remat, **tiny)
    config.training.batch_size = args.dit_batch * jax.device_count()
    return config


def case_dit(size: str, remat: str, args) -> dict:
    """DiT-`size`/2's train step at model.remat `remat`; MFU from the model FLOPs (remat 'none')."""
    from diffjax.info import training_flops

    config = _dit_config(size, remat, args)
    model_flops = training_flops(_dit_config(size, "none", args).model, (args.dit_batch, *_latent(config)))
    return dict(_train_step_case(config, args.dit_batch, "bfloat16", args, model_flops / args.dit_batch), remat=remat)


def _latent(config) -> tuple[int, ...]:
    from diffjax import trainer

    return tuple(trainer.data_shape(config))


def _train_step_case(config, batch: int, dtype: str, args, flops_per_img: float | None = None) -> dict:
    """One fused training step of `config` (trainer.make_train_step) at `batch` per device: speed,
    MFU (FLOPs: the network's forward + backward, or `flops_per_img` x the batch), memory."""
    import jax
    import numpy as np

    from diffjax import models, trainer
    from diffjax.info import training_flops

    n_dev = jax.device_count()
    mesh = trainer.make_mesh(config)
    state, shardings, graphdef, rest = trainer.init_state(config, mesh)
    process = trainer.build_process(config)
    step = trainer.make_train_step(config, graphdef, rest, process, shardings, mesh)
    shape = (1, batch * n_dev, *trainer.data_shape(config))
    rng = np.random.default_rng(0)
    batches = {"x": jax.device_put(rng.uniform(-1, 1, shape).astype(np.float32), trainer.batch_sharding(mesh, leading=1))}
    if int(config.model.get("num_classes", 0) or 0):
        labels = rng.integers(0, int(config.model.num_classes), shape[:2]).astype(np.int32)
        batches["label"] = jax.device_put(labels, trainer.batch_sharding(mesh, leading=1))
    t0 = time.perf_counter()
    compiled = step.lower(state, batches).compile()
    compile_s = time.perf_counter() - t0
    # network forward + backward (optimiser: <0.1%)
    flops = training_flops(config.model, shape[1:]) if flops_per_img is None else flops_per_img * shape[1]
    for _ in range(args.warmup):
        state, loss = compiled(state, batches)
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, loss = compiled(state, batches)
    jax.block_until_ready(loss)
    sec = (time.perf_counter() - t0) / args.steps
    assert np.isfinite(np.asarray(loss)).all(), "non-finite loss"
    peak, peak_src = _device_peak(dtype)
    if peak is None:
        peak, peak_src = _matmul_rate("float32", 2048 if args.quick else 4096) * n_dev, "measured f32 jnp.dot"
    params = models.param_count(state["params"])
    peak_total = peak * n_dev if "datasheet" in peak_src else peak
    args_batch = batch
    floats = [
        a
        for k in ("params", "ema", "opt_state")
        for a in jax.tree.leaves(state[k])
        if jax.numpy.issubdtype(a.dtype, jax.numpy.floating)
    ]
    return dict(
        params=params,
        batch=args_batch * n_dev,
        ms_per_step=sec * 1e3,
        img_s=args_batch * n_dev / sec,
        tflops=flops / sec / 1e12,
        mfu=flops / sec / peak_total,
        peak_src=peak_src,
        peak_flops=peak_total,
        flops_per_img=flops / (args_batch * n_dev),
        peak_mem_gib=_gib(_peak_memory()),
        compiled_mem_gib=_gib(_compiled_memory(compiled)),
        compile_s=compile_s,
        state_dtypes=sorted({str(a.dtype) for a in floats}),
    )


def _compiled_memory(compiled) -> int | None:
    """Bytes one device's compiled program holds at its peak: arguments + outputs + temporaries,
    less the donated (aliased) buffers (XLA's memory analysis; None where the backend has none)."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def case_sample(sampler: str, dtype: str, args) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from diffjax import models, samplers, trainer

    config = _config("ddpm_cifar10", args.quick, [f"--config.model.dtype={dtype}"])
    model = models.create(config.model, nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    process = trainer.build_process(config)
    den = trainer.network_denoiser(graphdef, rest, process, config, params.to_pure_dict())
    steps = {"ddim": args.ddim_steps, "heun": args.heun_steps}[sampler]
    shape = (args.sample_batch, *trainer.data_shape(config))

    def run(seed):
        x, info = samplers.sample(sampler, den, process, jax.random.key(seed), shape, steps)
        return jax.block_until_ready(x), info

    t0 = time.perf_counter()
    x, info = run(0)
    first_s = time.perf_counter() - t0
    times = []
    for seed in range(1, 3):
        t0 = time.perf_counter()
        x, _ = run(seed)
        times.append(time.perf_counter() - t0)
    assert np.isfinite(np.asarray(x)).all()
    sec = statistics.median(times)
    return dict(
        batch=args.sample_batch,
        steps=steps,
        nfe=info["nfe"],
        samples_s=args.sample_batch / sec,
        s_per_batch=sec,
        first_call_s=first_s,
        peak_mem_gib=_gib(_peak_memory()),
    )


def random_workdir(config, directory: str) -> int:
    """config.json + an orbax checkpoint (step 0) of freshly initialised weights (speed does not
    depend on the weights' values); returns the parameter count."""
    import jax
    import orbax.checkpoint as ocp

    from diffjax import trainer

    state, *_ = trainer.init_state(config, trainer.make_mesh(config))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    with ocp.CheckpointManager(os.path.abspath(os.path.join(directory, "checkpoints")), item_names=("state",)) as manager:
        manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        manager.wait_until_finished()
    return int(sum(a.size for a in jax.tree.leaves(state["params"])))


def case_workdir(name: str, directory: str, quick: bool) -> dict:
    """A servable workdir of random weights: the server's speed does not depend on their values."""
    return dict(params=random_workdir(_config(name, quick), directory))


def case_torch(mode: str, args, dit: str | None = None) -> dict:
    """The PyTorch peer's train step: the DDPM UNet2DModel, or DiT-`dit`/2 (DiTTransformer2DModel)."""
    import torch
    from train_step import LATENT, diffusers_ddpm_unet, diffusers_dit, dit_forward, torch_train_step

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if dit is None:
        net, batch, extra = diffusers_ddpm_unet(32 if args.quick else 128), args.batch, {}
    else:
        net = diffusers_dit(dit, *(QUICK_DIT[dit] if args.quick else ()))
        batch, extra = args.dit_batch, dict(shape=(LATENT[2], *LATENT[:2]), forward=dit_forward)
    net = net.to(dev).train()
    n_params = sum(p.numel() for p in net.parameters())
    step = torch_train_step(torch.compile(net) if mode == "compile" else net, batch, dev, bf16=True, **extra)

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(max(args.warmup, 3 if mode == "compile" else 1)):
        loss = step()
    sync()
    compile_s = time.perf_counter() - t0
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    sec = (time.perf_counter() - t0) / args.steps
    assert torch.isfinite(loss).item()
    mem = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    return dict(
        params=n_params,
        batch=batch,
        ms_per_step=sec * 1e3,
        img_s=batch / sec,
        peak_mem_gib=_gib(mem),
        warmup_s=compile_s,
        version=f"torch {torch.__version__}",
    )


def random_inception_weights() -> dict:
    """The FID Inception's state dict (the published file's keys and shapes) with random values of a
    realistic scale (BatchNorm variances near 1)."""
    import numpy as np

    from diffjax.evaluation import inception

    rng = np.random.default_rng(0)
    return {
        k: (rng.uniform(0.5, 1.5, s) if k.endswith(("running_var", "bn.weight")) else rng.normal(0, 0.05, s)).astype(
            np.float32
        )
        for k, s in inception.state_dict_shapes().items()
    }


def case_inception(args) -> dict:
    """FID Inception-v3 features/s at random weights (speed does not depend on their values)."""
    import numpy as np

    from diffjax.evaluation import inception

    rng = np.random.default_rng(0)
    model = inception.create(random_inception_weights())
    batch = 8 if args.quick else args.inception_batch
    images = rng.integers(0, 256, (batch * (1 if args.quick else 4), 32, 32, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    inception.features(model, images, batch)
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        pool, _ = inception.features(model, images, batch)
        times.append(time.perf_counter() - t0)
    assert np.isfinite(pool).all()
    return dict(
        batch=batch,
        num=len(images),
        features_s=len(images) / min(times),
        first_call_s=first_s,
        peak_mem_gib=_gib(_peak_memory()),
    )


def case_info(args) -> dict:
    import jax

    return dict(
        backend=jax.default_backend(),
        devices=jax.device_count(),
        device_kind=jax.devices()[0].device_kind,
        jax=jax.__version__,
        cpus=os.cpu_count(),
        quick=args.quick,
        date=time.strftime("%Y-%m-%d"),
    )


def _gib(n):
    return None if n is None else n / 2**30


# ---- driver -----------------------------------------------------------------------------------
