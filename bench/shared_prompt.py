"""Tokens and time saved by shared-prompt packing (``data.share_prompt``) at TRACE-like lengths.

    python bench/shared_prompt.py                              # prompts ~600, answers ~400, 2 IOPO groups
    python bench/shared_prompt.py --prompt 600 --response 400 --groups 4 --hidden 512 --layers 4

Same random IOPO groups (``bench/train_step.py``'s batch: lengths drawn in [0.8, 1.2] x nominal) as
unpacked rows (4 per group, padded to a multiple of 8) and as shared-prompt rows (2 per group). Timed: the
jitted gradient of the summed per-sequence log-probs w.r.t. the LoRA factors (policy forward + backward,
``iopo_jax.trainer.forward_logps``) of a random model, median of ``--steps`` after one warm-up, the two
layouts alternating. Also checks that both give the same log-probs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=int, default=600, help="nominal prompt tokens (default: %(default)s)")
    p.add_argument("--response", type=int, default=400, help="nominal answer tokens (default: %(default)s)")
    p.add_argument("--groups", type=int, default=2, help="IOPO groups in the batch (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=128, help="model width (default: %(default)s)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary; below 151,644 the last row is the pad id (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per layout (default: %(default)s)")
    p.add_argument("--json_out", default=None, help="also write the results to this JSON file")
    a = p.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from iopo_jax.models.config import LoRAConfig, ModelConfig
    from iopo_jax.models.transformer import Transformer
    from iopo_jax.trainer import forward_logps
    from train_step import make_batch

    b = make_batch(a.groups, a.prompt, a.response, a.vocab, seed=0)
    plain = {k: jnp.asarray(b[k]) for k in ("input_ids", "labels", "segment_ids", "positions")}
    shared = {k: jnp.asarray(b["sp_" + k]) for k in ("input_ids", "segment_ids", "positions", "prefix_ids",
                                                    "score_positions", "score_targets", "score_sequence")}
    cfg = ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=2 * a.hidden, num_layers=a.layers,
                      num_heads=4, num_kv_heads=2, head_dim=a.hidden // 4, lora=LoRAConfig(rank=8))
    graph, lora, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.LoRAParam, ...)

    def loss(lora, batch):
        out = forward_logps(nnx.merge(graph, lora, rest), batch, 128)
        return jnp.sum(out.logp_sum), out.logp_sum

    fn = jax.jit(jax.grad(loss, has_aux=True))
    res = {"args": vars(a), "load_avg_start": os.getloadavg(), "device": jax.devices()[0].device_kind}
    for name, batch in (("unpacked", plain), ("shared", shared)):
        t = time.perf_counter()
        _, lp = jax.block_until_ready(fn(lora, batch))
        res[name] = {"rows": int(batch["input_ids"].shape[0]), "length": int(batch["input_ids"].shape[1]),
                     "padded_tokens": int(batch["input_ids"].size),
                     "real_tokens": int((np.asarray(batch["segment_ids"]) > 0).sum()),
                     "first_s": time.perf_counter() - t, "times": [], "logps": np.asarray(lp).tolist()}
    for _ in range(a.steps):
        for name, batch in (("unpacked", plain), ("shared", shared)):
            t = time.perf_counter()
            jax.block_until_ready(fn(lora, batch))
            res[name]["times"].append(time.perf_counter() - t)
    for name in ("unpacked", "shared"):
        res[name]["median_s"] = statistics.median(res[name]["times"])
    u, s = res["unpacked"], res["shared"]
    res["logp_max_abs_diff"] = float(np.abs(np.array(u["logps"]) - np.array(s["logps"])).max())
    res["padded_tokens_saved"] = 1 - s["padded_tokens"] / u["padded_tokens"]
    res["real_tokens_saved"] = 1 - s["real_tokens"] / u["real_tokens"]
    res["time_ratio_shared_over_unpacked"] = s["median_s"] / u["median_s"]
    res["load_avg_end"] = os.getloadavg()
    for name in ("unpacked", "shared"):
        r = res[name]
        print(f"{name:8s}: {r['rows']} rows x {r['length']} = {r['padded_tokens']} padded tokens "
              f"({r['real_tokens']} real); median {r['median_s']:.3f} s/step (times {[round(x, 3) for x in r['times']]})")
    print(f"shared / unpacked: {100 * res['padded_tokens_saved']:.1f}% fewer padded tokens, "
          f"{100 * res['real_tokens_saved']:.1f}% fewer real tokens, time x{res['time_ratio_shared_over_unpacked']:.2f}; "
          f"log-prob max |diff| {res['logp_max_abs_diff']:.2e}; load average {res['load_avg_start'][0]:.1f} -> "
          f"{res['load_avg_end'][0]:.1f}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
