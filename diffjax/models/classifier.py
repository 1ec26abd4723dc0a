"""Noise-conditional classifiers for classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models
Beat GANs on Image Synthesis", arXiv:2105.05233, sec. 4 and App. C).

Both are called like the score networks but return logits::

    model(x, noise_cond, labels=None, *, train=False) -> (B, num_classes) float32 logits

``labels`` is accepted (and ignored) so that diffjax.network's apply drives a classifier unchanged.

- ``classifier_unet``: the encoder half of the DDPM UNet (diffjax.models.ddpm_unet: its residual
  blocks, attention and downsampling from diffjax.models.blocks / layers) and its middle block, then
  GroupNorm-act and a pooling head: ADM's attention pooling (``pool='attention'``: a mean token
  attends over every position plus a learnt position embedding, multi-head) or ``'mean'`` (global
  average pool + Dense).
- ``classifier_mlp``: the residual MLP of diffjax.models.mlp (2-D toy data) with a Dense head.

``num_classes`` is the number of outputs here (the networks are not label-conditioned);
``augment_dim`` conditions on EDM's augmentation labels as in the score networks.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from diffjax.models import blocks as B
from diffjax.models import layers as L
from diffjax.models.mlp import _MLPBlock

POOLS = ("attention", "mean")


def _check_head(num_classes: int, scale_by_sigma: bool) -> int:
    if int(num_classes) < 2:
        raise ValueError(f"a classifier needs model.num_classes >= 2 (its outputs), got {num_classes}")
    if scale_by_sigma:
        raise ValueError("model.scale_by_sigma does not apply to a classifier's logits; set it to False")
    return int(num_classes)


def _embedding(nf, embedding_type, fourier_scale, conditional, augment_dim, act, dtype, rngs) -> L.NoiseClassEmbedding:
    """The score networks' noise embedding, without a label table (a classifier predicts the label)."""
    return L.NoiseClassEmbedding(
        nf,
        embedding_type=str(embedding_type).lower(),
        fourier_scale=float(fourier_scale),
        conditional=bool(conditional),
        augment_dim=int(augment_dim),
        act=act,
        dtype=dtype,
        rngs=rngs,
    )


class AttentionPool(nnx.Module):
    """ADM's AttentionPool2d: tokens = [mean, positions] + position embedding; the mean token's
    multi-head attention output, projected to `out_dim`."""

    def __init__(self, ch: int, positions: int, out_dim: int, *, head_channels: int = 64, dtype, rngs: nnx.Rngs):
        if ch % head_channels and ch > head_channels:
            raise ValueError(f"attention pooling: {ch} channels are not a multiple of head_channels={head_channels}")
        self.heads = max(1, ch // head_channels)
        self.position = nnx.Param(jax.random.normal(rngs.params(), (positions + 1, ch), jnp.float32) / math.sqrt(ch))
        self.qkv = L.dense(ch, 3 * ch, dtype=dtype, rngs=rngs)
        self.proj = L.dense(ch, out_dim, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, h):
        b, c = h.shape[0], h.shape[-1]
        tokens = h.reshape(b, -1, c)
        tokens = jnp.concatenate([tokens.mean(1, keepdims=True), tokens], axis=1) + self.position[...].astype(self.dtype)
        q, k, v = jnp.split(self.qkv(tokens).reshape(b, tokens.shape[1], 3 * self.heads, -1), 3, axis=2)
        w = jnp.einsum("bhd,bnhd->bhn", q[:, 0], k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
        out = jnp.einsum("bhn,bnhd->bhd", jax.nn.softmax(w, axis=-1).astype(self.dtype), v)
        return self.proj(out.reshape(b, c))


class ClassifierUNet(nnx.Module):
    """The DDPM UNet's encoder + pooling head -> logits (B, num_classes)."""

    def __init__(
        self,
        *,
        nf: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16, 8),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        conditional: bool = True,
        nonlinearity: str = "swish",
        num_groups: int = 0,
        embedding_type: str = "positional",
        fourier_scale: float = 16.0,
        scale_by_sigma: bool = False,
        pool: str = "attention",
        head_channels: int = 64,
        num_classes: int = 10,
        augment_dim: int = 0,
        dtype: str = "float32",
        centered: bool = True,
        image_size: int = 32,
        num_channels: int = 3,
        rngs: nnx.Rngs,
    ):
        """Defaults: a CIFAR-10 classifier in ADM's style (its 64x64 ImageNet classifier's encoder,
        at CIFAR's width: attention at 16 and 8, attention pooling)."""
        self.num_classes = _check_head(num_classes, scale_by_sigma)
        if pool not in POOLS:
            raise ValueError(f"model.pool must be one of {POOLS}, got {pool!r}")
        nf, res, groups = int(nf), int(image_size), int(num_groups) or None
        self.dtype = dt = L.parse_dtype(dtype)
        self.act = act = L.get_act(nonlinearity)
        self.centered = bool(centered)
        self.embed = _embedding(nf, embedding_type, fourier_scale, conditional, augment_dim, act, dt, rngs)
        temb = 4 * nf if conditional else None
        block = lambda i, o: B.ResBlock(  # noqa: E731
            i, o, temb_dim=temb, dropout=float(dropout), init_scale=0.0, act=act, groups=groups, dtype=dt, rngs=rngs
        )
        attn = lambda c: B.AttnBlock(c, init_scale=0.0, groups=groups, dtype=dt, rngs=rngs)  # noqa: E731
        self.conv_in = L.conv(int(num_channels), nf, dtype=dt, rngs=rngs)
        layers: list[nnx.Module] = []  # applied in order; ResBlocks take the time embedding
        ch, mults = nf, L.as_tuple(ch_mult)
        for i, mult in enumerate(mults):
            for _ in range(int(num_res_blocks)):
                layers.append(block(ch, nf * mult))
                ch = nf * mult
                if res in L.as_tuple(attn_resolutions):
                    layers.append(attn(ch))
            if i != len(mults) - 1:
                layers.append(L.Downsample(ch, with_conv=bool(resamp_with_conv), dtype=dt, rngs=rngs))
                res //= 2
        layers += [block(ch, ch), attn(ch), block(ch, ch)]  # the UNet's middle
        self.layers = nnx.List(layers)
        self.norm_out = L.GroupNorm(ch, groups=groups, dtype=dt)
        if pool == "attention":
            self.head: nnx.Module = AttentionPool(
                ch, res * res, self.num_classes, head_channels=head_channels, dtype=dt, rngs=rngs
            )
        else:
            self.head = L.dense(ch, self.num_classes, dtype=dt, rngs=rngs)
        self.pool = pool

    def __call__(self, x, noise_cond, labels=None, *, augment_labels=None, train: bool = False, rngs=None):
        del labels  # the classifier predicts them
        temb = self.embed(noise_cond, None, augment_labels)
        h = x.astype(self.dtype)
        h = self.conv_in(h if self.centered else 2 * h - 1)
        for layer in self.layers:
            h = layer(h, temb, train=train, rngs=rngs) if isinstance(layer, B.ResBlock) else layer(h)
        h = self.act(self.norm_out(h))
        return self.head(h if self.pool == "attention" else h.mean(axis=(1, 2))).astype(jnp.float32)


class ClassifierMLP(nnx.Module):
    """The residual MLP of diffjax.models.mlp with a Dense head -> logits (B, num_classes)."""

    def __init__(
        self,
        *,
        nf: int = 128,
        num_res_blocks: int = 3,
        dropout: float = 0.0,
        conditional: bool = True,
        nonlinearity: str = "swish",
        embedding_type: str = "positional",
        fourier_scale: float = 16.0,
        scale_by_sigma: bool = False,
        num_classes: int = 8,
        augment_dim: int = 0,
        dtype: str = "float32",
        data_dim: int = 2,
        rngs: nnx.Rngs,
    ):
        self.num_classes = _check_head(num_classes, scale_by_sigma)
        nf = int(nf)
        self.dtype = dt = L.parse_dtype(dtype)
        self.act = act = L.get_act(nonlinearity)
        self.embed = _embedding(nf, embedding_type, fourier_scale, conditional, augment_dim, act, dt, rngs)
        temb = 4 * nf if conditional else None
        self.dense_in = L.dense(int(data_dim), nf, dtype=dt, rngs=rngs)
        blocks = [
            _MLPBlock(nf, temb, dropout=float(dropout), act=act, dtype=dt, rngs=rngs) for _ in range(int(num_res_blocks))
        ]
        self.blocks = nnx.List(blocks)
        self.head = L.dense(nf, self.num_classes, dtype=dt, rngs=rngs)

    def __call__(self, x, noise_cond, labels=None, *, augment_labels=None, train: bool = False, rngs=None):
        del labels
        temb = self.embed(noise_cond, None, augment_labels)
        h = self.dense_in(x.astype(self.dtype))
        for blk in self.blocks:
            h = blk(h, temb, train=train, rngs=rngs)
        return self.head(self.act(h)).astype(jnp.float32)
