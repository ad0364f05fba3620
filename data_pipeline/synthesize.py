"""Synthesise IOPO training groups (x1, y1, x2, y2) from your own instructions with any OpenAI-compatible LLM.

The pipeline follows the data construction of the IOPO paper (Zhang et al., 2024, appendix D): an
instruction x1 with an answer y1 that meets every constraint is edited (ADD new constraints, DELETE part of
them, REVISE specific ones) into x2 that y1 no longer meets; x2 is answered (y2) and judged; a last check
keeps groups whose four pairings are coherent. Optionally, simple instructions are first made complex by
adding constraints drawn from the TRACE taxonomy (5 constraint types, 26 dimensions; Zhang et al., 2024).

Stages, in order (``--stages`` runs any subset; the default runs all)::

    expand   task -> task + k constraints from the taxonomy (only when --expand_k > 0)
    answer   x1 -> y1 (generator; seeds that already carry y1 are kept as they are)
    judge    keep y1 only when every constraint of x1 is met (rule verifiers and/or an LLM judge)
    edit     x1 -> x2 by ADD / DELETE / REVISE (mix --edit_mix); kept only when y1 fails x2
    answer2  x2 -> y2 (generator)
    judge2   keep y2 only when every constraint of x2 is met
    check    y1 != y2, an LLM review of the four pairings (--coherence_check), and with --strict_pairs
             also y2 must fail x1
    write    the IOPO file (sharegpt "ranking": two human turns, chosen = y1, rejected = y2)

Every stage reads the output of the nearest earlier stage found in ``--workdir`` (the first stage reads
``--input``), writes ``<workdir>/<NN>_<stage>.jsonl`` (kept items) and ``<NN>_<stage>.dropped.jsonl`` (each
dropped item with its reason) atomically when it finishes, and adds its counts to ``report.json`` /
``report.md`` (kept and dropped per stage and reason, requests, cache hits, tokens, cost, time, examples).
All LLM calls go through :class:`iopo_jax.chat_client.ChatClient` with its response stores in the workdir
(``generator_store.jsonl``, ``judge_store.jsonl``): a run killed at any point (even ``kill -9``) is resumed
by running the same command again; every answer already received is read from the store, never paid twice.

Constraints are either rule-verifiable specs (see :mod:`data_pipeline.verifiers`; written as instruction
lines by :func:`data_pipeline.verifiers.describe`) or free text judged by the LLM judge (``--judge_mode``:
``rules`` = rule verifiers only, items with a free-text constraint are dropped as ``unverifiable``;
``llm`` = the LLM judges every constraint; ``auto`` = rules where a spec exists, the LLM for the rest).

Input (``--input``): JSONL, a JSON list, or a ``.txt`` file with one task per line. Objects take
``instruction`` (or ``task``; required), ``constraints`` (optional list of strings and/or spec objects
``{"type": ..., ...}``), ``output`` (or ``y1``; optional answer) and ``id`` (optional).

Layering: :mod:`data_pipeline` does not import :mod:`iopo_jax`; the command, :mod:`iopo_jax.tools.synthesize`,
sits on top of both and hands the chat client to :func:`run` as a :class:`Connector`.

Example (two endpoints, an API model as judge)::

    python -m iopo_jax.tools.synthesize --input=seeds.jsonl --workdir=/tmp/synth --expand_k=3 \\
        --gen_base_url=http://127.0.0.1:8000/v1 --gen_model=SmolLM2-135M-Instruct \\
        --judge_base_url=https://api.openai.com/v1 --judge_model=gpt-4o --judge_api_key_env=OPENAI_API_KEY
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import json
import logging
import os
import random
import re
import time
from typing import Any, Callable, Optional, Sequence

from data_pipeline import verifiers as V
from data_pipeline.readers import load_records

logger = logging.getLogger("data_pipeline.synthesize")

STAGES = ("expand", "answer", "judge", "edit", "answer2", "judge2", "check", "write")
EDIT_OPS = ("add", "delete", "revise")

# ------------------------------------------------------------------------------------------------
# Taxonomy: the TRACE constraint system (5 types, 26 dimensions; the dimension names are the labels of
# the TRACE evaluation file's ``levels2`` field). The English glosses are ours and guide the generator.
# ------------------------------------------------------------------------------------------------
TAXONOMY: dict[str, dict[str, str]] = {
    "content": {
        "主题约束": "theme: keep the answer on a stated topic or angle",
        "排除约束": "exclusion: content, words or aspects the answer must leave out",
        "包含约束": "inclusion: content, words or points the answer must contain",
        "价值观约束": "values: the answer must respect a stated ethical or social value",
        "隐私约束": "privacy: the answer must not reveal or must mask personal information",
        "数值约束": "numbers: a length, count or other quantity the answer must respect",
    },
    "situation": {
        "角色扮演约束": "role-play: answer in the voice of a given role",
        "受众目标约束": "audience: write for a stated reader or purpose",
        "先验条件约束": "preconditions: assumptions or conditions the answer must take as given",
        "自然语言流程背景信息约束": "process background in prose: follow steps described in words",
        "markdown流程背景信息约束": "process background in markdown: follow steps given as a markdown outline",
        "表格背景信息约束": "table background: use facts from a given table",
        "文本背景信息约束": "text background: use facts from a given passage",
    },
    "style": {
        "语气风格约束": "tone: a stated tone or register (formal, playful, literary ...)",
        "情感情绪约束": "emotion: convey a stated feeling or mood",
        "语言特征约束": "linguistic features: rhetorical devices, sentence types, vocabulary level",
        "多语言约束": "languages: the language(s) the answer is written in",
    },
    "format": {
        "输出格式约束": "output format: a file or data format (JSON, table, markdown ...)",
        "文本样式约束": "text style: letter case, punctuation, emphasis",
        "语法结构约束": "grammar: sentence structure such as questions only or one sentence per line",
        "引用和参考约束": "citations: quote or refer to sources in a stated way",
        "编号和列表约束": "numbering and lists: bullets or numbered items",
        "层次化结构约束": "hierarchy: sections, headings or levels",
        "模版约束": "template: a fixed opening, closing or skeleton",
    },
    "example": {
        "正例约束": "positive example: follow the pattern of a given example",
        "负例约束": "negative example: avoid the pattern of a given bad example",
    },
}
DIMENSIONS: dict[str, str] = {d: t for t, dims in TAXONOMY.items() for d in dims}
DIMENSION_GLOSS: dict[str, str] = {d: g for dims in TAXONOMY.values() for d, g in dims.items()}

_PHRASES_EN = ("Hope this helps.", "That is all.", "Thanks for reading.", "End of answer.")
_PHRASES_ZH = ("希望对你有帮助。", "以上就是全部内容。", "感谢阅读。")
_EXCLUDE_EN = ("very", "really", "thing", "stuff", "basically", "actually")
_EXCLUDE_ZH = ("非常", "其实", "总之", "东西")
_INCLUDE_EN = ("clear", "simple", "example", "important", "practical", "balance", "future", "detail")
_INCLUDE_ZH = ("重要", "例如", "简单", "未来", "细节")
_STOP = {"about", "which", "their", "there", "these", "those", "would", "could", "should", "write", "answer",
         "explain", "describe", "please", "short", "using", "every", "other", "where", "while", "after"}


def _task_words(task: str) -> list[str]:
    return [w for w in dict.fromkeys(re.findall(r"[A-Za-z]{5,}", task.lower())) if w not in _STOP]


def rule_template(dim: str, rng: random.Random, task: str, lang: str) -> Optional[dict]:
    """A rule-verifiable constraint spec for taxonomy dimension ``dim`` (None when the dimension has none)."""
    zh = lang == "zh"
    if dim == "包含约束":
        pool = _INCLUDE_ZH if zh else (_task_words(task) or list(_INCLUDE_EN))
        return {"type": "include_keywords", "keywords": [rng.choice(pool)]}
    if dim == "排除约束":
        return {"type": "exclude_keywords", "keywords": [rng.choice(_EXCLUDE_ZH if zh else _EXCLUDE_EN)]}
    if dim == "数值约束":
        return ({"type": "char_count", "max": rng.choice((150, 200, 300))} if zh
                else {"type": "word_count", "max": rng.choice((60, 100, 150))})
    if dim == "编号和列表约束":
        return {"type": "bullet_count", "n": rng.choice((3, 4, 5))}
    if dim == "文本样式约束":
        return {"type": "no_commas"} if zh or rng.random() < 0.5 else {"type": "lowercase"}
    if dim == "多语言约束":
        return {"type": "language", "lang": "zh" if zh else "en"}
    if dim == "模版约束":
        return {"type": "ends_with", "phrase": rng.choice(_PHRASES_ZH if zh else _PHRASES_EN)}
    return None


_SAME_KIND = ({"bullet_count", "bullet_items"}, {"word_count", "char_count"}, {"starts_with", "ends_with"})


def conflicts(spec: dict, cons: Sequence[dict]) -> bool:
    """True when a constraint of the same kind is already in ``cons`` (two bullet counts contradict)."""
    have = {c["spec"]["type"] for c in cons if c.get("spec")}
    kinds = next((k for k in _SAME_KIND if spec["type"] in k), {spec["type"]})
    return bool(have & kinds)


RULE_DIMENSIONS = tuple(d for d in DIMENSIONS if rule_template(d, random.Random(0), "", "en") is not None)

# ------------------------------------------------------------------------------------------------
# Prompts (our own wording). --templates_dir DIR replaces any of them with DIR/<name>.txt.
# ------------------------------------------------------------------------------------------------
DEFAULT_TEMPLATES: dict[str, str] = {
    "answer_system": "You are a careful assistant. Follow every instruction and every listed constraint exactly.",
    "answer": "{instruction}",
    "expand": """You write constraints for instruction-following training data.

[Task]
{task}

Write exactly {n} new constraints for this task, one for each category below and in the same order. Each constraint must be concrete, checkable from the answer alone, and compatible with the task and with the other constraints.
{dimensions}

Reply with the {n} constraints only, as a numbered list (1., 2., ...), one per line, written in {language}.""",
    "judge": """You are a strict grader. Decide for each numbered constraint whether the answer satisfies it completely; partly satisfied counts as not satisfied.

[Instruction]
{instruction}

[Answer]
{answer}

[Constraints to grade]
{constraints}

You may give a one-line reason per constraint. Then finish with one line per constraint, exactly in the form "<number>: YES" or "<number>: NO", covering all {n} constraints.""",
    "edit": """You edit the constraints of an instruction to build a contrasting training example.

[Task]
{task}

[Current constraints]
{constraints}

[An answer that satisfies the current constraints]
{answer}

Operation: {operation}
{operation_help}

The edited request must stay a sensible request for the same task, and the answer above must no longer satisfy it. Reply with the complete edited constraint list only, as a numbered list (1., 2., ...), one constraint per line.""",
    "edit_add": "Add {k} new constraint(s) that the answer above does not meet; keep every current constraint.",
    "edit_delete": ("Remove part of the current constraints (a whole constraint, or part of one such as an item of "
                    "a required list) so that the answer above no longer fits exactly, for example because it "
                    "now contains something the edited request no longer allows."),
    "edit_revise": ("Change what {k} of the current constraints require (a number, a keyword, a format, a tone) so "
                    "that the answer above violates them; keep the other constraints unchanged."),
    "check": """You review a training example made of two related instructions and two answers.

[Instruction A]
{x1}

[Answer A]
{y1}

[Instruction B]
{x2}

[Answer B]
{y2}

Check that answer A responds to instruction A and meets all its constraints; answer B responds to instruction B and meets all its constraints; both instructions ask for the same task and differ in their constraints; answer A does not meet instruction B. End with one line that is exactly "VERDICT: PASS" when all of this holds, otherwise "VERDICT: FAIL".""",
}


def load_templates(templates_dir: Optional[str]) -> dict[str, str]:
    out = dict(DEFAULT_TEMPLATES)
    if not templates_dir:
        return out
    if not os.path.isdir(templates_dir):
        raise ValueError(f"--templates_dir {templates_dir!r} is not a directory")
    for name in DEFAULT_TEMPLATES:
        p = os.path.join(templates_dir, name + ".txt")
        if os.path.exists(p):
            with open(p, encoding="utf-8") as f:
                out[name] = f.read()
            logger.info("template %s from %s", name, p)
    unknown = [f for f in os.listdir(templates_dir)
               if f.endswith(".txt") and f[:-4] not in DEFAULT_TEMPLATES]
    if unknown:
        raise ValueError(f"--templates_dir {templates_dir}: unknown template file(s) {', '.join(sorted(unknown))}; "
                         f"known names: {', '.join(n + '.txt' for n in DEFAULT_TEMPLATES)}")
    return out


def render(templates: dict[str, str], name: str, **fields) -> str:
    try:
        return templates[name].format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"template {name!r}: cannot render ({type(e).__name__}: {e}); its fields are "
                         + ", ".join("{" + k + "}" for k in fields)) from None


# ------------------------------------------------------------------------------------------------
# Items
# ------------------------------------------------------------------------------------------------
def constraint_text(c: dict, lang: str) -> str:
    return c["text"] if c.get("text") else V.describe(c["spec"], lang)


def numbered(cons: Sequence[dict], lang: str) -> str:
    return "\n".join(f"{i}. {constraint_text(c, lang)}" for i, c in enumerate(cons, 1))


def instruction(task: str, cons: Sequence[dict], lang: str) -> str:
    """The instruction text: the task, then the numbered constraints (what the trainer sees as x1 / x2)."""
    if not cons:
        return task
    header = "约束：" if lang == "zh" else "Constraints:"
    return f"{task.rstrip()}\n\n{header}\n{numbered(cons, lang)}"


_NUM_LINE = re.compile(r"^\s*(?:[-*]\s*)?\(?(\d{1,2})\s*[.)、．:：]\s*(.+?)\s*$")


def parse_numbered(text: str) -> list[str]:
    """Lines ``1. ...``, ``2) ...`` of a reply, in order (numbering restarts are cut off)."""
    out: list[str] = []
    for line in text.splitlines():
        m = _NUM_LINE.match(line)
        if not m:
            continue
        n, body = int(m.group(1)), m.group(2).strip().strip("*").strip()
        if n != len(out) + 1:
            if out:
                break
            continue
        if body:
            out.append(body)
    return out


_VERDICT_LINE = re.compile(r"^[\s*#>\-\[]*(\d{1,2})[\s*\]]*[:：.)][\s*]*(YES|NO)\b", re.IGNORECASE | re.MULTILINE)


def parse_verdicts(text: str, n: int) -> Optional[list[bool]]:
    """``n`` per-constraint verdicts from a judge reply (the last ``k: YES|NO`` line per k), None if any is missing."""
    found: dict[int, bool] = {}
    for m in _VERDICT_LINE.finditer(text or ""):
        found[int(m.group(1))] = m.group(2).upper() == "YES"
    if not all(k in found for k in range(1, n + 1)):
        return None
    return [found[k] for k in range(1, n + 1)]


_CHECK_RE = re.compile(r"VERDICT\s*[:：]\s*\**\s*(PASS|FAIL)", re.IGNORECASE)


def parse_check(text: str) -> Optional[bool]:
    found = _CHECK_RE.findall(text or "")
    if not found:
        return None
    return found[-1].upper() == "PASS"


def _norm_constraint(c: Any, where: str) -> dict:
    if isinstance(c, str):
        if not c.strip():
            raise ValueError(f"{where}: empty constraint text")
        return {"text": c.strip()}
    if isinstance(c, dict):
        try:
            V.check_spec(c)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return {"spec": dict(c)}
    raise ValueError(f"{where}: a constraint must be a string or a spec object, got {type(c).__name__}")


def read_seeds(path: str) -> list[dict]:
    """Seed items from a .txt (one task per line), .jsonl or .json (list) file; errors name file, line, field."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--input {path}: no such file")
    raws: list[tuple[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        data = f.read()
    if path.endswith(".txt"):
        for i, line in enumerate(data.splitlines(), 1):
            if line.strip():
                raws.append((f"{path}:{i}", {"instruction": line.strip()}))
    elif path.endswith(".jsonl"):
        for i, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raws.append((f"{path}:{i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: invalid JSON: {e}") from None
    else:
        try:
            obj = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e}") from None
        if not isinstance(obj, list):
            raise ValueError(f"{path}: expected a JSON list of objects, got {type(obj).__name__}")
        raws = [(f"{path} (record {i})", o) for i, o in enumerate(obj)]
    items, seen = [], set()
    for n, (where, o) in enumerate(raws):
        if not isinstance(o, dict):
            raise ValueError(f"{where}: expected an object, got {type(o).__name__}")
        task = o.get("instruction", o.get("task"))
        if not isinstance(task, str) or not task.strip():
            raise ValueError(f"{where}: field 'instruction': missing or empty (a non-empty string is required)")
        cons = o.get("constraints") or []
        if not isinstance(cons, list):
            raise ValueError(f"{where}: field 'constraints': expected a list, got {type(cons).__name__}")
        cons = [_norm_constraint(c, f"{where}: field 'constraints[{j}]'") for j, c in enumerate(cons)]
        y1 = o.get("output", o.get("y1"))
        if y1 is not None and not isinstance(y1, str):
            raise ValueError(f"{where}: field 'output': expected a string, got {type(y1).__name__}")
        uid = str(o.get("id", n))
        if uid in seen:
            raise ValueError(f"{where}: field 'id': duplicate id {uid!r}")
        seen.add(uid)
        item = {"id": uid, "task": task.strip(), "cons1": cons}
        if y1 and y1.strip():
            item["y1"] = y1
        items.append(item)
    return items


# ------------------------------------------------------------------------------------------------
# Clients
# ------------------------------------------------------------------------------------------------
class Pending(Exception):
    """The request budget is spent: the stage stops, its output is not written; rerun to continue."""


@dataclasses.dataclass(frozen=True)
class Connector:
    """How the pipeline reaches an LLM, given by the command above ``data_pipeline`` (this module does not
    depend on ``iopo_jax``): ``make(prefix, args, store_path)`` returns a client for the ``--{prefix}_*``
    settings (``complete(messages, attempt=...).text``, ``usage()``, ``close()``); its calls raise
    ``budget_error`` when the request budget is spent and ``request_error`` when a request fails."""

    make: Callable[[str, Any, str], Any]
    budget_error: type
    request_error: type


class Drop(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class Ctx:
    args: Any
    templates: dict
    gen: Any  # a client of ``connector`` or None
    judge: Any  # a client of ``connector`` or None
    connector: Optional[Connector] = None

    @property
    def lang(self) -> str:
        return self.args.lang

    def rng(self, stage: str, uid: str) -> random.Random:
        return random.Random(f"{self.args.seed}:{stage}:{uid}")

    def call(self, client, messages, stage: str, attempt: int = 0) -> str:
        if client is None:
            raise Drop(f"{stage}_no_endpoint", "this item needs an LLM but no endpoint is configured")
        try:
            return client.complete(messages, attempt=attempt).text
        except self.connector.budget_error as e:
            raise Pending(str(e)) from None
        except self.connector.request_error as e:
            raise Drop(f"{stage}_request_failed", str(e)[:300]) from None


# ------------------------------------------------------------------------------------------------
# Judging (shared by judge, edit, judge2, check)
# ------------------------------------------------------------------------------------------------
def judge_constraints(ctx: Ctx, task: str, cons: Sequence[dict], answer: str, stage: str) -> list[bool]:
    """Per-constraint verdicts for ``answer`` (rules and/or the LLM judge per --judge_mode); raises Drop."""
    mode = ctx.args.judge_mode
    verdicts: list[Optional[bool]] = [None] * len(cons)
    llm_idx = []
    for i, c in enumerate(cons):
        if mode != "llm" and c.get("spec") is not None:
            verdicts[i] = V.verify(c["spec"], answer)
        else:
            llm_idx.append(i)
    if llm_idx and mode == "rules":
        raise Drop(f"{stage}_unverifiable", f"{len(llm_idx)} constraint(s) have no rule verifier "
                   "(--judge_mode=rules); use --judge_mode=auto or llm")
    if llm_idx:
        sub = [cons[i] for i in llm_idx]
        prompt = render(ctx.templates, "judge", instruction=instruction(task, cons, ctx.lang), answer=answer,
                        constraints=numbered(sub, ctx.lang), n=len(sub))
        got = None
        for attempt in range(ctx.args.parse_retries + 1):
            got = parse_verdicts(ctx.call(ctx.judge, [{"role": "user", "content": prompt}], stage, attempt), len(sub))
            if got is not None:
                break
        if got is None:
            raise Drop(f"{stage}_unparseable", "the judge reply has no 'k: YES|NO' line for every constraint")
        for i, v in zip(llm_idx, got):
            verdicts[i] = v
    return [bool(v) for v in verdicts]


# ------------------------------------------------------------------------------------------------
# Stages: each maps one item to the updated item or raises Drop
# ------------------------------------------------------------------------------------------------
def stage_expand(ctx: Ctx, item: dict) -> dict:
    k = ctx.args.expand_k
    rng = ctx.rng("expand", item["id"])
    have = {c.get("dim") for c in item["cons1"]}
    dims = [d for d in DIMENSIONS if d not in have]
    if ctx.args.expand_rule_only:
        dims = [d for d in dims if d in RULE_DIMENSIONS]
    chosen = rng.sample(dims, min(k, len(dims)))
    new: list[Optional[dict]] = []
    free = []
    for d in chosen:
        spec = rule_template(d, rng, item["task"], ctx.lang) if rng.random() < ctx.args.rule_fraction else None
        if spec is not None and conflicts(spec, list(item["cons1"]) + [c for c in new if c]):
            spec = None
        if spec is not None:
            new.append({"spec": spec, "dim": d})
        else:
            new.append(None)
            free.append(d)
    if free:
        lines = "\n".join(f"{i}. {d} ({DIMENSION_GLOSS[d]})" for i, d in enumerate(free, 1))
        prompt = render(ctx.templates, "expand", task=item["task"], n=len(free), dimensions=lines,
                        language="Chinese" if ctx.lang == "zh" else "English")
        got = parse_numbered(ctx.call(ctx.gen, [{"role": "user", "content": prompt}], "expand"))
        if len(got) != len(free):
            raise Drop("expand_unparseable", f"asked for {len(free)} numbered constraints, got {len(got)}")
        it = iter(zip(free, got))
        new = [c if c is not None else (lambda d_t: {"text": d_t[1], "dim": d_t[0]})(next(it)) for c in new]
    out = dict(item)
    out["cons1"] = list(item["cons1"]) + new
    return out


def _answer(ctx: Ctx, item: dict, cons_key: str, stage: str) -> str:
    msgs = []
    if ctx.templates["answer_system"].strip():
        msgs.append({"role": "system", "content": ctx.templates["answer_system"]})
    msgs.append({"role": "user", "content": render(ctx.templates, "answer",
                                                    instruction=instruction(item["task"], item[cons_key], ctx.lang))})
    text = ctx.call(ctx.gen, msgs, stage)
    if not text.strip():
        raise Drop(f"{stage}_empty", "the generator returned an empty answer")
    return text.strip()


def stage_answer(ctx: Ctx, item: dict) -> dict:
    if item.get("y1"):
        return item
    return dict(item, y1=_answer(ctx, item, "cons1", "answer"))


def stage_judge(ctx: Ctx, item: dict) -> dict:
    if not item["cons1"]:
        raise Drop("judge_no_constraints", "x1 has no constraints to edit (use --expand_k)")
    v = judge_constraints(ctx, item["task"], item["cons1"], item["y1"], "judge")
    if not all(v):
        raise Drop("judge_y1_fails_x1", "failed constraints: " + ", ".join(str(i + 1) for i, ok in enumerate(v) if not ok))
    return dict(item, verdicts1=v)


def _revise_spec(spec: dict, y1: str, rng: random.Random, lang: str) -> Optional[dict]:
    """A changed copy of ``spec`` that ``y1`` fails, or None when this type cannot be revised that way."""
    t, zh = spec["type"], lang == "zh"
    if t == "include_keywords":
        pool = [w for w in (_INCLUDE_ZH if zh else _INCLUDE_EN) if V.count_keyword(y1, w) == 0]
        return {"type": t, "keywords": [rng.choice(pool)]} if pool else None
    if t == "exclude_keywords":
        words = [w for w in dict.fromkeys(re.findall(r"[A-Za-z]{4,}", y1.lower()))] if not zh else \
            [w for w in _EXCLUDE_ZH + _INCLUDE_ZH if w in y1]
        return {"type": t, "keywords": [rng.choice(words)]} if words else None
    if t in ("word_count", "char_count", "bullet_count", "paragraph_count"):
        have = {"word_count": V.count_words, "char_count": V.count_chars, "bullet_count": V.count_bullets,
                "paragraph_count": V.count_paragraphs}[t](y1)
        if t in ("word_count", "char_count"):
            return {"type": t, "max": have // 2} if have >= 20 else {"type": t, "min": have * 2 + 10}
        return {"type": t, "n": have + rng.choice((1, 2))}
    if t == "keyword_frequency":
        return {"type": t, "keyword": spec["keyword"], "n": V.count_keyword(y1, spec["keyword"]) + 2}
    if t in ("starts_with", "ends_with"):
        pool = [p for p in (_PHRASES_ZH if zh else _PHRASES_EN) if not V.verify({"type": t, "phrase": p}, y1)]
        return {"type": t, "phrase": rng.choice(pool)} if pool else None
    if t == "language":
        return {"type": t, "lang": "zh" if spec["lang"] == "en" else "en"}
    return None


def _rule_edit(ctx: Ctx, item: dict, op: str, rng: random.Random) -> Optional[list[dict]]:
    """x2's constraints made without the LLM (rule specs only), or None when no rule edit applies."""
    cons, y1 = item["cons1"], item["y1"]
    if op == "add":
        dims = [d for d in RULE_DIMENSIONS if d not in {c.get("dim") for c in cons}]
        rng.shuffle(dims)
        for d in dims:
            spec = rule_template(d, rng, item["task"], ctx.lang)
            if spec is not None and not conflicts(spec, cons) and not V.verify(spec, y1):
                return list(cons) + [{"spec": spec, "dim": d}]
        return None
    ruled = [i for i, c in enumerate(cons) if c.get("spec") is not None]
    if op == "revise":
        rng.shuffle(ruled)
        for i in ruled:
            spec = _revise_spec(cons[i]["spec"], y1, rng, ctx.lang)
            if spec is not None:
                out = list(cons)
                out[i] = dict(cons[i], spec=spec, text=None)
                out[i].pop("text")
                return out
        return None
    # delete: part of a constraint (an item of a required bullet list), else whole constraints
    for i in ruled:
        s = cons[i]["spec"]
        if s["type"] == "bullet_items" and len(s["items"]) >= 2:
            out = list(cons)
            items = list(s["items"])
            items.pop(rng.randrange(len(items)))
            out[i] = dict(cons[i], spec=dict(s, items=items))
            return out
    if len(cons) < 2 or len(ruled) < len(cons):
        return None
    drop = set(rng.sample(range(len(cons)), rng.randint(1, max(1, len(cons) // 2))))
    return [c for i, c in enumerate(cons) if i not in drop]


def stage_edit(ctx: Ctx, item: dict) -> dict:
    rng = ctx.rng("edit", item["id"])
    ops, weights = zip(*ctx.args.edit_mix_parsed)
    op = rng.choices(ops, weights=weights)[0]
    mode = ctx.args.edit_with
    cons2 = None
    if mode != "llm" and all(c.get("spec") is not None for c in item["cons1"]):
        cons2 = _rule_edit(ctx, item, op, rng)
    if cons2 is None:
        if mode == "rules":
            raise Drop(f"edit_{op}_no_rule_edit", "no rule edit applies to these constraints (--edit_with=rules)")
        k = rng.randint(1, max(1, min(2, len(item["cons1"]))))
        prompt = render(ctx.templates, "edit", task=item["task"], constraints=numbered(item["cons1"], ctx.lang),
                        answer=item["y1"], operation=op.upper(),
                        operation_help=render(ctx.templates, f"edit_{op}", k=k))
        got = parse_numbered(ctx.call(ctx.gen, [{"role": "user", "content": prompt}], "edit"))
        if not got:
            raise Drop("edit_unparseable", "the edit reply has no numbered constraint list")
        old = {constraint_text(c, ctx.lang): c for c in item["cons1"]}
        cons2 = [old.get(t, {"text": t}) for t in got]
    if [constraint_text(c, ctx.lang) for c in cons2] == [constraint_text(c, ctx.lang) for c in item["cons1"]]:
        raise Drop("edit_unchanged", "x2 equals x1")
    v = judge_constraints(ctx, item["task"], cons2, item["y1"], "edit")
    if all(v):
        raise Drop("edit_y1_still_complies", f"{op}: y1 meets every constraint of x2")
    return dict(item, cons2=cons2, op=op, verdicts_y1_x2=v)


def stage_answer2(ctx: Ctx, item: dict) -> dict:
    return dict(item, y2=_answer(ctx, item, "cons2", "answer2"))


def stage_judge2(ctx: Ctx, item: dict) -> dict:
    v = judge_constraints(ctx, item["task"], item["cons2"], item["y2"], "judge2")
    if not all(v):
        raise Drop("judge2_y2_fails_x2", "failed constraints: " + ", ".join(str(i + 1) for i, ok in enumerate(v) if not ok))
    return dict(item, verdicts2=v)


def stage_check(ctx: Ctx, item: dict) -> dict:
    if item["y1"].strip() == item["y2"].strip():
        raise Drop("check_identical_answers", "y1 == y2")
    v = None
    if ctx.args.strict_pairs:
        v = judge_constraints(ctx, item["task"], item["cons1"], item["y2"], "check")
        if all(v):
            raise Drop("check_y2_complies_with_x1", "y2 meets every constraint of x1 (--strict_pairs)")
    if ctx.args.coherence_check:
        x1 = instruction(item["task"], item["cons1"], ctx.lang)
        x2 = instruction(item["task"], item["cons2"], ctx.lang)
        prompt = render(ctx.templates, "check", x1=x1, y1=item["y1"], x2=x2, y2=item["y2"])
        ok = None
        for attempt in range(ctx.args.parse_retries + 1):
            ok = parse_check(ctx.call(ctx.judge, [{"role": "user", "content": prompt}], "check", attempt))
            if ok is not None:
                break
        if ok is None:
            raise Drop("check_unparseable", "the check reply has no 'VERDICT: PASS|FAIL' line")
        if not ok:
            raise Drop("check_incoherent", "the LLM review failed the four pairings")
    return dict(item, verdicts_y2_x1=v)


STAGE_FNS: dict[str, Callable[[Ctx, dict], dict]] = {
    "expand": stage_expand, "answer": stage_answer, "judge": stage_judge, "edit": stage_edit,
    "answer2": stage_answer2, "judge2": stage_judge2, "check": stage_check,
}


def to_iopo(item: dict, lang: str) -> dict:
    """One sharegpt "ranking" IOPO record."""
    return {"id": item["id"],
            "conversations": [{"from": "human", "value": instruction(item["task"], item["cons1"], lang)},
                              {"from": "human", "value": instruction(item["task"], item["cons2"], lang)}],
            "chosen": {"from": "gpt", "value": item["y1"]},
            "rejected": {"from": "gpt", "value": item["y2"]},
            "edit_op": item.get("op")}


# ------------------------------------------------------------------------------------------------
# Files and running
# ------------------------------------------------------------------------------------------------
def stage_path(workdir: str, stage: str, dropped: bool = False) -> str:
    return os.path.join(workdir, f"{STAGES.index(stage) + 1:02d}_{stage}" + (".dropped" if dropped else "") + ".jsonl")


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_jsonl(path: str, rows: Sequence[dict]) -> None:
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _read_jsonl(path: str) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: invalid JSON: {e}") from None
    return out


def stage_input(args, stage: str) -> tuple[list[dict], str]:
    for prev in reversed(STAGES[:STAGES.index(stage)]):
        p = stage_path(args.workdir, prev)
        if prev != "write" and os.path.exists(p):
            return _read_jsonl(p), p
    if not args.input:
        raise ValueError(f"stage {stage}: no earlier stage output in {args.workdir} and no --input")
    return read_seeds(args.input), args.input


def run_stage(ctx: Ctx, stage: str, items: list[dict]) -> tuple[list[dict], list[dict]]:
    """Runs ``stage`` over ``items`` concurrently; returns (kept in input order, dropped records)."""
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    fn = STAGE_FNS[stage]
    results: list[Any] = [None] * len(items)
    bar = tqdm(total=len(items), desc=stage, unit="item", disable=not ctx.args.progress, dynamic_ncols=True)
    pending_err: list[str] = []

    def one(i: int):
        try:
            results[i] = ("kept", fn(ctx, items[i]))
        except Drop as d:
            results[i] = ("dropped", {"id": items[i]["id"], "stage": stage, "reason": d.reason, "detail": d.detail,
                                      "item": items[i]})
        except Pending as p:
            pending_err.append(str(p))
            for c in (ctx.gen, ctx.judge):
                if c is not None:
                    c.abort()
        finally:
            bar.update(1)

    workers = max(1, ctx.args.concurrency)
    try:
        with cf.ThreadPoolExecutor(workers) as ex:
            list(ex.map(one, range(len(items))))
    finally:
        bar.close()
    if pending_err:
        raise Pending(pending_err[0])
    kept = [r[1] for r in results if r and r[0] == "kept"]
    dropped = [r[1] for r in results if r and r[0] == "dropped"]
    return kept, dropped


def _usage(client) -> dict:
    return client.usage() if client is not None else {}


def _examples(rows: Sequence[dict], n: int = 2) -> list:
    return [json.loads(json.dumps(r, ensure_ascii=False)) for r in rows[:n]]


def write_report(workdir: str, report: dict) -> None:
    _write_atomic(os.path.join(workdir, "report.json"), json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    lines = ["# IOPO synthesis report", "", f"updated: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", "",
             "| stage | in | kept | dropped | reasons | requests | cache hits | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for st in STAGES:
        s = report["stages"].get(st)
        if not s:
            continue
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s.get("dropped_by_reason", {}).items())) or "-"
        lines.append(f"| {st} | {s['in']} | {s['kept']} | {s['dropped']} | {reasons} | {s.get('requests', 0)} | "
                     f"{s.get('cache_hits', 0)} | {s['time_s']:.1f} |")
    lines += ["", "Clients (all runs, from the response stores):", ""]
    for name, u in report.get("clients", {}).items():
        if u:
            lines.append(f"- {name} ({u.get('model')}): {u.get('store_responses')} responses, "
                         f"{u.get('store_prompt_tokens')} prompt + {u.get('store_completion_tokens')} completion tokens, "
                         f"cost {u.get('store_cost')}")
    if report.get("output"):
        lines += ["", f"Output: {report['output']} ({report['groups']} groups)"]
    lines += ["", "Examples are in report.json (`stages.<stage>.examples_kept` / `examples_dropped`)."]
    _write_atomic(os.path.join(workdir, "report.md"), "\n".join(lines) + "\n")


def parse_mix(text: str) -> list[tuple[str, float]]:
    out = []
    for part in text.split(","):
        if not part.strip():
            continue
        name, _, w = part.partition(":")
        name = name.strip().lower()
        if name not in EDIT_OPS:
            raise ValueError(f"--edit_mix: unknown operation {name!r}; known: {', '.join(EDIT_OPS)}")
        try:
            wf = float(w) if w.strip() else 1.0
        except ValueError:
            raise ValueError(f"--edit_mix: weight of {name!r} must be a number, got {w!r}") from None
        if wf < 0:
            raise ValueError(f"--edit_mix: weight of {name!r} must be >= 0")
        if wf > 0:
            out.append((name, wf))
    if not out:
        raise ValueError("--edit_mix: give at least one operation with a positive weight, e.g. add:1,revise:1")
    return out


def run(args, connector: Connector) -> int:
    """Run the stages the flags of ``python -m iopo_jax.tools.synthesize`` (``args``, a namespace) ask for;
    the exit status: 0, or 3 when the request budget is spent (a rerun continues)."""
    if list(args.stages) == ["all"]:
        stages = [s for s in STAGES if s != "expand" or args.expand_k > 0]
    else:
        stages = list(args.stages)
        bad = [s for s in stages if s not in STAGES]
        if bad:
            raise ValueError(f"--stages: unknown stage(s) {', '.join(bad)}; known: {', '.join(STAGES)}")
        stages = sorted(set(stages), key=STAGES.index)
    if "expand" in stages and args.expand_k <= 0:
        raise ValueError("--stages includes expand but --expand_k is 0; pass --expand_k=K (constraints to add)")
    args.edit_mix_parsed = parse_mix(args.edit_mix)
    same_endpoint = args.judge_base_url is None
    for k in ("base_url", "model", "api_key_env"):
        if getattr(args, f"judge_{k}") is None:
            setattr(args, f"judge_{k}", getattr(args, f"gen_{k}"))
    if same_endpoint:  # the generator's server and model: also its prices, unless given
        for k in ("price_prompt_per_1k", "price_completion_per_1k"):
            if not getattr(args, f"judge_{k}"):
                setattr(args, f"judge_{k}", getattr(args, f"gen_{k}"))
    os.makedirs(args.workdir, exist_ok=True)
    templates = load_templates(args.templates_dir)
    gen = (connector.make("gen", args, os.path.join(args.workdir, "generator_store.jsonl"))
           if args.gen_base_url else None)
    judge = (connector.make("judge", args, os.path.join(args.workdir, "judge_store.jsonl"))
             if args.judge_base_url else None)
    if gen is None:
        logger.info("no --gen_base_url: only rule-based work is possible (items needing the generator are dropped)")
    if args.coherence_check and judge is None:
        logger.info("no judge endpoint: the LLM coherence check is skipped")
        args.coherence_check = False
    ctx = Ctx(args=args, templates=templates, gen=gen, judge=judge, connector=connector)
    rpath = os.path.join(args.workdir, "report.json")
    report = json.load(open(rpath, encoding="utf-8")) if os.path.exists(rpath) else {"stages": {}}
    report.setdefault("stages", {})
    report["settings"] = {k: v for k, v in vars(args).items() if k != "edit_mix_parsed"}
    code = 0
    try:
        for st in stages:
            if st == "write":
                _do_write(args, report)
                continue
            out = stage_path(args.workdir, st)
            if os.path.exists(out) and not args.force:
                logger.info("stage %s: %s exists, skipped (--force reruns it)", st, out)
                continue
            items, src = stage_input(args, st)
            logger.info("stage %s: %d items from %s", st, len(items), src)
            before = {n: _usage(c) for n, c in (("gen", gen), ("judge", judge))}
            t0 = time.time()
            kept, dropped = run_stage(ctx, st, items)
            after = {n: _usage(c) for n, c in (("gen", gen), ("judge", judge))}
            # Later stages were computed from this stage's previous output (if any): they are stale now.
            for later in STAGES[STAGES.index(st) + 1:-1]:
                for stale in (stage_path(args.workdir, later), stage_path(args.workdir, later, dropped=True)):
                    if os.path.exists(stale):
                        logger.info("removing %s (computed from the previous output of %s)", stale, st)
                        os.remove(stale)
            _write_jsonl(stage_path(args.workdir, st, dropped=True), dropped)
            _write_jsonl(out, kept)
            reasons = collections.Counter(d["reason"] for d in dropped)
            delta = lambda f: sum(after[n].get(f, 0) - before[n].get(f, 0) for n in after if after[n])  # noqa: E731
            by_reason_example = {}
            for d in dropped:
                by_reason_example.setdefault(d["reason"], d)
            report["stages"][st] = {
                "in": len(items), "kept": len(kept), "dropped": len(dropped), "dropped_by_reason": dict(reasons),
                "time_s": round(time.time() - t0, 3), "requests": delta("requests_sent"),
                "cache_hits": delta("cache_hits"), "retries": delta("retries"), "failures": delta("failures"),
                "prompt_tokens": delta("prompt_tokens"), "completion_tokens": delta("completion_tokens"),
                "cost": round(delta("cost"), 6),
                "examples_kept": _examples(kept), "examples_dropped": list(by_reason_example.values())[:4],
            }
            logger.info("stage %s: kept %d of %d; dropped %s", st, len(kept), len(items), dict(reasons) or "none")
    except Pending as e:
        logger.error("request budget spent (%s); the stage was not finished. Rerun the same command to continue "
                     "(answers already received are read from the stores, not paid again)", e)
        code = 3
    finally:
        report["clients"] = {n: _usage(c) for n, c in (("generator", gen), ("judge", judge)) if c is not None}
        write_report(args.workdir, report)
        for c in (gen, judge):
            if c is not None:
                c.close()
    return code


def _do_write(args, report: dict) -> None:
    p = stage_path(args.workdir, "check")
    if not os.path.exists(p):
        raise ValueError(f"stage write: {p} does not exist; run the check stage first")
    items = _read_jsonl(p)
    out = args.output or os.path.join(args.workdir, "iopo.json")
    records = [to_iopo(it, args.lang) for it in items]
    _write_atomic(out, json.dumps(records, ensure_ascii=False, indent=1) + "\n")
    # The trainer's reader must accept the file unchanged.
    if records:
        load_records("iopo", out)
    report["output"], report["groups"] = out, len(records)
    ops = collections.Counter(r["edit_op"] for r in records)
    report["groups_by_edit_op"] = dict(ops)
    logger.info("wrote %d IOPO groups to %s (edit ops: %s)", len(records), out, dict(ops))

