"""Prometheus metrics of `diffjax serve` (`--metrics_port`), every one labelled with the model.

One dedicated CollectorRegistry per server holds the process / platform / GC collectors, the
instrumented request metrics (counted once per terminal status of Sample and SampleStream:
`RequestRecord.finish` is idempotent) and a collector that reads each model's scheduler at scrape
time (slots, queue depth, checkpoint step, reloads, compile time), so those equal GetServerStatus.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

UNKNOWN = "(unknown)"  # the label of a model / sampler a request named but the server does not serve
SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)
STEP_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
NFE = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

__all__ = ["Metrics", "RequestRecord", "UNKNOWN"]


class Metrics:
    """The server's metrics; `start(host, port)` serves them as text on http://host:port/metrics."""

    def __init__(self, models: Callable[[], Mapping[str, object]]):
        """models: () -> {name: ServedModel} (read at scrape time by the state collector)."""
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter(
            "diffjax_requests",
            "Sample / SampleStream calls by terminal gRPC status",
            ["model", "sampler", "code"],
            registry=r,
        )
        self.samples = Counter("diffjax_samples", "samples returned to clients", ["model"], registry=r)
        self.latency = Histogram(
            "diffjax_request_latency_seconds",
            "Sample / SampleStream time from arrival to terminal status",
            ["model", "sampler"],
            buckets=SECONDS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "diffjax_queue_wait_seconds",
            "time from submission to a request's first slot (requests that got one)",
            ["model"],
            buckets=SECONDS,
            registry=r,
        )
        self.nfe = Histogram(
            "diffjax_nfe_per_sample",
            "network evaluations per sample of each completed request",
            ["model", "sampler"],
            buckets=NFE,
            registry=r,
        )
        self.step_seconds = Histogram(
            "diffjax_step_seconds", "wall time of one batched step call", ["model"], buckets=STEP_SECONDS, registry=r
        )
        r.register(_StateCollector(models))
        self.http: WSGIServer | None = None

    def add_model(self, name: str, samplers: Iterable[str]) -> None:
        """Zero-valued series for a served model, so rates exist before its first request."""
        self.samples.labels(name)
        self.queue_wait.labels(name)
        self.step_seconds.labels(name)
        for sampler in samplers:
            self.requests.labels(name, sampler, "OK")
            self.latency.labels(name, sampler)

    def request(self) -> "RequestRecord":
        return RequestRecord(self)

    def start(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0 = any free port); returns the bound port."""
        self.http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self.http.server_port)

    def stop(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None


class RequestRecord:
    """One Sample / SampleStream call: its labels (refined while it is validated) and, once, its end."""

    def __init__(self, metrics: Metrics):
        self.metrics, self.model, self.sampler = metrics, UNKNOWN, UNKNOWN
        self.start = time.perf_counter()
        self._lock = threading.Lock()
        self._done = False

    def finish(self, code: str, *, nfe: int | None = None) -> bool:
        """Count the call's terminal status `code` (a grpc.StatusCode name); only the first call counts."""
        with self._lock:
            if self._done:
                return False
            self._done = True
        m = self.metrics
        m.requests.labels(self.model, self.sampler, code).inc()
        m.latency.labels(self.model, self.sampler).observe(time.perf_counter() - self.start)
        if code == "OK" and nfe is not None:
            m.nfe.labels(self.model, self.sampler).observe(nfe)
        return True


class _StateCollector:
    """Gauges and counters read from each model's scheduler at scrape time."""

    def __init__(self, models: Callable[[], Mapping[str, object]]):
        self.models = models

    def describe(self):
        return []  # the families depend on the served models: collected, not described

    def collect(self):
        busy = GaugeMetricFamily("diffjax_slots_busy", "slots holding a sample", labels=["model"])
        total = GaugeMetricFamily("diffjax_slots_total", "slots of the batch (--batch_slots)", labels=["model"])
        depth = GaugeMetricFamily("diffjax_queue_depth", "requests waiting for slots", labels=["model"])
        step = GaugeMetricFamily("diffjax_checkpoint_step", "training step of the served weights", labels=["model"])
        reloads = CounterMetricFamily("diffjax_reloads", "newer checkpoints swapped in", labels=["model"])
        compile_s = GaugeMetricFamily("diffjax_compile_seconds", "compile + warm-up time at start", labels=["model"])
        for name, model in self.models().items():
            scheduler = getattr(model, "scheduler", None)
            if scheduler is None:  # still loading
                continue
            status = scheduler.status()
            busy.add_metric([name], status["busy_slots"])
            total.add_metric([name], status["batch_slots"])
            depth.add_metric([name], status["queued_requests"])
            step.add_metric([name], status["checkpoint_step"])
            reloads.add_metric([name], status.get("reloads", 0))
            seconds = getattr(model, "compile_seconds", None)
            if seconds is not None:
                compile_s.add_metric([name], seconds)
        return [busy, total, depth, step, reloads, compile_s]
