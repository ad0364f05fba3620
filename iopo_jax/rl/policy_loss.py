"""The GRPO / SegPO clipped policy loss with a k3 KL penalty (docs/rl.md).

Pure ``jnp`` functions over token arrays ``[..., T]``: the log-probs of the policy being trained, of the
policy that sampled the rollouts and of the reference model, the per-token advantages of
:mod:`iopo_jax.rl.advantages` and the response-token mask.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from iopo_jax.rl.advantages import as_float


def k3_kl(logp, ref_logp, *, clamp: float = 20.0) -> jax.Array:
    """Per-token k3 ("low-variance") estimator of KL(pi || pi_ref): ``exp(d) - d - 1``, ``d = ref - logp``.

    ``d`` is clipped to ``[-clamp, clamp]`` so that a far-off token cannot overflow.
    """
    d = jnp.clip(as_float(ref_logp) - as_float(logp), -clamp, clamp)
    return jnp.exp(d) - d - 1.0


def _aggregate(per_tok, mask, aggregation, normalizer):
    if aggregation == "token_mean":
        denom = jnp.sum(mask).astype(per_tok.dtype) if normalizer is None else jnp.asarray(normalizer, per_tok.dtype)
        return jnp.sum(jnp.where(mask, per_tok, 0.0)) / jnp.maximum(denom, 1.0)
    if aggregation == "seq_mean":
        n_t = jnp.sum(mask, axis=-1).astype(per_tok.dtype)
        seq = jnp.sum(jnp.where(mask, per_tok, 0.0), axis=-1) / jnp.maximum(n_t, 1.0)
        has = n_t > 0
        denom = jnp.sum(has).astype(per_tok.dtype) if normalizer is None else jnp.asarray(normalizer, per_tok.dtype)
        return jnp.sum(jnp.where(has, seq, 0.0)) / jnp.maximum(denom, 1.0)
    raise ValueError(f"aggregation={aggregation!r} must be 'token_mean' or 'seq_mean'")


@functools.partial(jax.jit, static_argnames=("eps_low", "eps_high", "kl_coef", "aggregation"))
def clipped_policy_loss(logp, old_logp, advantages, mask, ref_logp=None, *, eps_low: float = 0.2,
                        eps_high: float = 0.2, kl_coef: float = 0.001, aggregation: str = "token_mean",
                        normalizer=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO/SegPO clipped surrogate with a k3 KL penalty; all token arrays share one shape ``[..., T]``.

    Per token: ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + kl_coef * k3``, with
    ``ratio = exp(logp - old_logp)`` (``old_logp`` is held fixed: pass the rollout log-probs).
    ``aggregation``: ``token_mean`` (sum over every response token of the batch / number of tokens) or
    ``seq_mean`` (mean over sequences of each one's token mean). ``normalizer`` overrides the denominator
    (number of tokens, or of sequences) -- use the global count when a batch is split in micro-batches.
    ``ref_logp=None`` or ``kl_coef=0`` drops the KL term.
    """
    logp, old_logp, adv = as_float(logp), jax.lax.stop_gradient(as_float(old_logp)), jax.lax.stop_gradient(as_float(advantages))
    mask = jnp.asarray(mask, bool)
    if not (logp.shape == old_logp.shape == adv.shape == mask.shape):
        raise ValueError(f"logp {logp.shape}, old_logp {old_logp.shape}, advantages {adv.shape} and mask "
                         f"{mask.shape} must have the same shape")
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    log_ratio = jnp.where(mask, logp - old_logp, 0.0)
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * clipped
    pg = jnp.maximum(loss_unclipped, loss_clipped)
    per_tok = pg
    metrics = {}
    if ref_logp is not None and kl_coef != 0:
        ref_logp = jax.lax.stop_gradient(as_float(ref_logp))
        if ref_logp.shape != logp.shape:
            raise ValueError(f"ref_logp shape {ref_logp.shape} != logp shape {logp.shape}")
        kl = jnp.where(mask, k3_kl(logp, ref_logp), 0.0)
        per_tok = pg + kl_coef * kl
        metrics["kl"] = jax.lax.stop_gradient(_aggregate(kl, mask, "token_mean", None))
    loss = _aggregate(per_tok, mask, aggregation, normalizer)
    sg = jax.lax.stop_gradient
    fm = mask.astype(logp.dtype)
    n = jnp.maximum(jnp.sum(fm), 1.0)

    def tmean(x):
        return jnp.sum(jnp.where(mask, sg(x), 0.0)) / n

    metrics.update({
        "loss": sg(loss),
        "pg_loss": sg(_aggregate(pg, mask, aggregation, normalizer)),
        "clip_fraction": tmean((loss_clipped > loss_unclipped).astype(logp.dtype)),
        "clip_fraction_low": tmean(((ratio < 1.0 - eps_low) & (adv < 0)).astype(logp.dtype)),
        "clip_fraction_high": tmean(((ratio > 1.0 + eps_high) & (adv > 0)).astype(logp.dtype)),
        "ratio_mean": tmean(ratio),
        "ratio_max": sg(jnp.max(jnp.where(mask, ratio, 0.0))),
        "approx_kl_old": tmean(0.5 * log_ratio * log_ratio),
        "advantage_mean": tmean(adv),
        "tokens": sg(jnp.sum(fm)),
    })
    return loss, metrics
