"""iopo: LoRA on the generated iopo data (shared budget: experiments/configs/common.py)."""
from experiments.configs.common import train_config


def get_config(budget, model_dir, data_dir, lr, seed):
    return train_config(budget, model_dir, data_dir, lr, seed, kind="iopo", objective="iopo")
