"""Shared ``ml_collections`` config for ``python -m evaluation.run`` (every field documented here).

The files ``configs/eval_trace.py``, ``configs/eval_eifbench.py`` and ``configs/eval_demo.py`` call
:func:`base_config` and change the few fields that differ. Any field can be overridden on the command
line (``--config.judge.concurrency=32``; ``--workdir`` sets ``workdir``). No field holds a secret: API
keys are read from the environment variables *named* by ``*.api_key_env``. The ``judge`` section holds
every field of :class:`iopo_jax.chat_client.ClientConfig` (but ``store_path`` and ``name``, set by the
runner) plus the protocol fields ``template``, ``format_str``, ``system_prompt`` and ``max_parse_retries``.
"""
from __future__ import annotations

import ml_collections


def base_config(benchmark: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Which evaluation to run: "trace", "eifbench", "ifeval" or "demo".
    c.benchmark = benchmark
    # Output folder (predictions.jsonl, judgments.jsonl, metrics.json, report.md, charts, caches, eval.log).
    # Given as --workdir (or --config.workdir). Rerunning with the same workdir resumes the run.
    c.workdir = ""
    # Model to generate with when generation.backend is "jax" (a checkpoint/export folder). Also used as
    # the model's name in the report.
    c.model_dir = ""
    # PEFT LoRA adapter directory applied on top of model_dir by the JAX sampler (e.g. a training run's
    # export/adapter).
    c.lora = ""
    # Show tqdm progress bars (on stderr).
    c.progress = True
    # Random seed for sampling.
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    # Benchmark data. trace: the 202409_trace_evaluation.jsonl file; eifbench: one or more split files
    # (sorted_party100.json, ...), comma-separated; ifeval: input_data.jsonl; demo: "" = the bundled demo
    # set.
    c.data.path = ""
    # Evaluate only the first N items (per split for EIFBench); 0 = all.
    c.data.limit = 0

    c.generation = ml_collections.ConfigDict()
    # "auto" (predictions file if given, else API if base_url is set, else JAX sampler), "predictions",
    # "api" (OpenAI-compatible server) or "jax" (our sampler, from model_dir).
    c.generation.backend = "auto"
    # JSONL file of {"id", "response"} answers to evaluate instead of generating.
    c.generation.predictions = ""
    # OpenAI-compatible server to generate with, e.g. http://127.0.0.1:8000/v1.
    c.generation.base_url = ""
    # Model name sent to that server.
    c.generation.model = ""
    # Name of the env var holding that server's API key; "" = no key.
    c.generation.api_key_env = ""
    # Sampling temperature. TRACE protocol: 0.1.
    c.generation.temperature = 0.1
    # Nucleus sampling mass.
    c.generation.top_p = 1.0
    # Max new tokens per answer; sent as max_tokens to an API server.
    c.generation.max_new_tokens = 2048
    # Prompts in the JAX sampler at once (jax backend, continuous batching): each answer is written to
    # predictions.jsonl (with its finish_reason and new_tokens) as soon as it finishes, and the next
    # prompt takes its place, so an interrupted run loses only the answers still being generated.
    c.generation.batch_size = 16
    # JAX sampler (continuous batching): rows move to longer KV-cache lanes as their answers grow, so a decode
    # step attends over about the cache a row has used, not its max_new_tokens (same answers; False: off).
    c.generation.lane_promotion = True
    # JAX sampler: the decoder layers as one lax.scan over stacked weights (true: one compiled layer body) or
    # unrolled (false: on CPU 1.2-1.3x faster decode steps, since XLA:CPU copies each layer's weight slice in a
    # loop, for 2-3.6x the compile time); auto: false on CPU, true on accelerators.
    c.generation.scan_layers = "auto"
    # Requests in flight (api backend).
    c.generation.concurrency = 8
    # Per-request timeout in seconds (api backend).
    c.generation.timeout_s = 600.0
    # Retries per request (api backend).
    c.generation.max_retries = 6
    # Max generation requests per run (api backend); 0 = no cap.
    c.generation.request_budget = 0
    # EIFBench only: answer prompt template file with the field {input_text}; "" = our own wording.
    c.generation.answer_template = ""
    # EIFBench only: split instances whose input text is longer than this many characters in two halves.
    c.generation.max_chars = 8192

    c.judge = ml_collections.ConfigDict()
    # OpenAI-compatible judge server, e.g. https://api.openai.com/v1.
    c.judge.base_url = ""
    # Judge model name. The protocols use GPT-4o.
    c.judge.model = "gpt-4o"
    # Name of the env var holding the judge's API key; "" = no key.
    c.judge.api_key_env = "OPENAI_API_KEY"
    # Judge sampling. TRACE protocol: temperature 0, top_p 0.8.
    c.judge.temperature = 0.0
    c.judge.top_p = 0.8
    # Completion token cap sent to the judge; 0 = do not send.
    c.judge.max_tokens = 0
    # Per-request timeout, seconds.
    c.judge.timeout_s = 120.0
    # Requests in flight.
    c.judge.concurrency = 16
    # Retries per request on timeouts, connection errors, 429 and 5xx.
    c.judge.max_retries = 6
    # Backoff: first delay and cap, seconds (exponential with jitter; 429 Retry-After wins).
    c.judge.backoff_base_s = 1.0
    c.judge.backoff_max_s = 60.0
    # Cap on the wait a server asks for in a 429's Retry-After, seconds.
    c.judge.max_retry_after_s = 300.0
    # Max judge HTTP requests in this run, retries included; 0 = no cap. Units left unjudged
    # when it runs out are counted as judge errors; rerun to continue.
    c.judge.request_budget = 0
    # Prices per 1,000 prompt / completion tokens for the cost report (defaults: GPT-4o list price, USD).
    c.judge.price_prompt_per_1k = 0.0025
    c.judge.price_completion_per_1k = 0.01
    # Judge prompt template file; "" = our own wording. TRACE fields: {format_str},
    # {description}, {constraints}, {ans}; EIFBench fields: {input}, {output}, {sub_instruction}, {question}.
    c.judge.template = ""
    # TRACE only: the per-constraint JSON example given to the template as {format_str}; "" = automatic
    # (the official example with a template file, our own example with the default template).
    c.judge.format_str = ""
    # System message before the judge prompt; "default" = the benchmark's default (TRACE: none;
    # EIFBench: "You are a helpful assistant."), "" = none.
    c.judge.system_prompt = "default"
    # Ask again this many times when a judge reply cannot be parsed; then it is counted as unparseable.
    c.judge.max_parse_retries = 2
    # Keep the judge request messages in judge_cache.jsonl too (audit; large for EIFBench).
    c.judge.store_prompts = False
    # fsync judge_cache.jsonl at most this often, seconds (every line is flushed at once).
    c.judge.fsync_interval_s = 1.0

    c.metrics = ml_collections.ConfigDict()
    # EIFBench: "exclude_pair" (failed judgments are left out of their instance, like the public metric
    # script) or "exclude_instance" (an instance with any failed judgment is left out whole).
    c.metrics.error_policy = "exclude_pair"

    c.report = ml_collections.ConfigDict()
    # Draw the PNG charts of report.md.
    c.report.charts = True
    return c
