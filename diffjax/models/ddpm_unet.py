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

diffusers' UNet2DModel options (each default is the DDPM release's): ``norm_eps``,
``attention_head_dim`` (channels per head; 0: one head), ``downsample_padding``,
``resnet_time_scale_shift``, ``add_attention`` (the middle attention), ``mid_attn_norm``,
``resblock_nonlinearity`` (diffusers' act_fn: the residual blocks' activation only; '' = nonlinearity)
and ``freq_shift``. ``remat`` ('none' | 'block' | 'dots') rematerialises each residual / attention block.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from diffjax.models import blocks as B
from diffjax.models import layers as L
from diffjax.models.remat import check_remat


class _Level(nnx.Module):
    """One resolution of the UNet: residual blocks, optional attention, optional resampling."""

    def __init__(self, blocks: list[B.ResBlock], attns: list[B.AttnBlock], resample: L.Downsample | L.Upsample | None):
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
        norm_eps: float = 1e-6,
        attention_head_dim: int = 0,
        downsample_padding: int = 0,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        mid_attn_norm: bool = True,
        resblock_nonlinearity: str = "",
        freq_shift: float = 1.0,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        """Defaults: Ho et al.'s CIFAR-10 network. conditional: the time embedding is on;
        augment_dim: 9 to condition on EDM's augmentation labels; centered: data in [-1, 1]
        (else [0, 1], mapped to [-1, 1] first); learn_sigma: 2 num_channels outputs, the prediction
        then the variance output v (Nichol & Dhariwal 2021; diffjax.denoiser). norm_eps: every
        GroupNorm's epsilon; attention_head_dim: channels per attention head (0: one head);
        downsample_padding 0 pads (0, 1) before the stride-2 conv (DDPM), 1 pads (1, 1) (diffusers);
        resnet_time_scale_shift 'scale_shift': FiLM norm2(h) (1 + scale) + shift in the residual
        blocks; add_attention False: no middle attention; mid_attn_norm False: the middle attention
        has no GroupNorm; freq_shift: the sinusoid's w_i = 10000^(-i / (nf / 2 - freq_shift))."""
        nf, ch_mult = int(nf), L.as_tuple(ch_mult)
        nrb, attn_res = int(num_res_blocks), L.as_tuple(attn_resolutions)
        channels, dropout, with_conv = int(num_channels), float(dropout), bool(resamp_with_conv)
        self.dtype = compute_dtype = L.parse_dtype(dtype)
        self.act = act = L.get_act(nonlinearity)
        block_act = L.get_act(resblock_nonlinearity) if resblock_nonlinearity else act
        check_remat(str(remat))
        self.remat, eps, head_dim = str(remat), float(norm_eps), int(attention_head_dim)
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
            freq_shift=float(freq_shift),
            dtype=compute_dtype,
            rngs=rngs,
        )
        temb_dim = 4 * nf if (conditional or num_classes) else None
        block = lambda i, o: B.ResBlock(  # noqa: E731
            i,
            o,
            temb_dim=temb_dim,
            dropout=dropout,
            kind="ddpm",
            init_scale=0.0,
            act=block_act,
            groups=groups,
            eps=eps,
            time_scale_shift=str(resnet_time_scale_shift),
            dtype=compute_dtype,
            rngs=rngs,
        )
        attn = lambda c, norm=True: B.AttnBlock(  # noqa: E731
            c, head_dim=head_dim, init_scale=0.0, groups=groups, eps=eps, norm=norm, dtype=compute_dtype, rngs=rngs
        )
        pad = int(downsample_padding)

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
                resample = L.Downsample(ch, with_conv=with_conv, padding=pad, dtype=compute_dtype, rngs=rngs)
                skip_ch.append(ch)
                res //= 2
            down.append(_Level(blocks, attns, resample))
        self.down = nnx.List(down)

        self.mid_block1 = block(ch, ch)  # built in this order: the same seed gives the same weights as before
        self.mid_attn = nnx.data(attn(ch, bool(mid_attn_norm)) if add_attention else None)
        self.mid_block2 = block(ch, ch)

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

        self.norm_out = L.GroupNorm(ch, groups=groups, eps=eps, dtype=compute_dtype)
        self.learn_sigma = bool(learn_sigma)
        out_ch = 2 * channels if self.learn_sigma else channels
        self.conv_out = L.conv(ch, out_ch, init_scale=0.0, dtype=compute_dtype, rngs=rngs)

    def __call__(self, x, noise_cond, labels=None, *, augment_labels=None, train: bool = False, rngs=None):
        res, att = B.remat_resblock(self.remat), B.remat_attn(self.remat)
        temb = self.embed(noise_cond, labels, augment_labels)
        h = x.astype(self.dtype)
        if not self.centered:  # data in [0, 1]
            h = 2 * h - 1
        hs = [self.conv_in(h)]
        for level in self.down:
            for j, blk in enumerate(level.blocks):
                h = res(blk, hs[-1], temb, train, rngs)
                if len(level.attns):
                    h = att(level.attns[j], h)
                hs.append(h)
            if level.resample is not None:
                hs.append(level.resample(hs[-1]))

        h = res(self.mid_block1, hs[-1], temb, train, rngs)
        if self.mid_attn is not None:
            h = att(self.mid_attn, h)
        h = res(self.mid_block2, h, temb, train, rngs)

        for level in self.up:
            for j, blk in enumerate(level.blocks):
                h = res(blk, jnp.concatenate([h, hs.pop()], axis=-1), temb, train, rngs)
                if len(level.attns):
                    h = att(level.attns[j], h)
            if level.resample is not None:
                h = level.resample(h)
        assert not hs

        h = self.conv_out(self.act(self.norm_out(h))).astype(jnp.float32)
        return L.scale_output(h, noise_cond, self.scale_by_sigma, self.learn_sigma)
