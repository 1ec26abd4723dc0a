"""`diffjax serve --metrics_port`: a real server process on loopback, scraped over plain HTTP while
real gRPC clients succeed, fail validation, name an unknown model, run out their deadline, cancel
and overflow the queue; every count equals what the clients saw."""

import collections
import os
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tiny_configs import TOY, one_device_env, train_workdir

from diffjax.serving import Client, subprocess_server
from diffjax.serving import server as serve
from diffjax.serving.metrics import UNKNOWN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOTS = 4
QUEUE = 3
NEVER = 100_000  # steps: a request that outlives the test (about 4 ms a step)


_env = one_device_env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("metrics") / "toy"
    train_workdir(workdir, *TOY, "--config.training.n_iters=2", timeout=600)
    s = subprocess_server.ServerProcess(
        workdir,
        f"--batch_slots={SLOTS}",
        f"--max_queued_requests={QUEUE}",
        f"--max_steps={NEVER}",
        "--reload_s=0",
        "--metrics_port=0",
        env=_env(),
        cwd=ROOT,
        timeout=300,
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.addr, timeout=120) as c:
        yield c


def scrape(server) -> dict[tuple[str, tuple], float]:
    """GET /metrics -> {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def by(metrics, name: str, *keys: str) -> dict[tuple, float]:
    """name's samples keyed by the values of the labels `keys`."""
    return {tuple(dict(labels)[k] for k in keys): v for (n, labels), v in metrics.items() if n == name}


def delta(after, before) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def _wait_for(cond, timeout=30.0, why=lambda: ""):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"condition not reached {why()}"
        time.sleep(0.05)


def _fails(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code()


def test_scrape_counts_every_request_once(server, client):
    before, status_before = scrape(server), client.status()
    want: collections.Counter = collections.Counter()  # (model, sampler, code) -> calls, as the clients saw them
    nfe: dict[str, list[int]] = collections.defaultdict(list)
    samples = 0
    for sampler, n in (("ddim", 2), ("ddim", 3), ("heun", 1), ("dpm_solver++", 2)):
        response = client.sample_response(n, sampler=sampler, num_steps=3, seed=n)
        want["default", sampler, "OK"] += 1
        nfe[sampler].append(response.nfe)
        samples += n
    streamed = sum(len(indices) for indices, _ in client.sample_stream(6, sampler="ddim", num_steps=3))  # 2 waves
    assert streamed == 6
    want["default", "ddim", "OK"] += 1
    nfe["ddim"].append(nfe["ddim"][0])
    samples += streamed
    bad = [
        (dict(num_samples=0), "ddim"),
        (dict(sampler="heunn"), UNKNOWN),
        (dict(labels=[1]), "ddim"),  # labels on an unconditional model
        (dict(sampler="ode"), UNKNOWN),
        (dict(sampler="pc", output="png"), "pc"),  # PNG of 2-D points
        (dict(sampler="heun", num_steps=1), "heun"),
    ]
    for i, (fields, label) in enumerate(bad):
        kwargs = {"num_samples": 1, "num_steps": 3, **fields}
        request = lambda: client.sample(**kwargs)  # noqa: E731
        if i % 2:
            request = lambda: list(client.sample_stream(**kwargs))  # noqa: E731
        assert _fails(request) == grpc.StatusCode.INVALID_ARGUMENT
        want["default", label, "INVALID_ARGUMENT"] += 1
    assert _fails(lambda: client.sample(1, model="nope")) == grpc.StatusCode.NOT_FOUND
    want[UNKNOWN, UNKNOWN, "NOT_FOUND"] += 1
    assert _fails(lambda: client.sample(1, num_steps=NEVER, timeout=1.0)) == grpc.StatusCode.DEADLINE_EXCEEDED
    want["default", "ddim", "DEADLINE_EXCEEDED"] += 1
    _wait_for(lambda: client.status().busy_slots == 0)

    # In flight: a 16-sample stream fills the 4 slots and stays queued (fifo), two more queue behind it,
    # the queue (3) is then full; the gauges read the scheduler at scrape time.
    big = client.stub.SampleStream(Client.request(4 * SLOTS, num_steps=NEVER), timeout=120)
    gauges = lambda: {  # noqa: E731
        name: by(scrape(server), f"diffjax_{name}", "model")[("default",)] for name in ("slots_busy", "queue_depth")
    }
    _wait_for(lambda: gauges() == {"slots_busy": SLOTS, "queue_depth": 1}, why=gauges)
    waiting = [client.stub.Sample.future(Client.request(1, sampler="heun", num_steps=NEVER), timeout=120) for _ in (0, 1)]
    _wait_for(lambda: gauges()["queue_depth"] == QUEUE, why=gauges)
    refused = client.stub.Sample.future(Client.request(1, sampler="dpm_solver++", num_steps=3), timeout=120)
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    want["default", "dpm_solver++", "RESOURCE_EXHAUSTED"] += 1
    assert gauges() == {"slots_busy": SLOTS, "queue_depth": QUEUE}
    status = client.status()
    assert (status.busy_slots, status.queued_requests) == (SLOTS, QUEUE)
    for call in (big, *waiting):
        call.cancel()
    want["default", "ddim", "CANCELLED"] += 1
    want["default", "heun", "CANCELLED"] += 2
    _wait_for(lambda: gauges() == {"slots_busy": 0, "queue_depth": 0}, why=gauges)

    def counted():
        return delta(
            by(scrape(server), "diffjax_requests_total", "model", "sampler", "code"),
            by(before, "diffjax_requests_total", "model", "sampler", "code"),
        )

    _wait_for(lambda: sum(counted().values()) >= sum(want.values()), 10, lambda: f"{counted()} vs {dict(want)}")
    time.sleep(0.3)  # nothing more arrives late
    after = scrape(server)
    assert counted() == dict(want)

    latency = delta(
        by(after, "diffjax_request_latency_seconds_count", "model", "sampler"),
        by(before, "diffjax_request_latency_seconds_count", "model", "sampler"),
    )
    calls: collections.Counter = collections.Counter()
    for (model, sampler, _), n in want.items():
        calls[model, sampler] += n
    assert latency == dict(calls)
    latency_sum = delta(
        by(after, "diffjax_request_latency_seconds_sum", "model", "sampler"),
        by(before, "diffjax_request_latency_seconds_sum", "model", "sampler"),
    )
    assert latency_sum[("default", "ddim")] > 1.0  # the 1 s deadline among them
    nfe_count = delta(
        by(after, "diffjax_nfe_per_sample_count", "model", "sampler"),
        by(before, "diffjax_nfe_per_sample_count", "model", "sampler"),
    )
    nfe_sum = delta(
        by(after, "diffjax_nfe_per_sample_sum", "model", "sampler"),
        by(before, "diffjax_nfe_per_sample_sum", "model", "sampler"),
    )
    assert nfe_count == {("default", s): len(v) for s, v in nfe.items()}
    assert nfe_sum == {("default", s): sum(v) for s, v in nfe.items()}
    assert nfe["heun"] == [5]  # 3 grid steps: 2 * 3 - 1 evaluations
    one = lambda name: after[(name, (("model", "default"),))] - before.get((name, (("model", "default"),)), 0)  # noqa: E731
    assert one("diffjax_samples_total") == samples
    # a queue wait per request that got a slot: the 5 that succeeded, the one past its deadline, the big stream
    assert one("diffjax_queue_wait_seconds_count") == 5 + 1 + 1
    assert one("diffjax_step_seconds_count") == client.status().steps_run - status_before.steps_run > 0
    state = {
        name: after[(f"diffjax_{name}", (("model", "default"),))]
        for name in ("slots_total", "checkpoint_step", "reloads_total")
    }
    assert state == {"slots_total": SLOTS, "checkpoint_step": 2, "reloads_total": 0}
    assert after[("diffjax_compile_seconds", (("model", "default"),))] > 0
    # the standard collectors of the dedicated registry
    names = {name for name, _ in after}
    assert {"process_cpu_seconds_total", "python_info", "python_gc_objects_collected_total"} <= names
    assert client.health() == "SERVING"


def test_metrics_port_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        serve.parse_args(["--workdir", "w", "--metrics_port", "70000"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "argument --metrics_port: must be in [0, 65535], got 70000" in err
    assert len(err.strip().splitlines()) == 1
