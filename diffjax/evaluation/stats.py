"""Gaussian feature statistics (mu, sigma) and their ``.npz`` files.

Files hold the published layout that pytorch-fid and EDM read and write: keys ``mu`` (D,) and
``sigma`` (D, D), float64. Our own files add metadata as further npz keys (``extractor``: the sha256
of the Inception weights file, ``num_images``, ``source``, ``split``, ...); the published tools ignore
them. Two FIDs are comparable only when both statistics came from the same extractor, so
:func:`load_stats` checks the ``extractor`` key against the hash the caller expects.

score_sde's reference files store the raw activations instead (key ``pool_3``, (N, D)); those load too,
with mu/sigma computed here by :func:`feature_statistics`.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, NamedTuple

import numpy as np
from etils import epath

from diffjax import storage

#: Keys that hold the statistics themselves (never metadata).
STAT_KEYS = ("mu", "sigma")
#: score_sde's key for raw pool_3 activations.
ACTIVATIONS_KEY = "pool_3"
_META_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ExtractorMismatchError(ValueError):
    """Statistics computed with other Inception weights than the caller's: numbers would not compare."""


class Stats(NamedTuple):
    """What :func:`load_stats` returns: ``mu`` (D,), ``sigma`` (D, D), both float64, and the metadata."""

    mu: np.ndarray
    sigma: np.ndarray
    meta: dict[str, Any]


def as_matrix(x: Any, name: str, *, min_rows: int = 1, what: str = "samples") -> np.ndarray:
    """``x`` as a finite float64 (N, D) array with N >= ``min_rows``, else a ValueError naming ``name``."""
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (num_samples, dim), got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name}: expected a real numeric array, got dtype {a.dtype}")
    if a.shape[0] < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} {what}, got {a.shape[0]}")
    if a.shape[1] < 1:
        raise ValueError(f"{name}: feature dimension is 0 (shape {a.shape})")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        bad = int(np.size(a) - np.isfinite(a).sum())
        raise ValueError(f"{name}: contains {bad} NaN/inf value(s)")
    return a


def check_gaussian(mu: Any, sigma: Any, names: tuple[str, str] = ("mu", "sigma")) -> tuple[np.ndarray, np.ndarray]:
    """Float64 ``mu`` (D,) and ``sigma`` (D, D), finite, else a ValueError naming the arguments."""
    m = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    s = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if m.ndim != 1:
        raise ValueError(f"{names[0]}: expected a 1-D mean vector, got shape {m.shape}")
    if s.shape != (m.shape[0], m.shape[0]):
        raise ValueError(
            f"{names[1]}: expected a ({m.shape[0]}, {m.shape[0]}) covariance to match "
            f"{names[0]} of shape {m.shape}, got shape {s.shape}"
        )
    for arr, n in ((m, names[0]), (s, names[1])):
        if not np.isfinite(arr).all():
            raise ValueError(f"{n}: contains NaN/inf values")
    return m, s


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of ``features`` (N, D), float64, as pytorch-fid: ``np.cov(rowvar=False)``
    (the unbiased N-1 normalisation). Needs N >= 2."""
    x = as_matrix(features, "features", min_rows=2, what="samples for a covariance")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _meta_value(key: str, value: Any) -> np.ndarray:
    if value is None or isinstance(value, (dict, list, tuple, set)):
        raise ValueError(f"meta[{key!r}]: expected a str, number, bool or numeric array, got {type(value).__name__}")
    arr = np.asarray(value)
    if arr.dtype.kind not in "biufcUS":
        raise ValueError(f"meta[{key!r}]: dtype {arr.dtype} would need pickling; use a str, number or numeric array")
    return arr


def save_stats(path: str | os.PathLike, mu: Any, sigma: Any, meta: dict[str, Any] | None = None) -> epath.Path:
    """Write ``mu``/``sigma`` (float64) and ``meta`` (one npz key per entry) to the ``.npz`` file ``path``.

    The file is written atomically; pytorch-fid's and EDM's tools read its ``mu``/``sigma``. ``meta`` should
    carry ``extractor`` (the Inception weights file's sha256) so :func:`load_stats` can refuse comparisons
    across extractors. Returns the path written.
    """
    target = storage.path(path)
    if target.suffix != ".npz":
        raise ValueError(f"path: expected a file name ending in .npz (the suffix pytorch-fid looks for), got {target}")
    m, s = check_gaussian(mu, sigma)
    arrays: dict[str, np.ndarray] = {"mu": m, "sigma": s}
    for key, value in (meta or {}).items():
        if not isinstance(key, str) or not _META_KEY.match(key):
            raise ValueError(f"meta: key {key!r} is not an identifier-like string")
        if key in STAT_KEYS or key == ACTIVATIONS_KEY:
            raise ValueError(f"meta: key {key!r} is reserved for the statistics themselves")
        arrays[key] = _meta_value(key, value)
    storage.save_npz(target, **arrays)
    return target


def _read_meta(npz: np.lib.npyio.NpzFile, keys: list[str], path: epath.Path) -> dict[str, Any]:
    """Every key but the statistics as plain values (0-d arrays -> Python scalars); pickled ones are skipped."""
    meta: dict[str, Any] = {}
    for key in keys:
        if key in STAT_KEYS or key == ACTIVATIONS_KEY:
            continue
        try:
            arr = npz[key]
        except ValueError:  # an object array: reading it would mean unpickling
            warnings.warn(f"{path}: skipping key {key!r}, which holds pickled objects", UserWarning, stacklevel=3)
            continue
        meta[key] = arr.item() if arr.ndim == 0 else arr
    return meta


def load_stats(path: str | os.PathLike, expect_extractor: str | None = None) -> Stats:
    """Read a statistics ``.npz``: ours, pytorch-fid's / EDM's (``mu``, ``sigma``) or score_sde's (``pool_3``).

    With ``expect_extractor`` given, a file whose ``extractor`` differs raises
    :class:`ExtractorMismatchError`; a file without the key (published ones) only warns, as its extractor
    is unknown. Missing or inconsistent ``mu``/``sigma`` raise a ValueError naming the file and its keys.
    """
    path = storage.path(path)
    try:
        npz = storage.open_npz(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"statistics file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npz statistics file ({e})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: expected an .npz archive with keys 'mu' and 'sigma', found a single array")
    with npz:
        keys = sorted(npz.files)
        has_stats = all(k in keys for k in STAT_KEYS)
        if not has_stats and ACTIVATIONS_KEY not in keys:
            raise ValueError(f"{path}: expected keys 'mu' and 'sigma' (or score_sde's 'pool_3'), found {keys}")
        try:
            if has_stats:
                mu, sigma = check_gaussian(npz["mu"], npz["sigma"])
            else:
                mu, sigma = feature_statistics(npz[ACTIVATIONS_KEY])
        except ValueError as e:
            raise ValueError(f"{path} (keys {keys}): {e}") from None
        meta = _read_meta(npz, keys, path)
    if expect_extractor is not None:
        found = meta.get("extractor")
        if found is None:
            warnings.warn(
                f"{path}: no 'extractor' key (a published file?); cannot check it was computed with "
                f"extractor {expect_extractor}",
                UserWarning,
                stacklevel=2,
            )
        elif str(found) != expect_extractor:
            raise ExtractorMismatchError(
                f"{path}: statistics were computed with extractor {found}, expected {expect_extractor}; "
                "FID/KID numbers from different Inception weights are not comparable"
            )
    return Stats(mu, sigma, meta)
