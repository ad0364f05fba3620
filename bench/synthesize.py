r"""Throughput of the IOPO synthesis pipeline (data_pipeline.synthesize) at a given LLM latency and concurrency.

    python bench/synthesize.py                                   # 48 seeds, latency 0.2 s, concurrency 4,16,48
    python bench/synthesize.py --seeds=96 --latency_s=1.0 --concurrency=8,32

The LLM is the scripted oracle of the tests (tests/fake_synth_llm.py) behind tests/fake_judge.py, answering
every request after ``--latency_s``; half of the seeds carry rule-verifiable constraints, half free-text
ones (judged and edited by the LLM), and the default settings run (edit mix add:1,delete:1,revise:1,
judge_mode auto, LLM coherence check). Reported per concurrency: groups written, wall time, groups per
minute, LLM requests per group, and the keep rate of every stage. This measures the pipeline's own
overhead and its scaling with concurrency; with a real model the latency is the model's.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from data_pipeline import synthesize as S  # noqa: E402
from fake_judge import FakeJudge  # noqa: E402
from fake_synth_llm import oracle_reply  # noqa: E402
from iopo_jax.tools import synthesize as synthesize_cli  # noqa: E402


def seeds(n: int) -> list[dict]:
    out = []
    for i in range(n):
        if i % 2:
            cons = ["Mention the word ORBIT.", "Mention the word COMET."]
        else:
            cons = [{"type": "include_keywords", "keywords": ["planet"]}, {"type": "bullet_count", "n": 3}]
        out.append({"id": f"b{i}", "instruction": f"Describe object number {i} of the solar system.",
                    "constraints": cons})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=48, help="seed instructions")
    ap.add_argument("--latency_s", type=float, default=0.2, help="fake LLM latency per request, seconds")
    ap.add_argument("--concurrency", default="4,16,48", help="comma-separated concurrency levels")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        inp = pathlib.Path(tmp) / "seeds.jsonl"
        inp.write_text("".join(json.dumps(s) + "\n" for s in seeds(args.seeds)))
        for c in [int(x) for x in args.concurrency.split(",")]:
            wd = pathlib.Path(tmp) / f"c{c}"
            with FakeJudge(reply_fn=oracle_reply, latency_s=args.latency_s, record_bodies=False) as fj:
                t0 = time.perf_counter()
                rc = synthesize_cli.main([f"--input={inp}", f"--workdir={wd}", f"--gen_base_url={fj.base_url}",
                                          "--gen_model=fake", f"--concurrency={c}", "--noprogress"])
                wall = time.perf_counter() - t0
                n_req = fj.count()
            assert rc == 0, rc
            rep = json.load(open(wd / "report.json"))
            g = rep["groups"]
            row = {"concurrency": c, "latency_s": args.latency_s, "seeds": args.seeds, "groups": g,
                   "wall_s": round(wall, 2), "groups_per_min": round(g / wall * 60, 1),
                   "requests": n_req, "requests_per_group": round(n_req / max(g, 1), 2),
                   "keep": {k: f"{v['kept']}/{v['in']}" for k, v in rep["stages"].items()},
                   "edit_ops": rep.get("groups_by_edit_op")}
            results.append(row)
            print(json.dumps(row, ensure_ascii=False), flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    import logging

    logging.disable(logging.INFO)
    main()
