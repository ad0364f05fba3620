r"""Evaluate a model on TRACE, EIFBench, IFEval or the bundled demo set; resumable.

Examples::

    # TRACE, answers from a predictions file, GPT-4o as judge (key in $OPENAI_API_KEY):
    python -m evaluation.run --config=configs/eval_trace.py \
        --data_path=data/trace/202409_trace_evaluation.jsonl --predictions=preds.jsonl \
        --judge_base_url=https://api.openai.com/v1 --workdir=runs/trace_qwen2_iopo

    # EIFBench, answers from any OpenAI-compatible server (e.g. vLLM or `python -m iopo_jax.serve`):
    python -m evaluation.run --config=configs/eval_eifbench.py --data_path=data/eifbench/sorted_party100.json \
        --gen_base_url=http://127.0.0.1:8000/v1 --gen_model=qwen2-7b-iopo \
        --judge_base_url=https://api.openai.com/v1 --workdir=runs/eif_qwen2_iopo

    # Offline demo (no network, no key): the data pipeline's rule-based verifiers are the judge.
    python -m evaluation.run --config=configs/eval_demo.py --predictions=demo_preds.jsonl --workdir=runs/demo

    # IFEval (offline): lm-eval's instruction checkers, prompt/instruction-level strict and loose accuracy.
    python -m evaluation.run --config=configs/eval_ifeval.py --model_dir=/ckpt/model \
        --data_path=data/ifeval/input_data.jsonl --workdir=runs/ifeval_model

Each run writes into ``--workdir``: ``predictions.jsonl``, ``judgments.jsonl``, ``metrics.json``,
``report.md`` with PNG charts, ``config.json`` (the resolved config; no secrets), ``judge_cache.jsonl``
(every judge response, the resume cache) and ``eval.log``. Rerunning the same command after a crash,
Ctrl-C or SIGKILL continues where it stopped: nothing that succeeded is asked again, nothing is lost or
counted twice, and the final metrics equal those of an uninterrupted run. A workdir refuses to resume
with a different benchmark file, model/answers, judge or template (use a new ``--workdir``).

Every config field is documented in ``evaluation/config_defaults.py``; any can be overridden with
``--config.<field>=...``; the flags below are shortcuts for the common ones.
"""
from __future__ import annotations

import logging
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from iopo_jax import chat_client
from evaluation.generate import SamplerUnavailableError
from evaluation.ifeval import IFEvalUnavailableError
from evaluation.runner import evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Evaluation config file (configs/eval_trace.py, eval_eifbench.py, eval_ifeval.py, eval_demo.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; rerun with the same folder to resume.")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Model to generate with (JAX sampler); also the run's name.")
_LORA = flags.DEFINE_string("lora", None, "PEFT LoRA adapter directory applied on --model_dir by the JAX sampler.")
_DATA = flags.DEFINE_string("data_path", None, "Benchmark file(s) (comma-separated for EIFBench splits).")
_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate only the first N items (per split).")
_PREDS = flags.DEFINE_string("predictions", None, "JSONL of {id, response} answers to evaluate.")
_GEN_URL = flags.DEFINE_string("gen_base_url", None, "OpenAI-compatible server to generate answers with.")
_GEN_MODEL = flags.DEFINE_string("gen_model", None, "Model name on --gen_base_url.")
_GEN_KEY = flags.DEFINE_string("gen_api_key_env", None, "NAME of the env var with the generation server's key.")
_TEMP = flags.DEFINE_float("temperature", None, "Generation temperature.")
_TOP_P = flags.DEFINE_float("top_p", None, "Generation top_p.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Max new tokens per answer.")
_J_URL = flags.DEFINE_string("judge_base_url", None, "OpenAI-compatible judge server, e.g. https://api.openai.com/v1.")
_J_MODEL = flags.DEFINE_string("judge_model", None, "Judge model name.")
_J_KEY = flags.DEFINE_string("judge_api_key_env", None, "NAME of the env var holding the judge API key.")
_J_TEMPLATE = flags.DEFINE_string("judge_template", None, "Judge prompt template file (e.g. the official one).")
_CONC = flags.DEFINE_integer("concurrency", None, "Judge requests in flight.")
_CACHE = flags.DEFINE_string("compilation_cache_dir", "auto",
                             "Persistent XLA compilation cache for the JAX sampler: auto (~/.cache/iopo_jax/...), "
                             "a directory / gs:// path, or off.")
_BUDGET = flags.DEFINE_integer("budget", None, "Max judge requests in this run (retries included); 0 = no cap.")

_FLAG_TO_FIELD = [
    (_WORKDIR, "workdir"), (_MODEL_DIR, "model_dir"), (_LORA, "lora"), (_DATA, "data.path"), (_LIMIT, "data.limit"),
    (_PREDS, "generation.predictions"), (_GEN_URL, "generation.base_url"), (_GEN_MODEL, "generation.model"),
    (_GEN_KEY, "generation.api_key_env"), (_TEMP, "generation.temperature"), (_TOP_P, "generation.top_p"),
    (_MAX_NEW, "generation.max_new_tokens"), (_J_URL, "judge.base_url"), (_J_MODEL, "judge.model"),
    (_J_KEY, "judge.api_key_env"), (_J_TEMPLATE, "judge.template"), (_CONC, "judge.concurrency"),
    (_BUDGET, "judge.request_budget"),
]


def apply_flag_overrides(config) -> None:
    for flag, field in _FLAG_TO_FIELD:
        if flag.value is None:
            continue
        node = config
        parts = field.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = flag.value


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from iopo_jax.multihost import require_single_process

    require_single_process("python -m evaluation.run")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("pass --config=configs/eval_trace.py (or eval_eifbench.py, eval_ifeval.py, eval_demo.py)")
    apply_flag_overrides(config)
    from iopo_jax.compile_cache import enable_compilation_cache

    enable_compilation_cache(_CACHE.value)
    try:
        evaluate(config)
    except (ValueError, FileNotFoundError, chat_client.ChatError, SamplerUnavailableError,
            IFEvalUnavailableError) as e:
        logging.getLogger("evaluation.run").error("%s", e)
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
