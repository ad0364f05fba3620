"""DPO on the pairs of the bundled demo IOPO groups with the tiny random Qwen2 (CPU, minutes).

    python -m iopo_jax.train --config=configs/dpo_cpu_demo.py --workdir=runs/dpo_demo
"""
from configs.cpu_demo import get_config as demo_config


def get_config():
    c = demo_config()
    c.objective.name = "dpo"
    return c
