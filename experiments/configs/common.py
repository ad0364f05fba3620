"""What every method shares: the LoRA, the data, the step budget, the learning-rate grid, the seeds.

A *budget* is a plain dict (``BUDGETS[name]``, each field overridable from ``python -m experiments.run``):

- data sizes passed to :func:`data_pipeline.complex_if.generate` (``groups``, ``dev``, ``eval_single``,
  ``eval_multi``, ``sectioned_train``, ``sectioned_eval``);
- ``steps`` optimizer steps for every method (GRPO / SegPO: ``rl_steps`` iterations, 0 = ``steps``; on CPU an
  iteration of 8 rollouts costs about as much as 5-10 preference steps), ``batch_groups`` IOPO groups per step (SFT
  and DPO see the same groups: 2 records / pairs per group, so their batch is twice as many rows);
- ``lrs`` the learning-rate grid every method searches (seed ``seeds[0]``, scored on the dev prompts),
  ``seeds`` the seeds the chosen learning rate is trained with;
- ``cutoff`` and ``bucket_step`` (training sequence lengths; quick: one shape, one compilation),
  ``eval_max_new_tokens``, and the RL rollout sizes (``rl_prompt_tokens``: the cpu budget's 384 holds the
  longest sectioned prompt, 364 tokens with SmolLM2's chat template);
- ``rl_warm_start_steps``: 0 = GRPO / SegPO start from the model itself; N > 0 = they start from a *warm start*,
  the model after N SFT steps on the sectioned training prompts' reference answers (LoRA merged in), which is
  then also their reference model (:func:`warm_start_config`; the runner reports it as ``sft_sectioned``).

``quick``: the tiny random model, a pipeline check (about 11 CPU-minutes for all methods). ``cpu``:
SmolLM2-135M-Instruct on a 2-core CPU, several hours
(estimate in docs/experiments.md). ``gpu``: SmolLM2 on one GPU, one epoch of the 3,000 groups.
"""
import copy

import ml_collections

from configs.base import get_config as base_config

BUDGETS = {
    "quick": dict(model="tiny", groups=24, dev=6, eval_single=4, eval_multi=6, sectioned_train=8,
                  sectioned_eval=6, steps=3, batch_groups=2, cutoff=384, lrs=(1e-3,), seeds=(0,),
                  eval_max_new_tokens=8, eval_batch_size=16, rl_steps=0, rl_prompts=2, rl_group=4, rl_response_tokens=8,
                  rl_prompt_tokens=1024, lora_rank=8, seed=2026, dtype="float32", bucket_step=384,
                  rl_warm_start_steps=0),
    "cpu": dict(model="smollm2-135m-instruct", groups=3000, dev=60, eval_single=50, eval_multi=100,
                sectioned_train=400, sectioned_eval=60, steps=100, batch_groups=2, cutoff=384, lrs=(2e-4, 5e-4),
                seeds=(0, 1), eval_max_new_tokens=128, eval_batch_size=32, rl_steps=0, rl_prompts=2,
                rl_group=4, rl_response_tokens=256, rl_prompt_tokens=384, lora_rank=8, seed=2026, dtype="float32", bucket_step=64,
                rl_warm_start_steps=0),
    "gpu": dict(model="smollm2-135m-instruct", groups=3000, dev=60, eval_single=100, eval_multi=200,
                sectioned_train=400, sectioned_eval=90, steps=375, batch_groups=8, cutoff=512,
                lrs=(1e-4, 2e-4, 5e-4), seeds=(0, 1, 2), eval_max_new_tokens=256, eval_batch_size=64,
                rl_steps=0, rl_prompts=8, rl_group=8, rl_response_tokens=384, rl_prompt_tokens=1024, lora_rank=8, seed=2026,
                dtype="bfloat16", bucket_step=128, rl_warm_start_steps=0),
}
# SmolLM2's default system prompt (its chat template adds it at evaluation), so training sequences match.
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def budget(name: str, **overrides) -> dict:
    if name not in BUDGETS:
        raise ValueError(f"unknown budget {name!r}; known: {', '.join(BUDGETS)}")
    b = copy.deepcopy(BUDGETS[name])
    for k, v in overrides.items():
        if k not in b:
            raise ValueError(f"budget field {k!r} does not exist; fields: {', '.join(b)}")
        b[k] = v
    return b


def _shared(b: dict, model_dir: str, lr: float, seed: int, c: ml_collections.ConfigDict):
    c.model.path = model_dir
    c.model.dtype = b["dtype"]
    c.model.lora_rank = b["lora_rank"]
    c.model.lora_alpha = 2.0 * b["lora_rank"]
    c.optimizer.lr = lr
    c.optimizer.grad_accum = 1  # one micro-batch of batch_groups per step, as the budgets say (base.py has 8)
    c.train.max_steps = b["steps"]
    c.train.seed = seed
    c.train.eval_every = 0
    c.train.logprob_chunk = 64
    c.train.tensorboard = False
    c.checkpoint.every = max(1, b["steps"])
    c.mesh.fsdp = -1
    # every method (GRPO / SegPO rollouts too) renders prompts with the chat template and system prompt that
    # evaluation uses (the model's own template), so what is trained is what is scored
    c.data.template = "qwen" if b["model"] == "tiny" else "chatml"
    c.data.system = "" if b["model"] == "tiny" else SMOLLM2_SYSTEM
    return c


def _supervised(b: dict, model_dir: str, train_file: str, lr: float, seed: int, kind: str, objective: str,
                cutoff: int):
    """A Trainer config on one data file (``kind`` sft | dpo | iopo), one epoch at most."""
    c = _shared(b, model_dir, lr, seed, base_config())
    c.data.kind = kind
    c.data.train_files = (train_file,)
    c.data.val_fraction = 0.0
    c.data.val_count = 0
    c.data.cutoff_len = int(cutoff)
    c.data.bucket_step = b["bucket_step"]
    c.data.batch_size = b["batch_groups"] * (2 if kind in ("sft", "dpo") else 1)
    c.data.num_epochs = 1
    c.data.seed = seed
    c.objective.name = objective
    c.optimizer.warmup_ratio = 0.1
    return c


def train_config(b: dict, model_dir: str, data_dir: str, lr: float, seed: int, kind: str, objective: str):
    """SFT / DPO / IOPO-family config on the generated data (``kind`` sft | dpo | iopo)."""
    import os  # pylint: disable=import-outside-toplevel

    files = {"sft": "sft_train.jsonl", "dpo": "dpo_train.json", "iopo": "iopo_train.json"}
    c = _supervised(b, model_dir, os.path.join(data_dir, files[kind]), lr, seed, kind, objective, b["cutoff"])
    c.objective.beta = 0.1
    c.objective.reference = "online"
    return c


def warm_start_config(b: dict, model_dir: str, sft_file: str, lr: float, seed: int):
    """SFT on the sectioned training prompts' reference answers (``sft_file``, see ``experiments.run``) for
    ``rl_warm_start_steps`` steps, exported with the LoRA merged in: the model GRPO / SegPO then start from.
    Sequences hold a whole rollout (``rl_prompt_tokens + rl_response_tokens``), so the reference answers are
    learned as RL will sample them."""
    c = _supervised(b, model_dir, sft_file, lr, seed, "sft", "sft",
                    int(b["rl_prompt_tokens"]) + int(b["rl_response_tokens"]))
    c.train.max_steps = int(b["rl_warm_start_steps"])
    c.checkpoint.every = max(1, c.train.max_steps)
    c.export.merged = True
    c.export.dtype = b["dtype"]  # the RL runs load it as their model
    return c


def rl_config(b: dict, model_dir: str, data_dir: str, lr: float, seed: int, objective: str):
    """GRPO / SegPO on the sectioned training prompts, rule rewards (ILA + CLA + all-pass + format)."""
    import os  # pylint: disable=import-outside-toplevel

    from configs.rl_base import get_config as rl_base  # pylint: disable=import-outside-toplevel

    c = _shared(b, model_dir, lr, seed, rl_base())
    c.objective.name = objective
    r = c.rl
    r.prompts_files = (os.path.join(data_dir, "sectioned_train.jsonl"),)
    r.reward = "rules"
    r.prompts_per_step = b["rl_prompts"]
    r.group_size = b["rl_group"]
    r.max_prompt_tokens = b["rl_prompt_tokens"]
    r.max_response_tokens = b["rl_response_tokens"]
    r.sampler_batch_size = b["rl_prompts"] * b["rl_group"]
    r.prompt_buckets = (int(b["rl_prompt_tokens"]),)
    r.length_step = 0
    r.ppo_epochs = 1
    # the learner's rows are prompt + response at the full length (one shape): without activation checkpointing
    # the backward pass of 8 such rows keeps every layer's attention scores (SmolLM2, 1,152 tokens: ~50 GB)
    c.model.remat = "full"
    r.mini_batches = 1
    r.kl_coef = 0.001
    c.train.max_steps = b["rl_steps"] or b["steps"]
    c.checkpoint.every = max(1, c.train.max_steps)
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_ratio = 0.0
    return c
