"""Learned reverse variances (Nichol & Dhariwal 2021) against oracles: the optimal isotropic reverse
variance of Gaussian data (Bao et al. 2022, Analytic-DPM) for the bound's terms, numpy re-derivations
of the hybrid loss's vlb term, and the command line (train with the hybrid loss, sample with the
learned variance). diffusers' learned_range step is test_elbo.py's peer, an imported learn_sigma
UNet's whole trajectory test_interop.py's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from scipy import stats
from tiny_configs import DIGITS, TOY

from diffjax import elbo as elbo_lib
from diffjax import losses, models, network, processes, samplers, steppers, toy
from diffjax.denoiser import Denoiser, from_fn, guided
from diffjax.serving.engine import Engine, served_steppers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Gaussian data N(MU, S^2 I) on a T = 40 chain (Ho's linear betas rescaled to T: 0.1 / T .. 20 / T).
T = 40
MU, S = np.array([0.1, -0.4]), 0.3
D = len(MU)
GAUSS = toy.GaussianMixture(jnp.asarray(MU[None], jnp.float32), jnp.asarray([S], jnp.float32), jnp.ones(1))
CHAIN = processes.get("ddpm", num_scales=T, beta_start=0.1 / T, beta_end=20.0 / T)


def _abar() -> np.ndarray:
    """alpha_bar_0..alpha_bar_T in float64, from the betas."""
    return np.concatenate([[1.0], np.cumprod(1.0 - np.linspace(0.1 / T, 20.0 / T, T))])


# ---- Gaussian data: the optimal variance beats both fixed ones ------------------------------------
def _gauss_step(t: int):
    """(beta_t, beta-tilde_t, c0, Var(x0 | x_t) per dimension) of the T = 50 chain on N(MU, S^2 I), float64."""
    abar = _abar()
    beta = 1.0 - abar[t] / abar[t - 1]
    tilde = beta * (1.0 - abar[t - 1]) / (1.0 - abar[t])
    c0 = np.sqrt(abar[t - 1]) * beta / (1.0 - abar[t])
    post = S**2 * (1.0 - abar[t]) / (abar[t] * S**2 + (1.0 - abar[t]))
    return beta, tilde, c0, post


def _v_opt() -> np.ndarray:
    """v_t giving Analytic-DPM's optimal isotropic variance beta-tilde_t + c0^2 Var(x0 | x_t) (exact for
    Gaussian data); v_1 = 0 (the decoder keeps beta-tilde_2, as the fixed choices)."""
    v = np.zeros(T + 1)
    for t in range(2, T + 1):
        beta, tilde, c0, post = _gauss_step(t)
        v[t] = np.log((tilde + c0**2 * post) / tilde) / np.log(beta / tilde)
    return v


def _optimal_denoiser() -> Denoiser:
    exact, table = GAUSS.denoiser(CHAIN, "x0"), jnp.asarray(_v_opt(), jnp.float32)

    def fn(x, t, cond):
        v = table[jnp.round(t).astype(jnp.int32)]
        return exact(x, t, cond), jnp.broadcast_to(v[:, None], x.shape)

    return from_fn(fn, "x0", learned_variance=True)


def _closed_kls(t: int) -> dict[str, float]:
    """E KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) per example with the exact mean, in closed form: with
    sigma*^2 = beta-tilde + c0^2 Var(x0 | x_t), D/2 (sigma*^2 / var - 1 - log(beta-tilde / var)) for a
    model variance var; D/2 log(sigma*^2 / beta-tilde) at var = sigma*^2."""
    beta, tilde, c0, post = _gauss_step(t)
    opt = tilde + c0**2 * post
    kl = {k: 0.5 * D * (opt / var - 1.0 - np.log(tilde / var)) for k, var in (("fixed_small", tilde), ("fixed_large", beta))}
    return {"learned": 0.5 * D * np.log(opt / tilde), **kl}


def test_optimal_learned_variance_beats_both_fixed_ones_on_gaussian_data():
    """With the exact denoiser, v chosen for the optimal variance: every per-step KL's closed form is below
    both fixed choices' (t = 2..T); elbo_terms' Monte Carlo values agree with the closed forms, and the
    paired gaps with the closed forms' gaps (4 standard errors); the whole ELBO is above both fixed ones'."""
    v = _v_opt()
    assert np.all((v[2:] > 0) & (v[2:] < 1))  # the optimum lies strictly between beta-tilde and beta
    for t in range(2, T + 1):
        closed = _closed_kls(t)
        assert closed["learned"] < min(closed["fixed_small"], closed["fixed_large"]), (t, closed)
    learned, exact = _optimal_denoiser(), GAUSS.denoiser(CHAIN, "x0")
    n = 4000
    x0 = jnp.asarray(MU + S * np.random.default_rng(1).standard_normal((n, D)), jnp.float32)
    for t in (2, 5, 20, T):
        eps = jax.random.normal(jax.random.key(t), (n, D))
        closed = _closed_kls(t)
        terms = {
            k: np.asarray(
                elbo_lib.elbo_terms(learned if k == "learned" else exact, CHAIN, x0, t, eps, variance=k, decoder="gaussian"),
                np.float64,
            )
            for k in closed
        }
        for k, value in terms.items():
            se = value.std(ddof=1) / np.sqrt(n)
            assert abs(value.mean() - closed[k]) < 4 * se + 1e-6, (t, k, value.mean(), closed[k], se)
        for k in ("fixed_small", "fixed_large"):
            assert closed["learned"] < closed[k]
            diff = terms["learned"] - terms[k]  # paired: the gap is the closed forms' gap
            assert abs(diff.mean() - (closed["learned"] - closed[k])) < 4 * diff.std(ddof=1) / np.sqrt(n) + 1e-6
    # The whole bound: the learned optimum's ELBO is above both fixed ones' (paired over the same x0).
    x0 = x0[:256]
    values = {
        k: np.asarray(
            elbo_lib.elbo(
                learned if k == "learned" else exact, CHAIN, jax.random.key(9), x0, variance=k, decoder="gaussian"
            )[0]
        )
        for k in ("learned", "fixed_small", "fixed_large")
    }
    for k in ("fixed_small", "fixed_large"):
        diff = values["learned"] - values[k]
        assert diff.mean() > 4 * diff.std(ddof=1) / np.sqrt(len(diff)), (k, diff.mean())


# ---- the hybrid loss ---------------------------------------------------------------------------------
def _grid_data(n: int, seed: int = 0) -> jnp.ndarray:
    """x0 on the 8-bit grid of [-1, 1], both end bins included."""
    u = np.random.default_rng(seed).integers(0, 256, (n, D))
    u[0, 0], u[1, 1] = 0, 255
    return jnp.asarray(u / 255.0 * 2.0 - 1.0, jnp.float32)


def _constant_denoiser(pred, v, learned: bool = True) -> Denoiser:
    """A denoiser whose outputs are its parameters: gradients w.r.t. them are w.r.t. the outputs."""
    if learned:
        return Denoiser(lambda p, x, t, c: p, (pred, v), "eps", True)
    return Denoiser(lambda p, x, t, c: p[0], (pred, v), "eps")


def _numpy_vlb(x0, t, eps, eps_hat, v) -> np.ndarray:
    """L_t in nats per example from the chain's float64 table: the Gaussian KL for t >= 2, the
    discretised decoder's -log P for t = 1 (bins 2/255 wide, the end bins open)."""
    abar = _abar()
    x0, eps, eps_hat, v = (np.asarray(a, np.float64) for a in (x0, eps, eps_hat, v))
    out = []
    for i, ti in enumerate(np.asarray(t, np.int64)):
        a_t, s_t = np.sqrt(abar[ti]), np.sqrt(1.0 - abar[ti])
        x_t = a_t * x0[i] + s_t * eps[i]
        x0_hat = (x_t - s_t * eps_hat[i]) / a_t
        if ti >= 2:
            beta, tilde, c0, _ = _gauss_step(ti)
            logvar = v[i] * np.log(beta) + (1 - v[i]) * np.log(tilde)
            diff = c0 * (x0[i] - x0_hat)
            out.append(np.sum(0.5 * (logvar - np.log(tilde) + (tilde + diff**2) / np.exp(logvar) - 1.0)))
        else:
            tilde_2 = _gauss_step(2)[1]
            std = np.exp(0.5 * (v[i] * np.log(1.0 - abar[1]) + (1 - v[i]) * np.log(tilde_2)))
            hi = np.where(x0[i] > 1 - 1e-6, np.inf, (x0[i] + 1 / 255 - x0_hat) / std)
            lo = np.where(x0[i] < -1 + 1e-6, -np.inf, (x0[i] - 1 / 255 - x0_hat) / std)
            out.append(-np.sum(np.log(stats.norm.cdf(hi) - stats.norm.cdf(lo))))
    return np.asarray(out)


def test_hybrid_loss_gradient_and_vlb_term():
    """The hybrid loss's gradient w.r.t. the prediction equals L_simple's (the vlb term sees a frozen
    mean) and reaches v; its vlb part is vlb_weight T / (D ln 2) times elbo.elbo_terms' term for that t,
    and that term re-derived in numpy (KL for t >= 2, discretised decoder for t = 1)."""
    n = 8
    x0 = _grid_data(n)
    rng = np.random.default_rng(3)
    pred = jnp.asarray(rng.standard_normal((n, D)), jnp.float32)
    v = jnp.asarray(rng.uniform(0.1, 0.9, (n, D)), jnp.float32)
    key, batch = jax.random.key(5), {"x": x0}

    def total(name, learned):
        return lambda p: losses.loss(name, _constant_denoiser(*p, learned=learned), CHAIN, batch, key)

    g_hybrid = jax.grad(total("hybrid", True))((pred, v))
    g_simple = jax.grad(total("eps", False))((pred, v))
    np.testing.assert_allclose(g_hybrid[0], g_simple[0], rtol=1e-6, atol=1e-9)
    assert float(jnp.abs(g_simple[1]).max()) == 0.0 and float(jnp.abs(g_hybrid[1]).max()) > 0.0

    t = jnp.asarray([1, 1, 2, 3, 10, 25, T, 1], jnp.float32)
    eps = jax.random.normal(jax.random.key(6), (n, D))
    den = _constant_denoiser(pred, v)
    hybrid = np.asarray(losses.hybrid_loss(den, CHAIN, x0, t, eps, vlb_weight=0.5), np.float64)
    mse = np.mean((np.asarray(pred, np.float64) - np.asarray(eps, np.float64)) ** 2, axis=-1)
    vlb = (hybrid - mse) * D * np.log(2.0) / (0.5 * T)
    term = np.asarray(elbo_lib.elbo_terms(den, CHAIN, x0, t, eps, variance="learned"), np.float64)
    np.testing.assert_allclose(vlb, term, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(vlb, _numpy_vlb(x0, t, eps, pred, v), rtol=1e-4, atol=1e-4)


# ---- networks, guidance and bad input -------------------------------------------------------------
NETWORKS = [
    dict(name="ddpm_unet", nf=8, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(4,), num_groups=4, image_size=8),
    *(
        dict(name="ncsnpp", nf=8, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(4,), image_size=8, progressive=p)
        for p in ("none", "output_skip")
    ),
]


@pytest.mark.parametrize("block", NETWORKS, ids=["ddpm_unet", "ncsnpp", "ncsnpp_output_skip"])
def test_learn_sigma_image_networks_double_their_output_channels(block):
    x, sigma = jnp.zeros((2, 8, 8, 3)), jnp.asarray([2.0, 4.0])
    for learn_sigma, channels in ((False, 3), (True, 6)):
        out = jax.eval_shape(lambda: models.create({**block, "learn_sigma": learn_sigma}, 0)(x, sigma))
        assert out.shape == (2, 8, 8, channels)


def test_learn_sigma_network_denoiser_splits_prediction_and_v():
    """model.learn_sigma doubles the MLP's outputs; the network denoiser splits them into (prediction, v),
    scale_by_sigma scaling only the prediction."""
    block = dict(name="mlp", nf=16, num_res_blocks=1, data_dim=2, scale_by_sigma=True)
    net = models.create({**block, "learn_sigma": True}, 0)
    x, t = jax.random.normal(jax.random.key(0), (2, 2)), jnp.asarray([0.3, 0.7])
    config = ml_collections.ConfigDict(dict(model=dict(prediction="eps", learn_sigma=True)))
    graphdef, weights, rest = nnx.split(net, nnx.Param, ...)
    process = processes.get("ve")
    den = network.network_denoiser(graphdef, rest, process, config, weights)
    pred, v = den.with_variance(x, t)
    assert den.learned_variance and pred.shape == v.shape == (2, 2)
    np.testing.assert_array_equal(den(x, t), pred)
    unscaled = models.create({**block, "learn_sigma": True, "scale_by_sigma": False}, 0)(x, process.noise_cond(t))
    np.testing.assert_allclose(v, unscaled[:, 2:], rtol=1e-6)  # v: the raw network output
    np.testing.assert_allclose(pred, unscaled[:, :2] / process.noise_cond(t)[:, None], rtol=1e-6)
    with pytest.raises(ValueError, match="model.learn_sigma .* is not supported with the 'edm' process"):
        network.network_denoiser(graphdef, rest, processes.get("edm"), config, weights)


def test_guidance_guides_the_prediction_and_takes_v_from_the_conditional_branch():
    def fn(x, t, cond):  # a conditional toy: prediction and v depend on the label
        c = cond.astype(jnp.float32)[:, None]
        return x * c, jax.nn.sigmoid(x + c)

    x, t, labels = jax.random.normal(jax.random.key(0), (2, D)), jnp.asarray([3.0, 7.0]), jnp.asarray([1, 2])
    g_pred, g_v = guided(from_fn(fn, "eps", learned_variance=True), 3.0).with_variance(x, t, labels)
    c, u = fn(x, t, labels), fn(x, t, jnp.full((2,), -1))
    np.testing.assert_allclose(g_pred, u[0] + 3.0 * (c[0] - u[0]), rtol=1e-6)
    np.testing.assert_allclose(g_v, c[1], rtol=1e-6)
    np.testing.assert_allclose(guided(from_fn(fn, "eps", learned_variance=True), 3.0)(x, t, labels), g_pred)


def test_learned_variance_without_a_variance_output_is_one_line():
    plain = GAUSS.denoiser(CHAIN)
    learned = _optimal_denoiser()
    x0 = _grid_data(4)
    message = r"needs a network that also outputs its variance: train one with model\.learn_sigma=True"
    with pytest.raises(ValueError, match="sampling.variance='learned' " + message):
        samplers.sample("ancestral", plain, CHAIN, jax.random.key(0), (2, D), 4, variance="learned")
    with pytest.raises(ValueError, match=message):
        elbo_lib.elbo(plain, CHAIN, jax.random.key(0), x0, variance="learned")
    with pytest.raises(ValueError, match="training.loss='hybrid' " + message):
        losses.loss("hybrid", plain, CHAIN, {"x": x0}, jax.random.key(0))
    with pytest.raises(ValueError, match="training.loss='hybrid' needs the discrete ddpm process"):
        losses.loss("hybrid", learned, processes.get("vp"), {"x": x0}, jax.random.key(0))
    sampling = ml_collections.ConfigDict({"variance": "learned"})
    with pytest.raises(ValueError, match=message):
        Engine(plain, CHAIN, (D,), batch_slots=2, served=served_steppers(sampling, None, CHAIN), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="variance must be one of"):
        steppers.make("ancestral", variance="learned_range")
    # a learn_sigma network with fixed variances: everything but the learned computations ignores v
    a, _ = samplers.sample("ancestral", learned, CHAIN, jax.random.key(1), (2, D), 4)
    b, _ = samplers.sample("ancestral", GAUSS.denoiser(CHAIN, "x0"), CHAIN, jax.random.key(1), (2, D), 4)
    np.testing.assert_array_equal(a, b)


# ---- the command line -----------------------------------------------------------------------------
def _diffjax(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run([sys.executable, "-m", "diffjax", *args], cwd=ROOT, env=env, capture_output=True, text=True)


TOY_DDPM = """
from configs import default
from configs.toy import eight_gaussians


def get_config():
    config = eight_gaussians.get_config()
    config.process = default.process("ddpm", num_scales=100)
    config.sampling.sampler = "ancestral"
    return config
"""


def test_cli_trains_the_hybrid_loss_and_samples_with_the_learned_variance(tmp_path):
    """`diffjax train` of the toy MLP on a T = 100 ddpm chain with learn_sigma and the hybrid loss (its
    snapshot samples use the learned variance), then `diffjax sample`."""
    (tmp_path / "toy_ddpm.py").write_text(TOY_DDPM)
    wd = tmp_path / "w"
    flags = [f.replace(f"{ROOT}/configs/toy/eight_gaussians.py", str(tmp_path / "toy_ddpm.py")) for f in TOY]
    learned = ["--config.model.learn_sigma=True", "--config.training.loss=hybrid", "--config.sampling.variance=learned"]
    res = _diffjax(
        "train", f"--workdir={wd}", *flags, "--config.training.n_iters=4", "--config.sampling.sampler=ancestral", *learned
    )
    assert res.returncode == 0, res.stderr[-3000:]
    config = json.loads((wd / "config.json").read_text())
    assert config["model"]["learn_sigma"] and config["training"]["loss"] == "hybrid"
    lines = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    logged = [r["loss"] for r in lines if "loss" in r]
    assert len(logged) == 2 and all(np.isfinite(logged))  # log_freq 2 of 4 steps
    res = _diffjax("sample", f"--workdir={wd}", "--num=16", f"--out={tmp_path / 'samples.png'}")
    assert res.returncode == 0, res.stderr[-3000:]
    x = np.load(tmp_path / "samples.npz")["samples"]
    assert x.shape == (16, 2) and np.all(np.isfinite(x))


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.training.loss=hybrid", "training.loss='hybrid' needs a network that also outputs its variance"),
        ("--config.sampling.variance=learned", "sampling.variance='learned' needs a network that also outputs"),
    ],
)
def test_cli_learned_options_without_learn_sigma_are_one_line_exit_2(flag, message, capsys, tmp_path):
    from diffjax import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["train", f"--workdir={tmp_path / 'w'}", *DIGITS, flag])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
