"""Sampler benchmark on the 8-Gaussians oracle: quality (sliced W2 to truth) and speed per NFE,
plus the same 1000-step DDPM ancestral run through diffusers' DDPMScheduler (PyTorch, CPU,
Python loop over steps) with the same exact denoiser, for the speed ratio.

    python benchmarks/samplers.py [--num 10000] [--repeats 3]

Needs the `bench` extra (torch==2.13.0 CPU, diffusers) for the peer rows.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import numpy as np

from diffjax import processes, samplers, toy


def _time(fn, repeats):
    fn()  # warm-up (compiles)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def ours(mixture, truth, num, repeats):
    rows = []
    cases = [
        ("ancestral", "ddpm", 1000, {}),
        ("ancestral", "ddpm", 100, {}),
        ("ddim", "ddpm", 50, {}),
        ("ddim", "vp", 50, {"spacing": "logsnr"}),
        ("pc", "ve", 500, {}),
        ("pc", "ve", 1000, {}),
        ("ode", "vp", 10, {}),
        ("dpm_solver++", "vp", 10, {}),
        ("dpm_solver++", "vp", 10, {"spacing": "logsnr"}),
        ("dpm_solver++", "vp", 20, {"spacing": "logsnr"}),
        ("dpm_solver++", "edm", 20, {"spacing": "logsnr"}),
        ("heun", "edm", 18, {}),
        ("heun", "vp", 18, {"spacing": "karras"}),
    ]
    for name, pname, steps, opts in cases:
        p = processes.get(pname)
        den = mixture.denoiser(p)
        run = lambda: jax.block_until_ready(samplers.sample(name, den, p, jax.random.key(1), (num, 2), steps, **opts))
        start = time.perf_counter()
        x, info = run()
        first = time.perf_counter() - start
        wall = _time(run, repeats)
        sw = float(toy.sliced_wasserstein(x, truth, jax.random.key(7)))
        label = f"{name}" + (f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else "")
        rows.append((f"diffjax {label}", pname, info["nfe"], sw, first, wall, num / wall))
    return rows


def diffusers_ancestral(mixture, truth, num, repeats):
    import torch
    from diffusers import DDPMScheduler

    torch.set_num_threads(2)
    means = torch.tensor(np.asarray(mixture.means))
    stds = torch.tensor(np.asarray(mixture.stds))
    logw = torch.log(torch.tensor(np.asarray(mixture.weights)))
    sched = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
        variance_type="fixed_small",
    )

    def exact_eps(x, t):  # the same closed form as diffjax.toy, diffusers' step t is our step t + 1
        abar = sched.alphas_cumprod[t]
        a, s = abar.sqrt(), (1 - abar).sqrt()
        var = a**2 * stds**2 + s**2
        diff = x[:, None, :] - a * means[None]
        logits = logw - 0.5 * (diff**2).sum(-1) / var - x.shape[1] * 0.5 * torch.log(2 * math.pi * var)
        resp = torch.softmax(logits, dim=-1)
        score = -(resp[..., None] * diff / var[:, None]).sum(1)
        return -s * score

    def run():
        gen = torch.Generator().manual_seed(0)
        sched.set_timesteps(1000)
        x = torch.randn(num, 2, generator=gen)
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(exact_eps(x, t), t, x, generator=gen).prev_sample
        return x

    wall = _time(run, repeats)
    x = run().numpy()
    sw = float(toy.sliced_wasserstein(x, np.asarray(truth), jax.random.key(7)))
    return ("diffusers DDPMScheduler ancestral (torch loop)", "ddpm", 1000, sw, wall, wall, num / wall)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, nargs="+", default=[10000, 256, 64])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    mixture = toy.eight_gaussians()
    print(f"backend: {jax.default_backend()}, devices: {jax.device_count()}, jax {jax.__version__}")
    for num in args.num:
        truth = mixture.sample(jax.random.key(100), num)
        floor = np.mean(
            [
                float(toy.sliced_wasserstein(mixture.sample(jax.random.key(200 + i), num), truth, jax.random.key(7)))
                for i in range(10)
            ]
        )
        rows = ours(mixture, truth, num, args.repeats)
        try:
            rows.append(diffusers_ancestral(mixture, truth, num, args.repeats))
        except ImportError as err:
            print(f"(peer skipped: {err}; install the bench extra)")
        print(f"\n{num} samples; sliced W2 between two true sample sets (mean of 10): {floor:.4f}")
        header = f"{'sampler':<52} {'process':<7} {'NFE':>5} {'SW2':>7} {'1st call s':>10} {'wall s':>8} {'samples/s':>11}"
        print(header + "\n" + "-" * len(header))
        for r in rows:
            print(f"{r[0]:<52} {r[1]:<7} {r[2]:>5} {r[3]:>7.4f} {r[4]:>10.3f} {r[5]:>8.3f} {r[6]:>11.0f}")
        ours_1000 = next(r for r in rows if r[0] == "diffjax ancestral" and r[2] == 1000)
        peer = [r for r in rows if r[0].startswith("diffusers")]
        if peer:
            print(
                f"1000-step ancestral speed-up over diffusers' loop: {peer[0][5] / ours_1000[5]:.1f}x "
                f"(steady state), {peer[0][5] / ours_1000[4]:.1f}x (including our compile)"
            )


if __name__ == "__main__":
    main()
