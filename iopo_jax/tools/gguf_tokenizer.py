"""Build a HF fast tokenizer from a GGUF file's vocabulary, with the ``tokenizers`` library only.

A byte-level BPE GGUF (``tokenizer.ggml.model == "gpt2"``, the tokenizer of Llama 3, Qwen2 and SmolLM)
stores its vocabulary (``tokenizer.ggml.tokens``, already spelled in the GPT-2 byte alphabet), its merges,
each token's type (3 = control, 4 = user-defined) and the name of its pre-tokenizer
(``tokenizer.ggml.pre``). The pre-tokenizer is not stored, only named; :data:`PRE_TOKENIZERS` maps the names
this converter knows to the split rules the model was trained with (llama.cpp's ``llama-vocab.cpp`` lists
the same rules per name). An unknown name is an error, never a silent fallback: a wrong split gives a
tokenizer that runs but encodes text differently from the one the model learned.

This does not go through transformers' GGUF loader, whose module imports torch (transformers 5.24).
"""
from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# Split rules, written as the models' own tokenizer.json files write them.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(pattern: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _gpt2():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2():
    # SmolLM / StarCoder: every digit on its own, then GPT-2's split.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


#: ``tokenizer.ggml.pre`` -> a function returning the pre-tokenizer. Add a model family by adding its name.
PRE_TOKENIZERS = {
    "gpt2": _gpt2,
    "smollm": _digits_then_gpt2,
    "starcoder": _digits_then_gpt2,
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "llama3": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "llama-v3": lambda: _split_then_bytes(_LLAMA3_SPLIT),
}

CONTROL, USER_DEFINED = 3, 4  # GGUF token types that become added tokens (special / not special)


def _check(fields: dict, key: str):
    if key not in fields:
        raise ValueError(f"the GGUF has no field {key}; cannot build its tokenizer")
    return fields[key]


def build_tokenizer(fields: dict):
    """A ``PreTrainedTokenizerFast`` from a GGUF's ``tokenizer.*`` fields (``{key: value}``).

    Needs ``tokenizer.ggml.model`` = "gpt2", ``.pre`` in :data:`PRE_TOKENIZERS`, ``.tokens`` and ``.merges``;
    uses ``.token_type``, ``.bos_token_id`` / ``.eos_token_id`` / ``.unknown_token_id`` /
    ``.padding_token_id`` and ``.add_bos_token`` when present, and ``tokenizer.chat_template``.
    """
    from transformers import PreTrainedTokenizerFast

    kind = _check(fields, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF field tokenizer.ggml.model is '{kind}'; this converter builds byte-level BPE "
                         "tokenizers only ('gpt2': Llama 3, Qwen2, SmolLM)")
    pre = fields.get("tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"GGUF field tokenizer.ggml.pre is '{pre}', whose split rules this converter does not "
                         f"know (known: {', '.join(sorted(PRE_TOKENIZERS))}); add them to PRE_TOKENIZERS in "
                         f"{__name__}")
    tokens = list(_check(fields, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _check(fields, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the GGUF's tokenizer.ggml.tokens holds duplicate tokens")

    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tk.decoder = decoders.ByteLevel()
    types = list(fields.get("tokenizer.ggml.token_type") or ())
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == CONTROL])

    def token(key):
        i = fields.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos = token("bos_token_id")
    if fields.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    kw = {k: v for k, v in (("bos_token", bos), ("eos_token", token("eos_token_id")),
                            ("unk_token", token("unknown_token_id")), ("pad_token", token("padding_token_id")))
          if v is not None}
    out = PreTrainedTokenizerFast(tokenizer_object=tk, clean_up_tokenization_spaces=False, **kw)
    template = fields.get("tokenizer.chat_template")
    if template:
        out.chat_template = template
    return out
