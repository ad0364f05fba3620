"""RL prompts and reward models: rule verdicts vs data_pipeline.verify_record, user functions, the judge
reward against the fake judge (dedupe, cache, faults, error policies). No model, fast."""
import json
import sys

import numpy as np
import pytest

from data_pipeline.protocols import eifbench as eif_protocol
from iopo_jax import chat_client
from iopo_jax.rl.rewards import (JudgeReward, JudgeSettings, PythonReward, RolloutVerdicts, RuleReward,
                                 compute_rewards, load_prompts, reward_metrics, section_bodies)
from tests.fake_judge import FakeJudge

from conftest import DEMO_DIR

EVAL = str(DEMO_DIR / "eval_prompts.jsonl")


@pytest.fixture(scope="module")
def demo_prompts():
    return load_prompts([EVAL])


def _rewards(prompts, verdicts, texts):
    from iopo_jax.rl.segments import segment_text

    fmt = [segment_text(t, p.expected_ids)[1] for p, t in zip(prompts, texts)]
    return compute_rewards(prompts, verdicts, np.array(fmt), num_slots=4, num_constraints=6)


def test_prompt_slots(demo_prompts):
    recs = [json.loads(line) for line in open(EVAL, encoding="utf-8")]
    assert len(demo_prompts) == len(recs)
    for p, rec in zip(demo_prompts, recs):
        subs = rec["sub_instructions"]
        assert [s.key for s in p.slots if s.segment] == [s["key"] for s in subs]
        assert p.expected_ids == list(range(1, len(subs) + 1))
        assert (not p.slots[-1].segment) == bool(rec["constraints"])
        assert p.user == rec["prompt"] and p.id.startswith("eval_prompts.jsonl:")
    seg = load_prompts([EVAL], categories=["segpo"])
    assert 0 < len(seg) < len(demo_prompts) and all(p.record["category"] == "segpo" for p in seg)
    with pytest.raises(ValueError, match="no prompt left"):
        load_prompts([EVAL], categories=["nope"])


def test_eifbench_prompts(shared_data):
    ps = load_prompts([str(shared_data / "eifbench" / "sorted_party100.json")])
    assert len(ps) == 100
    p = ps[0]
    assert p.user.startswith(eif_protocol.EIF_ANSWER_TEMPLATE.split("{")[0])
    assert "Instruction:\n" in p.user and all(f"{s.key}:\n{s.instruction}\nconstraints:\n" in p.user for s in p.slots)
    assert all(s.segment and s.specs is None and s.constraints for s in p.slots)
    nums = [int(s.key.rsplit("_", 1)[1]) for s in p.slots]
    assert nums == sorted(nums) and p.expected_ids == nums
    with pytest.raises(ValueError, match="no rule constraint specs"):
        RuleReward(ps[:1])


def _variants(ref: str) -> list[str]:
    """The reference answer and damaged versions of it (a section dropped, sections swapped, bold headings)."""
    parts = ref.split("\n\nSUB_INSTRUCTION_")
    out = [ref, parts[0], "**" + ref.replace(":\n", "**:\n", 1)]
    if len(parts) > 1:
        out.append("SUB_INSTRUCTION_" + parts[1] + "\n\n" + parts[0])
        out.append(ref.replace("SUB_INSTRUCTION_2:", "SUB_INSTRUCTION_2: oops", 1))
    return out


def test_rule_reward_matches_verify_record(demo_prompts):
    """ILA / CLA / all-pass / format from the rule reward equal data_pipeline.verifiers.verify_record."""
    from data_pipeline.verifiers import verify_record

    rule = RuleReward(demo_prompts)
    checked = 0
    for p in demo_prompts:
        if not p.record["sub_instructions"]:
            continue
        texts = _variants(p.record["reference"])
        r = _rewards([p] * len(texts), rule.score([p] * len(texts), texts), texts)
        for i, t in enumerate(texts):
            want = verify_record(p.record, t)
            assert r["ila"][i] == pytest.approx(want["ila"]), (p.id, t)
            assert r["cla"][i] == pytest.approx(want["cla"]), (p.id, t)
            assert bool(r["all_pass"][i]) == (all(all(v) for v in want["sub_instructions"])), (p.id, t)
            phi = [float(all(v)) for v in want["sub_instructions"]]
            np.testing.assert_array_equal(r["r_phi"][i, :len(phi)], phi)
            checked += 1
        # the reference passes everything: r_o = ILA + CLA + all_pass + format = 4
        assert r["r_o"][0] == pytest.approx(4.0) and r["format"][0] == 1.0
        assert r["format"][1] == 0.0 and r["format"][3] == 0.0  # a section missing / out of order
    assert checked > 50


def test_whole_answer_slot_and_metrics(demo_prompts):
    p = next(p for p in demo_prompts if not p.record["sub_instructions"])
    ref = p.record["reference"]
    r = _rewards([p, p], RuleReward([p]).score([p, p], [ref, ""]), [ref, ""])
    n = len(p.record["constraints"])
    assert r["cla"][0] == 1.0 and r["cla"][1] == 0.0 and r["format"].tolist() == [1.0, 1.0]  # no headings asked
    assert r["r_o"].tolist() == pytest.approx([4.0, 1.0])
    assert r["slot_mask"][0].sum() == 1 and not r["segment_slot"][0].any()
    m = reward_metrics(r)
    assert m["rollout/r_o"] == pytest.approx(2.5) and m["rollout/cla"] == pytest.approx(0.5) and n >= 1
    assert section_bodies(p, "anything") == ["anything"]


def test_section_bodies_variants(demo_prompts):
    p = next(p for p in demo_prompts if len(p.expected_ids) == 2)
    text = "intro\n**Sub-Instruction 2**：second\n\nSUB_INSTRUCTION_1:\nfirst\nSUB_INSTRUCTION_2: again"
    assert section_bodies(p, text) == ["first", "second"]
    assert section_bodies(p, "no headings") == [None, None]


# ------------------------------------------------------------------------------------------------ python
def _reward_fn(prompt, response):
    if response == "number":
        return 2.5
    if response == "dict":
        return {"r_o": 1.0, "r_phi": [0.5] * len(prompt.slots)}
    if response == "bad":
        return [[True]]
    return [[len(response) > 3] * len(s.constraints) for s in prompt.slots]


def test_python_reward(demo_prompts):
    p = next(p for p in demo_prompts if len(p.slots) == 2)
    fn = PythonReward(f"{__name__}:_reward_fn")
    texts = ["long answer", "no", "number", "dict"]
    out = fn.score([p] * 4, texts)
    r = compute_rewards([p] * 4, out, np.zeros(4), num_slots=3, num_constraints=5)
    assert r["cla"][0] == 1.0 and r["cla"][1] == 0.0 and np.isnan(r["cla"][2])
    assert r["r_o"][0] == pytest.approx(3.0)  # ILA 1 + CLA 1 + all 1 + format 0
    assert r["r_o"][2] == 2.5 and r["r_phi"][2].tolist() == [0, 0, 0]
    assert r["r_o"][3] == 1.0 and r["r_phi"][3].tolist() == [0.5, 0.5, 0.0]
    with pytest.raises(ValueError, match=r"_reward_fn on .*verdicts must be 2 lists"):
        fn.score([p], ["bad"])
    with pytest.raises(ValueError, match="has no function"):
        PythonReward(f"{__name__}:missing")
    with pytest.raises(ValueError, match="module:function"):
        PythonReward("no_colon")
    assert sys.modules[__name__]._reward_fn is fn.fn


# ------------------------------------------------------------------------------------------------ judge
def _yes_if_words(body):
    """Yes when the constraint (the [Constraint] block) mentions 'word' or '个'; an analysis first."""
    text = body["messages"][-1]["content"]
    q = text.rsplit("[Constraint]", 1)[1]
    return "analysis...\n" + ("答案：是" if ("word" in q or "个" in q) else "答案：否")


def _client(fj, tmp_path, **kw):
    cfg = dict(base_url=fj.base_url, model="judge-m", timeout_s=0.5, backoff_base_s=0.01, backoff_max_s=0.05,
               max_retries=4, concurrency=8, store_path=str(tmp_path / "judge_cache.jsonl"))
    cfg.update(kw)
    return chat_client.ChatClient(chat_client.ClientConfig(**cfg))


def test_judge_reward_verdicts_dedupe_cache_faults(demo_prompts, tmp_path):
    ps = [p for p in demo_prompts if p.record["sub_instructions"]][:2]
    rollouts = [ps[0], ps[0], ps[0], ps[1]]
    texts = ["same answer", "same answer", "other", "x"]  # rollouts 0 and 1 are identical: asked once
    n_unique = sum(len(s.constraints) for s in ps[0].slots) * 2 + sum(len(s.constraints) for s in ps[1].slots)
    faults = {1: "429", 2: "500", 3: "drop", 5: "garbage", 8: "bad_json"}
    with FakeJudge(reply_fn=_yes_if_words, faults=faults, retry_after_s=0.01) as fj:
        jr = JudgeReward(_client(fj, tmp_path))
        out = jr.score(rollouts, texts)
        st = jr.stats()
        jr.close()
        bodies = [r.body for r in fj.successes()]
    want = [[("word" in q or "个" in q) for q in s.constraints] for s in ps[0].slots]
    assert out[0].verdicts == want and out[1].verdicts == want and all(o.valid for o in out)
    assert st["judge/calls"] == n_unique and st["judge/retries"] >= 3 and st["judge/errors"] == 0
    # every (answer, sub-instruction, constraint) was asked with the protocol fields, once
    prompts = [b["messages"][-1]["content"] for b in bodies]
    assert len(set(prompts)) == n_unique
    s0 = ps[0].slots[0]
    assert any(f"[Sub-task]\n{s0.key}:{s0.instruction}" in t and "[Model answer]\nother" in t for t in prompts)
    assert bodies[0]["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    # a new reward model on the same cache sends nothing
    with FakeJudge(reply_fn=_yes_if_words) as fj2:
        jr2 = JudgeReward(_client(fj2, tmp_path, base_url=fj2.base_url))
        out2 = jr2.score(rollouts, texts)
        jr2.close()
        assert fj2.count() == 0
    assert [o.verdicts for o in out2] == [o.verdicts for o in out]


@pytest.mark.parametrize("policy", ["skip", "zero", "fail"])
def test_judge_reward_error_policies(demo_prompts, tmp_path, policy):
    p = next(p for p in demo_prompts if p.record["sub_instructions"])
    bad = p.slots[0].constraints[0]

    def reply(body):  # no verdict ever for one constraint (unparseable even when asked again)
        return "" if body["messages"][-1]["content"].rstrip().endswith(bad) else "答案：是"

    with FakeJudge(reply_fn=reply) as fj:
        jr = JudgeReward(_client(fj, tmp_path), JudgeSettings(on_error=policy, max_parse_retries=1))
        if policy == "fail":
            with pytest.raises(RuntimeError, match="could not be had"):
                jr.score([p, p], ["a", "b"])
            return
        out = jr.score([p, p], ["a", "b"])
        st = jr.stats()
        jr.close()
    assert st["judge/unparseable"] == 2
    if policy == "skip":
        assert [o.valid for o in out] == [False, False] and st["judge/skipped_rollouts"] == 2
        r = compute_rewards([p, p], out, np.ones(2), num_slots=4, num_constraints=6)
        assert reward_metrics(r) == {"rollout/valid_fraction": 0.0}
    else:
        assert all(o.valid for o in out) and out[0].verdicts[0][0] is False and out[0].verdicts[-1][-1] is True


def test_verdict_parser():
    assert eif_protocol.parse_yes_no("分析……\n答案：是") == (True, "exact")
    assert eif_protocol.parse_yes_no("答案：否") == (False, "exact")
    assert eif_protocol.parse_yes_no("答案：是 答案：否 是") == (False, "fallback")
    assert eif_protocol.parse_yes_no("是的") == (True, "fallback")
    assert eif_protocol.parse_yes_no("  ") is None
    assert RolloutVerdicts([[True]]).valid
