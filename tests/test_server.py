"""The sampling server as users run it: a real `diffjax serve` process on a loopback port, a real
checkpoint trained here, real gRPC clients (concurrent, cancelling, timing out), SIGTERM drain."""

import concurrent.futures
import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from tiny_configs import DIGITS, config_file_and_overrides, one_device_env, train_workdir

from diffjax.serving import Client, protos, subprocess_server
from diffjax.serving import sampling_pb2 as pb
from diffjax.serving.client import tensor_to_numpy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOTS = 8
# A tiny class-conditional digits UNet, trained for 2 steps: enough for a real checkpoint.
TINY = [*DIGITS, "--config.model.num_classes=10", "--config.training.label_dropout=0.2"]


_env = one_device_env


def _train(workdir, *extra, base=TINY):
    train_workdir(workdir, *base, *extra)


def ServerProcess(workdir, *flags):
    return subprocess_server.ServerProcess(workdir, f"--batch_slots={SLOTS}", *flags, env=_env(), cwd=ROOT, timeout=240)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("served")
    _train(path)
    return path


@pytest.fixture(scope="module")
def server(workdir):
    s = ServerProcess(workdir, "--max_queued_requests=40", "--max_message_bytes=65536", "--reload_s=0")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.addr, timeout=120) as c:
        yield c


def _code(fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def test_stubs_match_the_proto():
    assert protos.differences() == []


def test_health_reflection_and_model_info(server, client):
    assert client.health() == "SERVING"
    assert client.health("diffjax.v1.Sampling") == "SERVING"
    db = ProtoReflectionDescriptorDatabase(client.channel)
    services = set(db.get_services())
    assert {"diffjax.v1.Sampling", "grpc.health.v1.Health"} <= services
    assert db.FindFileContainingSymbol("diffjax.v1.Sampling").name == "diffjax/serving/sampling.proto"
    info = client.model_info()
    assert list(info.sample_shape) == [8, 8, 1] and info.num_classes == 10
    assert set(info.samplers) == {"ancestral", "ddim", "dpm_solver++", "heun"}
    assert info.checkpoint_step == 2 and info.process == "ddpm" and info.max_steps == 1000
    assert (info.data_min, info.data_max) == (-1.0, 1.0)


def test_matches_the_offline_sampler(workdir, client):
    """The server's continuous batching reproduces samplers.sample with the same weights and seed."""
    import jax

    from diffjax import sample

    config, graphdef, rest, process, state, _ = sample.load_workdir(str(workdir))
    labels = np.arange(6, dtype=np.int32) % 10
    for sampler in ("ddim", "ancestral", "dpm_solver++", "heun"):
        want = sample.generate(
            config,
            graphdef,
            rest,
            process,
            state["ema"],
            6,
            sampler=sampler,
            steps=12,
            seed=7,
            labels=jax.numpy.asarray(labels),
        )
        got = client.sample_response(6, sampler=sampler, num_steps=12, seed=7, labels=labels.tolist())
        assert got.nfe == (23 if sampler == "heun" else 12)
        np.testing.assert_allclose(tensor_to_numpy(got.samples), want, atol=2e-4, err_msg=sampler)
    # a per-request option: DDIM at eta 0.5
    want = sample.generate(
        config,
        graphdef,
        rest,
        process,
        state["ema"],
        6,
        sampler="ddim",
        steps=12,
        seed=7,
        labels=jax.numpy.asarray(labels),
        eta=0.5,
    )
    got = client.sample_response(6, sampler="ddim", num_steps=12, seed=7, labels=labels.tolist(), options={"eta": 0.5})
    np.testing.assert_allclose(tensor_to_numpy(got.samples), want, atol=2e-4, err_msg="ddim eta 0.5")


def test_float32_output_clips_images_as_the_cli_does(workdir, client):
    """One clipping rule (sample.output_range): image samples leaving the data range are clipped to
    it by `sample.generate` (what `diffjax sample` writes) and by the server's FLOAT32 output alike."""
    import jax

    from diffjax import network, sample, samplers

    config, graphdef, rest, process, state, _ = sample.load_workdir(str(workdir))
    assert sample.output_range(config) == (-1.0, 1.0)
    den = network.network_denoiser(graphdef, rest, process, config, state["ema"])
    raw, _ = samplers.sample("ddim", den, process, jax.random.PRNGKey(11), (6, 8, 8, 1), 12)
    raw = np.asarray(raw)
    assert np.abs(raw).max() > 1.05  # the sampler's own output leaves [-1, 1]: the clip is exercised
    offline = sample.generate(config, graphdef, rest, process, state["ema"], 6, sampler="ddim", steps=12, seed=11)
    np.testing.assert_allclose(offline, np.clip(raw, -1, 1), atol=2e-4)
    served = client.sample(6, sampler="ddim", num_steps=12, seed=11)
    np.testing.assert_allclose(served, offline, atol=2e-4)
    assert served.min() >= -1 and served.max() <= 1


def test_32_concurrent_clients_and_batch_independence(client):
    """32 clients at once, mixed samplers / steps / sizes / labels / guidance, all co-batched;
    each result equals the same request run alone afterwards."""
    rng = np.random.default_rng(0)
    requests = []
    for i in range(32):
        n = int(rng.integers(1, 6))
        kw = dict(sampler=["ddim", "ancestral", "dpm_solver++", "heun"][i % 4], num_steps=int(rng.integers(3, 30)), seed=i)
        if i % 4 == 1:
            kw.update(labels=[i % 10])
        if i % 4 == 2:
            kw.update(labels=list(rng.integers(0, 10, n)), guidance_scale=2.5)
        requests.append((n, kw))
    before = client.status()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda r: client.sample(r[0], **r[1]), requests))
    after = client.status()
    assert after.requests_completed - before.requests_completed == 32
    # co-batching happened: far fewer step calls than the sum of the requests' steps
    assert after.steps_run - before.steps_run < sum(kw["num_steps"] for _, kw in requests) * 0.75
    for (n, kw), x in zip(requests, together):
        assert x.shape == (n, 8, 8, 1) and x.dtype == np.float32
        assert np.all(np.isfinite(x)) and x.min() >= -1 and x.max() <= 1
    for (n, kw), x in zip(requests[:8], together[:8]):
        np.testing.assert_allclose(client.sample(n, **kw), x, atol=1e-6)


def test_stream_and_png_outputs(client):
    whole = client.sample(20, sampler="ddim", num_steps=5, seed=3)
    seen = np.zeros(20, int)
    batches = 0
    for indices, x in client.sample_stream(20, sampler="ddim", num_steps=5, seed=3):
        np.testing.assert_array_equal(x, whole[indices])
        seen[indices] += 1
        batches += 1
    assert batches >= 20 // SLOTS and np.all(seen == 1)
    png = client.sample(4, sampler="ddim", num_steps=5, seed=3, output="png")
    assert png.dtype == np.uint8 and png.shape == (4, 8, 8, 1)
    np.testing.assert_array_equal(png, ((whole[:4] + 1) / 2 * 255 + 0.5).astype(np.uint8))


BAD = [
    (dict(num_samples=-3), "num_samples"),
    (dict(num_samples=0), "num_samples"),
    (dict(num_samples=10**6), "num_samples"),
    (dict(sampler="heunn"), "sampler"),
    (dict(num_steps=-1), "num_steps"),
    (dict(num_steps=1001), "num_steps"),
    (dict(sampler="heun", num_steps=1), "num_steps"),
    (dict(labels=[3], guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_scale=2.0), "guidance_scale"),
    (dict(labels=[10]), "labels"),
    (dict(labels=[-2]), "labels"),
    (dict(labels=[1, 2]), "labels"),
    (dict(output=7), "output"),
    (dict(num_samples=300), "SampleStream"),  # 300 float32 samples > the 64 KiB message limit
    (dict(sampler="ode"), "offline-only"),
    (dict(sampler="dpm_solver++", options={"eta": 1.0}), "options"),
    (dict(sampler="heun", options={"s_churn": 10.0}), "s_churn"),  # ddpm: no churn (no inverse noise level)
    (dict(sampler="ddim", options={"eta": -1.0}), "eta"),
]


@pytest.mark.parametrize("fields,named", BAD, ids=[f"{list(f)[0]}={list(f.values())[0]}" for f, _ in BAD])
def test_bad_input_is_invalid_argument(client, fields, named):
    req = pb.SampleRequest(num_samples=4, num_steps=3)
    for k, v in fields.items():
        if k == "labels":
            req.labels.extend(v)
        elif k == "options":
            req.options.update(v)
        else:
            setattr(req, k, v)
    code, details = _code(lambda: client.stub.Sample(req, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and named in details
    assert client.health() == "SERVING"


def test_big_request_streams_under_the_message_limit(client):
    got = sum(len(idx) for idx, _ in client.sample_stream(300, num_steps=2))
    assert got == 300 and client.health() == "SERVING"


def _wait_for(cond, timeout=30.0, why=lambda: ""):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"condition not reached {why()}"
        time.sleep(0.05)


def test_cancel_and_deadline_free_their_slots(client):
    base = client.status()
    call = client.stub.Sample.future(Client.request(SLOTS, num_steps=1000), timeout=120)
    _wait_for(lambda: client.status().busy_slots == SLOTS)
    call.cancel()
    _wait_for(lambda: client.status().busy_slots == 0, 10)
    assert client.status().requests_cancelled == base.requests_cancelled + 1
    code, _ = _code(lambda: client.sample(SLOTS, num_steps=1000, timeout=0.5))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_for(lambda: client.status().busy_slots == 0, 10)
    assert client.sample(2, num_steps=3).shape == (2, 8, 8, 1)


def test_full_queue_is_resource_exhausted(client):
    """max_queued_requests=40 and 8 slots: of 60 long requests at once, 8 run, 40 queue and the
    rest are refused at once; cancelling them all leaves the server idle and healthy."""
    calls = [client.stub.Sample.future(Client.request(1, num_steps=1000, seed=i), timeout=120) for i in range(60)]
    _wait_for(lambda: client.status().queued_requests >= 40 - 4, 10)
    time.sleep(0.5)
    refused = [c for c in calls if c.done() and c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert 60 - 40 - SLOTS <= len(refused) <= 60 - 40
    assert "queue is full" in refused[0].details()
    for call in calls:
        call.cancel()
    _wait_for(lambda: client.status().busy_slots == 0 and client.status().queued_requests == 0, 15)
    assert client.health() == "SERVING" and client.sample(1, num_steps=2).shape == (1, 8, 8, 1)


def test_client_cli_writes_a_grid(server, tmp_path):
    out = tmp_path / "grid.png"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffjax",
            "client",
            "sample",
            "--addr",
            server.addr,
            "--num",
            "16",
            "--steps",
            "5",
            "--labels",
            "7",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert np.load(tmp_path / "grid.npz")["samples"].shape == (16, 8, 8, 1)
    from PIL import Image

    assert Image.open(out).size[0] > 8 * 4
    bad = subprocess.run(
        [sys.executable, "-m", "diffjax", "client", "sample", "--addr", server.addr, "--num", "1000000"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "num_samples" in bad.stderr


def test_sigterm_drains_in_flight_work(server, client):
    """Runs last on the module server: a request in flight when SIGTERM arrives still completes."""
    call = client.stub.Sample.future(Client.request(SLOTS, num_steps=300, seed=1), timeout=120)
    _wait_for(lambda: client.status().busy_slots == SLOTS)
    server.proc.send_signal(15)
    response = call.result(timeout=60)
    assert response.samples.shape == [SLOTS, 8, 8, 1]
    assert server.proc.wait(60) == 0
    assert any("draining" in line for line in server.lines)


def test_tls_and_reload_of_a_newer_checkpoint(tmp_path, workdir):
    """A TLS server (self-signed cert for 127.0.0.1) picks up a checkpoint trained after it started."""
    import shutil

    from diffjax import sample

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    served = tmp_path / "wd"
    shutil.copytree(workdir, served)
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    s = ServerProcess(served, f"--tls_cert={cert}", f"--tls_key={key}", "--reload_s=0.5")
    try:
        with Client(s.addr, timeout=60, root_certificates=cert.read_bytes()) as c:
            first = c.sample(3, num_steps=4, seed=5)
            assert c.model_info().checkpoint_step == 2
            with Client(s.addr, timeout=5) as plain:  # plaintext to a TLS port fails
                assert _code(lambda: plain.model_info())[0] == grpc.StatusCode.UNAVAILABLE
            _train(served, "--config.training.n_iters=4", "--config.training.ema_rate=0.0", "--config.optim.warmup=0")
            _wait_for(lambda: c.status().checkpoint_step == 4, 60, lambda: "".join(s.lines))
            assert c.status().reloads == 1 and c.model_info().checkpoint_step == 4
            response = c.sample_response(3, sampler="ddim", num_steps=4, seed=5)
            assert response.checkpoint_step == 4
            config, graphdef, rest, process, state, step = sample.load_workdir(str(served))
            want = sample.generate(config, graphdef, rest, process, state["ema"], 3, sampler="ddim", steps=4, seed=5)
            assert step == 4
            np.testing.assert_allclose(np.frombuffer(response.samples.data, "<f4").reshape(first.shape), want, atol=2e-4)
    finally:
        s.stop()


@pytest.mark.parametrize("admission", ["fifo", "fair"])
def test_admission_policy_with_a_huge_request_ahead(admission):
    """In-process Scheduler, 4 slots: a 40-sample request queued before a 1-sample one. FIFO runs
    the small one only once every sample of the big one has a slot; 'fair' caps the big one's
    share while the small one waits, so it finishes in the first wave."""
    import jax
    from flax import nnx

    from diffjax import models, trainer
    from diffjax.info import load_config
    from diffjax.serving.engine import Engine
    from diffjax.serving.scheduler import Job, Scheduler, wait_events

    config = load_config(*config_file_and_overrides(TINY))
    graphdef, params, rest = nnx.split(models.create(config.model, 0), nnx.Param, ...)
    process = trainer.build_process(config)
    den = trainer.network_denoiser(graphdef, rest, process, config, params)
    scheduler = Scheduler(
        Engine(den, process, (8, 8, 1), batch_slots=4, devices=jax.devices()[:1]), checkpoint_step=0, admission=admission
    )
    labels = lambda n: np.full(n, -1, np.int32)
    big = scheduler.submit(Job(40, "ddim", 5, 0, labels(40), None))
    small = scheduler.submit(Job(1, "ddim", 5, 1, labels(1), None))
    scheduler.start()
    try:
        assert [e[0] for e in wait_events(small, lambda: True)] == ["batch", "done"]
        big_done_before_small = big.finished
        events = list(wait_events(big, lambda: True))
        assert events[-1] == ("done",) and big.finished == 40
    finally:
        scheduler.shutdown()
    if admission == "fifo":
        assert big_done_before_small >= 36  # the small request's wave came after the big one's last
    else:
        assert big_done_before_small <= 4  # finished alongside the big request's first wave
    with pytest.raises(ValueError, match="admission must be one of"):
        Scheduler(scheduler.engine, checkpoint_step=0, admission="lifo")


def test_engine_clips_x0_as_the_offline_sampler():
    """sampling.clip_x0 (DDPM's clip_denoised): the engine's DDIM / ancestral slots clip their x0
    estimate as samplers.ddim(clip_x0=...) does (in-process Scheduler; an x0 denoiser 1.5 tanh(x)
    whose estimates leave [-1, 1] in part, so clipping changes the samples without saturating them)."""
    import jax

    from diffjax import denoiser, processes, samplers
    from diffjax.serving.engine import Engine
    from diffjax.serving.scheduler import Job, Scheduler, wait_events

    process = processes.get("ddpm", num_scales=100)
    den = denoiser.from_fn(lambda x, t, cond: 1.5 * jax.numpy.tanh(x), prediction="x0")
    clip = (-1.0, 1.0)
    scheduler = Scheduler(
        Engine(den, process, (4, 4, 1), batch_slots=4, clip_x0=clip, devices=jax.devices()[:1]), checkpoint_step=0
    )
    labels = np.full(3, -1, np.int32)
    scheduler.start()
    try:
        for name in ("ddim", "ancestral"):
            job = scheduler.submit(Job(3, name, 6, 7, labels, None))
            got = np.zeros((3, 4, 4, 1), np.float32)
            for event in wait_events(job, lambda: True):
                if event[0] == "batch":
                    got[event[1]] = event[2]
            want, _ = samplers.sample(name, den, process, jax.random.PRNGKey(7), (3, 4, 4, 1), 6, clip_x0=clip)
            unclipped, _ = samplers.sample(name, den, process, jax.random.PRNGKey(7), (3, 4, 4, 1), 6)
            np.testing.assert_allclose(got, want, atol=2e-4, err_msg=name)
            assert np.abs(np.asarray(want)).max() <= 1.0 < np.abs(np.asarray(unclipped)).max(), name
            assert 0.1 < np.mean(np.abs(np.asarray(want)) < 0.999), name  # not saturated
    finally:
        scheduler.shutdown()


def test_second_sample_reads_the_compilation_cache(workdir, tmp_path):
    """diffjax.compile_cache: the first `diffjax sample` writes compiled programs to
    $DIFFJAX_COMPILATION_CACHE, a second one loads them (JAX logs the cache hits) and draws the same
    samples; 'off' reads nothing."""
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "diffjax", "sample", f"--workdir={workdir}", "--num=4", "--steps=4"]

    def sample(out, cache_value):
        env = dict(_env(), DIFFJAX_COMPILATION_CACHE=str(cache_value), JAX_DEBUG_LOG_MODULES="jax._src.compiler")
        res = subprocess.run([*cmd, f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        return np.load(str(out).replace(".png", ".npz"))["samples"], res.stderr

    first, _ = sample(tmp_path / "a.png", cache)
    assert cache.is_dir() and any(n.startswith("jit__run") for n in os.listdir(cache))
    second, log = sample(tmp_path / "b.png", cache)
    np.testing.assert_array_equal(first, second)
    assert "compilation cache hit for 'jit__run'" in log.lower()
    _, log = sample(tmp_path / "c.png", "off")
    assert "cache hit" not in log.lower()


@pytest.fixture(scope="module")
def toy_workdir(tmp_path_factory):
    """The 8-Gaussians MLP on the VP process after 2 steps."""
    from tiny_configs import TOY

    toy = tmp_path_factory.mktemp("toy") / "w"
    _train(toy, "--config.training.n_iters=2", base=TOY)
    return toy


def test_restarts_compile_the_same_engine_program(toy_workdir, tmp_path):
    """The engine's step is one program in every process: three starts of the server on one workdir
    (a continuous process: its samplers use three prediction kinds) under different string-hash
    seeds (PYTHONHASHSEED: a set's iteration order changes with it) leave one `jit__step` entry in
    the compilation cache, and the second and third starts read it."""
    cache = tmp_path / "cache"
    logs = []
    for seed in ("1", "2", "3"):
        env = dict(
            _env(),
            PYTHONHASHSEED=seed,
            DIFFJAX_COMPILATION_CACHE=str(cache),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",  # cache every program, however fast it compiles here
            JAX_DEBUG_LOG_MODULES="jax._src.compiler",
        )
        server = subprocess_server.ServerProcess(toy_workdir, f"--batch_slots={SLOTS}", env=env, cwd=ROOT, timeout=240)
        server.stop()
        logs.append("\n".join(server.lines).lower())
    assert len([n for n in os.listdir(cache) if n.startswith("jit__step-")]) == 1, sorted(os.listdir(cache))
    assert "compilation cache hit for 'jit__step'" not in logs[0]
    assert all("compilation cache hit for 'jit__step'" in log for log in logs[1:])


def test_toy_samples_are_clipped_by_neither_the_cli_nor_the_server(toy_workdir, tmp_path):
    """Non-image data (the 8-Gaussians' 2-D points, not 8-bit pixels): `diffjax sample` and the
    server's FLOAT32 output both leave the samples unclipped, so the same seed gives the same numbers."""
    toy = toy_workdir
    out = tmp_path / "toy.png"
    cmd = ["sample", f"--workdir={toy}", "--num=6", "--sampler=ddim", "--steps=4", "--seed=3", f"--out={out}"]
    res = subprocess.run(
        [sys.executable, "-m", "diffjax", *cmd], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    cli = np.load(tmp_path / "toy.npz")["samples"]
    assert cli.shape == (6, 2) and np.abs(cli).max() > 1.5  # a 2-step network: far outside [-1, 1]
    with ServerProcess(toy, "--reload_s=0") as s, Client(s.addr, timeout=120) as c:
        assert list(c.model_info().sample_shape) == [2]
        served = c.sample(6, sampler="ddim", num_steps=4, seed=3)
    np.testing.assert_allclose(served, cli, rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("variance", ["fixed_large", "learned"])
def test_engine_ancestral_variance_as_the_offline_sampler(variance):
    """sampling.variance reaches the served ancestral stepper: with fixed_large (or learned, from a
    denoiser with a variance output v varying per dimension) the engine's slots equal
    samplers.sample('ancestral', variance=...) (same key), which differs from the default fixed_small;
    two requests co-batched in the slots equal each alone."""
    import jax
    import ml_collections

    from diffjax import denoiser, processes, samplers
    from diffjax.serving.engine import Engine, served_steppers
    from diffjax.serving.scheduler import Job, Scheduler, wait_events

    process = processes.get("ddpm", num_scales=100)
    if variance == "learned":  # v in (0, 1), per dimension: between beta-tilde and beta
        fn = lambda x, t, cond: (0.5 * jax.numpy.tanh(x), jax.nn.sigmoid(3.0 * x))  # noqa: E731
        den = denoiser.from_fn(fn, prediction="x0", learned_variance=True)
    else:
        den = denoiser.from_fn(lambda x, t, cond: 0.5 * jax.numpy.tanh(x), prediction="x0")
    sampling = ml_collections.ConfigDict({"variance": variance})
    engine = Engine(
        den, process, (4, 4, 1), batch_slots=8, served=served_steppers(sampling, None, process), devices=jax.devices()[:1]
    )
    scheduler = Scheduler(engine, checkpoint_step=0)
    labels = np.full(3, -1, np.int32)
    scheduler.start()
    try:
        jobs = [scheduler.submit(Job(3, "ancestral", 6, seed, labels, None)) for seed in (7, 8)]  # co-batched
        for job, seed in zip(jobs, (7, 8)):
            got = np.zeros((3, 4, 4, 1), np.float32)
            for event in wait_events(job, lambda: True):
                if event[0] == "batch":
                    got[event[1]] = event[2]
            key = jax.random.PRNGKey(seed)
            want, _ = samplers.sample("ancestral", den, process, key, (3, 4, 4, 1), 6, variance=variance)
            small, _ = samplers.sample("ancestral", den, process, key, (3, 4, 4, 1), 6)
            np.testing.assert_allclose(got, want, atol=2e-4)
            assert np.abs(np.asarray(want) - np.asarray(small)).max() > 1e-2  # the variance matters here
    finally:
        scheduler.shutdown()
