"""Quality of 8x8 digits samples: a small classifier trained here stands in for Inception.

The network (two 3x3 convolutions, a 64-unit feature layer, 10 logits; 38,570 parameters) is
trained on the digits 'train' split (the first 1,500 of scikit-learn's 1,797 images) by
`tools/train_digits_classifier.py`; its weights ship in the package (`digits_classifier.npz`).

- digits-FID: the Frechet distance between the 64-d features of a sample set and of the real
  held-out 'eval' split (297 images), computed exactly as FID (diffjax.evaluation.metrics).
- classifier score: exp E_x KL(p(y|x) || p(y)) over the set (the Inception Score's formula with
  this classifier; 10 is the ceiling: confident and class-balanced).
`digits_report(images)` gives both, beside the same figures for real training digits as a floor.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_classifier.npz")  # local: shipped
SHAPES = {
    "conv1/w": (3, 3, 1, 16),
    "conv1/b": (16,),
    "conv2/w": (3, 3, 16, 32),
    "conv2/b": (32,),
    "feat/w": (4 * 4 * 32, 64),
    "feat/b": (64,),
    "out/w": (64, 10),
    "out/b": (10,),
}


def init(key: jax.Array) -> dict[str, jax.Array]:
    """He-initialised weights (zeros for biases)."""
    keys = iter(jax.random.split(key, len(SHAPES)))
    params = {}
    for name, shape in SHAPES.items():
        fan_in = int(np.prod(shape[:-1]))
        params[name] = (
            jnp.zeros(shape) if name.endswith("/b") else jax.random.normal(next(keys), shape) * np.sqrt(2.0 / fan_in)
        )
    return params


def apply(params: dict[str, Any], images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images (B, 8, 8, 1) in [0, 1] -> (features (B, 64), logits (B, 10))."""
    conv = lambda x, w, stride: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jax.nn.relu(conv(images * 2.0 - 1.0, params["conv1/w"], 1) + params["conv1/b"])
    h = jax.nn.relu(conv(h, params["conv2/w"], 2) + params["conv2/b"])
    feats = jax.nn.relu(h.reshape(h.shape[0], -1) @ params["feat/w"] + params["feat/b"])
    return feats, feats @ params["out/w"] + params["out/b"]


def load(path: str = WEIGHTS) -> dict[str, np.ndarray]:
    """The shipped weights, every key and shape checked."""
    if not os.path.exists(path):  # local: the package's shipped file
        raise FileNotFoundError(
            f"digits classifier weights not found at {path}; run `python tools/train_digits_classifier.py` to make them"
        )
    with np.load(path) as f:
        params = {k: f[k] for k in f.files}
    if set(params) != set(SHAPES) or any(params[k].shape != s for k, s in SHAPES.items()):
        found = {k: tuple(v.shape) for k, v in params.items()}
        raise ValueError(f"{path} is not a digits classifier: expected {SHAPES}, found {found}")
    return params


_apply = jax.jit(apply)


def to_unit(images: Any) -> np.ndarray:
    """uint8 0..255 or float images (B, 8, 8, 1) in [0, 1] -> float32 in [0, 1]; clear errors otherwise."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != (8, 8, 1):
        raise ValueError(f"digits images must have shape (N, 8, 8, 1) or (N, 8, 8), got {np.asarray(images).shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if not np.isfinite(x).all() or x.min() < -1e-3 or x.max() > 1 + 1e-3:
        raise ValueError(
            f"float digits images must lie in [0, 1], got range [{x.min():.3g}, {x.max():.3g}]; "
            "map [-1, 1] data with (x + 1) / 2 or pass uint8"
        )
    return np.clip(x, 0.0, 1.0)


def features(images: Any, params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, 64), logits (N, 10)) as float64 numpy."""
    params = load() if params is None else params
    feats, logits = _apply(params, jnp.asarray(to_unit(images)))
    return np.asarray(feats, np.float64), np.asarray(logits, np.float64)


def real_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images in [0, 1] (N, 8, 8, 1), labels) of the digits split the trainer uses."""
    from diffjax import data

    x, y = data._digits()
    n = data.DIGITS_TRAIN
    return (x[:n], y[:n]) if split == "train" else (x[n:], y[n:])


def digits_report(images: Any, params: dict | None = None) -> dict[str, float]:
    """digits-FID against the held-out split and the classifier score of `images`."""
    from diffjax.evaluation import metrics, stats

    params = load() if params is None else params
    feats, logits = features(images, params)
    score, _ = metrics.inception_score(logits, splits=1)
    fid = metrics.frechet_distance(*stats.feature_statistics(feats), *held_out_statistics(params))
    return dict(digits_fid=fid, classifier_score=score, num=int(len(feats)))


def held_out_statistics(params: dict) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the classifier's features of the held-out split (digits-FID's reference)."""
    from diffjax.evaluation import stats

    return stats.feature_statistics(features(real_digits("eval")[0], params)[0])
