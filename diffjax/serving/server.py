"""`diffjax serve --workdir DIR [--port 50051]`: the gRPC sampling server.

Loads the newest checkpoint's EMA weights, compiles and warms up the batched step, then reports
SERVING on the standard grpc.health.v1 service (server reflection is on too). Requests are
validated (INVALID_ARGUMENT naming the field), queued (RESOURCE_EXHAUSTED when the queue is
full) and packed by the scheduler into one fixed batch of slots. SIGTERM / SIGINT drain the
in-flight work, then stop. A newer checkpoint in the workdir is picked up every --reload_s seconds.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from diffjax import commandline, distributed
from diffjax.sample import clip_output
from diffjax.serving import sampling_pb2 as pb
from diffjax.serving import sampling_pb2_grpc as pb_grpc
from diffjax.serving.engine import served_steppers
from diffjax.serving.scheduler import ADMISSION, Job, NotAccepting, QueueFull, Scheduler, wait_events

SERVICE = pb.DESCRIPTOR.services_by_name["Sampling"].full_name  # "diffjax.v1.Sampling"


@dataclasses.dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port
    batch_slots: int = 64
    max_samples_per_request: int = 1024
    max_queued_requests: int = 256
    max_steps: int = 1000
    max_message_bytes: int = 64 << 20
    reload_s: float = 30.0  # 0 = never look for newer checkpoints
    grace_s: float = 30.0
    workers: int = 128  # handler threads: one per concurrent RPC
    admission: str = "fifo"  # or "fair" (scheduler.ADMISSION)
    tls_cert: str | None = None
    tls_key: str | None = None
    ema: float | None = None  # the EMA rate served (None: training.ema_rate; --ema picks one of training.ema_rates)
    classifier: str | None = None  # a classifier workdir: every request is classifier-guided (diffjax.guidance)
    classifier_scale: float | None = None


class Model:
    """What the servicer knows of the model: shapes, classes, data range, defaults."""

    def __init__(self, config, process, sample_shape, max_steps: int):
        from diffjax.sample import data_range

        self.config, self.process, self.sample_shape = config, process, tuple(sample_shape)
        self.num_classes = int(config.model.get("num_classes", 0) or 0)
        self.data_min, self.data_max = data_range(config)
        self.max_steps = max_steps
        self.classifier = False  # classifier guidance: labels in [0, num_classes) required (Server._load)
        clip_x0 = self.data_min, self.data_max
        self.samplers = served_steppers(config.sampling, clip_x0 if config.sampling.get("clip_x0", False) else None, process)
        self.default_sampler = config.sampling.sampler if config.sampling.sampler in self.samplers else "ddim"
        self.default_steps = min(int(config.sampling.num_steps), max_steps)


def m_nfe(model: Model, job: Job) -> int:
    """Network evaluations per sample of a job (as samplers.sample reports its NFE)."""
    return model.samplers[job.sampler].nfe(job.num_steps)


class Servicer(pb_grpc.SamplingServicer):
    def __init__(self, model: Model, scheduler: Scheduler, options: ServerOptions):
        self.model, self.scheduler, self.options = model, scheduler, options
        self.serving = threading.Event()

    # ---- validation -----------------------------------------------------------------------------
    def _job(self, request: pb.SampleRequest, context, *, unary: bool) -> Job:
        m, o = self.model, self.options

        def bad(message):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

        n = request.num_samples
        if not 1 <= n <= o.max_samples_per_request:
            bad(f"num_samples must be in [1, {o.max_samples_per_request}], got {n}")
        sampler = request.sampler or m.default_sampler
        if sampler == "ode":
            bad(
                "sampler 'ode' (adaptive steps) is offline-only: use `diffjax sample`; the server serves "
                f"{sorted(m.samplers)}"
            )
        if sampler not in m.samplers:
            bad(f"sampler must be one of {sorted(m.samplers)}, got {request.sampler!r}")
        options, takes = dict(request.options), self.scheduler.engine.dynamic[sampler]
        unknown = sorted(set(options) - set(takes))
        if unknown:
            bad(f"options {unknown} are not options of {sampler} on this model; it takes {list(takes) or 'none'}")
        for name, value in options.items():
            if not math.isfinite(value) and not (name == "s_tmax" and value == math.inf):
                bad(f"options[{name!r}] must be finite, got {value}")
            if name != "s_tmax" and value < 0:
                bad(f"options[{name!r}] must be >= 0, got {value}")
        steps = request.num_steps or m.default_steps
        low = 2 if sampler == "heun" else 1  # heun: N grid points, 2N - 1 evaluations
        if not low <= steps <= m.max_steps:
            bad(f"num_steps must be in [{low}, {m.max_steps}] for {sampler}, got {request.num_steps}")
        if request.output not in pb.OutputFormat.values():
            bad(f"output must be one of {list(pb.OutputFormat.keys())}, got {request.output}")
        if request.output == pb.PNG and len(m.sample_shape) != 3:
            bad(f"output PNG needs an image model; this model's samples have shape {list(m.sample_shape)}")
        labels = np.full(n, -1, np.int32)
        if request.labels:
            if not m.num_classes:
                bad("labels given but the model is unconditional (num_classes = 0)")
            if len(request.labels) not in (1, n):
                bad(f"labels must have 1 or num_samples={n} entries, got {len(request.labels)}")
            given = np.asarray(request.labels, np.int64)
            if given.min() < -1 or given.max() >= m.num_classes:
                bad(f"labels must be in [0, {m.num_classes}) or -1 (unconditional), got {sorted(set(given.tolist()))[:8]}")
            labels[:] = given
        if m.classifier and (not request.labels or labels.min() < 0):
            bad(f"this server guides with a classifier (--classifier): labels in [0, {m.num_classes}) are required")
        scale = None
        if request.HasField("guidance_scale"):
            scale = float(request.guidance_scale)
            if not math.isfinite(scale):
                bad(f"guidance_scale must be finite, got {scale}")
            if not request.labels:
                bad("guidance_scale needs class labels (labels)")
        if unary and request.output != pb.PNG:
            size = n * int(np.prod(m.sample_shape)) * 4 + 1024
            if size > o.max_message_bytes:
                bad(
                    f"num_samples={n} makes a {size}-byte response, over the server's max message size "
                    f"{o.max_message_bytes}; use SampleStream"
                )
        try:
            self.scheduler.engine.grid(sampler, steps)  # computed here (cached), not in the scheduler thread
        except ValueError as err:  # e.g. more steps than a discrete process has
            bad(f"num_steps={steps} for {sampler}: {err}")
        return Job(n, sampler, steps, int(request.seed), labels, scale, options=options)

    def _submit(self, request, context, *, unary: bool) -> Job:
        if not self.serving.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "server is warming up or shutting down")
        job = self._job(request, context, unary=unary)
        try:
            self.scheduler.submit(job)
        except QueueFull as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except NotAccepting as err:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        context.add_callback(lambda: self.scheduler.cancel(job))  # deadline / cancel / disconnect
        return job

    def _events(self, job: Job, context):
        for event in wait_events(job, context.is_active):
            if event[0] == "error":
                context.abort(grpc.StatusCode.INTERNAL, event[1])
            if event[0] == "batch":
                yield event
        if not context.is_active():
            self.scheduler.cancel(job)

    # ---- RPCs -----------------------------------------------------------------------------------
    def Sample(self, request, context):
        job = self._submit(request, context, unary=True)
        out = np.zeros((job.num_samples, *self.model.sample_shape), np.float32)
        step = None
        for _, indices, xs, step in self._events(job, context):
            out[indices] = xs
        if job.finished != job.num_samples:
            context.abort(grpc.StatusCode.CANCELLED, "request cancelled")
        response = pb.SampleResponse(checkpoint_step=int(step), nfe=m_nfe(self.model, job))
        self._fill(response, request.output, out)
        return response

    def SampleStream(self, request, context):
        job = self._submit(request, context, unary=False)
        for _, indices, xs, step in self._events(job, context):
            batch = pb.SampleBatch(indices=indices, checkpoint_step=int(step))
            self._fill(batch, request.output, xs)
            yield batch

    def GetModelInfo(self, request, context):
        m = self.model
        return pb.ModelInfo(
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

    def GetServerStatus(self, request, context):
        return pb.ServerStatus(**self.scheduler.status())

    def _fill(self, message, output: int, x: np.ndarray) -> None:
        x = clip_output(self.model.config, x).astype(np.float32)  # the rule `diffjax sample` follows
        if output == pb.PNG:
            message.png.extend(encode_png(x, (self.model.data_min, self.model.data_max)))
        else:
            message.samples.CopyFrom(pb.Tensor(shape=list(x.shape), dtype="float32", data=x.astype("<f4").tobytes()))


def encode_png(images: np.ndarray, data_range: tuple[float, float]) -> list[bytes]:
    """(N, H, W, C) in data_range -> one PNG (8-bit grey or RGB) per image."""
    from PIL import Image

    from diffjax.plotting import to_uint8

    out = []
    for img in to_uint8(images, data_range):
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class Server:
    """A running sampling server: `Server(workdir, options).start()`, `.port`, `.stop()`."""

    def __init__(self, workdir: str, options: ServerOptions | None = None, *, log=print):
        self.workdir, self.options, self.log = workdir, options or ServerOptions(), log
        self.health = health.HealthServicer()
        self._stop = threading.Event()
        self._reloader: threading.Thread | None = None

    def start(self) -> "Server":
        o = self.options
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=o.workers, thread_name_prefix="diffjax-rpc"),
            options=[
                ("grpc.max_send_message_length", o.max_message_bytes),
                ("grpc.max_receive_message_length", o.max_message_bytes),
            ],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        address = f"{o.host}:{o.port}"
        if o.tls_cert or o.tls_key:
            if not (o.tls_cert and o.tls_key):
                raise SystemExit("diffjax serve: --tls_cert and --tls_key go together")
            from diffjax import storage

            key, cert = storage.path(o.tls_key).read_bytes(), storage.path(o.tls_cert).read_bytes()
            creds = grpc.ssl_server_credentials([(key, cert)])
            self.port = self.grpc.add_secure_port(address, creds)
        else:
            self.port = self.grpc.add_insecure_port(address)
        if not self.port:
            raise SystemExit(f"diffjax serve: cannot bind {address}")
        self._load()
        pb_grpc.add_SamplingServicer_to_server(self.servicer, self.grpc)
        self.grpc.start()  # health answers NOT_SERVING while the step compiles
        self._warm_up()
        self.servicer.serving.set()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if o.reload_s > 0:
            self._reloader = threading.Thread(target=self._watch_checkpoints, daemon=True, name="diffjax-reload")
            self._reloader.start()
        return self

    def _load(self) -> None:
        from diffjax import network
        from diffjax.serving.engine import Engine
        from diffjax.workdir import Workdir

        t0 = time.perf_counter()
        self.source = Workdir(self.workdir, command="diffjax serve", inference=True, ema=self.options.ema)
        state, step = self.source.restore(only=("ema",))
        config, process = self.source.config, self.source.process
        max_steps = self.options.max_steps
        if process.max_steps is not None:  # ddpm: at most num_scales steps
            max_steps = min(max_steps, process.max_steps)
        shape = network.data_shape(config)
        self.model = Model(config, process, shape, max_steps)
        from diffjax import guidance

        self.guide = guidance.from_flags(self.options, config, "diffjax serve", need_labels=False)
        if self.guide is not None:  # every request guided: labels range over the classifier's classes
            self.model.num_classes, self.model.classifier = self.guide.num_classes, True
        engine = Engine(
            self._denoiser(state),
            process,
            shape,
            batch_slots=self.options.batch_slots,
            num_classes=self.model.num_classes,
            served=self.model.samplers,
        )
        engine.grid(self.model.default_sampler, self.model.default_steps)
        self.scheduler = Scheduler(
            engine,
            checkpoint_step=step,
            max_queued_requests=self.options.max_queued_requests,
            admission=self.options.admission,
        )
        self.servicer = Servicer(self.model, self.scheduler, self.options)
        self.log(
            f"diffjax serve: loaded step {step} of {self.workdir} (EMA {self.source.ema_rate}, {process.name}, "
            f"samples {list(shape)}, "
            f"{self.options.batch_slots} slots) in {time.perf_counter() - t0:.1f}s"
        )

    def _warm_up(self) -> None:
        """Compile the step (both guidance branches) and run one tiny request end to end."""
        t0 = time.perf_counter()
        self.scheduler.start()
        labels = np.zeros(1, np.int32) if self.model.num_classes else np.full(1, -1, np.int32)
        job = Job(1, self.model.default_sampler, 2, 0, labels, 1.0 if self.model.num_classes else None)
        self.scheduler.submit(job)
        for event in wait_events(job, lambda: True):
            if event[0] == "error":
                raise SystemExit(f"diffjax serve: warm-up failed: {event[1]}")
        self.scheduler.stats.clear()
        self.log(
            f"diffjax serve: compiled and warmed up in {time.perf_counter() - t0:.1f}s; "
            f"SERVING on {self.options.host}:{self.port}"
        )

    def _denoiser(self, ema_state):
        """The network with a restored checkpoint's EMA weights, as a diffjax Denoiser."""
        from diffjax import network

        w = self.source
        den = network.network_denoiser(w.graphdef, w.rest, w.process, w.config, ema_state["ema"])
        return den if self.guide is None else self.guide(den)

    def _watch_checkpoints(self) -> None:
        passed = 0  # a newer step that cannot be swapped in (another learned schedule), told once
        while not self._stop.wait(self.options.reload_s):
            try:
                latest = self.source.latest_step()
                if latest is None or latest <= max(self.scheduler.checkpoint_step, passed):
                    continue
                state, step = self.source.restore(only=("ema",))
                if step <= self.scheduler.checkpoint_step:  # the newer step was unreadable
                    continue
                if self.source.process != self.model.process:  # VDM: the schedule is compiled into the step
                    self.source.process, passed = self.model.process, step
                    self.log(
                        f"diffjax serve: step {step} has another learned noise schedule than the served step "
                        f"{self.scheduler.checkpoint_step}, which stays: restart the server to serve step {step}"
                    )
                    continue
                self.scheduler.stage_weights(self._denoiser(state), step)
                self.log(f"diffjax serve: step {step} staged; swapping in when the busy slots drain")
            except Exception as err:  # noqa: BLE001 - a bad new checkpoint must not take the server down
                self.log(f"diffjax serve: reload failed, keeping step {self.scheduler.checkpoint_step}: {err!r}")

    def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new RPCs, finish in-flight ones (up to grace seconds)."""
        grace = self.options.grace_s if grace is None else grace
        self._stop.set()
        self.servicer.serving.clear()
        self.health.enter_graceful_shutdown()
        done = self.grpc.stop(grace)
        self.scheduler.shutdown(drain=True, timeout=grace)
        done.wait(grace + 5)

    def wait(self) -> None:
        self.grpc.wait_for_termination()


def parse_args(argv: list[str]) -> tuple[str, ServerOptions]:
    d = ServerOptions()
    p = commandline.Parser("diffjax serve", __doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a `diffjax train` workdir (config.json + checkpoints/)")
    p.add_argument("--host", default=d.host, help="bind address (default loopback only)")
    p.add_argument("--port", type=commandline.port, default=d.port, help="0 = any free port")
    p.add_argument(
        "--batch_slots", type=commandline.positive_int, default=d.batch_slots, help="samples advanced together per step"
    )
    p.add_argument("--max_samples_per_request", type=commandline.positive_int, default=d.max_samples_per_request)
    p.add_argument("--max_queued_requests", type=commandline.positive_int, default=d.max_queued_requests)
    p.add_argument("--max_steps", type=commandline.positive_int, default=d.max_steps)
    p.add_argument("--max_message_bytes", type=commandline.positive_int, default=d.max_message_bytes)
    p.add_argument(
        "--reload_s",
        type=commandline.non_negative_float,
        default=d.reload_s,
        help="seconds between checks for a newer checkpoint (0: never)",
    )
    p.add_argument("--grace_s", type=commandline.non_negative_float, default=d.grace_s, help="shutdown drain time")
    p.add_argument(
        "--admission",
        choices=ADMISSION,
        default=d.admission,
        help="slot order: fifo (arrival order) or fair (capped share per request while others wait)",
    )
    p.add_argument("--tls_cert", default=None, help="PEM certificate chain (with --tls_key: serve TLS)")
    p.add_argument("--tls_key", default=None, help="PEM private key")
    commandline.add_ema_flag(p)
    from diffjax import guidance

    guidance.add_flags(p)
    args = distributed.parse(p, argv)
    distributed.refuse_multihost(p.prog, args)  # never a hang: one host serves
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls_cert and --tls_key go together")
    fields = {f.name for f in dataclasses.fields(ServerOptions)}
    return args.workdir, ServerOptions(**{k: v for k, v in vars(args).items() if k in fields})


def main(argv: list[str]) -> int:
    workdir, options = parse_args(argv)
    from diffjax import compile_cache

    compile_cache.enable()
    server = Server(workdir, options, log=lambda msg: print(msg, flush=True)).start()
    stopping = threading.Event()

    def on_signal(signum, _frame):
        if not stopping.is_set():
            stopping.set()
            print(f"diffjax serve: {signal.Signals(signum).name}: draining in-flight requests", flush=True)
            threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.wait()
    status = server.scheduler.status()
    print(f"diffjax serve: stopped ({json.dumps(status)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
