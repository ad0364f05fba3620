"""Memory-bounded log-probs of label tokens, without materialising ``[B, T, V]`` logits.

Label convention (HF): ``labels_bt`` is aligned with ``input_ids`` and holds ``ignore_index`` (-100)
where no loss is taken (prompt, padding). The shift happens here: the hidden state at position ``t``
predicts ``labels[:, t + 1]``; ``labels[:, 0]`` is never predicted.

How memory stays bounded:

1. (``gather_only_labelled=True``, default) the positions that have a label are compacted, per row, to
   the front of a buffer of static length ``N = max_label_tokens`` (default ``T - 1``), so the vocabulary
   projection only runs where labels exist;
2. the buffer is cut into chunks of ``chunk_size`` tokens; a ``lax.scan`` projects one chunk at a time
   (``[B, chunk_size, V]`` float32 logits at most) under ``jax.checkpoint``, so the backward pass
   recomputes each chunk's logits instead of storing them;
3. (``skip_empty_chunks=True``) chunks with no label in any row are skipped at run time by a
   ``lax.cond``: with compaction, work is proportional to the longest response in the batch, not to ``T``.

Extra memory for the logits is about ``2 * B * chunk_size * V * 4`` bytes (a chunk's logits and their
gradient in the backward), e.g. 1.2 GiB for B=4, chunk 256, V=151,936 -- versus 13.6 GiB for the full
float32 logits of 4 x 6,000 tokens (31.5 GiB in the naive backward). XLA's compiled temp-memory estimate
on CPU for that shape (D=3,584, float32, grad w.r.t. the hidden states): 3.9 GiB chunked vs 13.9 GiB
naive; the rest is head- and hidden-sized buffers.

``lm_head`` is either a ``[D, V]`` array (``hidden @ lm_head``, computed with float32 accumulation) or a
callable mapping ``[..., D]`` hidden states to ``[..., V]`` logits (e.g. tied embeddings:
``lambda h: jnp.einsum("...d,vd->...v", h, embed_vd)``). Gradients flow to the hidden states and to the
head (also to arrays a callable closes over).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Union

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100
Head = Union[jax.Array, Callable[[jax.Array], jax.Array]]


class SequenceLogProbs(NamedTuple):
    """Per-sequence statistics of the label tokens (all ``[B]``)."""

    logp_sum: jax.Array  # float32: sum of log p(label) over the labelled tokens
    token_count: jax.Array  # int32: number of labelled tokens that were scored
    logits_sum: jax.Array | None  # float32: sum over scored tokens and vocabulary of the logits
    logits_mean: jax.Array | None  # float32: logits_sum / (token_count * V) (0 for empty rows)
    num_dropped: jax.Array  # int32: labelled tokens that did not fit max_label_tokens (0 normally)


def _project(lm_head: Head, h: jax.Array) -> jax.Array:
    if callable(lm_head):
        return lm_head(h).astype(jnp.float32)
    return jnp.einsum("...d,dv->...v", h, lm_head, preferred_element_type=jnp.float32)


def _targets(labels_bt, ignore_index):
    """Targets of hidden positions 0..T-2 (the shift) and their validity."""
    tgt = labels_bt[:, 1:]
    valid = tgt != ignore_index
    return jnp.where(valid, tgt, 0).astype(jnp.int32), valid


def _compact(valid, n):
    """Per row, source positions of the first ``n`` valid entries (front-packed) and a validity mask."""
    b, t = valid.shape
    rank = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
    slot = jnp.where(valid & (rank < n), rank, n)  # n = out of range -> dropped by the scatter
    src = jnp.arange(t, dtype=jnp.int32)
    pos = jax.vmap(lambda s: jnp.zeros((n,), jnp.int32).at[s].set(src, mode="drop"))(slot)
    count = jnp.sum(valid, axis=1, dtype=jnp.int32)
    kept = jnp.minimum(count, n)
    mask = jnp.arange(n, dtype=jnp.int32)[None, :] < kept[:, None]
    return pos, mask, count - kept


def _chunked_logprobs(h_bnd, tgt_bn, mask_bn, lm_head, chunk_size, with_logits_sum, skip_empty_chunks, remat):
    """Per-token log p(target) ``[B, N]`` (0 where masked) and per-token vocab-sums of logits."""
    b, n, d = h_bnd.shape
    c = max(1, min(int(chunk_size), n))
    n_chunks = -(-n // c)
    pad = n_chunks * c - n
    if pad:
        h_bnd = jnp.pad(h_bnd, ((0, 0), (0, pad), (0, 0)))
        tgt_bn = jnp.pad(tgt_bn, ((0, 0), (0, pad)))
        mask_bn = jnp.pad(mask_bn, ((0, 0), (0, pad)))
    # [n_chunks, B, c, ...] so that the batch axis (and its sharding) stays where it is inside a chunk.
    hs = h_bnd.reshape(b, n_chunks, c, d).swapaxes(0, 1)
    ts = tgt_bn.reshape(b, n_chunks, c).swapaxes(0, 1)
    ms = mask_bn.reshape(b, n_chunks, c).swapaxes(0, 1)

    def compute(h, t, m):
        logits = _project(lm_head, h)  # [B, c, V] float32
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        logp = jnp.where(m, picked - lse, 0.0)
        lsum = jnp.where(m, jnp.sum(logits, axis=-1), 0.0) if with_logits_sum else jnp.zeros_like(logp)
        return logp, lsum

    def chunk(h, t, m):
        if not skip_empty_chunks:
            return compute(h, t, m)
        zeros = jnp.zeros(t.shape, jnp.float32)
        return jax.lax.cond(jnp.any(m), compute, lambda *_: (zeros, zeros), h, t, m)

    if remat:
        # The checkpoint must wrap the cond: a checkpoint inside a cond branch still saves residuals.
        chunk = jax.checkpoint(chunk, policy=jax.checkpoint_policies.nothing_saveable)

    def body(carry, xs):
        return carry, chunk(*xs)

    _, (logp, lsum) = jax.lax.scan(body, None, (hs, ts, ms))
    logp = logp.swapaxes(0, 1).reshape(b, n_chunks * c)[:, :n]
    lsum = lsum.swapaxes(0, 1).reshape(b, n_chunks * c)[:, :n]
    return logp, lsum


def _labelled_logprobs(hidden_btd, lm_head, labels_bt, *, chunk_size, max_label_tokens, gather_only_labelled,
                       with_logits_sum, ignore_index, skip_empty_chunks, remat):
    if hidden_btd.ndim != 3 or labels_bt.ndim != 2 or hidden_btd.shape[:2] != labels_bt.shape:
        raise ValueError(
            f"hidden_btd must be [B, T, D] and labels_bt [B, T]; got {hidden_btd.shape} and {labels_bt.shape}")
    b, t, _ = hidden_btd.shape
    if t < 2:
        raise ValueError(f"need at least 2 positions to score a label (T={t})")
    tgt, valid = _targets(labels_bt, ignore_index)  # [B, T-1]
    if gather_only_labelled:
        n = t - 1 if max_label_tokens is None else int(max_label_tokens)
        if not 1 <= n:
            raise ValueError(f"max_label_tokens must be >= 1, got {max_label_tokens}")
        n = min(n, t - 1)
        pos, mask, dropped = _compact(valid, n)
        h = jnp.take_along_axis(hidden_btd, pos[:, :, None], axis=1)
        tg = jnp.take_along_axis(tgt, pos, axis=1)
    else:
        pos = jnp.broadcast_to(jnp.arange(t - 1, dtype=jnp.int32), (b, t - 1))
        h, tg, mask = hidden_btd[:, :-1], tgt, valid
        dropped = jnp.zeros((b,), jnp.int32)
    logp, lsum = _chunked_logprobs(h, tg, mask, lm_head, chunk_size, with_logits_sum, skip_empty_chunks, remat)
    return logp, lsum, mask, pos, dropped


def _batch_packed_logprobs(hidden_btd, lm_head, labels_bt, *, chunk_size, with_logits_sum, ignore_index,
                           skip_empty_chunks, remat):
    """Labelled positions of the whole batch packed into one stream: work ~ total labelled tokens.

    Returns per-row ``(logp_sum, count, logits_sum)``. The stream crosses rows, so the batch sharding is
    not kept inside the projection: meant for single-device runs with short responses.
    """
    b, t, d = hidden_btd.shape
    tgt, valid = _targets(labels_bt, ignore_index)  # [B, T-1]
    n = b * (t - 1)
    pos, mask, _ = _compact(valid.reshape(1, n), n)  # [1, n]
    h = jnp.take(hidden_btd[:, :-1].reshape(n, d), pos[0], axis=0)[None]
    tg = jnp.take(tgt.reshape(n), pos[0])[None]
    logp, lsum = _chunked_logprobs(h, tg, mask, lm_head, chunk_size, with_logits_sum, skip_empty_chunks, remat)
    row = pos[0] // (t - 1)
    seg = lambda x: jax.ops.segment_sum(x, row, num_segments=b)
    return seg(logp[0]), seg(mask[0].astype(jnp.int32)), seg(lsum[0])


def _vocab_size(lm_head, hidden_btd):
    if callable(lm_head):
        return jax.eval_shape(lm_head, jax.ShapeDtypeStruct((1, hidden_btd.shape[-1]), hidden_btd.dtype)).shape[-1]
    return lm_head.shape[-1]


def sequence_logprobs(
    hidden_btd: jax.Array,
    lm_head: Head,
    labels_bt: jax.Array,
    *,
    chunk_size: int = 256,
    max_label_tokens: int | None = None,
    gather_only_labelled: bool = True,
    with_logits_stats: bool = False,
    ignore_index: int = IGNORE_INDEX,
    skip_empty_chunks: bool = True,
    remat: bool = True,
    pack_batch: bool = False,
) -> SequenceLogProbs:
    """Per-sequence sum of ``log p(labels[:, t+1] | hidden[:, t])`` over labelled tokens.

    Args:
      hidden_btd: final hidden states ``[B, T, D]`` (after the final norm), any float dtype.
      lm_head: ``[D, V]`` array or callable ``[..., D] -> [..., V]``.
      labels_bt: ``[B, T]`` int labels aligned with input_ids; ``ignore_index`` where no loss.
      chunk_size: tokens per row projected at once (memory ~ ``B * chunk_size * V * 4`` bytes).
      max_label_tokens: static size of the compaction buffer per row (default ``T - 1``: never drops).
        Labelled tokens beyond it are not scored and are counted in ``num_dropped``.
      gather_only_labelled: compact labelled positions first (the vocab projection runs only there).
      with_logits_stats: also return ``logits_sum`` / ``logits_mean`` (for the ``logits/*`` metrics).
      skip_empty_chunks: skip chunks without labels at run time (``lax.cond``).
      remat: recompute each chunk's logits in the backward pass (``jax.checkpoint``).
      pack_batch: pack the labelled tokens of all rows into one stream before chunking, so the work is
        proportional to the total number of labelled tokens instead of rows x the longest response
        (ignores ``max_label_tokens``; best on one device, as the stream crosses the batch sharding).
    """
    if pack_batch:
        logp_sum, count, logits_sum = _batch_packed_logprobs(
            hidden_btd, lm_head, labels_bt, chunk_size=chunk_size, with_logits_sum=with_logits_stats,
            ignore_index=ignore_index, skip_empty_chunks=skip_empty_chunks, remat=remat)
        logits_mean = None
        if with_logits_stats:
            v = _vocab_size(lm_head, hidden_btd)
            logits_mean = logits_sum / (jnp.maximum(count, 1).astype(jnp.float32) * v)
        else:
            logits_sum = None
        return SequenceLogProbs(logp_sum, count, logits_sum, logits_mean, jnp.zeros_like(count))
    logp, lsum, mask, _, dropped = _labelled_logprobs(
        hidden_btd, lm_head, labels_bt, chunk_size=chunk_size, max_label_tokens=max_label_tokens,
        gather_only_labelled=gather_only_labelled, with_logits_sum=with_logits_stats,
        ignore_index=ignore_index, skip_empty_chunks=skip_empty_chunks, remat=remat)
    count = jnp.sum(mask, axis=1, dtype=jnp.int32)
    logits_sum = logits_mean = None
    if with_logits_stats:
        logits_sum = jnp.sum(lsum, axis=1)
        v = _vocab_size(lm_head, hidden_btd)
        logits_mean = logits_sum / (jnp.maximum(count, 1).astype(jnp.float32) * v)
    return SequenceLogProbs(jnp.sum(logp, axis=1), count, logits_sum, logits_mean, dropped)


def token_logprobs(
    hidden_btd: jax.Array,
    lm_head: Head,
    labels_bt: jax.Array,
    *,
    chunk_size: int = 256,
    max_label_tokens: int | None = None,
    gather_only_labelled: bool = True,
    ignore_index: int = IGNORE_INDEX,
    skip_empty_chunks: bool = True,
    remat: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probs aligned with the labels: ``out[:, t] = log p(labels[:, t] | tokens < t)``.

    Returns ``(logp_bt [B, T] float32, mask_bt [B, T] bool)``; ``logp`` is 0 where ``mask`` is False
    (unlabelled positions, position 0, and tokens dropped by ``max_label_tokens``). Same memory
    behaviour and arguments as :func:`sequence_logprobs`; this is what RL losses need (ratios, KL).
    """
    b, t = labels_bt.shape
    logp, _, mask, pos, _ = _labelled_logprobs(
        hidden_btd, lm_head, labels_bt, chunk_size=chunk_size, max_label_tokens=max_label_tokens,
        gather_only_labelled=gather_only_labelled, with_logits_sum=False, ignore_index=ignore_index,
        skip_empty_chunks=skip_empty_chunks, remat=remat)
    # hidden position p scores label p + 1; masked slots go out of range and are dropped.
    dest = jnp.where(mask, pos + 1, t)
    rows = jnp.arange(b)[:, None]
    out = jnp.zeros((b, t), jnp.float32).at[rows, dest].set(logp, mode="drop")
    out_mask = jnp.zeros((b, t), bool).at[rows, dest].set(mask, mode="drop")
    return out, out_mask


def naive_sequence_logprobs(hidden_btd, lm_head: Head, labels_bt, *, ignore_index: int = IGNORE_INDEX):
    """Reference implementation with full ``[B, T, V]`` logits (tests and tiny models only)."""
    logits = _project(lm_head, hidden_btd[:, :-1])
    tgt, valid = _targets(labels_bt, ignore_index)
    lp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, picked, 0.0), axis=1), jnp.sum(valid, axis=1, dtype=jnp.int32)


def scored_sequence_logprobs(
    hidden_btd: jax.Array,
    lm_head: Head,
    score_positions_bn: jax.Array,
    score_targets_bn: jax.Array,
    score_sequence_bn: jax.Array,
    num_sequences: int,
    *,
    chunk_size: int = 256,
    with_logits_stats: bool = False,
    ignore_index: int = IGNORE_INDEX,
    skip_empty_chunks: bool = True,
    remat: bool = True,
) -> SequenceLogProbs:
    """Per-sequence log-probs of rows that hold several sequences sharing a prefix (shared-prompt packing).

    Each row lists its scored tokens explicitly, front-packed: slot j scores token ``score_targets[:, j]``
    (``ignore_index`` = empty slot) from the hidden state at ``score_positions[:, j]`` and adds it to
    sequence ``score_sequence[:, j]`` (``0 .. num_sequences - 1``) of that row. Returns
    :class:`SequenceLogProbs` with ``B * num_sequences`` entries, sequence s of row r at ``r * num_sequences + s``.
    Same chunked, memory-bounded projection as :func:`sequence_logprobs`.
    """
    b, t, _ = hidden_btd.shape
    if score_positions_bn.shape != score_targets_bn.shape or score_targets_bn.shape != score_sequence_bn.shape:
        raise ValueError(f"score_positions / score_targets / score_sequence shapes differ: {score_positions_bn.shape}, "
                         f"{score_targets_bn.shape}, {score_sequence_bn.shape}")
    mask = score_targets_bn != ignore_index
    pos = jnp.clip(score_positions_bn.astype(jnp.int32), 0, t - 1)
    h = jnp.take_along_axis(hidden_btd, pos[:, :, None], axis=1)
    tgt = jnp.where(mask, score_targets_bn, 0).astype(jnp.int32)
    logp, lsum = _chunked_logprobs(h, tgt, mask, lm_head, chunk_size, with_logits_stats, skip_empty_chunks, remat)
    onehot = (score_sequence_bn[:, :, None] == jnp.arange(num_sequences)[None, None, :]) & mask[:, :, None]
    per = lambda x: jnp.sum(jnp.where(onehot, x[:, :, None], 0.0), axis=1).reshape(b * num_sequences)
    count = jnp.sum(onehot, axis=1, dtype=jnp.int32).reshape(b * num_sequences)
    logits_sum = logits_mean = None
    if with_logits_stats:
        logits_sum = per(lsum)
        v = _vocab_size(lm_head, hidden_btd)
        logits_mean = logits_sum / (jnp.maximum(count, 1).astype(jnp.float32) * v)
    return SequenceLogProbs(per(logp), count, logits_sum, logits_mean, jnp.zeros_like(count))
