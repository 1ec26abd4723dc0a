"""A paper's evaluation protocol at full size, end to end, timed: `diffjax eval --workdir` on a
freshly initialised workdir of a paper config (50,000 samples with the config's sampler and NFE,
uint8 shards, FID + IS on the FID Inception), as a user runs it.

No data, released weights or Inception weights are needed (none can be downloaded here): the network
and the Inception get random weights and the reference statistics come from random images, so the
FID / IS values mean nothing; the wall times are those of the real protocol (speed does not depend
on the weights' values). The command runs twice: the first run generates and scores, the second
finds every shard written and only scores (`diffjax eval` resumes), which splits the wall time into
generation and metrics.

    python benchmarks/eval_protocol.py [--config configs/edm/cifar10_ddpmpp.py] [--num 50000]
        [--ref_num 10000] [--sampler heun --steps 18] [--out result.json] [--config.a.b=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # accelerator.py: random weights


def setup(tmp: str, config: str, ref_num: int, overrides: list[str]) -> None:
    import jax
    from accelerator_cases import random_inception_weights, random_workdir

    from diffjax.configuration import load_config
    from diffjax.evaluation import evaluate

    params = random_workdir(load_config(config, overrides), os.path.join(tmp, "workdir"))
    weights = os.path.join(tmp, "inception.npz")
    with open(weights, "wb") as f:  # a torch-free weights file, as `diffjax eval convert-inception` writes
        np.savez(f, **random_inception_weights())
    images = np.random.default_rng(1).integers(0, 256, (ref_num, 32, 32, 3), dtype=np.uint8)
    evaluate.write_reference_stats(images, os.path.join(tmp, "reference.npz"), "random", "none", weights)
    info = dict(params=params, backend=jax.default_backend(), device=jax.devices()[0].device_kind)
    with open(os.path.join(tmp, "setup.json"), "w") as f:
        json.dump(dict(info, devices=jax.device_count(), jax=jax.__version__), f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs/edm/cifar10_ddpmpp.py"))
    p.add_argument("--num", type=int, default=50000)
    p.add_argument("--ref_num", type=int, default=10000, help="random reference images for the statistics")
    p.add_argument("--sampler", default=None, help="default: the config's")
    p.add_argument("--steps", type=int, default=None, help="default: the config's")
    p.add_argument("--shard_size", type=int, default=5000)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--setup", default=None, help=argparse.SUPPRESS)  # the child process that builds the inputs
    args, overrides = p.parse_known_args()  # --config.a.b=value: the workdir config's overrides
    if args.setup:
        return setup(args.setup, args.config, args.ref_num, overrides)
    # Every JAX computation runs in a child process: this one holds no accelerator memory.
    tmp = tempfile.mkdtemp(prefix="diffjax-protocol-")
    workdir, ref = os.path.join(tmp, "workdir"), os.path.join(tmp, "reference.npz")
    weights = os.path.join(tmp, "inception.npz")
    t0 = time.perf_counter()
    setup_cmd = [sys.executable, __file__, f"--setup={tmp}", f"--config={args.config}", f"--ref_num={args.ref_num}"]
    subprocess.run([*setup_cmd, *overrides], check=True, cwd=ROOT)
    with open(os.path.join(tmp, "setup.json")) as f:
        info = json.load(f)
    params = info.pop("params")
    print(f"workdir ({params:,} params), weights and reference statistics in {time.perf_counter() - t0:.1f} s")

    cmd = [sys.executable, "-m", "diffjax", "eval", f"--workdir={workdir}", f"--num={args.num}", f"--ref={ref}"]
    cmd += [f"--inception_weights={weights}", f"--shard_size={args.shard_size}", "--no_progress"]
    cmd += [f"--sampler={args.sampler}"] * bool(args.sampler) + [f"--steps={args.steps}"] * bool(args.steps)
    walls = []
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        walls.append(time.perf_counter() - t0)
    records = sorted(os.listdir(os.path.join(workdir, "eval")))
    record = json.load(open(os.path.join(workdir, "eval", [r for r in records if r.endswith(".json")][0])))
    proto = record["protocol"]
    result = dict(
        info,
        config=os.path.relpath(args.config, ROOT),
        params=params,
        num=args.num,
        sampler=proto["sampler"],
        steps=proto["steps"],
        nfe=proto["nfe"],
        first_run_s=walls[0],
        metrics_only_run_s=walls[1],
        generation_s=walls[0] - walls[1],
        samples_s=args.num / (walls[0] - walls[1]),
        metrics=record["metrics"],
    )
    print(
        f"\n{result['config']} ({params:,} params), {args.num} samples, {result['sampler']} {result['steps']} steps "
        f"(NFE {result['nfe']}) on {info['devices']} x {info['device']}:\n"
        f"  `diffjax eval --workdir` end to end: {walls[0]:.0f} s; again with the samples on disk "
        f"(load + Inception + FID/IS): {walls[1]:.0f} s; generation {result['generation_s']:.0f} s = "
        f"{result['samples_s']:.0f} samples/s (each run's compile and start included)"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
