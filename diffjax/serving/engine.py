"""The continuous-batching engine: a fixed batch of slots advanced by one jit-compiled step.

Every slot carries its own sample: its state x, its per-example key, its step index, its step
count, its sampler and its class label / guidance weight. One call of the compiled `step`
admits new samples into free slots, frees cancelled ones and advances every busy slot by one
network evaluation, each at its own time. Slots of requests with different num_steps or samplers
share the batch; finished slots are refilled on the next call.

The math is the samplers' own: `samplers.posterior_step` (DDIM eta = 0, ancestral eta = 1),
DPM-Solver++(2M) with a per-slot history, EDM's Heun (two calls per grid step, as
`samplers.heun` without churn), `samplers.example_noise` keyed exactly as
`samplers.sample`. A request (seed, n, sampler, steps) therefore gives the samples that
`samplers.sample(sampler, ..., key=PRNGKey(seed), shape=(n, ...))` gives offline, whatever else
is in the batch. Each slot's times come from `process.time_grid(n)` (cached per n on the host).
"""

from __future__ import annotations

import dataclasses
import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffjax import samplers
from diffjax.denoiser import Denoiser, guided
from diffjax.models.layers import inference_groupnorm
from diffjax.processes import Process, bcast

Array = jax.Array
# Samplers the engine serves (kind code) and their DDIM eta. Every engine call is one network
# evaluation per slot; heun takes two calls per grid step (Euler predictor, then the corrector).
SAMPLER_KINDS = {"ddim": 0, "ancestral": 1, "dpm_solver++": 2, "heun": 3}
_ETA = np.array([0.0, 1.0, 0.0, 0.0], np.float32)
_HEUN = SAMPLER_KINDS["heun"]


def evaluations(sampler: str, num_steps: int) -> int:
    """Network evaluations (engine calls) of one sample: as samplers.sample counts its NFE."""
    return 2 * num_steps - 1 if sampler == "heun" else num_steps


def slot_times(sampler: str, grid: np.ndarray, call: int) -> tuple[float, float, float]:
    """(t, s, t_prev) of a slot's `call`-th evaluation on its time grid.

    One-step samplers evaluate at grid[i] and step to grid[i + 1] (t_prev = grid[i - 1] for the
    DPM-Solver++ history). Heun's calls alternate: the predictor evaluates at grid[i], the
    corrector at grid[i + 1], both stepping from grid[i] (t_prev) to grid[i + 1] (s).
    """
    if sampler != "heun":
        return grid[call], grid[call + 1], grid[max(call - 1, 0)]
    i, corrector = divmod(call, 2)
    return grid[i + corrector], grid[i + 1], grid[i]


@dataclasses.dataclass
class Admission:
    """One sample to place into a free slot."""

    slot: int
    key: np.ndarray  # the request's key, request_key(seed)
    index: int  # the sample's position in its request: example key = fold_in(key, index)
    num_steps: int
    sampler: str
    label: int = -1
    guidance_scale: float | None = None


def request_key(seed: int) -> np.ndarray:
    """jax.random.PRNGKey(seed) for a uint32 seed, as host numpy."""
    return np.asarray(jax.random.PRNGKey(np.uint32(seed)))


@functools.lru_cache(maxsize=4096)
def time_grid(process: Process, num_steps: int) -> np.ndarray:
    """process.time_grid(num_steps) as host numpy, computed once per step count."""
    return np.asarray(process.time_grid(num_steps), np.float32)


def _x0_estimate(den: Denoiser, process: Process, x, t, label, scale, num_classes: int):
    """x0 for every slot; slots with a guidance weight use classifier-free guidance."""
    plain = lambda: samplers.predict(den, process, x, t, label if num_classes else None, "x0")
    if not num_classes:
        return plain()
    guided_slots = ~jnp.isnan(scale)

    def with_guidance():
        g = samplers.predict(guided(den, jnp.where(guided_slots, scale, 1.0)), process, x, t, label, "x0")
        return jnp.where(bcast(guided_slots, x), g, plain())

    return jax.lax.cond(jnp.any(guided_slots), with_guidance, plain)


_INT_COLUMNS = ("mask", "free", "index", "num_steps", "kind", "label", "key0", "key1")
_FLOAT_COLUMNS = ("scale", "t", "s", "t_prev")


def _step(den_leaves, state, ints, floats, *, den_tree, process, num_classes, sample_shape, clip_x0=None):
    """Admit, free and advance all busy slots by one step (one network evaluation each).

    The denoiser arrives as its flat list of leaves (`den_tree` rebuilds it at trace time):
    flattening its NNX state on every call cost ~0.25 ms of host time per step. The per-slot
    inputs come packed in two arrays (one host->device transfer each): ints (B, 8) with the
    _INT_COLUMNS (the key's two uint32 words bit-cast) and floats (B, 4) _FLOAT_COLUMNS.
    """
    den = jax.tree.unflatten(den_tree, den_leaves)
    col = dict(zip(_INT_COLUMNS, ints.T)) | dict(zip(_FLOAT_COLUMNS, floats.T))
    admit = dict(mask=col["mask"] > 0, free=col["free"] > 0, index=col["index"], num_steps=col["num_steps"],
                 kind=col["kind"], label=col["label"], scale=col["scale"],
                 key=jax.lax.bitcast_convert_type(ints[:, 6:8], jnp.uint32))
    times = dict(t=col["t"], s=col["s"], t_prev=col["t_prev"])
    with inference_groupnorm():  # forward-only program: the faster GroupNorm reduction order
        return _advance(den, state, admit, times, process, num_classes, sample_shape, clip_x0)


def _advance(den, state, admit, times, process, num_classes, sample_shape, clip_x0=None):
    new = admit["mask"]
    keys = jax.vmap(jax.random.fold_in)(admit["key"], admit["index"])
    # Noise is drawn only on steps that need it (threefry is ~20% of a batch-1 step on XLA:CPU).
    x_T = jax.lax.cond(jnp.any(new), lambda: process.prior_std() * samplers.example_noise(
        keys, sample_shape, samplers.INIT_NOISE), lambda: jnp.zeros_like(state["x"]))
    t, s, t_prev = times["t"], times["s"], times["t_prev"]  # this step's times of every slot (host grids)
    (a_t, s_t), (a_s, s_s), (a_p, s_p) = (process.coefficients(u) for u in (t, s, t_prev))
    # Heun runs in the scaled space x~ = x / alpha (as samplers.heun); it starts at t = grid[0].
    x_T = jnp.where(bcast(new & (admit["kind"] == _HEUN), x_T), x_T / bcast(a_t, x_T), x_T)
    pick = lambda a, b: jnp.where(bcast(new, a) if a.ndim > 1 else new, a, b)
    state = dict(
        x=pick(x_T, state["x"]), d_prev=pick(jnp.zeros_like(x_T), state["d_prev"]),
        key=jnp.where(new[:, None], keys, state["key"]), step=jnp.where(new, 0, state["step"]),
        n=pick(admit["num_steps"], state["n"]), kind=pick(admit["kind"], state["kind"]),
        label=pick(admit["label"], state["label"]), active=(state["active"] & ~admit["free"]) | new,
        x_base=state["x_base"],
    )
    x, i, n, active = state["x"], state["step"], state["n"], state["active"]
    heun = state["kind"] == _HEUN
    x_in = jnp.where(bcast(heun, x), x * bcast(a_t, x), x)
    x0 = _x0_estimate(den, process, x_in, t, state["label"], admit["scale"], num_classes)
    # DDIM / ancestral: the DDPM posterior with per-slot eta.
    stochastic = active & (jnp.asarray(_ETA)[state["kind"]] > 0)  # slots that draw noise (ancestral)
    noise = jax.lax.cond(jnp.any(stochastic), lambda: samplers.example_noise(state["key"], sample_shape, i),
                         lambda: jnp.zeros_like(x))
    eta = bcast(jnp.asarray(_ETA)[state["kind"]], x)
    x0_posterior = x0 if clip_x0 is None else jnp.clip(x0, *clip_x0)  # as samplers.ddim's clip_x0
    x_posterior = samplers.posterior_step(process, x, x0_posterior, t, s, noise, eta)
    # DPM-Solver++(2M): second order between the first and the last step, as samplers.dpm_solver_pp.
    ratio_t, ratio_s = s_t / a_t, s_s / a_s
    lam = lambda r: -jnp.log(jnp.where(r > 0, r, 1.0))
    second = (i > 0) & (i < n - 1)
    r = (lam(ratio_t) - lam(s_p / a_p)) / jnp.where(second, lam(ratio_s) - lam(ratio_t), 1.0)
    r = bcast(jnp.where(second, r, 1.0), x)
    d = jnp.where(bcast(second, x), (1 + 0.5 / r) * x0 - (0.5 / r) * state["d_prev"], x0)
    x_dpm = bcast(s_s / s_t, x) * x + bcast(a_s * (1.0 - ratio_s / ratio_t), x) * d
    # Heun (samplers.heun, no churn): slope d = (x~ - x0) / sigma at the evaluated time; the
    # predictor keeps x~ and d, the corrector averages the two slopes; the last call returns x0.
    sig_t, sig_next, sig_base = ratio_t, ratio_s, s_p / a_p
    slope = (x - x0) / bcast(jnp.where(heun, sig_t, 1.0), x)
    predictor = (i % 2 == 0) & (i < n - 1)
    x_heun = jnp.where(bcast(predictor, x), x + bcast(sig_next - sig_t, x) * slope,
                       state["x_base"] + bcast(sig_next - sig_base, x) * 0.5 * (state["d_prev"] + slope))
    x_heun = jnp.where(bcast(i == n - 1, x), x0, x_heun)
    kind = bcast(state["kind"], x)
    x_next = jnp.where(kind == SAMPLER_KINDS["dpm_solver++"], x_dpm, jnp.where(kind == _HEUN, x_heun, x_posterior))
    busy = bcast(active, x)
    state["x"] = jnp.where(busy, x_next, x)
    state["d_prev"] = jnp.where(busy, jnp.where(kind == _HEUN, slope, x0), state["d_prev"])
    state["x_base"] = jnp.where(bcast(active & heun & predictor, x), x, state["x_base"])
    state["step"] = jnp.where(active, i + 1, i)
    state["active"] = active & (state["step"] < n)
    return state


class Engine:
    """Host side of the slot batch: builds admissions, runs the compiled step, returns finished rows."""

    def __init__(self, denoiser: Denoiser, process: Process, sample_shape: tuple[int, ...], *,
                 batch_slots: int, num_classes: int = 0, clip_x0: tuple[float, float] | None = None,
                 devices=None):
        """clip_x0: (lo, hi) clips the x0 estimate of DDIM / ancestral slots (config sampling.clip_x0)."""
        if batch_slots <= 0:
            raise ValueError(f"batch_slots must be positive, got {batch_slots}")
        self.process, self.sample_shape = process, tuple(int(d) for d in sample_shape)
        self.batch_slots, self.num_classes = int(batch_slots), int(num_classes)
        devices = list(devices or jax.local_devices())
        if self.batch_slots % len(devices):
            devices = devices[:1]  # the slot batch must split evenly over the devices
        self.mesh = Mesh(np.array(devices), ("batch",))
        self._rows = NamedSharding(self.mesh, P("batch"))
        self._replicated = NamedSharding(self.mesh, P())
        self._den_leaves, self._den_tree = jax.tree.flatten(jax.device_put(denoiser, self._replicated))
        self._step = jax.jit(
            partial(_step, den_tree=self._den_tree, process=process, num_classes=self.num_classes,
                    sample_shape=self.sample_shape, clip_x0=None if clip_x0 is None else tuple(map(float, clip_x0))),
            donate_argnums=(1,), out_shardings=self._rows,
        )
        self.state = self._initial_state()
        # Host mirrors of the per-slot counters (the device never needs to be asked what finished).
        self.steps = np.zeros(self.batch_slots, np.int64)
        self.num_steps = np.zeros(self.batch_slots, np.int64)
        self.busy = np.zeros(self.batch_slots, bool)
        self.grids: list[np.ndarray | None] = [None] * self.batch_slots
        self.samplers: list[str] = ["ddim"] * self.batch_slots
        # Guidance weight per slot (NaN: none), sent with every step's times.
        self.scale = np.full(self.batch_slots, np.nan, np.float32)
        idle = np.zeros((self.batch_slots, len(_INT_COLUMNS)), np.int32)
        idle[:, 3], idle[:, 5] = 1, -1
        self._idle_ints = jax.device_put(idle, self._rows)  # "nothing admitted or freed": sent once
        self.calls = 0

    def _initial_state(self):
        b, shape = self.batch_slots, self.sample_shape
        zeros = lambda s, dt: jax.device_put(np.zeros(s, dt), self._rows)
        return dict(x=zeros((b, *shape), np.float32), d_prev=zeros((b, *shape), np.float32),
                    x_base=zeros((b, *shape), np.float32),
                    key=zeros((b, 2), np.uint32), step=zeros((b,), np.int32), n=zeros((b,), np.int32),
                    kind=zeros((b,), np.int32), label=zeros((b,), np.int32), active=zeros((b,), bool))

    def set_denoiser(self, denoiser: Denoiser) -> None:
        """New weights (same network): takes effect at the next step, no recompilation."""
        leaves, tree = jax.tree.flatten(jax.device_put(denoiser, self._replicated))
        if tree != self._den_tree:
            raise ValueError("set_denoiser: the new denoiser's structure differs from the served one")
        self._den_leaves = leaves

    def free_slots(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.busy)]

    def step(self, admissions: list[Admission] = (), free: list[int] = ()) -> list[tuple[int, np.ndarray]]:
        """Admit, free, advance one step; returns (slot, sample) for every slot that finished."""
        b = self.batch_slots
        ints = self._idle_ints
        if admissions or free:
            ints = np.zeros((b, len(_INT_COLUMNS)), np.int32)
            ints[:, 3], ints[:, 5] = 1, -1  # num_steps, label of slots not admitted now (unused)
            for slot in free:
                ints[slot, 1], self.busy[slot] = 1, False
            for a in admissions:
                if self.busy[a.slot]:
                    raise RuntimeError(f"slot {a.slot} is busy")
                calls = evaluations(a.sampler, a.num_steps)
                ints[a.slot, :6] = (1, 0, a.index, calls, SAMPLER_KINDS[a.sampler], a.label)
                ints[a.slot, 6:8] = np.asarray(a.key, np.uint32).view(np.int32)
                self.scale[a.slot] = np.nan if a.guidance_scale is None else a.guidance_scale
                self.busy[a.slot], self.steps[a.slot], self.num_steps[a.slot] = True, 0, calls
                self.grids[a.slot], self.samplers[a.slot] = time_grid(self.process, a.num_steps), a.sampler
        elif not self.busy.any():
            return []
        floats = np.zeros((b, len(_FLOAT_COLUMNS)), np.float32)
        floats[:, 0] = self.scale
        for slot in np.flatnonzero(self.busy):
            floats[slot, 1:] = slot_times(self.samplers[slot], self.grids[slot], self.steps[slot])
        if isinstance(ints, np.ndarray):
            ints = jax.device_put(ints, self._rows)
        self.state = self._step(self._den_leaves, self.state, ints, jax.device_put(floats, self._rows))
        self.calls += 1
        self.steps[self.busy] += 1
        done = np.flatnonzero(self.busy & (self.steps >= self.num_steps))
        if not len(done):
            return []
        x = np.asarray(self.state["x"])  # only when something finished: one host sync per finish
        self.busy[done] = False
        return [(int(i), x[i].copy()) for i in done]
