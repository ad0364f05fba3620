"""Offline evaluation on the bundled demo set: the data pipeline's rule verifiers are the judge.

No network and no API key: the prompts are ``data_pipeline/demo_data/eval_prompts.jsonl`` (English and
Chinese; categories ``single``, ``multi`` and ``segpo``, the last with sub-instructions answered in
``SUB_INSTRUCTION_k:`` sections), each constraint a machine-checkable spec verified by
:func:`data_pipeline.verifiers.verify_record`. Answers come from the usual backends (predictions
file, OpenAI-compatible server, our JAX sampler) or, to check the pipeline itself, from the
``reference`` answers bundled with the prompts (``--config.generation.backend=reference``: every
metric must then be 100%).

Metrics (fractions; reports print percentages): ``IF`` (share of prompts whose constraints all pass,
the section format included for ``segpo``), ``IF-S`` / ``IF-M`` (1 / 2+ constraints),
``constraint_accuracy`` (share of all constraint checks that pass), ``mean_cla`` (per-prompt constraint
accuracy, averaged), breakdowns by number of constraints, verifier type (``by_dimension``), category and
language, and for ``segpo`` prompts ILA, CLA and the share with a correct section format.
"""
from __future__ import annotations

import collections
import logging
import os
import time
from typing import Any, Optional, Sequence

from evaluation import driver
from iopo_jax import io_utils

logger = logging.getLogger(__name__)


def default_demo_path() -> str:
    import data_pipeline  # pylint: disable=import-outside-toplevel
    return os.path.join(data_pipeline.DEMO_DATA_DIR, "eval_prompts.jsonl")


def load_demo(path: str, limit: int = 0) -> list[dict[str, Any]]:
    return driver.load_with_ids("demo_eval", path, "id", limit)


gen_units = driver.user_prompt_units


class ReferenceGenerator:
    """The reference answers bundled with the demo prompts (a pipeline check: all metrics are 100%)."""

    whole_units = True

    def __init__(self, records: Sequence[dict[str, Any]]):
        self.name = "reference answers"
        self._ref = {r["id"]: r.get("reference") for r in records}

    def generate(self, requests: Sequence[driver.GenRequest]):
        for req in requests:
            text = self._ref.get(req.id.rpartition("#")[0])
            if isinstance(text, str):
                yield driver.GenResult(req.id, text)


def judge_record(record: dict[str, Any], response: str) -> dict[str, Any]:
    """One judgment line: the verifier results for a prompt and its answer."""
    from data_pipeline import verifiers  # pylint: disable=import-outside-toplevel
    res = verifiers.verify_record(record, response)
    types = [s["type"] for s in record.get("constraints") or []]
    for s in record.get("sub_instructions") or []:
        types += [c["type"] for c in s.get("constraints") or []]
    checks = list(res["constraints"]) + [v for sub in res["sub_instructions"] for v in sub]
    return {"id": record["id"], "status": "ok", "all_pass": bool(res["all_pass"]), "checks": checks,
            "types": types, "format_ok": res["format_ok"], "ila": res["ila"], "cla": res["cla"],
            "sub_instructions": res["sub_instructions"]}


def _rate(xs: Sequence[bool]) -> Optional[float]:
    return (sum(xs) / len(xs)) if xs else None


def compute_metrics(records: Sequence[dict[str, Any]], judgments: dict[str, dict[str, Any]],
                    n_missing_predictions: int = 0) -> dict[str, Any]:
    rows = [(r, judgments[r["id"]]) for r in records if r["id"] in judgments]
    all_checks = [c for _, j in rows for c in j["checks"]]
    by_count: dict[int, list] = collections.defaultdict(list)
    by_cat: dict[str, list] = collections.defaultdict(list)
    by_lang: dict[str, list] = collections.defaultdict(list)
    by_type: dict[str, list[bool]] = collections.defaultdict(list)
    for r, j in rows:
        by_count[int(r["constraints_num"])].append(j)
        by_cat[r.get("category", "-")].append(j)
        by_lang[r.get("lang", "-")].append(j)
        for t, c in zip(j["types"], j["checks"]):
            by_type[t].append(c)

    def group(js: list[dict[str, Any]]) -> dict[str, Any]:
        return {"n": len(js), "IF": _rate([j["all_pass"] for j in js]),
                "constraint_accuracy": _rate([c for j in js for c in j["checks"]])}

    seg = [j for r, j in rows if r.get("sub_instructions")]
    return {
        "benchmark": "demo",
        "n_items": len(records),
        "n_scored": len(rows),
        "n_missing_predictions": n_missing_predictions,
        "n_constraints": len(all_checks),
        "IF": _rate([j["all_pass"] for _, j in rows]),
        "IF-S": _rate([j["all_pass"] for r, j in rows if int(r["constraints_num"]) == 1]),
        "IF-M": _rate([j["all_pass"] for r, j in rows if int(r["constraints_num"]) >= 2]),
        "constraint_accuracy": _rate(all_checks),
        "mean_cla": (sum(j["cla"] for _, j in rows) / len(rows)) if rows else None,
        "by_constraint_count": {str(k): group(v) for k, v in sorted(by_count.items())},
        "by_category": {k: group(v) for k, v in sorted(by_cat.items())},
        "by_lang": {k: group(v) for k, v in sorted(by_lang.items())},
        "by_dimension": {k: {"n_constraints": len(v), "constraint_accuracy": _rate(v)}
                         for k, v in sorted(by_type.items(), key=lambda kv: (-len(kv[1]), kv[0]))},
        "segpo": {"n": len(seg), "ILA": (sum(j["ila"] for j in seg) / len(seg)) if seg else None,
                  "CLA": (sum(j["cla"] for j in seg) / len(seg)) if seg else None,
                  "format_ok": _rate([bool(j["format_ok"]) for j in seg])},
    }


def evaluate_demo(config) -> dict[str, Any]:
    """The ``demo`` benchmark of ``python -m evaluation.run`` (see module docstring)."""
    from evaluation import report  # pylint: disable=import-outside-toplevel
    from evaluation import runner as run  # pylint: disable=import-outside-toplevel
    workdir, g = config.workdir, config.generation
    t0 = time.time()
    path = config.data.path or default_demo_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"demo prompts not found: {path}")
    records = load_demo(path, limit=config.data.limit)
    if g.backend == "reference":
        backend = "reference"
        generator: Any = ReferenceGenerator(records)
    else:
        backend = run.resolve_backend(config)
        generator = run.make_generator(config, backend, workdir)
    fingerprint = run.make_fingerprint(config, backend, [path], {}, {})
    run.check_workdir(workdir, config, fingerprint)
    units = gen_units(records)
    try:
        preds, gen_stats = driver.run_generation(units, generator, os.path.join(workdir, "predictions.jsonl"),
                                                 progress=config.progress)
    finally:
        if hasattr(generator, "close"):
            generator.close()
    judgments = {r["id"]: judge_record(r, preds[r["id"]]) for r in records if r["id"] in preds}
    io_utils.write_jsonl_atomic(os.path.join(workdir, "judgments.jsonl"),
                                [judgments[r["id"]] for r in records if r["id"] in judgments])
    metrics = compute_metrics(records, judgments, n_missing_predictions=len(records) - len(preds))
    usage = {"generation": generator.usage()} if hasattr(generator, "usage") else {}
    model = "reference answers" if backend == "reference" else run.model_name(config, backend)
    run_info = {"model": model, "benchmark": "demo", "data": os.path.basename(path), "limit": config.data.limit,
                "answers": backend if backend != "predictions" else f"predictions file {os.path.basename(g.predictions)}",
                "judge": "rule verifiers (data_pipeline.verifiers)",
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "wall time (s)": round(time.time() - t0, 1)}
    metrics["usage"] = usage
    metrics["generation_stats"] = gen_stats
    metrics["run"] = run_info
    io_utils.write_json_atomic(os.path.join(workdir, "metrics.json"), metrics)
    report.write_report(workdir, metrics, run_info, charts=config.report.charts)
    run.print_summary(metrics)
    return metrics
