"""SegPO's advantages on one example: a group of rollouts of one sectioned prompt, their rewards and the
per-segment advantages, computed by the same functions the RL loop uses.

``explain(...)`` samples ``group`` answers to one held-out sectioned prompt from the model (plus an adapter,
e.g. the SegPO run's), splits each answer into its ``SUB_INSTRUCTION_k`` segments, scores every constraint
with the rule verifiers and returns, per rollout, the output-level reward ``r_o`` and advantage ``A_o`` and,
per segment ``j``, the segment reward ``r_phi`` (all of the segment's constraints pass), its advantage
``A_phi`` (normalised over the rollouts that have that segment) and the token count. A token of segment ``j``
of rollout ``i`` is trained with ``A_o(i) + A_phi(i, j)``; GRPO gives every token ``A_o(i)``.
:func:`markdown` renders it as the table of ``experiments/RESULTS.md``.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np


def sectioned_prompts(prompts_path: str, min_segments: int = 2) -> list:
    """The prompts of a test file with at least ``min_segments`` sub-instructions (RLPrompts), in file order."""
    from iopo_jax.rl.rewards import load_prompts  # pylint: disable=import-outside-toplevel

    out = [p for p in load_prompts([prompts_path], "auto") if sum(s.segment for s in p.slots) >= min_segments]
    if not out:
        raise ValueError(f"{prompts_path}: no prompt with {min_segments}+ sub-instructions")
    return out


def segment_term_acts(ex: dict) -> bool:
    """Whether SegPO's segment advantage is non-zero somewhere in the example (else its update is GRPO's)."""
    return any(s["A_phi"] for r in ex["rollouts"] for s in r["segments"])


def explain(sampler, prompt, *, group: int, max_new_tokens: int, template: str, system: Optional[str],
            temperature: float = 1.0, seed: int = 0) -> dict:
    """Sample ``group`` rollouts of ``prompt`` (an RLPrompt) with ``sampler`` (a
    :class:`~iopo_jax.sampling.Sampler`) and compute their rewards and SegPO advantages."""
    from iopo_jax.rl.advantages import segpo_advantages  # pylint: disable=import-outside-toplevel
    from iopo_jax.rl.rewards import RuleReward, compute_rewards  # pylint: disable=import-outside-toplevel
    from iopo_jax.rl.rollouts import encode_prompts, sample_groups, segment_rollouts  # pylint: disable=import-outside-toplevel
    from iopo_jax.sampling import SamplingParams  # pylint: disable=import-outside-toplevel

    ids = encode_prompts(sampler.tokenizer, [prompt.user], template, system)
    comps = sample_groups(sampler, ids, group, SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens),
                          seed)
    slots = len(prompt.slots)
    seg = segment_rollouts(sampler.tokenizer, [list(c.token_ids) for c in comps], [prompt.expected_ids] * group, slots)
    rows = [prompt] * group
    rew = compute_rewards(rows, RuleReward([prompt]).score(rows, seg.texts), seg.format_ok, num_slots=slots,
                          num_constraints=max(1, prompt.num_constraints))
    seg_valid = seg.found & rew["segment_slot"] & rew["slot_mask"]
    longest = max(1, max(len(t) for t in seg.token_segment))
    tok = np.full((group, longest), -1, np.int32)
    mask = np.zeros((group, longest), bool)
    for i, t in enumerate(seg.token_segment):
        tok[i, :len(t)], mask[i, :len(t)] = t, True
    adv = segpo_advantages(rew["r_o"][None], rew["r_phi"][None], seg_valid[None], tok[None], mask[None])
    a_o, a_phi = np.asarray(adv.output)[0], np.asarray(adv.segment)[0]
    keys = [s.key for s in prompt.slots]
    out = {"prompt_id": prompt.id, "prompt": prompt.user, "temperature": temperature,
           "seed": seed, "segments": [k for k, s in zip(keys, prompt.slots) if s.segment], "rollouts": []}
    for i in range(group):
        segs = []
        for j, s in enumerate(prompt.slots):
            if not s.segment:
                continue
            segs.append({"key": s.key, "found": bool(seg.found[i, j]), "tokens": int((tok[i] == j).sum()),
                         "r_phi": float(rew["r_phi"][i, j]), "A_phi": float(a_phi[i, j]) if seg_valid[i, j] else None,
                         "A": float(a_o[i] + (a_phi[i, j] if seg_valid[i, j] else 0.0))})
        out["rollouts"].append({"format": bool(seg.format_ok[i]), "ila": float(rew["ila"][i]),
                                "cla": float(rew["cla"][i]), "all_pass": float(rew["all_pass"][i]),
                                "r_o": float(rew["r_o"][i]), "A_o": float(a_o[i]),
                                "tokens_outside": int(((tok[i] < 0) & mask[i]).sum()), "segments": segs,
                                "text": seg.texts[i]})
    return out


def explain_first_acting(sampler, prompts: list, *, group: int, tries: int = 8, **kw) -> dict:
    """:func:`explain` on the first of ``prompts`` (at most ``tries``, in order) on which the segment term acts,
    else on the first; ``passed_over`` lists the ids of the other prompts tried."""
    tried = []
    for prompt in prompts[:max(1, tries)]:
        tried.append(explain(sampler, prompt, group=group, **kw))
        if segment_term_acts(tried[-1]):
            break
    ex = tried[-1] if segment_term_acts(tried[-1]) else tried[0]
    return dict(ex, passed_over=[t["prompt_id"] for t in tried if t is not ex])


def explain_cached(path: str, model_dir: str, adapter: str, prompts: list, *, group: int, tries: int = 8,
                   **kw) -> dict:
    """:func:`explain` with the model of ``model_dir`` plus ``adapter`` on the first of ``prompts`` (trying at
    most ``tries`` in order) whose rollouts make the segment term act (some rollouts pass a section, others fail
    it), else on the first; the ids of the prompts passed over are kept under ``passed_over``. Once per output
    file (reruns of the runner reuse it)."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    from iopo_jax.sampling import Sampler  # pylint: disable=import-outside-toplevel

    sampler = Sampler.from_pretrained(model_dir, lora=adapter or None, max_batch_size=group)
    ex = dict(explain_first_acting(sampler, prompts, group=group, tries=tries, **kw), model_dir=model_dir,
              adapter=adapter)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(ex, f, indent=1, ensure_ascii=False)
    os.replace(path + ".tmp", path)
    return ex


def markdown(ex: dict) -> str:
    """The example as a table: one line per rollout, ``r_phi / A_phi`` per segment (``-``: segment missing)."""
    def f(x):
        return "-" if x is None else f"{x:+.2f}"

    keys = ex["segments"]
    head = "| rollout | format | ILA | CLA | all pass | r_o | A_o (GRPO: every token) | " + " | ".join(
        f"{k}: r_phi / A_phi -> A (tokens)" for k in keys) + " |"
    lines = [head, "|" + "---|" * (7 + len(keys))]
    for i, r in enumerate(ex["rollouts"]):
        cells = [f"{s['r_phi']:.0f} / {f(s['A_phi'])} -> {f(s['A'])} ({s['tokens']})" if s["found"] else
                 f"missing -> {f(r['A_o'])} (0)" for s in r["segments"]]
        lines.append(f"| {i} | {'yes' if r['format'] else 'no'} | {r['ila']:.2f} | {r['cla']:.2f} | "
                     f"{r['all_pass']:.0f} | {r['r_o']:.2f} | {f(r['A_o'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
