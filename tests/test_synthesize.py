"""IOPO data synthesis (data_pipeline.synthesize) against a scripted fake LLM on 127.0.0.1."""
import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from fake_judge import FakeJudge
from fake_synth_llm import oracle_reply

from data_pipeline import synthesize as S
from data_pipeline import verifiers as V
from data_pipeline.readers import load_records
from iopo_jax.tools import synthesize as T

KW = lambda *k: {"type": "include_keywords", "keywords": list(k)}  # noqa: E731
BULLETS = lambda n: {"type": "bullet_count", "n": n}  # noqa: E731


def write_seeds(path, seeds):
    with open(path, "w", encoding="utf-8") as f:
        for s in seeds:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    return str(path)


def run(tmp_path, seeds, *extra, name="w", server=None, reply_fn=oracle_reply, faults=None):
    """Runs the CLI in-process against a fresh fake server; returns (rc, workdir, server)."""
    inp = write_seeds(tmp_path / f"{name}_seeds.jsonl", seeds)
    wd = str(tmp_path / name)
    own = server is None
    fj = server or FakeJudge(reply_fn=reply_fn, faults=faults, timeout_sleep_s=1.0, retry_after_s=0.05).start()
    try:
        rc = T.main([f"--input={inp}", f"--workdir={wd}", f"--gen_base_url={fj.base_url}", "--gen_model=fake",
                     "--noprogress", "--backoff_base_s=0.01", *extra])
    finally:
        if own:
            fj.stop()
    return rc, wd, fj


def dropped(wd):
    """{id: reason} over every stage's dropped file."""
    out = {}
    for st in S.STAGES:
        p = S.stage_path(wd, st, dropped=True)
        if os.path.exists(p):
            for r in S._read_jsonl(p):
                assert r["id"] not in out, f"{r['id']} dropped twice"
                out[r["id"]] = r["reason"]
    return out


def output(wd):
    return json.load(open(os.path.join(wd, "iopo.json"), encoding="utf-8"))


# ------------------------------------------------------------------------------------------- taxonomy

def test_taxonomy_is_trace_levels2(shared_data):
    labels = collections.Counter()
    with open(shared_data / "trace" / "202409_trace_evaluation.jsonl", encoding="utf-8") as f:
        for line in f:
            labels.update(json.loads(line)["levels2"])
    assert len(S.TAXONOMY) == 5 and len(S.DIMENSIONS) == 26
    assert set(S.DIMENSIONS) <= set(labels)
    # Every TRACE label outside the taxonomy is a one-off annotation slip.
    assert all(n == 1 for lab, n in labels.items() if lab not in S.DIMENSIONS), labels


def test_rule_templates_are_valid_specs():
    import random
    assert len(S.RULE_DIMENSIONS) >= 5
    for lang in ("en", "zh"):
        for d in S.RULE_DIMENSIONS:
            for seed in range(5):
                spec = S.rule_template(d, random.Random(seed), "Explain photosynthesis to children", lang)
                V.check_spec(spec)
                assert V.describe(spec, lang)


def test_parsers():
    assert S.parse_numbered("Sure:\n1. a\n2) b\n3、c\nthanks\n1. again") == ["a", "b", "c"]
    assert S.parse_numbered("no list here") == []
    assert S.parse_verdicts("1: YES\n2: no\n**3**: Yes", 3) == [True, False, True]
    assert S.parse_verdicts("1: YES\nlater I changed my mind\n1: NO\n2: YES", 2) == [False, True]
    assert S.parse_verdicts("1: YES", 2) is None
    assert S.parse_check("fine\nVERDICT: PASS") is True and S.parse_check("VERDICT: fail") is False
    assert S.parse_check("pass") is None
    assert S.parse_mix("add:2, revise") == [("add", 2.0), ("revise", 1.0)]
    assert S.conflicts(BULLETS(4), [{"spec": BULLETS(3)}]) and S.conflicts(BULLETS(4), [{"spec": {
        "type": "bullet_items", "items": ["a", "b"]}}])
    assert not S.conflicts(BULLETS(4), [{"spec": KW("x")}, {"text": "free"}])
    with pytest.raises(ValueError, match="unknown operation 'swap'"):
        S.parse_mix("swap:1")


# ------------------------------------------------------------------------------------------- stage decisions

def test_every_stage_keep_drop_decision_revise(tmp_path):
    seeds = [
        {"id": "good", "instruction": "Describe the Nile.", "constraints": [KW("river"), BULLETS(3)]},
        {"id": "good_free", "instruction": "Write a poem.", "constraints": ["Mention the word ZEBRA."]},
        {"id": "given_y1", "instruction": "Name a color.", "constraints": [KW("blue")], "output": "blue is calm"},
        {"id": "empty", "instruction": "[empty] Say nothing.", "constraints": [KW("river")]},
        {"id": "sloppy", "instruction": "[sloppy-above:0] Write about cats.", "constraints": [KW("whiskers")]},
        {"id": "bad_given", "instruction": "Name a fruit.", "constraints": [KW("apple")], "output": "a pear"},
        {"id": "nocons", "instruction": "Tell a joke."},
        {"id": "garbage_judge", "instruction": "[garbage-judge] Write.", "constraints": ["Mention the word OKAY."]},
        {"id": "incoherent", "instruction": "[incoherent] Describe rain.", "constraints": [KW("rain")]},
    ]
    rc, wd, fj = run(tmp_path, seeds, "--edit_mix=revise:1", "--concurrency=3")
    assert rc == 0
    assert dropped(wd) == {"empty": "answer_empty", "sloppy": "judge_y1_fails_x1", "bad_given": "judge_y1_fails_x1",
                           "nocons": "judge_no_constraints", "garbage_judge": "judge_unparseable",
                           "incoherent": "check_incoherent"}
    recs = output(wd)
    assert [r["id"] for r in recs] == ["good", "good_free", "given_y1"]  # input order, nothing lost
    items = {it["id"]: it for it in S._read_jsonl(S.stage_path(wd, "check"))}
    for it in items.values():
        assert it["op"] == "revise"
        assert not all(it["verdicts_y1_x2"])  # y1 fails x2 ...
        for c in it["cons2"]:  # ... and the rule constraints of x2 agree: y2 meets all, y1 not all
            if c.get("spec"):
                assert V.verify(c["spec"], it["y2"])
        specs2 = [c["spec"] for c in it["cons2"] if c.get("spec")]
        if specs2:
            assert not all(V.verify_constraints(specs2, it["y1"]))
    assert items["given_y1"]["y1"] == "blue is calm"  # a seed's answer is kept, not regenerated
    # garbage judge replies were retried once with a fresh request (parse_retries=1), then dropped
    n_judge_garbage = sum(1 for r in fj.requests if "[garbage-judge]" in r.prompt and "strict grader" in r.prompt)
    assert n_judge_garbage == 2
    # the trainer's reader takes the file unchanged
    got, _ = load_records("iopo", os.path.join(wd, "iopo.json"))
    assert [g["y1"] for g in got] == [r["chosen"]["value"] for r in recs]
    report = json.load(open(os.path.join(wd, "report.json")))
    assert report["stages"]["judge"]["dropped_by_reason"] == {"judge_y1_fails_x1": 2, "judge_no_constraints": 1,
                                                              "judge_unparseable": 1}
    assert report["groups"] == 3 and "judge" in open(os.path.join(wd, "report.md")).read()
    # data_pipeline.stats reads the output
    st = subprocess.run([sys.executable, "-m", "data_pipeline.stats", os.path.join(wd, "iopo.json"), "--tokenizer",
                         "chars", "--png", str(tmp_path / "h.png"), "--json"], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
    assert st.returncode == 0, st.stderr[-2000:]
    assert "iopo" in st.stdout and "3" in st.stdout


def test_add_delete_expand_and_rule_only_decisions(tmp_path):
    seeds = [
        {"id": "add_ok", "instruction": "Describe a forest.", "constraints": [KW("trees"), BULLETS(2)]},
        {"id": "add_sloppy_y2", "instruction": "[sloppy-above:2] Describe a lake.", "constraints": [KW("water"),
                                                                                                   BULLETS(2)]},
    ]
    rc, wd, _ = run(tmp_path, seeds, "--edit_mix=add:1", name="add")
    assert rc == 0 and dropped(wd) == {"add_sloppy_y2": "judge2_y2_fails_x2"}
    [rec] = output(wd)
    assert rec["edit_op"] == "add" and rec["conversations"][1]["value"].count("\n") == 5  # one more constraint

    seeds = [
        {"id": "del_whole", "instruction": "Describe snow.", "constraints": [KW("cold"), BULLETS(2)]},
        {"id": "del_item", "instruction": "Plan a trip.",
         "constraints": [{"type": "bullet_items", "items": ["train", "hotel", "museum"]}]},
        {"id": "del_free", "instruction": "Describe wind.", "constraints": ["Mention the word GUST.",
                                                                           "Mention the word BREEZE."]},
    ]
    rc, wd, _ = run(tmp_path, seeds, "--edit_mix=delete:1", name="del")
    # deleting whole constraints leaves y1 compliant: the y1-fails-x2 check drops those groups
    assert rc == 0 and dropped(wd) == {"del_whole": "edit_y1_still_complies", "del_free": "edit_y1_still_complies"}
    [rec] = output(wd)
    assert rec["id"] == "del_item" and rec["chosen"]["value"].count("\n- ") == 2

    seeds = [{"id": "free", "instruction": "Write.", "constraints": ["Mention the word ZEBRA."], "output": "ZEBRA"}]
    rc, wd, fj = run(tmp_path, seeds, "--judge_mode=rules", name="rules")
    assert rc == 0 and dropped(wd) == {"free": "judge_unverifiable"} and output(wd) == []

    seeds = [{"id": "e1", "instruction": "Explain gravity to a child."},
             {"id": "e2", "instruction": "[bad-expand] Explain tides."}]
    rc, wd, _ = run(tmp_path, seeds, "--expand_k=3", "--rule_fraction=0", "--edit_mix=revise:1", name="exp")
    assert rc == 0 and dropped(wd) == {"e2": "expand_unparseable"}
    [it] = S._read_jsonl(S.stage_path(wd, "expand"))
    assert len(it["cons1"]) == 3 and {c["dim"] for c in it["cons1"]} <= set(S.DIMENSIONS)
    assert len(output(wd)) == 1

    # rules only: expand with rule templates, judge and edit with verifiers; the generator only answers
    seeds = [{"id": f"r{i}", "instruction": f"Describe planet number {i}."} for i in range(6)]
    rc, wd, fj = run(tmp_path, seeds, "--expand_k=2", "--rule_fraction=1", "--expand_rule_only", "--judge_mode=rules",
                     "--edit_with=rules", "--edit_mix=add:1,revise:1", "--nocoherence_check", name="ruleonly")
    assert rc == 0
    assert all(r.messages[-1]["content"].startswith("Describe planet") for r in fj.requests)
    assert len(fj.requests) == 6 + len(S._read_jsonl(S.stage_path(wd, "edit")))  # y1 per seed + y2 per edit
    assert len(output(wd)) >= 3
    # the same seed gives the same choices; another seed other ones
    rc2, wd2, _ = run(tmp_path, seeds, "--expand_k=2", "--rule_fraction=1", "--expand_rule_only",
                      "--judge_mode=rules", "--edit_with=rules", "--edit_mix=add:1,revise:1", "--concurrency=1",
                      "--nocoherence_check",
                      name="ruleonly2")
    assert output(wd2) == output(wd)
    rc3, wd3, _ = run(tmp_path, seeds, "--expand_k=2", "--rule_fraction=1", "--expand_rule_only",
                      "--judge_mode=rules", "--edit_with=rules", "--edit_mix=add:1,revise:1", "--seed=7",
                      "--nocoherence_check",
                      name="ruleonly3")
    assert output(wd3) != output(wd)


def test_stages_run_separately_equal_chained(tmp_path):
    seeds = [{"id": "a", "instruction": "Describe the sea.", "constraints": [KW("waves"), BULLETS(3)]},
             {"id": "b", "instruction": "Write a poem.", "constraints": ["Mention the word ZEBRA."]}]
    with FakeJudge(reply_fn=oracle_reply) as fj:
        rc, wd, _ = run(tmp_path, seeds, "--edit_mix=revise:1", name="chained", server=fj)
        inp = tmp_path / "chained_seeds.jsonl"
        wd2 = str(tmp_path / "split")
        for st in ("answer,judge", "edit", "answer2,judge2", "check", "write"):
            assert T.main([f"--input={inp}", f"--workdir={wd2}", f"--gen_base_url={fj.base_url}", "--gen_model=fake",
                           "--noprogress", "--edit_mix=revise:1", f"--stages={st}"]) == 0
        assert output(wd2) == output(wd) and len(output(wd)) == 2
        # recomputing a stage removes the (now stale) outputs of the later stages
        assert T.main([f"--input={inp}", f"--workdir={wd2}", f"--gen_base_url={fj.base_url}", "--gen_model=fake",
                       "--noprogress", "--edit_mix=revise:1", "--stages=edit", "--force"]) == 0
    assert os.path.exists(S.stage_path(wd2, "edit")) and not os.path.exists(S.stage_path(wd2, "answer2"))
    rep = json.load(open(os.path.join(wd2, "report.json")))
    assert set(rep["stages"]) == {"answer", "judge", "edit", "answer2", "judge2", "check"}


# ------------------------------------------------------------------------------------------- faults, budget

def test_faults_are_counted_not_crashed(tmp_path):
    seeds = [{"id": f"s{i}", "instruction": f"Describe city {i}.", "constraints": [KW("streets")]} for i in range(7)]
    # request 5 is dropped on a reused keep-alive connection (the client reconnects once for free),
    # request 6 is dropped on the fresh connection
    faults = {1: "429", 2: "500", 3: "timeout", 4: "bad_json", 5: "drop", 6: "drop", 7: "garbage"}
    common = ("--concurrency=1", "--timeout_s=0.5", "--edit_mix=revise:1")
    rc, wd, _ = run(tmp_path, seeds, *common, "--max_retries=0", name="noretry", faults=faults)
    assert rc == 0
    assert dropped(wd) == {"s0": "answer_request_failed", "s1": "answer_request_failed",
                           "s2": "answer_request_failed", "s3": "answer_request_failed",
                           "s4": "answer_request_failed", "s5": "judge_y1_fails_x1"}
    rep = json.load(open(os.path.join(wd, "report.json")))
    assert rep["stages"]["answer"]["failures"] == 5 and [r["id"] for r in output(wd)] == ["s6"]
    # with retries every transient fault is absorbed; garbage is a valid reply, so its item fails its judge
    rc, wd, _ = run(tmp_path, seeds, *common, "--max_retries=6", name="retry", faults=faults)
    assert rc == 0 and list(dropped(wd).values()) == ["judge_y1_fails_x1"] and len(output(wd)) == 6
    assert json.load(open(os.path.join(wd, "report.json")))["stages"]["answer"]["retries"] == 6


def test_budget_stop_and_resume_pays_once(tmp_path):
    seeds = [{"id": f"s{i}", "instruction": f"Describe tree {i}.", "constraints": [KW("leaves")]} for i in range(5)]
    with FakeJudge(reply_fn=oracle_reply) as fj:
        rc, wd, _ = run(tmp_path, seeds, "--request_budget=3", "--concurrency=1", "--edit_mix=revise:1", name="b",
                         server=fj)
        assert rc == 3 and not os.path.exists(S.stage_path(wd, "answer"))
        assert fj.count() == 3
        rc, wd, _ = run(tmp_path, seeds, "--concurrency=2", "--edit_mix=revise:1", name="b", server=fj)
        assert rc == 0 and len(output(wd)) == 5
        bodies = [json.dumps(r.messages, sort_keys=True) for r in fj.requests]
        assert len(bodies) == len(set(bodies))  # nothing was asked twice
        rep = json.load(open(os.path.join(wd, "report.json")))
        assert rep["stages"]["answer"]["cache_hits"] == 3


def test_input_errors_name_file_line_field(tmp_path, capsys):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "ok"}\n{"constraints": []}\n')
    assert T.main([f"--input={p}", f"--workdir={tmp_path / 'w'}", "--noprogress"]) == 2
    assert f"{p}:2: field 'instruction'" in capsys.readouterr().err
    p.write_text('{"instruction": "ok", "constraints": [{"type": "word_count"}]}\n')
    assert T.main([f"--input={p}", f"--workdir={tmp_path / 'w'}", "--noprogress"]) == 2
    assert "constraints[0]" in capsys.readouterr().err
    assert T.main([f"--input={p}", f"--workdir={tmp_path / 'w'}", "--stages=expand"]) == 2
    assert "--expand_k" in capsys.readouterr().err


def test_templates_dir_overrides_prompts(tmp_path):
    tdir = tmp_path / "tpl"
    tdir.mkdir()
    (tdir / "answer.txt").write_text("PLEASE ANSWER:\n{instruction}")
    seeds = [{"id": "a", "instruction": "Describe the sea.", "constraints": [KW("waves")]}]
    rc, wd, fj = run(tmp_path, seeds, f"--templates_dir={tdir}", "--stages=answer")
    assert rc == 0 and fj.requests[0].messages[-1]["content"].startswith("PLEASE ANSWER:\nDescribe the sea.")
    (tdir / "anwser.txt").write_text("x")
    rc, _, _ = run(tmp_path, seeds, f"--templates_dir={tdir}", "--stages=answer", name="w2")
    assert rc == 2


# ------------------------------------------------------------------------------------------- kill -9

def _store_keys(path):
    keys = set()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    keys.add(json.loads(line)["key"])
                except (ValueError, KeyError):
                    pass  # a torn last line
    return keys


def test_resume_after_kill9_no_lost_duplicated_or_repaid(tmp_path):
    from iopo_jax.chat_client import request_key

    seeds = [{"id": f"s{i}", "instruction": f"Describe animal {i}.",
              "constraints": [KW("legs"), "Mention the word FUR."]} for i in range(24)]
    inp = write_seeds(tmp_path / "seeds.jsonl", seeds)
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def cli(fj, wd):
        return [sys.executable, "-m", "iopo_jax.tools.synthesize", f"--input={inp}", f"--workdir={wd}",
                f"--gen_base_url={fj.base_url}", "--gen_model=fake", "--noprogress", "--concurrency=4",
                "--edit_mix=add:1,revise:1"]

    with FakeJudge(reply_fn=oracle_reply) as ref:
        r = subprocess.run(cli(ref, tmp_path / "ref"), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    expected = output(tmp_path / "ref")
    assert len(expected) >= 12

    wd = tmp_path / "killed"
    with FakeJudge(reply_fn=oracle_reply, latency_s=0.05) as fj:
        proc = subprocess.Popen(cli(fj, wd), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        # kill in the middle of the judge stage (some judge replies stored, the judge stage unfinished)
        while time.time() < deadline and len(_store_keys(wd / "judge_store.jsonl")) < 8:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        n_before = fj.count()
        stored = _store_keys(wd / "generator_store.jsonl") | _store_keys(wd / "judge_store.jsonl")
        assert 0 < len(stored) and not os.path.exists(S.stage_path(wd, "check"))
        r = subprocess.run(cli(fj, wd), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        after = fj.requests[n_before:]
    got = output(wd)
    assert got == expected  # no lost and no duplicated groups
    ids = [g["id"] for g in got]
    assert len(ids) == len(set(ids))
    # nothing whose reply had been stored was sent again
    for rq in after:
        params = {k: v for k, v in rq.body.items() if k not in ("model", "messages")}
        assert request_key(rq.body["model"], rq.messages, params) not in stored


def test_layering_and_help():
    # data_pipeline (and its synthesis module) imports without iopo_jax; the command gives it the chat client
    code = ("import sys, data_pipeline, data_pipeline.synthesize; "
            "print(sorted(m for m in sys.modules if m.startswith('iopo_jax')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    h = subprocess.run([sys.executable, "-m", "iopo_jax.tools.synthesize", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert h.returncode == 0
    for flag in ("--edit_mix", "--judge_mode", "--judge_base_url", "--gen_base_url", "--seed", "--templates_dir",
                 "--request_budget", "--stages", "--expand_k"):
        assert flag in h.stdout
