"""Toy data and the Gaussian-mixture oracle.

A mixture of isotropic Gaussians stays a mixture under every process here:
q_t(x) = sum_k w_k N(x; alpha mu_k, (alpha^2 s_k^2 + sigma^2) I), so its score, and through
Tweedie's formula E[x0 | x_t] = (x_t + sigma^2 score) / alpha, every prediction, are exact.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.denoiser import Denoiser
from diffjax.processes import Process, check_prediction

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """sum_k weights_k N(means_k, stds_k^2 I); means (K, D), stds (K,), weights (K,)."""

    means: Array
    stds: Array
    weights: Array

    def __post_init__(self):
        fields = (self.means, self.stds, self.weights)
        concrete = (list, tuple, np.ndarray, jax.Array)
        if not all(isinstance(f, concrete) and not isinstance(f, jax.core.Tracer) for f in fields):
            return  # pytree unflattening inside transformations: nothing to check
        shapes = tuple(np.shape(f) for f in fields)
        k = shapes[0][0] if len(shapes[0]) == 2 else None
        if k is None or shapes[1] != (k,) or shapes[2] != (k,):
            raise ValueError(f"GaussianMixture needs means (K, D), stds (K,), weights (K,); got shapes {shapes}")
        for name, f in zip(("means", "stds", "weights"), fields):
            object.__setattr__(self, name, jnp.asarray(f, jnp.float32))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, key: Array, n: int) -> Array:
        k_mode, k_noise = jax.random.split(key)
        modes = jax.random.categorical(k_mode, jnp.log(self.weights), shape=(n,))
        noise = jax.random.normal(k_noise, (n, self.dim))
        return self.means[modes] + self.stds[modes, None] * noise

    def _component_logps(self, x: Array, scale: Array, noise_var: Array) -> tuple[Array, Array]:
        """(log w_k + log N(x; scale mu_k, var_k I), var_k), both (B, K), var = scale^2 s_k^2 + noise_var.

        Squared distances are expanded as |x|^2 - 2 scale x.mu + scale^2 |mu|^2 so that only (B, K)
        arrays and one matmul appear (no (B, K, D) intermediate).
        """
        var = scale[:, None] ** 2 * self.stds[None] ** 2 + noise_var[:, None]
        sq = (
            jnp.sum(x**2, -1, keepdims=True)
            - 2 * scale[:, None] * (x @ self.means.T)
            + scale[:, None] ** 2 * jnp.sum(self.means**2, -1)[None]
        )
        log_w = jnp.log(self.weights / jnp.sum(self.weights))
        return log_w - 0.5 * (sq / var + self.dim * jnp.log(2 * math.pi * var)), var

    def diffused(self, alpha: float | Array, sigma: float | Array) -> GaussianMixture:
        """q_t: the mixture pushed through x_t = alpha x0 + sigma n (scalars), again a mixture:
        sum_k w_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I)."""
        alpha, sigma = jnp.asarray(alpha, jnp.float32), jnp.asarray(sigma, jnp.float32)
        return GaussianMixture(alpha * self.means, jnp.sqrt(alpha**2 * self.stds**2 + sigma**2), self.weights)

    def log_prob(self, x: Array) -> Array:
        ones = jnp.ones(x.shape[:1])
        return jax.nn.logsumexp(self._component_logps(x, ones, 0.0 * ones)[0], axis=-1)

    def diffused_score(self, x: Array, alpha: Array, sigma: Array) -> Array:
        """grad_x log q_t(x) of the mixture diffused to marginal coefficients (alpha, sigma):
        -sum_k r_k (x - alpha mu_k) / var_k with r the posterior over modes."""
        logits, var = self._component_logps(x, alpha, sigma**2)
        resp_over_var = jax.nn.softmax(logits, axis=-1) / var  # (B, K)
        return alpha[:, None] * (resp_over_var @ self.means) - x * jnp.sum(resp_over_var, -1, keepdims=True)

    def denoiser(self, process: Process, prediction: str = "eps") -> Denoiser:
        """The exact denoiser of this mixture diffused by `process`, as `prediction`."""
        check_prediction(prediction)
        return Denoiser(_ExactApply(process, prediction), self, prediction)


@dataclasses.dataclass(frozen=True)
class _ExactApply:
    process: Process
    prediction: str

    def __call__(self, mixture: GaussianMixture, x, t, cond):
        del cond
        alpha, sigma = self.process.alpha(t), self.process.sigma(t)
        score = mixture.diffused_score(x, alpha, sigma)
        out = self.process.convert("score", self.prediction, score, x, t)
        with jax.ensure_compile_time_eval():
            vanishes = not self.process.discrete and float(self.process.alpha(jnp.float32(self.process.t_max))) == 0
        if vanishes:
            # alpha = 0 (flow at t = 1): the score (-x) carries no x0; E[x0 | x_t] is the mixture's mean
            mean = jnp.broadcast_to(mixture.weights / jnp.sum(mixture.weights) @ mixture.means, x.shape)
            no_signal = (alpha == 0).reshape((-1,) + (1,) * (x.ndim - 1))
            out = jnp.where(no_signal, self.process.convert("x0", self.prediction, mean, x, t), out)
        return out


# ---- built-in data ------------------------------------------------------------------------------
def eight_gaussians(radius: float = 2.0, std: float = 0.1) -> GaussianMixture:
    """Eight equal modes on a circle of `radius`, each N(mu_k, std^2 I)."""
    angles = np.arange(8) * (2 * np.pi / 8)
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    return GaussianMixture(
        jnp.asarray(means, jnp.float32), jnp.full((8,), std, jnp.float32), jnp.full((8,), 1 / 8, jnp.float32)
    )


def swiss_roll(key: Array, n: int, noise: float = 0.05) -> Array:
    """2-D Swiss roll scaled to about [-2, 2]^2."""
    k1, k2 = jax.random.split(key)
    u = 1.5 * jnp.pi * (1 + 2 * jax.random.uniform(k1, (n,)))
    x = jnp.stack([u * jnp.cos(u), u * jnp.sin(u)], axis=-1) / 7.0
    return x + noise * jax.random.normal(k2, x.shape)


def two_moons(key: Array, n: int, noise: float = 0.05) -> Array:
    """Two interleaved half circles, centred."""
    k1, k2, k3 = jax.random.split(key, 3)
    u = jnp.pi * jax.random.uniform(k1, (n,))
    upper = jax.random.bernoulli(k2, 0.5, (n,))
    x = jnp.where(upper[:, None], jnp.stack([jnp.cos(u), jnp.sin(u)], -1), jnp.stack([1 - jnp.cos(u), 0.5 - jnp.sin(u)], -1))
    return (x - jnp.array([0.5, 0.25])) + noise * jax.random.normal(k3, x.shape)


DATASETS = {
    "eight_gaussians": lambda key, n: eight_gaussians().sample(key, n),
    "swiss_roll": swiss_roll,
    "two_moons": two_moons,
}


def sample_dataset(name: str, key: Array, n: int) -> Array:
    if name not in DATASETS:
        raise ValueError(f"unknown toy dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](key, n)


# ---- metrics ------------------------------------------------------------------------------------
def sliced_wasserstein(x: Array, y: Array, key: Array, num_projections: int = 256) -> Array:
    """Sliced 2-Wasserstein distance between two equal-size point sets (B, D)."""
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs equal shapes, got {x.shape} and {y.shape}")
    dirs = jax.random.normal(key, (x.shape[1], num_projections))
    dirs = dirs / jnp.linalg.norm(dirs, axis=0, keepdims=True)
    px, py = jnp.sort(x @ dirs, axis=0), jnp.sort(y @ dirs, axis=0)
    return jnp.sqrt(jnp.mean((px - py) ** 2))


def mode_statistics(mixture: GaussianMixture, x: Array | np.ndarray) -> dict[str, np.ndarray]:
    """Assign each sample to its nearest mode: per-mode weight (K,), mean (K, D), std (K,: RMS over
    the axes) and axis_stds (K, D: the std along each axis)."""
    x = np.asarray(x)
    means = np.asarray(mixture.means)
    assign = np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), axis=1)
    k = means.shape[0]
    weights = np.bincount(assign, minlength=k) / len(x)
    mode_means = np.stack([x[assign == i].mean(0) if (assign == i).any() else np.full(x.shape[1], np.nan) for i in range(k)])
    mode_stds = np.array(
        [np.sqrt(((x[assign == i] - mode_means[i]) ** 2).mean()) if (assign == i).sum() > 1 else np.nan for i in range(k)]
    )  # isotropic: RMS over points and axes
    axis_stds = np.stack(
        [x[assign == i].std(0) if (assign == i).sum() > 1 else np.full(x.shape[1], np.nan) for i in range(k)]
    )
    return {"weights": weights, "means": mode_means, "stds": mode_stds, "axis_stds": axis_stds}
