"""Inspect a data file: record counts, constraint counts, token lengths, truncation, a length histogram.

    python -m data_pipeline.stats ../shared/data/trace/202409_trace_evaluation.jsonl
    python -m data_pipeline.stats data_pipeline/demo_data/iopo_train.json --cutoff_len 128 --png /tmp/len.png
    python -m data_pipeline.stats train.json --kind dpo --tokenizer /path/to/tokenizer --template llama3

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

import argparse
import collections
import json
import os
import re
import sys
from typing import Optional

import numpy as np

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_pipeline.stats",
        description="Record counts, constraint-count distribution, token-length percentiles, truncation counts "
                    "and a length histogram PNG for a data file (any format of data_pipeline.readers).")
    ap.add_argument("paths", nargs="+", help="files, directories or globs")
    ap.add_argument("--kind", choices=KINDS, default=None, help="record kind (default: detected)")
    ap.add_argument("--tokenizer", default=None,
                    help="HF tokenizer dir or hub id; 'qwen2' (default) builds Qwen2 offline; 'chars' counts characters")
    ap.add_argument("--template", default="qwen", help="chat template: qwen (default) or llama3")
    ap.add_argument("--cutoff_len", type=int, default=2048, help="truncation length to count against (default 2048)")
    ap.add_argument("--png", default=None, help="histogram path (default: ./<first file name>.lengths.png)")
    ap.add_argument("--skip_invalid", action="store_true", help="count bad records instead of stopping at the first")
    ap.add_argument("--json", action="store_true", help="also print the statistics as one JSON object")
    args = ap.parse_args(argv)
    tok = _load_tokenizer(args.tokenizer)
    s = compute_stats(args.paths, args.kind, tok, args.template, args.cutoff_len, args.skip_invalid)
    print(format_stats(s))
    png = args.png or os.path.basename(os.path.normpath(args.paths[0])) + ".lengths.png"
    write_histogram(s, png, f"{os.path.basename(os.path.normpath(args.paths[0]))} ({s['kind']}, {s['records']} records)")
    print(f"histogram: {png}")
    if args.json:
        print(json.dumps({k: v for k, v in s.items() if k != "lengths"}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
