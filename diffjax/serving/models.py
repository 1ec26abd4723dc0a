"""The models one `diffjax serve` serves: `--model NAME=WORKDIR[,ema=RATE]` specs, and per model its
weights, engine, slots, scheduler and hot reload (`ServedModel`), independent of the other models."""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from diffjax.serving import sampling_pb2 as pb
from diffjax.serving.engine import served_steppers
from diffjax.serving.scheduler import Job, Scheduler, wait_events

if TYPE_CHECKING:
    from diffjax.serving.metrics import Metrics
    from diffjax.serving.server import ServerOptions

DEFAULT = "default"  # the name of --workdir's model
NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A served model: its name in requests, its workdir and the EMA rate served (None: training.ema_rate)."""

    name: str
    workdir: str
    ema: float | None = None


def parse_model_flag(text: str) -> ModelSpec:
    """`NAME=WORKDIR[,ema=RATE]` -> ModelSpec; ValueError (one line) for anything else."""
    name, sep, rest = text.partition("=")
    if not sep:
        raise ValueError(f"expected NAME=WORKDIR[,ema=RATE], got {text!r}")
    if not NAME.fullmatch(name):
        raise ValueError(f"NAME must match [A-Za-z0-9_.-]+, got {name!r} in {text!r}")
    workdir, *extra = rest.split(",")
    if not workdir:
        raise ValueError(f"no WORKDIR after {name}= in {text!r}")
    ema = None
    for item in extra:
        key, sep, value = item.partition("=")
        if key != "ema" or not sep or ema is not None:
            raise ValueError(f"the one option after WORKDIR is ema=RATE, got {item!r} in {text!r}")
        try:
            ema = float(value)
        except ValueError:
            raise ValueError(f"ema must be a number (an EMA rate the run tracked), got {value!r} in {text!r}") from None
    return ModelSpec(name, workdir, ema)


def check_names(specs: list[ModelSpec]) -> None:
    """ValueError naming a model name given twice."""
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            where = " (--workdir's model is named 'default')" if spec.name == DEFAULT else ""
            raise ValueError(f"model name {spec.name!r} given twice{where}")
        seen.add(spec.name)


def check_workdir(spec: ModelSpec, prog: str, flag: str) -> None:
    """Before anything loads: the model's workdir has a config.json, and tracked the EMA rate asked
    for; else one line naming `flag` (--workdir / --model) and exit 2."""
    import json

    import ml_collections

    from diffjax import commandline, storage, trainer

    shown = spec.workdir if flag == "--workdir" else f"{spec.name}={spec.workdir}"
    storage.require_credentials(spec.workdir, prog, flag)
    path = storage.path(spec.workdir) / "config.json"
    if not path.exists():
        commandline.usage_error(prog, f"{flag} {shown}: {path} not found; is it a diffjax train workdir?")
    if spec.ema is not None:
        tracked = trainer.ema_rates(ml_collections.ConfigDict(json.loads(path.read_text())))
        if float(spec.ema) not in tracked:
            rate = "--ema " if flag == "--workdir" else "ema="
            commandline.usage_error(
                prog,
                f"{flag} {shown}: {rate}{spec.ema} is not an EMA rate this run tracked; its rates: "
                f"{', '.join(map(repr, tracked))} (training.ema_rate, training.ema_rates)",
            )


class Model:
    """What the servicer knows of a model: shapes, classes, data range, defaults."""

    def __init__(self, config, process, sample_shape, max_steps: int):
        from diffjax.sample import data_range

        self.config, self.process, self.sample_shape = config, process, tuple(sample_shape)
        self.num_classes = int(config.model.get("num_classes", 0) or 0)
        self.data_min, self.data_max = data_range(config)
        self.max_steps = max_steps
        self.classifier = False  # classifier guidance: labels in [0, num_classes) required (ServedModel.load)
        clip_x0 = self.data_min, self.data_max
        self.samplers = served_steppers(config.sampling, clip_x0 if config.sampling.get("clip_x0", False) else None, process)
        self.default_sampler = config.sampling.sampler if config.sampling.sampler in self.samplers else "ddim"
        self.default_steps = min(int(config.sampling.num_steps), max_steps)

    def nfe(self, job: Job) -> int:
        """Network evaluations per sample of a job (as samplers.sample reports its NFE)."""
        return self.samplers[job.sampler].nfe(job.num_steps)


class ServedModel:
    """One model of the server: `load()`, `warm_up()`, `watch(stop)`; `.model`, `.scheduler`."""

    def __init__(self, spec: ModelSpec, options: "ServerOptions", metrics: "Metrics", log: Callable[[str], None] = print):
        self.spec, self.name, self.options, self.metrics, self.log = spec, spec.name, options, metrics, log
        self.scheduler: Scheduler | None = None  # set by load()
        self.compile_seconds: float | None = None  # set by warm_up()
        self._watcher: threading.Thread | None = None

    def load(self) -> None:
        """Read the newest checkpoint's EMA weights and build the engine and scheduler (nothing compiles)."""
        from diffjax import guidance, network
        from diffjax.serving.engine import Engine
        from diffjax.workdir import Workdir

        t0, o = time.perf_counter(), self.options
        self.source = Workdir(self.spec.workdir, command="diffjax serve", inference=True, ema=self.spec.ema)
        state, step = self.source.restore(only=("ema",))
        config, process = self.source.config, self.source.process
        max_steps = o.max_steps
        if process.max_steps is not None:  # ddpm: at most num_scales steps
            max_steps = min(max_steps, process.max_steps)
        shape = network.data_shape(config)
        self.model = Model(config, process, shape, max_steps)
        self.guide = guidance.from_flags(o, config, "diffjax serve", need_labels=False)
        if self.guide is not None:  # every request guided: labels range over the classifier's classes
            self.model.num_classes, self.model.classifier = self.guide.num_classes, True
        engine = Engine(
            self._denoiser(state),
            process,
            shape,
            batch_slots=o.batch_slots,
            num_classes=self.model.num_classes,
            served=self.model.samplers,
        )
        engine.grid(self.model.default_sampler, self.model.default_steps)
        self.scheduler = Scheduler(
            engine,
            checkpoint_step=step,
            max_queued_requests=o.max_queued_requests,
            admission=o.admission,
        )
        self.metrics.add_model(self.name, self.model.samplers)
        self.log(
            f"diffjax serve: model {self.name}: loaded step {step} of {self.spec.workdir} (EMA {self.source.ema_rate}, "
            f"{process.name}, samples {list(shape)}, {o.batch_slots} slots) in {time.perf_counter() - t0:.1f}s"
        )

    def warm_up(self) -> None:
        """Compile the step (both guidance branches) and run one tiny request end to end."""
        assert self.scheduler is not None, "load() first"
        t0 = time.perf_counter()
        self.scheduler.start()
        m = self.model
        labels = np.zeros(1, np.int32) if m.num_classes else np.full(1, -1, np.int32)
        job = Job(1, m.default_sampler, 2, 0, labels, 1.0 if m.num_classes else None)
        self.scheduler.submit(job)
        for event in wait_events(job, lambda: True):
            if event[0] == "error":
                raise SystemExit(f"diffjax serve: model {self.name}: warm-up failed: {event[1]}")
        self.scheduler.stats.clear()
        self.compile_seconds = time.perf_counter() - t0
        # metrics from here on: the warm-up's step calls (the compile among them) are compile_seconds
        self.scheduler.on_step = self.metrics.step_seconds.labels(self.name).observe
        self.scheduler.on_start = self.metrics.queue_wait.labels(self.name).observe
        self.log(f"diffjax serve: model {self.name}: compiled and warmed up in {self.compile_seconds:.1f}s")

    def info(self) -> pb.ModelInfo:
        m = self.model
        assert self.scheduler is not None
        return pb.ModelInfo(
            name=self.name,
            config_json=m.config.to_json(),
            sample_shape=list(m.sample_shape),
            num_classes=m.num_classes,
            samplers=sorted(m.samplers),
            default_sampler=m.default_sampler,
            default_steps=m.default_steps,
            max_steps=m.max_steps,
            max_samples_per_request=self.options.max_samples_per_request,
            checkpoint_step=self.scheduler.checkpoint_step,
            process=m.process.name,
            data_min=m.data_min,
            data_max=m.data_max,
        )

    def _denoiser(self, ema_state):
        """The network with a restored checkpoint's EMA weights, as a diffjax Denoiser."""
        from diffjax import network

        w = self.source
        den = network.network_denoiser(w.graphdef, w.rest, w.process, w.config, ema_state["ema"])
        return den if self.guide is None else self.guide(den)

    def watch(self, stop: threading.Event) -> None:
        """Look for a newer checkpoint every --reload_s seconds (a thread of its own) until stop is set."""
        if self.options.reload_s > 0:
            self._watcher = threading.Thread(
                target=self._watch_checkpoints, args=(stop,), daemon=True, name=f"diffjax-reload-{self.name}"
            )
            self._watcher.start()

    def _watch_checkpoints(self, stop: threading.Event) -> None:
        scheduler = self.scheduler
        assert scheduler is not None
        passed = 0  # a newer step that cannot be swapped in (another learned schedule), told once
        while not stop.wait(self.options.reload_s):
            try:
                latest = self.source.latest_step()
                if latest is None or latest <= max(scheduler.checkpoint_step, passed):
                    continue
                state, step = self.source.restore(only=("ema",))
                if step <= scheduler.checkpoint_step:  # the newer step was unreadable
                    continue
                if self.source.process != self.model.process:  # VDM: the schedule is compiled into the step
                    self.source.process, passed = self.model.process, step
                    self.log(
                        f"diffjax serve: model {self.name}: step {step} has another learned noise schedule than "
                        f"the served step {scheduler.checkpoint_step}, which stays: restart the server to serve step {step}"
                    )
                    continue
                scheduler.stage_weights(self._denoiser(state), step)
                self.log(f"diffjax serve: model {self.name}: step {step} staged; swapping in when the busy slots drain")
            except Exception as err:  # noqa: BLE001 - a bad new checkpoint must not take the server down
                self.log(
                    f"diffjax serve: model {self.name}: reload failed, keeping step {scheduler.checkpoint_step}: {err!r}"
                )
