"""``report.md`` and PNG charts for an evaluation run (matplotlib, Agg backend).

TRACE: headline table (IF-S, IF-M, IF, mean score, counts), IF and mean score by constraint count,
accuracy by ``levels2`` dimension, by category; charts ``if_by_constraint_count.png`` and
``accuracy_by_dimension.png``. EIFBench: task level / ILA / CLA overall and per split, by number of
sub-instructions and by task type; charts ``accuracy_by_num_sub_instructions.png`` and
``accuracy_by_task_type.png``. Demo: IF and constraint-level accuracy, by constraint count and by
verifier type; charts ``if_by_constraint_count.png`` and ``accuracy_by_dimension.png``. IFEval: prompt- and
instruction-level accuracy, strict and loose, by instruction category and type, by number of instructions;
charts ``ifeval_overall.png``, ``ifeval_by_category.png`` and ``ifeval_by_instruction.png``. Every report
ends with the judge/generation usage (requests, retries, tokens, cost).

Dimension labels of TRACE are Chinese; when no CJK font is installed the charts use the English
glosses of :data:`TRACE_DIMENSION_GLOSS` (tables show both).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

from iopo_jax import io_utils

logger = logging.getLogger(__name__)

# Our English glosses of the TRACE `levels2` dimension labels (for charts and tables).
TRACE_DIMENSION_GLOSS = {
    "包含约束": "Inclusion", "数值约束": "Numerical", "输出格式约束": "Output format",
    "语气风格约束": "Tone and style", "主题约束": "Topic", "文本样式约束": "Text style",
    "层次化结构约束": "Hierarchical structure", "引用和参考约束": "Citation and reference",
    "自然语言流程背景信息约束": "NL process background", "编号和列表约束": "Numbering and lists",
    "价值观约束": "Values", "角色扮演约束": "Role play", "语法结构约束": "Grammatical structure",
    "受众目标约束": "Target audience", "先验条件约束": "Preconditions", "模版约束": "Template",
    "排除约束": "Exclusion", "语言特征约束": "Linguistic features", "情感情绪约束": "Sentiment and emotion",
    "表格背景信息约束": "Table background", "文本背景信息约束": "Text background",
    "正例约束": "Positive examples", "隐私约束": "Privacy", "多语言约束": "Multilingual",
    "负例约束": "Negative examples", "markdown流程背景信息约束": "Markdown process background",
    "输入格式约束": "Input format", "·": "Unlabelled (·)",
}


def pct(x: Optional[float], digits: int = 1) -> str:
    return "-" if x is None else f"{100.0 * x:.{digits}f}"


def num(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def gloss(label: str) -> str:
    g = TRACE_DIMENSION_GLOSS.get(label)
    return f"{g} ({label})" if g else label


def _has_cjk_font() -> bool:
    from matplotlib import font_manager  # pylint: disable=import-outside-toplevel
    names = {f.name for f in font_manager.fontManager.ttflist}
    return any(any(k in n for k in ("CJK", "WenQuanYi", "SimHei", "Hei", "Ming", "Song", "Droid Sans Fallback"))
               for n in names)


def _chart_label(label: str, i: int, cjk: bool) -> str:
    g = TRACE_DIMENSION_GLOSS.get(label)
    if cjk:
        return f"{g} ({label})" if g else label
    if g:
        return g
    return label if label.isascii() else f"dim {i}"


def _plt():
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    return plt


def value_labels(vals: list[Optional[float]]) -> list[str]:
    """Bar labels for fractions: whole percent, "n/a" for a missing value."""
    return ["n/a" if v is None else f"{100.0 * v:.0f}" for v in vals]


def bar_chart(path: str, labels: list[str], series: dict[str, list[Optional[float]]], title: str,
              xlabel: str, ylabel: str = "%", horizontal: bool = False, annot: Optional[list[str]] = None,
              values: bool = False) -> str:
    """A grouped bar chart of fractions (drawn as %). ``values``: print each bar's value at its end, so that
    a 0 % bar (invisible otherwise) reads "0" and a missing value (None) reads "n/a"."""
    plt = _plt()
    n, k = len(labels), max(1, len(series))
    width = 0.8 / k
    if horizontal:
        fig, ax = plt.subplots(figsize=(8, max(3.0, 0.32 * n * k + 1.2)))
    else:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * n * k + 2), 4.2))
    for si, (name, vals) in enumerate(series.items()):
        ys = [100.0 * v if v is not None else 0.0 for v in vals]
        pos = [i + (si - (k - 1) / 2) * width for i in range(n)]
        if horizontal:
            bars = ax.barh(pos, ys, height=width, label=name)
        else:
            bars = ax.bar(pos, ys, width=width, label=name)
        if values:
            ax.bar_label(bars, labels=value_labels(vals), fontsize=7, padding=2)
    if horizontal:
        ax.set_yticks(range(n))
        ax.set_yticklabels([f"{l}{' ' + annot[i] if annot else ''}" for i, l in enumerate(labels)], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(ylabel)
        ax.set_xlim(0, 100)
        ax.set_ylabel(xlabel)
    else:
        ax.set_xticks(range(n))
        ax.set_xticklabels([f"{l}{chr(10) + annot[i] if annot else ''}" for i, l in enumerate(labels)], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 100)
        ax.set_xlabel(xlabel)
    ax.set_title(title)
    if k > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="x" if horizontal else "y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.basename(path)


def _usage_section(usage: dict[str, Any]) -> str:
    if not usage:
        return ""
    rows = []
    for name, u in usage.items():
        if not isinstance(u, dict):
            continue
        rows.append([name, u.get("model", "-"), u.get("requests_sent", 0), u.get("retries", 0), u.get("cache_hits", 0),
                     u.get("failures", 0), u.get("prompt_tokens", 0), u.get("completion_tokens", 0),
                     f"{u.get('cost', 0.0):.4f}", f"{u.get('store_cost', 0.0):.4f}"])
    if not rows:
        return ""
    return "\n## Usage (this run)\n\n" + table(
        ["client", "model", "requests", "retries", "cache hits", "failures", "prompt tok", "completion tok",
         "cost", "cost (all runs)"], rows)


def trace_section(m: dict[str, Any], workdir: str, charts: bool) -> str:
    s = "## TRACE\n\n"
    s += table(["IF-S", "IF-M", "IF (all)", "mean score", "scored", "unparseable", "judge errors", "missing preds"],
               [[pct(m["IF-S"]), pct(m["IF-M"]), pct(m["IF"]), num(m["mean_score"]), m["n_scored"], m["n_unparseable"],
                 m["n_judge_errors"], m["n_missing_predictions"]]])
    s += f"\nIF-S over {m['n_S']} single-constraint items, IF-M over {m['n_M']} multi-constraint items " \
         "(percent of items whose overall judge score is 10).\n"
    bc = m["by_constraint_count"]
    s += "\n### By number of constraints\n\n" + table(
        ["constraints", "n", "IF %", "mean score"],
        [[k, v["n"], pct(v["IF"]), num(v["mean_score"])] for k, v in bc.items()])
    if charts and bc:
        f = bar_chart(os.path.join(workdir, "if_by_constraint_count.png"), list(bc),
                      {"IF": [v["IF"] for v in bc.values()]}, "TRACE: IF by number of constraints",
                      "constraints per instruction", annot=[f"n={v['n']}" for v in bc.values()])
        s += f"\n![IF by constraint count]({f})\n"
    bd = m["by_dimension"]
    s += "\n### By constraint dimension (levels2)\n\n" + table(
        ["dimension", "constraints", "constraint accuracy %", "items", "IF of items %"],
        [[gloss(k), v["n_constraints"], pct(v["constraint_accuracy"]), v["n_items"], pct(v["IF"])]
         for k, v in bd.items()])
    s += ("\nConstraint accuracy: share of the dimension's constraints scored 10 in the judge's per-constraint "
          f"JSON ({m['n_fine_grained_missing']} scored items lacked a usable per-constraint JSON). "
          "IF of items: IF over the items that carry the dimension.\n")
    if charts and bd:
        cjk = _has_cjk_font()
        labels = [_chart_label(k, i, cjk) for i, k in enumerate(bd)]
        f = bar_chart(os.path.join(workdir, "accuracy_by_dimension.png"), labels,
                      {"constraint accuracy": [v["constraint_accuracy"] for v in bd.values()],
                       "IF of items": [v["IF"] for v in bd.values()]},
                      "TRACE: accuracy by constraint dimension", "dimension", horizontal=True)
        s += f"\n![Accuracy by dimension]({f})\n"
    if m.get("by_category"):
        s += "\n### By category\n\n" + table(
            ["category", "n", "IF %", "mean score"],
            [[k, v["n"], pct(v["IF"]), num(v["mean_score"])] for k, v in m["by_category"].items()])
    return s


def _eif_rows(d: dict[str, Any]) -> list[list[Any]]:
    return [[k, v["n"], pct(v["task_level"]), pct(v["ILA"]), pct(v["CLA"])] for k, v in d.items()]


def eifbench_section(m: dict[str, Any], workdir: str, charts: bool) -> str:
    s = "## EIFBench\n\n"
    s += table(["split", "instances", "task level %", "ILA %", "CLA %"],
               _eif_rows(m["by_split"]) + [["**all**", m["n_scored_instances"], pct(m["task_level"]), pct(m["ILA"]),
                                            pct(m["CLA"])]])
    s += (f"\nPairs judged: {m['n_pairs_scored']} of {m['n_pairs']}; unparseable {m['n_unparseable']}, "
          f"judge errors {m['n_judge_errors']}, not judged {m['n_unjudged']}; instances left out: "
          f"{m['n_excluded_instances']} (policy `{m['error_policy']}`); verdicts decided by the fallback rule: "
          f"{m['n_fallback_verdicts']}; missing predictions: {m['n_missing_predictions']}.\n")
    bn = m["by_num_sub_instructions"]
    s += "\n### By number of sub-instructions\n\n" + table(["sub-instructions", "instances", "task %", "ILA %", "CLA %"],
                                                           _eif_rows(bn))
    if charts and bn:
        f = bar_chart(os.path.join(workdir, "accuracy_by_num_sub_instructions.png"), list(bn),
                      {k: [v[kk] for v in bn.values()] for k, kk in
                       (("task level", "task_level"), ("ILA", "ILA"), ("CLA", "CLA"))},
                      "EIFBench: accuracy by number of sub-instructions", "sub-instructions per instance",
                      annot=[f"n={v['n']}" for v in bn.values()])
        s += f"\n![Accuracy by number of sub-instructions]({f})\n"
    bt = m["by_task_type"]
    s += "\n### By task type\n\n" + table(["task type", "instances", "task %", "ILA %", "CLA %"], _eif_rows(bt))
    if charts and bt:
        f = bar_chart(os.path.join(workdir, "accuracy_by_task_type.png"), [str(k) for k in bt],
                      {"ILA": [v["ILA"] for v in bt.values()], "CLA": [v["CLA"] for v in bt.values()]},
                      "EIFBench: accuracy by task type", "task type", horizontal=True)
        s += f"\n![Accuracy by task type]({f})\n"
    return s


def demo_section(m: dict[str, Any], workdir: str, charts: bool) -> str:
    s = "## Demo set (rule-based verifiers as judge)\n\n"
    s += table(["IF %", "IF-S %", "IF-M %", "constraint accuracy %", "items", "constraints", "missing preds"],
               [[pct(m["IF"]), pct(m.get("IF-S")), pct(m.get("IF-M")), pct(m["constraint_accuracy"]), m["n_scored"],
                 m["n_constraints"], m["n_missing_predictions"]]])
    bc = m.get("by_constraint_count", {})
    if bc:
        s += "\n### By number of constraints\n\n" + table(
            ["constraints", "n", "IF %", "constraint accuracy %"],
            [[k, v["n"], pct(v["IF"]), pct(v["constraint_accuracy"])] for k, v in bc.items()])
        if charts:
            f = bar_chart(os.path.join(workdir, "if_by_constraint_count.png"), list(bc),
                          {"IF": [v["IF"] for v in bc.values()]}, "Demo: IF by number of constraints",
                          "constraints per prompt", annot=[f"n={v['n']}" for v in bc.values()])
            s += f"\n![IF by constraint count]({f})\n"
    for key, title in (("by_category", "category"), ("by_lang", "language")):
        if m.get(key):
            s += f"\n### By {title}\n\n" + table(
                [title, "n", "IF %", "constraint accuracy %"],
                [[k, v["n"], pct(v["IF"]), pct(v["constraint_accuracy"])] for k, v in m[key].items()])
    seg = m.get("segpo") or {}
    if seg.get("n"):
        s += "\n### Prompts with sub-instructions (segpo)\n\n" + table(
            ["n", "ILA %", "CLA %", "section format ok %"],
            [[seg["n"], pct(seg["ILA"]), pct(seg["CLA"]), pct(seg["format_ok"])]])
    bd = m.get("by_dimension", {})
    if bd:
        s += "\n### By verifier type\n\n" + table(
            ["type", "constraints", "accuracy %"], [[k, v["n_constraints"], pct(v["constraint_accuracy"])]
                                                   for k, v in bd.items()])
        if charts:
            f = bar_chart(os.path.join(workdir, "accuracy_by_dimension.png"), list(bd),
                          {"accuracy": [v["constraint_accuracy"] for v in bd.values()]},
                          "Demo: accuracy by verifier type", "verifier type", horizontal=True)
            s += f"\n![Accuracy by verifier type]({f})\n"
    return s


def ifeval_section(m: dict[str, Any], workdir: str, charts: bool) -> str:
    s = "## IFEval (lm-eval's instruction checkers)\n\n"
    s += table(["", "prompt level %", "instruction level %", "average %"],
               [["strict", pct(m["prompt_level_strict"]), pct(m["inst_level_strict"]), pct(m["avg_prompt_inst_strict"])],
                ["loose", pct(m["prompt_level_loose"]), pct(m["inst_level_loose"]), pct(m["avg_prompt_inst_loose"])]])
    s += (f"\nPrompts scored: {m['n_scored']} of {m['n_items']} ({m['n_instructions']} instructions; missing "
          f"predictions: {m['n_missing_predictions']}). Prompt level: share of prompts whose instructions all pass; "
          "instruction level: share of all instructions that pass; loose: an instruction also passes when the answer "
          "passes without its first and/or last line or without `*`.\n")
    if charts and m["n_scored"]:
        keys = [("prompt_level_strict", "prompt strict"), ("inst_level_strict", "instruction strict"),
                ("prompt_level_loose", "prompt loose"), ("inst_level_loose", "instruction loose")]
        f = bar_chart(os.path.join(workdir, "ifeval_overall.png"), [lbl for _, lbl in keys],
                      {"accuracy": [m[k] for k, _ in keys]}, f"IFEval: overall accuracy ({m['n_scored']} prompts)",
                      "metric", values=True)
        s += f"\n![IFEval overall]({f})\n"
    for key, title, fname in (("by_category", "instruction category", "ifeval_by_category.png"),
                              ("by_instruction", "instruction type", "ifeval_by_instruction.png")):
        d = m.get(key) or {}
        if not d:
            continue
        s += f"\n### By {title}\n\n" + table([title, "instructions", "strict %", "loose %"],
                                               [[k, v["n"], pct(v["strict"]), pct(v["loose"])] for k, v in d.items()])
        if charts:
            f = bar_chart(os.path.join(workdir, fname), list(d),
                          {"strict": [v["strict"] for v in d.values()], "loose": [v["loose"] for v in d.values()]},
                          f"IFEval: accuracy by {title} ({m['n_scored']} prompts)", title, horizontal=True,
                          annot=[f"(n={v['n']})" for v in d.values()], values=True)
            s += f"\n![IFEval by {title}]({f})\n"
    bn = m.get("by_num_instructions") or {}
    if bn:
        s += "\n### By number of instructions per prompt\n\n" + table(
            ["instructions", "prompts", "prompt strict %", "prompt loose %"],
            [[k, v["n"], pct(v["prompt_strict"]), pct(v["prompt_loose"])] for k, v in bn.items()])
    return s


def write_report(workdir: str, metrics: dict[str, Any], run_info: dict[str, Any], section: str) -> str:
    """Writes ``report.md`` into ``workdir``: the run table, the benchmark's ``section`` (see
    :meth:`evaluation.benchmark.Benchmark.report_section`) and the usage; returns the report path."""
    s = f"# Evaluation report: {run_info.get('model', '?')}\n\n"
    s += table(["field", "value"], [[k, f"`{v}`"] for k, v in run_info.items()])
    s += "\n"
    s += section
    s += _usage_section(metrics.get("usage", {}))
    path = os.path.join(workdir, "report.md")
    io_utils.write_text_atomic(path, s)
    return path
