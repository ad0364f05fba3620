"""Readers and validators: real files round trip, malformed inputs give located errors."""
import json
import os

import pytest

from data_pipeline import DEMO_DATA_DIR, load_records
from data_pipeline.errors import RecordError
from data_pipeline.readers import detect_kind, detect_kind_of_paths, expand_paths


def _write(path, text, mode="w"):
    with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        f.write(text)
    return str(path)


def _group(x1="Write about tea.\n1. Use 3 bullets.", x2="Write about tea.\n1. Use 2 bullets.", y1="- a\n- b\n- c", y2="- a\n- b"):
    return {"conversations": [{"from": "human", "value": x1}, {"from": "human", "value": x2}],
            "chosen": {"from": "gpt", "value": y1}, "rejected": {"from": "gpt", "value": y2}}


# ---- real files --------------------------------------------------------------------------------
def test_shared_files_round_trip(shared_data):
    trace, rep = load_records("trace", shared_data / "trace" / "202409_trace_evaluation.jsonl")
    assert len(trace) == 1042 and rep.num_invalid == 0 and rep.total_seen == 1042
    assert sum(r["constraints_num"] == 1 for r in trace) == 200
    eif, rep = load_records("eifbench", shared_data / "eifbench" / "sorted_party100.json")
    assert len(eif) == 100 and rep.num_invalid == 0
    assert sum(len(r["sub_instructions"]) for r in eif) == 849
    ife, rep = load_records("ifeval", shared_data / "ifeval" / "input_data.jsonl")
    assert len(ife) == 541
    assert sum(len(r["instruction_id_list"]) for r in ife) == 834
    iopo, _ = load_records("iopo", shared_data / "iopo" / "trace_iopo_example.json")
    assert len(iopo) == 1
    raw = json.load(open(shared_data / "iopo" / "trace_iopo_example.json", encoding="utf-8"))[0]
    assert iopo[0]["x1"] == raw["conversations"][0]["value"]
    assert iopo[0]["x2"] == raw["conversations"][1]["value"]
    assert iopo[0]["y1"] == raw["chosen"]["value"] and iopo[0]["y2"] == raw["rejected"]["value"]
    assert iopo[0]["system"] is None
    assert iopo[0]["id"] == "trace_iopo_example.json:2"


def test_demo_files_load():
    n = {"iopo": "iopo_train.json", "sft": "sft_train.jsonl", "dpo": "dpo_train.json", "demo_eval": "eval_prompts.jsonl"}
    counts = {k: len(load_records(k, os.path.join(DEMO_DATA_DIR, f))[0]) for k, f in n.items()}
    assert counts["iopo"] >= 200 and counts["demo_eval"] >= 100
    assert counts["sft"] == counts["dpo"] == 2 * counts["iopo"]


def test_detect_kind(shared_data):
    assert detect_kind_of_paths(shared_data / "trace" / "202409_trace_evaluation.jsonl") == "trace"
    assert detect_kind_of_paths(shared_data / "eifbench" / "sorted_party100.json") == "eifbench"
    assert detect_kind_of_paths(shared_data / "ifeval" / "input_data.jsonl") == "ifeval"
    assert detect_kind_of_paths(shared_data / "iopo" / "trace_iopo_example.json") == "iopo"
    assert detect_kind({"prompt": "p", "chosen": "a", "rejected": "b"}) == "dpo"
    assert detect_kind({"messages": []}) == "sft"


# ---- the five malformed inputs of the acceptance list -------------------------------------------
def test_truncated_json_line(tmp_path):
    good = json.dumps(_group())
    p = _write(tmp_path / "a.jsonl", good + "\n" + good[:40] + "\n" + good + "\n")
    with pytest.raises(RecordError) as e:
        load_records("iopo", p)
    msg = str(e.value)
    assert f"{p}:2" in msg and "(json)" in msg and "json_decode" in msg
    recs, rep = load_records("iopo", p, skip_invalid=True)
    assert len(recs) == 2 and rep.counts == {"json_decode": 1} and rep.total_seen == 3


def test_missing_chosen_json_list_names_line_and_index(tmp_path):
    bad = _group()
    del bad["chosen"]
    p = _write(tmp_path / "b.json", json.dumps([_group(), bad, _group()], indent=2))
    with pytest.raises(RecordError) as e:
        load_records("iopo", p)
    err = e.value
    assert err.field == "chosen" and err.reason == "missing_field" and err.index == 1
    lines = open(p, encoding="utf-8").read().split("\n")
    assert lines[err.line - 1].strip() == "{"  # the line where record 1 starts
    assert err.line > 2 and f"{p}:{err.line} (record 1)" in str(err)
    recs, rep = load_records("iopo", p, skip_invalid=True)
    assert len(recs) == 2 and rep.counts == {"missing_field": 1}


def test_wrong_role(tmp_path):
    bad = _group()
    bad["conversations"][1]["from"] = "gpt"
    p = _write(tmp_path / "c.jsonl", json.dumps(_group()) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(RecordError) as e:
        load_records("iopo", p)
    assert e.value.field == "conversations[1].from" and e.value.line == 2 and e.value.reason == "wrong_role"
    assert f"{p}:2" in str(e.value) and "conversations[1].from" in str(e.value)
    bad["conversations"][1]["from"] = "robot"
    p2 = _write(tmp_path / "c2.jsonl", json.dumps(bad) + "\n")
    with pytest.raises(RecordError, match="unknown role 'robot'"):
        load_records("iopo", p2)


def test_empty_response(tmp_path):
    bad = _group()
    bad["rejected"]["value"] = "   "
    p = _write(tmp_path / "d.jsonl", json.dumps(bad) + "\n")
    with pytest.raises(RecordError) as e:
        load_records("iopo", p)
    assert e.value.field == "rejected.value" and e.value.reason == "empty_text" and e.value.line == 1


def test_non_utf8_files(tmp_path):
    good = json.dumps(_group()).encode()
    p = _write(tmp_path / "e.jsonl", good + b"\n" + good.replace(b"tea", b"t\xe9a") + b"\n", "wb")
    with pytest.raises(RecordError) as e:
        load_records("iopo", p)
    assert e.value.line == 2 and e.value.reason == "encoding" and "(file encoding)" in str(e.value)
    recs, rep = load_records("iopo", p, skip_invalid=True)
    assert len(recs) == 1 and rep.counts == {"encoding": 1}
    # A JSON list file: the whole file is unreadable; the error names the line of the bad byte.
    data = json.dumps([_group(), _group()], indent=1).encode()
    pos = data.rindex(b"tea")
    pj = _write(tmp_path / "e.json", data[:pos] + b"t\xff" + data[pos + 2:], "wb")
    with pytest.raises(RecordError) as e:
        load_records("iopo", pj)
    assert e.value.line == data[:pos].count(b"\n") + 1 and e.value.reason == "encoding"
    recs, rep = load_records("iopo", pj, skip_invalid=True)
    assert recs == [] and rep.counts == {"encoding": 1}


def test_skip_invalid_summary_counts_every_reason(tmp_path):
    rows = [json.dumps(_group())]
    rows.append(json.dumps(_group())[:30])  # json_decode
    g = _group(); del g["chosen"]; rows.append(json.dumps(g))  # missing_field
    g = _group(); g["conversations"][0]["from"] = "gpt"; rows.append(json.dumps(g))  # wrong_role
    g = _group(); g["chosen"]["value"] = ""; rows.append(json.dumps(g))  # empty_text
    g = _group(); g["chosen"]["value"] = 5; rows.append(json.dumps(g))  # wrong_type
    g = _group(x2="Write about tea.\n1. Use 3 bullets."); rows.append(json.dumps(g))  # identical_texts
    g = _group(); g["conversations"].pop(); rows.append(json.dumps(g))  # bad_structure
    p = _write(tmp_path / "mixed.jsonl", "\n".join(rows) + "\n")
    recs, rep = load_records("iopo", p, skip_invalid=True)
    assert len(recs) == 1
    assert dict(rep.counts) == {"json_decode": 1, "missing_field": 1, "wrong_role": 1, "empty_text": 1,
                                "wrong_type": 1, "identical_texts": 1, "bad_structure": 1}
    s = rep.summary()
    assert "8 records read, 7 invalid" in s and "wrong_role=1" in s and f"{p}:4" in s


# ---- other layouts ---------------------------------------------------------------------------------
def test_dpo_layouts(tmp_path):
    rows = [
        {"prompt": "p1", "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "p2"}],
         "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
        {"conversations": [{"from": "human", "value": "p3"}], "chosen": {"from": "gpt", "value": "a"},
         "rejected": {"from": "gpt", "value": "b"}, "system": "T"},
    ]
    p = _write(tmp_path / "dpo.json", json.dumps(rows))
    recs, _ = load_records("dpo", p)
    assert [(r["prompt"], r["chosen"], r["rejected"], r["system"]) for r in recs] == [
        ("p1", "a", "b", None), ("p2", "a", "b", "S"), ("p3", "a", "b", "T")]
    bad = {"conversations": [{"from": "human", "value": "p"}, {"from": "human", "value": "q"}],
           "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}
    with pytest.raises(RecordError, match="expected one human turn"):
        load_records("dpo", _write(tmp_path / "dpo2.json", json.dumps([bad])))
    with pytest.raises(RecordError) as e:
        load_records("dpo", _write(tmp_path / "dpo3.json", json.dumps([{"prompt": "p", "chosen": "a", "rejected": {"from": "human", "value": "b"}}])))
    assert e.value.field == "rejected.from" and e.value.reason == "wrong_role"


def test_sft_layouts(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                      {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                      {"role": "assistant", "content": "a2"}]},
        {"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]},
    ]
    p = _write(tmp_path / "sft.jsonl", "\n".join(json.dumps(r) for r in rows))
    recs, _ = load_records("sft", p)
    assert recs[0]["turns"] == [["u1", "a1"], ["u2", "a2"]] and recs[0]["system"] == "S"
    assert recs[1]["turns"] == [["u", "a"]] and recs[1]["system"] is None
    bad = {"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "v"}]}
    with pytest.raises(RecordError) as e:
        load_records("sft", _write(tmp_path / "bad.jsonl", json.dumps(bad)))
    assert e.value.field == "messages[1].role" and e.value.reason == "wrong_role"
    bad = {"messages": [{"role": "user", "content": "u"}]}
    with pytest.raises(RecordError, match="must end with an assistant turn"):
        load_records("sft", _write(tmp_path / "bad2.jsonl", json.dumps(bad)))


def test_eval_validators_reject_bad_records(tmp_path, shared_data):
    line = open(shared_data / "trace" / "202409_trace_evaluation.jsonl", encoding="utf-8").readline()
    rec = json.loads(line)
    rec["constraints_num"] = 3
    with pytest.raises(RecordError) as e:
        load_records("trace", _write(tmp_path / "t.jsonl", line + json.dumps(rec, ensure_ascii=False) + "\n"))
    assert e.value.field == "constraints_splits" and e.value.line == 2
    eif = json.load(open(shared_data / "eifbench" / "sorted_party100.json", encoding="utf-8"))[:2]
    eif[1]["sub_instructions"]["sub_instruction_1"]["scoring_questions"] = "not a list"
    with pytest.raises(RecordError) as e:
        load_records("eifbench", _write(tmp_path / "e.json", json.dumps(eif, ensure_ascii=False, indent=2)))
    assert e.value.index == 1 and e.value.field == "sub_instructions.sub_instruction_1.scoring_questions"
    with pytest.raises(RecordError) as e:
        load_records("ifeval", _write(tmp_path / "i.jsonl", json.dumps({"key": 1, "prompt": "p", "instruction_id_list": ["a"], "kwargs": []})))
    assert e.value.field == "kwargs"
    demo = json.loads(open(os.path.join(DEMO_DATA_DIR, "eval_prompts.jsonl"), encoding="utf-8").readline())
    demo["sub_instructions"] = [{"key": "SUB_INSTRUCTION_1", "instruction": "x", "constraints": [{"type": "nope"}],
                                 "constraints_text": ["?"]}]
    with pytest.raises(RecordError) as e:
        load_records("demo_eval", _write(tmp_path / "d.jsonl", json.dumps(demo)))
    assert e.value.field == "sub_instructions[0].constraints[0]" and e.value.reason == "bad_constraint"


def test_paths_directories_globs_and_missing(tmp_path):
    _write(tmp_path / "a.json", json.dumps([_group()]))
    _write(tmp_path / "b.jsonl", json.dumps(_group()) + "\n")
    _write(tmp_path / "notes.txt", "ignored")
    recs, _ = load_records("iopo", str(tmp_path))
    assert [r["id"] for r in recs] == ["a.json:1", "b.jsonl:1"]
    assert expand_paths(str(tmp_path / "*.json")) == [str(tmp_path / "a.json")]
    with pytest.raises(FileNotFoundError, match="hf:owner/name"):
        load_records("iopo", "owner/name")
    with pytest.raises(ValueError, match="unknown record kind"):
        load_records("nope", str(tmp_path))


def test_hf_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="could not load HF dataset 'no-such-owner/no-such-set'"):
        load_records("iopo", "hf:no-such-owner/no-such-set@train")


def test_truncated_json_list_file(tmp_path):
    text = json.dumps([_group(), _group(), _group()], indent=2)
    cut = text[: text.rindex('"rejected"')]  # the file ends inside record 2
    p = _write(tmp_path / "cut.json", cut)
    with pytest.raises(RecordError) as e:
        load_records("iopo", p)
    assert e.value.index == 2 and e.value.reason == "json_decode" and "truncated" in str(e.value)
    assert cut.split("\n")[e.value.line - 1].strip() == "{"
    recs, rep = load_records("iopo", p, skip_invalid=True)
    assert len(recs) == 2 and rep.counts == {"json_decode": 1}
    assert "rest of this file could not be read" in rep.summary()
