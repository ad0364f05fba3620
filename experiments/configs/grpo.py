"""grpo: online RL on the sectioned prompts with rule rewards (shared budget: experiments/configs/common.py)."""
from experiments.configs.common import rl_config


def get_config(budget, model_dir, data_dir, lr, seed):
    return rl_config(budget, model_dir, data_dir, lr, seed, objective="grpo")
