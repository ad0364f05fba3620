"""Token selection on a batch of logits: greedy, temperature, top-k, top-p, with per-row settings.

Every setting is a per-row array, so one compiled step serves a batch that mixes greedy rows and
sampled rows with different temperatures (the server batches unrelated requests together).

Order of operations for a sampled row (the order of transformers' logits warpers):

1. ``logits / temperature``;
2. top-k: keep the ``k`` largest (``k <= 0`` disables; tokens tied with the k-th value are kept);
3. top-p: among the survivors, keep the smallest set of most likely tokens whose mass (renormalised
   over the survivors) reaches ``top_p`` (the most likely token is always kept; ``top_p >= 1`` disables);
4. draw with the Gumbel-max trick using the row's own key.

A row with ``temperature == 0`` takes the arg-max of the raw logits (the first index among ties,
like ``torch.argmax``), whatever its top-k / top-p.

The log-prob reported for a token is under the model's **raw** distribution
(``log_softmax(logits)``, no temperature and no truncation): that is what policy-gradient methods
need as "old" log-probs and what a teacher-forced forward pass reproduces.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def row_keys(seed_hi, seed_lo, prompt_index, sample_index, step):
    """One PRNG key per row: fold (seed words, prompt index, sample index, step) into key(0).

    ``step`` is a scalar or one step per row ``[b]`` (continuous batching). Depends only on the
    row's own seed and index and on the step, never on the batch the row lands in, so a seeded
    request reproduces whatever else is being generated alongside it.
    """

    def one(hi, lo, pidx, sidx, st):
        k = jax.random.fold_in(jax.random.key(0), hi)
        k = jax.random.fold_in(k, lo)
        k = jax.random.fold_in(k, pidx)
        k = jax.random.fold_in(k, sidx)
        return jax.random.fold_in(k, st)

    steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), jnp.shape(seed_hi))  # scalar or one step per row
    return jax.vmap(one)(seed_hi, seed_lo, prompt_index, sample_index, steps)


def argmax_last(x_bv):
    """``argmax`` over the last axis (first index among ties), as int32.

    Two stages (max of 128-wide chunks, then arg-max inside the winning chunk) when the size
    divides: on XLA:CPU this is ~8x faster than one variadic arg-max reduce over 150k entries.
    """
    b, v = x_bv.shape
    r = 128
    if v % r or v <= r:
        return jnp.argmax(x_bv, axis=-1).astype(jnp.int32)
    x3 = x_bv.reshape(b, v // r, r)
    chunk = jnp.argmax(jnp.max(x3, axis=-1), axis=-1)  # first chunk holding the maximum
    inner = jnp.take_along_axis(x3, chunk[:, None, None], axis=1)[:, 0]
    return (chunk * r + jnp.argmax(inner, axis=-1)).astype(jnp.int32)


def _sortable_keys(x):
    """float32 -> uint32 with the same order (-inf smallest), for exact bisection over values."""
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(0x80000000))


def _threshold(keys_bv, weights_bv, target_b, active_b):
    """Per row, the largest key ``t`` with ``sum(weights[keys >= t]) >= target`` (exact, 32 halvings).

    Rows that are not active get key 0 (keep everything).
    """
    lo = jnp.min(keys_bv, axis=-1)  # f(lo) = total >= target
    hi = jnp.max(keys_bv, axis=-1)

    def mass(t):
        return jnp.sum(jnp.where(keys_bv >= t[:, None], weights_bv, 0), axis=-1)

    # invariant: f(lo) >= target; answer in [lo, hi]
    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo + 1) // 2  # upper mid, so the loop converges to the largest valid key
        ok = mass(mid) >= target_b
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return jnp.where(active_b, lo, jnp.uint32(0))


def filter_logits(logits_bv, top_p_b, top_k_b):
    """Set logits outside each row's top-k / top-p set to -inf. ``logits_bv`` float32 [b, v].

    No sort: the k-th largest value and the nucleus boundary are found by exact bisection over the
    float values (32 passes over the row each, only for rows and batches that use them), which is
    ~10x faster than a full sort of a 150k vocabulary on CPU and cheap on accelerators.
    Tokens tied with the boundary value are kept.
    """
    v = logits_bv.shape[-1]
    keys = _sortable_keys(logits_bv)
    use_k = (top_k_b > 0) & (top_k_b < v)
    t_k = jax.lax.cond(
        jnp.any(use_k),
        lambda: _threshold(keys, jnp.ones_like(logits_bv, jnp.int32), top_k_b, use_k),
        lambda: jnp.zeros(keys.shape[:1], jnp.uint32))
    in_k = keys >= t_k[:, None]
    m = jnp.max(logits_bv, axis=-1, keepdims=True)
    w = jnp.where(in_k, jnp.exp(logits_bv - m), 0.0)
    use_p = top_p_b < 1.0
    t_p = jax.lax.cond(
        jnp.any(use_p),
        lambda: _threshold(keys, w, top_p_b * jnp.sum(w, axis=-1), use_p),
        lambda: jnp.zeros(keys.shape[:1], jnp.uint32))
    return jnp.where(in_k & (keys >= t_p[:, None]), logits_bv, NEG_INF)


def select_tokens(logits_bv, temperature_b, top_p_b, top_k_b, keys_b):
    """Choose one token per row. Returns ``(tokens int32 [b], raw_logprobs float32 [b])``.

    ``keys_b`` is a batch of typed PRNG keys (see :func:`row_keys`). The sorting needed by top-k /
    top-p and the Gumbel noise are skipped at run time when no row of the batch needs them.
    """
    logits = logits_bv.astype(jnp.float32)
    v = logits.shape[-1]
    greedy = argmax_last(logits)
    sampled_rows = temperature_b > 0

    def sample():
        t = jnp.where(sampled_rows, temperature_b, 1.0).astype(jnp.float32)
        scaled = logits / t[:, None]
        needs_filter = jnp.any(sampled_rows & ((top_p_b < 1.0) | ((top_k_b > 0) & (top_k_b < v))))
        scaled = jax.lax.cond(needs_filter, lambda x: filter_logits(x, top_p_b, top_k_b), lambda x: x, scaled)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (v,), jnp.float32))(keys_b)
        return argmax_last(scaled + gumbel)

    drawn = jax.lax.cond(jnp.any(sampled_rows), sample, lambda: greedy)
    tokens = jnp.where(sampled_rows, drawn, greedy)
    logz = jax.nn.logsumexp(logits, axis=-1)
    logprobs = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - logz
    return tokens, logprobs
