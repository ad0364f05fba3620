"""GRPO/SegPO advantages, clipped policy loss, verdict rewards (vs NumPy written from docs/rl.md)
and response segmentation by SUB_INSTRUCTION headings (English and Chinese, every heading variant)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iopo_jax.rl import (
    RewardWeights,
    clipped_policy_loss,
    grpo_advantages,
    grpo_token_advantages,
    k3_kl,
    rewards_from_verdicts,
    segpo_advantages,
)
from iopo_jax.rl.segments import (
    expected_ids_from_keys,
    find_headings,
    hf_token_bytes,
    offsets_from_token_bytes,
    segment_batch,
    segment_response,
)

EPS = 1e-6


# ------------------------------------------------------------------ NumPy reference (loops, float64)

def np_normalize(values, ddof=1, eps=EPS):
    """(r - mean) / (std + eps) of a list; zeros when all equal or too few members."""
    v = np.asarray(values, np.float64)
    if len(v) <= ddof or v.max() == v.min():
        return np.zeros_like(v)
    std = math.sqrt(((v - v.mean()) ** 2).sum() / (len(v) - ddof))
    return (v - v.mean()) / (std + eps)


def np_segpo(r_o, r_phi, seg_valid, tok_seg, resp_mask, ddof=1):
    P, G, J = r_phi.shape
    T = tok_seg.shape[-1]
    a_o = np.stack([np_normalize(r_o[p], ddof) for p in range(P)])
    a_phi = np.zeros((P, G, J))
    for p in range(P):
        for j in range(J):
            members = [i for i in range(G) if seg_valid[p, i, j]]
            for i, a in zip(members, np_normalize([r_phi[p, i, j] for i in members], ddof) if members else []):
                a_phi[p, i, j] = a
    tok = np.zeros((P, G, T))
    for p in range(P):
        for i in range(G):
            for t in range(T):
                if not resp_mask[p, i, t]:
                    continue
                s = tok_seg[p, i, t]
                tok[p, i, t] = a_o[p, i] + (a_phi[p, i, s] if s >= 0 and seg_valid[p, i, s] else 0.0)
    return tok, a_o, a_phi


def hand_made_groups():
    """3 prompts x 4 rollouts x 3 segments x 10 tokens; all-equal groups, missing segments, gaps."""
    r_o = np.array([
        [2.0, 2.0, 2.0, 2.0],  # all equal: A_o = 0
        [0.5, 3.0, 1.0, 4.0],
        [1.25, 0.0, 2.5, 1.25],
    ])
    r_phi = np.array([
        [[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 1, 1]],  # segment 2 all equal among the group
        [[1, 1, 0], [0, 1, 1], [1, 0, 0], [1, 0, 1]],
        [[0, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 1]],
    ], np.float64)
    seg_valid = np.ones((3, 4, 3), bool)
    seg_valid[1, 2, 1] = False  # rollout 2 of prompt 1 lacks segment 1 (its r_phi=0 must not count)
    seg_valid[1, 3, 2] = False
    seg_valid[2, :, 2] = [True, False, False, False]  # a segment only one rollout has -> 0
    seg_valid[2, 2, :] = False  # a rollout with no segment at all (format failure)
    tok_seg = np.full((3, 4, 10), -1)
    for p in range(3):
        for i in range(4):
            # 2 tokens of preamble (-1), then segments in order, the ones it has
            t = 2
            for j in range(3):
                if seg_valid[p, i, j]:
                    tok_seg[p, i, t:t + 2] = j
                    t += 2
    tok_seg[0, 0, 9] = -1  # a token after the last segment, outside
    resp_mask = np.ones((3, 4, 10), bool)
    resp_mask[:, 1, 8:] = False  # padding
    return r_o, r_phi, seg_valid, tok_seg, resp_mask


@pytest.mark.parametrize("ddof", [1, 0])
def test_segpo_advantages_match_numpy(ddof):
    r_o, r_phi, seg_valid, tok_seg, resp_mask = hand_made_groups()
    got = segpo_advantages(r_o, r_phi, seg_valid, tok_seg, resp_mask, ddof=ddof)
    want_tok, want_o, want_phi = np_segpo(r_o, r_phi, seg_valid, tok_seg, resp_mask, ddof)
    np.testing.assert_allclose(got.output, want_o, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.segment, want_phi, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.token, want_tok, rtol=1e-5, atol=1e-6)
    # the special cases, stated directly
    assert np.all(np.asarray(got.output[0]) == 0.0)  # all-equal group
    assert np.all(np.asarray(got.segment[0, :, 2]) == 0.0)  # all-equal segment
    assert np.all(np.asarray(got.segment[2, :, 2]) == 0.0)  # segment present in a single rollout
    assert float(got.segment[1, 2, 1]) == 0.0  # missing segment
    # tokens outside any segment get A_o only; padding gets 0
    np.testing.assert_allclose(got.token[1, 0, :2], want_o[1, 0], rtol=1e-6)
    assert np.all(np.asarray(got.token[:, 1, 8:]) == 0.0)
    # flat [P*G, T] layout gives the same
    flat = segpo_advantages(r_o, r_phi, seg_valid, tok_seg.reshape(12, 10), resp_mask.reshape(12, 10), ddof=ddof)
    np.testing.assert_array_equal(flat.token, got.token)


def test_missing_segment_excluded_from_statistics():
    # prompt 1, segment 1: members are rollouts 0, 1, 3 with r_phi 1, 1, 0 (rollout 2 has r_phi 0 but no segment)
    r_o, r_phi, seg_valid, tok_seg, resp_mask = hand_made_groups()
    got = segpo_advantages(r_o, r_phi, seg_valid, tok_seg, resp_mask)
    vals = np.array([1.0, 1.0, 0.0])
    m, s = vals.mean(), vals.std(ddof=1)
    np.testing.assert_allclose(np.asarray(got.segment[1, [0, 1, 3], 1]), (vals - m) / (s + EPS), rtol=1e-5)


def test_grpo_two_rollouts_by_hand_and_token_broadcast():
    a = grpo_advantages(np.array([[0.0, 1.0], [3.0, 3.0]]))
    # mean 0.5, sample std sqrt(0.5): +-0.5/0.70710678
    np.testing.assert_allclose(a[0], [-0.5 / (math.sqrt(0.5) + EPS), 0.5 / (math.sqrt(0.5) + EPS)], rtol=1e-6)
    np.testing.assert_array_equal(a[1], [0.0, 0.0])
    mask = np.array([[[1, 1, 0], [1, 0, 0]], [[1, 1, 1], [1, 1, 1]]], bool)
    tok = grpo_token_advantages(np.array([[0.0, 1.0], [3.0, 3.0]]), mask)
    np.testing.assert_allclose(tok[0, 1], [a[0, 1], 0, 0], rtol=1e-6)
    # segpo with the segment term off is GRPO
    r_phi = np.zeros((2, 2, 1))
    seg = segpo_advantages(np.array([[0.0, 1.0], [3.0, 3.0]]), r_phi, np.ones((2, 2, 1), bool),
                           np.zeros((2, 2, 3), int), mask, use_segment=False)
    np.testing.assert_allclose(seg.token, tok, rtol=1e-6)


def test_padded_rollouts_do_not_count():
    r = np.array([[1.0, 2.0, 3.0, 100.0]])
    valid = np.array([[True, True, True, False]])
    np.testing.assert_allclose(grpo_advantages(r, valid=valid)[0, :3], np_normalize([1, 2, 3]), rtol=1e-5)
    assert float(grpo_advantages(r, valid=valid)[0, 3]) == 0.0


def np_policy_loss(logp, old, adv, mask, ref, eps_low, eps_high, kl_coef, aggregation):
    ratio = np.exp(logp - old)
    pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps_low, 1 + eps_high))
    per = pg.copy()
    if ref is not None:
        per = per + kl_coef * (np.exp(ref - logp) - (ref - logp) - 1)
    if aggregation == "token_mean":
        return (per * mask).sum() / mask.sum()
    seqs = [(per[b] * mask[b]).sum() / mask[b].sum() for b in range(len(mask)) if mask[b].sum() > 0]
    return float(np.mean(seqs))


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def policy_inputs(rng, b=4, t=9):
    old = -rng.uniform(0.1, 3.0, size=(b, t))
    logp = old + rng.normal(0, 0.3, size=(b, t))  # some ratios beyond 1 +- 0.2
    ref = old + rng.normal(0, 0.2, size=(b, t))
    adv = rng.normal(size=(b, t))
    mask = rng.uniform(size=(b, t)) < 0.8
    mask[-1] = False  # a sequence without tokens
    return logp, old, adv, mask, ref


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("use_ref", [True, False])
def test_clipped_policy_loss_and_gradient(x64, aggregation, use_ref):
    rng = np.random.default_rng(7)
    logp, old, adv, mask, ref = policy_inputs(rng)
    kw = dict(eps_low=0.2, eps_high=0.28, kl_coef=0.05, aggregation=aggregation)
    r = ref if use_ref else None
    loss, metrics = clipped_policy_loss(logp, old, adv, mask, r, **kw)
    want = np_policy_loss(logp, old, adv, mask, r, 0.2, 0.28, 0.05, aggregation)
    np.testing.assert_allclose(float(loss), want, rtol=1e-10)
    ratio = np.exp(logp - old)
    active = mask & (((ratio < 0.8) & (adv < 0)) | ((ratio > 1.28) & (adv > 0)))
    assert active.sum() > 0
    np.testing.assert_allclose(float(metrics["clip_fraction"]), active.sum() / mask.sum(), rtol=1e-10)
    if use_ref:
        kl = np.exp(ref - logp) - (ref - logp) - 1
        np.testing.assert_allclose(float(metrics["kl"]), (kl * mask).sum() / mask.sum(), rtol=1e-10)
    else:
        assert "kl" not in metrics
    # gradient w.r.t. logp vs central differences of the NumPy loss
    g = np.asarray(jax.grad(lambda lp: clipped_policy_loss(lp, old, adv, mask, r, **kw)[0])(jnp.asarray(logp)))
    num = np.zeros_like(logp)
    for idx in np.ndindex(logp.shape):
        hi, lo = logp.copy(), logp.copy()
        hi[idx] += 1e-6
        lo[idx] -= 1e-6
        num[idx] = (np_policy_loss(hi, old, adv, mask, r, 0.2, 0.28, 0.05, aggregation)
                    - np_policy_loss(lo, old, adv, mask, r, 0.2, 0.28, 0.05, aggregation)) / 2e-6
    np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-9)
    assert np.all(g[~mask] == 0.0)
    if not use_ref:  # clipped tokens get no gradient from the surrogate
        assert np.all(g[active] == 0.0)


def test_policy_gradient_sign_follows_advantage():
    """A descent step raises log-probs of positive-advantage tokens and lowers negative ones."""
    logp = jnp.full((2, 3), -1.0)
    adv = jnp.array([[1.0, 1.0, 0.0], [-1.0, -2.0, 0.0]])
    mask = jnp.ones((2, 3), bool)
    g = jax.grad(lambda lp: clipped_policy_loss(lp, logp, adv, mask)[0])(logp)
    assert np.all(np.asarray(g[0, :2]) < 0) and np.all(np.asarray(g[1, :2]) > 0)
    assert np.all(np.asarray(g[:, 2]) == 0)


def test_k3_and_normalizer():
    assert float(k3_kl(jnp.array(-1.0), jnp.array(-1.0))) == 0.0
    assert float(k3_kl(jnp.array(-1.0), jnp.array(-2.0))) > 0.0
    logp = jnp.zeros((2, 4))
    adv = jnp.ones((2, 4))
    mask = jnp.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool)
    loss, _ = clipped_policy_loss(logp, logp, adv, mask, normalizer=10.0)
    np.testing.assert_allclose(float(loss), -3.0 / 10.0, rtol=1e-6)
    with pytest.raises(ValueError, match="aggregation"):
        clipped_policy_loss(logp, logp, adv, mask, aggregation="sum")


def test_rewards_from_verdicts_match_numpy():
    # 2 rollouts; sub-instruction constraint counts [3, 1, 2] (J padded to 4, K to 3)
    counts = [3, 1, 2]
    verdicts_lists = [
        [[1, 1, 1], [1], [1, 0]],
        [[1, 1, 1], [1], [1, 1]],
    ]
    J, K = 4, 3
    S = np.zeros((2, J, K), int)
    cm = np.zeros((2, J, K), bool)
    for i, v in enumerate(verdicts_lists):
        for j, row in enumerate(v):
            S[i, j, : len(row)] = row
            cm[i, j, : len(row)] = True
    S[:, 3, :] = 1  # junk in padding must not count
    fmt = np.array([1.0, 0.0])
    out = rewards_from_verdicts(S, cm, format_reward=fmt)
    for i, v in enumerate(verdicts_lists):
        ila = np.mean([all(row) for row in v])
        cla = sum(sum(row) for row in v) / sum(counts)
        allp = float(all(all(row) for row in v))
        np.testing.assert_allclose(float(out["ila"][i]), ila, rtol=1e-6)
        np.testing.assert_allclose(float(out["cla"][i]), cla, rtol=1e-6)
        assert float(out["all_pass"][i]) == allp
        np.testing.assert_allclose(float(out["r_o"][i]), ila + cla + allp + fmt[i], rtol=1e-6)
        np.testing.assert_array_equal(out["r_phi"][i], [float(all(row)) for row in v] + [0.0])
    w = RewardWeights(ila=2.0, cla=0.0, all_pass=0.0, format=0.5)
    out_w = rewards_from_verdicts(S, cm, format_reward=fmt, weights=w)
    np.testing.assert_allclose(out_w["r_o"], 2 * np.asarray(out["ila"]) + 0.5 * fmt, rtol=1e-6)


# ------------------------------------------------------------------ segmentation

EN_ANSWERS = ["Painting legs on a snake spoils it.\nExample: adding more slides was overkill!",
              "- behaviour: extra material\n- consequence: worse teaching\n\n",
              "Lesson: stop when done."]
ZH_ANSWERS = ["“画蛇添足”形容做事多此一举，反而坏事。\n\n试想：你这样不断增添冗余材料，岂不是画蛇添足？",
              "行为：不断增添补充材料（如“𪚥”“䲜”等生僻字）\n后果：影响教学效果🤗🫠\n",
              "教训：教学设计应精准把握。"]
VARIANTS = {
    "plain": "SUB_INSTRUCTION_{k}:",
    "lower_fullwidth": "sub_instruction_{k}：",
    "space": "SUB_INSTRUCTION {k}",
    "bold": "**SUB_INSTRUCTION_{k}**:",
    "bold_colon_inside": "**SUB_INSTRUCTION_{k}：**",
    "md_heading": "### SUB_INSTRUCTION_{k}",
    "title_hyphen": "Sub-Instruction-{k}:",
    "brackets": "【SUB_INSTRUCTION_{k}】",
}


def build_response(answers, heading, ids, preamble):
    """Response text and the exact char span of each segment (heading line to next heading line)."""
    text, spans = preamble, []
    for k, ans in zip(ids, answers):
        start = len(text)
        text += heading.format(k=k) + "\n" + ans
        if not text.endswith("\n"):
            text += "\n\n"
        spans.append((start, len(text)))
    spans[-1] = (spans[-1][0], len(text))
    return text, spans


def check_token_spans(text, offsets, seg, spans, token_text):
    """Tokens of slot j are exactly the tokens covering segment j's text; others are -1."""
    for j, (s, e) in enumerate(spans):
        got = "".join(token_text[t] for t in range(len(offsets)) if seg[t] == j)
        assert got == text[s:e], (j, got, text[s:e])
    pre = "".join(token_text[t] for t in range(len(offsets)) if seg[t] == -1)
    assert pre == text[: spans[0][0]]


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("base", [0, 1])
def test_segments_hand_offsets(lang, variant, base):
    answers = EN_ANSWERS if lang == "en" else ZH_ANSWERS
    ids = [base, base + 1, base + 2]
    preamble = "Here are the answers:\n\n" if lang == "en" else "我来按要求完成任务：\n\n"
    text, spans = build_response(answers, VARIANTS[variant], ids, preamble)
    # hand-made offsets: one token per character, plus an empty special token at the end
    offsets = [(i, i + 1) for i in range(len(text))] + [(len(text), len(text))]
    r = segment_response(text, offsets, num_sub_instructions=3, index_base=base)
    assert r.format_ok == 1 and r.found.all()
    token_text = [text[s:e] for s, e in offsets]
    check_token_spans(text, offsets, r.token_segment, spans, token_text)
    assert r.token_segment[-1] == -1
    # the wrong index base finds the headings but not in the expected numbering
    wrong = segment_response(text, offsets, num_sub_instructions=3, index_base=1 - base)
    assert wrong.format_ok == 0


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("variant", ["plain", "lower_fullwidth", "bold", "md_heading", "brackets"])
def test_segments_with_qwen_tokenizer(qwen_tokenizer, lang, variant):
    answers = EN_ANSWERS if lang == "en" else ZH_ANSWERS
    preamble = "Sure.\n\n" if lang == "en" else "好的。\n\n"
    ids = [0, 1, 2]
    text, spans = build_response(answers, VARIANTS[variant], ids, preamble)
    enc = qwen_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    tok_ids = enc["input_ids"] + [qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    # (a) offsets from the tokenizer; (b) offsets from the sampled ids' bytes
    hf_offsets = [tuple(o) for o in enc["offset_mapping"]] + [(len(text), len(text))]
    tb = hf_token_bytes(qwen_tokenizer, tok_ids)
    decoded, byte_offsets = offsets_from_token_bytes(tb)
    assert decoded == text
    segs = []
    for offsets in (hf_offsets, byte_offsets):
        r = segment_response(text, offsets, ids)
        assert r.format_ok == 1
        token_bytes = b""
        for j, (s, e) in enumerate(spans):
            token_bytes = b"".join(tb[t] for t in range(len(tok_ids)) if r.token_segment[t] == j)
            assert token_bytes.decode("utf-8") == text[s:e]
        assert r.token_segment[-1] == -1
        segs.append(r.token_segment)
    np.testing.assert_array_equal(segs[0], segs[1])
    if lang == "zh":  # rare characters and an emoji are split over several byte-level tokens
        assert sum(len(b.decode("utf-8", errors="ignore")) == 0 for b in tb[:-1]) >= 4


def test_format_flag_cases():
    def fmt(text, ids=(0, 1)):
        return segment_response(text, [(0, len(text))], list(ids)).format_ok

    assert fmt("SUB_INSTRUCTION_0: a\nSUB_INSTRUCTION_1: b") == 1
    assert fmt("SUB_INSTRUCTION_1: b\nSUB_INSTRUCTION_0: a") == 0  # out of order
    assert fmt("SUB_INSTRUCTION_0: a") == 0  # missing
    assert fmt("SUB_INSTRUCTION_0: a\nSUB_INSTRUCTION_0: again\nSUB_INSTRUCTION_1: b") == 0  # duplicate
    assert fmt("SUB_INSTRUCTION_0: a\nSUB_INSTRUCTION_1: b\nSUB_INSTRUCTION_2: c") == 0  # extra
    assert fmt("no headings at all") == 0
    # EIFBench keys may skip numbers
    assert fmt("SUB_INSTRUCTION_0: a\nSUB_INSTRUCTION_2: b", expected_ids_from_keys(["sub_instruction_0", "sub_instruction_2"])) == 1


def test_not_headings():
    text = ("SUB_INSTRUCTION_0: first\nAs SUB_INSTRUCTION_1: says, mid-line mentions do not count.\n"
            "SUB_INSTRUCTION_1 asks for a list, a sentence is not a heading\n* SUB_INSTRUCTION_1 is also prose\n"
            "SUB_INSTRUCTION_12: twelve is not one")
    assert [h.number for h in find_headings(text)] == [0, 12]
    r = segment_response(text, [(i, i + 1) for i in range(len(text))], [0, 1])
    assert r.format_ok == 0 and list(r.found) == [True, False]
    assert r.token_segment[text.index("SUB_INSTRUCTION_12")] == -1  # unexpected number: outside


def test_unexpected_and_repeated_headings_map_sensibly():
    text = "intro\nSUB_INSTRUCTION_1: b\nSUB_INSTRUCTION_9: ?\nSUB_INSTRUCTION_1: b again"
    r = segment_response(text, [(i, i + 1) for i in range(len(text))], [0, 1])
    seg = r.token_segment
    assert seg[0] == -1 and seg[text.index("b")] == 1 and seg[text.index("?")] == -1
    assert seg[text.index("b again")] == 1
    assert list(r.found) == [False, True] and r.format_ok == 0


def test_eifbench_keys(shared_data):
    import json

    items = json.load(open(shared_data / "eifbench" / "sorted_party100.json", encoding="utf-8"))
    bases = {expected_ids_from_keys(it["sub_instructions"])[0] for it in items}
    assert bases == {0, 1}  # both numberings occur in the data
    item = next(it for it in items if expected_ids_from_keys(it["sub_instructions"])[0] == 1)
    ids = expected_ids_from_keys(item["sub_instructions"])
    text = "".join(f"SUB_INSTRUCTION_{k}：\nanswer {k}\n\n" for k in ids)
    r = segment_response(text, [(i, i + 1) for i in range(len(text))], item["sub_instructions"])
    assert r.format_ok == 1 and r.found.all()


def test_segment_batch_static_shapes():
    texts = ["SUB_INSTRUCTION_0: a\nSUB_INSTRUCTION_1: b", "x\nSUB_INSTRUCTION_1: only"]
    offs = [[(i, i + 1) for i in range(len(t))] for t in texts]
    seg, found, fmt = segment_batch(texts, offs, [[0, 1], [0, 1]], num_tokens=64, num_slots=4)
    assert seg.shape == (2, 64) and found.shape == (2, 4)
    assert list(fmt) == [1, 0]
    assert found.tolist() == [[True, True, False, False], [False, True, False, False]]
    assert np.all(seg[:, 50:] == -1)
    with pytest.raises(ValueError, match="response 0"):
        segment_batch(texts, offs, [[0, 1], [0, 1]], num_tokens=8, num_slots=4)
