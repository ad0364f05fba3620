"""Rule verifiers for constraints that can be checked without a judge (English and Chinese).

A constraint is a JSON-able *spec* ``{"type": ..., **params}``::

    verify_constraints([{"type": "bullet_count", "n": 3},
                        {"type": "include_keywords", "keywords": ["river"]}], response)  # -> [True, False]

Types and parameters (counts take ``n`` for an exact number, or ``min`` and/or ``max``):

==================  ==========================  ===================================================
type                params                      passes when
==================  ==========================  ===================================================
include_keywords    keywords: [str]             every keyword occurs (ASCII keywords: whole word,
                                                case-insensitive; others: substring)
exclude_keywords    keywords: [str]             no keyword occurs (same matching)
keyword_frequency   keyword, n|min|max          the keyword's number of occurrences is in range
word_count          n|min|max                   words in range: runs of letters/digits of any script
                                                (joined by ' or -), numbers such as 3.5 or 1,000 as
                                                one word, each CJK character one word
char_count          n|min|max                   non-whitespace characters in range (for Chinese)
bullet_count        n|min|max                   lines starting with ``- ``, ``* `` or ``• `` and some
                                                text in range (a bare ``-`` or a rule ``- - -`` is not
                                                a bullet)
bullet_items        items: [str]                one bullet line per item: exactly len(items) bullet
                                                lines, each holding a different item
paragraph_count     n|min|max                   blocks separated by blank lines in range
starts_with         phrase                      the stripped response starts with it (case-insensitive)
                                                at a word boundary ("Yes" fails "Yesterday")
ends_with           phrase                      the stripped response ends with it (case-insensitive,
                                                at a word boundary)
json_format         keys: [str] (optional)      the stripped response, or the body of one Markdown
                                                code fence around it, is a JSON object with the keys
lowercase           (none)                      has a cased letter and no uppercase letter (text
                                                without cased letters, e.g. Chinese only, fails: it
                                                cannot show that it is in lowercase)
language            lang: "en" | "zh"           en: Latin letters and no CJK; zh: at least as many CJK
                                                characters as Latin words
no_commas           (none)                      no ``,`` and no ``，``
==================  ==========================  ===================================================

An empty (whitespace-only) response fails every constraint.

Multi-part answers (SegPO): a prompt with sub-instructions asks for one section per sub-instruction,
each opened by a heading line ``SUB_INSTRUCTION_k:`` (k = 1, 2, ...). Headings are found by
:func:`data_pipeline.headings.find_headings`, the parser the RL segmentation uses too (any casing,
ASCII or full-width colon ``：``, ``**SUB_INSTRUCTION_k:**``, ``## SUB_INSTRUCTION_k``, brackets; text
after the colon on the same line belongs to the section). :func:`split_sections` cuts a response into those
sections, :func:`format_ok` checks there is exactly one section per sub-instruction in order, and
:func:`verify_record` checks a demo evaluation record (see :mod:`data_pipeline.make_demo`) whose
``sub_instructions[j]["constraints"]`` apply to section j+1 only.
"""
from __future__ import annotations

import json
import re
from typing import Optional, Sequence

from data_pipeline.headings import find_headings

_COUNT_TYPES = ("word_count", "char_count", "bullet_count", "paragraph_count", "keyword_frequency")
SPEC_TYPES = (
    "include_keywords", "exclude_keywords", "keyword_frequency", "word_count", "char_count",
    "bullet_count", "bullet_items", "paragraph_count", "starts_with", "ends_with", "json_format", "lowercase",
    "language", "no_commas",
)
_CJK = r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"
_LETTERS = rf"(?:(?!{_CJK})[^\W_])+"  # letters/digits of any script but CJK
# A number with a decimal point or thousands separators; a word (parts joined by ' or -); a CJK character.
_WORD_RE = re.compile(rf"\d+(?:[.,]\d+)+|{_LETTERS}(?:['\u2019-]{_LETTERS})*|{_CJK}")
# A bullet marker, spaces, then text that is not only more markers (a bare "-" or a "- - -" rule is no bullet).
_BULLET_RE = re.compile(r"^[ \t]*[-*\u2022][ \t]+(?![-*_\u2022 \t]*$)\S", re.MULTILINE)
_PARA_SPLIT = re.compile(r"\n\s*\n")
_CJK_RE = re.compile(_CJK)
_LATIN_RE = re.compile(r"[A-Za-z]")
_FENCE_RE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)\n?[ \t]*```", re.DOTALL)


# --------------------------------------------------------------------------------------------
# Spec checks
# --------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_spec(spec) -> None:
    """Raise ValueError (naming the parameter) if ``spec`` is not a checkable constraint."""
    if not isinstance(spec, dict):
        raise ValueError(f"a constraint spec must be an object, got {type(spec).__name__}")
    t = spec.get("type")
    if t not in SPEC_TYPES:
        raise ValueError(f"unknown constraint type {t!r}; known: {', '.join(SPEC_TYPES)}")
    if t in ("include_keywords", "exclude_keywords"):
        kws = spec.get("keywords")
        if not isinstance(kws, list) or not kws or not all(isinstance(k, str) and k.strip() for k in kws):
            raise ValueError(f"{t}: 'keywords' must be a non-empty list of non-empty strings")
    if t == "bullet_items":
        items = spec.get("items")
        if not isinstance(items, list) or not items or not all(isinstance(k, str) and k.strip() for k in items):
            raise ValueError("bullet_items: 'items' must be a non-empty list of non-empty strings")
    if t == "keyword_frequency" and not (isinstance(spec.get("keyword"), str) and spec["keyword"].strip()):
        raise ValueError("keyword_frequency: 'keyword' must be a non-empty string")
    if t in _COUNT_TYPES:
        bounds = {k: spec.get(k) for k in ("n", "min", "max") if spec.get(k) is not None}
        if not bounds:
            raise ValueError(f"{t}: give 'n', or 'min' and/or 'max'")
        for k, v in bounds.items():
            if not _is_int(v) or v < 0:
                raise ValueError(f"{t}: '{k}' must be a non-negative integer, got {v!r}")
        if "n" in bounds and len(bounds) > 1:
            raise ValueError(f"{t}: give either 'n' or 'min'/'max', not both")
        if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
            raise ValueError(f"{t}: min {bounds['min']} > max {bounds['max']}")
    if t in ("starts_with", "ends_with") and not (isinstance(spec.get("phrase"), str) and spec["phrase"].strip()):
        raise ValueError(f"{t}: 'phrase' must be a non-empty string")
    if t == "json_format" and spec.get("keys") is not None:
        keys = spec["keys"]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError("json_format: 'keys' must be a list of strings")
    if t == "language" and spec.get("lang") not in ("en", "zh"):
        raise ValueError(f"language: 'lang' must be 'en' or 'zh', got {spec.get('lang')!r}")


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------
def _kw_pattern(kw: str) -> re.Pattern:
    if kw.isascii():
        return re.compile(r"(?<![A-Za-z0-9])" + re.escape(kw) + r"(?![A-Za-z0-9])", re.IGNORECASE)
    return re.compile(re.escape(kw))


def count_keyword(text: str, kw: str) -> int:
    """Occurrences of ``kw`` (ASCII: whole word, case-insensitive; otherwise substring)."""
    return len(_kw_pattern(kw).findall(text))


def count_words(text: str) -> int:
    """Words of any script (see the table above); ``"naïve café"`` is 2, ``"3.5 dollars"`` is 2."""
    return len(_WORD_RE.findall(text))


def _wordish(c: str) -> bool:
    return c.isalnum() and not _CJK_RE.match(c)


def starts_with_phrase(text: str, phrase: str) -> bool:
    """``text`` (stripped, case-insensitive) starts with ``phrase`` and the phrase ends at a word boundary."""
    t, p = text.strip().lower(), phrase.strip().lower()
    if not t.startswith(p):
        return False
    return len(t) == len(p) or not (_wordish(p[-1]) and _wordish(t[len(p)]))


def ends_with_phrase(text: str, phrase: str) -> bool:
    """``text`` (stripped, case-insensitive) ends with ``phrase`` and the phrase starts at a word boundary."""
    t, p = text.strip().lower(), phrase.strip().lower()
    if not t.endswith(p):
        return False
    return len(t) == len(p) or not (_wordish(p[0]) and _wordish(t[-len(p) - 1]))


def json_body(text: str) -> str:
    """The stripped text, or the body of a Markdown code fence (```json ... ```) wrapping all of it."""
    t = text.strip()
    m = _FENCE_RE.fullmatch(t)
    return m.group(1).strip() if m else t


def is_lowercase(text: str) -> bool:
    """At least one cased letter and no uppercase one (Chinese-only text has no cased letter: fails)."""
    return any(c.lower() != c.upper() for c in text) and text == text.lower()


def count_chars(text: str) -> int:
    return sum(1 for c in text if not c.isspace())


def count_bullets(text: str) -> int:
    return len(_BULLET_RE.findall(text))


def bullet_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if _BULLET_RE.match(ln)]


def count_paragraphs(text: str) -> int:
    return sum(1 for p in _PARA_SPLIT.split(text.strip()) if p.strip())


def detect_language(text: str) -> Optional[str]:
    """"en", "zh" or None: CJK characters are weighed against Latin words (a word ~ a character)."""
    cjk = len(_CJK_RE.findall(text))
    if cjk == 0:
        return "en" if _LATIN_RE.search(text) else None
    latin_words = len(re.findall(r"[A-Za-z]+", text))
    return "zh" if cjk >= latin_words else None


def _one_line_each(items: Sequence[str], lines: Sequence[str]) -> bool:
    """A perfect matching of items to distinct lines that contain them (augmenting paths)."""
    holds = [[j for j, ln in enumerate(lines) if count_keyword(ln, it)] for it in items]
    owner: dict[int, int] = {}

    def assign(i: int, seen: set) -> bool:
        for j in holds[i]:
            if j not in seen:
                seen.add(j)
                if j not in owner or assign(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(assign(i, set()) for i in range(len(items)))


def _in_range(v: int, spec: dict) -> bool:
    if spec.get("n") is not None:
        return v == spec["n"]
    lo, hi = spec.get("min"), spec.get("max")
    return (lo is None or v >= lo) and (hi is None or v <= hi)


def verify(spec: dict, response: str) -> bool:
    """True when ``response`` satisfies the constraint ``spec`` (raises ValueError on a bad spec)."""
    check_spec(spec)
    t = spec["type"]
    r = response if isinstance(response, str) else ""
    if not r.strip():
        return False  # an empty answer follows no instruction (not even "do not use the word X")
    if t == "include_keywords":
        return all(count_keyword(r, k) > 0 for k in spec["keywords"])
    if t == "exclude_keywords":
        return all(count_keyword(r, k) == 0 for k in spec["keywords"])
    if t == "keyword_frequency":
        return _in_range(count_keyword(r, spec["keyword"]), spec)
    if t == "word_count":
        return _in_range(count_words(r), spec)
    if t == "char_count":
        return _in_range(count_chars(r), spec)
    if t == "bullet_count":
        return _in_range(count_bullets(r), spec)
    if t == "bullet_items":
        lines = bullet_lines(r)
        return len(lines) == len(spec["items"]) and _one_line_each(spec["items"], lines)
    if t == "paragraph_count":
        return _in_range(count_paragraphs(r), spec)
    if t == "starts_with":
        return starts_with_phrase(r, spec["phrase"])
    if t == "ends_with":
        return ends_with_phrase(r, spec["phrase"])
    if t == "json_format":
        try:
            obj = json.loads(json_body(r))
        except (json.JSONDecodeError, ValueError):
            return False
        return isinstance(obj, dict) and all(k in obj for k in (spec.get("keys") or []))
    if t == "lowercase":
        return is_lowercase(r)
    if t == "language":
        return detect_language(r) == spec["lang"]
    if t == "no_commas":
        return "," not in r and "\uff0c" not in r
    raise AssertionError(t)  # unreachable: check_spec rejects unknown types


def verify_constraints(specs: Sequence[dict], response: str) -> list[bool]:
    """Pass/fail of every constraint spec, in order."""
    return [verify(s, response) for s in specs]


# --------------------------------------------------------------------------------------------
# Sub-instruction sections (SegPO)
# --------------------------------------------------------------------------------------------
def section_spans(response: str) -> list[tuple[int, int, int]]:
    """``(k, start, end)`` character spans of every ``SUB_INSTRUCTION_k`` section, in order of appearance.

    A span starts at its heading line and ends where the next heading line starts (or at the end of the
    text): the spans of :func:`iopo_jax.rl.segments.segment_text`, from the same parser.
    """
    heads = find_headings(response)
    return [(h.number, h.start, heads[i + 1].start if i + 1 < len(heads) else len(response))
            for i, h in enumerate(heads)]


def split_sections(response: str) -> dict[int, str]:
    """``{k: body}`` of each ``SUB_INSTRUCTION_k`` section (heading removed, stripped; first one wins)."""
    out: dict[int, str] = {}
    heads = find_headings(response)
    for i, h in enumerate(heads):
        end = heads[i + 1].start if i + 1 < len(heads) else len(response)
        if h.number not in out:
            out[h.number] = response[h.end:end].strip()
    return out


def format_ok(response: str, num_sub_instructions: int) -> bool:
    """Exactly one section per sub-instruction, headed SUB_INSTRUCTION_1..n in this order, none empty."""
    spans = section_spans(response)
    if [k for k, _, _ in spans] != list(range(1, num_sub_instructions + 1)):
        return False
    return all(v for v in split_sections(response).values())


def verify_record(record: dict, response: str) -> dict:
    """Check a response against a demo evaluation record (``constraints`` + optional ``sub_instructions``).

    Returns ``{"constraints": [bool], "sub_instructions": [[bool], ...], "format_ok": bool | None,
    "all_pass": bool, "ila": float | None, "cla": float}``; ``ila``/``cla`` are the EIFBench-style
    sub-instruction and constraint accuracies over the sub-instructions (None/over all constraints
    for records without sub-instructions).
    """
    top = verify_constraints(record.get("constraints") or [], response)
    subs = record.get("sub_instructions") or []
    sections = split_sections(response) if subs else {}
    sub_res = [verify_constraints(s.get("constraints") or [], sections.get(j + 1, ""))
               if sections.get(j + 1) else [False] * len(s.get("constraints") or [])
               for j, s in enumerate(subs)]
    fmt = format_ok(response, len(subs)) if subs else None
    flat = top + [v for r in sub_res for v in r]
    all_pass = all(flat) and (fmt is not False)
    ila = (sum(all(r) for r in sub_res) / len(sub_res)) if subs else None
    cla = (sum(flat) / len(flat)) if flat else 1.0
    return {"constraints": top, "sub_instructions": sub_res, "format_ok": fmt, "all_pass": all_pass,
            "ila": ila, "cla": cla}


# --------------------------------------------------------------------------------------------
# Human-readable wording of a spec (used to write prompts; our own wording)
# --------------------------------------------------------------------------------------------
def _quote(s: str, lang: str) -> str:
    return f"\u201c{s}\u201d" if lang == "zh" else f'"{s}"'


def _range_text(spec: dict, unit_en: str, unit_zh: str, lang: str) -> str:
    n, lo, hi = spec.get("n"), spec.get("min"), spec.get("max")
    if lang == "zh":
        if n is not None:
            return f"恰好{n}{unit_zh}"
        if lo is not None and hi is not None:
            return f"{lo}到{hi}{unit_zh}"
        return f"至少{lo}{unit_zh}" if lo is not None else f"不超过{hi}{unit_zh}"
    if n is not None:
        return f"exactly {n} {unit_en}"
    if lo is not None and hi is not None:
        return f"between {lo} and {hi} {unit_en}"
    return f"at least {lo} {unit_en}" if lo is not None else f"at most {hi} {unit_en}"


def describe(spec: dict, lang: str = "en") -> str:
    """One instruction line for ``spec`` in English (``en``) or Chinese (``zh``)."""
    check_spec(spec)
    t, zh = spec["type"], lang == "zh"
    q = lambda s: _quote(s, lang)  # noqa: E731
    if t == "include_keywords":
        ks = "、".join(map(q, spec["keywords"])) if zh else " and ".join(map(q, spec["keywords"]))
        return f"回答中必须包含关键词{ks}。" if zh else f"Include the keyword{'s' if len(spec['keywords']) > 1 else ''} {ks}."
    if t == "exclude_keywords":
        ks = "、".join(map(q, spec["keywords"])) if zh else " or ".join(map(q, spec["keywords"]))
        return f"回答中不得出现{ks}。" if zh else f"Do not use the word {ks}."
    if t == "keyword_frequency":
        return (f"关键词{q(spec['keyword'])}出现{_range_text(spec, '', '次', lang)}。" if zh
                else f"Use the word {q(spec['keyword'])} {_range_text(spec, 'times', '', lang)}.")
    if t == "word_count":
        return f"回答使用{_range_text(spec, '', '个英文单词', lang)}。" if zh else f"Use {_range_text(spec, 'words', '', lang)}."
    if t == "char_count":
        return f"回答字数{_range_text(spec, '', '个字', lang)}（不计空白）。" if zh else \
            f"Use {_range_text(spec, 'characters (not counting spaces)', '', lang)}."
    if t == "bullet_count":
        return (f"使用{_range_text(spec, '', '个要点', lang)}，每个要点单独一行并以“- ”开头。" if zh
                else f"Answer with {_range_text(spec, 'bullet points', '', lang)}, each on its own line starting with \"- \".")
    if t == "bullet_items":
        n, items = len(spec["items"]), spec["items"]
        if zh:
            return f"使用恰好{n}个要点，分别对应{'、'.join(map(q, items))}，每个要点单独一行并以“- ”开头。"
        return (f"Answer with exactly {n} bullet points, one for each of {', '.join(map(q, items))}; "
                "start each with \"- \".")
    if t == "paragraph_count":
        return (f"分为{_range_text(spec, '', '个段落', lang)}，段落之间空一行。" if zh
                else f"Write {_range_text(spec, 'paragraphs', '', lang)}, separated by a blank line.")
    if t == "starts_with":
        return f"以{q(spec['phrase'])}开头。" if zh else f"Start your answer with {q(spec['phrase'])}."
    if t == "ends_with":
        return f"以{q(spec['phrase'])}结尾。" if zh else f"End your answer with {q(spec['phrase'])}."
    if t == "json_format":
        keys = spec.get("keys") or []
        if zh:
            return "以JSON对象格式回答" + (f"，包含键{'、'.join(map(q, keys))}" if keys else "") + "，不要输出其他内容。"
        return "Answer with a JSON object only" + (f", with the keys {' and '.join(map(q, keys))}" if keys else "") + "."
    if t == "lowercase":
        return "全部使用小写字母。" if zh else "Write everything in lowercase letters."
    if t == "language":
        name = {"en": ("英文", "English"), "zh": ("中文", "Chinese")}[spec["lang"]]
        return f"请用{name[0]}回答。" if zh else f"Answer in {name[1]}."
    if t == "no_commas":
        return "不要使用任何逗号。" if zh else "Do not use any commas."
    raise AssertionError(t)
