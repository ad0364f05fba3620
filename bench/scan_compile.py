"""Compile time of the training gradient with the layer loop vs scanned layers (``model.scan_layers``).

    python bench/scan_compile.py                         # 28 layers (Qwen2-7B depth), small width, CPU
    python bench/scan_compile.py --layers 28 --hidden 3584 --heads 28 --kv_heads 4 --ffn 18944 --vocab 152064

Builds the model abstractly (no weights allocated), lowers and compiles ``jit(grad(loss))`` of the LoRA
factors for a ``[batch, length]`` batch with full remat, once with the Python loop over layers and once with
``lax.scan``, each in a fresh subprocess (so nothing is shared), and prints lowering + compile seconds and
the ratio. Compile time depends on the number of HLO ops (depth), hardly on the width.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(a):
    sys.path.insert(0, REPO)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from iopo_jax.models.config import LoRAConfig, ModelConfig
    from iopo_jax.models.transformer import Transformer

    cfg = ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_layers=a.layers,
                      num_heads=a.heads, num_kv_heads=a.kv_heads, head_dim=a.hidden // a.heads, dtype="bfloat16",
                      param_dtype="bfloat16", remat=a.remat, attention_impl="xla", lora=LoRAConfig(rank=8),
                      scan_layers=a.child == "scan")
    graph, lora, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0), abstract=True), nnx.LoRAParam, ...)

    def loss(lora, rest, ids):
        m = nnx.merge(graph, lora, rest)
        hidden, _ = m(ids, None, None)
        return jnp.mean(hidden.astype(jnp.float32) ** 2)

    ids = jax.ShapeDtypeStruct((a.batch, a.length), jnp.int32)
    t0 = time.perf_counter()
    lowered = jax.jit(jax.grad(loss)).lower(lora, rest, ids)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    print("RESULT " + json.dumps({"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0,
                                  "hlo_chars": len(lowered.as_text())}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=28, help="decoder layers (default: %(default)s, Qwen2-7B)")
    p.add_argument("--hidden", type=int, default=256, help="model width (default: %(default)s)")
    p.add_argument("--heads", type=int, default=4, help="query heads (default: %(default)s)")
    p.add_argument("--kv_heads", type=int, default=2, help="key/value heads (default: %(default)s)")
    p.add_argument("--ffn", type=int, default=512, help="MLP width (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="rows (default: %(default)s)")
    p.add_argument("--length", type=int, default=512, help="tokens per row (default: %(default)s)")
    p.add_argument("--remat", default="full", choices=["none", "full", "dots", "dots_no_batch"],
                   help="per-layer remat policy (default: %(default)s)")
    p.add_argument("--json_out", default=None, help="also write the results to this JSON file")
    p.add_argument("--child", choices=["loop", "scan"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    res = {"args": vars(a), "load_avg_start": os.getloadavg()}
    for mode in ("loop", "scan"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode] + sys.argv[1:],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
        lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if not lines:
            raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
        res[mode] = json.loads(lines[-1][7:])
        print(f"{mode:5s}: lower {res[mode]['lower_s']:.1f} s + compile {res[mode]['compile_s']:.1f} s = "
              f"{res[mode]['total_s']:.1f} s (HLO text {res[mode]['hlo_chars'] / 1e6:.2f} MB)", flush=True)
    res["ratio_scan_over_loop"] = res["scan"]["total_s"] / res["loop"]["total_s"]
    res["load_avg_end"] = os.getloadavg()
    print(f"scan / loop = {res['ratio_scan_over_loop']:.2f} ({a.layers} layers, remat {a.remat}); "
          f"load average {res['load_avg_start'][0]:.1f} -> {res['load_avg_end'][0]:.1f}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
