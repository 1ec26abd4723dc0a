"""JSON <-> the sampling protos for the HTTP API (diffjax.serving.http_api): request parsing that
names the field, responses, and the gRPC -> HTTP status mapping."""

from __future__ import annotations

import base64
import json
from typing import Any

import grpc
import numpy as np

from diffjax.serving import sampling_pb2 as pb

# gRPC status -> HTTP status (as grpc-gateway maps them; 499: nginx's "client closed request")
STATUS = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
}
INT32, UINT32 = (-(2**31), 2**31 - 1), (0, 2**32 - 1)
FIELDS = ("num_samples", "sampler", "num_steps", "options", "seed", "labels", "guidance_scale", "output", "encoding")
OUTPUTS = {"FLOAT32": pb.FLOAT32, "PNG": pb.PNG}
ENCODINGS = ("list", "b64")


class HttpError(Exception):
    """An error answer: HTTP status, a gRPC-style code name and one line naming the problem."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def json(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


def from_rpc(err: grpc.RpcError) -> HttpError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    details = err.details() if hasattr(err, "details") else None
    return HttpError(STATUS.get(name, 500), name, details or name)


def bad(message: str) -> HttpError:
    return HttpError(400, "INVALID_ARGUMENT", message)


def _show(value: Any) -> str:
    """A value in an error message: its JSON, cut to 40 characters."""
    try:
        return json.dumps(value)[:40]
    except (ValueError, RecursionError):  # nested deeper than the encoder recurses
        return type(value).__name__


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise bad(f"{name} must be a string, got {_show(value)}")
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"): valid JSON, not valid UTF-8
        raise bad(f"{name} must be valid Unicode text, got {_show(value)}") from None
    return value


def _integer(body: dict, name: str, bounds: tuple[int, int]) -> int:
    value = body[name]
    if type(value) is not int:  # bool is an int subclass: refused too
        raise bad(f"{name} must be an integer, got {_show(value)}")
    if not bounds[0] <= value <= bounds[1]:
        raise bad(f"{name} must be an integer in [{bounds[0]}, {bounds[1]}], got {str(value)[:40]}")
    return value


def _number(value: Any, name: str) -> float:
    if type(value) not in (int, float):
        raise bad(f"{name} must be a number, got {_show(value)}")
    try:
        return float(value)
    except OverflowError:  # an integer beyond a double
        raise bad(f"{name} must be a number in the double range, got {str(value)[:40]}") from None


def sample_request(body: Any, model: str) -> tuple[pb.SampleRequest, str]:
    """A JSON body -> (the SampleRequest for `model`, the sample encoding "list" | "b64").

    Types and protobuf ranges are checked here (a 400 naming the field); the values themselves by
    the server, as for gRPC clients."""
    if not isinstance(body, dict):
        raise bad(f"the body must be a JSON object of SampleRequest fields, got a JSON {type(body).__name__}")
    for name in body:
        if name == "model":
            raise bad("field 'model' is not taken in the body: the model is named by the path /v1/models/{name}:sample")
        if name not in FIELDS:
            raise bad(f"unknown field {name[:40]!r}; a sample request takes {', '.join(FIELDS)}")
    req = pb.SampleRequest(model=model)
    for name, bounds in (("num_samples", INT32), ("num_steps", INT32), ("seed", UINT32)):
        if name in body:
            setattr(req, name, _integer(body, name, bounds))
    if "sampler" in body:
        req.sampler = _text(body["sampler"], "sampler")
    if "labels" in body:
        labels = body["labels"]
        if not isinstance(labels, list):
            raise bad(f"labels must be a list of integers, got {_show(labels)}")
        req.labels.extend(_integer({"labels": v}, "labels", INT32) for v in labels)
    if "options" in body:
        options = body["options"]
        if not isinstance(options, dict):
            raise bad(f'options must be an object of numbers (e.g. {{"eta": 0.5}}), got {_show(options)}')
        for key, value in options.items():
            req.options[_text(key, "options keys")] = _number(value, f"options[{key[:40]!r}]")
    if "guidance_scale" in body and body["guidance_scale"] is not None:
        req.guidance_scale = _number(body["guidance_scale"], "guidance_scale")
    if "output" in body:
        output = body["output"]
        if not isinstance(output, str) or output.upper() not in OUTPUTS:
            raise bad(f"output must be one of {list(OUTPUTS)}, got {_show(output)}")
        req.output = OUTPUTS[output.upper()]
    encoding = body.get("encoding", "list")
    if encoding not in ENCODINGS:
        raise bad(f"encoding must be one of {list(ENCODINGS)}, got {_show(encoding)}")
    return req, encoding


def samples_json(tensor: pb.Tensor, encoding: str) -> dict:
    """A Tensor -> {"samples": nested lists (non-finite values as null) or base64 '<f4' bytes, "shape"}."""
    if encoding == "b64":
        return {"samples": base64.b64encode(tensor.data).decode(), "shape": list(tensor.shape)}
    x = np.frombuffer(tensor.data, "<f4").reshape(tuple(tensor.shape))
    if not np.isfinite(x).all():
        finite, x = np.isfinite(x), x.astype(object)
        x[~finite] = None
    return {"samples": x.tolist(), "shape": list(tensor.shape)}


def output_json(message: pb.SampleResponse | pb.SampleBatch, encoding: str) -> dict:
    if message.png:
        return {"png": [base64.b64encode(p).decode() for p in message.png]}
    return samples_json(message.samples, encoding)


def model_json(info: pb.ModelInfo, name: str, *, config: bool = False) -> dict:
    f32 = lambda v: float(str(np.float32(v)))  # noqa: E731 - 0.1, not 0.10000000149011612
    out = {
        "name": info.name or name,
        "sample_shape": list(info.sample_shape),
        "num_classes": info.num_classes,
        "samplers": list(info.samplers),
        "default_sampler": info.default_sampler,
        "default_steps": info.default_steps,
        "max_steps": info.max_steps,
        "max_samples_per_request": info.max_samples_per_request,
        "checkpoint_step": info.checkpoint_step,
        "process": info.process,
        "data_min": f32(info.data_min),
        "data_max": f32(info.data_max),
    }
    if config:
        out["config"] = json.loads(info.config_json or "{}")
    return out
