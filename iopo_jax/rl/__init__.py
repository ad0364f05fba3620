"""Online RL pieces (GRPO, SegPO): advantages, policy loss, rewards from verdicts, response segmentation."""
from iopo_jax.rl.advantages import (
    RewardWeights,
    SegPOAdvantages,
    group_normalize,
    grpo_advantages,
    grpo_token_advantages,
    rewards_from_verdicts,
    segpo_advantages,
)
from iopo_jax.rl.policy_loss import clipped_policy_loss, k3_kl
from iopo_jax.rl.segments import (
    Segmentation,
    expected_ids_from_keys,
    find_headings,
    hf_token_bytes,
    offsets_from_token_bytes,
    segment_batch,
    segment_response,
)

__all__ = [
    "RewardWeights",
    "SegPOAdvantages",
    "Segmentation",
    "clipped_policy_loss",
    "group_normalize",
    "grpo_advantages",
    "grpo_token_advantages",
    "k3_kl",
    "rewards_from_verdicts",
    "expected_ids_from_keys",
    "find_headings",
    "hf_token_bytes",
    "offsets_from_token_bytes",
    "segment_batch",
    "segment_response",
    "segpo_advantages",
]
