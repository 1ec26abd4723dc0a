"""JAX's persistent compilation cache for the commands that compile (train, sample, serve, eval).

A compiled program is written to the cache directory and reused by the next process that
compiles the same program (same HLO, devices, flags and JAX version), so a restarted server or a
second `diffjax sample` loads its executables instead of recompiling them.

Directory: ``$DIFFJAX_COMPILATION_CACHE``, else ``~/.cache/diffjax/jax``; the value ``off``
disables it. A cache JAX was already given (``JAX_COMPILATION_CACHE_DIR``) is left as it is, and so
is a threshold given in ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` (else programs compiled in
under 0.5 s are not written).
"""

from __future__ import annotations

import os

ENV_VAR = "DIFFJAX_COMPILATION_CACHE"
MIN_COMPILE_SECONDS = 0.5  # programs that compile faster are not worth a file


def cache_dir() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip()
    if value.lower() in ("off", "0", "none", "false"):
        return None
    return os.path.expanduser(value or os.path.join("~", ".cache", "diffjax", "jax"))


def enable() -> str | None:
    """Turn the cache on (before the first compilation); returns its directory or None."""
    import jax

    # jax.Config declares its options dynamically: mypy cannot see them
    if jax.config.jax_compilation_cache_dir:  # type: ignore[attr-defined]
        return jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]
    path = cache_dir()
    if path is None:
        return None
    if "://" not in path:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError:  # a read-only home: run without the cache
            return None
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # a threshold JAX was given stays
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path
