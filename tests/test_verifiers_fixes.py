"""Rule verifier fixes (issue 18): one heading parser for evaluation and RL, unicode word counts,
lowercase without cased letters, bare bullets, word-boundary starts_with, JSON in a code fence."""
import pytest

from data_pipeline import verifiers as V
from iopo_jax.rl.segments import segment_text

SPELLINGS = [
    "SUB_INSTRUCTION_{k}:", "SUB_INSTRUCTION_{k}：", "**SUB_INSTRUCTION_{k}:**", "**SUB_INSTRUCTION_{k}**:",
    "sub_instruction_{k}:", "Sub-Instruction-{k}:", "## SUB_INSTRUCTION_{k}", "【SUB_INSTRUCTION_{k}】",
    "[SUB_INSTRUCTION_{k}]:", "SUB_INSTRUCTION_{k}",
]


@pytest.mark.parametrize("heading", SPELLINGS)
def test_sections_same_in_evaluation_and_rl(heading):
    text = f"{heading.format(k=1)}\n是的，第一部分。\n\n{heading.format(k=2)}\nsecond part here.\n"
    spans, fmt, _, _ = segment_text(text, [1, 2])
    assert fmt == 1
    assert [(k, s, e) for k, s, e in V.section_spans(text)] == [(j + 1, s, e) for j, s, e in spans]
    secs = V.split_sections(text)
    assert secs[1] == "是的，第一部分。"
    assert V.format_ok(text, 2)


def test_chinese_full_width_colon_answer_scores_fully():
    rec = {"constraints": [], "sub_instructions": [
        {"key": "SUB_INSTRUCTION_1", "constraints": [{"type": "starts_with", "phrase": "是的"}]},
        {"key": "SUB_INSTRUCTION_2", "constraints": [{"type": "no_commas"}]}]}
    answer = "SUB_INSTRUCTION_1：是的，我同意。\nSUB_INSTRUCTION_2：没有逗号的句子。"
    res = V.verify_record(rec, answer)
    assert res["ila"] == 1.0 and res["all_pass"], res


def test_word_count_unicode_and_numbers():
    assert V.count_words("naïve café") == 2
    assert V.count_words("3.5 dollars") == 2
    assert V.count_words("It costs 1,000 euros, e-mail me; it's fine.") == 8
    assert V.count_words("Привет мир") == 2
    assert V.verify({"type": "word_count", "n": 2}, "naïve café")


def test_lowercase_needs_a_cased_letter():
    assert not V.verify({"type": "lowercase"}, "这是中文回答。")
    assert not V.verify({"type": "lowercase"}, "12345 !")
    assert V.verify({"type": "lowercase"}, "中文 and english in lowercase")
    assert V.verify({"type": "lowercase"}, "ελληνικά")
    assert not V.verify({"type": "lowercase"}, "Ελληνικά")


def test_bullets_ignore_bare_markers_and_rules():
    text = "Intro\n-\nnot a bullet\n- - -\n* * *\n- one\n*   two\n• three"
    assert V.count_bullets(text) == 3
    assert V.bullet_lines(text) == ["- one", "*   two", "• three"]


def test_starts_and_ends_with_word_boundary():
    assert not V.verify({"type": "starts_with", "phrase": "Yes"}, "Yesterday was fine.")
    assert V.verify({"type": "starts_with", "phrase": "Yes"}, "yes, it was.")
    assert V.verify({"type": "starts_with", "phrase": "Yes"}, "Yes")
    assert V.verify({"type": "starts_with", "phrase": "是的"}, "是的我同意")  # no word boundary in Chinese
    assert not V.verify({"type": "ends_with", "phrase": "see"}, "We oversee")
    assert V.verify({"type": "ends_with", "phrase": "Thank you."}, "Bye. Thank you.")


def test_json_inside_code_fence():
    spec = {"type": "json_format", "keys": ["a"]}
    assert V.verify(spec, '```json\n{"a": 1}\n```')
    assert V.verify(spec, '```\n{"a": 1}\n```')
    assert V.verify(spec, '  {"a": 1}  ')
    assert not V.verify(spec, 'Here it is:\n```json\n{"a": 1}\n```')
    assert not V.verify(spec, '```json\n{"b": 1}\n```')
