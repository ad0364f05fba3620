"""The bundled demo set and the rule verifiers."""
import collections
import json
import os

import pytest

from data_pipeline import DEMO_DATA_DIR, load_records
from data_pipeline import make_demo
from data_pipeline import verifiers as V


@pytest.fixture(scope="module")
def groups():
    with open(os.path.join(DEMO_DATA_DIR, "iopo_train.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def evals():
    return load_records("demo_eval", os.path.join(DEMO_DATA_DIR, "eval_prompts.jsonl"))[0]


# ---- verifiers, by hand ----------------------------------------------------------------------------
@pytest.mark.parametrize("spec,ok,bad", [
    ({"type": "include_keywords", "keywords": ["river", "tea"]}, "Tea by the River.", "Tea by the riverside."),
    ({"type": "include_keywords", "keywords": ["河流"]}, "我喜欢河流。", "我喜欢河。"),
    ({"type": "exclude_keywords", "keywords": ["many"]}, "So manyfold.", "Many people."),
    ({"type": "keyword_frequency", "keyword": "sun", "min": 2}, "sun and Sun", "sun and sunny"),
    ({"type": "word_count", "max": 3}, "one two-part three", "one two three four"),
    ({"type": "word_count", "n": 2}, "it's fine.", "it is fine"),
    ({"type": "char_count", "min": 5, "max": 6}, "你好 世界啊", "你好"),
    ({"type": "bullet_count", "n": 2}, "intro\n- a\n* b", "- a\n- b\n- c"),
    ({"type": "bullet_items", "items": ["color", "sound"]}, "- Color is red.\n- Sound is loud.", "- Color and sound.\n- More."),
    ({"type": "paragraph_count", "n": 2}, "a\n\nb\n", "a\nb"),
    ({"type": "starts_with", "phrase": "In short:"}, "  in short: yes", "Yes. In short:"),
    ({"type": "ends_with", "phrase": "感谢阅读。"}, "好的。感谢阅读。\n", "感谢阅读。好的。"),
    ({"type": "json_format", "keys": ["topic"]}, '```json\n{"topic": "tea"}\n```', 'Sure: {"topic": "tea"}'),
    ({"type": "json_format"}, "{}", "[1, 2]"),
    ({"type": "lowercase"}, "all lower 123", "Not lower"),
    ({"type": "language", "lang": "zh"}, "这是中文 with a few words", "English only"),
    ({"type": "language", "lang": "en"}, "English only", "英文"),
    ({"type": "no_commas"}, "no commas here.", "a，b"),
])
def test_verify_by_hand(spec, ok, bad):
    assert V.verify(spec, ok) is True
    assert V.verify(spec, bad) is False
    assert V.verify_constraints([spec, spec], bad) == [False, False]
    assert V.describe(spec, "en") and V.describe(spec, "zh")


@pytest.mark.parametrize("spec,match", [
    ({"type": "nope"}, "unknown constraint type"),
    ({"type": "word_count"}, "give 'n'"),
    ({"type": "word_count", "n": 3, "max": 4}, "not both"),
    ({"type": "word_count", "min": 5, "max": 4}, "min 5 > max 4"),
    ({"type": "bullet_count", "n": -1}, "non-negative"),
    ({"type": "include_keywords", "keywords": []}, "non-empty list"),
    ({"type": "language", "lang": "fr"}, "'en' or 'zh'"),
    ("bullet_count", "must be an object"),
])
def test_check_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        V.check_spec(spec)


def test_sections_and_record_verification():
    resp = "SUB_INSTRUCTION_1:\n- a\n- b\n\n## SUB_INSTRUCTION_2: The answer.\n\nMore."
    assert V.split_sections(resp) == {1: "- a\n- b", 2: "The answer.\n\nMore."}
    assert V.format_ok(resp, 2) and not V.format_ok(resp, 3)
    assert not V.format_ok("SUB_INSTRUCTION_2:\nx\nSUB_INSTRUCTION_1:\ny", 2)
    assert [k for k, _, _ in V.section_spans(resp)] == [1, 2]
    rec = {"constraints": [{"type": "language", "lang": "en"}],
           "sub_instructions": [{"key": "SUB_INSTRUCTION_1", "constraints": [{"type": "bullet_count", "n": 2}]},
                                {"key": "SUB_INSTRUCTION_2", "constraints": [{"type": "paragraph_count", "n": 2},
                                                                             {"type": "include_keywords", "keywords": ["tea"]}]}]}
    res = V.verify_record(rec, resp)
    assert res["constraints"] == [True] and res["sub_instructions"] == [[True], [True, False]]
    assert res["format_ok"] is True and res["all_pass"] is False and res["ila"] == 0.5 and res["cla"] == 0.75
    res = V.verify_record(rec, "- a\n- b")  # no headings: every sub-instruction fails
    assert res["sub_instructions"] == [[False], [False, False]] and res["format_ok"] is False


# ---- the demo training groups ---------------------------------------------------------------------
def test_every_group_is_a_real_iopo_group(groups):
    assert len(groups) >= 200
    for g in groups:
        m = g["meta"]
        x1, x2 = g["conversations"][0]["value"], g["conversations"][1]["value"]
        y1, y2 = g["chosen"]["value"], g["rejected"]["value"]
        c1, c2 = m["x1_constraints"], m["x2_constraints"]
        # the specs are exactly what the prompts say
        task = x1.split("\n", 1)[0]
        assert x1 == make_demo.render_prompt(task, [V.describe(s, m["lang"]) for s in c1])
        assert x2 == make_demo.render_prompt(task, [V.describe(s, m["lang"]) for s in c2])
        assert all(V.verify_constraints(c1, y1)), m["id"]          # y1 satisfies x1
        assert not all(V.verify_constraints(c2, y1)), m["id"]      # y1 violates x2
        assert all(V.verify_constraints(c2, y2)), m["id"]          # y2 satisfies x2
        assert x1 != x2 and y1 != y2
        # x2 is an ADD / DELETE / REVISE edit of x1's constraints
        if m["edit"] == "ADD":
            assert len(c2) == len(c1) + 1 and all(s in c2 for s in c1)
        elif m["edit"] == "DELETE":
            assert len(c2) == len(c1)
            a = next(s for s in c1 if s["type"] == "bullet_items")["items"]
            b = next(s for s in c2 if s["type"] == "bullet_items")["items"]
            assert len(b) == len(a) - 1 and set(b) < set(a)
            assert [s for s in c1 if s["type"] != "bullet_items"] == [s for s in c2 if s["type"] != "bullet_items"]
        else:
            assert m["edit"] == "REVISE" and len(c2) == len(c1)
            diff = [(s, t) for s, t in zip(c1, c2) if s != t]
            assert len(diff) == 1 and diff[0][0]["type"] == diff[0][1]["type"]
    counts = collections.Counter((g["meta"]["lang"], g["meta"]["edit"]) for g in groups)
    assert set(counts) == {(lang, e) for lang in ("en", "zh") for e in ("ADD", "DELETE", "REVISE")}
    assert min(counts.values()) >= 30


def test_demo_is_short_enough_for_a_tiny_model(groups, evals, qwen_tokenizer):
    enc = lambda s: len(qwen_tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
    prompts = [enc(t["value"]) for g in groups for t in g["conversations"]]
    responses = [enc(g[k]["value"]) for g in groups for k in ("chosen", "rejected")]
    assert max(prompts) <= 150 and max(responses) <= 100
    assert sorted(responses)[len(responses) // 2] <= 50  # tens of tokens
    assert max(enc(r["prompt"]) for r in evals) <= 400


def test_derived_sft_and_dpo_files(groups):
    sft = load_records("sft", os.path.join(DEMO_DATA_DIR, "sft_train.jsonl"))[0]
    dpo = load_records("dpo", os.path.join(DEMO_DATA_DIR, "dpo_train.json"))[0]
    g = groups[7]
    x1, x2 = g["conversations"][0]["value"], g["conversations"][1]["value"]
    assert sft[14]["turns"] == [[x1, g["chosen"]["value"]]] and sft[15]["turns"] == [[x2, g["rejected"]["value"]]]
    assert (dpo[15]["prompt"], dpo[15]["chosen"], dpo[15]["rejected"]) == (x2, g["rejected"]["value"], g["chosen"]["value"])


# ---- the demo evaluation prompts ---------------------------------------------------------------------
def test_eval_prompts(evals):
    assert len(evals) >= 100
    cats = collections.Counter((r["lang"], r["category"]) for r in evals)
    assert {lang for lang, _ in cats} == {"en", "zh"} and cats[("en", "segpo")] >= 10 and cats[("zh", "segpo")] >= 10
    assert len({r["prompt"] for r in evals}) == len(evals)
    for r in evals:
        res = V.verify_record(r, r["reference"])
        assert res["all_pass"], r["id"]
        n = len(r["constraints"]) + sum(len(s["constraints"]) for s in r["sub_instructions"])
        assert r["constraints_num"] == n >= 1
        for text in r["constraints_text"]:
            assert text in r["prompt"]
        if r["category"] == "segpo":
            subs = r["sub_instructions"]
            assert 2 <= len(subs) <= 3 and res["format_ok"] is True
            for j, s in enumerate(subs, 1):
                assert f"SUB_INSTRUCTION_{j}: {s['instruction']}" in r["prompt"]
                assert all(t in r["prompt"] for t in s["constraints_text"])
            # swapping two sections breaks the format and (with different constraints) the verdicts
            secs = V.split_sections(r["reference"])
            swapped = f"SUB_INSTRUCTION_1:\n{secs[2]}\n\nSUB_INSTRUCTION_2:\n{secs[1]}"
            assert V.verify_record(r, swapped)["format_ok"] is (len(subs) == 2)
        else:
            assert not r["sub_instructions"]
            assert not V.verify_record(r, "")["all_pass"]  # an empty answer fails


def test_generator_is_deterministic_and_matches_committed_files(tmp_path):
    make_demo.main(["--out", str(tmp_path)])
    for name in make_demo.FILES.values():
        with open(tmp_path / name, "rb") as a, open(os.path.join(DEMO_DATA_DIR, name), "rb") as b:
            assert a.read() == b.read(), name
    small = make_demo.generate(seed=5, n_groups=12, n_eval=8)
    assert len(small["iopo"]) == 12 and len(small["eval"]) == 8
    assert small["iopo"][0] != make_demo.generate(seed=6, n_groups=1, n_eval=0)["iopo"][0]
