"""Continuous batching: rows join and leave a running decode batch at chunk boundaries.

The batch-level engine (:mod:`iopo_jax.sampling.engine`) pads a batch to its longest prompt and runs
it until its longest answer ends. Here the decode batch is a set of *lanes*; a lane is ``b`` slots
over one KV cache of ``S`` slots per row with a **per-row** write position (``KVCache.end [b]``), so
rows that joined at different times decode side by side. A row goes to the lane of its cache-length
bucket (prompt bucket + its ``max_new_tokens``), so short requests never share (or pad to) the
cache of a long prompt.

One scheduler round (:meth:`Scheduler.step`):

1. waiting rows take free slots (a lane is created, or grown to a larger batch bucket, when full);
   rows of one lane and one prompt bucket form a *prefill job*; rows with the same prompt ids (the
   ``n`` samples of a prompt) share one prefill row: the prompt is prefilled once and its cache is
   copied into each sample's slot (prefix reuse);
2. prefill jobs advance by chunks of ``prefill_chunk`` tokens, shortest job first, within a token
   budget per round, so a long prompt is prefilled over several rounds while the others decode;
   a finished job samples each row's first token and copies its cache into the lane (``admit``);
3. every lane with running rows decodes ``decode_chunk`` steps (one device call); the host then
   collects the tokens, applies stop strings, streams text, honours cancellation and frees the
   slots of finished rows, which the next round fills.

Static shapes: prefill compiles per (job batch bucket, prompt bucket, chunk), ``admit`` per
(lane batch, lane length, job shape), ``decode`` per (lane batch, lane length) and ``grow`` per
lane shape pair: a bounded number. Keys for sampling depend on (seed, prompt index, sample index,
token index) only, so outputs do not depend on which rows share a batch, and greedy outputs equal
the batch-level engine's.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from iopo_jax.models.transformer import KVCache
from iopo_jax.sampling.engine import LENGTH, RUNNING, STOPPED, RowParams, _is_stop, constrain_cache
from iopo_jax.sampling.params import FINISH_LENGTH, FINISH_STOP, GenerationStats

logger = logging.getLogger(__name__)


_constrain_cache = constrain_cache


class ContinuousEngine:
    """Jitted pieces of continuous batching for one model graph (shares ``trace_counts``)."""

    def __init__(self, engine):
        self.base = engine  # the batch-level Engine: graphdef, cfg, pad id, _model, _select
        self.trace_counts = engine.trace_counts
        self.prefill_step = jax.jit(self._prefill_step, donate_argnums=(1,))
        self.admit = jax.jit(self._admit, donate_argnums=(1,))
        self.decode = jax.jit(self._decode, donate_argnums=(1,), static_argnames=("steps",))
        self.grow = jax.jit(self._grow, static_argnames=("batch",))

    def new_cache(self, *, batch: int, length: int, per_row: bool, put=None) -> KVCache:
        """Zeros, made outside jit (XLA folds large constant zeros slowly); ``put`` places them."""
        c = KVCache.init(self.base.cfg, batch, length)
        if per_row:
            c = c.replace(end=jnp.zeros((batch,), jnp.int32))
        if put is not None:
            end = put(c.end) if per_row else c.end
            c = KVCache(self._put_kv(put, c.k), self._put_kv(put, c.v), put(c.mask), end)
        return c

    @staticmethod
    def _put_kv(put, x):
        """Place a stacked [layers, b, ...] buffer like ``put`` places a [b, ...] one (batch on axis 1)."""
        one = put(np.zeros((x.shape[1],) + (1,) * (x.ndim - 2), x.dtype))  # tiny probe of put's layout
        sh = getattr(one, "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding):
            return jax.device_put(x, jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(None, *sh.spec)))
        return x

    def _prefill_step(self, state, cache: KVCache, ids_bc, pos_bc, seg_bc):
        """One chunk of a (left padded) prompt batch into its own ``p``-slot cache."""
        self.trace_counts["prefill_chunk"] += 1
        model, stack = self.base._model(state)
        hidden, cache = model(ids_bc, pos_bc, seg_bc, cache, layer_stack=stack)
        return _constrain_cache(cache), hidden[:, -1]

    def _admit(self, state, lane: KVCache, job: KVCache, last_bd, src_k, dst_k, rows: RowParams):
        """Copy prefilled prompt caches into lane slots (``lane[dst[i]] = job[src[i]]``; dst out of
        range = unused entry) and sample each admitted row's first token (key step 0)."""
        self.trace_counts["admit"] += 1
        model, _ = self.base._model(state)
        b, s = lane.mask.shape
        p = job.mask.shape[1]

        def put(buf, rows_src):
            rows_src = jnp.pad(rows_src, [(0, 0), (0, s - p)] + [(0, 0)] * (rows_src.ndim - 2))
            return buf.at[dst_k].set(rows_src.astype(buf.dtype), mode="drop")

        def put_kv(buf, job_buf):  # stacked [layers, b, s, k, h]: rows on axis 1
            rows_src = jnp.pad(job_buf[:, src_k], [(0, 0), (0, 0), (0, s - p), (0, 0), (0, 0)])
            return buf.at[:, dst_k].set(rows_src.astype(buf.dtype), mode="drop")

        mask = put(lane.mask, job.mask[src_k])
        end = lane.end.at[dst_k].set(p, mode="drop")
        tok, lp = self.base._select(model, last_bd[src_k], rows, jnp.zeros((), jnp.int32))
        return _constrain_cache(KVCache(put_kv(lane.k, job.k), put_kv(lane.v, job.v), mask, end)), tok, lp

    def _decode(self, state, cache: KVCache, cur, pos, count, active, rows: RowParams, *, steps: int):
        """Up to ``steps`` decode steps of a lane; returns the new tokens ``[b, steps]`` per row."""
        self.trace_counts["decode_lane"] += 1
        model, stack = self.base._model(state)
        b = cur.shape[0]
        pad = self.base.pad_id
        toks = jnp.full((b, steps), pad, jnp.int32)
        lps = jnp.zeros((b, steps), jnp.float32)
        finish = jnp.full((b,), RUNNING, jnp.int32)

        def cond(c):
            return (c[0] < steps) & jnp.any(c[5])

        def body(c):
            k, cache, cur, pos, count, active, finish, toks, lps = c
            end = cache.end
            hidden, cache = model(cur[:, None], pos[:, None], active[:, None].astype(jnp.int32), cache,
                                  layer_stack=stack)
            cache = cache.replace(end=jnp.where(active, end + 1, end))
            tok, lp = self.base._select(model, hidden[:, 0], rows, count)
            tok = jnp.where(active, tok, pad)
            lp = jnp.where(active, lp, 0.0)
            toks = jax.lax.dynamic_update_slice(toks, tok[:, None], (0, k))
            lps = jax.lax.dynamic_update_slice(lps, lp[:, None], (0, k))
            count = count + active.astype(jnp.int32)
            stop = active & _is_stop(tok, rows.stop_ids)
            length = active & ~stop & (count >= rows.max_new)
            finish = jnp.where(stop, STOPPED, jnp.where(length, LENGTH, finish)).astype(jnp.int32)
            pos = pos + active.astype(jnp.int32)
            return (k + 1, _constrain_cache(cache), jnp.where(active, tok, cur), pos, count,
                    active & ~stop & ~length, finish, toks, lps)

        c = (jnp.zeros((), jnp.int32), cache, cur, pos, count, active, finish, toks, lps)
        _, cache, cur, pos, count, active, finish, toks, lps = jax.lax.while_loop(cond, body, c)
        return _constrain_cache(cache), toks, lps, count, finish

    def _grow(self, cache: KVCache, *, batch: int) -> KVCache:
        self.trace_counts["grow"] += 1
        extra = batch - cache.mask.shape[0]

        def g(x, axis=0):
            return jnp.pad(x, [(0, 0)] * axis + [(0, extra)] + [(0, 0)] * (x.ndim - axis - 1))

        return _constrain_cache(KVCache(g(cache.k, 1), g(cache.v, 1), g(cache.mask), g(cache.end)))


@dataclasses.dataclass(eq=False)
class _Lane:
    length: int  # S: cache slots per row
    batch: int
    cache: KVCache
    rows: list  # Row or None per slot
    reserved: set  # slots promised to prefill jobs
    cur: np.ndarray
    pos: np.ndarray
    count: np.ndarray
    active: np.ndarray
    params: Optional[RowParams] = None  # device copy; None when slots changed

    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is None and i not in self.reserved]

    def busy(self) -> bool:
        return bool(self.active.any()) or bool(self.reserved)


@dataclasses.dataclass(eq=False)
class _Job:
    lane: _Lane
    p: int  # prompt bucket (cache slots of the job)
    chunk: int
    rows: list  # rows admitted by this job
    src: list  # prefill row of each row
    dst: list  # lane slot of each row
    ids: np.ndarray  # [b_new, p]
    pos: np.ndarray
    seg: np.ndarray
    cache: Optional[KVCache] = None
    last: Optional[jax.Array] = None
    done_chunks: int = 0
    round: int = 0  # scheduler round that created the job

    @property
    def num_chunks(self) -> int:
        return self.p // self.chunk

    def remaining(self) -> int:
        return self.num_chunks - self.done_chunks


class Scheduler:
    """Continuous batching over a :class:`~iopo_jax.sampling.Sampler` (its buckets, text handling
    and settings). Not thread-safe: one thread calls :meth:`add` and :meth:`step` (the server's
    engine thread, or :meth:`Sampler.run_rows`)."""

    def __init__(self, sampler):
        self.s = sampler
        self.engine = ContinuousEngine(sampler.engine)
        self.waiting: collections.deque = collections.deque()
        self.lanes: dict[int, _Lane] = {}
        self.jobs: list[_Job] = []
        self.stats = GenerationStats()
        self.rounds = 0
        self.prefilled_prompts = 0  # prompt rows prefilled (fewer than rows with prefix sharing)

    # ------------------------------------------------------------------ public
    def add(self, rows):
        for r in rows:
            r.token_ids, r.logprobs, r.text, r.finished, r._emitted = [], [], "", False, 0
            r.finish_reason = r.stop_reason = None
            self.waiting.append(r)

    def idle(self) -> bool:
        return not self.waiting and not self.jobs and not any(l.busy() for l in self.lanes.values())

    def running_rows(self) -> int:
        return sum(int(l.active.sum()) for l in self.lanes.values()) + sum(len(j.rows) for j in self.jobs)

    def step(self):
        """One round: admit, prefill (bounded), decode every lane one chunk."""
        self.rounds += 1
        self._drop_cancelled_waiting()
        self._form_jobs()
        t0 = time.perf_counter()
        self._prefill_round()
        t1 = time.perf_counter()
        self.stats.prefill_s += t1 - t0
        for lane in list(self.lanes.values()):
            if lane.active.any():
                self._decode_lane(lane)
        self.stats.decode_s += time.perf_counter() - t1
        for key in [k for k, l in self.lanes.items() if not l.busy()]:
            del self.lanes[key]  # free its cache; recreated (no recompilation) when needed

    # ------------------------------------------------------------------ sizes
    def prompt_bucket(self, n: int) -> int:
        c = self.s.engine.prefill_chunk
        if 0 < c < n:  # long prompts: a multiple of the chunk (prefilled chunk by chunk), not a power of two
            return -(-n // c) * c
        return _pick(n, self.s.prompt_buckets)

    def lane_length(self, p: int, max_new: int) -> int:
        need = p + max_new
        return _pick(need, self.s.cache_buckets) if need <= self.s.cache_buckets[-1] else need

    def lane_cap(self, length: int) -> int:
        s = self.s
        cap = max(1, min(s.max_batch_size, s.max_cache_tokens // length))
        ok = [b for b in s.batch_buckets if b <= cap]
        return ok[-1] if ok else s.batch_buckets[0]

    # ------------------------------------------------------------------ admission
    def _drop_cancelled_waiting(self):
        keep = collections.deque()
        for r in self.waiting:
            if r.cancelled:
                r.finish_reason, r.stop_reason, r.finished = FINISH_STOP, "cancelled", True
                self.s._emit(r, final=True)
            else:
                keep.append(r)
        self.waiting = keep

    def _form_jobs(self):
        if not self.waiting:
            return
        groups: dict[tuple[int, int], list] = collections.OrderedDict()
        for r in self.waiting:
            p = self.prompt_bucket(len(r.prompt_ids))
            groups.setdefault((self.lane_length(p, r.params.max_new_tokens), p), []).append(r)
        taken = set()
        wanted = collections.Counter()
        for (length, _), rows in groups.items():
            wanted[length] += len(rows)
        for (length, p), rows in groups.items():
            lane = self._lane_for(length, wanted[length])
            free = lane.free_slots()
            if not free:
                continue
            rows = rows[:min(len(free), self.s.max_batch_size)]
            wanted[length] -= len(rows)
            self._make_job(lane, p, rows, free[:len(rows)])
            taken.update(id(r) for r in rows)
        self.waiting = collections.deque(r for r in self.waiting if id(r) not in taken)

    def _lane_for(self, length: int, want: int) -> _Lane:
        s = self.s
        cap = self.lane_cap(length)
        lane = self.lanes.get(length)
        if lane is None:
            # full_lanes (the server): every lane at its largest batch, so that the shapes (and compilations)
            # do not depend on how many requests happen to be waiting
            b = cap if s.full_lanes else _pick(min(max(want, 1), cap), s.batch_buckets)
            cache = self.engine.new_cache(batch=b, length=length, per_row=True, put=s._put)
            lane = _Lane(length, b, cache, [None] * b, set(), np.zeros(b, np.int32), np.zeros(b, np.int32),
                         np.zeros(b, np.int32), np.zeros(b, bool))
            self.lanes[length] = lane
            return lane
        free = len(lane.free_slots())
        if want > free and lane.batch < cap:
            b = _pick(min(lane.batch - free + want, cap), s.batch_buckets)
            if b > lane.batch:
                extra = b - lane.batch
                lane.cache = self.engine.grow(lane.cache, batch=b)
                lane.rows += [None] * extra
                lane.cur, lane.pos, lane.count = (np.concatenate([x, np.zeros(extra, np.int32)])
                                                  for x in (lane.cur, lane.pos, lane.count))
                lane.active = np.concatenate([lane.active, np.zeros(extra, bool)])
                lane.batch, lane.params = b, None
        return lane

    def _make_job(self, lane: _Lane, p: int, rows: list, slots: list[int]):
        s = self.s
        uniq: dict[tuple, int] = {}
        src = []
        for r in rows:
            key = tuple(r.prompt_ids) if s.prefix_sharing else ("row", id(r))
            if key not in uniq:
                uniq[key] = len(uniq)
            src.append(uniq[key])
        prompts = [None] * len(uniq)
        for r, k in zip(rows, src):
            prompts[k] = r.prompt_ids
        self.prefilled_prompts += len(prompts)
        b = _pick(len(prompts), s.batch_buckets)
        ids = np.full((b, p), s.pad_id, np.int32)
        seg = np.zeros((b, p), np.int32)
        for i, x in enumerate(prompts):
            ids[i, p - len(x):] = x
            seg[i, p - len(x):] = 1
        seg[len(prompts):, -1] = 1  # filler rows: one pad token
        pos = np.maximum(np.cumsum(seg, axis=-1) - 1, 0).astype(np.int32)
        c = s.engine.prefill_chunk
        chunk = c if 0 < c < p and p % c == 0 else p
        lane.reserved.update(slots)
        self.jobs.append(_Job(lane, p, chunk, list(rows), src, list(slots), ids, pos, seg, round=self.rounds))
        self.stats.batches += 1

    # ------------------------------------------------------------------ prefill
    def _prefill_round(self):
        s = self.s
        budget = max(s.prefill_budget, 1)
        spent = 0
        # shortest job first; a job that has waited many rounds goes first (no starvation under load)
        order = sorted(self.jobs, key=lambda j: (self.rounds - j.round < 16, j.remaining() * j.ids.shape[0]))
        for job in order:
            while job.remaining() and (spent == 0 or spent + job.ids.shape[0] * job.chunk <= budget):
                self._prefill_chunk(job)
                spent += job.ids.shape[0] * job.chunk
            if spent >= budget:
                break
        for job in [j for j in self.jobs if not j.remaining()]:
            self.jobs.remove(job)
            self._admit(job)

    def _prefill_chunk(self, job: _Job):
        s = self.s
        if job.cache is None:
            job.cache = self.engine.new_cache(batch=job.ids.shape[0], length=job.p, per_row=False, put=s._put)
        k, c = job.done_chunks, job.chunk
        sl = slice(k * c, (k + 1) * c)
        job.cache, job.last = self.engine.prefill_step(s.state, job.cache, s._put(job.ids[:, sl]),
                                                       s._put(job.pos[:, sl]), s._put(job.seg[:, sl]))
        job.done_chunks += 1

    def _admit(self, job: _Job):
        s, lane = self.s, job.lane
        n = len(job.rows)
        kb = _pick(n, s.batch_buckets)
        src = np.zeros(kb, np.int32)
        dst = np.full(kb, lane.batch, np.int32)  # out of range: dropped
        src[:n], dst[:n] = job.src, job.dst
        rp = s._row_params(job.rows, kb)
        lane.cache, tok, lp = self.engine.admit(s.state, lane.cache, job.cache, job.last, s._put(src), s._put(dst),
                                                rp)
        tok, lp = np.asarray(tok), np.asarray(lp)
        lane.reserved.difference_update(job.dst)
        lane.params = None
        for i, (r, slot) in enumerate(zip(job.rows, job.dst)):
            t = int(tok[i])
            r.token_ids.append(t)
            r.logprobs.append(float(lp[i]))
            lane.rows[slot] = r
            lane.cur[slot], lane.pos[slot], lane.count[slot] = t, len(r.prompt_ids), 1
            lane.active[slot] = True
            stop = t in s._stop_ids(r)
            if stop or r.params.max_new_tokens <= 1:
                self._finish(lane, slot, STOPPED if stop else LENGTH)
            else:
                self._check(lane, slot)

    # ------------------------------------------------------------------ decode
    def _lane_params(self, lane: _Lane) -> RowParams:
        if lane.params is None:
            filler = None
            rows = []
            for r in lane.rows:
                if r is not None:
                    filler = filler or r
            for r in lane.rows:
                rows.append(r if r is not None else filler)
            lane.params = self.s._row_params(rows, lane.batch)
        return lane.params

    def _decode_lane(self, lane: _Lane):
        s = self.s
        put = s._put
        lane.cache, toks, lps, count, finish = self.engine.decode(
            s.state, lane.cache, put(lane.cur), put(lane.pos), put(lane.count), put(lane.active),
            self._lane_params(lane), steps=s.decode_chunk)
        toks, lps, count, finish = (np.asarray(x) for x in (toks, lps, count, finish))
        for i in np.nonzero(lane.active)[0]:
            r = lane.rows[i]
            k = int(count[i] - lane.count[i])  # tokens the row wrote in this chunk
            new = [int(t) for t in toks[i, :k]]
            r.token_ids.extend(new)
            r.logprobs.extend(float(x) for x in lps[i, :k])
            lane.count[i] += k
            lane.pos[i] += k
            if new:
                lane.cur[i] = new[-1]
            if finish[i] != RUNNING:
                self._finish(lane, i, int(finish[i]))
            else:
                self._check(lane, i)

    # ------------------------------------------------------------------ host-side row handling
    def _check(self, lane: _Lane, slot: int):
        """Stop strings, streaming and cancellation of a running row."""
        s, r = self.s, lane.rows[slot]
        if not (r.params.stop or r.on_update is not None or r.cancelled):
            return
        if r.cancelled:
            r.finish_reason, r.stop_reason, r.finished = FINISH_STOP, "cancelled", True
            self._free(lane, slot)
            s._emit(r, final=True)
            return
        if s._apply_stop_string(r, list(r.token_ids), list(r.logprobs)):
            self._free(lane, slot)
            s._emit(r, final=True)
            return
        r.text = s._decode_text(r, r.token_ids)
        s._emit(r, final=False)

    def _finish(self, lane: _Lane, slot: int, code: int):
        s, r = self.s, lane.rows[slot]
        self._free(lane, slot)
        ids, lps = list(r.token_ids), list(r.logprobs)
        text_ids = ids[:-1] if (code == STOPPED and ids) else ids
        if s._apply_stop_string(r, text_ids, lps[:len(text_ids)]):
            s._emit(r, final=True)
            return
        r.text = s._decode_text(r, text_ids)
        if code == STOPPED:
            r.finish_reason, r.stop_reason = FINISH_STOP, ids[-1]
        else:
            r.finish_reason = FINISH_LENGTH
        r.finished = True
        s._emit(r, final=True)

    def _free(self, lane: _Lane, slot: int):
        lane.rows[slot] = None
        lane.active[slot] = False


def _pick(x: int, buckets) -> int:
    for b in buckets:
        if x <= b:
            return b
    return buckets[-1]
