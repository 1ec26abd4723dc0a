"""DiT: the Diffusion Transformer of Peebles & Xie 2023 ("Scalable Diffusion Models with Transformers",
arXiv:2212.09748), adaLN-Zero variant.

  x (B, H, W, C) -> patchify (a p x p conv with stride p) + fixed 2-D sin-cos position embedding
  c = MLP(sinusoid(noise_cond)) + class embedding (num_classes + 1 rows; row num_classes is the null
      class of classifier-free guidance: label -1 or labels=None)
  N x adaLN-Zero block:  (shift, scale, gate) x 2 = Linear(SiLU(c)) -> 6 hidden, zero-initialised
      x = x + gate_1 * Attention(LN(x) * (1 + scale_1) + shift_1)
      x = x + gate_2 * MLP(LN(x) * (1 + scale_2) + shift_2)        (MLP ratio 4, tanh GELU)
  final: LN(x) * (1 + scale) + shift (a zero-initialised 2 hidden modulation), a zero-initialised
      Linear to p * p * out channels, unpatchify. learn_sigma: 2 C output channels, the prediction
      then the variance output v (diffjax.denoiser).

Sizes (``size``): S (12 blocks, 384 wide, 6 heads), B (12, 768, 12), L (24, 1024, 16), XL (28, 1152, 16);
a size fills hidden_size / num_res_blocks / num_heads that are 0, explicit values win. On the paper's
latent input (32x32x4, 1000 classes, learned sigma, patch 2): 32,865,056 / 130,315,808 / 457,840,672 /
674,834,720 parameters, diffusers' DiTTransformer2DModel's less its per-block copies of the embedders;
with the frozen 256 x hidden position table the DiT repository counts as a parameter, 675,129,632 for
XL/2 (the paper's 33M / 130M / 458M / 675M).

The noise embedding is diffjax's (layers.NoiseClassEmbedding): DDPM's sinusoid of width ``nf`` (256 in
DiT) as diffusers' DiT computes it (frequencies exp(-ln(1e4) i / (nf/2 - 1)), the original divides by
nf/2), a SiLU MLP to hidden_size, or Fourier features of log sigma (``embedding_type='fourier'``).
LayerNorms have no affine parameters and epsilon 1e-6, except ``norm_eps``: the one before each MLP
(diffusers' DiTTransformer2DModel norm_eps, 1e-5 there). Initialisation as the DiT repository: Xavier
uniform for linear layers (q, k, v at the bound of the fused (hidden, 3 hidden) projection) and the
flattened patch kernel, N(0, 0.02) for the time MLP and class table, zeros for biases and for every
adaLN modulation and the output layer (each block starts as the identity, the output at 0).

Tensor parallelism (Megatron layout, kernels (in, out)): q, k, v and fc1 are column-parallel
('fsdp', 'model'), the attention out-projection and fc2 row-parallel ('model', 'fsdp'); the adaLN
modulations, patch embedding, noise / class embedding and final layer carry 'fsdp' on their output
axis as the other networks (a column-parallel modulation miscompiled on a (2, 2, 2) mesh on
XLA:CPU). The residual stream stays float32; the branches compute in ``dtype``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffjax.models import layers as L
from diffjax.models.attention import IMPLEMENTATIONS, attention
from diffjax.models.remat import check_remat, remat_call

# size -> (num_res_blocks = depth, hidden_size, num_heads): Table 1 of the paper
SIZES: dict[str, tuple[int, int, int]] = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
COLUMNS = ("fsdp", "model")  # column-parallel kernel (in, out): outputs split over 'model'
ROWS = ("model", "fsdp")  # row-parallel kernel: inputs split over 'model'
ACTIVATIONS = {
    **L.ACTIVATIONS,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
xavier = jax.nn.initializers.xavier_uniform()
zeros = jax.nn.initializers.zeros


def resolve_size(size: str | None, hidden_size: int, num_res_blocks: int, num_heads: int) -> tuple[int, int, int]:
    """(depth, hidden_size, num_heads): a named size fills the fields left at 0; ValueError otherwise."""
    size = size or ""
    if size not in ("", *SIZES):
        raise ValueError(f"config.model.size={size!r} is not a DiT size; choose one of '', {', '.join(map(repr, SIZES))}")
    named = SIZES.get(size, (0, 0, 0))
    depth, hidden, heads = (int(v) or d for v, d in zip((num_res_blocks, hidden_size, num_heads), named))
    for field, value in (("num_res_blocks", depth), ("hidden_size", hidden), ("num_heads", heads)):
        if value <= 0:
            raise ValueError(
                f"config.model.{field} must be > 0, or config.model.size one of {', '.join(SIZES)} (got size={size!r})"
            )
    if hidden % heads:
        raise ValueError(f"config.model.hidden_size={hidden} is not divisible by config.model.num_heads={heads}")
    if hidden % 4:
        raise ValueError(f"config.model.hidden_size={hidden} must be a multiple of 4 (the 2-D sin-cos position embedding)")
    return depth, hidden, heads


@functools.lru_cache(maxsize=16)
def position_embedding(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """(grid_h * grid_w, dim) fixed 2-D sin-cos table, tokens row-major: [sincos(column), sincos(row)]
    with sincos(p) = [sin(p w_i), cos(p w_i)], w_i = 10000^(-i / (dim / 4)) (MAE / DiT / diffusers)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def sincos(pos):
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
    return np.concatenate([sincos(cols.reshape(-1)), sincos(rows.reshape(-1))], axis=1).astype(np.float32)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis without affine parameters, in float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale[:, None]) + shift[:, None]


def linear(in_f: int, out_f: int, sharding: tuple, init, *, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        in_f, out_f, kernel_init=init, bias_init=zeros, dtype=dtype, rngs=rngs, kernel_metadata=L.sharding_meta(sharding)
    )


class DiTBlock(nnx.Module):
    """One adaLN-Zero transformer block (multi-head self-attention, then the MLP)."""

    def __init__(
        self,
        hidden: int,
        heads: int,
        mlp_hidden: int,
        *,
        act,
        dropout: float,
        norm_eps: float,
        attention_impl: str,
        dtype,
        rngs,
    ):
        self.heads, self.act, self.norm_eps, self.attention_impl, self.dtype = heads, act, norm_eps, attention_impl, dtype
        # fsdp-only: split over 'model' too, (data 2, fsdp 2, model 2) miscompiled on XLA:CPU (jax 0.10.2:
        # wrong outputs beside a row-parallel kernel; tests/test_tensor_parallel.py)
        self.modulation = linear(hidden, 6 * hidden, L.DENSE_SHARDING, zeros, dtype=dtype, rngs=rngs)
        qkv_init = jax.nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")  # Xavier of the fused (H, 3H)
        self.q = linear(hidden, hidden, COLUMNS, qkv_init, dtype=dtype, rngs=rngs)
        self.k = linear(hidden, hidden, COLUMNS, qkv_init, dtype=dtype, rngs=rngs)
        self.v = linear(hidden, hidden, COLUMNS, qkv_init, dtype=dtype, rngs=rngs)
        self.proj = linear(hidden, hidden, ROWS, xavier, dtype=dtype, rngs=rngs)
        self.fc1 = linear(hidden, mlp_hidden, COLUMNS, xavier, dtype=dtype, rngs=rngs)
        self.fc2 = linear(mlp_hidden, hidden, ROWS, xavier, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x: jax.Array, c: jax.Array, train: bool = False, key: jax.Array | None = None) -> jax.Array:
        """x: (B, T, hidden) float32 residual stream; c: (B, hidden) conditioning (compute dtype); key:
        the dropout key when training (a key, not a module RNG stream: nnx.remat cannot update one)."""
        b, t, hidden = x.shape
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        mods = jnp.split(self.modulation(jax.nn.silu(c)).astype(jnp.float32), 6, axis=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        h = modulate(layer_norm(x, 1e-6), shift_msa, scale_msa).astype(self.dtype)
        q, k, v = (proj(h).reshape(b, t, self.heads, hidden // self.heads) for proj in (self.q, self.k, self.v))
        h = self.proj(attention(q, k, v, implementation=self.attention_impl).reshape(b, t, hidden))
        h = self.dropout(h, deterministic=not train, rngs=k1)
        x = x + gate_msa[:, None] * h.astype(jnp.float32)
        h = modulate(layer_norm(x, self.norm_eps), shift_mlp, scale_mlp).astype(self.dtype)
        h = self.dropout(self.act(self.fc1(h)), deterministic=not train, rngs=k2)
        return x + gate_mlp[:, None] * self.fc2(h).astype(jnp.float32)


class FinalLayer(nnx.Module):
    """adaLN (shift, scale) -> zero-initialised Linear to p * p * out_channels."""

    def __init__(self, hidden: int, out_dim: int, *, dtype, rngs):
        self.modulation = linear(hidden, 2 * hidden, L.DENSE_SHARDING, zeros, dtype=dtype, rngs=rngs)
        self.linear = linear(hidden, out_dim, L.DENSE_SHARDING, zeros, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x, c):
        shift, scale = jnp.split(self.modulation(jax.nn.silu(c)).astype(jnp.float32), 2, axis=-1)
        return self.linear(modulate(layer_norm(x, 1e-6), shift, scale).astype(self.dtype))


class DiT(nnx.Module):
    """model(x: (B, H, W, C), noise_cond: (B,), labels=None, *, train=False) -> (B, H, W, C) float32
    (2 C with learn_sigma: the prediction, then the variance output v)."""

    def __init__(
        self,
        *,
        size: str = "XL",
        hidden_size: int = 0,
        num_res_blocks: int = 0,
        num_heads: int = 0,
        patch_size: int = 2,
        mlp_ratio: float = 4.0,
        nf: int = 256,
        dropout: float = 0.0,
        conditional: bool = True,
        nonlinearity: str = "gelu_tanh",
        norm_eps: float = 1e-6,
        embedding_type: str = "positional",
        fourier_scale: float = 16.0,
        scale_by_sigma: bool = False,
        num_classes: int = 0,
        augment_dim: int = 0,
        learn_sigma: bool = False,
        image_size: int = 32,
        num_channels: int = 3,
        centered: bool = True,
        attention_impl: str = "auto",
        remat: str = "none",
        dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        """size: '' (give hidden_size, num_res_blocks = the number of blocks, num_heads) or S / B / L / XL,
        which fills those left at 0; nf: the width of the noise sinusoid (DiT: 256); nonlinearity: the
        MLP's activation (gelu_tanh as DiT, gelu, or layers.ACTIVATIONS); dropout: after the attention
        projection and the MLP activation (diffusers' places; DiT trains without); attention_impl: see
        diffjax.models.attention; remat: 'none' | 'block' | 'dots' (diffjax.models.remat)."""
        depth, hidden, heads = resolve_size(size, hidden_size, num_res_blocks, num_heads)
        p, image_size, channels = int(patch_size), int(image_size), int(num_channels)
        if p <= 0 or image_size % p:
            raise ValueError(f"config.model.patch_size={patch_size} does not divide config.model.image_size={image_size}")
        if nonlinearity not in ACTIVATIONS:
            raise ValueError(f"config.model.nonlinearity={nonlinearity!r}: choose one of {', '.join(ACTIVATIONS)}")
        if attention_impl not in IMPLEMENTATIONS:
            raise ValueError(f"config.model.attention_impl={attention_impl!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
        check_remat(remat)
        if not conditional and not int(num_classes):
            raise ValueError("config.model.conditional=False needs config.model.num_classes > 0 (adaLN needs a condition)")
        self.dtype = compute_dtype = L.parse_dtype(dtype)
        self.patch_size, self.hidden_size, self.centered = p, hidden, bool(centered)
        self.scale_by_sigma, self.learn_sigma = bool(scale_by_sigma), bool(learn_sigma)
        self.out_channels = 2 * channels if self.learn_sigma else channels

        patch_init = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)
        self.patch_embed = nnx.Conv(
            channels,
            hidden,
            (p, p),
            strides=p,
            padding="VALID",
            kernel_init=patch_init,
            dtype=compute_dtype,
            rngs=rngs,
            kernel_metadata=L.sharding_meta(L.CONV_SHARDING),
        )
        self.embed = L.NoiseClassEmbedding(
            int(nf),
            embedding_type=str(embedding_type).lower(),
            fourier_scale=float(fourier_scale),
            conditional=bool(conditional),
            num_classes=int(num_classes),
            augment_dim=int(augment_dim),
            act=jax.nn.silu,
            out_dim=hidden,
            dtype=compute_dtype,
            rngs=rngs,
        )
        # DiT's initialisation of the embedders: N(0, 0.02) MLP kernels and class table, zero biases.
        normal = jax.nn.initializers.normal(0.02)
        for layer in (self.embed.dense0, self.embed.dense1):
            if layer is not None:
                layer.kernel.set_value(normal(rngs.params(), layer.kernel.shape))
        if self.embed.label_emb is not None:
            table = self.embed.label_emb.embedding
            table.set_value(normal(rngs.params(), table.shape))

        block = functools.partial(
            DiTBlock,
            hidden,
            heads,
            int(hidden * float(mlp_ratio)),
            act=ACTIVATIONS[nonlinearity],
            dropout=float(dropout),
            norm_eps=float(norm_eps),
            attention_impl=attention_impl,
            dtype=compute_dtype,
        )
        self.blocks = nnx.List([block(rngs=rngs) for _ in range(depth)])
        self.dropout_rate = float(dropout)
        self.dropout_stream = rngs["dropout"].fork()  # the blocks' dropout keys unless rngs= is passed
        self._block = remat_call(DiTBlock.__call__, remat, static_argnums=(3,))
        self.final = FinalLayer(hidden, p * p * self.out_channels, dtype=compute_dtype, rngs=rngs)

    def __call__(self, x, noise_cond, labels=None, *, augment_labels=None, train: bool = False, rngs=None):
        b, height, width, _ = x.shape
        p = self.patch_size
        gh, gw = height // p, width // p
        h = x.astype(self.dtype)
        if not self.centered:  # data in [0, 1]
            h = 2 * h - 1
        tokens = self.patch_embed(h).reshape(b, gh * gw, self.hidden_size).astype(jnp.float32)
        tokens = tokens + jnp.asarray(position_embedding(gh, gw, self.hidden_size))
        c = self.embed(noise_cond, labels, augment_labels)
        key = self._dropout_key(rngs) if train and self.dropout_rate > 0 else None
        for i, blk in enumerate(self.blocks):
            tokens = self._block(blk, tokens, c, train, None if key is None else jax.random.fold_in(key, i))
        out = self.final(tokens, c).astype(jnp.float32)  # (B, T, p * p * C)
        out = out.reshape(b, gh, gw, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
        out = out.reshape(b, height, width, self.out_channels)
        return L.scale_output(out, noise_cond, self.scale_by_sigma, self.learn_sigma)

    def _dropout_key(self, rngs) -> jax.Array:
        """One dropout key per call: from rngs (Rngs, RngStream or a key) or the module's own stream."""
        if rngs is None:
            return self.dropout_stream()
        if isinstance(rngs, nnx.Rngs):
            return rngs["dropout"]()
        return rngs() if isinstance(rngs, nnx.RngStream) else rngs
