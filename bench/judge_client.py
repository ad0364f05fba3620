r"""Benchmark of the judge client (iopo_jax/chat_client.py) against the local fake judge (tests/fake_judge.py).

    python bench/judge_client.py                       # defaults below (~1 minute)
    python bench/judge_client.py --n=500 --concurrency=1,8,64 --pass_items=256 --pass_latency_s=0.2

Part 1, client overhead: judgments/s and mean time per request at each ``--concurrency`` against a
zero-latency fake judge (``--n`` requests each, every reply appended to a JSONL store as in a real run).
Part 2, a full judging pass: ``--pass_items`` TRACE items (the real file when ``--trace_file`` exists,
else synthetic items) judged through :func:`evaluation.driver.run_judging` with our default prompt at
``--pass_concurrency`` against a fake judge that answers after ``--pass_latency_s``; the ideal wall
time is ceil(items / concurrency) * latency.

The fake judge runs in a separate process (``--server=process``, default) so that it does not share
the client's GIL; ``--server=thread`` runs it in this process. Results are printed and, with
``--out=FILE``, written as JSON.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evaluation import driver  # noqa: E402
from iopo_jax import chat_client  # noqa: E402
from evaluation import trace  # noqa: E402

FAKE_JUDGE = REPO / "tests" / "fake_judge.py"
REPLY = 'ok\nFine Grained Score: [{"1": 10}]\nConstraints Overall Score: [[10]]'


class Server:
    """The fake judge, in a child process (default) or in a thread of this process."""

    def __init__(self, latency_s: float, mode: str):
        self.mode = mode
        if mode == "process":
            self.proc = subprocess.Popen([sys.executable, str(FAKE_JUDGE), f"--latency_s={latency_s}",
                                          f"--reply={REPLY}"], stdout=subprocess.PIPE, text=True)
            line = self.proc.stdout.readline().split()
            if len(line) != 2 or line[0] != "PORT":
                self.proc.kill()
                raise RuntimeError(f"fake judge did not start (got {line!r})")
            self.base_url = f"http://127.0.0.1:{line[1]}/v1"
        else:
            spec = importlib.util.spec_from_file_location("fake_judge", FAKE_JUDGE)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            self.judge = mod.FakeJudge(reply_fn=lambda body: REPLY, latency_s=latency_s, record_bodies=False).start()
            self.base_url = self.judge.base_url

    def stop(self) -> None:
        if self.mode == "process":
            self.proc.kill()
            self.proc.wait()
        else:
            self.judge.stop()


def bench_overhead(base_url: str, concurrency: int, n: int, tmp: str) -> dict:
    store = os.path.join(tmp, f"store_c{concurrency}.jsonl")
    cfg = chat_client.ClientConfig(base_url=base_url, model="bench", concurrency=concurrency, store_path=store,
                                 timeout_s=30)
    client = chat_client.ChatClient(cfg)
    msgs = [[{"role": "user", "content": f"warm-up {i}"}] for i in range(min(n, 2 * concurrency))]
    with cf.ThreadPoolExecutor(concurrency) as ex:  # open the keep-alive connections first
        list(ex.map(client.complete, msgs))
    lat = []

    def one(i):
        t = time.perf_counter()
        client.complete([{"role": "user", "content": f"question {i}: " + "x" * 200}])
        lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(one, range(n)))
    wall = time.perf_counter() - t0
    client.close()
    return {"concurrency": concurrency, "requests": n, "wall_s": round(wall, 3),
            "judgments_per_s": round(n / wall, 1), "mean_latency_ms": round(1000 * statistics.mean(lat), 3),
            "p99_latency_ms": round(1000 * sorted(lat)[int(0.99 * (len(lat) - 1))], 3),
            "wall_per_request_ms": round(1000 * wall / n, 3)}


def trace_items(path: str, n: int) -> list[trace.TraceItem]:
    items = trace.load_trace(path, limit=n) if path and os.path.isfile(path) else []
    while len(items) < n:  # synthetic items (or more than the file holds)
        i = len(items)
        items.append(trace.TraceItem(id=f"syn{i}", messages=[{"role": "user", "content": f"Task {i}\n1. c"}],
                                     description=f"Task {i}", constraints="1. c", constraints_num=1, levels2=["x"]))
    return items


def bench_pass(base_url: str, items: list, concurrency: int, latency_s: float, tmp: str) -> dict:
    spec = trace.TraceJudgeSpec()
    preds = {it.id: f"answer {it.id}" for it in items}
    units = trace.judge_units(spec, items, preds)
    cfg = chat_client.ClientConfig(base_url=base_url, model="bench", concurrency=concurrency,
                                 store_path=os.path.join(tmp, "pass_store.jsonl"), timeout_s=30 + 2 * latency_s)
    client = chat_client.ChatClient(cfg)
    t0 = time.perf_counter()
    res = driver.run_judging(units, client, trace.TraceBenchmark().parse, os.path.join(tmp, "judgments.jsonl"),
                             concurrency=concurrency, progress=False)
    wall = time.perf_counter() - t0
    client.close()
    ok = sum(r["status"] == "ok" for r in res.values())
    ideal = math.ceil(len(units) / concurrency) * latency_s
    return {"items": len(units), "ok": ok, "concurrency": concurrency, "latency_s": latency_s,
            "wall_s": round(wall, 2), "ideal_s": round(ideal, 2), "overhead_pct": round(100 * (wall / ideal - 1), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3000, help="requests per concurrency level (part 1)")
    ap.add_argument("--concurrency", default="1,8,64", help="comma-separated concurrency levels (part 1)")
    ap.add_argument("--pass_items", type=int, default=1042, help="items in the judging pass (part 2); 0 = skip")
    ap.add_argument("--pass_latency_s", type=float, default=1.0, help="fake judge latency in the pass")
    ap.add_argument("--pass_concurrency", type=int, default=32)
    ap.add_argument("--trace_file", default=str(REPO.parent / "shared/data/trace/202409_trace_evaluation.jsonl"))
    ap.add_argument("--server", choices=("process", "thread"), default="process")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args()
    results = {"python": platform.python_version(), "cpus": os.cpu_count(), "server": args.server,
               "overhead": [], "pass": None}
    with tempfile.TemporaryDirectory() as tmp:
        if args.n:
            srv = Server(0.0, args.server)
            try:
                for c in (int(x) for x in args.concurrency.split(",") if x):
                    r = bench_overhead(srv.base_url, c, args.n, tmp)
                    results["overhead"].append(r)
                    print(f"concurrency {c:3d}: {r['judgments_per_s']:8.1f} judgments/s, mean latency "
                          f"{r['mean_latency_ms']:.2f} ms (p99 {r['p99_latency_ms']:.2f} ms), wall/request "
                          f"{r['wall_per_request_ms']:.3f} ms over {r['requests']} requests", flush=True)
            finally:
                srv.stop()
        if args.pass_items:
            srv = Server(args.pass_latency_s, args.server)
            try:
                items = trace_items(args.trace_file, args.pass_items)
                r = bench_pass(srv.base_url, items, args.pass_concurrency, args.pass_latency_s, tmp)
                results["pass"] = r
                print(f"judging pass: {r['items']} items ({r['ok']} ok) at concurrency {r['concurrency']}, "
                      f"judge latency {r['latency_s']} s: wall {r['wall_s']} s (ideal {r['ideal_s']} s, "
                      f"+{r['overhead_pct']}%)", flush=True)
            finally:
                srv.stop()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
