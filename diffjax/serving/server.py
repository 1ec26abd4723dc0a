"""`diffjax serve --workdir DIR [--model NAME=WORKDIR[,ema=RATE] ...] [--port 50051]`: the gRPC sampling server.

Serves one or more models (`--workdir` is named "default"; each `--model` adds one), each with its
newest checkpoint's EMA weights, its own engine, slots, scheduler and hot reload; requests name
their model (`""` = the default). Compiles and warms up every model's batched step, then reports
SERVING on the standard grpc.health.v1 service (server reflection is on too). Requests are
validated (INVALID_ARGUMENT naming the field; NOT_FOUND for an unknown model), queued
(RESOURCE_EXHAUSTED when the model's queue is full) and packed by its scheduler into one fixed batch
of slots. SIGTERM / SIGINT drain the in-flight work, then stop. A newer checkpoint in a model's
workdir is picked up every --reload_s seconds. `--metrics_port` serves Prometheus metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import signal
import sys
import threading
import time
from concurrent import futures
from typing import NoReturn, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from diffjax import commandline, distributed
from diffjax.sample import clip_output
from diffjax.serving import sampling_pb2 as pb
from diffjax.serving import sampling_pb2_grpc as pb_grpc
from diffjax.serving.metrics import UNKNOWN, Metrics, RequestRecord
from diffjax.serving.models import (
    DEFAULT,
    Model,
    ModelSpec,
    ServedModel,
    check_names,
    check_workdir,
    parse_model_flag,
)
from diffjax.serving.scheduler import ADMISSION, Job, NotAccepting, QueueFull, wait_events

SERVICE = pb.DESCRIPTOR.services_by_name["Sampling"].full_name  # "diffjax.v1.Sampling"


@dataclasses.dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port
    batch_slots: int = 64  # per model
    max_samples_per_request: int = 1024
    max_queued_requests: int = 256  # per model
    max_steps: int = 1000
    max_message_bytes: int = 64 << 20
    reload_s: float = 30.0  # 0 = never look for newer checkpoints
    grace_s: float = 30.0
    workers: int = 128  # handler threads: one per concurrent RPC
    admission: str = "fifo"  # or "fair" (scheduler.ADMISSION)
    tls_cert: str | None = None
    tls_key: str | None = None
    ema: float | None = None  # --workdir's EMA rate (None: training.ema_rate; --ema picks one of training.ema_rates)
    classifier: str | None = None  # a classifier workdir: every request is classifier-guided (diffjax.guidance)
    classifier_scale: float | None = None
    metrics_port: int | None = None  # Prometheus /metrics on host:metrics_port (None: off; 0: any free port)
    http_port: int | None = None  # the HTTP/JSON API (diffjax.serving.http_api) on host:http_port (None: off)


DEADLINE_SLACK_S = 0.25  # a client's own deadline fires a little before the server's copy of it


def ended(context) -> grpc.StatusCode:
    """The status of a call that ended early: its deadline passed (within DEADLINE_SLACK_S: the
    client cancels at its deadline, which the server learns slightly later), or the client left."""
    return grpc.StatusCode.DEADLINE_EXCEEDED if context.time_remaining() <= DEADLINE_SLACK_S else grpc.StatusCode.CANCELLED


class Servicer(pb_grpc.SamplingServicer):
    def __init__(self, models: dict[str, ServedModel], default: str, options: ServerOptions, metrics: Metrics):
        self.models, self.default, self.options, self.metrics = models, default, options, metrics
        self.serving = threading.Event()

    def _abort(self, context, record: RequestRecord | None, code: grpc.StatusCode, message: str) -> NoReturn:
        if record is not None:
            record.finish(code.name)
        context.abort(code, message)
        raise AssertionError("context.abort returned")  # it raises

    def _record(self, context) -> RequestRecord:
        """The call's metrics record; a call that ends by deadline or cancellation is counted at its end."""
        record = self.metrics.request()
        context.add_callback(lambda: record.finish(ended(context).name))
        return record

    def _served(self, name: str, context, record: RequestRecord | None = None) -> ServedModel:
        served = self.models.get(name or self.default)
        if served is None:
            self._abort(
                context,
                record,
                grpc.StatusCode.NOT_FOUND,
                f"model {name!r} is not served here; it serves {list(self.models)}",
            )
        return served

    # ---- validation -----------------------------------------------------------------------------
    def _job(self, request: pb.SampleRequest, context, served: ServedModel, record: RequestRecord, *, unary: bool) -> Job:
        m, o = served.model, self.options
        scheduler = served.scheduler
        assert scheduler is not None
        sampler = request.sampler or m.default_sampler
        record.sampler = sampler if sampler in m.samplers else UNKNOWN

        def bad(message) -> NoReturn:
            self._abort(context, record, grpc.StatusCode.INVALID_ARGUMENT, message)

        n = request.num_samples
        if not 1 <= n <= o.max_samples_per_request:
            bad(f"num_samples must be in [1, {o.max_samples_per_request}], got {n}")
        if sampler == "ode":
            bad(
                "sampler 'ode' (adaptive steps) is offline-only: use `diffjax sample`; the server serves "
                f"{sorted(m.samplers)}"
            )
        if sampler not in m.samplers:
            bad(f"sampler must be one of {sorted(m.samplers)}, got {request.sampler!r}")
        options, takes = dict(request.options), scheduler.engine.dynamic[sampler]
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
            scheduler.engine.grid(sampler, steps)  # computed here (cached), not in the scheduler thread
        except ValueError as err:  # e.g. more steps than a discrete process has
            bad(f"num_steps={steps} for {sampler}: {err}")
        return Job(n, sampler, steps, int(request.seed), labels, scale, options=options)

    def _submit(self, request, context, record: RequestRecord, *, unary: bool) -> tuple[ServedModel, Job]:
        served = self._served(request.model, context, record)
        record.model = served.name
        if not self.serving.is_set():
            self._abort(context, record, grpc.StatusCode.UNAVAILABLE, "server is warming up or shutting down")
        job = self._job(request, context, served, record, unary=unary)
        scheduler = served.scheduler
        assert scheduler is not None
        try:
            scheduler.submit(job)
        except QueueFull as err:
            self._abort(context, record, grpc.StatusCode.RESOURCE_EXHAUSTED, f"model {served.name}: {err}")
        except NotAccepting as err:
            self._abort(context, record, grpc.StatusCode.UNAVAILABLE, str(err))
        context.add_callback(lambda: scheduler.cancel(job))  # deadline / cancel / disconnect
        return served, job

    def _events(self, served: ServedModel, job: Job, context, record: RequestRecord):
        for event in wait_events(job, context.is_active):
            if event[0] == "error":
                self._abort(context, record, grpc.StatusCode.INTERNAL, event[1])
            if event[0] == "batch":
                yield event
        if job.finished != job.num_samples:  # the call ended (deadline, cancel, disconnect) before its samples
            assert served.scheduler is not None
            served.scheduler.cancel(job)
            self._abort(context, record, ended(context), "request cancelled")

    # ---- RPCs -----------------------------------------------------------------------------------
    def Sample(self, request, context):
        record = self._record(context)
        try:
            served, job = self._submit(request, context, record, unary=True)
            out = np.zeros((job.num_samples, *served.model.sample_shape), np.float32)
            step = None
            for _, indices, xs, step in self._events(served, job, context, record):
                out[indices] = xs
            response = pb.SampleResponse(checkpoint_step=int(step), nfe=served.model.nfe(job))
            self._fill(served.model, response, request.output, out)
            if record.finish("OK", nfe=response.nfe):
                self.metrics.samples.labels(served.name).inc(job.num_samples)
            return response
        except BaseException:
            record.finish("UNKNOWN")  # counted already unless unexpected
            raise

    def SampleStream(self, request, context):
        record = self._record(context)
        try:
            served, job = self._submit(request, context, record, unary=False)
            for _, indices, xs, step in self._events(served, job, context, record):
                batch = pb.SampleBatch(indices=indices, checkpoint_step=int(step))
                self._fill(served.model, batch, request.output, xs)
                yield batch
                self.metrics.samples.labels(served.name).inc(len(indices))
            record.finish("OK", nfe=served.model.nfe(job))
        except GeneratorExit:  # the stream was closed under it: the call ended
            record.finish(ended(context).name)
            raise
        except BaseException:
            record.finish("UNKNOWN")
            raise

    def GetModelInfo(self, request, context):
        return self._served(request.model, context).info()

    def ListModels(self, request, context):
        return pb.ModelList(models=[served.info() for served in self.models.values()])

    def GetServerStatus(self, request, context):
        scheduler = self._served(request.model, context).scheduler
        assert scheduler is not None
        return pb.ServerStatus(**scheduler.status())

    def _fill(self, model: Model, message, output: int, x: np.ndarray) -> None:
        x = clip_output(model.config, x).astype(np.float32)  # the rule `diffjax sample` follows
        if output == pb.PNG:
            message.png.extend(encode_png(x, (model.data_min, model.data_max)))
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
    """A running sampling server: `Server(workdir_or_specs, options).start()`, `.port`, `.stop()`.

    A workdir string serves that one model as "default" (at options.ema); a list of ModelSpec serves
    each under its name, the first being the default (what a request with model "" gets)."""

    def __init__(self, models: str | Sequence[ModelSpec], options: ServerOptions | None = None, *, log=print):
        self.options, self.log = options or ServerOptions(), log
        specs = [ModelSpec(DEFAULT, models, self.options.ema)] if isinstance(models, str) else list(models)
        if not specs:
            raise ValueError("Server: no model to serve (give a workdir or ModelSpecs)")
        check_names(specs)
        self.metrics = Metrics(lambda: self.models)
        self.models = {spec.name: ServedModel(spec, self.options, self.metrics, log) for spec in specs}
        self.default = specs[0].name
        self.health = health.HealthServicer()
        self._stop = threading.Event()
        self.metrics_port: int | None = None

    @property
    def scheduler(self):
        """The default model's scheduler."""
        return self.models[self.default].scheduler

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
        if o.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.start(o.host, o.metrics_port)
            except OSError as err:
                raise SystemExit(f"diffjax serve: cannot bind --metrics_port {o.host}:{o.metrics_port}: {err}") from None
            self.log(f"diffjax serve: metrics on http://{o.host}:{self.metrics_port}/metrics")
        for served in self.models.values():
            served.load()
        self.servicer = Servicer(self.models, self.default, o, self.metrics)
        pb_grpc.add_SamplingServicer_to_server(self.servicer, self.grpc)
        self.grpc.start()  # health answers NOT_SERVING while the steps compile
        t0 = time.perf_counter()
        for served in self.models.values():
            served.warm_up()
        self.servicer.serving.set()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        for served in self.models.values():
            served.watch(self._stop)
        self.log(
            f"diffjax serve: {len(self.models)} model(s) {list(self.models)} (default {self.default}) compiled and "
            f"warmed up in {time.perf_counter() - t0:.1f}s; SERVING on {o.host}:{self.port}"
        )
        return self

    def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new RPCs, finish in-flight ones (up to grace seconds)."""
        grace = self.options.grace_s if grace is None else grace
        self._stop.set()
        self.servicer.serving.clear()
        self.health.enter_graceful_shutdown()
        done = self.grpc.stop(grace)
        drains = [
            threading.Thread(target=served.scheduler.shutdown, kwargs=dict(drain=True, timeout=grace), daemon=True)
            for served in self.models.values()
            if served.scheduler is not None
        ]
        for thread in drains:
            thread.start()
        for thread in drains:
            thread.join()
        done.wait(grace + 5)
        self.metrics.stop()

    def wait(self) -> None:
        self.grpc.wait_for_termination()

    def status(self) -> dict:
        """{model name: its scheduler's status}."""
        return {name: served.scheduler.status() for name, served in self.models.items() if served.scheduler is not None}


def _model_flag(text: str) -> ModelSpec:
    try:
        return parse_model_flag(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: list[str]) -> tuple[list[ModelSpec], ServerOptions]:
    """(the models to serve, --workdir's "default" first, and the options); one line + exit 2 for a mistake."""
    d = ServerOptions()
    p = commandline.Parser("diffjax serve", __doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="a `diffjax train` workdir (config.json + checkpoints/): model 'default'")
    p.add_argument(
        "--model",
        action="append",
        type=_model_flag,
        default=[],
        metavar="NAME=WORKDIR[,ema=RATE]",
        help="one more model, repeatable; requests name it in SampleRequest.model (NAME: [A-Za-z0-9_.-]+). "
        "Without --workdir the first --model is the default model",
    )
    p.add_argument("--host", default=d.host, help="bind address (default loopback only)")
    p.add_argument("--port", type=commandline.port, default=d.port, help="0 = any free port")
    p.add_argument(
        "--batch_slots",
        type=commandline.positive_int,
        default=d.batch_slots,
        help="samples advanced together per step (each model has its own)",
    )
    p.add_argument("--max_samples_per_request", type=commandline.positive_int, default=d.max_samples_per_request)
    p.add_argument("--max_queued_requests", type=commandline.positive_int, default=d.max_queued_requests, help="per model")
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
    p.add_argument(
        "--metrics_port",
        type=commandline.port,
        default=None,
        help="serve Prometheus metrics on http://HOST:PORT/metrics (0 = any free port; default off)",
    )
    p.add_argument("--http_port", type=commandline.port, default=None, help="HTTP/JSON API port (0: any free port)")
    commandline.add_ema_flag(p)
    from diffjax import guidance

    guidance.add_flags(p)
    args = distributed.parse(p, argv)
    distributed.refuse_multihost(p.prog, args)  # never a hang: one host serves
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls_cert and --tls_key go together")
    if args.workdir is None and not args.model:
        p.error("give --workdir DIR (the model 'default') and/or --model NAME=WORKDIR[,ema=RATE]")
    if args.workdir is None and args.ema is not None:
        p.error("--ema is --workdir's EMA rate; a --model takes NAME=WORKDIR,ema=RATE")
    specs = ([ModelSpec(DEFAULT, args.workdir, args.ema)] if args.workdir is not None else []) + args.model
    try:
        check_names(specs)
    except ValueError as err:
        p.error(f"--model: {err}")
    _check_workdirs(p, specs, args.workdir is not None)
    fields = {f.name for f in dataclasses.fields(ServerOptions)}
    return specs, ServerOptions(**{k: v for k, v in vars(args).items() if k in fields})


def _check_workdirs(p: commandline.Parser, specs: list[ModelSpec], has_workdir: bool) -> None:
    """Every model's workdir, before anything loads (one line, exit 2 for a missing one or an untracked EMA)."""
    for i, spec in enumerate(specs):
        check_workdir(spec, p.prog, "--workdir" if has_workdir and i == 0 else "--model")


def main(argv: list[str]) -> int:
    specs, options = parse_args(argv)
    from diffjax import compile_cache

    compile_cache.enable()
    server = Server(specs, options, log=lambda msg: print(msg, flush=True)).start()
    from diffjax.serving import http_api

    gateway = http_api.start(server)  # None without --http_port; answers 503 while the server drains
    stopping = threading.Event()

    def on_signal(signum, _frame):
        if not stopping.is_set():
            stopping.set()
            print(f"diffjax serve: {signal.Signals(signum).name}: draining in-flight requests", flush=True)
            threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.wait()
    if gateway is not None:
        gateway.stop()
    print(f"diffjax serve: stopped ({json.dumps(server.status())})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
