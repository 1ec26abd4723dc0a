"""The discrete T-step chain of Ho et al. 2020 (`ddpm`)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.processes.base import Array, Process, check_steps


@dataclasses.dataclass(frozen=True)
class DDPM(Process):
    """Ho et al. 2020: x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps, t = 1..T.

    alpha_bar_t = prod_{s<=t} (1 - beta_s); alpha(t) = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t).
    Time is the integer step t in {1..T} (stored as float); t = 0 is the data.
    `linear`: beta from 1e-4 to 0.02 (Ho et al.); `cosine`: Nichol & Dhariwal 2021, s = 0.008.
    """

    name: ClassVar[str] = "ddpm"
    discrete: ClassVar[bool] = True
    num_scales: int = 1000
    schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"ddpm schedule must be one of ('linear', 'cosine'), got {self.schedule!r}")
        check_steps(self.num_scales)

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return 1.0

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return float(self.num_scales)

    @property
    def max_steps(self) -> int | None:
        return self.num_scales  # one network evaluation per step of the chain at most

    def betas(self) -> np.ndarray:
        """beta_1..beta_T as float64 numpy (the schedule is a constant of the model)."""
        T = self.num_scales
        if self.schedule == "linear":
            return np.linspace(self.beta_start, self.beta_end, T, dtype=np.float64)
        s = 0.008
        f = np.cos((np.arange(T + 1, dtype=np.float64) / T + s) / (1 + s) * np.pi / 2) ** 2
        return np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)

    def alpha_bars(self) -> np.ndarray:
        """alpha_bar_0..alpha_bar_T with alpha_bar_0 = 1."""
        return np.concatenate([[1.0], np.cumprod(1.0 - self.betas())])

    def _lookup(self, table: np.ndarray, t: Array) -> Array:
        idx = jnp.clip(jnp.round(t).astype(jnp.int32), 0, self.num_scales)
        return jnp.asarray(table, jnp.float32)[idx]

    def alpha(self, t):
        return self._lookup(np.sqrt(self.alpha_bars()), t)

    def sigma(self, t):
        return self._lookup(np.sqrt(1.0 - self.alpha_bars()), t)

    def _default_grid(self, num_steps: int) -> Array:
        """num_steps integer steps evenly spaced from T down to 1 (DDIM's subsequence)."""
        return jnp.asarray(np.round(np.linspace(self.num_scales, 1, num_steps)), jnp.float32)

    def _leading_grid(self, num_steps: int) -> Array:
        """DDIM's steps i * (T // N) for i = N-1..0, as times t = step + 1."""
        return jnp.asarray(np.arange(num_steps)[::-1] * (self.num_scales // num_steps) + 1.0, jnp.float32)

    def sample_train_time(self, key, batch):
        return jax.random.randint(key, (batch,), 1, self.num_scales + 1).astype(jnp.float32)

    def noise_cond(self, t):
        """Ho et al.'s networks embed the 0-based step index t - 1."""
        return t - 1.0

    def prior_std(self) -> float:
        return 1.0
