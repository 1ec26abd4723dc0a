"""Train-step throughput on the CPU, diffjax (JAX/Flax NNX) vs diffusers (PyTorch): the 35.7M DDPM
CIFAR-10 UNet (--model ddpm_unet, the default) or DiT-S/2 on 32x32x4 latents (--model dit_s2).

One training step = eps-MSE loss at x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (linear DDPM
betas 1e-4..0.02, t uniform in 1..1000), forward + backward, clip_by_global_norm(1) + Adam(2e-4),
EMA(0.9999) of the parameters. Batch 16 of 32x32x3 float32 on the CPU (UNet).

DiT-S/2 (Peebles & Xie 2023: hidden 384, depth 12, 6 heads, patch 2, learned sigma, 1000 classes)
on 32x32x4 float32 latents (a 256x256 image through the SD VAE), random class labels; the loss is
the MSE of the eps half of the output (the variance half gets no gradient in either peer).
  JAX:   diffjax's `dit` network (model.size='S'), the same jitted step as the UNet's.
  Torch: diffusers DiTTransformer2DModel(6 heads x 64, 12 layers, in 4, out 8, patch 2,
         ada_norm_zero, 1000 classes), the same plain loop; attention through SDPA.

  JAX:   configs/ddpm_cifar10.py network, params from nnx.split, one jax.jit'ed step with
         donate_argnums (params, optimizer state and EMA are updated in place).
  Torch: diffusers UNet2DModel(block_out_channels=(128, 256, 256, 256), AttnDownBlock2D /
         AttnUpBlock2D at 16x16, layers_per_block=2, dropout 0.1) = 35,746,307 parameters,
         a plain loop with torch.optim.Adam (foreach), clip_grad_norm_ and a foreach EMA.

Also prints the achieved FLOP/s of the JAX step (XLA cost-analysis FLOPs / step time) over a
measured f32 matmul peak (a large jnp.dot). Peer install: pip install torch==2.13.0 diffusers.

  python benchmarks/train_step.py [--model ddpm_unet|dit_s2] [--batch 16] [--steps 10] [--repeat 1] [--skip-torch]

Run it on an otherwise idle machine: each run prints the CPU time other processes used while it
was timed ("foreign load"); anything above ~0.05 cpus invalidates the numbers (with one busy
competing process the torch step slowed from ~4 s to 18-28 s, the JAX step to ~8 s).

Findings on 2 Zen 4 cores (jax 0.10.2, XLA CPU with YNNPACK convolutions): the step is ~3/4
convolutions, which XLA runs at ~190 GFLOP/s (forward, input gradient) and ~155 GFLOP/s (kernel
gradient) in isolation, on par with the jnp.dot peak. Tried without gain: XLA flags
(--xla_cpu_enable_fast_math, --xla_cpu_enable_concurrency_optimized_scheduler,
--xla_cpu_experimental_xnn_graph_fusion_mode=GREEDY, --xla_cpu_experimental_ynn_fusion_type=
+eltwise, oneDNN fusion types), im2col + dot, 9 shifted dots and Winograd F(2x2, 3x3)
convolutions (70-120 GFLOP/s), tap-wise or im2col kernel gradients, the 'rbg' PRNG for dropout.
Helped: a one-pass GroupNorm (-4% step time); donate_argnums; no rematerialisation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from diffjax import models  # noqa: E402
from diffjax.info import load_config  # noqa: E402

T, LR, EMA, CLIP = 1000, 2e-4, 0.9999, 1.0
LATENT = (32, 32, 4)  # DiT's input: the SD VAE's latents of a 256x256 image (H, W, C)
# DiT's named sizes (Peebles & Xie 2023, Table 1): (hidden, depth, heads)
DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def alpha_bars() -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, T, dtype=np.float64)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# JAX
# ------------------------------------------------------------------------------------------------


def dit_config(size: str, **model: object):
    """A diffjax config training DiT-`size`/2 (model.size: 'S', 'B', 'L', 'XL') on 32x32x4 latents:
    DDPM's linear betas, 1000 classes, learned sigma, eps loss; `model` sets further config.model
    fields (e.g. hidden_size, num_res_blocks, num_heads for a tiny network; dtype; remat)."""
    from configs import default
    from diffjax import configuration

    config = default.get_default_configs()
    config.process = default.process("ddpm", num_scales=1000, schedule="linear", beta_start=1e-4, beta_end=0.02)
    config.data.image_size, config.data.num_channels = LATENT[0], LATENT[2]
    config.data.random_flip = False
    config.model = default.model_block(config, "dit")
    config.model.update(dict(size=size, patch_size=2, num_classes=1000, learn_sigma=True))
    config.model.update(model)
    config.training.loss = "eps"
    configuration.validate(config)
    return config


def make_jax_step(overrides=(), model_name: str = "ddpm_unet"):
    """(jitted step(params, opt_state, ema, x0, labels, key), state, param count, input shape)."""
    if model_name == "dit_s2":
        config = dit_config("S", **_parse_overrides(overrides))
    else:
        config = load_config(os.path.join(ROOT, "configs", "ddpm_cifar10.py"), list(overrides))
    channels = int(config.data.num_channels)
    model = models.create(config.model, nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.chain(optax.clip_by_global_norm(CLIP), optax.adam(LR))
    opt_state = tx.init(params)
    ema = jax.tree.map(jnp.copy, params)
    abar = jnp.asarray(alpha_bars())

    def loss_fn(params, x0, labels, key):
        k_t, k_eps, k_drop = jax.random.split(key, 3)
        t = jax.random.randint(k_t, (x0.shape[0],), 1, T + 1)
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        a = abar[t - 1][:, None, None, None]
        x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps
        net = nnx.merge(graphdef, params, rest)
        out = net(x_t, (t - 1).astype(jnp.float32), labels, train=True, rngs=nnx.Rngs(dropout=k_drop))
        return jnp.mean(jnp.square(out[..., :channels] - eps))  # learned sigma: the eps half

    def step(params, opt_state, ema, x0, labels, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, x0, labels, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: EMA * e + (1.0 - EMA) * p, ema, params)
        return params, opt_state, ema, loss

    state = (params, opt_state, ema)
    shape = (int(config.data.image_size), int(config.data.image_size), channels)
    return jax.jit(step, donate_argnums=(0, 1, 2)), state, models.param_count(params), shape


def _parse_overrides(overrides) -> dict:
    """{field: value} of `--config.model.field=value` overrides (the DiT config is built in code)."""
    import ast

    out = {}
    for o in overrides:
        key, _, value = o.removeprefix("--config.model.").partition("=")
        if not o.startswith("--config.model.") or not value:
            raise SystemExit(f"--override: the DiT step takes --config.model.FIELD=VALUE, got {o!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def bench_jax(batch, steps, warmup, overrides=(), rng_impl="threefry2x32", model_name="ddpm_unet"):
    step, state, n_params, shape = make_jax_step(overrides, model_name)
    x0 = jax.random.uniform(jax.random.key(1), (batch, *shape), minval=-1, maxval=1)
    labels = jax.random.randint(jax.random.key(3), (batch,), 0, 1000) if model_name == "dit_s2" else None
    t0 = time.perf_counter()
    compiled = step.lower(*state, x0, labels, jax.random.key(0, impl=rng_impl)).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"])
    key = jax.random.key(2, impl=rng_impl)
    for i in range(warmup):
        *state, loss = compiled(*state, x0, labels, jax.random.fold_in(key, i))
    jax.block_until_ready(loss)
    times = []
    with ForeignLoad() as load:
        for i in range(steps):
            t0 = time.perf_counter()
            *state, loss = compiled(*state, x0, labels, jax.random.fold_in(key, 1000 + i))
            jax.block_until_ready(loss)
            times.append(time.perf_counter() - t0)
    assert np.isfinite(float(loss))
    return dict(n_params=n_params, times=times, flops=flops, compile_s=compile_s, load=load.value)


def matmul_peak(n=4096, reps=5):
    """f32 GFLOP/s of a large jnp.dot (XLA's CPU matmul, all threads)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    best = min(_timeit(lambda: f(a, b).block_until_ready()) for _ in range(reps))
    return 2 * n**3 / best


class ForeignLoad:
    """Average number of CPUs used by *other* processes while the block runs (from /proc/stat);
    a run with foreign load well above 0 was disturbed and its timing is not trustworthy."""

    def __enter__(self):
        self.busy, self.own, self.wall = _busy_seconds(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.wall
        self.value = max(0.0, (_busy_seconds() - self.busy) - (time.process_time() - self.own)) / wall


def _busy_seconds():
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _timeit(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# PyTorch + diffusers
# ------------------------------------------------------------------------------------------------


def diffusers_ddpm_unet(nf: int = 128):
    """diffusers' UNet2DModel in the DDPM CIFAR-10 layout (google/ddpm-cifar10-32): 35,746,307
    parameters at nf=128."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from torch_peers import bare_torchvision

    bare_torchvision()  # diffusers imports torchvision when installed; the PyPI wheel fails under CPU torch
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(nf, 2 * nf, 2 * nf, 2 * nf),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=0.1,
    )


def diffusers_dit(size: str = "S", hidden: int | None = None, depth: int | None = None, heads: int | None = None):
    """diffusers' DiTTransformer2DModel as DiT-`size`/2 on 32x32x4 latents (learned sigma: 8 output
    channels, 1000 classes); hidden / depth / heads override the named size (tiny --quick networks)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from torch_peers import bare_torchvision

    bare_torchvision()
    from diffusers import DiTTransformer2DModel

    h, d, n = DIT_SIZES[size]
    h, d, n = hidden or h, depth or d, heads or n
    return DiTTransformer2DModel(
        num_attention_heads=n,
        attention_head_dim=h // n,
        in_channels=LATENT[2],
        out_channels=2 * LATENT[2],
        num_layers=d,
        sample_size=LATENT[0],
        patch_size=2,
        num_embeds_ada_norm=1000,
    )


def dit_forward(model, x_t, t):
    """A DiTTransformer2DModel's eps prediction (the first half of its channels) at random labels."""
    import torch

    labels = torch.randint(0, 1000, (x_t.shape[0],), device=x_t.device)
    return model(x_t, timestep=t, class_labels=labels).sample[:, : x_t.shape[1]]


def torch_train_step(model, batch: int, device: str = "cpu", bf16: bool = False, shape=(3, 32, 32), forward=None):
    """The same training step as the JAX one for a diffusers UNet2DModel `model` (eager or
    torch.compile'd): eps-MSE at a uniform t, backward, clip_grad_norm_(1), Adam(2e-4) (foreach on
    the CPU, fused on CUDA), EMA(0.9999) of the parameters; bf16: forward under bf16 autocast.
    `shape`: one input (C, H, W); `forward(model, x_t, t)`: the eps prediction (default: a
    UNet2DModel's; dit_forward for a DiTTransformer2DModel)."""
    import torch

    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=LR, **({"fused": True} if device == "cuda" else {"foreach": True}))
    abar = torch.from_numpy(alpha_bars()).to(device)
    x0 = torch.rand(batch, *shape, device=device) * 2 - 1
    forward = forward or (lambda m, x, t: m(x, t).sample)

    def step():
        t = torch.randint(1, T + 1, (batch,), device=device)
        eps = torch.randn_like(x0)
        a = abar[t - 1].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            out = forward(model, x_t, t - 1)
        loss = torch.mean((out.float() - eps) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - EMA)
        return loss

    return step


def bench_torch(batch, steps, warmup, threads, model_name="ddpm_unet"):
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    dit = model_name == "dit_s2"
    net = diffusers_dit("S") if dit else diffusers_ddpm_unet()
    net.train()
    n_params = sum(p.numel() for p in net.parameters())
    if dit:
        step = torch_train_step(net, batch, shape=(LATENT[2], *LATENT[:2]), forward=dit_forward)
    else:
        step = torch_train_step(net, batch)

    for _ in range(warmup):
        step()
    times = []
    with ForeignLoad() as load:
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
    assert np.isfinite(float(loss.detach()))
    return dict(n_params=n_params, times=times, version=f"torch {torch.__version__}", load=load.value)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ddpm_unet", choices=("ddpm_unet", "dit_s2"), help="the network")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="alternate JAX/torch runs this many times")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--override", action="append", default=[], help="--config.model.x=y for the JAX net")
    p.add_argument("--rng-impl", default="threefry2x32", help="JAX PRNG for t, eps and dropout (e.g. rbg)")
    args = p.parse_args(argv)

    print(
        f"{args.model}: jax {jax.__version__} ({jax.devices()[0].platform}, {os.cpu_count()} cpus), batch {args.batch}, "
        f"{args.steps} timed steps after {args.warmup} warm-up, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    peak = matmul_peak()
    rows = []
    for r in range(args.repeat):
        j = bench_jax(args.batch, args.steps, args.warmup, args.override, args.rng_impl, args.model)
        j_med = statistics.median(j["times"])
        rows.append(("diffjax (JAX, jit)", j["n_params"], j_med, j["flops"] / j_med))
        print(
            f"  run {r}: JAX   median {j_med * 1e3:8.1f} ms/step  (compile {j['compile_s']:.1f}s, "
            f"min {min(j['times']) * 1e3:.1f} ms, foreign load {j['load']:.2f} cpus)",
            flush=True,
        )
        if not args.skip_torch:
            t = bench_torch(args.batch, args.steps, args.warmup, args.threads, args.model)
            t_med = statistics.median(t["times"])
            rows.append((f"diffusers ({t['version']})", t["n_params"], t_med, j["flops"] / t_med))
            print(
                f"  run {r}: torch median {t_med * 1e3:8.1f} ms/step  (min {min(t['times']) * 1e3:.1f} ms, "
                f"foreign load {t['load']:.2f} cpus)",
                flush=True,
            )

    print(
        f"\nXLA cost analysis: {j['flops'] / 1e9:.1f} GFLOP per step ({j['flops'] / args.batch / 1e9:.2f} "
        f"per example); f32 matmul peak (jnp.dot 4096^2): {peak / 1e9:.1f} GFLOP/s\n"
    )
    print(f"| {'implementation':<28} | {'params':>11} | {'ms/step':>8} | {'img/s':>6} | {'GFLOP/s':>7} | {'of peak':>7} |")
    print(f"|{'-' * 30}|{'-' * 13}|{'-' * 10}|{'-' * 8}|{'-' * 9}|{'-' * 9}|")
    for name, n, med, fps in rows:
        print(
            f"| {name:<28} | {n:>11,} | {med * 1e3:>8.1f} | {args.batch / med:>6.2f} | {fps / 1e9:>7.1f} | "
            f"{fps / peak:>6.0%} |"
        )
    if not args.skip_torch:
        jax_ips = [args.batch / r[2] for r in rows if r[0].startswith("diffjax")]
        torch_ips = [args.batch / r[2] for r in rows if r[0].startswith("diffusers")]
        print(
            f"\nratio JAX / torch img/s: {statistics.median(jax_ips) / statistics.median(torch_ips):.2f} "
            f"(median over {args.repeat} run(s); torch GFLOP/s uses the same XLA FLOP count)"
        )


if __name__ == "__main__":
    main()
