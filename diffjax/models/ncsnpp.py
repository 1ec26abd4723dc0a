"""NCSN++ / DDPM++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs", App. H).

Architecture of score_sde's ``ncsnpp`` model, rewritten for Flax NNX. Keyword arguments (score_sde names):
  nf, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv,
  conditional (noise-conditional), nonlinearity, fir, fir_kernel, skip_rescale,
  resblock_type 'ddpm' | 'biggan', progressive 'none' | 'output_skip' | 'residual',
  progressive_input 'none' | 'input_skip' | 'residual', progressive_combine 'sum' | 'cat',
  init_scale, embedding_type 'fourier' | 'positional', fourier_scale, scale_by_sigma,
  plus num_classes, augment_dim, dtype, centered, image_size, num_channels and learn_sigma (2 num_channels
  outputs: the prediction, then the variance output v of diffjax.denoiser), norm_eps (every
  GroupNorm's epsilon), attention_head_dim (channels per attention head, 0: one head; diffusers'
  UNet2DModel keys) and remat ('none' | 'block' | 'dots': rematerialise each residual / attention block).
Their defaults are NCSN++ cont. (VE) on CIFAR-10 (score_sde ve/cifar10_ncsnpp_continuous);
DDPM++ differs in fir, progressive_input, embedding_type and scale_by_sigma (configs/default.ddpmpp).

Parameter counts equal score_sde's: DDPM++ cont. (VP) 61,804,419, deep 106,632,579;
NCSN++ cont. (VE) 62,758,915, deep 107,587,075.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffjax.models import blocks as B
from diffjax.models import layers as L
from diffjax.models.remat import check_remat


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


class _DownLevel(nnx.Module):
    """One resolution on the way down: residual blocks (+ attention after each), then, at all but the
    lowest resolution, the downsampling block and the input pyramid's downsampling (+ combiner)."""

    def __init__(
        self,
        blocks: list[B.ResBlock],
        attns: list[B.AttnBlock],
        resample: L.Downsample | B.ResBlock | None,
        pyramid_down: L.Downsample | None,
        combine: Combine | None,
    ):
        self.blocks, self.attns = nnx.List(blocks), nnx.List(attns)
        self.resample, self.pyramid_down, self.combine = resample, pyramid_down, combine


class _UpLevel(nnx.Module):
    """One resolution on the way up: residual blocks, optional attention, the output pyramid's head
    (norm + conv) and upsampling where ``progressive`` has them, then, below the top resolution, the upsampling block."""

    def __init__(
        self,
        blocks: list[B.ResBlock],
        attn: B.AttnBlock | None,
        pyramid_norm: L.GroupNorm | None,
        pyramid_conv: nnx.Conv | None,
        pyramid_up: L.Upsample | None,
        resample: L.Upsample | B.ResBlock | None,
    ):
        self.blocks, self.attn = nnx.List(blocks), attn
        self.pyramid_norm, self.pyramid_conv, self.pyramid_up = pyramid_norm, pyramid_conv, pyramid_up
        self.resample = resample

    def pyramid_head(self, h, act):
        """conv(act(norm(h))); built at every level for output_skip, at the lowest for residual."""
        assert self.pyramid_norm is not None and self.pyramid_conv is not None
        return self.pyramid_conv(act(self.pyramid_norm(h)))


def _rescale(a, b, skip_rescale):
    return (a + b) / np.sqrt(2.0) if skip_rescale else a + b


class NCSNpp(nnx.Module):
    """model(x: (B,H,W,C), noise_cond: (B,), labels=None, *, train=False) -> (B,H,W,C) float32."""

    def __init__(
        self,
        *,
        nf: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        resamp_with_conv: bool = True,
        conditional: bool = True,
        nonlinearity: str = "swish",
        fir: bool = True,
        fir_kernel: Sequence[int] = (1, 3, 3, 1),
        skip_rescale: bool = True,
        resblock_type: str = "biggan",
        progressive: str = "none",
        progressive_input: str = "residual",
        progressive_combine: str = "sum",
        init_scale: float = 0.0,
        embedding_type: str = "fourier",
        fourier_scale: float = 16.0,
        scale_by_sigma: bool = True,
        num_classes: int = 0,
        augment_dim: int = 0,
        dtype: str = "float32",
        centered: bool = True,
        image_size: int = 32,
        num_channels: int = 3,
        learn_sigma: bool = False,
        norm_eps: float = 1e-6,
        attention_head_dim: int = 0,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        nf, ch_mult = int(nf), L.as_tuple(ch_mult)
        nrb, attn_res = int(num_res_blocks), L.as_tuple(attn_resolutions)
        res, channels = int(image_size), int(num_channels)
        dropout, with_conv = float(dropout), bool(resamp_with_conv)
        fir, fir_kernel = bool(fir), tuple(fir_kernel)
        skip = self.skip_rescale = bool(skip_rescale)
        kind = str(resblock_type).lower()
        self.progressive = prog = str(progressive).lower()
        self.progressive_input = prog_in = str(progressive_input).lower()
        combine = str(progressive_combine).lower()
        init_scale = float(init_scale)
        self.dtype = compute_dtype = L.parse_dtype(dtype)
        self.act = act = L.get_act(nonlinearity)
        check_remat(str(remat))
        self.remat, eps, head_dim = str(remat), float(norm_eps), int(attention_head_dim)
        self.centered = bool(centered)
        self.scale_by_sigma, self.learn_sigma = bool(scale_by_sigma), bool(learn_sigma)
        out_ch = 2 * channels if self.learn_sigma else channels  # learn_sigma: the prediction, then v
        self.resblock_type = kind
        if prog not in ("none", "output_skip", "residual"):
            raise ValueError(f"progressive must be none/output_skip/residual, got {prog!r}")
        if prog_in not in ("none", "input_skip", "residual"):
            raise ValueError(f"progressive_input must be none/input_skip/residual, got {prog_in!r}")
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
        common: dict[str, Any] = dict(dtype=compute_dtype, rngs=rngs)
        resample: dict[str, Any] = dict(fir=fir, fir_kernel=fir_kernel, **common)

        def block(i, o=None, up=False, down=False):
            return B.ResBlock(
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
                eps=eps,
                **common,
            )

        attn = lambda c: B.AttnBlock(  # noqa: E731
            c, head_dim=head_dim, skip_rescale=skip, init_scale=init_scale, eps=eps, **common
        )
        gn_conv = lambda c, o, scale=1.0: (  # noqa: E731
            L.GroupNorm(c, eps=eps, dtype=compute_dtype),
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
            resampler = pyramid_down = combiner = None
            if i != len(ch_mult) - 1:
                resampler = L.Downsample(ch, with_conv=with_conv, **resample) if kind == "ddpm" else block(ch, down=True)
                res //= 2
                if prog_in == "input_skip":
                    pyramid_down = L.Downsample(pyr_ch, with_conv=False, **resample)
                    combiner = Combine(pyr_ch, ch, combine, **common)
                    ch = 2 * ch if combine == "cat" else ch
                elif prog_in == "residual":
                    pyramid_down = L.Downsample(pyr_ch, ch, with_conv=True, **resample)
                    pyr_ch = ch
                skip_ch.append(ch)
            down.append(_DownLevel(blocks, attns, resampler, pyramid_down, combiner))
        self.down = nnx.List(down)

        self.mid_block1, self.mid_attn, self.mid_block2 = block(ch), attn(ch), block(ch)

        # ---- upsampling path
        up = []
        for i, mult in reversed(list(enumerate(ch_mult))):
            blocks = []
            for _ in range(nrb + 1):
                blocks.append(block(ch + skip_ch.pop(), nf * mult))
                ch = nf * mult
            level_attn = attn(ch) if res in attn_res else None
            pyramid_norm = pyramid_conv = pyramid_up = resampler = None
            if prog == "output_skip":
                pyramid_norm, pyramid_conv = gn_conv(ch, out_ch, init_scale)
                if i != len(ch_mult) - 1:
                    pyramid_up = L.Upsample(out_ch, with_conv=False, **resample)
            elif prog == "residual":
                if i == len(ch_mult) - 1:
                    pyramid_norm, pyramid_conv = gn_conv(ch, ch)
                else:
                    pyramid_up = L.Upsample(pyr_ch, ch, with_conv=True, **resample)
                pyr_ch = ch
            if i != 0:
                resampler = L.Upsample(ch, with_conv=with_conv, **resample) if kind == "ddpm" else block(ch, up=True)
                res *= 2
            up.append(_UpLevel(blocks, level_attn, pyramid_norm, pyramid_conv, pyramid_up, resampler))
        self.up = nnx.List(up)
        assert not skip_ch

        self.norm_out: L.GroupNorm | None
        self.conv_out: nnx.Conv | None
        self.norm_out, self.conv_out = (None, None) if prog == "output_skip" else gn_conv(ch, out_ch, init_scale)

    def __call__(self, x, noise_cond, labels=None, *, augment_labels=None, train: bool = False, rngs=None):
        res, att = B.remat_resblock(self.remat), B.remat_attn(self.remat)
        act, skip = self.act, self.skip_rescale
        temb = self.embed(noise_cond, labels, augment_labels)
        x = x.astype(self.dtype)
        if not self.centered:  # data in [0, 1]
            x = 2 * x - 1
        pyramid = x if self.progressive_input != "none" else None

        hs = [self.conv_in(x)]
        for level in self.down:
            for j, blk in enumerate(level.blocks):
                h = res(blk, hs[-1], temb, train, rngs)
                if len(level.attns):
                    h = att(level.attns[j], h)
                hs.append(h)
            if level.resample is not None:
                r = level.resample
                h = res(r, hs[-1], temb, train, rngs) if isinstance(r, B.ResBlock) else r(hs[-1])
                if level.pyramid_down is not None:  # progressive_input 'input_skip' or 'residual'
                    pyramid = level.pyramid_down(pyramid)
                if level.combine is not None:  # 'input_skip'
                    h = level.combine(pyramid, h)
                elif self.progressive_input == "residual":
                    pyramid = h = _rescale(pyramid, h, skip)
                hs.append(h)

        h = res(self.mid_block1, hs[-1], temb, train, rngs)
        h = res(self.mid_block2, att(self.mid_attn, h), temb, train, rngs)

        pyramid = None
        for up_level in self.up:
            for blk in up_level.blocks:
                h = res(blk, jnp.concatenate([h, hs.pop()], axis=-1), temb, train, rngs)
            if up_level.attn is not None:
                h = att(up_level.attn, h)
            if up_level.pyramid_up is not None:  # progressive 'output_skip' or 'residual', below the top level
                pyramid = up_level.pyramid_up(pyramid)
            if self.progressive == "output_skip":
                out = up_level.pyramid_head(h, act)
                pyramid = out if pyramid is None else pyramid + out
            elif self.progressive == "residual":
                if pyramid is None:
                    pyramid = up_level.pyramid_head(h, act)
                else:
                    pyramid = h = _rescale(pyramid, h, skip)
            if up_level.resample is not None:
                up_r = up_level.resample
                h = res(up_r, h, temb, train, rngs) if isinstance(up_r, B.ResBlock) else up_r(h)
        assert not hs

        if self.progressive == "output_skip":
            h = pyramid
        else:
            assert self.norm_out is not None and self.conv_out is not None  # built unless output_skip
            h = self.conv_out(act(self.norm_out(h)))
        return L.scale_output(h.astype(jnp.float32), noise_cond, self.scale_by_sigma, self.learn_sigma)
