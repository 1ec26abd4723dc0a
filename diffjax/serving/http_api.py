"""The HTTP/JSON API of `diffjax serve --http_port PORT`: a gateway inside the server process.

Every HTTP request becomes one call to the server's own gRPC port over a loopback channel (TLS when
the server has --tls_cert / --tls_key, with that certificate as the root), so validation,
scheduling and status codes are exactly the gRPC ones; gRPC statuses map to HTTP as
`http_json.STATUS`.

    POST /v1/models/{name}:sample        JSON SampleRequest fields -> {"samples", "shape", ...}
    POST /v1/models/{name}:sampleStream  the same -> application/x-ndjson, one line per SampleBatch
    GET  /v1/models, /v1/models/{name}   ModelInfo as JSON
    GET  /healthz                        200 {"status": "SERVING"} or 503

Deadline: the `X-Deadline-Seconds` header or the `timeout` query parameter (seconds; the smaller
when both), forwarded as the gRPC deadline. Bodies are capped at --max_message_bytes (413).
"""

from __future__ import annotations

import contextlib
import http
import http.server
import itertools
import json
import math
import os
import select
import socket
import socketserver
import ssl
import tempfile
import threading
from typing import Any, Callable, Iterator
from urllib.parse import parse_qsl, unquote, urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from diffjax.serving import sampling_pb2 as pb
from diffjax.serving import sampling_pb2_grpc as pb_grpc
from diffjax.serving.http_json import HttpError, bad, from_rpc, model_json, output_json, sample_request

ENDPOINTS = (
    "POST /v1/models/{name}:sample, POST /v1/models/{name}:sampleStream, GET /v1/models, GET /v1/models/{name}, GET /healthz"
)
MAX_TIMEOUT_S = 86400.0
INFO_TIMEOUT_S = 10.0  # the deadline of model / health look-ups without a client deadline
IDLE_TIMEOUT_S = 60.0  # socket timeout: an idle keep-alive connection, a stalled body or TLS handshake
DRAIN_BYTES = 1 << 20  # the most of an unread body dropped before closing (so the client reads the answer)


def route(path: str) -> tuple[str, str, str] | None:
    """A URL path -> (method, action, model name), None for an unknown path."""
    if path == "/healthz":
        return "GET", "health", ""
    if path == "/v1/models":
        return "GET", "models", ""
    prefix = "/v1/models/"
    if not path.startswith(prefix) or "/" in path[len(prefix) :]:
        return None
    name, action = unquote(path[len(prefix) :]), "model"
    for verb in ("sample", "sampleStream"):
        if name.endswith(":" + verb):
            name, action = name[: -len(verb) - 1], verb
    if not name or ":" in name and action == "model":
        return None
    return ("GET" if action == "model" else "POST"), action, name


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the client closed its end (a FIN is readable); data it pipelined does not count."""
    try:
        if not select.select([sock], [], [], 0)[0]:
            return False
        with socket.socket(fileno=os.dup(sock.fileno())) as raw:  # the TCP stream under TLS too
            return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, chunked streams
    server_version = "diffjax-http"
    default_request_version = "HTTP/1.0"  # a status line even on an unparsable request line
    timeout = IDLE_TIMEOUT_S
    server: "_HttpServer"

    def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def __getattr__(self, name: str) -> Callable[[], None]:
        if name.startswith("do_"):  # every other method: 405 on a known path, 404 elsewhere
            return self._dispatch
        raise AttributeError(name)

    # ---- framing ------------------------------------------------------------------------------
    def _send(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        self.send_response(status, "Client Closed Request" if status == 499 else None)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self._unread:  # a body we did not read: the connection cannot carry another request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        if self._unread:
            self._linger()

    def _linger(self) -> None:
        """After answering a request whose body was not read: stop writing, then drop what the client
        still sends (up to DRAIN_BYTES or 1 s), so that the close does not reset the answer away."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(1.0)
            left = DRAIN_BYTES
            while left > 0 and (chunk := self.connection.recv(min(left, 1 << 16))):
                left -= len(chunk)
        except OSError:
            pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, headers, version) as JSON too."""
        self._unread = True
        try:
            name = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND"}.get(code) or http.HTTPStatus(code).name
        except ValueError:
            name = "ERROR"
        self._send(code, HttpError(code, name, message or name).json())

    def handle_expect_100(self) -> bool:
        """Refuse a bad or oversized Content-Length before the client sends the body."""
        try:
            self._content_length()
        except HttpError as err:
            self._unread = True
            self._send(err.status, err.json())
            return False
        return super().handle_expect_100()

    def _content_length(self) -> int:
        if self.headers.get("Transfer-Encoding"):
            raise HttpError(411, "LENGTH_REQUIRED", "Transfer-Encoding bodies are not taken: send a Content-Length header")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise HttpError(411, "LENGTH_REQUIRED", "a POST needs a Content-Length header")
        value = values[0].strip()
        if len(set(v.strip() for v in values)) > 1 or not (value.isascii() and value.isdigit()):
            raise bad(f"Content-Length must be one non-negative integer, got {', '.join(values)[:40]!r}")
        n, limit = int(value), self.server.gateway.max_body_bytes
        if n > limit:
            raise HttpError(
                413, "PAYLOAD_TOO_LARGE", f"body of {n} bytes is over the limit of {limit} bytes (--max_message_bytes)"
            )
        return n

    def _body(self) -> Any:
        n = self._content_length()
        data = self.rfile.read(n)
        self._unread = False
        if len(data) < n:
            self.close_connection = True
            raise bad(f"the body ended after {len(data)} of Content-Length {n} bytes")
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as err:  # JSONDecodeError, bad UTF-8, a 5000-digit integer
            raise bad(f"the body is not valid JSON: {str(err)[:120]}") from None

    def _deadline(self, query: str) -> float | None:
        """X-Deadline-Seconds / ?timeout=: seconds, the smaller when both are given."""
        try:
            params = parse_qsl(query, keep_blank_values=True, max_num_fields=4)
        except ValueError:
            raise bad("too many query parameters; the API takes only timeout") from None
        given = []
        for key, value in params:
            if key != "timeout":
                raise bad(f"unknown query parameter {key[:40]!r}; the API takes only timeout (seconds)")
            given.append(("timeout", value))
        for value in self.headers.get_all("X-Deadline-Seconds") or []:
            given.append(("X-Deadline-Seconds", value))
        seconds = []
        for name, value in given:
            try:
                s = float(value)
            except ValueError:
                s = math.nan
            if not 0 < s <= MAX_TIMEOUT_S:
                raise bad(f"{name} must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {value[:40]!r}")
            seconds.append(s)
        return min(seconds) if seconds else None

    # ---- dispatch -----------------------------------------------------------------------------
    def _dispatch(self) -> None:
        length = self.headers.get("Content-Length")
        # a body may follow that this request will not read (a POST without Content-Length: its bytes
        # could be anything): then the answer closes the connection
        self._unread = bool(self.headers.get("Transfer-Encoding")) or (
            length.strip() != "0" if length is not None else self.command == "POST"
        )
        self._started = False  # response headers sent (a stream)
        answer: HttpError | None = None
        try:
            url = urlsplit(self.path)
            where = route(url.path)
            if where is None:
                raise HttpError(404, "NOT_FOUND", f"no endpoint at {url.path[:80]!r}; the API serves {ENDPOINTS}")
            method, action, name = where
            if self.command != method:
                raise HttpError(
                    405, "METHOD_NOT_ALLOWED", f"{url.path[:80]} takes {method}, not {self.command}", {"Allow": method}
                )
            deadline = self._deadline(url.query)
            getattr(self, "_" + action)(name, deadline)
        except HttpError as err:
            answer = err
        except grpc.RpcError as err:
            answer = from_rpc(err)
        except (OSError, grpc.FutureCancelledError):  # the client went away (or stalled past the timeout)
            self.close_connection = True
        except Exception as err:  # noqa: BLE001 - a gateway bug answers 500 and the server lives on
            self.server.gateway.log(f"diffjax serve: HTTP {self.command} {self.path[:80]}: {err!r}")
            answer = HttpError(500, "INTERNAL", f"gateway error: {err!r}"[:200])
        if answer is None:
            return
        if self._started:  # a stream already answered 200: nothing more can be said
            self.close_connection = True
            return
        try:
            self._send(answer.status, answer.json(), answer.headers)
        except OSError:
            self.close_connection = True

    @contextlib.contextmanager
    def _watch(self, call: grpc.Future) -> Iterator[None]:
        """Cancel the gRPC call (its slots) when the client disconnects; always cancelled on exit."""
        done = threading.Event()

        def poll() -> None:
            while not done.wait(0.25):
                if _peer_closed(self.connection):
                    call.cancel()
                    return

        threading.Thread(target=poll, daemon=True, name="diffjax-http-watch").start()
        try:
            yield
        finally:
            done.set()
            call.cancel()

    # ---- endpoints ----------------------------------------------------------------------------
    def _health(self, _name: str, deadline: float | None) -> None:
        g = self.server.gateway
        try:
            response = g.health.Check(health_pb2.HealthCheckRequest(), timeout=deadline or INFO_TIMEOUT_S)
        except grpc.RpcError as err:
            self._send(503, {"status": "NOT_SERVING", **from_rpc(err).json()})
            return
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        self._send(200 if status == "SERVING" else 503, {"status": status})

    def _models(self, _name: str, deadline: float | None) -> None:
        models = self.server.gateway.list_models(deadline)
        self._send(200, {"models": [model_json(m, m.name) for m in models]})

    def _model(self, name: str, deadline: float | None) -> None:
        g = self.server.gateway
        info = g.stub.GetModelInfo(pb.GetModelInfoRequest(model=name), timeout=deadline or INFO_TIMEOUT_S)
        self._send(200, model_json(info, name, config=True))

    def _sample(self, name: str, deadline: float | None) -> None:
        body = self._body()
        g = self.server.gateway
        request, encoding = sample_request(body, name)
        call = g.stub.Sample.future(request, timeout=deadline)
        with self._watch(call):
            response = call.result()
        out = output_json(response, encoding)
        n = len(response.png) or (response.samples.shape[0] if response.samples.shape else 0)
        self._send(200, {**out, "indices": list(range(n)), "checkpoint_step": response.checkpoint_step, "nfe": response.nfe})

    def _sampleStream(self, name: str, deadline: float | None) -> None:
        body = self._body()
        g = self.server.gateway
        request, encoding = sample_request(body, name)
        call = g.stub.SampleStream(request, timeout=deadline)
        with self._watch(call):
            first = next(call, None)  # an error before the first batch is the HTTP status
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._started = True
            try:
                for batch in itertools.chain([first] if first is not None else [], call):
                    line = {"indices": list(batch.indices), **output_json(batch, encoding)}
                    self._chunk({**line, "checkpoint_step": batch.checkpoint_step})
            except grpc.RpcError as err:
                self._chunk(from_rpc(err).json())
            self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, obj: dict) -> None:
        data = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


class _HttpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], gateway: "Gateway", ssl_context: ssl.SSLContext | None):
        self.gateway, self.ssl_context = gateway, ssl_context
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is None:
            return super().finish_request(request, client_address)
        request.settimeout(IDLE_TIMEOUT_S)
        try:  # the TLS handshake in this connection's thread, never in the accept loop
            conn = self.ssl_context.wrap_socket(request, server_side=True)
        except OSError:  # plain HTTP to the HTTPS port, a stalled or failed handshake
            return
        with conn:
            super().finish_request(conn, client_address)


def loopback_host(host: str) -> str:
    """The address the gateway dials for a server bound to `host` (a wildcard: this machine)."""
    host = host.strip("[]")
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def _tls_name(cert_pem: bytes, host: str) -> str | None:
    """A name the certificate is valid for when it does not name `host` (grpc.ssl_target_name_override)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ips, dns = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)], san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        ips, dns = [], []
    if host in ips or host in dns:
        return None
    names = dns or [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return names[0].replace("*", "x", 1) if names else None


class Gateway:
    """`Gateway(grpc_port, host=..., port=0).start()`: serves the HTTP API on `.port` until `.stop()`."""

    def __init__(
        self,
        grpc_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_bytes: int = 64 << 20,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        log: Callable[[str], None] = print,
    ):
        self.host, self.requested_port, self.log = host, port, log
        self.max_body_bytes = max_message_bytes
        self.tls_cert, self.tls_key = tls_cert, tls_key
        target_host = loopback_host(host)
        target = f"[{target_host}]:{grpc_port}" if ":" in target_host else f"{target_host}:{grpc_port}"
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes + (1 << 20)),
            ("grpc.max_send_message_length", max_message_bytes + (1 << 20)),
            ("grpc.enable_http_proxy", 0),
        ]
        if tls_cert:
            from diffjax import storage

            pem = storage.path(tls_cert).read_bytes()
            name = _tls_name(pem, target_host)
            if name:
                options.append(("grpc.ssl_target_name_override", name))
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(pem), options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.stub = pb_grpc.SamplingStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def list_models(self, deadline: float | None) -> list[pb.ModelInfo]:
        """ListModels; a server without it (UNIMPLEMENTED) serves the one model "default"."""
        try:
            models = list(self.stub.ListModels(pb.ListModelsRequest(), timeout=deadline or INFO_TIMEOUT_S).models)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            info = self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=deadline or INFO_TIMEOUT_S)
            info.name = info.name or "default"
            models = [info]
        return models

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls_cert or not self.tls_key:
            return None
        from diffjax import storage

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if not storage.is_remote(self.tls_cert) and not storage.is_remote(self.tls_key):
            context.load_cert_chain(self.tls_cert, self.tls_key)
            return context
        with tempfile.TemporaryDirectory() as tmp:  # gs:// files: ssl reads local files only
            paths = [os.path.join(tmp, n) for n in ("cert.pem", "key.pem")]  # local: our own temporary copies
            for path, source in zip(paths, (self.tls_cert, self.tls_key)):
                with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:  # local: owner-only temp file
                    f.write(storage.path(source).read_bytes())
            context.load_cert_chain(*paths)
        return context

    def start(self) -> "Gateway":
        context = self._ssl_context()
        self.httpd = _HttpServer((self.host.strip("[]"), self.requested_port), self, context)
        self.port = int(self.httpd.server_address[1])
        threading.Thread(target=self.httpd.serve_forever, args=(0.5,), daemon=True, name="diffjax-http").start()
        host = self.host.strip("[]") or "0.0.0.0"
        self.url = f"{'https' if context else 'http'}://{f'[{host}]' if ':' in host else host}:{self.port}"
        self.log(f"diffjax serve: HTTP/JSON API on {self.url} (port {self.port})")
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.channel.close()


def start(server: Any) -> Gateway | None:
    """The gateway of a started `diffjax.serving.server.Server` when its options ask for one (--http_port)."""
    o = server.options
    if getattr(o, "http_port", None) is None:
        return None
    gateway = Gateway(
        server.port,
        host=o.host,
        port=o.http_port,
        max_message_bytes=o.max_message_bytes,
        tls_cert=o.tls_cert,
        tls_key=o.tls_key,
        log=server.log,
    )
    try:
        return gateway.start()
    except OSError as err:  # the port is taken, the host is not this machine's
        server.stop(0)
        raise SystemExit(f"diffjax serve: cannot bind --http_port {o.host}:{o.http_port}: {err}") from None
