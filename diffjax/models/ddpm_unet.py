"""The DDPM UNet of Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", Appendix B).

CIFAR-10: nf=128, ch_mult (1, 2, 2, 2), 2 residual blocks per resolution, self-attention at
16x16, dropout 0.1, sinusoidal timestep embedding -> Dense(512) -> swish -> Dense(512),
GroupNorm(32) (``num_groups``: 0 for score_sde's min(C // 4, 32), or a fixed count as diffusers'
``norm_num_groups``), swish. 35,746,307 parameters, the same count as diffusers' UNet2DModel with
block_out_channels (128, 256, 256, 256), attention blocks at 16x16 and layers_per_block 2
(35.7M in the paper).

Layout (as in Ho's diffusion_tf/models/unet.py): on the way up, attention follows *every*
residual block of an attention resolution (score_sde's ddpm.py applies it once per level, which
gives fewer parameters).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from diffjax.models import layers as L


class _Level(nnx.Module):
    """One resolution of the UNet: residual blocks, optional attention, optional resampling."""

    def __init__(self, blocks, attns, resample):
        self.blocks = nnx.List(blocks)
        self.attns = nnx.List(attns)  # empty when this resolution has no attention
        self.resample = resample


class DDPMUNet(nnx.Module):
    """model(x: (B,H,W,C), noise_cond: (B,), labels=None, *, train=False) -> (B,H,W,C) float32.

    noise_cond is embedded directly with the sinusoidal embedding (DDPM feeds the integer
    timestep 0..T-1; continuous VP feeds 999 t)."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        g = lambda name, default: L.cfg_get(config, name, default)  # noqa: E731
        nf, ch_mult = int(g("nf", 128)), L.as_tuple(g("ch_mult", (1, 2, 2, 2)))
        nrb, attn_res = int(g("num_res_blocks", 2)), L.as_tuple(g("attn_resolutions", (16,)))
        image_size, channels = int(g("image_size", 32)), int(g("num_channels", 3))
        dropout, with_conv = float(g("dropout", 0.1)), bool(g("resamp_with_conv", True))
        self.dtype = dtype = L.parse_dtype(g("dtype", "float32"))
        self.act = act = L.get_act(g("nonlinearity", "swish"))
        self.centered = bool(g("centered", True))
        self.scale_by_sigma = bool(g("scale_by_sigma", False))
        groups = int(g("num_groups", 0)) or None  # None: score_sde's min(C // 4, 32); diffusers: a fixed count
        conditional = bool(g("conditional", True))
        num_classes = int(g("num_classes", 0))
        self.embed = L.NoiseClassEmbedding(
            nf,
            embedding_type=g("embedding_type", "positional"),
            fourier_scale=float(g("fourier_scale", 16.0)),
            conditional=conditional,
            num_classes=num_classes,
            augment_dim=int(g("augment_dim", 0)),
            act=act,
            dtype=dtype,
            rngs=rngs,
        )
        temb_dim = 4 * nf if (conditional or num_classes) else None
        block = lambda i, o: L.ResBlock(
            i,
            o,
            temb_dim=temb_dim,
            dropout=dropout,
            kind="ddpm",  # noqa: E731
            init_scale=0.0,
            act=act,
            groups=groups,
            dtype=dtype,
            rngs=rngs,
        )
        attn = lambda c: L.AttnBlock(c, init_scale=0.0, groups=groups, dtype=dtype, rngs=rngs)  # noqa: E731

        self.conv_in = L.conv(channels, nf, dtype=dtype, rngs=rngs)
        skip_ch, ch, res = [nf], nf, image_size
        down = []
        for i, mult in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(nrb):
                blocks.append(block(ch, nf * mult))
                ch = nf * mult
                if res in attn_res:
                    attns.append(attn(ch))
                skip_ch.append(ch)
            resample = None
            if i != len(ch_mult) - 1:
                resample = L.Downsample(ch, with_conv=with_conv, dtype=dtype, rngs=rngs)
                skip_ch.append(ch)
                res //= 2
            down.append(_Level(blocks, attns, resample))
        self.down = nnx.List(down)

        self.mid_block1, self.mid_attn, self.mid_block2 = block(ch, ch), attn(ch), block(ch, ch)

        up = []
        for i, mult in reversed(list(enumerate(ch_mult))):
            blocks, attns = [], []
            for _ in range(nrb + 1):
                blocks.append(block(ch + skip_ch.pop(), nf * mult))
                ch = nf * mult
                if res in attn_res:
                    attns.append(attn(ch))
            resample = None
            if i != 0:
                resample = L.Upsample(ch, with_conv=with_conv, dtype=dtype, rngs=rngs)
                res *= 2
            up.append(_Level(blocks, attns, resample))
        self.up = nnx.List(up)
        assert not skip_ch

        self.norm_out = L.GroupNorm(ch, groups=groups, dtype=dtype)
        self.conv_out = L.conv(ch, channels, init_scale=0.0, dtype=dtype, rngs=rngs)

    def __call__(self, x, noise_cond, labels=None, *, augment_labels=None, train: bool = False, rngs=None):
        kw = dict(train=train, rngs=rngs)
        temb = self.embed(noise_cond, labels, augment_labels)
        h = x.astype(self.dtype)
        if not self.centered:  # data in [0, 1]
            h = 2 * h - 1
        hs = [self.conv_in(h)]
        for level in self.down:
            for j, blk in enumerate(level.blocks):
                h = blk(hs[-1], temb, **kw)
                if len(level.attns):
                    h = level.attns[j](h)
                hs.append(h)
            if level.resample is not None:
                hs.append(level.resample(hs[-1]))

        h = self.mid_block2(self.mid_attn(self.mid_block1(hs[-1], temb, **kw)), temb, **kw)

        for level in self.up:
            for j, blk in enumerate(level.blocks):
                h = blk(jnp.concatenate([h, hs.pop()], axis=-1), temb, **kw)
                if len(level.attns):
                    h = level.attns[j](h)
            if level.resample is not None:
                h = level.resample(h)
        assert not hs

        h = self.conv_out(self.act(self.norm_out(h))).astype(jnp.float32)
        if self.scale_by_sigma:
            h = h / noise_cond.astype(jnp.float32).reshape((-1,) + (1,) * (h.ndim - 1))
        return h
