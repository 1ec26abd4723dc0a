"""The continuous-time processes: score_sde's VP, sub-VP and VE SDEs and EDM's (Karras et al. 2022)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffjax.processes.base import Array, Process


@dataclasses.dataclass(frozen=True)
class VP(Process):
    """Variance-preserving SDE: dx = -beta(t)/2 x dt + sqrt(beta(t)) dW, beta linear in t.

    alpha = exp(-B(t)/2) with B(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2.
    """

    name: ClassVar[str] = "vp"
    beta_min: float = 0.1
    beta_max: float = 20.0
    eps: float = 1e-3  # score_sde's sampling / training eps

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return self.eps

    def prior_std(self) -> float:
        return 1.0

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t):
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def alpha(self, t):
        return jnp.exp(-0.5 * self.integrated_beta(t))

    def sigma(self, t):
        return jnp.sqrt(-jnp.expm1(-self.integrated_beta(t)))

    def sde(self, t):
        beta = self.beta(t)
        return -0.5 * beta, beta

    def _time_at_integrated_beta(self, b):
        """Solve B(t) = b for t: the positive root of (bmax - bmin) t^2 / 2 + bmin t - b = 0."""
        db = self.beta_max - self.beta_min
        return (jnp.sqrt(self.beta_min**2 + 2.0 * db * b) - self.beta_min) / db

    def time_at_ratio(self, ratio):
        # sigma^2 / alpha^2 = exp(B) - 1
        return self._time_at_integrated_beta(jnp.log1p(ratio**2))


@dataclasses.dataclass(frozen=True)
class SubVP(VP):
    """sub-VP SDE: the VP drift with g^2 = beta(t) (1 - exp(-2 B(t))); sigma = 1 - alpha^2."""

    name: ClassVar[str] = "subvp"

    def sigma(self, t):
        return -jnp.expm1(-self.integrated_beta(t))

    def sde(self, t):
        beta = self.beta(t)
        return -0.5 * beta, beta * -jnp.expm1(-2.0 * self.integrated_beta(t))

    def time_at_ratio(self, ratio):
        # ratio = (1 - a^2) / a  =>  a = (sqrt(ratio^2 + 4) - ratio) / 2, B = -2 log a
        a = 0.5 * (jnp.sqrt(ratio**2 + 4.0) - ratio)
        return self._time_at_integrated_beta(-2.0 * jnp.log(a))


@dataclasses.dataclass(frozen=True)
class VE(Process):
    """Variance-exploding SDE: sigma(t) = sigma_min (sigma_max / sigma_min)^t, alpha = 1.

    g^2 = d sigma^2 / dt = 2 sigma^2 log(sigma_max / sigma_min). score_sde's marginal std is sigma(t)
    (the sigma_min^2 offset at t = 0 is neglected there too).
    """

    name: ClassVar[str] = "ve"
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    eps: float = 1e-5

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return self.eps

    def alpha(self, t):
        return jnp.ones_like(jnp.asarray(t, jnp.float32))

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** jnp.asarray(t, jnp.float32)

    def sde(self, t):
        s = self.sigma(t)
        return jnp.zeros_like(s), 2.0 * s**2 * math.log(self.sigma_max / self.sigma_min)

    def prior_std(self) -> float:
        return self.sigma_max

    def noise_cond(self, t):
        """NCSN++ conditions on sigma itself."""
        return self.sigma(t)

    def time_at_ratio(self, ratio):
        return jnp.log(ratio / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)


@dataclasses.dataclass(frozen=True)
class EDM(Process):
    """Karras et al. 2022: x = x0 + sigma n with t = sigma; ODE dx/dt = (x - D(x; t)) / t.

    Sampling grid: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then 0.
    Training: ln sigma ~ N(P_mean, P_std^2). `precondition` gives c_skip, c_out, c_in, c_noise.
    """

    name: ClassVar[str] = "edm"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    p_mean: float = -1.2
    p_std: float = 1.2

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return self.sigma_min

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return self.sigma_max

    def alpha(self, t):
        return jnp.ones_like(jnp.asarray(t, jnp.float32))

    def sigma(self, t):
        return jnp.asarray(t, jnp.float32)

    def sde(self, t):
        t = jnp.asarray(t, jnp.float32)
        return jnp.zeros_like(t), 2.0 * t

    def _default_grid(self, num_steps):
        return self.time_grid(num_steps, spacing="karras", rho=self.rho)[:-1]

    def time_at_ratio(self, ratio):
        return jnp.asarray(ratio, jnp.float32)

    def prior_std(self) -> float:
        return self.sigma_max

    def sample_train_time(self, key, batch):
        return jnp.exp(self.p_mean + self.p_std * jax.random.normal(key, (batch,)))

    def noise_cond(self, t):
        """c_noise = ln(sigma) / 4."""
        return 0.25 * jnp.log(t)

    def precondition(self, sigma: Array) -> tuple[Array, Array, Array]:
        """(c_skip, c_out, c_in) of D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / jnp.sqrt(sigma**2 + sd2)
        c_in = 1.0 / jnp.sqrt(sigma**2 + sd2)
        return c_skip, c_out, c_in

    def loss_weight(self, sigma: Array) -> Array:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
