"""The dense products of one decode step, one by one: XLA (our layout), XLA (transposed layout), NumPy's
BLAS and torch (what transformers runs), on this device, in one run.

A decode step of a dense transformer is, FLOP for FLOP, mostly products ``x [b, d_in] @ W`` with few
rows ``b`` (the batch) and a large weight: per layer q, k, v, o, gate, up and down, then the LM head.
Our ``Linear`` keeps HF's ``[out, in]`` weight layout (``einsum("bi,oi->bo")``, the ``xla_oi`` column);
the ``xla_io`` column times the same product with the weight stored ``[in, out]``. For every shape the
script prints GFLOP/s per engine, and then the **dense ceiling** of a decode step: the step time if it were nothing but these
products at the measured speeds (no attention, norms, cache writes, sampling), as tokens/s and as a
fraction of this device's dense matmul peak measured in the same run (``bench/peak.py``). No
engine can decode faster than its own ceiling, so the ratio of two ceilings bounds the speed-up one
can show over the other on this machine, with one caveat: products timed one call at a time each pay a
dispatch, which a compiled step does not, so for XLA the sum can exceed a real step's time. The
``xla_chain`` line therefore also times every product of a step in **one** jitted program (each layer's
own weights, in our layout, the products chained through a residual as in the model; the elementwise work
around them is a few adds and multiplies): XLA's dense ceiling without dispatch.

    python bench/dense_dots.py --model_dir=~/.cache/iopo_jax/models/smollm2-135m-instruct
    python bench/dense_dots.py --model_dir=... --batch_sizes=1,32 --json_out=dots.json
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags

from data_pipeline import cli
from peak import best_seconds, matmul_peak, step_products, time_chain  # bench/peak.py

flags.DEFINE_string("model_dir", None, "HF model directory (its config.json gives the shapes)")
flags.DEFINE_list("batch_sizes", ["1", "32"], "rows per product (the decode batch)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of activations and weights")
flags.DEFINE_integer("repeats", 20, "timed calls per product (the best is kept)")
flags.DEFINE_bool("torch", True, "also time torch.nn.functional.linear (skipped when torch is not installed)")
flags.DEFINE_list("peak_sizes", ["1024", "2048", "3072"], "square sizes n of the [n, n] x [n, n] products that "
                  "measure the matmul peak (the best is kept)")
flags.DEFINE_string("json_out", None, "also write the results to this JSON file")
FLAGS = flags.FLAGS
flags.mark_flag_as_required("model_dir")


def time_product(b: int, d_in: int, d_out: int, dtype: str, repeats: int, use_torch: bool) -> dict:
    """Best seconds of one ``[b, d_in] x [d_in, d_out]`` product per engine."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.RandomState(0)
    x = rng.randn(b, d_in).astype(np.float32)
    w_oi = (rng.randn(d_out, d_in) / np.sqrt(d_in)).astype(np.float32)
    xj, wj = jnp.asarray(x, dtype), jnp.asarray(w_oi, dtype)
    wj_io = jnp.asarray(np.ascontiguousarray(w_oi.T), dtype)
    ours = jax.jit(lambda x, w: jnp.einsum("bi,oi->bo", x, w))
    nn = jax.jit(lambda x, w: x @ w)
    out = {"xla_oi": best_seconds(lambda: ours(xj, wj).block_until_ready(), repeats),
           "xla_io": best_seconds(lambda: nn(xj, wj_io).block_until_ready(), repeats)}
    if dtype == "float32":
        out["numpy"] = best_seconds(lambda: x @ w_oi.T, repeats)
    if use_torch:
        import torch

        tx = torch.from_numpy(x).to(getattr(torch, dtype))
        tw = torch.from_numpy(w_oi).to(getattr(torch, dtype))
        with torch.inference_mode():
            out["torch"] = best_seconds(lambda: torch.nn.functional.linear(tx, tw), repeats)
    return out


def main(argv):
    del argv
    path = os.path.join(os.path.expanduser(FLAGS.model_dir), "config.json")
    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model_dir: cannot read {path}: {e}") from None
    use_torch = FLAGS.torch
    if use_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch is not installed: its column is skipped", file=sys.stderr)
            use_torch = False
    import jax

    if use_torch:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    peak = matmul_peak(FLAGS.dtype, sizes=[int(n) for n in FLAGS.peak_sizes])["gflops"]
    engines = ["xla_oi", "xla_io"] + (["numpy"] if FLAGS.dtype == "float32" else []) + (["torch"] if use_torch else [])
    print(f"device: {jax.devices()[0].platform} x{jax.device_count()}  model: {cfg.get('model_type')}  "
          f"dtype={FLAGS.dtype}  matmul peak {peak:.1f} GFLOP/s (same run)")
    print("xla_oi: our layout (weight [out, in]); xla_io: weight stored [in, out]; numpy: BLAS; torch: F.linear")
    results = {"peak_gflops": peak, "dtype": FLAGS.dtype, "config": FLAGS.model_dir, "batches": []}
    for b in [int(s) for s in FLAGS.batch_sizes]:
        print(f"\nbatch {b}: GFLOP/s per product" + "".join(f"{e:>10}" for e in engines))
        step = {e: 0.0 for e in engines}
        flops_step = 0.0
        rows = []
        for name, d_in, d_out, count in step_products(cfg):
            t = time_product(b, d_in, d_out, FLAGS.dtype, FLAGS.repeats, use_torch)
            fl = 2.0 * b * d_in * d_out
            flops_step += fl * count
            for e in engines:
                step[e] += t[e] * count
            rows.append({"name": name, "d_in": d_in, "d_out": d_out, "per_step": count,
                         "gflops": {e: fl / t[e] / 1e9 for e in engines}})
            print(f"  {name:>8} {d_in:>5} x {d_out:<7} x{count:<3}" + "".join(
                f"{fl / t[e] / 1e9:10.1f}" for e in engines))
        print(f"  dense ceiling of one step ({flops_step / 1e9:.2f} GFLOP):")
        ceil = {}
        for e in engines:
            g = flops_step / step[e] / 1e9
            ceil[e] = {"step_ms": step[e] * 1e3, "tokens_per_s": b / step[e], "gflops": g, "of_peak": g / peak}
            print(f"    {e:>8}: {step[e] * 1e3:8.1f} ms  {b / step[e]:8.1f} tokens/s  {g:6.1f} GFLOP/s  "
                  f"{100 * g / peak:5.1f}% of the matmul peak")
        t_chain = time_chain(b, step_products(cfg), FLAGS.dtype, max(3, FLAGS.repeats // 4))
        g = flops_step / t_chain / 1e9
        ceil["xla_chain"] = {"step_ms": t_chain * 1e3, "tokens_per_s": b / t_chain, "gflops": g, "of_peak": g / peak}
        print(f"  {'xla_chain':>10}: {t_chain * 1e3:8.1f} ms  {b / t_chain:8.1f} tokens/s  {g:6.1f} GFLOP/s  "
              f"{100 * g / peak:5.1f}% of the matmul peak  (every product of the step in one jitted program)")
        results["batches"].append({"batch": b, "products": rows, "ceiling": ceil})
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    cli.run_app(main)
