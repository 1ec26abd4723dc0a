"""diffjax.flops: FLOPs per step from XLA's cost analysis, peak FLOP/s per device, and the
TFLOP/s per device / MFU that `diffjax train` logs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tiny_configs import TOY

from diffjax import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, WIDTHS = 128, (256, 512, 512, 256)  # an MLP big enough for its matmuls to dominate


def mlp_sgd_step(params, batch):
    """One SGD step of a bias-free tanh MLP on an MSE loss."""

    def loss(params):
        h = batch["x"]
        for i, w in enumerate(params):
            h = h @ w
            h = jnp.tanh(h) if i < len(params) - 1 else h
        return jnp.mean(jnp.square(h - batch["y"]))

    grads = jax.grad(loss)(params)
    return [w - 1e-3 * g for w, g in zip(params, grads)]


def mlp_inputs(leading=()):
    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32) for a, b in zip(WIDTHS, WIDTHS[1:])]
    batch = {
        "x": jnp.asarray(rng.normal(size=(*leading, BATCH, WIDTHS[0])), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(*leading, BATCH, WIDTHS[-1])), jnp.float32),
    }
    return params, batch


def analytic_flops() -> float:
    """2*m*n*k per matmul: forward, the weight gradients, and the input gradients of every layer
    but the first (the data needs none): 3x the forward's matmuls less one layer's."""
    per_layer = [2 * BATCH * a * b for a, b in zip(WIDTHS, WIDTHS[1:])]
    return 3 * sum(per_layer) - per_layer[0]


def test_step_flops_match_the_analytic_matmul_count():
    """Oracle: XLA's count of a compiled MLP train step is the matmuls' 2*m*n*k to 1% (the rest:
    tanh, the loss, the SGD update, O(1/width) of it)."""
    params, batch = mlp_inputs()
    compiled = jax.jit(mlp_sgd_step).lower(params, batch).compile()
    counted = flops.step_flops(compiled)
    assert counted == pytest.approx(analytic_flops(), rel=0.01)
    assert flops.step_flops(jax.jit(mlp_sgd_step).lower(params, batch)) == pytest.approx(counted, rel=0.01)  # Lowered


@pytest.mark.parametrize("unroll", [True, False])
def test_fused_steps_per_step(unroll):
    """What train.py relies on: an unrolled scan of n steps counts n times the step, a rolled one
    (a while loop) counts its body once."""
    single = flops.step_flops(jax.jit(mlp_sgd_step).lower(*mlp_inputs()).compile())
    params, batches = mlp_inputs(leading=(4,))
    fused = jax.jit(lambda p, b: jax.lax.scan(lambda p, x: (mlp_sgd_step(p, x), None), p, b, unroll=unroll)[0])
    counted = flops.step_flops(fused.lower(params, batches).compile(), 4 if unroll else 1)
    assert counted == pytest.approx(single, rel=0.01)


def test_a_partitioned_program_is_counted_per_device():
    """Compiled cost analysis of an SPMD program is one device's share: the batch split over 8
    devices, params replicated -> 1/8 of the unpartitioned count, but the SGD update (2 FLOPs a
    parameter) runs whole on every device and the gradient all-reduce adds 1 FLOP a parameter
    (measured: exact to the FLOP on jax 0.10.2's CPU; 3% of this count)."""
    devices = jax.devices()[:8]
    assert len(devices) == 8  # conftest: 8 CPU devices
    mesh = Mesh(np.array(devices), ("data",))
    params, batch = mlp_inputs()
    n_params = sum(w.size for w in params)
    single = flops.step_flops(jax.jit(mlp_sgd_step).lower(params, batch).compile())
    params = jax.device_put(params, NamedSharding(mesh, P()))
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    lowered = jax.jit(mlp_sgd_step).lower(params, batch)
    per_device = (single - 2 * n_params) / 8 + 2 * n_params + n_params
    assert flops.step_flops(lowered.compile()) == pytest.approx(per_device, rel=1e-3)
    assert flops.step_flops(lowered) == pytest.approx(single, rel=0.01)  # before partitioning: the whole program


def test_no_cost_model_gives_none():
    class Stage:
        def __init__(self, cost):
            self.cost = cost

        def cost_analysis(self):
            if isinstance(self.cost, Exception):
                raise self.cost
            return self.cost

    assert flops.step_flops(Stage({})) is None and flops.step_flops(Stage(None)) is None
    assert flops.step_flops(Stage(RuntimeError("UNIMPLEMENTED"))) is None
    assert flops.step_flops(Stage([{"flops": 8.0}]), 4) == 2.0  # older jax: a list of dicts


def test_device_peaks():
    assert flops.device_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
    assert flops.device_peak("NVIDIA H100 80GB HBM3", "float32") == 494.7e12  # TF32
    assert flops.device_peak("TPU v5p", "bfloat16") == flops.device_peak("TPU v5p", "float32") == 459e12
    assert flops.device_peak("TPU v5 lite", "bfloat16") == 197e12
    assert flops.device_peak("cpu", "float32") is None and flops.device_peak("cpu", "bfloat16") is None


def test_throughput_metrics():
    assert flops.throughput_metrics(None, 10.0, 1e15) == {}
    assert flops.throughput_metrics(2e12, 10.0, None) == {"tflops_per_device": 20.0}
    assert flops.throughput_metrics(2e12, 10.0, 100e12) == {"tflops_per_device": 20.0, "mfu": 0.2}


PEAK = 5e9  # a made-up peak for the CPU in the second run


def test_train_logs_tflops_per_device_and_mfu_only_for_a_known_device(tmp_path):
    """Two real `diffjax train` runs in one process (one CPU device; imports dominate the time):
    the CPU's lines have tflops_per_device and no mfu; with "cpu" added to the peak table,
    mfu = tflops / peak, and the progress bar shows both."""
    steps = ["--config.training.n_iters=2", "--config.training.n_jitted_steps=1", "--config.training.log_freq=1"]
    flags = [f for f in TOY if f != "--no_progress"] + steps
    script = (
        "import sys\n"
        "from diffjax import flops\n"
        "from diffjax.cli import main\n"
        "flags = sys.argv[3:]\n"
        "assert main(['train', '--workdir', sys.argv[1], '--no_progress', *flags]) == 0\n"
        f"flops.PEAKS['cpu'] = ({PEAK}, {PEAK})\n"
        "assert main(['train', '--workdir', sys.argv[2], *flags]) == 0\n"
    )
    cmd = [sys.executable, "-c", script, str(tmp_path / "cpu"), str(tmp_path / "known"), *flags]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]

    def lines(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    cpu, known = lines("cpu"), lines("known")
    assert [m["step"] for m in cpu] == [m["step"] for m in known] == [1, 2]
    for m in cpu:
        assert m["tflops_per_device"] > 0 and "mfu" not in m
    per_step = [m["tflops_per_device"] / m["steps_per_sec"] for m in cpu + known]
    assert per_step == pytest.approx([per_step[0]] * len(per_step), rel=1e-9)  # counted once; arithmetic on the rate
    for m in known:
        assert m["mfu"] == pytest.approx(m["tflops_per_device"] * 1e12 / PEAK, rel=1e-12)
    assert "tflops=" in res.stdout and "mfu=" in res.stdout
