"""The UNets' residual and attention blocks (Flax NNX, NHWC), shared by ddpm_unet, ncsnpp and classifier.

Conventions as diffjax.models.layers: float32 parameters, compute in ``dtype``, float32 GroupNorm
statistics and attention softmax. ``ResBlock`` and ``AttnBlock`` are the units ``model.remat``
rematerialises (``remat_resblock`` / ``remat_attn``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffjax.models import layers as L
from diffjax.models.attention import attention
from diffjax.models.remat import remat_call

TIME_SCALE_SHIFTS = ("default", "scale_shift")


class AttnBlock(nnx.Module):
    """Multi-head self-attention over H*W positions (DDPM's AttnBlock / score_sde's AttnBlockpp,
    diffusers' Attention with ``heads = C // attention_head_dim``).

    q, k, v are one fused (C, 3, C) kernel (same parameter count as three NIN layers, each
    initialised like a separate fan-avg NIN at scale 0.1); heads split its output channels in order,
    so the layout does not depend on the head count. head_dim 0 (or None): one head of all C
    channels. norm=False leaves out the GroupNorm (diffusers' middle attention under scale-shift
    conditioning). The attention itself is diffjax.models.attention.attention (fused)."""

    def __init__(
        self,
        ch: int,
        *,
        head_dim: int | None = 0,
        skip_rescale=False,
        init_scale=0.0,
        groups=None,
        eps: float = 1e-6,
        norm: bool = True,
        dtype=jnp.float32,
        rngs,
    ):
        head_dim = int(head_dim or ch)
        if head_dim <= 0 or ch % head_dim:
            raise ValueError(f"model.attention_head_dim={head_dim} must divide every attention layer's channels ({ch})")
        self.heads = ch // head_dim
        self.norm = nnx.data(L.GroupNorm(ch, groups=groups, eps=eps, dtype=dtype) if norm else None)
        init = jax.nn.initializers.variance_scaling(0.1, "fan_avg", "uniform", in_axis=0, out_axis=2, batch_axis=(1,))
        self.qkv = nnx.Param(init(rngs.params(), (ch, 3, ch), jnp.float32), **L.sharding_meta((None, None, "fsdp")))
        self.qkv_bias = nnx.Param(jnp.zeros((3, ch), jnp.float32))
        self.proj = L.dense(ch, ch, init_scale=init_scale, dtype=dtype, rngs=rngs)
        self.skip_rescale, self.dtype = skip_rescale, dtype

    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = (self.norm(x) if self.norm is not None else x.astype(self.dtype)).reshape(b, hgt * wid, c)
        qkv = jnp.einsum("bnc,cjd->jbnd", h, self.qkv[...].astype(self.dtype))
        qkv = qkv + self.qkv_bias[...].astype(self.dtype)[:, None, None, :]
        q, k, v = (qkv[i].reshape(b, hgt * wid, self.heads, c // self.heads) for i in range(3))
        h = self.proj(attention(q, k, v).reshape(b, hgt * wid, c)).reshape(x.shape)
        return (x + h) / np.sqrt(2.0) if self.skip_rescale else x + h


class ResBlock(nnx.Module):
    """Residual block: GN-act-conv (+ Dense(act(temb))) GN-act-dropout-conv, plus a shortcut.

    kind='ddpm': Ho et al.'s block (score_sde ResnetBlockDDPM/DDPMpp); 1x1 NIN shortcut (init 0.1)
      when the channel count changes.
    kind='biggan': NCSN++'s ResnetBlockBigGANpp; optional up/down-sampling of both branches (FIR or
      nearest/avg-pool) after the first norm; 1x1 conv shortcut when channels change or resampling.
    skip_rescale divides the sum by sqrt(2); init_scale is the init of the second conv (0 -> 1e-10);
    groups: the GroupNorms' group count (None: score_sde's rule); eps: their epsilon.
    time_scale_shift 'scale_shift' (FiLM, diffusers' resnet_time_scale_shift): the time projection
    has 2 out_ch outputs (scale, shift) and the second norm becomes norm2(h) * (1 + scale) + shift
    instead of adding the projection before it.
    """

    def __init__(
        self,
        in_ch,
        out_ch=None,
        *,
        temb_dim=None,
        dropout=0.1,
        kind="ddpm",
        up=False,
        down=False,
        fir=False,
        fir_kernel=(1, 3, 3, 1),
        skip_rescale=False,
        init_scale=0.0,
        act=L.swish,
        groups=None,
        eps: float = 1e-6,
        time_scale_shift: str = "default",
        dtype=jnp.float32,
        rngs,
    ):
        if kind not in ("ddpm", "biggan"):
            raise ValueError(f"resblock_type must be 'ddpm' or 'biggan', got {kind!r}")
        if kind == "ddpm" and (up or down):
            raise ValueError("only the 'biggan' block resamples")
        if time_scale_shift not in TIME_SCALE_SHIFTS:
            raise ValueError(
                f"model.resnet_time_scale_shift must be one of {', '.join(TIME_SCALE_SHIFTS)}, got {time_scale_shift!r}"
            )
        out_ch = out_ch or in_ch
        self.act, self.up, self.down, self.fir = act, up, down, fir
        self.fir_kernel, self.skip_rescale = tuple(fir_kernel), skip_rescale
        self.scale_shift = time_scale_shift == "scale_shift"
        self.norm1 = L.GroupNorm(in_ch, groups=groups, eps=eps, dtype=dtype)
        self.conv1 = L.conv(in_ch, out_ch, dtype=dtype, rngs=rngs)
        temb_out = 2 * out_ch if self.scale_shift else out_ch
        self.temb_proj = L.dense(temb_dim, temb_out, dtype=dtype, rngs=rngs) if temb_dim else None
        self.norm2 = L.GroupNorm(out_ch, groups=groups, eps=eps, dtype=dtype)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.conv2 = L.conv(out_ch, out_ch, init_scale=init_scale, dtype=dtype, rngs=rngs)
        shortcut = None
        if kind == "ddpm" and in_ch != out_ch:
            shortcut = L.dense(in_ch, out_ch, init_scale=0.1, dtype=dtype, rngs=rngs)  # NIN
        elif kind == "biggan" and (in_ch != out_ch or up or down):
            shortcut = L.dense(in_ch, out_ch, dtype=dtype, rngs=rngs)  # conv1x1
        self.shortcut = nnx.data(shortcut)

    def _resample(self, x):
        if self.up:
            return L.upsample_2d(x, self.fir_kernel) if self.fir else L.naive_upsample(x)
        if self.down:
            return L.downsample_2d(x, self.fir_kernel) if self.fir else L.naive_downsample(x)
        return x

    def __call__(self, x, temb=None, *, train=False, rngs=None):
        h = self.act(self.norm1(x))
        h, x = self._resample(h), self._resample(x)
        h = self.conv1(h)
        t = self.temb_proj(self.act(temb))[:, None, None, :] if self.temb_proj is not None and temb is not None else None
        if t is not None and self.scale_shift:
            scale, shift = jnp.split(t, 2, axis=-1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h if t is None else h + t)
        h = self.act(h)
        h = self.dropout(h, deterministic=not train, rngs=rngs)
        h = self.conv2(h)
        if self.shortcut is not None:
            x = self.shortcut(x)
        return (x + h) / np.sqrt(2.0) if self.skip_rescale else x + h


def _resblock(block: ResBlock, x, temb, train: bool, rngs):
    return block(x, temb, train=train, rngs=rngs)


def _attn(block: AttnBlock, x):
    return block(x)


@functools.cache
def remat_resblock(remat: str):
    """``fn(block, x, temb, train, rngs)`` calling a ResBlock, rematerialised per ``model.remat``."""
    return remat_call(_resblock, remat, static_argnums=(3,))


@functools.cache
def remat_attn(remat: str):
    """``fn(block, x)`` calling an AttnBlock, rematerialised per ``model.remat``."""
    return remat_call(_attn, remat)
