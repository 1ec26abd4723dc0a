"""Rematerialisation (``model.remat``) shared by every network.

- ``none``: keep every activation for the backward pass.
- ``block``: keep only each block's inputs; recompute the block in the backward pass.
- ``dots``: keep the matmul / convolution outputs of a block, recompute the elementwise rest.

A network wraps its per-block call once: ``self._block = remat_call(Block.__call__, remat)``
and calls ``self._block(block, x, ...)``. Loss and gradients do not change, only peak memory.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import jax
from flax import nnx

REMAT = ("none", "block", "dots")
F = TypeVar("F", bound=Callable)


def check_remat(remat: str, field: str = "config.model.remat") -> None:
    if remat not in REMAT:
        raise ValueError(f"{field} must be one of {', '.join(REMAT)}, got {remat!r}")


def remat_call(call: F, remat: str, static_argnums: int | tuple[int, ...] = ()) -> F:
    """``call(module, *args)`` rematerialised per ``remat`` (nnx.remat with a checkpoint policy).

    static_argnums: positions (counting the module as 0) of Python-valued arguments (flags)."""
    check_remat(remat)
    if remat == "none":
        return call
    policy = None if remat == "block" else jax.checkpoint_policies.checkpoint_dots
    # graph_updates=False: nnx's tree-mode remat. The graph-updates path writes every Variable back after
    # the call and fails (TraceContextError) on a model nnx.merge'd inside jit / grad, as the trainer builds it.
    return nnx.remat(call, policy=policy, static_argnums=static_argnums, graph_updates=False)
