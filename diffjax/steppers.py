"""Fixed-step samplers, each written once as a pure stepper.

A stepper is a frozen dataclass of its options (in the spirit of diffrax's solvers and diffusers'
schedulers, but functional). `samplers.sample` drives it over a whole time grid with one
lax.scan; the serving engine drives the same stepper one network evaluation per call, with every
slot of the batch at its own step. The contract:

- ``evals`` / ``evals_last``: network evaluations per grid step / on the last step (to t = 0),
  static; ``nfe(n) = (n - 1) evals + evals_last``. ``kind``: the prediction the stepper consumes.
- ``spacing``: the time grid; 'auto' (default) is the one the sampler's paper recommends
  (DPM-Solver++: uniform in log-SNR; Heun: Karras rho = 7; the others the process's own), except
  on the discrete ddpm process, which keeps its own grid.
- ``init(process, x_T, t0) -> state``: a dict of x-shaped arrays (``x`` plus the stepper's history,
  names from ``STATE_KEYS``).
- ``prepare(process, state, sub, step, noise) -> (state, x_in, t_in)``: where evaluation ``sub``
  of the step happens (Heun's churn moves x there).
- ``update(process, state, out, sub, step, noise) -> state``: the step, given the prediction; a
  stepper with ``learned_variance`` (the ancestral sampler with variance='learned') also takes
  ``v=``, the denoiser's variance output (`Denoiser.with_variance`), which the drivers pass it.
- ``output(state) -> x``.

``step`` is a `Step` (index i, grid size n, times t_prev, t, t_next, last); under the engine
every field (and ``sub``) is a per-example array, so the math selects with jnp.where instead of
branching. ``noise(code)`` draws the step's standard normal noise for ``code`` (0: the step's own
draw; c > 0 a second draw in the same step, e.g. a Langevin corrector). Numeric options may be
per-example arrays (the engine serves each request's own eta, snr or churn).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp

from diffjax.processes import Process, bcast, check_variance

Array = jax.Array
STATE_KEYS = ("x", "d", "base")  # the union of all steppers' state entries (the engine stores all)
Noise = Callable[[int | Array], Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Step:
    """Where a grid step is: index i of n, times t_prev (= t at i = 0), t, t_next, and last (i == n - 1)."""

    i: Any
    n: Any
    t_prev: Any
    t: Any
    t_next: Any
    last: Any


def select(cond, a: Array, b: Array) -> Array:
    """a where cond else b; cond a python bool (offline: static) or a per-example array (engine)."""
    if isinstance(cond, bool):
        return a if cond else b
    return jnp.where(bcast(cond, a), a, b)


def _coefs(process: Process, t, x):
    a, s = process.coefficients(jnp.asarray(t, jnp.float32))
    return bcast(a, x), bcast(s, x)


def posterior_step(
    process: Process,
    x: Array,
    x0: Array,
    t: Array,
    s: Array,
    noise: Array,
    eta: float | Array = 1.0,
    variance: str = "fixed_small",
    v: Array | None = None,
) -> Array:
    """Move x_t to time s < t given an x0 estimate (DDPM posterior / DDIM, any process).

    With the forward s -> t step N(alpha_ts x_s, var_ts) (`Process.transition`), q(x_s | x_t, x0)
    has variance c^2 = var_ts s_s^2 / s_t^2. DDIM (Song et al. 2021, eq. 12):
    x_s = a_s x0 + sqrt(s_s^2 - eta^2 c^2) eps_hat + eta c z; eta = 1 is the ancestral sampler.
    variance='fixed_large' keeps that mean and draws the noise with the forward step's variance
    eta^2 var_ts instead (Ho et al.'s sigma^2 = beta; diffusers' 'fixed_large'), none on a step to s = 0;
    variance='learned' with eta^2 exp(v log var_ts + (1 - v) log c^2 / eta^2), v the network's variance
    output (Nichol & Dhariwal 2021, eq. 15; diffusers' 'learned_range' with its v = 2 v_ours - 1).
    """
    check_variance(variance)
    if variance == "learned" and v is None:
        raise ValueError("posterior_step with variance='learned' needs the network's variance output v")
    a_t, s_t = _coefs(process, t, x)
    a_s, s_s = _coefs(process, s, x)
    eps_hat = (x - a_t * x0) / s_t
    var_ts = bcast(process.transition(jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32))[1], x)
    eta = bcast(jnp.asarray(eta, x.dtype), x) if not isinstance(eta, (int, float)) else eta
    c2 = eta**2 * var_ts * s_s**2 / s_t**2
    if variance == "fixed_small":
        noise_var = c2
    elif variance == "fixed_large":
        noise_var = jnp.where(s_s > 0, eta**2 * var_ts, 0.0)
    else:  # learned: between the posterior's beta-tilde and var_ts, per dimension (0 on a step to s = 0)
        noise_var = eta**2 * process.step_variance(jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32), variance, v)
    return a_s * x0 + jnp.sqrt(jnp.maximum(s_s**2 - c2, 0.0)) * eps_hat + jnp.sqrt(noise_var) * noise


def _is_zero(v) -> bool:
    return isinstance(v, (int, float)) and v == 0


@dataclasses.dataclass(frozen=True)
class Stepper:
    """Base: one evaluation per step at (x, t); subclasses define update."""

    evals: ClassVar[int] = 1
    kind: ClassVar[str] = "x0"
    dynamic: ClassVar[tuple[str, ...]] = ()  # numeric options the server takes per request
    paper_spacing: ClassVar[str] = "default"  # the grid the sampler's paper recommends
    needs_signal: ClassVar[bool] = False  # divides by alpha(t): no grid starting where alpha = 0 (flow, t = 1)
    spacing: str = "auto"  # 'auto': paper_spacing, or the process's own grid for the discrete ddpm

    @property
    def learned_variance(self) -> bool:
        """Whether update takes v=, the denoiser's learned variance output (the module docstring)."""
        return False

    def grid_spacing(self, process: Process) -> str:
        if self.spacing != "auto":
            return self.spacing
        return "default" if process.discrete else self.paper_spacing

    @property
    def evals_last(self) -> int:
        return self.evals

    def nfe(self, num_steps: int) -> int:
        return (num_steps - 1) * self.evals + self.evals_last

    def draws_noise(self, options: dict) -> bool:
        """Whether a run with these options (overriding the stepper's own) ever draws noise."""
        return False

    def init(self, process: Process, x_T: Array, t0) -> dict:
        return {"x": x_T}

    def prepare(self, process: Process, state: dict, sub, step: Step, noise: Noise):
        return state, state["x"], step.t

    def update(self, process: Process, state: dict, out: Array, sub, step: Step, noise: Noise) -> dict:
        """The step, given the network's prediction `out` (of kind `kind`) at evaluation `sub`."""
        raise NotImplementedError

    def output(self, state: dict) -> Array:
        return state["x"]


@dataclasses.dataclass(frozen=True)
class DDIM(Stepper):
    """DDIM (Song, Meng & Ermon 2021); eta = 0 deterministic, eta = 1 ancestral.

    clip_x0 = (lo, hi): each step's x0 estimate is clipped to the data range and the step uses the
    eps implied by it (Ho et al.'s clip_denoised; diffusers' clip_sample with use_clipped_model_output)."""

    dynamic: ClassVar[tuple[str, ...]] = ("eta",)
    eta: float = 0.0
    clip_x0: tuple[float, float] | None = None

    def draws_noise(self, options: dict) -> bool:
        return float(options.get("eta", self.eta)) != 0

    def update(self, process, state, out, sub, step, noise, v=None):
        x0 = out if self.clip_x0 is None else jnp.clip(out, *self.clip_x0)
        z = jnp.zeros_like(x0) if _is_zero(self.eta) else noise(0)
        x = posterior_step(process, state["x"], x0, step.t, step.t_next, z, self.eta, self._noise_variance, v)
        return {**state, "x": x}

    @property
    def _noise_variance(self) -> str:
        """The noise's variance choice (`posterior_step`): DDIM's own, beta-tilde scaled by eta^2."""
        return "fixed_small"


@dataclasses.dataclass(frozen=True)
class Ancestral(DDIM):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2): DDIM at eta 1, i.e. the posterior mean plus noise
    of variance 'fixed_small' (beta-tilde, the default), 'fixed_large' (beta, Ho et al.'s CIFAR-10 runs)
    or 'learned' (the network's interpolation of the two, Nichol & Dhariwal 2021: `posterior_step`)."""

    dynamic: ClassVar[tuple[str, ...]] = ()
    eta: float = dataclasses.field(default=1.0, init=False)
    variance: str = "fixed_small"

    def __post_init__(self):
        check_variance(self.variance)

    @property
    def _noise_variance(self) -> str:
        return self.variance

    @property
    def learned_variance(self) -> bool:
        return self.variance == "learned"


@dataclasses.dataclass(frozen=True)
class PC(Stepper):
    """Predictor-corrector sampling (Song et al. 2021, Alg. 1-3), corrector first as score_sde.

    Predictors: 'reverse_diffusion' (the reverse of the discretised forward step) or
    'euler_maruyama'; corrector: 'langevin' or 'none'. Langevin step size
    2 a_i (snr ||z|| / ||score||)^2 with norms averaged over the batch (norm='batch', score_sde)
    or per example (norm='example': no dependence on batch-mates, as the server needs).
    """

    kind: ClassVar[str] = "score"
    dynamic: ClassVar[tuple[str, ...]] = ("snr",)
    needs_signal: ClassVar[bool] = True  # the reverse step divides by alpha_ts, the SDE's f by alpha
    predictor: str = "reverse_diffusion"
    corrector: str = "langevin"
    snr: float = 0.16
    n_steps_each: int = 1
    norm: str = "batch"

    def __post_init__(self):
        if self.predictor not in ("reverse_diffusion", "euler_maruyama"):
            raise ValueError(f"pc predictor must be 'reverse_diffusion' or 'euler_maruyama', got {self.predictor!r}")
        if self.corrector not in ("langevin", "none"):
            raise ValueError(f"pc corrector must be 'langevin' or 'none', got {self.corrector!r}")
        if self.norm not in ("batch", "example"):
            raise ValueError(f"pc norm must be 'batch' or 'example', got {self.norm!r}")
        if int(self.n_steps_each) < 0:
            raise ValueError(f"pc n_steps_each must be >= 0, got {self.n_steps_each}")

    def draws_noise(self, options: dict) -> bool:
        return True

    @property
    def n_corr(self) -> int:
        return int(self.n_steps_each) if self.corrector == "langevin" else 0

    @property
    def evals(self) -> int:  # type: ignore[override]
        return self.n_corr + 1

    def _norm(self, v):
        n = jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1) ** 2, -1))
        return jnp.mean(n) if self.norm == "batch" else n

    def update(self, process, state, score, sub, step, noise):
        x = state["x"]
        a_t, s_t = _coefs(process, step.t, x)
        a_s, s_s = _coefs(process, step.t_next, x)

        def corrector():  # Langevin at time t: evaluations sub < n_corr, noise code sub + 1
            z = noise(jnp.asarray(sub) + 1)
            ratio = jnp.asarray(self.snr, x.dtype) * self._norm(z) / self._norm(score)
            size = bcast(2.0 * ratio**2, x) * (a_t / a_s) ** 2
            return x + size * score + jnp.sqrt(2.0 * size) * z

        def predictor():
            if self.predictor == "reverse_diffusion":
                alpha_ts = a_t / a_s
                var_ts = jnp.maximum(s_t**2 - alpha_ts**2 * s_s**2, 0.0)
                mean, std = (x + var_ts * score) / alpha_ts, jnp.sqrt(var_ts)
            else:
                f, g2 = process.sde(step.t)
                dt = bcast(jnp.asarray(step.t_next, x.dtype) - jnp.asarray(step.t, x.dtype), x)
                mean = x + (bcast(f, x) * x - bcast(g2, x) * score) * dt
                std = jnp.sqrt(bcast(g2, x) * -dt)
            return select(step.last, mean, mean + std * noise(0))  # no noise on the final step

        if isinstance(sub, int):  # offline: each evaluation's branch is known
            return {**state, "x": corrector() if sub < self.n_corr else predictor()}
        if not self.n_corr:
            return {**state, "x": predictor()}
        return {**state, "x": select(jnp.asarray(sub) < self.n_corr, corrector(), predictor())}


@dataclasses.dataclass(frozen=True)
class DPMSolverPP(Stepper):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in the data-prediction form, on its paper's
    log-SNR-uniform grid by default.

    x_s = (s_s / s_t) x_t + a_s (1 - exp(-h)) D with h = lambda_s - lambda_t and D the 2nd-order
    multistep combination of x0 estimates; the first step and the final step to t = 0 are 1st order.
    """

    paper_spacing: ClassVar[str] = "logsnr"

    def init(self, process, x_T, t0):
        return {"x": x_T, "d": jnp.zeros_like(x_T)}

    def update(self, process, state, x0, sub, step, noise):
        x = state["x"]
        (a_p, s_p), (a_t, s_t), (a_s, s_s) = (_coefs(process, u, x) for u in (step.t_prev, step.t, step.t_next))
        lam = lambda s, a: -jnp.log(jnp.where(s > 0, s / a, 1.0))  # noqa: E731
        second = (jnp.asarray(step.i) > 0) & ~jnp.asarray(step.last)
        h_prev, h = lam(s_t, a_t) - lam(s_p, a_p), lam(s_s, a_s) - lam(s_t, a_t)
        r = h_prev / jnp.where(bcast(second, x), h, 1.0)
        r = jnp.where(bcast(second, x), r, 1.0)
        d = jnp.where(bcast(second, x), (1 + 0.5 / r) * x0 - (0.5 / r) * state["d"], x0)
        exp_neg_h = (s_s / a_s) / (s_t / a_t)
        return {"x": (s_s / s_t) * x + a_s * (1.0 - exp_neg_h) * d, "d": x0}


@dataclasses.dataclass(frozen=True)
class Heun(Stepper):
    """EDM's 2nd-order Heun sampler (Karras et al. 2022, Alg. 2) with optional churn, on the Karras
    rho = 7 grid by default.

    Runs in the scaled space x~ = x / alpha, sigma~ = sigma / alpha, where the probability-flow
    ODE of every process is dx~/dsigma~ = (x~ - D) / sigma~. N grid points: N - 1 Heun steps and a
    final Euler step to sigma = 0, i.e. 2N - 1 evaluations (18 steps -> 35 NFE). Evaluation 0 of a
    step is the Euler predictor at the (churned) sigma~_hat, evaluation 1 the corrector at the next.
    """

    evals: ClassVar[int] = 2
    dynamic: ClassVar[tuple[str, ...]] = ("s_churn", "s_tmin", "s_tmax", "s_noise")
    needs_signal: ClassVar[bool] = True  # works in x / alpha
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    paper_spacing: ClassVar[str] = "karras"

    @property
    def evals_last(self) -> int:
        return 1

    def draws_noise(self, options: dict) -> bool:
        return float(options.get("s_churn", self.s_churn)) > 0

    def init(self, process, x_T, t0):
        a, _ = _coefs(process, t0, x_T)
        return {"x": x_T / a, "d": jnp.zeros_like(x_T), "base": jnp.zeros_like(x_T)}

    def _sigmas(self, process, step):
        """(sigma~ at t, churned sigma~_hat, where churn applies or None), per example; never on the last step."""
        a, s = process.coefficients(step.t)
        sig = s / a
        if _is_zero(self.s_churn):
            return sig, sig, None
        churn = jnp.asarray(self.s_churn, jnp.float32)
        gamma = jnp.where(churn > 0, jnp.minimum(churn / jnp.asarray(step.n, jnp.float32), math.sqrt(2.0) - 1.0), 0.0)
        on = (sig >= self.s_tmin) & (sig <= self.s_tmax) & ~jnp.asarray(step.last) & (gamma > 0)
        return sig, jnp.where(on, sig * (1 + gamma), sig), on

    def prepare(self, process, state, sub, step, noise):
        x, first = state["x"], _is_first(sub)
        sig, sig_hat, on = self._sigmas(process, step)
        t_hat = step.t
        if on is not None and first is not False:  # churn: raise the noise level to sigma~_hat first
            # sqrt(sig_hat^2 - sig^2) as sig sqrt(gamma (2 + gamma)): exactly 0 where churn is off
            gamma = sig_hat / sig - 1.0
            std = jnp.where(on, sig * jnp.sqrt(jnp.maximum(gamma * (2.0 + gamma), 0.0)), 0.0)
            std = std * jnp.asarray(self.s_noise, jnp.float32)
            x = select(first, x + bcast(std, x) * noise(0), x)
            t_hat = jnp.where(on, process.time_at_ratio(sig_hat), step.t)
        t_in = select(first, t_hat, step.t_next)
        a_in, _ = process.coefficients(t_in)
        return {**state, "x": x}, x * bcast(a_in, x), t_in

    def update(self, process, state, x0, sub, step, noise):
        x, first = state["x"], _is_first(sub)
        _, sig_hat, _ = self._sigmas(process, step)
        a_n, s_n = process.coefficients(step.t_next)
        sig_next = s_n / a_n
        d = (x - x0) / bcast(select(first, sig_hat, jnp.where(sig_next > 0, sig_next, 1.0)), x)
        h = bcast(sig_next - sig_hat, x)
        euler = select(step.last, x0, x + h * d)  # the Euler step to sigma = 0 lands on x0
        corrected = state["base"] + h * 0.5 * (state["d"] + d)
        return {
            "x": select(first, euler, corrected),
            "d": select(first, d, state["d"]),
            "base": select(first, x, state["base"]),
        }


def _is_first(sub):
    return sub == 0 if isinstance(sub, int) else jnp.asarray(sub) == 0


STEPPERS: dict[str, type[Stepper]] = {
    "ancestral": Ancestral,
    "ddim": DDIM,
    "pc": PC,
    "dpm_solver++": DPMSolverPP,
    "heun": Heun,
}


def options(name: str) -> dict[str, object]:
    """The options (and defaults) of stepper `name`."""
    return {f.name: f.default for f in dataclasses.fields(STEPPERS[name]) if f.init}


def make(name: str, **opts) -> Stepper:
    """STEPPERS[name](**opts), with unknown options named in the error."""
    allowed = options(name)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(f"sampler {name!r} takes no option(s) {unknown}; its options are {sorted(allowed)}")
    return STEPPERS[name](**opts)
