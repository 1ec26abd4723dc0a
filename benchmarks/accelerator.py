"""Accelerator benchmark: the numbers a user sizes a launch with, on whatever backend JAX sees.

One table (printed, and written as JSON with --out) of:
  train    img/s, MFU, peak device memory and compile time of one training step (diffjax's own
           trainer.make_train_step: loss, grad, optax chain, EMA, buffers donated) for
           configs/ddpm_cifar10.py (35.7M) and configs/vp/cifar10_ddpmpp_continuous.py (61.8M),
           batch --batch per device, compute dtype float32 and bfloat16 (params, optimiser
           state and EMA stay float32);
  sample   samples/s of DDIM-100 and Heun-18 on the 35.7M UNet at batch --sample_batch;
  server   samples/s and p50/p99 latency of `diffjax serve` under 64 concurrent clients (50-step
           DDIM) against max-batch 1, on the digits model and on the 35.7M UNet;
  torch    the peer, where torch and diffusers import: diffusers UNet2DModel in the same DDPM
           layout, trained by a plain loop (Adam, clip, EMA) in bf16 autocast, eager and
           torch.compile'd, same batch.
  dit      the train step of DiT-B/2 (130M) and DiT-XL/2 (675M) on 32x32x4 latents (1000 classes,
           learned sigma, eps loss), bf16 compute, model.remat none and block, batch --dit_batch
           per device: img/s, MFU of the model FLOPs (remat's recomputation not counted), the
           compiled program's memory (arguments + outputs + temporaries, less donated buffers);
           and its peer, diffusers DiTTransformer2DModel at the same sizes (SDPA attention, bf16
           autocast, the plain loop above), eager and torch.compile'd.
  inception  FID Inception-v3 features/s (random weights; 32x32 images resized to 299).

MFU = the network's forward + backward FLOPs per step (XLA cost analysis of the HLO, as `diffjax
info` prints them) / step time / the device's peak: the datasheet dense peak (diffjax.flops.PEAKS)
for known accelerators (bf16; TF32 for float32 on NVIDIA, whose default f32 matmuls are TF32),
otherwise the f32 matmul rate measured in the same run. Every case runs in its own process
(clean peak-memory counters, a crashed case does not stop the rest).

    python benchmarks/accelerator.py [--out accel.json] [--only train,sample,server,torch,dit]
    python benchmarks/accelerator.py --quick      # tiny sizes: the whole command in minutes on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from accelerator_cases import (  # noqa: E402  (benchmarks/ is on sys.path above)
    CONFIGS,
    DIT_SIZES,
    case_dit,
    case_inception,
    case_info,
    case_sample,
    case_torch,
    case_train,
    case_workdir,
)


def case_server(model: str, args) -> dict:
    from server import ensure_workdir, load

    from diffjax.serving.subprocess_server import ServerProcess

    tmp = tempfile.mkdtemp(prefix="diffjax-accel-")
    if model == "digits":
        workdir = ensure_workdir(os.path.join(tmp, "digits"))
    else:
        workdir = os.path.join(tmp, model)
        _run_case(["workdir", model, workdir], args, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    samples = args.server_samples[model]
    rows = {}
    for slots in args.slots:
        flags = [f"--batch_slots={slots}", "--reload_s=0"]
        t0 = time.perf_counter()
        with ServerProcess(workdir, *flags, cwd=ROOT, timeout=600) as server:
            start_s = time.perf_counter() - t0
            r = load(server.addr, args.clients, samples, args.server_steps, deadline_s=600)
        rows[str(slots)] = dict(
            samples_s=r["samples_per_s"], p50_s=r["p50"], p99_s=r["p99"], step_calls=r["steps_run"], start_s=start_s
        )
        print(f"  {model} batch_slots={slots}: {r['samples_per_s']:.1f} samples/s", file=sys.stderr, flush=True)
    base = rows[str(args.slots[0])]["samples_s"]
    return dict(
        clients=args.clients,
        samples_per_client=samples,
        steps=args.server_steps,
        slots=rows,
        best_ratio=max(r["samples_s"] for r in rows.values()) / base,
    )


def _plan(args) -> list[list[str]]:
    """The cases of each part of --only, in the order given."""
    parts = {
        "train": [["train", name, dt] for name in args.train_configs for dt in args.dtypes],
        "sample": [["sample", s, dt] for s in args.samplers for dt in args.dtypes],
        "inception": [["inception"]],
        "server": [["server", m] for m in args.server_models],
        "torch": [["torch", "eager"], ["torch", "compile"]],
        "dit": [
            *(["dit", size, remat] for size in args.dit_sizes for remat in args.dit_remat),
            *(["dit_torch", size, mode] for size in args.dit_sizes for mode in args.dit_peers),
        ],
    }
    return [case for part in args.only for case in parts[part]]


def _forward(args) -> list[str]:
    out = [
        f"--batch={args.batch}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--sample_batch={args.sample_batch}",
        f"--ddim_steps={args.ddim_steps}",
        f"--heun_steps={args.heun_steps}",
        f"--clients={args.clients}",
        f"--server_steps={args.server_steps}",
        f"--inception_batch={args.inception_batch}",
        f"--dit_batch={args.dit_batch}",
        "--slots",
        *map(str, args.slots),
    ]
    if args.server_samples_per_client:
        out.append(f"--server_samples_per_client={args.server_samples_per_client}")
    return out + (["--quick"] if args.quick else [])


def _run_case(case: list[str], args, env=None) -> dict:
    """Run one case in a child process; its result is the last stdout line starting with RESULT."""
    cmd = [sys.executable, os.path.abspath(__file__), "--case", *case, *_forward(args)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.case_timeout)
    except subprocess.TimeoutExpired as err:
        tail = (
            (err.stderr or b"").decode(errors="replace").strip().splitlines()[-6:]
            if isinstance(err.stderr, bytes)
            else (err.stderr or "").strip().splitlines()[-6:]
        )
        return dict(error=f"timed out after {args.case_timeout} s: " + " | ".join(tail))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        return dict(error=f"exit {proc.returncode}: " + " | ".join(tail))
    result = json.loads(lines[-1][len("RESULT ") :])
    result["wall_s"] = time.perf_counter() - t0
    return result


def _jax_row(case: list[str]) -> list[str]:
    """The case of the JAX rows a peer case is measured against (its FLOPs, its speed)."""
    return ["dit", case[1]] if case[0] == "dit_torch" else ["train", "ddpm_cifar10", "bfloat16"]


def _peer_mfu(res: dict, results: list[dict], case: list[str]) -> None:
    """The peer's TFLOP/s and MFU from the same network's FLOPs and bf16 peak (the JAX train rows)."""
    ref = [
        r["result"] for r in results if r["case"][: len(_jax_row(case))] == _jax_row(case) and "flops_per_img" in r["result"]
    ]
    if ref:
        res["tflops"] = res["img_s"] * ref[0]["flops_per_img"] / 1e12
        res["mfu"] = res["tflops"] * 1e12 / ref[0]["peak_flops"]


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(results: list[dict]) -> None:
    print("\n| case | size | img/s or samples/s | ms/step | MFU | peak mem (GiB) | compile (s) | note |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        name, res = " ".join(r["case"]), r["result"]
        if "error" in res or "skipped" in res:
            print(f"| {name} | | | | | | | {res.get('error') or res.get('skipped')} |")
        elif r["case"][0] == "train":
            print(
                f"| {name} | {res['params'] / 1e6:.1f}M, batch {res['batch']} | {res['img_s']:,.0f} | "
                f"{res['ms_per_step']:.1f} | {res['mfu']:.1%} | {_fmt(res['peak_mem_gib'], '.2f')} | "
                f"{res['compile_s']:.1f} | {res['tflops']:.1f} TFLOP/s vs {res['peak_src']} |"
            )
        elif r["case"][0] == "dit":
            print(
                f"| dit DiT-{r['case'][1]}/2 remat {res['remat']} | {res['params'] / 1e6:.1f}M, batch {res['batch']} | "
                f"{res['img_s']:,.0f} | {res['ms_per_step']:.1f} | {res['mfu']:.1%} | "
                f"{_fmt(res['peak_mem_gib'], '.2f')} | {res['compile_s']:.1f} | "
                f"compiled {_fmt(res['compiled_mem_gib'], '.2f')} GiB; {res['tflops']:.2f} TFLOP/s vs {res['peak_src']} |"
            )
        elif r["case"][0] == "dit_torch":
            print(
                f"| dit_torch DiT-{r['case'][1]}/2 {r['case'][2]} (diffusers, bf16 autocast, SDPA) | "
                f"{res['params'] / 1e6:.1f}M, batch {res['batch']} | {res['img_s']:,.0f} | {res['ms_per_step']:.1f} | "
                f"{_fmt(res.get('mfu'), '.1%')} | {_fmt(res['peak_mem_gib'], '.2f')} | {res['warmup_s']:.1f} | "
                f"{res['version']} |"
            )
        elif r["case"][0] == "sample":
            print(
                f"| {name} | batch {res['batch']}, nfe {res['nfe']} | {res['samples_s']:,.1f} | | | "
                f"{_fmt(res['peak_mem_gib'], '.2f')} | {res['first_call_s']:.1f} | {res['s_per_batch']:.2f} s/batch |"
            )
        elif r["case"][0] == "inception":
            print(
                f"| {name} (FID Inception-v3, 32->299) | batch {res['batch']} | {res['features_s']:,.1f} | | | "
                f"{_fmt(res['peak_mem_gib'], '.2f')} | {res['first_call_s']:.1f} | features/s |"
            )
        elif r["case"][0] == "torch":
            print(
                f"| {name} (diffusers, bf16 autocast) | {res['params'] / 1e6:.1f}M, batch {res['batch']} | "
                f"{res['img_s']:,.0f} | {res['ms_per_step']:.1f} | {_fmt(res.get('mfu'), '.1%')} | "
                f"{_fmt(res['peak_mem_gib'], '.2f')} | "
                f"{res['warmup_s']:.1f} | {res['version']} |"
            )
        elif r["case"][0] == "server":
            for slots, s in res["slots"].items():
                label = "max-batch 1" if slots == "1" else f"{slots} slots"
                print(
                    f"| server {r['case'][1]} {label} | {res['clients']} clients x {res['samples_per_client']}, "
                    f"{res['steps']}-step DDIM | {s['samples_s']:,.1f} | | | | {s['start_s']:.1f} | "
                    f"p50 {s['p50_s']:.2f} s, p99 {s['p99_s']:.2f} s |"
                )
            print(f"| server {r['case'][1]} best / max-batch 1 | | {res['best_ratio']:.1f}x | | | | | |")
    jax_bf16 = [
        r["result"].get("img_s")
        for r in results
        if r["case"][:3] == ["train", "ddpm_cifar10", "bfloat16"] and "img_s" in r["result"]
    ]
    peer = [r["result"]["img_s"] for r in results if r["case"][0] == "torch" and "img_s" in r["result"]]
    if jax_bf16 and peer:
        print(f"\nddpm_cifar10 bf16 train: diffjax / best PyTorch peer = {jax_bf16[0] / max(peer):.2f}x")
    for size in dict.fromkeys(r["case"][1] for r in results if r["case"][0] == "dit"):
        ours = [r["result"]["img_s"] for r in results if r["case"][:2] == ["dit", size] and "img_s" in r["result"]]
        theirs = [r["result"]["img_s"] for r in results if r["case"][:2] == ["dit_torch", size] and "img_s" in r["result"]]
        if ours and theirs:
            print(f"DiT-{size}/2 bf16 train: best diffjax / best PyTorch peer = {max(ours) / max(theirs):.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--only",
        default="train,sample,inception,server,torch,dit",
        help="comma-separated subset of train,sample,inception,server,torch,dit",
    )
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--train_configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--samplers", default="ddim,heun", help="comma-separated subset of ddim,heun")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    p.add_argument("--batch", type=int, default=None, help="train batch per device (default 128; quick 4)")
    p.add_argument("--steps", type=int, default=None, help="timed train steps (default 50; quick 2)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--sample_batch", type=int, default=None, help="default 1024; quick 4")
    p.add_argument("--ddim_steps", type=int, default=None)
    p.add_argument("--heun_steps", type=int, default=None)
    p.add_argument("--inception_batch", type=int, default=200, help="Inception features batch")
    p.add_argument("--clients", type=int, default=None, help="concurrent server clients (default 64; quick 4)")
    p.add_argument("--server_steps", type=int, default=None)
    p.add_argument("--server_samples_per_client", type=int, default=None, help="default 2 (64 clients x 2 = 128 in flight)")
    p.add_argument("--server_models", default=None, help="comma-separated: digits,ddpm_cifar10")
    p.add_argument("--slots", type=int, nargs="+", default=None, help="server batch_slots; the first is the baseline")
    p.add_argument("--dit_sizes", default=",".join(DIT_SIZES), help="comma-separated DiT sizes: B,XL (patch 2)")
    p.add_argument("--dit_remat", default="none,block", help="comma-separated model.remat of the DiT rows")
    p.add_argument("--dit_peers", default="eager,compile", help="comma-separated PyTorch DiT peer modes (or none)")
    p.add_argument("--dit_batch", type=int, default=None, help="DiT train batch per device (default 64; quick 2)")
    p.add_argument("--case_timeout", type=float, default=1800)
    p.add_argument("--case", nargs="+", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    defaults = dict(
        batch=(4, 128),
        dit_batch=(2, 64),
        steps=(2, 50),
        warmup=(1, 5),
        sample_batch=(4, 1024),
        ddim_steps=(4, 100),
        heun_steps=(3, 18),
        clients=(4, 64),
        server_steps=(5, 50),
        slots=([1, 4], [1, 128]),
        server_models=("digits", "digits,ddpm_cifar10"),
    )
    for k, (quick, full) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if q else full)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - {"train", "sample", "inception", "server", "torch", "dit"}
    if unknown:
        p.error(f"--only: unknown part(s) {sorted(unknown)}; choose from train,sample,inception,server,torch,dit")
    args.dtypes = [s.strip() for s in args.dtypes.split(",")]
    if set(args.dtypes) - {"float32", "bfloat16"}:
        p.error(f"--dtypes: each must be float32 or bfloat16, got {args.dtypes}")
    args.server_models = [s.strip() for s in args.server_models.split(",")]
    for name, allowed in (
        ("train_configs", tuple(CONFIGS)),
        ("samplers", ("ddim", "heun")),
        ("server_models", ("digits", "ddpm_cifar10")),
        ("dit_sizes", DIT_SIZES),
        ("dit_remat", ("none", "block", "dots")),
        ("dit_peers", ("eager", "compile", "none")),
    ):
        value = (
            [v.strip() for v in getattr(args, name).split(",")]
            if isinstance(getattr(args, name), str)
            else getattr(args, name)
        )
        if not value or set(value) - set(allowed):
            p.error(f"--{name}: each must be one of {','.join(allowed)}, got {','.join(value)}")
        setattr(args, name, value)
    args.dit_peers = [m for m in args.dit_peers if m != "none"]
    n = args.server_samples_per_client
    args.server_samples = {"digits": n or 2, "ddpm_cifar10": n or 2}

    if args.case:
        kind, *rest = args.case
        fn = {
            "train": lambda: case_train(*rest, args),
            "sample": lambda: case_sample(*rest, args),
            "workdir": lambda: case_workdir(*rest, q),
            "server": lambda: case_server(*rest, args),
            "torch": lambda: case_torch(*rest, args),
            "dit": lambda: case_dit(*rest, args),
            "dit_torch": lambda: case_torch(rest[1], args, dit=rest[0]),
            "inception": lambda: case_inception(args),
            "info": lambda: case_info(args),
        }[kind]
        try:
            result = fn()
        except ImportError as err:
            result = dict(skipped=f"not importable: {err}")
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    info = _run_case(["info"], args)  # the driver itself never touches the device (no memory held)
    print(
        f"{info['device_kind']} x{info['devices']} ({info['backend']}), jax {info['jax']}, {info['cpus']} cpus"
        + (", --quick" if q else ""),
        flush=True,
    )
    results = []
    for case in _plan(args):
        print(f"-- {' '.join(case)}", flush=True)
        res = _run_case(case, args)
        if case[0] in ("torch", "dit_torch") and "img_s" in res:
            _peer_mfu(res, results, case)
        print(f"   {json.dumps(res)}", flush=True)
        results.append(dict(case=case, result=res))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(info=info, results=results), f, indent=1)
    print_table(results)
    failed = [r for r in results if "error" in r["result"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
