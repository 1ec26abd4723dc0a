"""The 8-Gaussians toy tells the truth: a network trained on the mixture recovers its 8 modes (weight
and width of each), unclipped on their radius-2 circle; the sampler alone, with the mixture's exact
denoiser, passes the same check, so a failure of the trained one is the training's."""

import os
import time

import jax
import numpy as np

from diffjax import sample, samplers, toy, trainer
from diffjax.configuration import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = f"{ROOT}/configs/toy/eight_gaussians_edm.py"
MIXTURE = toy.eight_gaussians()  # radius 2, component std 0.1
# 2000 samples per mode: each per-axis std is estimated to 1.6% (1 / sqrt(2 n)); at 4000 samples
# (3.2%) the largest of the 16 estimates' own errors would take most of the 10% allowed.
NUM = 16000
# The config's sampler on the log-SNR grid: with the exact denoiser its widths are 2% narrow (the
# default Karras grid: 3%); its stochastic steps undo some of a network's error.
SAMPLER, STEPS, OPTIONS = "ancestral", 200, {"spacing": "logsnr"}
WEIGHT_ATOL = 0.025  # |weight - 1/8| per mode: 9.5 binomial sds (0.0026)
WIDTH_RTOL = 0.10  # per mode, the std along x and along y vs the component std


def check_recovers_the_mixture(x) -> dict:
    """Every mode holds 1/8 of the samples (WEIGHT_ATOL) with std 0.1 along each axis (WIDTH_RTOL)."""
    x = np.asarray(x)
    stats = toy.mode_statistics(MIXTURE, x)
    std = float(MIXTURE.stds[0])
    weights, widths = stats["weights"], stats["axis_stds"] / std - 1
    report = f"weights {np.round(weights, 4).tolist()}, width errors (x, y) {np.round(widths, 3).tolist()}"
    assert np.all(np.abs(weights - 1 / 8) <= WEIGHT_ATOL), report
    assert np.all(np.abs(widths) <= WIDTH_RTOL), report
    np.testing.assert_allclose(np.linalg.norm(stats["means"], axis=1), 2.0, atol=0.03, err_msg=report)
    return stats


def test_exact_denoiser_recovers_the_mixture():
    """The oracle: the config's process and sampler with the mixture's exact denoiser."""
    config = load_config(CONFIG)
    process = trainer.build_process(config)
    x, _ = samplers.sample(SAMPLER, MIXTURE.denoiser(process), process, jax.random.PRNGKey(1), (NUM, 2), STEPS, **OPTIONS)
    check_recovers_the_mixture(x)


def test_trained_toy_recovers_the_mixture():
    """configs/toy/eight_gaussians_edm.py trained in-process with the trainer's own fused step (loss,
    Adam, EMA) for its n_iters, on fresh mixture batches (the grain pipeline's per-example Python
    would take most of the time budget here); then `sample.generate`, what `diffjax sample` runs."""
    start = time.perf_counter()
    config = load_config(CONFIG)
    mesh = trainer.make_mesh(config, jax.devices()[:1])
    state, shardings, graphdef, rest = trainer.init_state(config, mesh)
    process = trainer.build_process(config)
    train_step = trainer.make_train_step(config, graphdef, rest, process, shardings, mesh)
    k, batch = int(config.training.n_jitted_steps), int(config.training.batch_size)
    draw = jax.jit(lambda key: MIXTURE.sample(key, k * batch).reshape(k, batch, 2))
    for i in range(int(config.training.n_iters) // k):
        state, losses = train_step(state, {"x": draw(jax.random.fold_in(jax.random.PRNGKey(config.seed), i))})
    assert np.isfinite(np.asarray(losses)).all()
    trained = time.perf_counter() - start
    ema = jax.device_get(state["ema"])  # trained on one device; generate shards over all of them
    x = sample.generate(config, graphdef, rest, process, ema, NUM, sampler=SAMPLER, steps=STEPS, seed=1, **OPTIONS)
    assert np.abs(x).max() > 2.0  # not clipped to the data range (-1, 1): the modes sit at radius 2
    stats = check_recovers_the_mixture(x)
    sampled = time.perf_counter() - start - trained
    print(
        f"trained {config.training.n_iters} steps in {trained:.0f}s, sampled in {sampled:.0f}s; "
        f"weights {np.round(stats['weights'], 4).tolist()}, axis stds {np.round(stats['axis_stds'], 4).tolist()}"
    )
