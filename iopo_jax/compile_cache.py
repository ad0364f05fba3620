"""Persistent XLA compilation cache, shared by training, evaluation, RL, generation and serving.

    enable_compilation_cache("auto")          # <cache root>/jax_compilation_cache (iopo_jax.paths.cache_root)
    enable_compilation_cache("/fast/disk/xla") # or a gs:// path shared by the hosts of a pod
    enable_compilation_cache("off")           # nothing

A second run with the same shapes, code, jax version and devices loads its executables from the cache
instead of compiling them again. Call it before the first compilation (start of ``main``).
"""
from __future__ import annotations

import logging
import os

from iopo_jax.paths import cache_root

log = logging.getLogger("iopo_jax.compile_cache")


def default_cache_dir() -> str:
    return os.path.join(cache_root(), "jax_compilation_cache")


def enable_compilation_cache(path: str | None, min_compile_time_secs: float = 0.5) -> str | None:
    """Point JAX's persistent compilation cache at ``path`` ("auto" = :func:`default_cache_dir`; "", None or
    "off" = leave JAX's settings alone). Executables that took at least ``min_compile_time_secs`` to compile are
    stored. Returns the directory used, or None."""
    if path is None or str(path).strip().lower() in ("", "off", "none"):
        return None
    import jax

    path = default_cache_dir() if str(path).strip().lower() == "auto" else str(path)
    if "://" not in path:
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    log.info("persistent compilation cache: %s", path)
    return path
