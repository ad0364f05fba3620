"""Offline training objectives, registered by name.

Usage (inside a jitted step; the objective is a pure function of per-sequence log-prob sums)::

    from iopo_jax.objectives import get_objective, ObjectiveConfig
    objective = get_objective("iopo")                  # an Objective; call it like a function
    loss, metrics = objective(policy_logps, ref_logps, token_counts, ObjectiveConfig(beta=0.1))

Shapes: ``[G, K]`` with K sequences per group in the fixed order documented in
:mod:`iopo_jax.objectives.losses` (IOPO: chosen_v1, rejected_v1, chosen_v2, rejected_v2).
``objective.group_sizes`` lists the K an objective accepts, ``objective.needs_reference`` whether
``ref_logps`` is required (reference-free objectives ignore it and accept ``None``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from iopo_jax.objectives import losses
from iopo_jax.objectives.config import LOSS_TYPES, ObjectiveConfig
from iopo_jax.objectives.losses import COLUMN_NAMES, log1mexp, orpo_log_odds, per_token_mean, preference_loss


@dataclasses.dataclass(frozen=True)
class Objective:
    """A registered objective: ``objective(policy_logps, ref_logps, token_counts, config, *, logits_mean, weights)``."""

    name: str
    fn: Callable[..., Any]
    group_sizes: tuple[int, ...]
    needs_reference: bool
    description: str

    def __call__(self, policy_logps, ref_logps, token_counts, config: ObjectiveConfig | Mapping | None = None, *,
                 logits_mean=None, weights=None):
        cfg = ObjectiveConfig.from_mapping(config)
        return self.fn(policy_logps, ref_logps, token_counts, cfg, logits_mean=logits_mean, weights=weights)


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("sft", losses.sft_objective, (1, 2, 3, 4), False,
                  "NLL of the chosen answers ((x1,y1) and (x2,y2) of IOPO groups)"),
        Objective("dpo", losses.dpo_objective, (2, 4), True,
                  "DPO; on IOPO groups the pairs (x1: y1>y2) and (x2: y2>y1)"),
        Objective("iopo", losses.iopo_objective, (4,), True,
                  "IOPO: loss_type(beta*(h11 + h22 - h12 - h21))"),
        Objective("iopo_star", losses.iopo_star_objective, (3, 4), True,
                  "IOPO*: loss_type(beta*(2 h11 - h12 - h21)); K=3 (x1y1, x1y2, x2y1) or K=4 (x2y2 unused)"),
        Objective("iopo_no_input", losses.iopo_no_input_objective, (4,), True,
                  "IOPO without input preference: mean of loss(h11-h12), loss(h22-h21)"),
        Objective("iopo_no_output", losses.iopo_no_output_objective, (4,), True,
                  "IOPO without output preference: mean of loss(h11-h21), loss(h22-h12)"),
        Objective("orpo", losses.orpo_objective, (2, 4), False,
                  "ORPO: NLL_w + lambda * -log sigmoid(log odds_w - log odds_l), length-normalised"),
        Objective("simpo", losses.simpo_objective, (2, 4), False,
                  "SimPO: -log sigmoid(beta*(avg_w - avg_l) - gamma)"),
    )
}


def get_objective(name: str) -> Objective:
    """The registered objective called ``name``; a wrong name fails listing the valid ones."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; valid objectives: {sorted(OBJECTIVES)}") from None


__all__ = [
    "COLUMN_NAMES",
    "LOSS_TYPES",
    "OBJECTIVES",
    "Objective",
    "ObjectiveConfig",
    "get_objective",
    "log1mexp",
    "orpo_log_odds",
    "per_token_mean",
    "preference_loss",
]
