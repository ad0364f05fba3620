"""TRACE evaluator tests: loading, prompt rendering (official template parity), parsing, metrics end to end."""
import collections
import hashlib
import json
import re

import pytest

from configs import eval_trace
from iopo_jax import io_utils
from evaluation import runner as run_lib
from evaluation import trace
from tests.fake_judge import FakeJudge

TRACE_FILE = "trace/202409_trace_evaluation.jsonl"
OFFICIAL_TEMPLATE = "prompts/trace_judge_prompt.txt"
# The format_str documented in ../shared/data/README.md, written out here independently of evaluation/.
README_FORMAT_STR = json.dumps([{"密码至少8个字符": 10, "包含1个大写字母": 0, "包含1个小写字母": 0, "包含2个数字": 10}],
                               ensure_ascii=False)


def _rows(shared_data):
    with open(shared_data / TRACE_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _write_predictions(rows, path):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"id": r["id"], "response": f"ANSWER-{r['id']} 回答"}, ensure_ascii=False) + "\n")


def _h(*parts) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest(), 16)


def scripted(row):
    """The fake judge's verdict for an item: (overall score or None for garbage, per-constraint scores)."""
    h = _h("trace", row["id"])
    n = row["constraints_num"]
    if h % 41 == 0:
        return None, None  # always garbage: unparseable
    if h % 3 == 0:
        return 10.0, [10] * n
    per = [10 if (h >> (k + 4)) & 1 else (h >> (k + 9)) % 10 for k in range(n)]
    overall = float(min(per)) if min(per) < 10 else 9.0
    if h % 17 == 0:
        per = per[:-1] if n > 1 else per + [3]  # wrong length: per-constraint scores unusable
    return overall, per


def make_reply(rows_by_id):
    def reply(body):
        prompt = body["messages"][-1]["content"]
        uid = re.search(r"ANSWER-(\d+) 回答", prompt).group(1)
        overall, per = scripted(rows_by_id[uid])
        if overall is None:
            return "The answer is fine I guess."
        fine = json.dumps([{str(k + 1): s for k, s in enumerate(per)}])
        return f"1. ok...\nFine Grained Score: {fine}\nConstraints Overall Score: [[{overall:g}]]"
    return reply


def expected_metrics(rows):
    """Independent computation of the TRACE metrics from the scripted verdicts."""
    scored = []
    unparseable = 0
    for r in rows:
        overall, per = scripted(r)
        if overall is None:
            unparseable += 1
            continue
        scored.append((r, overall, per if len(per) == r["constraints_num"] else None))
    def rate(xs):
        return sum(xs) / len(xs)
    exp = {
        "IF": rate([s == 10 for _, s, _ in scored]),
        "IF-S": rate([s == 10 for r, s, _ in scored if r["constraints_num"] == 1]),
        "IF-M": rate([s == 10 for r, s, _ in scored if 2 <= r["constraints_num"] <= 15]),
        "mean_score": rate([s for _, s, _ in scored]),
        "n_scored": len(scored), "n_unparseable": unparseable,
    }
    by_n = collections.defaultdict(list)
    for r, s, _ in scored:
        by_n[str(r["constraints_num"])].append(s == 10)
    exp["by_count_IF"] = {k: rate(v) for k, v in by_n.items()}
    dim_c = collections.defaultdict(list)
    dim_i = collections.defaultdict(list)
    for r, s, per in scored:
        for lab in set(r["levels2"]):
            dim_i[lab].append(s == 10)
        if per is not None:
            for lab, c in zip(r["levels2"], per):
                dim_c[lab].append(c == 10)
    exp["dim_constraint_acc"] = {k: rate(v) for k, v in dim_c.items()}
    exp["dim_IF"] = {k: rate(v) for k, v in dim_i.items()}
    return exp


def _config(shared_data, tmp_path, fj, **over):
    c = eval_trace.get_config()
    c.workdir = str(tmp_path / "run")
    c.data.path = str(shared_data / TRACE_FILE)
    c.generation.predictions = str(tmp_path / "preds.jsonl")
    c.judge.base_url = fj.base_url
    c.judge.api_key_env = ""
    c.judge.concurrency = 16
    c.judge.backoff_base_s = 0.01
    c.judge.backoff_max_s = 0.05
    c.progress = False
    c.update_from_flattened_dict(over)  # dotted keys, e.g. "judge.concurrency"
    return c


def test_load_trace_real_file(shared_data):
    items = trace.load_trace(str(shared_data / TRACE_FILE))
    assert len(items) == 1042
    assert sum(it.constraints_num == 1 for it in items) == 200
    assert all(len(it.levels2) == it.constraints_num for it in items)
    assert trace.load_trace(str(shared_data / TRACE_FILE), limit=7)[-1].id == items[6].id
    # The query is the full user message (no item contains NULL in its message).
    assert items[0].query == items[0].messages[-1]["content"]


def test_load_trace_errors_name_file_line_field(tmp_path):
    good = {"id": "1", "messages": [{"role": "user", "content": "x"}], "description": "d", "constraints": "1. c",
            "constraints_num": 1, "levels2": ["a"]}
    p = tmp_path / "t.jsonl"
    bad = dict(good, id="2")
    del bad["levels2"]
    p.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"t\.jsonl:2: missing field 'levels2'"):
        trace.load_trace(str(p))
    p.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, constraints_num=0)) + "\n")
    with pytest.raises(ValueError, match=r"t\.jsonl:2: field 'constraints_num'"):
        trace.load_trace(str(p))


def test_query_falls_back_to_description_when_message_has_null():
    it = trace.TraceItem(id="x", messages=[{"role": "user", "content": "task\n# Inputs:\nNULL"}], description="task",
                         constraints="1. c", constraints_num=1, levels2=["a"])
    assert it.query == "task"


def test_parse_judgment():
    ok = trace.parse_judgment('x\nFine Grained Score: [{"a": 10, "b": 7}]\nConstraints Overall Score: [[7]]', 2)
    assert ok.ok and ok.fields == {"score": 7.0, "constraint_scores": [10.0, 7.0]}
    assert trace.parse_judgment("Constraints Overall Score:  [[10.0]]", 1).fields["score"] == 10.0
    assert trace.parse_judgment("Constraints Overall Score: [[10]]", 1).fields["constraint_scores"] is None
    # First match decides (like the public evaluator's re.search).
    assert trace.parse_judgment("Constraints Overall Score: [[3]] ... Constraints Overall Score: [[10]]",
                                1).fields["score"] == 3.0
    for bad in ["no score here", "Constraints Overall Score: [[.]]", "Constraints Overall Score: [[11]]",
                "Constraints Overall Score: [10]", ""]:
        assert not trace.parse_judgment(bad, 1).ok, bad
    # Per-constraint variants: list of numbers, a single object, wrong length.
    assert trace.parse_fine_grained("Fine Grained Score: [10, 0, 5]", 3) == [10.0, 0.0, 5.0]
    assert trace.parse_fine_grained('Fine Grained Score: {"1": 10, "2": "8"}', 2) == [10.0, 8.0]
    assert trace.parse_fine_grained('Fine Grained Score: [{"1": 10}]', 2) is None


def test_official_template_rendering_matches_character_for_character(shared_data, tmp_path):
    """The judge request built with --judge_template=official equals official.format(item fields)."""
    official = (shared_data / OFFICIAL_TEMPLATE).read_text(encoding="utf-8")
    rows = _rows(shared_data)[:12]
    _write_predictions(rows, tmp_path / "preds.jsonl")
    with FakeJudge(reply_fn=lambda b: "Constraints Overall Score: [[10]]") as fj:
        cfg = _config(shared_data, tmp_path, fj, **{"judge.template": str(shared_data / OFFICIAL_TEMPLATE),
                                                   "data.limit": 12, "judge.concurrency": 1})
        run_lib.evaluate(cfg)
        received = {json.dumps(r.body["messages"], ensure_ascii=False) for r in fj.requests}
    assert len(received) == 12
    for r in rows:
        user = [m for m in r["messages"] if m["role"] == "user"][-1]["content"]
        query = r["description"] if "NULL" in user else user
        expected = official.format(format_str=README_FORMAT_STR, description=query, constraints=r["constraints"],
                                   ans=f"ANSWER-{r['id']} 回答")
        assert json.dumps([{"role": "user", "content": expected}], ensure_ascii=False) in received


def test_default_template_is_our_own_wording(shared_data):
    official = (shared_data / OFFICIAL_TEMPLATE).read_text(encoding="utf-8")
    ours = trace.DEFAULT_JUDGE_TEMPLATE
    # No sentence of the official template appears in ours.
    for line in official.splitlines():
        line = line.strip()
        if len(line) > 25 and "{" not in line:
            assert line not in ours, line
    assert "Constraints Overall Score: [[score]]" in ours and "Fine Grained Score:" in ours


def test_trace_metrics_end_to_end_match_independent_computation(shared_data, tmp_path):
    rows = _rows(shared_data)
    _write_predictions(rows, tmp_path / "preds.jsonl")
    by_id = {r["id"]: r for r in rows}
    with FakeJudge(reply_fn=make_reply(by_id)) as fj:
        m = run_lib.evaluate(_config(shared_data, tmp_path, fj, **{"judge.max_parse_retries": 1}))
        n_requests = len(fj.requests)
    exp = expected_metrics(rows)
    assert m["n_items"] == 1042 and m["n_scored"] == exp["n_scored"] and m["n_unparseable"] == exp["n_unparseable"]
    assert exp["n_unparseable"] > 0 and m["n_judge_errors"] == 0
    # Unparseable items were asked once more (max_parse_retries=1), others once.
    assert n_requests == 1042 + exp["n_unparseable"]
    for k in ("IF", "IF-S", "IF-M", "mean_score"):
        assert m[k] == pytest.approx(exp[k]), k
    assert m["n_S"] + m["n_M"] == exp["n_scored"]
    assert {k: v["IF"] for k, v in m["by_constraint_count"].items()} == pytest.approx(exp["by_count_IF"])
    assert {k: v["constraint_accuracy"] for k, v in m["by_dimension"].items()
            if v["constraint_accuracy"] is not None} == pytest.approx(exp["dim_constraint_acc"])
    assert {k: v["IF"] for k, v in m["by_dimension"].items()} == pytest.approx(exp["dim_IF"])
    # Outputs of the run.
    wd = tmp_path / "run"
    for name in ("predictions.jsonl", "judgments.jsonl", "metrics.json", "report.md", "config.json",
                 "if_by_constraint_count.png", "accuracy_by_dimension.png"):
        assert (wd / name).exists(), name
    js = io_utils.read_jsonl(str(wd / "judgments.jsonl"))
    assert [j["id"] for j in js] == [r["id"] for r in rows]
    assert json.loads((wd / "metrics.json").read_text())["IF-M"] == pytest.approx(exp["IF-M"])
    report = (wd / "report.md").read_text()
    assert f"{100 * exp['IF-S']:.1f}" in report and "![IF by constraint count]" in report
    # A second run in the same workdir judges nothing again and gives the same metrics.
    with FakeJudge(reply_fn=make_reply(by_id)) as fj2:
        m2 = run_lib.evaluate(_config(shared_data, tmp_path, fj2, **{"judge.max_parse_retries": 1}))
        assert len(fj2.requests) == 0
    for k in ("IF", "IF-S", "IF-M", "mean_score", "by_dimension", "by_constraint_count", "n_unparseable"):
        assert m2[k] == m[k]


def test_workdir_refuses_a_different_setup(shared_data, tmp_path):
    rows = _rows(shared_data)[:3]
    _write_predictions(rows, tmp_path / "preds.jsonl")
    with FakeJudge(reply_fn=lambda b: "Constraints Overall Score: [[10]]") as fj:
        run_lib.evaluate(_config(shared_data, tmp_path, fj, **{"data.limit": 3}))
        with pytest.raises(ValueError, match="differs in: judge"):
            run_lib.evaluate(_config(shared_data, tmp_path, fj, **{"data.limit": 3, "judge.model": "other"}))
