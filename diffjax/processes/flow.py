"""Flow matching / rectified flow (`flow`): the straight path x_t = (1 - t) x0 + t eps, t in [0, 1].

Liu, Gong & Liu 2022 (rectified flow), Lipman et al. 2023 (flow matching), Esser et al. 2024 (SD3).
Time runs as in every diffjax process: t = 0 is the data, t = 1 the noise (SD3 / diffusers'
``sigma``; Rectified Flow's code runs the other way, t_theirs = 1 - t).

- alpha = 1 - t, sigma = t; log SNR = 2 log((1 - t) / t).
- Velocity (the prediction kind 'flow'): dx_t/dt = eps - x0, alpha' = -1, sigma' = 1.
- Forward SDE with the same marginals: f = -1 / (1 - t), g^2 = 2 t / (1 - t). Both diverge at t = 1
  (alpha = 0), so nothing integrates the SDE up to t = 1: the 'pc' sampler (and Heun, which works in
  x / alpha) refuses a grid that starts there. The probability-flow ODE and the likelihood use the
  velocity, finite on all of [0, 1].
- Prior N(0, I) exactly at t_max = 1 (x_1 = eps). t_min = `eps` (1e-3, diffusers' sigma_min = 1/1000):
  the last time a sampling grid evaluates the network (then a final step to t = 0), the ODE's end
  (then one Euler step, x0 = x - t u) and the likelihood's start.
- Network condition `noise_cond` = 1000 t (SD3 / diffusers: timesteps = sigma * 1000).
- Sampling grid ('default'): t_i = shift(u_i), u uniform from 1 to t_min, with SD3 / Flux's time shift
  shift(u) = s u / (1 + (s - 1) u) (s = `shift`; 1: none). 'diffusers': the grid of diffusers'
  FlowMatchEulerDiscreteScheduler.set_timesteps(N) (SD3 pipelines): u uniform from 1 to shift(1/1000)
  (its training grid's last sigma, already shifted), then shifted again. 'karras' / 'logsnr': in
  sigma / alpha = t / (1 - t), which is infinite at t = 1, so they start at 1 - t_min.
- Training times (`time_distribution`): 'uniform' on [t_min, 1] or SD3's 'logit_normal',
  t = sigmoid(logit_mean + logit_std n), n ~ N(0, 1).
- Predictions: 'flow', 'x0', 'v'. 'eps' and 'score' are refused: at t = 1 they equal -x and x and
  carry no x0, so no sampler can leave the prior.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.processes.base import Array, Process

TIME_DISTRIBUTIONS = ("uniform", "logit_normal")
DIFFUSERS_TRAIN_STEPS = 1000  # diffusers' num_train_timesteps: its sigma_min is 1 / 1000


def shift_time(t, shift: float):
    """SD3's time shift (Esser et al. 2024, eq. 23): s t / (1 + (s - 1) t); s > 1 moves times toward noise."""
    return shift * t / (1.0 + (shift - 1.0) * t)


@dataclasses.dataclass(frozen=True)
class Flow(Process):
    """x_t = (1 - t) x0 + t eps (the module docstring)."""

    name: ClassVar[str] = "flow"
    eps: float = 1e-3  # t_min
    shift: float = 1.0
    time_distribution: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self):
        if self.time_distribution not in TIME_DISTRIBUTIONS:
            raise ValueError(
                f"process.time_distribution must be one of {TIME_DISTRIBUTIONS}, got {self.time_distribution!r}"
            )
        if not self.shift > 0:
            raise ValueError(f"process.shift must be > 0 (SD3's time shift; 1 = none), got {self.shift}")
        if not 0 < self.eps < 0.5:
            raise ValueError(f"process.eps (t_min) must be in (0, 0.5), got {self.eps}")
        if not self.logit_std > 0:
            raise ValueError(f"process.logit_std must be > 0, got {self.logit_std}")

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return self.eps

    @property
    def ratio_t_max(self) -> float:
        return 1.0 - self.eps

    @property
    def predictions(self) -> tuple[str, ...]:
        return ("flow", "x0", "v")  # eps = x and score = -x at t = 1 determine no x0

    def alpha(self, t):
        return 1.0 - jnp.asarray(t, jnp.float32)

    def sigma(self, t):
        return jnp.asarray(t, jnp.float32)

    def velocity_coefficients(self, t):
        t = jnp.asarray(t, jnp.float32)
        return -jnp.ones_like(t), jnp.ones_like(t)

    def sde(self, t):
        t = jnp.asarray(t, jnp.float32)
        return -1.0 / (1.0 - t), 2.0 * t / (1.0 - t)

    def time_at_ratio(self, ratio):
        ratio = jnp.asarray(ratio, jnp.float32)
        return ratio / (1.0 + ratio)

    def prior_std(self) -> float:
        return 1.0

    def noise_cond(self, t):
        """SD3 / diffusers: the transformer's timestep is sigma * 1000."""
        return 1000.0 * jnp.asarray(t, jnp.float32)

    def _default_grid(self, num_steps: int) -> Array:
        u = np.linspace(self.t_max, self.t_min, num_steps)
        return jnp.asarray(shift_time(u, self.shift), jnp.float32)

    def _diffusers_grid(self, num_steps: int) -> Array:
        """diffusers' FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(N).sigmas[:-1]."""
        u = np.linspace(1.0, shift_time(1.0 / DIFFUSERS_TRAIN_STEPS, self.shift), num_steps)
        return jnp.asarray(shift_time(u, self.shift), jnp.float32)

    def sample_train_time(self, key, batch):
        if self.time_distribution == "logit_normal":
            return jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(key, (batch,)))
        return super().sample_train_time(key, batch)
