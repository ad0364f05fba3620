"""The sampler: prompts in, completions out, over the jitted engine of :mod:`iopo_jax.sampling.engine`.

Example::

    from iopo_jax.sampling import Sampler, SamplingParams

    sampler = Sampler.from_pretrained("/ckpt/Qwen2-7B-Instruct", mesh=make_mesh({"fsdp": -1}), dtype="bfloat16")
    outs = sampler.chat([[{"role": "user", "content": "Write a haiku about JAX."}]],
                        SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=128, seed=0))
    print(outs[0].text, outs[0].finish_reason)

Prompts are strings (encoded as they are), token-id lists, or chat conversations (lists of
``{"role", "content"}``; the tokenizer's chat template is applied with the generation prompt).

Batching: the rows of a call (``len(prompts) * n``) are sorted by prompt length and cut into
batches of ``max_batch_size``; every batch is padded to a batch bucket, its prompts are left padded
to a prompt bucket and its output buffer is a new-token bucket. A long run therefore compiles at
most once per (batch bucket, prompt bucket) for prefill and once per (batch bucket, prompt
bucket, new-token bucket) for decode; ``sampler.trace_counts`` counts them.

Not thread-safe: one thread drives a sampler (the server has one engine thread).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import threading
import time
from typing import Optional, Sequence

import jax
import numpy as np
from flax import nnx

from data_pipeline.tokenizer import load_tokenizer
from iopo_jax.models.lora import load_model_with_adapter
from iopo_jax.models.weights import load_model
from iopo_jax.sampling.continuous import Scheduler
from iopo_jax.sampling.engine import STOPPED, DecodeState, Engine, RowParams
from iopo_jax.sampling.params import (FINISH_LENGTH, FINISH_STOP, Completion, GenerationStats, Prompt,
                                      Row, SamplingParams)
from iopo_jax.sharding import host_value, put_global, use_mesh

logger = logging.getLogger(__name__)


def pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two from ``lo`` below ``hi``, then ``hi`` itself."""
    out, x = [], lo
    while x < hi:
        out.append(x)
        x *= 2
    out.append(hi)
    return tuple(out)


def pick_bucket(x: int, buckets: Sequence[int], what: str) -> int:
    for b in buckets:
        if x <= b:
            return b
    raise ValueError(f"{what} {x} is larger than the largest bucket {buckets[-1]}")


def _flatten_ids(ids) -> list[int]:
    """Token ids from whatever apply_chat_template / __call__ returned."""
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(t) for t in ids]


def read_eos_ids(model_dir: str) -> tuple[int, ...]:
    """EOS ids from ``generation_config.json`` then ``config.json`` of a checkpoint directory."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token_id")
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read eos_token_id ({e})") from e
        for t in (eos if isinstance(eos, list) else [eos]):
            if isinstance(t, int) and t not in ids:
                ids.append(t)
    return tuple(ids)


def resolve_scan_layers(value, mesh=None) -> bool:
    """``scan_layers`` as a bool: True / False (or "true" / "false", any case) as given; "auto" is False when
    the sampler's devices (``mesh``'s, else JAX's default) are CPUs, where a loop over stacked layer weights
    copies every layer's weight slice at every step, and True on accelerators (one compiled layer body)."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "auto":
            devices = mesh.devices.flat if mesh is not None else jax.devices()
            return next(iter(devices)).platform != "cpu"
        if v in ("true", "false"):
            return v == "true"
    elif isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"scan_layers must be true, false or auto, got {value!r}")


class Sampler:
    """Batched generation with a KV cache, on any mesh, for a :class:`~iopo_jax.models.Transformer`.

    Args:
      model: the model (a LoRA model samples base + adapter, no merge needed). It is split once;
        call :meth:`update_model` after changing its weights.
      tokenizer: a HF tokenizer (needed for text prompts, chat and texts; token-id prompts work
        without one, their ``text`` is then empty).
      mesh: the mesh the model's weights are sharded on (``load_model(path, mesh=mesh)``); the batch is
        sharded over (data, fsdp) when its size divides.
      max_batch_size: rows per device batch.
      max_model_len: context limit (prompt + new tokens); default the model's max positions.
      prompt_buckets / new_token_buckets / batch_buckets: static sizes (default powers of two).
      eos_token_ids: ids that end a completion; default the model config's and tokenizer's EOS.
      decode_chunk: decode steps per device call when the host must look at the tokens (stop
        strings, streaming, cancellation); otherwise a batch decodes in one call.
      prefill_chunk: prompts longer than this (and a multiple of it) are prefilled in chunks of this
        many tokens, so attention memory grows with ``chunk * bucket``, not ``bucket ** 2`` (0: off).
        With continuous batching a long prompt is rounded up to a multiple of it (not a power of two)
        and prefilled one chunk per scheduler round, so running rows keep decoding meanwhile.
      continuous: continuous batching (default; see :mod:`iopo_jax.sampling.continuous`): finished
        rows leave the batch at once and waiting rows take their slots, each row with its own cache
        length. False: the batch-level engine (batches sorted by prompt length, each run to its end).
      prefix_sharing: with continuous batching, rows with the same prompt ids (the ``n`` samples of a
        prompt) share one prefill.
      max_cache_tokens: with continuous batching, the KV-cache slots of one lane (batch x cache
        length) are kept under this (default ``max_batch_size * 2048``): long lanes get fewer rows.
      prefill_budget: with continuous batching, prompt tokens (padded) prefilled per scheduler round
        (at least one chunk), between decode chunks.
      lane_promotion: with continuous batching, a row starts in the shortest lane (KV-cache length) that
        holds its prompt and its next decode chunk and moves to a longer lane when it outgrows it (up to
        the lane of prompt + ``max_new_tokens``), so every decode step attends over about the cache the
        row has used, not the one it may use. False: a row decodes in the lane of prompt +
        ``max_new_tokens`` from its first token on. Same outputs either way.
      scan_layers: run the cached forward (prefill and decode) as one ``lax.scan`` over the decoder
        layers, whose weights are stacked once when the weights are set (one extra copy of the layer
        weights): every program compiles one layer body instead of one per layer. False: layers
        unrolled over the model's own weights (longer compilation; on CPU faster decode steps, since
        XLA:CPU copies each layer's weight slice inside a loop: batch 32, SmolLM2-135M 222 vs 260 ms,
        Qwen2.5-0.5B 661 vs 878 ms a step, with 2-3.6x the compile time). "auto": False on CPU, True
        on accelerators (see :func:`resolve_scan_layers`).
    """

    def __init__(self, model, tokenizer=None, *, mesh=None, max_batch_size: int = 32,
                 max_model_len: Optional[int] = None, prompt_buckets: Optional[Sequence[int]] = None,
                 new_token_buckets: Optional[Sequence[int]] = None, batch_buckets: Optional[Sequence[int]] = None,
                 eos_token_ids: Optional[Sequence[int]] = None, decode_chunk: int = 16, pad_id: Optional[int] = None,
                 prefill_chunk: int = 512, continuous: bool = True, prefix_sharing: bool = True,
                 max_cache_tokens: Optional[int] = None, prefill_budget: int = 4096,
                 cache_buckets: Optional[Sequence[int]] = None, scan_layers: bool | str = True,
                 lane_promotion: bool = True):
        self.cfg = model.config
        self.tokenizer = tokenizer
        self.mesh = mesh
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = int(max_batch_size)
        self.max_model_len = int(max_model_len or self.cfg.max_position_embeddings)
        self.prompt_buckets = tuple(sorted(prompt_buckets or pow2_buckets(min(32, self.max_model_len),
                                                                          self.max_model_len)))
        self.new_token_buckets = tuple(sorted(new_token_buckets or pow2_buckets(min(16, self.max_model_len),
                                                                                self.max_model_len)))
        self.batch_buckets = tuple(sorted(batch_buckets or pow2_buckets(1, self.max_batch_size)))
        if self.batch_buckets[-1] < self.max_batch_size:
            raise ValueError(f"the largest batch bucket {self.batch_buckets[-1]} is below max_batch_size "
                             f"{self.max_batch_size}")
        if eos_token_ids is None:
            eos = self.cfg.eos_token_id
            eos_token_ids = list(eos) if isinstance(eos, tuple) else ([eos] if eos is not None else [])
            tok_eos = getattr(tokenizer, "eos_token_id", None)
            if tok_eos is not None and tok_eos not in eos_token_ids:
                eos_token_ids.append(tok_eos)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        if pad_id is None:
            pad_id = getattr(tokenizer, "pad_token_id", None)
            pad_id = 0 if pad_id is None else pad_id
        self.pad_id = int(pad_id)
        self.decode_chunk = int(decode_chunk)
        graphdef, state = nnx.split(model)
        self.engine = Engine(graphdef, self.cfg, self.pad_id, prefill_chunk,
                             scan_layers=resolve_scan_layers(scan_layers, mesh))
        self.state = state
        self.continuous = bool(continuous)
        self.prefix_sharing = bool(prefix_sharing)
        self.max_cache_tokens = int(max_cache_tokens or self.max_batch_size * 2048)
        self.prefill_budget = int(prefill_budget)
        self.lane_promotion = bool(lane_promotion)
        c = prefill_chunk if prefill_chunk > 0 else self.prompt_buckets[-1]
        top = -(-self.prompt_buckets[-1] // c) * c + self.new_token_buckets[-1]
        self.cache_buckets = tuple(sorted(cache_buckets or pow2_buckets(min(128, top), top)))
        self._scheduler = None
        self.full_lanes = False  # continuous batching: lanes at their largest batch (set by the server)
        self.last_stats = GenerationStats()
        self.total_stats = GenerationStats()
        self._lock = threading.Lock()
        self._tok_lock = threading.RLock()  # HF fast tokenizers are not safe to share across threads

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model_dir: str, *, lora: Optional[str] = None, mesh=None, dtype: Optional[str] = None,
                        param_dtype: Optional[str] = None, tokenizer_dir: Optional[str] = None, **kw) -> "Sampler":
        """Load a HF checkpoint directory (+ optional PEFT LoRA adapter dir) and its tokenizer.

        EOS ids come from generation_config.json / config.json / the tokenizer (all of them).
        ``kw`` go to :class:`Sampler`.
        """
        overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v}
        if lora:
            model, _ = load_model_with_adapter(model_dir, lora, mesh=mesh, **overrides)
        else:
            model, _ = load_model(model_dir, mesh=mesh, **overrides)
        tokenizer = load_tokenizer(tokenizer_dir or model_dir)
        if "eos_token_ids" not in kw:
            eos = list(read_eos_ids(model_dir)) if os.path.isdir(model_dir) else []
            if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
                eos.append(tokenizer.eos_token_id)
            kw["eos_token_ids"] = eos
        return cls(model, tokenizer, mesh=mesh, **kw)

    @property
    def state(self):
        """The weights the engine samples from: the model state with its decoder layers stacked once
        (:class:`~iopo_jax.models.transformer.StackedState`; the cached forward scans over them).
        Assigning a model state (``nnx.split(model)[1]``) stacks it (a copy of the layer weights);
        assigning another sampler's ``state`` shares it."""
        return self._state

    @state.setter
    def state(self, state):
        self._state = self.engine.prepare(state)

    def update_model(self, model_or_state):
        """Sample from new weights (e.g. the RL policy after an update) without recompiling."""
        if isinstance(model_or_state, nnx.Module):
            graphdef, state = nnx.split(model_or_state)
            if graphdef != self.engine.graphdef:
                raise ValueError("update_model: the new model has a different structure; build a new Sampler")
            self.state = state
        else:
            self.state = model_or_state

    @property
    def trace_counts(self) -> dict:
        """Compilations so far: {"prefill": n, "decode": m}."""
        return dict(self.engine.trace_counts)

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: Prompt, *, apply_chat_template: bool = False, where: str = "prompt") -> list[int]:
        """Token ids of one prompt (text, ids or a conversation)."""
        if isinstance(prompt, str):
            self._need_tokenizer(where)
            if apply_chat_template:
                return self.encode([{"role": "user", "content": prompt}], where=where)
            with self._tok_lock:
                return _flatten_ids(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, (list, tuple, np.ndarray)) and len(prompt) and all(
                isinstance(m, dict) for m in prompt):
            self._need_tokenizer(where)
            for j, m in enumerate(prompt):
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise ValueError(f"{where}: message {j} needs string fields 'role' and 'content', got {m!r:.200}")
            with self._tok_lock:
                text = self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
                return _flatten_ids(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if isinstance(prompt, (list, tuple, np.ndarray)):
            ids = [int(t) for t in prompt] if all(isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                                                  for t in prompt) else None
            if ids is None:
                raise ValueError(f"{where}: a prompt must be a string, a list of token ids or a list of messages")
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
            return ids
        raise ValueError(f"{where}: a prompt must be a string, a list of token ids or a list of messages, "
                         f"got {type(prompt).__name__}")

    def _need_tokenizer(self, where):
        if self.tokenizer is None:
            raise ValueError(f"{where}: text and chat prompts need a tokenizer (Sampler(model, tokenizer))")

    def check_length(self, num_prompt_tokens: int, max_new_tokens: int, where: str = "prompt"):
        """Raise ValueError (naming ``where``) when a prompt cannot be generated from."""
        if num_prompt_tokens < 1:
            raise ValueError(f"{where}: the prompt is empty (0 tokens)")
        if num_prompt_tokens + max_new_tokens > self.max_model_len:
            raise ValueError(f"{where}: {num_prompt_tokens} prompt tokens + max_new_tokens {max_new_tokens} exceed "
                             f"the context length of {self.max_model_len} tokens")
        if num_prompt_tokens > self.prompt_buckets[-1]:
            raise ValueError(f"{where}: the prompt has {num_prompt_tokens} tokens, more than the largest prompt "
                             f"bucket ({self.prompt_buckets[-1]})")
        if max_new_tokens > self.new_token_buckets[-1]:
            raise ValueError(f"{where}: max_new_tokens {max_new_tokens} is larger than the largest new-token bucket "
                             f"({self.new_token_buckets[-1]})")

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: Sequence[Prompt], params: Optional[SamplingParams] = None, *,
                 apply_chat_template: bool = False, seeds: Optional[Sequence[int]] = None) -> list[Completion]:
        """Complete every prompt ``params.n`` times.

        Returns ``len(prompts) * n`` completions, prompt-major (``out[i * n + j]`` is sample ``j`` of
        prompt ``i``; ``.index`` / ``.sample_index`` say the same). ``apply_chat_template`` wraps
        string prompts as one user message. Sample ``j`` of prompt ``i`` draws with the key
        ``(params.seed, i, j)``; with ``seeds`` (one per prompt) it draws with ``(seeds[i], 0, j)``,
        independent of the prompt's position (the CLI derives them from record ids, so resumed
        runs reproduce). Timing and token counts of the call: ``last_stats``.
        """
        params = params or SamplingParams()
        if isinstance(prompts, (str, dict)):
            raise ValueError("generate() takes a list of prompts")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts")
        base_seed = params.seed if params.seed is not None else secrets.randbits(63)
        rows = []
        for i, p in enumerate(prompts):
            ids = self.encode(p, apply_chat_template=apply_chat_template, where=f"prompts[{i}]")
            self.check_length(len(ids), params.max_new_tokens, where=f"prompts[{i}]")
            for j in range(params.n):
                if seeds is None:
                    rows.append(Row(ids, params, base_seed, prompt_index=i, sample_index=j))
                else:
                    rows.append(Row(ids, params, int(seeds[i]), prompt_index=i, sample_index=j, key_index=0))
        self.run_rows(rows)
        return [r.completion() for r in rows]

    def chat(self, conversations: Sequence[Sequence[dict]], params: Optional[SamplingParams] = None) -> list[Completion]:
        """:meth:`generate` for chat conversations (lists of ``{"role", "content"}`` messages)."""
        for i, c in enumerate(conversations):
            if not isinstance(c, (list, tuple)) or not c or not all(isinstance(m, dict) for m in c):
                raise ValueError(f"conversations[{i}]: expected a non-empty list of {{'role', 'content'}} messages")
        return self.generate(conversations, params)

    @property
    def scheduler(self):
        """The continuous-batching scheduler (created on first use)."""
        if self._scheduler is None:
            self._scheduler = Scheduler(self)
        return self._scheduler

    def reset_scheduler(self):
        """Drop every waiting and running row (after an error) and free the lanes' caches."""
        self._scheduler = None

    def submit(self, rows: Sequence[Row]):
        """Queue rows for continuous batching; :meth:`step` generates them."""
        with self._lock:
            self.scheduler.add(rows)

    def step(self) -> bool:
        """One continuous-batching round; returns False when nothing is waiting or running."""
        sch = self.scheduler
        if sch.idle():
            return False
        with self._lock, use_mesh(self.mesh):
            sch.step()
        return True

    def run_rows(self, rows: Sequence[Row]) -> GenerationStats:
        """Generate every row in place: continuous batching, or (``continuous=False``) sorted by
        prompt length in batches of ``max_batch_size``."""
        if self.continuous:
            return self._run_continuous(rows)
        stats = GenerationStats()
        order = sorted(range(len(rows)), key=lambda k: len(rows[k].prompt_ids))
        with self._lock, use_mesh(self.mesh):
            for s in range(0, len(order), self.max_batch_size):
                self._run_batch([rows[k] for k in order[s:s + self.max_batch_size]], stats)
        self.last_stats = stats
        self.total_stats.add(stats)
        return stats

    def _run_continuous(self, rows: Sequence[Row]) -> GenerationStats:
        sch = self.scheduler
        before = dataclasses.replace(sch.stats)
        # longest first: long prompts start prefilling (chunk by chunk) while the short ones decode
        self.submit(sorted(rows, key=lambda r: -len(r.prompt_ids)))
        while self.step():
            pass
        stats = GenerationStats(num_sequences=len(rows), prompt_tokens=sum(len(r.prompt_ids) for r in rows),
                                generated_tokens=sum(len(r.token_ids) for r in rows),
                                prefill_s=sch.stats.prefill_s - before.prefill_s,
                                decode_s=sch.stats.decode_s - before.decode_s,
                                batches=sch.stats.batches - before.batches)
        self.last_stats = stats
        self.total_stats.add(stats)
        return stats

    # ------------------------------------------------------------------ one device batch
    def _stop_ids(self, r: Row) -> list[int]:
        ids = [] if r.params.ignore_eos else list(self.eos_token_ids)
        return ids + [t for t in r.params.stop_token_ids if t not in ids]

    def _row_params(self, rows: Sequence[Row], b: int) -> RowParams:
        all_stops = [self._stop_ids(r) for r in rows]
        m = 4
        while m < max(len(s) for s in all_stops):
            m *= 2
        stop = np.full((b, m), -1, np.int32)
        for i, s in enumerate(all_stops):
            stop[i, :len(s)] = s
        pad = b - len(rows)

        def col(fn, dtype, fill):
            return np.asarray([fn(r) for r in rows] + [fill] * pad, dtype)

        seeds = [r.seed & (2 ** 64 - 1) for r in rows] + [0] * pad
        return RowParams(
            temperature=put_global(col(lambda r: r.params.temperature, np.float32, 0.0), self.mesh),
            top_p=put_global(col(lambda r: r.params.top_p, np.float32, 1.0), self.mesh),
            top_k=put_global(col(lambda r: r.params.top_k, np.int32, 0), self.mesh),
            max_new=put_global(col(lambda r: r.params.max_new_tokens, np.int32, 1), self.mesh),
            stop_ids=put_global(stop, self.mesh),
            seed_hi=put_global(np.asarray([s >> 32 for s in seeds], np.uint32), self.mesh),
            seed_lo=put_global(np.asarray([s & 0xFFFFFFFF for s in seeds], np.uint32), self.mesh),
            prompt_index=put_global(col(lambda r: (r.prompt_index if r.key_index is None else r.key_index)
                                        & 0xFFFFFFFF, np.uint32, 0), self.mesh),
            sample_index=put_global(col(lambda r: r.sample_index & 0xFFFFFFFF, np.uint32, 0), self.mesh),
        )

    def _run_batch(self, rows: list[Row], stats: GenerationStats):
        n_rows = len(rows)
        b = pick_bucket(n_rows, self.batch_buckets, "batch size")
        p = pick_bucket(max(len(r.prompt_ids) for r in rows), self.prompt_buckets, "prompt length")
        n = pick_bucket(max(r.params.max_new_tokens for r in rows), self.new_token_buckets, "max_new_tokens")
        ids = np.full((b, p), self.pad_id, np.int32)
        mask = np.zeros((b, p), np.int32)
        for i, r in enumerate(rows):
            ids[i, p - len(r.prompt_ids):] = r.prompt_ids
            mask[i, p - len(r.prompt_ids):] = 1
        mask[n_rows:, -1] = 1  # filler rows: one pad token, max_new 1, done after prefill
        rp = self._row_params(rows, b)
        watch = [i for i, r in enumerate(rows) if r.params.stop or r.on_update is not None]
        chunk = self.decode_chunk if watch else n
        state = self.state

        t0 = time.perf_counter()
        pre = self.engine.prefill(state, put_global(ids, self.mesh), put_global(mask, self.mesh), rp)
        ds = self.engine.start(pre, rp, num_new=n)
        done, step = host_value(ds.done), int(host_value(ds.step))
        t1 = time.perf_counter()
        stats.prefill_s += t1 - t0
        while True:
            if watch:
                host_done = self._host_check(rows, watch, ds, done, final=False)
                if host_done:
                    done = done.copy()
                    done[host_done] = True
                    ds = dataclasses.replace(ds, done=jax.device_put(done, ds.done.sharding))
            if done.all() or step >= n:
                break
            ds = self.engine.decode(state, ds, rp, step + chunk)
            done, step = host_value(ds.done), int(host_value(ds.step))
        stats.decode_s += time.perf_counter() - t1
        self._finalize(rows, ds)
        stats.num_sequences += n_rows
        stats.prompt_tokens += sum(len(r.prompt_ids) for r in rows)
        stats.generated_tokens += sum(len(r.token_ids) for r in rows)
        stats.batches += 1

    # ------------------------------------------------------------------ host-side text handling
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids (thread-safe; "" without a tokenizer)."""
        if self.tokenizer is None:
            return ""
        with self._tok_lock:
            return self.tokenizer.decode([int(t) for t in ids], skip_special_tokens=skip_special_tokens)

    def _decode_text(self, row: Row, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        with self._tok_lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=row.params.skip_special_tokens)

    def _find_stop(self, row: Row, text: str):
        """(start, stop string) of the earliest stop string in ``text``, or None."""
        best = None
        for s in row.params.stop:
            k = text.find(s)
            if k >= 0 and (best is None or k < best[0]):
                best = (k, s)
        return best

    def _apply_stop_string(self, row: Row, ids: list[int], lps: list[float]) -> bool:
        """Cut the row at its first stop string, if any. Returns True when one was found."""
        if not row.params.stop or self.tokenizer is None:
            return False
        text = self._decode_text(row, ids)
        if self._find_stop(row, text) is None:
            return False
        lo, hi = 0, len(ids)  # smallest prefix whose text holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if self._find_stop(row, self._decode_text(row, ids[:mid])) is not None:
                hi = mid
            else:
                lo = mid + 1
        text = self._decode_text(row, ids[:hi])
        k, s = self._find_stop(row, text)
        row.token_ids, row.logprobs = ids[:hi], lps[:hi]
        row.text = text[:k + len(s)] if row.params.include_stop_str_in_output else text[:k]
        row.finish_reason, row.stop_reason, row.finished = FINISH_STOP, s, True
        return True

    def _row_view(self, row: Row, i: int, tokens, logprobs, count, finish):
        """(ids, log-probs, ids for the text) of row ``i`` as generated so far on device."""
        c = int(count[i])
        ids = [int(t) for t in tokens[i, :c]]
        lps = [float(x) for x in logprobs[i, :c]]
        text_ids = ids[:-1] if (finish[i] == STOPPED and ids) else ids
        return ids, lps, text_ids

    def _emit(self, row: Row, final: bool):
        if row.on_update is None:
            return
        text = row.text
        if not final:
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence may still change
            hold = 0
            for s in row.params.stop:  # a stop string may be starting at the end of the text
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        hold = max(hold, k)
                        break
            text = text[:len(text) - hold]
        delta = text[row._emitted:] if len(text) > row._emitted else ""
        row._emitted += len(delta)
        try:
            row.on_update(row, delta, final)
        except Exception:  # a broken consumer must not stop the batch
            logger.exception("on_update callback failed; cancelling its row")
            row.cancelled = True

    def _host_check(self, rows, watch, ds: DecodeState, done, final: bool) -> list[int]:
        """Stop strings, streaming and cancellation after a chunk. Returns rows to stop."""
        tokens, logprobs, count, finish = (host_value(x) for x in (ds.tokens, ds.logprobs, ds.count, ds.finish))
        stop_now = []
        for i in watch:
            row = rows[i]
            if row.finished:
                continue
            if row.cancelled:
                row.finish_reason, row.stop_reason, row.finished = FINISH_STOP, "cancelled", True
                stop_now.append(i)
                continue
            ids, lps, text_ids = self._row_view(row, i, tokens, logprobs, count, finish)
            if self._apply_stop_string(row, text_ids, lps[:len(text_ids)]):
                stop_now.append(i)
                self._emit(row, final=True)
                continue
            row.text = self._decode_text(row, text_ids)
            if done[i]:
                continue  # finalized (and emitted) by _finalize
            self._emit(row, final=False)
        return [i for i in stop_now if not done[i]]

    def _finalize(self, rows, ds: DecodeState):
        tokens, logprobs, count, finish = (host_value(x) for x in (ds.tokens, ds.logprobs, ds.count, ds.finish))
        for i, row in enumerate(rows):
            if row.finished:
                continue
            ids, lps, text_ids = self._row_view(row, i, tokens, logprobs, count, finish)
            if self._apply_stop_string(row, text_ids, lps[:len(text_ids)]):
                self._emit(row, final=True)
                continue
            row.token_ids, row.logprobs = ids, lps
            row.text = self._decode_text(row, text_ids)
            if finish[i] == STOPPED:
                row.finish_reason, row.stop_reason = FINISH_STOP, ids[-1]
            else:
                row.finish_reason = FINISH_LENGTH
            row.finished = True
            self._emit(row, final=True)
