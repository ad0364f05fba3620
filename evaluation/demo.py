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
from typing import Any, Sequence

import data_pipeline
from data_pipeline import verifiers
from evaluation import benchmark
from evaluation import driver
from evaluation import report

logger = logging.getLogger(__name__)


def default_demo_path() -> str:
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
    res = verifiers.verify_record(record, response)
    types = [s["type"] for s in record.get("constraints") or []]
    for s in record.get("sub_instructions") or []:
        types += [c["type"] for c in s.get("constraints") or []]
    checks = list(res["constraints"]) + [v for sub in res["sub_instructions"] for v in sub]
    return {"id": record["id"], "status": "ok", "all_pass": bool(res["all_pass"]), "checks": checks,
            "types": types, "format_ok": res["format_ok"], "ila": res["ila"], "cla": res["cla"],
            "sub_instructions": res["sub_instructions"]}


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
        return {"n": len(js), "IF": benchmark.rate([j["all_pass"] for j in js]),
                "constraint_accuracy": benchmark.rate([c for j in js for c in j["checks"]])}

    seg = [j for r, j in rows if r.get("sub_instructions")]
    return {
        "benchmark": "demo",
        "n_items": len(records),
        "n_scored": len(rows),
        "n_missing_predictions": n_missing_predictions,
        "n_constraints": len(all_checks),
        "IF": benchmark.rate([j["all_pass"] for _, j in rows]),
        "IF-S": benchmark.rate([j["all_pass"] for r, j in rows if int(r["constraints_num"]) == 1]),
        "IF-M": benchmark.rate([j["all_pass"] for r, j in rows if int(r["constraints_num"]) >= 2]),
        "constraint_accuracy": benchmark.rate(all_checks),
        "mean_cla": (sum(j["cla"] for _, j in rows) / len(rows)) if rows else None,
        "by_constraint_count": {str(k): group(v) for k, v in sorted(by_count.items())},
        "by_category": {k: group(v) for k, v in sorted(by_cat.items())},
        "by_lang": {k: group(v) for k, v in sorted(by_lang.items())},
        "by_dimension": {k: {"n_constraints": len(v), "constraint_accuracy": benchmark.rate(v)}
                         for k, v in sorted(by_type.items(), key=lambda kv: (-len(kv[1]), kv[0]))},
        "segpo": {"n": len(seg), "ILA": (sum(j["ila"] for j in seg) / len(seg)) if seg else None,
                  "CLA": (sum(j["cla"] for j in seg) / len(seg)) if seg else None,
                  "format_ok": benchmark.rate([bool(j["format_ok"]) for j in seg])},
    }


@benchmark.register
class DemoBenchmark(benchmark.RuleJudgedBenchmark):
    """The bundled demo set as a :class:`~evaluation.benchmark.Benchmark` (see module docstring); answers
    may also come from the bundled references (``--config.generation.backend=reference``)."""

    name = "demo"
    headline = (("IF", "rate"), ("IF-S", "rate"), ("IF-M", "rate"), ("constraint_accuracy", "rate"),
                ("n_scored", "count"))
    breakdowns = (
        benchmark.Breakdown("by_constraint_count", "number of constraints",
                            (("IF", "rate"), ("constraint_accuracy", "rate"))),
        benchmark.Breakdown("by_dimension", "verifier type", (("constraint_accuracy", "rate"),), gloss=True))
    item_units = staticmethod(gen_units)
    judge_record = staticmethod(judge_record)
    item_metrics = staticmethod(compute_metrics)

    def load(self, config) -> benchmark.Loaded:
        path = config.data.path or default_demo_path()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"demo prompts not found: {path}")
        return benchmark.Loaded(items=load_demo(path, limit=config.data.limit), files=[path])

    def resolve_backend(self, config) -> str:
        return "reference" if config.generation.backend == "reference" else super().resolve_backend(config)

    def make_generator(self, config, backend, loaded):
        if backend == "reference":
            return ReferenceGenerator(loaded.items)
        return super().make_generator(config, backend, loaded)

    def model_name(self, config, backend):
        return "reference answers" if backend == "reference" else super().model_name(config, backend)

    def run_info(self, config, backend):
        return {"judge": "rule verifiers (data_pipeline.verifiers)"}

    def report_section(self, metrics, workdir, charts):
        return report.demo_section(metrics, workdir, charts)

    def summary(self, m):
        pct = report.pct
        return (f"Demo  IF {pct(m['IF'])}  constraint accuracy {pct(m['constraint_accuracy'])}  "
                f"(items {m['n_scored']}, constraints {m['n_constraints']})")
