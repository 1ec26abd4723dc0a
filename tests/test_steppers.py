"""Steppers: one definition per sampler, driven offline (samplers.sample) and by the serving engine.

Oracles: the exact Gaussian-mixture denoiser (per-mode widths of a narrow-mode mixture), and the
offline driver itself for the engine (same request -> same samples, and co-batched == alone).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import processes, samplers, steppers, toy
from diffjax.serving.engine import Admission, Engine, request_key, served_steppers

# 5 narrow modes in 3-D (std 0.05 at distance ~1): the regime where the time grid matters.
NARROW = toy.GaussianMixture(
    means=[[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.5], [0.0, 0.0, -1.0]],
    stds=[0.05] * 5,
    weights=[0.2] * 5,
)


def _width_error(x) -> float:
    """Largest relative error of the per-mode widths against the true 0.05."""
    stats = toy.mode_statistics(NARROW, x)
    return float(np.max(np.abs(stats["stds"] / 0.05 - 1.0)))


def test_dpm_solver_default_grid_is_log_snr_and_resolves_narrow_modes():
    """DPM-Solver++ at 25 steps on vp, exact denoiser, 20,000 samples: its paper's log-SNR grid
    (the default) gets the narrow modes' widths; the process's uniform-t grid misses them."""
    vp = processes.get("vp")
    den = NARROW.denoiser(vp, "x0")
    key = jax.random.PRNGKey(0)
    x_default, _ = samplers.sample("dpm_solver++", den, vp, key, (20000, 3), 25)
    x_uniform, _ = samplers.sample("dpm_solver++", den, vp, key, (20000, 3), 25, spacing="default")
    x_logsnr, _ = samplers.sample("dpm_solver++", den, vp, key, (20000, 3), 25, spacing="logsnr")
    np.testing.assert_array_equal(np.asarray(x_default), np.asarray(x_logsnr))
    assert _width_error(x_default) < 0.06, _width_error(x_default)  # measured 0.024
    assert _width_error(x_uniform) > 0.15, _width_error(x_uniform)  # measured 1.18


def test_heun_default_grid_is_karras_and_ddpm_keeps_its_own():
    vp, ddpm = processes.get("vp"), processes.get("ddpm")
    assert steppers.Heun().grid_spacing(vp) == "karras" and steppers.DPMSolverPP().grid_spacing(vp) == "logsnr"
    assert steppers.Heun().grid_spacing(ddpm) == "default" and steppers.DDIM().grid_spacing(vp) == "default"
    den = NARROW.denoiser(vp, "eps")
    a, _ = samplers.sample("heun", den, vp, jax.random.PRNGKey(1), (64, 3), 10)
    b, _ = samplers.sample("heun", den, vp, jax.random.PRNGKey(1), (64, 3), 10, spacing="karras")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- the engine drives the same steppers ---------------------------------------------------------
REQUESTS = [  # (sampler, steps, options, seed, n)
    ("ddim", 7, {}, 1, 3),
    ("ddim", 6, {"eta": 0.5}, 2, 2),
    ("ancestral", 8, {}, 3, 2),
    ("pc", 5, {"snr": 0.12}, 4, 3),
    ("dpm_solver++", 6, {}, 5, 2),
    ("heun", 5, {}, 6, 2),
    ("heun", 6, {"s_churn": 20.0, "s_tmin": 0.05, "s_tmax": 20.0, "s_noise": 1.003}, 7, 3),
]
PC_CONFIG = dict(predictor="reverse_diffusion", corrector="langevin", n_steps_each=2)


def _offline(den, process, sampler, steps, options, seed, n):
    extra = dict(PC_CONFIG, norm="example") if sampler == "pc" else {}
    x, info = samplers.sample(sampler, den, process, jax.random.PRNGKey(seed), (n, 3), steps, **extra, **options)
    return np.asarray(x), info["nfe"]


def _engine_run(engine, requests) -> list[np.ndarray]:
    """All requests at once (more samples than slots: later ones wait for free slots)."""
    queue = [(r, i) for r, (_, _, _, _, n) in enumerate(requests) for i in range(n)]
    results = [np.zeros((n, 3), np.float32) for *_, n in requests]
    owner, pending = {}, list(queue)
    for _ in range(10_000):
        admissions = []
        for slot in engine.free_slots():
            if not pending or slot in owner:
                continue
            r, i = pending.pop(0)
            sampler, steps, options, seed, _ = requests[r]
            admissions.append(Admission(slot, request_key(seed), i, steps, sampler, options=options))
            owner[slot] = (r, i)
        for slot, x in engine.step(admissions):
            r, i = owner.pop(slot)
            results[r][i] = x
        if not pending and not owner:
            return results
    raise AssertionError("engine did not finish")


@pytest.mark.parametrize("process_name", ["vp", "ve"])
def test_engine_serves_every_fixed_step_sampler_as_offline(process_name):
    """Every served sampler (PC with its corrector calls, Heun with churn, DDIM at any eta) gives
    the offline samples (2e-4), and a request co-batched with others equals it alone (1e-6)."""
    process = processes.get(process_name)
    den = NARROW.denoiser(process, "eps")
    served = served_steppers(None, process=process)
    served["pc"] = steppers.PC(norm="example", **PC_CONFIG)
    engine = Engine(den, process, (3,), batch_slots=8, served=served, devices=jax.devices()[:1])
    mixed = _engine_run(engine, REQUESTS)
    for request, got in zip(REQUESTS, mixed):
        want, nfe = _offline(den, process, *request)
        assert nfe == served[request[0]].nfe(request[1])
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4, err_msg=str(request))
        alone = _engine_run(engine, [request])[0]  # the same engine, now with no neighbours
        np.testing.assert_allclose(got, alone, atol=1e-6, rtol=1e-6, err_msg=str(request))


def test_engine_refuses_unknown_options():
    process = processes.get("vp")
    engine = Engine(NARROW.denoiser(process), process, (3,), batch_slots=2, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="eta"):
        engine.step([Admission(0, request_key(0), 0, 4, "dpm_solver++", options={"eta": 1.0})])
    ddpm = processes.get("ddpm")
    engine = Engine(NARROW.denoiser(ddpm), ddpm, (3,), batch_slots=2, devices=jax.devices()[:1])
    assert engine.dynamic["heun"] == ()  # no inverse noise level on the discrete chain: no churn
    with pytest.raises(ValueError, match="s_churn"):
        engine.step([Admission(0, request_key(0), 0, 4, "heun", options={"s_churn": 1.0})])


def test_stepper_options_are_checked():
    with pytest.raises(ValueError, match="takes no option"):
        samplers.sample(
            "ddim", NARROW.denoiser(processes.get("vp")), processes.get("vp"), jax.random.PRNGKey(0), (2, 3), 3, s_churn=1.0
        )
    with pytest.raises(ValueError, match="corrector"):
        steppers.PC(corrector="annealed")
    assert jnp.isfinite(samplers.example_noise_coded(samplers.example_keys(jax.random.PRNGKey(0), 2), (3,), 1, 2)).all()
