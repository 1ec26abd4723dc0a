"""The continuous-time ELBO (diffjax.vlb) and VDM's learned schedule (diffjax.processes.vdm).

Oracles: for Gaussian data N(mu, s^2 I) and its exact denoiser every term has a closed form (derived
in `gaussian_bound`); for the 8-Gaussians mixture the diffusion loss does not depend on the schedule
between equal end points, and the bound lies below the exact log-density on average.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import likelihood, processes, toy, vlb
from diffjax.denoiser import Denoiser
from diffjax.processes import vdm
from diffjax.serving import Client
from diffjax.serving.subprocess_server import ServerProcess
from tests.tiny_configs import DIGITS, ROOT

MU, S, D = 0.3, 0.5, 4
GAUSS = toy.GaussianMixture(jnp.full((1, D), MU), jnp.array([S]), jnp.array([1.0]))


def gaussian_bound(process, x: np.ndarray) -> np.ndarray:
    """-ELBO per example, in closed form, for data N(MU, S^2 I) with its exact denoiser (decoder 'gaussian').

    The optimal x_hat(z) = MU + c (z - a MU), c = a S^2 / (a^2 S^2 + s^2), so x - x_hat =
    (1 - c a)(x - MU) - c s eps and, with v = SNR = a^2 / s^2, E||x - x_hat||^2 = (|x - MU|^2 +
    D v S^4) / (1 + v S^2)^2. The diffusion loss 1/2 int -dv/dt E||x - x_hat||^2 dt = 1/2 int_{v1}^{v0}
    that dv integrates exactly; the decoder N(x_hat(z0), 1/v0) and the prior KL are Gaussian.
    """
    t0, t1 = process.t_min, process.t_max
    a0, s0, a1, s1 = (float(f(t)) for t in (t0, t1) for f in (process.alpha, process.sigma))
    a0, s0, a1, s1 = float(process.alpha(t0)), float(process.sigma(t0)), float(process.alpha(t1)), float(process.sigma(t1))
    x = np.asarray(x, np.float64)
    sq, q = ((x - MU) ** 2).sum(1), S * S
    v0, v1 = a0**2 / s0**2, a1**2 / s1**2
    w0, w1 = 1 + q * v0, 1 + q * v1
    diffusion = 0.5 * (sq / q * (1 / w1 - 1 / w0) + D * (np.log(w0 / w1) + 1 / w0 - 1 / w1))
    recon = 0.5 * D * np.log(2 * np.pi / v0) + 0.5 * v0 * (sq + D * v0 * q * q) / w0**2
    p2 = process.prior_std() ** 2
    prior = 0.5 * ((a1**2 * (x**2).sum(1) + D * s1**2) / p2 - D - D * np.log(s1**2 / p2))
    return diffusion + recon + prior


def _zscore(estimate, oracle) -> float:
    d = np.asarray(estimate, np.float64) - np.asarray(oracle, np.float64)
    return float(d.mean() / (d.std(ddof=1) / math.sqrt(len(d))))


@pytest.mark.parametrize("name,prediction", [("vp", "eps"), ("ve", "x0"), ("vdm", "v")])
def test_gaussian_closed_form(name, prediction):
    """The estimate agrees with the closed form within Monte-Carlo error, any process and prediction;
    the closed form equals the exact E -log p(x) up to the end points' terms (< 1e-2 nats here)."""
    process = processes.get(name)
    x = GAUSS.sample(jax.random.key(0), 128)
    value, info = likelihood.elbo(GAUSS.denoiser(process, prediction), process, jax.random.key(1), x, decoder="gaussian")
    oracle = gaussian_bound(process, x)
    assert abs(_zscore(-value, oracle)) < 4.0
    # every example's stderr is its own: the mean error is within 4 combined standard errors
    assert abs(float(jnp.mean(-value)) - oracle.mean()) < 4 * float(jnp.sqrt(jnp.sum(info["stderr"] ** 2))) / len(x)
    nll = -np.asarray(GAUSS.log_prob(x), np.float64)
    # pointwise the model's density is not the data's; on average the bound is tight (endpoint terms)
    assert -1e-3 < oracle.mean() - nll.mean() < 1e-2
    assert np.allclose(info["bpd"], -value / (D * math.log(2)), rtol=1e-6)


def _equal_ends_vdm(vp, key) -> processes.VDM:
    """A VDM monotone net with random positive weights, rescaled to vp's log-SNR at t_min and 1."""
    g_min, g_max = float(-vp.log_snr(vp.t_min)), float(-vp.log_snr(1.0))
    params = vdm.init_schedule(key, g_min, g_max, hidden=16)
    params["l2_w"], params["l3_w"] = 3.0 * params["l2_w"] / 0.01, params["l3_w"] / 0.01 * 50.0
    return processes.VDM(gamma_min=g_min, gamma_max=g_max, eps=vp.t_min, hidden=16).with_schedule(params)


def test_mixture_schedule_invariance_and_bound():
    """8 Gaussians, exact denoiser: the bound is the same under VP-linear and a random monotone VDM
    schedule with the same end points (within Monte-Carlo error), and below E log p(x)."""
    mix = toy.eight_gaussians()
    vp = processes.get("vp")
    other = _equal_ends_vdm(vp, jax.random.key(3))
    t = jnp.linspace(other.t_min, 1.0, 9)
    assert float(jnp.max(jnp.abs(other.log_snr(t) - vp.log_snr(t)))) > 0.5  # really another schedule
    x = mix.sample(jax.random.key(0), 128)
    values = [
        likelihood.elbo(mix.denoiser(p, "eps"), p, jax.random.key(2), x, decoder="gaussian", num_terms=16)
        for p in (vp, other)
    ]
    (a, info_a), (b, info_b) = values
    se = math.sqrt(float(jnp.mean(info_a["stderr"] ** 2) + jnp.mean(info_b["stderr"] ** 2)) / len(x))
    assert abs(float(jnp.mean(a - b))) < 4 * se
    assert np.allclose(info_a["prior"], info_b["prior"], rtol=1e-3, atol=1e-6)
    logp = float(jnp.mean(mix.log_prob(x)))
    for v, info in values:
        assert float(jnp.mean(v)) <= logp + 4 * float(jnp.sqrt(jnp.mean(info["stderr"] ** 2) / len(x)))


def test_vdm_schedule():
    """gamma is increasing with the configured end points; the static process equals the functional form."""
    params = vdm.init_schedule(jax.random.key(0), -13.3, 5.0, hidden=32)
    params["l2_w"] = params["l2_w"] * 300.0
    params["l3_w"] = params["l3_w"] * 3000.0
    t = jnp.linspace(0.0, 1.0, 513)
    g = vdm.gamma(params, t)
    assert float(jnp.min(jnp.diff(g))) > 0 and abs(float(g[0]) + 13.3) < 1e-4 and abs(float(g[-1]) - 5.0) < 1e-4
    p = processes.VDM(hidden=32).with_schedule(params)
    assert hash(p) == hash(processes.VDM(hidden=32).with_schedule(params))
    s = jnp.linspace(p.t_min, 1.0, 17)
    assert np.allclose(p.gamma(s), vdm.gamma(params, s, p.t_min, 1.0), atol=1e-5)
    assert np.allclose(p.alpha(s) ** 2 + p.sigma(s) ** 2, 1.0, atol=1e-6)
    linear = processes.get("vdm", gamma_min=-10.0, gamma_max=6.0)
    assert np.allclose(linear.gamma(s), -10.0 + 16.0 * (s - linear.t_min) / (1 - linear.t_min), atol=1e-4)
    with pytest.raises(ValueError, match="gamma_max > gamma_min"):
        processes.get("vdm", gamma_min=1.0, gamma_max=0.0)


def _tiny_net(w, x, t, cond):
    return jnp.tanh(w["a"] * x + w["b"] * t[:, None]) * w["c"]


def test_variance_minimising_gradient():
    """vdm_value_and_grad: the schedule's shape params get jax.grad of the mean squared diffusion
    loss, the network and the end points jax.grad of the bound."""
    process = processes.VDM(gamma_min=-8.0, gamma_max=4.0, hidden=8)
    sched = vdm.init_schedule(jax.random.key(0), -8.0, 4.0, hidden=8)
    weights = {"a": jnp.float32(0.7), "b": jnp.float32(-0.3), "c": jnp.float32(0.9)}
    make = lambda w: Denoiser(_tiny_net, w, "eps")  # noqa: E731
    batch, key = {"x": jax.random.normal(jax.random.key(1), (16, 3))}, jax.random.key(2)
    loss, (g_w, g_s) = vlb.vdm_value_and_grad(make, weights, sched, process, batch, key)
    x0, _, k_t, eps, eps0 = vlb._batch(batch, key)
    t = vlb.antithetic_times(k_t, (16,), process.t_min, process.t_max)
    terms = lambda w, s: vlb.vdm_terms(make, w, s, process, x0, t, eps, eps0)  # noqa: E731
    shape, ends = vdm.split_ends(sched)
    want_shape = jax.grad(lambda sh: jnp.mean(terms(weights, {**sh, **ends})["diffusion"] ** 2))(shape)
    total = lambda w, s: jnp.mean(sum(terms(w, s).values()))  # noqa: E731
    want_w, want_s = jax.grad(total, argnums=(0, 1))(weights, sched)
    assert np.isclose(loss, total(weights, sched), rtol=1e-5)
    assert np.isclose(vlb.vdm_loss(make, weights, sched, process, batch, key), loss, rtol=1e-5)  # the eval loss
    for k in shape:
        assert np.allclose(g_s[k], want_shape[k], rtol=1e-4, atol=1e-7), k
    for k in vdm.ENDS:
        assert np.allclose(g_s[k], want_s[k], rtol=1e-4, atol=1e-7), k
    for k in weights:
        assert np.allclose(g_w[k], want_w[k], rtol=1e-4, atol=1e-7), k


def _start(*args: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "diffjax", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def test_tiny_vdm_train_sample_eval(tmp_path):
    """A tiny VDM trains through `diffjax train` (learned schedule in the state), then `diffjax sample`
    and `diffjax eval bpd --method elbo` (run side by side) read its workdir and rebuild the learned process."""
    workdir = str(tmp_path / "vdm")
    flags = [f"--config={ROOT}/configs/vdm/digits.py", *DIGITS[1:], "--config.process.hidden=16"]
    flags += ["--config.training.n_iters=4", "--config.training.snapshot_freq=2"]  # checkpoints 2 and 4
    flags += ["--config.training.eval_freq=2"]  # the eval loss under the state's EMA schedule
    code, _, err = _finish(_start("train", f"--workdir={workdir}", *flags))
    assert code == 0, err[-3000:]
    evals = [m for m in map(json.loads, open(f"{workdir}/metrics.jsonl")) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [2, 4] and all(0 < m["eval_loss"] < 100 for m in evals), evals  # bits/dim
    sample = _start("sample", f"--workdir={workdir}", "--num=4", "--no_progress", f"--out={tmp_path}/grid.png")
    bpd = ["--num=8", "--batch_size=8", "--passes=1", "--method=elbo", "--elbo_terms=2", "--no_progress"]
    evaluation = _start("eval", "bpd", f"--workdir={workdir}", *bpd)
    from diffjax.workdir import Workdir

    w = Workdir(workdir, inference=True)
    assert isinstance(w.process, processes.VDM) and len(w.process.schedule) == 2 + 3 * 16
    assert w.process.learned and w.process != processes.get("vdm", hidden=16)  # the trained schedule
    (code, _, err), (code_e, out_e, err_e) = _finish(sample), _finish(evaluation)
    assert code == 0, err[-3000:]
    assert code_e == 0 and "ELBO, continuous time" in out_e, err_e[-3000:]

    # The server serves step 2; step 4 appears (its schedule trained on): the schedule is compiled into
    # the served step, so it is not swapped in; the log says to restart, and step 2 keeps serving.
    step4 = tmp_path / "step4"
    shutil.move(f"{workdir}/checkpoints/4", step4)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    with ServerProcess(workdir, "--batch_slots=4", "--reload_s=0.2", env=env, cwd=ROOT, timeout=300) as server:
        shutil.move(step4, f"{workdir}/checkpoints/4")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("another learned noise schedule" in x for x in server.lines):
            time.sleep(0.2)
        assert any("step 4 has another learned noise schedule than the served step 2" in x for x in server.lines)
        with Client(server.addr, timeout=120) as client:
            reply = client.sample_response(2, sampler="ddim", num_steps=3, seed=1)
        assert reply.checkpoint_step == 2


def test_bad_inputs(tmp_path):
    """No 8-bit data range: one line naming the field, exit 2; bad arguments: ValueErrors."""
    vp, x = processes.get("vp"), jnp.zeros((2, 3)) + 0.5 / 255
    den = GAUSS.denoiser(vp)
    for kwargs, message in (
        ({}, "not 256-level data"),
        ({"num_terms": 0}, "num_terms must be"),
        ({"decoder": "x"}, "decoder must be"),
    ):
        with pytest.raises(ValueError, match=message):
            likelihood.elbo(den, vp, jax.random.key(0), x, **kwargs)
    with pytest.raises(ValueError, match="discrete chain"):
        vlb.elbo(den, processes.get("ddpm"), jax.random.key(0), x)
    from configs.toy import eight_gaussians

    config = eight_gaussians.get_config()  # vp on continuous 2-D points
    (tmp_path / "config.json").write_text(config.to_json())
    code, _, err = _finish(_start("eval", "bpd", f"--workdir={tmp_path}", "--method=elbo", "--no_progress"))
    assert code == 2 and "data.dataset='eight_gaussians'" in err, err[-2000:]
    assert len(err.strip().splitlines()) == 1, err


def test_fixed_schedule_training_loss():
    """training.loss='elbo' (losses.loss's hook) is the batch mean of the bound's three terms in bits/dim,
    the network called once on the paired batch; the same noise and antithetic times."""
    from diffjax import losses

    vp = processes.get("vp")
    den = GAUSS.denoiser(vp, "x0")
    batch, key = {"x": GAUSS.sample(jax.random.key(4), 8)}, jax.random.key(5)
    x0, _, k_t, eps, eps0 = vlb._batch(batch, key)
    t = vlb.antithetic_times(k_t, (8,), vp.t_min, vp.t_max)
    assert np.allclose(
        np.sort(np.asarray(t - vp.t_min) / (vp.t_max - vp.t_min) * 8 % 1),
        float(t[0] - vp.t_min) / (vp.t_max - vp.t_min) * 8 % 1,
        atol=1e-4,
    )
    terms = vlb.prior_term(vp, x0) + vlb.reconstruction_term(den, vp, x0, eps0, decoder="gaussian")
    want = jnp.mean(terms + vlb.diffusion_term(den, vp, x0, t, eps)) / (D * math.log(2))
    assert np.isclose(losses.loss("elbo", den, vp, batch, key), want, rtol=1e-5)
