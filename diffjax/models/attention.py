"""The one attention function every network calls (UNet attention blocks, DiT).

``attention(q, k, v)`` takes (batch, tokens, heads, head_dim) arrays and returns the same shape:
``softmax(q k^T / sqrt(head_dim)) v`` per head, the softmax in float32. It runs on
``jax.nn.dot_product_attention``: cuDNN's fused flash attention on NVIDIA GPUs for bfloat16 /
float16 inputs whose head size cuDNN takes, XLA's fused softmax attention everywhere else.
``reference_attention`` is the plain einsum-softmax-einsum formula (the oracle in the tests).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "reference")


def _cudnn_supported(q: jax.Array) -> bool:
    head_dim = q.shape[-1]
    return (
        jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and head_dim <= 128 and head_dim % 8 == 0
    )


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v with float32 logits and softmax; (B, T, N, H) layout."""
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", weights, v)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = "auto") -> jax.Array:
    """Multi-head self / cross attention, (B, T, N, H) x (B, S, N, H) -> (B, T, N, H).

    implementation: 'auto' (cuDNN where supported, else XLA), 'xla', 'cudnn' or 'reference'."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "reference":
        return reference_attention(q, k, v)
    fused: Literal["xla", "cudnn"] = (
        "cudnn" if implementation == "cudnn" or (implementation == "auto" and _cudnn_supported(q)) else "xla"
    )
    return jax.nn.dot_product_attention(q, k, v, implementation=fused)
