"""GRPO baseline of configs/segpo_tpu_v4.py: same model, prompts, judge, budget; output-level advantages only.

    python -m iopo_jax.train --config=configs/grpo_tpu_v4.py --workdir=gs://BUCKET/grpo_qwen25_7b \
        --config.rl.prompts_files=/data/eifbench_style_train.json --config.rl.judge.base_url=https://...
"""
from configs.segpo_tpu_v4 import get_config as segpo_config


def get_config():
    c = segpo_config()
    c.objective.name = "grpo"
    return c
