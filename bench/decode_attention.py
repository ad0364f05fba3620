"""Decode-step attention on this device: the einsum attention (``iopo_jax.models.transformer.attend``,
what XLA compiles), the CPU kernel (``iopo_jax.models.cpu_attention``, XLA FFI) and NumPy's batched
``matmul``, on the same shapes, in one run.

One decode step of a grouped-query model attends, in every layer, one query token per row against the
row's cached keys and values: per (row, key-value head) two small products, ``[g, h] x [h, S]`` and
``[g, S] x [S, h]`` (``g`` query heads per key-value head). The FLOPs are few (SmolLM2-135M at batch 32
and 192 cached tokens: 0.2 GFLOP per step over 30 layers) and the bytes are the cache itself, so this
should cost about one read of the cache. The script reports both engines' times for all layers of one
step, the achieved GFLOP/s and GB/s (cache bytes read once), and the same-process ratios. The kernel
column is empty where the kernel is unavailable (its reason is printed).

    python bench/decode_attention.py                                  # SmolLM2-135M shapes
    python bench/decode_attention.py --batch=32 --cache_len=384,1408
"""
from __future__ import annotations

import math
import sys
import time

from absl import flags

from data_pipeline import cli

flags.DEFINE_integer("batch", 32, "rows")
flags.DEFINE_list("cache_len", ["192", "384"], "cached tokens per row (one measurement each)")
flags.DEFINE_integer("layers", 30, "layers per step")
flags.DEFINE_integer("kv_heads", 3, "key-value heads")
flags.DEFINE_integer("group", 3, "query heads per key-value head")
flags.DEFINE_integer("head_dim", 64, "head dimension")
flags.DEFINE_integer("repeats", 10, "timed repetitions (the mean is reported)")
FLAGS = flags.FLAGS


def _time(fn, repeats: int) -> float:
    """Mean seconds of ``fn()`` after one warm-up call (``fn`` blocks until its result is ready)."""
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def measure(b: int, s: int, layers: int, k: int, g: int, h: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from iopo_jax.models import cpu_attention
    from iopo_jax.models.transformer import attend

    rng = np.random.RandomState(0)
    q = rng.randn(b, 1, k * g, h).astype(np.float32)
    kc = rng.randn(layers, b, s, k, h).astype(np.float32)
    vc = rng.randn(layers, b, s, k, h).astype(np.float32)
    mask = np.ones((b, 1, s), bool)

    @jax.jit
    def ours(q, kc, vc, mask):
        return jnp.stack([attend(q, kc[i], vc[i], mask, "xla") for i in range(layers)])

    qj, kj, vj, mj = (jnp.asarray(x) for x in (q, kc, vc, mask))
    out_ours = np.asarray(ours(qj, kj, vj, mj))
    t_ours = _time(lambda: jax.block_until_ready(ours(qj, kj, vj, mj)), repeats)

    t_kernel, kernel_diff = float("nan"), float("nan")
    if cpu_attention.status()[0]:
        @jax.jit
        def kernel(q, kc, vc, mask):
            return jnp.stack([cpu_attention.decode_attention(q, kc, vc, i, mask) for i in range(layers)])

        kernel_diff = float(np.max(np.abs(np.asarray(kernel(qj, kj, vj, mj)) - out_ours)))
        t_kernel = _time(lambda: jax.block_until_ready(kernel(qj, kj, vj, mj)), repeats)

    # NumPy: the same maths with the cache in [b, k, S, h] (transposed once, outside the timing)
    kt = np.ascontiguousarray(kc.transpose(0, 1, 3, 2, 4))
    vt = np.ascontiguousarray(vc.transpose(0, 1, 3, 2, 4))
    qn = q.reshape(b, k, g, h)

    def numpy_step():
        outs = []
        for i in range(layers):
            sc = np.matmul(qn, kt[i].transpose(0, 1, 3, 2)) / math.sqrt(h)  # [b, k, g, S]
            sc = np.exp(sc - sc.max(-1, keepdims=True))
            sc /= sc.sum(-1, keepdims=True)
            outs.append(np.matmul(sc, vt[i]).reshape(b, 1, k * g * h))
        return np.stack(outs)

    out_np = numpy_step()
    t_np = _time(numpy_step, repeats)
    flops = layers * b * k * g * s * h * 2 * 2
    cache_bytes = 2 * layers * b * s * k * h * 4
    return dict(batch=b, cache_len=s, ours_ms=1000 * t_ours, kernel_ms=1000 * t_kernel, numpy_ms=1000 * t_np,
                ours_gbs=cache_bytes / t_ours / 1e9, kernel_gbs=cache_bytes / t_kernel / 1e9,
                numpy_gbs=cache_bytes / t_np / 1e9, ours_gflops=flops / t_ours / 1e9,
                max_abs_diff=float(np.max(np.abs(out_ours - out_np))), kernel_diff=kernel_diff)


def main(argv):
    del argv
    import jax

    from iopo_jax.models import cpu_attention

    print(f"device: {jax.devices()[0].device_kind}; {FLAGS.layers} layers, {FLAGS.kv_heads} kv heads x "
          f"{FLAGS.group} query heads, head_dim {FLAGS.head_dim}, float32; kernel: {cpu_attention.status()[1]}",
          flush=True)
    print(f"{'batch':>5} {'cache':>6} | {'einsum ms':>9} {'GB/s':>5} {'GFLOP/s':>7} | {'kernel ms':>9} {'GB/s':>5} | "
          f"{'numpy ms':>8} {'GB/s':>5} | {'einsum/kernel':>13} {'einsum/numpy':>12} | {'kernel diff':>11}")
    for s in (int(x) for x in FLAGS.cache_len):
        r = measure(FLAGS.batch, s, FLAGS.layers, FLAGS.kv_heads, FLAGS.group, FLAGS.head_dim, FLAGS.repeats)
        print(f"{r['batch']:>5} {r['cache_len']:>6} | {r['ours_ms']:>9.1f} {r['ours_gbs']:>5.1f} {r['ours_gflops']:>7.2f} | "
              f"{r['kernel_ms']:>9.1f} {r['kernel_gbs']:>5.1f} | {r['numpy_ms']:>8.1f} {r['numpy_gbs']:>5.1f} | "
              f"{r['ours_ms'] / r['kernel_ms']:>13.2f} {r['ours_ms'] / r['numpy_ms']:>12.2f} | {r['kernel_diff']:>11.1e}",
              flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    cli.run_app(main)
