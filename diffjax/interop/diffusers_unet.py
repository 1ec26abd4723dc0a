"""diffusers ``UNet2DModel`` -> diffjax: the config translation and the weight mapping.

Two families of diffusers' UNet2DModel are ours exactly:
- DDPM UNet (``DownBlock2D`` / ``AttnDownBlock2D`` ... ``UpBlock2D`` / ``AttnUpBlock2D``: the layout
  of ``google/ddpm-cifar10-32`` and the 256x256 DDPM releases) -> ``ddpm_unet`` with
  ``num_groups`` = diffusers' ``norm_num_groups``.
- NCSN++ as diffusers ports score_sde's VE models (``SkipDownBlock2D`` / ``AttnSkipDownBlock2D`` ...
  ``SkipUpBlock2D`` / ``AttnSkipUpBlock2D``: BigGAN blocks with FIR resampling, an input-skip pyramid
  summed in, an output-skip pyramid, skip rescaling, Fourier embedding of log sigma, output / sigma)
  -> ``ncsnpp`` with progressive 'output_skip', progressive_input 'input_skip'.
The DDPM UNet family takes diffusers' UNet2DModel options (its defaults included, as
``train_unconditional.py`` trains): ``norm_eps``, ``attention_head_dim`` (multi-head attention),
``downsample_padding`` 0 | 1, ``resnet_time_scale_shift`` 'default' | 'scale_shift' (with
``attn_norm_num_groups`` None the middle attention then has no GroupNorm), ``add_attention``,
``act_fn`` (the residual blocks'; the time embedding and output keep SiLU), ``freq_shift`` and
``flip_sin_to_cos``; NCSN++ takes ``norm_eps`` and ``attention_head_dim``. Anything else (another
block type, a class embedding, spatial conditioning, resnet resampling) raises ``UnsupportedModel``
naming the diffusers config key and value.

A DDPM UNet with out_channels = 2 in_channels (Nichol & Dhariwal's learned variance) is imported
with ``learn_sigma``: its second half of output channels is the variance output in diffusers'
``learned_range`` convention, v in [-1, 1] giving log beta-tilde .. log beta; ours (diffjax.denoiser)
is the weight (v + 1) / 2, so those output channels of ``conv_out`` are mapped affinely (kernel / 2,
bias / 2 + 1 / 2).

Weights: torch layouts (conv OIHW, linear (out, in)) -> ours (conv HWIO, dense (in, out), the
attention's q/k/v stacked into one (C, 3, C) kernel). Every tensor of the file is used exactly
once and every parameter of ours is filled, or ``WeightsError`` names what is missing or extra.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import numpy as np

from diffjax.models.layers import num_groups

DDPM_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
DDPM_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
SKIP_DOWN = {"SkipDownBlock2D": False, "AttnSkipDownBlock2D": True}
SKIP_UP = {"SkipUpBlock2D": False, "AttnSkipUpBlock2D": True}
ACT_FNS = {"silu": "swish", "swish": "swish", "mish": "mish", "gelu": "gelu", "relu": "relu"}  # diffusers' act_fn


class UnsupportedModel(ValueError):
    """The diffusers model uses a block or option diffjax's networks do not compute."""


class WeightsError(ValueError):
    """The weights file does not hold exactly the tensors the config describes."""


def _fail(field: str, value, allowed: str) -> None:
    raise UnsupportedModel(f"unsupported diffusers UNet2DModel: {field}={value!r} ({allowed})")


def _expect(cfg: dict, field: str, allowed: tuple, default=None, why: str = "") -> None:
    value = cfg.get(field, default)
    if value not in allowed:
        _fail(field, value, f"diffjax supports {', '.join(map(repr, allowed))}" + (f"; {why}" if why else ""))


def model_config(cfg: dict) -> tuple[dict, str]:
    """(diffjax ``config.model`` entries, family 'ddpm' | 'ncsnpp') of a diffusers UNet2DModel config.

    The entries are name and keyword arguments of that network (diffjax.models.parameters) only."""
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        _fail("_class_name", cfg.get("_class_name"), "only UNet2DModel is imported")
    down, up = list(cfg.get("down_block_types", ())), list(cfg.get("up_block_types", ()))
    channels = [int(c) for c in cfg.get("block_out_channels", ())]
    if not down or len(down) != len(up) or len(down) != len(channels):
        _fail("down_block_types", down, "needs as many down blocks, up blocks and block_out_channels")
    if all(b in DDPM_DOWN for b in down) and all(b in DDPM_UP for b in up):
        family, down_attn, up_attn = "ddpm", [DDPM_DOWN[b] for b in down], [DDPM_UP[b] for b in up]
    elif all(b in SKIP_DOWN for b in down) and all(b in SKIP_UP for b in up):
        family, down_attn, up_attn = "ncsnpp", [SKIP_DOWN[b] for b in down], [SKIP_UP[b] for b in up]
    else:
        known = {**DDPM_DOWN, **DDPM_UP, **SKIP_DOWN, **SKIP_UP}
        bad = [b for b in down + up if b not in known] or down + up
        _fail(
            "block types",
            bad,
            "diffjax imports the DDPM UNet (DownBlock2D, AttnDownBlock2D, UpBlock2D, "
            "AttnUpBlock2D) and the NCSN++ port (SkipDownBlock2D, AttnSkipDownBlock2D, SkipUpBlock2D, "
            "AttnSkipUpBlock2D), one family per model",
        )
    if up_attn != down_attn[::-1]:
        _fail("up_block_types", up, "attention must sit at the same resolutions on the way down and up")

    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            _fail("sample_size", size, "square images only")
        size = size[0]
    if not isinstance(size, int) or size % 2 ** (len(channels) - 1):
        _fail("sample_size", size, f"an int divisible by 2^{len(channels) - 1}")
    in_ch, out_ch = int(cfg.get("in_channels", 3)), int(cfg.get("out_channels", 3))
    if out_ch not in (in_ch, 2 * in_ch):
        _fail("out_channels", out_ch, f"must equal in_channels={in_ch} (or twice it: a learned variance)")
    if out_ch != in_ch and family != "ddpm":
        _fail("out_channels", out_ch, f"a learned variance (out_channels = 2 x {in_ch}) is imported for the DDPM UNet only")
    nf = channels[0]
    if any(c % nf for c in channels):
        _fail("block_out_channels", channels, "each a multiple of the first")
    ddpm = family == "ddpm"
    _expect(cfg, "act_fn", tuple(ACT_FNS) if ddpm else ("silu", "swish"), "silu")
    shift = cfg.get("resnet_time_scale_shift", "default")
    _expect(cfg, "resnet_time_scale_shift", ("default", "scale_shift") if ddpm else ("default",), "default")
    _expect(cfg, "class_embed_type", (None,), None)
    _expect(cfg, "num_class_embeds", (None,), None, "class-conditional imports are not built")
    _expect(cfg, "mid_block_type", ("UNetMidBlock2D",), "UNetMidBlock2D")
    add_attention = cfg.get("add_attention", True)
    _expect(cfg, "add_attention", (True, False) if ddpm else (True,), True)
    _expect(cfg, "time_embedding_dim", (None, 4 * nf), None)
    eps = cfg.get("norm_eps", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        _fail("norm_eps", eps, "a positive number")
    head = cfg.get("attention_head_dim", 8)
    attn_channels = [c for a, c in zip(down_attn, channels) if a] + ([channels[-1]] if add_attention else [])
    if head is not None and (not isinstance(head, int) or head <= 0 or any(c % head for c in attn_channels)):
        _fail("attention_head_dim", head, f"channels per head: must divide every attention layer's channels {attn_channels}")
    emb = cfg.get("time_embedding_type", "positional")
    _expect(cfg, "time_embedding_type", ("positional", "fourier"), "positional")
    if emb == "positional" and not ddpm and cfg.get("freq_shift", 0) != 1:
        _fail("freq_shift", cfg.get("freq_shift", 0), "NCSN++'s positional embedding divides by half - 1: freq_shift 1")

    model = dict(
        nf=nf,
        ch_mult=tuple(c // nf for c in channels),
        num_res_blocks=int(cfg.get("layers_per_block", 2)),
        attn_resolutions=tuple(size // 2**i for i, a in enumerate(down_attn) if a),
        dropout=float(cfg.get("dropout", 0.0)),
        image_size=size,
        num_channels=in_ch,
        centered=not bool(cfg.get("center_input_sample", False)),
        embedding_type=emb,
        nonlinearity="swish",
        conditional=True,
        num_classes=0,
        augment_dim=0,
        learn_sigma=out_ch == 2 * in_ch,
        norm_eps=float(eps),
        attention_head_dim=int(head or 0),
    )
    if model["attn_resolutions"] == ():
        model["attn_resolutions"] = (-1,)  # ml_collections keeps the tuple type with one element
    mid_scale = float(cfg.get("mid_block_scale_factor", 1.0))
    if family == "ddpm":
        _expect(cfg, "downsample_padding", (0, 1), 1)
        _expect(cfg, "downsample_type", ("conv",), "conv")
        _expect(cfg, "upsample_type", ("conv",), "conv")
        if mid_scale != 1.0:
            _fail("mid_block_scale_factor", mid_scale, "the DDPM UNet adds residuals unscaled: 1")
        groups = int(cfg.get("norm_num_groups") or 32)
        for c in channels:
            if c % groups:
                _fail("norm_num_groups", groups, f"must divide every block's channels {channels}")
        attn_groups = cfg.get("attn_norm_num_groups")
        if attn_groups is not None and int(attn_groups) != groups:
            _fail("attn_norm_num_groups", attn_groups, f"the middle attention normalises in norm_num_groups={groups}")
        model.update(
            name="ddpm_unet",
            num_groups=groups,
            resamp_with_conv=True,
            scale_by_sigma=False,
            downsample_padding=int(cfg.get("downsample_padding", 1)),
            resnet_time_scale_shift=shift,
            add_attention=bool(add_attention),
            # diffusers' middle attention under scale_shift has no GroupNorm unless attn_norm_num_groups is set
            mid_attn_norm=shift == "default" or attn_groups is not None,
            resblock_nonlinearity=ACT_FNS[cfg.get("act_fn", "silu")],
            freq_shift=float(cfg.get("freq_shift", 0)) if emb == "positional" else 1.0,
        )
    else:
        _expect(cfg, "attn_norm_num_groups", (None,), None)
        if not math.isclose(mid_scale, math.sqrt(2.0), rel_tol=1e-6):
            _fail("mid_block_scale_factor", mid_scale, "NCSN++ rescales skips by sqrt(2)")
        if in_ch != 3:
            _fail("in_channels", in_ch, "diffusers' skip blocks are built for 3 channels")
        _check_ncsnpp_groups(cfg, channels, down_attn)
        model.update(
            name="ncsnpp",
            resamp_with_conv=True,
            fir=True,
            fir_kernel=(1, 3, 3, 1),
            skip_rescale=True,
            resblock_type="biggan",
            progressive="output_skip",
            progressive_input="input_skip",
            progressive_combine="sum",
            init_scale=0.0,
            fourier_scale=16.0,
            scale_by_sigma=emb == "fourier",
        )
    return model, family


def _check_ncsnpp_groups(cfg: dict, channels: list[int], attn: list[bool]) -> None:
    """diffusers' skip blocks fix their GroupNorm groups; ours follow min(C // 4, 32). Check they agree."""

    def same(where: str, c: int, theirs: int) -> None:
        if theirs != num_groups(c):
            _fail(
                "block_out_channels",
                channels,
                f"diffusers normalises {where} ({c} channels) in {theirs} groups, diffjax's NCSN++ in {num_groups(c)}",
            )

    for i, c in enumerate(channels):
        same(f"down block {i}", c, min(c // 4, 32))
        if attn[i]:
            same(f"the attention of block {i}", c, 32)
    g = cfg.get("norm_num_groups")
    same("the middle block", channels[-1], int(g) if g else min(channels[-1] // 4, 32))
    same("the output", channels[0], int(g) if g else min(channels[0] // 4, 32))
    # The up blocks' resnets see prev + skip channels; with attention (>= 128 channels, checked
    # above) diffusers' min(in + skip // 4, 32) is 32 as ours, without it min((in + skip) // 4, 32).
    rev = channels[::-1]
    for k, c in enumerate(rev):
        prev, below = rev[max(k - 1, 0)], rev[min(k + 1, len(rev) - 1)]
        for res_in, skip in {(prev, c), (c, c), (c, below)}:
            same(f"up block {k}", res_in + skip, min((res_in + skip) // 4, 32))


# ---- weights ----------------------------------------------------------------------------------
def _attention_keys(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old attention names (query/key/value/proj_attn), as the .bin releases have them, -> new ones."""
    rename = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for k, v in sd.items():
        for old, new in rename.items():
            if ".attentions." in k and old in k:
                k = k.replace(old, new)
        out[k] = v
    return out


def _module_pairs(model: dict, family: str) -> list[tuple[tuple, str, str]]:
    """(our module path, diffusers module prefix, kind) for every module with weights."""
    L, nrb = len(model["ch_mult"]), int(model["num_res_blocks"])
    size = int(model["image_size"])
    attn = [size // 2**i in model["attn_resolutions"] for i in range(L)]
    pairs: list[tuple[tuple, str, str]] = [
        (("embed", "dense0"), "time_embedding.linear_1", "time_dense"),
        (("embed", "dense1"), "time_embedding.linear_2", "dense"),
        (("conv_in",), "conv_in", "conv"),
    ]
    if model["embedding_type"] == "fourier":
        pairs.append((("embed", "fourier", "W"), "time_proj.weight", "tensor"))
    for i in range(L):
        d = f"down_blocks.{i}"
        for j in range(nrb):
            pairs.append((("down", i, "blocks", j), f"{d}.resnets.{j}", "resblock"))
            if attn[i]:
                pairs.append((("down", i, "attns", j), f"{d}.attentions.{j}", "attn"))
        if i != L - 1 and family == "ddpm":
            pairs.append((("down", i, "resample", "conv"), f"{d}.downsamplers.0.conv", "conv"))
        elif i != L - 1:
            pairs += [
                (("down", i, "resample"), f"{d}.resnet_down", "resblock"),
                (("down", i, "combine", "proj"), f"{d}.skip_conv", "conv1x1"),
            ]
    pairs += [(("mid_block1",), "mid_block.resnets.0", "resblock"), (("mid_block2",), "mid_block.resnets.1", "resblock")]
    if model.get("add_attention", True):
        pairs.append((("mid_attn",), "mid_block.attentions.0", "attn"))
    for k in range(L):
        u, last = f"up_blocks.{k}", k == L - 1
        for j in range(nrb + 1):
            pairs.append((("up", k, "blocks", j), f"{u}.resnets.{j}", "resblock"))
            if attn[L - 1 - k] and family == "ddpm":
                pairs.append((("up", k, "attns", j), f"{u}.attentions.{j}", "attn"))
        if family == "ddpm":
            if not last:
                pairs.append((("up", k, "resample", "conv"), f"{u}.upsamplers.0.conv", "conv"))
            continue
        if attn[L - 1 - k]:
            pairs.append((("up", k, "attn"), f"{u}.attentions.0", "attn"))
        norm, conv = ("conv_norm_out", "conv_out") if last else (f"{u}.skip_norm", f"{u}.skip_conv")
        pairs += [(("up", k, "pyramid_norm"), norm, "norm"), (("up", k, "pyramid_conv"), conv, "conv")]
        if not last:
            pairs.append((("up", k, "resample"), f"{u}.resnet_up", "resblock"))
    if family == "ddpm":
        pairs += [(("norm_out",), "conv_norm_out", "norm"), (("conv_out",), "conv_out", "conv")]
    return pairs


def _conv(w):
    return np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO


def _leaves(
    ours: tuple, prefix: str, kind: str, flip_sin_cos: bool, has
) -> list[tuple[tuple, list[str], Callable[..., np.ndarray]]]:
    """(our leaf path, diffusers tensor names, fn(*tensors) -> our array) of one module."""
    if kind == "tensor":
        return [(ours, [prefix], lambda w: w)]
    if kind == "norm":
        return [(ours + ("scale",), [f"{prefix}.weight"], lambda w: w), (ours + ("bias",), [f"{prefix}.bias"], lambda b: b)]
    if kind in ("dense", "time_dense", "conv", "conv1x1"):
        if kind == "conv":
            fn = _conv
        elif kind == "conv1x1":
            fn = lambda w: w[:, :, 0, 0].T  # noqa: E731
        elif kind == "time_dense" and flip_sin_cos:  # diffusers embeds [cos, sin], ours [sin, cos]
            fn = lambda w: np.roll(w.T, w.shape[1] // 2, axis=0)  # noqa: E731
        else:
            fn = lambda w: w.T  # noqa: E731
        return [(ours + ("kernel",), [f"{prefix}.weight"], fn), (ours + ("bias",), [f"{prefix}.bias"], lambda b: b)]
    if kind == "attn":
        qkv = [f"{prefix}.to_{n}" for n in "qkv"]
        norm = _leaves(ours + ("norm",), f"{prefix}.group_norm", "norm", False, has) if has(ours + ("norm", "bias")) else []
        return norm + [
            (ours + ("qkv",), [f"{n}.weight" for n in qkv], lambda *ws: np.stack([w.T for w in ws], axis=1)),
            (ours + ("qkv_bias",), [f"{n}.bias" for n in qkv], lambda *bs: np.stack(bs)),
            *_leaves(ours + ("proj",), f"{prefix}.to_out.0", "dense", False, has),
        ]
    assert kind == "resblock", kind
    out = []
    parts = (
        ("norm1", "norm1", "norm"),
        ("conv1", "conv1", "conv"),
        ("temb_proj", "time_emb_proj", "dense"),
        ("norm2", "norm2", "norm"),
        ("conv2", "conv2", "conv"),
        ("shortcut", "conv_shortcut", "conv1x1"),
    )
    for name, theirs, k in parts:
        if has(ours + (name, "bias")):
            out += _leaves(ours + (name,), f"{prefix}.{theirs}", k, False, has)
    return out


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: dict[tuple, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def _name(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def fill_params(
    sd: dict[str, np.ndarray],
    leaves: Iterable[tuple[tuple, list[str], Callable[..., np.ndarray]]],
    want: dict[tuple, Any],
    used: set[str] | None = None,
) -> dict[tuple, np.ndarray]:
    """Every leaf of ``want`` (flat param path -> abstract array) from the state dict: each (path,
    tensor names, fn) of ``leaves`` gives fn(*tensors) as float32. WeightsError for a missing tensor,
    one with no place, used twice, of the wrong shape or dtype, a parameter left unfilled, or a tensor
    of the file left unused (``used``: names accounted for elsewhere)."""
    out: dict[tuple, np.ndarray] = {}
    used = set() if used is None else used
    for path, names, fn in leaves:
        missing = [n for n in names if n not in sd]
        if missing:
            raise WeightsError(
                f"the weights file has no tensor {missing[0]!r} (a truncated file, or weights "
                "of another architecture than its config.json)"
            )
        if path not in want:
            raise WeightsError(f"tensor {names[0]!r} has no place in the network ({_name(path)})")
        for n in names:
            if n in used:
                raise WeightsError(f"tensor {n!r} would be used twice")
        try:
            value = np.asarray(fn(*[sd[n] for n in names]))
        except ValueError as err:
            raise WeightsError(
                f"tensor {names[0]!r} has shape {sd[names[0]].shape}, which does not fit {_name(path)}: {err}"
            ) from None
        if value.shape != tuple(want[path].shape):
            raise WeightsError(
                f"tensor {names[0]!r} has shape {tuple(sd[names[0]].shape)}: as {_name(path)} it "
                f"becomes {value.shape}, the network needs {tuple(want[path].shape)}"
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise WeightsError(f"tensor {names[0]!r} has dtype {value.dtype}, not a float")
        out[path] = value.astype(np.float32)  # f16 / bf16 -> f32 is exact
        used.update(names)
    unfilled = [p for p in want if p not in out]
    if unfilled:
        raise WeightsError(f"no tensor of the file fills {_name(unfilled[0])} (and {len(unfilled) - 1} more)")
    extra = sorted(set(sd) - used)
    if extra:
        raise WeightsError(
            f"the weights file has {len(extra)} tensor(s) this architecture does not use, e.g. "
            f"{extra[0]!r}: its config.json does not describe it"
        )
    return out


def map_weights(
    state_dict: dict[str, np.ndarray], model: dict, family: str, flip_sin_to_cos: bool, abstract_params: dict
) -> dict:
    """Our params (nested dict of float32 numpy arrays, the shapes of ``abstract_params``) from a
    diffusers state dict; WeightsError for a missing, extra or wrongly shaped tensor."""
    sd = _attention_keys(state_dict)
    want = _flatten(abstract_params)
    leaves = (
        leaf
        for ours, prefix, kind in _module_pairs(model, family)
        for leaf in _leaves(ours, prefix, kind, flip_sin_to_cos, lambda p: p in want)
    )
    out = fill_params(sd, leaves, want)
    if model.get("learn_sigma"):
        _learned_range_to_weight(out, int(model["num_channels"]))
    return _unflatten(out)


def _learned_range_to_weight(params: dict[tuple, np.ndarray], channels: int) -> None:
    """diffusers' learned_range output v' in [-1, 1] -> our interpolation weight v = (v' + 1) / 2, exactly
    affine in conv_out's variance channels (the last `channels` outputs)."""
    kernel, bias = params[("conv_out", "kernel")].copy(), params[("conv_out", "bias")].copy()
    kernel[..., channels:] *= 0.5
    bias[channels:] = 0.5 * bias[channels:] + 0.5
    params[("conv_out", "kernel")], params[("conv_out", "bias")] = kernel, bias
