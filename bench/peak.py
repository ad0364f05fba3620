"""Shared helpers of the benchmark scripts (no flags, so any script can import it): the device's measured
dense matmul peak, a decode step's dense products and their time in one program, the best wall time of a
call, and the commit the scripts run at."""
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


def step_products(cfg: dict) -> list[tuple[str, int, int, int]]:
    """``(name, d_in, d_out, count per step)`` of a decode step of the HF ``config.json`` ``cfg``."""
    d = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or d // heads
    kv = cfg.get("num_key_value_heads", heads) * hd
    f, n = cfg["intermediate_size"], cfg["num_hidden_layers"]
    return [("q", d, heads * hd, n), ("k", d, kv, n), ("v", d, kv, n), ("o", heads * hd, d, n),
            ("gate", d, f, n), ("up", d, f, n), ("down", f, d, n), ("lm_head", d, cfg["vocab_size"], 1)]


def time_chain(b: int, products: list, dtype: str, repeats: int) -> float:
    """Best seconds of all ``products`` (``step_products``) of one decode step in one jitted program, each
    layer with its own ``[out, in]`` weights: ``q, k, v`` from the residual, ``o`` of ``q`` plus ``k`` and
    ``v`` tiled to ``q``'s width (so nothing is dead code; a row sum here made XLA:CPU fuse the product into
    a slow loop), ``gate, up`` from the residual, ``down`` of their product, then the LM head (its row
    maxima are returned)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    shapes = {name: (d_in, d_out, count) for name, d_in, d_out, count in products}
    layers = shapes["q"][2]
    rng = np.random.RandomState(1)

    def w(name):
        d_in, d_out, _ = shapes[name]
        return jnp.asarray((rng.randn(d_out, d_in) / np.sqrt(d_in)).astype(np.float32), dtype)

    weights = [{n: w(n) for n in ("q", "k", "v", "o", "gate", "up", "down")} for _ in range(layers)]
    head = w("lm_head")

    def lin(x, wt):
        return jnp.einsum("bi,oi->bo", x, wt)

    @jax.jit
    def step(x, weights, head):
        for lw in weights:
            q, k, v = lin(x, lw["q"]), lin(x, lw["k"]), lin(x, lw["v"])
            group = q.shape[-1] // k.shape[-1]  # query heads per kv head
            x = x + lin(q + jnp.tile(k, group) + jnp.tile(v, group), lw["o"])
            x = x + lin(lin(x, lw["gate"]) * lin(x, lw["up"]), lw["down"])
        return jnp.max(lin(x, head), axis=-1)

    x = jnp.asarray(rng.randn(b, shapes["q"][0]).astype(np.float32) * 0.1, dtype)
    return best_seconds(lambda: step(x, weights, head).block_until_ready(), repeats)
