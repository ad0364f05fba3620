"""Online RL pieces (GRPO, SegPO): advantages, policy loss, rewards from verdicts, response segmentation."""
from iopo_jax.rl.advantages import (
    RewardWeights,
    SegPOAdvantages,
    clipped_policy_loss,
    group_normalize,
    grpo_advantages,
    grpo_token_advantages,
    k3_kl,
    rewards_from_verdicts,
    segpo_advantages,
)

__all__ = [
    "RewardWeights",
    "SegPOAdvantages",
    "clipped_policy_loss",
    "group_normalize",
    "grpo_advantages",
    "grpo_token_advantages",
    "k3_kl",
    "rewards_from_verdicts",
    "segpo_advantages",
]
