"""CPU demo of GRPO: the SegPO demo (configs/segpo_demo.py) with output-level advantages only.

    python -m iopo_jax.train --config=configs/grpo_demo.py --workdir=/tmp/grpo_demo

Same tiny model, prompts, rule rewards and budget as the SegPO demo, for side-by-side comparison.
"""
from configs.segpo_demo import get_config as segpo_config


def get_config():
    c = segpo_config()
    c.objective.name = "grpo"
    return c
