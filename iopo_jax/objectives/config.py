"""Hyper-parameters shared by the offline objectives (SFT, DPO, IOPO and variants, ORPO, SimPO): the
``objective`` section of the training configs, field for field."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from data_pipeline.schema import from_mapping

LOSS_TYPES = ("sigmoid", "robust", "exo_pair", "hinge", "ipo")
SFT_REDUCTIONS = ("token", "sequence")
REFERENCES = ("online", "precompute")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Frozen (hashable, so usable as a static jit argument) objective hyper-parameters: the ``objective``
    section of ``configs/base.py``, with the same fields and defaults.

    Fields:
      name: the objective (a key of ``iopo_jax.objectives.OBJECTIVES``; RL runs: ``segpo`` | ``grpo``).
      reference: ``online`` (reference forward every step) | ``precompute`` (once per dataset, cached).
      beta: temperature of the implicit reward ``beta * (log pi - log pi_ref)`` (DPO/IOPO family), the
        scale of SimPO's margin, and the reward scale logged by ORPO/SimPO. Paper value 0.1.
      loss_type: how the preference logit ``l`` becomes a loss, for dpo/iopo/iopo_star/iopo_no_*:
        ``sigmoid`` | ``robust`` | ``exo_pair`` | ``hinge`` | ``ipo`` (docs/objectives.md). ``ipo`` uses
        length-averaged log-probs (policy and reference) instead of sums.
      label_smoothing: ``eps`` of sigmoid/robust/exo_pair (ignored by hinge/ipo). ``exo_pair`` uses 1e-3
        when it is 0. Must be in [0, 0.5).
      pref_ftx: weight of the SFT term added to preference losses: ``pref_ftx * sum over chosen
        sequences of -mean_token_logp`` ((x1,y1) and (x2,y2) for IOPO groups; the chosen answer of a pair).
      simpo_gamma: SimPO target margin ``gamma``: ``-log sigmoid(beta*(avg_w - avg_l) - gamma)``.
      orpo_lambda: ORPO weight ``lambda`` of the odds-ratio term: ``NLL_w + lambda * -log sigmoid(log odds_w - log odds_l)``.
      sft_reduction: ``token`` (sum of NLL over all response tokens / number of tokens) or
        ``sequence`` (mean over sequences of the per-token mean NLL).
    """

    name: str = "iopo"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    pref_ftx: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    sft_reduction: str = "token"
    reference: str = "online"

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"ObjectiveConfig.loss_type={self.loss_type!r} is not one of {LOSS_TYPES}")
        if not self.beta > 0:
            raise ValueError(f"ObjectiveConfig.beta={self.beta!r} must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"ObjectiveConfig.label_smoothing={self.label_smoothing!r} must be in [0, 0.5)")
        if self.pref_ftx < 0:
            raise ValueError(f"ObjectiveConfig.pref_ftx={self.pref_ftx!r} must be >= 0")
        if self.orpo_lambda < 0:
            raise ValueError(f"ObjectiveConfig.orpo_lambda={self.orpo_lambda!r} must be >= 0")
        if self.sft_reduction not in SFT_REDUCTIONS:
            raise ValueError(f"ObjectiveConfig.sft_reduction={self.sft_reduction!r} is not one of {SFT_REDUCTIONS}")
        if self.reference not in REFERENCES:
            raise ValueError(f"ObjectiveConfig.reference={self.reference!r} is not one of {REFERENCES}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | "ObjectiveConfig" | None) -> "ObjectiveConfig":
        """Build from a dict / the ``objective`` section of a config; unknown keys fail with their name."""
        return from_mapping(cls, values, "objective")
