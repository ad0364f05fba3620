"""Tokenisation and joint truncation, token for token as the reference pipeline (docs/truncation.md).

Each record is rendered into text *pieces* (prompts and responses, see :mod:`data_pipeline.templates`),
every piece is encoded separately with ``tok.encode(text, add_special_tokens=False)`` and the pieces are
cut by the joint truncation rule, keeping their heads:

- IOPO group ``<x1, y1, x2, y2>``: pieces ``[P(x1), P(x2), R(y1), R(y2)]``; ``S`` = the longer prompt,
  ``T`` = the longer response; ``(new_S, new_T) = infer_seqlen(S, T, cutoff_len)``; every prompt is cut to
  ``new_S`` tokens and every response to ``new_T``. Sequences, in this fixed order (:data:`SEQUENCE_NAMES`):
  ``chosen_v1 = x1+y1``, ``rejected_v1 = x1+y2``, ``chosen_v2 = x2+y2``, ``rejected_v2 = x2+y1``.
- DPO pair: pieces ``[P(x), R(chosen), R(rejected)]``, ``S`` = len(prompt), ``T`` = the longer
  response; sequences ``chosen``, ``rejected``.
- SFT conversation: pieces ``[P1, R1, P2, R2, ...]``, truncated turn by turn with the remaining budget
  (turns that no longer fit are dropped); one sequence.

Labels equal ``input_ids`` on response tokens and ``-100`` on prompt tokens; they are *not* shifted
(the loss shifts them, as HF models do).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from data_pipeline.templates import ChatTemplate, get_template

IGNORE_INDEX = -100

# Sequence layout per kind: for each output sequence, the indices of its pieces; a piece is a label
# piece (response) when its index is in RESPONSE_PIECES. SFT uses all pieces, odd ones are responses.
SEQUENCE_NAMES = {
    "iopo": ("chosen_v1", "rejected_v1", "chosen_v2", "rejected_v2"),
    "dpo": ("chosen", "rejected"),
    "sft": ("sequence",),
}
LAYOUTS = {
    "iopo": ((0, 2), (0, 3), (1, 3), (1, 2)),
    "dpo": ((0, 1), (0, 2)),
    "sft": None,
}
# The group size K of each kind (rows per group in a batch): the one definition the trainer and the
# objectives derive theirs from.
NUM_SEQUENCES = {kind: len(names) for kind, names in SEQUENCE_NAMES.items()}


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """Joint truncation (docs/truncation.md): new (prompt, response) lengths for a cutoff."""
    if target_len * 2 < cutoff_len:  # only the source may need cutting
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:  # only the target
        max_target_len = cutoff_len - source_len
    else:  # both, in proportion
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    max_source_len = max(cutoff_len - new_target_len, 0)
    new_source_len = min(max_source_len, source_len)
    return new_source_len, new_target_len


# --------------------------------------------------------------------------------------------
# Text pieces
# --------------------------------------------------------------------------------------------
def record_texts(kind: str, rec: dict, template: ChatTemplate) -> list[str]:
    """The text pieces of one normalised record (see :mod:`data_pipeline.readers`)."""
    sys = rec.get("system")
    if kind == "iopo":
        return [template.prompt(rec["x1"], sys), template.prompt(rec["x2"], sys),
                template.response(rec["y1"]), template.response(rec["y2"])]
    if kind == "dpo":
        return [template.prompt(rec["prompt"], sys), template.response(rec["chosen"]),
                template.response(rec["rejected"])]
    if kind == "sft":
        out = []
        for j, (u, a) in enumerate(rec["turns"]):
            out.append(template.prompt(u, sys, first_turn=(j == 0)))
            out.append(template.response(a))
        return out
    raise ValueError(f"unknown training kind {kind!r}; expected iopo, dpo or sft")


def truncated_lengths(kind: str, lens: Sequence[int], cutoff_len: Optional[int]) -> list[int]:
    """New length of every piece of a record (0 = dropped) under ``cutoff_len`` (None = no cut)."""
    lens = [int(n) for n in lens]
    if cutoff_len is None:
        return lens
    if kind == "iopo":
        s, t = infer_seqlen(max(lens[0], lens[1]), max(lens[2], lens[3]), cutoff_len)
        return [min(lens[0], s), min(lens[1], s), min(lens[2], t), min(lens[3], t)]
    if kind == "dpo":
        s, t = infer_seqlen(lens[0], max(lens[1], lens[2]), cutoff_len)
        return [min(lens[0], s), min(lens[1], t), min(lens[2], t)]
    if kind == "sft":
        out = [0] * len(lens)
        total = 0
        for j in range(0, len(lens), 2):
            if total >= cutoff_len:
                break
            s, t = infer_seqlen(lens[j], lens[j + 1], cutoff_len - total)
            out[j], out[j + 1] = s, t
            total += s + t
        return out
    raise ValueError(f"unknown training kind {kind!r}")


def sequence_pieces(kind: str, num_pieces: int) -> list[list[tuple[int, bool]]]:
    """For each output sequence, its pieces as (piece index, is_response)."""
    if kind == "sft":
        return [[(j, j % 2 == 1) for j in range(num_pieces)]]
    return [[(j, j >= (1 if kind == "dpo" else 2)) for j in seq] for seq in LAYOUTS[kind]]


def encode(tok, text: str) -> list[int]:
    """``tok.encode(text, add_special_tokens=False)``: special tokens written in the text are parsed."""
    return list(tok.encode(text, add_special_tokens=False))


def _sequences(kind: str, pieces: list[list[int]]) -> dict:
    out = {}
    for name, layout in zip(SEQUENCE_NAMES[kind], sequence_pieces(kind, len(pieces))):
        ids: list[int] = []
        labels: list[int] = []
        for j, is_resp in layout:
            ids += pieces[j]
            labels += pieces[j] if is_resp else [IGNORE_INDEX] * len(pieces[j])
        out[name] = {"input_ids": ids, "labels": labels}
    return out


def tokenize_record(
    tok,
    kind: str,
    rec: dict,
    cutoff_len: Optional[int],
    template: Union[str, ChatTemplate] = "qwen",
    default_system: Optional[str] = None,
) -> dict:
    """Tokenise one normalised record into its sequences.

    Returns ``{name: {"input_ids": [...], "labels": [...]}, ..., "truncated": bool}`` with the names of
    :data:`SEQUENCE_NAMES` ``[kind]`` in order.
    """
    tpl = get_template(template, default_system)
    pieces = [encode(tok, t) for t in record_texts(kind, rec, tpl)]
    new = truncated_lengths(kind, [len(p) for p in pieces], cutoff_len)
    truncated = any(n < len(p) for n, p in zip(new, pieces))
    pieces = [p[:n] for p, n in zip(pieces, new)]
    out = _sequences(kind, pieces)
    out["truncated"] = truncated
    return out


def tokenize_iopo_group(tok, rec: dict, cutoff_len: Optional[int], template="qwen", default_system=None) -> dict:
    """The 4 sequences of an IOPO group: chosen_v1=(x1,y1), rejected_v1=(x1,y2), chosen_v2=(x2,y2), rejected_v2=(x2,y1)."""
    return tokenize_record(tok, "iopo", rec, cutoff_len, template, default_system)


def tokenize_dpo_pair(tok, rec: dict, cutoff_len: Optional[int], template="qwen", default_system=None) -> dict:
    """The 2 sequences of a DPO pair: chosen=(x,y_w), rejected=(x,y_l)."""
    return tokenize_record(tok, "dpo", rec, cutoff_len, template, default_system)


def tokenize_sft(tok, rec: dict, cutoff_len: Optional[int], template="qwen", default_system=None) -> dict:
    """The one sequence of an SFT conversation (labels on every assistant turn)."""
    return tokenize_record(tok, "sft", rec, cutoff_len, template, default_system)


def as_numpy(seq: dict) -> dict:
    """int32 arrays of one sequence dict."""
    return {k: np.asarray(v, dtype=np.int32) for k, v in seq.items()}
