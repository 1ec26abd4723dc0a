"""Sampling-server throughput: continuous batching versus one sample at a time.

64 concurrent clients each ask for 8 samples of 50-step DDIM from the digits model (configs/digits.py,
252,545 params) served by a real `diffjax serve` process on loopback. Run once with --batch_slots 64
(continuous batching) and once with --batch_slots 1 (max-batch 1: every sample runs alone). Reports
samples/s and p50/p99 request latency; goal: >= 8x the throughput of max-batch 1. The offline
sampler (samplers.sample, DDIM, the same weights) at each slot count is the ceiling the server is
compared with in the same run (goal: server >= 0.95x offline).

    python benchmarks/server.py [--workdir workdir/digits] [--clients 64] [--samples 8] [--steps 50]
    python benchmarks/server.py --mixed [--big 1024] [--clients 16] [--slots 64]   # fifo vs fair admission

Without --workdir (or if it has no checkpoint) a digits model is trained for 20 steps into a temporary
workdir: the speed of a step does not depend on how well the weights are trained. Every run is
bounded: a fixed request count and a deadline per request (--deadline_s).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffjax.serving import Client  # noqa: E402
from diffjax.serving.subprocess_server import ServerProcess  # noqa: E402


def ensure_workdir(workdir: str | None) -> str:
    if workdir and os.path.isdir(os.path.join(workdir, "checkpoints")):
        return workdir
    workdir = workdir or os.path.join(tempfile.mkdtemp(prefix="diffjax-bench-"), "digits")
    print(f"training configs/digits.py for 20 steps into {workdir} ...", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "diffjax",
            "train",
            "--config",
            os.path.join(ROOT, "configs/digits.py"),
            f"--workdir={workdir}",
            "--config.training.n_iters=20",
            "--config.training.snapshot_freq=20",
            "--config.training.eval_freq=0",
            "--no_progress",
        ],
        check=True,
        cwd=ROOT,
    )
    return workdir


def load(addr: str, clients: int, samples: int, steps: int, deadline_s: float) -> dict:
    """`clients` concurrent Sample calls; throughput over the whole wave and per-request latency."""
    with Client(addr, timeout=deadline_s) as client:
        client.sample(1, sampler="ddim", num_steps=steps)  # first call after SERVING: connection set up

        def one(i):
            t0 = time.perf_counter()
            x = client.sample(samples, sampler="ddim", num_steps=steps, seed=i)
            assert x.shape[0] == samples
            return time.perf_counter() - t0

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            latencies = np.array(list(pool.map(one, range(clients))))
        wall = time.perf_counter() - start
        status = client.status()
    return dict(
        wall=wall,
        samples_per_s=clients * samples / wall,
        p50=np.percentile(latencies, 50),
        p99=np.percentile(latencies, 99),
        steps_run=status.steps_run,
    )


def offline(workdir: str, batch: int, steps: int, total: int) -> float:
    """samples/s of samplers.sample (DDIM, `steps`) at the server's slot count, same weights: the
    ceiling the server's continuous batching is measured against (compile excluded)."""
    import jax

    from diffjax import network, samplers
    from diffjax.workdir import load_workdir

    config, graphdef, rest, process, state, _ = load_workdir(workdir, only=("ema",))
    den = network.network_denoiser(graphdef, rest, process, config, state["ema"])
    shape = (batch, *network.data_shape(config))
    run = lambda seed: samplers.sample("ddim", den, process, jax.random.PRNGKey(seed), shape, steps)[0]  # noqa: E731
    run(0).block_until_ready()  # compile
    rounds = max(1, -(-total // batch))
    start = time.perf_counter()
    for i in range(rounds):
        run(i + 1).block_until_ready()
    return rounds * batch / (time.perf_counter() - start)


def mixed(addr: str, big: int, small: int, steps: int, deadline_s: float) -> dict:
    """One `big`-sample request, then (once it occupies the slots) `small` 1-sample requests, one
    after another every 0.2 s: how long the small ones wait behind the big one."""
    with Client(addr, timeout=deadline_s) as client:
        client.sample(1, sampler="ddim", num_steps=steps)

        def timed(n, seed, delay=0.0):
            time.sleep(delay)
            t0 = time.perf_counter()
            client.sample(n, sampler="ddim", num_steps=steps, seed=seed)
            return time.perf_counter() - t0

        with concurrent.futures.ThreadPoolExecutor(small + 1) as pool:
            big_f = pool.submit(timed, big, 0)
            while client.status().busy_slots == 0:
                time.sleep(0.01)
            small_f = [pool.submit(timed, 1, 1 + i, 0.2 * i) for i in range(small)]
            latencies = np.array([f.result() for f in small_f])
            big_s = big_f.result()
    return dict(small_p50=np.percentile(latencies, 50), small_max=latencies.max(), big=big_s)


def main_mixed(args, workdir, env) -> None:
    rows = []
    for admission in ("fifo", "fair"):
        flags = [
            f"--batch_slots={args.slots[0]}",
            "--reload_s=0",
            f"--admission={admission}",
            f"--max_samples_per_request={max(1024, args.big)}",
        ]
        with ServerProcess(workdir, *flags, env=env, cwd=ROOT) as server:
            rows.append((admission, mixed(server.addr, args.big, args.clients, args.steps, args.deadline_s)))
    print(
        f"\none {args.big}-sample request, then {args.clients} 1-sample requests (one every 0.2 s), "
        f"{args.steps}-step DDIM, {args.slots[0]} slots, digits model ({os.cpu_count()} CPU cores)\n"
    )
    print("| admission | small requests p50 (s) | small requests max (s) | big request (s) |")
    print("|---|---:|---:|---:|")
    for admission, r in rows:
        print(f"| {admission} | {r['small_p50']:.2f} | {r['small_max']:.2f} | {r['big']:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--slots", type=int, nargs="+", default=[64, 128])
    p.add_argument("--deadline_s", type=float, default=600.0)
    p.add_argument("--admission", choices=("fifo", "fair"), default="fifo", help="the batched servers' slot order")
    p.add_argument(
        "--mixed",
        action="store_true",
        help="instead: one --big request then --clients 1-sample requests, fifo vs fair admission",
    )
    p.add_argument("--big", type=int, default=1024)
    args = p.parse_args()
    workdir = ensure_workdir(args.workdir)
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    if args.mixed:
        return main_mixed(args, workdir, env)
    rows = []
    for slots in [1, *args.slots]:
        flags = [f"--batch_slots={slots}", "--reload_s=0", f"--admission={args.admission}"]
        with ServerProcess(workdir, *flags, env=env, cwd=ROOT) as server:
            r = load(server.addr, args.clients, args.samples, args.steps, args.deadline_s)
        rows.append((slots, r))
        print(
            f"  batch_slots={slots}: {r['samples_per_s']:.1f} samples/s, p50 {r['p50']:.2f}s, p99 {r['p99']:.2f}s, "
            f"{r['steps_run']} step calls, {r['wall']:.1f}s",
            flush=True,
        )
    ceiling = {slots: offline(workdir, slots, args.steps, args.clients * args.samples) for slots in args.slots}
    base = rows[0][1]["samples_per_s"]
    print(
        f"\n{args.clients} clients x {args.samples} samples, {args.steps}-step DDIM, digits model "
        f"({os.cpu_count()} CPU cores)\n"
    )
    print(
        "| server | samples/s | p50 latency (s) | p99 latency (s) | step calls | throughput vs max-batch 1 "
        "| vs offline sampler at the same batch |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for slots, r in rows:
        name = "max-batch 1" if slots == 1 else f"continuous batching, {slots} slots ({args.admission})"
        vs = f"{r['samples_per_s'] / ceiling[slots]:.2f}x" if slots in ceiling else ""
        print(
            f"| {name} | {r['samples_per_s']:.1f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['steps_run']} | "
            f"{r['samples_per_s'] / base:.1f}x | {vs} |"
        )
    for slots, v in ceiling.items():
        print(f"| offline `samplers.sample`, batch {slots} | {v:.1f} | | | | {v / base:.1f}x | 1.00x |")


if __name__ == "__main__":
    main()
