"""Fused attention and the UNets' attention block / remat.

Oracles: diffjax.models.attention.reference_attention (the einsum-softmax formula), a NumPy
per-head computation of the attention block in float64, the single-head block formula as it was
before multi-head attention, and the networks without rematerialisation (remat only changes what
the backward pass stores, never the loss or the gradients).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffjax import models
from diffjax.models import blocks as B
from diffjax.models.attention import attention, reference_attention


def _qkv(dtype, shape=(2, 24, 4, 16), seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in ks]


@pytest.mark.parametrize("shape", [(2, 24, 4, 16), (1, 64, 1, 32), (3, 16, 8, 8)])
def test_fused_attention_equals_reference_float32(shape):
    q, k, v = _qkv(jnp.float32, shape)
    np.testing.assert_allclose(attention(q, k, v), reference_attention(q, k, v), atol=2e-6, rtol=1e-5)


def test_fused_attention_bfloat16_within_bfloat16_tolerance():
    q, k, v = _qkv(jnp.bfloat16)
    out = attention(q, k, v)
    assert out.dtype == jnp.bfloat16
    ref = reference_attention(*(a.astype(jnp.float32) for a in (q, k, v)))  # exact in f32 on the same inputs
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2, rtol=2e-2)


def _block(ch=32, head_dim=0, **kw):
    block = B.AttnBlock(ch, head_dim=head_dim, groups=8, rngs=nnx.Rngs(0), **kw)
    params = nnx.state(block, nnx.Param)  # perturbed: the zero-initialised projection would hide the attention
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    nnx.update(block, jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]))
    return block


def _x(shape=(2, 6, 5, 32)):
    return jax.random.normal(jax.random.key(1), shape, jnp.float32)


def test_single_head_block_unchanged():
    """head_dim 0: the block computes the single-head formula it had before the fused attention."""
    block, x = _block(), _x()
    b, hgt, wid, c = x.shape
    h = block.norm(x).reshape(b, hgt * wid, c)
    qkv = jnp.einsum("bnc,cjd->jbnd", h, block.qkv[...]) + block.qkv_bias[...][:, None, None, :]
    w = jax.nn.softmax(jnp.einsum("bnc,bmc->bnm", qkv[0], qkv[1]) * c**-0.5, axis=-1)
    old = x + block.proj(jnp.einsum("bnm,bmc->bnc", w, qkv[2])).reshape(x.shape)
    np.testing.assert_allclose(block(x), old, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("head_dim, norm", [(8, True), (16, False)])
def test_multi_head_block_matches_numpy_per_head(head_dim, norm):
    """Heads split q, k, v's channels in order (diffusers' layout); float64 NumPy oracle."""
    block, x = _block(head_dim=head_dim, norm=norm), _x()
    b, hgt, wid, c = x.shape
    h = np.asarray(block.norm(x) if norm else x, np.float64).reshape(b, hgt * wid, c)
    wqkv, bqkv = np.asarray(block.qkv[...], np.float64), np.asarray(block.qkv_bias[...], np.float64)
    q, k, v = (h @ wqkv[:, i] + bqkv[i] for i in range(3))
    out = np.zeros_like(q)
    for s in range(0, c, head_dim):
        logits = q[..., s : s + head_dim] @ np.swapaxes(k[..., s : s + head_dim], 1, 2) / np.sqrt(head_dim)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        out[..., s : s + head_dim] = (p / p.sum(-1, keepdims=True)) @ v[..., s : s + head_dim]
    proj = out @ np.asarray(block.proj.kernel[...], np.float64) + np.asarray(block.proj.bias[...], np.float64)
    np.testing.assert_allclose(block(x), np.asarray(x) + proj.reshape(x.shape), atol=2e-5, rtol=1e-4)


def test_head_dim_must_divide_the_channels():
    with pytest.raises(ValueError, match=r"model\.attention_head_dim=12 must divide"):
        B.AttnBlock(32, head_dim=12, rngs=nnx.Rngs(0))


def test_unknown_remat_is_one_line():
    cfg = dict(name="ddpm_unet", nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(4,), image_size=4)
    with pytest.raises(ValueError, match=r"config\.model\.remat must be one of none, block, dots, got 'all'"):
        models.abstract_model({**cfg, "remat": "all"})


TINY = {
    "ddpm_unet": dict(
        name="ddpm_unet",
        nf=8,
        ch_mult=(1,),
        num_res_blocks=1,
        attn_resolutions=(8,),
        image_size=8,
        num_groups=4,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        dropout=0.1,
    ),
}
# one network (the remat wrappers of diffjax.models.blocks are shared with ncsnpp, whose tiny gradient
# alone compiles in ~40 s on the CPU), the two modes
REMATS = {"ddpm_unet": ("block", "dots")}


@pytest.mark.parametrize("name", sorted(REMATS))
def test_remat_keeps_loss_and_gradients(name):
    """model.remat 'block' / 'dots': the same training loss and gradients (dropout on) as 'none'."""
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    noise_cond = jnp.array([10.0, 500.0])
    model = models.create(TINY[name], nnx.Rngs(0))
    _, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_and_grads(remat):
        graphdef = nnx.split(models.abstract_model({**TINY[name], "remat": remat}), nnx.Param, ...)[0]

        @jax.jit
        def step(params, rest, key):  # as the trainer: merged inside the step, dropout from the step's key
            def loss(p):
                m = nnx.merge(graphdef, p, rest)
                out = m(x, noise_cond, train=True, rngs=nnx.Rngs(dropout=key))
                return jnp.mean(jnp.square(out - x))

            return jax.value_and_grad(loss)(params)

        return step(params, rest, jax.random.key(3))

    ref_loss, ref_grads = loss_and_grads("none")
    for remat in REMATS[name]:
        loss, grads = loss_and_grads(remat)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads)
