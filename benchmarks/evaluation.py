"""Evaluation throughput: Inception features/s (diffjax vs pytorch-fid, f32, same batch, same
weights) and samples/s of evaluation-scale generation (`diffjax sample --out_dir`).

The FID Inception runs with random weights (pytorch-fid's network with its download swapped for a
random state dict, as in tests/torch_peers.py): speed does not depend on the weights' values, and
the two outputs are compared on the timed batch. Images are random uint8 32x32 (CIFAR-10 size),
resized to 299 inside both networks.

    python benchmarks/evaluation.py [--num 400] [--batch 10] [--gen_num 2000] [--skip-torch]

Needs the test extra (torch==2.13.0 CPU, pytorch-fid) for the peer row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def _best(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def inception_rows(num: int, batch: int, repeats: int, skip_torch: bool, precisions: list[str]):
    """One (ours, pytorch-fid) pair of rows per precision: 'highest' is exact f32 (cuDNN TF32 off in
    torch); 'default' lets both use TF32 convolutions where the GPU has them (torch's own default)."""
    import torch
    from torch_peers import fid_inception_peer

    from diffjax.evaluation import inception, inception_weights

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count())
    net, inner = fid_inception_peer(seed=0)
    net = net.to(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "random_inception.pth")
        torch.save(inner.state_dict(), path)
        weights = inception_weights.load_pytorch_fid_weights(path)
    images = np.random.default_rng(0).integers(0, 256, (num, 32, 32, 3), dtype=np.uint8)
    rows, diffs = [], {}
    for precision in precisions:
        model = inception.create(weights, precision=precision)
        ours = lambda: inception.features(model, images, batch)  # noqa: E731
        t0 = time.perf_counter()
        pool_ours, _ = ours()
        first = time.perf_counter() - t0
        best, med = _best(ours, repeats)
        rows.append((f"diffjax (JAX, jit, NHWC), precision {precision}", num / med, num / best, first))
        if skip_torch:
            continue
        torch.backends.cudnn.allow_tf32 = precision != "highest"
        torch.backends.cuda.matmul.allow_tf32 = False  # torch's default: the fc stays f32

        def peer():
            out = []
            with torch.no_grad():
                for i in range(0, num, batch):
                    x = torch.from_numpy(images[i : i + batch]).to(device).permute(0, 3, 1, 2).float() / 255
                    out.append(net(x)[0].flatten(1))
                return torch.cat(out).cpu().numpy()  # synchronises, as our features() returns host arrays

        t0 = time.perf_counter()
        pool_peer = peer()
        first = time.perf_counter() - t0
        best, med = _best(peer, repeats)
        tf32 = "TF32 convs" if torch.backends.cudnn.allow_tf32 and device == "cuda" else "f32"
        rows.append((f"pytorch-fid (torch {torch.__version__}, {device}, {tf32})", num / med, num / best, first))
        diffs[precision] = float(np.max(np.abs(pool_ours - pool_peer)) / np.max(np.abs(pool_peer)))
    return rows, diffs


def generation_row(num: int, shard_size: int, steps: int):
    import jax
    from server import ensure_workdir

    from diffjax.evaluation import generate
    from diffjax.workdir import Workdir

    workdir = ensure_workdir(None)
    w = Workdir(workdir, inference=True)
    state, step = w.restore(only=("ema",))
    out = tempfile.mkdtemp(prefix="diffjax-gen-")
    t0 = time.perf_counter()
    protocol = generate.write_samples(
        w, state, step, out, num, sampler="ddim", steps=steps, shard_size=shard_size, progress=False
    )
    wall = time.perf_counter() - t0
    return dict(num=num, wall=wall, samples_s=num / wall, nfe=protocol["nfe"], devices=jax.device_count())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=400, help="images through the Inception per timed run")
    p.add_argument("--batch", type=int, default=10, help="both networks' batch (XLA:CPU is fastest near 10)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gen_num", type=int, default=2000, help="samples of the generation row (0: skip)")
    p.add_argument("--gen_steps", type=int, default=100)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument(
        "--precisions", default="highest", help="comma-separated inception.create precisions (GPU: highest,default)"
    )
    args = p.parse_args()
    import jax

    print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices, {os.cpu_count()} cpus)")
    precisions = args.precisions.split(",")
    rows, diffs = inception_rows(args.num, args.batch, args.repeats, args.skip_torch, precisions)
    print(f"\nFID Inception-v3, {args.num} random 32x32 uint8 images -> 299x299, batch {args.batch}, float32\n")
    print("| implementation | features/s (median) | features/s (best) | first run incl. compile (s) |")
    print("|---|---:|---:|---:|")
    for name, med, best, first in rows:
        print(f"| {name} | {med:.1f} | {best:.1f} | {first:.1f} |")
    for i, precision in enumerate(diffs):
        print(
            f"\nprecision {precision}: ratio diffjax / pytorch-fid (median) {rows[2 * i][1] / rows[2 * i + 1][1]:.2f}; "
            f"max |pool3 difference| / max |pool3| = {diffs[precision]:.1e}"
        )
    if args.gen_num:
        g = generation_row(args.gen_num, min(1000, args.gen_num), args.gen_steps)
        print(
            f"\n`diffjax sample --out_dir` on the digits model (ddim, {args.gen_steps} steps, NFE {g['nfe']}, "
            f"{g['devices']} device(s)): {g['num']} samples in {g['wall']:.1f} s = {g['samples_s']:.0f} samples/s "
            "(compile included)"
        )


if __name__ == "__main__":
    main()
