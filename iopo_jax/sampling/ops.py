"""Token selection on a batch of logits: greedy, temperature, top-k, top-p, with per-row settings.

Every setting is a per-row array, so one compiled step serves a batch that mixes greedy rows and
sampled rows with different temperatures (the server batches unrelated requests together).

Order of operations for a sampled row (the order of transformers' logits warpers):

1. ``logits / temperature``;
2. top-k: keep the ``k`` largest (``k <= 0`` disables; tokens tied with the k-th value are kept);
3. top-p: among the survivors, keep the smallest prefix of the sorted distribution whose mass
   reaches ``top_p`` (the most likely token is always kept; ``top_p >= 1`` disables);
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

    Depends only on the row's own seed and index and on the step, never on the batch the row lands
    in, so a seeded request reproduces whatever else is being generated alongside it.
    """

    def one(hi, lo, pidx, sidx):
        k = jax.random.fold_in(jax.random.key(0), hi)
        k = jax.random.fold_in(k, lo)
        k = jax.random.fold_in(k, pidx)
        k = jax.random.fold_in(k, sidx)
        return jax.random.fold_in(k, step)

    return jax.vmap(one)(seed_hi, seed_lo, prompt_index, sample_index)


def filter_logits(logits_bv, top_p_b, top_k_b):
    """Set logits outside each row's top-k / top-p set to -inf. ``logits_bv`` float32 [b, v]."""
    v = logits_bv.shape[-1]
    sorted_desc = -jnp.sort(-logits_bv, axis=-1)  # [b, v], largest first
    k = jnp.where((top_k_b <= 0) | (top_k_b > v), v, top_k_b).astype(jnp.int32)
    rank = jnp.arange(v, dtype=jnp.int32)[None, :]
    in_k = rank < k[:, None]
    kept = jnp.where(in_k, sorted_desc, NEG_INF)
    probs = jax.nn.softmax(kept, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly higher-ranked tokens
    keep = in_k & ((mass_before < top_p_b[:, None]) | (rank == 0))
    n_keep = jnp.sum(keep, axis=-1).astype(jnp.int32)
    threshold = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)  # [b, 1]
    return jnp.where(logits_bv >= threshold, logits_bv, NEG_INF)


def select_tokens(logits_bv, temperature_b, top_p_b, top_k_b, keys_b):
    """Choose one token per row. Returns ``(tokens int32 [b], raw_logprobs float32 [b])``.

    ``keys_b`` is a batch of typed PRNG keys (see :func:`row_keys`). The sorting needed by top-k /
    top-p and the Gumbel noise are skipped at run time when no row of the batch needs them.
    """
    logits = logits_bv.astype(jnp.float32)
    v = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled_rows = temperature_b > 0

    def sample():
        t = jnp.where(sampled_rows, temperature_b, 1.0).astype(jnp.float32)
        scaled = logits / t[:, None]
        needs_filter = jnp.any(sampled_rows & ((top_p_b < 1.0) | ((top_k_b > 0) & (top_k_b < v))))
        scaled = jax.lax.cond(needs_filter, lambda x: filter_logits(x, top_p_b, top_k_b), lambda x: x, scaled)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (v,), jnp.float32))(keys_b)
        return jnp.argmax(scaled + gumbel, axis=-1).astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(sampled_rows), sample, lambda: greedy)
    tokens = jnp.where(sampled_rows, drawn, greedy)
    logz = jax.nn.logsumexp(logits, axis=-1)
    logprobs = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - logz
    return tokens, logprobs
