"""Scanned vs unrolled cached forward of our sampler on SmolLM2-135M-Instruct, in one process, interleaved
(unrolled, scanned, unrolled, scanned): 16 chat prompts, greedy, N new tokens (argv[1], default 96).

    python -m iopo_jax.tools.fetch_model smollm2-135m-instruct --out ~/.cache/iopo_jax/models/smollm2-135m-instruct
    python bench/scan_vs_unroll_decode.py 96

Prints wall and process CPU seconds of each timed call (after a 4-token warm-up call that compiles)."""
import os, sys, time, resource
import jax
from iopo_jax.sampling.sampler import Sampler
from iopo_jax.sampling.params import SamplingParams

md = os.path.expanduser("~/.cache/iopo_jax/models/smollm2-135m-instruct")
prompts = [[{"role": "user", "content": f"Write {i % 4 + 2} sentences about topic number {i}, in English, "
             "then end with the word DONE."}] for i in range(16)]
p = SamplingParams(max_new_tokens=int(sys.argv[1]) if len(sys.argv) > 1 else 96, temperature=0.0)
for scan in (False, True, False, True):
    s = Sampler.from_pretrained(md, scan_layers=scan)
    s.chat(prompts[:2], SamplingParams(max_new_tokens=4, temperature=0.0))  # compile
    c0, t0 = time.process_time(), time.perf_counter()
    out = s.chat(prompts, p)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    toks = sum(len(o.token_ids) if hasattr(o, "token_ids") else 0 for o in out)
    print(f"scan_layers={scan}: {dt:.1f} s wall, {dc:.1f} CPU-s, {toks} tokens", flush=True)
