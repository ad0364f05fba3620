"""Token-level tests of the chat templates, the joint truncation rule and the IOPO/DPO/SFT layouts.

Expected ids are written out by hand: for the real Qwen2 tokenizer they are the official Qwen2 ids of the
ChatML prompt (151644 <|im_start|>, 8948 "system", 198 "\\n", 2610 525 264 10950 17847 13 "You are a
helpful assistant.", 151645 <|im_end|>, 872 "user", 77091 "assistant"); for truncation a character
tokenizer (one id per character) makes every length countable by eye.
"""
import json
import re

import pytest

from data_pipeline import (IGNORE_INDEX, LLAMA3, QWEN, infer_seqlen, load_records, tokenize_dpo_pair,
                           tokenize_iopo_group, tokenize_sft)
from data_pipeline.tokenization import truncated_lengths

M = IGNORE_INDEX
SYS_PROMPT_IDS = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]  # system block
USER_HI_IDS = [151644, 872, 198, 6023, 151645, 198, 151644, 77091, 198]  # user "hi" + assistant header
IM_END = 151645


class CharTok:
    """One id per character; <|im_start|> = 1, <|im_end|> = 2 (special tokens parsed)."""

    SPECIAL = {"<|im_start|>": 1, "<|im_end|>": 2, "<|begin_of_text|>": 3, "<|eot_id|>": 4,
               "<|start_header_id|>": 5, "<|end_header_id|>": 6}
    pad_token_id = 0
    eos_token_id = 2

    def encode(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        out = []
        for part in re.split("(" + "|".join(map(re.escape, self.SPECIAL)) + ")", text):
            if part in self.SPECIAL:
                out.append(self.SPECIAL[part])
            else:
                out.extend(ord(c) for c in part)
        return out

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [self.encode(t) for t in texts]}


# ---- infer_seqlen: the four branches, by hand -----------------------------------------------------
@pytest.mark.parametrize("S,T,cutoff,want", [
    (3, 4, 10, (3, 4)),      # T*2 < cutoff: nothing to cut
    (20, 3, 10, (7, 3)),     # T*2 < cutoff: the prompt takes what is left
    (3, 20, 10, (3, 7)),     # S*2 < cutoff: the response is cut to cutoff - S
    (20, 30, 10, (4, 6)),    # both: T gets int(10 * 30 / 50) = 6
    (30, 20, 10, (6, 4)),    # both: int(10 * 20 / 50) = 4
    (5, 5, 10, (5, 5)),      # T*2 == cutoff and S*2 == cutoff: proportional, int(10 * 5/10) = 5
    (7, 6, 10, (6, 4)),      # max_T = int(60 / 13) = 4; new_S = min(10 - 4, 7) = 6
    (40, 1, 10, (9, 1)),     # a long prompt leaves room for the short response
])
def test_infer_seqlen(S, T, cutoff, want):
    assert infer_seqlen(S, T, cutoff) == want


# ---- real Qwen2 ids ---------------------------------------------------------------------------------
def test_qwen_prompt_and_response_ids(qwen_tokenizer):
    rec = {"x1": "hi", "x2": "hello", "y1": "hi", "y2": "hello", "system": None}
    out = tokenize_iopo_group(qwen_tokenizer, rec, cutoff_len=None)
    p1 = SYS_PROMPT_IDS + USER_HI_IDS
    p2 = SYS_PROMPT_IDS + [151644, 872, 198, 14990, 151645, 198, 151644, 77091, 198]
    r1, r2 = [6023, IM_END], [14990, IM_END]
    assert list(out)[:4] == ["chosen_v1", "rejected_v1", "chosen_v2", "rejected_v2"]
    assert out["chosen_v1"]["input_ids"] == p1 + r1
    assert out["rejected_v1"]["input_ids"] == p1 + r2
    assert out["chosen_v2"]["input_ids"] == p2 + r2
    assert out["rejected_v2"]["input_ids"] == p2 + r1
    assert out["chosen_v1"]["labels"] == [M] * len(p1) + r1
    assert out["rejected_v2"]["labels"] == [M] * len(p2) + r1
    assert out["truncated"] is False


def test_iopo_example_decodes_to_the_template(qwen_tokenizer, shared_data):
    recs, _ = load_records("iopo", shared_data / "iopo" / "trace_iopo_example.json")
    out = tokenize_iopo_group(qwen_tokenizer, recs[0], cutoff_len=None)
    raw = json.load(open(shared_data / "iopo" / "trace_iopo_example.json", encoding="utf-8"))[0]
    x1, x2 = raw["conversations"][0]["value"], raw["conversations"][1]["value"]
    y1, y2 = raw["chosen"]["value"], raw["rejected"]["value"]

    def prompt(x):
        return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                f"{x}<|im_end|>\n<|im_start|>assistant\n")

    want = {"chosen_v1": (x1, y1), "rejected_v1": (x1, y2), "chosen_v2": (x2, y2), "rejected_v2": (x2, y1)}
    for name, (x, y) in want.items():
        seq = out[name]
        assert qwen_tokenizer.decode(seq["input_ids"]) == prompt(x) + y + "<|im_end|>"
        resp = [t for t in seq["labels"] if t != M]
        assert qwen_tokenizer.decode(resp) == y + "<|im_end|>"
        n_prompt = seq["labels"].index(next(t for t in seq["labels"] if t != M))
        assert qwen_tokenizer.decode(seq["input_ids"][:n_prompt]) == prompt(x)
        assert seq["input_ids"][:3] == [151644, 8948, 198] and seq["input_ids"][-1] == IM_END


def test_system_override_and_empty_system(qwen_tokenizer):
    rec = {"prompt": "hi", "chosen": "hi", "rejected": "hello", "system": ""}
    out = tokenize_dpo_pair(qwen_tokenizer, rec, None)
    assert out["chosen"]["input_ids"] == USER_HI_IDS + [6023, IM_END]
    rec["system"] = None
    out = tokenize_dpo_pair(qwen_tokenizer, rec, None, default_system="Be brief.")
    assert qwen_tokenizer.decode(out["chosen"]["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


# ---- truncation, character tokenizer -----------------------------------------------------------------
# With CharTok and system "", the Qwen prompt for x is <s> "user\n" x <e> "\n" <s> "assistant\n":
# 1 + 5 + len(x) + 1 + 1 + 1 + 10 = 19 + len(x) tokens; a response y has len(y) + 1 tokens.
def _p(x):
    return [1] + [ord(c) for c in "user\n"] + [ord(c) for c in x] + [2, ord("\n"), 1] + [ord(c) for c in "assistant\n"]


def _r(y):
    return [ord(c) for c in y] + [2]


def _iopo(x1, x2, y1, y2):
    return {"x1": x1, "x2": x2, "y1": y1, "y2": y2, "system": ""}


def test_char_tokenizer_lengths():
    tok = CharTok()
    out = tokenize_iopo_group(tok, _iopo("ab", "abc", "x", "yy"), None)
    assert out["chosen_v1"]["input_ids"] == _p("ab") + _r("x")
    assert len(_p("ab")) == 21 and len(_r("yy")) == 3


def test_truncate_very_long_prompts():
    tok = CharTok()
    x1, x2 = "a" * 204, "b" * 154  # S = 223
    y1, y2 = "y" * 9, "z" * 4      # T = 10
    cutoff = 64                    # T*2 < 64 -> new_T = 10, new_S = 54
    out = tokenize_iopo_group(tok, _iopo(x1, x2, y1, y2), cutoff)
    assert out["truncated"] is True
    assert out["chosen_v1"]["input_ids"] == _p(x1)[:54] + _r(y1)
    assert out["rejected_v1"]["input_ids"] == _p(x1)[:54] + _r(y2)
    assert out["chosen_v2"]["input_ids"] == _p(x2)[:54] + _r(y2)
    assert out["rejected_v2"]["input_ids"] == _p(x2)[:54] + _r(y1)
    assert out["chosen_v1"]["labels"] == [M] * 54 + _r(y1)
    assert max(len(s["input_ids"]) for k, s in out.items() if k != "truncated") == 64


def test_truncate_very_long_responses():
    tok = CharTok()
    x1, x2 = "a" * 9, "b" * 11         # S = 30
    y1, y2 = "y" * 300, "z" * 99       # T = 301
    cutoff = 100                       # S*2 < 100 -> max_T = 70; new_S = 30
    out = tokenize_iopo_group(tok, _iopo(x1, x2, y1, y2), cutoff)
    assert out["chosen_v1"]["input_ids"] == _p(x1) + _r(y1)[:70]
    assert out["rejected_v1"]["input_ids"] == _p(x1) + _r(y2)[:70]
    assert out["chosen_v2"]["input_ids"] == _p(x2) + _r(y2)[:70]
    assert out["rejected_v2"]["labels"] == [M] * 30 + _r(y1)[:70]
    # the cut response loses its <|im_end|>: heads are kept, exactly as the reference pipeline does
    assert out["chosen_v1"]["input_ids"][-1] == ord("y")


def test_truncate_both():
    tok = CharTok()
    x1, x2 = "a" * 81, "b" * 14        # S = 100
    y1, y2 = "y" * 10, "z" * 149       # T = 150
    cutoff = 100                       # max_T = int(100 * 150 / 250) = 60, new_S = 40
    out = tokenize_iopo_group(tok, _iopo(x1, x2, y1, y2), cutoff)
    assert out["chosen_v1"]["input_ids"] == _p(x1)[:40] + _r(y1)       # y1 (11 tokens) is not cut
    assert out["rejected_v1"]["input_ids"] == _p(x1)[:40] + _r(y2)[:60]
    assert out["chosen_v2"]["input_ids"] == _p(x2)[:33] + _r(y2)[:60]   # x2 (33 tokens) is not cut
    assert out["rejected_v2"]["input_ids"] == _p(x2) + _r(y1)
    assert len(out["rejected_v1"]["input_ids"]) == 100


def test_dpo_truncation_uses_longer_response():
    tok = CharTok()
    rec = {"prompt": "a" * 61, "chosen": "y" * 19, "rejected": "z" * 99, "system": ""}  # S = 80, T = 100
    out = tokenize_dpo_pair(tok, rec, 90)  # max_T = int(90 * 100 / 180) = 50, new_S = 40
    assert out["chosen"]["input_ids"] == _p("a" * 61)[:40] + _r("y" * 19)
    assert out["rejected"]["input_ids"] == _p("a" * 61)[:40] + _r("z" * 99)[:50]
    assert out["rejected"]["labels"] == [M] * 40 + _r("z" * 99)[:50]


def test_sft_multi_turn_labels_and_budget():
    tok = CharTok()
    rec = {"turns": [["hi", "ok"], ["again", "sure!"]], "system": ""}
    out = tokenize_sft(tok, rec, None)["sequence"]
    p2 = [ord("\n")] + _p("again")
    assert out["input_ids"] == _p("hi") + _r("ok") + p2 + _r("sure!")
    assert out["labels"] == [M] * 21 + _r("ok") + [M] * len(p2) + _r("sure!")
    # cutoff 26: turn 1 takes 21 + 3 = 24; turn 2 gets the 2 left: infer_seqlen(25, 6, 2) = (2, 0)
    out = tokenize_sft(tok, rec, 26)
    assert out["sequence"]["input_ids"] == _p("hi") + _r("ok") + [ord("\n"), 1]
    assert out["sequence"]["labels"] == [M] * 21 + _r("ok") + [M, M]
    assert out["truncated"] is True
    assert truncated_lengths("sft", [21, 3, 25, 6], 24) == [21, 3, 0, 0]


def test_llama3_template_strings_and_tokens(qwen_tokenizer):
    assert LLAMA3.prompt("hi") == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                                   "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert LLAMA3.prompt("hi", "S").startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user")
    assert LLAMA3.response("ok") == "ok<|eot_id|>"
    assert QWEN.prompt("hi", "") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    tok = CharTok()
    out = tokenize_iopo_group(tok, _iopo("a", "b", "c", "d"), None, template="llama3")
    head = [3, 5] + [ord(c) for c in "user"] + [6, 10, 10, ord("a"), 4, 5] + [ord(c) for c in "assistant"] + [6, 10, 10]
    assert out["chosen_v1"]["input_ids"] == head + [ord("c"), 4]
    assert out["chosen_v1"]["labels"] == [M] * len(head) + [ord("c"), 4]
    with pytest.raises(ValueError, match="unknown chat template"):
        tokenize_iopo_group(tok, _iopo("a", "b", "c", "d"), None, template="vicuna")
