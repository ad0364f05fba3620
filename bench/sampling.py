"""Prefill and decode throughput of our sampler vs transformers ``generate`` (static KV cache), same run.

Greedy generation of ``--new_tokens`` tokens (EOS ignored, so every row runs to the end) after
random prompts of ``--prompt_len`` tokens, for each batch size. Compilation / warm-up runs are not
timed in the throughputs; "compile s" is the first call's time minus the best warm call's (mostly
compilation). Prefill tokens/s = batch * prompt_len / prefill time (our prefill includes sampling the
first token); decode tokens/s = batch * (new_tokens - 1) / decode time. For transformers the
prefill time is a ``max_new_tokens=1`` call and the decode time is the difference to the full call.

Example::

    python bench/sampling.py                                   # tiny random Qwen2, short default run
    python bench/sampling.py --batch_sizes=1,8,32 --prompt_len=256 --new_tokens=128
    python bench/sampling.py --model_dir=/ckpt/Qwen2-7B-Instruct --dtype=bfloat16 --skip_hf
    python bench/sampling.py --random_config=qwen2_7b --dtype=bfloat16 --batch_sizes=64 \\
        --prompt_len=512 --new_tokens=512 --peak_bandwidth_gbs=4800   # GPU: roofline fraction
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app, flags

from data_pipeline import cli
from peak import git_commit, matmul_peak, step_products, time_chain  # bench/peak.py

flags.DEFINE_string("model_dir", None, "HF checkpoint directory; default: a tiny random Qwen2 written to a temp dir")
flags.DEFINE_enum("random_config", None, ["qwen2_7b", "smoke"],
                  "instead of a checkpoint, random weights with this architecture (no transformers baseline); "
                  "'smoke' is a small one for checking the script")
flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "batch sizes to measure")
flags.DEFINE_integer("prompt_len", 64, "prompt tokens per row")
flags.DEFINE_integer("new_tokens", 32, "generated tokens per row")
flags.DEFINE_integer("repeats", 2, "timed repetitions per setting (the best is kept)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute and parameter dtype of both engines")
flags.DEFINE_bool("skip_hf", False, "do not run the transformers baseline")
flags.DEFINE_float("peak_bandwidth_gbs", 0.0,
                   "accelerator memory bandwidth in GB/s; when set, report the decode step's fraction of the "
                   "bandwidth roofline (bytes of weights + KV cache read per step / step time / peak)")
flags.DEFINE_bool("matmul_peak", True,
                  "also measure this device's dense matmul FLOP/s (jitted [n, n] x [n, n] products in --dtype) in the "
                  "same run and report the decode step's achieved FLOP/s as a fraction of it, and time the step's "
                  "dense products alone in one jitted program (XLA's dense ceiling of a step, no attention, norms "
                  "or sampling; bench/dense_dots.py's xla_chain)")
flags.DEFINE_list("peak_sizes", ["1024", "2048", "3072"], "square sizes n of the [n, n] x [n, n] products that "
                  "measure the matmul peak (the best is kept)")
flags.DEFINE_enum("scan_layers", "auto", ["auto", "true", "false"],
                  "our sampler's layer loop (Sampler(scan_layers=...)): true = one lax.scan over the stacked layer "
                  "weights, false = layers unrolled, auto = unrolled on CPU and scanned on accelerators (what "
                  "evaluation, generate and serve use)")
flags.DEFINE_list("engines", ["continuous", "static"],
                  "our engines to measure: continuous (continuous batching, the sampler's default) and/or static "
                  "(the batch-level engine, Sampler(continuous=False)); a suffix ':xla' runs that engine with the "
                  "model's attention_impl set to xla (on CPU: the einsum decode attention instead of the C++ kernel "
                  "of iopo_jax.models.cpu_attention), e.g. static,static:xla compares the two in one run")
flags.DEFINE_string("json_out", None, "also write the results to this JSON file")
FLAGS = flags.FLAGS


def _tiny_model_dir() -> str:
    from iopo_jax.tools.make_tiny_model import make_tiny_model

    d = os.path.join(tempfile.gettempdir(), "iopo_bench_tiny_qwen2")
    if not os.path.isfile(os.path.join(d, "model.safetensors")):
        make_tiny_model(d, "qwen2")
    return d


RANDOM_CONFIGS = {
    # Qwen2-7B shapes (vocab padded to 152,064 as in the released checkpoint).
    "qwen2_7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                     num_kv_heads=4, head_dim=128),
    "smoke": dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=32),
}


def _load(dtype):
    import jax
    from flax import nnx

    from iopo_jax.models import ModelConfig, Transformer, load_model

    if FLAGS.random_config:
        cfg = ModelConfig(rope_theta=1e6, param_dtype=dtype, dtype=dtype, max_position_embeddings=32768,
                          eos_token_id=151645, **RANDOM_CONFIGS[FLAGS.random_config])
        graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0), abstract=True))
        leaves, treedef = jax.tree_util.tree_flatten(state)
        keys = jax.random.split(jax.random.key(0), len(leaves))
        make = jax.jit(lambda k, shape, dt: jax.random.normal(k, shape, dt) * 0.02, static_argnums=(1, 2))
        leaves = [make(k, tuple(x.shape), x.dtype) for k, x in zip(keys, leaves)]
        return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves)), cfg, None
    d = FLAGS.model_dir or _tiny_model_dir()
    model, cfg = load_model(d, dtype=dtype, param_dtype=dtype)
    return model, cfg, d


def _attention_impl(model, impl: str) -> str:
    """Set every layer's attention implementation (read when a sampler traces the model); returns the old one."""
    old = model.layers[0].self_attn.impl
    for layer in model.layers:
        layer.self_attn.impl = impl
    return old


def bench_ours(model, cfg, batch_sizes, prompt_len, new_tokens, repeats, continuous=True, attention_impl=None):
    if attention_impl is not None:
        old = _attention_impl(model, attention_impl)
        try:
            return bench_ours(model, cfg, batch_sizes, prompt_len, new_tokens, repeats, continuous)
        finally:
            _attention_impl(model, old)
    import numpy as np

    from iopo_jax.sampling import Sampler, SamplingParams

    sampler = Sampler(model, None, eos_token_ids=[], prompt_buckets=(prompt_len,), new_token_buckets=(new_tokens,),
                      batch_buckets=tuple(sorted(batch_sizes)), max_batch_size=max(batch_sizes),
                      max_model_len=prompt_len + new_tokens, continuous=continuous,
                      scan_layers=FLAGS.scan_layers)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    rng = np.random.RandomState(0)
    out = {}
    for b in batch_sizes:
        prompts = [list(rng.randint(0, min(cfg.vocab_size, 150000), prompt_len)) for _ in range(b)]
        t0 = time.perf_counter()
        sampler.generate(prompts, params)  # compile
        first = time.perf_counter() - t0
        best = None
        for _ in range(repeats):
            completions = sampler.generate(prompts, params)
            s = sampler.last_stats
            if best is None or s.total_s < best.total_s:
                best = s
        out[b] = dict(prefill_tok_s=b * prompt_len / best.prefill_s,
                      decode_tok_s=b * (new_tokens - 1) / best.decode_s,
                      decode_step_ms=1000 * best.decode_s / (new_tokens - 1),
                      first_call_s=first, compile_s=first - best.total_s,
                      tokens=[c.token_ids for c in completions])
    return out, sampler


def bench_hf(model_dir, batch_sizes, prompt_len, new_tokens, repeats, dtype):
    import numpy as np
    import torch
    import transformers

    tmodel = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32 if dtype == "float32" else torch.bfloat16).eval()
    rng = np.random.RandomState(0)
    out = {}
    for b in batch_sizes:
        ids = torch.tensor(rng.randint(0, min(tmodel.config.vocab_size, 150000), (b, prompt_len)))
        am = torch.ones_like(ids)

        def run(n):
            t = time.perf_counter()
            with torch.no_grad():
                g = tmodel.generate(input_ids=ids, attention_mask=am, do_sample=False, max_new_tokens=n,
                                    min_new_tokens=n, eos_token_id=None, pad_token_id=0,
                                    cache_implementation="static")
            assert g.shape[1] == prompt_len + n
            return time.perf_counter() - t

        run(2)  # warm-up
        t1 = min(run(1) for _ in range(repeats))
        tn = min(run(new_tokens) for _ in range(repeats))
        dec = max(tn - t1, 1e-9)
        out[b] = dict(prefill_tok_s=b * prompt_len / t1, decode_tok_s=b * (new_tokens - 1) / dec,
                      decode_step_ms=1000 * dec / (new_tokens - 1))
    return out


def decode_flops_per_token(cfg, prompt_len: int, new_tokens: int) -> float:
    """Matmul FLOPs of one decode step per row: linear layers + LM head + attention over the cache."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    linear = L * (d * n * h + 2 * d * k * h + n * h * d + 3 * d * f) + d * cfg.vocab_size
    attn = L * 2 * n * h * (prompt_len + new_tokens)  # q.k and p.v over every cache slot (what we compute)
    return 2.0 * (linear + attn)


def roofline(cfg, model, b, prompt_len, new_tokens, step_ms, peak_gbs):
    """Fraction of the bandwidth roofline reached by a decode step (weights + average KV read)."""
    import jax
    import numpy as np

    from flax import nnx

    _, state = nnx.split(model)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state) if hasattr(x, "dtype"))
    if not cfg.tie_word_embeddings:  # a decode step reads only b rows of the input embedding
        emb = model.embed.embedding[...]
        weight_bytes -= emb.size * emb.dtype.itemsize
    itemsize = np.dtype(cfg.dtype).itemsize if cfg.dtype != "bfloat16" else 2
    cache_slots = prompt_len + new_tokens  # our decode attends over the whole preallocated cache
    kv_bytes = 2 * cfg.num_layers * b * cache_slots * cfg.num_kv_heads * cfg.head_dim * itemsize
    step_bytes = weight_bytes + kv_bytes
    return dict(weight_gb=weight_bytes / 1e9, kv_gb=kv_bytes / 1e9,
                achieved_gbs=step_bytes / (step_ms / 1000) / 1e9,
                roofline_fraction=step_bytes / (step_ms / 1000) / 1e9 / peak_gbs)


def main(argv):
    del argv
    import jax

    from iopo_jax.sampling.sampler import resolve_scan_layers

    batch_sizes = [int(b) for b in FLAGS.batch_sizes]
    model, cfg, model_dir = _load(FLAGS.dtype)
    layer_loop = "scanned" if resolve_scan_layers(FLAGS.scan_layers) else "unrolled"
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  model: {cfg.model_type} "
          f"d={cfg.hidden_size} layers={cfg.num_layers} vocab={cfg.vocab_size} dtype={FLAGS.dtype}  "
          f"prompt_len={FLAGS.prompt_len} new_tokens={FLAGS.new_tokens}  layers {layer_loop} "
          f"(--scan_layers={FLAGS.scan_layers})", flush=True)
    bad = [e for e in FLAGS.engines if e.split(":")[0] not in ("continuous", "static") or e.count(":") > 1
           or (":" in e and e.split(":")[1] != "xla")]
    if bad or not FLAGS.engines:
        raise app.UsageError(f"--engines: unknown {bad}; choose from continuous, static (optionally with ':xla')")
    engines = {e: bench_ours(model, cfg, batch_sizes, FLAGS.prompt_len, FLAGS.new_tokens, FLAGS.repeats,
                             continuous=e.split(":")[0] == "continuous",
                             attention_impl="xla" if e.endswith(":xla") else None)[0] for e in FLAGS.engines}
    ours = engines[FLAGS.engines[0]]
    ref_tokens = {b: ours[b]["tokens"] for b in batch_sizes}
    for res in engines.values():  # greedy: each engine's rows that equal the first engine's, token for token
        for b in batch_sizes:
            res[b]["same_rows"] = sum(x == y for x, y in zip(ref_tokens[b], res[b].pop("tokens")))
    hf = None
    if not FLAGS.skip_hf and model_dir is not None:
        hf = bench_hf(model_dir, batch_sizes, FLAGS.prompt_len, FLAGS.new_tokens, FLAGS.repeats, FLAGS.dtype)
    results = {"config": dict(batch_sizes=batch_sizes, prompt_len=FLAGS.prompt_len, new_tokens=FLAGS.new_tokens,
                              dtype=FLAGS.dtype, device=jax.devices()[0].device_kind,
                              layer_loop=layer_loop, commit=git_commit()),
               "ours": ours, "engines": engines, "hf": hf}
    header = f"{'engine':>14} {'batch':>5} | {'compile s':>9} {'prefill tok/s':>13} {'decode tok/s':>12} {'step ms':>8} {'same rows':>9}"
    if hf:
        header += f" | {'HF prefill':>10} {'HF decode':>10} | {'prefill x':>9} {'decode x':>8}"
    print(header)
    for e, res in engines.items():
        for b in batch_sizes:
            o = res[b]
            line = (f"{e:>14} {b:>5} | {o['compile_s']:>9.1f} {o['prefill_tok_s']:>13.0f} {o['decode_tok_s']:>12.0f} "
                    f"{o['decode_step_ms']:>8.2f} {o['same_rows']:>4}/{b:<4}")
            if hf:
                h = hf[b]
                line += (f" | {h['prefill_tok_s']:>10.0f} {h['decode_tok_s']:>10.0f} | "
                         f"{o['prefill_tok_s'] / h['prefill_tok_s']:>9.2f} {o['decode_tok_s'] / h['decode_tok_s']:>8.2f}")
            print(line)
    if FLAGS.matmul_peak:
        peak = matmul_peak(FLAGS.dtype, sizes=[int(n) for n in FLAGS.peak_sizes])
        fpt = decode_flops_per_token(cfg, FLAGS.prompt_len, FLAGS.new_tokens)
        results["matmul_peak"] = dict(peak, decode_flops_per_token=fpt, decode={})
        print(f"measured matmul peak: {peak['gflops']:.1f} GFLOP/s ({FLAGS.dtype}, n={peak['n']}); "
              f"decode step: {fpt / 1e6:.1f} MFLOP per row")
        hf_cfg = {"hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_heads, "head_dim": cfg.head_dim,
                  "num_key_value_heads": cfg.num_kv_heads, "intermediate_size": cfg.intermediate_size,
                  "num_hidden_layers": cfg.num_layers, "vocab_size": cfg.vocab_size}
        products = step_products(hf_cfg)
        results["dense_chain"] = {}
        for b in batch_sizes:  # XLA's dense ceiling: the step's products alone, in one jitted program
            t = time_chain(b, products, FLAGS.dtype, 5)
            g = sum(2.0 * b * i * o * c for _, i, o, c in products) / t / 1e9
            results["dense_chain"][b] = dict(step_ms=1e3 * t, tokens_per_s=b / t, gflops=g, fraction=g / peak["gflops"])
            print(f"batch {b}: the step's dense products alone in one program (bench/dense_dots.py's xla_chain): "
                  f"{1e3 * t:.1f} ms = {b / t:.0f} tok/s, {g:.1f} GFLOP/s = {100 * g / peak['gflops']:.1f}% of the peak")
        for e, res in engines.items():
            for b in batch_sizes:
                g = res[b]["decode_tok_s"] * fpt / 1e9
                results["matmul_peak"]["decode"][f"{e}/{b}"] = dict(gflops=g, fraction=g / peak["gflops"])
                chain_ms = results["dense_chain"][b]["step_ms"]
                line = (f"{e} batch {b}: decode {g:.1f} GFLOP/s = {100 * g / peak['gflops']:.1f}% of the matmul peak, "
                        f"step at {100 * chain_ms / res[b]['decode_step_ms']:.0f}% of the dense chain's speed")
                if hf:
                    gh = hf[b]["decode_tok_s"] * fpt / 1e9
                    line += f" (transformers: {gh:.1f} GFLOP/s = {100 * gh / peak['gflops']:.1f}%)"
                print(line)
    if FLAGS.peak_bandwidth_gbs > 0:
        results["roofline"] = {}
        for b in batch_sizes:
            r = roofline(cfg, model, b, FLAGS.prompt_len, FLAGS.new_tokens, ours[b]["decode_step_ms"],
                         FLAGS.peak_bandwidth_gbs)
            results["roofline"][b] = r
            print(f"batch {b}: decode step reads {r['weight_gb']:.2f} GB weights + {r['kv_gb']:.2f} GB KV -> "
                  f"{r['achieved_gbs']:.0f} GB/s = {100 * r['roofline_fraction']:.1f}% of {FLAGS.peak_bandwidth_gbs:.0f} GB/s")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(results, f, indent=2)
    sys.stdout.flush()


if __name__ == "__main__":
    cli.run_app(main)
