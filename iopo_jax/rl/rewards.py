"""RL prompts, reward models and verdict-based rewards for GRPO / SegPO (docs/rl.md, docs/metrics.md).

A prompt (:class:`RLPrompt`) has *slots* ``j``: one per sub-instruction answered under its own
``SUB_INSTRUCTION_k`` heading (``segment=True``), then, when the record also has constraints on the
whole answer, one last slot for them (``segment=False``). Each slot has constraints ``k``. A reward model
gives, for every rollout, the verdicts ``S_jk`` (pass / fail); :func:`compute_rewards` turns them into
``ILA``, ``CLA``, the all-pass indicator, the format reward and ``r_o``, and per slot ``r_phi = prod_k S_jk``
(with :func:`iopo_jax.rl.advantages.rewards_from_verdicts`).

Reward models (``rl.reward``):

* ``rules`` (:class:`RuleReward`): the rule verifiers of :mod:`data_pipeline.verifiers`; each segment slot
  is checked on the body of its section (the text under its heading, heading removed), the whole-answer
  slot on the whole answer. Needs records with constraint specs (the ``demo_eval`` format).
* ``judge`` (:class:`JudgeReward`): an LLM judge over the OpenAI-compatible client of
  :mod:`iopo_jax.chat_client`, one yes/no call per (rollout, slot, constraint) with the EIFBench protocol (the
  judge sees the task input, the whole answer, ``"{key}:{instruction}"`` and the one constraint), calls
  concurrent, identical requests sent once, every reply cached in a JSONL store keyed like the
  evaluation's (sha256 of model, messages, sampling params, attempt) so a rerun or a resume re-sends
  nothing. A reply without an exact ``答案：是|答案：否`` line is asked again (``attempt`` 1, 2, ...), then
  parsed with the protocol's fallback rule; an empty reply counts as unparseable. A verdict that cannot be had
  (retries exhausted, budget spent, still unparseable) follows ``rl.judge.on_error``: ``skip`` (default:
  the rollout is left out of its group's statistics and of the loss), ``zero`` (counted as "no") or
  ``fail`` (stop the run; rerunning resumes from the last checkpoint with the cache).
* ``python`` (:class:`PythonReward`): ``rl.reward_fn = "package.module:function"`` (or
  ``"path/to/file.py:function"``) called as ``fn(prompt: RLPrompt, response: str)``. It returns either
  verdicts (one list of bools per slot, one bool per constraint), or a number (used as ``r_o`` itself;
  ``r_phi`` is then 0), or a dict with any of ``verdicts``, ``r_o`` (overrides the computed r_o) and
  ``r_phi`` (one number per slot). :func:`section_bodies` gives the per-slot answer texts.

Format reward (``rl.format_reward``): ``headings`` = 1 when the answer has exactly one heading per
sub-instruction, in order (:mod:`iopo_jax.rl.segments`), and 1 for prompts without sub-instructions;
``none`` = 0.

Prompt files (``load_prompts``): ``demo_eval`` records (the bundled demo format: ``prompt`` is the user
message, ``sub_instructions[j]`` with ``key`` ``SUB_INSTRUCTION_{j+1}``, rule ``constraints`` and their
``constraints_text``) or ``eifbench`` records (``input`` + ``sub_instructions.{sub_instruction_k}`` with
``instruction`` and ``scoring_questions``; the user message is the EIFBench answer prompt of
:mod:`iopo_jax.chat_client`, or a template file with the field ``{input_text}``).

Example::

    prompts = load_prompts(["data_pipeline/demo_data/eval_prompts.jsonl"])
    reward = RuleReward(prompts)
    out = reward.score([prompts[0]], ["SUB_INSTRUCTION_1:\\n..."])
    r = compute_rewards([prompts[0]], out, format_ok=np.array([1]), num_slots=4, num_constraints=4)
    r["r_o"], r["r_phi"]
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import importlib.util
import logging
import os
import re
from typing import Callable, Optional, Sequence

import numpy as np

from data_pipeline.hashing import sha256_hex
from data_pipeline.protocols import eifbench as eif_protocol
from data_pipeline.readers import detect_kind_of_paths, iter_raw, load_records
from data_pipeline.verifiers import verify_constraints
from iopo_jax import chat_client
from iopo_jax.rl.advantages import RewardWeights, rewards_from_verdicts
from iopo_jax.rl.segments import expected_ids_from_keys, segment_text

log = logging.getLogger("iopo_jax.rl")

PROMPT_KINDS = ("demo_eval", "eifbench")
ON_ERROR = ("skip", "zero", "fail")
WHOLE_TASK = "(the whole task: every part of the answer)"


# ------------------------------------------------------------------------------------------------
# prompts


@dataclasses.dataclass
class Slot:
    """One unit of verdicts: a sub-instruction (its own answer section) or the whole answer."""

    key: str  # heading key as in the prompt ("SUB_INSTRUCTION_1", "sub_instruction_0"); "" = whole answer
    instruction: str
    constraints: list[str]  # constraint texts (the judge's questions)
    specs: Optional[list[dict]]  # rule specs (data_pipeline.verifiers), None when not rule-checkable
    segment: bool  # answered under its own SUB_INSTRUCTION_k heading


@dataclasses.dataclass
class RLPrompt:
    id: str  # "file:line" / "file[index]" plus the record's id
    user: str  # the user message given to the policy
    input: str  # the task input shown to the judge
    slots: list[Slot]
    record: dict  # the validated record as read

    @property
    def expected_ids(self) -> list[int]:
        """Heading numbers of the segment slots, in order (slot j of a segment = position j here)."""
        return expected_ids_from_keys([s.key for s in self.slots if s.segment])

    @property
    def num_constraints(self) -> int:
        return max((len(s.constraints) for s in self.slots), default=0)


def _detect_kind(paths: Sequence[str]) -> str:
    kind = detect_kind_of_paths(paths)
    if kind not in PROMPT_KINDS:
        raise ValueError(f"{', '.join(paths)}: records look like {kind!r}; RL prompts must be "
                         f"{' or '.join(PROMPT_KINDS)} records (set rl.prompts_kind to force one)")
    return kind


def _key_number(key: str) -> float:
    m = re.search(r"\d+", key)
    return int(m.group()) if m else float("inf")


def load_prompts(paths: Sequence[str], kind: str = "auto", *, categories: Sequence[str] = (),
                 answer_template: str = eif_protocol.EIF_ANSWER_TEMPLATE,
                 answer_template_name: str = "<default EIFBench answer template>") -> list[RLPrompt]:
    """Read and validate RL prompt records (see the module docstring); errors name file, line and field.

    ``categories``: keep only records whose ``category`` field is one of these (empty = all).
    """
    paths = list(paths)
    if not paths:
        raise ValueError("no prompt files given (rl.prompts_files)")
    kind = _detect_kind(paths) if kind == "auto" else kind
    if kind not in PROMPT_KINDS:
        raise ValueError(f"prompts kind {kind!r} must be one of {PROMPT_KINDS} or 'auto'")
    records, _ = load_records(kind, paths)
    where = [f"{os.path.basename(r.path)}:{r.line}" if r.line is not None else f"{os.path.basename(r.path)}[{r.index}]"
             for r in iter_raw(paths)]
    out = []
    for loc, rec in zip(where, records):
        if categories and str(rec.get("category", "")) not in categories:
            continue
        if kind == "demo_eval":
            slots = [Slot(s["key"], s["instruction"], list(s["constraints_text"]), list(s["constraints"]), True)
                     for s in rec.get("sub_instructions") or []]
            if rec.get("constraints"):
                slots.append(Slot("", WHOLE_TASK, list(rec["constraints_text"]), list(rec["constraints"]), False))
            out.append(RLPrompt(f"{loc} ({rec['id']})", rec["prompt"], rec["prompt"], slots, rec))
        else:
            subs = rec["sub_instructions"]
            keys = sorted(subs, key=_key_number)
            slots = [Slot(k, str(subs[k]["instruction"]), list(subs[k]["scoring_questions"]), None, True) for k in keys]
            blocks = [eif_protocol.format_sub_instruction(s.key, s.instruction, s.constraints) for s in slots]
            text = eif_protocol.eif_input_text(str(rec["input"] or ""), blocks)
            user = eif_protocol.render_template(answer_template, answer_template_name, input_text=text)
            out.append(RLPrompt(f"{loc} ({rec['main_id']})", user, str(rec["input"] or ""), slots, rec))
    if not out:
        cats = f" with category in {list(categories)}" if categories else ""
        raise ValueError(f"{', '.join(paths)}: no prompt left{cats}")
    return out


def section_bodies(prompt: RLPrompt, text: str) -> list[Optional[str]]:
    """Answer text of each slot: the body of the first section under the slot's heading (heading removed,
    stripped; None when the heading is absent), and the whole text for the whole-answer slot."""
    ids = prompt.expected_ids
    spans, _, _, heads = segment_text(text, ids)
    bodies: dict[int, str] = {}
    for (j, _, end), h in zip(spans, heads):
        if j >= 0 and j not in bodies:
            bodies[j] = text[h.end:end].strip()
    out, j = [], 0
    for s in prompt.slots:
        if s.segment:
            out.append(bodies.get(j))
            j += 1
        else:
            out.append(text)
    return out


# ------------------------------------------------------------------------------------------------
# reward models


@dataclasses.dataclass
class RolloutVerdicts:
    """What a reward model says about one rollout."""

    verdicts: Optional[list[list[bool]]]  # [slot][constraint]; None when the model gives r_o directly
    r_o: Optional[float] = None  # overrides the r_o computed from the verdicts
    r_phi: Optional[list[float]] = None  # overrides r_phi (one per slot)
    valid: bool = True  # False: no reward could be had (left out of the update)


class RewardModel:
    """Interface: ``score(prompts, texts) -> [RolloutVerdicts]`` (one prompt per text); ``stats()``
    returns counters for the logs (cumulative); ``close()`` releases resources."""

    name = "reward"

    def score(self, prompts: Sequence[RLPrompt], texts: Sequence[str]) -> list[RolloutVerdicts]:
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


class RuleReward(RewardModel):
    """Rule verifiers of the demo set (``data_pipeline.verifiers``)."""

    name = "rules"

    def __init__(self, prompts: Sequence[RLPrompt]):
        for p in prompts:
            for j, s in enumerate(p.slots):
                if s.specs is None:
                    raise ValueError(f"{p.id}: slot {j} ({s.key or 'whole answer'}) has no rule constraint specs; "
                                     "rl.reward='rules' needs demo_eval records (use 'judge' or 'python')")

    def score(self, prompts, texts):
        out = []
        for p, text in zip(prompts, texts):
            bodies = section_bodies(p, text)
            out.append(RolloutVerdicts([verify_constraints(s.specs, b) if b else [False] * len(s.specs)
                                        for s, b in zip(p.slots, bodies)]))
        return out


def load_function(spec: str) -> Callable:
    """``"package.module:function"`` or ``"path/to/file.py:function"`` -> the function."""
    if ":" not in spec:
        raise ValueError(f"rl.reward_fn={spec!r}: write it as 'package.module:function' or 'file.py:function'")
    mod_name, fn_name = spec.rsplit(":", 1)
    if mod_name.endswith(".py"):
        if not os.path.isfile(mod_name):
            raise ValueError(f"rl.reward_fn={spec!r}: file {mod_name} not found")
        mspec = importlib.util.spec_from_file_location(f"_iopo_reward_{abs(hash(mod_name))}", mod_name)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"rl.reward_fn={spec!r}: cannot import {mod_name} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"rl.reward_fn={spec!r}: {mod_name} has no function {fn_name!r}")
    return fn


class PythonReward(RewardModel):
    """A user function (see the module docstring for what it may return)."""

    name = "python"

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = load_function(spec)

    def _check_verdicts(self, p: RLPrompt, v) -> list[list[bool]]:
        where = f"rl.reward_fn {self.spec} on {p.id}"
        if not isinstance(v, (list, tuple)) or len(v) != len(p.slots):
            raise ValueError(f"{where}: verdicts must be {len(p.slots)} lists (one per slot), got {v!r:.200}")
        out = []
        for j, (s, vs) in enumerate(zip(p.slots, v)):
            if not isinstance(vs, (list, tuple)) or len(vs) != len(s.constraints):
                raise ValueError(f"{where}: verdicts[{j}] must hold {len(s.constraints)} values, got {vs!r:.200}")
            out.append([bool(x) for x in vs])
        return out

    def score(self, prompts, texts):
        out = []
        for p, text in zip(prompts, texts):
            r = self.fn(p, text)
            where = f"rl.reward_fn {self.spec} on {p.id}"
            if isinstance(r, (bool, int, float, np.number)):
                out.append(RolloutVerdicts(None, r_o=float(r)))
            elif isinstance(r, dict):
                unknown = set(r) - {"verdicts", "r_o", "r_phi"}
                if unknown:
                    raise ValueError(f"{where}: unknown keys {sorted(unknown)} (allowed: verdicts, r_o, r_phi)")
                v = self._check_verdicts(p, r["verdicts"]) if r.get("verdicts") is not None else None
                if v is None and r.get("r_o") is None:
                    raise ValueError(f"{where}: the dict needs 'verdicts' or 'r_o'")
                phi = r.get("r_phi")
                if phi is not None and (not isinstance(phi, (list, tuple)) or len(phi) != len(p.slots)):
                    raise ValueError(f"{where}: r_phi must hold {len(p.slots)} numbers (one per slot)")
                out.append(RolloutVerdicts(v, None if r.get("r_o") is None else float(r["r_o"]),
                                           None if phi is None else [float(x) for x in phi]))
            else:
                out.append(RolloutVerdicts(self._check_verdicts(p, r)))
        return out


@dataclasses.dataclass
class JudgeSettings:
    """How the judge reward asks (the client's own settings are a :class:`iopo_jax.chat_client.ClientConfig`)."""

    template: str = eif_protocol.YES_NO_JUDGE_TEMPLATE
    template_name: str = "<default yes/no judge template>"
    system_prompt: str = eif_protocol.EIF_SYSTEM_PROMPT
    max_parse_retries: int = 2
    on_error: str = "skip"


class JudgeReward(RewardModel):
    """One yes/no judge call per (rollout, slot, constraint); see the module docstring."""

    name = "judge"

    def __init__(self, client: chat_client.ChatClient, settings: JudgeSettings = JudgeSettings()):
        if settings.on_error not in ON_ERROR:
            raise ValueError(f"rl.judge.on_error={settings.on_error!r} must be one of {ON_ERROR}")
        self.client = client
        self.s = settings
        self.counts = {"judge/calls": 0, "judge/unparseable": 0, "judge/errors": 0, "judge/fallback_verdicts": 0,
                       "judge/skipped_rollouts": 0}

    def messages(self, p: RLPrompt, slot: Slot, question: str, text: str) -> list[dict]:
        sub = f"{slot.key}:{slot.instruction}" if slot.key else slot.instruction
        user = eif_protocol.render_template(self.s.template, self.s.template_name, input=p.input, output=text,
                                         sub_instruction=sub, question=question)
        return ([{"role": "system", "content": self.s.system_prompt}] if self.s.system_prompt else []) + \
            [{"role": "user", "content": user}]

    def _ask(self, messages) -> tuple[Optional[bool], str]:
        """(verdict or None, status): replies without an exact ``答案：是|否`` line are asked again; when
        every attempt lacks one, the last fallback verdict is used (or None if every reply was empty)."""
        last = None
        try:
            for attempt in range(self.s.max_parse_retries + 1):
                parsed = eif_protocol.parse_yes_no(self.client.complete(messages, attempt=attempt).text)
                if parsed is not None and parsed[1] == "exact":
                    return parsed
                last = parsed or last
            return last if last is not None else (None, "unparseable")
        except chat_client.ChatError as e:
            return None, f"error: {e}"

    def score(self, prompts, texts):
        units: dict[str, list] = {}  # request key -> messages
        where: list[list[list[str]]] = []
        for p, text in zip(prompts, texts):
            rows = []
            for s in p.slots:
                keys = []
                for q in s.constraints:
                    msgs = self.messages(p, s, q, text)
                    k = self.client.key(msgs)
                    units.setdefault(k, msgs)
                    keys.append(k)
                rows.append(keys)
            where.append(rows)
        results: dict[str, tuple[Optional[bool], str]] = {}
        workers = max(1, int(self.client.config.concurrency))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as ex:
            futs = {ex.submit(self._ask, m): k for k, m in units.items()}
            try:
                for f in concurrent.futures.as_completed(futs):
                    results[futs[f]] = f.result()
            except BaseException:
                self.client.abort()  # Ctrl-C: pending requests fail at once
                raise
        self.counts["judge/calls"] += len(units)
        failures = []
        for k, (v, status) in results.items():
            if v is None:
                self.counts["judge/unparseable" if status == "unparseable" else "judge/errors"] += 1
                failures.append(status)
            elif status == "fallback":
                self.counts["judge/fallback_verdicts"] += 1
        if failures and self.s.on_error == "fail":
            raise RuntimeError(f"judge reward: {len(failures)} of {len(units)} verdicts could not be had (first: "
                               f"{failures[0]}); rerun the same command to resume (answered requests are cached), "
                               "or set rl.judge.on_error to 'skip' or 'zero'")
        out = []
        for rows in where:
            ok = all(results[k][0] is not None for keys in rows for k in keys)
            if not ok and self.s.on_error == "skip":
                self.counts["judge/skipped_rollouts"] += 1
                out.append(RolloutVerdicts([[False] * len(keys) for keys in rows], valid=False))
                continue
            out.append(RolloutVerdicts([[bool(results[k][0]) for k in keys] for keys in rows]))
        return out

    def stats(self):
        u = self.client.usage()
        out = dict(self.counts)
        out.update({"judge/requests_sent": u["requests_sent"], "judge/retries": u["retries"],
                    "judge/cache_hits": u["cache_hits"], "judge/failures": u["failures"]})
        return {k: float(v) for k, v in out.items()}

    def close(self):
        self.client.close()


def judge_cache_path(workdir: str) -> str:
    """The judge response store: ``workdir/judge_cache.jsonl``; for an object-store workdir (no append,
    and the store is appended and fsynced per response) a local file named after the workdir under
    ``~/.cache/iopo_jax/judge_cache/``."""
    if "://" not in str(workdir):
        return os.path.join(workdir, "judge_cache.jsonl")
    key = sha256_hex(str(workdir))[:16]
    return os.path.join(os.path.expanduser("~/.cache/iopo_jax/judge_cache"), f"{key}.jsonl")


JUDGE_SETTINGS = ("template", "system_prompt", "max_parse_retries", "on_error")  # of JudgeSettings, not the client


def make_reward(rl, prompts: Sequence[RLPrompt], workdir: str) -> RewardModel:
    """The reward model named by ``rl.reward`` (config section ``rl`` of configs/rl_base.py)."""
    if rl.reward == "rules":
        return RuleReward(prompts)
    if rl.reward == "python":
        if not rl.reward_fn:
            raise ValueError("config.rl.reward='python' needs config.rl.reward_fn='package.module:function'")
        return PythonReward(rl.reward_fn)
    if rl.reward == "judge":
        j = rl.judge
        template, name = eif_protocol.YES_NO_JUDGE_TEMPLATE, "<default yes/no judge template>"
        if j.template:
            with open(j.template, encoding="utf-8") as f:
                template, name = f.read(), j.template
            eif_protocol.render_template(template, name, input="", output="", sub_instruction="", question="")
        client = chat_client.ChatClient(chat_client.ClientConfig.from_mapping(
            j, section="config.rl.judge", ignore=JUDGE_SETTINGS + ("cache_path",),
            store_path=j.cache_path or judge_cache_path(workdir), name="judge reward"))
        return JudgeReward(client, JudgeSettings(template, name, j.system_prompt, j.max_parse_retries, j.on_error))
    raise ValueError(f"config.rl.reward={rl.reward!r} must be 'rules', 'judge' or 'python'")


# ------------------------------------------------------------------------------------------------
# verdicts -> rewards


def compute_rewards(prompts: Sequence[RLPrompt], verdicts: Sequence[RolloutVerdicts], format_ok, *, num_slots: int,
                    num_constraints: int, weights: RewardWeights = RewardWeights(),
                    format_mode: str = "headings") -> dict[str, np.ndarray]:
    """Rewards of N rollouts (``prompts[i]`` is rollout i's prompt) as numpy arrays.

    Returns ``r_o``, ``ila``, ``cla``, ``all_pass``, ``format`` ``[N]`` (``ila``/``cla``/``all_pass`` are NaN
    for rollouts scored by a number), ``r_phi`` ``[N, num_slots]``, ``slot_mask`` ``[N, num_slots]`` (the slot
    exists), ``segment_slot`` ``[N, num_slots]`` (the slot is a segment) and ``valid`` ``[N]``.
    """
    n = len(prompts)
    if len(verdicts) != n:
        raise ValueError(f"{len(verdicts)} verdicts for {n} rollouts")
    if format_mode not in ("headings", "none"):
        raise ValueError(f"format reward {format_mode!r} must be 'headings' or 'none'")
    s = np.zeros((n, num_slots, num_constraints), bool)
    cmask = np.zeros_like(s)
    smask = np.zeros((n, num_slots), bool)
    seg = np.zeros((n, num_slots), bool)
    for i, (p, v) in enumerate(zip(prompts, verdicts)):
        if len(p.slots) > num_slots or p.num_constraints > num_constraints:
            raise ValueError(f"{p.id}: {len(p.slots)} slots / {p.num_constraints} constraints exceed the "
                             f"padded shape ({num_slots}, {num_constraints})")
        for j, slot in enumerate(p.slots):
            smask[i, j] = True
            seg[i, j] = slot.segment
            cmask[i, j, :len(slot.constraints)] = True
            if v.verdicts is not None:
                s[i, j, :len(slot.constraints)] = v.verdicts[j]
    fmt = np.asarray(format_ok, np.float32).reshape(n)
    has_segments = np.array([any(sl.segment for sl in p.slots) for p in prompts], bool)
    fmt = np.where(has_segments, fmt, 1.0) if format_mode == "headings" else np.zeros(n, np.float32)
    out = {k: np.asarray(x) for k, x in rewards_from_verdicts(s, cmask, smask, fmt, weights=weights).items()}
    scored = np.array([v.verdicts is not None for v in verdicts], bool)
    for k in ("ila", "cla", "all_pass"):
        out[k] = np.where(scored, out[k], np.nan).astype(np.float32)
    r_o, r_phi = out["r_o"].astype(np.float32).copy(), out["r_phi"].astype(np.float32).copy()
    for i, v in enumerate(verdicts):
        if v.r_o is not None:
            r_o[i] = v.r_o
        if v.r_phi is not None:
            r_phi[i] = 0.0
            r_phi[i, :len(v.r_phi)] = v.r_phi
        elif v.verdicts is None:
            r_phi[i] = 0.0
    out.update(r_o=r_o, r_phi=np.where(smask, r_phi, 0.0).astype(np.float32), slot_mask=smask, segment_slot=seg,
               valid=np.array([v.valid for v in verdicts], bool), format=fmt.astype(np.float32))
    return out


def reward_metrics(r: dict[str, np.ndarray]) -> dict[str, float]:
    """Means over the valid rollouts (``r_phi`` over existing slots) for the logs."""
    v = r["valid"]
    if not v.any():
        return {"rollout/valid_fraction": 0.0}

    def mean(x):
        x = np.asarray(x, np.float64)[v]
        x = x[np.isfinite(x)]
        return float(x.mean()) if x.size else float("nan")

    phi = r["r_phi"][v][r["slot_mask"][v]]
    return {"rollout/r_o": mean(r["r_o"]), "rollout/r_phi": float(phi.mean()) if phi.size else float("nan"),
            "rollout/ila": mean(r["ila"]), "rollout/cla": mean(r["cla"]), "rollout/all_pass": mean(r["all_pass"]),
            "rollout/format": mean(r["format"]), "rollout/valid_fraction": float(v.mean())}

