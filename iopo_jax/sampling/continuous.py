"""Continuous batching: rows join and leave a running decode batch at chunk boundaries.

The batch-level engine (:mod:`iopo_jax.sampling.engine`) pads a batch to its longest prompt and runs
it until its longest answer ends. Here the decode batch is a set of *lanes*; a lane is ``b`` slots
over one KV cache of ``S`` slots per row with a **per-row** write position (``KVCache.end [b]``), so
rows that joined at different times decode side by side. A row goes to the lane of its current
need: its prompt bucket + the tokens it can write by the end of its next decode chunk, rounded up to a
lane length (``lane_promotion``; without it prompt bucket + its ``max_new_tokens`` for its whole life),
so short requests never pad to the cache of a much longer prompt and a row attends over about the cache
it has used, not the one it may use.

One scheduler round (:meth:`Scheduler.step`):

1. running rows whose next decode chunk would not fit their lane are *promoted*: their cache rows
   (keys, values, mask, write position) are copied into free slots of the lane they now need (created
   or grown like a lane for waiting rows), never longer than the lane of prompt + ``max_new_tokens``;
   a row for which no slot is free yet stays and sits out the decoding of its lane until one is, while
   the lane decodes its other rows (the longest lanes' rows always progress, so nothing deadlocks).
   Tokens, counts, positions and sampling keys go along, so outputs do not change;
2. waiting rows take free slots (a lane is created at the smallest batch bucket that holds them, or
   grown to a larger one); rows of one lane and one prompt bucket form a *prefill job*; rows with the
   same prompt ids (the ``n`` samples of a prompt) share one prefill row: the prompt is prefilled once
   and its cache is copied into each sample's slot (prefix reuse);
3. prefill jobs advance by chunks of ``prefill_chunk`` tokens, shortest job first, within a token
   budget per round, so a long prompt is prefilled over several rounds while the others decode;
   a finished job samples each row's first token and copies its cache into the lane (``admit``);
4. every lane with running rows that fit it decodes ``decode_chunk`` steps (one device call), the lane
   whose rows are closest to done first; the host then collects the tokens, applies stop strings, streams text,
   honours cancellation and frees the slots of finished rows, which the next round fills;
5. a lane whose rows fit a smaller batch bucket (and that no waiting or outgrowing row needs) is
   compacted into it (``resize``), so a lone request decodes at batch 1, not in a full lane.

Lane lengths are the sampler's cache buckets from 128 slots on, at least 2x apart (128, 256, 512, ...):
every decode step attends over the lane's whole cache, and on XLA:CPU that attention (small batched
products per row and key-value head) costs more than reading the weights once more for a second lane.
Measured on SmolLM2-135M, batch 32, 128-token prompts, 64 new tokens, 2 CPU cores: a 512-slot lane
decoded at 424 ms a step, a 192-slot lane at 234 ms (``bench/sampling.py --engine``).

Static shapes: prefill compiles per (job batch bucket, prompt bucket, chunk), ``admit`` per
(lane batch, lane length, job shape), ``decode`` per (lane batch, lane length), ``resize`` per
pair of lane batches and ``promote`` per pair of (lane batch, lane length) of consecutive lanes of a
row's path: a bounded number, which :meth:`Scheduler.warmup` compiles ahead for given
request classes. Keys for sampling depend on (seed, prompt index, sample index, token index) only,
so outputs do not depend on which rows share a batch, and greedy outputs equal the batch-level
engine's.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from iopo_jax.models.transformer import KVCache
from iopo_jax.sampling.engine import LENGTH, RUNNING, STOPPED, RowParams, _is_stop, constrain_cache
from iopo_jax.sampling.params import FINISH_LENGTH, FINISH_STOP, GenerationStats, Row, SamplingParams
from iopo_jax.sharding import host_value, put_global, use_mesh

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
        self.resize = jax.jit(self._resize)
        self.promote = jax.jit(self._promote, donate_argnums=(1,))

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
        end = lane.end.at[dst_k].set(job.mask.shape[1], mode="drop")
        tok, lp = self.base._select(model, last_bd[src_k], rows, jnp.zeros((), jnp.int32))
        return _copy_rows(job, lane, src_k, dst_k, end), tok, lp

    def _promote(self, src: KVCache, dst: KVCache, src_k, dst_k) -> KVCache:
        """Move running rows into a longer lane: ``dst[dst_k[i]] = src[src_k[i]]`` (keys, values and mask
        of every slot, the rest of the longer row empty, and the row's ``end``); ``dst_k`` out of range =
        unused entry. One compilation per (source lane shape, destination lane shape)."""
        self.trace_counts["promote"] += 1
        return _copy_rows(src, dst, src_k, dst_k, dst.end.at[dst_k].set(src.end[src_k], mode="drop"))

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

    def _resize(self, cache: KVCache, src) -> KVCache:
        """A lane's cache with rows ``src [b']`` of the old one (an out-of-range index gives an empty row):
        grows (``src = 0..b-1`` then empty rows), shrinks and compacts a lane."""
        self.trace_counts["resize"] += 1

        def g(x, axis=0):
            return jnp.take(x, src, axis=axis, mode="fill", fill_value=0)

        return _constrain_cache(KVCache(g(cache.k, 1), g(cache.v, 1), g(cache.mask), g(cache.end)))


def _put_rows(buf, rows, dst_k, axis: int = 0):
    """``buf[dst_k[i]] = rows[i]`` along the batch axis ``axis``, each row zero-padded on the next axis (cache
    slots) to ``buf``'s length; an out-of-range ``dst_k`` entry writes nothing."""
    pad = [(0, 0)] * rows.ndim
    pad[axis + 1] = (0, buf.shape[axis + 1] - rows.shape[axis + 1])
    idx = (slice(None),) * axis + (dst_k,)
    return buf.at[idx].set(jnp.pad(rows, pad).astype(buf.dtype), mode="drop")


def _copy_rows(src: KVCache, dst: KVCache, src_k, dst_k, end) -> KVCache:
    """``dst`` with its rows ``dst_k`` replaced by the (shorter or equal) rows ``src_k`` of ``src`` and ``end``."""
    k = _put_rows(dst.k, src.k[:, src_k], dst_k, axis=1)  # stacked [layers, b, s, k, h]: rows on axis 1
    v = _put_rows(dst.v, src.v[:, src_k], dst_k, axis=1)
    return _constrain_cache(KVCache(k, v, _put_rows(dst.mask, src.mask[src_k], dst_k), end))


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
    engine thread, or :meth:`Sampler.run_rows`).

    Shapes: lane and prefill-job batches come from :attr:`buckets` (the sampler's batch buckets thinned
    to steps of at least 4x, e.g. 1, 4, 16, 32), lane lengths from :attr:`lane_lengths` (its cache
    buckets from ``min_lane_length`` on, at least 2x apart): few shapes, so that
    :meth:`warmup` can compile all of them before serving. A lane holds the smallest batch bucket
    that fits its rows: it grows when rows wait for it and shrinks (its rows compacted into the
    first slots) when rows leave, so a lone request decodes at batch 1.
    """

    min_lane_length = 128  # shortest lane (cache slots per row)
    length_factor = 2  # consecutive lane lengths differ by at least this factor (attention cost ~ length)
    step_factor = 4  # consecutive batch buckets differ by at least this factor (one compilation per bucket)

    def __init__(self, sampler):
        self.s = sampler
        self.engine = ContinuousEngine(sampler.engine)
        self.waiting: collections.deque = collections.deque()
        self.lanes: dict[int, _Lane] = {}
        self.jobs: list[_Job] = []
        self.stats = GenerationStats()
        self.rounds = 0
        self.prefilled_prompts = 0  # prompt rows prefilled (fewer than rows with prefix sharing)
        self.resizes = 0
        self.promotions = 0  # rows moved into a longer lane
        self.buckets = _thin(tuple(sampler.batch_buckets), self.step_factor, lo=0)
        self.lane_lengths = _thin(tuple(sampler.cache_buckets), self.length_factor, lo=self.min_lane_length)

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
        """One round: admit waiting rows, prefill (within the token budget, shortest job first), then
        decode every lane with running rows one chunk, the lane whose rows are closest to done first,
        and fit each lane's batch to its rows."""
        self.rounds += 1
        self._drop_cancelled_waiting()
        self._promote_rows()
        self._form_jobs()
        t0 = time.perf_counter()
        self._prefill_round()
        t1 = time.perf_counter()
        self.stats.prefill_s += t1 - t0
        lanes = [l for l in self.lanes.values() if self._decodable(l).any()]
        for lane in sorted(lanes, key=self._remaining):
            self._decode_lane(lane)
        self.stats.decode_s += time.perf_counter() - t1
        for key in [k for k, l in self.lanes.items() if not l.busy()]:
            del self.lanes[key]  # free its cache; recreated (no recompilation) when needed
        if not self.s.full_lanes:
            waiting_for = {self._row_lane(r) for r in self.waiting} | {t for _, _, t in self._outgrown()}
            for lane in self.lanes.values():
                if lane.length not in waiting_for:
                    self._shrink(lane)

    def warmup(self, shapes, params=None) -> dict:
        """Compile every shape the scheduler can produce for requests of the given ``(prompt tokens,
        max_new_tokens)`` classes, before serving them: for each lane they pass through (:meth:`lane_path`)
        and each of its batch buckets, ``decode`` and every ``resize`` between buckets; for each prompt
        bucket and job batch bucket, a prefill chunk and ``admit`` into each batch of the lane the rows are
        admitted to; ``promote`` between the batches of consecutive lanes of a path. Runs on empty caches
        (decode with no active row runs no step; admissions and promotions copy nothing). ``params``
        (default greedy) sets the stop-id width of the row parameters. Returns the compilations it caused
        by kind."""
        with use_mesh(self.s.mesh):
            return self._warmup(shapes, params or SamplingParams())

    def _warmup(self, shapes, params) -> dict:
        s = self.s
        before = collections.Counter(self.engine.trace_counts)
        lanes: dict[int, set] = collections.defaultdict(set)  # lane length -> prompt buckets admitted into it
        moves = set()  # (shorter lane, longer lane) pairs of promotions
        for n, new in shapes:
            p = self.prompt_bucket(int(n))
            path = self.lane_path(p, int(new))
            lanes[path[0]].add(p)
            for length in path[1:]:
                lanes.setdefault(length, set())  # a lane rows are promoted into: decode, resize
            moves.update(zip(path, path[1:]))
        dummy = Row([s.pad_id], params, 0)
        for length, ps in sorted(lanes.items()):
            bs = self._lane_batches(length)
            for b in bs:
                lane = self._new_lane(length, b)
                lane.params = s._row_params([dummy] * b, b)
                self._decode_lane(lane)  # no active row: compiles, runs no step
                for p in sorted(ps):
                    for kb in (k for k in self.buckets if k <= b):
                        ids = np.full((kb, p), s.pad_id, np.int32)
                        seg = np.zeros((kb, p), np.int32)
                        seg[:, -1] = 1
                        pos = np.zeros((kb, p), np.int32)
                        c = s.engine.prefill_chunk
                        chunk = c if 0 < c < p and p % c == 0 else p
                        job = _Job(lane, p, chunk, [], [], [], ids, pos, seg)
                        self._prefill_chunk(job)
                        dst = np.full(kb, b, np.int32)  # out of range: nothing is written
                        lane.cache, tok, _ = self.engine.admit(s.state, lane.cache, job.cache, job.last,
                                                               put_global(np.zeros(kb, np.int32), s.mesh), put_global(dst, s.mesh),
                                                               s._row_params([dummy] * kb, kb))
                        host_value(tok)
                for b2 in bs:
                    if b2 != b:
                        src = np.full(b2, b, np.int32)
                        src[:min(b, b2)] = np.arange(min(b, b2))
                        jax.block_until_ready(self.engine.resize(lane.cache, put_global(src, s.mesh)))
        for short, long in sorted(moves):
            for b in self._lane_batches(short):
                src = self._new_lane(short, b)
                for b2 in self._lane_batches(long):
                    self._move(src, [], self._new_lane(long, b2), [])  # no row: compiles, copies nothing
        after = self.engine.trace_counts
        return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}

    # ------------------------------------------------------------------ sizes
    def prompt_bucket(self, n: int) -> int:
        c = self.s.engine.prefill_chunk
        if 0 < c < n:  # long prompts: a multiple of the chunk (prefilled chunk by chunk), not a power of two
            return -(-n // c) * c
        return _pick(n, self.s.prompt_buckets)

    def lane_length(self, p: int, max_new: int) -> int:
        need = p + max_new
        return _pick(need, self.lane_lengths) if need <= self.lane_lengths[-1] else need

    def target_lane(self, p: int, count: int, max_new: int) -> int:
        """The lane a row of prompt bucket ``p`` that has ``count`` tokens needs for its next decode chunk.
        Without lane promotion the lane of all its ``max_new`` tokens; with it the shortest lane that holds
        ``count + decode_chunk`` of them, never longer than that cap."""
        cap = self.lane_length(p, max_new)
        need = p + min(count + self.s.decode_chunk, max_new)
        if not self.s.lane_promotion or need > self.lane_lengths[-1]:
            return cap
        return min(cap, _pick(need, self.lane_lengths))

    def lane_path(self, p: int, max_new: int) -> list[int]:
        """The lanes a row of prompt bucket ``p`` goes through: admitted to the first with its first token,
        promoted to each next one (a row's count grows by ``decode_chunk`` a chunk until ``max_new``)."""
        path: list[int] = []
        for count in range(1, max(max_new, 2), max(self.s.decode_chunk, 1)):
            length = self.target_lane(p, count, max_new)
            if not path or length != path[-1]:
                path.append(length)
        return path

    def _lane_batches(self, length: int) -> list[int]:
        """The batch sizes a lane of ``length`` slots can take."""
        cap = self.lane_cap(length)
        return [b for b in self.buckets if b <= cap] if not self.s.full_lanes else [cap]

    def lane_cap(self, length: int) -> int:
        s = self.s
        cap = max(1, min(s.max_batch_size, s.max_cache_tokens // length))
        ok = [b for b in self.buckets if b <= cap]
        return ok[-1] if ok else self.buckets[0]

    def _row_lane(self, r, count: int = 1) -> int:
        """The lane row ``r`` needs with ``count`` tokens (1: at its admission)."""
        return self.target_lane(self.prompt_bucket(len(r.prompt_ids)), int(count), r.params.max_new_tokens)

    def _decodable(self, lane: _Lane) -> np.ndarray:
        """Running rows of the lane whose next decode chunk fits it (the others wait for a longer lane)."""
        return np.asarray([bool(lane.active[i]) and self._row_lane(r, lane.count[i]) <= lane.length
                           for i, r in enumerate(lane.rows)], bool).reshape(lane.batch)

    def _outgrown(self) -> list[tuple]:
        """``(lane, slot, longer lane length)`` of every running row whose next chunk does not fit its lane."""
        out = []
        for lane in list(self.lanes.values()):
            for i in np.nonzero(lane.active)[0]:
                length = self._row_lane(lane.rows[i], lane.count[i])
                if length > lane.length:
                    out.append((lane, int(i), length))
        return out

    def _remaining(self, lane: _Lane) -> int:
        """Fewest decode steps any running row of the lane still has at most (its max_new_tokens left)."""
        return min(r.params.max_new_tokens - int(lane.count[i]) for i, r in enumerate(lane.rows)
                   if r is not None and lane.active[i])

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
            groups.setdefault((self._row_lane(r), self.prompt_bucket(len(r.prompt_ids))), []).append(r)
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
            for part in self._split(rows):
                self._make_job(lane, p, part, free[:len(part)])
                free = free[len(part):]
            taken.update(id(r) for r in rows)
        self.waiting = collections.deque(r for r in self.waiting if id(r) not in taken)

    def _split(self, rows: list) -> list[list]:
        """Rows of one prefill group as jobs whose prompt counts fill their batch buckets: 7 prompts with
        buckets 1, 4, 16 are prefilled as 4 + 3 (padded to 4), not as 7 padded to 16; a remainder under
        3/4 of its bucket is split further. The samples of one prompt stay in one job (prefix sharing)."""
        by_prompt: dict = collections.OrderedDict()
        for r in rows:
            key = tuple(r.prompt_ids) if self.s.prefix_sharing else ("row", id(r))
            by_prompt.setdefault(key, []).append(r)
        groups = list(by_prompt.values())
        out = []
        while groups:
            n = len(groups)
            b = _pick(n, self.buckets)
            below = [x for x in self.buckets if x <= n]
            k = n if (n >= 0.75 * b or not below) else below[-1]
            out.append([r for g in groups[:k] for r in g])
            groups = groups[k:]
        return out

    def _new_lane(self, length: int, b: int) -> _Lane:
        cache = self.engine.new_cache(batch=b, length=length, per_row=True,
                                      put=functools.partial(put_global, mesh=self.s.mesh))
        return _Lane(length, b, cache, [None] * b, set(), np.zeros(b, np.int32), np.zeros(b, np.int32),
                     np.zeros(b, np.int32), np.zeros(b, bool))

    def _lane_for(self, length: int, want: int) -> _Lane:
        s = self.s
        cap = self.lane_cap(length)
        lane = self.lanes.get(length)
        if lane is None:
            # full_lanes: every lane at its largest batch (shapes independent of the request mix); otherwise
            # the smallest bucket that holds the rows waiting for it
            b = cap if s.full_lanes else _pick(min(max(want, 1), cap), self.buckets)
            lane = self.lanes[length] = self._new_lane(length, b)
            return lane
        free = len(lane.free_slots())
        if want > free and lane.batch < cap:
            b = _pick(min(lane.batch - free + want, cap), self.buckets)
            if b > lane.batch:  # grow: the rows keep their slots, new empty slots at the end
                self._resize(lane, list(range(lane.batch)) + [None] * (b - lane.batch))
        return lane

    def _shrink(self, lane: _Lane):
        """Move a lane's running rows into the smallest batch bucket that holds them (nothing reserved)."""
        if lane.reserved:
            return
        used = [i for i, r in enumerate(lane.rows) if r is not None]
        b = _pick(max(len(used), 1), self.buckets)
        if b < lane.batch:
            self._resize(lane, used + [None] * (b - len(used)))

    def _resize(self, lane: _Lane, src: list):
        """Lane slot ``j`` takes the row of old slot ``src[j]`` (None: an empty slot)."""
        s = self.s
        old = lane.batch
        idx = np.asarray([old if i is None else i for i in src], np.int32)  # out of range: an empty row
        lane.cache = self.engine.resize(lane.cache, put_global(idx, s.mesh))

        def take(x, fill):
            return np.asarray([fill if i is None else x[i] for i in src], x.dtype)

        lane.cur, lane.pos, lane.count = take(lane.cur, 0), take(lane.pos, 0), take(lane.count, 0)
        lane.active = take(lane.active, False)
        lane.rows = [None if i is None else lane.rows[i] for i in src]
        lane.reserved = {j for j, i in enumerate(src) if i is not None and i in lane.reserved}
        lane.batch, lane.params = len(src), None
        self.resizes += 1

    # ------------------------------------------------------------------ promotion
    def _promote_rows(self):
        """Rows whose next decode chunk would not fit their lane move into free slots of the lane they
        need (created or grown like a lane for waiting rows), before anything is admitted or decoded this
        round; a row for which no slot is free stays and skips decoding until one is (its lane decodes its
        other rows). A cancelled row waiting here is finished."""
        wanted: dict[int, list] = collections.defaultdict(list)
        for lane, slot, length in self._outgrown():
            if lane.rows[slot].cancelled:
                self._cancel(lane, slot)
            else:
                wanted[length].append((lane, slot))
        for length, rows in sorted(wanted.items()):
            dst = self._lane_for(length, len(rows))
            free = dst.free_slots()
            by_src: dict[int, tuple] = {}
            for lane, slot in rows[:len(free)]:
                by_src.setdefault(id(lane), (lane, []))[1].append(slot)
            for src, slots in by_src.values():
                self._move(src, slots, dst, free[:len(slots)])
                free = free[len(slots):]

    def _move(self, src: _Lane, slots: list[int], dst: _Lane, free: list[int]):
        """Rows of ``src`` slots move into ``dst`` slots ``free`` (one device call; caches, tokens, counts
        and positions go along)."""
        s = self.s
        si = np.zeros(src.batch, np.int32)
        di = np.full(src.batch, dst.batch, np.int32)  # out of range: nothing is written
        si[:len(slots)], di[:len(free)] = slots, free
        dst.cache = self.engine.promote(src.cache, dst.cache, put_global(si, s.mesh), put_global(di, s.mesh))
        for a, b in zip(slots, free):
            dst.rows[b] = src.rows[a]
            dst.cur[b], dst.pos[b], dst.count[b], dst.active[b] = src.cur[a], src.pos[a], src.count[a], True
            self._free(src, a)
        if slots:
            dst.params = None
            self.promotions += len(slots)

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
        b = _pick(len(prompts), self.buckets)
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
        # (padded prompt tokens left: chunks x rows x chunk length; a short prompt is one chunk of its own length)
        order = sorted(self.jobs, key=lambda j: (self.rounds - j.round < 16, j.remaining() * j.ids.shape[0] * j.chunk))
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
            job.cache = self.engine.new_cache(batch=job.ids.shape[0], length=job.p, per_row=False,
                                                 put=functools.partial(put_global, mesh=s.mesh))
        k, c = job.done_chunks, job.chunk
        sl = slice(k * c, (k + 1) * c)
        job.cache, job.last = self.engine.prefill_step(s.state, job.cache, put_global(job.ids[:, sl], s.mesh),
                                                       put_global(job.pos[:, sl], s.mesh), put_global(job.seg[:, sl], s.mesh))
        job.done_chunks += 1

    def _admit(self, job: _Job):
        s, lane = self.s, job.lane
        n = len(job.rows)
        kb = _pick(n, self.buckets)
        src = np.zeros(kb, np.int32)
        dst = np.full(kb, lane.batch, np.int32)  # out of range: dropped
        src[:n], dst[:n] = job.src, job.dst
        rp = s._row_params(job.rows, kb)
        lane.cache, tok, lp = self.engine.admit(s.state, lane.cache, job.cache, job.last, put_global(src, s.mesh), put_global(dst, s.mesh),
                                                rp)
        tok, lp = host_value(tok), host_value(lp)
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
        """One decode chunk of the lane's rows that fit it (a row waiting for a longer lane sits it out)."""
        s = self.s
        put = functools.partial(put_global, mesh=s.mesh)
        go = self._decodable(lane)
        lane.cache, toks, lps, count, finish = self.engine.decode(
            s.state, lane.cache, put(lane.cur), put(lane.pos), put(lane.count), put(go),
            self._lane_params(lane), steps=s.decode_chunk)
        toks, lps, count, finish = (host_value(x) for x in (toks, lps, count, finish))
        for i in np.nonzero(go)[0]:
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
            self._cancel(lane, slot)
            return
        if s._apply_stop_string(r, list(r.token_ids), list(r.logprobs)):
            self._free(lane, slot)
            s._emit(r, final=True)
            return
        r.text = s._decode_text(r, r.token_ids)
        s._emit(r, final=False)

    def _cancel(self, lane: _Lane, slot: int):
        r = lane.rows[slot]
        r.finish_reason, r.stop_reason, r.finished = FINISH_STOP, "cancelled", True
        self._free(lane, slot)
        self.s._emit(r, final=True)

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


def _thin(buckets: tuple, factor: int, lo: int) -> tuple:
    """The buckets from the smallest one >= ``lo`` (or the largest) on, each at least ``factor`` x the
    previous kept one, and always the largest."""
    out: list = []
    for b in buckets:
        if (not out and (b >= lo or b == buckets[-1])) or (out and b >= out[-1] * factor):
            out.append(b)
    if out[-1] != buckets[-1]:
        out.append(buckets[-1])
    return tuple(out)


def _pick(x: int, buckets) -> int:
    for b in buckets:
        if x <= b:
            return b
    return buckets[-1]
