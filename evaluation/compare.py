r"""Compare two evaluation runs side by side: deltas per metric and per dimension.

    python -m evaluation.compare runs/trace_base runs/trace_iopo [--out=compare.md]

Reads ``metrics.json`` of both run folders (same benchmark), prints a markdown table of every headline
metric (A, B, B - A; rates in percent, deltas in percentage points) followed by the breakdowns, and writes
the same markdown to ``--out`` (default: ``RUN_B/compare_vs_<name of RUN_A>.md``). Which metrics and
breakdowns a benchmark compares is said by its :class:`~evaluation.benchmark.Benchmark` class
(``headline``, ``breakdowns``; e.g. TRACE: by constraint count, by ``levels2`` dimension and by category;
EIFBench: by split, by number of sub-instructions and by task type; demo: by constraint count and
verifier type); this module only formats them.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

from absl import app
from absl import flags

from data_pipeline import cli
from evaluation import benchmark
from evaluation import runner  # noqa: F401  (imports, so registers, every benchmark)
from evaluation.report import gloss, table
from iopo_jax import io_utils

_OUT = flags.DEFINE_string("out", None, "Markdown output file (default RUN_B/compare_vs_<RUN_A>.md).")


def columns(bench: Optional[str]) -> tuple[tuple[benchmark.Metric, ...], tuple[benchmark.Breakdown, ...]]:
    """(headline metrics, breakdowns) that benchmark ``bench`` reports for comparison (its
    :class:`~evaluation.benchmark.Benchmark` class says); none for a benchmark that is not registered."""
    cls = benchmark.REGISTRY.get(bench)
    return (cls.headline, cls.breakdowns) if cls else ((), ())


def _rows(breakdown: benchmark.Breakdown, a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Row names of a breakdown: A's, then those only in B."""
    da, db = a.get(breakdown.key) or {}, b.get(breakdown.key) or {}
    return list(da) + [n for n in db if n not in da]


def _cell(run: dict[str, Any], breakdown: benchmark.Breakdown, name: str, field: str) -> Optional[float]:
    return ((run.get(breakdown.key) or {}).get(name) or {}).get(field)


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
    headline, breakdowns = columns(a.get("benchmark"))

    def delta(va, vb):
        return None if va is None or vb is None else vb - va

    return {"headline": {k: delta(a.get(k), b.get(k)) for k, _ in headline},
            "breakdowns": {bd.key: {name: {f: delta(_cell(a, bd, name, f), _cell(b, bd, name, f))
                                           for f, _ in bd.fields}
                                    for name in _rows(bd, a, b)}
                           for bd in breakdowns}}


def compare_markdown(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str) -> str:
    bench = a.get("benchmark")
    if bench != b.get("benchmark"):
        raise ValueError(f"cannot compare a {bench} run with a {b.get('benchmark')} run")
    headline, breakdowns = columns(bench)
    s = f"# {bench}: {name_b} vs {name_a}\n\nRates in percent; deltas (B - A) in percentage points.\n\n"
    rows = [[k, _fmt(a.get(k), kind), _fmt(b.get(k), kind), _delta(a.get(k), b.get(k), kind)] for k, kind in headline]
    s += table(["metric", f"A: {name_a}", f"B: {name_b}", "delta"], rows)
    for bd in breakdowns:
        if not a.get(bd.key) and not b.get(bd.key):
            continue
        headers = [bd.title] + [f"{f} {col}" for f, _ in bd.fields for col in ("A", "B", "delta")]
        rows = []
        for name in _rows(bd, a, b):
            row = [gloss(name) if bd.gloss else name]
            for f, kind in bd.fields:
                va, vb = _cell(a, bd, name, f), _cell(b, bd, name, f)
                row += [_fmt(va, kind), _fmt(vb, kind), _delta(va, vb, kind)]
            rows.append(row)
        s += f"\n## By {bd.title}\n\n" + table(headers, rows)
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
