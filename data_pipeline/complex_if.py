r"""Generate a rule-verifiable complex-instruction set for the IOPO experiments (``experiments/``).

    python -m iopo_jax.tools.complex_if --out data/complex_if --seed 2026                 # templated answers
    python -m iopo_jax.tools.complex_if --out data/complex_if --best_of 4 --sample_groups 500 \
        --sample_model ~/.cache/iopo_jax/models/smollm2-135m-instruct   # best-of-n from a model

Built on the bundled demo generator (:mod:`data_pipeline.make_demo`: the :class:`~data_pipeline.make_demo.Prompt`
type, the answer composer, the random constraint specs and the ADD / DELETE / REVISE edits) with more
topics, two more constraint types, 1 to ``--max_constraints`` (default 9) constraints per instruction
(with ``--nostrict`` x2 may hold one more), held-out topics and constraint combinations, a sectioned
(EIFBench-like) set, and answers sampled from a model where it can meet the constraints. Every constraint is a spec that
:mod:`data_pipeline.verifiers` checks; no judge is needed.

IOPO groups (x1, y1, x2, y2), as in Zhang et al. (2024), "IOPO: Empowering LLMs with Complex Instruction
Following via Input-Output Preference Optimization": x2 is x1 with its constraints edited by

- ADD: with ``--strict`` (default) a required bullet point is added to an exact list ("one bullet for each
  of A, B" -> "... A, B, C"); without it, also a whole new constraint that y1 misses;
- DELETE: a required bullet point is removed from such a list;
- REVISE: one constraint is changed (another keyword, phrase, count, length, JSON keys, list item).

y1 passes every constraint of x1 and fails at least one of x2, and (``--strict``) y2 passes every constraint
of x2 and fails at least one of x1. A whole-constraint ADD can never give that second property (an answer
meeting x1 + c meets x1), hence the strict ADD adds part of a constraint, the mirror of the paper's partial
DELETE.

Answers: with ``--sample_model`` each of x1 and x2 is answered ``--best_of`` times by the model through our
JAX :class:`~iopo_jax.sampling.Sampler` (temperature ``--temperature``), and the first sample that passes its
own instruction and fails the other one (the verifiers are the judge) is kept; where none does, the
templated answer of the demo composer is used. ``stats.json`` reports the share of each.

Files written to ``--out``:

=======================  ==================================================================================
iopo_train.json          IOPO groups (sharegpt "ranking" layout, as ``make_demo``) with ``meta`` (id, lang,
                         topic, edit, edit_detail, x1/x2_constraints, y1/y2_source: sampled | template)
sft_train.jsonl          (x1, y1) and (x2, y2) as chat messages
dpo_train.json           (x1: y1 > y2) and (x2: y2 > y1)
eval_dev.jsonl           held-out prompts for the learning-rate search (``demo_eval`` format)
eval_test.jsonl          held-out test prompts; ``category`` single (IF-S-like: one constraint) or multi
                         (IF-M-like: 2 to max_constraints); unseen topics; every multi prompt's set of
                         constraint types occurs in no training instruction (x1 or x2)
sectioned_train.jsonl    sectioned prompts (2-4 ``SUB_INSTRUCTION_k`` sections, 1-3 constraints each) on the
                         training topics, for GRPO / SegPO (``rl.prompts_files``)
sectioned_eval.jsonl     the same on the held-out topics
stats.json, STATS.md     the statistics (counts per edit, constraint count, type, TRACE dimension; answer
                         sources; held-out checks)
=======================  ==================================================================================

TRACE constraint dimensions (the ``levels2`` labels of the TRACE evaluation file) covered by rules: see
:data:`TYPE_DIMENSION` and :data:`UNCOVERED` (also listed in ``STATS.md``).
"""
from __future__ import annotations

import collections
import json
import os
import random
from typing import Callable, Optional, Sequence

from data_pipeline import make_demo as D
from data_pipeline import verifiers as V

LANGS = ("en", "zh")  # languages of the prompts, constraints and answers

DEFAULT_SEED = 2026
DEFAULT_GROUPS = 3000
DEFAULT_EVAL_SINGLE = 100
DEFAULT_EVAL_MULTI = 200
DEFAULT_DEV = 60
DEFAULT_SECTIONED_TRAIN = 400
DEFAULT_SECTIONED_EVAL = 60
DEFAULT_MAX_CONSTRAINTS = 9

# Our own extra topics (the demo's 40 English topics come first).
EXTRA_EN_TOPICS = [
    "volcanoes", "libraries", "trains", "bridges", "lighthouses", "bees", "clocks", "salt", "islands", "maps",
    "kites", "windmills", "deserts", "forests", "markets", "harbors", "castles", "museums", "umbrellas", "bicycles",
    "lanterns", "gardens", "rivers", "tides", "caves", "owls", "whales", "tulips", "mushrooms", "pianos",
    "telescopes", "compasses", "candles", "quilts", "puppets", "robots", "satellites", "glaciers", "meadows", "fog",
]
HELDOUT_EVERY = 5  # every 5th topic of each language is held out for evaluation (never in training data)


def topic_split(lang: str) -> tuple[list[str], list[str]]:
    """(training topics, held-out topics) of a language; fixed, independent of the seed."""
    allt = list(D.EN_TOPICS) + EXTRA_EN_TOPICS if lang == "en" else list(D.ZH_TOPICS)
    held = allt[HELDOUT_EVERY - 1::HELDOUT_EVERY]
    return [t for t in allt if t not in held], held


# Constraint type -> the TRACE dimension (levels2 label) it checks. Glosses: synthesize.DIMENSION_GLOSS.
TYPE_DIMENSION = {
    "include_keywords": "包含约束", "bullet_items": "包含约束",
    "exclude_keywords": "排除约束",
    "keyword_frequency": "数值约束", "word_count": "数值约束", "char_count": "数值约束",
    "bullet_count": "编号和列表约束",
    "paragraph_count": "层次化结构约束",
    "json_format": "输出格式约束",
    "starts_with": "模版约束", "ends_with": "模版约束",
    "lowercase": "文本样式约束", "no_commas": "文本样式约束",
    "language": "多语言约束",
}
# Why the other TRACE dimensions are left out: each needs a judgement of meaning that no rule makes.
UNCOVERED = {
    "主题约束": "staying on a topic or angle is semantic (a keyword rule would only test inclusion)",
    "价值观约束": "ethical/social values need a judge",
    "隐私约束": "what counts as personal information depends on meaning",
    "角色扮演约束": "speaking in a role's voice needs a judge",
    "受众目标约束": "fitness for an audience needs a judge",
    "先验条件约束": "respecting stated assumptions is semantic",
    "自然语言流程背景信息约束": "following steps described in prose needs a judge",
    "markdown流程背景信息约束": "following a markdown process outline needs a judge",
    "表格背景信息约束": "could be ruled (quote a value from a given table) but needs a new verifier; not done",
    "文本背景信息约束": "using facts of a passage is semantic",
    "语气风格约束": "tone and register need a judge",
    "情感情绪约束": "mood needs a judge",
    "语言特征约束": "rhetorical devices need a judge",
    "语法结构约束": "some forms could be ruled (one sentence per line) but need new verifiers; not done",
    "引用和参考约束": "quoting sources in a stated way needs new verifiers; not done",
    "正例约束": "following an example's pattern is semantic",
    "负例约束": "avoiding an example's pattern is semantic",
    "输入格式约束": "labels one TRACE constraint only (outside the 26 dimensions); about the input, not the answer",
}
EXTRA_TYPES = ("no_commas", "language")
MODIFIERS = D.MODIFIERS + EXTRA_TYPES  # LENGTH = word_count (en) / char_count (zh)
FORMATS = (None, "bullet_count", "bullet_items", "paragraph_count", "json_format")
EDIT_NAMES = ("ADD", "DELETE", "REVISE")
MAX_ITEMS = 5


# ---- prompts ---------------------------------------------------------------------------------------
def _spec(rng: random.Random, p: D.Prompt, t: str) -> Optional[dict]:
    if t == "no_commas":
        return {"type": t}
    if t == "language":
        return {"type": t, "lang": p.lang}
    return D.random_spec(rng, p, t)


def _compatible(p: D.Prompt, t: str) -> bool:
    types = {s["type"] for s in p.specs}
    if t in EXTRA_TYPES:
        return t not in types and not (t == "no_commas" and "json_format" in types)
    if t == "json_format" and "no_commas" in types:
        return False  # the composer writes JSON with ", " between its keys
    return D._compatible(p, t)  # pylint: disable=protected-access


def build_prompt(rng: random.Random, lang: str, topic: str, n: int, fmt: Optional[str] = None) -> Optional[D.Prompt]:
    """A prompt on ``topic`` with ``n`` constraints (``fmt`` among them) that a templated answer meets, or None."""
    p = D.Prompt(lang, topic, rng.randrange(12), [])
    if fmt:
        p.specs.append(D.random_spec(rng, p, fmt))
    order = list(MODIFIERS)
    rng.shuffle(order)
    for t in order:
        if len(p.specs) >= n:
            break
        t = D._measure(lang) if t == "LENGTH" else t  # pylint: disable=protected-access
        if _compatible(p, t):
            s = _spec(rng, p, t)
            if s is not None:
                p.specs.append(s)
    if len(p.specs) != n:
        return None
    rng.shuffle(p.specs)
    return p if D.compose(p) is not None else None


def combo(specs: Sequence[dict]) -> tuple:
    """The set of constraint types of an instruction (what "unseen combination" compares)."""
    return tuple(sorted({s["type"] for s in specs}))


# ---- edits -----------------------------------------------------------------------------------------
def edit_add_item(rng: random.Random, p: D.Prompt, y1: str) -> Optional[tuple[D.Prompt, str]]:
    """ADD part of a constraint: one more required bullet point in an exact list."""
    s = p.spec("bullet_items")
    if s is None or len(s["items"]) >= MAX_ITEMS:
        return None
    pool = [i for i in D._pool(p.lang, "ITEMS") if i not in D._used_words(p)]  # pylint: disable=protected-access
    if not pool:
        return None
    q = p.copy()
    items = q.spec("bullet_items")["items"]
    it = rng.choice(pool)
    items.insert(rng.randrange(len(items) + 1), it)
    return q, f"added bullet item {it!r}"


def edit(rng: random.Random, name: str, p: D.Prompt, y1: str, strict: bool) -> Optional[tuple[D.Prompt, str]]:
    if name == "ADD":
        return edit_add_item(rng, p, y1) if strict or rng.random() < 0.5 else D.edit_add(rng, p, y1)
    return D.EDITS[name](rng, p, y1)


class Group:
    def __init__(self, p1, p2, y1, y2, edit_name, detail):
        self.p1, self.p2, self.y1, self.y2, self.edit, self.detail = p1, p2, y1, y2, edit_name, detail
        self.y1_source = self.y2_source = "template"


def make_group(rng: random.Random, lang: str, edit_name: str, topics: Sequence[str], max_c: int,
               strict: bool) -> Group:
    """One group whose templated answers pass every check (the fallback when sampling fails)."""
    for _ in range(5000):
        n = rng.randint(1, max_c)
        needs_list = edit_name == "DELETE" or (edit_name == "ADD" and (strict or rng.random() < 0.5))
        # ADD/DELETE need an exact list; REVISE groups leave it out so that the other formats and the length
        # constraints (which bullet lists exclude) are not rare.
        fmt = "bullet_items" if needs_list else rng.choice((None, "bullet_count", "paragraph_count", "json_format"))
        p1 = build_prompt(rng, lang, rng.choice(topics), n, fmt)
        if p1 is None or (edit_name == "DELETE" and len(p1.spec("bullet_items")["items"]) < 2):
            continue
        y1 = D.compose(p1)
        res = edit(rng, edit_name, p1, y1, strict)
        if res is None:
            continue
        p2, detail = res
        y2 = D.compose(p2)
        if y2 is None or p1.text() == p2.text() or not pair_ok(p1.specs, p2.specs, y1, y2, strict):
            continue
        return Group(p1, p2, y1, y2, edit_name, detail)
    raise RuntimeError(f"could not build a {edit_name} group in {lang} with at most {max_c} constraints")


def answer_ok(own: Sequence[dict], other: Sequence[dict], y: str, strict: bool = True) -> bool:
    """``y`` passes every constraint of its own instruction and (strict) fails at least one of the other."""
    return all(V.verify_constraints(own, y)) and (not strict or not all(V.verify_constraints(other, y)))


def pair_ok(c1, c2, y1, y2, strict: bool) -> bool:
    return y1 != y2 and answer_ok(c1, c2, y1) and answer_ok(c2, c1, y2, strict)


# ---- best-of-n answers from a model -------------------------------------------------------------------
# (prompts, seeds) -> [[n texts] per prompt]; the command (iopo_jax.tools.complex_if) builds one on the JAX
# sampler, so that this module does not depend on iopo_jax.
SampleFn = Callable[[Sequence[str], Sequence[int]], list]


def apply_samples(groups: Sequence[Group], sample_fn: SampleFn, seed: int, strict: bool) -> dict:
    """Replace templated y1/y2 by the first sampled answer that passes its checks (see module doc). Returns
    what the candidates did, per answer: how many there were, how many pass every constraint of their own
    instruction, and how many of those are usable (also fail the other instruction where required)."""
    prompts, seeds = [], []
    for i, g in enumerate(groups):
        prompts += [g.p1.text(), g.p2.text()]
        seeds += [seed * 1_000_003 + 2 * i, seed * 1_000_003 + 2 * i + 1]
    cands = sample_fn(prompts, seeds)
    if len(cands) != len(prompts):
        raise RuntimeError(f"the sampler returned {len(cands)} answer lists for {len(prompts)} prompts")
    counts = {f"{k}_{w}": 0 for k in ("y1", "y2") for w in ("candidates", "pass_own", "usable")}
    for i, g in enumerate(groups):
        c1, c2 = g.p1.specs, g.p2.specs
        for key, own, other, ys, must_fail in (("y1", c1, c2, cands[2 * i], True),
                                               ("y2", c2, c1, cands[2 * i + 1], strict)):
            counts[f"{key}_candidates"] += len(ys)
            counts[f"{key}_pass_own"] += sum(answer_ok(own, other, y, False) for y in ys)
            counts[f"{key}_usable"] += sum(answer_ok(own, other, y, must_fail) for y in ys)
        y1 = next((y for y in cands[2 * i] if answer_ok(c1, c2, y)), None)
        y2 = next((y for y in cands[2 * i + 1] if answer_ok(c2, c1, y, strict)), None)
        if y1 is not None and y1 != g.y2:
            g.y1, g.y1_source = y1.strip(), "sampled"
        if y2 is not None and y2.strip() != g.y1:
            g.y2, g.y2_source = y2.strip(), "sampled"
        assert pair_ok(c1, c2, g.y1, g.y2, strict)  # stripping keeps every verdict (the checks strip)
    return counts


def group_record(g: Group, index: int) -> dict:
    return {
        "conversations": [{"from": "human", "value": g.p1.text()}, {"from": "human", "value": g.p2.text()}],
        "chosen": {"from": "gpt", "value": g.y1},
        "rejected": {"from": "gpt", "value": g.y2},
        "meta": {"id": f"cif-iopo-{index:05d}", "lang": g.p1.lang, "topic": g.p1.topic, "edit": g.edit,
                 "edit_detail": g.detail, "x1_constraints": g.p1.specs, "x2_constraints": g.p2.specs,
                 "y1_source": g.y1_source, "y2_source": g.y2_source},
    }


# ---- held-out evaluation prompts -----------------------------------------------------------------------
def eval_record(rng: random.Random, lang: str, category: str, topics: Sequence[str], rec_id: str, seen: set,
                train_combos: set, max_c: int) -> dict:
    for _ in range(5000):
        if category == "single":
            p = build_prompt(rng, lang, rng.choice(topics), 1, rng.choice(FORMATS))
        else:
            p = build_prompt(rng, lang, rng.choice(topics), rng.randint(2, max_c), rng.choice(FORMATS))
            if p is not None and combo(p.specs) in train_combos:
                continue
        if p is None or p.text() in seen:
            continue
        seen.add(p.text())
        rec = {"id": rec_id, "lang": lang, "category": category, "prompt": p.text(), "constraints": p.specs,
               "constraints_text": p.constraint_lines(), "constraints_num": len(p.specs), "sub_instructions": [],
               "reference": D.compose(p), "topic": p.topic}
        assert V.verify_record(rec, rec["reference"])["all_pass"]
        return rec
    raise RuntimeError(f"could not build an unseen {category} prompt in {lang} ({rec_id})")


def sectioned(rng: random.Random, lang: str, topics: Sequence[str], rec_id: str, seen: set) -> dict:
    """An EIFBench-like prompt: 2-4 sub-instructions, each with 1-3 constraints on its own section."""
    for _ in range(5000):
        subs = [build_prompt(rng, lang, t, rng.randint(1, 3),
                             rng.choice([None, "bullet_count", "bullet_items", "paragraph_count"]))
                for t in rng.sample(list(topics), rng.randint(2, 4))]
        if any(p is None for p in subs):
            continue
        rec = D.sectioned_record(subs, lang, rec_id, category="sectioned")
        if rec["prompt"] in seen or not V.verify_record(rec, rec["reference"])["all_pass"]:
            continue
        seen.add(rec["prompt"])
        return rec
    raise RuntimeError(f"could not build a sectioned prompt in {lang} ({rec_id})")


# ---- driver ------------------------------------------------------------------------------------------
def generate(seed: int = DEFAULT_SEED, n_groups: int = DEFAULT_GROUPS, langs: Sequence[str] = ("en",),
             max_constraints: int = DEFAULT_MAX_CONSTRAINTS, n_single: int = DEFAULT_EVAL_SINGLE,
             n_multi: int = DEFAULT_EVAL_MULTI, n_dev: int = DEFAULT_DEV,
             n_sectioned_train: int = DEFAULT_SECTIONED_TRAIN, n_sectioned_eval: int = DEFAULT_SECTIONED_EVAL,
             strict: bool = True, sample_fn: Optional[SampleFn] = None, sample_groups: int = -1,
             progress: bool = False) -> dict:
    """Everything in memory (see the module doc for what each key holds)."""
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

    if not 1 <= max_constraints <= 9:
        raise ValueError(f"max_constraints must be in 1..9, got {max_constraints}")
    for lang in langs:
        if lang not in LANGS:
            raise ValueError(f"langs: unknown language {lang!r} ({', '.join(LANGS)})")
    rng = random.Random(seed)
    groups = []
    for i in tqdm(range(n_groups), desc="IOPO groups", disable=not progress):
        lang = langs[i % len(langs)]
        groups.append(make_group(rng, lang, EDIT_NAMES[(i // len(langs)) % 3], topic_split(lang)[0],
                                 max_constraints, strict))
    n_sampled = len(groups) if sample_groups < 0 else min(sample_groups, len(groups))
    candidates = {}
    if sample_fn is not None and n_sampled:
        candidates = apply_samples(groups[:n_sampled], sample_fn, seed, strict)
    iopo = [group_record(g, i + 1) for i, g in enumerate(groups)]
    train_combos = {combo(g.p1.specs) for g in groups} | {combo(g.p2.specs) for g in groups}
    seen = {t for g in iopo for t in (g["conversations"][0]["value"], g["conversations"][1]["value"])}

    def evals(prefix, n_s, n_m):
        out = []
        cats = ["single"] * n_s + ["multi"] * n_m
        for i, cat in enumerate(tqdm(cats, desc=f"{prefix} prompts", disable=not progress)):
            lang = langs[i % len(langs)]
            out.append(eval_record(rng, lang, cat, topic_split(lang)[1], f"cif-{prefix}-{i + 1:04d}", seen,
                                   train_combos, max_constraints))
        return out

    dev = evals("dev", n_dev // 3, n_dev - n_dev // 3)
    test = evals("test", n_single, n_multi)
    sec_train = [sectioned(rng, langs[i % len(langs)], topic_split(langs[i % len(langs)])[0],
                           f"cif-sec-train-{i + 1:04d}", seen) for i in range(n_sectioned_train)]
    sec_eval = [sectioned(rng, langs[i % len(langs)], topic_split(langs[i % len(langs)])[1],
                          f"cif-sec-eval-{i + 1:04d}", seen) for i in range(n_sectioned_eval)]
    sft, dpo = D.pairs_from_groups(iopo)
    data = {"iopo": iopo, "sft": sft, "dpo": dpo, "eval_dev": dev, "eval_test": test,
            "sectioned_train": sec_train, "sectioned_eval": sec_eval}
    data["stats"] = statistics(data, train_combos, seed=seed, strict=strict, n_sampled=n_sampled if sample_fn else 0,
                               candidates=candidates,
                               langs=langs, max_constraints=max_constraints)
    return data


def _hist(xs) -> dict:
    return {str(k): v for k, v in sorted(collections.Counter(xs).items())}


def statistics(data: dict, train_combos: set, **params) -> dict:
    iopo = data["iopo"]
    metas = [g["meta"] for g in iopo]
    specs = [s for m in metas for s in m["x1_constraints"] + m["x2_constraints"]]
    n = len(iopo)
    y2_fails_x1 = sum(not all(V.verify_constraints(m["x1_constraints"], g["rejected"]["value"]))
                      for g, m in zip(iopo, metas))
    words = lambda xs: round(sum(V.count_words(x) for x in xs) / max(1, len(xs)), 1)  # noqa: E731
    sampled_groups = params.pop("n_sampled")
    candidates = params.pop("candidates", {})
    y1s = sum(m["y1_source"] == "sampled" for m in metas)
    y2s = sum(m["y2_source"] == "sampled" for m in metas)
    out = {
        "params": params,
        "iopo_groups": n,
        "by_edit": _hist(m["edit"] for m in metas),
        "by_lang": _hist(m["lang"] for m in metas),
        "x1_constraints": _hist(len(m["x1_constraints"]) for m in metas),
        "x2_constraints": _hist(len(m["x2_constraints"]) for m in metas),
        "constraint_types": _hist(s["type"] for s in specs),
        "trace_dimensions": _hist(TYPE_DIMENSION[s["type"]] for s in specs),
        "answers": {
            "groups_offered_to_the_sampler": sampled_groups,
            "y1_sampled": y1s,
            "y2_sampled": y2s,
            "y1_sampled_share": y1s / max(1, n),
            "y2_sampled_share": y2s / max(1, n),
            "template_share": sum((m["y1_source"] == "template") + (m["y2_source"] == "template")
                                  for m in metas) / max(1, 2 * n),
            "y2_fails_x1_share": y2_fails_x1 / max(1, n),
            # of the groups offered to the sampler (the shares above are of all groups)
            "y1_sampled_share_of_offered": y1s / max(1, sampled_groups),
            "y2_sampled_share_of_offered": y2s / max(1, sampled_groups),
            "candidates": candidates,
        },
        "mean_words": {"x": words([t["value"] for g in iopo for t in g["conversations"]]),
                       "y": words([g[k]["value"] for g in iopo for k in ("chosen", "rejected")])},
        "distinct_training_type_combinations": len(train_combos),
        "sft_records": len(data["sft"]), "dpo_pairs": len(data["dpo"]),
    }
    train_topics = {m["topic"] for m in metas}
    for key in ("eval_dev", "eval_test"):
        recs = data[key]
        out[key] = {"n": len(recs), "by_category": _hist(r["category"] for r in recs),
                    "constraints": _hist(r["constraints_num"] for r in recs),
                    "topics_in_training": sum(r["topic"] in train_topics for r in recs),
                    "multi_combinations_seen_in_training": sum(
                        combo(r["constraints"]) in train_combos for r in recs if r["category"] == "multi")}
    for key in ("sectioned_train", "sectioned_eval"):
        recs = data[key]
        out[key] = {"n": len(recs), "sub_instructions": _hist(len(r["sub_instructions"]) for r in recs),
                    "constraints": _hist(r["constraints_num"] for r in recs)}
    out["trace_dimensions_covered"] = sorted(set(TYPE_DIMENSION.values()))
    out["trace_dimensions_not_covered"] = UNCOVERED
    return out


FILES = {"iopo": "iopo_train.json", "sft": "sft_train.jsonl", "dpo": "dpo_train.json",
         "eval_dev": "eval_dev.jsonl", "eval_test": "eval_test.jsonl",
         "sectioned_train": "sectioned_train.jsonl", "sectioned_eval": "sectioned_eval.jsonl",
         "stats": "stats.json"}


def candidates_lines(c: dict) -> list:
    """The sampled candidates' verdicts, per answer (empty without sampling)."""
    return [f"- {k} candidates: {c[k + '_candidates']}; pass every constraint of their own instruction "
            f"{c[k + '_pass_own']}; usable (and fail the other instruction where required) {c[k + '_usable']}"
            for k in ("y1", "y2") if c.get(k + "_candidates")]


def stats_markdown(st: dict) -> str:
    a = st["answers"]
    lines = ["# Complex-IF data statistics", "", f"Parameters: `{json.dumps(st['params'], ensure_ascii=False)}`", "",
             f"- IOPO groups: {st['iopo_groups']} (edits {st['by_edit']}; languages {st['by_lang']}); "
             f"{st['sft_records']} SFT records, {st['dpo_pairs']} DPO pairs",
             f"- constraints per x1: {st['x1_constraints']}; per x2: {st['x2_constraints']}",
             f"- answers: {a['groups_offered_to_the_sampler']} groups offered to the sampler; y1 sampled "
             f"{a['y1_sampled']} ({100 * a['y1_sampled_share']:.1f}% of all groups, "
             f"{100 * a.get('y1_sampled_share_of_offered', 0):.1f}% of those offered), y2 sampled {a['y2_sampled']} "
             f"({100 * a['y2_sampled_share']:.1f}%, {100 * a.get('y2_sampled_share_of_offered', 0):.1f}%), "
             f"templated answers {100 * a['template_share']:.1f}%; "
             f"y2 fails x1 in {100 * a['y2_fails_x1_share']:.1f}% of groups",
             *candidates_lines(a.get("candidates") or {}),
             f"- mean words: prompt {st['mean_words']['x']}, answer {st['mean_words']['y']}; "
             f"{st['distinct_training_type_combinations']} distinct constraint-type combinations in training",
             "", "| constraint type | TRACE dimension | count |", "|---|---|---:|"]
    for t, c in st["constraint_types"].items():
        lines.append(f"| {t} | {TYPE_DIMENSION[t]} | {c} |")
    lines += ["", "| held-out set | n | categories | constraints | topics seen in training | "
              "multi combinations seen in training |", "|---|---:|---|---|---:|---:|"]
    for k in ("eval_dev", "eval_test"):
        e = st[k]
        lines.append(f"| {k} | {e['n']} | {e['by_category']} | {e['constraints']} | {e['topics_in_training']} | "
                     f"{e['multi_combinations_seen_in_training']} |")
    for k in ("sectioned_train", "sectioned_eval"):
        e = st[k]
        lines.append(f"| {k} | {e['n']} | sub-instructions {e['sub_instructions']} | {e['constraints']} | | |")
    lines += ["", "TRACE dimensions checked by rules: " + ", ".join(st["trace_dimensions_covered"]), "",
              "Not covered (why):", ""]
    lines += [f"- {k}: {v}" for k, v in st["trace_dimensions_not_covered"].items()]
    return "\n".join(lines) + "\n"


def write(data: dict, out: str) -> dict:
    paths = D.write(data, out, FILES)
    with open(os.path.join(out, "STATS.md"), "w", encoding="utf-8") as f:
        f.write(stats_markdown(data["stats"]))
    paths["stats_md"] = os.path.join(out, "STATS.md")
    return paths
