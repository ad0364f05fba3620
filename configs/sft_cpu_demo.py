"""SFT on the bundled demo conversations with the tiny random Qwen2 (CPU, minutes).

    python -m iopo_jax.train --config=configs/sft_cpu_demo.py --workdir=runs/sft_demo
"""
import os

from configs.cpu_demo import _REPO, get_config as demo_config


def get_config():
    c = demo_config()
    c.data.kind = "sft"
    c.data.train_files = (os.path.join(_REPO, "data_pipeline", "demo_data", "sft_train.jsonl"),)
    c.objective.name = "sft"
    c.objective.reference = "online"
    c.data.batch_size = 8
    return c
