"""GRPO / SegPO advantages and verdict-based rewards (docs/rl.md); the clipped policy loss that
consumes the advantages is :mod:`iopo_jax.rl.policy_loss`.

Pure ``jnp`` functions with static shapes, for a batch of ``P`` prompts x ``G`` rollouts, ``J``
sub-instruction slots (padded) and ``T`` response tokens.

SegPO (per prompt p, rollout i, token t; ``I_t^i`` = segment of token t)::

    A_o(i)     = (r_o(i) - mean_i' r_o(i')) / (std_i' r_o(i') + eps)
    A_phi(i,j) = (r_phi(i,j) - mean_{i' has j} r_phi(i',j)) / (std_{i' has j} r_phi(i',j) + eps)
    A(i,t)     = A_o(i) + A_phi(i, I_t^i)      (A_o(i) alone when token t is outside every segment)

Choices where the paper is silent (all configurable or documented here):

* ``std`` is the sample standard deviation (``ddof=1``, as the usual GRPO implementations); pass
  ``ddof=0`` for the population one. ``eps`` (default 1e-6) is added to the std.
* A group (or, for A_phi, the set of rollouts having segment j) whose rewards are all equal gets exactly
  zero advantage, as does a set with fewer than ``ddof + 1`` members.
* **Missing segments**: when rollout i has no segment for sub-instruction j (``segment_valid[p,i,j]``
  False: the heading is absent, or the slot is padding), ``r_phi(i,j)`` does not enter the statistics of
  segment j, and ``A_phi(i,j) = 0``. Rollout i has no token in segment j anyway, so nothing of it is
  pushed by A_phi(., j); its failure to answer j is penalised through A_o (format reward 0, and the
  judge's verdicts for j, which lower ILA/CLA/all-pass). Tokens whose segment index points to an
  invalid slot are treated as outside every segment.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def as_float(x) -> jax.Array:
    """``x`` as float32, or float64 when it already is (tests run the maths in x64)."""
    x = jnp.asarray(x)
    return x if x.dtype == jnp.float64 else x.astype(_F32)


# ------------------------------------------------------------------------------------------------
# group normalisation


@functools.partial(jax.jit, static_argnames=("axis", "eps", "ddof"))
def group_normalize(rewards, valid=None, *, axis: int = 1, eps: float = 1e-6, ddof: int = 1) -> jax.Array:
    """``(r - mean) / (std + eps)`` over ``axis`` (the rollouts of a group), using only ``valid`` entries.

    Returns 0 for invalid entries, for sets whose valid rewards are all equal, and for sets with at most
    ``ddof`` valid members.
    """
    r = as_float(rewards)
    v = jnp.ones(r.shape, bool) if valid is None else jnp.broadcast_to(jnp.asarray(valid, bool), r.shape)
    n = jnp.sum(v, axis=axis, keepdims=True).astype(r.dtype)
    mean = jnp.sum(jnp.where(v, r, 0.0), axis=axis, keepdims=True) / jnp.maximum(n, 1.0)
    dev = jnp.where(v, r - mean, 0.0)
    var = jnp.sum(dev * dev, axis=axis, keepdims=True) / jnp.maximum(n - ddof, 1.0)
    std = jnp.sqrt(var)
    big = jnp.asarray(jnp.finfo(r.dtype).max, r.dtype)
    rmax = jnp.max(jnp.where(v, r, -big), axis=axis, keepdims=True)
    rmin = jnp.min(jnp.where(v, r, big), axis=axis, keepdims=True)
    informative = (rmax > rmin) & (n > ddof)
    return jnp.where(v & informative, dev / (std + eps), 0.0)


@functools.partial(jax.jit, static_argnames=("eps", "ddof"))
def grpo_advantages(r_o, *, valid=None, eps: float = 1e-6, ddof: int = 1) -> jax.Array:
    """GRPO advantage per rollout, ``[P, G]`` -> ``[P, G]`` (``valid`` [P, G] masks padded rollouts)."""
    r_o = as_float(r_o)
    if r_o.ndim != 2:
        raise ValueError(f"r_o must be [P, G], got shape {r_o.shape}")
    return group_normalize(r_o, valid, axis=1, eps=eps, ddof=ddof)


def _as_pgt(x, p, g, name):
    x = jnp.asarray(x)
    if x.ndim == 2 and x.shape[0] == p * g:
        x = x.reshape(p, g, x.shape[1])
    if x.ndim != 3 or x.shape[:2] != (p, g):
        raise ValueError(f"{name} must be [P, G, T] or [P*G, T] with P={p}, G={g}; got shape {x.shape}")
    return x


@functools.partial(jax.jit, static_argnames=("eps", "ddof"))
def grpo_token_advantages(r_o, response_mask, *, valid=None, eps: float = 1e-6, ddof: int = 1) -> jax.Array:
    """GRPO advantages broadcast to tokens: ``[P, G, T]`` (0 outside the response mask)."""
    r_o = as_float(r_o)
    mask = _as_pgt(response_mask, *r_o.shape, "response_mask").astype(bool)
    a = grpo_advantages(r_o, valid=valid, eps=eps, ddof=ddof)
    return jnp.where(mask, a[:, :, None], 0.0)


class SegPOAdvantages(NamedTuple):
    token: jax.Array  # [P, G, T] A(i, t) = A_o + A_phi, 0 outside the response mask
    output: jax.Array  # [P, G] A_o
    segment: jax.Array  # [P, G, J] A_phi (0 for missing segments)


@functools.partial(jax.jit, static_argnames=("eps", "ddof", "use_output", "use_segment"))
def segpo_advantages(r_o, r_phi, segment_valid, token_segment, response_mask, *, valid=None,
                     eps: float = 1e-6, ddof: int = 1, use_output: bool = True,
                     use_segment: bool = True) -> SegPOAdvantages:
    """SegPO advantages ``A = A_o + A_phi`` (see the module docstring for the exact rules).

    Args:
      r_o: ``[P, G]`` output-level rewards.
      r_phi: ``[P, G, J]`` segment rewards per sub-instruction slot.
      segment_valid: ``[P, G, J]`` bool, rollout i has a segment for slot j (and slot j exists).
      token_segment: ``[P, G, T]`` or ``[P*G, T]`` int, segment slot of each response token, -1 outside.
      response_mask: same shape as token_segment, True on response tokens.
      valid: optional ``[P, G]`` mask of real (non-padding) rollouts.
      use_output / use_segment: switch either term off (ablations; ``use_segment=False`` is GRPO).
    """
    r_o = as_float(r_o)
    if r_o.ndim != 2:
        raise ValueError(f"r_o must be [P, G], got shape {r_o.shape}")
    p, g = r_o.shape
    r_phi = as_float(r_phi)
    if r_phi.ndim != 3 or r_phi.shape[:2] != (p, g):
        raise ValueError(f"r_phi must be [P, G, J] with P={p}, G={g}; got shape {r_phi.shape}")
    j = r_phi.shape[2]
    seg_valid = jnp.asarray(segment_valid, bool)
    if seg_valid.shape != r_phi.shape:
        raise ValueError(f"segment_valid shape {seg_valid.shape} != r_phi shape {r_phi.shape}")
    if valid is not None:
        seg_valid = seg_valid & jnp.asarray(valid, bool)[:, :, None]
    seg = _as_pgt(token_segment, p, g, "token_segment").astype(jnp.int32)
    mask = _as_pgt(response_mask, p, g, "response_mask").astype(bool)

    a_o = grpo_advantages(r_o, valid=valid, eps=eps, ddof=ddof)
    a_phi = group_normalize(r_phi, seg_valid, axis=1, eps=eps, ddof=ddof)
    if not use_output:
        a_o = jnp.zeros_like(a_o)
    if not use_segment:
        a_phi = jnp.zeros_like(a_phi)
    in_seg = (seg >= 0) & (seg < j)
    idx = jnp.clip(seg, 0, max(j - 1, 0))
    tok_phi = jnp.take_along_axis(a_phi, idx, axis=2) if j > 0 else jnp.zeros(seg.shape, r_o.dtype)
    tok_ok = jnp.take_along_axis(seg_valid, idx, axis=2) if j > 0 else jnp.zeros(seg.shape, bool)
    tok = a_o[:, :, None] + jnp.where(in_seg & tok_ok, tok_phi, 0.0)
    return SegPOAdvantages(jnp.where(mask, tok, 0.0), a_o, a_phi)


# ------------------------------------------------------------------------------------------------
# rewards from judge verdicts


@dataclasses.dataclass(frozen=True)
class RewardWeights:
    """Weights of the terms of ``r_o = w_ila*ILA + w_cla*CLA + w_all*all_pass + w_format*r_f`` (docs/rl.md: all 1)."""

    ila: float = 1.0
    cla: float = 1.0
    all_pass: float = 1.0
    format: float = 1.0


@functools.partial(jax.jit, static_argnames=("weights",))
def rewards_from_verdicts(verdicts, constraint_mask, sub_mask=None, format_reward=None, *,
                          weights: RewardWeights = RewardWeights()) -> dict[str, jax.Array]:
    """Rewards of each rollout from verdicts ``S_ijk`` (docs/rl.md, docs/metrics.md).

    Args:
      verdicts: ``[..., J, K]`` 0/1 (or bool) verdict of constraint k of sub-instruction j.
      constraint_mask: ``[..., J, K]`` bool, constraint k of sub-instruction j exists (padding False).
      sub_mask: ``[..., J]`` bool, sub-instruction j exists; default: it has at least one constraint.
      format_reward: ``[...]`` r_f (e.g. the format flag of :mod:`iopo_jax.rl.segments`); default 0.
      weights: the weights of the four terms of r_o.

    Returns a dict of ``ila``, ``cla``, ``all_pass``, ``format`` (all ``[...]``), ``r_o`` ``[...]`` and
    ``r_phi`` ``[..., J]`` (``prod_k S_ijk``; 0 for padded slots). ``ILA = mean_j 1[all_k S_ijk]`` over
    existing sub-instructions, ``CLA`` = mean over all existing constraints; an empty mean is 0, an empty
    product is 1.
    """
    s = jnp.asarray(verdicts).astype(bool)
    cm = jnp.asarray(constraint_mask, bool)
    if s.shape != cm.shape or s.ndim < 2:
        raise ValueError(f"verdicts {s.shape} and constraint_mask {cm.shape} must be equal shapes [..., J, K]")
    sm = jnp.any(cm, axis=-1) if sub_mask is None else jnp.asarray(sub_mask, bool)
    if sm.shape != s.shape[:-1]:
        raise ValueError(f"sub_mask shape {sm.shape} != {s.shape[:-1]}")
    ok = s | ~cm  # padding constraints never fail
    sub_pass = jnp.all(ok, axis=-1) & sm  # [..., J]
    n_sub = jnp.sum(sm, axis=-1).astype(_F32)
    ila = jnp.where(n_sub > 0, jnp.sum(sub_pass, axis=-1) / jnp.maximum(n_sub, 1.0), 0.0)
    real = cm & sm[..., None]
    n_con = jnp.sum(real, axis=(-1, -2)).astype(_F32)
    cla = jnp.where(n_con > 0, jnp.sum(s & real, axis=(-1, -2)) / jnp.maximum(n_con, 1.0), 0.0)
    all_pass = jnp.all(sub_pass | ~sm, axis=-1).astype(_F32)
    r_f = jnp.zeros(ila.shape, _F32) if format_reward is None else as_float(format_reward)
    r_o = weights.ila * ila + weights.cla * cla + weights.all_pass * all_pass + weights.format * r_f
    return {"ila": ila, "cla": cla, "all_pass": all_pass, "format": r_f, "r_o": r_o,
            "r_phi": sub_pass.astype(_F32)}
