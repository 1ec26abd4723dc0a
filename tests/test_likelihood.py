"""Probability-flow ODE likelihood of the exact mixture denoiser against the true log-density."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from diffjax import likelihood, processes, toy

MIXTURE = toy.eight_gaussians()


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "edm", "flow"])
def test_hutchinson_log_likelihood_matches_log_prob(name):
    p = processes.get(name)
    x = MIXTURE.sample(jax.random.key(5), 512)
    true = np.asarray(MIXTURE.log_prob(x))
    den = MIXTURE.denoiser(p, "flow" if name == "flow" else "eps")  # flow: from t = 1, its exact prior
    est, info = likelihood.log_likelihood(den, p, jax.random.key(0), x)
    est = np.asarray(est)
    assert abs(est.mean() - true.mean()) < 0.02 * abs(true.mean())
    assert info["nfe"] > 10


@pytest.mark.parametrize("name", ["vp", "edm", "flow"])
def test_exact_trace_matches_log_prob_per_example(name):
    p = processes.get(name)
    x = MIXTURE.sample(jax.random.key(6), 256)
    est, _ = likelihood.log_likelihood(MIXTURE.denoiser(p, "x0"), p, jax.random.key(0), x, trace="exact")
    err = np.abs(np.asarray(est) - np.asarray(MIXTURE.log_prob(x)))
    assert err.mean() < 0.02 and err.max() < 0.1, (err.mean(), err.max())
    # A shifted point set is much less likely, and the estimate says so.
    far_den = MIXTURE.denoiser(p, "x0" if name == "flow" else "eps")
    far, _ = likelihood.log_likelihood(far_den, p, jax.random.key(0), x * 0.5, trace="exact")
    assert float(jnp.mean(far)) < float(jnp.mean(est)) - 10


def test_bits_per_dim_matches_discrete_code_length():
    """1-D N(0, 0.3^2) data quantised to 256 bins on [-1, 1]: bpd ~ E[-log2 P(bin)]."""
    gauss = toy.GaussianMixture(jnp.zeros((1, 1)), jnp.array([0.3]), jnp.ones(1))
    u = np.clip(np.round((np.asarray(gauss.sample(jax.random.key(1), 2000)) + 1) / 2 * 255), 0, 255)
    x = -1 + 2 * u / 255
    edges_lo, edges_hi = -1 + 2 * u / 256, -1 + 2 * (u + 1) / 256
    code_length = -np.log2(norm.cdf(edges_hi, scale=0.3) - norm.cdf(edges_lo, scale=0.3))
    p = processes.get("vp")
    bpd, _ = likelihood.bits_per_dim(gauss.denoiser(p), p, jax.random.key(2), jnp.asarray(x, jnp.float32), trace="exact")
    assert float(jnp.mean(bpd)) == pytest.approx(code_length.mean(), rel=0.01)


def test_bad_input_errors():
    ddpm = processes.get("ddpm")
    x = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="discrete chain"):
        likelihood.log_likelihood(MIXTURE.denoiser(ddpm), ddpm, jax.random.key(0), x)
    vp = processes.get("vp")
    with pytest.raises(ValueError, match="trace must be one of"):
        likelihood.log_likelihood(MIXTURE.denoiser(vp), vp, jax.random.key(0), x, trace="skilling")
    with pytest.raises(ValueError, match=r"x must be a batch"):
        likelihood.log_likelihood(MIXTURE.denoiser(vp), vp, jax.random.key(0), jnp.zeros(2))
    with pytest.raises(ValueError, match="data_range"):
        likelihood.bits_per_dim(MIXTURE.denoiser(vp), vp, jax.random.key(0), x, data_range=(1, -1))
