r"""Compare two evaluation runs side by side: deltas per metric and per dimension.

    python -m evaluation.compare runs/trace_base runs/trace_iopo [--out=compare.md]

Reads ``metrics.json`` of both run folders (same benchmark), prints a markdown table of every headline
metric (A, B, B - A; rates in percent, deltas in percentage points) followed by the breakdowns (TRACE:
by constraint count and by ``levels2`` dimension; EIFBench: by split, by number of sub-instructions and
by task type; demo: by constraint count and verifier type), and writes the same markdown to ``--out``
(default: ``RUN_B/compare_vs_<name of RUN_A>.md``).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

from absl import app
from absl import flags

from data_pipeline import cli
from iopo_jax import io_utils
from evaluation.report import gloss, table

_OUT = flags.DEFINE_string("out", None, "Markdown output file (default RUN_B/compare_vs_<RUN_A>.md).")

HEADLINE = {
    "trace": [("IF-S", "rate"), ("IF-M", "rate"), ("IF", "rate"), ("mean_score", "score"), ("n_scored", "count"),
              ("n_unparseable", "count"), ("n_judge_errors", "count")],
    "eifbench": [("task_level", "rate"), ("ILA", "rate"), ("CLA", "rate"), ("n_scored_instances", "count"),
                 ("n_pairs_scored", "count"), ("n_unparseable", "count"), ("n_judge_errors", "count")],
    "demo": [("IF", "rate"), ("IF-S", "rate"), ("IF-M", "rate"), ("constraint_accuracy", "rate"),
             ("n_scored", "count")],
}
BREAKDOWNS = {
    "trace": [("by_constraint_count", "number of constraints", ["IF", "mean_score"]),
              ("by_dimension", "dimension (levels2)", ["constraint_accuracy", "IF"]),
              ("by_category", "category", ["IF", "mean_score"])],
    "eifbench": [("by_split", "split", ["task_level", "ILA", "CLA"]),
                 ("by_num_sub_instructions", "number of sub-instructions", ["task_level", "ILA", "CLA"]),
                 ("by_task_type", "task type", ["task_level", "ILA", "CLA"])],
    "demo": [("by_constraint_count", "number of constraints", ["IF", "constraint_accuracy"]),
             ("by_dimension", "verifier type", ["constraint_accuracy"])],
}
SCORE_FIELDS = {"mean_score"}


def load_metrics(run_dir: str) -> dict[str, Any]:
    path = os.path.join(run_dir, "metrics.json") if os.path.isdir(run_dir) else run_dir
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.json in {run_dir} (is it an evaluation workdir of a finished run?)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _fmt(v: Optional[float], kind: str) -> str:
    if v is None:
        return "-"
    if kind == "rate":
        return f"{100.0 * v:.1f}"
    if kind == "score":
        return f"{v:.2f}"
    return str(v)


def _delta(a: Optional[float], b: Optional[float], kind: str) -> str:
    if a is None or b is None:
        return "-"
    d = b - a
    if kind == "rate":
        return f"{100.0 * d:+.1f}"
    if kind == "score":
        return f"{d:+.2f}"
    return f"{d:+d}" if isinstance(d, int) else f"{d:+g}"


def deltas(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Structured deltas (B - A) for the headline metrics and every breakdown cell present in both."""
    bench = a.get("benchmark")
    out: dict[str, Any] = {"headline": {}, "breakdowns": {}}
    for k, kind in HEADLINE.get(bench, []):
        va, vb = a.get(k), b.get(k)
        out["headline"][k] = None if va is None or vb is None else vb - va
    for key, _, fields in BREAKDOWNS.get(bench, []):
        da, db = a.get(key) or {}, b.get(key) or {}
        cells = {}
        for name in list(da) + [n for n in db if n not in da]:
            row = {}
            for f in fields:
                va, vb = (da.get(name) or {}).get(f), (db.get(name) or {}).get(f)
                row[f] = None if va is None or vb is None else vb - va
            cells[name] = row
        out["breakdowns"][key] = cells
    return out


def compare_markdown(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str) -> str:
    bench = a.get("benchmark")
    if bench != b.get("benchmark"):
        raise ValueError(f"cannot compare a {bench} run with a {b.get('benchmark')} run")
    s = f"# {bench}: {name_b} vs {name_a}\n\nRates in percent; deltas (B - A) in percentage points.\n\n"
    rows = []
    for k, kind in HEADLINE.get(bench, []):
        va, vb = a.get(k), b.get(k)
        rows.append([k, _fmt(va, kind), _fmt(vb, kind), _delta(va, vb, kind)])
    s += table(["metric", f"A: {name_a}", f"B: {name_b}", "delta"], rows)
    for key, title, fields in BREAKDOWNS.get(bench, []):
        da, db = a.get(key) or {}, b.get(key) or {}
        if not da and not db:
            continue
        headers = [title]
        for f in fields:
            headers += [f"{f} A", f"{f} B", f"{f} delta"]
        rows = []
        for name in list(da) + [n for n in db if n not in da]:
            row = [gloss(name) if key == "by_dimension" else name]
            for f in fields:
                kind = "score" if f in SCORE_FIELDS else "rate"
                va, vb = (da.get(name) or {}).get(f), (db.get(name) or {}).get(f)
                row += [_fmt(va, kind), _fmt(vb, kind), _delta(va, vb, kind)]
            rows.append(row)
        s += f"\n## By {title}\n\n" + table(headers, rows)
    return s


def main(argv) -> None:
    if len(argv) != 3:
        raise app.UsageError("usage: python -m evaluation.compare RUN_A RUN_B [--out=FILE]")
    run_a, run_b = argv[1], argv[2]
    try:
        a, b = load_metrics(run_a), load_metrics(run_b)
        name_a = os.path.basename(os.path.normpath(run_a))
        name_b = os.path.basename(os.path.normpath(run_b))
        md = compare_markdown(a, b, name_a, name_b)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    out = _OUT.value or os.path.join(run_b if os.path.isdir(run_b) else os.path.dirname(run_b),
                                     f"compare_vs_{name_a}.md")
    io_utils.write_text_atomic(out, md)
    print(md)
    print(f"(written to {out})")


if __name__ == "__main__":
    cli.run_app(main)
