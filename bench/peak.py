"""Shared helpers of the benchmark scripts (no flags, so any script can import it): the device's measured
dense matmul peak, the best wall time of a call, and the commit the scripts run at."""
from __future__ import annotations

import os
import subprocess
import time


def git_commit() -> str:
    """Short hash of the checkout the bench scripts live in ("" when git cannot say)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return ""


def best_seconds(fn, repeats: int) -> float:
    """Best wall seconds of ``repeats`` calls of ``fn`` (which blocks until its result is ready), after one
    untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(dtype: str, sizes=(1024, 2048, 3072), repeats: int = 5) -> dict:
    """Measured dense matmul throughput: best GFLOP/s over square sizes (compiled, warm, 8 products a call)."""
    import jax
    import jax.numpy as jnp

    best = {"gflops": 0.0}
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
        bm = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)

        @jax.jit
        def f(a, b):
            acc = a
            for _ in range(8):  # a chain, so XLA cannot drop or merge the products
                acc = jnp.dot(acc, b) * 1e-3
            return acc

        t = best_seconds(lambda: f(a, bm).block_until_ready(), repeats)
        g = 8 * 2 * n ** 3 / t / 1e9
        if g > best["gflops"]:
            best = {"gflops": g, "n": n}
    return best
