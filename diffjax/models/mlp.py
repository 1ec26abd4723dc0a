"""Time-conditioned residual MLP for low-dimensional toy data (x: (B, D) -> (B, D)).

  h = Dense(D -> nf)(x)
  num_res_blocks x:  h = h + Dense(dropout(act(Dense(act(h)) + Dense(act(temb)))))
  out = Dense(nf -> D)(act(h))    (zero-ish init, like the image networks' last conv)

The noise embedding is the same as the image networks' (positional or Fourier, with
num_classes for class conditioning). Keyword arguments: nf (width), num_res_blocks, dropout,
conditional, nonlinearity, init_scale (of the output layer), embedding_type, fourier_scale,
scale_by_sigma, num_classes, augment_dim, dtype, data_dim.
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
    """model(x: (B, D), noise_cond: (B,), labels=None, *, train=False) -> (B, D) float32; learn_sigma:
    (B, 2D), the prediction then the variance output v (diffjax.denoiser)."""

    def __init__(
        self,
        *,
        nf: int = 128,
        num_res_blocks: int = 3,
        dropout: float = 0.0,
        conditional: bool = True,
        nonlinearity: str = "swish",
        init_scale: float = 0.0,
        embedding_type: str = "positional",
        fourier_scale: float = 16.0,
        scale_by_sigma: bool = False,
        num_classes: int = 0,
        augment_dim: int = 0,
        dtype: str = "float32",
        data_dim: int = 2,
        learn_sigma: bool = False,
        rngs: nnx.Rngs,
    ):
        nf, dim = int(nf), int(data_dim)
        self.dtype = compute_dtype = L.parse_dtype(dtype)
        self.act = act = L.get_act(nonlinearity)
        self.scale_by_sigma, self.learn_sigma = bool(scale_by_sigma), bool(learn_sigma)
        conditional, num_classes = bool(conditional), int(num_classes)
        self.embed = L.NoiseClassEmbedding(
            nf,
            embedding_type=str(embedding_type).lower(),
            fourier_scale=float(fourier_scale),
            conditional=conditional,
            num_classes=num_classes,
            augment_dim=int(augment_dim),
            act=act,
            dtype=compute_dtype,
            rngs=rngs,
        )
        temb_dim = 4 * nf if (conditional or num_classes) else None
        self.dense_in = L.dense(dim, nf, dtype=compute_dtype, rngs=rngs)
        self.blocks = nnx.List(
            [
                _MLPBlock(nf, temb_dim, dropout=float(dropout), act=act, dtype=compute_dtype, rngs=rngs)
                for _ in range(int(num_res_blocks))
            ]
        )
        out_dim = 2 * dim if self.learn_sigma else dim
        self.dense_out = L.dense(nf, out_dim, init_scale=float(init_scale), dtype=compute_dtype, rngs=rngs)

    def __call__(self, x, noise_cond, labels=None, *, augment_labels=None, train: bool = False, rngs=None):
        temb = self.embed(noise_cond, labels, augment_labels)
        h = self.dense_in(x.astype(self.dtype))
        for blk in self.blocks:
            h = blk(h, temb, train=train, rngs=rngs)
        h = self.dense_out(self.act(h)).astype(jnp.float32)
        return L.scale_output(h, noise_cond, self.scale_by_sigma, self.learn_sigma)
