"""Flow matching / rectified flow (process 'flow', prediction 'flow'): closed forms, the velocity
against finite differences of the marginal, DDIM eta 0 = Euler, diffusers' FlowMatchEulerDiscreteScheduler
as the peer of the Euler grid and step, the training-time distributions, the rectified-flow loss and
the one-line errors. The samplers and the likelihood on the exact mixture are in the shared suites
(tests/test_samplers.py, tests/test_likelihood.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffjax import denoiser as dn
from diffjax import losses, network, processes, samplers
from diffjax.processes.flow import shift_time

FLOW = processes.get("flow")


def test_closed_forms_and_prior():
    t = jnp.array([0.0, 0.25, 0.5, 0.999, 1.0])
    np.testing.assert_allclose(FLOW.alpha(t), 1 - t)
    np.testing.assert_allclose(FLOW.sigma(t), t)
    np.testing.assert_allclose(FLOW.log_snr(t[1:4]), 2 * np.log((1 - t[1:4]) / t[1:4]), rtol=1e-5)
    np.testing.assert_allclose(FLOW.noise_cond(t), 1000 * t)  # SD3 / diffusers: timesteps = sigma * 1000
    x0, eps = jax.random.normal(jax.random.key(0), (2, 5, 3))
    np.testing.assert_array_equal(FLOW.marginal(x0, jnp.ones(5), eps), eps)  # the prior N(0, I), exactly
    assert FLOW.prior_std() == 1.0 and (FLOW.t_min, FLOW.t_max, FLOW.ratio_t_max) == (1e-3, 1.0, 0.999)
    # the closed-form velocity coefficients are the base class's autodiff of alpha and sigma
    np.testing.assert_allclose(
        np.stack(FLOW.velocity_coefficients(t)), np.stack(processes.Process.velocity_coefficients(FLOW, t))
    )
    f, g2 = FLOW.sde(t[:4])
    np.testing.assert_allclose(f, -1 / (1 - t[:4]), rtol=1e-6)
    np.testing.assert_allclose(g2, 2 * t[:4] / (1 - t[:4]), rtol=1e-6)


@pytest.mark.parametrize("name", ["flow", "vp", "ve", "edm"])
def test_velocity_is_the_time_derivative_of_the_marginal(name):
    """convert(eps -> 'flow') = d/dt (alpha x0 + sigma eps) (central difference in float64 numpy), on every
    continuous process: the kind is defined by autodiff of alpha and sigma."""
    p = processes.get(name)
    x0, eps = (np.asarray(a, np.float64) for a in jax.random.normal(jax.random.key(1), (2, 4, 3)))
    t = np.asarray(p.time_grid(6)[1:5], np.float64)
    h = 1e-4 * t
    coef = lambda f, s: np.asarray(f(jnp.asarray(s, jnp.float32)), np.float64)[:, None]  # noqa: E731
    # central differences of the float32 coefficients, step 1e-4 t: ~1e-3 relative error
    d_alpha = (coef(p.alpha, t + h) - coef(p.alpha, t - h)) / (2 * h[:, None])
    d_sigma = (coef(p.sigma, t + h) - coef(p.sigma, t - h)) / (2 * h[:, None])
    x = coef(p.alpha, t) * x0 + coef(p.sigma, t) * eps
    got = np.asarray(
        p.convert("eps", "flow", jnp.asarray(eps, jnp.float32), jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32))
    )
    np.testing.assert_allclose(got, d_alpha * x0 + d_sigma * eps, rtol=2e-2, atol=2e-2 * np.abs(d_sigma * eps).max())
    if name == "flow":
        np.testing.assert_allclose(got, eps - x0, rtol=1e-5, atol=1e-5)


def test_conversions_at_the_prior_end():
    """At t = 1 (alpha = 0) flow, x0 and v determine each other exactly; eps and score do not (x = eps)."""
    x0, eps = jax.random.normal(jax.random.key(2), (2, 4, 3))
    t = jnp.ones(4)
    x, u = FLOW.marginal(x0, t, eps), eps - x0
    np.testing.assert_allclose(FLOW.convert("flow", "x0", u, x, t), x0, atol=1e-6)
    np.testing.assert_allclose(FLOW.convert("flow", "v", u, x, t), -x0, atol=1e-6)  # v = a eps - s x0
    np.testing.assert_allclose(FLOW.convert("v", "flow", -x0, x, t), u, atol=1e-6)
    np.testing.assert_allclose(FLOW.convert("x0", "flow", x0, x, t), u, atol=1e-6)
    np.testing.assert_allclose(FLOW.convert("flow", "eps", u, x, t), eps, atol=1e-6)
    assert not np.all(np.isfinite(FLOW.convert("eps", "x0", eps, x, t)))


def test_probability_flow_drift_is_the_sde_form():
    """The ODE drift, now the velocity, equals score_sde's f x - g^2 / 2 score with the closed-form SDE."""
    from diffjax import toy

    mixture = toy.eight_gaussians()
    x = jax.random.normal(jax.random.key(3), (16, 2)) * 2
    for name in ("vp", "subvp", "flow"):
        p = processes.get(name)
        den = mixture.denoiser(p, "eps")
        for t in (0.05, 0.9):
            f, g2 = p.sde(jnp.float32(t))
            want = f * x - 0.5 * g2 * p.convert("eps", "score", den(x, jnp.float32(t)), x, jnp.float32(t))
            got = samplers.probability_flow_drift(den, p, None)(jnp.float32(t), x)
            scale = float(jnp.abs(f * x).max())  # f x and g^2 / 2 score nearly cancel (subvp near t = 1)
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5 * scale, err_msg=f"{name} {t}")


W = np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32) * 0.7
B = np.random.default_rng(1).normal(size=3).astype(np.float32)


def velocity_np(x, t):
    """A fixed smooth velocity field u(x, t) (float64 numpy)."""
    return np.tanh(x @ W.astype(np.float64) + t[:, None] * B) - 0.3 * x


VELOCITY = dn.from_fn(lambda x, t, c: jnp.tanh(x @ W + t[:, None] * B) - 0.3 * x, "flow")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_ddim_eta0_is_the_euler_step_on_the_velocity(shift):
    """DDIM (eta 0) on the flow grid equals x <- x + (t_next - t) u(x, t) (float64 numpy) to 1e-5."""
    p = processes.get("flow", shift=shift)
    x_T = jax.random.normal(jax.random.key(4), (64, 3))
    got, info = samplers.sample("ddim", VELOCITY, p, jax.random.key(0), (64, 3), 12, x_T=x_T)
    grid = np.asarray(p.time_grid(12), np.float64)
    u = np.linspace(1.0, 1e-3, 12)
    np.testing.assert_allclose(grid[:-1], shift_time(u, shift), rtol=1e-6)  # SD3's shift of the uniform grid
    x = np.asarray(x_T, np.float64)
    for t, s in zip(grid[:-1], grid[1:]):
        x = x + (s - t) * velocity_np(x, np.full(len(x), t))
    np.testing.assert_allclose(got, x, atol=1e-5)
    assert info["nfe"] == 12


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_trajectory_equals_diffusers_flow_match_euler(shift):
    """diffusers' FlowMatchEulerDiscreteScheduler(shift).set_timesteps(N) + step (SD3 pipelines) vs our
    ddim on spacing 'diffusers': the same grid (sigmas) and, from the same x_T with the same velocity
    field, the same trajectory to 1e-5. timesteps = sigma * 1000 = our noise_cond."""
    torch = pytest.importorskip("torch")
    from diffusers import FlowMatchEulerDiscreteScheduler

    n = 10
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    p = processes.get("flow", shift=shift)
    grid = np.asarray(p.time_grid(n, "diffusers"))
    np.testing.assert_allclose(grid, sched.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(p.noise_cond(grid[:-1])), sched.timesteps.numpy(), rtol=1e-6)
    x_T = jax.random.normal(jax.random.key(5), (32, 3))
    x = torch.from_numpy(np.array(x_T))
    w, b = torch.from_numpy(W), torch.from_numpy(B)
    for timestep in sched.timesteps:
        sigma = timestep / 1000.0
        out = torch.tanh(x @ w + sigma * b) - 0.3 * x
        x = sched.step(out, timestep, x).prev_sample
    ours, _ = samplers.sample("ddim", VELOCITY, p, jax.random.key(0), (32, 3), n, x_T=x_T, spacing="diffusers")
    np.testing.assert_allclose(ours, x.numpy(), atol=1e-5)
    # the 'default' grid differs only in its last time with a shift: shift(1e-3) there, shift(shift(1e-3)) here
    default = np.asarray(p.time_grid(n))
    assert default[-2] == pytest.approx(shift_time(1e-3, shift), rel=1e-5)
    assert grid[-2] == pytest.approx(shift_time(shift_time(1e-3, shift), shift), rel=1e-5)


def test_training_time_distributions():
    n = 20000
    t = np.asarray(processes.get("flow").sample_train_time(jax.random.key(6), n))
    assert stats.kstest(t, stats.uniform(1e-3, 1 - 1e-3).cdf).pvalue > 1e-3
    p = processes.get("flow", time_distribution="logit_normal", logit_mean=0.5, logit_std=0.8)
    t = np.asarray(p.sample_train_time(jax.random.key(7), n))
    logit = np.log(t / (1 - t))
    assert stats.kstest(logit, stats.norm(0.5, 0.8).cdf).pvalue > 1e-3  # SD3's lognorm(m, s)
    assert stats.kstest(logit, stats.norm(0.0, 0.8).cdf).pvalue < 1e-6  # and the check has teeth


def test_flow_loss_is_the_rectified_flow_objective():
    """loss 'flow' on the flow process with prediction 'flow' = mean ||(eps - x0) - u_hat||^2, drawn with the
    loss's own keys; the other losses still train the flow process in another prediction."""
    x0 = jax.random.normal(jax.random.key(8), (32, 3))
    key = jax.random.key(9)
    got = losses.loss("flow", VELOCITY, FLOW, {"x": x0}, key)
    k_t, k_eps, _ = jax.random.split(key, 3)
    t = FLOW.sample_train_time(k_t, 32)
    eps = jax.random.normal(k_eps, x0.shape)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    want = jnp.mean((VELOCITY(x_t, t) - (eps - x0)) ** 2)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    as_x0 = dn.from_fn(lambda x, t, c: x - t[:, None] * VELOCITY(x, t), "x0")  # the same network, as x0
    np.testing.assert_allclose(losses.loss("flow", as_x0, FLOW, {"x": x0}, key), want, rtol=1e-4)
    for name in ("eps", "v", "dsm"):
        assert np.isfinite(float(losses.loss(name, as_x0, FLOW, {"x": x0}, key)))


def test_ode_solver_comes_from_the_config():
    """configs/flow/cifar10_ddpmpp.py: the adaptive ODE with diffrax's Dopri5 (the paper's RK45)."""
    import os

    from diffjax import info, sample

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = info.load_config(os.path.join(root, "configs", "flow", "cifar10_ddpmpp.py"))
    assert sample.config_sampler(config, None, None, {}) == ("ode", 100, {"solver": "dopri5"})
    p = network.build_process(config)
    assert (p.name, config.model.prediction, config.training.loss) == ("flow", "flow", "flow")


def test_bad_input_errors():
    with pytest.raises(
        ValueError, match=r"process.time_distribution must be one of \('uniform', 'logit_normal'\), got 'beta'"
    ):
        processes.get("flow", time_distribution="beta")
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"process.shift must be > 0"):
            processes.get("flow", shift=bad)
    import ml_collections

    config = ml_collections.ConfigDict({"process": {"name": "flow"}, "model": {"prediction": "eps"}})
    with pytest.raises(
        ValueError, match=r"config.model.prediction must be one of \('flow', 'x0', 'v'\) for process 'flow', got 'eps'"
    ):
        network.build_process(config)
    config = ml_collections.ConfigDict({"process": {"name": "ddpm"}, "model": {"prediction": "flow"}})
    with pytest.raises(
        ValueError, match=r"config.model.prediction must be one of \('eps', 'x0', 'v', 'score'\) for process 'ddpm'"
    ):
        network.build_process(config)
    with pytest.raises(ValueError, match=r"config.model.prediction must be one of .* got 'score'"):
        losses.loss("dsm", dn.from_fn(lambda x, t, c: x, "score"), FLOW, {"x": jnp.zeros((2, 3))}, jax.random.key(0))
    ddpm = processes.get("ddpm")
    with pytest.raises(ValueError, match=r"training.loss='flow' .* needs a continuous process, got 'ddpm'"):
        losses.loss("flow", dn.from_fn(lambda x, t, c: x, "eps"), ddpm, {"x": jnp.zeros((2, 3))}, jax.random.key(0))
    with pytest.raises(ValueError, match="spacing 'diffusers' is for the flow process"):
        processes.get("vp").time_grid(10, "diffusers")
    for name in ("pc", "heun"):  # the SDE / x / alpha cannot start at t = 1, where alpha = 0
        with pytest.raises(
            ValueError, match=rf"sampler '{name}' divides by alpha\(t\), which is 0 .* t = 1 on process 'flow'"
        ):
            samplers.sample(name, VELOCITY, FLOW, jax.random.key(0), (4, 3), 10, spacing="default")


def test_the_server_serves_only_samplers_that_can_start_at_the_prior():
    """The engine's sampler table on the flow process: pc (its default grid starts at t = 1, where it
    divides by alpha = 0) is not served; heun on its Karras grid and the others are."""
    from diffjax.serving.engine import served_steppers

    assert sorted(served_steppers(process=FLOW)) == ["ancestral", "ddim", "dpm_solver++", "heun"]
    assert "pc" in served_steppers(process=processes.get("vp"))
