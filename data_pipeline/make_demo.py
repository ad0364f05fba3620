"""Generate the bundled demo set: rule-checkable IOPO groups and evaluation prompts (English and Chinese).

    python -m data_pipeline.make_demo --out data_pipeline/demo_data          # seed 1234, as committed
    python -m data_pipeline.make_demo --out /tmp/demo --groups 400 --eval 200 --seed 7

Everything is written by this project from small word lists and sentence templates, so a tiny model can
learn it in a few hundred LoRA steps on a CPU: prompts are a task line plus numbered constraints (a few
dozen tokens), responses are a few short template sentences (tens of tokens). Every constraint is a
machine-readable spec checked by :mod:`data_pipeline.verifiers`.

Files written to ``--out``:

- ``iopo_train.json``: IOPO groups in the sharegpt "ranking" layout (data_pipeline/README.md):
  ``{"conversations": [{"from": "human", "value": x1}, {"from": "human", "value": x2}],
  "chosen": {"from": "gpt", "value": y1}, "rejected": {"from": "gpt", "value": y2}, "meta": {...}}``.
  ``meta`` = ``{"id", "lang", "edit": "ADD"|"DELETE"|"REVISE", "edit_detail", "x1_constraints": [spec],
  "x2_constraints": [spec]}``. x2 is x1 with its constraints edited so that y1 violates x2 and y2
  satisfies it (checked by the verifiers for every group).
- ``sft_train.jsonl``: the (x1, y1) and (x2, y2) pairs as ``{"messages": [user, assistant]}``.
- ``dpo_train.json``: the pairs (x1: y1 > y2) and (x2: y2 > y1) in the sharegpt layout.
- ``eval_prompts.jsonl``: evaluation prompts, one JSON object per line::

      {"id": "demo-eval-0001", "lang": "en" | "zh", "category": "single" | "multi" | "segpo",
       "prompt": str,                      # the user message (system prompt: the template default)
       "constraints": [spec, ...],         # checked on the whole response
       "constraints_text": [str, ...],     # the same constraints as written in the prompt
       "constraints_num": int,             # all constraints, sub-instructions included
       "sub_instructions": [               # empty unless category == "segpo"
           {"key": "SUB_INSTRUCTION_1", "instruction": str,
            "constraints": [spec, ...], "constraints_text": [str, ...]}, ...],
       "reference": str}                   # an answer that passes every constraint

  ``segpo`` prompts hold 2-3 sub-instructions and ask for one section per sub-instruction, each opened
  by a heading line ``SUB_INSTRUCTION_k:``; a sub-instruction's constraints are checked on its section
  only (:func:`data_pipeline.verifiers.verify_record`, :func:`~data_pipeline.verifiers.split_sections`).
  Load them with ``load_records("demo_eval", path)``.
"""
from __future__ import annotations

import copy
import json
import os
import random
from typing import Optional

from absl import flags

from data_pipeline import cli
from data_pipeline import verifiers as V

DEFAULT_SEED = 1234
DEFAULT_GROUPS = 240
DEFAULT_EVAL = 120

# ---- word lists (our own) --------------------------------------------------------------------
EN_TOPICS = [
    "tea", "coffee", "music", "chess", "bread", "rain", "snow", "honey", "gardening", "cycling",
    "sailing", "baking", "painting", "photography", "astronomy", "pottery", "hiking", "swimming",
    "poetry", "jazz", "origami", "camping", "fishing", "knitting", "chocolate", "rice", "silk", "glass",
    "paper", "cheese", "soup", "dancing", "running", "reading", "cooking", "writing", "recycling",
    "skiing", "surfing", "chemistry",
]
ZH_TOPICS = [
    "茶", "咖啡", "音乐", "象棋", "面包", "雨", "雪", "蜂蜜", "园艺", "骑行", "航海", "烘焙", "绘画", "摄影",
    "天文", "陶艺", "徒步", "游泳", "诗歌", "爵士乐", "折纸", "露营", "钓鱼", "编织", "巧克力", "米饭", "丝绸",
    "书法", "剪纸", "京剧", "太极", "饺子", "风筝", "围棋", "竹子", "熊猫", "长城", "灯笼", "月饼", "春节",
]
EN_FILLERS = [
    "{T} is part of daily life for many people.",
    "{T} has a long history.",
    "People often talk about {t}.",
    "Learning about {t} can be fun.",
    "{T} can bring friends together.",
    "There is always more to discover about {t}.",
    "Some experts study {t} for years.",
    "{T} looks different in every season.",
    "A little {t} makes a quiet day better.",
    "Children enjoy {t} too.",
    "{T} is worth a slow and careful look.",
    "Every town has fans of {t}.",
]
ZH_FILLERS = [
    "{t}是许多人日常生活的一部分。",
    "{t}有着悠久的历史。",
    "人们经常谈论{t}。",
    "了解{t}是一件有趣的事。",
    "{t}可以让朋友们聚在一起。",
    "关于{t}总有新的东西可以发现。",
    "一些专家会花很多年研究{t}。",
    "{t}在每个季节都有不同的样子。",
    "一点{t}就能让安静的一天更美好。",
    "孩子们也喜欢{t}。",
    "{t}值得我们慢慢体会。",
    "每座城市都有{t}的爱好者。",
]
EN_KEYWORDS = [
    "sunlight", "patience", "winter", "silver", "journey", "harbor", "morning", "village", "window",
    "ocean", "mountain", "lantern", "market", "teacher", "river", "festival", "breeze", "library",
    "puzzle", "meadow", "compass", "ribbon", "thunder", "orchard",
]
ZH_KEYWORDS = [
    "阳光", "耐心", "冬天", "银色", "旅程", "港口", "早晨", "村庄", "窗户", "海洋", "高山", "灯塔", "集市",
    "老师", "河流", "节日", "微风", "图书馆", "拼图", "草地", "指南针", "丝带", "雷声", "果园",
]
EN_EXCLUDABLE = ["many", "people", "often", "history", "always", "can"]
ZH_EXCLUDABLE = ["许多", "历史", "人们", "经常", "很多", "喜欢"]
EN_ITEMS = ["color", "sound", "taste", "cost", "size", "speed", "smell", "shape", "weight", "texture"]
ZH_ITEMS = ["颜色", "声音", "味道", "价格", "大小", "速度", "气味", "形状", "重量", "质地"]
EN_START = ["Here is my answer:", "In short:", "Quick note:"]
EN_END = ["That is all.", "Thank you for reading.", "Hope this helps."]
ZH_START = ["我的回答如下：", "简单来说：", "先说结论："]
ZH_END = ["以上就是全部内容。", "感谢阅读。", "希望对你有帮助。"]
EN_KW_UNITS = ["It reminds me of {kw}.", "I also think of {kw}."]
ZH_KW_UNITS = ["这让我想到{kw}。", "我也会想到{kw}。"]
EN_ITEM_UNIT = "{Item} matters when you think about {t}."
ZH_ITEM_UNIT = "{item}是了解{t}时值得关注的一点。"
EN_JSON_KEYS = [["topic", "summary"], ["title", "text"], ["subject", "note"]]
ZH_JSON_KEYS = [["主题", "摘要"], ["标题", "内容"], ["话题", "说明"]]
EN_TASK = "Write a short note about {t}."
ZH_TASK = "写一段关于{t}的简短说明。"
FORMAT_TYPES = ("bullet_count", "bullet_items", "paragraph_count", "json_format")


def _pool(lang: str, name: str):
    return globals()[f"{lang.upper()}_{name}"]


# ---- prompts and answers ---------------------------------------------------------------------
class Prompt:
    """A task (language, topic, filler offset) plus a list of constraint specs."""

    def __init__(self, lang: str, topic: str, offset: int, specs: list):
        self.lang, self.topic, self.offset, self.specs = lang, topic, offset, specs

    def copy(self) -> "Prompt":
        return Prompt(self.lang, self.topic, self.offset, copy.deepcopy(self.specs))

    def task(self) -> str:
        return _pool(self.lang, "TASK").format(t=self.topic)

    def constraint_lines(self) -> list[str]:
        return [V.describe(s, self.lang) for s in self.specs]

    def text(self) -> str:
        return render_prompt(self.task(), self.constraint_lines())

    def spec(self, type_: str) -> Optional[dict]:
        return next((s for s in self.specs if s["type"] == type_), None)


def render_prompt(task: str, constraint_lines: list[str]) -> str:
    return task + "\n" + "".join(f"{i}. {c}\n" for i, c in enumerate(constraint_lines, 1))


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _compose_with(p: Prompt, n_fill: int) -> Optional[str]:
    lang, zh = p.lang, p.lang == "zh"
    fill_t = _pool(lang, "FILLERS")
    fill_t = fill_t[p.offset % len(fill_t):] + fill_t[: p.offset % len(fill_t)]
    fillers = [f.format(t=p.topic, T=_cap(p.topic)) for f in fill_t]
    excl = [k for s in p.specs if s["type"] == "exclude_keywords" for k in s["keywords"]]
    fillers = [f for f in fillers if not any(V.count_keyword(f, w) for w in excl)]
    kw_units = []
    for s in p.specs:
        if s["type"] == "include_keywords":
            kw_units += [_pool(lang, "KW_UNITS")[0].format(kw=k) for k in s["keywords"]]
        if s["type"] == "keyword_frequency":
            n = s.get("n") or s.get("min") or 1
            kw_units += [_pool(lang, "KW_UNITS")[j % 2].format(kw=s["keyword"]) for j in range(n)]
    sep = "" if zh else " "
    fmt = next((s for s in p.specs if s["type"] in FORMAT_TYPES), None)
    if fmt is None:
        if n_fill > len(fillers):
            return None
        body = sep.join(kw_units + fillers[:n_fill])
    elif fmt["type"] in ("bullet_count", "bullet_items"):
        if fmt["type"] == "bullet_items":
            unit = _pool(lang, "ITEM_UNIT")
            lines = [unit.format(item=it, Item=_cap(it), t=p.topic) for it in fmt["items"]]
        else:
            if fmt["n"] > len(fillers):
                return None
            lines = fillers[: fmt["n"]]
        body = "\n".join("- " + ln for ln in lines)
        if kw_units:
            body += "\n" + sep.join(kw_units)
    elif fmt["type"] == "paragraph_count":
        n = fmt["n"]
        if n_fill < n or n_fill > len(fillers):
            return None
        paras = [[] for _ in range(n)]
        paras[0] += kw_units
        for j, f in enumerate(fillers[:n_fill]):
            paras[j % n].append(f)
        body = "\n\n".join(sep.join(x) for x in paras)
    else:  # json_format
        if n_fill < 1 or n_fill > len(fillers):
            return None
        k1, k2 = fmt["keys"]
        body = json.dumps({k1: p.topic, k2: sep.join(kw_units + fillers[:n_fill])}, ensure_ascii=False)
    start, end = p.spec("starts_with"), p.spec("ends_with")
    block = fmt is not None and fmt["type"] in ("bullet_count", "bullet_items")
    joiner = "\n" if block else sep
    if start:
        body = start["phrase"] + joiner + body
    if end:
        body = body + joiner + end["phrase"]
    if p.spec("lowercase"):
        body = body.lower()
    return body


def compose(p: Prompt) -> Optional[str]:
    """The shortest answer built from the templates that passes every constraint of ``p`` (None if none)."""
    for n_fill in range(1, 13):
        r = _compose_with(p, n_fill)
        if r is not None and all(V.verify_constraints(p.specs, r)):
            return r
    return None


# ---- random constraints ----------------------------------------------------------------------
def _measure(lang: str) -> str:
    return "char_count" if lang == "zh" else "word_count"


def _count(lang: str, text: str) -> int:
    return V.count_chars(text) if lang == "zh" else V.count_words(text)


def _used_words(p: Prompt) -> set:
    used = {p.topic}
    for s in p.specs:
        used.update(s.get("keywords", []))
        used.update(s.get("items", []))
        if "keyword" in s:
            used.add(s["keyword"])
    return used


def random_spec(rng: random.Random, p: Prompt, type_: str, avoid_text: Optional[str] = None) -> Optional[dict]:
    """A random spec of ``type_`` for ``p``; with ``avoid_text``, one that this text violates (or None)."""
    lang = p.lang
    used = _used_words(p)
    if type_ == "include_keywords":
        pool = [k for k in _pool(lang, "KEYWORDS") if k not in used
                and (avoid_text is None or not V.count_keyword(avoid_text, k))]
        return {"type": type_, "keywords": rng.sample(pool, rng.choice([1, 1, 2]))} if pool else None
    if type_ == "exclude_keywords":
        pool = [w for w in _pool(lang, "EXCLUDABLE") if w not in used]
        if avoid_text is not None:
            pool = [w for w in pool if V.count_keyword(avoid_text, w)]
        return {"type": type_, "keywords": [rng.choice(pool)]} if pool else None
    if type_ == "keyword_frequency":
        pool = [k for k in _pool(lang, "KEYWORDS") if k not in used]
        if avoid_text is not None:
            pool = [k for k in pool if V.count_keyword(avoid_text, k) < 2]
        return {"type": type_, "keyword": rng.choice(pool), "min": 2} if pool else None
    if type_ in ("word_count", "char_count"):
        if avoid_text is not None:
            c = _count(lang, avoid_text)
            step = 10 if lang == "zh" else 5
            return {"type": type_, "min": (c // step + 1 + rng.randint(0, 1)) * step}
        if rng.random() < 0.5:
            return {"type": type_, "max": rng.choice([40, 50, 60] if lang == "zh" else [20, 25, 30])}
        return {"type": type_, "min": rng.choice([30, 40] if lang == "zh" else [15, 20])}
    if type_ == "bullet_count":
        return {"type": type_, "n": rng.choice([2, 3, 4])}
    if type_ == "bullet_items":
        items = [i for i in _pool(lang, "ITEMS") if i not in used]
        return {"type": type_, "items": rng.sample(items, rng.choice([2, 3, 3, 4]))}
    if type_ == "paragraph_count":
        return {"type": type_, "n": rng.choice([2, 3])}
    if type_ == "json_format":
        return {"type": type_, "keys": list(rng.choice(_pool(lang, "JSON_KEYS")))}
    if type_ in ("starts_with", "ends_with"):
        pool = _pool(lang, "START" if type_ == "starts_with" else "END")
        return {"type": type_, "phrase": rng.choice(pool)}
    if type_ == "lowercase":
        return {"type": type_} if lang == "en" else None
    raise ValueError(type_)


def _compatible(p: Prompt, type_: str) -> bool:
    types = {s["type"] for s in p.specs}
    if type_ in types:
        return False
    fmt = types & set(FORMAT_TYPES)
    if type_ in FORMAT_TYPES and fmt:
        return False
    if type_ == "lowercase" and p.lang != "en":
        return False
    if type_ in ("starts_with", "ends_with") and "json_format" in types:
        return False
    if type_ == "json_format" and types & {"starts_with", "ends_with"}:
        return False
    if type_ in ("word_count", "char_count") and types & {"bullet_count", "bullet_items"}:
        return False
    if type_ in ("bullet_count", "bullet_items") and types & {"word_count", "char_count"}:
        return False
    return True


MODIFIERS = ("include_keywords", "exclude_keywords", "keyword_frequency", "LENGTH", "starts_with",
             "ends_with", "lowercase")


def random_prompt(rng: random.Random, lang: str, n_constraints: int, fmt: Optional[str] = None,
                  topic: Optional[str] = None) -> Optional[Prompt]:
    """A random prompt with ``n_constraints`` specs (a format spec ``fmt`` first when given)."""
    p = Prompt(lang, topic or rng.choice(_pool(lang, "TOPICS")), rng.randrange(12), [])
    if fmt:
        p.specs.append(random_spec(rng, p, fmt))
    tries = 0
    while len(p.specs) < n_constraints and tries < 50:
        tries += 1
        t = rng.choice(MODIFIERS)
        t = _measure(lang) if t == "LENGTH" else t
        if not _compatible(p, t):
            continue
        s = random_spec(rng, p, t)
        if s is not None:
            p.specs.append(s)
    return p if len(p.specs) == n_constraints and compose(p) is not None else None


# ---- edits -------------------------------------------------------------------------------------
def edit_add(rng: random.Random, p: Prompt, y1: str) -> Optional[tuple[Prompt, str]]:
    cands = [t for t in ("include_keywords", "exclude_keywords", "keyword_frequency", _measure(p.lang),
                         "starts_with", "ends_with", "lowercase") if _compatible(p, t)]
    rng.shuffle(cands)
    for t in cands:
        s = random_spec(rng, p, t, avoid_text=y1)
        if s is None or V.verify(s, y1):
            continue
        q = p.copy()
        q.specs.insert(rng.randrange(len(q.specs) + 1), s)
        return q, f"added {t}"
    return None


def edit_delete(rng: random.Random, p: Prompt, y1: str) -> Optional[tuple[Prompt, str]]:
    s = p.spec("bullet_items")
    if s is None or len(s["items"]) < 2:
        return None
    q = p.copy()
    qs = q.spec("bullet_items")
    gone = qs["items"].pop(rng.randrange(len(qs["items"])))
    return q, f"deleted bullet item {gone!r}"


def edit_revise(rng: random.Random, p: Prompt, y1: str) -> Optional[tuple[Prompt, str]]:
    order = list(range(len(p.specs)))
    rng.shuffle(order)
    for j in order:
        s = p.specs[j]
        t = s["type"]
        new = None
        if t in ("include_keywords", "exclude_keywords", "keyword_frequency", "word_count", "char_count",
                 "starts_with", "ends_with"):
            rest = p.copy()
            rest.specs.pop(j)
            new = random_spec(rng, rest, t, avoid_text=y1)
            if t in ("starts_with", "ends_with") and new is not None:
                others = [x for x in _pool(p.lang, "START" if t == "starts_with" else "END") if x != s["phrase"]]
                new = {"type": t, "phrase": rng.choice(others)}
        elif t == "bullet_count":
            new = {"type": t, "n": rng.choice([n for n in (2, 3, 4, 5) if n != s["n"]])}
        elif t == "paragraph_count":
            new = {"type": t, "n": rng.choice([n for n in (1, 2, 3) if n != s["n"]])}
        elif t == "json_format":
            new = {"type": t, "keys": list(rng.choice([k for k in _pool(p.lang, "JSON_KEYS") if k != s["keys"]]))}
        elif t == "bullet_items":
            items = list(s["items"])
            pool = [i for i in _pool(p.lang, "ITEMS") if i not in items]
            items[rng.randrange(len(items))] = rng.choice(pool)
            new = {"type": t, "items": items}
        if new is None or V.verify(new, y1):
            continue
        q = p.copy()
        q.specs[j] = new
        return q, f"revised {t}"
    return None


EDITS = {"ADD": edit_add, "DELETE": edit_delete, "REVISE": edit_revise}


def make_group(rng: random.Random, lang: str, edit: str, index: int) -> dict:
    """One verified IOPO group (retries until every check passes)."""
    for _ in range(1000):
        if edit == "DELETE":
            p1 = random_prompt(rng, lang, rng.choice([1, 2, 2, 3]), fmt="bullet_items")
            if p1 is not None and len(p1.spec("bullet_items")["items"]) < 3:
                continue
        else:
            fmt = rng.choice([None, None, "bullet_count", "bullet_items", "paragraph_count", "json_format"])
            p1 = random_prompt(rng, lang, rng.choice([1, 2, 2, 3]), fmt=fmt)
        if p1 is None:
            continue
        y1 = compose(p1)
        res = EDITS[edit](rng, p1, y1)
        if res is None:
            continue
        p2, detail = res
        y2 = compose(p2)
        if y2 is None or y2 == y1 or all(V.verify_constraints(p2.specs, y1)):
            continue
        x1, x2 = p1.text(), p2.text()
        if x1 == x2:
            continue
        return {
            "conversations": [{"from": "human", "value": x1}, {"from": "human", "value": x2}],
            "chosen": {"from": "gpt", "value": y1},
            "rejected": {"from": "gpt", "value": y2},
            "meta": {"id": f"demo-iopo-{index:04d}", "lang": lang, "edit": edit, "edit_detail": detail,
                     "x1_constraints": p1.specs, "x2_constraints": p2.specs},
        }
    raise RuntimeError(f"could not build a {edit} group in {lang}")  # pragma: no cover


# ---- evaluation prompts ------------------------------------------------------------------------
SEGPO_INTRO = {
    "en": ("Answer each sub-instruction below in turn. Start the answer to each one with its heading on a "
           "line of its own (SUB_INSTRUCTION_1:, SUB_INSTRUCTION_2:, ...) and leave a blank line between answers."),
    "zh": ("请依次回答下面的每个子指令。每个回答以其标题单独一行开头（SUB_INSTRUCTION_1:、SUB_INSTRUCTION_2: ……），"
           "回答之间空一行。"),
}
CONSTRAINTS_WORD = {"en": "Constraints:", "zh": "约束："}


def sectioned_record(subs: list, lang: str, rec_id: str, category: str = "segpo") -> dict:
    """An evaluation record with one ``SUB_INSTRUCTION_k`` section per prompt of ``subs`` (a template reference)."""
    parts = [SEGPO_INTRO[lang], ""]
    refs = []
    for k, p in enumerate(subs, 1):
        parts.append(f"SUB_INSTRUCTION_{k}: {p.task()}")
        parts.append(CONSTRAINTS_WORD[lang])
        parts += [f"{i}. {c}" for i, c in enumerate(p.constraint_lines(), 1)]
        parts.append("")
        refs.append(f"SUB_INSTRUCTION_{k}:\n{compose(p)}")
    prompt = "\n".join(parts).rstrip() + "\n"
    return {
        "id": rec_id, "lang": lang, "category": category, "prompt": prompt,
        "constraints": [], "constraints_text": [],
        "constraints_num": sum(len(p.specs) for p in subs),
        "sub_instructions": [
            {"key": f"SUB_INSTRUCTION_{k}", "instruction": p.task(), "constraints": p.specs,
             "constraints_text": p.constraint_lines()} for k, p in enumerate(subs, 1)],
        "reference": "\n\n".join(refs),
    }


def make_eval_record(rng: random.Random, lang: str, category: str, index: int, seen: set) -> dict:
    for _ in range(1000):
        if category == "segpo":
            subs = []
            topics = rng.sample(_pool(lang, "TOPICS"), rng.choice([2, 3]))
            for t in topics:
                fmt = rng.choice([None, "bullet_count", "bullet_items", "paragraph_count"])
                p = random_prompt(rng, lang, rng.choice([1, 2]), fmt=fmt, topic=t)
                if p is None:
                    subs = None
                    break
                subs.append(p)
            if not subs:
                continue
            rec = sectioned_record(subs, lang, f"demo-eval-{index:04d}")
        else:
            n = 1 if category == "single" else rng.choice([2, 3, 4])
            fmt = rng.choice([None, None, "bullet_count", "bullet_items", "paragraph_count", "json_format"])
            p = random_prompt(rng, lang, n, fmt=fmt if n > 1 or rng.random() < 0.5 else None)
            if p is None:
                continue
            rec = {
                "id": f"demo-eval-{index:04d}", "lang": lang, "category": category, "prompt": p.text(),
                "constraints": p.specs, "constraints_text": p.constraint_lines(), "constraints_num": len(p.specs),
                "sub_instructions": [], "reference": compose(p),
            }
        if rec["prompt"] in seen or not V.verify_record(rec, rec["reference"])["all_pass"]:
            continue
        seen.add(rec["prompt"])
        return rec
    raise RuntimeError(f"could not build a {category} eval prompt in {lang}")  # pragma: no cover


# ---- driver ----------------------------------------------------------------------------------------
def pairs_from_groups(groups: list) -> tuple[list, list]:
    """SFT records (x1, y1) and (x2, y2) and DPO pairs (x1: y1 > y2), (x2: y2 > y1) of IOPO groups."""
    sft, dpo = [], []
    for g in groups:
        (x1, x2), y1, y2 = [t["value"] for t in g["conversations"]], g["chosen"]["value"], g["rejected"]["value"]
        for x, yw, yl in ((x1, y1, y2), (x2, y2, y1)):
            sft.append({"messages": [{"role": "user", "content": x}, {"role": "assistant", "content": yw}]})
            dpo.append({"conversations": [{"from": "human", "value": x}],
                        "chosen": {"from": "gpt", "value": yw}, "rejected": {"from": "gpt", "value": yl}})
    return sft, dpo


def generate(seed: int = DEFAULT_SEED, n_groups: int = DEFAULT_GROUPS, n_eval: int = DEFAULT_EVAL) -> dict:
    """All demo data in memory: ``{"iopo": [...], "sft": [...], "dpo": [...], "eval": [...]}``."""
    rng = random.Random(seed)
    groups = []
    edits = ("ADD", "DELETE", "REVISE")
    for i in range(n_groups):
        groups.append(make_group(rng, ("en", "zh")[i % 2], edits[(i // 2) % 3], i + 1))
    seen = {g["conversations"][j]["value"] for g in groups for j in (0, 1)}
    evals = []
    n_seg = max(n_eval // 4, 2) if n_eval >= 4 else 0
    n_single = (n_eval - n_seg) // 3
    cats = ["segpo"] * n_seg + ["single"] * n_single + ["multi"] * (n_eval - n_seg - n_single)
    for i, cat in enumerate(cats):
        evals.append(make_eval_record(rng, ("en", "zh")[i % 2], cat, i + 1, seen))
    sft, dpo = pairs_from_groups(groups)
    return {"iopo": groups, "sft": sft, "dpo": dpo, "eval": evals}


FILES = {"iopo": "iopo_train.json", "sft": "sft_train.jsonl", "dpo": "dpo_train.json", "eval": "eval_prompts.jsonl"}


def write(data: dict, out: str, files: dict | None = None) -> dict:
    """Writes ``data[key]`` to ``out/name`` for every ``key: name`` of ``files`` (default :data:`FILES`):
    JSON lines for ``.jsonl`` names, indented JSON otherwise; each file atomically (temporary file, then
    rename). Returns ``{key: path}``."""
    os.makedirs(out, exist_ok=True)
    paths = {}
    for key, name in (files or FILES).items():
        path = os.path.join(out, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            if name.endswith(".jsonl"):
                for r in data[key]:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            else:
                json.dump(data[key], f, ensure_ascii=False, indent=1)
                f.write("\n")
        os.replace(path + ".tmp", path)
        paths[key] = path
    return paths


DESCRIPTION = ("Generate the demo set (IOPO groups, SFT/DPO pairs, evaluation prompts with rule-checkable "
               "constraints, English and Chinese) with a fixed seed.")


def define_flags(fv) -> None:
    f = flags
    f.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_data"),
                    "output directory (default: data_pipeline/demo_data)", flag_values=fv)
    f.DEFINE_integer("seed", DEFAULT_SEED, "random seed", flag_values=fv)
    f.DEFINE_integer("groups", DEFAULT_GROUPS, "IOPO groups", flag_values=fv)
    f.DEFINE_integer("eval", DEFAULT_EVAL, "evaluation prompts", flag_values=fv)


def _main(fv, positional) -> int:
    if positional:
        raise cli.usage_error(PROG, f"unexpected arguments {positional}")
    data = generate(fv.seed, fv.groups, fv.eval)
    paths = write(data, fv.out)
    for key, path in paths.items():
        print(f"{len(data[key]):5d} {key:5s} records -> {path}")
    return 0


PROG = "python -m data_pipeline.make_demo"
main = cli.command(PROG, DESCRIPTION, define_flags, _main)

if __name__ == "__main__":
    cli.run(main)
