"""TRACE evaluation: data loading, judge prompt, reply parsing and metrics (docs/metrics.md).

The model answers each item's chat messages (system + user). The judge sees the query (the full user
message; the item's ``description`` only when the message contains ``NULL``, as in the public code),
the item's ``constraints`` and the answer, scores every constraint 0-10, prints the per-constraint
scores as JSON and ends with ``Constraints Overall Score: [[x]]``.

Judge prompt. :data:`DEFAULT_JUDGE_TEMPLATE` is our own wording of that protocol. Any template file
can be used instead (``--config.judge.template=FILE``); it is rendered with Python ``str.format`` and the fields

* ``description`` - the query (see above; named like the official template's field),
* ``constraints`` - the item's ``constraints`` text (numbered lines),
* ``ans``         - the model's answer,
* ``format_str``  - the JSON example of per-constraint scores shown to the judge. With a template
  file it defaults to :data:`OFFICIAL_FORMAT_STR`, the value the official TRACE template expects;
  with our template it defaults to :data:`DEFAULT_FORMAT_STR`.

and sent as one user message (after an optional system message).

Parsing. The overall score is the first match of ``Constraints Overall Score:\\s*\\[\\[([0-9.]+)\\]\\]``
(the public evaluator's ``re.search``); a reply without it, or with a value that is not a number in
[0, 10], is unparseable (asked again, then counted apart, never scored). The per-constraint scores are
read from the first JSON value after ``Fine Grained Score:`` (a list of one-key objects, one object, or
a list of numbers), in constraint order; when their count differs from ``constraints_num`` they are
recorded as missing for that item (the overall score still counts).

Metrics (fractions in [0, 1]; reports print percentages): ``IF`` = share of scored items whose overall
score is 10; ``IF-S`` over items with 1 constraint; ``IF-M`` over items with 2..15; ``mean_score``;
``by_constraint_count``; ``by_category``; ``by_dimension`` (for every ``levels2`` label: the share of
that label's constraints scored 10 in the per-constraint JSON, ``constraint_accuracy``, and the IF of
the items that carry the label, ``IF``).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from typing import Any, Optional, Sequence

from evaluation import benchmark
from evaluation import driver
from evaluation import report

# The per-constraint JSON example the official TRACE judge template expects as `format_str`
# (documented with the shared data; it must match that template's worked example).
OFFICIAL_FORMAT_STR = json.dumps(
    [{"密码至少8个字符": 10, "包含1个大写字母": 0, "包含1个小写字母": 0, "包含2个数字": 10}], ensure_ascii=False)

DEFAULT_FORMAT_STR = json.dumps([{"1": 10, "2": 4, "3": 0}])

DEFAULT_JUDGE_TEMPLATE = """You grade how well an AI assistant's answer follows a user's request and its constraints. Be strict and impartial.

Work in this order:
1. Go through the constraints one by one. For each, write a short justification that points at the part of the answer that meets or breaks it, then give it a score from 0 to 10, where 10 means the constraint is met completely and 0 means it is ignored or violated.
2. If the answer does not address the request, contains serious factual errors, or is harmful, every constraint gets 0.
3. After the justifications, write one line that starts with "Fine Grained Score:" followed by a JSON list holding one object that maps each constraint, in the given order, to its score. For three constraints it looks like this:
Fine Grained Score: {format_str}
4. On the last line, give the overall score of the answer (0 to 10; 10 only when every constraint is fully met), written exactly like this: Constraints Overall Score: [[score]]

### Request
{description}

### Constraints
{constraints}

### Answer to grade
{ans}

### Your grading
"""

SCORE_RE = re.compile(r"Constraints Overall Score:\s*\[\[([0-9.]+)\]\]", re.DOTALL)
FINE_MARKER = "Fine Grained Score"

REQUIRED_FIELDS = ("id", "messages", "description", "constraints", "constraints_num", "levels2")


@dataclasses.dataclass
class TraceItem:
    id: str
    messages: list[dict[str, str]]
    description: str
    constraints: str
    constraints_num: int
    levels2: list[str]
    category: str = ""
    input: str = ""
    constraints_splits: list[str] = dataclasses.field(default_factory=list)

    @property
    def user_message(self) -> str:
        users = [m for m in self.messages if m.get("role") == "user"]
        return users[-1]["content"] if users else ""

    @property
    def query(self) -> str:
        """What the judge sees as the request (the public code's rule; see module docstring)."""
        msg = self.user_message
        return self.description if "NULL" in msg else msg


def load_trace(path: str, limit: int = 0) -> list[TraceItem]:
    """Reads the TRACE evaluation JSONL; errors name file, line and field."""
    items: list[TraceItem] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON: {e}") from None
            for k in REQUIRED_FIELDS:
                if k not in row:
                    raise ValueError(f"{where}: missing field {k!r}")
            msgs = row["messages"]
            if (not isinstance(msgs, list) or not msgs
                    or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)):
                raise ValueError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
            if not any(m["role"] == "user" for m in msgs):
                raise ValueError(f"{where}: field 'messages' has no user message")
            n = row["constraints_num"]
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"{where}: field 'constraints_num' must be a positive integer, got {n!r}")
            levels = row["levels2"]
            if not isinstance(levels, list) or not all(isinstance(x, str) for x in levels):
                raise ValueError(f"{where}: field 'levels2' must be a list of strings")
            uid = str(row["id"])
            if uid in seen:
                raise ValueError(f"{where}: duplicate id {uid!r}")
            seen.add(uid)
            items.append(TraceItem(
                id=uid, messages=msgs, description=str(row["description"]),
                constraints=str(row["constraints"]), constraints_num=n, levels2=levels,
                category=str(row.get("category", "")), input=str(row.get("input", "")),
                constraints_splits=list(row.get("constraints_splits") or [])))
            if limit and len(items) >= limit:
                break
    return items


def render_judge_prompt(template: str, item: TraceItem, answer: str, format_str: str,
                        template_name: str = "<default TRACE template>") -> str:
    try:
        return template.format(format_str=format_str, description=item.query,
                               constraints=item.constraints, ans=answer)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{template_name}: cannot render the TRACE judge template ({type(e).__name__}: {e}); "
                         "its fields are {format_str}, {description}, {constraints}, {ans}; "
                         "write literal braces as {{ and }}") from None


@dataclasses.dataclass
class TraceJudgeSpec:
    template: str = DEFAULT_JUDGE_TEMPLATE
    template_name: str = "<default TRACE template>"
    format_str: str = DEFAULT_FORMAT_STR
    system_prompt: str = ""  # optional system message before the judge prompt


def judge_messages(spec: TraceJudgeSpec, item: TraceItem, answer: str) -> list[dict[str, str]]:
    msgs = []
    if spec.system_prompt:
        msgs.append({"role": "system", "content": spec.system_prompt})
    msgs.append({"role": "user", "content": render_judge_prompt(spec.template, item, answer, spec.format_str,
                                                                spec.template_name)})
    return msgs


def gen_units(items: Sequence[TraceItem]) -> list[driver.GenUnit]:
    return [driver.GenUnit(id=it.id, parts=[[dict(m) for m in it.messages]]) for it in items]


def judge_units(spec: TraceJudgeSpec, items: Sequence[TraceItem], predictions: dict[str, str]
                ) -> list[driver.JudgeUnit]:
    return [driver.JudgeUnit(id=it.id, messages=judge_messages(spec, it, predictions[it.id]),
                             meta={"constraints_num": it.constraints_num})
            for it in items if it.id in predictions]


def _first_json_value(text: str) -> Any:
    dec = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "[{":
            try:
                val, _ = dec.raw_decode(text, i)
                return val
            except json.JSONDecodeError:
                continue
    return None


def _to_score(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        x = float(v)
    elif isinstance(v, str):
        try:
            x = float(v.strip())
        except ValueError:
            return None
    else:
        return None
    return x if math.isfinite(x) else None


def parse_fine_grained(text: str, n_constraints: int) -> Optional[list[float]]:
    """Per-constraint scores in constraint order, or None when absent or of the wrong length."""
    idx = text.find(FINE_MARKER)
    if idx < 0:
        return None
    end = text.find("Constraints Overall Score", idx)
    val = _first_json_value(text[idx + len(FINE_MARKER): end if end > idx else len(text)])
    if val is None:
        return None
    if isinstance(val, dict):
        val = [val]
    if not isinstance(val, list):
        return None
    scores: list[Any] = []
    for el in val:
        if isinstance(el, dict):
            scores.extend(el.values())
        else:
            scores.append(el)
    out = [_to_score(s) for s in scores]
    if len(out) != n_constraints or any(s is None for s in out):
        return None
    return out  # type: ignore[return-value]


def parse_judgment(text: str, n_constraints: int) -> driver.Parsed:
    m = SCORE_RE.search(text or "")
    if not m:
        return driver.Parsed(False, reason="no 'Constraints Overall Score: [[x]]'")
    try:
        score = float(m.group(1).strip())
    except ValueError:
        return driver.Parsed(False, reason=f"overall score {m.group(1)!r} is not a number")
    if not 0.0 <= score <= 10.0:
        return driver.Parsed(False, reason=f"overall score {score:g} is outside 0..10")
    return driver.Parsed(True, {"score": score, "constraint_scores": parse_fine_grained(text, n_constraints)})


def compute_metrics(items: Sequence[TraceItem], judgments: dict[str, dict[str, Any]],
                    n_missing_predictions: int = 0) -> dict[str, Any]:
    """Metrics over the items with an ``ok`` judgment (see module docstring)."""
    scored: list[tuple[TraceItem, float, Optional[list[float]]]] = []
    n_unparseable = n_errors = n_unjudged = 0
    for it in items:
        rec = judgments.get(it.id)
        if rec is None:
            n_unjudged += 1
        elif rec.get("status") == "ok":
            scored.append((it, float(rec["score"]), rec.get("constraint_scores")))
        elif rec.get("status") == "unparseable":
            n_unparseable += 1
        else:
            n_errors += 1
    full = [(it, s == 10.0) for it, s, _ in scored]
    single = [ok for it, ok in full if it.constraints_num == 1]
    multi = [ok for it, ok in full if it.constraints_num >= 2]
    by_count: dict[str, Any] = {}
    groups: dict[int, list] = collections.defaultdict(list)
    for it, s, _ in scored:
        groups[it.constraints_num].append(s)
    for k in sorted(groups):
        ss = groups[k]
        by_count[str(k)] = {"n": len(ss), "IF": benchmark.rate([s == 10.0 for s in ss]), "mean_score": sum(ss) / len(ss)}
    by_cat: dict[str, Any] = {}
    cgroups: dict[str, list] = collections.defaultdict(list)
    for it, s, _ in scored:
        cgroups[it.category or "-"].append(s)
    for k in sorted(cgroups):
        ss = cgroups[k]
        by_cat[k] = {"n": len(ss), "IF": benchmark.rate([s == 10.0 for s in ss]), "mean_score": sum(ss) / len(ss)}
    dim_items: dict[str, list[bool]] = collections.defaultdict(list)
    dim_cons: dict[str, list[bool]] = collections.defaultdict(list)
    n_fine_missing = 0
    for it, s, cs in scored:
        for label in sorted(set(it.levels2)):
            dim_items[label].append(s == 10.0)
        if cs is None:
            n_fine_missing += 1
            continue
        for label, c in zip(it.levels2, cs):
            dim_cons[label].append(c == 10.0)
    by_dim = {}
    for label in sorted(dim_items, key=lambda k: (-len(dim_items[k]), k)):
        by_dim[label] = {"n_items": len(dim_items[label]), "IF": benchmark.rate(dim_items[label]),
                         "n_constraints": len(dim_cons.get(label, [])),
                         "constraint_accuracy": benchmark.rate(dim_cons.get(label, []))}
    all_scores = [s for _, s, _ in scored]
    return {
        "benchmark": "trace",
        "n_items": len(items),
        "n_scored": len(scored),
        "n_unparseable": n_unparseable,
        "n_judge_errors": n_errors,
        "n_unjudged": n_unjudged,
        "n_missing_predictions": n_missing_predictions,
        "n_fine_grained_missing": n_fine_missing,
        "IF": benchmark.rate([ok for _, ok in full]),
        "IF-S": benchmark.rate(single),
        "IF-M": benchmark.rate(multi),
        "n_S": len(single),
        "n_M": len(multi),
        "mean_score": (sum(all_scores) / len(all_scores)) if all_scores else None,
        "by_constraint_count": by_count,
        "by_category": by_cat,
        "by_dimension": by_dim,
    }


DATA_HINT = ("download: https://raw.githubusercontent.com/Tongyi-CCAI/Complex-IF/main/TRACE/TRACE/"
             "202409_trace_evaluation.jsonl")


@benchmark.register
class TraceBenchmark(benchmark.LLMJudgedBenchmark):
    """TRACE as a :class:`~evaluation.benchmark.Benchmark` (see module docstring)."""

    name = "trace"
    headline = (("IF-S", "rate"), ("IF-M", "rate"), ("IF", "rate"), ("mean_score", "score"), ("n_scored", "count"),
                ("n_unparseable", "count"), ("n_judge_errors", "count"))
    breakdowns = (
        benchmark.Breakdown("by_constraint_count", "number of constraints", (("IF", "rate"), ("mean_score", "score"))),
        benchmark.Breakdown("by_dimension", "dimension (levels2)", (("constraint_accuracy", "rate"), ("IF", "rate")),
                            gloss=True),
        benchmark.Breakdown("by_category", "category", (("IF", "rate"), ("mean_score", "score"))))

    def load(self, config) -> benchmark.Loaded:
        j = config.judge
        files = benchmark.data_files(config, DATA_HINT, single=True)
        judge_template = benchmark.read_template(j.template, "judge")
        items = load_trace(files[0], limit=config.data.limit)
        format_str = j.format_str or (OFFICIAL_FORMAT_STR if judge_template is not None else DEFAULT_FORMAT_STR)
        spec = TraceJudgeSpec(
            template=judge_template if judge_template is not None else DEFAULT_JUDGE_TEMPLATE,
            template_name=j.template or "<default TRACE template>", format_str=format_str,
            system_prompt="" if j.system_prompt == "default" else j.system_prompt)
        return benchmark.Loaded(items=items, files=files, templates={"judge": judge_template}, spec=spec)

    def gen_units(self, loaded):
        return gen_units(loaded.items)

    def judge_units(self, loaded, predictions):
        return judge_units(loaded.spec, loaded.items, predictions)

    def parse(self, unit, text):
        return parse_judgment(text, int(unit.meta["constraints_num"]))

    def metrics(self, config, loaded, judgments, n_missing_predictions):
        return compute_metrics(loaded.items, judgments, n_missing_predictions=n_missing_predictions)

    def report_section(self, metrics, workdir, charts):
        return report.trace_section(metrics, workdir, charts)

    def summary(self, m):
        pct = report.pct
        return (f"TRACE  IF-S {pct(m['IF-S'])}  IF-M {pct(m['IF-M'])}  IF {pct(m['IF'])}  "
                f"mean score {m['mean_score'] if m['mean_score'] is None else round(m['mean_score'], 2)}  "
                f"(scored {m['n_scored']}/{m['n_items']}, unparseable {m['n_unparseable']}, "
                f"judge errors {m['n_judge_errors']}, missing predictions {m['n_missing_predictions']})")
