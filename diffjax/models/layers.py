"""Shared building blocks of the score networks (Flax NNX, NHWC).

Conventions
- Parameters are float32; every layer computes in ``dtype`` (float32 or bfloat16). Group-norm
  statistics and the attention softmax are always computed in float32.
- Initialisers follow DDPM / score_sde: ``variance_scaling(scale, 'fan_avg', 'uniform')`` with
  scale 0 replaced by 1e-10 ("zero" init of the last conv of a block), 1x1 "NIN" layers at 0.1.
- Sharding: large kernels carry the metadata ``out_sharding`` whose *last* (output) axis is
  named ``'fsdp'`` (conv kernels ``(None, None, None, 'fsdp')``, dense ``(None, 'fsdp')``).
  ``eager_sharding`` is off, so creating a model needs no mesh; ``nnx.get_partition_spec`` (or
  ``diffjax.models.fsdp_partition_specs``, which drops the name on indivisible axes) turns the
  annotations into ``PartitionSpec``s for a mesh with an ``'fsdp'`` axis. Biases and norms are
  replicated.
- FIR up/down-sampling implements StyleGAN2's ``upfirdn_2d`` semantics (as used by NCSN++) with
  a separable 1-D kernel applied as shifted slices, which XLA fuses into elementwise loops.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

CONV_SHARDING = (None, None, None, "fsdp")
DENSE_SHARDING = (None, "fsdp")


def sharding_meta(names: tuple) -> dict:
    """Variable metadata that annotates (but does not eagerly apply) a sharding."""
    return {"out_sharding": names, "eager_sharding": False}


def default_init(scale: float = 1.0):
    """DDPM initialiser: fan-avg uniform variance scaling; scale 0 means 1e-10."""
    return jax.nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


def swish(x):
    return jax.nn.silu(x)


def gelu(x):
    return jax.nn.gelu(x, approximate=False)  # the exact (erf) GELU, as torch's nn.GELU


ACTIVATIONS = {
    "swish": swish,
    "silu": swish,
    "relu": jax.nn.relu,
    "elu": jax.nn.elu,
    "lrelu": lambda x: jax.nn.leaky_relu(x, 0.2),
    "mish": jax.nn.mish,
    "gelu": gelu,
}


def get_act(name: str):
    try:
        return ACTIVATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown nonlinearity {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def conv(in_ch, out_ch, *, kernel=3, stride=1, init_scale=1.0, padding="SAME", dtype, rngs) -> nnx.Conv:
    """A 'SAME'-padded conv with bias and DDPM init (score_sde's ddpm_conv3x3 / conv1x1)."""
    return nnx.Conv(
        in_ch,
        out_ch,
        (kernel, kernel),
        strides=stride,
        padding=padding,
        kernel_init=default_init(init_scale),
        dtype=dtype,
        rngs=rngs,
        kernel_metadata=sharding_meta(CONV_SHARDING),
    )


def dense(in_f, out_f, *, init_scale=1.0, dtype, rngs) -> nnx.Linear:
    """A dense layer with DDPM init; also the 1x1 "NIN" on the channel axis of NHWC inputs."""
    return nnx.Linear(
        in_f,
        out_f,
        kernel_init=default_init(init_scale),
        dtype=dtype,
        rngs=rngs,
        kernel_metadata=sharding_meta(DENSE_SHARDING),
    )


def scale_output(h: jax.Array, noise_cond: jax.Array, scale_by_sigma: bool, learn_sigma: bool) -> jax.Array:
    """score_sde's scale_by_sigma: the prediction divided by noise_cond; with learn_sigma the output's
    channels are (prediction, variance v) and only the prediction half is scaled."""
    if not scale_by_sigma:
        return h
    sigma = noise_cond.astype(jnp.float32).reshape((-1,) + (1,) * (h.ndim - 1))
    if not learn_sigma:
        return h / sigma
    pred, v = jnp.split(h, 2, axis=-1)
    return jnp.concatenate([pred / sigma, v], axis=-1)


def num_groups(ch: int) -> int:
    """score_sde's rule min(C // 4, 32) (= 32 for C >= 128), lowered until it divides C."""
    g = max(1, min(ch // 4, 32))
    while ch % g:
        g -= 1
    return g


_SPATIAL_FIRST = contextvars.ContextVar("groupnorm_spatial_first", default=False)


@contextlib.contextmanager
def inference_groupnorm():
    """Trace GroupNorm with its statistics summed over H, W first, then within each group.

    The same numbers (to float rounding) with a different reduction order: on XLA:CPU it makes
    a forward pass faster (the 64-slot digits server step 35% more samples/s), while a training
    step with it runs ~7% slower (benchmarks/train_step.py), so only forward-only programs (the
    server's step) trace under this context; it applies at trace time.
    """
    token = _SPATIAL_FIRST.set(True)
    try:
        yield
    finally:
        _SPATIAL_FIRST.reset(token)


class GroupNorm(nnx.Module):
    """GroupNorm over (H, W, C/G) with float32 statistics; eps 1e-6 as in DDPM/score_sde (diffusers' default 1e-5)."""

    def __init__(self, ch: int, *, groups: int | None = None, eps: float = 1e-6, dtype=jnp.float32):
        """groups: None (or 0) for score_sde's rule ``num_groups(ch)``; else it must divide ch."""
        if groups and ch % groups:
            raise ValueError(f"model.num_groups={groups} does not divide a layer's {ch} channels")
        self.groups, self.eps, self.dtype = groups or num_groups(ch), eps, dtype
        self.scale = nnx.Param(jnp.ones((ch,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((ch,), jnp.float32))

    def __call__(self, x):
        # One pass for the statistics (E[x], E[x^2]), then y = x * a + b with per-(batch, channel)
        # a, b: forward and backward each read the activations twice (a reduction + an
        # elementwise pass), which matters on CPU where these passes are memory-bound.
        b, c, g = x.shape[0], x.shape[-1], self.groups
        xf = x.astype(jnp.float32)
        if _SPATIAL_FIRST.get():  # sums over H, W first (channel axis minor), then within groups
            count = (xf.size // (b * c)) * (c // g)
            spatial = tuple(range(1, x.ndim - 1))
            mean = jnp.sum(jnp.sum(xf, axis=spatial).reshape(b, g, c // g), -1) / count
            mean_sq = jnp.sum(jnp.sum(jnp.square(xf), axis=spatial).reshape(b, g, c // g), -1) / count
        else:
            xg = xf.reshape(b, -1, g, c // g)
            mean, mean_sq = jnp.mean(xg, axis=(1, 3)), jnp.mean(jnp.square(xg), axis=(1, 3))
        var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
        inv = jax.lax.rsqrt(var + self.eps)  # (B, G)
        gamma = self.scale[...].reshape(g, c // g)
        a = (inv[:, :, None] * gamma).reshape(b, c)
        shift = (self.bias[...].reshape(g, c // g) - mean[:, :, None] * inv[:, :, None] * gamma).reshape(b, c)
        bshape = (b,) + (1,) * (x.ndim - 2) + (c,)
        y = xf * a.reshape(bshape) + shift.reshape(bshape)
        return y.astype(self.dtype)


# ----------------------------------------------------------------------------------------------
# Noise-level / class embeddings
# ----------------------------------------------------------------------------------------------


def timestep_embedding(t, dim: int, max_positions: int = 10000, freq_shift: float = 1.0):
    """DDPM's sinusoidal embedding of a (B,) float array: [sin(t w_i), cos(t w_i)] with
    w_i = max_positions^(-i / (dim / 2 - freq_shift)) (DDPM: freq_shift 1; diffusers' default 0)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_positions) / (half - freq_shift) * jnp.arange(half, dtype=jnp.float32))
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class GaussianFourierProjection(nnx.Module):
    """Random Fourier features [sin(2 pi x W), cos(2 pi x W)] of x = log(sigma).

    W is a (non-trained: stop_gradient) Param, as in score_sde, so it is counted and saved."""

    def __init__(self, size: int, scale: float, *, rngs: nnx.Rngs):
        self.W = nnx.Param(scale * jax.random.normal(rngs.params(), (size,), jnp.float32))

    def __call__(self, x):
        proj = x.astype(jnp.float32)[:, None] * jax.lax.stop_gradient(self.W[...])[None] * (2 * np.pi)
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class NoiseClassEmbedding(nnx.Module):
    """noise_cond -> embedding -> Dense(4nf) -> act -> Dense(4nf), plus an optional class embedding.

    embedding_type 'positional' embeds noise_cond directly (DDPM timestep or 999 t);
    'fourier' embeds log(noise_cond) (noise_cond = sigma). With num_classes > 0 a table of
    num_classes + 1 rows is added to the output; row num_classes is the null label
    (label -1, or labels=None), used for classifier-free guidance. With augment_dim > 0 the
    augmentation labels go through a bias-free Dense and are added to the noise embedding before
    the MLP, as EDM's map_augment (augment_labels=None: zeros, i.e. no augmentation).
    """

    def __init__(
        self,
        nf: int,
        *,
        embedding_type="positional",
        fourier_scale=16.0,
        conditional=True,
        num_classes=0,
        augment_dim=0,
        act=swish,
        out_dim=None,
        freq_shift: float = 1.0,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        out_dim = out_dim or 4 * nf
        self.nf, self.act, self.embedding_type, self.dtype = nf, act, embedding_type, dtype
        self.freq_shift = float(freq_shift)
        self.num_classes, self.out_dim = num_classes, out_dim
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {embedding_type!r}")
        self.fourier = (
            GaussianFourierProjection(nf, fourier_scale, rngs=rngs) if conditional and embedding_type == "fourier" else None
        )
        in_dim = 2 * nf if embedding_type == "fourier" else nf
        if augment_dim and not conditional:
            raise ValueError("model.augment_dim needs a noise-conditional network (model.conditional=True)")
        self.augment = (
            nnx.Linear(
                augment_dim,
                in_dim,
                use_bias=False,
                kernel_init=default_init(),
                rngs=rngs,
                kernel_metadata=sharding_meta(DENSE_SHARDING),
            )
            if augment_dim
            else None
        )
        self.dense0 = dense(in_dim, out_dim, rngs=rngs, dtype=jnp.float32) if conditional else None
        self.dense1 = dense(out_dim, out_dim, rngs=rngs, dtype=jnp.float32) if conditional else None
        self.label_emb = (
            nnx.Embed(
                num_classes + 1,
                out_dim,
                rngs=rngs,
                embedding_init=jax.nn.initializers.normal(1.0),
                embedding_metadata=sharding_meta(DENSE_SHARDING),
            )
            if num_classes
            else None
        )

    def __call__(self, noise_cond, labels=None, augment_labels=None):
        temb = None
        if augment_labels is not None and self.augment is None:
            raise ValueError("augment_labels given but the network has no augment_dim (set model.augment_dim)")
        if self.dense0 is not None:
            if self.fourier is not None:
                emb = self.fourier(jnp.log(noise_cond))
            else:
                emb = timestep_embedding(noise_cond, self.nf, freq_shift=self.freq_shift)
            if augment_labels is not None:
                emb = emb + self.augment(augment_labels.astype(jnp.float32))
            temb = self.dense1(self.act(self.dense0(emb)))
        if self.label_emb is not None:
            b = noise_cond.shape[0]
            if labels is None:
                labels = jnp.full((b,), self.num_classes, jnp.int32)
            labels = jnp.where(labels < 0, self.num_classes, labels).astype(jnp.int32)
            cemb = self.label_emb(labels)
            temb = cemb if temb is None else temb + cemb
        return None if temb is None else temb.astype(self.dtype)


# ----------------------------------------------------------------------------------------------
# Up/down-sampling: nearest/avg-pool and StyleGAN2 FIR (upfirdn)
# ----------------------------------------------------------------------------------------------


def naive_upsample(x, factor=2):
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
    return x.reshape(b, h * factor, w * factor, c)


def naive_downsample(x, factor=2):
    b, h, w, c = x.shape
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def _fir_1d(x, k, axis, up, down, pad0, pad1):
    """Zero-insert by `up`, pad (negative = crop), convolve with 1-D `k`, keep every `down`-th."""
    cfg = [(0, 0, 0)] * x.ndim
    cfg[axis] = (pad0, pad1 + up - 1, up - 1)
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), cfg)
    n_out = (x.shape[axis] - len(k)) // down + 1
    out = None
    for j, kj in enumerate(k[::-1]):  # convolution = correlation with the flipped kernel
        s = jax.lax.slice_in_dim(x, j, j + (n_out - 1) * down + 1, stride=down, axis=axis)
        out = s * kj if out is None else out + s * kj
    return out


def upfirdn_2d(x, k1d, up=1, down=1, pad=(0, 0)):
    """StyleGAN2 upfirdn_2d on NHWC with the separable kernel outer(k1d, k1d)."""
    k1d = [float(v) for v in np.asarray(k1d, np.float32)]  # python floats keep x's dtype
    for axis in (1, 2):
        x = _fir_1d(x, k1d, axis, up, down, *pad)
    return x


def _fir_kernel(k, gain_1d=1.0):
    k = np.asarray(k, np.float32)
    return k / k.sum() * gain_1d


def upsample_2d(x, k=(1, 3, 3, 1), factor=2):
    p = len(k) - factor
    return upfirdn_2d(x, _fir_kernel(k, factor), up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x, k=(1, 3, 3, 1), factor=2):
    p = len(k) - factor
    return upfirdn_2d(x, _fir_kernel(k), down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x, w, k=(1, 3, 3, 1), factor=2):
    """Fused transposed conv (stride `factor`) + FIR filter: StyleGAN2's upsample_conv_2d."""
    kc = w.shape[0]
    pad = (kc - 1, factor - 1 + max(kc - factor, 0))
    x = jax.lax.conv_general_dilated(
        x, w, (1, 1), (pad, pad), lhs_dilation=(factor, factor), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    p = (len(k) - factor) - (kc - 1)
    return upfirdn_2d(x, _fir_kernel(k, factor), pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x, w, k=(1, 3, 3, 1), factor=2):
    """FIR filter + strided conv: StyleGAN2's conv_downsample_2d."""
    kc = w.shape[0]
    p = (len(k) - factor) + (kc - 1)
    x = upfirdn_2d(x, _fir_kernel(k), pad=((p + 1) // 2, p // 2))
    return jax.lax.conv_general_dilated(x, w, (factor, factor), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


class FIRConv(nnx.Module):
    """3x3 conv fused with FIR up- or down-sampling (score_sde's up_or_down_sampling.Conv2d)."""

    def __init__(self, in_ch, out_ch, *, up=False, down=False, fir_kernel=(1, 3, 3, 1), kernel=3, dtype=jnp.float32, rngs):
        self.kernel = nnx.Param(
            default_init()(rngs.params(), (kernel, kernel, in_ch, out_ch)), **sharding_meta(CONV_SHARDING)
        )
        self.bias = nnx.Param(jnp.zeros((out_ch,), jnp.float32))
        self.up, self.down, self.fir_kernel, self.dtype = up, down, tuple(fir_kernel), dtype

    def __call__(self, x):
        w = self.kernel[...].astype(self.dtype)
        if self.up:
            x = upsample_conv_2d(x, w, self.fir_kernel)
        elif self.down:
            x = conv_downsample_2d(x, w, self.fir_kernel)
        else:
            x = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return x + self.bias[...].astype(self.dtype)


class Upsample(nnx.Module):
    """x2 upsampling: nearest (+ 3x3 conv) or FIR (+ fused conv); optional channel change."""

    def __init__(self, in_ch, out_ch=None, *, with_conv=False, fir=False, fir_kernel=(1, 3, 3, 1), dtype=jnp.float32, rngs):
        out_ch = out_ch or in_ch
        self.fir, self.fir_kernel = fir, tuple(fir_kernel)
        if not with_conv and out_ch != in_ch:
            raise ValueError("Upsample without conv cannot change the channel count")
        self.conv = nnx.data(
            None
            if not with_conv
            else FIRConv(in_ch, out_ch, up=True, fir_kernel=fir_kernel, dtype=dtype, rngs=rngs)
            if fir
            else conv(in_ch, out_ch, dtype=dtype, rngs=rngs)
        )

    def __call__(self, x):
        if self.fir:
            return self.conv(x) if self.conv is not None else upsample_2d(x, self.fir_kernel)
        h = naive_upsample(x)
        return self.conv(h) if self.conv is not None else h


class Downsample(nnx.Module):
    """/2 downsampling: stride-2 3x3 conv or 2x2 average pool, or their FIR variants.

    padding (the plain conv's): 0 pads (0, 1) as DDPM ('SAME' on even sizes), 1 pads (1, 1) as
    diffusers' Downsample2D(padding=1)."""

    def __init__(
        self,
        in_ch,
        out_ch=None,
        *,
        with_conv=False,
        fir=False,
        fir_kernel=(1, 3, 3, 1),
        padding: int = 0,
        dtype=jnp.float32,
        rngs,
    ):
        if padding not in (0, 1):
            raise ValueError(f"model.downsample_padding must be 0 or 1, got {padding!r}")
        out_ch = out_ch or in_ch
        self.fir, self.fir_kernel = fir, tuple(fir_kernel)
        if not with_conv and out_ch != in_ch:
            raise ValueError("Downsample without conv cannot change the channel count")
        self.conv = nnx.data(
            None
            if not with_conv
            else FIRConv(in_ch, out_ch, down=True, fir_kernel=fir_kernel, dtype=dtype, rngs=rngs)
            if fir
            else conv(in_ch, out_ch, stride=2, padding="SAME" if padding == 0 else ((1, 1), (1, 1)), dtype=dtype, rngs=rngs)
        )

    def __call__(self, x):
        if self.conv is not None:
            return self.conv(x)
        return downsample_2d(x, self.fir_kernel) if self.fir else naive_downsample(x)


def parse_dtype(name) -> jnp.dtype:
    table = {"float32": jnp.float32, "f32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}
    if not isinstance(name, str):
        return jnp.dtype(name)
    if name not in table:
        raise ValueError(f"model.dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def as_tuple(v) -> tuple:
    return tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else (v,)
