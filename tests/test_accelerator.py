"""Accelerator settings and the accelerator benchmark's CPU run (benchmarks/accelerator.py --quick)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from diffjax import info, likelihood, models, processes, samplers, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import accelerator_cases  # noqa: E402  (benchmarks/accelerator_cases.py: the quick model sizes)

OPS = re.compile(r"stablehlo\.(dot_general|convolution)\b[^\n]*")


def _unet_denoiser(process):
    config = info.load_config(os.path.join(ROOT, "configs/digits.py"))
    graphdef, params, rest = nnx.split(models.create(config.model, nnx.Rngs(0)), nnx.Param, ...)
    return trainer.network_denoiser(graphdef, rest, process, config, params.to_pure_dict()), config


def _precisions(hlo: str) -> list[str]:
    """The precision of every dot_general and convolution in a StableHLO module ('DEFAULT' if unset)."""
    found = [m.group(0) for m in OPS.finditer(hlo)]
    assert found, "no matmuls or convolutions in the program"
    return [
        (
            re.search(r"precision = \[(\w+)", op)
            or re.search(r"precision_config = \[#stablehlo<precision (\w+)", op)
            or [None, "DEFAULT"]
        )[1]
        for op in found
    ]


def test_ode_and_likelihood_request_full_precision_matmuls():
    """The adaptive ODE sampler and the likelihood trace every matmul and convolution of a real
    network at HIGHEST (no bf16 passes on TPU, no TF32 on GPU); a fixed-step sampler keeps the default."""
    process = processes.get("vp")
    den, config = _unet_denoiser(process)
    shape = (2, *trainer.data_shape(config))
    key = jax.random.key(0)
    ode = samplers._run.lower(den, key, None, None, name="ode", process=process, num_steps=4, shape=shape, opts=()).as_text()
    ll = likelihood._log_likelihood.lower(
        den, key, jnp.zeros(shape), None, process=process, trace="hutchinson", probe="rademacher", rtol=1e-5, atol=1e-5
    ).as_text()
    ddim = samplers._run.lower(
        den, key, None, None, name="ddim", process=process, num_steps=4, shape=shape, opts=()
    ).as_text()
    assert set(_precisions(ode)) == {"HIGHEST"}
    assert set(_precisions(ll)) == {"HIGHEST"}
    assert "HIGHEST" not in set(_precisions(ddim))


def test_training_flops_are_counted_on_the_cpu_whatever_the_backend():
    """diffjax info's FLOP count (the benchmark's MFU numerator) is the HLO's, convolutions included:
    one 3x3 same-padded conv layer of the digits UNet at least 2*H*W*Cin*Cout*9 per example forward."""
    config = info.load_config(os.path.join(ROOT, "configs/ddpm_cifar10.py"))
    flops = info.training_flops(config.model, (2, 32, 32, 3)) / 2
    first_level = 2 * 32 * 32 * 128 * 128 * 9  # one of the top level's 3x3 convolutions, forward
    assert 3 * 4 * first_level < flops < 50e9  # >= 4 such convs fwd+bwd; below 50 GFLOP per example


def test_accelerator_benchmark_quick_runs_on_cpu(tmp_path):
    """The benchmark's CPU smoke run: a bf16 train step of the DDPM UNet (shrunk: 2 levels, 1 block)
    and Heun sampling, one JSON with sane numbers; bf16 compute keeps f32 params, EMA, moments. (The
    inception case is left out here: its network is tested in test_inception, and compiling it on the
    CPU takes ~25 s.)"""
    out = tmp_path / "accel.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/accelerator.py",
            "--quick",
            "--only",
            "train,sample",
            "--dtypes",
            "bfloat16",
            "--train_configs",
            "ddpm_cifar10",
            "--samplers",
            "heun",
            "--batch",
            "2",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["info"]["backend"] == "cpu" and report["info"]["quick"]
    rows = {" ".join(r["case"]): r["result"] for r in report["results"]}
    train = rows["train ddpm_cifar10 bfloat16"]
    assert train["params"] == models.abstract_param_count(
        info.load_config(os.path.join(ROOT, "configs/ddpm_cifar10.py"), accelerator_cases.QUICK_MODEL["ddpm_cifar10"]).model,
        (1, 32, 32, 3),
    )
    assert train["batch"] == 2 and train["img_s"] > 0 and train["compile_s"] > 0
    assert 0 < train["mfu"] < 1 and train["flops_per_img"] > 1e8
    assert train["state_dtypes"] == ["float32"]
    heun = rows["sample heun bfloat16"]
    assert heun["nfe"] == 2 * 3 - 1 and heun["samples_s"] > 0
    assert "| train ddpm_cifar10 bfloat16 |" in proc.stdout  # the printed table


def test_accelerator_benchmark_rejects_bad_flags():
    proc = subprocess.run(
        [sys.executable, "benchmarks/accelerator.py", "--dtypes", "float16"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--dtypes" in proc.stderr and "bfloat16" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "benchmarks/accelerator.py", "--samplers", "euler"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--samplers" in proc.stderr and "ddim,heun" in proc.stderr
