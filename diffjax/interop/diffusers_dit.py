"""diffusers ``DiTTransformer2DModel`` -> diffjax's ``dit``: the config translation and the weight mapping.

The layout of facebook/DiT-XL-2-256 (``transformer/`` of a DiTPipeline; its config may name the legacy
``Transformer2DModel`` with ``norm_type='ada_norm_zero'``, which diffusers loads as a DiT):
``pos_embed.proj`` (the patch conv; the sin-cos table is a buffer, not saved), per block
``norm1.emb`` (timestep MLP + class table: every block holds its own copy, the release holds them
identical; block 0's are read, a block whose copy differs is refused), ``norm1.linear`` (adaLN-Zero
modulation), ``attn1.to_q / to_k / to_v / to_out.0``, ``ff.net.0.proj / ff.net.2``, then
``proj_out_1`` (final modulation) and ``proj_out_2``.

Differences handled here: diffusers embeds the timestep as [cos, sin] (ours [sin, cos]: the time
MLP's first kernel rows are rolled by half), the MLP LayerNorm epsilon (``norm_eps``, 1e-5 by default)
is ``model.norm_eps``, and a learned sigma (out_channels = 2 in_channels) is diffusers' / DiT's
``learned_range`` output v' in [-1, 1], ours the weight v = (v' + 1) / 2: the variance channels of
``proj_out_2`` are mapped affinely (kernel / 2, bias / 2 + 1 / 2) as diffusers_unet does for UNets.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from diffjax.interop.diffusers_unet import UnsupportedModel, WeightsError, _flatten, _unflatten, fill_params

CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")
ACTIVATIONS = {"gelu-approximate": "gelu_tanh", "gelu": "gelu"}
EMBEDDER = "transformer_blocks.{}.norm1.emb."


def is_dit(cfg: dict) -> bool:
    """Whether a diffusers config.json describes a DiT (the legacy class name with DiT's norm included)."""
    name = cfg.get("_class_name")
    return name == "DiTTransformer2DModel" or (name == "Transformer2DModel" and cfg.get("norm_type") == "ada_norm_zero")


def _fail(field: str, value, allowed: str) -> None:
    raise UnsupportedModel(f"unsupported diffusers DiTTransformer2DModel: {field}={value!r} ({allowed})")


def model_config(cfg: dict) -> tuple[dict, str]:
    """(diffjax ``config.model`` entries of the ``dit`` network, family 'dit') of a DiT config.json."""
    if not is_dit(cfg):
        _fail(
            "_class_name",
            cfg.get("_class_name"),
            "DiTTransformer2DModel, or Transformer2DModel with norm_type 'ada_norm_zero'",
        )
    if cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        _fail("norm_type", cfg.get("norm_type"), "DiT's adaLN-Zero: 'ada_norm_zero'")
    for field in ("cross_attention_dim", "num_vector_embeds", "caption_channels"):
        if cfg.get(field) is not None:
            _fail(field, cfg[field], "a DiT has none")
    if cfg.get("norm_elementwise_affine", False):
        _fail("norm_elementwise_affine", True, "DiT's LayerNorms have no affine parameters")
    if not cfg.get("attention_bias", True):
        _fail("attention_bias", False, "diffjax's DiT has q, k, v biases")
    heads, head_dim = int(cfg.get("num_attention_heads", 16)), int(cfg.get("attention_head_dim", 72))
    in_ch = int(cfg.get("in_channels", 4))
    out_ch = int(cfg.get("out_channels") or in_ch)
    if out_ch not in (in_ch, 2 * in_ch):
        _fail("out_channels", out_ch, f"must equal in_channels={in_ch} (or twice it: a learned sigma)")
    size, patch = cfg.get("sample_size", 32), cfg.get("patch_size", 2)
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            _fail("sample_size", size, "square inputs only")
        size = size[0]
    if not isinstance(patch, int) or patch <= 0 or not isinstance(size, int) or size % patch:
        _fail("patch_size", patch, f"an int dividing sample_size={size}")
    act = cfg.get("activation_fn", "gelu-approximate")
    if act not in ACTIVATIONS:
        _fail("activation_fn", act, f"diffjax supports {', '.join(ACTIVATIONS)}")
    classes = cfg.get("num_embeds_ada_norm", 1000)
    if not isinstance(classes, int) or classes <= 0:
        _fail("num_embeds_ada_norm", classes, "the class count, > 0")
    if (heads * head_dim) % 4:
        _fail("attention_head_dim", head_dim, "heads x head_dim must be a multiple of 4 (the 2-D position embedding)")
    model = dict(
        name="dit",
        size="",
        hidden_size=heads * head_dim,
        num_res_blocks=int(cfg.get("num_layers", 28)),
        num_heads=heads,
        patch_size=patch,
        mlp_ratio=4.0,
        nf=256,
        dropout=float(cfg.get("dropout", 0.0)),
        conditional=True,
        nonlinearity=ACTIVATIONS[act],
        norm_eps=float(cfg.get("norm_eps", 1e-5)),
        embedding_type="positional",
        fourier_scale=16.0,
        scale_by_sigma=False,
        num_classes=classes,
        augment_dim=0,
        learn_sigma=out_ch == 2 * in_ch,
        image_size=size,
        num_channels=in_ch,
        centered=True,
    )
    return model, "dit"


# ---- weights ----------------------------------------------------------------------------------
def _dense(ours: tuple, theirs: str) -> list[tuple[tuple, list[str], Callable[..., np.ndarray]]]:
    return [(ours + ("kernel",), [f"{theirs}.weight"], lambda w: w.T), (ours + ("bias",), [f"{theirs}.bias"], lambda b: b)]


def _leaves(depth: int) -> list[tuple[tuple, list[str], Callable[..., np.ndarray]]]:
    """(our leaf path, diffusers tensor names, fn(*tensors) -> our array) of every parameter."""
    emb = EMBEDDER.format(0)
    out = [
        (("patch_embed", "kernel"), ["pos_embed.proj.weight"], lambda w: np.transpose(w, (2, 3, 1, 0))),  # OIHW -> HWIO
        (("patch_embed", "bias"), ["pos_embed.proj.bias"], lambda b: b),
        # diffusers' sinusoid is [cos, sin], ours [sin, cos]: roll the first kernel's input rows by half
        (
            ("embed", "dense0", "kernel"),
            [f"{emb}timestep_embedder.linear_1.weight"],
            lambda w: np.roll(w.T, w.shape[1] // 2, 0),
        ),
        (("embed", "dense0", "bias"), [f"{emb}timestep_embedder.linear_1.bias"], lambda b: b),
        *_dense(("embed", "dense1"), f"{emb}timestep_embedder.linear_2"),
        (("embed", "label_emb", "embedding"), [f"{emb}class_embedder.embedding_table.weight"], lambda w: w),
        *_dense(("final", "modulation"), "proj_out_1"),
        *_dense(("final", "linear"), "proj_out_2"),
    ]
    for i in range(depth):
        b = f"transformer_blocks.{i}"
        for ours, theirs in (
            ("modulation", "norm1.linear"),
            ("q", "attn1.to_q"),
            ("k", "attn1.to_k"),
            ("v", "attn1.to_v"),
            ("proj", "attn1.to_out.0"),
            ("fc1", "ff.net.0.proj"),
            ("fc2", "ff.net.2"),
        ):
            out += _dense(("blocks", i, ours), f"{b}.{theirs}")
    return out


def _check_shared_embedders(sd: dict[str, np.ndarray], depth: int) -> set[str]:
    """Blocks 1..depth-1's copies of block 0's embedders: the names, if each equals block 0's tensor."""
    first = EMBEDDER.format(0)
    names = [n for n in sd if n.startswith(first)]
    copies = set()
    for i in range(1, depth):
        for name in names:
            copy = EMBEDDER.format(i) + name[len(first) :]
            if copy not in sd:
                raise WeightsError(f"the weights file has no tensor {copy!r} (a truncated file?)")
            if sd[copy].shape != sd[name].shape or not np.array_equal(sd[copy], sd[name]):
                raise WeightsError(
                    f"tensor {copy!r} differs from block 0's {name!r}: diffjax's DiT shares one timestep / class "
                    "embedder across blocks (the released DiTs hold identical copies)"
                )
            copies.add(copy)
    return copies


def map_weights(state_dict: dict[str, np.ndarray], model: dict, abstract_params: dict) -> dict:
    """Our params (nested dict of float32 numpy arrays, the shapes of ``abstract_params``) from a
    diffusers DiT state dict; WeightsError for a missing, extra, wrongly shaped or unshared tensor."""
    depth = int(model["num_res_blocks"])
    want = _flatten(abstract_params)
    out = fill_params(state_dict, _leaves(depth), want, used=_check_shared_embedders(state_dict, depth))
    if model.get("learn_sigma"):
        _learned_range_to_weight(out, int(model["num_channels"]), int(model["patch_size"]))
    return _unflatten(out)


def _learned_range_to_weight(params: dict[tuple, np.ndarray], channels: int, patch: int) -> None:
    """v' in [-1, 1] (diffusers / DiT's learned_range) -> our v = (v' + 1) / 2 on proj_out_2's variance
    outputs: per patch position the last ``channels`` of its 2 ``channels`` outputs."""
    kernel, bias = params[("final", "linear", "kernel")], params[("final", "linear", "bias")]
    k = kernel.reshape(kernel.shape[0], patch * patch, 2 * channels).copy()
    b = bias.reshape(patch * patch, 2 * channels).copy()
    k[..., channels:] *= 0.5
    b[:, channels:] = 0.5 * b[:, channels:] + 0.5
    params[("final", "linear", "kernel")], params[("final", "linear", "bias")] = (
        k.reshape(kernel.shape),
        b.reshape(bias.shape),
    )
