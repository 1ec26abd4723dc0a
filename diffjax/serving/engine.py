"""The continuous-batching engine: a fixed batch of slots advanced by one jit-compiled step.

Every slot carries its own sample: its state (x and its sampler's history), its per-example key,
its evaluation count, its sampler and options, its class label / guidance weight. One call of the
compiled `step` admits new samples into free slots, frees cancelled ones and advances every busy
slot by one network evaluation, each at its own time. Slots of requests with different samplers,
options and step counts share the batch; finished slots are refilled on the next call.

The engine holds no sampler math: each served sampler is a `diffjax.steppers` stepper, the same
object `samplers.sample` drives offline; the engine calls its `prepare` / `update` for the
evaluation `sub` of grid step `i` each slot is at, with the noise `samplers.example_noise_coded`
draws offline. A request (seed, n, sampler, steps, options) therefore gives the samples that
`samplers.sample(sampler, ..., key=PRNGKey(seed), shape=(n, ...), **options)` gives offline,
whatever else is in the batch. Each slot's times come from its stepper's time grid (cached per
(sampler, n) on the host). Per-request numeric options (`Stepper.dynamic`: DDIM's eta, PC's snr,
Heun's churn) are per-slot data; structural ones are fixed per served sampler (PC's predictor,
corrector and corrector steps from the config, with per-example norms, as co-batching needs).
"""

from __future__ import annotations

import dataclasses
import functools
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffjax import samplers, steppers
from diffjax.denoiser import Denoiser, guided, require_learned_variance
from diffjax.models.layers import inference_groupnorm
from diffjax.processes import Process, bcast

Array = jax.Array
MAX_DYNAMIC = 4  # per-slot numeric option columns (Heun has four)


def served_steppers(
    config_sampling=None, clip_x0: tuple[float, float] | None = None, process: Process | None = None
) -> dict[str, steppers.Stepper]:
    """The fixed-step samplers a server serves, with the config's structural options (PC's predictor,
    corrector, corrector steps; clip_x0 for DDIM / ancestral; the ancestral step's variance). The
    adaptive ODE is offline-only, and PC with the Euler-Maruyama predictor needs an SDE (not served
    on the discrete ddpm process); a sampler that divides by alpha is not served on a grid that starts
    where alpha = 0 (pc on the flow process)."""
    s = config_sampling
    pc: dict[str, Any] = {"norm": "example"}
    if s is not None:
        pc.update(
            predictor=s.get("predictor", "reverse_diffusion"),
            corrector=s.get("corrector", "langevin"),
            snr=float(s.get("snr", 0.16)),
            n_steps_each=int(s.get("n_steps_each", 1)),
        )
    clip: dict[str, Any] = {} if clip_x0 is None else {"clip_x0": tuple(float(v) for v in clip_x0)}
    pc_stepper = steppers.PC(**pc)
    variance = str(s.get("variance", "fixed_small")) if s is not None else "fixed_small"  # as the offline sampler
    served: dict[str, steppers.Stepper] = {
        "ddim": steppers.DDIM(**clip),
        "ancestral": steppers.Ancestral(**clip, variance=variance),
        "pc": pc_stepper,
        "dpm_solver++": steppers.DPMSolverPP(),
        "heun": steppers.Heun(),
    }
    if process is not None and process.discrete and pc_stepper.predictor == "euler_maruyama":
        del served["pc"]
    if process is not None:  # a stepper dividing by alpha on a grid starting where alpha = 0 (flow: pc)
        for name, stepper in list(served.items()):
            try:
                samplers.check_start(stepper, process, process.time_grid(2, stepper.grid_spacing(process)))
            except ValueError:
                del served[name]
    return served


def slot_position(stepper: steppers.Stepper, num_steps: int, call: int) -> tuple[int, int]:
    """(grid step i, evaluation sub) of a slot's `call`-th evaluation."""
    i = min(call // stepper.evals, num_steps - 1)
    return i, call - i * stepper.evals


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
    options: dict = dataclasses.field(default_factory=dict)  # per-request numeric options (Stepper.dynamic)


def request_key(seed: int) -> np.ndarray:
    """jax.random.PRNGKey(seed) for a uint32 seed, as host numpy."""
    return np.asarray(jax.random.PRNGKey(np.uint32(seed)))


@functools.lru_cache(maxsize=4096)
def time_grid(process: Process, num_steps: int, spacing: str = "default") -> np.ndarray:
    """process.time_grid(num_steps, spacing) as host numpy, computed once per (step count, spacing)."""
    return np.asarray(process.time_grid(num_steps, spacing), np.float32)


def _prediction(den: Denoiser, process: Process, x, t, label, scale, num_classes: int, with_variance: bool = False):
    """The denoiser's own prediction for every slot; slots with a guidance weight use classifier-free
    guidance. with_variance: the pair (prediction, v) with the learned variance output v."""
    call = (lambda d: d.with_variance) if with_variance else (lambda d: d)  # noqa: E731
    plain = lambda: call(den)(x, t, label if num_classes else None)  # noqa: E731
    if not num_classes:
        return plain()
    guided_slots = ~jnp.isnan(scale)

    def with_guidance():
        g = call(guided(den, jnp.where(guided_slots, scale, 1.0)))(x, t, label)
        return jax.tree.map(lambda a, b: jnp.where(bcast(guided_slots, x), a, b), g, plain())

    return jax.lax.cond(jnp.any(guided_slots), with_guidance, plain)


_INT_COLUMNS = ("mask", "busy", "index", "kind", "label", "key0", "key1", "i", "sub", "n", "last", "noisy")
_FLOAT_COLUMNS = ("scale", "t_prev", "t", "t_next") + tuple(f"opt{j}" for j in range(MAX_DYNAMIC))


def _step(den_leaves, state, ints, floats, *, den_tree, process, kinds, dynamic, sample_shape, num_classes):
    """Admit, free and advance all busy slots by one evaluation each (see the module docstring).

    The denoiser arrives as its flat list of leaves (`den_tree` rebuilds it at trace time). The
    per-slot inputs come packed in two arrays (one host->device transfer each): ints (B, 12)
    _INT_COLUMNS (the key's two uint32 words bit-cast) and floats (B, 8) _FLOAT_COLUMNS.
    """
    den = jax.tree.unflatten(den_tree, den_leaves)
    col = dict(zip(_INT_COLUMNS, ints.T)) | dict(zip(_FLOAT_COLUMNS, floats.T))
    with inference_groupnorm():  # forward-only program: the faster GroupNorm reduction order
        return _advance(den, state, col, ints, floats, process, kinds, dynamic, sample_shape, num_classes)


def _advance(den, state, col, ints, floats, process, kinds, dynamic, sample_shape, num_classes):
    new, kind = col["mask"] > 0, jnp.where(col["mask"] > 0, col["kind"], state["kind"])
    keys = jax.vmap(jax.random.fold_in)(jax.lax.bitcast_convert_type(ints[:, 5:7], jnp.uint32), col["index"])
    keys = jnp.where(new[:, None], keys, state["key"])
    step = steppers.Step(col["i"], col["n"], col["t_prev"], col["t"], col["t_next"], col["last"] > 0)
    active = col["busy"] > 0  # the host knows which slots hold a sample (and when each finishes)
    # The sampler of each kind, its per-request numeric options taken from the slot's columns.
    kind_steppers = [
        dataclasses.replace(st, **{name: floats[:, 4 + j] for j, name in enumerate(names)})
        for st, names in zip(kinds, dynamic)
    ]
    slot_of = lambda k: active & (kind == k)  # noqa: E731

    def noise_for(k):  # drawn only when a slot of this kind needs noise now (threefry is costly on CPU)
        def noise(code):
            need = jnp.any(slot_of(k) & (col["noisy"] > 0))
            return jax.lax.cond(
                need,
                lambda: samplers.example_noise_coded(keys, sample_shape, col["i"], code),
                lambda: jnp.zeros((keys.shape[0], *sample_shape), jnp.float32),
            )

        return noise

    pick = lambda per_kind: functools.reduce(  # noqa: E731
        lambda acc, k: jnp.where(bcast(kind == k, acc) if acc.ndim > 1 else kind == k, per_kind[k], acc),
        range(1, len(per_kind)),
        per_kind[0],
    )
    # Admission: x_T as samplers.sample draws it, then each stepper's init (Heun scales by 1/alpha).
    x_T = jax.lax.cond(
        jnp.any(new),
        lambda: process.prior_std() * samplers.example_noise(keys, sample_shape, samplers.INIT_NOISE),
        lambda: jnp.zeros_like(state["x"]),
    )
    inits = [{**_zero_state(x_T), **st.init(process, x_T, col["t"])} for st in kind_steppers]
    fresh = {name: pick([s_[name] for s_ in inits]) for name in steppers.STATE_KEYS}
    state = {**state, **{name: jnp.where(bcast(new, state[name]), fresh[name], state[name]) for name in steppers.STATE_KEYS}}
    sub = col["sub"]
    prepared = [
        st.prepare(process, {n: state[n] for n in steppers.STATE_KEYS}, sub, step, noise_for(k))
        for k, st in enumerate(kind_steppers)
    ]
    x_in = pick([p_[1] for p_ in prepared])
    t_in = pick([jnp.broadcast_to(p_[2], col["t"].shape) for p_ in prepared])
    label = jnp.where(new, col["label"], state["label"])
    with_v = any(st.learned_variance for st in kinds)  # the ancestral sampler with variance='learned'
    out = _prediction(den, process, x_in, t_in, label, col["scale"], num_classes, with_v)
    out, extra = (out[0], {"v": out[1]}) if with_v else (out, {})
    # sorted: one program in every process (a set of strings iterates in hash order)
    by_kind = {kd: process.convert(den.prediction, kd, out, x_in, t_in) for kd in sorted({st.kind for st in kinds})}
    updated = [
        st.update(
            process, prepared[k][0], by_kind[st.kind], sub, step, noise_for(k), **(extra if st.learned_variance else {})
        )
        for k, st in enumerate(kind_steppers)
    ]
    nxt = {name: pick([{**_zero_state(state["x"]), **u}[name] for u in updated]) for name in steppers.STATE_KEYS}
    state = {
        **state,
        **{name: jnp.where(bcast(active, state[name]), nxt[name], state[name]) for name in steppers.STATE_KEYS},
    }
    return {**state, "key": keys, "kind": kind, "label": label}


def _zero_state(x):
    return {name: jnp.zeros_like(x) for name in steppers.STATE_KEYS}


@functools.lru_cache(maxsize=32)
def _shared_step(rows, **statics):
    return jax.jit(partial(_step, **statics), donate_argnums=(1,), out_shardings=rows)


def _jitted_step(rows, **statics):
    """The jitted step; engines of one network, process and samplers (a server's models at two EMA
    rates, or two names for one workdir) share one jit object, so its program compiles once."""
    try:
        return _shared_step(rows, **statics)
    except TypeError:  # an unhashable static (e.g. a process holding arrays): a program of its own
        return jax.jit(partial(_step, **statics), donate_argnums=(1,), out_shardings=rows)


class Engine:
    """Host side of the slot batch: builds admissions, runs the compiled step, returns finished rows."""

    def __init__(
        self,
        denoiser: Denoiser,
        process: Process,
        sample_shape: tuple[int, ...],
        *,
        batch_slots: int,
        num_classes: int = 0,
        clip_x0: tuple[float, float] | None = None,
        served: dict[str, steppers.Stepper] | None = None,
        devices=None,
    ):
        """served: sampler name -> stepper (default `served_steppers(clip_x0=clip_x0)`)."""
        if batch_slots <= 0:
            raise ValueError(f"batch_slots must be positive, got {batch_slots}")
        self.process, self.sample_shape = process, tuple(int(d) for d in sample_shape)
        self.batch_slots, self.num_classes = int(batch_slots), int(num_classes)
        self.served = dict(served or served_steppers(clip_x0=clip_x0))
        if any(st.learned_variance for st in self.served.values()):
            require_learned_variance(denoiser)
        self.kind_of = {name: k for k, name in enumerate(self.served)}
        # Per-request numeric options of each sampler; churn needs the inverse noise level, which
        # the discrete ddpm process lacks (there Heun runs without churn).
        self.dynamic = {
            name: () if process.discrete and isinstance(st, steppers.Heun) else st.dynamic
            for name, st in self.served.items()
        }
        devices = list(devices or jax.local_devices())
        if self.batch_slots % len(devices):
            devices = devices[:1]  # the slot batch must split evenly over the devices
        self.mesh = Mesh(np.array(devices), ("batch",))
        self._rows = NamedSharding(self.mesh, P("batch"))
        self._replicated = NamedSharding(self.mesh, P())
        self._den_leaves, self._den_tree = jax.tree.flatten(jax.device_put(denoiser, self._replicated))
        self._step = _jitted_step(
            self._rows,
            den_tree=self._den_tree,
            process=process,
            kinds=tuple(self.served.values()),
            dynamic=tuple(self.dynamic.values()),
            sample_shape=self.sample_shape,
            num_classes=self.num_classes,
        )
        self.state = self._initial_state()
        # Host mirrors of the per-slot counters (the device never needs to be asked what finished).
        self.calls_done = np.zeros(self.batch_slots, np.int64)
        self.num_calls = np.zeros(self.batch_slots, np.int64)
        self.busy = np.zeros(self.batch_slots, bool)
        self.slot_sampler: list[str] = [next(iter(self.served))] * self.batch_slots
        self.slot_steps = np.ones(self.batch_slots, np.int64)
        self.grids: list[np.ndarray | None] = [None] * self.batch_slots
        self.floats = np.zeros((self.batch_slots, len(_FLOAT_COLUMNS)), np.float32)
        self.floats[:, 0] = np.nan  # guidance weight per slot (NaN: none)
        self.noisy = np.zeros(self.batch_slots, np.int32)
        self.calls = 0

    def grid(self, sampler: str, num_steps: int) -> np.ndarray:
        """The time grid a slot of `sampler` with `num_steps` runs on (host numpy, cached)."""
        return time_grid(self.process, num_steps, self.served[sampler].grid_spacing(self.process))

    def evaluations(self, sampler: str, num_steps: int) -> int:
        """Network evaluations (engine calls) of one sample, as samplers.sample counts its NFE."""
        return self.served[sampler].nfe(num_steps)

    def _initial_state(self):
        b, shape = self.batch_slots, self.sample_shape
        zeros = lambda s, dt: jax.device_put(np.zeros(s, dt), self._rows)  # noqa: E731
        return {
            **{name: zeros((b, *shape), np.float32) for name in steppers.STATE_KEYS},
            "key": zeros((b, 2), np.uint32),
            "kind": zeros((b,), np.int32),
            "label": zeros((b,), np.int32),
        }

    def set_denoiser(self, denoiser: Denoiser) -> None:
        """New weights (same network): takes effect at the next step, no recompilation."""
        leaves, tree = jax.tree.flatten(jax.device_put(denoiser, self._replicated))
        if tree != self._den_tree:  # type: ignore[operator]  # jaxlib ships no stub for PyTreeDef
            raise ValueError("set_denoiser: the new denoiser's structure differs from the served one")
        self._den_leaves = leaves

    def free_slots(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.busy)]

    def step(self, admissions: Sequence[Admission] = (), free: Sequence[int] = ()) -> list[tuple[int, np.ndarray]]:
        """Admit, free, advance one evaluation; returns (slot, sample) for every slot that finished."""
        b = self.batch_slots
        ints = np.zeros((b, len(_INT_COLUMNS)), np.int32)
        for freed in free:
            self.busy[freed] = False
        for a in admissions:
            if self.busy[a.slot]:
                raise RuntimeError(f"slot {a.slot} is busy")
            stepper = self.served[a.sampler]
            unknown = sorted(set(a.options) - set(self.dynamic[a.sampler]))
            if unknown:
                raise ValueError(
                    f"sampler {a.sampler!r} takes no per-request option(s) {unknown} here; "
                    f"it takes {list(self.dynamic[a.sampler])}"
                )
            ints[a.slot, [0, 2, 3, 4]] = (1, a.index, self.kind_of[a.sampler], a.label)
            ints[a.slot, 5:7] = np.asarray(a.key, np.uint32).view(np.int32)
            self.floats[a.slot, 0] = np.nan if a.guidance_scale is None else a.guidance_scale
            self.floats[a.slot, 4:] = 0.0
            for j, name in enumerate(self.dynamic[a.sampler]):
                self.floats[a.slot, 4 + j] = float(a.options.get(name, getattr(stepper, name)))
            self.noisy[a.slot] = int(stepper.draws_noise(a.options))
            self.busy[a.slot], self.calls_done[a.slot] = True, 0
            self.num_calls[a.slot] = stepper.nfe(a.num_steps)
            self.slot_sampler[a.slot], self.slot_steps[a.slot] = a.sampler, a.num_steps
            self.grids[a.slot] = self.grid(a.sampler, a.num_steps)
        if not self.busy.any():
            return []
        for slot in np.flatnonzero(self.busy):
            n = int(self.slot_steps[slot])
            i, sub = slot_position(self.served[self.slot_sampler[slot]], n, int(self.calls_done[slot]))
            grid = self.grids[slot]
            assert grid is not None  # set when the slot was admitted
            ints[slot, 1], ints[slot, 7:12] = 1, (i, sub, n, int(i == n - 1), self.noisy[slot])
            self.floats[slot, 1:4] = grid[max(i - 1, 0)], grid[i], grid[i + 1]
        # A copy: on the CPU device_put may alias the numpy buffer, and the step runs asynchronously
        # while the host already fills self.floats for the next call.
        self.state = self._step(
            self._den_leaves, self.state, jax.device_put(ints, self._rows), jax.device_put(self.floats.copy(), self._rows)
        )
        self.calls += 1
        self.calls_done[self.busy] += 1
        done = np.flatnonzero(self.busy & (self.calls_done >= self.num_calls))
        if not len(done):
            return []
        x = np.asarray(self.state["x"])  # only when something finished: one host sync per finish
        self.busy[done] = False
        return [(int(i), x[i].copy()) for i in done]
