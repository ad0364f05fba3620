"""The paper's SFT baseline on Qwen2-7B-Instruct: LoRA, LR 1e-4, 3 epochs, cutoff 6000, TPU v4-32.

    python -m iopo_jax.train --config=configs/sft_tpu_v4.py --workdir=gs://BUCKET/sft_qwen2_7b \
        --config.data.train_files=/data/trace_sft.jsonl

SFT data: conversations (messages or sharegpt). Conversations are packed into full rows.
Its merged export (export/merged) is the starting point of IOPO in the paper.
"""
from configs.tpu_v4 import get_config as tpu_config


def get_config():
    c = tpu_config()
    c.data.kind = "sft"
    c.data.train_files = ("data/trace_sft.jsonl",)
    c.data.pack = True
    c.objective.name = "sft"
    c.objective.reference = "online"  # SFT has no reference
    c.data.batch_size = 16  # packed rows per micro-batch (one per chip; 8 would not divide the 16 chips)
    c.optimizer.grad_accum = 16
    c.optimizer.lr = 1e-4
    return c
