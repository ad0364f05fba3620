"""``SUB_INSTRUCTION_k`` section headings: the one parser shared by the rule verifiers (evaluation,
rule rewards) and the RL segmentation (:mod:`iopo_jax.rl.segments`), so one answer is cut the same way
everywhere.

A heading is recognised at the start of a line, in any of the spellings models produce::

    SUB_INSTRUCTION_1:      sub_instruction_1：      SUB_INSTRUCTION 1      Sub-Instruction-1:
    **SUB_INSTRUCTION_1**:  **SUB_INSTRUCTION_1:**   ### SUB_INSTRUCTION_1  - SUB_INSTRUCTION_1:
    【SUB_INSTRUCTION_1】    [SUB_INSTRUCTION_1]:      > SUB_INSTRUCTION_1：

(case-insensitive; ``_``, ``-``, space or nothing between the words and before the number; ASCII or
full-width colon). To avoid taking a sentence such as ``SUB_INSTRUCTION_1 asks for ...`` for a heading,
a line-start match counts only when it has a colon, a Markdown ``#`` heading, emphasis or brackets
around it, or nothing else on its line. Mentions in the middle of a line are not headings.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable

_EMPH = r"(?:\*{1,3}|_{1,3})"
HEADING_RE = re.compile(
    r"^[ \t]*"
    r"(?P<quote>>[ \t]*)?"
    r"(?P<hash>\#{1,6}[ \t]*)?"
    r"(?:[-*+][ \t]+)?"
    rf"(?P<open>{_EMPH})?[ \t]*"
    r"(?P<lbr>[\[【(（])?[ \t]*"
    r"sub[ _\-]?instruction[ _\-]*(?P<num>\d+)"
    r"[ \t]*(?P<rbr>[\]】)）])?"
    rf"(?P<close>{_EMPH})?"
    r"[ \t]*(?P<colon>[:：])?"
    rf"(?:[ \t]*{_EMPH})?",
    re.IGNORECASE | re.MULTILINE,
)


@dataclasses.dataclass(frozen=True)
class Heading:
    number: int  # the k of SUB_INSTRUCTION_k as written
    start: int  # char offset of the start of the heading line
    end: int  # char offset just after the heading (and its colon)


def find_headings(text: str) -> list[Heading]:
    """All ``SUB_INSTRUCTION_k`` headings of ``text`` in order (see the module docstring for the rules)."""
    out = []
    for m in HEADING_RE.finditer(text):
        line_end = text.find("\n", m.end())
        rest = text[m.end(): len(text) if line_end < 0 else line_end]
        decorated = m.group("colon") or m.group("hash") or m.group("open") or m.group("close") or m.group("lbr")
        if decorated or not rest.strip():
            out.append(Heading(int(m.group("num")), m.start(), m.end()))
    return out


def expected_ids_from_keys(keys: Iterable[str]) -> list[int]:
    """``["sub_instruction_0", "sub_instruction_1", ...]`` -> ``[0, 1, ...]`` (order kept)."""
    ids = []
    for i, k in enumerate(keys):
        m = re.fullmatch(r"sub[ _\-]?instruction[ _\-]*(\d+)", str(k).strip(), re.IGNORECASE)
        if not m:
            raise ValueError(f"sub-instruction key #{i} {k!r} is not of the form 'sub_instruction_<k>'")
        ids.append(int(m.group(1)))
    return ids
