"""The discrete-time ELBO (Ho et al. 2020, eq. 5) and the fixed reverse-step variances, against oracles:
closed forms for Gaussian data with its exact denoiser, the 8-Gaussians mixture's exact likelihood,
scipy's normal CDF, and diffusers' DDPMScheduler for the ancestral step (fixed variances and iDDPM's
learned one, variance_type='learned_range'; the rest of the learned variances: tests/test_variances.py)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from tiny_configs import DIGITS

from diffjax import elbo as elbo_lib
from diffjax import likelihood, processes, samplers, steppers, toy
from diffjax.configuration import load_config
from diffjax.denoiser import Denoiser
from diffjax.evaluation import cli as eval_cli
from diffjax.evaluation import evaluate
from diffjax.sample import config_sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Gaussian data N(MU, S^2 I) on a T = 50 chain (Ho's linear betas rescaled to T: 0.1 / T .. 20 / T).
T = 50
BETAS = np.linspace(0.1 / T, 20.0 / T, T)
MU, S = np.array([0.3, -0.2, 0.5]), 0.4
GAUSS = toy.GaussianMixture(jnp.asarray(MU[None], jnp.float32), jnp.asarray([S], jnp.float32), jnp.ones(1))
CHAIN = processes.get("ddpm", num_scales=T, beta_start=0.1 / T, beta_end=20.0 / T)


def _abar():
    return np.concatenate([[1.0], np.cumprod(1.0 - BETAS)])


def _beta_tilde(u):
    ab = _abar()
    return BETAS[u - 1] * (1 - ab[u - 1]) / (1 - ab[u])


def _oracle_term(x0, eps, t, variance):
    """numpy float64, from the betas alone: (x0_hat, the decoder's variance) at t = 1, else L_{t-1} per example."""
    ab = _abar()
    a, sg2 = np.sqrt(ab[t]), 1 - ab[t]
    x_t = a * x0 + np.sqrt(sg2) * eps
    x0_hat = MU + a * S**2 / (a**2 * S**2 + sg2) * (x_t - a * MU)  # E[x0 | x_t] of Gaussian data
    if t == 1:
        return x0_hat, _beta_tilde(2)  # Ho et al.'s code: beta-tilde_2 for the decoder, both variances
    c0 = np.sqrt(ab[t - 1]) * BETAS[t - 1] / (1 - ab[t])
    ct = np.sqrt(1 - BETAS[t - 1]) * (1 - ab[t - 1]) / (1 - ab[t])
    vq = _beta_tilde(t)
    vp = vq if variance == "fixed_small" else BETAS[t - 1]
    mq, mp = c0 * x0 + ct * x_t, c0 * x0_hat + ct * x_t
    return (0.5 * (np.log(vp / vq) + vq / vp - 1 + (mq - mp) ** 2 / vp)).sum(-1)


def _expected_terms(x0, variance="fixed_small"):
    """E over x_t ~ q(x_t | x0) of every term (B, T) (continuous decoder) and the prior KL (B,), in closed form."""
    ab = _abar()
    terms = []
    for t in range(1, T + 1):
        a, sg2 = np.sqrt(ab[t]), 1 - ab[t]
        k = a * S**2 / (a**2 * S**2 + sg2)
        err2 = ((1 - k * a) * (x0 - MU)) ** 2 + k**2 * sg2  # E (x0 - x0_hat)^2 per dimension
        if t == 1:
            v = _beta_tilde(2)
            terms.append((0.5 * np.log(2 * np.pi * v) + err2 / (2 * v)).sum(-1))
            continue
        c0 = np.sqrt(ab[t - 1]) * BETAS[t - 1] / (1 - ab[t])
        vq = _beta_tilde(t)
        vp = vq if variance == "fixed_small" else BETAS[t - 1]
        terms.append((0.5 * (np.log(vp / vq) + vq / vp - 1 + c0**2 * err2 / vp)).sum(-1))
    prior = (0.5 * (-np.log(1 - ab[T]) + (1 - ab[T]) + ab[T] * x0**2 - 1)).sum(-1)
    return np.stack(terms, -1), prior


def test_discretized_gaussian_is_scipys_cdf_difference_over_8bit_bins():
    x = np.repeat(np.linspace(-1, 1, 256)[None], 3, 0)
    mean, std = np.array([[-0.3], [0.1], [0.99]]), np.array([[0.01], [0.3], [2.0]])
    got = np.asarray(
        elbo_lib.discretized_gaussian_log_likelihood(
            jnp.asarray(x, jnp.float32), jnp.asarray(mean, jnp.float32), jnp.asarray(np.log(std), jnp.float32)
        ),
        np.float64,
    )
    h = 1 / 255  # half a bin: bins 2/255 wide, the end bins open
    lo, hi = np.where(x <= -1 + h / 2, -np.inf, x - h), np.where(x >= 1 - h / 2, np.inf, x + h)
    above = x > mean  # scipy's upper tail through sf, for an accurate reference
    with np.errstate(divide="ignore"):
        ref = np.where(
            above,
            np.log(stats.norm.sf(lo, mean, std) - stats.norm.sf(hi, mean, std)),
            np.log(stats.norm.cdf(hi, mean, std) - stats.norm.cdf(lo, mean, std)),
        )
    ok = np.isfinite(ref)  # scipy underflows to 0 far in the tails; ours stays finite there
    assert ok.sum() > 600 and np.all(np.isfinite(got)) and np.all(got[~ok] < -700)
    np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.exp(got).sum(1), 1.0, atol=1e-5)  # the bins cover the real line


def test_every_term_of_gaussian_data_equals_its_closed_form():
    """Each L_{t-1} (both variances) and the decoder L_0 (continuous and discretised) at the same x_t as a
    numpy oracle; all in one jitted program."""
    rng = np.random.default_rng(0)
    x0 = np.clip(np.round((MU + S * rng.standard_normal((6, 3)) + 1) * 127.5) / 127.5 - 1, -1, 1)  # on the 8-bit grid
    eps = rng.standard_normal((T, 6, 3))
    den = GAUSS.denoiser(CHAIN, "eps")
    kinds = [(v, d) for v in ("fixed_small", "fixed_large") for d in ("gaussian", "discretized")]

    def terms(t, e):
        x = jnp.asarray(x0, jnp.float32)
        return [elbo_lib.elbo_terms(den, CHAIN, x, t, e, variance=v, decoder=d) for v, d in kinds]

    got = jax.jit(jax.vmap(terms))(jnp.arange(1, T + 1), jnp.asarray(eps, jnp.float32))
    got = {kind: np.asarray(g, np.float64) for kind, g in zip(kinds, got)}
    for variance in ("fixed_small", "fixed_large"):
        cont, disc = got[(variance, "gaussian")], got[(variance, "discretized")]
        for t in range(2, T + 1):
            np.testing.assert_allclose(cont[t - 1], _oracle_term(x0, eps[t - 1], t, variance), rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(disc[1:], cont[1:], rtol=1e-5)  # the decoder is only L_0
        x0_hat, v = _oracle_term(x0, eps[0], 1, variance)
        np.testing.assert_allclose(cont[0], -stats.norm.logpdf(x0, x0_hat, np.sqrt(v)).sum(-1), rtol=1e-4)
        h = 1 / 255
        lo, hi = np.where(x0 <= -1 + h / 2, -np.inf, x0 - h), np.where(x0 >= 1 - h / 2, np.inf, x0 + h)
        p = stats.norm.cdf(hi, x0_hat, np.sqrt(v)) - stats.norm.cdf(lo, x0_hat, np.sqrt(v))
        np.testing.assert_allclose(disc[0], -np.log(p).sum(-1), rtol=1e-4)
    assert not np.allclose(got[("fixed_small", "gaussian")], got[("fixed_large", "gaussian")])
    # L_T: KL(N(a_T x0, 1 - abar_T) || N(0, 1)), about 1e-5 nats here
    prior = elbo_lib.prior_kl(CHAIN, jnp.asarray(x0, jnp.float32))
    np.testing.assert_allclose(prior, _expected_terms(x0)[1], rtol=1e-3, atol=1e-8)


@pytest.fixture(scope="module")
def gaussian_batch():
    return np.asarray(GAUSS.sample(jax.random.key(1), 400), np.float64)


def test_all_term_elbo_of_gaussian_data_is_its_expectation(gaussian_batch):
    """One lax.scan over all T terms: the mean over examples of ELBO - E[ELBO | x0] is 0 within 4 standard errors."""
    x0 = gaussian_batch
    value, info = likelihood.elbo(GAUSS.denoiser(CHAIN, "eps"), CHAIN, jax.random.key(0), x0, decoder="gaussian")
    terms, prior = _expected_terms(x0)
    d = np.asarray(value, np.float64) + (terms.sum(-1) + prior)
    assert abs(d.mean()) < 4 * d.std() / np.sqrt(len(d)), (d.mean(), d.std())
    assert info["terms"].shape == (len(x0), T) and info["num_terms"] == T == info["nfe"] and not np.any(info["stderr"])
    np.testing.assert_allclose(info["prior"], prior, rtol=1e-3, atol=1e-8)
    np.testing.assert_allclose(info["bpd"], -np.asarray(value) / (3 * np.log(2)), rtol=1e-6)


def test_k_term_estimator_is_unbiased_with_its_standard_error(gaussian_batch):
    """K = 10 terms drawn uniformly (each scaled by T/K) or importance-weighted (by 1/(K p(t))): over 100 keys
    the mean equals the exact expected sum of all T terms within 4 standard errors, the reported standard
    error matches the spread across keys, and weights p(t) ~ |E L(t)| cut that spread."""
    x0 = gaussian_batch[:16]
    terms, prior = _expected_terms(x0)
    den = GAUSS.denoiser(CHAIN, "eps")
    spreads = []
    for weights in (None, np.abs(terms.mean(0)) + 0.05):
        runs = [
            likelihood.elbo(den, CHAIN, jax.random.key(i), x0, decoder="gaussian", num_terms=10, time_weights=weights)
            for i in range(100)
        ]
        values = np.stack([np.asarray(v, np.float64) for v, _ in runs])  # (keys, B)
        reported = np.stack([np.asarray(info["stderr"], np.float64) for _, info in runs])
        batch_means = (values + terms.sum(-1) + prior).mean(1)
        assert abs(batch_means.mean()) < 4 * batch_means.std(ddof=1) / np.sqrt(len(batch_means))
        spread = values.std(0, ddof=1)  # per example, across keys
        ratio = np.sqrt((reported**2).mean() / (spread**2).mean())
        assert 0.8 < ratio < 1.25, ratio
        spreads.append(spread.mean())
        assert runs[0][1]["num_terms"] == 10 == runs[0][1]["nfe"] and "terms" not in runs[0][1]
    assert spreads[1] < 0.5 * spreads[0], spreads


@pytest.fixture(scope="module")
def mixture_gaps():
    """-(ELBO) + log p(x0) per example for the 8-Gaussians mixture's exact denoiser (continuous decoder, so
    the ELBO bounds the density; E_data[ELBO] <= E_data log p_model <= E_data log p_data), at T = 100 and 1000
    (Ho's betas rescaled to T), and for a noisy denoiser at T = 100."""
    mixture = toy.eight_gaussians()
    x0 = mixture.sample(jax.random.key(3), 4000)
    logp = np.asarray(mixture.log_prob(x0), np.float64)
    noise = jax.random.normal(jax.random.key(9), x0.shape)

    def noisy(params, x, t, cond):  # the exact x0 estimate plus scale * a fixed perturbation
        (m, scale), process = params, processes.get("ddpm", num_scales=100, beta_start=1e-3, beta_end=0.2)
        exact = process.convert("score", "x0", m.diffused_score(x, process.alpha(t), process.sigma(t)), x, t)
        return exact + scale * noise

    gaps = {}
    for T_, scale in ((100, 0.0), (100, 0.05), (1000, None)):
        p = processes.get("ddpm", num_scales=T_, beta_start=0.1 / T_, beta_end=20.0 / T_)
        den = mixture.denoiser(p, "x0") if scale is None else Denoiser(noisy, (mixture, jnp.float32(scale)), "x0")
        value, _ = likelihood.elbo(den, p, jax.random.key(0), x0, decoder="gaussian", variance="fixed_large")
        gaps[(T_, scale)] = logp - np.asarray(value, np.float64)
    return gaps


def test_mixture_elbo_is_below_the_exact_log_likelihood_and_the_gap_shrinks_with_T(mixture_gaps):
    def mean_se(d):
        return d.mean(), d.std(ddof=1) / np.sqrt(len(d))

    for key in ((100, 0.0), (1000, None)):
        m, se = mean_se(mixture_gaps[key])
        assert m > 4 * se, (key, m, se)  # E log p - E ELBO > 0
    m, se = mean_se(mixture_gaps[(100, 0.0)] - mixture_gaps[(1000, None)])  # paired: same x0
    assert m > 4 * se, (m, se)
    m, se = mean_se(mixture_gaps[(100, 0.05)] - mixture_gaps[(100, 0.0)])  # a noisy denoiser: a lower ELBO
    assert m > 4 * se, (m, se)


def _ddpm_scheduler(variance, T):
    torch = pytest.importorskip("torch")
    from torch_peers import bare_torchvision

    bare_torchvision()  # diffusers imports torchvision whenever it is installed
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, variance_type=variance, clip_sample=False
    )
    sched.set_timesteps(T)
    # diffusers' alphas_cumprod is a float32 cumprod: its 1 - abar_2 is off by 1.5e-4 (relative) at T = 1000,
    # which moves a step near t = 1 by ~3e-5. Its step math, on the float64 table (ours is exact float64 cast).
    sched.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - np.linspace(1e-4, 0.02, T)))
    return torch, sched


def _peer_step(torch, sched, eps, t, x, z):
    """diffusers' step from our time t (its timestep t - 1) with the noise z."""
    with mock.patch("diffusers.schedulers.scheduling_ddpm.randn_tensor", return_value=torch.from_numpy(z)):
        return sched.step(torch.from_numpy(eps), t - 1, torch.from_numpy(x)).prev_sample.numpy()


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ancestral_step_is_diffusers_ddpm_step(variance):
    """Same x_t, same model output (eps), same noise: one step of each, t = T .. 1 (no noise at t = 1)."""
    torch, sched = _ddpm_scheduler(variance, 1000)
    process = processes.get("ddpm")
    rng = np.random.default_rng(0)
    x, eps, z = (rng.standard_normal((4, 8, 8, 3)).astype(np.float32) for _ in range(3))
    stepper = steppers.Ancestral(variance=variance)
    for t in (1000, 700, 50, 2, 1):
        tt = jnp.full((4,), float(t))
        x0 = process.convert("eps", "x0", jnp.asarray(eps), jnp.asarray(x), tt)
        step = steppers.Step(0, 1000, tt, tt, tt - 1, t == 1)
        ours = stepper.update(process, {"x": jnp.asarray(x)}, x0, 0, step, lambda code: jnp.asarray(z))["x"]
        np.testing.assert_allclose(ours, _peer_step(torch, sched, eps, t, x, z), atol=1e-5, err_msg=f"t={t}")


@pytest.mark.parametrize("stride", [1, 100])
def test_learned_ancestral_step_is_diffusers_learned_range_step(stride):
    """Same x_t, same model output (eps and the variance channels, v' in [-1, 1]; ours v = (v' + 1) / 2),
    same noise: one step of each; stride 100 is a 10-step run (diffusers' leading spacing), where both
    interpolate between the strided step's own beta and beta-tilde."""
    torch, sched = _ddpm_scheduler("learned_range", 1000)
    if stride > 1:
        sched.set_timesteps(1000 // stride)
    process = processes.get("ddpm")
    rng = np.random.default_rng(0)
    x, eps, z = (rng.standard_normal((4, 3, 8, 8)).astype(np.float32) for _ in range(3))  # NCHW: theirs split dim 1
    v_range = rng.uniform(-1.0, 1.0, x.shape).astype(np.float32)
    stepper = steppers.Ancestral(variance="learned")
    assert stepper.learned_variance
    for t in (1000, 700, 50, 2, 1) if stride == 1 else (901, 501, 101, 1):
        tt = jnp.full((4,), float(t))
        x0 = process.convert("eps", "x0", jnp.asarray(eps), jnp.asarray(x), tt)
        step = steppers.Step(0, 1000 // stride, tt, tt, jnp.maximum(tt - stride, 0.0), t == 1)
        v = jnp.asarray((v_range + 1.0) / 2.0)
        ours = stepper.update(process, {"x": jnp.asarray(x)}, x0, 0, step, lambda code: jnp.asarray(z), v=v)["x"]
        theirs = _peer_step(torch, sched, np.concatenate([eps, v_range], axis=1), t, x, z)
        np.testing.assert_allclose(ours, theirs, atol=1e-5, err_msg=f"t={t}")
    # v = 0 and v = 1 are exactly the two fixed choices
    tt = jnp.full((4,), 700.0)
    step = steppers.Step(0, 1000, tt, tt, tt - 1, False)
    x0 = process.convert("eps", "x0", jnp.asarray(eps), jnp.asarray(x), tt)
    for v, fixed in ((0.0, "fixed_small"), (1.0, "fixed_large")):
        a = steppers.posterior_step(
            process, jnp.asarray(x), x0, tt, tt - 1, jnp.asarray(z), variance="learned", v=jnp.full(x.shape, v)
        )
        b = steppers.posterior_step(process, jnp.asarray(x), x0, tt, tt - 1, jnp.asarray(z), variance=fixed)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_fixed_large_sampler_from_the_config_is_diffusers_trajectory():
    """ddpm_cifar10's sampling block (fixed_large) through config_sampler and samplers.sample on a T = 20 chain,
    against the DDPMScheduler loop fed the same model outputs and the sampler's per-step noise."""
    torch, sched = _ddpm_scheduler("fixed_large", 20)
    config = load_config(os.path.join(ROOT, "configs/ddpm_cifar10.py"), ["--config.process.num_scales=20"])
    sampler, steps, opts = config_sampler(config, None, 20, {"clip_x0": None})
    assert (sampler, steps, opts) == ("ancestral", 20, {"clip_x0": None, "variance": "fixed_large"})
    process = processes.get("ddpm", num_scales=20)
    den = toy.eight_gaussians(radius=0.5, std=0.05).denoiser(process, "eps")
    key, shape = jax.random.key(4), (64, 2)
    x_T = np.asarray(jax.random.normal(jax.random.key(5), shape))
    ours, _ = samplers.sample(sampler, den, process, key, shape, steps, x_T=jnp.asarray(x_T), **opts)
    keys, x = samplers.example_keys(key, shape[0]), x_T
    for i, t in enumerate(range(20, 0, -1)):
        eps = np.asarray(den(jnp.asarray(x), jnp.full((64,), float(t))))
        z = np.asarray(samplers.example_noise_coded(keys, shape[1:], i, 0))
        x = _peer_step(torch, sched, eps, t, x, z)
    np.testing.assert_allclose(ours, x, atol=1e-4)


def test_variance_and_elbo_refuse_bad_input_in_one_line():
    config = load_config(os.path.join(ROOT, "configs/digits.py"))
    config.sampling.variance = "learned"  # a learned variance (tests/test_variances.py) reaches the sampler
    assert config_sampler(config, "ancestral", None, {})[2] == {"variance": "learned"}
    config.sampling.variance = "big"
    with pytest.raises(ValueError, match="sampling.variance must be one of"):
        config_sampler(config, "ancestral", None, {})
    with pytest.raises(ValueError, match="variance must be one of"):
        steppers.make("ancestral", variance="large")
    den, x = GAUSS.denoiser(CHAIN), jnp.zeros((2, 3))
    for process, kwargs, message in (
        (processes.get("vp"), {}, "continuous-time"),
        (CHAIN, {}, "not 256-level data"),  # 0.5 is off the 8-bit grid of [-1, 1]
        (CHAIN, {"num_terms": 0}, "num_terms must be"),
        (CHAIN, {"time_weights": np.ones(T), "decoder": "gaussian"}, "give num_terms"),
        (CHAIN, {"num_terms": 4, "time_weights": np.ones(3), "decoder": "gaussian"}, "50 positive"),
        (CHAIN, {"decoder": "logistic"}, "decoder must be"),
    ):
        with pytest.raises(ValueError, match=message):
            likelihood.elbo(den, process, jax.random.key(0), x + 0.5, **kwargs)
    vp, ddpm = processes.get("vp"), processes.get("ddpm")
    for process, flags, message in (
        (ddpm, dict(method="ode"), "--method ode: process 'ddpm' is a discrete chain"),
        (ddpm, dict(method=None, elbo_terms=1001), "--elbo_terms must be at most T = 1000"),
        (vp, dict(method=None, elbo_terms=8), "--elbo_terms is for --method elbo"),
    ):
        with pytest.raises(ValueError, match=message):
            evaluate._bpd_method(argparse.Namespace(**{"elbo_terms": None, **flags}), process)
    assert evaluate._bpd_method(argparse.Namespace(method=None, elbo_terms=1000), ddpm) == ("elbo", None)
    assert evaluate._bpd_method(argparse.Namespace(method="elbo", elbo_terms=None), vp) == ("elbo", 16)  # diffjax.vlb
    assert evaluate._bpd_method(argparse.Namespace(method=None, elbo_terms=None), vp) == ("ode", None)


def _diffjax(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run([sys.executable, "-m", "diffjax", *args], cwd=ROOT, env=env, capture_output=True, text=True)


def test_eval_bpd_elbo_on_a_tiny_ddpm_workdir(tmp_path, capsys):
    """`diffjax eval bpd --method elbo --elbo_terms 8` on the tests' 2-step digits DDPM (the same training as
    test_evaluate's, so a session's compilation cache serves both): a record with its protocol; bad flags are
    one line."""
    wd = tmp_path / "w"
    res = _diffjax("train", f"--workdir={wd}", *DIGITS)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _diffjax("eval", "bpd", f"--workdir={wd}", "--method=elbo", "--elbo_terms=8", "--num=6", "--no_progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "bits/dim on eval:" in res.stdout and "(ELBO, 8 of T terms" in res.stdout
    record = json.loads((wd / "eval" / "bpd_step_2_elbo8.json").read_text())
    m, p = record["metrics"], record["protocol"]
    assert p["method"] == "elbo" and p["num_terms"] == 8 and p["mean_nfe"] == 8 and p["decoder"] == "discretized"
    assert p["variance"] == "fixed_small" and p["clip_x0"] is None and p["estimator"].startswith("8 of T terms")
    assert m["num"] == 6 and np.isfinite(m["bpd"]) and 0 < m["bpd"] < 100 and m["bpd_stderr"] > 0
    # bad input, in this process: the command's checks come before any compilation
    with pytest.raises(eval_cli.EvalError, match="--method ode: process 'ddpm' is a discrete chain"):
        eval_cli.cmd_bpd([f"--workdir={wd}", "--method=ode"])
    with pytest.raises(eval_cli.EvalError, match="--elbo_terms must be at most T = 1000"):
        eval_cli.cmd_bpd([f"--workdir={wd}", "--elbo_terms=1001"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # argparse: one line, exit 2
        eval_cli.cmd_bpd([f"--workdir={wd}", "--method=vlb"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "--method" in err
