"""Benchmark of the input pipeline: tokenise + batch synthetic IOPO groups, cold and warm (cached).

    python bench/input_pipeline.py                      # 2,000 groups (short default run)
    python bench/input_pipeline.py --groups 20000       # the issue's size (~1,000 tokens per group)
    python bench/input_pipeline.py --tokenizer /path/to/tokenizer --batch_size 8 --cutoff_len 1024

Prints groups/s for: cold (tokenise + write cache + one epoch of batches) with one process and with
``--num_proc`` processes (HF datasets map), warm (load the cache + one epoch of batches), and batch
assembly alone. Synthetic groups mix English and Chinese text: two prompts of ~350 tokens and two
responses of ~150 tokens, i.e. ~1,000 tokens of text per group (4 sequences of ~500 tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline import BatchIterator, TokenizedDataset  # noqa: E402

EN = ("the model must follow every constraint in the instruction and answer with a short clear text about "
      "rivers mountains tea music data training evaluation").split()
ZH = list("模型需要遵守指令中的每一个约束并给出简短清晰的回答关于河流高山茶音乐数据训练评估")


def synthetic_groups(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(n_en, n_zh):
        words = [rng.choice(EN) for _ in range(n_en)]
        zh = "".join(rng.choice(ZH) for _ in range(n_zh))
        cut = rng.randrange(len(words))
        return " ".join(words[:cut]) + " " + zh + " " + " ".join(words[cut:])

    out = []
    for i in range(n):
        x = text(230, 130)
        cons = "\n".join(f"{j}. constraint number {j} {rng.choice(EN)}" for j in range(1, 4))
        out.append({"id": f"g{i}", "system": None, "x1": x + "\n" + cons, "x2": x + "\n" + cons + "\n4. one more rule",
                    "y1": text(90, 60), "y2": text(90, 60)})
    return out


def _epoch(ds, batch_size: int) -> int:
    it = BatchIterator(ds, batch_size, seed=0, num_epochs=1, drop_last=False)
    n = 0
    for b in it:
        n += int(b["valid"].sum()) // ds.num_sequences
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/input_pipeline.py",
                                 description="Input-pipeline benchmark: groups/s cold vs warm, 1 vs N processes.")
    ap.add_argument("--groups", type=int, default=2000, help="synthetic IOPO groups (default 2000; the issue uses 20000)")
    ap.add_argument("--batch_size", type=int, default=8, help="groups per batch (default 8)")
    ap.add_argument("--cutoff_len", type=int, default=1024, help="truncation length (default 1024)")
    ap.add_argument("--num_proc", type=int, default=2, help="processes for the parallel cold run (default 2)")
    ap.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default: build Qwen2 offline in a temp dir)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON line too")
    args = ap.parse_args(argv)

    from data_pipeline.tokenizer import build_qwen2_tokenizer, load_tokenizer

    work = tempfile.mkdtemp(prefix="bench_data_")
    try:
        tok = load_tokenizer(args.tokenizer or build_qwen2_tokenizer(os.path.join(work, "tok")))
        recs = synthetic_groups(args.groups)
        kw = dict(tok=tok, kind="iopo", cutoff_len=args.cutoff_len)
        res = {"groups": args.groups, "batch_size": args.batch_size, "cutoff_len": args.cutoff_len,
               "cpus": os.cpu_count(), "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "(unset)")}

        t0 = time.perf_counter()
        ds = TokenizedDataset.build(recs, cache_dir=os.path.join(work, "c1"), num_proc=1, **kw)
        t1 = time.perf_counter()
        _epoch(ds, args.batch_size)
        t2 = time.perf_counter()
        res["tokens_per_group"] = round(ds.meta["num_tokens_untruncated"] / args.groups, 1)
        res["truncated_groups"] = ds.num_truncated()
        res["cold_1proc_tokenise_s"] = round(t1 - t0, 2)
        res["cold_1proc_groups_per_s"] = round(args.groups / (t2 - t0), 1)
        res["batch_only_groups_per_s"] = round(args.groups / (t2 - t1), 1)

        t0 = time.perf_counter()
        ds2 = TokenizedDataset.build(recs, cache_dir=os.path.join(work, "c1"), num_proc=1, **kw)
        t1 = time.perf_counter()
        assert ds2.meta["cache_hit"], "expected a cache hit"
        _epoch(ds2, args.batch_size)
        t2 = time.perf_counter()
        res["warm_load_s"] = round(t1 - t0, 3)
        res["warm_groups_per_s"] = round(args.groups / (t2 - t0), 1)

        t0 = time.perf_counter()
        ds3 = TokenizedDataset.build(recs, cache_dir=os.path.join(work, "c2"), num_proc=args.num_proc, **kw)
        t1 = time.perf_counter()
        _epoch(ds3, args.batch_size)
        t2 = time.perf_counter()
        assert ds3.fingerprint == ds.fingerprint
        res[f"cold_{args.num_proc}proc_tokenise_s"] = round(t1 - t0, 2)
        res[f"cold_{args.num_proc}proc_groups_per_s"] = round(args.groups / (t2 - t0), 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    w = max(len(k) for k in res)
    for k, v in res.items():
        print(f"{k:<{w}}  {v}")
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
