"""EIFBench evaluation: input building, long-instance split, yes/no judging and metrics (docs/metrics.md).

Generation. Each instance's input text is ``"Instruction:\\n{input}\\n\\n"`` followed by its
sub-instructions (in numeric key order), each written ``"{key}:\\n{instruction}\\nconstraints:\\n"`` plus
one constraint per line, joined by blank lines. When that text is longer than ``max_chars`` (8,192)
characters, the sub-instructions are split into two halves (the first ``m // 2``, then the rest) and
answered in two calls; **both** answers are kept and concatenated (the public script drops the second
half). The input text is placed in an answer prompt: :data:`DEFAULT_ANSWER_TEMPLATE` (our wording) or
any template file with the field ``{input_text}``; the system message is "You are a helpful assistant."

Judging. One judge call per (sub-instruction, constraint) with the template fields ``input`` (the
instance's ``input`` field), ``output`` (the whole answer), ``sub_instruction`` (``"{key}:{instruction}"``)
and ``question`` (the one constraint); :data:`DEFAULT_JUDGE_TEMPLATE` is our wording, any template file
with these fields can be used. Parsing (:func:`parse_verdict`): if ``答案：是|答案：否`` matches exactly
once, that match decides; otherwise the verdict is yes only when ``是`` occurs and ``否`` does not. An
empty reply is unparseable (asked again, then counted apart).

Metrics per instance i with m_i sub-instructions and verdicts S_ijk: task level = 1[all S_ijk];
ILA_i = mean_j 1[all_k S_ijk]; CLA_i = mean of S_ijk over all constraints; each averaged over
instances, per split and overall, plus breakdowns by number of sub-instructions and by task type.
Judge errors and unparseable replies are never scored: with ``error_policy="exclude_pair"`` (default,
like the public metric script) the failed pairs are left out of their instance; with
``"exclude_instance"`` an instance with any failed pair is left out whole. Both are counted.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Any, Optional, Sequence

from data_pipeline.protocols import eifbench as eif_protocol
from evaluation import benchmark
from evaluation import driver
from evaluation import report

# The protocol texts and the verdict parser are shared with the RL judge reward (data_pipeline.protocols.eifbench).
SYSTEM_PROMPT = eif_protocol.EIF_SYSTEM_PROMPT
MAX_CHARS = 8192
DEFAULT_ANSWER_TEMPLATE = eif_protocol.EIF_ANSWER_TEMPLATE
DEFAULT_JUDGE_TEMPLATE = eif_protocol.YES_NO_JUDGE_TEMPLATE
VERDICT_RE = eif_protocol.YES_NO_RE


@dataclasses.dataclass
class SubInstruction:
    key: str
    instruction: str
    constraints: list[str]


@dataclasses.dataclass
class EifInstance:
    split: str
    main_id: str
    input: str
    subs: list[SubInstruction]
    task_types: str = ""
    category: str = ""

    @property
    def uid(self) -> str:
        return f"{self.split}/{self.main_id}"


def split_name(path: str) -> str:
    """'.../sorted_party100.json' -> 'party100'."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem[len("sorted_"):] if stem.startswith("sorted_") else stem


def _key_number(key: str) -> float:
    m = re.search(r"\d+", key)
    return int(m.group()) if m else float("inf")


def load_eifbench(path: str, split: Optional[str] = None, limit: int = 0) -> list[EifInstance]:
    """Reads one EIFBench split file (a JSON list); errors name file, index and field."""
    split = split or split_name(path)
    with open(path, encoding="utf-8") as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of instances, got {type(rows).__name__}")
    out: list[EifInstance] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        where = f"{path}[{i}]"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object")
        for k in ("main_id", "input", "sub_instructions"):
            if k not in row:
                raise ValueError(f"{where}: missing field {k!r}")
        subs_raw = row["sub_instructions"]
        if not isinstance(subs_raw, dict) or not subs_raw:
            raise ValueError(f"{where}: field 'sub_instructions' must be a non-empty object")
        subs = []
        for key in sorted(subs_raw, key=_key_number):
            s = subs_raw[key]
            if not isinstance(s, dict) or "instruction" not in s or "scoring_questions" not in s:
                raise ValueError(f"{where}: sub_instructions.{key} needs 'instruction' and 'scoring_questions'")
            qs = s["scoring_questions"]
            if not isinstance(qs, list) or not all(isinstance(q, str) for q in qs):
                raise ValueError(f"{where}: sub_instructions.{key}.scoring_questions must be a list of strings")
            subs.append(SubInstruction(key=key, instruction=str(s["instruction"]), constraints=list(qs)))
        mid = str(row["main_id"])
        if mid in seen:
            raise ValueError(f"{where}: duplicate main_id {mid!r}")
        seen.add(mid)
        out.append(EifInstance(split=split, main_id=mid, input=str(row["input"] or ""), subs=subs,
                               task_types=str(row.get("task_types") or ""), category=str(row.get("category") or "")))
        if limit and len(out) >= limit:
            break
    return out


def format_sub(sub: SubInstruction) -> str:
    return eif_protocol.format_sub_instruction(sub.key, sub.instruction, sub.constraints)


def input_texts(inst: EifInstance, max_chars: int = MAX_CHARS) -> list[str]:
    """The generation input text(s): one, or two halves when the full text exceeds ``max_chars``."""
    blocks = [format_sub(s) for s in inst.subs]
    full = eif_protocol.eif_input_text(inst.input, blocks)
    if len(full) <= max_chars or len(blocks) < 2:
        return [full]
    mid = len(blocks) // 2
    return [eif_protocol.eif_input_text(inst.input, blocks[:mid]), eif_protocol.eif_input_text(inst.input, blocks[mid:])]


@dataclasses.dataclass
class EifSpec:
    answer_template: str = DEFAULT_ANSWER_TEMPLATE
    answer_template_name: str = "<default EIFBench answer template>"
    judge_template: str = DEFAULT_JUDGE_TEMPLATE
    judge_template_name: str = "<default EIFBench judge template>"
    system_prompt: str = SYSTEM_PROMPT  # for generation and judging ("" = none)
    max_chars: int = MAX_CHARS
    error_policy: str = "exclude_pair"  # or "exclude_instance"


def _messages(system: str, user: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def render_answer_prompt(spec: EifSpec, text: str) -> str:
    try:
        return spec.answer_template.format(input_text=text)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{spec.answer_template_name}: cannot render the EIFBench answer template "
                         f"({type(e).__name__}: {e}); its field is {{input_text}}") from None


def render_judge_prompt(spec: EifSpec, inst: EifInstance, sub: SubInstruction, question: str, output: str) -> str:
    try:
        return spec.judge_template.format(input=inst.input, output=output,
                                          sub_instruction=f"{sub.key}:{sub.instruction}", question=question)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{spec.judge_template_name}: cannot render the EIFBench judge template "
                         f"({type(e).__name__}: {e}); its fields are {{input}}, {{output}}, "
                         "{sub_instruction}, {question}") from None


def gen_units(spec: EifSpec, instances: Sequence[EifInstance]) -> list[driver.GenUnit]:
    return [driver.GenUnit(id=inst.uid, parts=[_messages(spec.system_prompt, render_answer_prompt(spec, t))
                                               for t in input_texts(inst, spec.max_chars)])
            for inst in instances]


def pair_id(inst: EifInstance, sub: SubInstruction, k: int) -> str:
    return f"{inst.uid}/{sub.key}/{k}"


def judge_units(spec: EifSpec, instances: Sequence[EifInstance], predictions: dict[str, str]
                ) -> list[driver.JudgeUnit]:
    units = []
    for inst in instances:
        if inst.uid not in predictions:
            continue
        out = predictions[inst.uid]
        for sub in inst.subs:
            for k, q in enumerate(sub.constraints):
                units.append(driver.JudgeUnit(
                    id=pair_id(inst, sub, k),
                    messages=_messages(spec.system_prompt, render_judge_prompt(spec, inst, sub, q, out)),
                    meta={"instance": inst.uid, "sub": sub.key, "k": k}))
    return units


def parse_verdict(text: str) -> driver.Parsed:
    """The yes/no rule (docs/metrics.md; see module docstring)."""
    parsed = eif_protocol.parse_yes_no(text)
    if parsed is None:
        return driver.Parsed(False, reason="empty reply")
    return driver.Parsed(True, {"verdict": parsed[0], "rule": parsed[1]})


def _mean(xs: Sequence[float]) -> Optional[float]:
    return (sum(xs) / len(xs)) if xs else None


def instance_scores(inst: EifInstance, judgments: dict[str, dict[str, Any]], error_policy: str
                    ) -> tuple[Optional[dict[str, float]], dict[str, int]]:
    """(task, ILA, CLA) of one instance, or None when it cannot be scored; plus failure counts."""
    counts = {"pairs": 0, "ok": 0, "unparseable": 0, "errors": 0, "unjudged": 0, "fallback": 0}
    per_sub: list[list[bool]] = []
    for sub in inst.subs:
        vs = []
        for k in range(len(sub.constraints)):
            counts["pairs"] += 1
            rec = judgments.get(pair_id(inst, sub, k))
            if rec is None:
                counts["unjudged"] += 1
            elif rec.get("status") == "ok":
                counts["ok"] += 1
                counts["fallback"] += rec.get("rule") == "fallback"
                vs.append(bool(rec["verdict"]))
            elif rec.get("status") == "unparseable":
                counts["unparseable"] += 1
            else:
                counts["errors"] += 1
        if vs:
            per_sub.append(vs)
    failed = counts["pairs"] - counts["ok"]
    if not per_sub or (error_policy == "exclude_instance" and failed):
        return None, counts
    flat = [v for vs in per_sub for v in vs]
    return {"task": float(all(flat)), "ILA": _mean([float(all(vs)) for vs in per_sub]),
            "CLA": _mean([float(v) for v in flat])}, counts


def _aggregate(rows: list[dict[str, float]]) -> dict[str, Any]:
    return {"n": len(rows), "task_level": _mean([r["task"] for r in rows]),
            "ILA": _mean([r["ILA"] for r in rows]), "CLA": _mean([r["CLA"] for r in rows])}


def compute_metrics(instances: Sequence[EifInstance], judgments: dict[str, dict[str, Any]],
                    error_policy: str = "exclude_pair", n_missing_predictions: int = 0) -> dict[str, Any]:
    if error_policy not in ("exclude_pair", "exclude_instance"):
        raise ValueError(f"error_policy must be 'exclude_pair' or 'exclude_instance', got {error_policy!r}")
    rows_by_split: dict[str, list] = collections.defaultdict(list)
    rows_by_nsub: dict[int, list] = collections.defaultdict(list)
    rows_by_type: dict[str, list] = collections.defaultdict(list)
    rows_all: list[dict[str, float]] = []
    tot = collections.Counter()
    n_excluded = 0
    for inst in instances:
        scores, counts = instance_scores(inst, judgments, error_policy)
        tot.update(counts)
        if scores is None:
            n_excluded += 1
            continue
        rows_all.append(scores)
        rows_by_split[inst.split].append(scores)
        rows_by_nsub[len(inst.subs)].append(scores)
        rows_by_type[inst.task_types or "-"].append(scores)
    overall = _aggregate(rows_all)
    return {
        "benchmark": "eifbench",
        "error_policy": error_policy,
        "n_instances": len(instances),
        "n_scored_instances": len(rows_all),
        "n_excluded_instances": n_excluded,
        "n_pairs": tot["pairs"],
        "n_pairs_scored": tot["ok"],
        "n_unparseable": tot["unparseable"],
        "n_judge_errors": tot["errors"],
        "n_unjudged": tot["unjudged"],
        "n_fallback_verdicts": tot["fallback"],
        "n_missing_predictions": n_missing_predictions,
        "task_level": overall["task_level"],
        "ILA": overall["ILA"],
        "CLA": overall["CLA"],
        "by_split": {k: _aggregate(v) for k, v in sorted(rows_by_split.items())},
        "by_num_sub_instructions": {str(k): _aggregate(v) for k, v in sorted(rows_by_nsub.items())},
        "by_task_type": {k: _aggregate(v) for k, v in sorted(rows_by_type.items(), key=lambda kv: -len(kv[1]))},
    }


DATA_HINT = ("download: https://raw.githubusercontent.com/Tongyi-CCAI/Complex-IF/main/EIFBench/data/"
             "sorted_{single450,dialogue450,party100}.json")


@benchmark.register
class EifBenchmark(benchmark.LLMJudgedBenchmark):
    """EIFBench as a :class:`~evaluation.benchmark.Benchmark` (see module docstring); ``config.data.path``
    holds one or more split files, comma-separated."""

    name = "eifbench"
    headline = (("task_level", "rate"), ("ILA", "rate"), ("CLA", "rate"), ("n_scored_instances", "count"),
                ("n_pairs_scored", "count"), ("n_unparseable", "count"), ("n_judge_errors", "count"))
    breakdowns = tuple(benchmark.Breakdown(key, title, (("task_level", "rate"), ("ILA", "rate"), ("CLA", "rate")))
                       for key, title in (("by_split", "split"),
                                          ("by_num_sub_instructions", "number of sub-instructions"),
                                          ("by_task_type", "task type")))

    def load(self, config) -> benchmark.Loaded:
        j, g = config.judge, config.generation
        files = benchmark.data_files(config, DATA_HINT)
        judge_template = benchmark.read_template(j.template, "judge")
        answer_template = benchmark.read_template(g.answer_template, "answer")
        instances = [inst for p in files for inst in load_eifbench(p, limit=config.data.limit)]
        spec = EifSpec(
            answer_template=answer_template if answer_template is not None else DEFAULT_ANSWER_TEMPLATE,
            answer_template_name=g.answer_template or "<default EIFBench answer template>",
            judge_template=judge_template if judge_template is not None else DEFAULT_JUDGE_TEMPLATE,
            judge_template_name=j.template or "<default EIFBench judge template>",
            system_prompt=SYSTEM_PROMPT if j.system_prompt == "default" else j.system_prompt,
            max_chars=g.max_chars, error_policy=config.metrics.error_policy)
        return benchmark.Loaded(items=instances, files=files,
                                templates={"judge": judge_template, "answer": answer_template},
                                fingerprint_extra={"max_chars": g.max_chars}, spec=spec)

    def gen_units(self, loaded):
        return gen_units(loaded.spec, loaded.items)

    def judge_units(self, loaded, predictions):
        return judge_units(loaded.spec, loaded.items, predictions)

    def parse(self, unit, text):
        return parse_verdict(text)

    def metrics(self, config, loaded, judgments, n_missing_predictions):
        return compute_metrics(loaded.items, judgments, error_policy=config.metrics.error_policy,
                               n_missing_predictions=n_missing_predictions)

    def report_section(self, metrics, workdir, charts):
        return report.eifbench_section(metrics, workdir, charts)

    def summary(self, m):
        pct = report.pct
        line = (f"EIFBench  task {pct(m['task_level'])}  ILA {pct(m['ILA'])}  CLA {pct(m['CLA'])}  "
                f"(instances {m['n_scored_instances']}/{m['n_instances']}, pairs {m['n_pairs_scored']}/{m['n_pairs']}, "
                f"unparseable {m['n_unparseable']}, judge errors {m['n_judge_errors']})")
        for split, v in m["by_split"].items():
            line += f"\n  {split}: task {pct(v['task_level'])}  ILA {pct(v['ILA'])}  CLA {pct(v['CLA'])}  (n={v['n']})"
        return line
