"""Sampling: batched generation with a KV cache (prefill + decode loop), greedy / temperature / top-p / top-k.

Public API::

    from iopo_jax.sampling import Sampler, SamplingParams, Completion

    sampler = Sampler(model, tokenizer, mesh=mesh)            # or Sampler.from_pretrained(model_dir, ...)
    outs = sampler.generate(["Hello"], SamplingParams(max_new_tokens=32))
    outs = sampler.chat([[{"role": "user", "content": "Hi"}]], SamplingParams(temperature=0.7, seed=0))
"""
from iopo_jax.sampling.params import FINISH_LENGTH, FINISH_STOP, Completion, GenerationStats, Row, SamplingParams
from iopo_jax.sampling.sampler import Sampler, pick_bucket, pow2_buckets, read_eos_ids

__all__ = ["Sampler", "SamplingParams", "Completion", "GenerationStats", "Row", "FINISH_STOP", "FINISH_LENGTH",
           "pick_bucket", "pow2_buckets", "read_eos_ids"]
