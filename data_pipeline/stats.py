"""Inspect a data file: record counts, constraint counts, token lengths, truncation, a length histogram.

    python -m data_pipeline.stats ../shared/data/trace/202409_trace_evaluation.jsonl
    python -m data_pipeline.stats data_pipeline/demo_data/iopo_train.json --cutoff_len 128 --png /tmp/len.png
    python -m data_pipeline.stats data/train.json --out=/tmp/report    # -> /tmp/report/train.json.lengths.png
    python -m data_pipeline.stats train.json --kind dpo --tokenizer /path/to/tokenizer --template llama3

The histogram goes to ``--png``, else into ``--out`` (a folder), else next to the first input.
The kind is detected from the first record unless ``--kind`` is given. Token lengths use ``--tokenizer``
(a HF tokenizer directory or hub id); by default the Qwen2 tokenizer is built offline once into
``~/.cache/iopo_jax/qwen2_tokenizer``; ``--tokenizer chars`` counts characters instead. For training
files the length of a record is its longest sequence (prompt + response, chat template applied, before
truncation) and truncation is counted with the joint rule at ``--cutoff_len``; for evaluation files it is
the length of the templated prompt (EIFBench: input + sub-instructions + their constraints) and
"truncated" counts prompts longer than the cutoff. Constraint counts: TRACE ``constraints_num``,
EIFBench constraints per instance (and sub-instructions), IFEval instructions, the demo ``constraints_num``,
and for training files the numbered lines (``1.``, ``2、`` ...) of each prompt.
"""
from __future__ import annotations

import collections
import json
import os
import re
import sys
from typing import Optional

import numpy as np
from absl import flags

from data_pipeline import cli
from data_pipeline.readers import TRAIN_KINDS, KINDS, detect_kind_of_paths, load_records
from data_pipeline.templates import get_template
from data_pipeline.tokenization import record_texts, truncated_lengths
from data_pipeline.tokenizer import build_qwen2_tokenizer, load_tokenizer

_NUMBERED = re.compile(r"^\s*\d+\s*[.、．)）]", re.MULTILINE)
PERCENTILES = (50, 90, 95, 99, 100)


def constraint_counts(kind: str, records: list) -> dict:
    """Named distributions (value -> number of records) of constraint counts."""
    C = collections.Counter
    if kind == "trace":
        return {"constraints": C(r["constraints_num"] for r in records)}
    if kind == "eifbench":
        return {"constraints": C(sum(len(v["scoring_questions"]) for v in r["sub_instructions"].values())
                                 for r in records),
                "sub_instructions": C(len(r["sub_instructions"]) for r in records)}
    if kind == "ifeval":
        return {"instructions": C(len(r["instruction_id_list"]) for r in records)}
    if kind == "demo_eval":
        return {"constraints": C(r["constraints_num"] for r in records)}
    if kind == "iopo":
        return {"constraints_x1": C(len(_NUMBERED.findall(r["x1"])) for r in records),
                "constraints_x2": C(len(_NUMBERED.findall(r["x2"])) for r in records)}
    if kind == "dpo":
        return {"constraints": C(len(_NUMBERED.findall(r["prompt"])) for r in records)}
    return {"constraints_first_turn": C(len(_NUMBERED.findall(r["turns"][0][0])) for r in records)}


def eval_prompt_text(kind: str, r: dict) -> str:
    if kind == "trace":
        return next(m["content"] for m in reversed(r["messages"]) if m["role"] == "user")
    if kind == "eifbench":
        parts = [r.get("input", "")]
        for k, v in r["sub_instructions"].items():
            parts += [k, v["instruction"], *v["scoring_questions"]]
        return "\n".join(parts)
    return r["prompt"]


def _load_tokenizer(spec: Optional[str]):
    if spec == "chars":
        return None
    if spec in (None, "qwen2"):
        cache = os.path.join(os.path.expanduser("~"), ".cache", "iopo_jax", "qwen2_tokenizer")
        if not os.path.isfile(os.path.join(cache, "tokenizer.json")):
            build_qwen2_tokenizer(cache)
        spec = cache
    return load_tokenizer(spec)


def _lengths(tok, texts: list[str]) -> np.ndarray:
    if tok is None:
        return np.array([len(t) for t in texts], dtype=np.int64)
    out = []
    for i in range(0, len(texts), 1000):
        out += [len(x) for x in tok(texts[i:i + 1000], add_special_tokens=False)["input_ids"]]
    return np.array(out, dtype=np.int64)


def compute_stats(paths, kind: Optional[str] = None, tok=None, template: str = "qwen",
                  cutoff_len: int = 2048, skip_invalid: bool = False) -> dict:
    """Everything the CLI prints, as a dict (``lengths`` holds one length per record)."""
    kind = kind or detect_kind_of_paths(paths)
    records, report = load_records(kind, paths, skip_invalid=skip_invalid)
    tpl = get_template(template)
    lengths = np.zeros(len(records), dtype=np.int64)
    truncated = 0
    if records and kind in TRAIN_KINDS:
        texts = [record_texts(kind, r, tpl) for r in records]
        flat = _lengths(tok, [t for ts in texts for t in ts])
        pos = 0
        for i, ts in enumerate(texts):
            lens = flat[pos:pos + len(ts)].tolist()
            pos += len(ts)
            if kind == "iopo":
                seqs = [lens[0] + lens[2], lens[0] + lens[3], lens[1] + lens[3], lens[1] + lens[2]]
            elif kind == "dpo":
                seqs = [lens[0] + lens[1], lens[0] + lens[2]]
            else:
                seqs = [sum(lens)]
            lengths[i] = max(seqs)
            truncated += truncated_lengths(kind, lens, cutoff_len) != lens
    elif records:
        lengths = _lengths(tok, [tpl.prompt(eval_prompt_text(kind, r)) for r in records])
        truncated = int((lengths > cutoff_len).sum())
    pct = {f"p{p}": int(np.percentile(lengths, p)) if len(lengths) else 0 for p in PERCENTILES}
    return {
        "kind": kind,
        "records": len(records),
        "invalid": report.to_dict(),
        "constraint_counts": {k: dict(sorted(v.items())) for k, v in constraint_counts(kind, records).items()},
        "length_unit": "characters" if tok is None else "tokens",
        "length_percentiles": pct,
        "mean_length": float(lengths.mean()) if len(lengths) else 0.0,
        "cutoff_len": cutoff_len,
        "truncated": int(truncated),
        "lengths": lengths.tolist(),
    }


def write_histogram(stats: dict, path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    lengths = stats["lengths"]
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))), color="#4472c4")
    ax.axvline(stats["cutoff_len"], color="#c00000", linestyle="--", label=f"cutoff_len {stats['cutoff_len']}")
    ax.set_xlabel(f"length ({stats['length_unit']})")
    ax.set_ylabel("records")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def format_stats(s: dict) -> str:
    lines = [f"kind: {s['kind']}", f"records: {s['records']} valid"]
    inv = s["invalid"]
    if inv["num_invalid"]:
        lines.append(f"invalid (skipped): {inv['num_invalid']} {inv['invalid_by_reason']}")
    for name, dist in s["constraint_counts"].items():
        vals = ", ".join(f"{k}: {v}" for k, v in dist.items())
        lines.append(f"{name} per record (value: records): {vals}")
    pct = ", ".join(f"{k} {v}" for k, v in s["length_percentiles"].items())
    lines.append(f"length in {s['length_unit']}: mean {s['mean_length']:.1f}, {pct}")
    lines.append(f"truncated at cutoff_len {s['cutoff_len']}: {s['truncated']} of {s['records']}")
    return "\n".join(lines)


def default_png(paths, out: Optional[str] = None) -> str:
    """Where the histogram goes without ``--png``: ``<name of the first input>.lengths.png`` in ``out`` when
    given, else next to that input (in the folder that holds it)."""
    first = os.path.normpath(paths[0])
    name = re.sub(r"[*?\[\]]", "_", os.path.basename(first)) + ".lengths.png"
    return os.path.join(out if out else os.path.dirname(first), name)


PROG = "python -m data_pipeline.stats"
DESCRIPTION = """Record counts, constraint-count distribution, token-length percentiles, truncation counts and a
length histogram PNG for a data file (any format of data_pipeline.readers).

    python -m data_pipeline.stats PATH [PATH ...] [flags]     PATH: files, directories or globs"""


def define_flags(fv) -> None:
    f = flags
    f.DEFINE_enum("kind", None, list(KINDS), "record kind (default: detected)", flag_values=fv)
    f.DEFINE_string("tokenizer", None, "HF tokenizer dir or hub id; 'qwen2' (default) builds Qwen2 offline; "
                    "'chars' counts characters", flag_values=fv)
    f.DEFINE_string("template", "qwen", "chat template: qwen or llama3", flag_values=fv)
    f.DEFINE_integer("cutoff_len", 2048, "truncation length to count against", flag_values=fv)
    f.DEFINE_string("png", None, "histogram path (default: <first input>.lengths.png in --out, else next to that "
                    "input)", flag_values=fv)
    f.DEFINE_string("out", None, "folder of the histogram when --png is not given (default: the folder of the first "
                    "input)", flag_values=fv)
    f.DEFINE_bool("skip_invalid", False, "count bad records instead of stopping at the first", flag_values=fv)
    f.DEFINE_bool("json", False, "also print the statistics as one JSON object", flag_values=fv)


def _main(fv, paths) -> int:
    if not paths:
        raise cli.usage_error(PROG, "give at least one PATH (files, directories or globs)")
    tok = _load_tokenizer(fv.tokenizer)
    s = compute_stats(paths, fv.kind, tok, fv.template, fv.cutoff_len, fv.skip_invalid)
    print(format_stats(s))
    png = fv.png or default_png(paths, fv.out)
    if os.path.dirname(png):
        os.makedirs(os.path.dirname(png), exist_ok=True)
    write_histogram(s, png, f"{os.path.basename(os.path.normpath(paths[0]))} ({s['kind']}, {s['records']} records)")
    print(f"histogram: {png}")
    if fv.json:
        print(json.dumps({k: v for k, v in s.items() if k != "lengths"}, ensure_ascii=False))
    return 0


main = cli.command(PROG, DESCRIPTION, define_flags, _main)

if __name__ == "__main__":
    cli.run(main)
