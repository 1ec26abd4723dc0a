"""The FID Inception-v3 in Flax NNX (NHWC), computing what pytorch-fid computes.

This is the 2015-12-05 TF Inception graph as pytorch-fid ports it
(``InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)``), plus
the 1008-way ``fc`` layer of its ``fid_inception_v3()`` for the Inception Score:

- input in [0, 1], resized to 299x299 exactly like ``F.interpolate(mode='bilinear',
  align_corners=False)`` (no antialiasing, also when downsampling), then mapped to [-1, 1];
- every conv is conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU;
- the FID blocks: Mixed_5b-d and Mixed_6b-e average-pool with ``count_include_pad=False``,
  Mixed_7b likewise, Mixed_7c max-pools its pool branch;
- ``pool3`` is the 2048-d global average pool, ``logits = fc(pool3)`` has 1008 entries.

Module and attribute names follow torchvision's, so parameter paths map one to one onto the keys
of pytorch-fid's state dict (``create`` does the mapping and checks it).
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence, TypedDict, Unpack

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.typing import PrecisionLike  # what nnx.Conv / nnx.Linear take (lax's also admits DotAlgorithm)
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffjax.evaluation.inception_weights import InceptionWeightsError

INPUT_SIZE = 299
POOL3_DIM = 2048
NUM_LOGITS = 1008


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize NHWC images like torch ``F.interpolate(mode='bilinear', align_corners=False)``:
    half-pixel source coordinates clamped at 0, two taps per axis, no antialiasing."""

    def along(x: jax.Array, axis: int, out: int) -> jax.Array:
        n = x.shape[axis]
        if n == out:
            return x
        # torch: float32 scale = n / out; src = scale * (i + 0.5) - 0.5 with one rounding (fused
        # multiply-add), which float64 arithmetic reproduces exactly before rounding to float32.
        scale = np.float64(np.float32(n) / np.float32(out))
        src = np.maximum((scale * (np.arange(out) + 0.5) - 0.5).astype(np.float32), np.float32(0))
        i0 = np.minimum(np.floor(src).astype(np.int32), n - 1)
        i1 = np.minimum(i0 + 1, n - 1)
        w1 = (src - i0).astype(np.float32)
        shape = [1] * x.ndim
        shape[axis] = out
        w = jnp.asarray(w1.reshape(shape))
        return jnp.take(x, i0, axis=axis) * (1 - w) + jnp.take(x, i1, axis=axis) * w

    # Width first, then height: torch's h0 * (w0 * x00 + w1 * x01) + h1 * (...) order.
    return along(along(x, 2, size[1]), 1, size[0])


def _max_pool(x: jax.Array, stride: int, pad: int) -> jax.Array:
    pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pads)


def _avg_pool_valid_only(x: jax.Array) -> jax.Array:
    """3x3, stride 1, padding 1 average over the in-image taps only (``count_include_pad=False``)."""

    def window_sum(a: jax.Array) -> jax.Array:
        return lax.reduce_window(a, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))

    return window_sum(x) / window_sum(jnp.ones((1, *x.shape[1:3], 1), x.dtype))


class _LayerArgs(TypedDict):
    precision: PrecisionLike
    rngs: nnx.Rngs


class BasicConv2d(nnx.Module):
    """Conv without bias, BatchNorm (eps 1e-3, running statistics), ReLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | Sequence[int],
        stride: int = 1,
        padding: int | Sequence[int] = 0,
        *,
        precision: PrecisionLike,
        rngs: nnx.Rngs,
    ):
        ph, pw = _pair(padding)
        (kh, kw), (sh, sw) = _pair(kernel), _pair(stride)
        # XLA:CPU runs unpadded stride-1 convolutions 3-4x slower than padded ones (measured on the
        # 147x147 and 71x71 stem layers): pad as 'same' and crop instead (identical values).
        self.crop = ((kh - 1) // 2, (kw - 1) // 2) if (sh, sw, ph, pw) == (1, 1, 0, 0) else (0, 0)
        ch, cw = self.crop
        self.strides = (sh, sw)
        self.padding = ((ph + ch, ph + ch), (pw + cw, pw + cw))
        self.conv = nnx.Conv(
            cin,
            cout,
            (kh, kw),
            self.strides,
            padding=self.padding,
            use_bias=False,
            precision=precision,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=1e-3, rngs=rngs)

    def folded(self) -> tuple[jax.Array, jax.Array]:
        """(kernel, bias) with BatchNorm's running statistics folded in: one pass less per layer."""
        bn = self.bn
        assert bn.scale is not None and bn.bias is not None  # BatchNorm's defaults use_scale, use_bias
        scale = bn.scale[...] * lax.rsqrt(bn.var[...] + bn.epsilon)
        return self.conv.kernel[...] * scale, bn.bias[...] - bn.mean[...] * scale

    def apply(self, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
        conv = self.conv
        y = lax.conv_general_dilated(
            x, kernel, self.strides, self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=conv.precision
        )
        ch, cw = self.crop
        if ch or cw:
            y = y[:, ch : y.shape[1] - ch, cw : y.shape[2] - cw]
        return jax.nn.relu(y + bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.apply(x, *self.folded())


def _parallel_1x1(x: jax.Array, *convs: BasicConv2d) -> list[jax.Array]:
    """Several 1x1 BasicConv2d layers reading the same input, run as one convolution (one pass over x,
    one larger matmul) and split by output channels."""
    kernels, biases = zip(*(c.folded() for c in convs))
    y = convs[0].apply(x, jnp.concatenate(kernels, -1), jnp.concatenate(biases))
    return jnp.split(y, np.cumsum([k.shape[-1] for k in kernels])[:-1].tolist(), axis=-1)


class InceptionA(nnx.Module):
    """35x35 block (pytorch-fid's FIDInceptionA): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int, **kw: Unpack[_LayerArgs]):
        self.branch1x1 = BasicConv2d(cin, 64, 1, **kw)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1, **kw)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, **kw)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, **kw)
        self.branch_pool = BasicConv2d(cin, pool_features, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1, b5, b3 = _parallel_1x1(x, self.branch1x1, self.branch5x5_1, self.branch3x3dbl_1)
        b5 = self.branch5x5_2(b5)
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(b3))
        bp = self.branch_pool(_avg_pool_valid_only(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int, **kw: Unpack[_LayerArgs]):
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, **kw)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, _max_pool(x, 2, 0)], axis=-1)


class InceptionC(nnx.Module):
    """17x17 block (FIDInceptionC) with factorised 7x7 convs and a pad-excluding avgpool."""

    def __init__(self, cin: int, channels_7x7: int, **kw: Unpack[_LayerArgs]):
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1, **kw)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, **kw)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, **kw)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), **kw)
        self.branch_pool = BasicConv2d(cin, 192, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1, b7, bd = _parallel_1x1(x, self.branch1x1, self.branch7x7_1, self.branch7x7dbl_1)
        b7 = self.branch7x7_3(self.branch7x7_2(b7))
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(_avg_pool_valid_only(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """17 -> 8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int, **kw: Unpack[_LayerArgs]):
        self.branch3x3_1 = BasicConv2d(cin, 192, 1, **kw)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, **kw)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, **kw)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), **kw)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3, b7 = _parallel_1x1(x, self.branch3x3_1, self.branch7x7x3_1)
        b3 = self.branch3x3_2(b3)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return jnp.concatenate([b3, b7, _max_pool(x, 2, 0)], axis=-1)


class InceptionE(nnx.Module):
    """8x8 block: Mixed_7b (FIDInceptionE_1) average-pools without the padding, Mixed_7c
    (FIDInceptionE_2) max-pools, as in the TF graph."""

    def __init__(self, cin: int, pool: str, **kw: Unpack[_LayerArgs]):
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1, **kw)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1, **kw)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, **kw)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch_pool = BasicConv2d(cin, 192, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1, b3, bd = _parallel_1x1(x, self.branch1x1, self.branch3x3_1, self.branch3x3dbl_1)
        bd = self.branch3x3dbl_2(bd)
        pooled = _max_pool(x, 1, 1) if self.pool == "max" else _avg_pool_valid_only(x)
        return jnp.concatenate(
            [
                b1,
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(bd),
                self.branch3x3dbl_3b(bd),
                self.branch_pool(pooled),
            ],
            axis=-1,
        )


def check_images(shape: Sequence[int]) -> None:
    """Raise ValueError unless ``shape`` is (B, H, W, 3) with H, W >= 1."""
    if len(shape) != 4 or shape[-1] != 3 or min(shape[1:3], default=0) < 1:
        raise ValueError(f"Inception expects NHWC RGB images (B, H, W, 3), got shape {tuple(shape)}")


class InceptionV3(nnx.Module):
    """pytorch-fid's FID Inception-v3 with the 1008-way logits layer, NHWC.

    ``precision`` is the conv / dense matmul precision ('highest' keeps float32 on GPUs/TPUs,
    matching the reference float32 computation).
    """

    def __init__(self, *, precision: PrecisionLike = "highest", rngs: nnx.Rngs):
        kw = _LayerArgs(precision=precision, rngs=rngs)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
        self.Mixed_5b = InceptionA(192, 32, **kw)
        self.Mixed_5c = InceptionA(256, 64, **kw)
        self.Mixed_5d = InceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, 128, **kw)
        self.Mixed_6c = InceptionC(768, 160, **kw)
        self.Mixed_6d = InceptionC(768, 160, **kw)
        self.Mixed_6e = InceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, "avg", **kw)
        self.Mixed_7c = InceptionE(2048, "max", **kw)
        self.fc = nnx.Linear(POOL3_DIM, NUM_LOGITS, precision=precision, rngs=rngs)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images (B, H, W, 3) in [0, 1], any H, W -> (pool3 (B, 2048), logits (B, 1008)), float32."""
        check_images(images.shape)
        x = resize_bilinear(jnp.asarray(images, jnp.float32), (INPUT_SIZE, INPUT_SIZE))
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool(x, 2, 0)
        x = _max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2, 0)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        return pool3, self.fc(pool3)


# nnx variable name -> torch state-dict name. Kernels change layout: conv HWIO <-> OIHW,
# fc (in, out) <-> (out, in).
_TORCH_NAME = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


@functools.lru_cache(maxsize=4)
def _skeleton(precision: PrecisionLike) -> tuple[nnx.GraphDef, nnx.State]:
    """The network's structure with abstract (shape-only) variables; tracing it takes seconds."""
    return nnx.split(nnx.eval_shape(lambda: InceptionV3(precision=precision, rngs=nnx.Rngs(0))))


def _variables(model: InceptionV3) -> dict[str, nnx.Variable]:
    """torch state-dict key -> the model's variable."""
    return {
        ".".join(map(str, path[:-1] + (_TORCH_NAME[str(path[-1])],))): var
        for path, var in nnx.iter_graph(model)
        if isinstance(var, nnx.Variable)
    }


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """torch key -> torch shape of every array ``create`` needs (472 of them)."""
    shapes = {}
    for key, var in _variables(nnx.merge(*_skeleton("highest"), copy=True)).items():
        s = tuple(var.get_value().shape)
        shapes[key] = (s[3], s[2], s[0], s[1]) if len(s) == 4 else s[::-1]
    return shapes


def create(weights: Mapping[str, np.ndarray], *, precision: PrecisionLike = "highest") -> InceptionV3:
    """Build ``InceptionV3`` from pytorch-fid's state dict (``load_pytorch_fid_weights``).

    Every array of ``state_dict_shapes()`` must be present with that shape and no other key may
    be (BatchNorm's ``num_batches_tracked`` is ignored); otherwise ``InceptionWeightsError`` names
    the offending keys and nothing is loaded.
    """
    expected = state_dict_shapes()
    given = {k for k in weights if not k.endswith(".num_batches_tracked")}
    problems = [f"missing key {k!r}" for k in sorted(expected.keys() - given)]
    problems += [f"unexpected key {k!r}" for k in sorted(given - expected.keys())]
    problems += [
        f"{k!r} has shape {np.shape(weights[k])}, expected {expected[k]}"
        for k in sorted(expected.keys() & given)
        if np.shape(weights[k]) != expected[k]
    ]
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise InceptionWeightsError(f"Inception weights do not fit the FID Inception: {'; '.join(problems[:8])}{more}")
    model = nnx.merge(*_skeleton(precision), copy=True)
    for key, var in _variables(model).items():
        arr = np.asarray(weights[key], np.float32)
        var.set_value(jnp.asarray(arr.transpose(2, 3, 1, 0) if arr.ndim == 4 else arr.T))  # .T: fc, or 1-d
    return model


def _forward(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return nnx.merge(graphdef, state)(images)


_forward_jit = jax.jit(_forward, static_argnums=0)


def features(model: InceptionV3, images: np.ndarray, batch_size: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(pool3 (N, 2048), logits (N, 1008)) as float32 numpy for NHWC ``images``: uint8 in
    [0, 255] or float in [0, 1]. Batches (``batch_size`` rounded up to a multiple of the device
    count) are sharded over all devices; the last one is zero-padded, so there is one compile."""
    check_images(np.shape(images))
    devices = jax.local_devices()  # per process: no collectives, callable from one process alone
    step = math.ceil(max(1, min(batch_size, len(images))) / len(devices)) * len(devices)  # no padding beyond the set
    mesh = Mesh(np.array(devices), ("batch",))
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    data_sharding = NamedSharding(mesh, PartitionSpec("batch"))
    pools, logits, pending = [], [], []

    def fetch(out, count):
        pools.append(np.asarray(out[0])[:count])
        logits.append(np.asarray(out[1])[:count])

    for start in range(0, len(images), step):
        chunk = np.asarray(images[start : start + step])
        chunk = chunk.astype(np.float32) / 255 if chunk.dtype == np.uint8 else chunk.astype(np.float32)
        count = len(chunk)
        if count < step:
            chunk = np.concatenate([chunk, np.zeros((step - count, *chunk.shape[1:]), np.float32)])
        pending.append((_forward_jit(graphdef, state, jax.device_put(chunk, data_sharding)), count))
        if len(pending) > 1:  # fetch the previous batch while this one runs
            fetch(*pending.pop(0))
    for item in pending:
        fetch(*item)
    if not pools:
        return np.zeros((0, POOL3_DIM), np.float32), np.zeros((0, NUM_LOGITS), np.float32)
    return np.concatenate(pools), np.concatenate(logits)
