"""NCSN++ / DDPM++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs", App. H).

Architecture of score_sde's ``ncsnpp`` model, rewritten for Flax NNX. Config fields (score_sde names):
  nf, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv,
  conditional (noise-conditional), fir, fir_kernel, skip_rescale,
  resblock_type 'ddpm' | 'biggan', progressive 'none' | 'output_skip' | 'residual',
  progressive_input 'none' | 'input_skip' | 'residual', progressive_combine 'sum' | 'cat',
  init_scale, embedding_type 'fourier' | 'positional', fourier_scale, scale_by_sigma,
  plus num_classes, dtype, centered, image_size, num_channels.

Parameter counts equal score_sde's: DDPM++ cont. (VP) 61,804,419, deep 106,632,579;
NCSN++ cont. (VE) 62,758,915, deep 107,587,075.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffjax.models import layers as L


class Combine(nnx.Module):
    """Progressive-input combiner: 1x1 conv of the pyramid to h's channels, then sum or concat."""

    def __init__(self, in_ch, out_ch, method, *, dtype, rngs):
        if method not in ("sum", "cat"):
            raise ValueError(f"progressive_combine must be 'sum' or 'cat', got {method!r}")
        self.method = method
        self.proj = L.dense(in_ch, out_ch, dtype=dtype, rngs=rngs)

    def __call__(self, pyramid, h):
        p = self.proj(pyramid)
        return p + h if self.method == "sum" else jnp.concatenate([p, h], axis=-1)


class _Level(nnx.Module):
    def __init__(self, **parts):
        for name, value in parts.items():
            setattr(self, name, nnx.List(value) if isinstance(value, list) else value)


def _rescale(a, b, skip_rescale):
    return (a + b) / np.sqrt(2.0) if skip_rescale else a + b


class NCSNpp(nnx.Module):
    """model(x: (B,H,W,C), noise_cond: (B,), labels=None, *, train=False) -> (B,H,W,C) float32."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        g = lambda name, default: L.cfg_get(config, name, default)  # noqa: E731
        nf, ch_mult = int(g("nf", 128)), L.as_tuple(g("ch_mult", (1, 2, 2, 2)))
        nrb, attn_res = int(g("num_res_blocks", 4)), L.as_tuple(g("attn_resolutions", (16,)))
        res, channels = int(g("image_size", 32)), int(g("num_channels", 3))
        dropout, with_conv = float(g("dropout", 0.1)), bool(g("resamp_with_conv", True))
        fir, fir_kernel = bool(g("fir", False)), tuple(g("fir_kernel", (1, 3, 3, 1)))
        skip = self.skip_rescale = bool(g("skip_rescale", True))
        kind = str(g("resblock_type", "biggan")).lower()
        self.progressive = prog = str(g("progressive", "none")).lower()
        self.progressive_input = prog_in = str(g("progressive_input", "none")).lower()
        combine = str(g("progressive_combine", "sum")).lower()
        init_scale = float(g("init_scale", 0.0))
        self.dtype = dtype = L.parse_dtype(g("dtype", "float32"))
        self.act = act = L.get_act(g("nonlinearity", "swish"))
        self.centered = bool(g("centered", True))
        self.scale_by_sigma = bool(g("scale_by_sigma", False))
        self.resblock_type = kind
        if prog not in ("none", "output_skip", "residual"):
            raise ValueError(f"progressive must be none/output_skip/residual, got {prog!r}")
        if prog_in not in ("none", "input_skip", "residual"):
            raise ValueError(f"progressive_input must be none/input_skip/residual, got {prog_in!r}")
        conditional, num_classes = bool(g("conditional", True)), int(g("num_classes", 0))
        self.embed = L.NoiseClassEmbedding(
            nf,
            embedding_type=str(g("embedding_type", "fourier")).lower(),
            fourier_scale=float(g("fourier_scale", 16.0)),
            conditional=conditional,
            num_classes=num_classes,
            augment_dim=int(g("augment_dim", 0)),
            act=act,
            dtype=dtype,
            rngs=rngs,
        )
        temb_dim = 4 * nf if (conditional or num_classes) else None
        common = dict(dtype=dtype, rngs=rngs)
        resample = dict(fir=fir, fir_kernel=fir_kernel, **common)

        def block(i, o=None, up=False, down=False):
            return L.ResBlock(
                i,
                o,
                temb_dim=temb_dim,
                dropout=dropout,
                kind=kind,
                up=up,
                down=down,
                fir=fir,
                fir_kernel=fir_kernel,
                skip_rescale=skip,
                init_scale=init_scale,
                act=act,
                **common,
            )

        attn = lambda c: L.AttnBlock(c, skip_rescale=skip, init_scale=init_scale, **common)  # noqa: E731
        gn_conv = lambda c, o, scale=1.0: (
            L.GroupNorm(c, dtype=dtype),  # noqa: E731
            L.conv(c, o, init_scale=scale, **common),
        )

        # ---- downsampling path (channel bookkeeping mirrors the forward pass)
        self.conv_in = L.conv(channels, nf, **common)
        skip_ch, ch, pyr_ch = [nf], nf, channels
        down = []
        for i, mult in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(nrb):
                blocks.append(block(ch, nf * mult))
                ch = nf * mult
                if res in attn_res:
                    attns.append(attn(ch))
                skip_ch.append(ch)
            parts = dict(blocks=blocks, attns=attns, resample=None, pyramid_down=None, combine=None)
            if i != len(ch_mult) - 1:
                parts["resample"] = (
                    L.Downsample(ch, with_conv=with_conv, **resample) if kind == "ddpm" else block(ch, down=True)
                )
                res //= 2
                if prog_in == "input_skip":
                    parts["pyramid_down"] = L.Downsample(pyr_ch, with_conv=False, **resample)
                    parts["combine"] = Combine(pyr_ch, ch, combine, **common)
                    ch = 2 * ch if combine == "cat" else ch
                elif prog_in == "residual":
                    parts["pyramid_down"] = L.Downsample(pyr_ch, ch, with_conv=True, **resample)
                    pyr_ch = ch
                skip_ch.append(ch)
            down.append(_Level(**parts))
        self.down = nnx.List(down)

        self.mid_block1, self.mid_attn, self.mid_block2 = block(ch), attn(ch), block(ch)

        # ---- upsampling path
        up, pyr_ch = [], None
        for i, mult in reversed(list(enumerate(ch_mult))):
            blocks = []
            for _ in range(nrb + 1):
                blocks.append(block(ch + skip_ch.pop(), nf * mult))
                ch = nf * mult
            parts = dict(
                blocks=blocks,
                attn=attn(ch) if res in attn_res else None,
                pyramid_norm=None,
                pyramid_conv=None,
                pyramid_up=None,
                resample=None,
            )
            if prog == "output_skip":
                parts["pyramid_norm"], parts["pyramid_conv"] = gn_conv(ch, channels, init_scale)
                if i != len(ch_mult) - 1:
                    parts["pyramid_up"] = L.Upsample(channels, with_conv=False, **resample)
            elif prog == "residual":
                if i == len(ch_mult) - 1:
                    parts["pyramid_norm"], parts["pyramid_conv"] = gn_conv(ch, ch)
                else:
                    parts["pyramid_up"] = L.Upsample(pyr_ch, ch, with_conv=True, **resample)
                pyr_ch = ch
            if i != 0:
                parts["resample"] = L.Upsample(ch, with_conv=with_conv, **resample) if kind == "ddpm" else block(ch, up=True)
                res *= 2
            up.append(_Level(**parts))
        self.up = nnx.List(up)
        assert not skip_ch

        self.norm_out, self.conv_out = (None, None) if prog == "output_skip" else gn_conv(ch, channels, init_scale)

    def __call__(self, x, noise_cond, labels=None, *, augment_labels=None, train: bool = False, rngs=None):
        kw = dict(train=train, rngs=rngs)
        act, skip = self.act, self.skip_rescale
        temb = self.embed(noise_cond, labels, augment_labels)
        x = x.astype(self.dtype)
        if not self.centered:  # data in [0, 1]
            x = 2 * x - 1
        pyramid = x if self.progressive_input != "none" else None

        hs = [self.conv_in(x)]
        for level in self.down:
            for j, blk in enumerate(level.blocks):
                h = blk(hs[-1], temb, **kw)
                if len(level.attns):
                    h = level.attns[j](h)
                hs.append(h)
            if level.resample is not None:
                h = level.resample(hs[-1]) if self.resblock_type == "ddpm" else level.resample(hs[-1], temb, **kw)
                if self.progressive_input == "input_skip":
                    pyramid = level.pyramid_down(pyramid)
                    h = level.combine(pyramid, h)
                elif self.progressive_input == "residual":
                    pyramid = _rescale(level.pyramid_down(pyramid), h, skip)
                    h = pyramid
                hs.append(h)

        h = self.mid_block2(self.mid_attn(self.mid_block1(hs[-1], temb, **kw)), temb, **kw)

        pyramid = None
        for level in self.up:
            for blk in level.blocks:
                h = blk(jnp.concatenate([h, hs.pop()], axis=-1), temb, **kw)
            if level.attn is not None:
                h = level.attn(h)
            if self.progressive == "output_skip":
                out = level.pyramid_conv(act(level.pyramid_norm(h)))
                pyramid = out if pyramid is None else level.pyramid_up(pyramid) + out
            elif self.progressive == "residual":
                if pyramid is None:
                    pyramid = level.pyramid_conv(act(level.pyramid_norm(h)))
                else:
                    pyramid = _rescale(level.pyramid_up(pyramid), h, skip)
                    h = pyramid
            if level.resample is not None:
                h = level.resample(h) if self.resblock_type == "ddpm" else level.resample(h, temb, **kw)
        assert not hs

        if self.progressive == "output_skip":
            h = pyramid
        else:
            h = self.conv_out(act(self.norm_out(h)))
        h = h.astype(jnp.float32)
        if self.scale_by_sigma:
            h = h / noise_cond.astype(jnp.float32).reshape((-1,) + (1,) * (h.ndim - 1))
        return h
