"""EIFBench evaluation (multi-task, multi-constraint instances; docs/metrics.md).

    python -m evaluation.run --config=configs/eval_eifbench.py \
        --config.data.path=/path/to/sorted_party100.json[,/path/to/sorted_single450.json,...] \
        --config.generation.predictions=preds.jsonl  (or --config.model_dir=CKPT, or --config.generation.base_url=URL --config.generation.model=NAME) \
        --config.judge.base_url=https://api.openai.com/v1 --config.judge.model=gpt-4o --workdir=runs/eif_x

All fields are documented in evaluation/config_defaults.py.
"""
from evaluation.config_defaults import base_config


def get_config():
    c = base_config("eifbench")
    c.generation.temperature = 0.1  # Low-temperature answers, as for TRACE.
    c.generation.max_new_tokens = 4096  # Answers cover ~8.5 sub-instructions.
    c.generation.max_chars = 8192  # Longer inputs are answered in two halves (both kept).
    c.judge.temperature = 0.0
    c.judge.top_p = 0.8
    c.judge.concurrency = 32  # ~80 judge calls per instance.
    c.metrics.error_policy = "exclude_pair"
    return c
