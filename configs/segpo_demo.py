"""CPU demo of SegPO: LoRA on a tiny random Qwen2, rule rewards, a few minutes on 2 cores.

    python -m iopo_jax.train --config=configs/segpo_demo.py --workdir=/tmp/segpo_demo

The tiny model (2 layers, d=64, the real 151,936-token Qwen2 vocabulary) is created on the fly at
``model.path``. A random model writes random tokens: it never writes a ``SUB_INSTRUCTION_k`` heading
nor meets constraints such as "use the word X twice", so on the bundled demo prompts nearly every
rollout scores the same (0 on the multi-part ones) and there is nothing to learn from. The demo uses a
small prompt set of its own instead (written by :func:`demo_prompts_file` to
``~/.cache/iopo_jax/rl_demo_prompts.jsonl``, ``demo_eval`` format, rule constraints of
:mod:`data_pipeline.verifiers`) whose constraints a random answer sometimes meets and a short, tidy one
always meets: at most 3 words, all lowercase, no commas, not a given keyword; answers are cut at 4
tokens. The policy is tempered (``rl.temperature=0.05``, for sampling and in the loss): the tiny
model's logits are ~N(0, 0.16^2) and its embeddings are frozen, so at temperature 1 no LoRA update
could make any token likely.

Learning shows as the rollout reward ``r_o`` (ILA + CLA + all-pass + format; the format reward is 1 for
prompts without sub-instructions) rising from about 2.6 to the maximum 4 within 20-25 iterations; the
run ends by printing the first-10 and last-10 iteration means (measured: 2.65 -> 3.97). These prompts
have no sub-instructions, so the segment advantages are zero and SegPO equals GRPO exactly
(configs/grpo_demo.py gives the same numbers); the segment path is exercised by tests/test_rl_loop.py.
"""
import json
import os

from configs.rl_base import get_config as rl_config

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "iopo_jax")

TOPICS = ["rivers", "bread", "winter", "trains", "music", "gardens", "the moon", "coffee", "bridges", "rain",
          "chess", "islands", "paper", "bees", "clocks", "salt"]
KEYWORDS = ["river", "bread", "snow", "train", "song", "garden", "moon", "coffee", "bridge", "rain", "chess",
            "island", "paper", "bee", "clock", "salt"]


def demo_records() -> list[dict]:
    """The demo's RL prompts (deterministic)."""
    from data_pipeline.verifiers import describe

    recs = []
    for i, (topic, kw) in enumerate(zip(TOPICS, KEYWORDS)):
        specs = [{"type": "word_count", "max": 3}, {"type": "lowercase"}, {"type": "no_commas"},
                 {"type": "exclude_keywords", "keywords": [kw]}]
        texts = [describe(s, "en") for s in specs]
        lines = "".join(f"{k + 1}. {t}\n" for k, t in enumerate(texts))
        prompt = f"Say something about {topic} in a few words.\n{lines}"
        recs.append({"id": f"rl-demo-{i + 1:02d}", "lang": "en", "category": "rl_demo", "prompt": prompt,
                     "constraints": specs, "constraints_text": texts, "constraints_num": len(specs),
                     "sub_instructions": []})
    return recs


def demo_prompts_file(path: str = os.path.join(CACHE, "rl_demo_prompts.jsonl")) -> str:
    """Write the demo prompts to ``path`` (rewritten only when its content differs) and return it."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in demo_records())
    if not os.path.isfile(path) or open(path, encoding="utf-8").read() != text:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    return path


def get_config():
    c = rl_config()
    c.objective.name = "segpo"
    c.model.path = os.path.join(CACHE, "tiny-qwen2-demo")
    c.model.make_tiny_if_missing = True
    c.model.dtype = "float32"  # CPUs have no fast bf16
    c.model.lora_rank = 8
    c.model.lora_alpha = 16.0
    c.rl.prompts_files = (demo_prompts_file(),)
    c.rl.reward = "rules"
    c.rl.prompts_per_step = 8
    c.rl.group_size = 8
    c.rl.max_prompt_tokens = 128
    c.rl.max_response_tokens = 4  # a few words: short answers make the credit of each token clear
    c.rl.temperature = 0.05
    c.rl.sampler_batch_size = 32
    c.rl.prompt_buckets = (128,)
    c.rl.length_step = 0  # one learner shape for the whole run (one compilation)
    c.rl.ppo_epochs = 1
    c.rl.mini_batches = 2
    c.rl.kl_coef = 0.001
    c.optimizer.lr = 5e-3
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_ratio = 0.0
    c.train.max_steps = 30
    c.train.logprob_chunk = 64
    c.checkpoint.every = 10
    c.mesh.fsdp = -1
    return c
