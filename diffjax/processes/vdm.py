"""VDM's learned noise schedule (Kingma et al. 2021): a variance-preserving process whose log-SNR is
-gamma(t), gamma a monotone network rescaled to fixed end points.

gamma~(u) = l1(u) + l3(2 sigmoid(l2(2u - 1)) - 1) / hidden, u in [0, 1] (VDM's NoiseSchedule_NNet:
every layer's weights are |w|, so gamma~ is increasing), and
gamma(t) = gamma_min + (gamma_max - gamma_min) (gamma~(u) - gamma~(0)) / (gamma~(1) - gamma~(0)),
u = (t - t_min) / (t_max - t_min): gamma(t_min) = gamma_min, gamma(1) = gamma_max exactly; alpha^2 =
sigmoid(-gamma), sigma^2 = sigmoid(gamma). hidden = 0 is VDM's 'learnable_scalar' schedule (gamma linear
in t, its end points learned).

The schedule's weights train, but a process is a static jit argument, so the weights live in two
forms: `gamma(params, t)` is the functional form the training loss differentiates (params a dict of
arrays, the train state's "schedule" entry, the end points included), and the `VDM` dataclass holds
them as a hashable tuple of floats (`VDM.with_schedule(params)`, built from a checkpoint) so every
sampler, the ELBO and the ODE likelihood see an ordinary process. An empty tuple is VDM's fixed
linear schedule gamma(t) = gamma_min + (gamma_max - gamma_min) u.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.processes.base import Array, Process

Params = dict[str, Any]
ENDS = ("gamma_min", "gamma_max")  # the end points: trained with the ELBO's gradient, not the variance's


def gamma_tilde(params: Params, u: Array | float) -> Array:
    """The unnormalised monotone network at u (any shape)."""
    u = jnp.asarray(u, jnp.float32)
    h = jnp.abs(params["l1_w"]) * u + params["l1_b"]
    hidden = jax.nn.sigmoid(jnp.abs(params["l2_w"]) * (2.0 * u[..., None] - 1.0) + params["l2_b"])
    return h + (2.0 * (hidden - 0.5)) @ jnp.abs(params["l3_w"]) / max(params["l3_w"].shape[0], 1)  # hidden 0: linear


def gamma(params: Params, t: Array, t_min: float = 0.0, t_max: float = 1.0) -> Array:
    """gamma(t) = -log SNR(t), increasing from params['gamma_min'] at t_min to params['gamma_max'] at t_max."""
    u = (jnp.asarray(t, jnp.float32) - t_min) / (t_max - t_min)
    g0, g1 = gamma_tilde(params, 0.0), gamma_tilde(params, 1.0)
    shape = (gamma_tilde(params, u) - g0) / (g1 - g0)
    return params["gamma_min"] + (params["gamma_max"] - params["gamma_min"]) * shape


def init_schedule(key: Array, gamma_min: float, gamma_max: float, hidden: int = 1024) -> Params:
    """VDM's initialisation: l1 = (gamma_max - gamma_min) u + gamma_min, l2 / l3 kernels N(0, 0.01^2)."""
    k2, k3 = jax.random.split(key)
    return {
        "gamma_min": jnp.float32(gamma_min),
        "gamma_max": jnp.float32(gamma_max),
        "l1_w": jnp.float32(gamma_max - gamma_min),
        "l1_b": jnp.float32(gamma_min),
        "l2_w": 0.01 * jax.random.normal(k2, (hidden,)),
        "l2_b": jnp.zeros((hidden,)),
        "l3_w": 0.01 * jax.random.normal(k3, (hidden,)),
    }


def split_ends(params: Params) -> tuple[Params, Params]:
    """(shape params, end points) of a schedule."""
    return {k: v for k, v in params.items() if k not in ENDS}, {k: params[k] for k in ENDS}


@dataclasses.dataclass(frozen=True)
class VDM(Process):
    """Variance-preserving process with log-SNR -gamma(t), gamma VDM's monotone network (see module doc).

    schedule: the network's weights as a flat tuple of floats (l1_w, l1_b, l2_w[h], l2_b[h], l3_w[h]),
    empty for the linear schedule; learned: training updates the schedule (train state "schedule")."""

    name: ClassVar[str] = "vdm"
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    eps: float = 1e-3  # the network's smallest time, where gamma = gamma_min
    hidden: int = 1024
    learned: bool = True
    schedule: tuple = ()

    def __post_init__(self):
        if not self.gamma_max > self.gamma_min:
            raise ValueError(f"vdm needs gamma_max > gamma_min, got {self.gamma_min}, {self.gamma_max}")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"vdm needs 0 < eps < 1, got {self.eps}")
        if self.schedule and len(self.schedule) != 2 + 3 * self.hidden:
            raise ValueError(
                f"vdm schedule must hold 2 + 3 * hidden = {2 + 3 * self.hidden} weights, got {len(self.schedule)}"
            )

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return self.eps

    def params(self) -> Params:
        """The schedule as arrays (the functional form's params)."""
        h = self.hidden
        w = np.asarray(self.schedule, np.float32) if self.schedule else np.zeros(2 + 3 * h, np.float32)
        if not self.schedule:
            w[0] = 1.0  # linear: l1 alone
        return {
            "gamma_min": jnp.float32(self.gamma_min),
            "gamma_max": jnp.float32(self.gamma_max),
            "l1_w": jnp.asarray(w[0]),
            "l1_b": jnp.asarray(w[1]),
            "l2_w": jnp.asarray(w[2 : 2 + h]),
            "l2_b": jnp.asarray(w[2 + h : 2 + 2 * h]),
            "l3_w": jnp.asarray(w[2 + 2 * h :]),
        }

    def with_schedule(self, params: Params) -> VDM:
        """This process with a trained schedule (concrete arrays, e.g. a checkpoint's)."""
        p = jax.tree.map(lambda v: np.asarray(v, np.float32), params)
        flat = np.concatenate([np.ravel(p[k]) for k in ("l1_w", "l1_b", "l2_w", "l2_b", "l3_w")])
        return dataclasses.replace(
            self,
            gamma_min=float(p["gamma_min"]),
            gamma_max=float(p["gamma_max"]),
            hidden=int(np.size(p["l2_w"])),
            schedule=tuple(float(v) for v in flat),
        )

    def gamma(self, t: Array) -> Array:
        with jax.ensure_compile_time_eval():
            params = self.params()
        return gamma(params, t, self.t_min, self.t_max)

    def log_snr(self, t: Array) -> Array:
        return -self.gamma(t)

    def alpha(self, t: Array) -> Array:
        return jnp.sqrt(jax.nn.sigmoid(-self.gamma(t)))

    def sigma(self, t: Array) -> Array:
        return jnp.sqrt(jax.nn.sigmoid(self.gamma(t)))

    def prior_std(self) -> float:
        return 1.0

    def time_at_ratio(self, ratio: Array) -> Array:
        """t in [t_min, t_max] with sigma / alpha = ratio, i.e. gamma(t) = 2 log ratio: bisection
        (gamma is increasing), 40 halvings."""
        target = 2.0 * jnp.log(jnp.asarray(ratio, jnp.float32))

        def halve(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            below = self.gamma(mid) < target
            return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

        lo, hi = jax.lax.fori_loop(0, 40, halve, (jnp.full_like(target, self.t_min), jnp.full_like(target, self.t_max)))
        return 0.5 * (lo + hi)
