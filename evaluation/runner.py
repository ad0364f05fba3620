"""The evaluation runner behind ``python -m evaluation.run`` (see that module for the CLI and outputs).

:func:`evaluate` takes a resolved config (``configs/eval_*.py`` + overrides) and runs any registered
:class:`~evaluation.benchmark.Benchmark` the same way: load the items, check (or write) the workdir's
fingerprint, generate the answers (resumable), judge them, then write ``metrics.json`` and ``report.md``
and print the summary, resuming whatever an earlier run in ``config.workdir`` left.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Optional

from data_pipeline.hashing import sha256_file, sha256_hex
from evaluation import benchmark as benchmark_lib
from evaluation import demo, driver, eifbench, generate, ifeval, report, trace  # noqa: F401  (registers the benchmarks)
from iopo_jax import chat_client
from iopo_jax import io_utils

logger = logging.getLogger("evaluation.run")

# config.judge fields that set up the benchmark's judging protocol, not the chat client.
JUDGE_PROTOCOL_FIELDS = ("template", "format_str", "system_prompt", "max_parse_retries")


def judge_client_config(config, workdir: str) -> chat_client.ClientConfig:
    """``config.judge`` as a :class:`~iopo_jax.chat_client.ClientConfig` (field for field, less the
    protocol fields), its response store ``judge_cache.jsonl`` in ``workdir``."""
    return chat_client.ClientConfig.from_mapping(
        config.judge, section="config.judge", ignore=JUDGE_PROTOCOL_FIELDS,
        store_path=os.path.join(workdir, "judge_cache.jsonl"), name="judge")


def make_judge_client(config, workdir: str) -> chat_client.ChatClient:
    if not config.judge.base_url:
        raise ValueError("no judge: pass --config.judge.base_url=URL (an OpenAI-compatible server) and "
                         "--config.judge.model=NAME")
    return chat_client.ChatClient(judge_client_config(config, workdir))


def make_fingerprint(config, backend: str, data_files: list[str], templates: dict[str, Optional[str]],
                     extra: dict[str, Any], llm_judge: bool) -> dict[str, Any]:
    """What identifies a run: a workdir resumes only a run with the same fingerprint."""
    g, j = config.generation, config.judge
    fp: dict[str, Any] = {"benchmark": config.benchmark,
                          "data": {os.path.basename(p): sha256_file(p) for p in data_files},
                          "generation_backend": backend}
    if backend == "predictions":
        fp["predictions_sha256"] = sha256_file(g.predictions)
    elif backend == "api":
        fp["generation"] = {"model": g.model, "temperature": g.temperature, "top_p": g.top_p,
                            "max_new_tokens": g.max_new_tokens}
    else:
        fp["generation"] = {"model_dir": os.path.abspath(config.model_dir), "temperature": g.temperature,
                            "top_p": g.top_p, "max_new_tokens": g.max_new_tokens, "seed": config.seed}
    if llm_judge:
        fp["judge"] = {"model": j.model, "temperature": j.temperature, "top_p": j.top_p, "max_tokens": j.max_tokens,
                       "system_prompt": j.system_prompt, "format_str": j.format_str}
    fp["templates"] = {k: (sha256_hex(v) if v is not None else "default") for k, v in templates.items()}
    fp.update(extra)
    return fp


def check_workdir(workdir: str, config, fingerprint: dict[str, Any]) -> None:
    """Writes config.json, or checks that an existing one was made by the same setup."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f).get("fingerprint", {})
        diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if diff:
            raise ValueError(f"{workdir} holds a run with a different setup (differs in: {', '.join(diff)}); "
                             "use a new --workdir, or delete that folder to start over")
    io_utils.write_json_atomic(path, {"config": config.to_dict(), "fingerprint": fingerprint})


def _setup_log_file(workdir: str) -> logging.Handler:
    h = logging.FileHandler(os.path.join(workdir, "eval.log"), encoding="utf-8")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    h.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(h)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return h


def evaluate(config) -> dict[str, Any]:
    """Runs one evaluation as configured (see module docstring); returns the metrics."""
    workdir = config.workdir
    if not workdir:
        raise ValueError("pass --workdir=FOLDER (outputs go there; rerun with the same folder to resume)")
    os.makedirs(workdir, exist_ok=True)
    handler = _setup_log_file(workdir)
    try:
        return run_benchmark(benchmark_lib.get(config.benchmark), config)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def run_benchmark(bench: benchmark_lib.Benchmark, config) -> dict[str, Any]:
    """Generation, judging, metrics and report of ``bench`` in ``config.workdir`` (see module docstring)."""
    workdir, t0 = config.workdir, time.time()
    loaded = bench.load(config)
    backend = bench.resolve_backend(config)
    check_workdir(workdir, config, make_fingerprint(config, backend, loaded.files, loaded.templates,
                                                    loaded.fingerprint_extra, bench.llm_judge))
    units = bench.gen_units(loaded)
    logger.info("%s: %d units, answers from %s, %s, workdir %s", bench.name, len(units), backend,
                f"judge {config.judge.model} at {config.judge.base_url}" if bench.llm_judge else "rule judge",
                workdir)
    client = make_judge_client(config, workdir) if bench.llm_judge else None  # checks endpoint and key first
    try:
        generator = bench.make_generator(config, backend, loaded)
        try:
            preds, gen_stats = driver.run_generation(units, generator, os.path.join(workdir, "predictions.jsonl"),
                                                     progress=config.progress)
        finally:
            if hasattr(generator, "close"):
                generator.close()
        judgments = bench.judge(config, loaded, preds, client)
        usage = {"judge": client.usage()} if client is not None else {}
    finally:
        if client is not None:
            client.close()
    if hasattr(generator, "usage"):
        usage["generation"] = generator.usage()
    metrics = bench.metrics(config, loaded, judgments, n_missing_predictions=len(units) - len(preds))
    run_info = {"model": bench.model_name(config, backend), "benchmark": bench.name,
                "data": ", ".join(os.path.basename(p) for p in loaded.files), "limit": config.data.limit,
                "answers": generate.answers_label(config, backend), **bench.run_info(config, backend),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "wall time (s)": round(time.time() - t0, 1)}
    metrics["usage"] = usage
    metrics["generation_stats"] = gen_stats
    metrics["run"] = run_info
    io_utils.write_json_atomic(os.path.join(workdir, "metrics.json"), metrics)
    report.write_report(workdir, metrics, run_info,
                        bench.report_section(metrics, workdir, charts=config.report.charts))
    print_summary(bench, metrics)
    return metrics


def print_summary(bench: benchmark_lib.Benchmark, m: dict[str, Any]) -> None:
    """The benchmark's summary line, then the judge usage (when an LLM judged)."""
    line = bench.summary(m)
    u = m.get("usage", {}).get("judge")
    if u:
        line += (f"\njudge usage: {u['requests_sent']} requests, {u['retries']} retries, {u['cache_hits']} cache hits, "
                 f"{u['prompt_tokens']}+{u['completion_tokens']} tokens, cost {u['cost']:.4f}")
    print(line, flush=True)


