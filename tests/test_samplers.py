"""Samplers driven by the exact 8-Gaussians denoiser must reproduce the mixture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import denoiser as dn
from diffjax import processes, samplers, toy

N = 8000
MIXTURE = toy.eight_gaussians()


@pytest.fixture(scope="module")
def truth_baseline():
    truth = MIXTURE.sample(jax.random.key(100), N)
    # The distance between independent true sample sets, the floor any sampler can reach. It is
    # dominated by the binomial spread of the mode counts, so take the largest of 20 draws.
    base = max(
        float(toy.sliced_wasserstein(MIXTURE.sample(jax.random.key(200 + i), N), truth, jax.random.key(7)))
        for i in range(20)
    )
    return truth, base


# (sampler, process, num_steps, options): the NFE settings documented in README.
CASES = [
    ("ancestral", "ddpm", 1000, {}),
    ("ancestral", "ve", 1000, {}),
    ("ddim", "ddpm", 100, {}),
    ("ddim", "subvp", 50, {"spacing": "logsnr"}),
    ("pc", "ve", 500, {}),
    ("pc", "vp", 500, {"predictor": "euler_maruyama", "corrector": "none"}),
    ("ode", "vp", 10, {}),
    ("ode", "ve", 10, {}),
    ("dpm_solver++", "vp", 20, {"spacing": "logsnr"}),
    ("dpm_solver++", "edm", 20, {"spacing": "logsnr"}),
    ("heun", "edm", 18, {}),
    ("heun", "vp", 18, {"spacing": "karras"}),
    ("heun", "edm", 40, {"s_churn": 10.0}),
    # flow (rectified flow), velocity prediction: DDIM eta 0 is its Euler step; DPM-Solver++ and Heun on
    # their log-SNR / Karras grids, which start at 1 - t_min (sigma / alpha is infinite at t = 1)
    ("ddim", "flow", 50, {}),
    ("ancestral", "flow", 200, {}),
    ("ode", "flow", 10, {}),
    ("dpm_solver++", "flow", 20, {}),
    ("heun", "flow", 40, {}),
]


@pytest.mark.parametrize("name,process_name,steps,opts", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_sampler_reproduces_mixture(truth_baseline, name, process_name, steps, opts):
    truth, base = truth_baseline
    p = processes.get(process_name)
    den = MIXTURE.denoiser(p, "flow" if process_name == "flow" else "eps")
    x, info = samplers.sample(name, den, p, jax.random.key(1), (N, 2), steps, **opts)
    assert x.shape == (N, 2) and bool(jnp.all(jnp.isfinite(x)))
    stats = toy.mode_statistics(MIXTURE, x)
    np.testing.assert_allclose(stats["weights"], 1 / 8, atol=0.02)  # binomial sd 0.0037
    np.testing.assert_allclose(stats["means"], MIXTURE.means, atol=0.04)
    np.testing.assert_allclose(stats["stds"], 0.1, rtol=0.15)
    sw = float(toy.sliced_wasserstein(x, truth, jax.random.key(7)))
    assert sw < 1.25 * base, f"sliced W2 {sw:.4f} vs true-vs-true {base:.4f}"
    assert info["nfe"] > 0


def test_a_wrong_denoiser_fails_the_same_checks(truth_baseline):
    """The checks above have teeth: too few DPM-Solver++ steps on a uniform grid fail them."""
    truth, base = truth_baseline
    p = processes.get("vp")
    x, _ = samplers.sample("dpm_solver++", MIXTURE.denoiser(p), p, jax.random.key(1), (N, 2), 10, spacing="default")
    assert float(toy.sliced_wasserstein(x, truth, jax.random.key(7))) > 1.25 * base


@pytest.mark.parametrize(
    "name,steps,opts,expected",
    [
        ("ancestral", 37, {}, 37),
        ("ddim", 25, {}, 25),
        ("dpm_solver++", 20, {}, 20),
        ("heun", 18, {}, 35),
        ("pc", 30, {"n_steps_each": 2}, 90),
        ("pc", 30, {"corrector": "none"}, 30),
        ("ode", 10, {}, None),
    ],
)
def test_nfe_counts_real_network_evaluations(name, steps, opts, expected):
    """info['nfe'] equals the evaluations counted at run time by a host callback in the denoiser."""
    p = processes.get("vp")
    exact = MIXTURE.denoiser(p, "eps")
    calls = []

    def counting_apply(params, x, t, cond):
        jax.debug.callback(lambda: calls.append(1))
        return exact.apply(params, x, t, cond)

    den = dn.Denoiser(counting_apply, exact.params, "eps")
    _, info = samplers.sample(name, den, p, jax.random.key(0), (64, 2), steps, **opts)
    jax.effects_barrier()
    assert info["nfe"] == len(calls)
    if expected is not None:
        assert info["nfe"] == expected


def test_whole_trajectory_is_one_program():
    """1000 steps trace the denoiser once (a scan body), not once per step."""
    p = processes.get("ddpm")
    exact = MIXTURE.denoiser(p)
    traced = []

    def apply(params, x, t, cond):
        traced.append(1)
        return exact.apply(params, x, t, cond)

    samplers.sample("ancestral", dn.Denoiser(apply, exact.params, "eps"), p, jax.random.key(0), (8, 2), 1000)
    assert len(traced) == 1


def test_new_params_do_not_recompile():
    p = processes.get("vp")
    samplers.sample("ddim", MIXTURE.denoiser(p), p, jax.random.key(0), (16, 2), 10)
    size = samplers._run._cache_size()
    moved = toy.GaussianMixture(MIXTURE.means + 1.0, MIXTURE.stds, MIXTURE.weights)
    x, _ = samplers.sample("ddim", moved.denoiser(p), p, jax.random.key(0), (16, 2), 10)
    assert samplers._run._cache_size() == size
    assert float(jnp.mean(x)) > 0.5  # and the new parameters were used


def test_samples_do_not_depend_on_batch_size_and_seed_is_reproducible():
    p = processes.get("vp")
    d = MIXTURE.denoiser(p)
    small, _ = samplers.sample("ancestral", d, p, jax.random.key(3), (8, 2), 50)
    big, _ = samplers.sample("ancestral", d, p, jax.random.key(3), (32, 2), 50)
    again, _ = samplers.sample("ancestral", d, p, jax.random.key(3), (8, 2), 50)
    other, _ = samplers.sample("ancestral", d, p, jax.random.key(4), (8, 2), 50)
    np.testing.assert_allclose(big[:8], small, atol=1e-5)
    np.testing.assert_array_equal(again, small)
    assert not np.allclose(other, small)


def test_given_initial_noise_makes_ddim_deterministic():
    p = processes.get("vp")
    x_T = jax.random.normal(jax.random.key(9), (16, 2))
    a, _ = samplers.sample("ddim", MIXTURE.denoiser(p), p, jax.random.key(0), (16, 2), 30, x_T=x_T)
    b, _ = samplers.sample("ddim", MIXTURE.denoiser(p), p, jax.random.key(1), (16, 2), 30, x_T=x_T)
    np.testing.assert_array_equal(a, b)


def _class_conditional_denoiser(p):
    """Exact eps of the mixture restricted to mode `label`; the full mixture for the null label."""

    def apply(mixture, x, t, cond):
        weights = jnp.where((cond == dn.NULL_LABEL)[:, None], 1 / 8, jax.nn.one_hot(cond, 8))
        a, s = p.alpha(t), p.sigma(t)
        score = jax.vmap(
            lambda xi, ai, si, wi: toy.GaussianMixture(mixture.means, mixture.stds, wi).diffused_score(
                xi[None], ai[None], si[None]
            )[0]
        )(x, a, s, weights)
        return p.convert("score", "eps", score, x, t)

    return dn.Denoiser(apply, MIXTURE, "eps")


def test_classifier_free_guidance():
    p = processes.get("vp")
    den = _class_conditional_denoiser(p)
    x, t = MIXTURE.sample(jax.random.key(0), 16), jnp.full((16,), 0.5)
    labels = jnp.arange(16) % 8
    cond_out, uncond_out = den(x, t, labels), den(x, t, jnp.full((16,), dn.NULL_LABEL))
    np.testing.assert_allclose(dn.guided(den, 1.0)(x, t, labels), cond_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dn.guided(den, 0.0)(x, t, labels), uncond_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        dn.guided(den, 3.0)(x, t, labels), uncond_out + 3 * (cond_out - uncond_out), rtol=1e-4, atol=1e-4
    )
    # Sampling with labels puts every sample in its class's mode, with and without extra guidance.
    labels = jnp.arange(512) % 8
    for scale in (None, 2.0):
        xs, _ = samplers.sample(
            "dpm_solver++", den, p, jax.random.key(1), (512, 2), 20, cond=labels, guidance_scale=scale, spacing="logsnr"
        )
        nearest = np.argmin(((np.asarray(xs)[:, None] - np.asarray(MIXTURE.means)[None]) ** 2).sum(-1), 1)
        np.testing.assert_array_equal(nearest, np.asarray(labels))


def test_sharded_batch_stays_sharded():
    devices = np.array(jax.devices())
    assert len(devices) == 8  # conftest fakes 8 CPU devices
    mesh = jax.sharding.Mesh(devices, ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    p = processes.get("vp")
    x_T = jax.device_put(jnp.ones((8 * len(devices), 2)), sharding)
    x, _ = samplers.sample("ddim", MIXTURE.denoiser(p), p, jax.random.key(0), x_T.shape, 5, x_T=x_T)
    assert x.sharding.is_equivalent_to(sharding, 2)


def test_bad_input_errors():
    p = processes.get("vp")
    d = MIXTURE.denoiser(p)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'; choose one of"):
        samplers.sample("euler", d, p, key, (4, 2), 10)
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="num_steps must be a positive integer"):
            samplers.sample("ddim", d, p, key, (4, 2), bad)
    with pytest.raises(ValueError, match="num_steps must be >= 2 for heun"):
        samplers.sample("heun", d, p, key, (4, 2), 1)
    with pytest.raises(ValueError, match=r"x_T has shape \(4, 3\) but shape is \(4, 2\)"):
        samplers.sample("ddim", d, p, key, (4, 2), 10, x_T=jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="shape must be a non-empty tuple of positive sizes"):
        samplers.sample("ddim", d, p, key, (0, 2), 10)
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['snr'\]"):
        samplers.sample("ddim", d, p, key, (4, 2), 10, snr=0.1)
    with pytest.raises(ValueError, match="guidance_scale must be finite"):
        samplers.sample("ddim", d, p, key, (4, 2), 10, cond=jnp.zeros(4, jnp.int32), guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="guidance_scale needs class labels"):
        samplers.sample("ddim", d, p, key, (4, 2), 10, guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"cond must be integer class labels of shape \(4,\)"):
        samplers.sample("ddim", d, p, key, (4, 2), 10, cond=jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="pc predictor must be"):
        samplers.sample("pc", d, p, key, (4, 2), 10, predictor="leapfrog")
    ddpm = processes.get("ddpm")
    with pytest.raises(ValueError, match="discrete chain"):
        samplers.sample("ode", MIXTURE.denoiser(ddpm), ddpm, key, (4, 2), 10)
    with pytest.raises(ValueError, match="prediction must be one of"):
        dn.Denoiser(lambda *a: a[1], None, "noise")
