"""IOPO on Qwen2-7B-Instruct on one 80 GB GPU (H100/A100), LoRA, bf16, cutoff 6000.

    python -m iopo_jax.train --config=configs/gpu_h100.py --workdir=runs/iopo_h100 \
        --config.model.path=/ckpt/Qwen2-7B-Instruct --config.data.train_files=/data/trace_iopo_train.json

One group (4 sequences) per micro-batch and 8 accumulation steps, as one GPU of the paper's setup
(the paper used 32 GPUs: multiply grad_accum to match its effective batch). attention_impl=auto
picks the fused cuDNN attention kernel on a GPU.
"""
from configs.tpu_v4 import get_config as tpu_config


def get_config():
    c = tpu_config()
    c.model.attention_impl = "auto"  # splash on TPU, cudnn on GPU, xla (dense) elsewhere
    c.data.batch_size = 1
    c.data.bucket_step = 256
    c.optimizer.grad_accum = 8
    c.mesh.fsdp = 1
    return c
