"""Offline objectives as pure functions of per-sequence log-prob sums (docs/objectives.md).

Every objective has the signature::

    fn(policy_logps [G, K], ref_logps [G, K] | None, token_counts [G, K], cfg: ObjectiveConfig,
       *, logits_mean [G, K] | None = None, weights [G] | None = None) -> (loss [], metrics {str: []})

``policy_logps`` / ``ref_logps`` are log-probs *summed* over the response tokens of each sequence,
``token_counts`` the number of response tokens (so ``sum / count`` is the per-token mean). A batch
holds ``G`` groups of ``K`` sequences in a fixed column order:

* ``K == 4`` (IOPO group): ``chosen_v1 = (x1, y1)``, ``rejected_v1 = (x1, y2)``,
  ``chosen_v2 = (x2, y2)``, ``rejected_v2 = (x2, y1)``.
* ``K == 3`` (``iopo_star`` only): ``chosen_v1 = (x1, y1)``, ``rejected_v1 = (x1, y2)``, ``rejected_v2 = (x2, y1)``.
* ``K == 2`` (preference pair): ``chosen``, ``rejected``.
* ``K == 1`` (SFT): ``chosen``.

How the pair baselines consume IOPO groups (``K == 4``): the group gives two preference pairs with a
shared prompt, ``(x1: y1 > y2)`` = columns (0, 1) and ``(x2: y2 > y1)`` = columns (2, 3); the per-group
loss is the mean of the two pair losses (so its scale equals the pair loss). ``sft`` on IOPO groups
trains on the two correct pairs (x1, y1) and (x2, y2). ``iopo_no_input`` (the ablation without the input
preference) is therefore DPO on IOPO groups; ``iopo_no_output`` uses the pairs ``(y1: x1 > x2)`` =
columns (0, 3) and ``(y2: x2 > x1)`` = columns (2, 1).

``weights`` (0/1 or any non-negative float per group) lets a static-shape batch carry padding groups:
losses and metrics are weighted means over groups (0 when all weights are 0).

Metrics follow the reference code's names: ``rewards/<col>`` (``beta * h`` with
``h = logp - ref_logp``; ``beta * mean_logp`` for the reference-free ORPO/SimPO), ``logps/<col>`` (the
log-probs the loss used: sums, or per-token means for ipo/orpo/simpo/sft), ``logits/<col>`` (when
``logits_mean`` is passed), and per pair ``rewards/accuracies<sfx>`` / ``rewards/margins<sfx>`` with
``<sfx>`` = ``""`` for pairs, ``_v1`` (chosen_v1 vs rejected_v1) and ``_v2`` (chosen_v2 vs rejected_v2)
for IOPO groups, plus ``_input_v1`` (chosen_v1 vs rejected_v2: same answer y1, x1 preferred to x2) and
``_input_v2`` (chosen_v2 vs rejected_v1) for the input preference.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from data_pipeline.tokenization import SEQUENCE_NAMES
from iopo_jax.objectives.config import ObjectiveConfig

# Column names per group size K, from the data pipeline's sequence order (data_pipeline.tokenization):
# K=4 IOPO, K=2 DPO, K=3 IOPO without chosen_v2 (iopo_star), K=1 the chosen sequence alone (SFT).
COLUMN_NAMES = {
    1: ("chosen",),
    2: SEQUENCE_NAMES["dpo"],
    3: tuple(n for n in SEQUENCE_NAMES["iopo"] if n != "chosen_v2"),
    4: SEQUENCE_NAMES["iopo"],
}
# (metric suffix, better column, worse column) per group layout.
METRIC_PAIRS = {
    1: (),
    2: (("", 0, 1),),
    3: (("_v1", 0, 1), ("_input_v1", 0, 2)),
    4: (("_v1", 0, 1), ("_v2", 2, 3), ("_input_v1", 0, 3), ("_input_v2", 2, 1)),
}
# Columns of the "chosen" (correct) sequences, used by SFT terms.
CHOSEN_COLUMNS = {1: (0,), 2: (0,), 3: (0,), 4: (0, 2)}
# Preference pairs (better, worse) the pair baselines take from each layout.
PAIR_COLUMNS = {2: ((0, 1),), 4: ((0, 1), (2, 3))}

_F32 = jnp.float32
EXO_PAIR_DEFAULT_EPS = 1e-3


def _as_float(x) -> jax.Array:
    """float32 (float64 inputs stay float64, for finite-difference checks under jax_enable_x64)."""
    x = jnp.asarray(x)
    return x if x.dtype == jnp.float64 else x.astype(_F32)


# ----------------------------------------------------------------------------------------------
# helpers


def _wmean(x: jax.Array, w: jax.Array) -> jax.Array:
    """Weighted mean over the group axis (axis 0); 0 when all weights are 0."""
    total = jnp.sum(w)
    return jnp.where(total > 0, jnp.sum(x * w) / jnp.where(total > 0, total, 1.0), 0.0)


def per_token_mean(logp_sum: jax.Array, token_counts: jax.Array) -> jax.Array:
    """``logp_sum / token_counts`` with empty sequences (count 0) giving 0."""
    return logp_sum / jnp.maximum(token_counts, 1.0)


def log1mexp(x: jax.Array) -> jax.Array:
    """Stable ``log(1 - exp(x))`` for ``x < 0`` (x is clipped to <= -1e-6 so log-prob 0 stays finite).

    Uses the double-``where`` trick so neither branch produces NaN gradients.
    """
    x = jnp.minimum(x, -1e-6)
    near = x > -math.log(2.0)
    a = jnp.where(near, x, -1.0)
    b = jnp.where(near, -1.0, x)
    return jnp.where(near, jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(b)))


def preference_loss(logits: jax.Array, cfg: ObjectiveConfig) -> jax.Array:
    """Elementwise loss of an (unscaled) preference logit ``l`` for ``cfg.loss_type`` (docs/objectives.md)."""
    b, eps = cfg.beta, cfg.label_smoothing
    z = b * logits
    if cfg.loss_type == "sigmoid":
        return -jax.nn.log_sigmoid(z) * (1.0 - eps) - jax.nn.log_sigmoid(-z) * eps
    if cfg.loss_type == "robust":
        return (-jax.nn.log_sigmoid(z) * (1.0 - eps) + jax.nn.log_sigmoid(-z) * eps) / (1.0 - 2.0 * eps)
    if cfg.loss_type == "exo_pair":
        e = eps if eps > 0 else EXO_PAIR_DEFAULT_EPS
        return jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - math.log1p(-e)) + jax.nn.sigmoid(-z) * (
            jax.nn.log_sigmoid(-z) - math.log(e)
        )
    if cfg.loss_type == "hinge":
        return jax.nn.relu(1.0 - z)
    if cfg.loss_type == "ipo":
        return (logits - 1.0 / (2.0 * b)) ** 2
    raise ValueError(f"unknown loss_type {cfg.loss_type!r}")


def _prepare(name, group_sizes, needs_reference, policy_logps, ref_logps, token_counts, logits_mean, weights):
    pol = _as_float(policy_logps)
    if pol.ndim != 2:
        raise ValueError(f"objective {name!r}: policy_logps must have shape [G, K], got {pol.shape}")
    g, k = pol.shape
    if k not in group_sizes:
        raise ValueError(
            f"objective {name!r}: group size K={k} is not supported (expected one of {group_sizes}; "
            "IOPO groups are K=4 in the order chosen_v1, rejected_v1, chosen_v2, rejected_v2)"
        )
    counts = _as_float(token_counts)
    if counts.shape != pol.shape:
        raise ValueError(f"objective {name!r}: token_counts shape {counts.shape} != policy_logps shape {pol.shape}")
    ref = None
    if needs_reference:
        if ref_logps is None:
            raise ValueError(f"objective {name!r} needs reference log-probs (ref_logps is None)")
        ref = _as_float(ref_logps)
        if ref.shape != pol.shape:
            raise ValueError(f"objective {name!r}: ref_logps shape {ref.shape} != policy_logps shape {pol.shape}")
    lm = None
    if logits_mean is not None:
        lm = _as_float(logits_mean)
        if lm.shape != pol.shape:
            raise ValueError(f"objective {name!r}: logits_mean shape {lm.shape} != policy_logps shape {pol.shape}")
    w = jnp.ones((g,), pol.dtype) if weights is None else _as_float(weights)
    if w.shape != (g,):
        raise ValueError(f"objective {name!r}: weights must have shape [G]=({g},), got {w.shape}")
    return pol, ref, counts, lm, w


def _sequence_metrics(k, rewards, logps, logits_mean, w):
    names = COLUMN_NAMES[k]
    m = {}
    for c, n in enumerate(names):
        if rewards is not None:
            m[f"rewards/{n}"] = _wmean(rewards[:, c], w)
        m[f"logps/{n}"] = _wmean(logps[:, c], w)
        if logits_mean is not None:
            m[f"logits/{n}"] = _wmean(logits_mean[:, c], w)
    if rewards is not None:
        for sfx, a, b in METRIC_PAIRS[k]:
            m[f"rewards/accuracies{sfx}"] = _wmean((rewards[:, a] > rewards[:, b]).astype(rewards.dtype), w)
            m[f"rewards/margins{sfx}"] = _wmean(rewards[:, a] - rewards[:, b], w)
    return m


def _sft_term(pol, counts, k):
    """Per group: sum over the chosen columns of the per-token mean NLL."""
    avg = per_token_mean(pol, counts)
    return sum(-avg[:, c] for c in CHOSEN_COLUMNS[k])


# ----------------------------------------------------------------------------------------------
# reference-based preference objectives (DPO family)


def _preference_logits(kind: str, h: jax.Array) -> jax.Array:
    """[G, P] preference logits (P preference terms per group) from ``h = logp - ref_logp`` [G, K]."""
    k = h.shape[1]
    if kind in ("dpo", "iopo_no_input"):
        return jnp.stack([h[:, a] - h[:, b] for a, b in PAIR_COLUMNS[k]], axis=1)
    if kind == "iopo":
        # 0.5 * [(2 c1 - r1 - r2) + (2 c2 - r2 - r1)] = h11 + h22 - h12 - h21
        return (h[:, 0] + h[:, 2] - h[:, 1] - h[:, 3])[:, None]
    if kind == "iopo_star":
        r2 = h[:, 2] if k == 3 else h[:, 3]
        return (2.0 * h[:, 0] - h[:, 1] - r2)[:, None]
    if kind == "iopo_no_output":
        return jnp.stack([h[:, 0] - h[:, 3], h[:, 2] - h[:, 1]], axis=1)
    raise ValueError(kind)


def _make_reference_objective(kind: str, group_sizes):
    def objective(policy_logps, ref_logps, token_counts, cfg: ObjectiveConfig, *, logits_mean=None, weights=None):
        pol_sum, ref_sum, counts, lm, w = _prepare(
            kind, group_sizes, True, policy_logps, ref_logps, token_counts, logits_mean, weights
        )
        k = pol_sum.shape[1]
        if cfg.loss_type == "ipo":  # IPO works on length-averaged log-probs (policy and reference)
            pol, ref = per_token_mean(pol_sum, counts), per_token_mean(ref_sum, counts)
        else:
            pol, ref = pol_sum, ref_sum
        h = pol - ref
        logits = _preference_logits(kind, h)
        per_group = jnp.mean(preference_loss(logits, cfg), axis=1)
        metrics = {}
        if cfg.pref_ftx > 0:
            # iopo_star trains only on (x1, y1) (its K=3 layout has no (x2, y2)), whatever K is.
            sft = _sft_term(pol_sum, counts, 1 if kind == "iopo_star" else k)
            per_group = per_group + cfg.pref_ftx * sft
            metrics["sft_loss"] = _wmean(sft, w)
        loss = _wmean(per_group, w)
        rewards = jax.lax.stop_gradient(cfg.beta * h)
        metrics.update(_sequence_metrics(k, rewards, jax.lax.stop_gradient(pol), lm, w))
        metrics["loss"] = jax.lax.stop_gradient(loss)
        return loss, metrics

    objective.__name__ = f"{kind}_objective"
    return objective


dpo_objective = _make_reference_objective("dpo", (2, 4))
iopo_objective = _make_reference_objective("iopo", (4,))
iopo_star_objective = _make_reference_objective("iopo_star", (3, 4))
iopo_no_input_objective = _make_reference_objective("iopo_no_input", (4,))
iopo_no_output_objective = _make_reference_objective("iopo_no_output", (4,))


# ----------------------------------------------------------------------------------------------
# reference-free objectives


def simpo_objective(policy_logps, ref_logps, token_counts, cfg: ObjectiveConfig, *, logits_mean=None, weights=None):
    """SimPO: ``-log sigmoid(beta * (avg_w - avg_l) - gamma)`` per pair (+ optional pref_ftx SFT term)."""
    pol_sum, _, counts, lm, w = _prepare("simpo", (2, 4), False, policy_logps, None, token_counts, logits_mean, weights)
    k = pol_sum.shape[1]
    avg = per_token_mean(pol_sum, counts)
    z = jnp.stack([cfg.beta * (avg[:, a] - avg[:, b]) - cfg.simpo_gamma for a, b in PAIR_COLUMNS[k]], axis=1)
    per_group = jnp.mean(-jax.nn.log_sigmoid(z), axis=1)
    metrics = {}
    if cfg.pref_ftx > 0:
        sft = _sft_term(pol_sum, counts, k)
        per_group = per_group + cfg.pref_ftx * sft
        metrics["sft_loss"] = _wmean(sft, w)
    loss = _wmean(per_group, w)
    avg_sg = jax.lax.stop_gradient(avg)
    metrics.update(_sequence_metrics(k, cfg.beta * avg_sg, avg_sg, lm, w))
    metrics["loss"] = jax.lax.stop_gradient(loss)
    return loss, metrics


def orpo_log_odds(avg_logp: jax.Array) -> jax.Array:
    """``log(p / (1 - p))`` of the per-token mean log-prob ``avg_logp`` (ORPO's length-normalised odds)."""
    return avg_logp - log1mexp(avg_logp)


def orpo_objective(policy_logps, ref_logps, token_counts, cfg: ObjectiveConfig, *, logits_mean=None, weights=None):
    """ORPO (Hong et al. 2024): ``NLL_w + lambda * -log sigmoid(log odds_w - log odds_l)`` per pair.

    ``NLL_w`` is the per-token mean NLL of the chosen answer; ``log odds = m - log(1 - exp(m))`` with
    ``m`` the per-token mean log-prob. ``pref_ftx`` must be 0 (the NLL term is built in).
    """
    if cfg.pref_ftx > 0:
        raise ValueError("objective 'orpo': pref_ftx must be 0 (ORPO's NLL term is built in; use orpo_lambda)")
    pol_sum, _, counts, lm, w = _prepare("orpo", (2, 4), False, policy_logps, None, token_counts, logits_mean, weights)
    k = pol_sum.shape[1]
    avg = per_token_mean(pol_sum, counts)
    pairs = PAIR_COLUMNS[k]
    ratio = jnp.stack([orpo_log_odds(avg[:, a]) - orpo_log_odds(avg[:, b]) for a, b in pairs], axis=1)
    nll = jnp.stack([-avg[:, a] for a, _ in pairs], axis=1)
    or_loss = -jax.nn.log_sigmoid(ratio)
    per_group = jnp.mean(nll + cfg.orpo_lambda * or_loss, axis=1)
    loss = _wmean(per_group, w)
    avg_sg = jax.lax.stop_gradient(avg)
    metrics = _sequence_metrics(k, cfg.beta * avg_sg, avg_sg, lm, w)
    sg = jax.lax.stop_gradient
    metrics["sft_loss"] = _wmean(sg(jnp.mean(nll, axis=1)), w)
    metrics["odds_ratio_loss"] = _wmean(sg(jnp.mean(or_loss, axis=1)), w)
    metrics["log_odds_ratio"] = _wmean(sg(jnp.mean(ratio, axis=1)), w)
    metrics["loss"] = sg(loss)
    return loss, metrics


def sft_objective(policy_logps, ref_logps, token_counts, cfg: ObjectiveConfig, *, logits_mean=None, weights=None):
    """Negative log-likelihood of the chosen sequences (column 0; columns 0 and 2 of IOPO groups).

    ``cfg.sft_reduction == "token"``: total NLL / total tokens; ``"sequence"``: mean of per-token means.
    """
    pol_sum, _, counts, lm, w = _prepare("sft", (1, 2, 3, 4), False, policy_logps, None, token_counts, logits_mean, weights)
    k = pol_sum.shape[1]
    cols = CHOSEN_COLUMNS[k]
    if cfg.sft_reduction == "token":
        nll = sum(-pol_sum[:, c] for c in cols)
        toks = sum(counts[:, c] for c in cols)
        total = jnp.sum(toks * w)
        loss = jnp.where(total > 0, jnp.sum(nll * w) / jnp.where(total > 0, total, 1.0), 0.0)
    else:
        loss = _wmean(_sft_term(pol_sum, counts, k) / len(cols), w)
    avg = jax.lax.stop_gradient(per_token_mean(pol_sum, counts))
    metrics = _sequence_metrics(k, None, avg, lm, w)
    metrics["loss"] = jax.lax.stop_gradient(loss)
    return loss, metrics
