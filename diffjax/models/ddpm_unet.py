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

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from diffjax.models import layers as L


class _Level(nnx.Module):
    """One resolution of the UNet: residual blocks, optional attention, optional resampling."""

    def __init__(self, blocks: list[L.ResBlock], attns: list[L.AttnBlock], resample: L.Downsample | L.Upsample | None):
        self.blocks = nnx.List(blocks)
        self.attns = nnx.List(attns)  # empty when this resolution has no attention
        self.resample = resample


class DDPMUNet(nnx.Module):
    """model(x: (B,H,W,C), noise_cond: (B,), labels=None, *, train=False) -> (B,H,W,C) float32.

    noise_cond is embedded directly with the sinusoidal embedding (DDPM feeds the integer
    timestep 0..T-1; continuous VP feeds 999 t)."""

    def __init__(
        self,
        *,
        nf: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        resamp_with_conv: bool = True,
        conditional: bool = True,
        nonlinearity: str = "swish",
        num_groups: int = 0,
        embedding_type: str = "positional",
        fourier_scale: float = 16.0,
        scale_by_sigma: bool = False,
        num_classes: int = 0,
        augment_dim: int = 0,
        dtype: str = "float32",
        centered: bool = True,
        image_size: int = 32,
        num_channels: int = 3,
        learn_sigma: bool = False,
        rngs: nnx.Rngs,
    ):
        """Defaults: Ho et al.'s CIFAR-10 network. conditional: the time embedding is on;
        augment_dim: 9 to condition on EDM's augmentation labels; centered: data in [-1, 1]
        (else [0, 1], mapped to [-1, 1] first); learn_sigma: 2 num_channels outputs, the prediction
        then the variance output v (Nichol & Dhariwal 2021; diffjax.denoiser)."""
        nf, ch_mult = int(nf), L.as_tuple(ch_mult)
        nrb, attn_res = int(num_res_blocks), L.as_tuple(attn_resolutions)
        channels, dropout, with_conv = int(num_channels), float(dropout), bool(resamp_with_conv)
        self.dtype = compute_dtype = L.parse_dtype(dtype)
        self.act = act = L.get_act(nonlinearity)
        self.centered = bool(centered)
        self.scale_by_sigma = bool(scale_by_sigma)
        groups = int(num_groups) or None  # None: score_sde's min(C // 4, 32); diffusers: a fixed count
        conditional, num_classes = bool(conditional), int(num_classes)
        self.embed = L.NoiseClassEmbedding(
            nf,
            embedding_type=embedding_type,
            fourier_scale=float(fourier_scale),
            conditional=conditional,
            num_classes=num_classes,
            augment_dim=int(augment_dim),
            act=act,
            dtype=compute_dtype,
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
            dtype=compute_dtype,
            rngs=rngs,
        )
        attn = lambda c: L.AttnBlock(c, init_scale=0.0, groups=groups, dtype=compute_dtype, rngs=rngs)  # noqa: E731

        self.conv_in = L.conv(channels, nf, dtype=compute_dtype, rngs=rngs)
        skip_ch, ch, res = [nf], nf, int(image_size)
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
                resample = L.Downsample(ch, with_conv=with_conv, dtype=compute_dtype, rngs=rngs)
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
            upsample = None
            if i != 0:
                upsample = L.Upsample(ch, with_conv=with_conv, dtype=compute_dtype, rngs=rngs)
                res *= 2
            up.append(_Level(blocks, attns, upsample))
        self.up = nnx.List(up)
        assert not skip_ch

        self.norm_out = L.GroupNorm(ch, groups=groups, dtype=compute_dtype)
        self.learn_sigma = bool(learn_sigma)
        out_ch = 2 * channels if self.learn_sigma else channels
        self.conv_out = L.conv(ch, out_ch, init_scale=0.0, dtype=compute_dtype, rngs=rngs)

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
        return L.scale_output(h, noise_cond, self.scale_by_sigma, self.learn_sigma)
