"""EIFBench evaluator tests: input text, long-instance split (both halves kept), verdict rule, metrics end to end."""
import collections
import hashlib
import json
import re

import pytest

from configs import eval_eifbench
from evaluation import eifbench
from iopo_jax import io_utils
from evaluation import runner as run_lib
from tests.fake_judge import FakeJudge

PARTY = "eifbench/sorted_party100.json"
MARKER_TEMPLATE = "OUT<<{output}>>\nSUB<<{sub_instruction}>>\nQ<<{question}>>\nIN<<{input}>>\n"


def _h(*parts) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest(), 16)


def _load(shared_data):
    with open(shared_data / PARTY, encoding="utf-8") as f:
        return json.load(f)


def _sorted_keys(subs):
    return sorted(subs, key=lambda k: int(re.search(r"\d+", k).group()))


def verdict(mid, key, q):
    """Scripted verdict: True (yes), False (no), "empty" (unparseable) or "error" (HTTP 500 forever)."""
    h = _h(mid, key, q)
    if h % 97 == 0:
        return "error"
    if h % 89 == 1:
        return "empty"
    if _h(mid) % 4 == 0 or _h(mid, key) % 3 == 0:
        return True
    return h % 4 != 0


def reply_text(v, h):
    if v is True:
        return ["分析：满足要求。\n答案：是", "结论：是", "答案：是 (已核对)"][h % 3]  # exact / fallback yes
    return ["分析：不满足。\n答案：否", "这一点没有做到，否。", "答案：是\n更正：答案：否"][h % 3]  # exact / fallback no


def _parse_marker(prompt):
    out = re.search(r"OUT<<(.*?)>>", prompt, re.S).group(1)
    sub = re.search(r"SUB<<(.*?)>>", prompt, re.S).group(1)
    q = re.search(r"Q<<(.*?)>>\nIN<<", prompt, re.S).group(1)
    mid = re.match(r"ANSWER-party100/(\d+)", out).group(1)
    key = sub.split(":", 1)[0]
    return mid, key, q


def judge_reply(body):
    mid, key, q = _parse_marker(body["messages"][-1]["content"])
    v = verdict(mid, key, q)
    return "" if v == "empty" else reply_text(v, _h("r", mid, key, q))


def judge_faults(n, body):
    mid, key, q = _parse_marker(body["messages"][-1]["content"])
    return "500" if verdict(mid, key, q) == "error" else None


def expected(rows, policy):
    per_inst = []
    n_fail = 0
    by_nsub = collections.defaultdict(list)
    for r in rows:
        mid = str(r["main_id"])
        subs = []
        failed = 0
        for key in _sorted_keys(r["sub_instructions"]):
            vs = []
            for q in r["sub_instructions"][key]["scoring_questions"]:
                v = verdict(mid, key, q)
                if v in ("error", "empty"):
                    failed += 1
                else:
                    vs.append(v)
            if vs:
                subs.append(vs)
        n_fail += failed
        if not subs or (policy == "exclude_instance" and failed):
            continue
        flat = [v for s in subs for v in s]
        row = (float(all(flat)), sum(all(s) for s in subs) / len(subs), sum(flat) / len(flat))
        per_inst.append(row)
        by_nsub[str(len(r["sub_instructions"]))].append(row)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"task_level": mean([p[0] for p in per_inst]), "ILA": mean([p[1] for p in per_inst]),
            "CLA": mean([p[2] for p in per_inst]), "n": len(per_inst), "n_fail": n_fail,
            "by_nsub_ILA": {k: mean([p[1] for p in v]) for k, v in by_nsub.items()}}


def _config(tmp_path, fj, data, **over):
    c = eval_eifbench.get_config()
    c.workdir = str(tmp_path / "run")
    c.data.path = data
    c.judge.base_url = fj.base_url
    c.judge.api_key_env = ""
    c.judge.backoff_base_s = 0.01
    c.judge.backoff_max_s = 0.02
    c.progress = False
    c.update_from_flattened_dict(over)  # dotted keys, e.g. "judge.concurrency"
    return c


def test_input_text_follows_spec(shared_data):
    rows = _load(shared_data)
    insts = eifbench.load_eifbench(str(shared_data / PARTY))
    assert len(insts) == 100 and insts[0].split == "party100"
    for r, inst in zip(rows[:5], insts[:5]):
        blocks = []
        for key in _sorted_keys(r["sub_instructions"]):
            s = r["sub_instructions"][key]
            blocks.append(f"{key}:\n{s['instruction']}\nconstraints:\n" + "\n".join(s["scoring_questions"]))
        assert eifbench.input_texts(inst) == ["Instruction:\n" + r["input"] + "\n\n" + "\n\n".join(blocks)]


def test_split_halves_when_long():
    subs = [eifbench.SubInstruction(f"sub_instruction_{i}", f"do {i}" + "x" * 1000, [f"c{i}a", f"c{i}b"])
            for i in range(5)]
    inst = eifbench.EifInstance(split="s", main_id="1", input="INPUT", subs=subs)
    assert len(eifbench.input_texts(inst, max_chars=100000)) == 1
    a, b = eifbench.input_texts(inst, max_chars=4000)
    assert a.startswith("Instruction:\nINPUT\n\n") and b.startswith("Instruction:\nINPUT\n\n")
    assert "sub_instruction_1:" in a and "sub_instruction_2:" not in a  # first half = 5 // 2 = 2 blocks
    assert "sub_instruction_2:" in b and "sub_instruction_4:" in b and "sub_instruction_1:" not in b


def test_verdict_rule():
    P = eifbench.parse_verdict
    assert P("分析：...\n答案：是").fields["verdict"] is True
    assert P("答案：否").fields == {"verdict": False, "rule": "exact"}
    assert P("答案：是 ... 答案：是").fields == {"verdict": True, "rule": "fallback"}  # two matches: fallback
    assert P("答案：是 然后 答案：否").fields["verdict"] is False  # fallback: 否 occurs
    assert P("结论：是").fields == {"verdict": True, "rule": "fallback"}
    assert P("yes").fields["verdict"] is False
    assert P("答案: 是").fields["verdict"] is True  # half-width colon: no exact match, fallback yes
    assert not P("").ok and not P("  \n").ok


def test_default_templates_are_our_own_wording(shared_data):
    for ours, name in ((eifbench.DEFAULT_ANSWER_TEMPLATE, "eifbench_answer_prompt.txt"),
                       (eifbench.DEFAULT_JUDGE_TEMPLATE, "eifbench_score_prompt.txt")):
        official = (shared_data / "prompts" / name).read_text(encoding="utf-8")
        for line in official.splitlines():
            line = line.strip()
            if len(line) > 15 and "{" not in line and not re.fullmatch(r"[A-Z_0-9:-]+", line):  # not headings
                assert line not in ours, line


def test_eifbench_metrics_end_to_end_match_independent_computation(shared_data, tmp_path):
    rows = _load(shared_data)
    preds = tmp_path / "preds.jsonl"
    with open(preds, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"id": f"party100/{r['main_id']}", "response": f"ANSWER-party100/{r['main_id']}"}) + "\n")
    (tmp_path / "judge.txt").write_text(MARKER_TEMPLATE, encoding="utf-8")
    with FakeJudge(reply_fn=judge_reply, faults=judge_faults) as fj:
        cfg = _config(tmp_path, fj, str(shared_data / PARTY), **{
            "generation.predictions": str(preds), "judge.template": str(tmp_path / "judge.txt"),
            "judge.max_retries": 1, "judge.max_parse_retries": 1, "judge.concurrency": 32})
        m = run_lib.evaluate(cfg)
    exp = expected(rows, "exclude_pair")
    assert m["n_pairs"] == 8025 and m["n_instances"] == 100
    assert m["n_unparseable"] + m["n_judge_errors"] == exp["n_fail"] and m["n_judge_errors"] > 0
    assert m["n_unparseable"] > 0 and m["n_fallback_verdicts"] > 0
    assert m["n_scored_instances"] == exp["n"]
    for k in ("task_level", "ILA", "CLA"):
        assert m[k] == pytest.approx(exp[k]), k
        assert m["by_split"]["party100"][k] == pytest.approx(exp[k]), k
    assert 0 < m["task_level"] < 1
    assert {k: v["ILA"] for k, v in m["by_num_sub_instructions"].items()} == pytest.approx(exp["by_nsub_ILA"])
    # The other error policy, on the same judgments.
    js = {j["id"]: j for j in io_utils.read_jsonl(str(tmp_path / "run" / "judgments.jsonl"))}
    insts = eifbench.load_eifbench(str(shared_data / PARTY))
    m2 = eifbench.compute_metrics(insts, js, error_policy="exclude_instance")
    exp2 = expected(rows, "exclude_instance")
    assert m2["n_scored_instances"] == exp2["n"] < exp["n"]
    for k in ("task_level", "ILA", "CLA"):
        assert m2[k] == pytest.approx(exp2[k]), k
    assert (tmp_path / "run" / "accuracy_by_num_sub_instructions.png").exists()


def test_long_instances_answered_in_two_calls_and_both_kept(tmp_path):
    subs = {f"sub_instruction_{i}": {"instruction": f"task {i} " + "说明" * 300, "scoring_questions": [f"q{i}"]}
            for i in range(5)}
    data = tmp_path / "sorted_mini3.json"
    data.write_text(json.dumps([{"main_id": 7, "input": "输入材料", "sub_instructions": subs},
                                {"main_id": 8, "input": "short", "sub_instructions": {
                                    "sub_instruction_0": {"instruction": "t", "scoring_questions": ["qa", "qb"]}}}],
                               ensure_ascii=False), encoding="utf-8")

    def gen_reply(body):
        keys = re.findall(r"(sub_instruction_\d+):\n", body["messages"][-1]["content"])
        return "ANS[" + ",".join(keys) + "]"

    with FakeJudge(reply_fn=gen_reply) as gen, FakeJudge(reply_fn=lambda b: "答案：是") as fj:
        cfg = _config(tmp_path, fj, str(data), **{"generation.base_url": gen.base_url, "generation.model": "m",
                                                  "generation.max_chars": 2000})
        m = run_lib.evaluate(cfg)
        gen_prompts = [r.body["messages"] for r in gen.requests]
        judge_prompts = [r.body["messages"][-1]["content"] for r in fj.requests]
    assert len(gen_prompts) == 3  # instance 7 in two calls, instance 8 in one
    assert all(p[0] == {"role": "system", "content": "You are a helpful assistant."} for p in gen_prompts)
    preds = {p["id"]: p for p in io_utils.read_jsonl(str(tmp_path / "run" / "predictions.jsonl"))}
    both = "ANS[sub_instruction_0,sub_instruction_1]\n\nANS[sub_instruction_2,sub_instruction_3,sub_instruction_4]"
    assert preds["mini3/7"]["response"] == both
    assert preds["mini3/7"]["parts"] == both.split("\n\n")
    assert preds["mini3/8"]["response"] == "ANS[sub_instruction_0]"
    # Every judge call for instance 7 sees the whole answer (both halves).
    assert sum(both in p for p in judge_prompts) == 5 and len(judge_prompts) == 7
    assert m["task_level"] == 1.0 and m["by_split"]["mini3"]["n"] == 2


def test_load_errors_name_file_index_field(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([{"main_id": 1, "input": "x", "sub_instructions": {"sub_instruction_0": {
        "instruction": "i", "scoring_questions": "not a list"}}}]))
    with pytest.raises(ValueError, match=r"bad\.json\[0\]: sub_instructions\.sub_instruction_0\.scoring_questions"):
        eifbench.load_eifbench(str(p))
    p.write_text(json.dumps([{"main_id": 1, "input": "x"}]))
    with pytest.raises(ValueError, match=r"bad\.json\[0\]: missing field 'sub_instructions'"):
        eifbench.load_eifbench(str(p))
