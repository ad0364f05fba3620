"""Load benchmark of the OpenAI server: a mixed workload with Poisson arrivals, continuous vs batch-level
batching, and the same workload through transformers ``generate`` as the baseline.

Workload (seeded): ``--num_requests`` completion requests per arrival rate; a fraction
``--long_fraction`` are long (``--long_prompt`` prompt tokens, ``--long_new`` new tokens), the rest
short (``--short_prompt`` / ``--short_new``); prompts are random token ids, greedy, EOS ignored, so
every request generates exactly its ``max_tokens``. Inter-arrival times are exponential with mean
``1 / rate``. Every request streams, so time to first token (TTFT) is the time from sending to the
first streamed token; latency is the time to the last one.

Servers run on 127.0.0.1 in this process (port 0), one per engine mode (``continuous``, ``static``
= batch-level), warmed up before timing so that no timed run compiles: the continuous engine with
``Scheduler.warmup`` for the two request classes (every lane / job batch bucket it can produce), the
batch-level engine by running one batch of every (batch bucket, with or without a long request) it
can form. The ``hf`` baseline serves
the requests one at a time in arrival order with ``transformers`` ``generate`` (batch 1, KV cache),
the way a simple server without batching would. Everything is bounded by ``--timeout_s`` per run.

Reported per (mode, rate): output tokens/s (all generated tokens / (last finish - first send)),
TTFT p50/p99 and latency p50/p99 over all requests and latency p50 of the short requests.

Example::

    python bench/serve_load.py --model_dir=/path/SmolLM2-135M-Instruct --rates=0.5,2 --num_requests=16
    python bench/serve_load.py --random_smollm2 --rates=1 --num_requests=8   # random weights, no HF
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import threading
import time

from absl import flags

from data_pipeline import cli

flags.DEFINE_string("model_dir", None, "HF checkpoint directory (Llama / Qwen2) with a tokenizer")
flags.DEFINE_bool("random_smollm2", False, "instead of --model_dir: random weights of SmolLM2-135M's shape "
                  "and a Qwen2 tokenizer built offline (no transformers baseline)")
flags.DEFINE_list("rates", ["0.2", "1"], "Poisson arrival rates to measure, requests per second")
flags.DEFINE_list("modes", ["continuous", "static", "hf"], "engines: continuous, static (batch-level), hf")
flags.DEFINE_integer("num_requests", 8, "requests per rate")
flags.DEFINE_float("long_fraction", 0.25, "fraction of long requests")
flags.DEFINE_integer("short_prompt", 32, "prompt tokens of a short request")
flags.DEFINE_integer("short_new", 16, "new tokens of a short request")
flags.DEFINE_integer("long_prompt", 256, "prompt tokens of a long request")
flags.DEFINE_integer("long_new", 48, "new tokens of a long request")
flags.DEFINE_integer("max_batch_size", 4, "sequences generated together by the server")
flags.DEFINE_integer("decode_chunk", 8, "decode steps between host checks (streaming granularity)")
flags.DEFINE_integer("prefill_chunk", 64, "prefill chunk (both engines): long prompts are prefilled in chunks of "
                     "this many tokens, and the continuous engine decodes running requests between them")
flags.DEFINE_integer("prefill_budget", 64, "continuous engine: prompt tokens prefilled per scheduler round")
flags.DEFINE_float("timeout_s", 600, "upper bound on one (mode, rate) run; requests not finished by then count "
                   "as errors")
flags.DEFINE_float("total_timeout_s", 3600, "upper bound on the whole benchmark: modes / rates not started by then "
                   "are skipped (and said so)")
flags.DEFINE_integer("seed", 0, "workload seed")
flags.DEFINE_string("json_out", None, "also write the results to this JSON file")
F = flags.FLAGS


def workload(rate: float, n: int, seed: int, vocab: int):
    import numpy as np

    rng = np.random.RandomState(seed)
    t, out = 0.0, []
    for i in range(n):
        long = rng.rand() < F.long_fraction
        p, new = (F.long_prompt, F.long_new) if long else (F.short_prompt, F.short_new)
        out.append(dict(at=t, long=bool(long), prompt=[int(x) for x in rng.randint(100, vocab - 100, p)],
                        max_tokens=new))
        t += rng.exponential(1.0 / rate)
    return out


def warm_up(mode: str, sampler, vocab: int):
    """Compile before timing. Continuous: ``Scheduler.warmup`` for the short and the long request class.
    Batch-level: its shapes depend on which requests share a batch (batch bucket x longest prompt x
    largest max_tokens), so it runs one batch of every batch bucket, all short or with one long request."""
    import numpy as np

    from iopo_jax.sampling import SamplingParams

    if mode == "continuous":
        return sampler.scheduler.warmup([(F.short_prompt, F.short_new), (F.long_prompt, F.long_new)],
                                        SamplingParams(ignore_eos=True))
    rng = np.random.RandomState(F.seed + 99)
    before = dict(sampler.engine.trace_counts)
    for b in sampler.batch_buckets:
        for with_long in (False, True):
            prompts = [rng.randint(100, vocab - 100, F.short_prompt).tolist() for _ in range(b)]
            new = F.short_new
            if with_long:
                prompts[0], new = rng.randint(100, vocab - 100, F.long_prompt).tolist(), F.long_new
            sampler.generate(prompts, SamplingParams(max_new_tokens=new, ignore_eos=True))
    after = dict(sampler.engine.trace_counts)
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def summarize(mode, rate, results, wall):
    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")

    ok = [r for r in results if r.get("error") is None and r.get("end") is not None]
    ttft = [r["first"] - r["sent"] for r in ok]
    lat = [r["end"] - r["sent"] for r in ok]
    short = [r["end"] - r["sent"] for r in ok if not r["long"]]
    toks = sum(r["tokens"] for r in ok)
    return dict(mode=mode, rate=rate, requests=len(results), ok=len(ok), tokens=toks, wall_s=round(wall, 2),
                tokens_per_s=round(toks / wall, 2) if wall else 0.0,
                ttft_p50=round(pct(ttft, 50), 3), ttft_p99=round(pct(ttft, 99), 3),
                latency_p50=round(pct(lat, 50), 3), latency_p99=round(pct(lat, 99), 3),
                short_latency_p50=round(statistics.median(short), 3) if short else float("nan"),
                errors=[r["error"] for r in results if r.get("error")][:3])


def run_server(sampler, reqs, timeout_s):
    import openai

    from iopo_jax.sampling.serve import OpenAIServer

    srv = OpenAIServer(sampler, model_name="m", host="127.0.0.1", port=0, max_batch_size=F.max_batch_size)
    srv.start()
    try:
        results = [dict(long=r["long"]) for r in reqs]
        t0 = time.perf_counter()

        def one(i, r):
            res = results[i]
            delay = t0 + r["at"] - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            c = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=timeout_s)
            res["sent"] = time.perf_counter()
            try:
                stream = c.completions.create(model="m", prompt=r["prompt"], max_tokens=r["max_tokens"],
                                              temperature=0, stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True})
                for ch in stream:
                    if ch.usage is not None:
                        res["tokens"] = ch.usage.completion_tokens
                    if ch.choices and ch.choices[0].text and "first" not in res:
                        res["first"] = time.perf_counter()
                res["end"] = time.perf_counter()
                res.setdefault("first", res["end"])
            except Exception as e:  # reported, not fatal
                res["error"] = f"{type(e).__name__}: {e}"[:200]

        threads = [threading.Thread(target=one, args=(i, r), daemon=True) for i, r in enumerate(reqs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, t0 + timeout_s - time.perf_counter()))
        starts = [r["sent"] for r in results if "sent" in r]
        ends = [r["end"] for r in results if r.get("end")]
        wall = (max(ends) - min(starts)) if ends else float("nan")
        return results, wall
    finally:
        srv.shutdown()


def run_hf(tmodel, reqs, timeout_s):
    import torch
    from transformers.generation.streamers import BaseStreamer

    class First(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.first is None:  # call 1 is the prompt
                self.first = time.perf_counter()

        def end(self):
            pass

    results = [dict(long=r["long"]) for r in reqs]
    t0 = time.perf_counter()
    for i, r in enumerate(reqs):  # one at a time, in arrival order (FIFO queue)
        res = results[i]
        res["sent"] = t0 + r["at"]
        delay = res["sent"] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if time.perf_counter() - t0 > timeout_s:
            res["error"] = "timeout"
            continue
        st = First()
        with torch.no_grad():
            out = tmodel.generate(torch.tensor([r["prompt"]]), attention_mask=torch.ones(1, len(r["prompt"]),
                                                                                         dtype=torch.long),
                                  max_new_tokens=r["max_tokens"], min_new_tokens=r["max_tokens"], do_sample=False,
                                  streamer=st, pad_token_id=0)
        res["end"] = time.perf_counter()
        res["first"] = st.first or res["end"]
        res["tokens"] = int(out.shape[1] - len(r["prompt"]))
    ends = [r["end"] for r in results if r.get("end")]
    return results, (max(ends) - t0) if ends else float("nan")


def main(argv):
    del argv
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from iopo_jax.sampling import Sampler

    if F.random_smollm2:
        from flax import nnx

        from iopo_jax.models import ModelConfig, Transformer
        from data_pipeline.tokenizer import build_qwen2_tokenizer, load_tokenizer

        cfg = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                          num_kv_heads=3, head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True)
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        tok = load_tokenizer(build_qwen2_tokenizer(tempfile.mkdtemp()))
        make = lambda cont: Sampler(model, tok, max_batch_size=F.max_batch_size, eos_token_ids=[],  # noqa: E731
                                    decode_chunk=F.decode_chunk, prefill_chunk=F.prefill_chunk, continuous=cont,
                                    prefill_budget=F.prefill_budget)
        modes = [m for m in F.modes if m != "hf"]
        vocab = cfg.vocab_size
    else:
        if not F.model_dir:
            sys.exit("give --model_dir or --random_smollm2")
        shared = {}

        def make(cont):
            s = Sampler.from_pretrained(F.model_dir, max_batch_size=F.max_batch_size, decode_chunk=F.decode_chunk,
                                        prefill_chunk=F.prefill_chunk, prefill_budget=F.prefill_budget,
                                        continuous=cont)
            if "state" in shared:
                s.state = shared["state"]
            shared["state"] = s.state
            return s
        modes = list(F.modes)
        vocab = json.load(open(os.path.join(F.model_dir, "config.json")))["vocab_size"]
    rows = []
    rates = [float(r) for r in F.rates]
    t_start = time.perf_counter()

    def out_of_time(what):
        if time.perf_counter() - t_start > F.total_timeout_s:
            print(f"[skip] {what}: --total_timeout_s={F.total_timeout_s} reached", flush=True)
            return True
        return False

    for mode in modes:
        if mode == "hf":
            import transformers

            tmodel = transformers.AutoModelForCausalLM.from_pretrained(F.model_dir).eval()
            torch_threads = __import__("torch").get_num_threads()
            print(f"[hf] warm-up (torch threads: {torch_threads}) ...", flush=True)
            run_hf(tmodel, workload(1.0, 2, F.seed + 99, vocab), F.timeout_s)
            for rate in rates:
                if out_of_time(f"hf rate {rate}"):
                    continue
                load0 = os.getloadavg()[0]
                res, wall = run_hf(tmodel, workload(rate, F.num_requests, F.seed, vocab), F.timeout_s)
                rows.append(summarize("hf", rate, res, wall))
                rows[-1]["loadavg_1min_start_end"] = [round(load0, 1), round(os.getloadavg()[0], 1)]
                print(json.dumps(rows[-1]), flush=True)
            continue
        sampler = make(mode == "continuous")
        if out_of_time(mode):
            continue
        print(f"[{mode}] warm-up (compilation) ...", flush=True)
        tw = time.perf_counter()
        compiled = warm_up(mode, sampler, vocab)
        print(f"[{mode}] warm-up: {time.perf_counter() - tw:.1f} s, compilations {compiled}", flush=True)
        for rate in rates:
            if out_of_time(f"{mode} rate {rate}"):
                continue
            before = dict(sampler.engine.trace_counts)
            load0 = os.getloadavg()[0]
            res, wall = run_server(sampler, workload(rate, F.num_requests, F.seed, vocab), F.timeout_s)
            rows.append(summarize(mode, rate, res, wall))
            rows[-1]["loadavg_1min_start_end"] = [round(load0, 1), round(os.getloadavg()[0], 1)]
            after = dict(sampler.engine.trace_counts)
            rows[-1]["compilations_during_run"] = {k: v - before.get(k, 0) for k, v in after.items()
                                                   if v != before.get(k, 0)}
            print(json.dumps(rows[-1]), flush=True)
    print("\n| mode | rate req/s | ok | out tok/s | TTFT p50 | TTFT p99 | latency p50 | latency p99 | short p50 | "
          "load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        la = r.get("loadavg_1min_start_end", ["?", "?"])
        print(f"| {r['mode']} | {r['rate']} | {r['ok']}/{r['requests']} | {r['tokens_per_s']} | {r['ttft_p50']} | "
              f"{r['ttft_p99']} | {r['latency_p50']} | {r['latency_p99']} | {r['short_latency_p50']} | "
              f"{la[0]}-{la[1]} |")
    if F.json_out:
        with open(F.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    cli.run_app(main)
