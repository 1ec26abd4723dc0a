"""The `Process` interface and what every process shares: marginals, the SDE by autodiff, the prior,
time grids, steps between two times (transitions, posteriors, fixed reverse variances) and the
conversions between prediction parametrisations (eps, x0, v, score and the velocity 'flow')."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# 'flow': the velocity dx_t/dt = alpha'(t) x0 + sigma'(t) eps (flow matching; continuous processes only)
PREDICTIONS = ("eps", "x0", "v", "score", "flow")
SPACINGS = ("default", "karras", "logsnr", "leading", "diffusers")
# reverse-step variances: beta-tilde (posterior), beta (forward) or the network's interpolation of the two
VARIANCES = ("fixed_small", "fixed_large", "learned")


def bcast(coef: Array, x: Array) -> Array:
    """Reshape a per-example (B,) or scalar coefficient to broadcast against x (B, ...)."""
    coef = jnp.asarray(coef, x.dtype)
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


@dataclasses.dataclass(frozen=True)
class Process:
    """Base class: a Gaussian forward process with marginal N(alpha(t) x0, sigma(t)^2 I)."""

    name: ClassVar[str] = ""
    discrete: ClassVar[bool] = False  # True: time is an integer step, no SDE / ODE is defined.
    t_min: ClassVar[float] = 0.0  # smallest time the network is evaluated at (sampling eps)
    t_max: ClassVar[float] = 1.0

    @property
    def predictions(self) -> tuple[str, ...]:
        """The prediction kinds a network of this process may output (all but 'flow' on a discrete chain)."""
        return tuple(k for k in PREDICTIONS if not (self.discrete and k == "flow"))

    def require_prediction(self, prediction: str, field: str = "config.model.prediction") -> None:
        """One-line ValueError unless `prediction` is one of `predictions` (the config's field named)."""
        if prediction not in self.predictions:
            raise ValueError(f"{field} must be one of {self.predictions} for process {self.name!r}, got {prediction!r}")

    # ---- marginal -------------------------------------------------------------------------
    def alpha(self, t: Array) -> Array:
        raise NotImplementedError

    def sigma(self, t: Array) -> Array:
        raise NotImplementedError

    def marginal(self, x0: Array, t: Array, eps: Array) -> Array:
        """x_t = alpha(t) x0 + sigma(t) eps."""
        return bcast(self.alpha(t), x0) * x0 + bcast(self.sigma(t), x0) * eps

    def log_snr(self, t: Array) -> Array:
        """lambda(t) = log(alpha^2 / sigma^2)."""
        return 2.0 * (jnp.log(self.alpha(t)) - jnp.log(self.sigma(t)))

    def time_at_ratio(self, ratio: Array) -> Array:
        """The time t where sigma(t) / alpha(t) == ratio (EDM's sigma of the scaled ODE)."""
        raise ValueError(f"process {self.name!r} has no closed-form inverse noise level; use 'vp', 'subvp', 've' or 'edm'")

    def velocity_coefficients(self, t: Array) -> tuple[Array, Array]:
        """(alpha'(t), sigma'(t)) by autodiff (the velocity dx_t/dt = alpha' x0 + sigma' eps)."""
        self._require_continuous("velocity (prediction 'flow')")
        t = jnp.asarray(t, jnp.float32)
        ones = jnp.ones_like(t)
        return jax.jvp(self.alpha, (t,), (ones,))[1], jax.jvp(self.sigma, (t,), (ones,))[1]

    # ---- SDE ------------------------------------------------------------------------------
    def sde(self, t: Array) -> tuple[Array, Array]:
        """(f(t), g(t)^2) of dx = f(t) x dt + g(t) dW, from alpha and sigma by autodiff.

        Subclasses override with the paper's closed form; tests check both agree.
        """
        self._require_continuous("sde")
        t = jnp.asarray(t, jnp.float32)
        dlog_alpha = jnp.vectorize(jax.grad(lambda s: jnp.log(self.alpha(s))))(t)
        dsigma2 = jnp.vectorize(jax.grad(lambda s: self.sigma(s) ** 2))(t)
        return dlog_alpha, dsigma2 - 2.0 * dlog_alpha * self.sigma(t) ** 2

    def _require_continuous(self, what: str) -> None:
        if self.discrete:
            raise ValueError(
                f"process {self.name!r} is a discrete chain and has no {what}; "
                "use one of the continuous processes 'vp', 'subvp', 've', 'edm', 'vdm', 'flow'"
            )

    # ---- prior ----------------------------------------------------------------------------
    def prior_std(self) -> float:
        """Standard deviation of the prior N(0, std^2 I) (a Python float: a compile-time constant)."""
        raise NotImplementedError

    def prior_sample(self, key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        return self.prior_std() * jax.random.normal(key, shape, dtype)

    def prior_logp(self, x: Array) -> Array:
        """log N(x; 0, prior_std^2 I) summed over all but the batch axis."""
        std = self.prior_std()
        d = math.prod(x.shape[1:])
        sq = jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=-1)
        return -0.5 * d * math.log(2 * math.pi * std**2) - 0.5 * sq / std**2

    # ---- time -----------------------------------------------------------------------------
    @property
    def max_steps(self) -> int | None:
        """The most network evaluations a sampling grid can have: None (any) in continuous time."""
        return None

    def time_grid(self, num_steps: int, spacing: str = "default", rho: float = 7.0) -> Array:
        """num_steps decreasing times from t_max to t_min, then the clean time 0.

        The network is evaluated at the first num_steps entries; the last step of a sampler goes
        to t = 0, where alpha = 1 and sigma = 0 (score_sde's final denoising step).
        spacing: 'default' (the process's own grid: uniform in t; EDM's rho-schedule for edm),
        'karras' (uniform in (sigma/alpha)^(1/rho), Karras et al. 2022, eq. 5) or 'logsnr'
        (uniform in log(sigma/alpha), Lu et al. 2022) or, for the discrete ddpm process only,
        'leading' (DDIM's ``range(0, T, T // N)`` skip: diffusers' timestep_spacing='leading') or, for
        the flow process only, 'diffusers' (FlowMatchEulerDiscreteScheduler's grid). 'karras' and
        'logsnr' start at `ratio_t_max` (t_max, but 1 - t_min on flow, where sigma/alpha is infinite at 1).
        """
        check_steps(num_steps)
        if self.max_steps is not None and num_steps > self.max_steps:
            raise ValueError(f"num_steps must be <= num_scales={self.max_steps} for {self.name}, got {num_steps}")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        with jax.ensure_compile_time_eval():  # the grid is a constant, also when traced under jit
            if spacing == "default":
                return jnp.append(self._default_grid(num_steps), 0.0).astype(jnp.float32)
            if spacing == "leading":
                return jnp.append(self._leading_grid(num_steps), 0.0).astype(jnp.float32)
            if spacing == "diffusers":
                return jnp.append(self._diffusers_grid(num_steps), 0.0).astype(jnp.float32)
            if num_steps == 1:
                return jnp.asarray([self.ratio_t_max, 0.0], jnp.float32)
            ends = jnp.asarray([self.ratio_t_max, self.t_min], jnp.float32)
            r_max, r_min = np.asarray(self.sigma(ends) / self.alpha(ends), np.float64)
            i = np.linspace(0.0, 1.0, num_steps)
            if spacing == "karras":
                ratios = (r_max ** (1 / rho) + i * (r_min ** (1 / rho) - r_max ** (1 / rho))) ** rho
            else:
                ratios = np.exp(np.log(r_max) + i * (np.log(r_min) - np.log(r_max)))
            times = np.array(self.time_at_ratio(jnp.asarray(ratios, jnp.float32)))
            times[0], times[-1] = self.ratio_t_max, self.t_min  # exact end points
            return jnp.asarray(np.append(times, 0.0), jnp.float32)

    @property
    def ratio_t_max(self) -> float:
        """Where the 'karras' / 'logsnr' grids start: the largest time with a finite sigma / alpha."""
        return float(self.t_max)

    def _default_grid(self, num_steps: int) -> Array:
        return jnp.linspace(self.t_max, self.t_min, num_steps)

    def _diffusers_grid(self, num_steps: int) -> Array:
        raise ValueError(f"spacing 'diffusers' is for the flow process, not {self.name!r}; choose one of {SPACINGS[:3]}")

    def _leading_grid(self, num_steps: int) -> Array:
        raise ValueError(
            f"spacing 'leading' is for the discrete ddpm process, not {self.name!r}; choose one of {SPACINGS[:3]}"
        )

    def sample_train_time(self, key: Array, batch: int) -> Array:
        """t ~ U(t_min, t_max) for the training loss (score_sde)."""
        return jax.random.uniform(key, (batch,), minval=self.t_min, maxval=self.t_max)

    def noise_cond(self, t: Array) -> Array:
        """The network's conditioning input for time t (score_sde: 999 t for VP-type nets)."""
        return 999.0 * t

    # ---- clean-time coefficients: alpha(0) = 1, sigma(0) = 0 ---------------------------------
    def coefficients(self, t: Array) -> tuple[Array, Array]:
        """(alpha, sigma) at t, exactly (1, 0) at the clean time t == 0."""
        clean = t <= 0
        safe_t = jnp.where(clean, self.t_min if self.t_min > 0 else 1.0, t)
        return jnp.where(clean, 1.0, self.alpha(safe_t)), jnp.where(clean, 0.0, self.sigma(safe_t))

    # ---- steps between two times: the discrete chain's transitions, DDIM's jumps --------------
    def transition(self, t: Array, s: Array) -> tuple[Array, Array]:
        """(alpha_ts, var_ts) of the forward step q(x_t | x_s) = N(alpha_ts x_s, var_ts I), s < t.

        alpha_ts = a_t / a_s and var_ts = s_t^2 - alpha_ts^2 s_s^2 (ddpm, s = t - 1: sqrt(1 - beta_t)
        and beta_t); s may be the clean time 0."""
        (a_t, s_t), (a_s, s_s) = self.coefficients(t), self.coefficients(s)
        alpha_ts = a_t / a_s
        return alpha_ts, jnp.maximum(s_t**2 - alpha_ts**2 * s_s**2, 0.0)

    def posterior(self, t: Array, s: Array) -> tuple[Array, Array, Array]:
        """(c0, ct, var) of q(x_s | x_t, x0) = N(c0 x0 + ct x_t, var I), s < t (Ho et al. eq. 6-7).

        c0 = a_s var_ts / s_t^2, ct = alpha_ts s_s^2 / s_t^2, var = var_ts s_s^2 / s_t^2 (beta-tilde)."""
        alpha_ts, var_ts = self.transition(t, s)
        _, s_t = self.coefficients(t)
        a_s, s_s = self.coefficients(s)
        return a_s * var_ts / s_t**2, alpha_ts * s_s**2 / s_t**2, var_ts * s_s**2 / s_t**2

    def step_variance(self, t: Array, s: Array, variance: str = "fixed_small", v: Array | None = None) -> Array:
        """The variance of the reverse step p(x_s | x_t) (Ho et al. sec. 3.2): 'fixed_small' the
        posterior's beta-tilde, 'fixed_large' the forward step's var_ts (beta_t), per example (B,);
        'learned' exp(v log var_ts + (1 - v) log beta-tilde) of v's shape (B, ...) (Nichol & Dhariwal
        2021, eq. 15, with a strided step's own var_ts and beta-tilde), 0 where beta-tilde is 0 (s = 0)."""
        check_variance(variance)
        if variance == "learned":
            if v is None:
                raise ValueError("step_variance('learned') needs the network's variance output v")
            small, large = (bcast(u, v) for u in (self.posterior(t, s)[2], self.transition(t, s)[1]))
            return jnp.where(small > 0, jnp.exp(learned_log_variance(v, small, large)), 0.0)
        return self.posterior(t, s)[2] if variance == "fixed_small" else self.transition(t, s)[1]

    # ---- prediction conversions --------------------------------------------------------------
    def to_x0(self, prediction: str, out: Array, x: Array, t: Array) -> Array:
        return self.convert(prediction, "x0", out, x, t)

    def to_eps(self, prediction: str, out: Array, x: Array, t: Array) -> Array:
        return self.convert(prediction, "eps", out, x, t)

    def to_score(self, prediction: str, out: Array, x: Array, t: Array) -> Array:
        return self.convert(prediction, "score", out, x, t)

    def convert(self, src: str, dst: str, out: Array, x: Array, t: Array) -> Array:
        """Convert a prediction `out` of kind src at (x, t) to kind dst.

        With x = a x0 + s eps: score = -eps / s, v = a eps - s x0 (Salimans & Ho 2022), flow = a' x0 + s' eps
        (the velocity dx_t/dt; a', s' from `velocity_coefficients`), and back x0 = (a x - s v) / (a^2 + s^2),
        eps = (s x + a v) / (a^2 + s^2), x0 = (s' x - s flow) / d, eps = (a flow - a' x) / d with
        d = a s' - s a' (> 0: sigma / alpha increases), all finite where a = 0 (flow at t = 1).
        """
        check_prediction(src)
        check_prediction(dst)
        if src == dst:
            return out
        a, s = bcast(self.alpha(t), x), bcast(self.sigma(t), x)
        if "flow" in (src, dst):
            da, ds = (bcast(c, x) for c in self.velocity_coefficients(t))
        if src in ("eps", "score"):
            eps = out if src == "eps" else -s * out
            if dst in ("eps", "score"):
                return eps if dst == "eps" else -eps / s
            x0 = (x - s * eps) / a
        elif src == "x0":
            x0, eps = out, (x - a * out) / s
        elif src == "v":
            norm = a**2 + s**2
            eps, x0 = (s * x + a * out) / norm, (a * x - s * out) / norm
        else:  # flow
            det = a * ds - s * da
            eps, x0 = (a * out - da * x) / det, (ds * x - s * out) / det
        if dst == "eps":
            return eps
        if dst == "score":
            return -eps / s
        if dst == "x0":
            return x0
        if dst == "v":
            return a * eps - s * x0
        return da * x0 + ds * eps


def check_prediction(kind: str) -> None:
    if kind not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {kind!r}")


def learned_log_variance(v: Array, small: Array, large: Array) -> Array:
    """v log(large) + (1 - v) log(small) (iDDPM eq. 15): v = 0 gives `small` (beta-tilde), v = 1 `large`
    (beta); a zero `small` (the step to the data) is read as 1 (callers mask those entries)."""
    small = jnp.where(small > 0, small, 1.0)
    return v * jnp.log(large) + (1.0 - v) * jnp.log(small)


def check_variance(variance: str, name: str = "variance") -> None:
    """A reverse-step variance, one of VARIANCES; `name` is what the message calls the option."""
    if variance not in VARIANCES:
        raise ValueError(f"{name} must be one of {VARIANCES}, got {variance!r}")


def check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps <= 0:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
