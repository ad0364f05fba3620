"""TRACE evaluation (1,042 judged instructions; docs/metrics.md).

    python -m evaluation.run --config=configs/eval_trace.py \
        --config.data.path=/path/to/202409_trace_evaluation.jsonl \
        --config.generation.predictions=preds.jsonl  (or --config.model_dir=CKPT, or --config.generation.base_url=URL --config.generation.model=NAME) \
        --config.judge.base_url=https://api.openai.com/v1 --config.judge.model=gpt-4o --workdir=runs/trace_x

All fields are documented in evaluation/config_defaults.py.
"""
from evaluation.config_defaults import base_config


def get_config():
    c = base_config("trace")
    c.generation.temperature = 0.1  # TRACE protocol: answers sampled at temperature 0.1.
    c.judge.temperature = 0.0  # TRACE protocol: judge at temperature 0, top_p 0.8.
    c.judge.top_p = 0.8
    return c
