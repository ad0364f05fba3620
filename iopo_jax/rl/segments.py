"""Segment a response by its ``SUB_INSTRUCTION_k`` headings and map every token to its segment.

Headings are found by :func:`data_pipeline.headings.find_headings`, the parser the rule verifiers use
too (any casing, ``_``/``-``/space separators, ASCII or full-width colon, Markdown emphasis, ``#`` and
brackets; a bare line-start mention followed by other text is not a heading).

Segment ``j`` spans from the start of its heading line (the heading belongs to its segment) up to the
start of the next heading line, or the end of the text. Text before the first heading, and segments whose
number is not expected, map to -1. Headings carry the *numbers used in the prompt*: EIFBench keys are
``sub_instruction_0..`` for most instances and ``sub_instruction_1..`` for some (and a few skip numbers),
so callers pass the expected numbers (``expected_ids_from_keys(item["sub_instructions"])``) or a count
and an ``index_base`` (0 or 1). Slot ``j`` is the position of a number in ``expected_ids``.

The format flag is 1 when the headings found are exactly the expected numbers, each once, in order.

Token spans: a token belongs to the segment containing its first character; tokens with an empty span
(special tokens such as ``<|im_end|>``) get -1. Offsets come from a HF fast tokenizer
(``return_offsets_mapping=True``) when the text is re-tokenised, or -- for sampled token ids, which
need not equal a re-tokenisation -- from the tokens' bytes with :func:`offsets_from_token_bytes`
(:func:`hf_token_bytes` gives the bytes of byte-level BPE tokens such as Qwen2's).
"""
from __future__ import annotations

import bisect
import codecs
import dataclasses
import re
from typing import Mapping, Sequence

import numpy as np

# One heading parser for evaluation, rule rewards and RL segmentation (re-exported here).
from data_pipeline.headings import HEADING_RE, Heading, expected_ids_from_keys, find_headings  # noqa: F401


@dataclasses.dataclass
class Segmentation:
    token_segment: np.ndarray  # [num_tokens] int32, slot j of each token, -1 outside any segment
    format_ok: int  # 1 when exactly one heading per expected number, in order
    found: np.ndarray  # [J] bool, slot j has at least one segment
    spans: list  # [(slot j or -1, char_start, char_end)] one per heading, in text order
    headings: list  # [Heading]


def _resolve_expected(expected_ids, num_sub_instructions, index_base) -> list[int]:
    if expected_ids is not None:
        if isinstance(expected_ids, Mapping):
            return expected_ids_from_keys(expected_ids.keys())
        ids = [int(x) for x in expected_ids]
    elif num_sub_instructions is not None:
        if index_base not in (0, 1):
            raise ValueError(f"index_base must be 0 or 1, got {index_base!r}")
        ids = list(range(index_base, index_base + int(num_sub_instructions)))
    else:
        raise ValueError("pass expected_ids (heading numbers) or num_sub_instructions (with index_base)")
    if len(set(ids)) != len(ids):
        raise ValueError(f"expected_ids has duplicates: {ids}")
    return ids


def segment_text(text: str, expected_ids: Sequence[int]) -> tuple[list, int, np.ndarray, list[Heading]]:
    """Char-level segmentation: ``(spans, format_ok, found [J], headings)``."""
    slot_of = {k: j for j, k in enumerate(expected_ids)}
    heads = find_headings(text)
    spans = []
    for n, h in enumerate(heads):
        end = heads[n + 1].start if n + 1 < len(heads) else len(text)
        spans.append((slot_of.get(h.number, -1), h.start, end))
    found = np.zeros((len(expected_ids),), bool)
    for j, _, _ in spans:
        if j >= 0:
            found[j] = True
    format_ok = int([h.number for h in heads] == list(expected_ids))
    return spans, format_ok, found, heads


def token_segments_from_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Per-token slot from char spans: the segment holding the token's first char; empty spans -> -1."""
    starts = [s for _, s, _ in spans]
    out = np.full((len(offsets),), -1, np.int32)
    for t, (s, e) in enumerate(offsets):
        if e <= s:
            continue
        k = bisect.bisect_right(starts, s) - 1
        if k >= 0 and s < spans[k][2]:
            out[t] = spans[k][0]
    return out


def segment_response(text: str, token_offsets: Sequence[tuple[int, int]], expected_ids=None, *,
                     num_sub_instructions: int | None = None, index_base: int = 0) -> Segmentation:
    """Segment ``text`` and map its tokens (char ``(start, end)`` offsets into ``text``) to slots.

    ``expected_ids``: heading numbers the prompt used, in order (a list of ints, or the EIFBench
    ``sub_instructions`` mapping itself); or give ``num_sub_instructions`` and ``index_base`` (0 or 1).
    """
    ids = _resolve_expected(expected_ids, num_sub_instructions, index_base)
    spans, format_ok, found, heads = segment_text(text, ids)
    offsets = [(int(s), int(e)) for s, e in token_offsets]
    for t, (s, e) in enumerate(offsets):
        if s < 0 or e > len(text) or (e < s):
            raise ValueError(f"token {t}: offset ({s}, {e}) outside the text of length {len(text)}")
    return Segmentation(token_segments_from_spans(offsets, spans), format_ok, found, spans, heads)


def segment_batch(texts: Sequence[str], token_offsets: Sequence[Sequence[tuple[int, int]]], expected_ids: Sequence,
                  *, num_tokens: int, num_slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segment a batch into static shapes for the jitted advantage computation.

    Returns ``token_segment [B, num_tokens]`` int32 (-1 padded; token t of response b at column t),
    ``found [B, num_slots]`` bool and ``format_ok [B]`` int32. Fails naming the item when a response has
    more tokens than ``num_tokens`` or more expected sub-instructions than ``num_slots``.
    """
    if not (len(texts) == len(token_offsets) == len(expected_ids)):
        raise ValueError(f"texts ({len(texts)}), token_offsets ({len(token_offsets)}) and expected_ids "
                         f"({len(expected_ids)}) must have the same length")
    b = len(texts)
    seg = np.full((b, num_tokens), -1, np.int32)
    found = np.zeros((b, num_slots), bool)
    fmt = np.zeros((b,), np.int32)
    for i, (text, offs, ids) in enumerate(zip(texts, token_offsets, expected_ids)):
        if len(offs) > num_tokens:
            raise ValueError(f"response {i}: {len(offs)} tokens > num_tokens={num_tokens}")
        r = segment_response(text, offs, ids)
        if r.found.shape[0] > num_slots:
            raise ValueError(f"response {i}: {r.found.shape[0]} sub-instructions > num_slots={num_slots}")
        seg[i, : len(offs)] = r.token_segment
        found[i, : r.found.shape[0]] = r.found
        fmt[i] = r.format_ok
    return seg, found, fmt


# ------------------------------------------------------------------------------------------------
# token offsets from token bytes


def offsets_from_token_bytes(token_bytes: Sequence[bytes]) -> tuple[str, list[tuple[int, int]]]:
    """Decode a token sequence as UTF-8 and give each token its char span in the decoded text.

    A token holding only part of a multi-byte character gets the span of that character (so both halves
    of a split Chinese character land in the same segment); empty tokens get an empty span. Invalid
    bytes decode to U+FFFD.
    """
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts, offsets, pos = [], [], 0
    for b in token_bytes:
        out = dec.decode(bytes(b))
        if out:
            offsets.append((pos, pos + len(out)))
        elif b:  # partial character: it will start at pos
            offsets.append((pos, pos + 1))
        else:
            offsets.append((pos, pos))
        parts.append(out)
        pos += len(out)
    tail = dec.decode(b"", final=True)
    parts.append(tail)
    text = "".join(parts)
    offsets = [(s, min(e, len(text))) for s, e in offsets]
    return text, offsets


def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet: printable Latin-1 bytes stand for themselves, the other
    byte values are shifted to code points 256, 257, ... in increasing byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    kept = set(keep)
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in kept:
            mapping[chr(byte)] = byte
        else:
            mapping[chr(256 + extra)] = byte
            extra += 1
    return mapping


_BYTE_DECODER = None


def hf_token_bytes(tokenizer, ids: Sequence[int], *, special: str = "skip") -> list[bytes]:
    """Raw bytes of each token id for a byte-level BPE HF tokenizer (Qwen2, Llama-3, GPT-2 style).

    ``special="skip"`` gives special/added tokens empty bytes (they are not response text);
    ``special="text"`` gives their literal text.
    """
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        _BYTE_DECODER = _byte_decoder()
    if special not in ("skip", "text"):
        raise ValueError(f"special must be 'skip' or 'text', got {special!r}")
    added = set(getattr(tokenizer, "all_special_ids", []) or [])
    added |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    toks = tokenizer.convert_ids_to_tokens(list(ids))
    out = []
    for i, (tid, tok) in enumerate(zip(ids, toks)):
        if tok is None:
            raise ValueError(f"token #{i}: id {tid} is not in the tokenizer vocabulary")
        if int(tid) in added:
            out.append(b"" if special == "skip" else tok.encode("utf-8"))
            continue
        try:
            out.append(bytes(_BYTE_DECODER[c] for c in tok))
        except KeyError as e:
            raise ValueError(f"token #{i} (id {tid}, {tok!r}) is not a byte-level BPE token") from e
    return out
