"""The HTTP/JSON API (`diffjax serve --http_port`) as users call it: a real server process on
loopback, `curl` as the client, the gRPC API on the same server as the oracle."""

import base64
import io
import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
from tiny_configs import DIGITS, one_device_env, train_workdir

from diffjax.serving import Client, subprocess_server
from diffjax.serving.client import tensor_to_numpy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOTS, QUEUE, MAX_MESSAGE = 8, 4, 65536
# A tiny class-conditional digits UNet trained for 2 steps (as tests/test_server.py).
TINY = [*DIGITS, "--config.model.num_classes=10", "--config.training.label_dropout=0.2"]
CURL = shutil.which("curl")
pytestmark = pytest.mark.skipif(CURL is None, reason="curl not installed")


_env = one_device_env


class HttpServer:
    """`diffjax serve --http_port=0` in a child process; `url` read from its log line."""

    def __init__(self, workdir, *flags):
        self.s = subprocess_server.ServerProcess(
            workdir, f"--batch_slots={SLOTS}", "--reload_s=0", "--http_port=0", *flags, env=_env(), cwd=ROOT, timeout=240
        )
        end = time.monotonic() + 30
        while not any("HTTP/JSON API on" in line for line in self.s.lines):
            assert time.monotonic() < end and self.s.proc.poll() is None, "".join(self.s.lines)
            time.sleep(0.05)
        line = next(line for line in self.s.lines if "HTTP/JSON API on" in line)
        self.url = line.split(" on ", 1)[1].split()[0]
        self.addr, self.proc = self.s.addr, self.s.proc


def curl(url, *args, body=None, timeout=120):
    """(HTTP status, parsed JSON or raw text) of one curl call; body: bytes or a JSON-able object."""
    cmd = [CURL, "-sS", "--noproxy", "*", "--max-time", str(timeout), "-w", "\n@@%{http_code}", *args]
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
    res = subprocess.run([*cmd, url], input=body, capture_output=True, timeout=timeout + 10)
    text, _, code = res.stdout.decode().rpartition("\n@@")
    try:
        return int(code), json.loads(text)
    except ValueError:
        return int(code or 0), text


def _wait_for(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("served_http")
    train_workdir(path, *TINY)
    return path


@pytest.fixture(scope="module")
def server(workdir):
    s = HttpServer(workdir, f"--max_queued_requests={QUEUE}", f"--max_message_bytes={MAX_MESSAGE}")
    yield s
    s.s.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.addr, timeout=120) as c:
        yield c


def _sample_url(server, name="default", verb="sample"):
    return f"{server.url}/v1/models/{name}:{verb}"


def test_models_and_health(server, client):
    assert curl(f"{server.url}/healthz") == (200, {"status": "SERVING"})
    status, listed = curl(f"{server.url}/v1/models")
    info = client.model_info()
    want = {f.name: (list(v) if not isinstance(v, (int, float, str)) else v) for f, v in info.ListFields()}
    want.pop("config_json")
    assert status == 200 and [m["name"] for m in listed["models"]] == ["default"]
    assert {k: listed["models"][0][k] for k in want} == want and listed["models"][0]["sample_shape"] == [8, 8, 1]
    status, one = curl(f"{server.url}/v1/models/default")
    assert status == 200 and one["config"] == json.loads(info.config_json)
    assert {k: v for k, v in one.items() if k != "config"} == listed["models"][0]
    status, err = curl(f"{server.url}/v1/models/nope")
    assert status == 404 and err["error"]["code"] == "NOT_FOUND" and "'nope'" in err["error"]["message"]


REQUEST = dict(num_samples=5, sampler="ddim", num_steps=12, seed=7, labels=[0, 1, 2, 3, 4], options={"eta": 0.5})


def test_samples_equal_the_grpc_samples(server, client):
    want = client.sample_response(**REQUEST)
    x = tensor_to_numpy(want.samples)
    other = tensor_to_numpy(client.sample_response(**{**REQUEST, "seed": 8}).samples)
    assert np.abs(other - x).max() > 0.5  # the comparisons below can fail
    status, got = curl(_sample_url(server), body=REQUEST)
    assert status == 200 and got["shape"] == [5, 8, 8, 1] and got["indices"] == list(range(5))
    assert (got["checkpoint_step"], got["nfe"]) == (want.checkpoint_step, want.nfe) == (2, 12)
    np.testing.assert_allclose(np.asarray(got["samples"], np.float32), x, atol=1e-6)
    status, b64 = curl(_sample_url(server), body={**REQUEST, "encoding": "b64"})
    assert status == 200 and b64["shape"] == [5, 8, 8, 1]
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(b64["samples"]), "<f4").reshape(5, 8, 8, 1), x, atol=1e-6)
    # heun with classifier-free guidance
    heun = dict(num_samples=3, sampler="heun", num_steps=6, seed=3, labels=[4], guidance_scale=2.0)
    status, got = curl(_sample_url(server), body=heun)
    want = client.sample_response(**heun)
    assert status == 200 and got["nfe"] == want.nfe == 11
    np.testing.assert_allclose(np.asarray(got["samples"], np.float32), tensor_to_numpy(want.samples), atol=1e-6)


def test_png_output(server, client):
    from PIL import Image

    status, got = curl(_sample_url(server), body={**REQUEST, "output": "png"})
    assert status == 200 and len(got["png"]) == 5 and "samples" not in got
    images = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(p)))) for p in got["png"]])
    assert images.shape == (5, 8, 8) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., None], client.sample(**REQUEST, output="png"))


def _ndjson(text):
    return [json.loads(line) for line in text.splitlines() if line]


def test_stream_gives_every_index_once(server, client, tmp_path):
    whole = client.sample(20, sampler="ddim", num_steps=5, seed=3)
    headers = tmp_path / "headers"
    body = dict(num_samples=20, sampler="ddim", num_steps=5, seed=3)
    for encoding in ("list", "b64"):
        status, text = curl(
            _sample_url(server, verb="sampleStream"), "-D", str(headers), body={**body, "encoding": encoding}
        )
        assert status == 200, text
        head = headers.read_text().lower()
        assert "content-type: application/x-ndjson" in head and "transfer-encoding: chunked" in head
        lines = _ndjson(text) if isinstance(text, str) else [text]
        assert len(lines) >= 20 // SLOTS
        seen = np.zeros(20, int)
        for line in lines:
            idx = line["indices"]
            x = line["samples"]
            x = np.frombuffer(base64.b64decode(x), "<f4") if encoding == "b64" else np.asarray(x, np.float32)
            np.testing.assert_allclose(x.reshape(line["shape"]), whole[idx], atol=1e-6)
            assert line["checkpoint_step"] == 2 and line["shape"] == [len(idx), 8, 8, 1]
            seen[idx] += 1
        assert np.all(seen == 1)


def _fill_slots(client, n=SLOTS - 1):
    """A long gRPC request holding n slots (1999 evaluations)."""
    call = client.stub.Sample.future(Client.request(n, sampler="heun", num_steps=1000, seed=99), timeout=120)
    _wait_for(lambda: client.status().busy_slots == n)
    return call


def _idle(client):
    _wait_for(lambda: client.status().busy_slots == 0 and client.status().queued_requests == 0, 20)


def test_deadlines_are_504_and_a_stream_error_ends_the_stream(server, client):
    long = dict(num_samples=SLOTS, sampler="heun", num_steps=1000)  # 1999 evaluations
    status, err = curl(_sample_url(server) + "?timeout=0.2", body=long)
    assert status == 504 and err["error"]["code"] == "DEADLINE_EXCEEDED"
    _idle(client)
    # 7 slots held by a 1999-evaluation request: the stream's 40 samples of 20 steps take the last
    # slot one after another (800 steps), so a deadline of 400 steps' time passes after its first batches
    # (20 steps: a 20x margin for load swings), before its last
    held = _fill_slots(client)
    steps, t0 = client.status().steps_run, time.perf_counter()
    _wait_for(lambda: client.status().steps_run >= steps + 20)
    step_s = (time.perf_counter() - t0) / (client.status().steps_run - steps)
    status, text = curl(
        _sample_url(server, verb="sampleStream"),
        "-H",
        f"X-Deadline-Seconds: {400 * step_s:.3f}",
        body=dict(num_samples=40, num_steps=20),
    )
    lines = [text] if isinstance(text, dict) else _ndjson(text)  # one JSON object: no batch came first
    assert status == 200 and "indices" in lines[0], (step_s, text)
    assert lines[-1]["error"]["code"] == "DEADLINE_EXCEEDED" and len(lines) < 40, (step_s, lines[-1])
    held.cancel()
    _idle(client)


def test_a_client_that_disconnects_frees_its_slots(server, client):
    before = client.status().requests_cancelled
    body = json.dumps(dict(num_samples=SLOTS, sampler="heun", num_steps=1000))
    proc = subprocess.Popen([CURL, "-s", "--noproxy", "*", "--data-binary", body, _sample_url(server)])
    _wait_for(lambda: client.status().busy_slots == SLOTS)
    proc.kill()
    proc.wait()
    _idle(client)  # freed long before its 1999 evaluations
    assert client.status().requests_cancelled == before + 1


def test_full_queue_is_429(server, client):
    long = _fill_slots(client, SLOTS)
    queued = [client.stub.Sample.future(Client.request(1, num_steps=1000, seed=i), timeout=120) for i in range(QUEUE)]
    _wait_for(lambda: client.status().queued_requests == QUEUE)
    for verb in ("sample", "sampleStream"):
        status, err = curl(_sample_url(server, verb=verb), body=dict(num_samples=1, num_steps=2))
        assert status == 429 and err["error"]["code"] == "RESOURCE_EXHAUSTED" and "queue is full" in err["error"]["message"]
    for call in (long, *queued):
        call.cancel()
    _idle(client)


BAD = [
    # (curl arguments, body, HTTP status, the word the message names)
    ((), {"num_samples": "4"}, 400, "num_samples"),
    ((), {"num_samples": 4, "seed": 1.5}, 400, "seed"),
    ((), {"num_samples": 4, "seed": -1}, 400, "seed"),
    ((), {"num_samples": 4, "seed": 2**32}, 400, "seed"),
    ((), {"num_samples": 2**31}, 400, "num_samples"),
    ((), {"num_samples": True}, 400, "num_samples"),
    ((), {"num_samples": 4, "options": [1]}, 400, "options"),
    ((), {"num_samples": 4, "options": {"eta": "x"}}, 400, "eta"),
    ((), {"num_samples": 4, "labels": 3}, 400, "labels"),
    ((), {"num_samples": 4, "labels": [1.5]}, 400, "labels"),
    ((), {"num_samples": 4, "output": "JPEG"}, 400, "output"),
    ((), {"num_samples": 4, "encoding": "hex"}, 400, "encoding"),
    ((), {"num_samples": 4, "colour": 1}, 400, "colour"),
    ((), {"num_samples": 4, "model": "default"}, 400, "model"),
    ((), [1, 2], 400, "JSON object"),
    ((), b'{"num_samples": 4', 400, "not valid JSON"),
    ((), b"\xff\xfe\x00garbage", 400, "not valid JSON"),
    ((), b"[" * 30000, 400, "not valid JSON"),  # deeper than the parser recurses
    # the server's own validation, as for gRPC clients
    ((), {"num_samples": 0}, 400, "num_samples"),
    ((), {"num_samples": 4, "sampler": "heunn"}, 400, "sampler"),
    ((), {"num_samples": 4, "labels": [10]}, 400, "labels"),
    ((), {"num_samples": 4, "num_steps": 1001}, 400, "num_steps"),
    ((), {"num_samples": 4, "options": {"eta": float("nan")}}, 400, "eta"),
    ((), {"num_samples": 300}, 400, "SampleStream"),  # over the 64 KiB message limit
    # HTTP framing, query and headers
    (("-H", "Content-Length:"), {"num_samples": 1}, 411, "Content-Length"),
    (("-H", "Content-Length: 12x"), {"num_samples": 1}, 400, "Content-Length"),
    (("-H", "Transfer-Encoding: chunked"), {"num_samples": 1}, 411, "Content-Length"),
    ((), b" " * (MAX_MESSAGE + 1), 413, "--max_message_bytes"),
    (("-H", "X-Deadline-Seconds: nan"), {"num_samples": 1}, 400, "X-Deadline-Seconds"),
    (("-X", "PUT"), {"num_samples": 1}, 405, "POST"),
    (("-X", "DELETE"), None, 405, "POST"),
]


@pytest.mark.parametrize("args,body,status,named", BAD, ids=[f"{i}-{case[3]}" for i, case in enumerate(BAD)])
def test_bad_requests_are_4xx_naming_the_problem(server, args, body, status, named):
    got, err = curl(_sample_url(server), *args, body=body)
    assert got == status and named in err["error"]["message"], err
    assert err["error"]["code"] == {400: "INVALID_ARGUMENT"}.get(status, err["error"]["code"])


@pytest.mark.parametrize(
    "path,args,status,named",
    [
        ("/v1/models/nope:sample", ("--data-binary", '{"num_samples": 1}'), 404, "'nope'"),
        ("/v1/models/nope:sampleStream", ("--data-binary", '{"num_samples": 1}'), 404, "'nope'"),
        ("/v1/models/default:fly", ("--data-binary", "{}"), 404, "no endpoint"),
        ("/v2/anything", (), 404, "no endpoint"),
        ("/healthz", ("-X", "POST"), 405, "GET"),
        ("/v1/models", ("-X", "PATCH"), 405, "GET"),
        ("/v1/models?timeout=abc", (), 400, "timeout"),
        ("/v1/models/default:sample?timeout=-1", ("--data-binary", '{"num_samples": 1}'), 400, "timeout"),
        ("/v1/models?verbose=1", (), 400, "verbose"),
    ],
)
def test_unknown_paths_methods_and_queries(server, path, args, status, named):
    got, err = curl(server.url + path, *args)
    assert got == status and named in err["error"]["message"], err


def _fuzz_cases(rng, n):
    """n malformed requests: (curl args, body bytes or None, the words one of which the error names)."""
    ints = {"num_samples": (-(2**31), 2**31 - 1), "num_steps": (-(2**31), 2**31 - 1), "seed": (0, 2**32 - 1)}
    junk = ["x", 1.5, -0.0, True, None, [1], {"a": 1}, "", 1e300]
    cases = []
    for _ in range(n):
        body = dict(num_samples=int(rng.integers(1, 4)), num_steps=int(rng.integers(1, 5)), seed=int(rng.integers(0, 99)))
        kind = int(rng.integers(0, 9))
        if kind == 0:  # a wrong type for a typed field
            field = str(rng.choice([*ints, "sampler", "labels", "options", "output", "encoding", "guidance_scale"]))
            value = junk[int(rng.integers(len(junk)))]
            if field in ("sampler", "output", "encoding") and isinstance(value, str) or field == "guidance_scale":
                value = [value]  # a string is a sampler's type; a guidance scale of any number is typed right
            if field == "labels" and value == [1]:
                value = [value]  # [1] would be valid labels
            body[field] = value
            named = [field]
        elif kind == 1:  # an integer outside the protobuf range (or non-positive for num_samples)
            field = str(rng.choice(list(ints)))
            low, high = ints[field]
            body[field] = int(rng.choice([low - 1 - int(rng.integers(0, 2**40)), high + 1 + int(rng.integers(0, 2**40))]))
            named = [field]
        elif kind == 2:  # values the server refuses
            field = str(rng.choice(["num_samples", "num_steps", "labels", "sampler"]))
            body[field] = {
                "num_samples": -int(rng.integers(0, 2**31)),
                "num_steps": int(rng.integers(1001, 2**31)),
                "labels": [int(rng.integers(10, 2**31))],
                "sampler": "s" + str(rng.integers(0, 10**6)),
            }[field]
            named = [field]
        elif kind == 3:  # an unknown field
            field = "f" + str(rng.integers(0, 10**6))
            body[field] = 1
            named = [field]
        elif kind == 4:  # truncated / corrupted JSON
            raw = json.dumps(body).encode()
            cut = int(rng.integers(1, len(raw)))
            cases.append(((), raw[:cut], ["not valid JSON"]))
            continue
        elif kind == 5:  # random bytes
            cases.append(((), rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes(), ["JSON"]))
            continue
        elif kind == 6:  # an unknown path or verb
            cases.append(((f"/v1/models/default:v{rng.integers(0, 99)}",), b"{}", ["no endpoint"]))
            continue
        elif kind == 7:  # a wrong method
            method = str(rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"]))
            cases.append((("-X", method), json.dumps(body).encode(), ["POST"]))
            continue
        else:  # a bad Content-Length
            value = str(rng.choice(["-1", "1e3", "0x10", "", "4 4", str(MAX_MESSAGE + int(rng.integers(1, 10**9)))]))
            header = ("-H", f"Content-Length:{' ' + value if value else ''}")
            cases.append((header, json.dumps(body).encode(), ["Content-Length", "--max_message_bytes"]))
            continue
        cases.append(((), json.dumps(body).encode(), named))
    return cases


def test_fuzz_answers_4xx_naming_the_problem(server, client, tmp_path):
    """200 seeded malformed requests in one curl run (--next): each is a 4xx with a JSON error that
    names the field or the problem, and the server stays healthy."""
    cases = _fuzz_cases(np.random.default_rng(0), 200)
    cmd = [CURL]
    for i, (args, body, _) in enumerate(cases):
        path = args[0] if args and args[0].startswith("/") else "/v1/models/default:sample"
        args = args[1:] if args and args[0].startswith("/") else args
        (tmp_path / f"{i}").write_bytes(body)
        cmd += [*(["--next"] if i else []), "-sS", "--noproxy", "*", "--max-time", "60", "-w", "\n@@%{http_code}@@\n"]
        cmd += [*args, "--data-binary", f"@{tmp_path / str(i)}", server.url + path]
    res = subprocess.run(cmd, capture_output=True, timeout=240)
    parts = res.stdout.decode().split("@@\n")[:-1]
    assert len(parts) == len(cases), res.stderr.decode()[-2000:]
    for (args, body, named), part in zip(cases, parts):
        text, _, code = part.rpartition("\n@@")
        err = json.loads(text)["error"]
        assert 400 <= int(code) < 500 and any(n in err["message"] for n in named), (args, body[:80], code, err)
    assert curl(f"{server.url}/healthz") == (200, {"status": "SERVING"})
    status, got = curl(_sample_url(server), body=dict(num_samples=2, num_steps=3))
    assert status == 200 and np.asarray(got["samples"]).shape == (2, 8, 8, 1)
    assert client.status().busy_slots == 0


def test_https_and_503_while_draining(workdir, tmp_path):
    """--tls_cert / --tls_key: the API is HTTPS with the same certificate (named for 'localhost'
    only, so the gateway's own TLS channel to 127.0.0.1 overrides the name); samples equal gRPC's
    over TLS. After SIGTERM, while a request drains, the API answers 503 and /healthz 503."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    s = HttpServer(workdir, f"--tls_cert={cert}", f"--tls_key={key}")
    try:
        port = int(s.url.rsplit(":", 1)[1])
        assert s.url.startswith("https://")
        url = f"https://localhost:{port}"
        tls = ("--cacert", str(cert), "--resolve", f"localhost:{port}:127.0.0.1")
        assert curl(f"{url}/healthz", *tls) == (200, {"status": "SERVING"})
        with Client(f"localhost:{s.s.port}", timeout=60, root_certificates=cert.read_bytes()) as c:
            status, got = curl(f"{url}/v1/models/default:sample", *tls, body=REQUEST)
            assert status == 200
            np.testing.assert_allclose(np.asarray(got["samples"], np.float32), c.sample(**REQUEST), atol=1e-6)
            assert curl(f"{url}/healthz", "--resolve", f"localhost:{port}:127.0.0.1")[0] == 0  # unknown CA
            assert curl(f"http://127.0.0.1:{port}/healthz")[0] == 0  # plain HTTP to the HTTPS port
            call = c.stub.Sample.future(Client.request(SLOTS, num_steps=300, seed=1), timeout=120)
            _wait_for(lambda: c.status().busy_slots == SLOTS)
            s.proc.send_signal(15)
            _wait_for(lambda: curl(f"{url}/healthz", *tls)[0] == 503, 20)
            status, err = curl(f"{url}/v1/models/default:sample", *tls, body=dict(num_samples=1, num_steps=2))
            assert status == 503 and err["error"]["code"] == "UNAVAILABLE", err
            assert call.result(timeout=60).samples.shape == [SLOTS, 8, 8, 1]
        assert s.proc.wait(60) == 0
    finally:
        s.s.stop()
