"""The paper's DPO baseline: DPO on the pairs of IOPO groups, (x1: y1 > y2) and (x2: y2 > y1).

    python -m iopo_jax.train --config=configs/dpo_tpu_v4.py --workdir=gs://BUCKET/dpo_qwen2_7b

Same data, schedule and LoRA as configs/tpu_v4.py (LR 5e-6, beta 0.1, 3 epochs, cutoff 6000).
To train on plain preference pairs instead, set data.kind=dpo and point data.train_files at them.
"""
from configs.tpu_v4 import get_config as tpu_config


def get_config():
    c = tpu_config()
    c.objective.name = "dpo"
    return c
