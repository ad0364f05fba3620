r"""Evaluate a model on TRACE, EIFBench, IFEval or the bundled demo set; resumable.

Examples::

    # TRACE, answers from a predictions file, GPT-4o as judge (key in $OPENAI_API_KEY):
    python -m evaluation.run --config=configs/eval_trace.py --workdir=runs/trace_qwen2_iopo \
        --config.data.path=data/trace/202409_trace_evaluation.jsonl --config.generation.predictions=preds.jsonl \
        --config.judge.base_url=https://api.openai.com/v1

    # EIFBench, answers from any OpenAI-compatible server (e.g. vLLM or `python -m iopo_jax.sampling.serve`):
    python -m evaluation.run --config=configs/eval_eifbench.py --workdir=runs/eif_qwen2_iopo \
        --config.data.path=data/eifbench/sorted_party100.json \
        --config.generation.base_url=http://127.0.0.1:8000/v1 --config.generation.model=qwen2-7b-iopo \
        --config.judge.base_url=https://api.openai.com/v1

    # Offline demo (no network, no key): the data pipeline's rule-based verifiers are the judge.
    python -m evaluation.run --config=configs/eval_demo.py --workdir=runs/demo \
        --config.generation.predictions=demo_preds.jsonl

    # IFEval (offline): lm-eval's instruction checkers, prompt/instruction-level strict and loose accuracy.
    python -m evaluation.run --config=configs/eval_ifeval.py --workdir=runs/ifeval_model \
        --config.model_dir=/ckpt/model --config.data.path=data/ifeval/input_data.jsonl

Each run writes into ``--workdir``: ``predictions.jsonl``, ``judgments.jsonl``, ``metrics.json``,
``report.md`` with PNG charts, ``config.json`` (the resolved config; no secrets), ``judge_cache.jsonl``
(every judge response, the resume cache) and ``eval.log``. Rerunning the same command after a crash,
Ctrl-C or SIGKILL continues where it stopped: nothing that succeeded is asked again, nothing is lost or
counted twice, and the final metrics equal those of an uninterrupted run. A workdir refuses to resume
with a different benchmark file, model/answers, judge or template (use a new ``--workdir``).

One CLI style, as ``python -m iopo_jax.train``: ``--config=configs/eval_*.py`` plus
``--config.<field>=value`` overrides of any field (every field is documented in
``evaluation/config_defaults.py``; a run's resolved config is its ``config.json``). The only other flags
are ``--workdir`` (as in every command of the project; it sets ``config.workdir``) and
``--compilation_cache_dir``. The common fields: ``config.model_dir`` / ``config.lora`` (JAX sampler),
``config.data.path`` / ``config.data.limit``, ``config.generation.predictions``,
``config.generation.base_url`` / ``config.generation.model`` (API answers),
``config.generation.temperature`` / ``top_p`` / ``max_new_tokens``, ``config.judge.base_url`` /
``config.judge.model`` / ``config.judge.api_key_env`` / ``config.judge.template`` /
``config.judge.concurrency`` / ``config.judge.request_budget``.
"""
from __future__ import annotations

import logging
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from data_pipeline import cli
from evaluation.generate import SamplerUnavailableError
from evaluation.ifeval import IFEvalUnavailableError
from evaluation.runner import evaluate
from iopo_jax import chat_client
from iopo_jax.compile_cache import enable_compilation_cache
from iopo_jax.multihost import require_single_process

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Evaluation config file (configs/eval_trace.py, eval_eifbench.py, eval_ifeval.py, eval_demo.py); "
    "override any field with --config.<field>=value (fields: evaluation/config_defaults.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (sets config.workdir); rerun with the same folder "
                               "to resume.")
_CACHE = flags.DEFINE_string("compilation_cache_dir", "auto",
                             "Persistent XLA compilation cache for the JAX sampler: auto (~/.cache/iopo_jax/...), "
                             "a directory / gs:// path, or off.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    require_single_process("python -m evaluation.run")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("pass --config=configs/eval_trace.py (or eval_eifbench.py, eval_ifeval.py, eval_demo.py)")
    if _WORKDIR.value is not None:
        config.workdir = _WORKDIR.value
    enable_compilation_cache(_CACHE.value)
    try:
        evaluate(config)
    except (ValueError, FileNotFoundError, chat_client.ChatError, SamplerUnavailableError,
            IFEvalUnavailableError) as e:
        logging.getLogger("evaluation.run").error("%s", e)
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli.run_app(main)
