"""Write the first ``--limit`` TRACE evaluation prompts as a ``python -m iopo_jax.sampling.generate`` input file.

Used for the generation timing of the TRACE case (16 prompts, 200 new tokens, greedy, batch 16)::

    python bench/trace_prompts.py --trace=/path/202409_trace_evaluation.jsonl --limit=16 --out=/tmp/trace16.jsonl
    python -m iopo_jax.sampling.generate --model_dir=... --input=/tmp/trace16.jsonl --output=/tmp/out.jsonl \\
        --max_new_tokens=200 --batch_size=16 --batching=continuous
"""
from __future__ import annotations

import json

from absl import flags

from data_pipeline import cli

flags.DEFINE_string("trace", None, "TRACE evaluation JSONL (read with evaluation.trace.load_trace)", required=True)
flags.DEFINE_integer("limit", 16, "number of items (from the start of the file)")
flags.DEFINE_string("out", None, "output JSONL of {id, messages} records", required=True)
F = flags.FLAGS


def main(argv):
    del argv
    from evaluation.trace import load_trace

    items = load_trace(F.trace, limit=F.limit)
    with open(F.out, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps({"id": it.id, "messages": it.messages}, ensure_ascii=False) + "\n")
    print(f"wrote {len(items)} records to {F.out}")


if __name__ == "__main__":
    cli.run_app(main)
