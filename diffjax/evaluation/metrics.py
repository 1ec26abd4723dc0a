"""Sample-quality metrics from Inception features: FID, IS, KID and improved precision/recall.

Each function takes features / logits already extracted (numpy or JAX arrays) and follows the reference
implementation named in its docstring, so the numbers compare with published ones when the features
come from the same extractor. Statistics files live in :mod:`diffjax.evaluation.stats` (re-exported here).
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg
from scipy.special import log_softmax, logsumexp

from diffjax.evaluation.stats import (
    ExtractorMismatchError,
    Stats,
    as_matrix,
    check_gaussian,
    feature_statistics,
    load_stats,
    save_stats,
)

__all__ = [
    "ExtractorMismatchError",
    "Stats",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "load_stats",
    "precision_recall",
    "save_stats",
]

#: pytorch-fid's diagonal offset for a near-singular covariance product, and its imaginary-part tolerance.
FID_EPS = 1e-6
FID_IMAG_ATOL = 1e-3


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """``scipy.linalg.sqrtm(a)`` without scipy's LinAlgWarning: callers check the result is finite."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return np.asarray(linalg.sqrtm(a))


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = FID_EPS) -> float:
    """Frechet distance ``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))``, as pytorch-fid.

    float64 throughout; ``scipy.linalg.sqrtm`` of the product; when that square root is not finite the
    product is recomputed with ``eps * I`` added to both covariances, and one line on stderr says so;
    an imaginary part is dropped when the diagonal's imaginary parts are all within 1e-3 of zero, else
    a ValueError. scipy's own ``LinAlgWarning`` ("Matrix is singular", raised for a product with exact
    zeros in its Schur diagonal, e.g. features that are always 0, while the square root it returns is
    still finite and accurate) is not passed on: the finiteness check above is the singularity test,
    as pytorch-fid's (which calls ``sqrtm(..., disp=False)`` and so never sees that warning either).
    """
    m1, s1 = check_gaussian(mu1, sigma1, ("mu1", "sigma1"))
    m2, s2 = check_gaussian(mu2, sigma2, ("mu2", "sigma2"))
    if m1.shape != m2.shape:
        raise ValueError(f"mu2: expected shape {m1.shape} to match mu1, got {m2.shape}")
    diff = m1 - m2
    covmean = _sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        print(f"fid: singular covariance product; adding {eps:g} to the covariance diagonals", file=sys.stderr, flush=True)
        offset = np.eye(s1.shape[0]) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=FID_IMAG_ATOL):
            raise ValueError(f"fid: sqrtm has an imaginary component of up to {np.max(np.abs(covmean.imag)):g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(logits: Any, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))``: mean and std over ``splits`` consecutive equal parts.

    ``logits`` (N, C) are the classifier's pre-softmax outputs; with the FID Inception they are the
    1008-way logits (pool_3 times the softmax weights, no bias), and the softmax runs over all 1008
    entries. That is what the original IS code (openai/improved-gan: ``softmax`` over the graph's 1008-way
    ``MatMul``) and torch-fidelity (``logits_unbiased``) do, so the numbers match theirs; dropping the 8
    unused classes would change them slightly. Parts are ``[i*N//splits, (i+1)*N//splits)`` in input order
    (no shuffling, as the original); p(y) is each part's mean prediction; float64; std has ddof=0.
    """
    if isinstance(splits, bool) or not isinstance(splits, (int, np.integer)) or splits < 1:
        raise ValueError(f"splits: expected a positive int, got {splits!r}")
    z = as_matrix(logits, "logits", min_rows=int(splits), what=f"samples for splits={splits}")
    if z.shape[1] < 2:
        raise ValueError(f"logits: expected at least 2 classes, got shape {z.shape}")
    logp = log_softmax(z, axis=1)
    n = z.shape[0]
    scores = []
    for i in range(splits):
        part = logp[i * n // splits : (i + 1) * n // splits]
        log_py = logsumexp(part, axis=0) - np.log(part.shape[0])
        kl = np.sum(np.exp(part) * (part - log_py), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> np.ndarray:
    return (x @ y.T * gamma + coef0) ** degree


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    m = x.shape[0]
    kxx = _polynomial_kernel(x, x, degree, gamma, coef0)
    kyy = _polynomial_kernel(y, y, degree, gamma, coef0)
    kxy = _polynomial_kernel(x, y, degree, gamma, coef0)
    within = kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)
    return float(within / (m * (m - 1)) - 2.0 * kxy.sum() / (m * m))


def kernel_inception_distance(
    feats1: Any,
    feats2: Any,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with the kernel ``(gamma x.y + coef0)^degree``.

    Mean and std (ddof=0) over ``subsets`` random subsets, one drawn without replacement from each set,
    as torch-fidelity / clean-fid (defaults 100 x 1000, degree 3, ``gamma = 1/D``, coef0 1). The subset
    size is ``min(subset_size, len(feats1), len(feats2))`` (clean-fid's cap; torch-fidelity refuses
    instead): the estimator is unbiased at any size, a smaller one only adds variance. Indices come
    from ``np.random.RandomState(seed)`` (set 1, then set 2, per subset) as torch-fidelity draws them,
    so its numbers are reproduced for the same seed when no cap applies. float64.
    """
    x = as_matrix(feats1, "feats1", min_rows=2, what="samples for KID")
    y = as_matrix(feats2, "feats2", min_rows=2, what="samples for KID")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feats2: expected feature dimension {x.shape[1]} to match feats1, got {y.shape[1]}")
    for name, value in (("subsets", subsets), ("subset_size", subset_size), ("degree", degree)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    m = min(int(subset_size), x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"subset_size: the unbiased estimator needs subsets of at least 2 samples, got {m}")
    g = 1.0 / x.shape[1] if gamma is None else float(gamma)
    rng = np.random.RandomState(seed)
    mmds = np.empty(int(subsets))
    for i in range(int(subsets)):
        xi = x[rng.choice(x.shape[0], m, replace=False)]
        yi = y[rng.choice(y.shape[0], m, replace=False)]
        mmds[i] = _mmd2_unbiased(xi, yi, int(degree), g, float(coef0))
    return float(mmds.mean()), float(mmds.std())


def _sq_dists(q: jax.Array, ref: jax.Array, ref_sq: jax.Array) -> jax.Array:
    """(B, N) squared Euclidean distances, at full float32 matmul precision (no TF32), clamped at 0."""
    cross = jnp.matmul(q, ref.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(jnp.sum(q * q, axis=1, keepdims=True) + ref_sq[None, :] - 2.0 * cross, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_sq_radius(q: jax.Array, ref: jax.Array, ref_sq: jax.Array, k: int) -> jax.Array:
    # The (k+1)-th smallest distance to the set the queries belong to: the k-th neighbour excluding self.
    neg_smallest, _ = jax.lax.top_k(-_sq_dists(q, ref, ref_sq), k + 1)
    return -neg_smallest[:, k]


@jax.jit
def _covered(q: jax.Array, ref: jax.Array, ref_sq: jax.Array, ref_radius_sq: jax.Array) -> jax.Array:
    return jnp.any(_sq_dists(q, ref, ref_sq) <= ref_radius_sq[None, :], axis=1)


def _row_blocks(fn, queries: np.ndarray, block_size: int, *args) -> np.ndarray:
    """``fn(block, *args)`` over row blocks of ``queries``; the last block is zero-padded so one shape compiles."""
    out = []
    for start in range(0, queries.shape[0], block_size):
        block = queries[start : start + block_size]
        rows = block.shape[0]
        if rows < block_size and queries.shape[0] > block_size:
            block = np.concatenate([block, np.zeros((block_size - rows, block.shape[1]), block.dtype)])
        out.append(np.asarray(fn(jnp.asarray(block), *args))[:rows])
    return np.concatenate(out)


def _manifold(points: np.ndarray, k: int, block_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    ref = jnp.asarray(points)
    ref_sq = jnp.sum(ref * ref, axis=1)
    radius_sq = _row_blocks(functools.partial(_kth_sq_radius, k=k), points, block_size, ref, ref_sq)
    return ref, ref_sq, jnp.asarray(radius_sq)


def precision_recall(real: Any, fake: Any, k: int = 3, *, block_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds.

    Each set's manifold is the union of balls around its points with radius the distance to the k-th
    nearest neighbour in the same set (self excluded). Precision: the fraction of ``fake`` inside the
    real manifold (within the radius of ANY real point, ``<=``); recall: the fraction of ``real`` inside
    the fake one. Distances run in JAX (jit) over row blocks of ``block_size`` queries against the whole
    other set, so memory is ``block_size * N`` floats (50k x 50k fits). Both sets are centred on the real
    mean first (distances are unchanged, rounding smaller); computation in JAX's default float dtype.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
    r = as_matrix(real, "real", min_rows=k + 1, what=f"samples for k={k} neighbours (k + 1)")
    f = as_matrix(fake, "fake", min_rows=k + 1, what=f"samples for k={k} neighbours (k + 1)")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"fake: expected feature dimension {r.shape[1]} to match real, got {f.shape[1]}")
    center = r.mean(axis=0)
    dtype = jnp.result_type(float)
    r, f = (r - center).astype(dtype), (f - center).astype(dtype)
    real_manifold = _manifold(r, int(k), block_size)
    fake_manifold = _manifold(f, int(k), block_size)
    precision = _row_blocks(_covered, f, block_size, *real_manifold).mean()
    recall = _row_blocks(_covered, r, block_size, *fake_manifold).mean()
    return float(precision), float(recall)
