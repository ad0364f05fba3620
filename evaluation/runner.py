"""The evaluation runner behind ``python -m evaluation.run`` (see that module for the CLI and outputs).

:func:`evaluate` takes a resolved config (``configs/eval_*.py`` + overrides) and runs generation,
judging, metrics and the report in ``config.workdir``, resuming whatever an earlier run there left.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Optional

from evaluation import driver
from iopo_jax import io_utils
from iopo_jax import chat_client

logger = logging.getLogger("evaluation.run")

DATA_HINT = {
    "trace": "https://raw.githubusercontent.com/Tongyi-CCAI/Complex-IF/main/TRACE/TRACE/202409_trace_evaluation.jsonl",
    "eifbench": "https://raw.githubusercontent.com/Tongyi-CCAI/Complex-IF/main/EIFBench/data/"
                "sorted_{single450,dialogue450,party100}.json",
}


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_template(path: str, what: str) -> Optional[str]:
    if not path:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} template file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return f.read()


def resolve_backend(config) -> str:
    g = config.generation
    backend = g.backend
    if backend == "auto":
        if g.predictions:
            backend = "predictions"
        elif g.base_url:
            backend = "api"
        elif config.model_dir:
            backend = "jax"
        else:
            raise ValueError("no way to get answers: pass --predictions=FILE, --gen_base_url=URL --gen_model=NAME, "
                             "or --model_dir=CHECKPOINT")
    if backend not in ("predictions", "api", "jax"):
        raise ValueError(f"config.generation.backend must be auto|predictions|api|jax, got {backend!r}")
    if backend == "predictions" and not g.predictions:
        raise ValueError("generation.backend=predictions needs --predictions=FILE")
    if backend == "api" and not (g.base_url and g.model):
        raise ValueError("generation.backend=api needs --gen_base_url=URL and --gen_model=NAME")
    if backend == "jax" and not config.model_dir:
        raise ValueError("generation.backend=jax needs --model_dir=CHECKPOINT")
    return backend


def make_generator(config, backend: str, workdir: str):
    from evaluation import generate  # pylint: disable=import-outside-toplevel
    g = config.generation
    if backend == "predictions":
        return generate.PredictionsFileGenerator(g.predictions)
    if backend == "api":
        return generate.ChatAPIGenerator(chat_client.ClientConfig(
            base_url=g.base_url, model=g.model, api_key_env=g.api_key_env, temperature=g.temperature,
            top_p=g.top_p, max_tokens=g.max_new_tokens, timeout_s=g.timeout_s, concurrency=g.concurrency,
            max_retries=g.max_retries, request_budget=g.request_budget,
            store_path=os.path.join(workdir, "generation_cache.jsonl"), name="generation"))
    return generate.JaxSamplerGenerator(config.model_dir, temperature=g.temperature, top_p=g.top_p,
                                        max_new_tokens=g.max_new_tokens, batch_size=g.batch_size, seed=config.seed,
                                        lora=config.lora)


def make_judge_client(config, workdir: str) -> chat_client.ChatClient:
    j = config.judge
    if not j.base_url:
        raise ValueError("no judge: pass --judge_base_url=URL (an OpenAI-compatible server) and --judge_model=NAME")
    return chat_client.ChatClient(chat_client.ClientConfig(
        base_url=j.base_url, model=j.model, api_key_env=j.api_key_env, temperature=j.temperature, top_p=j.top_p,
        max_tokens=j.max_tokens, timeout_s=j.timeout_s, concurrency=j.concurrency, max_retries=j.max_retries,
        backoff_base_s=j.backoff_base_s, backoff_max_s=j.backoff_max_s, request_budget=j.request_budget,
        price_prompt_per_1k=j.price_prompt_per_1k, price_completion_per_1k=j.price_completion_per_1k,
        store_path=os.path.join(workdir, "judge_cache.jsonl"), store_prompts=j.store_prompts, name="judge"))


def make_fingerprint(config, backend: str, data_files: list[str], templates: dict[str, Optional[str]],
                 extra: dict[str, Any]) -> dict[str, Any]:
    g, j = config.generation, config.judge
    fp: dict[str, Any] = {"benchmark": config.benchmark,
                          "data": {os.path.basename(p): _sha256_file(p) for p in data_files},
                          "generation_backend": backend}
    if backend == "predictions":
        fp["predictions_sha256"] = _sha256_file(g.predictions)
    elif backend == "api":
        fp["generation"] = {"model": g.model, "temperature": g.temperature, "top_p": g.top_p,
                            "max_new_tokens": g.max_new_tokens}
    else:
        fp["generation"] = {"model_dir": os.path.abspath(config.model_dir), "temperature": g.temperature,
                            "top_p": g.top_p, "max_new_tokens": g.max_new_tokens, "seed": config.seed}
    if config.benchmark not in ("demo", "ifeval"):
        fp["judge"] = {"model": j.model, "temperature": j.temperature, "top_p": j.top_p, "max_tokens": j.max_tokens,
                       "system_prompt": j.system_prompt, "format_str": j.format_str}
    fp["templates"] = {k: (_sha256_text(v) if v is not None else "default") for k, v in templates.items()}
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


def model_name(config, backend: str) -> str:
    if config.model_dir:
        return os.path.basename(os.path.normpath(config.model_dir))
    if backend == "api":
        return config.generation.model
    if backend == "predictions":
        return os.path.basename(config.generation.predictions)
    return "?"


def evaluate(config) -> dict[str, Any]:
    """Runs one evaluation as configured (see module docstring); returns the metrics."""
    workdir = config.workdir
    if not workdir:
        raise ValueError("pass --workdir=FOLDER (outputs go there; rerun with the same folder to resume)")
    os.makedirs(workdir, exist_ok=True)
    handler = _setup_log_file(workdir)
    try:
        if config.benchmark == "demo":
            from evaluation import demo  # pylint: disable=import-outside-toplevel
            return demo.evaluate_demo(config)
        if config.benchmark == "ifeval":
            from evaluation import ifeval  # pylint: disable=import-outside-toplevel
            return ifeval.evaluate_ifeval(config)
        if config.benchmark not in ("trace", "eifbench"):
            raise ValueError(f"config.benchmark must be trace, eifbench, ifeval or demo, got {config.benchmark!r}")
        return _evaluate_judged(config)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _data_files(config) -> list[str]:
    paths = [p.strip() for p in str(config.data.path).split(",") if p.strip()]
    if not paths:
        raise ValueError(f"pass --data_path=FILE for {config.benchmark} (download: {DATA_HINT[config.benchmark]})")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{config.benchmark} data file not found: {p} "
                                    f"(download: {DATA_HINT[config.benchmark]})")
    if config.benchmark == "trace" and len(paths) != 1:
        raise ValueError("TRACE takes one data file")
    return paths


def _evaluate_judged(config) -> dict[str, Any]:
    from evaluation import eifbench, report, trace  # pylint: disable=import-outside-toplevel
    workdir, bench, j, g = config.workdir, config.benchmark, config.judge, config.generation
    t0 = time.time()
    files = _data_files(config)
    backend = resolve_backend(config)
    judge_template = _read_template(j.template, "judge")
    templates: dict[str, Optional[str]] = {"judge": judge_template}
    if bench == "trace":
        items = trace.load_trace(files[0], limit=config.data.limit)
        format_str = j.format_str or (trace.OFFICIAL_FORMAT_STR if judge_template is not None
                                      else trace.DEFAULT_FORMAT_STR)
        spec = trace.TraceJudgeSpec(
            template=judge_template if judge_template is not None else trace.DEFAULT_JUDGE_TEMPLATE,
            template_name=j.template or "<default TRACE template>", format_str=format_str,
            system_prompt="" if j.system_prompt == "default" else j.system_prompt)
        gen_units = trace.gen_units(items)
        extra: dict[str, Any] = {}
    else:
        answer_template = _read_template(g.answer_template, "answer")
        templates["answer"] = answer_template
        instances = []
        for p in files:
            instances += eifbench.load_eifbench(p, limit=config.data.limit)
        spec = eifbench.EifSpec(
            answer_template=answer_template if answer_template is not None else eifbench.DEFAULT_ANSWER_TEMPLATE,
            answer_template_name=g.answer_template or "<default EIFBench answer template>",
            judge_template=judge_template if judge_template is not None else eifbench.DEFAULT_JUDGE_TEMPLATE,
            judge_template_name=j.template or "<default EIFBench judge template>",
            system_prompt=eifbench.SYSTEM_PROMPT if j.system_prompt == "default" else j.system_prompt,
            max_chars=g.max_chars, error_policy=config.metrics.error_policy)
        gen_units = eifbench.gen_units(spec, instances)
        extra = {"max_chars": g.max_chars}
    fingerprint = make_fingerprint(config, backend, files, templates, extra)
    check_workdir(workdir, config, fingerprint)
    model = model_name(config, backend)
    logger.info("%s: %d units, answers from %s, judge %s at %s, workdir %s", bench, len(gen_units), backend,
                j.model, j.base_url, workdir)

    client = make_judge_client(config, workdir)  # checks endpoint and key before any generation
    try:
        # 1. Answers.
        generator = make_generator(config, backend, workdir)
        try:
            preds, gen_stats = driver.run_generation(gen_units, generator,
                                                     os.path.join(workdir, "predictions.jsonl"),
                                                     progress=config.progress)
        finally:
            if hasattr(generator, "close"):
                generator.close()
        n_missing = len(gen_units) - len(preds)

        # 2. Judgments.
        if bench == "trace":
            units = trace.judge_units(spec, items, preds)
            parse_fn = trace.make_parse_fn()
        else:
            units = eifbench.judge_units(spec, instances, preds)
            parse_fn = eifbench.make_parse_fn()
        judgments = driver.run_judging(units, client, parse_fn, os.path.join(workdir, "judgments.jsonl"),
                                       max_parse_retries=j.max_parse_retries, concurrency=j.concurrency,
                                       progress=config.progress)
        usage = {"judge": client.usage()}
    finally:
        client.close()
    if hasattr(generator, "usage"):
        usage["generation"] = generator.usage()

    # 3. Metrics and report.
    if bench == "trace":
        metrics = trace.compute_metrics(items, judgments, n_missing_predictions=n_missing)
    else:
        metrics = eifbench.compute_metrics(instances, judgments, error_policy=config.metrics.error_policy,
                                           n_missing_predictions=n_missing)
    run_info = {"model": model, "benchmark": bench, "data": ", ".join(os.path.basename(p) for p in files),
                "limit": config.data.limit, "answers": backend if backend != "predictions" else
                f"predictions file {os.path.basename(g.predictions)}", "judge": f"{j.model}",
                "judge template": os.path.basename(j.template) if j.template else "default (ours)",
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "wall time (s)": round(time.time() - t0, 1)}
    metrics["usage"] = usage
    metrics["generation_stats"] = gen_stats
    metrics["run"] = run_info
    io_utils.write_json_atomic(os.path.join(workdir, "metrics.json"), metrics)
    report.write_report(workdir, metrics, run_info, charts=config.report.charts)
    print_summary(metrics)
    return metrics


def print_summary(m: dict[str, Any]) -> None:
    from evaluation.report import pct  # pylint: disable=import-outside-toplevel
    b = m["benchmark"]
    if b == "trace":
        line = (f"TRACE  IF-S {pct(m['IF-S'])}  IF-M {pct(m['IF-M'])}  IF {pct(m['IF'])}  "
                f"mean score {m['mean_score'] if m['mean_score'] is None else round(m['mean_score'], 2)}  "
                f"(scored {m['n_scored']}/{m['n_items']}, unparseable {m['n_unparseable']}, "
                f"judge errors {m['n_judge_errors']}, missing predictions {m['n_missing_predictions']})")
    elif b == "eifbench":
        line = (f"EIFBench  task {pct(m['task_level'])}  ILA {pct(m['ILA'])}  CLA {pct(m['CLA'])}  "
                f"(instances {m['n_scored_instances']}/{m['n_instances']}, pairs {m['n_pairs_scored']}/{m['n_pairs']}, "
                f"unparseable {m['n_unparseable']}, judge errors {m['n_judge_errors']})")
        for split, v in m["by_split"].items():
            line += f"\n  {split}: task {pct(v['task_level'])}  ILA {pct(v['ILA'])}  CLA {pct(v['CLA'])}  (n={v['n']})"
    elif b == "ifeval":
        line = (f"IFEval  prompt-level strict {pct(m['prompt_level_strict'])}  inst-level strict "
                f"{pct(m['inst_level_strict'])}  prompt-level loose {pct(m['prompt_level_loose'])}  inst-level loose "
                f"{pct(m['inst_level_loose'])}  (prompts {m['n_scored']}/{m['n_items']}, instructions "
                f"{m['n_instructions']}, missing predictions {m['n_missing_predictions']})")
    else:
        line = (f"Demo  IF {pct(m['IF'])}  constraint accuracy {pct(m['constraint_accuracy'])}  "
                f"(items {m['n_scored']}, constraints {m['n_constraints']})")
    u = m.get("usage", {}).get("judge")
    if u:
        line += (f"\njudge usage: {u['requests_sent']} requests, {u['retries']} retries, {u['cache_hits']} cache hits, "
                 f"{u['prompt_tokens']}+{u['completion_tokens']} tokens, cost {u['cost']:.4f}")
    print(line, flush=True)
