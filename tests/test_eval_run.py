"""End-to-end tests of the evaluation CLI: fault injection, SIGKILL + resume, secrets, budget, compare."""
import collections
import hashlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from evaluation import compare as compare_lib
from evaluation import driver
from iopo_jax import io_utils
from tests.fake_judge import FakeJudge

REPO = pathlib.Path(__file__).resolve().parents[1]
TRACE_FILE = "trace/202409_trace_evaluation.jsonl"
SECRET = "sk-iopo-test-7f3a9c0e5d1b2a4f6e8d0c2b"
VOLATILE = ("usage", "run", "generation_stats")  # run-specific fields of metrics.json


def _h(*parts) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest(), 16)


def _rows(shared_data, n):
    with open(shared_data / TRACE_FILE, encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def _preds(rows, path):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"id": r["id"], "response": f"ANSWER-{r['id']}."}) + "\n")
    return str(path)


def _always_garbage(uid):
    return _h("g", uid) % 9 == 0


def _score(uid):
    return 10 if _h("s", uid) % 3 else 6


def _reply(garbage=True):
    def reply(body):
        uid = re.search(r"ANSWER-(\d+)\.", body["messages"][-1]["content"]).group(1)
        if garbage and _always_garbage(uid):
            return "Looks reasonable overall."
        return f"fine\nConstraints Overall Score: [[{_score(uid)}]]"
    return reply


def _cli(args, env_extra=None, popen=False):
    env = dict(os.environ)
    env.pop("IOPO_TEST_JUDGE_KEY", None)
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "evaluation.run", "--config=configs/eval_trace.py"] + args
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _common(shared_data, preds, fj, workdir, *extra):
    return [f"--config.data.path={shared_data / TRACE_FILE}", f"--config.generation.predictions={preds}",
            f"--config.judge.base_url={fj.base_url}",
            "--config.judge.api_key_env=IOPO_TEST_JUDGE_KEY", f"--workdir={workdir}", "--config.judge.backoff_base_s=0.01",
            "--config.judge.backoff_max_s=0.05", *extra]


def _stable(m):
    return {k: v for k, v in m.items() if k not in VOLATILE}


def test_fault_injection_run_completes_and_never_rejudges(shared_data, tmp_path):
    n = 60
    rows = _rows(shared_data, n)
    preds = _preds(rows, tmp_path / "preds.jsonl")
    faults = {2: "timeout", 4: "429", 6: "500", 8: "drop", 10: "bad_json", 12: "garbage", 14: "503", 16: "429"}
    wd = tmp_path / "run"
    with FakeJudge(reply_fn=_reply(), faults=faults, api_key=SECRET, echo_headers_in_errors=True,
                   timeout_sleep_s=1.5, retry_after_s=0.2) as fj:
        r = _cli(_common(shared_data, preds, fj, wd, f"--config.data.limit={n}", "--config.judge.concurrency=4",
                         "--config.judge.timeout_s=0.6", "--config.judge.max_parse_retries=2"),
                 env_extra={"IOPO_TEST_JUDGE_KEY": SECRET})
        reqs = list(fj.requests)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (wd / "eval.log").read_text()
    for what in ("timeout after", "HTTP 429", "Retry-After 0.2", "HTTP 500", "HTTP 503", "connection dropped",
                 "malformed response body"):
        assert re.search(rf"judge request \w+: .*{re.escape(what)}.*retry", log), what
        assert what in r.stderr, what  # the same retry lines reach the console log
    assert "unparseable" in log
    m = json.loads((wd / "metrics.json").read_text())
    n_garbage = sum(_always_garbage(x["id"]) for x in rows)
    assert n_garbage > 0 and m["n_unparseable"] == n_garbage and m["n_judge_errors"] == 0
    assert m["n_scored"] == n - n_garbage
    scored = [x for x in rows if not _always_garbage(x["id"])]
    assert m["IF"] == pytest.approx(sum(_score(x["id"]) == 10 for x in scored) / len(scored))
    assert m["usage"]["judge"]["retries"] == 7  # one per transport fault ("garbage" is a parse retry)
    # No item is judged again once a parseable verdict came back.
    by_prompt = collections.defaultdict(list)
    for q in sorted(reqs, key=lambda q: q.number):
        by_prompt[json.dumps(q.body.get("messages"), ensure_ascii=False)].append(q)
    assert len(by_prompt) == n
    for qs in by_prompt.values():
        good = [i for i, q in enumerate(qs) if q.fault is None and q.status == 200
                and "Constraints Overall Score" in (q.reply_text or "")]
        if good:
            assert good == [len(qs) - 1], [(q.number, q.fault, q.status) for q in qs]
        else:
            # Always-garbage item: exactly 1 + 2 (parse retries) completions were delivered.
            assert len([q for q in qs if q.fault in (None, "garbage") and q.status == 200]) == 3
    js = io_utils.read_jsonl(str(wd / "judgments.jsonl"))
    assert sorted(j["id"] for j in js) == sorted(x["id"] for x in rows)
    # The secret was sent to the server, echoed back in error bodies, and appears nowhere on our side.
    assert reqs[0].headers["Authorization"] == f"Bearer {SECRET}"
    assert SECRET not in r.stdout and SECRET not in r.stderr
    for p in wd.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p
    assert "request_headers" in log  # the echoing error bodies did reach the log, redacted


def test_sigkill_mid_run_then_resume_equals_uninterrupted_run(shared_data, tmp_path):
    n = 240
    rows = _rows(shared_data, n)
    preds = _preds(rows, tmp_path / "preds.jsonl")
    env = {"IOPO_TEST_JUDGE_KEY": SECRET}
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    with FakeJudge(reply_fn=_reply(garbage=False), latency_s=0.04, api_key=SECRET) as fj:
        args = _common(shared_data, preds, fj, killed, f"--config.data.limit={n}", "--config.judge.concurrency=4")
        p = _cli(args, env_extra=env, popen=True)
        jpath = killed / "judgments.jsonl"
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120:
            if jpath.exists() and jpath.read_bytes().count(b"\n") >= 60:
                break
            if p.poll() is not None:
                break
            time.sleep(0.02)
        assert p.poll() is None, "the run finished before it could be killed"
        p.send_signal(signal.SIGKILL)
        _, err1 = p.communicate(timeout=30)
        assert p.returncode == -signal.SIGKILL
        n_before = jpath.read_bytes().count(b"\n")
        assert 60 <= n_before < n
        assert not (killed / "metrics.json").exists()
        sent_before = fj.count()
        r2 = _cli(args, env_extra=env)
        assert r2.returncode == 0, r2.stderr[-3000:]
        resumed_requests = fj.requests[sent_before:]
        r3 = _cli(_common(shared_data, preds, fj, clean, f"--config.data.limit={n}", "--config.judge.concurrency=4"), env_extra=env)
        assert r3.returncode == 0, r3.stderr[-3000:]
    # No lost and no duplicated judgments.
    js = io_utils.read_jsonl(str(jpath))
    assert [j["id"] for j in js] == [x["id"] for x in rows]
    assert all(j["status"] == "ok" for j in js)
    # The rerun re-sent only what had no stored reply (at most the requests in flight at the kill).
    cache = io_utils.read_jsonl(str(killed / "judge_cache.jsonl"))
    assert len({c["key"] for c in cache}) == len(cache) == n
    assert len(resumed_requests) <= n - n_before + 4
    # Same metrics as the uninterrupted run.
    m_killed = json.loads((killed / "metrics.json").read_text())
    m_clean = json.loads((clean / "metrics.json").read_text())
    assert _stable(m_killed) == _stable(m_clean)
    assert m_killed["usage"]["judge"]["cache_hits"] >= 0
    # No secret anywhere.
    for text in (err1, r2.stdout, r2.stderr, r3.stdout, r3.stderr):
        assert SECRET not in text
    for d in (killed, clean):
        for f in d.rglob("*"):
            if f.is_file():
                assert SECRET.encode() not in f.read_bytes(), f


def test_budget_stops_then_rerun_finishes(shared_data, tmp_path):
    from configs import eval_trace
    from evaluation import runner as run_lib
    rows = _rows(shared_data, 30)
    preds = _preds(rows, tmp_path / "preds.jsonl")

    def cfg(fj, budget):
        c = eval_trace.get_config()
        c.workdir, c.data.path, c.data.limit = str(tmp_path / "run"), str(shared_data / TRACE_FILE), 30
        c.generation.predictions, c.judge.base_url, c.judge.api_key_env = preds, fj.base_url, ""
        c.judge.request_budget, c.judge.concurrency, c.progress = budget, 4, False
        return c

    with FakeJudge(reply_fn=_reply(garbage=False)) as fj:
        m1 = run_lib.evaluate(cfg(fj, 12))
        assert len(fj.requests) == 12
        assert m1["n_scored"] == 12 and m1["n_judge_errors"] == 18
        js = io_utils.read_jsonl(str(tmp_path / "run" / "judgments.jsonl"))
        assert len(js) == 30 and sum(j["status"] == "error" for j in js) == 18
        assert all("budget" in j["error"] for j in js if j["status"] == "error")
        m2 = run_lib.evaluate(cfg(fj, 0))
        assert len(fj.requests) == 30  # only the 18 missing ones were sent
    assert m2["n_scored"] == 30 and m2["n_judge_errors"] == 0
    js = io_utils.read_jsonl(str(tmp_path / "run" / "judgments.jsonl"))
    assert [j["id"] for j in js] == [x["id"] for x in rows] and all(j["status"] == "ok" for j in js)


def test_judgments_file_with_torn_tail_resumes(tmp_path):
    path = str(tmp_path / "judgments.jsonl")
    units = [driver.JudgeUnit(id=str(i), messages=[{"role": "user", "content": f"q{i}"}]) for i in range(6)]
    with open(path, "w") as f:
        f.write(json.dumps({"id": "0", "status": "ok", "x": 1}) + "\n")
        f.write(json.dumps({"id": "1", "status": "error"}) + "\n")
        f.write('{"id": "2", "status": "o')  # torn by SIGKILL
    from iopo_jax import chat_client
    with FakeJudge(reply_fn=lambda b: "fine") as fj:
        client = chat_client.ChatClient(chat_client.ClientConfig(base_url=fj.base_url, model="m"))
        res = driver.run_judging(units, client, lambda u, t: driver.Parsed(True, {"x": 2}), path, progress=False)
        assert len(fj.requests) == 5  # "0" was final already
    assert res["0"]["x"] == 1 and all(res[str(i)]["x"] == 2 for i in range(1, 6))
    assert [j["id"] for j in io_utils.read_jsonl(path)] == [str(i) for i in range(6)]


def test_compare_cli(tmp_path):
    def write(d, if_s, dims):
        d.mkdir()
        m = {"benchmark": "trace", "IF-S": if_s, "IF-M": 0.5, "IF": 0.55, "mean_score": 8.0, "n_scored": 10,
             "n_unparseable": 0, "n_judge_errors": 0,
             "by_constraint_count": {"1": {"n": 5, "IF": if_s, "mean_score": 8.0}},
             "by_dimension": {k: {"n_items": 3, "IF": v, "n_constraints": 4, "constraint_accuracy": v}
                              for k, v in dims.items()},
             "by_category": {}}
        (d / "metrics.json").write_text(json.dumps(m, ensure_ascii=False))
        return m
    a = write(tmp_path / "base", 0.725, {"数值约束": 0.5, "主题约束": 0.8})
    b = write(tmp_path / "iopo", 0.82, {"数值约束": 0.625, "主题约束": 0.75})
    d = compare_lib.deltas(a, b)
    assert d["headline"]["IF-S"] == pytest.approx(0.82 - 0.725)
    assert d["breakdowns"]["by_dimension"]["数值约束"]["constraint_accuracy"] == pytest.approx(0.125)
    r = subprocess.run([sys.executable, "-m", "evaluation.compare", str(tmp_path / "base"), str(tmp_path / "iopo")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "| IF-S | 72.5 | 82.0 | +9.5 |" in r.stdout
    assert "Numerical (数值约束) | 50.0 | 62.5 | +12.5" in r.stdout
    assert "Topic (主题约束) | 80.0 | 75.0 | -5.0" in r.stdout
    assert (tmp_path / "iopo" / "compare_vs_base.md").read_text() in r.stdout
