"""Trainer loop overhead: steps/s of the full `diffjax train` loop (grain input, host->device
batches, the fused jitted step, JSONL/TensorBoard logging, progress bar) against the bare jitted
step fed one pre-built device batch, on the same model and config; with --gcs instead the loop on a
gs:// workdir (fake-gcs-server on loopback, logs shipped in the background every second) against
the loop on a local workdir, same run.

With --fingerprint: the cost of a log line's data fingerprint (the source indices of 100 global
batches of 4096, hashed, plus one process's order check) against looking the same positions up
through a grain shuffle + repeat, the way it was done before diffjax.data_order.

    python benchmarks/trainer.py [--config configs/digits.py] [--steps 400] [--gcs | --fingerprint]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffjax import data, info, train, trainer  # noqa: E402


def bare_rate(config, steps: int) -> float:
    mesh = trainer.make_mesh(config)
    process = trainer.build_process(config)
    state, shardings, graphdef, rest = trainer.init_state(config, mesh)
    step = trainer.make_train_step(config, graphdef, rest, process, shardings, mesh)
    k = int(config.training.n_jitted_steps)
    it = data.make_iterator(config, "train", seed=0)
    local = np.stack([next(it)["x"] for _ in range(k)])
    batch = {"x": jax.make_array_from_process_local_data(trainer.batch_sharding(mesh, 1), local)}
    state, losses = step(state, batch)  # compile
    losses.block_until_ready()
    start = time.perf_counter()
    for _ in range(steps // k):
        state, losses = step(state, batch)
    losses.block_until_ready()
    return (steps // k) * k / (time.perf_counter() - start)


def loop_rate(config_path: str, overrides: list[str], steps: int, log_freq: int, bucket: str | None = None) -> float:
    """Mean steps/s of the log windows after the first; `bucket`: train into gs://bucket/<fresh>."""
    with tempfile.TemporaryDirectory() as local:
        workdir = local if bucket is None else f"gs://{bucket}/{os.path.basename(local)}"
        args = [
            "--config",
            config_path,
            "--workdir",
            workdir,
            f"--config.training.n_iters={steps + log_freq}",
            f"--config.training.log_freq={log_freq}",
            "--config.training.snapshot_freq=0",
            "--config.training.eval_freq=0",
            "--no_progress",
            "--log_upload_s=1",
            *overrides,
        ]
        train.main(args)
        from diffjax import storage

        logs = [json.loads(line) for line in storage.path(workdir, "metrics.jsonl").read_text().splitlines()]
    rates = [m["steps_per_sec"] for m in logs if "steps_per_sec" in m][1:]  # the first window holds the compile
    return float(np.mean(rates))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "digits.py"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--log_freq", type=int, default=50)
    parser.add_argument(
        "--gcs", action="store_true", help="instead: the loop on a local vs a gs:// workdir (fake-gcs-server)"
    )
    parser.add_argument("--fingerprint", action="store_true", help="instead: the data fingerprint's cost per log line")
    args, overrides = parser.parse_known_args()
    if args.gcs:
        return gcs_rows(args, overrides)
    if args.fingerprint:
        return fingerprint_rows()
    config = info.load_config(args.config, overrides)
    print(f"backend: {jax.default_backend()}, devices: {jax.device_count()}, config: {args.config} {overrides}")
    parser_repeats = 2  # alternate the two measurements and keep each one's best (other load on the machine)
    bare = full = 0.0
    for _ in range(parser_repeats):
        bare = max(bare, bare_rate(config, args.steps))
        full = max(full, loop_rate(args.config, overrides, args.steps, args.log_freq))
    b = int(config.training.batch_size)
    print(f"\n{'':<34} {'steps/s':>8} {'img/s':>8}")
    print(f"{'bare jitted step (fixed batch)':<34} {bare:>8.2f} {bare * b:>8.0f}")
    print(f"{'full diffjax train loop':<34} {full:>8.2f} {full * b:>8.0f}")
    print(f"loop overhead: {100 * (1 - full / bare):.1f}% (goal <= 5%)")


def fingerprint_rows(global_batch: int = 4096, log_freq: int = 100) -> None:
    """ms per log line of data.GlobalOrder + data.fingerprint (+ check), for a digits-size and a
    CIFAR-10-size train split; the grain-lookup baseline measured on one global batch."""
    import grain

    from diffjax import data_order

    print(f"global batch {global_batch}, log_freq {log_freq}")
    print(f"{'examples':>9} {'fingerprint + check (ms/log line)':>34} {'grain lookups, 1 batch (ms)':>28}")
    for n in (1437, 50000):
        order = data_order.GlobalOrder(data_order.Order(n, seed=7, shuffle=True, repeat=True), global_batch)
        start, best = 10_000, float("inf")
        for rep in range(3):
            t = time.perf_counter()
            first = start + rep * log_freq
            data_order.fingerprint(order.indices(first, log_freq))
            order.check(first, order.indices(first, 1)[0][:512], range(512))
            best = min(best, time.perf_counter() - t)
        old = grain.MapDataset.range(n).shuffle(seed=7).repeat()
        t = time.perf_counter()
        [old[i] for i in range(start * global_batch, (start + 1) * global_batch)]
        print(f"{n:>9} {best * 1e3:>34.1f} {(time.perf_counter() - t) * 1e3:>28.1f}")


def gcs_rows(args, overrides: list[str]) -> None:
    """The loop on a local workdir and on a gs:// one, alternated twice, best of each."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from gcs_emulator import GcsEmulator

    from diffjax import storage

    config = info.load_config(args.config, overrides)
    with GcsEmulator() as gcs:
        gcs.create_bucket("bench")
        os.environ.update(gcs.env({}))
        storage.configure()
        local = remote = 0.0
        for _ in range(2):
            local = max(local, loop_rate(args.config, overrides, args.steps, args.log_freq))
            remote = max(remote, loop_rate(args.config, overrides, args.steps, args.log_freq, bucket="bench"))
    b = int(config.training.batch_size)
    print(f"\n{'':<44} {'steps/s':>8} {'img/s':>8}")
    print(f"{'full loop, local workdir':<44} {local:>8.2f} {local * b:>8.0f}")
    print(f"{'full loop, gs:// workdir (emulator)':<44} {remote:>8.2f} {remote * b:>8.0f}")
    print(f"gs:// overhead: {100 * (1 - remote / local):.1f}% (goal <= 5%)")


if __name__ == "__main__":
    main()
