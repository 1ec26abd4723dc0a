"""Processes: marginals against simulation of their own chain / SDE, the papers' numbers,
SDE coefficients against autodiff of the marginal, conversions, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import processes

CONTINUOUS = ["vp", "subvp", "ve", "edm"]
ALL = ["ddpm"] + CONTINUOUS


def test_vdm_learned_schedule_process():
    """A VDM process with a trained (here random, strongly curved) schedule: an ordinary static process
    (hashable, equal when rebuilt), variance preserving, gamma at its end points, SDE by autodiff."""
    from diffjax.processes import vdm

    params = vdm.init_schedule(jax.random.key(0), -10.0, 6.0, hidden=8)
    params["l2_w"], params["l3_w"] = params["l2_w"] * 500.0, params["l3_w"] * 5000.0
    p = processes.get("vdm", hidden=8).with_schedule(params)
    assert p == processes.get("vdm", hidden=8).with_schedule(params) and hash(p) == hash(processes.VDM(**vars(p)))
    t = jnp.linspace(p.t_min, 1.0, 9)
    np.testing.assert_allclose(p.alpha(t) ** 2 + p.sigma(t) ** 2, 1.0, atol=1e-6)
    np.testing.assert_allclose(p.gamma(jnp.array([p.t_min, 1.0])), [-10.0, 6.0], atol=1e-4)
    np.testing.assert_allclose(p.log_snr(t), -vdm.gamma(params, t, p.t_min, 1.0), atol=1e-5)
    assert np.all(np.diff(np.asarray(p.log_snr(t))) < 0)


def test_ddpm_chain_marginal_matches_simulation():
    p = processes.get("ddpm")
    betas = jnp.asarray(p.betas(), jnp.float32)
    n, x0 = 20000, 1.5
    key = jax.random.key(0)

    def step(x, inp):
        beta, k = inp
        x = jnp.sqrt(1 - beta) * x + jnp.sqrt(beta) * jax.random.normal(k, x.shape)
        return x, x[:, 0]

    _, path = jax.lax.scan(step, jnp.full((n, 1), x0), (betas, jax.random.split(key, 1000)))
    for t in (10, 250, 1000):
        xs = path[t - 1]
        assert float(jnp.mean(xs)) == pytest.approx(x0 * float(p.alpha(t)), abs=0.03)
        assert float(jnp.std(xs)) == pytest.approx(float(p.sigma(t)), rel=0.03)


@pytest.mark.parametrize("name", CONTINUOUS + ["vdm", "flow"])
def test_sde_marginal_matches_euler_maruyama(name):
    p = processes.get(name)
    t_end = 5.0 if name == "edm" else 0.9 if name == "flow" else 1.0  # flow: f, g^2 diverge at t = 1
    n, x0, steps = 20000, 1.5, 2000
    x = jnp.full((n,), x0) + float(p.sigma(0.0)) * jax.random.normal(jax.random.key(1), (n,))
    times = jnp.linspace(0.0, t_end, steps + 1)

    def step(x, inp):
        t, dt, k = inp
        f, g2 = p.sde(t)
        return x + f * x * dt + jnp.sqrt(g2 * dt) * jax.random.normal(k, x.shape), None

    x, _ = jax.lax.scan(step, x, (times[:-1], jnp.diff(times), jax.random.split(jax.random.key(2), steps)))
    assert float(jnp.mean(x)) == pytest.approx(x0 * float(p.alpha(t_end)), abs=0.02 * max(1.0, float(p.sigma(t_end))))
    assert float(jnp.std(x)) == pytest.approx(float(p.sigma(t_end)), rel=0.03)


@pytest.mark.parametrize("name", CONTINUOUS + ["flow"])
def test_closed_form_sde_equals_autodiff_of_marginal(name):
    p = processes.get(name)
    t = jnp.linspace(p.t_min, p.ratio_t_max, 7)  # flow: f, g^2 diverge at t = 1
    f, g2 = p.sde(t)
    f_ad, g2_ad = processes.Process.sde(p, t)
    np.testing.assert_allclose(f, f_ad, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g2, g2_ad, rtol=2e-3, atol=1e-5)


def test_paper_schedule_numbers():
    ddpm = processes.get("ddpm")
    betas = ddpm.betas()
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02) and len(betas) == 1000
    abar = ddpm.alpha_bars()
    assert abar[-1] == pytest.approx(4.036e-5, rel=1e-3)  # Ho et al.: x_T is almost pure noise
    cos = processes.get("ddpm", schedule="cosine")
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    assert cos.alpha_bars()[500] == pytest.approx(f(500) / f(0), rel=1e-6)  # Nichol & Dhariwal eq. 17
    vp = processes.get("vp")
    assert float(vp.alpha(1.0)) == pytest.approx(np.exp(-0.5 * (0.1 + 0.5 * 19.9)), rel=1e-5)
    ve = processes.get("ve")
    assert float(ve.sigma(0.0)) == pytest.approx(0.01) and float(ve.sigma(1.0)) == pytest.approx(50.0, rel=1e-5)
    edm = processes.get("edm")
    grid = np.asarray(edm.time_grid(18))
    assert grid[0] == pytest.approx(80.0, rel=1e-5) and grid[17] == pytest.approx(0.002, rel=1e-4) and grid[18] == 0
    assert np.all(np.diff(grid) < 0)
    # Karras et al. eq. 5 at i = 9 of 18.
    expected = (80 ** (1 / 7) + 9 / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert grid[9] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ALL + ["vdm", "flow"])
def test_conversions_round_trip(name):
    p = processes.get(name)
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    x0, eps = jax.random.normal(k1, (6, 3)), jax.random.normal(k2, (6, 3))
    t = p.time_grid(9)[:6]  # away from t_min, where sigma ~ 1e-4 makes float32 division lossy
    if name == "flow":
        t = p.time_grid(9)[1:7]  # and from t = 1, where alpha = 0 (tests/test_flow.py checks it)
    x = p.marginal(x0, t, eps)
    np.testing.assert_allclose(p.convert("eps", "x0", eps, x, t), x0, rtol=1e-3, atol=2e-3)
    out = jax.random.normal(k3, (6, 3))
    kinds = processes.PREDICTIONS if not p.discrete else p.predictions  # ddpm: no velocity ('flow')
    for src in kinds:
        for dst in kinds:
            back = p.convert(dst, src, p.convert(src, dst, out, x, t), x, t)
            np.testing.assert_allclose(back, out, rtol=2e-3, atol=2e-3, err_msg=f"{src}->{dst}->{src}")


@pytest.mark.parametrize("name", CONTINUOUS + ["vdm", "flow"])
@pytest.mark.parametrize("spacing", ["karras", "logsnr"])
def test_time_at_ratio_inverts_noise_level(name, spacing):
    p = processes.get(name)
    grid = p.time_grid(12, spacing)[:-1]
    ratio = np.asarray(p.sigma(grid) / p.alpha(grid))
    assert np.all(np.diff(np.asarray(grid)) < 0)
    np.testing.assert_allclose(p.time_at_ratio(jnp.asarray(ratio)), grid, rtol=2e-3, atol=1e-5)
    if spacing == "logsnr":
        steps = np.diff(np.log(ratio))
        np.testing.assert_allclose(steps, steps[0], rtol=2e-3)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"unknown process 'foo'.*\['ddpm', 'edm', 'flow', 'subvp', 'vdm', 've', 'vp'\]"):
        processes.get("foo")
    with pytest.raises(ValueError, match="no field.*beta_maxx"):
        processes.get("vp", beta_maxx=3)
    with pytest.raises(ValueError, match="schedule must be one of"):
        processes.get("ddpm", schedule="quadratic")
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_steps must be a positive integer"):
            processes.get("vp").time_grid(bad)
    # at most T steps, checked before the spacing (karras / logsnr then fail on ddpm for their own reason)
    for spacing in ("default", "leading", "karras", "logsnr"):
        with pytest.raises(ValueError, match="num_steps must be <= num_scales=1000 for ddpm"):
            processes.get("ddpm").time_grid(1001, spacing)
    assert processes.get("ddpm", num_scales=20).max_steps == 20 and processes.get("vp").max_steps is None
    with pytest.raises(ValueError, match="spacing must be one of"):
        processes.get("vp").time_grid(10, "cubic")
    with pytest.raises(ValueError, match="prediction must be one of"):
        processes.get("vp").convert("noise", "x0", jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones(1))
    with pytest.raises(ValueError, match="discrete chain"):
        processes.get("ddpm").sde(0.5)


def test_leading_grid_is_ddims_skip_and_only_for_ddpm():
    """spacing 'leading': DDIM's range(0, T, T // N) as times t = step + 1, then the clean time 0."""
    grid = np.asarray(processes.get("ddpm", num_scales=1000).time_grid(10, "leading"))
    np.testing.assert_array_equal(grid, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1, 0])
    with pytest.raises(ValueError, match="leading.*ddpm"):
        processes.get("vp").time_grid(10, "leading")
