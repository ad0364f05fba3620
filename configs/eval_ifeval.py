"""IFEval (541 prompts with verifiable instructions): lm-eval's instruction checkers are the judge (offline).

    python -m data_pipeline.download ifeval --out data/
    python -m evaluation.run --config=configs/eval_ifeval.py --config.model_dir=CKPT \
        --config.data.path=data/ifeval/input_data.jsonl --workdir=runs/ifeval
    python -m evaluation.run --config=configs/eval_ifeval.py --config.generation.predictions=preds.jsonl \
        --config.data.path=data/ifeval/input_data.jsonl --workdir=runs/ifeval   # ids: the IFEval "key"

Needs the ``ifeval`` extra (pip install -e ".[ifeval]"). All fields are documented in
evaluation/config_defaults.py; generation follows lm-eval's ifeval task (greedy, 1280 new tokens).
"""
from evaluation.config_defaults import base_config


def get_config():
    c = base_config("ifeval")
    c.data.path = ""  # required: the IFEval input_data.jsonl (python -m data_pipeline.download ifeval --out data/)
    c.generation.temperature = 0.0  # greedy, as lm-eval's ifeval task
    c.generation.max_new_tokens = 1280  # lm-eval's max_gen_toks for ifeval
    c.judge.base_url = ""  # no LLM judge: lm-eval's rule-based instruction checkers
    c.judge.api_key_env = ""
    return c
