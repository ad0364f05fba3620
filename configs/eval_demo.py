"""Offline evaluation on the bundled demo set: rule verifiers are the judge (no network, no API key).

    python -m evaluation.run --config=configs/eval_demo.py --config.model_dir=CKPT --workdir=runs/demo
    python -m evaluation.run --config=configs/eval_demo.py --config.generation.predictions=preds.jsonl --workdir=runs/demo
    # pipeline check with the bundled reference answers (every metric is 100%):
    python -m evaluation.run --config=configs/eval_demo.py --config.generation.backend=reference --workdir=runs/demo_ref

All fields are documented in evaluation/config_defaults.py; for this config `generation.backend` may
also be "reference", and `data.path` "" means data_pipeline/demo_data/eval_prompts.jsonl.
"""
from evaluation.config_defaults import base_config


def get_config():
    c = base_config("demo")
    c.data.path = ""  # "" = the bundled data_pipeline/demo_data/eval_prompts.jsonl
    c.generation.temperature = 0.0  # greedy answers: short, deterministic demo prompts.
    c.generation.max_new_tokens = 256  # demo answers are a few short sentences.
    c.judge.base_url = ""  # no LLM judge: data_pipeline.verifiers checks every constraint.
    c.judge.api_key_env = ""
    return c
