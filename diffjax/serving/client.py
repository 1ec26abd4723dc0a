"""`diffjax.serving.Client` and `diffjax client {sample,info,status,models,health} --addr HOST:PORT [--model NAME]`."""

from __future__ import annotations

import io
import json
import sys
import time
from typing import Iterator, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from diffjax import commandline
from diffjax.serving import sampling_pb2 as pb
from diffjax.serving import sampling_pb2_grpc as pb_grpc

_OUTPUTS = {"float32": pb.FLOAT32, "png": pb.PNG}


def tensor_to_numpy(t: pb.Tensor) -> np.ndarray:
    if t.dtype != "float32":
        raise ValueError(f"unsupported tensor dtype {t.dtype!r}")
    return np.frombuffer(t.data, "<f4").reshape(tuple(t.shape))


def png_to_numpy(images: Sequence[bytes]) -> np.ndarray:
    """PNG bytes -> (N, H, W, C) uint8."""
    from PIL import Image

    arrays = [np.asarray(Image.open(io.BytesIO(b))) for b in images]
    return np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])


class Client:
    """A blocking client: `Client("127.0.0.1:50051").sample(16)` -> (16, H, W, C) float32."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = 600.0,
        root_certificates: bytes | None = None,
        max_message_bytes: int = 64 << 20,
    ):
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if root_certificates is not None:
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates), options)
        else:
            self.channel = grpc.insecure_channel(address, options)
        self.stub = pb_grpc.SamplingStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout

    @staticmethod
    def request(
        num_samples: int,
        *,
        sampler: str = "",
        num_steps: int = 0,
        seed: int = 0,
        labels: Sequence[int] | None = None,
        guidance_scale: float | None = None,
        output: str = "float32",
        options: dict[str, float] | None = None,
        model: str = "",
    ) -> pb.SampleRequest:
        """options: the sampler's per-request numeric options (ddim eta, pc snr, heun s_churn, s_tmin,
        s_tmax, s_noise); model: a served model's name ("" = the server's default model)."""
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {sorted(_OUTPUTS)}, got {output!r}")
        req = pb.SampleRequest(
            num_samples=num_samples,
            sampler=sampler,
            num_steps=num_steps,
            seed=seed,
            labels=list(labels or []),
            output=_OUTPUTS[output],
            model=model,
        )
        if guidance_scale is not None:
            req.guidance_scale = guidance_scale
        for name, value in (options or {}).items():
            req.options[name] = float(value)
        return req

    def sample(self, num_samples: int, *, timeout: float | None = None, **kwargs) -> np.ndarray:
        """Samples as float32 (N, *shape) in the data range, or uint8 (N, H, W, C) with output='png'."""
        response = self.sample_response(num_samples, timeout=timeout, **kwargs)
        return png_to_numpy(response.png) if response.png else tensor_to_numpy(response.samples)

    def sample_response(self, num_samples: int, *, timeout: float | None = None, **kwargs) -> pb.SampleResponse:
        return self.stub.Sample(self.request(num_samples, **kwargs), timeout=timeout or self.timeout)

    def sample_stream(
        self, num_samples: int, *, timeout: float | None = None, **kwargs
    ) -> Iterator[tuple[list[int], np.ndarray]]:
        """(indices, samples) batches as the server finishes them."""
        for batch in self.stub.SampleStream(self.request(num_samples, **kwargs), timeout=timeout or self.timeout):
            x = png_to_numpy(batch.png) if batch.png else tensor_to_numpy(batch.samples)
            yield list(batch.indices), x

    def model_info(self, model: str = "") -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(model=model), timeout=self.timeout)

    def status(self, model: str = "") -> pb.ServerStatus:
        return self.stub.GetServerStatus(pb.GetServerStatusRequest(model=model), timeout=self.timeout)

    def models(self) -> list[pb.ModelInfo]:
        """Every served model's ModelInfo (`.name` the name requests use), the default first."""
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout).models)

    def health(self, service: str = "") -> str:
        """'SERVING', 'NOT_SERVING', ... of the standard grpc.health.v1 service."""
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_until_serving(self, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"server not SERVING after {timeout}s")
            time.sleep(0.2)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str]) -> int:
    p = commandline.Parser("diffjax client", "Talk to a `diffjax serve` server.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("sample", "info", "status", "models", "health"):
        s = sub.add_parser(name)  # a commandline.Parser too
        s.add_argument("--addr", default="127.0.0.1:50051")
        s.add_argument("--timeout", type=commandline.positive_float, default=600.0)
        s.add_argument("--tls_ca", default=None, help="PEM root certificate (TLS)")
        if name in ("sample", "info", "status"):
            s.add_argument("--model", default="", help="a served model's name (default: the server's default model)")
        if name == "sample":
            s.add_argument("--num", type=commandline.positive_int, default=16)
            s.add_argument("--sampler", default="")
            s.add_argument("--steps", type=commandline.non_negative_int, default=0, help="0: the server's default")
            s.add_argument("--seed", type=int, default=0)
            s.add_argument("--labels", type=int, nargs="*", default=None)
            s.add_argument("--guidance_scale", type=float, default=None)
            s.add_argument(
                "--option",
                action="append",
                type=commandline.name_number,
                default=[],
                metavar="NAME=VALUE",
                help="a sampler option, repeatable: eta (ddim), snr (pc), s_churn / s_tmin / s_tmax / s_noise (heun)",
            )
            s.add_argument("--out", default="grid.png", help="PNG grid (images) or scatter (2-D); .npz beside it")
    args = p.parse(argv)
    args.options = dict(getattr(args, "option", []))
    try:
        from diffjax import storage

        root = storage.path(args.tls_ca).read_bytes() if args.tls_ca else None
    except OSError as err:
        p.error(f"--tls_ca {args.tls_ca}: {err.strerror}")
    with Client(args.addr, timeout=args.timeout, root_certificates=root) as client:
        try:
            if args.command == "health":
                print(client.health())
            elif args.command == "status":
                print(str(client.status(args.model)).strip())
            elif args.command == "info":
                print(json.dumps(_summary(client.model_info(args.model)), indent=1))
            elif args.command == "models":
                print(json.dumps([_summary(info) for info in client.models()], indent=1))
            else:
                return _sample(client, args)
        except grpc.RpcError as err:
            print(f"diffjax client: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    return 0


def _summary(info: pb.ModelInfo) -> dict:
    """A ModelInfo as JSON-ready fields, the config left out."""
    summary = {f.name: v for f, v in info.ListFields() if f.name != "config_json"}
    return {k: list(v) if not isinstance(v, (int, float, str)) else v for k, v in summary.items()}


def _sample(client: Client, args) -> int:
    """Streams the samples (any count fits), then writes the PNG grid / scatter and the .npz."""
    from diffjax.sample import save_samples

    start = time.perf_counter()
    info = client.model_info(args.model)
    x = np.zeros((max(args.num, 0), *info.sample_shape), np.float32)
    for indices, batch in client.sample_stream(
        args.num,
        sampler=args.sampler,
        num_steps=args.steps,
        seed=args.seed,
        labels=args.labels,
        guidance_scale=args.guidance_scale,
        options=args.options,
        model=args.model,
    ):
        x[indices] = batch
    png, npz = save_samples(x, args.out, (info.data_min, info.data_max))
    print(
        f"{len(x)} samples ({info.name}: {args.sampler or info.default_sampler}, {args.steps or info.default_steps} steps, "
        f"checkpoint step {info.checkpoint_step}) in {time.perf_counter() - start:.1f}s -> {png}, {npz}"
    )
    return 0
