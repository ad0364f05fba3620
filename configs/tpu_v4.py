"""IOPO on Qwen2-7B-Instruct on a TPU v4-32 slice with the paper's hyper-parameters.

    # on every host of the slice (gcloud compute tpus tpu-vm ssh ... --worker=all --command=...):
    python -m iopo_jax.train --config=configs/tpu_v4.py --workdir=gs://BUCKET/iopo_qwen2_7b \
        --config.data.train_files=/data/trace_iopo_train.json

Settings of the IOPO paper: LR 5e-6, beta 0.1, 3 epochs, cutoff 6000, warmup 0.1, cosine,
LoRA on all linear layers (r=8, alpha=16, dropout 0), 10% held out and evaluated every 500 steps,
an effective batch of 256 groups (here 8 groups per micro-batch x 32 accumulation steps), bf16 compute.
Micro-batches of 8 groups (32 sequences, two per chip) because 16 groups need 35.4 GB of temporaries
per chip at cutoff 6000, more than a v4 chip's 32 GiB (python -m iopo_jax.tools.aot_compile
--config=configs/tpu_v4.py --topology=v4-32).
IOPO starts from the TRACE-SFT checkpoint in the paper: point model.path at your SFT-merged export.
The mesh spans all chips on the fsdp axis; base weights are stored in bf16 (frozen), LoRA in fp32.
"""
from configs.base import get_config as base_config


def get_config():
    c = base_config()
    c.model.path = "Qwen/Qwen2-7B-Instruct"  # or a local directory / your SFT export
    c.model.param_dtype = "bfloat16"  # frozen base weights; LoRA factors and optimizer state stay fp32
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.model.scan_layers = True  # one compiled layer body (lax.scan): compile time independent of depth
    c.model.attention_impl = "auto"  # splash on TPU, cudnn on GPU, xla (dense) elsewhere
    c.model.attention_block = 1024
    c.model.finetune = "lora"
    c.data.kind = "iopo"
    c.data.train_files = ("data/trace_iopo_train.json",)  # bring your own IOPO groups (the TRACE set is not public)
    c.data.val_fraction = 0.1
    c.data.cutoff_len = 6000
    c.data.bucket_step = 512
    c.data.batch_size = 8  # groups per micro-batch over the whole slice (32 sequences: two per chip)
    c.data.num_epochs = 3
    c.objective.name = "iopo"
    c.objective.beta = 0.1
    c.objective.reference = "precompute"
    c.optimizer.lr = 5e-6
    c.optimizer.warmup_ratio = 0.1
    c.optimizer.schedule = "cosine"
    c.optimizer.grad_accum = 32
    c.train.eval_every = 500
    c.train.logprob_chunk = 256
    c.checkpoint.every = 500
    c.export.merged = True
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
