"""The offline Qwen2 tokenizer against published Qwen2 encodings.

Expected ids are not derived from our implementation. Sources:
- [HF] huggingface/transformers, tests/models/qwen2/test_tokenization_qwen2.py,
  Qwen2TokenizationTest.test_tokenizer_integration (expected_encoding for the
  "Qwen/Qwen-tokenizer" hub tokenizer, revision 5909c822...): three sequences (English, Chinese
  with emoji, and code with newlines); the padding ids there are stripped here.
- [RTP] alibaba/rtp-llm, rtp_llm/test/tokenizer_test/qwen2_tokenizer_test.py: "<|im_start|>hello<|im_end|>".
- [DL] io.teknek deliverance QwenTokenizerTest (Qwen2.5 ids quoted from the hub tokenizer):
  " hello sir. How are you Edward?".
"""
import json
import os

import pytest

from data_pipeline.tokenizer import QWEN2_SPECIAL_TOKENS, load_tokenizer

HF_ENGLISH = (
    "Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) provides "
    "general-purpose architectures (BERT, GPT-2, RoBERTa, XLM, DistilBert, XLNet...) for Natural "
    "Language Understanding (NLU) and Natural Language Generation (NLG) with over 32+ pretrained "
    "models in 100+ languages and deep interoperability between Jax, PyTorch and TensorFlow."
)
HF_ENGLISH_IDS = [8963, 388, 320, 69514, 3881, 438, 4510, 27414, 32852, 388, 323, 4510, 27414, 21334, 35722, 1455, 529, 8, 5707, 4586, 58238, 77235, 320, 61437, 11, 479, 2828, 12, 17, 11, 11830, 61437, 64, 11, 1599, 10994, 11, 27604, 321, 33, 529, 11, 29881, 6954, 32574, 369, 18448, 11434, 45451, 320, 45, 23236, 8, 323, 18448, 11434, 23470, 320, 30042, 38, 8, 448, 916, 220, 18, 17, 10, 80669, 4119, 304, 220, 16, 15, 15, 10, 15459, 323, 5538, 94130, 2897, 1948, 619, 706, 11, 5355, 51, 21584, 323, 94986, 13]  # fmt: skip
HF_CHINESE = "🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。使用预训练模型可以减少计算消耗和碳排放，并且节省从头训练所需要的时间和资源。"
HF_CHINESE_IDS = [144834, 80532, 93685, 83744, 34187, 73670, 104261, 29490, 62189, 103937, 104034, 102830, 98841, 104034, 104949, 9370, 5333, 58143, 102011, 1773, 37029, 98841, 104034, 104949, 73670, 101940, 100768, 104997, 33108, 100912, 105054, 90395, 100136, 106831, 45181, 64355, 104034, 113521, 101975, 33108, 85329, 1773]  # fmt: skip
HF_CODE = '```python\ntokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-tokenizer")\ntokenizer("世界，你好！")```'
HF_CODE_IDS = [73594, 12669, 198, 85593, 284, 8979, 37434, 6387, 10442, 35722, 445, 48, 16948, 45274, 16948, 34841, 3135, 1138, 85593, 445, 99489, 3837, 108386, 6313, 899, 73594]  # fmt: skip

CASES = [
    (HF_ENGLISH, HF_ENGLISH_IDS),
    (HF_CHINESE, HF_CHINESE_IDS),
    (HF_CODE, HF_CODE_IDS),
    ("<|im_start|>hello<|im_end|>", [151644, 14990, 151645]),
    (" hello sir. How are you Edward?", [23811, 27048, 13, 2585, 525, 498, 21891, 30]),
]


@pytest.mark.parametrize("text,ids", CASES, ids=["english", "chinese_emoji", "code", "special", "spaces"])
def test_official_ids(qwen_tokenizer, text, ids):
    assert qwen_tokenizer.encode(text, add_special_tokens=False) == ids
    assert qwen_tokenizer.decode(ids) == text


def test_special_tokens_and_files(qwen_tokenizer, qwen_tokenizer_dir):
    for tok, idx in QWEN2_SPECIAL_TOKENS.items():
        assert qwen_tokenizer.convert_tokens_to_ids(tok) == idx
    assert qwen_tokenizer.eos_token == "<|im_end|>"
    assert qwen_tokenizer.pad_token_id == 151643
    assert len(qwen_tokenizer) == 151646
    assert os.path.isfile(os.path.join(qwen_tokenizer_dir, "tokenizer.json"))
    cfg = json.load(open(os.path.join(qwen_tokenizer_dir, "tokenizer_config.json")))
    assert "chat_template" in cfg


def test_nfc_normalisation(qwen_tokenizer):
    # U+03D2 U+0301 (NFD) normalises to U+03D3 under NFC only.
    nfd, nfc = "\u03d2\u0301\u03d2\u0308\u017f\u0307", "\u03d3\u03d4\u1e9b"
    assert qwen_tokenizer.encode(nfd, add_special_tokens=False) == qwen_tokenizer.encode(nfc, add_special_tokens=False)


def test_whitespace_runs(qwen_tokenizer):
    # Whitespace-only runs, tabs and trailing spaces must round-trip exactly.
    for text in ["a  b   c", "\t\tindent\n\n\nx", "trailing   ", "  \n  \n"]:
        assert qwen_tokenizer.decode(qwen_tokenizer.encode(text, add_special_tokens=False)) == text


def test_chat_template_matches_spec(qwen_tokenizer):
    """docs/truncation.md: the Qwen prompt with the default system prompt."""
    msgs = [{"role": "user", "content": "写一首诗"}]
    got = qwen_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    want = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n写一首诗<|im_end|>\n<|im_start|>assistant\n"
    )
    assert got == want
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    got = qwen_tokenizer.apply_chat_template(msgs, tokenize=False)
    assert got == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path))
