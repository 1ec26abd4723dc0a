"""Time-conditioned residual MLP for low-dimensional toy data (x: (B, D) -> (B, D)).

  h = Dense(D -> nf)(x)
  num_res_blocks x:  h = h + Dense(dropout(act(Dense(act(h)) + Dense(act(temb)))))
  out = Dense(nf -> D)(act(h))    (zero-ish init, like the image networks' last conv)

The noise embedding is the same as the image networks' (positional or Fourier, with
num_classes for class conditioning). Config fields: nf (width), num_res_blocks, dropout,
embedding_type, fourier_scale, conditional, num_classes, scale_by_sigma, data_dim, dtype.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from diffjax.models import layers as L


class _MLPBlock(nnx.Module):
    def __init__(self, width, temb_dim, *, dropout, act, dtype, rngs):
        self.act = act
        self.dense1 = L.dense(width, width, dtype=dtype, rngs=rngs)
        self.temb_proj = L.dense(temb_dim, width, dtype=dtype, rngs=rngs) if temb_dim else None
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.dense2 = L.dense(width, width, init_scale=0.0, dtype=dtype, rngs=rngs)

    def __call__(self, h, temb, *, train=False, rngs=None):
        z = self.dense1(self.act(h))
        if self.temb_proj is not None and temb is not None:
            z = z + self.temb_proj(self.act(temb))
        z = self.dropout(self.act(z), deterministic=not train, rngs=rngs)
        return h + self.dense2(z)


class MLP(nnx.Module):
    """model(x: (B, D), noise_cond: (B,), labels=None, *, train=False) -> (B, D) float32."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        g = lambda name, default: L.cfg_get(config, name, default)  # noqa: E731
        nf, dim = int(g("nf", 128)), int(g("data_dim", 2))
        self.dtype = dtype = L.parse_dtype(g("dtype", "float32"))
        self.act = act = L.get_act(g("nonlinearity", "swish"))
        self.scale_by_sigma = bool(g("scale_by_sigma", False))
        conditional, num_classes = bool(g("conditional", True)), int(g("num_classes", 0))
        self.embed = L.NoiseClassEmbedding(
            nf,
            embedding_type=str(g("embedding_type", "positional")).lower(),
            fourier_scale=float(g("fourier_scale", 16.0)),
            conditional=conditional,
            num_classes=num_classes,
            augment_dim=int(g("augment_dim", 0)),
            act=act,
            dtype=dtype,
            rngs=rngs,
        )
        temb_dim = 4 * nf if (conditional or num_classes) else None
        self.dense_in = L.dense(dim, nf, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List(
            [
                _MLPBlock(nf, temb_dim, dropout=float(g("dropout", 0.0)), act=act, dtype=dtype, rngs=rngs)
                for _ in range(int(g("num_res_blocks", 3)))
            ]
        )
        self.dense_out = L.dense(nf, dim, init_scale=float(g("init_scale", 0.0)), dtype=dtype, rngs=rngs)

    def __call__(self, x, noise_cond, labels=None, *, augment_labels=None, train: bool = False, rngs=None):
        temb = self.embed(noise_cond, labels, augment_labels)
        h = self.dense_in(x.astype(self.dtype))
        for blk in self.blocks:
            h = blk(h, temb, train=train, rngs=rngs)
        h = self.dense_out(self.act(h)).astype(jnp.float32)
        if self.scale_by_sigma:
            h = h / noise_cond.astype(jnp.float32)[:, None]
        return h
